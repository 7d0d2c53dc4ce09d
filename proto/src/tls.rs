//! TLS between the agents: TLS 1.3 only, the guest as TLS server, the host
//! as client presenting its own long-lived self-signed certificate.
//!
//! Trust runs one way on purpose. The guest accepts a host only if the
//! SHA-256 of the certificate's SubjectPublicKeyInfo equals the pin from its
//! SMBIOS bootstrap; no CA, no names, no expiry games. The host does not
//! authenticate the guest by certificate: it picks the VM by CID or socket
//! path, and only the guest's root can own the privileged port it dials, so
//! the guest's certificate is ephemeral and unchecked (its handshake
//! signature is still verified, so the session key is bound to it).

use std::fmt;
#[cfg(feature = "host")]
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
#[cfg(feature = "host")]
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{ring, CryptoProvider};
#[cfg(feature = "host")]
use rustls::pki_types::ServerName;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
#[cfg(feature = "guest")]
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
#[cfg(feature = "guest")]
use rustls::DistinguishedName;
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use thiserror::Error;
use zeroize::Zeroizing;

/// The server name the host uses in its ClientHello. Unchecked by design
/// (see the module doc); fixed so that it is not mistaken for meaning.
pub const SERVER_NAME: &str = "vmcred-guest";

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot generate a key: {0}")]
    Generate(String),
    #[error("host key file {path}: {why}")]
    KeyFile { path: String, why: String },
    #[error("TLS setup: {0}")]
    Setup(#[from] rustls::Error),
    #[error("certificate is not parseable X.509")]
    BadCertificate,
}

/// SHA-256 of a certificate's SubjectPublicKeyInfo: what a guest pins.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Pin(pub [u8; 32]);

impl Pin {
    /// The pin of the key in a DER certificate.
    pub fn of_certificate(cert: &[u8]) -> Result<Pin, TlsError> {
        // webpki re-wraps the SPKI contents in their SEQUENCE header; DER
        // has exactly one encoding of that header, so this is the same
        // byte string as the certificate carries (pinned by the
        // `pin_of_fixed_certificate_is_stable` test).
        let der = CertificateDer::from(cert);
        let parsed = webpki::EndEntityCert::try_from(&der).map_err(|_| TlsError::BadCertificate)?;
        Ok(Pin(Sha256::digest(
            parsed.subject_public_key_info().as_ref(),
        )
        .into()))
    }
}

impl fmt::Display for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Pin {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hexpart = s
            .strip_prefix("sha256:")
            .ok_or_else(|| "must start with \"sha256:\"".to_string())?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(hexpart, &mut out)
            .map_err(|_| "must be sha256: followed by 64 hex digits".to_string())?;
        Ok(Pin(out))
    }
}

/// A certificate and its private key. The key bytes live in a zeroizing
/// buffer and are never printed (no `Debug`).
pub struct Identity {
    cert: CertificateDer<'static>,
    key_pkcs8: Zeroizing<Vec<u8>>,
}

impl Identity {
    /// A fresh Ed25519 key in a self-signed certificate.
    ///
    /// Ed25519 rather than ECDSA P-256 because every connect signs once
    /// and verifies once on each side, and with ring on this machine an
    /// Ed25519 verification takes 66 µs against 87 µs, a signature 34
    /// against 29 µs: about 16 µs less per side and connect (see
    /// ARCHITECTURE.md, "Host cost per VM"). Host keys made before
    /// (P-256) still load and are still accepted: keys are loaded by
    /// type, and both agents verify either scheme. The pin is over the
    /// SubjectPublicKeyInfo whatever the key type.
    pub fn generate(name: &str) -> Result<Identity, TlsError> {
        Self::generate_for(name, &rcgen::PKCS_ED25519)
    }

    fn generate_for(
        name: &str,
        alg: &'static rcgen::SignatureAlgorithm,
    ) -> Result<Identity, TlsError> {
        let key =
            rcgen::KeyPair::generate_for(alg).map_err(|e| TlsError::Generate(e.to_string()))?;
        Ok(Identity {
            cert: self_signed(name, &key)?,
            key_pkcs8: Zeroizing::new(key.serialize_der()),
        })
    }

    /// A new self-signed certificate for an existing PKCS#8 key: the same
    /// SubjectPublicKeyInfo, so the same [`Pin`].
    #[cfg(feature = "host")]
    fn certify(name: &str, key_pkcs8: Zeroizing<Vec<u8>>) -> Result<Identity, TlsError> {
        let key = rcgen::KeyPair::try_from(key_pkcs8.as_slice())
            .map_err(|e| TlsError::Generate(format!("the host key is not usable: {e}")))?;
        Ok(Identity {
            cert: self_signed(name, &key)?,
            key_pkcs8,
        })
    }

    #[cfg(feature = "host")]
    /// Loads the host identity from `dir`, or creates it there on first
    /// start: `host.key` (0600), `host.crt` and `host.pin` (0644, public;
    /// `vmcred-host launch` runs as the hypervisor user and reads the pin).
    pub fn load_or_create(dir: &Path) -> Result<Identity, TlsError> {
        let key_path = dir.join("host.key");
        let cert_path = dir.join("host.crt");
        let err = |p: &Path, why: String| TlsError::KeyFile {
            path: p.display().to_string(),
            why,
        };
        let id = if key_path.exists() {
            let key = Zeroizing::new(
                std::fs::read(&key_path).map_err(|e| err(&key_path, e.to_string()))?,
            );
            let cert = match std::fs::read(&cert_path) {
                Ok(c) => c,
                // A start killed between the two writes of an earlier
                // version (key first), or a certificate removed by hand:
                // the key is what guests pin (its SPKI), so a new
                // self-signed certificate for it keeps the pin. Making a
                // new key instead would lock every guest out.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let id = Identity::certify("vmcred-host", key.clone())?;
                    write_file(&cert_path, id.cert.as_ref(), 0o644)
                        .map_err(|e| err(&cert_path, e))?;
                    tracing::warn!(
                        path = %cert_path.display(),
                        "the host certificate was missing; made a new one for the same key (same pin)"
                    );
                    id.cert.to_vec()
                }
                Err(e) => return Err(err(&cert_path, e.to_string())),
            };
            let mode = std::fs::metadata(&key_path)
                .map_err(|e| err(&key_path, e.to_string()))?
                .permissions();
            use std::os::unix::fs::PermissionsExt;
            if mode.mode() & 0o077 != 0 {
                return Err(err(
                    &key_path,
                    format!(
                        "mode {:04o} lets others read the host key; expected 0600",
                        mode.mode() & 0o7777
                    ),
                ));
            }
            let id = Identity {
                cert: CertificateDer::from(cert),
                key_pkcs8: key,
            };
            id.check_pair()
                .map_err(|e| err(&key_path, format!("does not match host.crt: {e}")))?;
            id
        } else {
            // The certificate first: the key's presence is what marks the
            // pair complete, so a start killed in between makes a new pair
            // next time (no pin was written, so no guest holds this one).
            let id = Identity::generate("vmcred-host")?;
            write_file(&cert_path, id.cert.as_ref(), 0o644).map_err(|e| err(&cert_path, e))?;
            write_file(&key_path, &id.key_pkcs8, 0o600).map_err(|e| err(&key_path, e))?;
            id
        };
        let pin_path = dir.join("host.pin");
        let pin = format!("{}\n", id.pin()?);
        if std::fs::read_to_string(&pin_path).ok().as_deref() != Some(pin.as_str()) {
            write_file(&pin_path, pin.as_bytes(), 0o644).map_err(|e| err(&pin_path, e))?;
        }
        Ok(id)
    }

    pub fn pin(&self) -> Result<Pin, TlsError> {
        Pin::of_certificate(self.cert.as_ref())
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_pkcs8.to_vec()))
    }

    #[cfg(feature = "host")]
    fn check_pair(&self) -> Result<(), TlsError> {
        let key = provider()
            .key_provider
            .load_private_key(self.key())
            .map_err(TlsError::Setup)?;
        rustls::sign::CertifiedKey::new(vec![self.cert.clone()], key)
            .keys_match()
            .map_err(TlsError::Setup)
    }
}

#[cfg(feature = "host")]
impl Identity {
    /// Loads a key pair from `key_path` (must be 0600) and `cert_path`,
    /// checking that they belong together. Used for the rollover's
    /// `host.next.*` and `host.prev.*` files.
    pub fn load_pair(key_path: &Path, cert_path: &Path) -> Result<Identity, TlsError> {
        use std::os::unix::fs::PermissionsExt;
        let err = |p: &Path, why: String| TlsError::KeyFile {
            path: p.display().to_string(),
            why,
        };
        let meta = std::fs::metadata(key_path).map_err(|e| err(key_path, e.to_string()))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(err(
                key_path,
                format!(
                    "mode {:04o} lets others read the host key; expected 0600",
                    meta.permissions().mode() & 0o7777
                ),
            ));
        }
        let key =
            Zeroizing::new(std::fs::read(key_path).map_err(|e| err(key_path, e.to_string()))?);
        let cert = std::fs::read(cert_path).map_err(|e| err(cert_path, e.to_string()))?;
        let id = Identity {
            cert: CertificateDer::from(cert),
            key_pkcs8: key,
        };
        id.check_pair().map_err(|e| {
            err(
                key_path,
                format!("does not match {}: {e}", cert_path.display()),
            )
        })?;
        Ok(id)
    }

    /// Writes the pair atomically, each file on its own: the certificate
    /// (0644), then the key (0600). A reader must not trust the pair until
    /// the caller has written its own completion marker.
    pub fn store_pair(&self, key_path: &Path, cert_path: &Path) -> Result<(), TlsError> {
        let err = |p: &Path, why: String| TlsError::KeyFile {
            path: p.display().to_string(),
            why,
        };
        write_file(cert_path, self.cert.as_ref(), 0o644).map_err(|e| err(cert_path, e))?;
        write_file(key_path, &self.key_pkcs8, 0o600).map_err(|e| err(key_path, e))
    }
}

/// The host keys a guest accepts. The guest's pin store implements it and
/// may change its answer between handshakes (a key rollover).
pub trait PinPolicy: Send + Sync + fmt::Debug {
    fn accepts(&self, pin: &Pin) -> bool;
}

#[cfg(feature = "guest")]
/// Like [`guest_server_config`], but accepting any host key `policy`
/// accepts at handshake time (the current pins, at most two during a
/// rollover).
pub fn guest_server_config_with(
    policy: Arc<dyn PinPolicy>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = provider();
    let own = Identity::generate(SERVER_NAME)?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(PinnedHostSet { policy, provider }))
        .with_single_cert(vec![own.cert.clone()], own.key())?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    // The host never resumes (see `host_client_config`): issuing tickets
    // would only cost the guest a session cache entry per connection.
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

#[cfg(feature = "guest")]
#[derive(Debug)]
struct PinnedHostSet {
    policy: Arc<dyn PinPolicy>,
    provider: Arc<CryptoProvider>,
}

#[cfg(feature = "guest")]
impl ClientCertVerifier for PinnedHostSet {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let pin = Pin::of_certificate(end_entity.as_ref()).map_err(|_| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        })?;
        if !self.policy.accepts(&pin) {
            tracing::warn!(presented = %pin, "refused a host whose key is not the pinned one (nor, in a rollover, the next)");
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("vmcred speaks TLS 1.3 only".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A self-signed certificate naming `name` for `key`: what both a new
/// identity and a re-certified host key carry.
fn self_signed(name: &str, key: &rcgen::KeyPair) -> Result<CertificateDer<'static>, TlsError> {
    let params = rcgen::CertificateParams::new(vec![name.to_string()])
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    let cert = params
        .self_signed(key)
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    Ok(cert.der().clone())
}

#[cfg(feature = "host")]
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), String> {
    crate::fsutil::write_atomic(path, bytes, mode).map_err(|e| format!("cannot write: {e}"))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

#[cfg(feature = "host")]
/// The host's client configuration: presents `id`, accepts any guest
/// certificate (see the module doc) but verifies its handshake signature.
pub fn host_client_config(id: &Identity) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = provider();
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyGuest { provider }))
        .with_client_auth_cert(vec![id.cert.clone()], id.key())?;
    // Every guest answers to the same server name, so a ticket from one
    // guest would be offered to the next, which cannot resume it: only
    // wasted bytes, hashing and a ticket cache per host. No resumption.
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

#[cfg(feature = "guest")]
/// The guest's server configuration: an ephemeral certificate of its own,
/// and a client verifier that accepts exactly the pinned host key.
pub fn guest_server_config(pin: Pin) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    guest_server_config_with(Arc::new(OnePin(pin)))
}

/// The policy of a guest that takes no part in key rollovers.
#[cfg(feature = "guest")]
#[derive(Debug)]
struct OnePin(Pin);

#[cfg(feature = "guest")]
impl PinPolicy for OnePin {
    fn accepts(&self, pin: &Pin) -> bool {
        *pin == self.0
    }
}

#[cfg(feature = "host")]
/// The server name to put in the ClientHello.
pub fn server_name() -> ServerName<'static> {
    ServerName::try_from(SERVER_NAME).unwrap_or_else(|_| unreachable_name())
}

#[cfg(feature = "host")]
#[cold]
fn unreachable_name() -> ServerName<'static> {
    // SERVER_NAME is a valid DNS name; this exists only to avoid a panic path.
    ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into())
}

#[cfg(feature = "host")]
#[derive(Debug)]
struct AnyGuest {
    provider: Arc<CryptoProvider>,
}

#[cfg(feature = "host")]
impl ServerCertVerifier for AnyGuest {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("vmcred speaks TLS 1.3 only".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(feature = "host", feature = "guest"))]
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[cfg(all(feature = "host", feature = "guest"))]
    async fn handshake(host: &Identity, pin: Pin) -> Result<Vec<u8>, String> {
        let (a, b) = tokio::io::duplex(1 << 16);
        let acceptor = tokio_rustls::TlsAcceptor::from(guest_server_config(pin).unwrap());
        let connector = tokio_rustls::TlsConnector::from(host_client_config(host).unwrap());
        let server = tokio::spawn(async move {
            let mut s = acceptor.accept(b).await.map_err(|e| e.to_string())?;
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(buf.to_vec())
        });
        let client = async {
            let mut c = connector
                .connect(server_name(), a)
                .await
                .map_err(|e| e.to_string())?;
            c.write_all(b"hello").await.map_err(|e| e.to_string())?;
            c.flush().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(c)
        };
        let _c = client.await;
        server.await.map_err(|e| e.to_string())?
    }

    #[cfg(all(feature = "host", feature = "guest"))]
    #[tokio::test]
    async fn pinned_host_is_accepted_and_others_refused() {
        let host = Identity::generate("vmcred-host").unwrap();
        let other = Identity::generate("vmcred-host").unwrap();
        assert_eq!(
            handshake(&host, host.pin().unwrap()).await.unwrap(),
            b"hello"
        );
        let err = handshake(&other, host.pin().unwrap()).await.unwrap_err();
        assert!(!err.is_empty());
    }

    #[cfg(feature = "guest")]
    #[test]
    fn the_guest_issues_no_session_tickets() {
        let host = Identity::generate("vmcred-host").unwrap();
        let cfg = guest_server_config(host.pin().unwrap()).unwrap();
        assert_eq!(cfg.send_tls13_tickets, 0);
    }

    /// The pin of a fixed certificate, as the x509-parser-based code
    /// computed it (and `openssl x509 -pubkey | openssl pkey -pubin
    /// -outform der | sha256sum` agrees): SHA-256 over the whole DER
    /// SubjectPublicKeyInfo, SEQUENCE header included. Any change to how
    /// the pin is computed must keep this byte-identical, or every
    /// deployed guest refuses its host.
    #[test]
    fn pin_of_fixed_certificate_is_stable() {
        let cert = include_bytes!("../testdata/host-cert.der");
        let want = include_str!("../testdata/host-cert.pin").trim();
        assert_eq!(Pin::of_certificate(cert).unwrap().to_string(), want);
    }

    #[test]
    fn pin_of_garbage_is_an_error() {
        let cert = include_bytes!("../testdata/host-cert.der");
        assert!(Pin::of_certificate(b"").is_err());
        assert!(Pin::of_certificate(&cert[..cert.len() - 1]).is_err());
        // x509-parser ignored trailing bytes; webpki refuses them.
        let mut trailing = cert.to_vec();
        trailing.push(0);
        assert!(Pin::of_certificate(&trailing).is_err());
    }

    #[derive(Debug)]
    struct Pins(std::sync::Mutex<Vec<Pin>>);
    impl PinPolicy for Pins {
        fn accepts(&self, pin: &Pin) -> bool {
            self.0.lock().unwrap().contains(pin)
        }
    }

    #[cfg(all(feature = "host", feature = "guest"))]
    async fn handshake_with(host: &Identity, policy: Arc<Pins>) -> Result<Vec<u8>, String> {
        let (a, b) = tokio::io::duplex(1 << 16);
        let acceptor = tokio_rustls::TlsAcceptor::from(guest_server_config_with(policy).unwrap());
        let connector = tokio_rustls::TlsConnector::from(host_client_config(host).unwrap());
        let server = tokio::spawn(async move {
            let mut s = acceptor.accept(b).await.map_err(|e| e.to_string())?;
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(buf.to_vec())
        });
        // Kept open until the server is done: it writes session tickets.
        let _client = match connector.connect(server_name(), a).await {
            Ok(mut c) => {
                let _ = c.write_all(b"hello").await;
                let _ = c.flush().await;
                Some(c)
            }
            Err(_) => None,
        };
        server.await.map_err(|e| e.to_string())?
    }

    #[cfg(all(feature = "host", feature = "guest"))]
    #[tokio::test]
    async fn a_pin_set_accepts_each_member_and_follows_changes() {
        let old = Identity::generate("vmcred-host").unwrap();
        let next = Identity::generate("vmcred-host").unwrap();
        let other = Identity::generate("vmcred-host").unwrap();
        let pins = Arc::new(Pins(std::sync::Mutex::new(vec![
            old.pin().unwrap(),
            next.pin().unwrap(),
        ])));
        assert!(handshake_with(&old, pins.clone()).await.is_ok());
        assert!(handshake_with(&next, pins.clone()).await.is_ok());
        assert!(handshake_with(&other, pins.clone()).await.is_err());
        // The same config refuses a key dropped from the set since.
        pins.0.lock().unwrap().remove(0);
        assert!(handshake_with(&old, pins.clone()).await.is_err());
        assert!(handshake_with(&next, pins).await.is_ok());
    }

    #[cfg(feature = "host")]
    #[test]
    fn a_stored_pair_loads_back_and_a_mismatch_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (k, c) = (dir.path().join("n.key"), dir.path().join("n.crt"));
        let id = Identity::generate("vmcred-host").unwrap();
        id.store_pair(&k, &c).unwrap();
        assert_eq!(
            Identity::load_pair(&k, &c).unwrap().pin().unwrap(),
            id.pin().unwrap()
        );
        let other = Identity::generate("vmcred-host").unwrap();
        other
            .store_pair(&dir.path().join("o.key"), &dir.path().join("o.crt"))
            .unwrap();
        let err = Identity::load_pair(&k, &dir.path().join("o.crt"))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("does not match"), "{err}");
    }

    /// What the agents make now is Ed25519; what they made before was
    /// ECDSA P-256.
    #[cfg(feature = "host")]
    fn key_algorithm(id: &Identity) -> rustls::SignatureAlgorithm {
        provider()
            .key_provider
            .load_private_key(id.key())
            .unwrap()
            .algorithm()
    }

    #[cfg(feature = "host")]
    #[test]
    fn new_identities_are_ed25519() {
        let id = Identity::generate("vmcred-host").unwrap();
        assert_eq!(key_algorithm(&id), rustls::SignatureAlgorithm::ED25519);
    }

    /// A host state directory from before Ed25519 holds a P-256 key: it
    /// loads unchanged (same pin) and a guest that pins it accepts it.
    #[cfg(all(feature = "host", feature = "guest"))]
    #[tokio::test]
    async fn a_p256_host_key_on_disk_still_loads_and_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let old = Identity::generate_for("vmcred-host", &rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        assert_eq!(key_algorithm(&old), rustls::SignatureAlgorithm::ECDSA);
        old.store_pair(&dir.path().join("host.key"), &dir.path().join("host.crt"))
            .unwrap();
        let loaded = Identity::load_or_create(dir.path()).unwrap();
        assert_eq!(loaded.pin().unwrap(), old.pin().unwrap());
        assert_eq!(key_algorithm(&loaded), rustls::SignatureAlgorithm::ECDSA);
        assert_eq!(
            handshake(&loaded, old.pin().unwrap()).await.unwrap(),
            b"hello"
        );
        // And a P-256 key is refused when it is not the pinned one.
        let pinned = Identity::generate("vmcred-host").unwrap();
        assert!(handshake(&loaded, pinned.pin().unwrap()).await.is_err());
    }

    #[test]
    fn pin_text_round_trip_and_errors() {
        let p = Pin([0xab; 32]);
        assert_eq!(p.to_string().parse::<Pin>(), Ok(p));
        assert!("abc".parse::<Pin>().is_err());
        assert!("sha256:00".parse::<Pin>().is_err());
    }

    #[cfg(feature = "host")]
    #[test]
    fn identity_persists_with_private_key_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let a = Identity::load_or_create(dir.path()).unwrap();
        let b = Identity::load_or_create(dir.path()).unwrap();
        assert_eq!(a.pin().unwrap(), b.pin().unwrap());
        let mode = std::fs::metadata(dir.path().join("host.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let pin = std::fs::read_to_string(dir.path().join("host.pin")).unwrap();
        assert_eq!(pin.trim(), a.pin().unwrap().to_string());
        std::fs::set_permissions(
            dir.path().join("host.key"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let err = Identity::load_or_create(dir.path())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("0644"), "{err}");
    }
}
