//! How both agents write log events to stderr: one line per event, and,
//! under systemd, a `<N>` syslog priority prefix that journald turns into
//! the entry's PRIORITY= (journald parses it: `SyslogLevelPrefix=` is on by
//! default). A multi-line error inside an event (a TOML parse error shows
//! the offending line and a caret) would otherwise become several journal
//! entries at the default priority, of which only the first says what
//! happened; its line breaks are written as `\n` instead.

use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// Whether stderr is connected to the journal: systemd sets
/// `$JOURNAL_STREAM` to `DEV:INO` of the stream it gave a service as
/// stderr. The variable is inherited by children whose stderr may go
/// elsewhere (a shell redirect, a test), so it counts only when it names
/// the file stderr is now.
pub fn under_journald() -> bool {
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    // fd 2 through /proc: stat follows the magic link to the open file,
    // socket or not, as fstat(2) would.
    let Ok(m) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    stream_matches(&v.to_string_lossy(), m.dev(), m.ino())
}

/// Whether `JOURNAL_STREAM`'s value names the file `(dev, ino)`.
pub fn stream_matches(value: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = value.split_once(':') else {
        return false;
    };
    d.parse::<u64>() == Ok(dev) && i.parse::<u64>() == Ok(ino)
}

/// The syslog priority journald stores for a tracing level.
pub fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// A `MakeWriter` for stderr: each event becomes exactly one line, with a
/// `<N>` prefix when `prefix` is set.
#[derive(Debug, Clone, Copy)]
pub struct Stderr {
    pub prefix: bool,
}

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = OneLine;

    fn make_writer(&'a self) -> OneLine {
        OneLine::new(self.prefix.then_some(6))
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> OneLine {
        OneLine::new(self.prefix.then(|| priority(meta.level())))
    }
}

/// Collects one formatted event and writes it to stderr as one line when
/// dropped (tracing-subscriber makes one writer per event).
pub struct OneLine {
    priority: Option<u8>,
    buf: Vec<u8>,
}

impl OneLine {
    fn new(priority: Option<u8>) -> Self {
        OneLine {
            priority,
            buf: Vec::with_capacity(256),
        }
    }
}

/// `event` as one line: interior line breaks escaped, one `\n` at the end,
/// `<N>` in front when a priority is given.
pub fn one_line(priority: Option<u8>, event: &[u8]) -> Vec<u8> {
    let body = event.strip_suffix(b"\n").unwrap_or(event);
    let mut out = Vec::with_capacity(body.len() + 8);
    if let Some(p) = priority {
        out.extend_from_slice(format!("<{p}>").as_bytes());
    }
    for &b in body {
        match b {
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            _ => out.push(b),
        }
    }
    out.push(b'\n');
    out
}

impl Write for OneLine {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for OneLine {
    fn drop(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let line = one_line(self.priority, &self.buf);
        // A log line that cannot be written has nowhere else to go.
        let _ = io::stderr().lock().write_all(&line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_multi_line_event_is_one_line_with_its_priority() {
        let out = one_line(Some(4), b"config: TOML parse error\n  |\n3 | x\n  | ^\n");
        assert_eq!(out, b"<4>config: TOML parse error\\n  |\\n3 | x\\n  | ^\n");
        assert_eq!(one_line(None, b"plain"), b"plain\n");
        assert_eq!(priority(&Level::ERROR), 3);
        assert_eq!(priority(&Level::DEBUG), 7);
    }

    #[test]
    fn journal_stream_must_name_the_stream() {
        assert!(stream_matches("8:1234", 8, 1234));
        assert!(!stream_matches("8:1234", 8, 1235));
        assert!(!stream_matches("8:1234", 9, 1234));
        for bad in ["", "8", "8:", ":1", "x:1", "8:1234:5", "-8:1234"] {
            assert!(!stream_matches(bad, 8, 1234), "{bad:?}");
        }
    }
}
