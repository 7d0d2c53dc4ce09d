//! A `HelloRequest` as the guest agent receives it: prost decode, then the
//! real `Hello` handler on a real store. Invariants: no panic; the reply
//! holds exactly the managed credential with the SHA-256 of its bytes (not
//! the boot-time one, not the bootstrap), owes nothing, pins nothing;
//! nothing on disk changes; the message round-trips through prost.

use std::sync::OnceLock;

use prost::Message;
use tonic::Request;
use vmcred_fuzz::{snapshot, GuestFixture, BASE_GENERATION, MANAGED, MANAGED_VALUE};
use vmcred_proto::rpc::pb::HelloRequest;
use vmcred_proto::rpc::Guest;

/// Hello only reads, so one store serves every execution. It is built on
/// the first input, in the process AFL++ forked (never in the fork server
/// before `afl::fuzz!`: a runtime and a store made there would be shared by
/// every child), with the snapshot every reply is compared with.
static FX: OnceLock<(GuestFixture, Snapshot)> = OnceLock::new();

type Snapshot = std::collections::BTreeMap<String, vmcred_fuzz::Entry>;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let (fx, before) = FX.get_or_init(|| {
            let fx = GuestFixture::new();
            let before = snapshot(&fx.creds);
            (fx, before)
        });
        let Ok(req) = HelloRequest::decode(data) else {
            return;
        };
        let again = HelloRequest::decode(req.encode_to_vec().as_slice())
            .expect("a decoded message re-encodes to a decodable one");
        assert_eq!(again, req, "prost round trip");
        let reply = fx
            .rt
            .block_on(fx.service.hello(Request::new(req)))
            .expect("Hello on a healthy store succeeds")
            .into_inner();
        assert_eq!(reply.applied_generation, BASE_GENERATION);
        assert!(reply.owed_units.is_empty(), "nothing is owed in this store");
        assert!(reply.pins.is_empty(), "a fixed pin is not a pin set");
        let held: Vec<&str> = reply.held.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(held, [MANAGED], "only the managed credential is held");
        for h in &reply.held {
            assert!(
                vmcred_proto::rules::validate_name(&h.name).is_ok(),
                "{:?}",
                h.name
            );
            assert_eq!(h.sha256, vmcred_proto::rules::digest(MANAGED_VALUE));
        }
        assert_eq!(&snapshot(&fx.creds), before, "Hello changed the store");
    });
}
