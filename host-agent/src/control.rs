//! The local control protocol between `vmcred-host serve` and its
//! `rotate`, `status` and `launch` commands: one JSON request line, one JSON
//! reply line, over a Unix socket. Lines are bounded and reads time out, so
//! a stuck or hostile local client costs the daemon nothing lasting.
//!
//! Two sockets: `control_socket` (0600, and the peer must be root or the
//! daemon's own uid) takes `rotate` and `status`; `launch_socket` (0666)
//! takes only `launched`, which merely wakes a VM's dialer early and so is
//! safe to leave open to the hypervisor's user.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

/// Longest request or reply line.
pub const MAX_LINE: usize = 256 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status,
    Rotate {
        vm: String,
        #[serde(default)]
        credentials: Vec<String>,
        timeout_ms: u64,
    },
    Launched {
        vm: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
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
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CredentialStatus {
    pub name: String,
    pub boot: bool,
    /// `applied`, `pending`, `source-missing`, `source-error` (unreadable,
    /// not a regular file, timed out), `error` (the guest refused it).
    pub state: String,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CredentialOutcome {
    pub name: String,
    /// `written`, `unchanged`, `removed`, `failed`.
    pub outcome: String,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UnitOutcome {
    pub unit: String,
    pub action: String,
    pub ok: bool,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
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

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Status(Vec<VmStatus>),
    Rotate(RotateReport),
    Ok,
    Error(String),
}

#[derive(Debug, thiserror::Error)]
pub enum LineError {
    #[error("line longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("connection closed before a full line")]
    Closed,
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("malformed message: {0}")]
    Json(#[from] serde_json::Error),
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
        if buf.len() > MAX_LINE {
            return Err(LineError::TooLong);
        }
        if buf.last() != Some(&b'\n') {
            return Err(LineError::Closed);
        }
        Ok(serde_json::from_slice(&buf)?)
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
    let mut line = serde_json::to_vec(msg)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    w.flush().await?;
    Ok(())
}

/// Sends one request to a socket and reads the reply.
pub async fn call(
    socket: &std::path::Path,
    req: &Request,
    timeout: Duration,
) -> Result<Reply, String> {
    let mut s = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::UnixStream::connect(socket),
    )
    .await
    .map_err(|_| format!("connecting to {} timed out", socket.display()))?
    .map_err(|e| {
        format!(
            "cannot connect to {}: {e} (is `vmcred-host serve` running, and are you root?)",
            socket.display()
        )
    })?;
    write_line(&mut s, req).await.map_err(|e| e.to_string())?;
    read_line(&mut s, timeout)
        .await
        .map_err(|e| format!("no reply from {}: {e}", socket.display()))
}
