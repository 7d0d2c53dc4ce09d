//! The wire contract between `vmcred-host` and `vmcred-guest`: everything
//! both sides must agree on lives here, so it cannot drift.

pub mod bootstrap;
pub mod fsutil;
pub mod loglayer;
pub mod loglimit;
pub mod logline;
pub mod rpc;
pub mod rules;
pub mod tls;
pub mod transport;

/// Version string both agents send in `Hello`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
