//! The host's TOML config (`vmcred_host::config::Config::parse`), as
//! `serve`, `check-config` and a reload read it. Invariants: no panic;
//! an accepted config holds only what the guest will accept: VM names safe
//! as file names, usable ports (below 1024 for vsock and hybrid), guest
//! CIDs >= 3, absolute paths, credential names valid by the shared rules
//! and never the bootstrap's nor a temp-file name (issue 9 point 7); errors
//! are bounded.

use std::path::Path;

use vmcred_host::config::{Config, Source};
use vmcred_proto::rules;
use vmcred_proto::transport::Target;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        let cfg = match Config::parse(Path::new("/etc/vmcred/host.toml"), text) {
            Ok(c) => c,
            Err(e) => {
                // toml's own messages quote the offending line; bound them
                // by the input, not more.
                let msg = e.to_string();
                assert!(
                    msg.len() <= 4 * text.len() + 4096,
                    "error of {} bytes",
                    msg.len()
                );
                return;
            }
        };
        for p in [&cfg.state_dir, &cfg.control_socket, &cfg.launch_socket] {
            assert!(p.is_absolute(), "{p:?}");
        }
        for (name, vm) in &cfg.vms {
            assert_eq!(name, &vm.name);
            assert!(!name.is_empty() && name.len() <= 64 && !name.starts_with('.'));
            assert!(!name.contains('/'), "{name:?}");
            match &vm.target {
                Target::Vsock { cid, port } => {
                    assert!(*cid >= 3 && *cid != u32::MAX);
                    assert!(*port != 0 && *port < 1024);
                }
                Target::Hybrid { socket, port } => {
                    assert!(socket.is_absolute());
                    assert!(*port != 0 && *port < 1024);
                }
                Target::Unix { .. } => {}
            }
            for (cname, c) in &vm.credentials {
                assert_eq!(cname, &c.name);
                assert!(rules::validate_name(cname).is_ok(), "{cname:?}");
                assert_ne!(cname, rules::BOOTSTRAP_CREDENTIAL);
                assert!(
                    vmcred_guest::store::reserved_name(cname).is_none(),
                    "host config accepts {cname:?}, which every guest refuses"
                );
                match &c.source {
                    Source::Path(p) => assert!(p.is_absolute()),
                    Source::Credential(n) => assert!(rules::validate_name(n).is_ok()),
                    // Never a boot source: the store is read by the daemon only.
                    Source::OpenBao(_) => assert!(!c.boot),
                }
                assert!(c.boot || !c.allow_on_command_line);
            }
        }
    });
}
