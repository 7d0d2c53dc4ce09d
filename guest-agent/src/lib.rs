//! vmcred's guest agent. The binary (`main.rs`) wires these together; they
//! are a library so the integration tests can drive the real pieces.

pub mod admission;
pub mod bootstrap;
pub mod cli;
pub mod config;
pub mod creds_socket;
pub mod listener;
pub mod logs;
pub mod notify;
pub mod owed;
pub mod pins;
pub mod server;
pub mod service;
pub mod store;
pub mod units;
