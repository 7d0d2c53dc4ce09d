//! Where the metrics go: `GET /metrics` over a local Unix socket
//! (`metrics_socket`; the unit has `IPAddressDeny=any`, so no TCP), and/or
//! a node-exporter textfile (`metrics_textfile`), rewritten atomically when
//! its content changed, at most once per `metrics_interval`.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::control::VmStatus;

/// The VM states to export, one per configured VM (the daemon's snapshot).
pub type Statuses = Arc<dyn Fn() -> Vec<VmStatus> + Send + Sync>;

/// The text format's content type.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Scrapes served at once; more wait for a slot.
const MAX_SCRAPES: usize = 4;
/// A scrape's whole exchange, request to response, must fit in this.
const SCRAPE_DEADLINE: Duration = Duration::from_secs(10);
/// Scrapes one uid other than root has in progress at once. A client that
/// connects and sends nothing holds its slot until `SCRAPE_DEADLINE`, and
/// the next connection is accepted only while a slot is free: without a
/// share per uid, one member of `control_group` holding every slot, with
/// more connections queued in the backlog, kept every other scraper out.
/// A uid's connections over its share are answered 503 and closed as
/// soon as they are accepted, so they queue nowhere.
const SCRAPES_PER_USER: usize = 1;

/// Answers `GET /metrics` on `listener` until the task is dropped. Each
/// connection has a deadline and a slot, and each uid but root at most
/// `SCRAPES_PER_USER` of the slots, so a stuck or hostile client costs
/// nothing lasting and keeps no one else out.
pub async fn serve_socket(listener: UnixListener, statuses: Statuses) {
    let slots = Arc::new(Semaphore::new(MAX_SCRAPES));
    let users = Users::default();
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        // The slot waits for a connection within its uid's share.
        let (stream, scrape) = loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    debug!(error = %e, "metrics socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            match users.admit(&stream) {
                Ok(scrape) => break (stream, scrape),
                Err(uid) => {
                    debug!(
                        uid,
                        "metrics socket: a uid over its share of scrapes; refused"
                    );
                    // Best effort and never waiting: the reason, then close.
                    let _ = stream.try_write(over_share(uid).as_bytes());
                }
            }
        };
        let statuses = statuses.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let statuses = statuses.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(&req, &statuses)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            match tokio::time::timeout(SCRAPE_DEADLINE, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(error = %e, "metrics socket: connection failed"),
                Err(_) => debug!("metrics socket: a client exceeded the deadline"),
            }
            drop(scrape);
            drop(permit);
        });
    }
}

/// Scrapes in progress per uid (root is not counted).
#[derive(Default, Clone)]
struct Users(Arc<Mutex<HashMap<u32, usize>>>);

/// A uid's scrape in progress; counts down when dropped.
struct Scrape {
    uid: Option<u32>,
    users: Users,
}

impl Users {
    /// A scrape for the peer of `s`, or its uid when it already has its
    /// share. A peer whose credentials cannot be read is served as no one
    /// in particular: the file mode already admitted it.
    fn admit(&self, s: &UnixStream) -> Result<Scrape, u32> {
        let uid = match s.peer_cred() {
            Ok(c) if c.uid() != 0 => Some(c.uid()),
            _ => None,
        };
        if let Some(uid) = uid {
            let mut users = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            let n = users.entry(uid).or_insert(0);
            if *n >= SCRAPES_PER_USER {
                return Err(uid);
            }
            *n += 1;
        }
        Ok(Scrape {
            uid,
            users: self.clone(),
        })
    }
}

impl Drop for Scrape {
    fn drop(&mut self) {
        let Some(uid) = self.uid else { return };
        let mut users = self.users.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = users.get_mut(&uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                users.remove(&uid);
            }
        }
    }
}

/// The whole answer to a connection over its uid's share.
fn over_share(uid: u32) -> String {
    let body = format!(
        "uid {uid} already has {SCRAPES_PER_USER} scrape in progress, the limit per user; \
         try again when it has finished\n"
    );
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    )
}

fn answer<B>(req: &http::Request<B>, statuses: &Statuses) -> http::Response<Full<Bytes>> {
    let reply = |code: http::StatusCode, body: String, ct: &str| {
        let mut r = http::Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = code;
        if let Ok(v) = http::HeaderValue::from_str(ct) {
            r.headers_mut().insert(http::header::CONTENT_TYPE, v);
        }
        r
    };
    if req.uri().path() != "/metrics" {
        return reply(
            http::StatusCode::NOT_FOUND,
            "only /metrics is served here\n".into(),
            "text/plain",
        );
    }
    if req.method() != http::Method::GET && req.method() != http::Method::HEAD {
        let mut r = reply(
            http::StatusCode::METHOD_NOT_ALLOWED,
            "use GET\n".into(),
            "text/plain",
        );
        r.headers_mut().insert(
            http::header::ALLOW,
            http::HeaderValue::from_static("GET, HEAD"),
        );
        return r;
    }
    let body = super::global().render(statuses());
    reply(http::StatusCode::OK, body, CONTENT_TYPE)
}

/// Rewrites `path` every `every` when the metrics changed, until the task
/// is dropped; the first write is at once. A failed write is logged once
/// per distinct error and tried again at the next tick.
pub async fn write_textfile(path: PathBuf, every: Duration, statuses: Statuses) {
    let mut last = String::new();
    let mut last_error: Option<String> = None;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let text = super::global().render(statuses());
        if text == last {
            continue;
        }
        let (p, t) = (path.clone(), text.clone());
        let written = tokio::task::spawn_blocking(move || write_atomically(&p, &t))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        match written {
            Ok(()) => {
                last = text;
                last_error = None;
            }
            Err(e) => {
                let e = e.to_string();
                if last_error.as_deref() != Some(e.as_str()) {
                    warn!(path = %path.display(), error = %e, "cannot write the metrics textfile; trying again at the next interval");
                    last_error = Some(e);
                }
            }
        }
    }
}

/// Writes `text` to a temporary file beside `path` (a name without the
/// `.prom` suffix, which node-exporter skips), then renames it over
/// `path`, so a reader sees the old file or the new one, never a part.
pub fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        // A leftover from a crash is removed; then the file must be new
        // (O_EXCL, O_NOFOLLOW): a link planted under this name in a
        // directory others can write is never followed or truncated.
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_data()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_over_share_answer_is_one_whole_http_response() {
        let text = over_share(65534);
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        assert!(
            body.contains("uid 65534") && body.contains("per user"),
            "{body}"
        );
    }

    #[test]
    fn textfile_is_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmcred.prom");
        write_atomically(&path, "a 1\n").unwrap();
        write_atomically(&path, "a 2\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "a 2\n");
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["vmcred.prom"], "no temporary file is left");
    }

    #[test]
    fn a_planted_link_at_the_temporary_name_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        let path = dir.path().join("vmcred.prom");
        let tmp = dir
            .path()
            .join(format!(".vmcred.prom.{}.tmp", std::process::id()));
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        write_atomically(&path, "a 1\n").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "a 1\n");
        std::fs::hard_link(&victim, &tmp).unwrap();
        write_atomically(&path, "a 2\n").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
    }

    #[test]
    fn a_missing_directory_is_an_error_naming_nothing_left_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no/such/dir/vmcred.prom");
        assert!(write_atomically(&path, "x").is_err());
    }
}
