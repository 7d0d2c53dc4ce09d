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
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
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
const SCRAPES_PER_USER: usize = 1;
/// How long one more connection of a uid that has its share in progress
/// waits for it to finish before it is answered 503. Two scrapers under
/// one uid (a Prometheus HA pair through one local proxy user, an
/// operator's curl) that collide are then both served, the second a few
/// milliseconds late, instead of one recording `up = 0`; a uid's stuck
/// client still costs its own later scrapes no more than this each. Below
/// Prometheus's default `scrape_timeout` (10 s), so the 503 still arrives
/// within it. The waiting connection holds no slot (it takes one when its
/// uid's share is free), and a uid has at most one waiting: its further
/// connections are answered 503 and closed as soon as they are accepted,
/// so they queue nowhere.
const SHARE_WAIT: Duration = Duration::from_secs(5);

/// Answers `GET /metrics` on `listener` until the task is dropped. Each
/// connection has a deadline and a slot, and each uid but root at most
/// `SCRAPES_PER_USER` of the slots (and one connection waiting up to
/// `SHARE_WAIT` for its share), so a stuck or hostile client costs
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
                Admit::Now(scrape) => break (stream, scrape),
                Admit::Wait(waiter) => {
                    debug!(
                        uid = waiter.uid,
                        "metrics socket: a scrape waits for its uid's other one"
                    );
                    tokio::spawn(wait_then_serve(
                        stream,
                        waiter,
                        slots.clone(),
                        statuses.clone(),
                    ));
                }
                Admit::Refused(uid) => {
                    debug!(
                        uid,
                        "metrics socket: a uid over its share of scrapes; refused"
                    );
                    refuse(&stream, uid, Refusal::OneWaiting);
                }
            }
        };
        tokio::spawn(serve(stream, scrape, permit, statuses.clone()));
    }
}

/// One scrape, within `SCRAPE_DEADLINE`; gives its share and slot back.
async fn serve(
    stream: UnixStream,
    scrape: Scrape,
    permit: OwnedSemaphorePermit,
    statuses: Statuses,
) {
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
}

/// A connection over its uid's share: served when the share and then a
/// slot are free within `SHARE_WAIT`, else answered 503.
async fn wait_then_serve(
    stream: UnixStream,
    waiter: Waiter,
    slots: Arc<Semaphore>,
    statuses: Statuses,
) {
    let deadline = tokio::time::Instant::now() + SHARE_WAIT;
    let uid = waiter.uid;
    let Some(scrape) = waiter.wait(deadline).await else {
        refuse(&stream, uid, Refusal::Waited);
        return;
    };
    match tokio::time::timeout_at(deadline, slots.acquire_owned()).await {
        Ok(Ok(permit)) => serve(stream, scrape, permit, statuses).await,
        _ => refuse(&stream, uid, Refusal::Waited),
    }
}

/// Best effort and never waiting: the reason, then close (on drop).
fn refuse(stream: &UnixStream, uid: u32, why: Refusal) {
    let _ = stream.try_write(over_share(uid, why).as_bytes());
}

/// Scrapes in progress and waiting per uid (root is not counted).
#[derive(Default, Clone)]
struct Users(Arc<UsersInner>);

#[derive(Default)]
struct UsersInner {
    shares: Mutex<HashMap<u32, Share>>,
    /// Told whenever a scrape ends, for the waiting ones.
    freed: Notify,
}

/// One uid's scrapes; the entry goes when both are nought.
#[derive(Default)]
struct Share {
    in_progress: usize,
    waiting: bool,
}

impl UsersInner {
    fn shares(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Share>> {
        self.shares.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What a new connection gets.
enum Admit {
    /// Within its uid's share (or root's, or no one's in particular).
    Now(Scrape),
    /// Its uid has its share in progress; this one may wait for it.
    Wait(Waiter),
    /// Its uid has its share in progress and one more waiting.
    Refused(u32),
}

/// A uid's scrape in progress; counts down when dropped.
struct Scrape {
    uid: Option<u32>,
    users: Users,
}

/// A uid's one connection waiting for its share; clears the mark when
/// dropped unless it became a scrape.
struct Waiter {
    uid: u32,
    users: Users,
    admitted: bool,
}

impl Users {
    /// The share for the peer of `s`. A peer whose credentials cannot be
    /// read is served as no one in particular: the file mode already
    /// admitted it.
    fn admit(&self, s: &UnixStream) -> Admit {
        match s.peer_cred() {
            Ok(c) if c.uid() != 0 => self.admit_uid(c.uid()),
            _ => Admit::Now(Scrape {
                uid: None,
                users: self.clone(),
            }),
        }
    }

    fn admit_uid(&self, uid: u32) -> Admit {
        let mut shares = self.0.shares();
        let share = shares.entry(uid).or_default();
        if share.in_progress < SCRAPES_PER_USER {
            share.in_progress += 1;
            Admit::Now(Scrape {
                uid: Some(uid),
                users: self.clone(),
            })
        } else if !share.waiting {
            share.waiting = true;
            Admit::Wait(Waiter {
                uid,
                users: self.clone(),
                admitted: false,
            })
        } else {
            Admit::Refused(uid)
        }
    }
}

impl Waiter {
    /// Its uid's share, once a scrape of that uid has ended; `None` at
    /// `deadline`.
    async fn wait(mut self, deadline: tokio::time::Instant) -> Option<Scrape> {
        let users = self.users.clone();
        loop {
            // Registered before the check, so an end between the two is
            // not missed.
            let freed = users.0.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let mut shares = users.0.shares();
                let share = shares.entry(self.uid).or_default();
                if share.in_progress < SCRAPES_PER_USER {
                    share.in_progress += 1;
                    share.waiting = false;
                    self.admitted = true;
                    return Some(Scrape {
                        uid: Some(self.uid),
                        users: users.clone(),
                    });
                }
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return None;
            }
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if self.admitted {
            return;
        }
        let mut shares = self.users.0.shares();
        if let Some(s) = shares.get_mut(&self.uid) {
            s.waiting = false;
            if s.in_progress == 0 {
                shares.remove(&self.uid);
            }
        }
    }
}

impl Drop for Scrape {
    fn drop(&mut self) {
        let Some(uid) = self.uid else { return };
        {
            let mut shares = self.users.0.shares();
            if let Some(s) = shares.get_mut(&uid) {
                s.in_progress = s.in_progress.saturating_sub(1);
                if s.in_progress == 0 && !s.waiting {
                    shares.remove(&uid);
                }
            }
        }
        self.users.0.freed.notify_waiters();
    }
}

/// Why a connection over its uid's share was answered 503.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// The uid had its share in progress and one more connection waiting.
    OneWaiting,
    /// It waited `SHARE_WAIT` for its uid's share, or then a slot.
    Waited,
}

/// The whole answer to a connection over its uid's share.
fn over_share(uid: u32, why: Refusal) -> String {
    let body = match why {
        Refusal::OneWaiting => format!(
            "uid {uid} already has {SCRAPES_PER_USER} scrape in progress, the limit per user, \
             and another waiting for it; try again when they have finished\n"
        ),
        Refusal::Waited => format!(
            "uid {uid}'s scrape waited {SHARE_WAIT:?} for its other scrape in progress \
             ({SCRAPES_PER_USER} per user) and a free slot, in vain; try again\n"
        ),
    };
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
        for why in [Refusal::OneWaiting, Refusal::Waited] {
            let text = over_share(65534, why);
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
    }

    #[tokio::test(start_paused = true)]
    async fn one_connection_per_uid_waits_for_its_share_and_no_more() {
        let users = Users::default();
        let Admit::Now(first) = users.admit_uid(1000) else {
            panic!("the first scrape of a uid is served")
        };
        let Admit::Wait(waiter) = users.admit_uid(1000) else {
            panic!("the second one waits")
        };
        assert!(matches!(users.admit_uid(1000), Admit::Refused(1000)));
        assert!(matches!(users.admit_uid(2000), Admit::Now(_)));
        // Nothing ends within the wait: refused, and the mark is gone, so
        // the uid's next connection may wait in turn.
        let deadline = tokio::time::Instant::now() + SHARE_WAIT;
        assert!(waiter.wait(deadline).await.is_none());
        let Admit::Wait(waiter) = users.admit_uid(1000) else {
            panic!("a new connection waits once the last one gave up")
        };
        // The scrape in progress ends during the wait: the waiting one
        // takes its share.
        let deadline = tokio::time::Instant::now() + SHARE_WAIT;
        let waiting = tokio::spawn(waiter.wait(deadline));
        tokio::task::yield_now().await;
        drop(first);
        let second = waiting.await.unwrap().expect("served after the first");
        assert!(matches!(users.admit_uid(1000), Admit::Wait(_)));
        drop(second);
        // Nothing in progress or waiting leaves no entry behind (the
        // other uid's scrape above was dropped at once).
        assert!(users.0.shares().is_empty());
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
