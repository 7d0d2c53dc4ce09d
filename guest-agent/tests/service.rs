//! The guest agent's gRPC service, driven as the host drives it: a real
//! Unix socket, real TLS with a pinned host key, real files.

mod common;

use std::os::unix::fs::MetadataExt;

use common::{applied, apply, connect, cred, start, start_with};
use tonic::Code;
use vmcred_guest::store::Limits;
use vmcred_proto::rpc::pb::{HelloRequest, Outcome};
use vmcred_proto::rules::{digest, MAX_CREDENTIAL_BYTES};
use vmcred_proto::tls::Identity;

fn hello() -> HelloRequest {
    HelloRequest {
        host_version: "test".into(),
        vm: "test-vm".into(),
    }
}

fn outcomes(reply: &vmcred_proto::rpc::pb::ApplyReply) -> Vec<(String, Outcome)> {
    reply
        .results
        .iter()
        .map(|r| (r.name.clone(), Outcome::try_from(r.outcome).unwrap()))
        .collect()
}

#[tokio::test]
async fn hello_reports_generation_and_held_digests() {
    let g = start("", Limits::default()).await;
    let mut c = g.client().await;
    let h = c.hello(hello()).await.unwrap().into_inner();
    assert_eq!(h.applied_generation, 0);
    assert!(h.held.is_empty());
    assert_eq!(h.guest_version, vmcred_proto::VERSION);
    assert!(!g.readiness.is_ready(), "nothing synced yet");

    // A file vmcred did not write is not reported as held.
    std::fs::write(g.creds.join("FOREIGN"), b"f").unwrap();
    applied(&mut c, 1, vec![cred("A", b"a"), cred("B", b"b")], &[]).await;
    let h = c.hello(hello()).await.unwrap().into_inner();
    assert_eq!(h.applied_generation, 1);
    let held: Vec<_> = h
        .held
        .iter()
        .map(|x| (x.name.as_str(), x.sha256.clone()))
        .collect();
    assert_eq!(
        held,
        vec![("A", digest(b"a").to_vec()), ("B", digest(b"b").to_vec())]
    );
    // Issue 10: a Hello while nothing changed reads no file.
    let hashed = g.store.files_hashed();
    for _ in 0..3 {
        c.hello(hello()).await.unwrap();
    }
    assert_eq!(
        g.store.files_hashed(),
        hashed,
        "an idle Hello re-read files"
    );
    // A value replaced behind the agent's back is seen (and re-read).
    std::fs::remove_file(g.creds.join("A")).unwrap();
    std::fs::write(g.creds.join("A"), b"changed").unwrap();
    let h = c.hello(hello()).await.unwrap().into_inner();
    assert_eq!(h.held[0].sha256, digest(b"changed").to_vec());
    // A managed file that vanished is skipped.
    std::fs::remove_file(g.creds.join("B")).unwrap();
    let h = c.hello(hello()).await.unwrap().into_inner();
    assert_eq!(h.held.len(), 1);
    assert_eq!(h.held[0].name, "A");
}

/// Issue 10: what a push wrote is never read back to be hashed, neither
/// by the next push (to tell unchanged from changed) nor by a Hello.
#[tokio::test]
async fn pushes_and_hellos_read_back_no_file() {
    let g = start("", Limits::default()).await;
    let mut c = g.client().await;
    c.apply(apply(1, vec![cred("A", b"a1"), cred("B", b"b")], &[]))
        .await
        .unwrap();
    let h = c.hello(hello()).await.unwrap().into_inner();
    assert_eq!(h.held[0].sha256, digest(b"a1").to_vec());
    let r = c
        .apply(apply(2, vec![cred("A", b"a2"), cred("B", b"b")], &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        outcomes(&r),
        vec![
            ("A".into(), Outcome::Written),
            ("B".into(), Outcome::Unchanged)
        ]
    );
    let h = c.hello(hello()).await.unwrap().into_inner();
    assert_eq!(h.held[0].sha256, digest(b"a2").to_vec());
    assert_eq!(h.held[1].sha256, digest(b"b").to_vec());
    assert_eq!(g.store.files_hashed(), 0, "a push's own file was read back");
}

#[tokio::test]
async fn apply_writes_with_configured_modes_then_reports_unchanged() {
    let g = start("[credentials.SHARED]\nmode = \"0440\"\n", Limits::default()).await;
    let mut c = g.client().await;
    let r = applied(
        &mut c,
        3,
        vec![cred("API_KEY", b"secret-1"), cred("SHARED", b"shared")],
        &[],
    )
    .await;
    assert_eq!(r.applied_generation, 3);
    assert_eq!(
        outcomes(&r),
        vec![
            ("API_KEY".into(), Outcome::Written),
            ("SHARED".into(), Outcome::Written)
        ]
    );
    assert!(r.results.iter().all(|x| x.error.is_empty()));
    assert_eq!(g.read("API_KEY").unwrap(), b"secret-1");
    let mode = |n: &str| std::fs::metadata(g.creds.join(n)).unwrap().mode() & 0o7777;
    assert_eq!(mode("API_KEY"), 0o400);
    assert_eq!(mode("SHARED"), 0o440);
    assert!(
        g.readiness.is_ready(),
        "ready after the first successful Apply"
    );

    let r = applied(
        &mut c,
        4,
        vec![cred("API_KEY", b"secret-2"), cred("SHARED", b"shared")],
        &[],
    )
    .await;
    assert_eq!(r.applied_generation, 4);
    assert_eq!(
        outcomes(&r),
        vec![
            ("API_KEY".into(), Outcome::Written),
            ("SHARED".into(), Outcome::Unchanged)
        ]
    );
    assert_eq!(g.read("API_KEY").unwrap(), b"secret-2");
    assert_eq!(g.store.state().generation, 4);
}

#[tokio::test]
async fn an_identical_file_becomes_managed_as_unchanged() {
    let g = start("", Limits::default()).await;
    // As if PID 1 had imported it from SMBIOS at boot.
    std::fs::write(g.creds.join("BOOT"), b"boot").unwrap();
    std::fs::set_permissions(
        g.creds.join("BOOT"),
        std::os::unix::fs::PermissionsExt::from_mode(0o400),
    )
    .unwrap();
    let mut c = g.client().await;
    let r = applied(&mut c, 1, vec![cred("BOOT", b"boot")], &[]).await;
    assert_eq!(outcomes(&r), vec![("BOOT".into(), Outcome::Unchanged)]);
    assert!(g.store.state().managed.contains("BOOT"));
    // Being managed now, the host may remove it.
    let r = applied(&mut c, 2, vec![], &["BOOT"]).await;
    assert_eq!(outcomes(&r), vec![("BOOT".into(), Outcome::Removed)]);
    assert!(g.read("BOOT").is_none());
}

#[tokio::test]
async fn older_or_equal_generation_is_refused_and_nothing_written() {
    let g = start("", Limits::default()).await;
    let mut c = g.client().await;
    let e = c
        .apply(apply(0, vec![cred("A", b"zero")], &[]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(g.read("A").is_none());

    applied(&mut c, 7, vec![cred("A", b"seven")], &[]).await;
    for old in [7, 4] {
        let e = c
            .apply(apply(
                old,
                vec![cred("A", b"rolled back"), cred("NEW", b"n")],
                &[],
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert_eq!(
            e.message(),
            format!(
                "generation {old} is not newer than the applied generation 7; refusing (rollback protection)"
            )
        );
    }
    assert_eq!(g.read("A").unwrap(), b"seven");
    assert!(g.read("NEW").is_none());
    assert_eq!(g.store.state().generation, 7);
}

#[tokio::test]
async fn a_host_with_another_key_is_refused_at_the_handshake() {
    let g = start("", Limits::default()).await;
    let impostor = Identity::generate("vmcred-host").unwrap();
    // TLS 1.3 lets the client finish before the server has checked its
    // certificate, so the refusal may surface at connect or at the first call.
    match connect(&g.socket, &impostor).await {
        Err(_) => {}
        Ok(mut c) => {
            let e = c.hello(hello()).await.unwrap_err();
            assert_ne!(e.code(), Code::Ok);
            let e = c
                .apply(apply(1, vec![cred("EVIL", b"evil")], &[]))
                .await
                .unwrap_err();
            assert_ne!(e.code(), Code::Ok);
        }
    }
    assert!(g.read("EVIL").is_none());
    assert_eq!(std::fs::read_dir(&g.creds).unwrap().count(), 0);
    assert_eq!(g.store.state().generation, 0);
    // The real host still gets in afterwards.
    let mut c = g.client().await;
    c.hello(hello()).await.unwrap();
}

#[tokio::test]
async fn bad_names_are_refused_whole_with_clear_errors() {
    let g = start("", Limits::default()).await;
    let mut c = g.client().await;
    let long = "n".repeat(256);
    let cases: Vec<(&str, &str)> = vec![
        ("../x", "contains '/'"),
        ("a/b", "contains '/'"),
        ("a:b", "contains ':'"),
        ("", "empty"),
        (&long, "256 bytes"),
        ("héllo", "printable ASCII"),
        (".", "'.'"),
        ("vmcred.bootstrap", "bootstrap"),
        (".A.vmcred-tmp", "reserved"),
    ];
    for (name, why) in cases {
        // A valid credential rides along: it must not be written either.
        let e = c
            .apply(apply(1, vec![cred("GOOD", b"g"), cred(name, b"v")], &[]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{name:?}: {e:?}");
        assert!(e.message().contains(why), "{name:?}: {}", e.message());
        // As a removal too.
        let e = c
            .apply(apply(1, vec![cred("GOOD", b"g")], &[name]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{name:?}: {e:?}");
    }
    let e = c
        .apply(apply(1, vec![cred("D", b"1")], &["D"]))
        .await
        .unwrap_err();
    assert!(e.message().contains("more than once"), "{}", e.message());
    assert!(g.read("GOOD").is_none());
    assert_eq!(std::fs::read_dir(&g.creds).unwrap().count(), 0);
    assert_eq!(g.store.state().generation, 0);
}

#[tokio::test]
async fn oversized_values_and_totals_are_refused() {
    let g = start("", Limits::default()).await;
    let mut c = g.client().await;
    let big = vec![b'x'; MAX_CREDENTIAL_BYTES + 1];
    let e = c
        .apply(apply(1, vec![cred("BIG", &big)], &[]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("1 MiB"), "{}", e.message());
    assert!(!e.message().contains("xxxx"), "no value in errors");

    let half = vec![b'y'; 600 * 1024];
    let e = c
        .apply(apply(1, vec![cred("H1", &half), cred("H2", &half)], &[]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("total"), "{}", e.message());
    assert_eq!(std::fs::read_dir(&g.creds).unwrap().count(), 0);
}

#[tokio::test]
async fn digest_mismatch_is_refused() {
    let g = start("", Limits::default()).await;
    let mut c = g.client().await;
    let mut bad = cred("A", b"value");
    bad.sha256 = digest(b"other").to_vec();
    let e = c
        .apply(apply(1, vec![cred("OK", b"ok"), bad], &[]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("digest does not match"),
        "{}",
        e.message()
    );
    let mut short = cred("A", b"value");
    short.sha256.truncate(8);
    let e = c.apply(apply(1, vec![short], &[])).await.unwrap_err();
    assert!(e.message().contains("32 bytes"), "{}", e.message());
    assert_eq!(std::fs::read_dir(&g.creds).unwrap().count(), 0);
}

#[tokio::test]
async fn only_managed_credentials_are_removed() {
    let g = start("", Limits::default()).await;
    let mut c = g.client().await;
    applied(&mut c, 1, vec![cred("MINE", b"m")], &[]).await;
    std::fs::write(g.creds.join("FOREIGN"), b"not ours").unwrap();
    let r = applied(&mut c, 2, vec![], &["MINE", "FOREIGN"]).await;
    // All or nothing: MINE is not removed either.
    assert_eq!(
        outcomes(&r),
        vec![
            ("MINE".into(), Outcome::Failed),
            ("FOREIGN".into(), Outcome::Failed)
        ]
    );
    assert_eq!(r.results[1].error, "not written by vmcred; left in place");
    assert!(
        r.results[0].error.contains("all or nothing") && r.results[0].error.contains("FOREIGN"),
        "{}",
        r.results[0].error
    );
    assert_eq!(g.read("MINE").unwrap(), b"m");
    assert_eq!(g.read("FOREIGN").unwrap(), b"not ours");
    // A failure keeps the generation where it was, so the host retries.
    assert_eq!(r.applied_generation, 1);
    assert_eq!(g.store.state().generation, 1);
    assert!(g.store.state().managed.contains("MINE"));
    let r = applied(&mut c, 2, vec![], &["MINE"]).await;
    assert_eq!(outcomes(&r), vec![("MINE".into(), Outcome::Removed)]);
    assert_eq!(r.applied_generation, 2);
    assert!(g.read("MINE").is_none());
}

#[tokio::test]
async fn a_write_over_the_limit_fails_clearly_and_keeps_the_generation() {
    let g = start(
        "",
        Limits {
            max_total_bytes: 1000,
            max_files: 100,
        },
    )
    .await;
    let mut c = g.client().await;
    applied(&mut c, 1, vec![cred("A", &[1; 600])], &[]).await;
    // B (300) and the new A (800) would not fit together: nothing of the
    // push is applied, B included.
    let r = applied(
        &mut c,
        2,
        vec![cred("B", &[3; 300]), cred("A", &[2; 800])],
        &[],
    )
    .await;
    assert_eq!(
        outcomes(&r),
        vec![("B".into(), Outcome::Failed), ("A".into(), Outcome::Failed)]
    );
    for res in &r.results {
        assert!(
            res.error.contains("would bring")
                && res.error.contains("to 1100 bytes; its limit is 1000"),
            "{}",
            res.error
        );
    }
    assert_eq!(r.applied_generation, 1);
    assert_eq!(g.store.state().generation, 1);
    assert_eq!(g.read("A").unwrap(), vec![1; 600]);
    assert!(g.read("B").is_none());
    // A value larger than half the budget still replaces its old value.
    let r = applied(&mut c, 3, vec![cred("A", &[4; 900])], &[]).await;
    assert_eq!(r.applied_generation, 3);
    assert_eq!(g.read("A").unwrap(), vec![4; 900]);
}

#[tokio::test]
async fn unit_actions_run_for_changed_credentials_and_are_reported() {
    let g = start(
        r#"
[credentials.A]
restart_units = ["a.service", "shared.service"]
reload_units = ["r.service"]

[credentials.B]
restart_units = ["shared.service"]
reload_units = ["bad.service"]

[credentials.C]
restart_units = ["c.service"]
"#,
        Limits::default(),
    )
    .await;
    let mut c = g.client().await;
    let r = applied(&mut c, 1, vec![cred("A", b"a"), cred("B", b"b")], &[]).await;
    let units: Vec<_> = r
        .units
        .iter()
        .map(|u| (u.unit.as_str(), u.action.as_str(), u.ok))
        .collect();
    assert_eq!(
        units,
        vec![
            ("a.service", "restart", true),
            ("shared.service", "restart", true),
            ("r.service", "reload", true),
            ("bad.service", "reload", false),
        ]
    );
    assert!(
        r.units[3].error.contains("not found"),
        "{}",
        r.units[3].error
    );
    // A failed unit action is reported, but the credentials were applied.
    assert_eq!(r.applied_generation, 1);
    assert_eq!(
        g.calls(),
        "try-restart a.service\ntry-restart shared.service\ntry-reload-or-restart r.service\ntry-reload-or-restart bad.service\n"
    );

    // Unchanged credentials trigger nothing; a removal does.
    std::fs::write(&g.calls, b"").unwrap();
    let r = applied(&mut c, 2, vec![cred("A", b"a")], &["B"]).await;
    assert_eq!(
        outcomes(&r),
        vec![
            ("A".into(), Outcome::Unchanged),
            ("B".into(), Outcome::Removed)
        ]
    );
    assert_eq!(
        g.calls(),
        "try-restart shared.service\ntry-reload-or-restart bad.service\n"
    );
}

#[tokio::test]
async fn serves_again_after_the_host_goes_away() {
    let g = start("", Limits::default()).await;
    for generation in 1..=3 {
        let mut c = g.client().await;
        c.hello(hello()).await.unwrap();
        applied(
            &mut c,
            generation,
            vec![cred("A", &[generation as u8])],
            &[],
        )
        .await;
        drop(c);
    }
    // Garbage instead of TLS, then a hang-up: logged and forgotten.
    {
        use tokio::io::AsyncWriteExt;
        let mut s = tokio::net::UnixStream::connect(&g.socket).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    }
    let mut c = g.client().await;
    let h = c.hello(hello()).await.unwrap().into_inner();
    assert_eq!(h.applied_generation, 3);
    assert_eq!(g.read("A").unwrap(), vec![3]);
}

#[tokio::test]
async fn concurrent_applies_are_serialized() {
    let g = start("", Limits::default()).await;
    let client = g.client().await;
    let mut tasks = Vec::new();
    // Eight at once: the server allows 8 concurrent streams per connection.
    for generation in 1..=8u64 {
        let mut c = client.clone();
        tasks.push(tokio::spawn(async move {
            c.apply(apply(
                generation,
                vec![cred("A", format!("v{generation}").as_bytes())],
                &[],
            ))
            .await
            .map(|r| r.into_inner().applied_generation)
            .map_err(|e| e.code())
        }));
    }
    let mut applied = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(g) => applied.push(g),
            Err(code) => assert_eq!(code, Code::FailedPrecondition),
        }
    }
    // Whatever order they ran in, the generations that went through rose
    // strictly, and the file holds the value of the highest one.
    let max = *applied.iter().max().unwrap();
    assert_eq!(g.store.state().generation, max);
    assert_eq!(g.read("A").unwrap(), format!("v{max}").into_bytes());
}

#[tokio::test]
async fn a_new_host_session_supersedes_the_old_one() {
    use std::time::{Duration, Instant};
    let g = start("", Limits::default()).await;
    let mut old = g.client().await;
    old.hello(hello()).await.unwrap();
    let mut new = g.client().await;
    new.hello(hello()).await.unwrap();
    // The old session is closed by the guest; the new one keeps working.
    let deadline = Instant::now() + Duration::from_secs(10);
    while old.hello(hello()).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "the superseded session stayed open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    new.hello(hello()).await.unwrap();
    applied(&mut new, 1, vec![cred("A", b"a")], &[]).await;
}

#[tokio::test]
async fn silent_peers_time_out() {
    use std::time::Duration;
    use tokio::io::AsyncReadExt;
    let opts = vmcred_guest::server::ServerOptions {
        handshake_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let g = start_with("", Limits::default(), opts).await;
    let mut idle = idle_peers(&g.socket, 1).await;
    // The guest closes the silent peer once its deadline passed (EOF),
    // within a bounded wait.
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), idle[0].read(&mut buf))
        .await
        .expect("the guest never closed the silent peer")
        .unwrap_or(0);
    assert_eq!(n, 0);
}

/// 40 stalled connections, more than the handshake slots, with a deadline
/// far away: the real host still gets in at once, because a new
/// connection evicts the oldest unauthenticated one.
#[tokio::test]
async fn stalled_handshakes_cannot_lock_the_host_out() {
    use std::time::Duration;
    let opts = vmcred_guest::server::ServerOptions {
        handshake_timeout: Duration::from_secs(3600),
        ..Default::default()
    };
    let g = start_with("", Limits::default(), opts).await;
    let _idle = idle_peers(&g.socket, 40).await;
    let mut c = tokio::time::timeout(Duration::from_secs(20), g.client())
        .await
        .expect("the real host got in past 40 stalled connections");
    c.hello(hello()).await.unwrap();
    applied(&mut c, 1, vec![cred("A", b"a")], &[]).await;
}

async fn idle_peers(socket: &std::path::Path, n: usize) -> Vec<tokio::net::UnixStream> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(tokio::net::UnixStream::connect(socket).await.unwrap());
    }
    // Let the server accept them before the real host queues up.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    v
}

#[tokio::test]
async fn an_apply_finishes_its_unit_actions_when_the_host_hangs_up() {
    use std::time::{Duration, Instant};
    let g = start(
        "[credentials.A]\nrestart_units = [\"slow1.service\", \"slow2.service\"]\n",
        Limits::default(),
    )
    .await;
    let mut c = g.client().await;
    let cut = tokio::time::timeout(
        Duration::from_millis(200),
        c.apply(apply(1, vec![cred("A", b"a")], &[])),
    )
    .await;
    assert!(cut.is_err(), "the call should still be running");
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(10);
    while g.calls().lines().count() < 2 {
        assert!(
            Instant::now() < deadline,
            "unit actions abandoned: {:?}",
            g.calls()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        g.calls(),
        "try-restart slow1.service\ntry-restart slow2.service\n"
    );
    assert_eq!(g.store.state().generation, 1);
    assert_eq!(g.read("A").unwrap(), b"a");
}

/// Issue 9, "also": the store's lock held by another process is ABORTED
/// (the host retries the same content), not a dropped connection, and
/// nothing is applied.
#[tokio::test]
async fn a_busy_store_is_aborted_and_nothing_applied() {
    let g = start("", Limits::default()).await;
    let mut c = g.client().await;
    applied(&mut c, 1, vec![cred("A", b"a1")], &[]).await;
    let lock = std::fs::File::open(g.state.join("write.lock")).unwrap();
    let held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive).unwrap();
    // A bounded wait: an agent that blocks on the lock never answers.
    let e = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        c.apply(apply(2, vec![cred("A", b"a2")], &[])),
    )
    .await
    .expect("the Apply waited on the lock instead of answering")
    .unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e:?}");
    assert!(e.message().contains("locked"), "{}", e.message());
    assert_eq!(g.read("A").unwrap(), b"a1");
    assert_eq!(g.store.state().generation, 1);
    // Same connection, same content, once the lock is free: applied.
    drop(held);
    let r = applied(&mut c, 2, vec![cred("A", b"a2")], &[]).await;
    assert_eq!(r.applied_generation, 2);
    assert_eq!(g.read("A").unwrap(), b"a2");
}

/// Guest root removed `write.lock` while the agent ran, and another
/// process (a second agent) created and locked a new one: the agent's next
/// `Apply` must find the store busy (ABORTED, nothing applied), not write
/// under its lock of the unlinked file.
#[tokio::test]
async fn a_store_whose_lock_file_was_replaced_is_aborted_while_the_new_one_is_held() {
    let g = start("", Limits::default()).await;
    let mut c = g.client().await;
    applied(&mut c, 1, vec![cred("A", b"a1")], &[]).await;
    let path = g.state.join("write.lock");
    std::fs::remove_file(&path).unwrap();
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap();
    let held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive).unwrap();
    let e = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        c.apply(apply(2, vec![cred("A", b"a2")], &[])),
    )
    .await
    .expect("the Apply waited on the lock instead of answering")
    .expect_err("applied while another process held the lock file now in place");
    assert_eq!(e.code(), Code::Aborted, "{e:?}");
    assert_eq!(g.read("A").unwrap(), b"a1");
    assert_eq!(g.store.state().generation, 1);
    drop(held);
    let r = applied(&mut c, 2, vec![cred("A", b"a2")], &[]).await;
    assert_eq!(r.applied_generation, 2);
    assert_eq!(g.read("A").unwrap(), b"a2");
}

fn owed(units: &[vmcred_proto::rpc::pb::UnitResult]) -> Vec<(String, String)> {
    units
        .iter()
        .map(|u| (u.unit.clone(), u.action.clone()))
        .collect()
}

/// Issue 9, operator: a failed unit action stays owed (state.json), is
/// reported in both replies, retried on the next Apply even with unchanged
/// bytes, and cleared when it succeeds or its credential is unmapped.
#[tokio::test]
async fn a_failed_unit_action_stays_owed_until_it_succeeds() {
    let g = start(
        "[credentials.A]\nrestart_units = [\"flaky.service\"]\n[credentials.B]\nreload_units = [\"bad.service\"]\n",
        Limits::default(),
    )
    .await;
    let broken = g.calls.with_extension("broken");
    std::fs::write(&broken, b"").unwrap();
    let mut c = g.client().await;
    let r = applied(&mut c, 1, vec![cred("A", b"a1"), cred("B", b"b1")], &[]).await;
    assert_eq!(r.applied_generation, 1);
    let want = vec![
        ("flaky.service".to_string(), "restart".to_string()),
        ("bad.service".to_string(), "reload".to_string()),
    ];
    assert_eq!(owed(&r.owed_units), want);
    assert!(r.owed_units.iter().all(|u| !u.ok && !u.error.is_empty()));
    let h = c.hello(hello()).await.unwrap().into_inner();
    assert_eq!(owed(&h.owed_units), want);
    let text = std::fs::read_to_string(g.state.join("state.json")).unwrap();
    assert!(text.contains("flaky.service"), "{text}");

    // Unchanged bytes, a newer generation: nothing written, but the owed
    // actions are retried (and still fail).
    std::fs::write(&g.calls, b"").unwrap();
    let r = applied(&mut c, 2, vec![cred("A", b"a1"), cred("B", b"b1")], &[]).await;
    assert_eq!(r.applied_generation, 2);
    assert_eq!(owed(&r.owed_units), want);
    assert!(
        g.calls().contains("try-restart flaky.service"),
        "{}",
        g.calls()
    );

    // The unit is fixed: the next Apply's retry clears it; B's unmapped
    // or removed credential clears the other.
    std::fs::remove_file(&broken).unwrap();
    let r = applied(&mut c, 3, vec![cred("A", b"a1")], &["B"]).await;
    assert_eq!(
        owed(&r.owed_units),
        vec![("bad.service".to_string(), "reload".to_string())],
        "the removal's own reload failed and is owed until the next prune"
    );
    let r = applied(&mut c, 4, vec![cred("A", b"a1")], &[]).await;
    assert!(r.owed_units.is_empty(), "{:?}", r.owed_units);
    let h = c.hello(hello()).await.unwrap().into_inner();
    assert!(h.owed_units.is_empty());
}

/// A Hello wakes the retry of owed actions in the background.
#[tokio::test]
async fn a_hello_retries_owed_actions() {
    use std::time::{Duration, Instant};
    let g = start(
        "[credentials.A]\nrestart_units = [\"flaky.service\"]\n",
        Limits::default(),
    )
    .await;
    let broken = g.calls.with_extension("broken");
    std::fs::write(&broken, b"").unwrap();
    let mut c = g.client().await;
    let r = applied(&mut c, 1, vec![cred("A", b"a1")], &[]).await;
    assert_eq!(r.owed_units.len(), 1);
    std::fs::remove_file(&broken).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let h = c.hello(hello()).await.unwrap().into_inner();
        if h.owed_units.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never retried: {:?}",
            h.owed_units
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(g.store.state().owed, vec![]);
}

/// Owed actions survive an agent restart (state.json) and are retried at
/// start; one the configuration no longer maps is dropped.
#[tokio::test]
async fn owed_actions_are_retried_after_a_restart() {
    use std::collections::BTreeSet;
    use std::time::{Duration, Instant};
    use vmcred_guest::store::{Owed, State, Store};
    use vmcred_guest::units::{Action, UnitRunner};
    let tmp = tempfile::tempdir().unwrap();
    let (creds, state, calls) = (
        tmp.path().join("creds"),
        tmp.path().join("state"),
        tmp.path().join("calls"),
    );
    std::fs::create_dir(&creds).unwrap();
    let store = Store::open(&creds, &state, Limits::default()).unwrap();
    store.batch().unwrap().write("A", b"a", 0o400).unwrap();
    let a: BTreeSet<String> = ["A".to_string()].into();
    let owed = vec![
        Owed {
            unit: "flaky.service".into(),
            action: Action::Restart,
            credentials: a.clone(),
            error: "Job for flaky.service failed.".into(),
        },
        Owed {
            unit: "gone.service".into(),
            action: Action::Restart,
            credentials: a.clone(),
            error: String::new(),
        },
    ];
    store
        .batch()
        .unwrap()
        .commit(State {
            generation: 5,
            managed: a,
            owed,
        })
        .unwrap();
    drop(store);
    // The "restart": a new store and service on the same directories.
    let store = std::sync::Arc::new(Store::open(&creds, &state, Limits::default()).unwrap());
    let config = vmcred_guest::config::GuestConfig::parse(
        "[credentials.A]\nrestart_units = [\"flaky.service\"]\n",
    )
    .unwrap();
    let _service = vmcred_guest::service::GuestService::new(
        store.clone(),
        std::sync::Arc::new(config),
        UnitRunner::new(common::recording_systemctl(tmp.path(), &calls)),
        std::sync::Arc::new(vmcred_guest::notify::Readiness::new()),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !store.state().owed.is_empty() {
        assert!(Instant::now() < deadline, "owed: {:?}", store.state().owed);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        std::fs::read_to_string(&calls).unwrap(),
        "try-restart flaky.service\n"
    );
    let text = std::fs::read_to_string(state.join("state.json")).unwrap();
    assert!(!text.contains("owed"), "{text}");
}

/// A host that went away without a close (a VMM does not always pass one
/// on) stops answering: the guest's HTTP/2 keepalive ends its session
/// within `keepalive_interval + keepalive_timeout` of its last frame
/// (140 s with the defaults; 2 s here).
#[tokio::test]
async fn a_silent_hosts_session_is_closed_by_the_keepalive() {
    use std::time::Duration;
    use tokio::io::AsyncReadExt;
    let opts = vmcred_guest::server::ServerOptions {
        keepalive_interval: Duration::from_secs(1),
        keepalive_timeout: Duration::from_secs(1),
        ..Default::default()
    };
    let g = start_with("", Limits::default(), opts).await;
    // A relay between the host and the guest that goes silent on cue and
    // then only watches for the guest's close.
    let relay_path = g.tmp.path().join("relay.sock");
    let relay = tokio::net::UnixListener::bind(&relay_path).unwrap();
    let guest_socket = g.socket.clone();
    let (silence, silenced) = tokio::sync::oneshot::channel::<()>();
    let watcher = tokio::spawn(async move {
        let (mut host, _) = relay.accept().await.unwrap();
        let mut guest = tokio::net::UnixStream::connect(&guest_socket)
            .await
            .unwrap();
        tokio::select! {
            r = tokio::io::copy_bidirectional(&mut host, &mut guest) => panic!("relay ended early: {r:?}"),
            _ = silenced => {}
        }
        let mut buf = [0u8; 4096];
        while guest.read(&mut buf).await.unwrap_or(0) > 0 {}
        drop(host);
    });
    let mut c = connect(&relay_path, &g.host).await.unwrap();
    c.hello(hello()).await.unwrap();
    silence.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(60), watcher)
        .await
        .expect("the guest kept a silent host's session open")
        .unwrap();
}
