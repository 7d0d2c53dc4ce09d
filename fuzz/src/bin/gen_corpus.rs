//! Writes the seed corpus, `fuzz/corpus/<target>/`, from real messages made
//! with the project's own types and encoders, so that seeds follow the
//! wire format when it changes: `gen_corpus DIR` (run by `fuzz/run.sh
//! --seeds`). Not a fuzz target.

use std::path::Path;

use prost::Message;
use vmcred_host::control::{
    CredState, CredentialOutcome, CredentialStatus, Outcome, Reply, Request, RotateReport,
    UnitOutcome, VmStatus,
};
use vmcred_proto::bootstrap::{Bootstrap, HostTransport};
use vmcred_proto::rpc::pb;
use vmcred_proto::rules::digest;
use vmcred_proto::tls::Pin;

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let d = dir.join(target);
    std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("create {}: {e}", d.display()));
    let p = d.join(name);
    std::fs::write(&p, bytes).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
}

fn cred(name: &str, value: &[u8]) -> pb::Credential {
    pb::Credential {
        name: name.into(),
        value: value.to_vec(),
        sha256: digest(value).to_vec(),
    }
}

fn tagged(tag: u8, body: Vec<u8>) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend(body);
    v
}

fn json_line<T: serde::Serialize>(tag: u8, v: &T) -> Vec<u8> {
    let mut line = serde_json::to_vec(v).expect("json");
    line.push(b'\n');
    tagged(tag, line)
}

fn unit(unit: &str, ok: bool, error: &str) -> pb::UnitResult {
    pb::UnitResult {
        unit: unit.into(),
        action: "restart".into(),
        ok,
        error: error.into(),
    }
}

/// The pins a guest holds mid key rollover: the current key's and the
/// next one's.
fn rollover_pins() -> Vec<Vec<u8>> {
    vec![
        digest(b"current host key").to_vec(),
        digest(b"next host key").to_vec(),
    ]
}

fn main() {
    let out = std::env::args_os().nth(1).expect("usage: gen_corpus DIR");
    let out = Path::new(&out);

    // The guest's view: a full push, a stale one, a bad digest, removals.
    let full = pb::ApplyRequest {
        generation: 1_780_000_000_000_000,
        upserts: vec![
            cred("API_KEY", b"sk-live-0123456789abcdef"),
            cred("DB_PASSWORD", b"correct horse battery staple"),
            cred("ENVIRONMENT", b"test"),
        ],
        removals: vec!["OLD_TOKEN".into()],
    };
    write(out, "guest_apply", "full", &full.encode_to_vec());
    let stale = pb::ApplyRequest {
        generation: 5,
        upserts: vec![cred("API_KEY", b"older")],
        removals: vec![],
    };
    write(out, "guest_apply", "stale", &stale.encode_to_vec());
    let mut bad = cred("API_KEY", b"new");
    bad.sha256[0] ^= 1;
    let bad_digest = pb::ApplyRequest {
        generation: 6,
        upserts: vec![bad],
        removals: vec![],
    };
    write(
        out,
        "guest_apply",
        "bad_digest",
        &bad_digest.encode_to_vec(),
    );
    let removals = pb::ApplyRequest {
        generation: 7,
        upserts: vec![cred("FOREIGN", b"rotated")],
        removals: vec![
            "API_KEY".into(),
            "FOREIGN".into(),
            "vmcred.bootstrap".into(),
        ],
    };
    write(out, "guest_apply", "removals", &removals.encode_to_vec());
    let unchanged = pb::ApplyRequest {
        generation: 8,
        upserts: vec![
            cred("API_KEY", b"old-api-key"),
            cred(&"n".repeat(250), b"x"),
        ],
        removals: vec![],
    };
    write(
        out,
        "guest_apply",
        "unchanged_long_name",
        &unchanged.encode_to_vec(),
    );

    let hello = pb::HelloRequest {
        host_version: vmcred_proto::VERSION.into(),
        vm: "test-vm".into(),
    };
    write(out, "guest_hello", "hello", &hello.encode_to_vec());

    // The host's view of a guest's replies.
    let hello_reply = pb::HelloReply {
        applied_generation: 1_780_000_000_000_000,
        held: ["API_KEY", "DB_PASSWORD", "ENVIRONMENT"]
            .iter()
            .map(|n| pb::Held {
                name: n.to_string(),
                sha256: digest(n.as_bytes()).to_vec(),
            })
            .collect(),
        guest_version: vmcred_proto::VERSION.into(),
        owed_units: vec![unit("broken.service", false, "exit status 1")],
        pins: rollover_pins(),
        // 64 hex digits, the shape of a VM's launch key.
        launch_key: b"0123456789abcdef".repeat(4),
    };
    write(
        out,
        "host_replies",
        "hello_reply",
        &tagged(0, hello_reply.encode_to_vec()),
    );
    let apply_reply = pb::ApplyReply {
        applied_generation: 1_780_000_000_000_001,
        results: vec![
            pb::CredentialResult {
                name: "API_KEY".into(),
                outcome: pb::Outcome::Written as i32,
                error: String::new(),
            },
            pb::CredentialResult {
                name: "OLD_TOKEN".into(),
                outcome: pb::Outcome::Failed as i32,
                error: "not written by vmcred; left in place".into(),
            },
        ],
        units: vec![
            unit("demo-consumer.service", true, ""),
            unit("broken.service", false, "Job failed.\n\u{202e}txt.exe"),
        ],
        owed_units: vec![unit("broken.service", false, "exit status 1")],
    };
    write(
        out,
        "host_replies",
        "apply_reply",
        &tagged(1, apply_reply.encode_to_vec()),
    );

    // A whole session as the host meets it: a Hello reply, then an Apply
    // reply (tag 0) or a refusal (tag picks the code: 1 INVALID_ARGUMENT,
    // 2 FAILED_PRECONDITION, 3 RESOURCE_EXHAUSTED, 4 OUT_OF_RANGE).
    let session = |hello: &pb::HelloReply, tag: u8, body: &[u8]| {
        let h = hello.encode_to_vec();
        let mut v = u16::try_from(h.len())
            .expect("small")
            .to_be_bytes()
            .to_vec();
        v.extend(h);
        v.push(tag);
        v.extend(body);
        v
    };
    let written = pb::ApplyReply {
        applied_generation: 1_780_000_000_000_001,
        results: vec![pb::CredentialResult {
            name: "API_KEY".into(),
            outcome: pb::Outcome::Written as i32,
            error: String::new(),
        }],
        units: vec![unit("demo-consumer.service", true, "")],
        owed_units: vec![],
    };
    let fresh = pb::HelloReply {
        guest_version: vmcred_proto::VERSION.into(),
        ..Default::default()
    };
    write(
        out,
        "host_session",
        "written",
        &session(&fresh, 0, &written.encode_to_vec()),
    );
    write(
        out,
        "host_session",
        "replies",
        &session(&hello_reply, 0, &apply_reply.encode_to_vec()),
    );
    let wedge = pb::HelloReply {
        applied_generation: u64::MAX,
        ..fresh.clone()
    };
    write(
        out,
        "host_session",
        "stale",
        &session(&wedge, 2, b"generation not newer"),
    );
    write(
        out,
        "host_session",
        "refused",
        &session(&fresh, 1, b"name not allowed"),
    );

    // The bootstrap, both admission rules, and one from before `host=`.
    let pin = Pin(digest(b"host key SubjectPublicKeyInfo"));
    for (name, host) in [
        ("vsock", HostTransport::Vsock),
        ("hybrid", HostTransport::Hybrid),
    ] {
        let b = Bootstrap {
            port: 700,
            pin,
            host,
        };
        write(
            out,
            "bootstrap",
            name,
            format!("{}\n", b.encode()).as_bytes(),
        );
    }
    write(
        out,
        "bootstrap",
        "old",
        format!("vmcred-bootstrap-v1 port=1023 pin={pin}").as_bytes(),
    );

    // Names, sizes and digests: flag byte, name, NUL, value.
    for (i, (flags, name, value)) in [
        (0u8, "API_KEY", "v"),
        (1, "vmcred.bootstrap", "0123456789abcdef0123456789abcdef"),
        (255, ".API_KEY.vmcred-tmp", "x"),
        (2, "a:b", ""),
    ]
    .iter()
    .enumerate()
    {
        let mut v = vec![*flags];
        v.extend(name.as_bytes());
        v.push(0);
        v.extend(value.as_bytes());
        write(out, "rules", &format!("seed{i}"), &v);
    }

    // Configs as the README and the tests write them.
    write(out, "host_config", "readme", HOST_TOML.as_bytes());
    write(out, "host_config", "hybrid_unix", HOST_TOML_2.as_bytes());
    // Issue 9 point 7: a name every guest refuses, which the host's config
    // must refuse too.
    write(
        out,
        "host_config",
        "reserved_name",
        HOST_TOML_RESERVED.as_bytes(),
    );
    write(out, "guest_config", "readme", GUEST_TOML.as_bytes());

    // State files a restart reads back.
    write(
        out,
        "guest_state",
        "state",
        br#"{"generation":1780000000000000,"managed":["API_KEY","DB_PASSWORD"]}"#,
    );
    write(out, "host_generations", "generation", b"1780000000000001\n");

    // Control and launch protocol lines: requests (tag 0), replies (tag 1).
    let requests = [
        ("status", Request::Status { vms: vec![] }),
        (
            "rotate",
            Request::Rotate {
                vms: vec!["test-vm".into()],
                all: false,
                credentials: vec!["API_KEY".into()],
                timeout_ms: 30_000,
            },
        ),
        (
            "launched",
            Request::Launched {
                vm: "test-vm".into(),
            },
        ),
    ];
    for (name, r) in &requests {
        write(out, "control", &format!("request_{name}"), &json_line(0, r));
    }
    let report = RotateReport {
        vm: "test-vm".into(),
        applied: false,
        generation: 1_780_000_000_000_001,
        credentials: vec![CredentialOutcome {
            name: "API_KEY".into(),
            outcome: Outcome::Written,
            error: None,
        }],
        units: vec![UnitOutcome {
            unit: "broken.service".into(),
            action: "restart".into(),
            ok: false,
            error: Some("exit status 1".into()),
        }],
        error: None,
        ..Default::default()
    };
    let status = VmStatus {
        vm: "test-vm".into(),
        target: "hybrid vsock /var/lib/microvms/test-vm/notify.vsock port 700".into(),
        connected: true,
        generation_sent: 1_780_000_000_000_001,
        generation_applied: 1_780_000_000_000_001,
        last_error: None,
        last_sync: Some(1_780_000_000),
        credentials: vec![CredentialStatus {
            name: "API_KEY".into(),
            boot: false,
            state: CredState::Applied,
            error: None,
        }],
        ..Default::default()
    };
    for (name, r) in [
        ("rotate", Reply::Rotate(report.clone())),
        ("status", Reply::Status(status.clone())),
        ("ok", Reply::Ok),
        ("error", Reply::Error("no VM named \"x\"".into())),
    ] {
        write(out, "control", &format!("reply_{name}"), &json_line(1, &r));
    }

    // What a VMM answers to CONNECT: accepted then the guest's first TLS
    // bytes, refused, and a hang-up.
    let mut ok = b"OK 1073741824\n".to_vec();
    ok.extend([0x16, 0x03, 0x03, 0x00, 0x7a, 0x02, 0x00]);
    write(out, "hybrid_reply", "ok_then_tls", &ok);
    write(out, "hybrid_reply", "refused", b"NO\n");
    write(out, "hybrid_reply", "closed", b"");

    // The Trust rpc's reply as the host reads it (tag 2).
    let trust = pb::TrustReply {
        pins: rollover_pins(),
    };
    write(
        out,
        "host_replies",
        "trust_reply",
        &tagged(2, trust.encode_to_vec()),
    );

    // The rest of the control protocol: rotate-key, and replies as streamed
    // (items, then a terminal line; tag 2), and blown up (tag 13).
    let rotate_key: Request = serde_json::from_str(
        r#"{"cmd":"rotate_key","step":"prepare","force":false,"timeout_ms":30000}"#,
    )
    .expect("a rotate-key request");
    write(
        out,
        "control",
        "request_rotate_key",
        &json_line(0, &rotate_key),
    );
    let key: Reply = serde_json::from_value(serde_json::json!({"key": {
        "step": "switch", "outcome": "done", "phase": "switched",
        "current_pin": Pin(digest(b"next host key")).to_string(),
        "next_pin": null,
        "previous_pin": Pin(digest(b"current host key")).to_string(),
    }}))
    .expect("a key reply");
    let mut streamed = Vec::new();
    for r in [
        Reply::Status(status.clone()),
        Reply::Rotate(report.clone()),
        key.clone(),
        Reply::Done { count: 3 },
    ] {
        streamed.extend(&json_line(0, &r)[1..]);
    }
    write(out, "control", "stream_items", &tagged(2, streamed));
    let mut busy = json_line(2, &Reply::Busy("no free slot".into()));
    busy.extend(&json_line(0, &Reply::Unknown("vm \"x\"".into()))[1..]);
    write(out, "control", "stream_busy", &busy);
    write(out, "control", "reply_key", &json_line(1, &key));
    write(
        out,
        "control",
        "blowup_rotate",
        &json_line(13, &Reply::Rotate(report)),
    );
    write(
        out,
        "control",
        "blowup_status",
        &json_line(13, &Reply::Status(status)),
    );

    // A systemd LoadCredential= peer of the guest's credential socket.
    write(
        out,
        "creds_address",
        "systemd",
        b"1f2e3d4c5b6a7980/unit/demo-consumer.service/API_KEY",
    );
    write(
        out,
        "creds_address",
        "templated",
        b"00ff/unit/getty@tty1.service/vmcred.bootstrap",
    );
    write(
        out,
        "creds_address",
        "traversal",
        b"ab/unit/x.service/../../etc",
    );

    // OpenBao / Vault replies: a field line, then the body.
    let bao = |field: &str, body: serde_json::Value| {
        let mut v = field.as_bytes().to_vec();
        v.push(b'\n');
        v.extend(serde_json::to_vec(&body).expect("json"));
        v
    };
    write(
        out,
        "openbao_reply",
        "data",
        &bao(
            "password",
            serde_json::json!({
                "request_id": "8f3a", "lease_duration": 0, "renewable": false,
                "data": {"data": {"password": "p\u{e9}\"w", "user": "app"},
                         "metadata": {"version": 3, "deletion_time": "", "destroyed": false}},
            }),
        ),
    );
    write(
        out,
        "openbao_reply",
        "deleted",
        &bao(
            "password",
            serde_json::json!({
                "data": {"data": null, "metadata": {"version": 2, "deletion_time": "2026-01-01T00:00:00Z"}},
            }),
        ),
    );
    write(
        out,
        "openbao_reply",
        "metadata",
        &bao(
            "x",
            serde_json::json!({
                "data": {"current_version": 2, "versions": {
                    "1": {"deletion_time": "", "destroyed": false},
                    "2": {"deletion_time": "2026-01-01T00:00:00Z", "destroyed": false}}},
            }),
        ),
    );
    write(
        out,
        "openbao_reply",
        "login",
        &bao(
            "x",
            serde_json::json!({
                "auth": {"client_token": "s.token", "lease_duration": 2764800, "renewable": true},
            }),
        ),
    );
    write(
        out,
        "openbao_reply",
        "lookup",
        &bao(
            "x",
            serde_json::json!({
                "data": {"ttl": 3600, "renewable": true},
            }),
        ),
    );
    write(
        out,
        "openbao_reply",
        "errors",
        &bao(
            "x",
            serde_json::json!({
                "errors": ["permission denied", "1 error occurred:\n\t* \u{202e}txt"],
            }),
        ),
    );

    // The guest's pin set (pins_file's bootstrap pin is [0xb0; 32]).
    let boot = Pin([0xb0; 32]).to_string();
    let next = Pin(digest(b"next host key")).to_string();
    for (name, root, pins) in [
        ("one", boot.clone(), vec![boot.clone()]),
        ("rollover", boot.clone(), vec![boot.clone(), next.clone()]),
        ("switched", boot.clone(), vec![next.clone()]),
        ("relaunched", next.clone(), vec![next.clone()]),
        (
            "three",
            boot.clone(),
            vec![boot.clone(), next.clone(), boot.clone()],
        ),
    ] {
        let f = serde_json::json!({"root": root, "pins": pins});
        write(
            out,
            "pins_file",
            name,
            &serde_json::to_vec_pretty(&f).expect("json"),
        );
    }

    // What a crash leaves (guest_recovery): flags, push.json, NUL, mount.json.
    let recovery = |flags: u8, journal: serde_json::Value, record: Option<serde_json::Value>| {
        let mut v = vec![flags];
        v.extend(serde_json::to_vec_pretty(&journal).expect("json"));
        if let Some(r) = record {
            v.push(0);
            v.extend(serde_json::to_vec_pretty(&r).expect("json"));
        }
        v
    };
    let mid_push = serde_json::json!({"generation": 6, "entries": [
        {"name": "API_KEY", "remove": false, "had_old": true},
        {"name": "NEW_ONE", "remove": false, "had_old": false},
        {"name": "DB_PASSWORD", "remove": true, "had_old": true},
    ]});
    let ro = serde_json::json!({"read_only": true, "size_bytes": 1048576});
    write(
        out,
        "guest_recovery",
        "rollback_ro",
        &recovery(1 | 2 | 4, mid_push.clone(), Some(ro.clone())),
    );
    write(
        out,
        "guest_recovery",
        "commit_ro",
        &recovery(1 | 4 | 8, mid_push.clone(), Some(ro.clone())),
    );
    write(
        out,
        "guest_recovery",
        "writable_left",
        &recovery(
            2,
            serde_json::json!({"generation": 9, "entries": []}),
            Some(ro),
        ),
    );
    write(
        out,
        "guest_recovery",
        "first_start",
        &recovery(4, mid_push, None),
    );
    let grown = serde_json::json!({"read_only": true, "size_bytes": 3145728});
    write(out, "guest_recovery", "clean_ro", &[1]);
    write(
        out,
        "guest_recovery",
        "grown",
        &recovery(
            1,
            serde_json::json!({"generation": 1, "entries": []}),
            Some(grown),
        ),
    );
}

const HOST_TOML: &str = r#"# All top-level keys are optional; these are the defaults.
state_dir = "/var/lib/vmcred"
control_socket = "/run/vmcred/control.sock"
launch_socket = "/run/vmcred/launch.sock"
poll_interval = "10s"
dial_backoff_max = "30s"
rpc_timeout = "30s"

[vms.test-vm]
cid = 3
port = 700

[vms.test-vm.credentials.API_KEY]
path = "/run/secrets/vars/test-vm-secrets/api-key"
boot = false
allow_on_command_line = false

[vms.test-vm.credentials.ENVIRONMENT]
path = "/etc/vmcred/test-vm/environment"
boot = true
"#;

const HOST_TOML_2: &str = r#"state_dir = "/tmp/vmcred-test/state"
poll_interval = "0s"

[vms.ch-vm]
hybrid_socket = "/var/lib/microvms/ch-vm/notify.vsock"
port = 700

[vms.ch-vm.credentials.DB_PASSWORD]
credential = "ch-vm-db-password"
boot = true
allow_on_command_line = true

[vms.unix-vm]
unix_socket = "/tmp/vmcred-test/guest.sock"

[vms.unix-vm.credentials.JWT_SECRET]
path = "/run/secrets/jwt"
"#;

const HOST_TOML_RESERVED: &str = r#"[vms.test-vm]
cid = 3

[vms.test-vm.credentials.".API_KEY.vmcred-tmp"]
path = "/run/secrets/api-key"
"#;

const GUEST_TOML: &str = r#"# /etc/vmcred/guest.toml
initial_sync_timeout = "30s"

[credentials.API_KEY]
restart_units = ["demo-consumer.service"]
reload_units = []
mode = "0400"

[credentials.ENVIRONMENT]
reload_units = ["nginx.service"]
mode = "0440"
"#;
