//! The `vmcred.bootstrap` credential: the only thing a guest needs to trust
//! its host. It is public (a key pin and a port), so it can travel in SMBIOS
//! OEM strings and on a hypervisor command line. Only the VMM can set SMBIOS,
//! which is what makes the pin trustworthy.
//!
//! Format, one line, no commas (cloud-hypervisor's `oem_strings=[...]` splits
//! on them): `vmcred-bootstrap-v1 port=700 pin=sha256:<64 hex> host=vsock`.
//!
//! `host=` tells the guest how to recognise the real host before TLS (see
//! [`HostTransport`]). It is absent in bootstraps written before it existed;
//! those are read as `vsock`, the strict rule.

use crate::tls::Pin;
use thiserror::Error;

const MAGIC: &str = "vmcred-bootstrap-v1";
/// Largest bootstrap we read; a real one is about 110 bytes.
pub const MAX_BOOTSTRAP_BYTES: usize = 4096;

/// How the host side of this VM's vsock reaches the guest, which decides
/// what the guest can check about a connection before spending a TLS
/// handshake on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HostTransport {
    /// The host dials with `AF_VSOCK` (qemu vhost-vsock, crosvm, kvmtool,
    /// alioth). Any host user can open such a connection, so the host agent
    /// binds a privileged source port (< 1024, only root can) and the guest
    /// refuses every other source port.
    #[default]
    Vsock,
    /// Hybrid vsock (cloud-hypervisor, firecracker, vhost-device-vsock): the
    /// VMM picks the source port, and the permissions of the VMM's Unix
    /// socket on the host are the gate. The guest cannot tell host users
    /// apart, so it accepts any source port from CID 2.
    Hybrid,
}

impl HostTransport {
    /// The word used in the bootstrap.
    pub fn as_str(self) -> &'static str {
        match self {
            HostTransport::Vsock => "vsock",
            HostTransport::Hybrid => "hybrid",
        }
    }
}

/// What the guest learns at launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bootstrap {
    /// The vsock port the guest agent listens on.
    pub port: u32,
    /// SHA-256 of the host key's SubjectPublicKeyInfo.
    pub pin: Pin,
    /// Which admission rule applies to the host's connections.
    pub host: HostTransport,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BootstrapError {
    #[error("bootstrap is {0} bytes; a valid one is far below {MAX_BOOTSTRAP_BYTES}")]
    TooLarge(usize),
    #[error("bootstrap is not UTF-8")]
    NotUtf8,
    #[error(
        "bootstrap does not start with {MAGIC:?}; is this a vmcred bootstrap of a newer version?"
    )]
    BadMagic,
    #[error("bootstrap field {0:?} is not key=value")]
    BadField(String),
    #[error("bootstrap has an unknown field {0:?}")]
    UnknownField(String),
    #[error("bootstrap lacks the {0} field")]
    Missing(&'static str),
    #[error("bootstrap port {0:?} is not a number from 1 to 4294967294")]
    BadPort(String),
    #[error("bootstrap pin: {0}")]
    BadPin(String),
    #[error("bootstrap host transport {0:?} is neither \"vsock\" nor \"hybrid\"")]
    BadHost(String),
    #[error("bootstrap field {0:?} appears more than once")]
    Duplicate(&'static str),
}

impl Bootstrap {
    /// The credential value, as the guest will read it.
    pub fn encode(&self) -> String {
        format!(
            "{MAGIC} port={} pin={} host={}",
            self.port,
            self.pin,
            self.host.as_str()
        )
    }

    /// Parses a bootstrap, tolerating surrounding white space (a trailing
    /// newline from a file).
    pub fn parse(bytes: &[u8]) -> Result<Self, BootstrapError> {
        if bytes.len() > MAX_BOOTSTRAP_BYTES {
            return Err(BootstrapError::TooLarge(bytes.len()));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| BootstrapError::NotUtf8)?;
        let mut words = text.split_ascii_whitespace();
        if words.next() != Some(MAGIC) {
            return Err(BootstrapError::BadMagic);
        }
        let (mut port, mut pin, mut host) = (None, None, None);
        for word in words {
            let (k, v) = word
                .split_once('=')
                .ok_or_else(|| BootstrapError::BadField(crate::rules::display_name(word)))?;
            match k {
                "port" => {
                    let p: u32 = v
                        .parse()
                        .ok()
                        .filter(|p| *p != 0 && *p != u32::MAX)
                        .ok_or_else(|| BootstrapError::BadPort(crate::rules::display_name(v)))?;
                    set_once(&mut port, p, "port")?;
                }
                "pin" => {
                    let p = v
                        .parse::<Pin>()
                        .map_err(|e| BootstrapError::BadPin(e.to_string()))?;
                    set_once(&mut pin, p, "pin")?;
                }
                "host" => {
                    let h = match v {
                        "vsock" => HostTransport::Vsock,
                        "hybrid" => HostTransport::Hybrid,
                        _ => return Err(BootstrapError::BadHost(crate::rules::display_name(v))),
                    };
                    set_once(&mut host, h, "host")?;
                }
                _ => return Err(BootstrapError::UnknownField(crate::rules::display_name(k))),
            }
        }
        Ok(Bootstrap {
            port: port.ok_or(BootstrapError::Missing("port"))?,
            pin: pin.ok_or(BootstrapError::Missing("pin"))?,
            host: host.unwrap_or_default(),
        })
    }
}

/// A field given twice is refused rather than letting the last one win:
/// a bootstrap is written by one program and never needs it.
fn set_once<T>(slot: &mut Option<T>, value: T, field: &'static str) -> Result<(), BootstrapError> {
    if slot.is_some() {
        return Err(BootstrapError::Duplicate(field));
    }
    *slot = Some(value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Bootstrap {
        Bootstrap {
            port: 700,
            pin: Pin([7u8; 32]),
            host: HostTransport::Hybrid,
        }
    }

    #[test]
    fn round_trip() {
        let b = sample();
        let s = b.encode();
        assert!(!s.contains(','), "{s}");
        assert_eq!(Bootstrap::parse(s.as_bytes()), Ok(b));
        assert_eq!(Bootstrap::parse(format!("{s}\n").as_bytes()), Ok(b));
        let strict = Bootstrap {
            host: HostTransport::Vsock,
            ..b
        };
        assert_eq!(Bootstrap::parse(strict.encode().as_bytes()), Ok(strict));
    }

    #[test]
    fn without_host_field_the_strict_rule_applies() {
        let pin = sample().pin;
        let old = format!("{MAGIC} port=700 pin={pin}");
        assert_eq!(
            Bootstrap::parse(old.as_bytes()).map(|b| b.host),
            Ok(HostTransport::Vsock)
        );
    }

    #[test]
    fn refusals() {
        let pin = sample().pin.to_string();
        assert_eq!(Bootstrap::parse(b"nope"), Err(BootstrapError::BadMagic));
        assert_eq!(
            Bootstrap::parse(format!("{MAGIC} pin={pin}").as_bytes()),
            Err(BootstrapError::Missing("port"))
        );
        assert!(matches!(
            Bootstrap::parse(format!("{MAGIC} port=0 pin={pin}").as_bytes()),
            Err(BootstrapError::BadPort(_))
        ));
        assert!(matches!(
            Bootstrap::parse(format!("{MAGIC} port=700 pin=sha256:zz").as_bytes()),
            Err(BootstrapError::BadPin(_))
        ));
        assert!(matches!(
            Bootstrap::parse(format!("{MAGIC} port=700 pin={pin} x=1").as_bytes()),
            Err(BootstrapError::UnknownField(_))
        ));
        assert!(matches!(
            Bootstrap::parse(format!("{MAGIC} port=700 pin={pin} host=tcp").as_bytes()),
            Err(BootstrapError::BadHost(_))
        ));
        assert_eq!(
            Bootstrap::parse(format!("{MAGIC} port=700 port=701 pin={pin}").as_bytes()),
            Err(BootstrapError::Duplicate("port"))
        );
        assert_eq!(
            Bootstrap::parse(&vec![b' '; MAX_BOOTSTRAP_BYTES + 1]),
            Err(BootstrapError::TooLarge(MAX_BOOTSTRAP_BYTES + 1))
        );
    }
}
