//! The local control protocol between `vmcred-host serve` and its
//! `rotate`, `status` and `launch` commands, over a Unix socket: the client
//! sends one JSON request line; the daemon answers with zero or more item
//! lines (`{"status":{..}}` per VM, `{"rotate":{..}}` per VM) and exactly
//! one terminal line (`"ok"`, `{"done":{"count":N}}`, `{"error":".."}` or
//! `{"busy":".."}`). Streaming keeps every line small, so `status` answers
//! for any number of VMs; every line is bounded (`MAX_LINE`, items are
//! truncated with a visible marker) and every read and write has a
//! deadline, so a stuck or hostile local client costs the daemon nothing
//! lasting.
//!
//! Two sockets: `control_socket` (0600, or 0660 with `control_group`; the
//! peer must be root or the daemon's own uid, or a `control_group` member
//! for `status` only) takes `rotate` and `status`; `launch_socket` (0666,
//! but only root and the configured `launch_users` are admitted, checked
//! with `SO_PEERCRED`) takes only `launched`.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

/// Longest request or reply line.
pub const MAX_LINE: usize = 256 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// One `status` line per VM (those named in `vms`, or all), then `done`.
    Status {
        #[serde(default)]
        vms: Vec<String>,
    },
    /// Rotates the VMs named in `vms` (or every VM when `all`), one
    /// `rotate` line per VM as each finishes, then `done`.
    Rotate {
        #[serde(default)]
        vms: Vec<String>,
        #[serde(default)]
        all: bool,
        #[serde(default)]
        credentials: Vec<String>,
        timeout_ms: u64,
    },
    Launched {
        vm: String,
    },
    /// A host key rollover step (see `keyring`): one `key` line, then one
    /// `status` line per VM once each has redialled (or `timeout_ms`
    /// passed), then `done`.
    RotateKey {
        step: crate::keyring::KeyStep,
        /// With `switch`: go ahead even though some guests do not hold
        /// the next pin (they fall back to the previous key until retire).
        #[serde(default)]
        force: bool,
        timeout_ms: u64,
    },
}

/// Whether a guest trusts the host's keys, from the pins it reports (a
/// claim) and whether it refused the current key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyTrust {
    /// Not connected since start, or a guest from before key rollovers.
    #[default]
    Unknown,
    /// Holds the current key's pin; no rollover in progress.
    Current,
    /// A next key is prepared and the guest holds its pin: ready to switch.
    HasNext,
    /// A next key is prepared and the guest does not hold its pin.
    LacksNext,
    /// The guest refused the current key and no previous key is kept:
    /// relaunch the VM.
    Untrusted,
}

impl KeyTrust {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyTrust::Unknown => "unknown",
            KeyTrust::Current => "current",
            KeyTrust::HasNext => "has next pin",
            KeyTrust::LacksNext => "lacks next pin",
            KeyTrust::Untrusted => "guest does not trust the current key: relaunch the VM",
        }
    }
}

/// The first line of a `rotate-key` reply.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyReport {
    pub step: crate::keyring::KeyStep,
    pub outcome: crate::keyring::StepOutcome,
    pub phase: crate::keyring::Phase,
    pub current_pin: String,
    pub next_pin: Option<String>,
    pub previous_pin: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmStatus {
    pub vm: String,
    pub target: String,
    pub connected: bool,
    pub generation_sent: u64,
    pub generation_applied: u64,
    pub last_error: Option<String>,
    /// Seconds since the Unix epoch of the last successful sync.
    pub last_sync: Option<u64>,
    pub credentials: Vec<CredentialStatus>,
    /// Unit actions the guest reports it still owes (failed, retried by
    /// the guest); bounded, with a final "… N more" entry when cut.
    #[serde(default)]
    pub owed_units: Vec<UnitOutcome>,
    /// The guest agent's version as it reports it (escaped, bounded).
    #[serde(default)]
    pub guest_version: Option<String>,
    /// The host key pins the guest reports holding (a claim), oldest
    /// first.
    #[serde(default)]
    pub guest_pins: Vec<String>,
    /// The guest refused the current host key at the last dial.
    #[serde(default)]
    pub key_refused: bool,
    #[serde(default)]
    pub key_trust: KeyTrust,
    /// What the guest proved about its launch at the last `Hello` (see
    /// `launch_key`).
    #[serde(default)]
    pub launch_key: LaunchKeyState,
}

/// `launch_key` in `status`: whether the guest showed the VM's launch key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LaunchKeyState {
    /// The VM requires none (`launch_key = "off"`).
    #[default]
    Off,
    /// Required; no guest has answered since start or reload.
    Unchecked,
    /// The guest returned the VM's key.
    Verified,
    /// Refused: the guest returned none.
    Missing,
    /// Refused: the guest returned another key.
    Mismatch,
    /// Refused: the agent has no key for the VM.
    NoHostKey,
}

impl LaunchKeyState {
    /// Before any guest answered.
    pub fn configured(mode: crate::config::LaunchKeyMode) -> Self {
        match mode {
            crate::config::LaunchKeyMode::Off => LaunchKeyState::Off,
            crate::config::LaunchKeyMode::Required => LaunchKeyState::Unchecked,
        }
    }
}

impl From<crate::launch_key::Proof> for LaunchKeyState {
    fn from(p: crate::launch_key::Proof) -> Self {
        use crate::launch_key::Proof;
        match p {
            Proof::NotRequired => LaunchKeyState::Off,
            Proof::Matches => LaunchKeyState::Verified,
            Proof::Missing => LaunchKeyState::Missing,
            Proof::Mismatch => LaunchKeyState::Mismatch,
            Proof::NoHostKey => LaunchKeyState::NoHostKey,
        }
    }
}

/// A credential's state as `status` shows it. The wire names (status
/// JSON schema 1) are kept exactly: `applied`, `pending`, `source-missing`,
/// `source-error`, `error`, `omitted`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CredState {
    /// The guest holds the current value.
    Applied,
    /// Not synced since start (the VM never came up, or not yet).
    #[default]
    Pending,
    /// The source file or secret does not exist.
    SourceMissing,
    /// The source is unreadable, not a regular file, or timed out.
    SourceError,
    /// The guest refused it.
    #[serde(rename = "error")]
    Refused,
    /// The marker entry that stands for credentials left out of an
    /// over-long reply.
    Omitted,
}

impl CredState {
    pub const ALL: [CredState; 6] = [
        CredState::Applied,
        CredState::Pending,
        CredState::SourceMissing,
        CredState::SourceError,
        CredState::Refused,
        CredState::Omitted,
    ];

    /// The wire name, also used in logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            CredState::Applied => "applied",
            CredState::Pending => "pending",
            CredState::SourceMissing => "source-missing",
            CredState::SourceError => "source-error",
            CredState::Refused => "error",
            CredState::Omitted => "omitted",
        }
    }

    pub fn is_source_problem(self) -> bool {
        matches!(self, CredState::SourceMissing | CredState::SourceError)
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CredentialStatus {
    pub name: String,
    pub boot: bool,
    pub state: CredState,
    pub error: Option<String>,
}

/// What a rotation did with one credential. Wire names: `written`,
/// `unchanged`, `removed`, `failed`, `omitted`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Written,
    #[default]
    Unchanged,
    Removed,
    Failed,
    /// The marker entry for outcomes left out of an over-long reply.
    Omitted,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Written => "written",
            Outcome::Unchanged => "unchanged",
            Outcome::Removed => "removed",
            Outcome::Failed => "failed",
            Outcome::Omitted => "omitted",
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CredentialOutcome {
    pub name: String,
    pub outcome: Outcome,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct UnitOutcome {
    pub unit: String,
    pub action: String,
    pub ok: bool,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RotateReport {
    pub vm: String,
    /// True when the guest applied the generation and every listed
    /// credential was written or already current.
    pub applied: bool,
    pub generation: u64,
    pub credentials: Vec<CredentialOutcome>,
    pub units: Vec<UnitOutcome>,
    pub error: Option<String>,
    /// Unit actions the guest still owes after this rotation; `applied` is
    /// false while any is owed.
    #[serde(default)]
    pub owed_units: Vec<UnitOutcome>,
}

/// One reply line. `Status` and `Rotate` are items; the others end the
/// reply.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Status(VmStatus),
    Rotate(RotateReport),
    /// The outcome of a `rotate-key` step.
    Key(KeyReport),
    /// The answer to `launched`.
    Ok,
    /// The end of a `status` or `rotate` reply: `count` items were sent.
    Done {
        count: u64,
    },
    Error(String),
    /// The request named a VM or credential the running daemon's config
    /// does not have; nothing was done. The CLI exits 2 (usage) on it, so
    /// it need not load the config to check names itself.
    Unknown(String),
    /// The daemon had no free slot for this request within its deadline;
    /// nothing was done, try again.
    Busy(String),
}

impl Reply {
    /// Whether this line ends the reply.
    pub fn is_terminal(&self) -> bool {
        !matches!(self, Reply::Status(_) | Reply::Rotate(_) | Reply::Key(_))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LineError {
    #[error("line longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("connection closed before a full line")]
    Closed,
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    // The cause is in the message and not a `source()`: see
    // `config::ConfigError::Read`.
    #[error("{0}")]
    Io(std::io::Error),
    #[error("malformed message: {0}")]
    Json(serde_json::Error),
}

impl From<std::io::Error> for LineError {
    fn from(e: std::io::Error) -> Self {
        LineError::Io(e)
    }
}

impl From<serde_json::Error> for LineError {
    fn from(e: serde_json::Error) -> Self {
        LineError::Json(e)
    }
}

/// `msg` as one line of the protocol: its JSON, then the newline. The
/// daemon's async writes and the CLI's blocking ones both send this.
pub fn encode_line<T: Serialize>(msg: &T) -> Result<Vec<u8>, LineError> {
    let mut line = serde_json::to_vec(msg)?;
    line.push(b'\n');
    Ok(line)
}

/// Judges what one bounded read gave: at most `MAX_LINE + 1` bytes, up to
/// and including the first newline. More than `MAX_LINE` is too long; no
/// newline at the end means the peer hung up mid-line. The reads differ
/// (async with a timeout, blocking with a deadline); this does not.
pub fn decode_line<T: for<'de> Deserialize<'de>>(buf: &[u8]) -> Result<T, LineError> {
    if buf.len() > MAX_LINE {
        return Err(LineError::TooLong);
    }
    if buf.last() != Some(&b'\n') {
        return Err(LineError::Closed);
    }
    Ok(serde_json::from_slice(buf)?)
}

/// Reads one bounded JSON line.
pub async fn read_line<R, T>(r: R, timeout: Duration) -> Result<T, LineError>
where
    R: AsyncRead + Unpin,
    T: for<'de> Deserialize<'de>,
{
    let fut = async {
        let mut reader = BufReader::new(r.take(MAX_LINE as u64 + 1));
        let mut buf = Vec::new();
        reader.read_until(b'\n', &mut buf).await?;
        decode_line(&buf)
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| LineError::Timeout(timeout))?
}

/// Writes one JSON line.
pub async fn write_line<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    msg: &T,
) -> Result<(), LineError> {
    write_lines(w, std::slice::from_ref(msg)).await
}

/// Writes several JSON lines in one write: a single-VM rotate's report
/// and its end reach the client together, which then wakes once, not
/// twice.
pub async fn write_lines<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    msgs: &[T],
) -> Result<(), LineError> {
    let mut buf = Vec::new();
    for m in msgs {
        buf.extend_from_slice(&encode_line(m)?);
    }
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
}

/// Why a control call failed, so the CLI can exit with the right code.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Nothing listens, or we may not connect: the daemon is not running
    /// (or not reachable for this user).
    #[error(
        "cannot connect to {socket}: {error} (is `vmcred-host serve` running, and are you root?)"
    )]
    Unreachable {
        socket: String,
        error: std::io::Error,
    },
    #[error("connecting to {socket} timed out (is `vmcred-host serve` stuck?)")]
    ConnectTimeout { socket: String },
    #[error("{socket}: {error}")]
    Protocol { socket: String, error: LineError },
}

/// How long a client waits for `connect` (a full backlog makes it wait).
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends one request and reads the reply lines until the terminal one,
/// handing each item line to `item` as it arrives. `timeout` bounds the
/// wait for each line (the daemon may take that long between items).
pub async fn call(
    socket: &std::path::Path,
    req: &Request,
    timeout: Duration,
    mut item: impl FnMut(Reply),
) -> Result<Reply, CallError> {
    let shown = socket.display().to_string();
    let s = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::UnixStream::connect(socket))
        .await
        .map_err(|_| CallError::ConnectTimeout {
            socket: shown.clone(),
        })?
        .map_err(|error| CallError::Unreachable {
            socket: shown.clone(),
            error,
        })?;
    let protocol = |error| CallError::Protocol {
        socket: shown.clone(),
        error,
    };
    let (r, mut w) = s.into_split();
    write_line(&mut w, req).await.map_err(protocol)?;
    let mut lines = LineReader::new(r);
    loop {
        let reply: Reply = lines.next(timeout).await.map_err(protocol)?;
        if reply.is_terminal() {
            return Ok(reply);
        }
        item(reply);
    }
}

/// Reads successive bounded JSON lines from one stream.
pub struct LineReader<R> {
    reader: BufReader<R>,
    buf: Vec<u8>,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    pub fn new(r: R) -> Self {
        LineReader {
            reader: BufReader::new(r),
            buf: Vec::new(),
        }
    }

    /// The next line, within `timeout`.
    pub async fn next<T: for<'de> Deserialize<'de>>(
        &mut self,
        timeout: Duration,
    ) -> Result<T, LineError> {
        self.buf.clear();
        let fut = async {
            let mut limited = (&mut self.reader).take(MAX_LINE as u64 + 1);
            limited.read_until(b'\n', &mut self.buf).await?;
            decode_line(&self.buf)
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| LineError::Timeout(timeout))?
    }
}

/// Marker name for entries left out of an over-long item.
pub const OMITTED: &str = "…";

/// Room kept free below `MAX_LINE` while shrinking an item: the marker
/// entries added afterwards and the reply's wrapping (`{"status":..}` and
/// the newline) fit in it.
const MARKER_ROOM: usize = 4 * 1024;

/// The back half of `v` (all of it when one entry is left), removed.
fn drain_half<T>(v: &mut Vec<T>) -> Vec<T> {
    let keep = v.len() / 2;
    v.split_off(keep)
}

/// The marker that stands for unit results left out: `ok` only when every
/// one left out was, so a dropped failure stays visible.
fn units_marker(dropped: &[UnitOutcome], what: &str) -> UnitOutcome {
    UnitOutcome {
        unit: OMITTED.into(),
        action: "omitted".into(),
        ok: dropped.iter().all(|u| u.ok),
        error: Some(format!(
            "{} more {what} left out (reply too long)",
            dropped.len()
        )),
    }
}

/// Shrinks a rotate report until its line fits in `MAX_LINE`, whatever the
/// guest sent: the units it still owes, then unit results, then credential
/// outcomes are halved from the end and each cut list ends with one marker
/// entry that says how many were left out; free text is cut last.
pub fn bound_rotate(mut r: RotateReport) -> RotateReport {
    r.error = r.error.map(|e| bound_text(&e));
    let mut owed: Vec<UnitOutcome> = Vec::new();
    let mut units: Vec<UnitOutcome> = Vec::new();
    let mut creds = 0usize;
    while line_len(&r) > MAX_LINE - MARKER_ROOM {
        if !r.owed_units.is_empty() {
            owed.extend(drain_half(&mut r.owed_units));
        } else if !r.units.is_empty() {
            units.extend(drain_half(&mut r.units));
        } else if !r.credentials.is_empty() {
            creds += drain_half(&mut r.credentials).len();
        } else {
            r.error = r.error.map(|e| shorten(&e, LAST_RESORT_TEXT));
            r.vm = shorten(&r.vm, LAST_RESORT_TEXT);
            break;
        }
    }
    if !owed.is_empty() {
        r.owed_units.push(units_marker(&owed, "owed unit actions"));
    }
    if !units.is_empty() {
        r.units.push(units_marker(&units, "unit results"));
    }
    if creds > 0 {
        r.credentials.push(CredentialOutcome {
            name: OMITTED.into(),
            outcome: Outcome::Omitted,
            error: Some(format!(
                "{creds} more credential results left out (reply too long)"
            )),
        });
    }
    r
}

/// Shrinks a status item the same way: the units the guest still owes,
/// then credentials, then the pins the guest claims, then free text.
pub fn bound_status(mut s: VmStatus) -> VmStatus {
    s.last_error = s.last_error.map(|e| bound_text(&e));
    s.guest_version = s.guest_version.map(|v| bound_text(&v));
    let mut owed: Vec<UnitOutcome> = Vec::new();
    let mut creds = 0usize;
    let mut pins = 0usize;
    while line_len(&s) > MAX_LINE - MARKER_ROOM {
        if !s.owed_units.is_empty() {
            owed.extend(drain_half(&mut s.owed_units));
        } else if !s.credentials.is_empty() {
            creds += drain_half(&mut s.credentials).len();
        } else if !s.guest_pins.is_empty() {
            pins += drain_half(&mut s.guest_pins).len();
        } else {
            s.last_error = s.last_error.map(|e| shorten(&e, LAST_RESORT_TEXT));
            s.guest_version = s.guest_version.map(|v| shorten(&v, LAST_RESORT_TEXT));
            s.vm = shorten(&s.vm, LAST_RESORT_TEXT);
            s.target = shorten(&s.target, LAST_RESORT_TEXT);
            break;
        }
    }
    if !owed.is_empty() {
        s.owed_units.push(units_marker(&owed, "owed unit actions"));
    }
    if creds > 0 {
        s.credentials.push(CredentialStatus {
            name: OMITTED.into(),
            state: CredState::Omitted,
            error: Some(format!(
                "{creds} more credentials left out (reply too long)"
            )),
            ..Default::default()
        });
    }
    if pins > 0 {
        s.guest_pins.push(format!(
            "{OMITTED} {pins} more pins left out (reply too long)"
        ));
    }
    s
}

/// Longest free-text field kept in a reply.
const MAX_TEXT: usize = 8 * 1024;
/// Longest free-text field kept when a line is still too long with every
/// list emptied (JSON escaping makes a control character six bytes).
const LAST_RESORT_TEXT: usize = 1024;

fn bound_text(s: &str) -> String {
    shorten(s, MAX_TEXT)
}

/// `s` cut to at most `max` bytes (at a character boundary), saying how
/// much was left out: for text a peer controls that goes into a reply or
/// a log line.
pub fn shorten(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut cut = max;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}… ({} more bytes left out)", &s[..cut], s.len() - cut)
}

/// The length of `t`'s JSON, counted without building it.
fn line_len<T: Serialize>(t: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 = self.0.saturating_add(buf.len());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    match serde_json::to_writer(&mut c, t) {
        Ok(()) => c.0,
        Err(_) => usize::MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The async readers and the CLI's blocking one judge a line alike:
    /// each case read both ways gives the same outcome.
    #[tokio::test]
    async fn lines_are_judged_alike_however_they_are_read() {
        let ok = encode_line(&Reply::Ok).unwrap();
        assert_eq!(ok, b"\"ok\"\n");
        let mut long = vec![b'"'; MAX_LINE + 10];
        long.push(b'\n');
        type Want = fn(&Result<Reply, LineError>) -> bool;
        let cases: [(&[u8], Want); 4] = [
            (&ok, |r| matches!(r, Ok(Reply::Ok))),
            (&long, |r| matches!(r, Err(LineError::TooLong))),
            (b"\"ok\"", |r| matches!(r, Err(LineError::Closed))),
            (b"{\"ok\n", |r| matches!(r, Err(LineError::Json(_)))),
        ];
        for (input, want) in cases {
            let shown = String::from_utf8_lossy(&input[..input.len().min(20)]).into_owned();
            let t = Duration::from_secs(5);
            let r = read_line::<_, Reply>(input, t).await;
            assert!(want(&r), "read_line {shown:?}: {r:?}");
            let r = LineReader::new(input).next::<Reply>(t).await;
            assert!(want(&r), "LineReader {shown:?}: {r:?}");
            let bounded = &input[..input.len().min(MAX_LINE + 1)];
            let end = bounded
                .iter()
                .position(|b| *b == b'\n')
                .map_or(bounded.len(), |i| i + 1);
            let r = decode_line::<Reply>(&bounded[..end]);
            assert!(want(&r), "decode_line {shown:?}: {r:?}");
        }
    }

    /// Counts the writes that reach it.
    struct Writes(Vec<Vec<u8>>);
    impl tokio::io::AsyncWrite for Writes {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            self.0.push(buf.to_vec());
            std::task::Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_report_and_its_end_leave_in_one_write_and_read_as_two_lines() {
        let mut w = Writes(Vec::new());
        let lines = [
            Reply::Rotate(RotateReport {
                vm: "vm0".into(),
                applied: true,
                ..Default::default()
            }),
            Reply::Done { count: 1 },
        ];
        write_lines(&mut w, &lines).await.unwrap();
        assert_eq!(w.0.len(), 1, "one write for both lines");
        let mut r = LineReader::new(&w.0[0][..]);
        let first: Reply = r.next(Duration::from_secs(1)).await.unwrap();
        assert!(matches!(first, Reply::Rotate(ref rep) if rep.vm == "vm0" && rep.applied));
        let second: Reply = r.next(Duration::from_secs(1)).await.unwrap();
        assert!(matches!(second, Reply::Done { count: 1 }));
    }

    #[test]
    fn oversized_rotate_report_is_cut_with_a_marker() {
        let unit = |i: usize, ok: bool| UnitOutcome {
            unit: format!("u{i}.service"),
            action: "restart".into(),
            ok,
            error: Some("x".repeat(3000)),
        };
        let mut units: Vec<UnitOutcome> = (0..1000).map(|i| unit(i, true)).collect();
        units[999].ok = false;
        let r = bound_rotate(RotateReport {
            vm: "a".into(),
            units,
            ..Default::default()
        });
        let line = serde_json::to_vec(&Reply::Rotate(r.clone())).unwrap();
        assert!(line.len() <= MAX_LINE, "{}", line.len());
        let marker = r.units.last().unwrap();
        assert_eq!(marker.unit, OMITTED);
        assert!(!marker.ok, "a dropped failure must stay visible");
        assert!(marker.error.as_ref().unwrap().contains("more unit results"));
    }

    #[test]
    fn oversized_status_is_cut_with_a_marker() {
        let creds = (0..2000)
            .map(|i| CredentialStatus {
                name: format!("{i}{}", "n".repeat(200)),
                state: CredState::Refused,
                error: Some("e".repeat(300)),
                ..Default::default()
            })
            .collect();
        let s = bound_status(VmStatus {
            vm: "a".into(),
            last_error: Some("z".repeat(1 << 20)),
            credentials: creds,
            ..Default::default()
        });
        assert!(line_len(&Reply::Status(s.clone())) <= MAX_LINE);
        assert_eq!(s.credentials.last().unwrap().name, OMITTED);
        assert!(s.last_error.unwrap().len() < 9000);
    }

    /// What a hostile guest can make a unit entry: long names and errors
    /// of 4-byte characters and of characters JSON escapes to six bytes.
    fn hostile_units(n: usize) -> Vec<UnitOutcome> {
        (0..n)
            .map(|i| UnitOutcome {
                unit: format!("{i}{}", "\u{10FFFD}".repeat(500)),
                action: "\u{1}".repeat(500),
                ok: false,
                error: Some(format!(
                    "{}{}",
                    "\u{7}\"".repeat(2000),
                    "\u{10FFFD}".repeat(2000)
                )),
            })
            .collect()
    }

    /// The line as the CLI reads it: encoded, within `MAX_LINE`, decoded.
    fn round_trip(reply: &Reply) -> Reply {
        let line = encode_line(reply).unwrap();
        assert!(line.len() <= MAX_LINE, "line of {} bytes", line.len());
        decode_line(&line).unwrap()
    }

    #[test]
    fn a_guests_owed_units_cannot_make_a_status_line_too_long() {
        for n in [1, 7, 300, 1000] {
            let s = bound_status(VmStatus {
                vm: "a".into(),
                owed_units: hostile_units(n),
                guest_pins: vec!["\u{1}".repeat(100_000); 50],
                guest_version: Some("\u{10FFFD}".repeat(100_000)),
                credentials: vec![
                    CredentialStatus {
                        name: "c".into(),
                        ..Default::default()
                    };
                    3
                ],
                ..Default::default()
            });
            let Reply::Status(back) = round_trip(&Reply::Status(s.clone())) else {
                panic!("not a status line");
            };
            assert_eq!(back, s);
            let marker = s.owed_units.last().unwrap();
            assert_eq!(marker.unit, OMITTED, "n={n}");
            assert!(!marker.ok, "owed actions are failures");
            let kept = s.owed_units.len() - 1;
            assert!(
                marker
                    .error
                    .as_ref()
                    .unwrap()
                    .starts_with(&format!("{} more owed unit actions", n - kept)),
                "{marker:?}"
            );
        }
    }

    #[test]
    fn a_guests_owed_units_cannot_make_a_rotate_line_too_long() {
        for n in [1, 300, 1000] {
            let r = bound_rotate(RotateReport {
                vm: "a".into(),
                owed_units: hostile_units(n),
                units: hostile_units(n),
                error: Some("\u{1}".repeat(1 << 20)),
                ..Default::default()
            });
            let Reply::Rotate(back) = round_trip(&Reply::Rotate(r.clone())) else {
                panic!("not a rotate line");
            };
            assert_eq!(back, r);
            if n == 1 {
                // Small enough once the error is cut: nothing left out.
                assert_eq!(r.owed_units, hostile_units(1));
                continue;
            }
            assert_eq!(r.owed_units.last().unwrap().unit, OMITTED, "n={n}");
            assert_eq!(r.units.last().unwrap().unit, OMITTED, "n={n}");
        }
    }

    /// Status JSON schema 1 and rotate reports: states and outcomes are
    /// enums in the code but the same strings on the wire, byte for byte.
    #[test]
    fn states_and_outcomes_keep_their_wire_names() {
        let creds: Vec<CredentialStatus> = CredState::ALL
            .iter()
            .map(|s| CredentialStatus {
                name: s.as_str().to_uppercase(),
                boot: false,
                state: *s,
                error: None,
            })
            .collect();
        let status = VmStatus {
            vm: "a".into(),
            target: "cid:3".into(),
            credentials: creds,
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_string(&Reply::Status(status.clone())).unwrap(),
            concat!(
                r#"{"status":{"vm":"a","target":"cid:3","connected":false,"generation_sent":0,"#,
                r#""generation_applied":0,"last_error":null,"last_sync":null,"credentials":["#,
                r#"{"name":"APPLIED","boot":false,"state":"applied","error":null},"#,
                r#"{"name":"PENDING","boot":false,"state":"pending","error":null},"#,
                r#"{"name":"SOURCE-MISSING","boot":false,"state":"source-missing","error":null},"#,
                r#"{"name":"SOURCE-ERROR","boot":false,"state":"source-error","error":null},"#,
                r#"{"name":"ERROR","boot":false,"state":"error","error":null},"#,
                r#"{"name":"OMITTED","boot":false,"state":"omitted","error":null}],"#,
                r#""owed_units":[],"guest_version":null,"guest_pins":[],"key_refused":false,"#,
                r#""key_trust":"unknown","launch_key":"off"}}"#
            )
        );
        let back: Reply =
            serde_json::from_str(&serde_json::to_string(&Reply::Status(status.clone())).unwrap())
                .unwrap();
        assert_eq!(back, Reply::Status(status));
        let outcomes = [
            Outcome::Written,
            Outcome::Unchanged,
            Outcome::Removed,
            Outcome::Failed,
            Outcome::Omitted,
        ];
        for o in outcomes {
            let c = CredentialOutcome {
                name: "n".into(),
                outcome: o,
                error: None,
            };
            assert_eq!(
                serde_json::to_string(&c).unwrap(),
                format!(r#"{{"name":"n","outcome":"{}","error":null}}"#, o.as_str())
            );
        }
        assert!(serde_json::from_str::<CredentialStatus>(
            r#"{"name":"n","boot":false,"state":"bogus","error":null}"#
        )
        .is_err());
    }

    #[test]
    fn wire_shape_is_stable() {
        let line = |r: &Reply| serde_json::to_string(r).unwrap();
        assert_eq!(line(&Reply::Ok), r#""ok""#);
        assert_eq!(line(&Reply::Done { count: 3 }), r#"{"done":{"count":3}}"#);
        assert_eq!(line(&Reply::Busy("b".into())), r#"{"busy":"b"}"#);
        let req: Request = serde_json::from_str(r#"{"cmd":"status"}"#).unwrap();
        assert!(matches!(req, Request::Status { vms } if vms.is_empty()));
        let req: Request =
            serde_json::from_str(r#"{"cmd":"rotate","all":true,"timeout_ms":5}"#).unwrap();
        assert!(matches!(req, Request::Rotate { all: true, .. }));
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"status","x":1}"#).is_err());
    }
}
