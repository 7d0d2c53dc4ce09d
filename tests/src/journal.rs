//! journald's native protocol as the tests receive it on a datagram socket
//! bound where the agents look for the journal.

use std::collections::BTreeMap;

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
