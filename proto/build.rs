//! Generates the gRPC code from `proto/vmcred.proto` with protox, a pure-Rust
//! protobuf compiler, so building vmcred needs no `protoc` on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/vmcred.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    // Each agent gets only its side of the service (see the features in
    // Cargo.toml): the guest serves, the host calls.
    let host = std::env::var_os("CARGO_FEATURE_HOST").is_some();
    let guest = std::env::var_os("CARGO_FEATURE_GUEST").is_some();
    tonic_prost_build::configure()
        .build_client(host)
        .build_server(guest)
        .build_transport(false)
        .compile_fds(fds)?;
    Ok(())
}
