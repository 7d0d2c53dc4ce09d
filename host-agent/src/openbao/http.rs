//! A small HTTP/1.1 client for the store's API: one connection per
//! request (a poll every few seconds gains nothing from pooling, and a
//! fresh connection never carries a half-read reply into the next one),
//! TLS to the configured CA only, a deadline on the whole exchange and a
//! bound on the reply. Reply bodies are copied frame by frame into a
//! zeroizing buffer.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use zeroize::Zeroizing;

use super::config::Server;
use super::zbuf::ZBuf;

/// Largest reply read: a KV v2 secret of up to 1 MiB, JSON-escaped, plus
/// its metadata.
pub const MAX_REPLY: usize = 8 * 1024 * 1024;

pub struct Client {
    host: String,
    port: u16,
    authority: String,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    timeout: Duration,
}

pub struct Reply {
    pub status: u16,
    pub body: Zeroizing<Vec<u8>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
}

impl Client {
    pub fn new(server: &Server) -> Result<Client, String> {
        let tls = if server.https {
            let ca = server.ca_file.as_ref().ok_or("https needs ca_file")?;
            let mut roots = rustls::RootCertStore::empty();
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
                .map_err(|e| format!("cannot read ca_file {}: {e}", ca.display()))?
                .collect::<Result<_, _>>()
                .map_err(|e| format!("ca_file {}: {e}", ca.display()))?;
            if certs.is_empty() {
                return Err(format!("ca_file {} holds no certificate", ca.display()));
            }
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| format!("ca_file {}: {e}", ca.display()))?;
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let cfg = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth();
            let name = ServerName::try_from(
                server
                    .host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string(),
            )
            .map_err(|e| format!("address host {:?}: {e}", server.host))?;
            Some((tokio_rustls::TlsConnector::from(Arc::new(cfg)), name))
        } else {
            None
        };
        let authority = server
            .address
            .split_once("://")
            .map(|(_, a)| a.to_string())
            .unwrap_or_else(|| server.host.clone());
        Ok(Client {
            host: server
                .host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port: server.port,
            authority,
            tls,
            timeout: server.request_timeout,
        })
    }

    /// One request under the deadline. `Err` is a transport failure
    /// (unreachable, TLS, timeout, a reply too large); an HTTP error status
    /// is an `Ok` reply for the caller to judge.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Zeroizing<Vec<u8>>>,
    ) -> Result<Reply, String> {
        match tokio::time::timeout(self.timeout, self.exchange(method, path, token, body)).await {
            Ok(r) => r,
            Err(_) => Err(format!("no reply within {:?}", self.timeout)),
        }
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Zeroizing<Vec<u8>>>,
    ) -> Result<Reply, String> {
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            Some((connector, name)) => {
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| format!("TLS handshake failed: {e}"))?;
                self.send(TokioIo::new(tls), method, path, token, body)
                    .await
            }
            None => {
                self.send(TokioIo::new(tcp), method, path, token, body)
                    .await
            }
        }
    }

    async fn send<S>(
        &self,
        io: S,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Zeroizing<Vec<u8>>>,
    ) -> Result<Reply, String>
    where
        S: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(io)
            .await
            .map_err(|e| format!("HTTP handshake failed: {e}"))?;
        let conn = tokio::spawn(conn);
        let mut req = hyper::Request::builder()
            .method(match method {
                Method::Get => hyper::Method::GET,
                Method::Post => hyper::Method::POST,
            })
            .uri(path)
            .header(hyper::header::HOST, &self.authority);
        if let Some(t) = token {
            // Visible ASCII only, as `HeaderValue::from_str` would demand.
            if !t.bytes().all(|b| (32..127).contains(&b) || b == b'\t') {
                return Err("the token holds characters not allowed in a header".to_string());
            }
            // A `Bytes` that owns a zeroizing copy: the header value is
            // wiped when hyper drops the request (hyper's own write buffer,
            // which the head is encoded into, is not ours to wipe).
            let owned = Bytes::from_owner(Zeroizing::new(t.as_bytes().to_vec()));
            let mut v = hyper::header::HeaderValue::from_maybe_shared(owned)
                .map_err(|_| "the token holds characters not allowed in a header".to_string())?;
            v.set_sensitive(true);
            req = req.header("X-Vault-Token", v);
        }
        // The request body (AppRole ids) is handed to hyper as a `Bytes`
        // that owns the zeroizing buffer, not a copy of it: wiped when
        // hyper drops it.
        let body = body.map(Bytes::from_owner).unwrap_or_default();
        if !body.is_empty() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| format!("bad request: {e}"))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        let status = resp.status().as_u16();
        let mut incoming = resp.into_body();
        // Reserved up front where the length is known, so the buffer does
        // not move while it fills; a chunked reply (no length) grows it,
        // and `ZBuf` wipes each block it leaves.
        let hint = hyper::body::Body::size_hint(&incoming).lower();
        let mut out =
            ZBuf::with_capacity(usize::try_from(hint).unwrap_or(MAX_REPLY).min(MAX_REPLY));
        while let Some(frame) = incoming.frame().await {
            let frame = frame.map_err(|e| format!("reading the reply failed: {e}"))?;
            if let Some(data) = frame.data_ref() {
                if out.len() + data.len() > MAX_REPLY {
                    conn.abort();
                    return Err(format!("reply larger than {MAX_REPLY} bytes"));
                }
                out.extend(data);
            }
        }
        conn.abort();
        Ok(Reply {
            status,
            body: out.into_inner(),
        })
    }
}
