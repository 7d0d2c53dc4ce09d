//! The host agent's TOML config: which VMs exist, how to reach each, and
//! where each of its credentials comes from. Everything is validated here,
//! at load, with the same rules the guest applies on the wire, so a bad name
//! is reported by `check-config` or `serve` rather than by a guest.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;
use vmcred_proto::rules;
use vmcred_proto::transport::Target;

/// Default config path, also used by `rotate`, `status` and `launch`.
pub const DEFAULT_CONFIG: &str = "/etc/vmcred/host.toml";
/// Default guest agent port: below 1024, so only the guest's root can bind it.
pub const DEFAULT_PORT: u32 = 700;
/// `keepalive_interval` when the config sets none: one probe per idle
/// connection per minute, an HTTP/2 PING or every second one a `Hello`
/// (see ARCHITECTURE.md, "Keepalive").
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(60);
/// The shortest `keepalive_interval` accepted: a probe a second per VM is
/// already more than a fleet should pay.
pub const MIN_KEEPALIVE: Duration = Duration::from_secs(1);
/// The shortest `metrics_interval` accepted.
pub const MIN_METRICS_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Error)]
pub enum ConfigError {
    /// The I/O error is part of the message and deliberately not a
    /// `source()`: every error in this crate carries its cause in its own
    /// text exactly once, and callers print `{e:#}` without repeating it.
    #[error("cannot read config {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("config {path}: {message}")]
    Parse { path: String, message: String },
    #[error("config {path}: VM {vm:?}: {message}")]
    Vm {
        path: String,
        vm: String,
        message: String,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default = "default_state_dir")]
    state_dir: PathBuf,
    #[serde(default = "default_control_socket")]
    control_socket: PathBuf,
    #[serde(default = "default_launch_socket")]
    launch_socket: PathBuf,
    #[serde(default = "default_poll", with = "humantime_serde")]
    poll_interval: Duration,
    #[serde(default = "default_backoff", with = "humantime_serde")]
    dial_backoff_max: Duration,
    #[serde(default = "default_rpc_timeout", with = "humantime_serde")]
    rpc_timeout: Duration,
    #[serde(default = "default_keepalive", with = "humantime_serde")]
    keepalive_interval: Duration,
    #[serde(default)]
    launch_users: Vec<String>,
    control_group: Option<String>,
    /// `GET /metrics` over this Unix socket (see `metrics`).
    metrics_socket: Option<PathBuf>,
    /// A node-exporter textfile rewritten with the metrics.
    metrics_textfile: Option<PathBuf>,
    #[serde(default = "default_metrics_interval", with = "humantime_serde")]
    metrics_interval: Duration,
    #[serde(default)]
    vms: BTreeMap<String, RawVm>,
    /// The OpenBao / Vault server credentials may come from.
    openbao: Option<crate::openbao::config::RawServer>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVm {
    cid: Option<u32>,
    hybrid_socket: Option<PathBuf>,
    /// Tests only: the guest agent's Unix socket, without a muxer.
    unix_socket: Option<PathBuf>,
    #[serde(default = "default_port")]
    port: u32,
    #[serde(default)]
    launch_key: LaunchKeyMode,
    #[serde(default)]
    credentials: BTreeMap<String, RawCredential>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredential {
    path: Option<PathBuf>,
    credential: Option<String>,
    openbao: Option<crate::openbao::config::RawSecret>,
    #[serde(default)]
    boot: bool,
    #[serde(default)]
    allow_on_command_line: bool,
}

fn default_state_dir() -> PathBuf {
    "/var/lib/vmcred".into()
}
fn default_control_socket() -> PathBuf {
    "/run/vmcred/control.sock".into()
}
fn default_launch_socket() -> PathBuf {
    "/run/vmcred/launch.sock".into()
}
fn default_poll() -> Duration {
    Duration::from_secs(10)
}
fn default_backoff() -> Duration {
    Duration::from_secs(30)
}
fn default_rpc_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_keepalive() -> Duration {
    DEFAULT_KEEPALIVE
}
fn default_metrics_interval() -> Duration {
    Duration::from_secs(15)
}
fn default_port() -> u32 {
    DEFAULT_PORT
}

/// A validated config.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub path: PathBuf,
    pub state_dir: PathBuf,
    pub control_socket: PathBuf,
    pub launch_socket: PathBuf,
    /// Zero disables polling: sources are then re-read only on `rotate` and
    /// SIGHUP.
    pub poll_interval: Duration,
    pub dial_backoff_max: Duration,
    pub rpc_timeout: Duration,
    /// How long a connection may stay silent before the host probes it with
    /// `Hello` (any exchange restarts the wait). See ARCHITECTURE.md,
    /// "Keepalive", for why the default is a minute.
    pub keepalive_interval: Duration,
    /// Who may send `launched` on the launch socket besides root: the
    /// hypervisor users (`launch_users`), resolved to uids at load so that a
    /// typo is a config error, not a silently refused notification.
    pub launch_users: Vec<LaunchUser>,
    /// A group whose members may read `status` (not `rotate`) through the
    /// control socket, which is then 0660 with this group.
    pub control_group: Option<ControlGroup>,
    /// Where `GET /metrics` is answered (0600, or 0660 with
    /// `control_group`).
    pub metrics_socket: Option<PathBuf>,
    /// A node-exporter textfile (`…/vmcred.prom`), rewritten atomically
    /// when the metrics changed, at most once per `metrics_interval`.
    pub metrics_textfile: Option<PathBuf>,
    pub metrics_interval: Duration,
    /// Shared with each VM's task and handle (see `vm::spawn`).
    pub vms: BTreeMap<String, Arc<Vm>>,
    /// Set when an `[openbao]` table is present.
    pub openbao: Option<crate::openbao::config::Server>,
}

/// `control_group`, resolved at load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlGroup {
    pub name: String,
    pub gid: u32,
}

/// A user allowed to notify launches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchUser {
    pub name: String,
    pub uid: u32,
}

impl Config {
    /// The uids the launch socket admits: root and every launch user.
    pub fn launch_uids(&self) -> Vec<u32> {
        std::iter::once(0)
            .chain(self.launch_users.iter().map(|u| u.uid))
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Vm {
    pub name: String,
    pub target: Target,
    pub port: u32,
    /// Whether the guest must prove it is the VM `launch` started.
    pub launch_key: LaunchKeyMode,
    pub credentials: BTreeMap<String, Credential>,
}

/// `launch_key` of a VM. Why it exists: an AF_VSOCK VM is dialled by its
/// CID alone, and while it is stopped anyone who can open
/// `/dev/vhost-vsock` can start a VM of their own on that CID. With
/// `required`, the agent keeps a random key for the VM
/// (`state_dir/launch-keys/<vm>`), `launch` hands it to the guest through
/// a private carrier, and the agent pushes nothing to a guest that does not
/// return it (see ARCHITECTURE.md, "Launch key").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LaunchKeyMode {
    /// The guest is trusted by where it is reached (a hybrid-vsock socket
    /// is owned by the VMM's user; a CID is not).
    #[default]
    Off,
    /// Push nothing unless the guest returns the VM's launch key.
    Required,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    pub name: String,
    pub source: Source,
    pub boot: bool,
    pub allow_on_command_line: bool,
}

/// Where a credential's value is read from on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// An absolute path, typically a root-only secret file.
    Path(PathBuf),
    /// A name in the agent's own `$CREDENTIALS_DIRECTORY`, i.e. what
    /// `LoadCredential=` on `vmcred-host.service` provided.
    Credential(String),
    /// A field of a KV v2 secret in the `[openbao]` server.
    OpenBao(crate::openbao::config::SecretRef),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Path(p) => write!(f, "{}", p.display()),
            Source::Credential(c) => write!(f, "$CREDENTIALS_DIRECTORY/{c}"),
            Source::OpenBao(s) => write!(f, "{s}"),
        }
    }
}

/// The top-level keys a client command needs, and nothing else.
#[derive(Debug, Deserialize)]
struct ClientKeys {
    #[serde(default = "default_control_socket")]
    control_socket: PathBuf,
}

/// `control_socket` from a config file, reading only what precedes its
/// first table header (`[...]`): in TOML every top-level key comes before
/// any table, so `rotate` and `status` cost the same with one VM or ten
/// thousand. The rest of the file is the daemon's to validate; it also
/// answers for unknown VM and credential names. When the head does not
/// parse on its own (a multi-line value with a line that starts with `[`),
/// the whole file is parsed, still for this one key.
pub fn load_control_socket(path: &Path) -> Result<PathBuf, ConfigError> {
    use std::io::BufRead;
    let p = path.display().to_string();
    let read_error = |error| ConfigError::Read {
        path: p.clone(),
        error,
    };
    let file = std::fs::File::open(path).map_err(read_error)?;
    let mut head = String::new();
    let mut reader = std::io::BufReader::new(file);
    let mut line = String::new();
    let mut whole = false;
    loop {
        line.clear();
        if reader.read_line(&mut line).map_err(read_error)? == 0 {
            whole = true;
            break;
        }
        if line.trim_start().starts_with('[') {
            break;
        }
        head.push_str(&line);
    }
    let keys: ClientKeys = match toml::from_str(&head) {
        Ok(k) => k,
        Err(e) if whole => {
            return Err(ConfigError::Parse {
                path: p,
                message: e.to_string(),
            })
        }
        Err(_) => {
            let text = std::fs::read_to_string(path).map_err(read_error)?;
            toml::from_str(&text).map_err(|e| ConfigError::Parse {
                path: p.clone(),
                message: e.to_string(),
            })?
        }
    };
    if !keys.control_socket.is_absolute() {
        return Err(ConfigError::Parse {
            path: p,
            message: format!(
                "control_socket must be an absolute path, got {}",
                keys.control_socket.display()
            ),
        });
    }
    Ok(keys.control_socket)
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.display().to_string(),
            error,
        })?;
        Config::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let p = path.display().to_string();
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: p.clone(),
            message: e.to_string(),
        })?;
        for (what, dir) in [
            ("state_dir", &raw.state_dir),
            ("control_socket", &raw.control_socket),
            ("launch_socket", &raw.launch_socket),
        ]
        .into_iter()
        .chain(
            [
                ("metrics_socket", &raw.metrics_socket),
                ("metrics_textfile", &raw.metrics_textfile),
            ]
            .into_iter()
            .filter_map(|(w, d)| d.as_ref().map(|d| (w, d))),
        ) {
            if !dir.is_absolute() {
                return Err(ConfigError::Parse {
                    path: p.clone(),
                    message: format!("{what} must be an absolute path, got {}", dir.display()),
                });
            }
        }
        let openbao = raw
            .openbao
            .map(crate::openbao::config::Server::validate)
            .transpose()
            .map_err(|message| ConfigError::Parse {
                path: p.clone(),
                message: format!("[openbao]: {message}"),
            })?;
        let mut launch_users = Vec::new();
        for name in &raw.launch_users {
            launch_users.push(resolve_user(name).map_err(|message| ConfigError::Parse {
                path: p.clone(),
                message,
            })?);
        }
        let control_group = match &raw.control_group {
            None => None,
            Some(name) => Some(resolve_group(name).map_err(|message| ConfigError::Parse {
                path: p.clone(),
                message,
            })?),
        };
        let mut vms = BTreeMap::new();
        for (name, rv) in raw.vms {
            let vm = validate_vm(&name, rv).map_err(|message| ConfigError::Vm {
                path: p.clone(),
                vm: rules::display_name(&name),
                message,
            })?;
            if openbao.is_none()
                && vm
                    .credentials
                    .values()
                    .any(|c| matches!(c.source, Source::OpenBao(_)))
            {
                return Err(ConfigError::Vm {
                    path: p.clone(),
                    vm: rules::display_name(&name),
                    message: "a credential uses openbao = { ... } but there is no [openbao] table with the server's address".into(),
                });
            }
            vms.insert(name, Arc::new(vm));
        }
        refuse_shared_targets(&vms).map_err(|message| ConfigError::Parse {
            path: p.clone(),
            message,
        })?;
        Ok(Config {
            path: path.to_path_buf(),
            state_dir: raw.state_dir,
            control_socket: raw.control_socket,
            launch_socket: raw.launch_socket,
            poll_interval: raw.poll_interval,
            dial_backoff_max: raw.dial_backoff_max.max(Duration::from_millis(100)),
            rpc_timeout: raw.rpc_timeout.max(Duration::from_millis(100)),
            keepalive_interval: raw.keepalive_interval.max(MIN_KEEPALIVE),
            launch_users,
            control_group,
            metrics_socket: raw.metrics_socket,
            metrics_textfile: raw.metrics_textfile,
            metrics_interval: raw.metrics_interval.max(MIN_METRICS_INTERVAL),
            vms,
            openbao,
        })
    }
}

/// A `launch_users` entry: a user name from the host's user database.
fn resolve_user(name: &str) -> Result<LaunchUser, String> {
    let shown = rules::display_name(name);
    if name.is_empty() || name.contains('\0') {
        return Err(format!("launch_users: {shown:?} is not a user name"));
    }
    match nix::unistd::User::from_name(name) {
        Ok(Some(u)) => Ok(LaunchUser {
            name: name.to_string(),
            uid: u.uid.as_raw(),
        }),
        Ok(None) => Err(format!(
            "launch_users: no user named {shown:?} on this host (create it, or remove it from launch_users)"
        )),
        Err(e) => Err(format!(
            "launch_users: cannot look up user {shown:?}: {e}"
        )),
    }
}

/// `control_group`: a group name from the host's group database.
fn resolve_group(name: &str) -> Result<ControlGroup, String> {
    let shown = rules::display_name(name);
    if name.is_empty() || name.contains('\0') {
        return Err(format!("control_group: {shown:?} is not a group name"));
    }
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(ControlGroup {
            name: name.to_string(),
            gid: g.gid.as_raw(),
        }),
        Ok(None) => Err(format!(
            "control_group: no group named {shown:?} on this host (create it, or remove control_group)"
        )),
        Err(e) => Err(format!("control_group: cannot look up group {shown:?}: {e}")),
    }
}

/// What makes a VM's transport reach one VM and no other: its AF_VSOCK CID
/// (host-wide) or its socket (a hybrid-vsock VMM's, or, in tests, the
/// guest agent's own; the same path under either key is the same peer).
/// The port is left out on purpose: a second agent port on the same CID or
/// socket is the same VM, not another one.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Endpoint<'a> {
    Cid(u32),
    Socket(&'a Path),
}

/// The target as its config key says it, for an error.
fn shown_target(target: &Target) -> String {
    match target {
        Target::Vsock { cid, .. } => format!("cid = {cid}"),
        Target::Hybrid { socket, .. } => {
            format!("hybrid_socket = {:?}", socket.display().to_string())
        }
        Target::Unix { path } => format!("unix_socket = {:?}", path.display().to_string()),
    }
}

/// Two VMs on one CID or one socket would each receive the other's
/// credentials (whichever answers the dial gets the push), so the whole
/// config is refused; on SIGHUP that keeps the previous one. Paths compare
/// by their components (`/a//b` is `/a/b`); symbolic links are not
/// resolved, since the socket may not exist yet.
fn refuse_shared_targets(vms: &BTreeMap<String, Arc<Vm>>) -> Result<(), String> {
    let mut seen: BTreeMap<Endpoint<'_>, (&str, &Target)> = BTreeMap::new();
    for (name, vm) in vms {
        let endpoint = match &vm.target {
            Target::Vsock { cid, .. } => Endpoint::Cid(*cid),
            Target::Hybrid { socket, .. } => Endpoint::Socket(socket),
            Target::Unix { path } => Endpoint::Socket(path),
        };
        if let Some((first, first_target)) = seen.get(&endpoint) {
            let why = match endpoint {
                Endpoint::Cid(_) => "an AF_VSOCK CID names one VM on the host",
                Endpoint::Socket(_) => "a socket reaches one VM's hypervisor (or agent)",
            };
            let (a, b) = (shown_target(first_target), shown_target(&vm.target));
            let first = rules::display_name(first);
            let name = rules::display_name(name);
            return Err(if a == b {
                format!("VMs {first:?} and {name:?} both have {a}: {why}; give each VM its own")
            } else {
                format!(
                    "VMs {first:?} ({a}) and {name:?} ({b}) name the same socket: {why}; give each VM its own"
                )
            });
        }
        seen.insert(endpoint, (name, &vm.target));
    }
    Ok(())
}

/// VM names end up in file names (`generations/<vm>`) and log lines.
fn validate_vm_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(
            "a VM name must be 1-64 characters of A-Z a-z 0-9 - _ . @, not starting with '.'"
                .into(),
        )
    }
}

fn validate_vm(name: &str, rv: RawVm) -> Result<Vm, String> {
    validate_vm_name(name)?;
    if rv.port == 0 || rv.port == u32::MAX {
        return Err(format!("port {} is not a usable vsock port", rv.port));
    }
    let target = match (rv.cid, rv.hybrid_socket, rv.unix_socket) {
        (Some(cid), None, None) => {
            if cid <= 2 || cid == u32::MAX {
                return Err(format!(
                    "cid {cid} is reserved (0 hypervisor, 1 local, 2 host, 4294967295 any); guest CIDs start at 3"
                ));
            }
            if rv.port >= 1024 {
                return Err(format!("port {} must be below 1024 so that only the guest's root can listen on it", rv.port));
            }
            Target::Vsock {
                cid,
                port: rv.port,
            }
        }
        (None, Some(socket), None) => {
            if !socket.is_absolute() {
                return Err(format!("hybrid_socket must be absolute, got {}", socket.display()));
            }
            if rv.port >= 1024 {
                return Err(format!("port {} must be below 1024 so that only the guest's root can listen on it", rv.port));
            }
            Target::Hybrid {
                socket,
                port: rv.port,
            }
        }
        (None, None, Some(path)) => Target::Unix { path },
        (None, None, None) => {
            return Err("set how to reach the guest: cid = N (AF_VSOCK) or hybrid_socket = \"/var/lib/microvms/NAME/notify.vsock\" (cloud-hypervisor, Firecracker)".into())
        }
        _ => return Err("set exactly one of cid, hybrid_socket (and unix_socket, for tests)".into()),
    };
    let mut credentials = BTreeMap::new();
    for (cname, rc) in rv.credentials {
        rules::validate_name(&cname).map_err(|e| e.to_string())?;
        if rc.boot {
            rules::validate_boot_name(&cname).map_err(|e| e.to_string())?;
        }
        if cname == rules::BOOTSTRAP_CREDENTIAL {
            return Err(format!(
                "credential name {cname:?} is reserved for vmcred's own bootstrap"
            ));
        }
        if cname == rules::LAUNCH_KEY_CREDENTIAL {
            return Err(format!(
                "credential name {cname:?} is reserved for the VM's launch key, which vmcred makes and passes itself (set launch_key = \"required\" on the VM)"
            ));
        }
        let source = match (rc.path, rc.credential, rc.openbao) {
            (None, None, Some(s)) => {
                if rc.boot {
                    return Err(format!(
                        "credential {cname}: boot = true needs a file source (path or credential); an openbao credential is delivered over vsock once the guest agent runs"
                    ));
                }
                Source::OpenBao(
                    crate::openbao::config::SecretRef::validate(s)
                        .map_err(|e| format!("credential {cname}: openbao: {e}"))?,
                )
            }
            (Some(p), None, None) => {
                if !p.is_absolute() {
                    return Err(format!(
                        "credential {cname}: path must be absolute, got {}",
                        p.display()
                    ));
                }
                Source::Path(p)
            }
            (None, Some(c), None) => {
                rules::validate_name(&c)
                    .map_err(|e| format!("credential {cname}: credential = {e}"))?;
                Source::Credential(c)
            }
            (None, None, None) => {
                return Err(format!(
                    "credential {cname}: set its source: path = \"/abs/file\", credential = \"NAME\" (from $CREDENTIALS_DIRECTORY) or openbao = {{ mount = \"secret\", path = \"app/db\", field = \"password\" }}"
                ))
            }
            _ => {
                return Err(format!(
                    "credential {cname}: set exactly one of path, credential, openbao"
                ))
            }
        };
        if rc.allow_on_command_line && !rc.boot {
            return Err(format!(
                "credential {cname}: allow_on_command_line only makes sense with boot = true"
            ));
        }
        credentials.insert(
            cname.clone(),
            Credential {
                name: cname,
                source,
                boot: rc.boot,
                allow_on_command_line: rc.allow_on_command_line,
            },
        );
    }
    Ok(Vm {
        name: name.to_string(),
        target,
        port: rv.port,
        launch_key: rv.launch_key,
        credentials,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/t/host.toml"), text)
    }

    fn control_socket_of(text: &str) -> Result<PathBuf, ConfigError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("host.toml");
        std::fs::write(&path, text).expect("write config");
        load_control_socket(&path)
    }

    #[test]
    fn client_reads_control_socket_from_the_head_only() {
        // The tail is not valid config (nor valid TOML): a client command
        // never reads that far.
        let got = control_socket_of(
            "state_dir = \"/s\"\ncontrol_socket = \"/r/c.sock\"\n[vms.a]\nthis is not toml\n",
        );
        assert_eq!(got.expect("head parses"), PathBuf::from("/r/c.sock"));
        assert_eq!(
            control_socket_of("[vms.a]\ncid = 3\n").expect("default"),
            PathBuf::from("/run/vmcred/control.sock")
        );
    }

    #[test]
    fn client_falls_back_to_the_whole_file_when_the_head_is_cut_mid_value() {
        let got = control_socket_of(
            "x = [\n[1, 2],\n]\ncontrol_socket = \"/r/c.sock\"\n[vms.a]\ncid = 3\n",
        );
        assert_eq!(got.expect("whole file parses"), PathBuf::from("/r/c.sock"));
    }

    #[test]
    fn client_refuses_a_relative_control_socket_and_bad_toml() {
        assert!(matches!(
            control_socket_of("control_socket = \"c.sock\"\n"),
            Err(ConfigError::Parse { .. })
        ));
        assert!(matches!(
            control_socket_of("control_socket = \n"),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn full_example_parses() {
        let c = parse(
            r#"
            state_dir = "/tmp/s"
            poll_interval = "0s"
            [vms.test-vm]
            cid = 3
            [vms.test-vm.credentials.API_KEY]
            path = "/run/secrets/api-key"
            [vms.test-vm.credentials.ENVIRONMENT]
            credential = "test-vm-ENVIRONMENT"
            boot = true
            [vms.other]
            hybrid_socket = "/var/lib/microvms/other/notify.vsock"
            port = 701
            "#,
        )
        .unwrap();
        assert_eq!(c.poll_interval, Duration::ZERO);
        let vm = &c.vms["test-vm"];
        assert_eq!(vm.target, Target::Vsock { cid: 3, port: 700 });
        assert!(vm.credentials["ENVIRONMENT"].boot);
        assert_eq!(
            vm.credentials["ENVIRONMENT"].source,
            Source::Credential("test-vm-ENVIRONMENT".into())
        );
        assert!(matches!(
            c.vms["other"].target,
            Target::Hybrid { port: 701, .. }
        ));
    }

    #[test]
    fn launch_users_resolve_to_uids() {
        let c = parse("launch_users = [\"root\", \"nobody\"]").unwrap();
        let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
        assert_eq!(c.launch_uids(), vec![0, 0, nobody.uid.as_raw()]);
        assert_eq!(parse("").unwrap().launch_uids(), vec![0]);
    }

    #[test]
    fn read_error_names_its_cause_once() {
        let e = Config::load(Path::new("/nonexistent/vmcred/host.toml")).unwrap_err();
        let shown = format!("{:#}", anyhow::Error::from(e));
        assert_eq!(
            shown.matches("No such file or directory").count(),
            1,
            "{shown}"
        );
    }

    #[test]
    fn two_vms_on_one_cid_or_socket_are_refused() {
        let cases = [
            (
                "[vms.a]\ncid = 5\n[vms.b]\ncid = 5\nport = 701",
                "VMs \"a\" and \"b\" both have cid = 5",
            ),
            (
                "[vms.c]\nhybrid_socket = \"/var/lib/microvms/c/notify.vsock\"\n[vms.d]\nhybrid_socket = \"/var/lib/microvms/c/notify.vsock\"",
                "VMs \"c\" and \"d\" both have hybrid_socket = \"/var/lib/microvms/c/notify.vsock\"",
            ),
            (
                "[vms.c]\nhybrid_socket = \"/v/c/notify.vsock\"\n[vms.d]\nhybrid_socket = \"/v/c//notify.vsock\"",
                "VMs \"c\" (hybrid_socket = \"/v/c/notify.vsock\") and \"d\" (hybrid_socket = \"/v/c//notify.vsock\") name the same socket",
            ),
            (
                "[vms.e]\nunix_socket = \"/t/g.sock\"\n[vms.f]\nunix_socket = \"/t/g.sock\"",
                "VMs \"e\" and \"f\" both have unix_socket = \"/t/g.sock\"",
            ),
            (
                "[vms.g]\nhybrid_socket = \"/t/g.sock\"\n[vms.h]\nunix_socket = \"/t/./g.sock\"",
                "VMs \"g\" (hybrid_socket = \"/t/g.sock\") and \"h\" (unix_socket = \"/t/./g.sock\") name the same socket",
            ),
        ];
        for (text, want) in cases {
            let err = parse(text).expect_err(text).to_string();
            assert!(err.contains(want), "{text:?}: {err}");
            assert!(err.contains("give each VM its own"), "{err}");
        }
        // One of each, and the same port on different CIDs: accepted.
        let c = parse(
            "[vms.a]\ncid = 5\n[vms.b]\ncid = 6\n[vms.c]\nhybrid_socket = \"/v/c.vsock\"\n[vms.d]\nhybrid_socket = \"/v/d.vsock\"\n[vms.e]\nunix_socket = \"/v/e.sock\"",
        )
        .expect("distinct targets");
        assert_eq!(c.vms.len(), 5);
    }

    /// The reviewer's file: `check-config` (and so `serve` and a SIGHUP
    /// reload, which all go through `Config::load`) printed OK for it.
    #[test]
    fn load_refuses_a_file_with_a_shared_cid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("host.toml");
        std::fs::write(
            &path,
            "[vms.a]\ncid = 5\n[vms.a.credentials.A_SECRET]\npath = \"/s/a\"\n[vms.b]\ncid = 5\n[vms.b.credentials.B_SECRET]\npath = \"/s/b\"\n",
        )
        .expect("write config");
        let err = Config::load(&path).expect_err("shared CID").to_string();
        assert!(err.contains("host.toml"), "{err}");
        assert!(
            err.contains("VMs \"a\" and \"b\" both have cid = 5"),
            "{err}"
        );
    }

    #[test]
    fn refusals_are_clear() {
        let cases = [
            ("[vms.a]\ncid = 3\nprot = 1", "unknown field"),
            ("[vms.a]\n", "set how to reach the guest"),
            ("[vms.a]\ncid = 2", "reserved"),
            ("[vms.a]\ncid = 3\nport = 2000", "below 1024"),
            ("[vms.a]\ncid = 3\nhybrid_socket = \"/x\"", "exactly one"),
            ("[vms.\"a/b\"]\ncid = 3", "VM name"),
            ("[vms.a]\ncid = 3\n[vms.a.credentials.\"../x\"]\npath = \"/x\"", "'/'"),
            ("[vms.a]\ncid = 3\n[vms.a.credentials.\"a:b\"]\npath = \"/x\"", "':'"),
            ("[vms.a]\ncid = 3\n[vms.a.credentials.\"\"]\npath = \"/x\"", "empty"),
            ("[vms.a]\ncid = 3\n[vms.a.credentials.\"é\"]\npath = \"/x\"", "ASCII"),
            ("[vms.a]\ncid = 3\n[vms.a.credentials.X]\npath = \"rel\"", "absolute"),
            ("[vms.a]\ncid = 3\n[vms.a.credentials.X]\n", "set its source"),
            ("[vms.a]\ncid = 3\n[vms.a.credentials.\"vmcred.bootstrap\"]\npath = \"/x\"", "reserved"),
            ("[vms.a]\ncid = 3\n[vms.a.credentials.X]\npath = \"/x\"\nallow_on_command_line = true", "boot = true"),
            ("state_dir = \"rel\"", "absolute"),
            ("metrics_textfile = \"vmcred.prom\"", "metrics_textfile must be an absolute path"),
            ("metrics_socket = \"m.sock\"", "metrics_socket must be an absolute path"),
            ("metrics_interval = \"15\"", "metrics_interval"),
            ("launch_users = [\"no-such-user-vmcred\"]", "no user named"),
            ("launch_users = [\"\"]", "not a user name"),
            ("control_group = \"no-such-group-vmcred\"", "no group named"),
        ];
        for (text, want) in cases {
            let err = parse(text).expect_err(text).to_string();
            assert!(err.contains(want), "{text:?}: {err}");
        }
        let long = format!(
            "[vms.a]\ncid = 3\n[vms.a.credentials.{}]\npath = \"/x\"",
            "n".repeat(256)
        );
        assert!(parse(&long).unwrap_err().to_string().contains("255"));
    }
}
