//! A small tracing layer that writes each event either as one native
//! journal entry (a datagram on journald's socket: `PRIORITY=`,
//! `SYSLOG_IDENTIFIER=`, `MESSAGE=`, `TARGET=`, `CODE_FILE=`, `CODE_LINE=`
//! and every field of the event, upper-cased) or as one line on stderr
//! (`logline::one_line`). The guest agent uses it instead of
//! `tracing-journald` plus tracing-subscriber's `fmt` layer, which together
//! cost its size-capped binary about 30 KB more (see "Guest footprint" in
//! ARCHITECTURE.md). Spans are not recorded: the guest opens none.
//!
//! Native protocol (systemd's `systemd.journal-fields(7)` and the journal
//! native protocol): one datagram per entry, each field `NAME=value\n`, or,
//! when the value holds a newline, `NAME\n`, its length as a 64-bit
//! little-endian integer, the value, `\n`.

use std::fmt::{self, Write as _};
use std::io::{self, Write};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::Context;

use crate::logline;

/// Where journald listens for native entries.
pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// Where events go.
pub enum Output {
    /// Native entries on journald's socket, addressed per datagram (not
    /// connected) so that entries reach a restarted journald's new socket.
    /// A datagram that cannot be sent is written to stderr as a `<N>`
    /// line instead, so nothing is lost.
    Journal(UnixDatagram, PathBuf),
    /// One line per event on stderr: with a `<N>` prefix and no timestamp
    /// under systemd (`prefixed`), or a UTC timestamp otherwise.
    Stderr { prefixed: bool },
}

impl Output {
    /// A socket for `path`, once an empty datagram (journald discards
    /// those) reached it, so a missing or dead journal shows here rather
    /// than at the first event.
    pub fn journal(path: &Path) -> io::Result<Output> {
        let sock = UnixDatagram::unbound()?;
        sock.send_to(&[], path)?;
        Ok(Output::Journal(sock, path.to_path_buf()))
    }
}

pub struct LogLayer {
    identifier: &'static str,
    output: Output,
}

impl LogLayer {
    pub fn new(identifier: &'static str, output: Output) -> Self {
        LogLayer { identifier, output }
    }
}

/// An event's message and fields, formatted.
#[derive(Default)]
struct Fields {
    message: String,
    fields: Vec<(&'static str, String)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.to_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, format!("{value:?}"));
    }
}

impl Fields {
    fn put(&mut self, field: &Field, value: String) {
        if field.name() == "message" {
            self.message = value;
        } else {
            self.fields.push((field.name(), value));
        }
    }
}

/// A tracing field name as a journal field name: upper-case ASCII letters,
/// digits and `_`, starting with a letter (names starting with `_` are
/// journald's own trusted fields), at most 64 bytes.
pub fn journal_name(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| match c {
            'a'..='z' => c.to_ascii_uppercase(),
            'A'..='Z' | '0'..='9' => c,
            _ => '_',
        })
        .collect();
    if !out.starts_with(|c: char| c.is_ascii_uppercase()) {
        out.insert_str(0, "F_");
    }
    out.truncate(64);
    out
}

/// Appends one field in the native protocol.
pub fn put_field(buf: &mut Vec<u8>, name: &str, value: &[u8]) {
    buf.extend_from_slice(name.as_bytes());
    if value.contains(&b'\n') {
        buf.push(b'\n');
        buf.extend_from_slice(&(value.len() as u64).to_le_bytes());
    } else {
        buf.push(b'=');
    }
    buf.extend_from_slice(value);
    buf.push(b'\n');
}

/// `2026-11-30T11:14:42.123456Z`, from days since the epoch by the civil
/// calendar (proleptic Gregorian), as tracing-subscriber's `fmt` wrote it.
fn utc_timestamp(now: SystemTime) -> String {
    let d = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_micros()
    )
}

/// `text` with control characters other than line breaks (which
/// `one_line` escapes) written as `\u{1b}`: a value a peer chose (an
/// error, a name) cannot move a terminal's cursor or recolour the output,
/// as tracing-subscriber's `fmt` layer guarantees too.
pub fn without_controls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() && c != '\n' && c != '\r' {
            let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    out
}

impl LogLayer {
    fn entry(&self, event: &Event<'_>, f: &Fields) -> Vec<u8> {
        let meta = event.metadata();
        let mut buf = Vec::with_capacity(256);
        let priority = logline::priority(meta.level());
        put_field(&mut buf, "PRIORITY", &[b'0' + priority]);
        put_field(&mut buf, "SYSLOG_IDENTIFIER", self.identifier.as_bytes());
        put_field(&mut buf, "MESSAGE", f.message.as_bytes());
        put_field(&mut buf, "TARGET", meta.target().as_bytes());
        if let Some(file) = meta.file() {
            put_field(&mut buf, "CODE_FILE", file.as_bytes());
        }
        if let Some(line) = meta.line() {
            put_field(&mut buf, "CODE_LINE", line.to_string().as_bytes());
        }
        for (name, value) in &f.fields {
            put_field(&mut buf, &journal_name(name), value.as_bytes());
        }
        buf
    }

    fn line(&self, event: &Event<'_>, f: &Fields, prefixed: bool) -> Vec<u8> {
        let meta = event.metadata();
        let mut text = String::with_capacity(128);
        if !prefixed {
            text.push_str(&utc_timestamp(SystemTime::now()));
            text.push(' ');
        }
        let _ = write!(text, "{:>5} {}: {}", meta.level(), meta.target(), f.message);
        for (name, value) in &f.fields {
            let _ = write!(text, " {name}={value}");
        }
        logline::one_line(
            prefixed.then(|| logline::priority(meta.level())),
            without_controls(&text).as_bytes(),
        )
    }
}

impl<S: Subscriber> tracing_subscriber::Layer<S> for LogLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut f = Fields::default();
        event.record(&mut f);
        let line = match &self.output {
            Output::Journal(sock, path) => {
                if sock.send_to(&self.entry(event, &f), path).is_ok() {
                    return;
                }
                self.line(event, &f, true)
            }
            Output::Stderr { prefixed } => self.line(event, &f, *prefixed),
        };
        // A log line that cannot be written has nowhere else to go.
        let _ = io::stderr().lock().write_all(&line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_names_become_journal_names() {
        assert_eq!(journal_name("generation"), "GENERATION");
        assert_eq!(journal_name("peer_pid"), "PEER_PID");
        assert_eq!(journal_name("_hostname"), "F__HOSTNAME");
        assert_eq!(journal_name("1x"), "F_1X");
        assert_eq!(journal_name("a.b-c"), "A_B_C");
        assert_eq!(journal_name(&"a".repeat(80)).len(), 64);
    }

    #[test]
    fn values_with_newlines_are_length_prefixed() {
        let mut buf = Vec::new();
        put_field(&mut buf, "A", b"one");
        put_field(&mut buf, "B", b"x\ny");
        let mut want = b"A=one\nB\n".to_vec();
        want.extend_from_slice(&3u64.to_le_bytes());
        want.extend_from_slice(b"x\ny\n");
        assert_eq!(buf, want);
    }

    #[test]
    fn control_characters_are_escaped_in_lines() {
        assert_eq!(
            without_controls("a\u{1b}[31mred\u{7}\tb\nc"),
            "a\\u{1b}[31mred\\u{7}\\u{9}b\nc"
        );
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let t = UNIX_EPOCH + std::time::Duration::from_micros(1_796_037_282_123_456);
        assert_eq!(utc_timestamp(t), "2026-11-30T11:14:42.123456Z");
        assert_eq!(utc_timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        let leap = UNIX_EPOCH + std::time::Duration::from_secs(951_782_400);
        assert_eq!(utc_timestamp(leap), "2000-02-29T00:00:00.000000Z");
    }
}
