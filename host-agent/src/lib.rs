//! vmcred's host agent. The binaries (`main.rs`: the full agent,
//! `bin/front.rs`: the `vmcred-host` front) are the command line; these are
//! a library so integration tests and fuzz targets drive the real code.

pub mod cli;
pub mod client;
pub mod config;
pub mod control;
pub mod generations;
pub mod heap;
pub mod keyring;
pub mod launch;
pub mod launch_key;
pub mod metrics;
pub mod openbao;
pub mod serve;
pub mod source;
pub mod vm;
