//! The on-machine harness: real `vmcred-host` and `vmcred-guest` processes,
//! joined through a stand-in for the hypervisor's hybrid-vsock muxer, with
//! real files, real sockets and real TLS. No VM is needed and no AF_VSOCK
//! socket is ever opened: the guest agent listens on a Unix socket, and the
//! muxer answers `CONNECT <port>\n` by connecting to it, exactly as
//! cloud-hypervisor or vhost-device-vsock would to the guest's vsock port.
//!
//! The boot path is real too: `vmcred-host launch --dry-run` produces the
//! qemu SMBIOS files, and `import_smbios` does what PID 1 does with them
//! (write each `io.systemd.credential[.binary]:NAME=VALUE` into the guest's
//! credentials directory, mode 0400), which is how the guest agent gets its
//! bootstrap.

pub mod hostile_guest;
pub mod inotify;
pub mod journal;
pub mod measure;
pub mod muxer;
pub mod prom;

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The built agent binaries.
#[derive(Debug, Clone)]
pub struct Bins {
    /// The `vmcred-host` front; it execs `vmcred-host-agent`, which must be
    /// in the same directory, for `serve`, `launch` and the rest.
    pub host: PathBuf,
    pub guest: PathBuf,
}

impl Bins {
    /// Finds `vmcred-host` (with `vmcred-host-agent` beside it) and
    /// `vmcred-guest` next to the running executable (target/<profile>/ or
    /// its deps/ directory), or in `$VMCRED_BIN_DIR`.
    pub fn find() -> Result<Bins> {
        let mut dirs = Vec::new();
        if let Some(d) = std::env::var_os("VMCRED_BIN_DIR") {
            dirs.push(PathBuf::from(d));
        }
        let exe = std::env::current_exe()?;
        if let Some(d) = exe.parent() {
            dirs.push(d.to_path_buf());
            if let Some(p) = d.parent() {
                dirs.push(p.to_path_buf());
            }
        }
        for d in &dirs {
            let (h, g) = (d.join("vmcred-host"), d.join("vmcred-guest"));
            if h.is_file() && d.join("vmcred-host-agent").is_file() && g.is_file() {
                return Ok(Bins { host: h, guest: g });
            }
        }
        bail!(
            "vmcred-host, vmcred-host-agent and vmcred-guest not found together in {dirs:?}; build them first: cargo build --bins"
        )
    }
}

/// One guest as the harness runs it.
pub struct Guest {
    pub name: String,
    pub dir: PathBuf,
    /// The hybrid-vsock socket the host agent dials.
    pub muxer_socket: PathBuf,
    /// The guest agent's listening socket (its "vsock port").
    pub agent_socket: PathBuf,
    pub creds_dir: PathBuf,
    pub state_dir: PathBuf,
    pub systemctl_log: PathBuf,
    /// When set, the credentials directory is a read-only ramfs in the
    /// agent's private mount namespace, like systemd's.
    pub read_only_mount: bool,
    pub units: BTreeMap<String, Vec<String>>,
    /// Top-level lines added to the guest agent's `guest.toml`.
    pub extra_config: String,
    pub child: Option<Child>,
    pub log: PathBuf,
    /// A command the agent runs under (`unshare …`), and extra environment
    /// (`JOURNAL_STREAM`), as for the host agent.
    pub prefix: Vec<String>,
    pub env: Vec<(String, String)>,
    /// `launch_key = "required"` in the host config: `launch_dry_run`
    /// then hands the host's key file to `launch` as the VM's unit would
    /// (`LoadCredential=vmcred.launch-key:…`).
    pub launch_key: bool,
}

/// A host agent, its config and its guests in one temporary directory.
pub struct World {
    pub dir: tempfile::TempDir,
    pub bins: Bins,
    pub guests: BTreeMap<String, Guest>,
    /// VM → credential → (source file, boot)
    pub creds: BTreeMap<String, BTreeMap<String, (PathBuf, bool)>>,
    pub host: Option<Child>,
    pub host_log: PathBuf,
    pub log_level: String,
    /// Top-level config lines that `start_host` and `reload_host` add.
    pub extra_config: String,
    /// A command (and its arguments) that `start_host` runs the agent
    /// under, e.g. `unshare -m …`; the agent's argv is appended.
    pub host_prefix: Vec<String>,
    /// Extra environment for the host agent.
    pub host_env: Vec<(String, String)>,
    _muxers: Vec<muxer::Muxer>,
}

pub const PORT: u32 = 700;

impl World {
    pub fn new() -> Result<World> {
        let dir = tempfile::Builder::new().prefix("vmcred-world").tempdir()?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let host_log = dir.path().join("host.log");
        Ok(World {
            dir,
            bins: Bins::find()?,
            guests: BTreeMap::new(),
            creds: BTreeMap::new(),
            host: None,
            host_log,
            log_level: "debug".into(),
            extra_config: String::new(),
            host_prefix: Vec::new(),
            host_env: Vec::new(),
            _muxers: Vec::new(),
        })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> PathBuf {
        self.path().join("host.toml")
    }

    /// Adds a VM with its muxer; the guest agent is not started.
    pub fn add_vm(&mut self, name: &str, read_only_mount: bool) -> Result<()> {
        let dir = self.path().join("vms").join(name);
        std::fs::create_dir_all(&dir)?;
        let muxer_socket = dir.join("notify.vsock");
        let agent_socket = dir.join("guest-agent.sock");
        let mut ports = BTreeMap::new();
        ports.insert(PORT, agent_socket.clone());
        self._muxers
            .push(muxer::Muxer::start(&muxer_socket, ports)?);
        let g = Guest {
            name: name.into(),
            creds_dir: dir.join("credentials"),
            state_dir: dir.join("state"),
            systemctl_log: dir.join("systemctl.log"),
            log: dir.join("guest.log"),
            dir,
            muxer_socket,
            agent_socket,
            read_only_mount,
            units: BTreeMap::new(),
            extra_config: String::new(),
            child: None,
            prefix: Vec::new(),
            env: Vec::new(),
            launch_key: false,
        };
        self.guests.insert(name.into(), g);
        self.creds.entry(name.into()).or_default();
        Ok(())
    }

    /// Writes a credential's source file on the host (mode 0400), and adds it
    /// to the config if new. Call `write_config` + `reload_host` to tell a
    /// running host agent about a new one.
    pub fn set_secret(&mut self, vm: &str, cred: &str, value: &[u8], boot: bool) -> Result<()> {
        let src_dir = self.path().join("secrets").join(vm);
        std::fs::create_dir_all(&src_dir)?;
        std::fs::set_permissions(&src_dir, std::fs::Permissions::from_mode(0o700))?;
        let path = src_dir.join(cred);
        write_atomic(&path, value, 0o400)?;
        self.creds
            .entry(vm.into())
            .or_default()
            .insert(cred.into(), (path, boot));
        Ok(())
    }

    /// Makes `path` (a file the test owns, anywhere) the source of a
    /// credential; see `set_secret` for telling a running host.
    pub fn set_source(&mut self, vm: &str, cred: &str, path: &Path, boot: bool) {
        self.creds
            .entry(vm.into())
            .or_default()
            .insert(cred.into(), (path.to_path_buf(), boot));
    }

    pub fn remove_credential(&mut self, vm: &str, cred: &str) {
        if let Some(m) = self.creds.get_mut(vm) {
            m.remove(cred);
        }
    }

    pub fn write_config(&self, extra_top: &str) -> Result<()> {
        let mut t = String::new();
        let p = self.path();
        t.push_str(&format!(
            "state_dir = \"{}\"\ncontrol_socket = \"{}\"\nlaunch_socket = \"{}\"\npoll_interval = \"0s\"\ndial_backoff_max = \"1s\"\nrpc_timeout = \"10s\"\n{extra_top}\n",
            p.join("host-state").display(),
            p.join("run/control.sock").display(),
            p.join("run/launch.sock").display(),
        ));
        for (vm, g) in &self.guests {
            t.push_str(&format!(
                "\n[vms.{vm}]\nhybrid_socket = \"{}\"\nport = {PORT}\n",
                g.muxer_socket.display()
            ));
            if g.launch_key {
                t.push_str("launch_key = \"required\"\n");
            }
            for (cred, (path, boot)) in self.creds.get(vm).into_iter().flatten() {
                t.push_str(&format!(
                    "[vms.{vm}.credentials.\"{cred}\"]\npath = \"{}\"\nboot = {boot}\n",
                    path.display()
                ));
            }
        }
        std::fs::write(self.config_path(), t)?;
        Ok(())
    }

    pub fn start_host(&mut self) -> Result<()> {
        self.write_config(&self.extra_config)?;
        let sock = self.path().join("run/control.sock");
        // A killed agent leaves its socket behind; wait for the new one.
        let _ = std::fs::remove_file(&sock);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.host_log)?;
        let mut cmd = match self.host_prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&self.bins.host);
                c
            }
            None => Command::new(&self.bins.host),
        };
        let child = cmd
            .arg("serve")
            .arg("--config")
            .arg(self.config_path())
            .envs(self.host_env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", &self.log_level)
            .env_remove("NOTIFY_SOCKET")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start vmcred-host serve")?;
        self.host = Some(child);
        wait_until(Duration::from_secs(20), || sock.exists())
            .context("vmcred-host did not create its control socket")?;
        Ok(())
    }

    /// SIGTERM, then wait.
    pub fn stop_host(&mut self) -> Result<()> {
        if let Some(mut c) = self.host.take() {
            signal(&c, nix::sys::signal::Signal::SIGTERM);
            wait_child(&mut c, Duration::from_secs(10))?;
        }
        Ok(())
    }

    pub fn kill_host(&mut self) -> Result<()> {
        if let Some(mut c) = self.host.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        Ok(())
    }

    /// Rewrites the config and sends SIGHUP.
    pub fn reload_host(&self) -> Result<()> {
        self.write_config(&self.extra_config)?;
        match &self.host {
            Some(c) => {
                signal(c, nix::sys::signal::Signal::SIGHUP);
                Ok(())
            }
            None => bail!("host agent not running"),
        }
    }

    /// `reload_host`, then waits until the agent has applied the new config
    /// (its "config reloaded" log line; needs the log level at info or
    /// lower, as the tests run it). A `rotate` sent right after SIGHUP
    /// otherwise races the reload and may be checked against the old
    /// config ("no credential named ...").
    pub fn reload_host_applied(&self) -> Result<()> {
        let reloads = || {
            std::fs::read_to_string(&self.host_log)
                .unwrap_or_default()
                .matches("config reloaded")
                .count()
        };
        let before = reloads();
        self.reload_host()?;
        wait_until(Duration::from_secs(20), || reloads() > before)
            .context("the host agent did not log \"config reloaded\" after SIGHUP")
    }

    /// Boots a guest: the launch wrapper's SMBIOS files are imported the
    /// way PID 1 does it, then the guest agent starts.
    pub fn boot_guest(&mut self, vm: &str) -> Result<Vec<String>> {
        self.boot_guest_as(vm, None)
    }

    /// Boots another VM in `vm`'s place, as whoever can start a VM on a
    /// stopped VM's CID would: the same public bootstrap, and instead of
    /// the launch key `key` (`None`: no key at all).
    pub fn boot_impostor(&mut self, vm: &str, key: Option<&[u8]>) -> Result<Vec<String>> {
        self.boot_guest_as(vm, Some(key))
    }

    fn boot_guest_as(&mut self, vm: &str, impostor: Option<Option<&[u8]>>) -> Result<Vec<String>> {
        let argv = self.launch_dry_run(vm, "qemu")?;
        let files: Vec<PathBuf> = argv
            .iter()
            .filter_map(|a| a.strip_prefix("type=11,path="))
            .map(|p| PathBuf::from(p.replace(",,", ",")))
            .collect();
        let g = self.guests.get(vm).context("no such VM")?;
        // A fresh boot: empty credentials directory, empty /run state.
        let _ = std::fs::remove_dir_all(&g.creds_dir);
        let _ = std::fs::remove_dir_all(&g.state_dir);
        std::fs::create_dir_all(&g.creds_dir)?;
        std::fs::set_permissions(&g.creds_dir, std::fs::Permissions::from_mode(0o700))?;
        let mut imported = Vec::new();
        for f in files {
            let oem = std::fs::read(&f)?;
            let (name, value) = import_smbios(&oem)?;
            if impostor.is_some() && name == "vmcred.launch-key" {
                continue;
            }
            write_atomic(&g.creds_dir.join(&name), &value, 0o400)?;
            imported.push(name);
        }
        if let Some(Some(key)) = impostor {
            write_atomic(&g.creds_dir.join("vmcred.launch-key"), key, 0o400)?;
        }
        self.start_guest_agent(vm)?;
        Ok(imported)
    }

    /// Where the host agent keeps `vm`'s launch key.
    pub fn launch_key_path(&self, vm: &str) -> PathBuf {
        self.path().join("host-state/launch-keys").join(vm)
    }

    /// `vmcred-host launch --dry-run`: the hypervisor argv it would exec.
    pub fn launch_dry_run(&self, vm: &str, hypervisor: &str) -> Result<Vec<String>> {
        let g = self.guests.get(vm).context("no such VM")?;
        // The launch wrapper reads boot credentials from the
        // $CREDENTIALS_DIRECTORY that LoadCredential= gives the VM's unit.
        let unit_creds = g.dir.join("unit-credentials");
        let _ = std::fs::remove_dir_all(&unit_creds);
        std::fs::create_dir_all(&unit_creds)?;
        std::fs::set_permissions(&unit_creds, std::fs::Permissions::from_mode(0o700))?;
        for (cred, (path, boot)) in self.creds.get(vm).into_iter().flatten() {
            if *boot {
                std::fs::copy(path, unit_creds.join(cred))?;
            }
        }
        if g.launch_key {
            std::fs::copy(
                self.launch_key_path(vm),
                unit_creds.join("vmcred.launch-key"),
            )
            .context("the host agent's launch key for the VM (is the host started?)")?;
        }
        let base: Vec<&str> = match hypervisor {
            "qemu" => vec!["qemu-system-x86_64", "-m", "512", "-nographic"],
            _ => vec![
                "cloud-hypervisor",
                "--cpus",
                "boot=1",
                "--platform",
                "oem_strings=[io.systemd.credential:EXISTING=1]",
            ],
        };
        let out = Command::new(&self.bins.host)
            .args(["launch", "--config"])
            .arg(self.config_path())
            .args([
                "--vm",
                vm,
                "--hypervisor",
                hypervisor,
                "--dry-run",
                "--runtime-dir",
            ])
            .arg(g.dir.join("launch"))
            .arg("--")
            .args(&base)
            .env("CREDENTIALS_DIRECTORY", &unit_creds)
            .output()?;
        if !out.status.success() {
            bail!(
                "vmcred-host launch failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let argv: Vec<String> = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "launch --dry-run printed {:?}",
                String::from_utf8_lossy(&out.stdout)
            )
        })?;
        Ok(argv)
    }

    pub fn start_guest_agent(&mut self, vm: &str) -> Result<()> {
        let guest_bin = self.bins.guest.clone();
        let level = self.log_level.clone();
        let g = self.guests.get_mut(vm).context("no such VM")?;
        std::fs::create_dir_all(&g.state_dir)?;
        let systemctl = g.dir.join("systemctl");
        std::fs::write(
            &systemctl,
            format!(
                "#!/bin/sh\n# Records unit actions; the real systemctl runs in the VM test.\n[ -z \"$VMCRED_TEST_SYSTEMCTL_SLEEP\" ] || sleep \"$VMCRED_TEST_SYSTEMCTL_SLEEP\"\necho \"$@\" >> '{}'\n",
                g.systemctl_log.display()
            ),
        )?;
        std::fs::set_permissions(&systemctl, std::fs::Permissions::from_mode(0o755))?;
        let mut cfg = String::from("initial_sync_timeout = \"20s\"\n");
        cfg.push_str(&g.extra_config);
        for (cred, units) in &g.units {
            cfg.push_str(&format!(
                "[credentials.\"{cred}\"]\nrestart_units = {units:?}\n"
            ));
        }
        let guest_cfg = g.dir.join("guest.toml");
        std::fs::write(&guest_cfg, cfg)?;
        let mut args: Vec<String> = vec![
            guest_bin.display().to_string(),
            "--config".into(),
            guest_cfg.display().to_string(),
            "--bootstrap".into(),
            g.creds_dir.join("vmcred.bootstrap").display().to_string(),
            "--launch-key".into(),
            g.creds_dir.join("vmcred.launch-key").display().to_string(),
            "--credentials-dir".into(),
            g.creds_dir.display().to_string(),
            "--state-dir".into(),
            g.state_dir.display().to_string(),
            "--listen-unix".into(),
            g.agent_socket.display().to_string(),
            // The peer on this Unix socket is the muxer stand-in, which
            // runs as whoever runs the harness: root in CI, the user in the
            // demo. (The real agent admits only CID 2 over vsock; the Unix
            // transport exists for tests and has no default uid.)
            "--allow-uid".into(),
            nix::unistd::geteuid().as_raw().to_string(),
            "--systemctl".into(),
            systemctl.display().to_string(),
        ];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&g.log)?;
        let mut cmd = if g.read_only_mount {
            // systemd's setup, in a private mount namespace: a ramfs over
            // the directory (keeping the files PID 1 imported), remounted
            // read-only.
            let d = g.creds_dir.display().to_string();
            let script = format!(
                "set -e; mkdir -p /tmp/vmcred-import.$$; cp -a '{d}/.' /tmp/vmcred-import.$$/; \
                 mount -t ramfs -o mode=0700 ramfs '{d}'; cp -a /tmp/vmcred-import.$$/. '{d}/'; rm -rf /tmp/vmcred-import.$$; \
                 mount -o remount,bind,ro,nosuid,nodev,noexec '{d}'; exec \"$@\""
            );
            let mut c = Command::new("unshare");
            c.args(["-m", "--propagation", "private", "sh", "-c", &script, "sh"]);
            c.args(&args);
            c
        } else {
            let mut c = Command::new(args.remove(0));
            c.args(&args);
            c
        };
        if let Some((first, rest)) = g.prefix.split_first() {
            let mut wrapped = Command::new(first);
            wrapped
                .args(rest)
                .arg(cmd.get_program())
                .args(cmd.get_args());
            cmd = wrapped;
        }
        cmd.envs(g.env.iter().map(|(k, v)| (k, v)));
        cmd.env("RUST_LOG", level)
            .env_remove("NOTIFY_SOCKET")
            .stdout(log.try_clone()?)
            .stderr(log);
        g.child = Some(cmd.spawn().context("cannot start vmcred-guest")?);
        let sock = g.agent_socket.clone();
        wait_until(Duration::from_secs(20), || sock.exists())
            .context("vmcred-guest did not create its socket")?;
        Ok(())
    }

    /// Puts the hostile-guest double where the guest agent of `vm` would
    /// listen, so the host reaches it through the VM's muxer.
    pub fn start_hostile(
        &mut self,
        vm: &str,
        mode: hostile_guest::Mode,
    ) -> Result<hostile_guest::HostileGuest> {
        let g = self.guests.get(vm).context("no such VM")?;
        hostile_guest::HostileGuest::start(&g.agent_socket, mode)
    }

    pub fn kill_guest_agent(&mut self, vm: &str) -> Result<()> {
        if let Some(g) = self.guests.get_mut(vm) {
            if let Some(mut c) = g.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            let _ = std::fs::remove_file(&g.agent_socket);
        }
        Ok(())
    }

    /// The guest's credentials directory as the guest agent sees it (inside
    /// its mount namespace when the mount is a private ramfs).
    pub fn guest_view(&self, vm: &str) -> Result<PathBuf> {
        let g = self.guests.get(vm).context("no such VM")?;
        if g.read_only_mount {
            let pid = g.child.as_ref().context("guest agent not running")?.id();
            Ok(PathBuf::from(format!("/proc/{pid}/root")).join(g.creds_dir.strip_prefix("/")?))
        } else {
            Ok(g.creds_dir.clone())
        }
    }

    pub fn read_guest(&self, vm: &str, cred: &str) -> Option<Vec<u8>> {
        std::fs::read(self.guest_view(vm).ok()?.join(cred)).ok()
    }

    /// Mount options of the credentials directory in the guest agent's
    /// namespace, from /proc/PID/mountinfo.
    pub fn guest_mount_options(&self, vm: &str) -> Result<String> {
        let g = self.guests.get(vm).context("no such VM")?;
        let pid = g.child.as_ref().context("guest agent not running")?.id();
        let info = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))?;
        let target = g.creds_dir.display().to_string();
        info.lines()
            .rev()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                (f.get(4) == Some(&target.as_str())).then(|| f.get(5).map(|s| s.to_string()))
            })
            .next()
            .flatten()
            .context("credentials directory is not a mount point")
    }

    pub fn host_cmd(&self, args: &[&str]) -> Result<Output> {
        Ok(Command::new(&self.bins.host)
            .args(args)
            .arg("--config")
            .arg(self.config_path())
            .stdin(Stdio::null())
            .output()?)
    }

    /// `vmcred-host rotate --config ... VM CREDS... --timeout T`.
    pub fn rotate(&self, vm: &str, creds: &[&str], timeout: &str) -> Result<Output> {
        Ok(self.rotate_command(vm, creds, timeout).output()?)
    }

    /// `rotate` run in a thread, for a test that makes something happen
    /// while it waits; join the handle for its output.
    pub fn rotate_in_background(
        &self,
        vm: &str,
        creds: &[&str],
        timeout: &str,
    ) -> std::thread::JoinHandle<std::io::Result<Output>> {
        let mut c = self.rotate_command(vm, creds, timeout);
        std::thread::spawn(move || c.output())
    }

    fn rotate_command(&self, vm: &str, creds: &[&str], timeout: &str) -> Command {
        let mut c = Command::new(&self.bins.host);
        c.args(["rotate", "--timeout", timeout, "--config"])
            .arg(self.config_path())
            .arg(vm)
            .args(creds);
        c
    }

    /// The `vms` array of `status --json` (schema 1). Exit status 1 only
    /// means a VM is out of sync, which tests look at themselves.
    pub fn status_json(&self) -> Result<serde_json::Value> {
        let out = self.host_cmd(&["status", "--json"])?;
        if !matches!(out.status.code(), Some(0 | 1)) {
            bail!("status failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        Ok(v["vms"].clone())
    }

    pub fn wait_for_guest_value(
        &self,
        vm: &str,
        cred: &str,
        want: &[u8],
        timeout: Duration,
    ) -> Result<()> {
        wait_until(timeout, || {
            self.read_guest(vm, cred).as_deref() == Some(want)
        })
        .with_context(|| format!("{vm}/{cred} did not reach the expected value"))
    }

    pub fn logs(&self) -> String {
        let mut s = std::fs::read_to_string(&self.host_log).unwrap_or_default();
        for g in self.guests.values() {
            s.push_str(&std::fs::read_to_string(&g.log).unwrap_or_default());
        }
        s
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = self.kill_host();
        let names: Vec<String> = self.guests.keys().cloned().collect();
        for n in names {
            let _ = self.kill_guest_agent(&n);
        }
    }
}

/// What systemd's PID 1 does with one SMBIOS type 11 string: parse
/// `io.systemd.credential:NAME=VALUE` or `io.systemd.credential.binary:NAME=BASE64`.
pub fn import_smbios(oem: &[u8]) -> Result<(String, Vec<u8>)> {
    let text = oem;
    if let Some(rest) = text.strip_prefix(b"io.systemd.credential:") {
        let eq = rest
            .iter()
            .position(|b| *b == b'=')
            .context("no '=' in OEM string")?;
        return Ok((
            String::from_utf8(rest[..eq].to_vec())?,
            rest[eq + 1..].to_vec(),
        ));
    }
    if let Some(rest) = text.strip_prefix(b"io.systemd.credential.binary:") {
        let eq = rest
            .iter()
            .position(|b| *b == b'=')
            .context("no '=' in OEM string")?;
        let name = String::from_utf8(rest[..eq].to_vec())?;
        let value = base64_decode(&rest[eq + 1..])?;
        return Ok((name, value));
    }
    bail!("not a systemd credential OEM string")
}

fn base64_decode(s: &[u8]) -> Result<Vec<u8>> {
    let out = Command::new("base64")
        .arg("-d")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            if let Some(mut i) = c.stdin.take() {
                i.write_all(s)?;
            }
            c.wait_with_output()
        })?;
    if !out.status.success() {
        bail!("invalid base64 in OEM string");
    }
    Ok(out.stdout)
}

/// A world with one VM `vm` whose guest booted and holds `cred` =
/// `value`, its host started with the top-level config lines
/// `extra_config`.
pub fn booted_one(
    vm: &str,
    cred: &str,
    value: &[u8],
    extra_config: &str,
    timeout: Duration,
) -> Result<World> {
    let mut w = World::new()?;
    w.extra_config = extra_config.into();
    w.add_vm(vm, false)?;
    w.set_secret(vm, cred, value, false)?;
    w.start_host()?;
    w.boot_guest(vm)?;
    w.wait_for_guest_value(vm, cred, value, timeout)?;
    Ok(w)
}

/// A measurement harness's knob from the environment: `default` when
/// unset or not a number.
pub fn env_num<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn write_atomic(path: &Path, value: &[u8], mode: u32) -> Result<()> {
    Ok(vmcred_proto::fsutil::write_atomic(path, value, mode)?)
}

pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    bail!("timed out after {timeout:?}")
}

fn signal(c: &Child, sig: nix::sys::signal::Signal) {
    if let Ok(pid) = i32::try_from(c.id()) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
    }
}

fn wait_child(c: &mut Child, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if c.try_wait()?.is_some() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let _ = c.kill();
    bail!("process did not exit within {timeout:?}")
}
