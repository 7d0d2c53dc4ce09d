//! Where the metrics go: `GET /metrics` over a local Unix socket
//! (`metrics_socket`; the unit has `IPAddressDeny=any`, so no TCP), and/or
//! a node-exporter textfile (`metrics_textfile`), rewritten atomically when
//! its content changed, at most once per `metrics_interval`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use tokio::net::UnixListener;
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

/// Answers `GET /metrics` on `listener` until the task is dropped. Each
/// connection has a deadline and a slot, so a stuck client costs nothing
/// lasting.
pub async fn serve_socket(listener: UnixListener, statuses: Statuses) {
    let slots = Arc::new(Semaphore::new(MAX_SCRAPES));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                debug!(error = %e, "metrics socket: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
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
            drop(permit);
        });
    }
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
