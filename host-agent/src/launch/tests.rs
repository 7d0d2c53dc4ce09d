use super::*;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use std::collections::BTreeMap;
use std::fs::{self, DirBuilder};
use std::io::Write;
use std::io::{BufRead, BufReader};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::symlink;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::time::Duration;
use vmcred_proto::tls::Pin;

/// A value with every character that could break an option syntax.
const SECRET: &[u8] = b"hunter2,with]odd\"[bytes=\n\x00\xff";
const OTHER: &[u8] = b"staging-xyzzy";

struct Fixture {
    tmp: tempfile::TempDir,
    creds: PathBuf,
    run: PathBuf,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let creds = tmp.path().join("creds");
    fs::create_dir(&creds).unwrap();
    let run = tmp.path().join("run").join("test-vm");
    Fixture { tmp, creds, run }
}

impl Fixture {
    fn put(&self, name: &str, value: &[u8]) {
        fs::write(self.creds.join(name), value).unwrap();
    }

    fn input(&self, hypervisor: Hypervisor, creds: &[(&str, bool)], argv: &[&str]) -> LaunchInput {
        LaunchInput {
            vm: "test-vm".into(),
            hypervisor,
            carrier: CarrierChoice::Auto,
            argv0: None,
            bootstrap: bootstrap(),
            boot_credentials: creds
                .iter()
                .map(|(name, allow)| BootCredential {
                    name: name.to_string(),
                    allow_on_command_line: *allow,
                })
                .collect(),
            credentials_dir: Some(self.creds.clone()),
            runtime_dir: Some(self.run.clone()),
            argv: argv.iter().map(OsString::from).collect(),
        }
    }
}

fn bootstrap() -> Bootstrap {
    Bootstrap {
        port: 700,
        pin: Pin([0xab; 32]),
        host: vmcred_proto::bootstrap::HostTransport::Vsock,
    }
}

fn bootstrap_oem() -> String {
    format!(
        "io.systemd.credential:vmcred.bootstrap=vmcred-bootstrap-v1 port=700 pin=sha256:{} host=vsock",
        "ab".repeat(32)
    )
}

fn binary_oem(name: &str, value: &[u8]) -> String {
    format!(
        "io.systemd.credential.binary:{name}={}",
        STANDARD.encode(value)
    )
}

fn strs(argv: &[OsString]) -> Vec<String> {
    argv.iter()
        .map(|a| a.to_str().unwrap().to_string())
        .collect()
}

fn has(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Asserts that no form of a secret is in `text`.
fn assert_no_secret(text: &[u8]) {
    for v in [SECRET, OTHER] {
        assert!(!has(text, v), "value leaked");
        assert!(
            !has(text, STANDARD.encode(v).as_bytes()),
            "base64 value leaked"
        );
    }
    assert!(!has(text, b"hunter2"), "value leaked");
}

fn argv_bytes(argv: &[OsString]) -> Vec<u8> {
    argv.iter()
        .flat_map(|a| a.as_bytes().iter().copied().chain([0]))
        .collect()
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

/// cloud-hypervisor's own reading of a `--platform` value
/// (`option_parser::split_commas`, `OptionParser::parse`,
/// `StringList::from_str`), to check what it would see.
fn ch_parse(value: &str) -> BTreeMap<String, String> {
    let mut list = Vec::new();
    let (mut depth, mut quoted, mut cur) = (0, false, String::new());
    for c in value.trim().chars() {
        match c {
            '[' => {
                depth += 1;
                cur.push(c)
            }
            ']' => {
                depth -= 1;
                assert!(depth >= 0);
                cur.push(c)
            }
            '"' => quoted = !quoted,
            ',' if depth == 0 && !quoted => list.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    list.push(cur);
    assert!(depth == 0 && !quoted);
    list.iter()
        .map(|o| {
            let (k, v) = o.split_once('=').unwrap();
            (k.to_string(), v.trim().to_string())
        })
        .collect()
}

fn ch_oem_strings(value: &str) -> Vec<String> {
    ch_parse(value)["oem_strings"]
        .trim()
        .trim_matches(|c| c == '[' || c == ']')
        .split(',')
        .map(str::to_string)
        .collect()
}

// ------------------------------------------------------------ qemu --

#[test]
fn qemu_writes_private_files_and_keeps_values_off_argv() {
    let f = fixture();
    f.put("API_KEY", SECRET);
    f.put("ENVIRONMENT", OTHER);
    let input = f.input(
        Hypervisor::Qemu,
        &[("API_KEY", false), ("ENVIRONMENT", false)],
        &["qemu-system-x86_64", "-m", "512"],
    );
    let p = prepare(&input).unwrap();
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    assert_eq!(mode(&f.run), 0o700);

    let expected = [
        ("00-vmcred.bootstrap.smbios", bootstrap_oem().into_bytes()),
        (
            "01-API_KEY.smbios",
            binary_oem("API_KEY", SECRET).into_bytes(),
        ),
        (
            "02-ENVIRONMENT.smbios",
            binary_oem("ENVIRONMENT", OTHER).into_bytes(),
        ),
    ];
    let mut want_argv = vec!["qemu-system-x86_64".to_string(), "-m".into(), "512".into()];
    for (file, content) in &expected {
        let path = f.run.join(file);
        assert_eq!(&fs::read(&path).unwrap(), content, "{file}");
        assert_eq!(mode(&path), 0o400, "{file}");
        want_argv.push("-smbios".into());
        want_argv.push(format!("type=11,path={}", path.display()));
    }
    assert_eq!(strs(&p.argv), want_argv);
    assert_eq!(fs::read_dir(&f.run).unwrap().count(), 3);
    assert_no_secret(&argv_bytes(&p.argv));

    // The binary form decodes back to the exact bytes.
    let text = fs::read_to_string(f.run.join("01-API_KEY.smbios")).unwrap();
    let b64 = text
        .strip_prefix("io.systemd.credential.binary:API_KEY=")
        .unwrap();
    assert_eq!(STANDARD.decode(b64).unwrap(), SECRET);
}

#[test]
fn qemu_relaunch_replaces_stale_files_only() {
    let f = fixture();
    f.put("API_KEY", SECRET);
    let input = f.input(Hypervisor::Qemu, &[("API_KEY", false)], &["qemu-kvm"]);
    let first = prepare(&input).unwrap();
    fs::write(f.run.join("07-OLD.smbios"), b"stale").unwrap();
    fs::write(f.run.join("keep.txt"), b"not ours").unwrap();
    f.put("API_KEY", OTHER);
    let second = prepare(&input).unwrap();
    assert_eq!(first.argv, second.argv);
    assert!(!f.run.join("07-OLD.smbios").exists());
    assert!(f.run.join("keep.txt").exists());
    assert_eq!(
        fs::read(f.run.join("01-API_KEY.smbios")).unwrap(),
        binary_oem("API_KEY", OTHER).into_bytes()
    );
}

#[test]
fn qemu_escapes_commas_in_paths() {
    let mut f = fixture();
    f.run = f.tmp.path().join("a,b").join("run");
    let p = prepare(&f.input(Hypervisor::Qemu, &[], &["qemu-system-aarch64"])).unwrap();
    let want = format!(
        "type=11,path={}/a,,b/run/00-vmcred.bootstrap.smbios",
        f.tmp.path().display()
    );
    assert_eq!(strs(&p.argv)[2], want);
    assert!(f.run.join("00-vmcred.bootstrap.smbios").is_file());
}

#[test]
fn runtime_dir_must_be_private_and_real() {
    let f = fixture();
    let input = f.input(Hypervisor::Qemu, &[], &["qemu-system-x86_64"]);
    let err = |input: &LaunchInput| prepare(input).unwrap_err().to_string();

    // A symlink to a private directory is still refused.
    let real = f.tmp.path().join("real");
    DirBuilder::new().mode(0o700).create(&real).unwrap();
    fs::create_dir_all(f.run.parent().unwrap()).unwrap();
    symlink(&real, &f.run).unwrap();
    assert!(err(&input).contains("symbolic link"), "{}", err(&input));
    fs::remove_file(&f.run).unwrap();

    fs::write(&f.run, b"").unwrap();
    assert!(err(&input).contains("not a directory"), "{}", err(&input));
    fs::remove_file(&f.run).unwrap();

    fs::create_dir(&f.run).unwrap();
    fs::set_permissions(&f.run, fs::Permissions::from_mode(0o750)).unwrap();
    assert!(err(&input).contains("mode 0750"), "{}", err(&input));

    fs::set_permissions(&f.run, fs::Permissions::from_mode(0o700)).unwrap();
    if nix::unistd::geteuid().is_root() {
        nix::unistd::chown(&f.run, Some(nix::unistd::Uid::from_raw(4242)), None).unwrap();
        assert!(err(&input).contains("owned by uid 4242"), "{}", err(&input));
        nix::unistd::chown(&f.run, Some(nix::unistd::geteuid()), None).unwrap();
    }
    assert!(prepare(&input).is_ok());
}

#[test]
fn qemu_refuses_credentials_the_argv_already_defines() {
    let f = fixture();
    f.put("API_KEY", SECRET);
    let cases = [
        (
            vec![
                "-smbios",
                "type=11,value=io.systemd.credential:vmcred.bootstrap=x",
            ],
            "vmcred.bootstrap",
        ),
        (
            vec![
                "-smbios",
                "type=11,value=io.systemd.credential.binary:API_KEY=aHVudGVyMg==",
            ],
            "API_KEY",
        ),
        (
            vec!["-fw_cfg", "name=opt/io.systemd.credentials/API_KEY,file=/x"],
            "API_KEY",
        ),
        (
            vec!["-fw_cfg", "opt/io.systemd.credentials/API_KEY,file=/x"],
            "API_KEY",
        ),
    ];
    for (extra, name) in cases {
        let mut argv = vec!["qemu-system-x86_64"];
        argv.extend(&extra);
        let e = prepare(&f.input(Hypervisor::Qemu, &[("API_KEY", false)], &argv))
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("credential {name:?}")), "{e}");
        assert!(e.contains("first value"), "{e}");
        assert!(!e.contains("aHVudGVyMg"), "{e}");
    }
    // Other credentials and other SMBIOS types are fine.
    let ok = [
        "qemu-system-x86_64",
        "-smbios",
        "type=11,value=io.systemd.credential:vmm.notify_socket=vsock-stream:2:8888",
        "-smbios",
        "type=1,serial=API_KEY",
        "-fw_cfg",
        "name=opt/io.systemd.credentials/OTHER,file=/x",
    ];
    assert!(prepare(&f.input(Hypervisor::Qemu, &[("API_KEY", false)], &ok)).is_ok());
}

// ------------------------------------------------ cloud-hypervisor --

const NOTIFY: &str = "io.systemd.credential:vmm.notify_socket=vsock-stream:2:8888";

fn warning(name: &str) -> String {
    format!("credential {name} is on cloud-hypervisor's command line, readable by every local user via /proc/PID/cmdline: marked allow_on_command_line")
}

#[test]
fn ch_merges_into_existing_oem_strings_keeping_entries_and_keys() {
    let f = fixture();
    f.put("API_KEY", SECRET);
    f.put("ENVIRONMENT", OTHER);
    let platform = format!(
        "oem_strings=[{NOTIFY},io.systemd.credential:CLUSTER=a],serial_number=abc,uuid=1234"
    );
    let argv = [
        "/nix/store/x-cloud-hypervisor-41/bin/cloud-hypervisor",
        "--cpus",
        "boot=2",
        "--platform",
        &platform,
        "--vsock",
        "cid=3,socket=notify.vsock",
    ];
    let input = f.input(
        Hypervisor::CloudHypervisor,
        &[("API_KEY", true), ("ENVIRONMENT", true)],
        &argv,
    );
    let p = prepare(&input).unwrap();
    let out = strs(&p.argv);
    assert_eq!(out.len(), argv.len());
    for i in [0, 1, 2, 3, 5, 6] {
        assert_eq!(out[i], argv[i]);
    }
    let parsed = ch_parse(&out[4]);
    assert_eq!(parsed["serial_number"], "abc");
    assert_eq!(parsed["uuid"], "1234");
    assert_eq!(
        ch_oem_strings(&out[4]),
        [
            NOTIFY.to_string(),
            "io.systemd.credential:CLUSTER=a".into(),
            bootstrap_oem(),
            binary_oem("API_KEY", SECRET),
            binary_oem("ENVIRONMENT", OTHER),
        ]
    );
    assert_eq!(p.warnings, [warning("API_KEY"), warning("ENVIRONMENT")]);
    assert!(!f.run.exists(), "cloud-hypervisor needs no runtime files");
}

#[test]
fn ch_platform_equals_form() {
    let f = fixture();
    let argv = [
        "cloud-hypervisor",
        "--platform=serial_number=abc,oem_strings=[x=1]",
    ];
    let p = prepare(&f.input(Hypervisor::CloudHypervisor, &[], &argv)).unwrap();
    let out = strs(&p.argv);
    let value = out[1].strip_prefix("--platform=").unwrap();
    assert_eq!(
        value,
        format!("serial_number=abc,oem_strings=[x=1,{}]", bootstrap_oem())
    );
    assert_eq!(ch_oem_strings(value), ["x=1".to_string(), bootstrap_oem()]);
    assert!(p.warnings.is_empty());
}

#[test]
fn ch_adds_oem_strings_to_a_platform_without_them() {
    let f = fixture();
    let argv = [
        "cloud-hypervisor",
        "--platform",
        "serial_number=abc,uuid=u",
        "--cpus",
        "boot=1",
    ];
    let p = prepare(&f.input(Hypervisor::CloudHypervisor, &[], &argv)).unwrap();
    let out = strs(&p.argv);
    assert_eq!(
        out[2],
        format!("serial_number=abc,uuid=u,oem_strings=[{}]", bootstrap_oem())
    );
    assert_eq!(out[3..], ["--cpus", "boot=1"]);

    // microvm.nix emits an empty --platform when it has nothing for it.
    let argv = ["cloud-hypervisor", "--platform", "", "--cpus", "boot=1"];
    let p = prepare(&f.input(Hypervisor::CloudHypervisor, &[], &argv)).unwrap();
    assert_eq!(
        strs(&p.argv)[2],
        format!("oem_strings=[{}]", bootstrap_oem())
    );
}

#[test]
fn ch_adds_a_platform_when_there_is_none() {
    let f = fixture();
    f.put("API_KEY", SECRET);
    let argv = ["cloud-hypervisor", "--cpus", "boot=1"];
    let p = prepare(&f.input(Hypervisor::CloudHypervisor, &[("API_KEY", true)], &argv)).unwrap();
    let out = strs(&p.argv);
    assert_eq!(out[..3], argv);
    assert_eq!(out[3], "--platform");
    assert_eq!(
        ch_oem_strings(&out[4]),
        [bootstrap_oem(), binary_oem("API_KEY", SECRET)]
    );
    assert_eq!(out.len(), 5);
    assert_eq!(p.warnings, [warning("API_KEY")]);
}

#[test]
fn ch_refuses_credentials_already_in_oem_strings() {
    let f = fixture();
    // No file is needed: this is refused before anything is read.
    for (entry, name) in [
        (
            "io.systemd.credential:vmcred.bootstrap=old",
            "vmcred.bootstrap",
        ),
        ("io.systemd.credential:API_KEY=hunter2", "API_KEY"),
        (
            "io.systemd.credential.binary:API_KEY=aHVudGVyMg==",
            "API_KEY",
        ),
    ] {
        let platform = format!("oem_strings=[{NOTIFY},{entry}]");
        let argv = ["cloud-hypervisor", "--platform", &platform];
        let e = prepare(&f.input(Hypervisor::CloudHypervisor, &[("API_KEY", true)], &argv))
            .unwrap_err();
        assert!(matches!(e, LaunchError::AlreadyDefined { .. }), "{e}");
        let e = e.to_string();
        assert!(e.contains(&format!("credential {name:?}")), "{e}");
        assert!(e.contains("first value"), "{e}");
        assert!(!e.contains("hunter2") && !e.contains("aHVudGVyMg"), "{e}");
    }
}

#[test]
fn ch_refuses_malformed_or_repeated_platform_without_echoing_it() {
    let f = fixture();
    for argv in [
        vec![
            "cloud-hypervisor",
            "--platform",
            "oem_strings=[io.systemd.credential:X=hunter2",
        ],
        vec!["cloud-hypervisor", "--platform", "oem_strings=hunter2]"],
        vec![
            "cloud-hypervisor",
            "--platform",
            "a=1",
            "--platform=b=hunter2",
        ],
        vec![
            "cloud-hypervisor",
            "--platform",
            "oem_strings=[a],oem_strings=[hunter2]",
        ],
        vec!["cloud-hypervisor", "--platform"],
    ] {
        let e = prepare(&f.input(Hypervisor::CloudHypervisor, &[], &argv)).unwrap_err();
        assert!(matches!(e, LaunchError::BadArgv { .. }), "{argv:?}: {e}");
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }
}

#[test]
fn ch_refuses_a_secret_not_allowed_on_the_command_line() {
    let f = fixture();
    f.put("API_KEY", SECRET);
    f.put("DB", OTHER);
    f.put("ENVIRONMENT", OTHER);
    let argv = ["cloud-hypervisor", "--cpus", "boot=1"];
    let e = prepare(&f.input(
        Hypervisor::CloudHypervisor,
        &[("API_KEY", false), ("DB", false), ("ENVIRONMENT", true)],
        &argv,
    ))
    .unwrap_err()
    .to_string();
    for needle in [
        "boot credentials API_KEY, DB would",
        "/proc/PID/cmdline",
        "allow_on_command_line = true",
        "boot = false",
        "over vsock",
        "qemu",
    ] {
        assert!(e.contains(needle), "{needle:?} missing in: {e}");
    }
    assert!(!e.contains("ENVIRONMENT"), "{e}");
    assert_no_secret(e.as_bytes());

    let e = prepare(&f.input(Hypervisor::CloudHypervisor, &[("API_KEY", false)], &argv))
        .unwrap_err()
        .to_string();
    assert!(e.contains("boot credential API_KEY would"), "{e}");
    assert!(e.contains("can read it"), "{e}");
}

// -------------------------------------------------------- reading --

#[test]
fn missing_credentials_directory_says_what_to_add() {
    let f = fixture();
    let mut input = f.input(
        Hypervisor::Qemu,
        &[("API_KEY", false), ("DB", false)],
        &["qemu-kvm"],
    );
    input.credentials_dir = None;
    let e = prepare(&input).unwrap_err();
    assert!(
        matches!(e, LaunchError::NoCredentialsDirectory { .. }),
        "{e}"
    );
    let e = e.to_string();
    for needle in [
        "$CREDENTIALS_DIRECTORY",
        "API_KEY, DB",
        "LoadCredential=API_KEY:",
        "microvm@test-vm.service",
    ] {
        assert!(e.contains(needle), "{needle:?} missing in: {e}");
    }
    // Without boot credentials, no directory is needed.
    input.boot_credentials.clear();
    assert!(prepare(&input).is_ok());
}

#[test]
fn missing_file_names_credential_and_path() {
    let f = fixture();
    let e = prepare(&f.input(Hypervisor::Qemu, &[("API_KEY", false)], &["qemu-kvm"])).unwrap_err();
    assert!(matches!(e, LaunchError::MissingCredential { .. }), "{e}");
    let e = e.to_string();
    assert!(e.contains("\"API_KEY\""), "{e}");
    assert!(
        e.contains(&f.creds.join("API_KEY").display().to_string()),
        "{e}"
    );
    assert!(e.contains("LoadCredential=API_KEY:SOURCE"), "{e}");
}

#[test]
fn only_regular_files_are_read() {
    let f = fixture();
    let input = f.input(Hypervisor::Qemu, &[("API_KEY", false)], &["qemu-kvm"]);
    let real = f.tmp.path().join("real");
    fs::write(&real, SECRET).unwrap();
    let target = f.creds.join("API_KEY");

    symlink(&real, &target).unwrap();
    let e = prepare(&input).unwrap_err();
    assert!(matches!(e, LaunchError::NotRegularFile { .. }), "{e}");
    assert!(e.to_string().contains("symbolic link"), "{e}");
    assert_no_secret(e.to_string().as_bytes());
    fs::remove_file(&target).unwrap();

    fs::create_dir(&target).unwrap();
    assert!(prepare(&input)
        .unwrap_err()
        .to_string()
        .contains("a directory"));
    fs::remove_dir(&target).unwrap();

    nix::unistd::mkfifo(&target, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    assert!(prepare(&input).unwrap_err().to_string().contains("a FIFO"));
    assert!(!f.run.exists(), "nothing written after a refusal");
}

#[test]
fn oversize_values_are_refused() {
    let f = fixture();
    f.put("BIG", &vec![b'x'; rules::MAX_CREDENTIAL_BYTES + 1]);
    let e = prepare(&f.input(Hypervisor::Qemu, &[("BIG", false)], &["qemu-kvm"]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"BIG\"") && e.contains("1 MiB"), "{e}");

    f.put("A", &vec![b'a'; 600 * 1024]);
    f.put("B", &vec![b'b'; 600 * 1024]);
    let e = prepare(&f.input(
        Hypervisor::Qemu,
        &[("A", false), ("B", false)],
        &["qemu-kvm"],
    ))
    .unwrap_err();
    assert!(
        matches!(
            e,
            LaunchError::Size {
                source: RuleError::TotalTooLarge { .. },
                ..
            }
        ),
        "{e}"
    );
    assert!(prepare(&f.input(Hypervisor::Qemu, &[("A", false)], &["qemu-kvm"])).is_ok());
}

#[test]
fn names_are_checked() {
    let f = fixture();
    let cases: [(&[(&str, bool)], &str); 6] = [
        (&[("a=b", false)], "'='"),
        (&[("a,b", false)], "','"),
        (&[("a]", false)], "']'"),
        (&[("vmcred.bootstrap", false)], "reserved"),
        (&[("X", false), ("X", true)], "listed twice"),
        (&[("a/b", false)], "'/'"),
    ];
    for (creds, why) in cases {
        let e = prepare(&f.input(Hypervisor::Qemu, creds, &["qemu-kvm"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains(why), "{creds:?}: {e}");
    }
}

#[test]
fn hypervisor_is_guessed_from_the_program_name() {
    let g = |p: &str| Hypervisor::guess(OsStr::new(p));
    let ch = Some(Hypervisor::CloudHypervisor);
    let qemu = Some(Hypervisor::Qemu);
    assert_eq!(
        g("/nix/store/abc-cloud-hypervisor-41.0/bin/cloud-hypervisor"),
        ch
    );
    assert_eq!(g("cloud-hypervisor"), ch);
    assert_eq!(g("/nix/store/abc/bin/.cloud-hypervisor-wrapped"), ch);
    assert_eq!(g("/usr/bin/qemu-system-x86_64"), qemu);
    assert_eq!(g("qemu-system-aarch64"), qemu);
    assert_eq!(g("/usr/libexec/qemu-kvm"), qemu);
    assert_eq!(g("/x/.qemu-system-x86_64-wrapped"), qemu);
    for (program, h) in [
        (
            "/nix/store/x-firecracker/bin/firecracker",
            Hypervisor::Firecracker,
        ),
        ("/nix/store/x-crosvm/bin/crosvm", Hypervisor::Crosvm),
        ("/nix/store/x-kvmtool/bin/lkvm", Hypervisor::Kvmtool),
        ("kvmtool", Hypervisor::Kvmtool),
        ("/nix/store/x-alioth/bin/alioth", Hypervisor::Alioth),
        ("/x/.crosvm-wrapped", Hypervisor::Crosvm),
    ] {
        assert_eq!(g(program), Some(h), "{program}");
    }
    for other in ["qemu-img", "vfkit", "stratovirt", "", "/"] {
        assert_eq!(g(other), None, "{other}");
    }

    let argv = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
    let unknown = argv(&["/usr/bin/stratovirt", "-kernel", "x"]);
    let e = resolve_hypervisor(None, &unknown).unwrap_err().to_string();
    assert!(e.contains("/usr/bin/stratovirt"), "{e}");
    for h in Hypervisor::ALL {
        assert!(e.contains(h.as_str()), "{h} missing in: {e}");
    }
    assert_eq!(
        resolve_hypervisor(Some(Hypervisor::Qemu), &unknown).unwrap(),
        Hypervisor::Qemu
    );
    assert_eq!(
        resolve_hypervisor(None, &argv(&["cloud-hypervisor"])).unwrap(),
        Hypervisor::CloudHypervisor
    );
    assert!(matches!(
        resolve_hypervisor(None, &[]),
        Err(LaunchError::NoCommand)
    ));

    for h in Hypervisor::ALL {
        assert_eq!(h.to_string().parse::<Hypervisor>(), Ok(h));
        assert_eq!(
            <Hypervisor as clap::ValueEnum>::from_str(&h.to_string(), false),
            Ok(h)
        );
    }
    let e = "vfkit".parse::<Hypervisor>().unwrap_err();
    assert!(e.contains("alioth") && e.contains("qemu"), "{e}");
}

#[test]
fn empty_argv_and_failed_exec_are_errors() {
    let f = fixture();
    assert!(matches!(
        prepare(&f.input(Hypervisor::Qemu, &[], &[])),
        Err(LaunchError::NoCommand)
    ));
    assert!(matches!(exec(OsStr::new("x"), &[]), LaunchError::NoCommand));
    let e = exec(
        OsStr::new("qemu"),
        &[OsString::from("/nonexistent/vmcred-test-hypervisor")],
    );
    assert!(matches!(e, LaunchError::Exec { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("/nonexistent/vmcred-test-hypervisor"),
        "{e}"
    );
}

// --------------------------------------------------------- notify --

#[test]
fn notify_sends_one_line_and_reads_the_reply() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("launch.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let server = std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(conn);
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        reader.get_mut().write_all(b"\"ok\"\n").unwrap();
        line
    });
    notify_launched(&path, "test-vm").unwrap();
    assert_eq!(
        server.join().unwrap(),
        "{\"cmd\":\"launched\",\"vm\":\"test-vm\"}\n"
    );
}

#[test]
fn notify_failures_are_bounded_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("launch.sock");
    let e = notify_launched(&path, "test-vm").unwrap_err();
    assert!(e.contains(&path.display().to_string()), "{e}");

    // An agent that never answers: the wait is bounded, the error says so.
    let listener = UnixListener::bind(&path).unwrap();
    let server = std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        std::thread::sleep(Duration::from_millis(2500));
        drop(conn);
    });
    let e = notify_launched(&path, "test-vm").unwrap_err();
    assert!(e.contains("no reply"), "{e}");
    server.join().unwrap();

    // An agent that hangs up without a reply.
    let listener = UnixListener::bind(tmp.path().join("b.sock")).unwrap();
    let server = std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        BufReader::new(conn).read_line(&mut String::new()).unwrap();
    });
    let e = notify_launched(&tmp.path().join("b.sock"), "test-vm").unwrap_err();
    assert!(e.contains("without a reply"), "{e}");
    server.join().unwrap();
}

// ----------------------------------------------------- runtime dir --

#[test]
fn runtime_dir_precedence() {
    use runtime_dir::choose;
    let p = |s: &str| Some(PathBuf::from(s));
    let os = |s: &'static str| Some(OsStr::new(s));
    assert_eq!(
        choose(p("/cli"), os("/env"), os("/rd"), "vm", true),
        p("/cli")
    );
    assert_eq!(choose(None, os("/env"), os("/rd"), "vm", false), p("/env"));
    // $RUNTIME_DIRECTORY: the first of several, as is.
    assert_eq!(
        choose(
            None,
            None,
            os("/run/vmcred-launch/vm:/run/other"),
            "vm",
            false
        ),
        p("/run/vmcred-launch/vm")
    );
    assert_eq!(
        choose(None, None, None, "vm", true),
        p("/run/vmcred/launch/vm")
    );
    assert_eq!(choose(None, None, None, "vm", false), None);
    // Empty values count as unset.
    assert_eq!(choose(p(""), os(""), os(""), "vm", false), None);
}

#[test]
fn no_runtime_dir_is_an_error_only_when_files_are_needed() {
    let f = fixture();
    let mut input = f.input(Hypervisor::Qemu, &[], &["qemu-system-x86_64"]);
    input.runtime_dir = None;
    let e = prepare(&input).unwrap_err();
    assert!(matches!(e, LaunchError::NoRuntimeDir { .. }), "{e}");
    let e = e.to_string();
    assert!(
        e.contains("RuntimeDirectory=vmcred-launch/test-vm")
            && e.contains("RuntimeDirectoryMode=0700"),
        "{e}"
    );
    let mut input = f.input(Hypervisor::Crosvm, &[], &["crosvm", "run", "k"]);
    input.runtime_dir = None;
    assert!(prepare(&input).is_ok());
}

// --------------------------------------------------------- cmdline --

#[test]
fn cmdline_names_already_set_are_found() {
    use carrier::cmdline::defined_names;
    assert_eq!(
        defined_names(
            "console=ttyS0 \"systemd.set_credential=A:x y\" systemd.set_credential_binary=B:eA== systemd.set_credentialX=C"
        ),
        ["A", "B"]
    );
    assert!(defined_names("").is_empty());
}

#[test]
fn cmdline_longer_than_the_kernel_keeps_is_refused() {
    let f = fixture();
    let long = "x".repeat(carrier::cmdline::MAX_LEN - 50);
    let input = f.input(Hypervisor::Kvmtool, &[], &["lkvm", "run", "-p", &long]);
    let e = prepare(&input).unwrap_err();
    assert!(matches!(e, LaunchError::CommandLineTooLong { .. }), "{e}");
    assert!(e.to_string().contains("2047"), "{e}");
    let ok = "x".repeat(100);
    let input = f.input(Hypervisor::Kvmtool, &[], &["lkvm", "run", "-p", &ok]);
    assert!(prepare(&input).is_ok());
}

#[test]
fn cmdline_inline_and_repeated_options() {
    let f = fixture();
    let input = f.input(
        Hypervisor::Alioth,
        &[],
        &["alioth", "run", "--cmdline=console=ttyS0", "--num-cpu", "1"],
    );
    let p = prepare(&input).unwrap();
    let out = strs(&p.argv);
    assert_eq!(
        out[2],
        format!(
            "--cmdline=console=ttyS0 \"systemd.set_credential=vmcred.bootstrap:{}\"",
            bootstrap().encode()
        )
    );
    assert_eq!(out[3..], ["--num-cpu", "1"]);
    let input = f.input(
        Hypervisor::Crosvm,
        &[],
        &["crosvm", "run", "-p", "a", "--params", "b", "k"],
    );
    let e = prepare(&input).unwrap_err().to_string();
    assert!(
        e.contains("crosvm argv") && e.contains("given 2 times"),
        "{e}"
    );
}

#[test]
fn qemu_machine_types() {
    use hypervisor::{carriers_for_machine, MachineCarrier};
    for m in ["pc", "q35", "pc-q35-9.2", "pc-i440fx-8.1"] {
        assert_eq!(carriers_for_machine(m), Some(MachineCarrier::Smbios), "{m}");
    }
    for m in ["microvm", "virt", "virt-9.2"] {
        assert_eq!(carriers_for_machine(m), Some(MachineCarrier::FwCfg), "{m}");
    }
    assert_eq!(carriers_for_machine("isapc"), None);
    // The last -M that names a type wins; `-M accel=kvm` names none.
    let f = fixture();
    let input = f.input(
        Hypervisor::Qemu,
        &[],
        &[
            "qemu-system-x86_64",
            "-M",
            "q35",
            "-machine",
            "type=microvm",
            "-M",
            "accel=kvm",
        ],
    );
    let p = prepare(&input).unwrap();
    assert_eq!(p.files[0].carrier, Carrier::FwCfg);
}

#[test]
fn firecracker_config_must_be_a_bounded_regular_file() {
    let f = fixture();
    let fifo = f.tmp.path().join("fc.json");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let fifo_s = fifo.display().to_string();
    let argv = ["firecracker", "--config-file", fifo_s.as_str()];
    let e = prepare(&f.input(Hypervisor::Firecracker, &[], &argv))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a regular file"), "{e}");
    fs::remove_file(&fifo).unwrap();
    fs::write(&fifo, vec![b' '; 2 * 1024 * 1024]).unwrap();
    let e = prepare(&f.input(Hypervisor::Firecracker, &[], &argv))
        .unwrap_err()
        .to_string();
    assert!(e.contains("larger than"), "{e}");
    fs::write(&fifo, b"{not json").unwrap();
    let e = prepare(&f.input(Hypervisor::Firecracker, &[], &argv))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not valid JSON"), "{e}");
}

#[test]
fn a_name_the_kernel_command_line_already_sets_is_refused_for_any_carrier() {
    let f = fixture();
    f.put("API_KEY", SECRET);
    let argv = [
        "qemu-system-x86_64",
        "-M",
        "microvm",
        "-kernel",
        "k",
        "-append",
        "console=ttyS0 systemd.set_credential=API_KEY:hunter2",
    ];
    let e = prepare(&f.input(Hypervisor::Qemu, &[("API_KEY", false)], &argv))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("already defines credential \"API_KEY\"") && e.contains("-append"),
        "{e}"
    );
    assert!(!e.contains("hunter2"), "{e}");
    let argv = [
        "cloud-hypervisor",
        "--kernel",
        "k",
        "--cmdline",
        "\"systemd.set_credential=vmcred.bootstrap:old\"",
    ];
    let e = prepare(&f.input(Hypervisor::CloudHypervisor, &[], &argv))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("--cmdline") && e.contains("vmcred.bootstrap"),
        "{e}"
    );
}

#[test]
fn a_command_line_carrier_needs_a_directly_booted_kernel() {
    let f = fixture();
    let mut input = f.input(Hypervisor::Qemu, &[], &["qemu-system-x86_64", "-M", "q35"]);
    input.carrier = CarrierChoice::Cmdline;
    let e = prepare(&input).unwrap_err().to_string();
    assert!(e.contains("qemu argv") && e.contains("-kernel"), "{e}");
    let mut input = f.input(
        Hypervisor::CloudHypervisor,
        &[],
        &["cloud-hypervisor", "--firmware", "fw"],
    );
    input.carrier = CarrierChoice::Cmdline;
    let e = prepare(&input).unwrap_err().to_string();
    assert!(
        e.contains("cloud-hypervisor argv") && e.contains("--kernel"),
        "{e}"
    );
    input.argv.extend(["--kernel".into(), "k".into()]);
    let p = prepare(&input).unwrap();
    assert_eq!(strs(&p.argv)[5], "--cmdline");
}

#[test]
fn qemu_smbios_override_is_refused_only_where_tables_never_exist() {
    let f = fixture();
    let mut input = f.input(
        Hypervisor::Qemu,
        &[],
        &[
            "qemu-system-aarch64",
            "-M",
            "virt,gic-version=max",
            "-bios",
            "QEMU_EFI.fd",
        ],
    );
    assert_eq!(prepare(&input).unwrap().files[0].carrier, Carrier::FwCfg);
    input.carrier = CarrierChoice::Smbios;
    assert_eq!(prepare(&input).unwrap().files[0].carrier, Carrier::Smbios);
    input.argv[2] = "microvm".into();
    let e = prepare(&input).unwrap_err();
    assert!(matches!(e, LaunchError::CarrierUnsupported { .. }), "{e}");
}
