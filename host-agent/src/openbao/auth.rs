//! Getting and keeping a token. The token comes from a file or a
//! `LoadCredential=` credential, re-read before every round of requests
//! so that a new file takes effect without a restart; AppRole (role id and
//! secret id, each from a file or credential) is the second way in, used
//! when no token is configured or the configured one was refused. A token
//! with a TTL is renewed at about 2/3 of it; when a renewal fails and
//! AppRole is configured, the agent logs in again.
//!
//! A 403 on one secret's read says nothing about the token: its policy may
//! just not cover that secret. The token is judged refused only on
//! evidence: every read of a round was refused and `lookup-self` is
//! refused too (see [`Auth::verdict`]). A token without the `default`
//! policy may not look itself up; it is kept, with its TTL unknown and
//! no renewal, and its reads decide.

use std::path::Path;
use std::time::{Duration, Instant};

use tracing::{info, warn};
use zeroize::Zeroizing;

use super::config::{SecretFile, Server};
use super::http::{Client, Method};
use super::reply;
use super::zbuf::ZBuf;
use super::Problem;

/// Largest token or id file read.
const MAX_SECRET_FILE: u64 = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    File,
    AppRole,
}

struct Current {
    token: Zeroizing<String>,
    origin: Origin,
    /// When to renew; `None` for a token without TTL or not renewable.
    renew_at: Option<Instant>,
    looked_up: bool,
    /// The token may call `lookup-self` (false after a 403 there, or an
    /// AppRole token without the `default` policy), so a 403 from it is
    /// evidence that the token itself is refused.
    self_lookup: bool,
}

/// Whether the current token is refused by the store, asked when every
/// read of a round got 403.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// `lookup-self` answered: the token is valid; the 403s are its policy.
    Valid,
    /// `lookup-self` was refused too: the token is revoked or expired.
    Refused,
    /// Cannot tell: the token may not look itself up, or the store did not
    /// answer the question.
    Unknown,
}

#[derive(Default)]
pub struct Auth {
    current: Option<Current>,
    /// The file token the store refused, until the file changes.
    refused_file_token: Option<Zeroizing<String>>,
}

fn read_secret_file(
    f: &SecretFile,
    credentials_dir: Option<&Path>,
) -> Result<Zeroizing<String>, Problem> {
    use std::io::Read;
    let path = match f {
        SecretFile::Path(p) => p.clone(),
        SecretFile::Credential(c) => credentials_dir
            .map(|d| d.join(c))
            .ok_or_else(|| Problem::Auth(format!("$CREDENTIALS_DIRECTORY is not set, but {f} is configured; add LoadCredential={c}:SOURCE to vmcred-host.service")))?,
    };
    // Sized before reading, so that the buffer does not move; a file that
    // grew meanwhile makes it grow through `ZBuf`, which wipes what it
    // leaves, as does the chunk read into on the stack.
    let mut buf = ZBuf::default();
    std::fs::File::open(&path)
        .and_then(|file| {
            let len = file.metadata()?.len().min(MAX_SECRET_FILE);
            buf = ZBuf::with_capacity(usize::try_from(len).unwrap_or(0));
            let mut r = file.take(MAX_SECRET_FILE);
            let mut chunk = Zeroizing::new([0u8; 1024]);
            loop {
                match r.read(&mut chunk[..]) {
                    Ok(0) => return Ok(()),
                    Ok(n) => buf.extend(&chunk[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        })
        .map_err(|e| Problem::Auth(format!("cannot read {f}: {e}")))?;
    let text = std::str::from_utf8(buf.as_ref())
        .map_err(|_| Problem::Auth(format!("{f} is not UTF-8")))?
        .trim();
    if text.is_empty() {
        return Err(Problem::Auth(format!("{f} is empty")));
    }
    let mut out = Zeroizing::new(String::with_capacity(text.len()));
    out.push_str(text);
    Ok(out)
}

/// Renewal at two thirds of the TTL. The TTL is the store's word, so it is
/// capped (ten years) and added with checked arithmetic: an absurd value
/// must not panic the watcher.
/// `GET auth/token/lookup-self` with `token`: its TTL, and whether the
/// store still takes it.
async fn lookup_self(client: &Client, token: &str) -> Result<super::http::Reply, String> {
    client
        .request(Method::Get, "/v1/auth/token/lookup-self", Some(token), None)
        .await
}

fn renew_at(ttl_secs: u64, renewable: bool) -> Option<Instant> {
    const MAX_TTL_SECS: u64 = 10 * 365 * 24 * 3600;
    if ttl_secs == 0 || !renewable {
        return None;
    }
    Instant::now().checked_add(Duration::from_secs(ttl_secs.min(MAX_TTL_SECS)) * 2 / 3)
}

impl Auth {
    /// When the current token is due for renewal, so the watcher wakes
    /// up for it even when polling is slower.
    pub fn renew_due(&self) -> Option<Instant> {
        self.current.as_ref().and_then(|c| c.renew_at)
    }

    /// The store refused the current token (HTTP 403): a file token is
    /// not used again until its file changes, an AppRole token is
    /// replaced by a new login.
    pub fn refused(&mut self) {
        if let Some(c) = self.current.take() {
            if c.origin == Origin::File {
                self.refused_file_token = Some(c.token);
            }
        }
    }

    /// Asked when every read of a round got 403: is the token itself
    /// refused? One `lookup-self`; a refused token is dropped (a file
    /// token until its file changes, an AppRole token for a new login).
    pub async fn verdict(&mut self, client: &Client) -> Verdict {
        let Some(c) = &self.current else {
            return Verdict::Unknown;
        };
        if !c.self_lookup {
            return Verdict::Unknown;
        }
        let r = match lookup_self(client, &c.token).await {
            Ok(r) => r,
            Err(_) => return Verdict::Unknown,
        };
        match r.status {
            200 => Verdict::Valid,
            403 => {
                warn!("openbao: the store refused the token (every read and auth/token/lookup-self got HTTP 403): revoked or expired");
                self.refused();
                Verdict::Refused
            }
            _ => Verdict::Unknown,
        }
    }

    /// A token to use now.
    pub async fn token(
        &mut self,
        client: &Client,
        server: &Server,
        credentials_dir: Option<&Path>,
    ) -> Result<Zeroizing<String>, Problem> {
        let mut file_problem = None;
        if let Some(src) = &server.token {
            match read_secret_file(src, credentials_dir) {
                Ok(t) if self.refused_file_token.as_ref() == Some(&t) => {
                    file_problem = Some(Problem::TokenRefused);
                }
                Ok(t) => {
                    self.refused_file_token = None;
                    let same = matches!(&self.current, Some(c) if c.origin == Origin::File && c.token == t);
                    if !same {
                        if self.current.is_some() {
                            info!("openbao: the token file changed; using the new token");
                        }
                        self.current = Some(Current {
                            token: t,
                            origin: Origin::File,
                            renew_at: None,
                            looked_up: false,
                            self_lookup: true,
                        });
                    }
                }
                Err(p) => file_problem = Some(p),
            }
        }
        if file_problem.is_some() {
            if matches!(&self.current, Some(c) if c.origin == Origin::File) {
                self.current = None;
            }
            if server.approle.is_none() {
                return Err(file_problem.unwrap_or(Problem::TokenRefused));
            }
        }
        if self.current.is_none() {
            self.login(client, server, credentials_dir).await?;
        }
        self.keep_fresh(client, server, credentials_dir).await?;
        self.current
            .as_ref()
            .map(|c| c.token.clone())
            .ok_or_else(|| Problem::Auth("no token".into()))
    }

    async fn login(
        &mut self,
        client: &Client,
        server: &Server,
        credentials_dir: Option<&Path>,
    ) -> Result<(), Problem> {
        let Some(ar) = &server.approle else {
            return Err(Problem::Auth(
                "no token: set token_file, token_credential or [openbao.approle]".into(),
            ));
        };
        let role_id = read_secret_file(&ar.role_id, credentials_dir)?;
        let secret_id = read_secret_file(&ar.secret_id, credentials_dir)?;
        /// Borrowed fields, written into a buffer that wipes what it
        /// leaves when it grows: no unwiped copy of the secret id is made
        /// while serialising, whatever the escapes.
        #[derive(serde::Serialize)]
        struct Login<'a> {
            role_id: &'a str,
            secret_id: &'a str,
        }
        let mut body = ZBuf::with_capacity(role_id.len() + secret_id.len() + 64);
        serde_json::to_writer(
            &mut body,
            &Login {
                role_id: role_id.as_str(),
                secret_id: secret_id.as_str(),
            },
        )
        .map_err(|e| Problem::Auth(e.to_string()))?;
        let r = client
            .request(
                Method::Post,
                &format!("/v1/auth/{}/login", ar.mount),
                None,
                Some(body.into_inner()),
            )
            .await
            .map_err(Problem::Unreachable)?;
        if r.status == 400 || r.status == 403 {
            return Err(Problem::Auth(format!(
                "AppRole login refused (HTTP {}): {} (role_id or secret_id wrong, expired or used up?)",
                r.status,
                reply::errors(&r.body)
            )));
        }
        if r.status != 200 {
            return Err(Problem::Http(r.status, reply::errors(&r.body)));
        }
        let a: reply::AuthReply = serde_json::from_slice(&r.body)
            .map_err(|_| Problem::Auth("the AppRole login reply is not understood".into()))?;
        let info = a
            .auth
            .ok_or_else(|| Problem::Auth("the AppRole login reply has no auth".into()))?;
        let token = info
            .client_token
            .ok_or_else(|| Problem::Auth("the AppRole login reply has no token".into()))?;
        let self_lookup = info
            .token_policies
            .iter()
            .any(|p| p == "default" || p == "root");
        info!(
            ttl_s = info.lease_duration,
            renewable = info.renewable,
            "openbao: logged in with AppRole"
        );
        if !self_lookup {
            warn!("openbao: the AppRole token has no `default` policy, so it may not renew itself (auth/token/renew-self) and a new login is made when its renewal fails; give the role the default policy (token_no_default_policy=false)");
        }
        self.current = Some(Current {
            token: token.0,
            origin: Origin::AppRole,
            renew_at: renew_at(info.lease_duration, info.renewable),
            looked_up: true,
            self_lookup,
        });
        Ok(())
    }

    /// Learns a new file token's TTL, and renews any token at 2/3 of its TTL.
    async fn keep_fresh(
        &mut self,
        client: &Client,
        server: &Server,
        credentials_dir: Option<&Path>,
    ) -> Result<(), Problem> {
        let Some(c) = &mut self.current else {
            return Ok(());
        };
        if !c.looked_up {
            let r = lookup_self(client, &c.token)
                .await
                .map_err(Problem::Unreachable)?;
            if r.status == 403 {
                // A token without the `default` policy gets 403 here
                // though it can read its secrets: not a refusal. Its TTL
                // is unknown, so it is not renewed; the reads decide.
                warn!("openbao: the token may not look itself up (HTTP 403 on auth/token/lookup-self; no `default` policy?): its TTL is unknown and it is not renewed; give it the default policy (lookup-self, renew-self) to have it renewed");
                c.self_lookup = false;
                c.looked_up = true;
                return Ok(());
            }
            if r.status == 200 {
                if let Ok(l) = serde_json::from_slice::<reply::LookupReply>(&r.body) {
                    c.renew_at = renew_at(l.data.ttl, l.data.renewable);
                }
            }
            c.looked_up = true;
        }
        let due = matches!(c.renew_at, Some(at) if Instant::now() >= at);
        if !due {
            return Ok(());
        }
        let r = client
            .request(
                Method::Post,
                "/v1/auth/token/renew-self",
                Some(&c.token),
                Some(Zeroizing::new(b"{}".to_vec())),
            )
            .await
            .map_err(Problem::Unreachable)?;
        let renewed = (r.status == 200)
            .then(|| serde_json::from_slice::<reply::AuthReply>(&r.body).ok())
            .flatten()
            .and_then(|a| a.auth);
        match renewed {
            Some(info) if info.lease_duration > 0 => {
                // Past its max TTL a token renews for less than asked; renew
                // again at 2/3 of what is left.
                c.renew_at = renew_at(info.lease_duration, info.renewable);
                info!(ttl_s = info.lease_duration, "openbao: token renewed");
                Ok(())
            }
            _ => {
                let origin = c.origin;
                c.renew_at = None;
                warn!(status = r.status, "openbao: token renewal failed");
                if server.approle.is_some() {
                    if origin == Origin::File {
                        self.refused();
                    } else {
                        self.current = None;
                    }
                    self.login(client, server, credentials_dir).await
                } else {
                    // The token works until it expires; then reads fail
                    // with permission denied and status says so.
                    Ok(())
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_absurd_ttl_does_not_panic() {
        assert!(super::renew_at(u64::MAX, true).is_some());
        assert!(super::renew_at(0, true).is_none());
        assert!(super::renew_at(60, false).is_none());
    }
}
