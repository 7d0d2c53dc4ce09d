//! A `HelloRequest` as the guest agent receives it: prost decode, then the
//! real `Hello` handler on a real store. Invariants: no panic; the reply
//! lists only valid names with 32-byte digests; nothing on disk changes;
//! the message round-trips through prost.

use std::sync::OnceLock;

use prost::Message;
use tonic::Request;
use vmcred_fuzz::{rt, snapshot, GuestFixture, BASE_GENERATION};
use vmcred_proto::rpc::pb::HelloRequest;
use vmcred_proto::rpc::Guest;

/// Hello only reads, so one store serves every execution.
static FX: OnceLock<GuestFixture> = OnceLock::new();

fn main() {
    let before = snapshot(&FX.get_or_init(GuestFixture::new).creds);
    afl::fuzz!(|data: &[u8]| {
        let fx = FX.get_or_init(GuestFixture::new);
        let Ok(req) = HelloRequest::decode(data) else {
            return;
        };
        let again = HelloRequest::decode(req.encode_to_vec().as_slice())
            .expect("a decoded message re-encodes to a decodable one");
        assert_eq!(again, req, "prost round trip");
        let reply = rt()
            .block_on(fx.service.hello(Request::new(req)))
            .expect("Hello on a healthy store succeeds")
            .into_inner();
        assert_eq!(reply.applied_generation, BASE_GENERATION);
        for h in &reply.held {
            assert!(
                vmcred_proto::rules::validate_name(&h.name).is_ok(),
                "{:?}",
                h.name
            );
            assert_eq!(h.sha256.len(), 32);
        }
        assert_eq!(snapshot(&fx.creds), before, "Hello changed the store");
    });
}
