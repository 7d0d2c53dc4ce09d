//! The `[openbao]` table and a credential's `openbao = { ... }` source,
//! validated at load like the rest of the config. Nothing secret lives
//! here: the token and the AppRole ids are named by file or by
//! `LoadCredential=` name and read only when used.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use vmcred_proto::rules;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    address: String,
    ca_file: Option<PathBuf>,
    token_file: Option<PathBuf>,
    token_credential: Option<String>,
    approle: Option<RawAppRole>,
    #[serde(default = "default_poll", with = "humantime_serde")]
    poll_interval: Duration,
    #[serde(default = "default_timeout", with = "humantime_serde")]
    request_timeout: Duration,
    /// Plain `http://` to a loopback address. Unsafe where other users
    /// log in: while the store is down, any of them can listen on its port
    /// (above 1023, anyone may bind it), receive the token and answer with
    /// values of their own.
    #[serde(default)]
    insecure_loopback_http: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAppRole {
    #[serde(default = "default_approle_mount")]
    mount: String,
    role_id_file: Option<PathBuf>,
    role_id_credential: Option<String>,
    secret_id_file: Option<PathBuf>,
    secret_id_credential: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSecret {
    #[serde(default = "default_kv_mount")]
    mount: String,
    path: String,
    field: String,
    #[serde(default)]
    on_delete: OnDelete,
}

fn default_poll() -> Duration {
    Duration::from_secs(30)
}
fn default_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_approle_mount() -> String {
    "approle".into()
}
fn default_kv_mount() -> String {
    "secret".into()
}

/// What a deleted or destroyed secret (or its current version) does to
/// the guest's copy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDelete {
    /// The guest keeps the last value it was given; `status` says why.
    #[default]
    Keep,
    /// The credential is removed from the guest.
    Remove,
}

/// Where one small secret (a token, a role or secret id) is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretFile {
    Path(PathBuf),
    /// A name in the agent's `$CREDENTIALS_DIRECTORY`.
    Credential(String),
}

impl std::fmt::Display for SecretFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretFile::Path(p) => write!(f, "{}", p.display()),
            SecretFile::Credential(c) => write!(f, "$CREDENTIALS_DIRECTORY/{c}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppRole {
    pub mount: String,
    pub role_id: SecretFile,
    pub secret_id: SecretFile,
}

/// The validated `[openbao]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// `scheme://host:port`, no path.
    pub address: String,
    pub https: bool,
    pub host: String,
    pub port: u16,
    pub ca_file: Option<PathBuf>,
    pub token: Option<SecretFile>,
    pub approle: Option<AppRole>,
    /// Zero: the store is read only at start, on `rotate` and on SIGHUP.
    pub poll_interval: Duration,
    pub request_timeout: Duration,
}

/// One credential's place in the store.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SecretRef {
    pub mount: String,
    pub path: String,
    pub field: String,
    pub on_delete: OnDelete,
}

impl SecretRef {
    /// The secret (mount and path), shared by every field read from it.
    pub fn key(&self) -> SecretKey {
        SecretKey {
            mount: self.mount.clone(),
            path: self.path.clone(),
        }
    }

    pub fn validate(raw: RawSecret) -> Result<SecretRef, String> {
        validate_segments("mount", &raw.mount)?;
        validate_segments("path", &raw.path)?;
        if raw.field.is_empty() || raw.field.len() > 256 {
            return Err("field must be 1-256 bytes".into());
        }
        if raw.field.chars().any(char::is_control) {
            return Err("field must not contain control characters".into());
        }
        Ok(SecretRef {
            mount: raw.mount,
            path: raw.path,
            field: raw.field,
            on_delete: raw.on_delete,
        })
    }
}

impl std::fmt::Display for SecretRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "openbao:{}/{}#{}", self.mount, self.path, self.field)
    }
}

/// A KV v2 secret: what the version watch polls.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SecretKey {
    pub mount: String,
    pub path: String,
}

impl std::fmt::Display for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.mount, self.path)
    }
}

/// Mounts and paths go into request URLs: only characters that need no
/// escaping, no empty, `.` or `..` segment, so a path cannot step into
/// another mount's API.
fn validate_segments(what: &str, s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 512 {
        return Err(format!("{what} must be 1-512 characters"));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.@+=/".contains(&b))
    {
        return Err(format!(
            "{what} {s:?} may only hold A-Z a-z 0-9 - _ . @ + = and /"
        ));
    }
    if s.split('/')
        .any(|seg| seg.is_empty() || seg == "." || seg == "..")
    {
        return Err(format!(
            "{what} {s:?} has an empty, '.' or '..' segment (no leading, trailing or doubled '/')"
        ));
    }
    Ok(())
}

fn secret_file(
    what: &str,
    file: Option<PathBuf>,
    cred: Option<String>,
) -> Result<Option<SecretFile>, String> {
    match (file, cred) {
        (None, None) => Ok(None),
        (Some(p), None) if p.is_absolute() => Ok(Some(SecretFile::Path(p))),
        (Some(p), None) => Err(format!(
            "{what}_file must be an absolute path, got {}",
            p.display()
        )),
        (None, Some(c)) => {
            rules::validate_name(&c).map_err(|e| format!("{what}_credential: {e}"))?;
            Ok(Some(SecretFile::Credential(c)))
        }
        (Some(_), Some(_)) => Err(format!("set {what}_file or {what}_credential, not both")),
    }
}

fn is_loopback(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<std::net::IpAddr>()
        .map(|ip| ip.is_loopback())
        .unwrap_or(false)
}

impl Server {
    pub fn validate(raw: RawServer) -> Result<Server, String> {
        let uri: http::Uri = raw
            .address
            .parse()
            .map_err(|e| format!("address {:?} is not a URL: {e}", raw.address))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(format!(
                    "address {:?} must start with https:// (or http:// on loopback with \
                     insecure_loopback_http = true)",
                    raw.address
                ))
            }
        };
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(format!(
                "address {:?} must be scheme://host:port, without a path",
                raw.address
            ));
        }
        let auth = uri
            .authority()
            .ok_or_else(|| format!("address {:?} has no host", raw.address))?;
        if auth.as_str().contains('@') {
            return Err("address must not carry user information".into());
        }
        let host = auth.host().to_string();
        let port = auth.port_u16().unwrap_or(if https { 443 } else { 80 });
        if !https && !is_loopback(&host) {
            return Err(format!(
                "address {:?}: plain http is allowed only on loopback; use https:// and set ca_file",
                raw.address
            ));
        }
        if !https && !raw.insecure_loopback_http {
            return Err(format!(
                "address {:?}: plain http, even on loopback, lets any local user who binds that \
                 port while the store is down receive the token and serve values of their own; \
                 use https:// with ca_file (`bao server -dev-tls` makes both), or set \
                 insecure_loopback_http = true on a host where no untrusted user logs in",
                raw.address
            ));
        }
        if https && raw.insecure_loopback_http {
            return Err(
                "insecure_loopback_http applies only to an http:// address; remove it".into(),
            );
        }
        if let Some(ca) = &raw.ca_file {
            if !ca.is_absolute() {
                return Err(format!(
                    "ca_file must be an absolute path, got {}",
                    ca.display()
                ));
            }
        }
        if https && raw.ca_file.is_none() {
            return Err(
                "ca_file is required with https://: vmcred trusts only the CA you name for the store"
                    .into(),
            );
        }
        let token = secret_file("token", raw.token_file, raw.token_credential)?;
        let approle = match raw.approle {
            None => None,
            Some(a) => {
                validate_segments("approle.mount", &a.mount)?;
                let role_id = secret_file("approle.role_id", a.role_id_file, a.role_id_credential)?
                    .ok_or("approle needs role_id_file or role_id_credential")?;
                let secret_id = secret_file(
                    "approle.secret_id",
                    a.secret_id_file,
                    a.secret_id_credential,
                )?
                .ok_or("approle needs secret_id_file or secret_id_credential")?;
                Some(AppRole {
                    mount: a.mount,
                    role_id,
                    secret_id,
                })
            }
        };
        if token.is_none() && approle.is_none() {
            return Err("set how to log in: token_file, token_credential, or an [openbao.approle] table (the token is never put in the config)".into());
        }
        Ok(Server {
            address: format!("{}://{}", if https { "https" } else { "http" }, auth),
            https,
            host,
            port,
            ca_file: raw.ca_file,
            token,
            approle,
            poll_interval: raw.poll_interval,
            request_timeout: raw.request_timeout.max(Duration::from_millis(100)),
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, Source};
    use std::path::Path;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(Path::new("/t/host.toml"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn openbao_source_parses() {
        let c = parse(
            r#"
            [openbao]
            address = "https://bao.example:8200"
            ca_file = "/etc/ssl/bao.pem"
            token_credential = "bao-token"
            poll_interval = "15s"
            [openbao.approle]
            role_id_file = "/run/keys/role-id"
            secret_id_credential = "bao-secret-id"
            [vms.a]
            cid = 3
            [vms.a.credentials.DB]
            openbao = { mount = "kv", path = "apps/db", field = "password", on_delete = "remove" }
            "#,
        )
        .unwrap();
        let s = c.openbao.unwrap();
        assert_eq!(s.host, "bao.example");
        assert_eq!(s.port, 8200);
        assert!(s.https);
        assert_eq!(s.approle.unwrap().mount, "approle");
        match &c.vms["a"].credentials["DB"].source {
            Source::OpenBao(r) => {
                assert_eq!(r.to_string(), "openbao:kv/apps/db#password");
                assert_eq!(r.on_delete, super::OnDelete::Remove);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn plain_http_only_on_loopback_and_only_when_asked_for() {
        for (addr, ok) in [
            ("http://127.0.0.1:8200", true),
            ("http://127.8.9.10:8200", true),
            ("http://[::1]:8200", true),
            ("http://localhost:8200", true),
            ("http://localhost.evil.example:8200", false),
            ("http://10.0.0.1:8200", false),
            ("http://[::ffff:10.0.0.1]:8200", false),
            ("http://bao.example:8200", false),
            ("ftp://127.0.0.1", false),
            ("http://user@127.0.0.1:8200", false),
        ] {
            let text = format!(
                "[openbao]\naddress = \"{addr}\"\ntoken_file = \"/t\"\ninsecure_loopback_http = true\n"
            );
            assert_eq!(parse(&text).is_ok(), ok, "{addr}: {:?}", parse(&text).err());
            // Without the opt-in, never.
            let text = format!("[openbao]\naddress = \"{addr}\"\ntoken_file = \"/t\"\n");
            let err = parse(&text).unwrap_err();
            if ok {
                assert!(
                    err.contains("insecure_loopback_http = true") && err.contains("-dev-tls"),
                    "{addr}: {err}"
                );
            }
        }
        let https = "[openbao]\naddress = \"https://127.0.0.1:8200\"\nca_file = \"/ca\"\ntoken_file = \"/t\"\n";
        parse(https).unwrap();
        let err = parse(&format!("{https}insecure_loopback_http = true\n")).unwrap_err();
        assert!(err.contains("only to an http://"), "{err}");
    }

    #[test]
    fn openbao_refusals_are_clear() {
        let server = "[openbao]\naddress = \"http://127.0.0.1:8200\"\ntoken_file = \"/t\"\ninsecure_loopback_http = true\n";
        let cred = "[vms.a]\ncid = 3\n[vms.a.credentials.X]\n";
        let cases = [
            (format!("{cred}openbao = {{ path = \"a\", field = \"f\" }}"), "no [openbao] table"),
            ("[openbao]\naddress = \"http://10.0.0.1:8200\"\ntoken_file = \"/t\"".into(), "only on loopback"),
            ("[openbao]\naddress = \"https://bao:8200\"\ntoken_file = \"/t\"".into(), "ca_file is required"),
            ("[openbao]\naddress = \"http://127.0.0.1:8200\"\ninsecure_loopback_http = true".into(), "set how to log in"),
            ("[openbao]\naddress = \"http://127.0.0.1:8200\"\ntoken = \"s.x\"".into(), "unknown field"),
            ("[openbao]\naddress = \"http://127.0.0.1:8200/v1\"\ntoken_file = \"/t\"\ninsecure_loopback_http = true".into(), "without a path"),
            (format!("{server}{cred}openbao = {{ path = \"../sys\", field = \"f\" }}"), "'..' segment"),
            (format!("{server}{cred}openbao = {{ path = \"a?b\", field = \"f\" }}"), "may only hold"),
            (format!("{server}{cred}openbao = {{ path = \"a\", field = \"\" }}"), "field"),
            (format!("{server}{cred}openbao = {{ path = \"a\", field = \"f\" }}\nboot = true"), "boot = true needs a file"),
            (format!("{server}{cred}openbao = {{ path = \"a\", field = \"f\" }}\npath = \"/x\""), "exactly one"),
            (format!("{server}{cred}openbao = {{ path = \"a\", field = \"f\", on_delete = \"drop\" }}"), "unknown variant"),
        ];
        for (text, want) in cases {
            let err = parse(&text).expect_err(&text);
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }
}
