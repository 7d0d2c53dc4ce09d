//! An `ApplyRequest` as the guest agent receives it: prost decode, then the
//! real `Apply` handler against a real store in a fresh directory.
//!
//! Invariants: no panic; a request the handler refuses changes nothing in
//! the credentials or state directory; no temporary file survives any
//! request; an accepted request never acknowledges a generation it did not
//! fully apply, never goes back, and every file it reports written holds
//! exactly the bytes that were sent; the message round-trips through prost.

use prost::Message;
use tonic::{Code, Request};
use vmcred_fuzz::{is_temp_name, snapshot, GuestFixture, BASE_GENERATION};
use vmcred_proto::rpc::pb::{ApplyRequest, Outcome};
use vmcred_proto::rpc::Guest;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Ok(req) = ApplyRequest::decode(data) else {
            return;
        };
        let again = ApplyRequest::decode(req.encode_to_vec().as_slice())
            .expect("a decoded message re-encodes to a decodable one");
        assert_eq!(again, req, "prost round trip");

        let fx = GuestFixture::new();
        let creds_before = snapshot(&fx.creds);
        let state_before = snapshot(&fx.state);
        let sent = req.clone();
        let result = fx.rt.block_on(fx.service.apply(Request::new(req)));
        let creds_after = snapshot(&fx.creds);
        let state_after = snapshot(&fx.state);

        for name in creds_after.keys() {
            assert!(!is_temp_name(name), "temporary file {name:?} left behind");
        }
        match result {
            Err(status) => {
                assert!(
                    matches!(
                        status.code(),
                        Code::InvalidArgument | Code::FailedPrecondition | Code::Aborted
                    ),
                    "unexpected refusal {:?}: {}",
                    status.code(),
                    status.message()
                );
                assert_eq!(
                    creds_before, creds_after,
                    "a refused Apply changed credentials"
                );
                // The lock file may appear; the state itself must not change.
                assert_eq!(
                    state_before.get("state.json"),
                    state_after.get("state.json"),
                    "a refused Apply changed the state"
                );
                assert!(status.message().len() < 4096, "unbounded error message");
            }
            Ok(reply) => {
                let reply = reply.into_inner();
                let state = fx.store.state();
                assert!(
                    sent.generation > BASE_GENERATION,
                    "accepted an old generation"
                );
                assert!(
                    reply.applied_generation == BASE_GENERATION
                        || reply.applied_generation == sent.generation,
                    "applied generation {} is neither the old nor the sent one",
                    reply.applied_generation
                );
                assert_eq!(state.generation, reply.applied_generation);
                let failed = reply
                    .results
                    .iter()
                    .any(|r| r.outcome == Outcome::Failed as i32);
                if failed {
                    assert_ne!(
                        reply.applied_generation, sent.generation,
                        "acknowledged a generation with a failed credential"
                    );
                }
                for r in &reply.results {
                    if r.outcome == Outcome::Written as i32
                        || r.outcome == Outcome::Unchanged as i32
                    {
                        let up = sent
                            .upserts
                            .iter()
                            .find(|u| u.name == r.name)
                            .expect("a result for a name that was sent");
                        let on_disk = creds_after
                            .get(&r.name)
                            .unwrap_or_else(|| panic!("{:?} reported written but absent", r.name));
                        assert_eq!(on_disk.bytes, up.value, "{:?} holds other bytes", r.name);
                    }
                    if r.outcome == Outcome::Removed as i32 {
                        assert!(
                            !creds_after.contains_key(&r.name),
                            "{:?} not removed",
                            r.name
                        );
                    }
                }
                assert!(
                    creds_after.contains_key("vmcred.bootstrap"),
                    "the bootstrap credential was removed"
                );
                // The host may replace a boot-time value (that is how a
                // rotated value shadows it), but never remove it.
                let replaced = reply.results.iter().any(|r| {
                    r.name == vmcred_fuzz::FOREIGN && r.outcome == Outcome::Written as i32
                });
                if !replaced {
                    assert_eq!(
                        creds_after
                            .get(vmcred_fuzz::FOREIGN)
                            .map(|e| e.bytes.as_slice()),
                        Some(vmcred_fuzz::FOREIGN_VALUE),
                        "a boot-time credential vmcred does not manage was touched"
                    );
                }
            }
        }
    });
}
