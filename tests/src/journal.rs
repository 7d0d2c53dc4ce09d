//! journald's native protocol as the tests receive it on a datagram socket
//! bound where the agents look for the journal.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::World;

pub type Entry = BTreeMap<String, Vec<u8>>;

/// One datagram of journald's native protocol: `NAME=value\n`, or
/// `NAME\n` + a 64-bit little-endian length + the value + `\n`.
pub fn parse_entry(mut d: &[u8]) -> Entry {
    let mut e = Entry::new();
    while !d.is_empty() {
        let nl = d
            .iter()
            .position(|b| *b == b'\n')
            .expect("field ends in a newline");
        let line = &d[..nl];
        match line.iter().position(|b| *b == b'=') {
            Some(eq) => {
                e.insert(
                    String::from_utf8(line[..eq].to_vec()).unwrap(),
                    line[eq + 1..].to_vec(),
                );
                d = &d[nl + 1..];
            }
            None => {
                let name = String::from_utf8(line.to_vec()).unwrap();
                let rest = &d[nl + 1..];
                let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
                e.insert(name, rest[8..8 + len].to_vec());
                assert_eq!(rest[8 + len], b'\n');
                d = &rest[8 + len + 1..];
            }
        }
        let name = e.keys().last().unwrap();
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_'),
            "a journal field name: {name:?}"
        );
    }
    e
}

pub fn text(e: &Entry, k: &str) -> String {
    String::from_utf8_lossy(e.get(k).map(Vec::as_slice).unwrap_or_default()).into_owned()
}

/// A datagram socket at `dir/socket` standing in for journald's, for
/// [`private_run`] to put where the agents look; reads give up after
/// 200 ms so a wait loop can check its deadline.
pub fn fake_journal(dir: &Path) -> std::io::Result<UnixDatagram> {
    std::fs::create_dir_all(dir)?;
    let sock = UnixDatagram::bind(dir.join("socket"))?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    Ok(sock)
}

/// systemd's `JOURNAL_STREAM` for an agent whose stderr the harness
/// appends to `log`: the file's `DEV:INO`. Empties (or creates) `log`
/// first, so the inode exists before the agent starts.
pub fn journal_stream(log: &Path) -> std::io::Result<(String, String)> {
    std::fs::write(log, b"")?;
    let m = std::fs::metadata(log)?;
    Ok(("JOURNAL_STREAM".into(), format!("{}:{}", m.dev(), m.ino())))
}

/// A command prefix that runs an agent in its own mount namespace with a
/// tmpfs over `/run`: with `journal`'s directory bound at
/// `/run/systemd/journal` (its `socket` is then the agent's journal), or,
/// with `None`, no journal socket at all.
pub fn private_run(journal: Option<&Path>) -> Vec<String> {
    let ns = ["unshare", "-m", "--propagation", "private", "sh", "-c"];
    let (script, zero) = match journal {
        Some(dir) => (
            "mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal && \
             mount --bind \"$0\" /run/systemd/journal && exec \"$@\"",
            dir.display().to_string(),
        ),
        None => ("mount -t tmpfs tmpfs /run && exec \"$@\"", "sh".to_string()),
    };
    ns.iter()
        .map(|s| s.to_string())
        .chain([script.to_string(), zero])
        .collect()
}

/// Receives entries into `entries` until `done` says they are enough or
/// `limit` has passed (the caller then says what is missing).
pub fn receive_until(
    sock: &UnixDatagram,
    entries: &mut Vec<Entry>,
    limit: Duration,
    done: impl Fn(&[Entry]) -> bool,
) {
    let mut buf = vec![0u8; 256 * 1024];
    let deadline = Instant::now() + limit;
    while !done(entries) && Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            if n > 0 {
                entries.push(parse_entry(&buf[..n]));
            }
        }
    }
}

/// The journal tests' world: `vm` holding `API_KEY` = `secret`, agents
/// logging at INFO. `None` (with the reason on stderr, as the skip
/// convention wants) unless root, which the private mount namespace needs.
pub fn journal_world(vm: &str, secret: &[u8]) -> anyhow::Result<Option<World>> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP-REASON: this test needs root for a private mount namespace");
        return Ok(None);
    }
    let mut w = World::new()?;
    w.log_level = "info".into();
    w.add_vm(vm, false)?;
    w.set_secret(vm, "API_KEY", secret, false)?;
    Ok(Some(w))
}
