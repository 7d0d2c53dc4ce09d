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
    /// The runtime directory given to the launch.
    run: PathBuf,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let creds = tmp.path().join("creds");
    fs::create_dir(&creds).unwrap();
    let run = tmp.path().join("run");
    Fixture { tmp, creds, run }
}

impl Fixture {
    /// Where test-vm's files go: its own directory in the runtime one.
    fn vm_dir(&self) -> PathBuf {
        self.run.join("test-vm")
    }

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
            launch_key: LaunchKey::Off,
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
    assert_eq!(mode(&f.vm_dir()), 0o700);

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
        let path = f.vm_dir().join(file);
        assert_eq!(&fs::read(&path).unwrap(), content, "{file}");
        assert_eq!(mode(&path), 0o400, "{file}");
        want_argv.push("-smbios".into());
        want_argv.push(format!("type=11,path={}", path.display()));
    }
    assert_eq!(strs(&p.argv), want_argv);
    assert_eq!(fs::read_dir(f.vm_dir()).unwrap().count(), 3);
    assert_no_secret(&argv_bytes(&p.argv));

    // The binary form decodes back to the exact bytes.
    let text = fs::read_to_string(f.vm_dir().join("01-API_KEY.smbios")).unwrap();
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
    fs::write(f.vm_dir().join("07-OLD.smbios"), b"stale").unwrap();
    fs::write(f.vm_dir().join("keep.txt"), b"not ours").unwrap();
    // What is beside the VM's directory is another VM's or the user's.
    fs::write(f.run.join("01-API_KEY.smbios"), b"not this VM's").unwrap();
    f.put("API_KEY", OTHER);
    let second = prepare(&input).unwrap();
    assert_eq!(first.argv, second.argv);
    assert!(!f.vm_dir().join("07-OLD.smbios").exists());
    assert!(f.vm_dir().join("keep.txt").exists());
    assert!(f.run.join("01-API_KEY.smbios").exists());
    assert_eq!(
        fs::read(f.vm_dir().join("01-API_KEY.smbios")).unwrap(),
        binary_oem("API_KEY", OTHER).into_bytes()
    );
}

#[test]
fn qemu_escapes_commas_in_paths() {
    let mut f = fixture();
    f.run = f.tmp.path().join("a,b").join("run");
    let p = prepare(&f.input(Hypervisor::Qemu, &[], &["qemu-system-aarch64"])).unwrap();
    let want = format!(
        "type=11,path={}/a,,b/run/test-vm/00-vmcred.bootstrap.smbios",
        f.tmp.path().display()
    );
    assert_eq!(strs(&p.argv)[2], want);
    assert!(f.vm_dir().join("00-vmcred.bootstrap.smbios").is_file());
}

#[test]
fn runtime_dir_must_be_private_and_real() {
    let f = fixture();
    let input = f.input(Hypervisor::Qemu, &[], &["qemu-system-x86_64"]);
    let err = |input: &LaunchInput| prepare(input).unwrap_err().to_string();

    // The runtime directory, and the VM's in it: a symlink to a private
    // directory is still refused, and so is a file.
    let real = f.tmp.path().join("real");
    DirBuilder::new().mode(0o700).create(&real).unwrap();
    for dir in [f.run.clone(), f.vm_dir()] {
        fs::create_dir_all(dir.parent().unwrap()).unwrap();
        symlink(&real, &dir).unwrap();
        let e = err(&input);
        assert!(
            e.contains("symbolic link") && e.contains(&*dir.to_string_lossy()),
            "{e}"
        );
        fs::remove_file(&dir).unwrap();

        fs::write(&dir, b"").unwrap();
        assert!(err(&input).contains("not a directory"), "{}", err(&input));
        fs::remove_file(&dir).unwrap();
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
    }

    // Others may read the runtime directory, not write to it; the VM's
    // directory is theirs alone.
    fs::set_permissions(&f.run, fs::Permissions::from_mode(0o755)).unwrap();
    assert!(prepare(&input).is_ok());
    fs::set_permissions(&f.run, fs::Permissions::from_mode(0o770)).unwrap();
    let e = err(&input);
    assert!(
        e.contains("mode 0770") && e.contains("group or others can write"),
        "{e}"
    );
    fs::set_permissions(&f.run, fs::Permissions::from_mode(0o700)).unwrap();
    fs::set_permissions(f.vm_dir(), fs::Permissions::from_mode(0o750)).unwrap();
    assert!(err(&input).contains("mode 0750"), "{}", err(&input));
    fs::set_permissions(f.vm_dir(), fs::Permissions::from_mode(0o700)).unwrap();

    if nix::unistd::geteuid().is_root() {
        for dir in [f.run.clone(), f.vm_dir()] {
            nix::unistd::chown(&dir, Some(nix::unistd::Uid::from_raw(4242)), None).unwrap();
            assert!(err(&input).contains("owned by uid 4242"), "{}", err(&input));
            nix::unistd::chown(&dir, Some(nix::unistd::geteuid()), None).unwrap();
        }
    }
    assert!(prepare(&input).is_ok());
}

/// The review's L5: the hypervisor opens the carrier files by path after
/// the checks, so a runtime directory under a directory another user can
/// write to (or reached through one) could be swapped for theirs.
#[test]
fn runtime_dir_reached_through_a_directory_others_can_change_is_refused() {
    let f = fixture();
    let shared = f.tmp.path().join("shared");
    fs::create_dir(&shared).unwrap();
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o777)).unwrap();
    let mut input = f.input(Hypervisor::Qemu, &[], &["qemu-system-x86_64"]);
    input.runtime_dir = Some(shared.join("rt"));
    let e = prepare(&input).unwrap_err().to_string();
    assert!(
        e.contains(&*shared.to_string_lossy())
            && e.contains("mode 0777")
            && e.contains("not sticky"),
        "{e}"
    );
    assert!(!shared.join("rt").exists(), "nothing created under it");

    // The same directory reached through a symbolic link.
    let link = f.tmp.path().join("link");
    symlink(&shared, &link).unwrap();
    input.runtime_dir = Some(link.join("rt"));
    let e = prepare(&input).unwrap_err().to_string();
    assert!(e.contains("mode 0777"), "{e}");
    // ... and as a relative link target, and through `..`.
    let rel = f.tmp.path().join("rel");
    symlink("shared/../shared", &rel).unwrap();
    input.runtime_dir = Some(rel.join("rt"));
    let e = prepare(&input).unwrap_err().to_string();
    assert!(e.contains("mode 0777"), "{e}");

    // Sticky (as /tmp): others cannot rename or remove what is ours.
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o1777)).unwrap();
    input.runtime_dir = Some(link.join("rt"));
    assert!(prepare(&input).is_ok());
    assert!(shared.join("rt").join("test-vm").is_dir());

    if nix::unistd::geteuid().is_root() {
        // A parent of another user's: they may rename it away.
        let theirs = f.tmp.path().join("theirs");
        fs::create_dir(&theirs).unwrap();
        fs::set_permissions(&theirs, fs::Permissions::from_mode(0o755)).unwrap();
        nix::unistd::chown(&theirs, Some(nix::unistd::Uid::from_raw(4242)), None).unwrap();
        input.runtime_dir = Some(theirs.join("rt"));
        let e = prepare(&input).unwrap_err().to_string();
        assert!(e.contains("owned by uid 4242"), "{e}");
    }
}

/// The review's M1: two VMs given one runtime directory (one
/// `$VMCRED_LAUNCH_RUNTIME_DIR` for all; microvm.nix starts VMs in
/// parallel) share file names (`NN-<cred>.<ext>`); each VM's files live
/// in its own directory, so launching b leaves a's files as they were.
#[test]
fn two_vms_sharing_a_runtime_dir_keep_their_own_files() {
    let f = fixture();
    let creds_b = f.tmp.path().join("creds-b");
    fs::create_dir(&creds_b).unwrap();
    f.put("DB_PASSWORD", b"secret-of-a");
    fs::write(creds_b.join("DB_PASSWORD"), b"secret-of-b").unwrap();
    let argv = ["qemu-system-x86_64", "-M", "microvm"];
    let mut a = f.input(Hypervisor::Qemu, &[("DB_PASSWORD", false)], &argv);
    a.vm = "a".into();
    let mut b = f.input(Hypervisor::Qemu, &[("DB_PASSWORD", false)], &argv);
    b.vm = "b".into();
    b.credentials_dir = Some(creds_b);

    let pa = prepare(&a).unwrap();
    let pb = prepare(&b).unwrap();
    let file_of = |p: &Prepared| {
        p.files
            .iter()
            .find(|f| f.name == "DB_PASSWORD")
            .map(|f| f.path.clone())
            .unwrap()
    };
    let (fa, fb) = (file_of(&pa), file_of(&pb));
    assert!(
        strs(&pa.argv)
            .iter()
            .any(|arg| arg.ends_with(&*fa.to_string_lossy())),
        "a's argv names a's file"
    );
    assert_eq!(
        fs::read(&fa).unwrap(),
        b"secret-of-a",
        "a's file after b's launch"
    );
    assert_eq!(fs::read(&fb).unwrap(), b"secret-of-b");
    for file in pa.files.iter().chain(&pb.files) {
        assert!(file.path.is_file(), "{:?} still there", file.path);
    }
    assert_eq!(fa.parent(), Some(f.run.join("a").as_path()));
    assert_eq!(fb.parent(), Some(f.run.join("b").as_path()));
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
    let cases: [(&[(&str, bool)], &str); 7] = [
        (&[("a=b", false)], "'='"),
        (
            &[("vmcred.launch-key", false)],
            "reserved for the VM's launch key",
        ),
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
    assert_eq!(choose(p("/cli"), os("/env"), os("/rd"), true), p("/cli"));
    assert_eq!(choose(None, os("/env"), os("/rd"), false), p("/env"));
    // $RUNTIME_DIRECTORY: the first of several.
    assert_eq!(
        choose(None, None, os("/run/vmcred-launch/vm:/run/other"), false),
        p("/run/vmcred-launch/vm")
    );
    // Root's default; the VM's files go in /run/vmcred/launch/<vm>, as
    // before.
    assert_eq!(choose(None, None, None, true), p("/run/vmcred/launch"));
    assert_eq!(choose(None, None, None, false), None);
    // Empty values count as unset.
    assert_eq!(choose(p(""), os(""), os(""), false), None);
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

/// The review's L1: every form systemd's PID 1 reads as the same key
/// (`proc_cmdline_key_streq`: `-` and `_` alike; words unquoted by
/// `extract_first_word`: quotes anywhere, `'` or `"`, removed).
#[test]
fn cmdline_names_are_found_in_every_form_systemd_reads() {
    use carrier::cmdline::defined_names;
    let forms = [
        ("systemd.set-credential=N:v", "dash for underscore"),
        ("systemd-set_credential=N:v", "not this: '.' is not relaxed"),
        ("systemd.set_credential=\"N:v w\"", "quoted value"),
        ("systemd.set_credential='N:v w'", "single-quoted value"),
        (
            "\"systemd.set-credential-binary=N:dg==\"",
            "quoted binary, dashes",
        ),
        ("sys\"temd.set_cred\"ential=N:v", "quote inside the key"),
        ("systemd.set_credential=\"N\":v", "quoted name"),
        (
            "\"systemd.set_credential=N:unclosed quote",
            "unclosed quote",
        ),
        ("\tsystemd.set_credential=N:v\n", "tab and newline separate"),
        (
            "systemd.set_credential=N",
            "not this: no ':', systemd ignores it",
        ),
        (
            "rd.systemd.set_credential=N:v",
            "not this: rd. is not stripped for credentials",
        ),
        (
            "Systemd.set_credential=N:v",
            "not this: keys are case-sensitive",
        ),
        (
            "\"x systemd.set_credential=N:v\"",
            "not this: one word, key x",
        ),
    ];
    for (cmdline, what) in forms {
        let line = format!("console=ttyS0 {cmdline} quiet");
        let found = defined_names(&line);
        let want: &[&str] = if what.starts_with("not this") {
            &[]
        } else {
            &["N"]
        };
        assert_eq!(found, want, "{what}: {cmdline}");
    }
    // A backslash is an ordinary character (EXTRACT_RETAIN_ESCAPE): it
    // neither escapes the closing quote (so the next word is a word of its
    // own) nor the space.
    assert_eq!(defined_names("\"a\\\" systemd.set_credential=N:v"), ["N"]);
    assert_eq!(defined_names("a\\ systemd.set_credential=N:v"), ["N"]);
}

/// Each form above, on a real argv: refused rather than merged (systemd
/// keeps the first definition of a name, so ours would be ignored).
#[test]
fn a_name_set_on_the_command_line_in_any_form_is_refused() {
    let f = fixture();
    for word in [
        "systemd.set-credential=vmcred.bootstrap:x",
        "systemd.set_credential=\"vmcred.bootstrap:x y\"",
        "'systemd.set_credential_binary=vmcred.bootstrap:eA=='",
    ] {
        let cmdline = format!("console=ttyS0 {word}");
        for (hypervisor, argv) in [
            (
                Hypervisor::Crosvm,
                vec!["crosvm", "run", "-p", &cmdline, "k"],
            ),
            (
                Hypervisor::Qemu,
                vec!["qemu-system-x86_64", "-kernel", "k", "-append", &cmdline],
            ),
            (
                Hypervisor::Alioth,
                vec!["alioth", "run", "--cmd-line", &cmdline],
            ),
        ] {
            let e = prepare(&f.input(hypervisor, &[], &argv)).unwrap_err();
            assert!(
                matches!(&e, LaunchError::AlreadyDefined { name, .. } if name == "vmcred.bootstrap"),
                "{hypervisor} {word}: {e}"
            );
        }
    }
}

/// The review's L9: alioth's `-c` is also `--cmdline` and `--cmd-line`
/// (a clap alias), and its `run` subcommand is an alias of `boot`.
#[test]
fn alioth_command_line_aliases_are_merged_into() {
    let f = fixture();
    let param = format!(
        "\"systemd.set_credential=vmcred.bootstrap:{}\"",
        bootstrap().encode()
    );
    for (argv, at, want) in [
        (
            vec![
                "alioth",
                "run",
                "--cmd-line",
                "console=ttyS0",
                "--num-cpu",
                "1",
            ],
            3,
            format!("console=ttyS0 {param}"),
        ),
        (
            vec![
                "alioth",
                "run",
                "--cmd-line=console=ttyS0",
                "--num-cpu",
                "1",
            ],
            2,
            format!("--cmd-line=console=ttyS0 {param}"),
        ),
        (
            vec!["alioth", "boot", "-c", "console=ttyS0", "--num-cpu", "1"],
            3,
            format!("console=ttyS0 {param}"),
        ),
    ] {
        let p = prepare(&f.input(Hypervisor::Alioth, &[], &argv)).unwrap();
        let out = strs(&p.argv);
        assert_eq!(out.len(), argv.len(), "nothing added: {out:?}");
        assert_eq!(out[at], want, "{argv:?}");
    }
    let input = f.input(
        Hypervisor::Alioth,
        &[],
        &["alioth", "run", "-c", "a", "--cmd-line", "b"],
    );
    let e = prepare(&input).unwrap_err().to_string();
    assert!(
        e.contains("--cmd-line") && e.contains("given 2 times"),
        "{e}"
    );
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

// ------------------------------------------------------ launch key --

/// A launch key as the host agent writes it: 64 lowercase hex digits.
const KEY: &[u8] = b"5ec2e7c0ffee00112233445566778899aabbccddeeff0123456789abcdef0a1b";

impl Fixture {
    /// `test-vm` with `launch_key = "required"` and its key delivered.
    fn with_key(&self, mut input: LaunchInput) -> LaunchInput {
        self.put(rules::LAUNCH_KEY_CREDENTIAL, KEY);
        input.launch_key = LaunchKey::Required {
            agent_file: PathBuf::from("/var/lib/vmcred/launch-keys/test-vm"),
        };
        input
    }
}

/// Asserts that no form of the launch key is in `text`.
fn assert_no_key(text: &[u8]) {
    assert!(!has(text, KEY), "launch key leaked");
    assert!(!has(text, &KEY[..16]), "part of the launch key leaked");
    assert!(
        !has(text, STANDARD.encode(KEY).as_bytes()),
        "base64 launch key leaked"
    );
}

/// Asserts that nothing a user or log sees carries the key.
fn assert_key_only_in_files(p: &Prepared) {
    assert_no_key(&argv_bytes(&p.argv));
    assert_no_key(&argv_bytes(&p.shown_argv));
    assert_no_key(format!("{p:?}").as_bytes());
    for w in &p.warnings {
        assert_no_key(w.as_bytes());
    }
    assert!(p.redacted.is_empty(), "{:?}", p.redacted);
}

#[test]
fn qemu_smbios_carries_the_launch_key_in_a_private_file() {
    let f = fixture();
    f.put("API_KEY", SECRET);
    let input = f.with_key(f.input(
        Hypervisor::Qemu,
        &[("API_KEY", false)],
        &["qemu-system-x86_64", "-m", "512"],
    ));
    let p = prepare(&input).unwrap();
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    let expected = [
        ("00-vmcred.bootstrap.smbios", bootstrap_oem()),
        (
            "01-vmcred.launch-key.smbios",
            binary_oem("vmcred.launch-key", KEY),
        ),
        ("02-API_KEY.smbios", binary_oem("API_KEY", SECRET)),
    ];
    let mut want_argv = vec!["qemu-system-x86_64".to_string(), "-m".into(), "512".into()];
    for (file, content) in &expected {
        let path = f.vm_dir().join(file);
        assert_eq!(fs::read_to_string(&path).unwrap(), *content, "{file}");
        assert_eq!(mode(&path), 0o400, "{file}");
        want_argv.push("-smbios".into());
        want_argv.push(format!("type=11,path={}", path.display()));
    }
    assert_eq!(strs(&p.argv), want_argv);
    assert_eq!(p.shown_argv, p.argv);
    assert_eq!(
        p.files[1],
        PrivateFile {
            path: f.vm_dir().join("01-vmcred.launch-key.smbios"),
            mode: 0o400,
            carrier: Carrier::Smbios,
            name: "vmcred.launch-key".into(),
        }
    );
    assert_key_only_in_files(&p);
    assert_no_secret(&argv_bytes(&p.argv));
}

#[test]
fn qemu_fw_cfg_carries_the_launch_key_in_a_private_file() {
    let f = fixture();
    let input = f.with_key(f.input(
        Hypervisor::Qemu,
        &[],
        &["qemu-system-x86_64", "-M", "microvm,accel=kvm"],
    ));
    let p = prepare(&input).unwrap();
    let path = f.vm_dir().join("01-vmcred.launch-key.fw_cfg");
    assert_eq!(fs::read(&path).unwrap(), KEY);
    assert_eq!(mode(&path), 0o400);
    assert_eq!(mode(&f.vm_dir()), 0o700);
    let argv = strs(&p.argv);
    assert_eq!(argv[..3], ["qemu-system-x86_64", "-M", "microvm,accel=kvm"]);
    assert_eq!(
        argv[5..],
        [
            "-fw_cfg".to_string(),
            format!(
                "name=opt/io.systemd.credentials/vmcred.launch-key,file={}",
                path.display()
            )
        ]
    );
    assert_eq!(argv.len(), 7);
    assert_eq!(
        (
            p.files[1].name.as_str(),
            p.files[1].carrier,
            p.files[1].mode
        ),
        ("vmcred.launch-key", Carrier::FwCfg, 0o400)
    );
    assert_key_only_in_files(&p);
}

#[test]
fn qemu_cmdline_carrier_moves_the_bootstrap_but_never_the_launch_key() {
    let f = fixture();
    for machine in ["q35", "microvm"] {
        let mut input = f.with_key(f.input(
            Hypervisor::Qemu,
            &[],
            &[
                "qemu-system-x86_64",
                "-M",
                machine,
                "-kernel",
                "k",
                "-append",
                "console=ttyS0",
            ],
        ));
        input.carrier = CarrierChoice::Cmdline;
        let p = prepare(&input).unwrap();
        assert!(strs(&p.argv)[6].contains("vmcred.bootstrap:"), "{machine}");
        assert_eq!(p.files.len(), 1, "{machine}");
        assert_eq!(p.files[0].name, "vmcred.launch-key", "{machine}");
        assert_ne!(p.files[0].carrier, Carrier::Cmdline, "{machine}");
        assert_key_only_in_files(&p);
    }
}

#[test]
fn every_command_line_only_hypervisor_refuses_the_launch_key() {
    use vmcred_proto::bootstrap::HostTransport;
    let f = fixture();
    let fc_config = f.tmp.path().join("fc.json");
    fs::write(
        &fc_config,
        br#"{"boot-source":{"boot_args":"console=ttyS0"}}"#,
    )
    .unwrap();
    let fc_config = fc_config.display().to_string();
    let cases: [(Hypervisor, Vec<&str>, HostTransport); 5] = [
        (
            Hypervisor::CloudHypervisor,
            vec!["cloud-hypervisor", "--kernel", "k"],
            HostTransport::Hybrid,
        ),
        (
            Hypervisor::Firecracker,
            vec!["firecracker", "--config-file", &fc_config],
            HostTransport::Hybrid,
        ),
        (
            Hypervisor::Crosvm,
            vec!["crosvm", "run", "k"],
            HostTransport::Vsock,
        ),
        (
            Hypervisor::Kvmtool,
            vec!["lkvm", "run", "-k", "k"],
            HostTransport::Vsock,
        ),
        (
            Hypervisor::Alioth,
            vec!["alioth", "run", "-k", "k"],
            HostTransport::Vsock,
        ),
    ];
    for (hypervisor, argv, host) in cases {
        // A boot secret the user allowed on the command line goes there;
        // the launch key never does.
        f.put("ENVIRONMENT", OTHER);
        let mut input = f.input(hypervisor, &[("ENVIRONMENT", true)], &argv);
        input.bootstrap.host = host;
        assert!(prepare(&input).is_ok(), "{hypervisor} without a key");
        fs::remove_dir_all(&f.run).ok();

        let input = f.with_key(input);
        let e = prepare(&input).unwrap_err();
        assert!(
            matches!(e, LaunchError::LaunchKeyNoPrivateCarrier { .. }),
            "{hypervisor}: {e}"
        );
        let text = e.to_string();
        for needle in [
            "launch_key = \"required\"",
            "under qemu",
            "launch_key = \"off\"",
            "allow_on_command_line",
            hypervisor.as_str(),
        ] {
            assert!(text.contains(needle), "{hypervisor}: {needle:?} in {text}");
        }
        let why_off = match host {
            HostTransport::Hybrid => "socket path already tells",
            HostTransport::Vsock => "start a VM on its CID",
        };
        assert!(text.contains(why_off), "{hypervisor}: {text}");
        assert_no_key(text.as_bytes());
        assert!(!f.run.exists(), "{hypervisor}: nothing written");
    }
}

#[test]
fn a_missing_launch_key_names_the_load_credential_line() {
    let f = fixture();
    let mut input = f.with_key(f.input(Hypervisor::Qemu, &[], &["qemu-kvm"]));
    fs::remove_file(f.creds.join("vmcred.launch-key")).unwrap();
    let e = prepare(&input).unwrap_err();
    assert!(matches!(e, LaunchError::LaunchKeyMissing { .. }), "{e}");
    let text = e.to_string();
    for needle in [
        "LoadCredential=vmcred.launch-key:/var/lib/vmcred/launch-keys/test-vm",
        "microvm@test-vm.service",
        "After= and Wants=vmcred-host.service",
        "not found",
    ] {
        assert!(text.contains(needle), "{needle:?} missing in: {text}");
    }

    input.credentials_dir = None;
    let text = prepare(&input).unwrap_err().to_string();
    for needle in [
        "$CREDENTIALS_DIRECTORY is not set",
        "LoadCredential=vmcred.launch-key:/var/lib/vmcred/launch-keys/test-vm",
    ] {
        assert!(text.contains(needle), "{needle:?} missing in: {text}");
    }
    assert!(!f.run.exists(), "nothing written after a refusal");
}

#[test]
fn a_launch_key_that_is_not_a_bounded_regular_file_is_refused() {
    let f = fixture();
    let input = f.with_key(f.input(Hypervisor::Qemu, &[], &["qemu-kvm"]));
    let target = f.creds.join("vmcred.launch-key");
    let real = f.tmp.path().join("real-key");
    fs::write(&real, KEY).unwrap();
    fs::remove_file(&target).unwrap();

    symlink(&real, &target).unwrap();
    let e = prepare(&input).unwrap_err();
    assert!(matches!(e, LaunchError::NotRegularFile { .. }), "{e}");
    assert!(e.to_string().contains("symbolic link"), "{e}");
    assert_no_key(e.to_string().as_bytes());
    fs::remove_file(&target).unwrap();

    nix::unistd::mkfifo(&target, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    assert!(prepare(&input).unwrap_err().to_string().contains("a FIFO"));
    fs::remove_file(&target).unwrap();

    for (len, ok) in [
        (0, false),
        (1, true),
        (128, true),
        (129, false),
        (4096, false),
    ] {
        fs::write(&target, vec![b'a'; len]).unwrap();
        match prepare(&input) {
            Ok(_) => assert!(ok, "{len} bytes accepted"),
            Err(e) => {
                assert!(!ok, "{len} bytes: {e}");
                assert!(matches!(e, LaunchError::LaunchKeySize { .. }), "{e}");
                assert!(e.to_string().contains(&format!("is {len} bytes")), "{e}");
            }
        }
        fs::remove_dir_all(&f.run).ok();
    }
}

#[test]
fn launch_key_off_passes_nothing_new() {
    let f = fixture();
    // A key in the credentials directory is not read when the VM has none.
    f.put(rules::LAUNCH_KEY_CREDENTIAL, KEY);
    let p = prepare(&f.input(Hypervisor::Qemu, &[], &["qemu-system-x86_64", "-m", "512"])).unwrap();
    let path = f.vm_dir().join("00-vmcred.bootstrap.smbios");
    assert_eq!(
        strs(&p.argv),
        [
            "qemu-system-x86_64".to_string(),
            "-m".into(),
            "512".into(),
            "-smbios".into(),
            format!("type=11,path={}", path.display())
        ]
    );
    assert_eq!(p.files.len(), 1);
    assert_eq!(fs::read_dir(f.vm_dir()).unwrap().count(), 1);
    // Hypervisors without a private carrier launch as before.
    let p = prepare(&f.input(Hypervisor::Crosvm, &[], &["crosvm", "run", "k"])).unwrap();
    assert_eq!(strs(&p.argv)[..2], ["crosvm", "run"]);
    assert_no_key(&argv_bytes(&p.argv));
}

#[test]
fn an_argv_that_already_passes_a_launch_key_is_refused() {
    let f = fixture();
    for (flag, value) in [
        (
            "-fw_cfg",
            "name=opt/io.systemd.credentials/vmcred.launch-key,file=/tmp/k",
        ),
        (
            "-smbios",
            "type=11,value=io.systemd.credential:vmcred.launch-key=x",
        ),
        ("-append", "systemd.set_credential=vmcred.launch-key:x"),
    ] {
        let input = f.with_key(f.input(
            Hypervisor::Qemu,
            &[],
            &["qemu-system-x86_64", "-kernel", "k", flag, value],
        ));
        let e = prepare(&input).unwrap_err();
        assert!(
            matches!(&e, LaunchError::AlreadyDefined { name, .. } if name == "vmcred.launch-key"),
            "{flag}: {e}"
        );
    }
}
