//! The guest's own configuration (`/etc/vmcred/guest.toml`): which units to
//! restart or reload when a credential changes, and the file mode to write
//! it with. It holds no secrets and is strict about what it accepts, since a
//! typo here would otherwise silently leave a service on a stale value.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;
use vmcred_proto::rules::{validate_name, BOOTSTRAP_CREDENTIAL};

/// Mode of a credential file unless configured: systemd's own.
pub const DEFAULT_MODE: u32 = 0o400;
/// Longest unit name systemd accepts.
const MAX_UNIT_NAME: usize = 255;
/// The longest unit name plus credential name that systemd can ask the
/// credential socket for. `LoadCredential=NAME:/run/vmcred/creds.sock` makes
/// systemd bind its client socket to the abstract address
/// `@<random hex>/unit/<unit>/<NAME>` (src/core/exec-credential.c), and
/// `sockaddr_un_set_path` refuses (EINVAL) an address of more than 107
/// bytes, leaving room for its NUL in the 108 of `sun_path`. The hex is a
/// random 64-bit number, not zero-padded: up to 16 digits, and 16 in 15
/// starts out of 16. So 107 - 1 ("@") - 16 - 6 ("/unit/") - 1 ("/") = 83
/// bytes for the unit and the credential together; a longer pair would fail
/// the unit's start almost every time, with an error that names neither.
pub const MAX_SOCKET_UNIT_AND_NAME: usize = 83;

#[derive(Debug, Error)]
pub enum ConfigError {
    /// The cause is in the message, not a `source()` (printed once).
    #[error("cannot read config {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

/// Where a credential's value is delivered in the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Deliver {
    /// A file in the credentials directory (`/run/credentials/@system`);
    /// the credential socket, if mapped, serves it from there.
    #[default]
    File,
    /// Only through the credential socket: the agent keeps the value in
    /// memory and writes no file, so no process reads it from `@system`.
    Socket,
}

/// What to do when one credential changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialPolicy {
    pub restart_units: Vec<String>,
    pub reload_units: Vec<String>,
    pub mode: u32,
    /// Units that may take this credential's current value from the
    /// credential socket (`LoadCredential=NAME:/run/vmcred/creds.sock`).
    /// Any other unit asking for it is refused.
    pub socket_units: Vec<String>,
    pub deliver: Deliver,
}

impl Default for CredentialPolicy {
    fn default() -> Self {
        CredentialPolicy {
            restart_units: Vec::new(),
            reload_units: Vec::new(),
            mode: DEFAULT_MODE,
            socket_units: Vec::new(),
            deliver: Deliver::File,
        }
    }
}

/// The validated configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestConfig {
    pub initial_sync_timeout: Option<Duration>,
    /// Where the host key pins (`pins.json`) are kept, when not in the
    /// state directory: a directory on storage that survives a reboot of
    /// the guest, so that a key a rollover dropped stays dropped when the
    /// guest reboots inside the same hypervisor process (which hands it
    /// the same launch-time bootstrap pin again).
    pub pin_state_dir: Option<std::path::PathBuf>,
    pub credentials: BTreeMap<String, CredentialPolicy>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default, with = "humantime_serde")]
    initial_sync_timeout: Option<Duration>,
    pin_state_dir: Option<std::path::PathBuf>,
    #[serde(default)]
    credentials: BTreeMap<String, RawCredential>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredential {
    #[serde(default)]
    restart_units: Vec<String>,
    #[serde(default)]
    reload_units: Vec<String>,
    mode: Option<String>,
    #[serde(default)]
    socket_units: Vec<String>,
    #[serde(default)]
    deliver: Deliver,
}

impl GuestConfig {
    pub fn load(path: &Path) -> Result<GuestConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.display().to_string(),
            error,
        })?;
        GuestConfig::parse(&text).map_err(|message| ConfigError::Invalid {
            path: path.display().to_string(),
            message,
        })
    }

    pub fn parse(text: &str) -> Result<GuestConfig, String> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        if let Some(d) = &raw.pin_state_dir {
            if !d.is_absolute() {
                return Err(format!(
                    "pin_state_dir must be an absolute path, got {:?}",
                    d.display().to_string()
                ));
            }
        }
        let mut credentials = BTreeMap::new();
        for (name, c) in raw.credentials {
            let ctx = |e: String| format!("[credentials.{name:?}]: {e}");
            validate_name(&name).map_err(|e| ctx(e.to_string()))?;
            if name == BOOTSTRAP_CREDENTIAL {
                return Err(ctx(
                    "the bootstrap credential is not managed by vmcred-guest".into(),
                ));
            }
            if let Some(why) = crate::store::reserved_name(&name) {
                return Err(ctx(why.into()));
            }
            for unit in c
                .restart_units
                .iter()
                .chain(&c.reload_units)
                .chain(&c.socket_units)
            {
                validate_unit(unit).map_err(ctx)?;
            }
            for unit in &c.socket_units {
                check_socket_address(unit, &name).map_err(ctx)?;
            }
            if c.deliver == Deliver::Socket && c.socket_units.is_empty() {
                return Err(ctx(
                    "deliver = \"socket\" needs socket_units: no unit could read the value otherwise"
                        .into(),
                ));
            }
            let mode = match c.mode {
                Some(m) => parse_mode(&m).map_err(ctx)?,
                None => DEFAULT_MODE,
            };
            credentials.insert(
                name,
                CredentialPolicy {
                    restart_units: c.restart_units,
                    reload_units: c.reload_units,
                    mode,
                    socket_units: c.socket_units,
                    deliver: c.deliver,
                },
            );
        }
        Ok(GuestConfig {
            initial_sync_timeout: raw.initial_sync_timeout,
            pin_state_dir: raw.pin_state_dir,
            credentials,
        })
    }

    /// The policy for `name`; unconfigured credentials are written 0400
    /// and trigger no unit action.
    pub fn policy(&self, name: &str) -> CredentialPolicy {
        self.credentials.get(name).cloned().unwrap_or_default()
    }

    pub fn mode(&self, name: &str) -> u32 {
        self.credentials.get(name).map_or(DEFAULT_MODE, |c| c.mode)
    }

    /// How `name` is delivered; unconfigured credentials are files.
    pub fn deliver(&self, name: &str) -> Deliver {
        self.credentials
            .get(name)
            .map_or(Deliver::File, |c| c.deliver)
    }

    /// Whether `unit` may take `credential` from the credential socket.
    pub fn socket_allows(&self, credential: &str, unit: &str) -> bool {
        self.credentials
            .get(credential)
            .is_some_and(|c| c.socket_units.iter().any(|u| u == unit))
    }

    /// Whether any credential is mapped to a socket unit, i.e. whether the
    /// credential socket is served at all.
    pub fn serves_socket(&self) -> bool {
        self.credentials
            .values()
            .any(|c| !c.socket_units.is_empty())
    }
}

/// Parses an octal mode such as "0400" or "0440". Only read bits are
/// allowed (a credential is never writable or executable), and the owner
/// must be able to read it, as systemd expects.
pub fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    if digits.is_empty() || digits.len() > 4 || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b))
    {
        return Err(format!("mode {s:?} is not an octal mode such as \"0400\""));
    }
    let mode = u32::from_str_radix(digits, 8).map_err(|e| format!("mode {s:?}: {e}"))?;
    if mode & !0o444 != 0 {
        return Err(format!(
            "mode {s:?} grants more than read access; only bits within 0444 are allowed"
        ));
    }
    if mode & 0o400 == 0 {
        return Err(format!("mode {s:?} must let the owner read (include 0400)"));
    }
    Ok(mode)
}

/// Whether systemd can ask the credential socket for `credential` on
/// behalf of `unit` (see [`MAX_SOCKET_UNIT_AND_NAME`]).
fn check_socket_address(unit: &str, credential: &str) -> Result<(), String> {
    let total = unit.len() + credential.len();
    if total > MAX_SOCKET_UNIT_AND_NAME {
        return Err(format!(
            "socket_units: {:?} ({} bytes) with this credential name ({} bytes) is {total} bytes; systemd's address for asking the credential socket, \"@<up to 16 hex digits>/unit/<unit>/<credential>\", must fit in 107 bytes, which leaves {MAX_SOCKET_UNIT_AND_NAME} for the unit and the credential name together: shorten one of them, or deliver this credential as a file",
            vmcred_proto::rules::display_name(unit),
            unit.len(),
            credential.len(),
        ));
    }
    Ok(())
}

/// A unit name that can be passed to systemctl as one argument and never
/// be taken for an option.
pub fn validate_unit(unit: &str) -> Result<(), String> {
    let shown = vmcred_proto::rules::display_name(unit);
    if unit.is_empty() {
        return Err("a unit name is empty".into());
    }
    if unit.len() > MAX_UNIT_NAME {
        return Err(format!(
            "unit name {shown:?} is {} bytes long; the limit is {MAX_UNIT_NAME}",
            unit.len()
        ));
    }
    if unit.starts_with('-') {
        return Err(format!("unit name {shown:?} starts with '-'"));
    }
    if unit.contains('/') {
        return Err(format!("unit name {shown:?} contains '/'"));
    }
    if unit.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "unit name {shown:?} contains white space or control characters"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rendered as `main` renders it (`{e:#}` walks the source chain): the
    /// I/O cause appears exactly once.
    #[test]
    fn an_unreadable_config_names_its_cause_once() {
        let dir = tempfile::tempdir().unwrap();
        let err = GuestConfig::load(&dir.path().join("guest.toml")).unwrap_err();
        let shown = format!("{:#}", anyhow::Error::from(err));
        assert_eq!(shown.matches("os error 2").count(), 1, "{shown}");
        assert!(shown.starts_with("cannot read config "), "{shown}");
    }

    #[test]
    fn parses_the_readme_example() {
        let c = GuestConfig::parse(
            r#"
initial_sync_timeout = "30s"

[credentials.API_KEY]
restart_units = ["demo-consumer.service"]
reload_units = []
mode = "0400"

[credentials.SHARED]
reload_units = ["nginx.service"]
mode = "0440"
socket_units = ["api.service"]

[credentials.MEMORY]
socket_units = ["api.service"]
deliver = "socket"
"#,
        )
        .unwrap();
        assert_eq!(c.initial_sync_timeout, Some(Duration::from_secs(30)));
        assert_eq!(
            c.policy("API_KEY").restart_units,
            vec!["demo-consumer.service"]
        );
        assert_eq!(c.mode("SHARED"), 0o440);
        assert_eq!(c.mode("OTHER"), 0o400);
        assert_eq!(c.policy("OTHER"), CredentialPolicy::default());
        assert_eq!(GuestConfig::parse("").unwrap(), GuestConfig::default());
        assert!(c.serves_socket());
        assert!(c.socket_allows("SHARED", "api.service"));
        assert!(!c.socket_allows("SHARED", "nginx.service"));
        assert!(!c.socket_allows("API_KEY", "api.service"));
        assert!(!c.socket_allows("OTHER", "api.service"));
        assert!(!GuestConfig::default().serves_socket());
        assert_eq!(c.deliver("MEMORY"), Deliver::Socket);
        assert_eq!(c.deliver("SHARED"), Deliver::File);
        assert_eq!(c.deliver("OTHER"), Deliver::File);
    }

    #[test]
    fn refuses_unknown_keys() {
        for text in [
            "initial_sync_timout = \"3s\"",
            "[credentials.A]\nrestart_unit = [\"x.service\"]",
        ] {
            let err = GuestConfig::parse(text).unwrap_err();
            assert!(err.contains("unknown field"), "{err}");
        }
    }

    #[test]
    fn refuses_bad_names_units_and_modes() {
        let cases = [
            ("[credentials.\"a/b\"]", "'/'"),
            ("[credentials.\"vmcred.bootstrap\"]", "bootstrap"),
            ("[credentials.\".A.vmcred-tmp\"]", "reserved"),
            ("[credentials.A]\nrestart_units = [\"\"]", "empty"),
            ("[credentials.A]\nrestart_units = [\"a/b.service\"]", "'/'"),
            (
                "[credentials.A]\nreload_units = [\"a b.service\"]",
                "white space",
            ),
            ("[credentials.A]\nreload_units = [\"-x\"]", "'-'"),
            ("[credentials.A]\nsocket_units = [\"a/b.service\"]", "'/'"),
            ("[credentials.A]\nsocket_units = [\"\"]", "empty"),
            (
                "[credentials.A]\ndeliver = \"socket\"",
                "needs socket_units",
            ),
            ("[credentials.A]\ndeliver = \"both\"", "unknown variant"),
            ("[credentials.A]\nmode = \"0600\"", "0444"),
            ("[credentials.A]\nmode = \"0755\"", "0444"),
            ("[credentials.A]\nmode = \"0040\"", "owner"),
            ("[credentials.A]\nmode = \"rw\"", "octal"),
            ("[credentials.A]\nmode = \"\"", "octal"),
            ("initial_sync_timeout = \"soon\"", "initial_sync_timeout"),
        ];
        for (text, want) in cases {
            let err = GuestConfig::parse(text).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
        let long = format!("[credentials.A]\nrestart_units = [\"{}\"]", "u".repeat(256));
        assert!(GuestConfig::parse(&long).unwrap_err().contains("256 bytes"));
    }

    /// systemd binds `@<hex>/unit/<unit>/<credential>` (at most 107
    /// bytes): 83 bytes of unit and credential fit with a 16-digit hex, 84
    /// do not.
    #[test]
    fn socket_units_must_fit_systemds_socket_address() {
        let unit = format!("{}.service", "u".repeat(40)); // 48 bytes
        let fits = format!(
            "[credentials.{}]\nsocket_units = [\"{unit}\"]",
            "N".repeat(35)
        );
        GuestConfig::parse(&fits).expect("83 bytes fit");
        let address = format!("@{:x}/unit/{unit}/{}", u64::MAX, "N".repeat(35));
        assert_eq!(address.len(), 107);
        let too_long = format!(
            "[credentials.{}]\nsocket_units = [\"a.service\", \"{unit}\"]",
            "N".repeat(36)
        );
        let err = GuestConfig::parse(&too_long).unwrap_err();
        assert!(
            err.contains(&format!("{unit:?} (48 bytes)"))
                && err.contains("(36 bytes) is 84 bytes")
                && err.contains("107 bytes")
                && err.contains("leaves 83"),
            "{err}"
        );
        // Only units that ask over the socket: restart and reload units
        // are passed to systemctl, not through that address.
        let not_socket = format!(
            "[credentials.{}]\nrestart_units = [\"{unit}\"]",
            "N".repeat(200)
        );
        GuestConfig::parse(&not_socket).expect("no socket unit");
    }

    #[test]
    fn modes() {
        assert_eq!(parse_mode("0400"), Ok(0o400));
        assert_eq!(parse_mode("400"), Ok(0o400));
        assert_eq!(parse_mode("0o444"), Ok(0o444));
        assert!(parse_mode("01400").is_err());
        assert!(parse_mode("0").is_err());
    }

    #[test]
    fn load_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("guest.toml");
        std::fs::write(&p, "bogus = 1").unwrap();
        let err = GuestConfig::load(&p).unwrap_err().to_string();
        assert!(err.contains("guest.toml") && err.contains("bogus"), "{err}");
        let err = GuestConfig::load(&dir.path().join("nope.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope.toml"), "{err}");
    }
}
