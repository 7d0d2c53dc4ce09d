//! vmcred-vsock-probe: runs the AF_VSOCK admission rule on real sockets,
//! INSIDE a test guest only (tests/vm copies it in; the machine that runs
//! the tests never opens AF_VSOCK). The guest's `vsock_loopback` transport
//! gives it a real peer: CID 1 (`VMADDR_CID_LOCAL`) stands in for the host.
//!
//! - `serve`: listens on a port, accepts connections and prints each peer's
//!   address with the verdict of the guest agent's own admission function
//!   (`vmcred_guest::admission::admit_as_host`, CID 1 as the host) under
//!   both bootstrap rules.
//! - `dial`: connects with the host agent's own dialer
//!   (`vmcred_proto::transport::dial`, privileged source port) and prints
//!   the source port it got, or the dialer's error.
//! - `flood`: opens plain connections (the kernel picks the source port,
//!   as for any user) and reports how many the peer closed without sending
//!   a byte.
//!
//! Output is `key=value` lines for tests/vm/matrix.sh to check.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use nix::sys::socket::{
    accept, bind, connect, getpeername, getsockname, listen, recv, setsockopt, socket, sockopt,
    AddressFamily, Backlog, MsgFlags, SockFlag, SockType, VsockAddr,
};
use nix::sys::time::TimeVal;
use vmcred_guest::admission::admit_as_host;
use vmcred_proto::bootstrap::HostTransport;
use vmcred_proto::transport::{dial, Stream, Target};

/// `VMADDR_CID_LOCAL`: the loopback transport's CID.
const LOOPBACK_CID: u32 = 1;

#[derive(Parser)]
#[command(about = "AF_VSOCK admission proofs inside a test guest (never on the test machine)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Accept COUNT connections on PORT (any CID) and print each peer and
    /// the admission verdicts, CID 1 standing in for the host.
    Serve {
        #[arg(long)]
        port: u32,
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// Give up after this many seconds without a connection.
        #[arg(long, default_value_t = 30)]
        wait: u64,
    },
    /// Dial CID:PORT with the host agent's dialer (privileged source port).
    Dial {
        #[arg(long, default_value_t = LOOPBACK_CID)]
        cid: u32,
        #[arg(long)]
        port: u32,
    },
    /// Open COUNT plain connections to CID:PORT at once and report how many
    /// the peer closed without sending anything.
    Flood {
        #[arg(long, default_value_t = LOOPBACK_CID)]
        cid: u32,
        #[arg(long)]
        port: u32,
        #[arg(long, default_value_t = 40)]
        count: usize,
        /// How long each connection may stay open before it counts as
        /// not closed.
        #[arg(long, default_value_t = 10)]
        wait: u64,
    },
}

fn vsock_socket() -> io::Result<OwnedFd> {
    socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)
}

fn serve(port: u32, count: usize, wait: u64) -> Result<()> {
    let fd = vsock_socket().context("socket(AF_VSOCK)")?;
    bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port))
        .with_context(|| format!("bind vsock port {port}"))?;
    listen(&fd, Backlog::new(64).context("backlog")?).context("listen")?;
    // accept(2) honours SO_RCVTIMEO: a bounded wait, never a hang.
    setsockopt(
        &fd,
        sockopt::ReceiveTimeout,
        &TimeVal::new(wait.try_into().unwrap_or(i64::MAX), 0),
    )
    .context("SO_RCVTIMEO")?;
    println!("listening port={port}");
    for _ in 0..count {
        let conn = accept(fd.as_raw_fd()).context("accept (none came in time?)")?;
        // SAFETY: accept returned a new descriptor that nothing else owns.
        let conn = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(conn) };
        let peer: VsockAddr = getpeername(conn.as_raw_fd()).context("getpeername")?;
        let (cid, pport) = (peer.cid(), peer.port());
        let strict = admit_as_host(LOOPBACK_CID, cid, pport, HostTransport::Vsock);
        let hybrid = admit_as_host(LOOPBACK_CID, cid, pport, HostTransport::Hybrid);
        println!(
            "peer cid={cid} port={pport} privileged={} vsock-rule={strict:?} hybrid-rule={hybrid:?}",
            pport < 1024
        );
    }
    Ok(())
}

async fn dial_once(cid: u32, port: u32) -> Result<()> {
    let target = Target::Vsock { cid, port };
    let stream = dial(&target, Duration::from_secs(10)).await?;
    let Stream::Vsock(s) = stream else {
        bail!("the dialer returned a non-vsock stream for {target}");
    };
    let local = s.local_addr().context("local address")?;
    println!(
        "dialed target={target} source-cid={} source-port={}",
        local.cid(),
        local.port()
    );
    Ok(())
}

fn flood(cid: u32, port: u32, count: usize, wait: u64) -> Result<()> {
    let mut conns = Vec::with_capacity(count);
    let mut refused_at_connect = 0usize;
    for _ in 0..count {
        let fd = vsock_socket().context("socket(AF_VSOCK)")?;
        match connect(fd.as_raw_fd(), &VsockAddr::new(cid, port)) {
            Ok(()) => conns.push(fd),
            Err(_) => refused_at_connect += 1,
        }
    }
    let mut min_port = u32::MAX;
    let (mut closed, mut open, mut bytes) = (0usize, 0usize, 0usize);
    let deadline = Instant::now() + Duration::from_secs(wait);
    for fd in &conns {
        if let Ok(local) = getsockname::<VsockAddr>(fd.as_raw_fd()) {
            min_port = min_port.min(local.port());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let left = TimeVal::new(
            left.as_secs().try_into().unwrap_or(i64::MAX),
            left.subsec_micros().into(),
        );
        setsockopt(fd, sockopt::ReceiveTimeout, &left).context("SO_RCVTIMEO")?;
        let mut buf = [0u8; 512];
        let mut got = 0usize;
        let verdict = loop {
            match recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                Ok(0) => break true,
                Ok(n) => got += n,
                Err(nix::errno::Errno::ECONNRESET) => break true,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => break false,
            }
        };
        bytes += got;
        if verdict {
            closed += 1;
        } else {
            open += 1;
        }
    }
    println!(
        "flood target={cid}:{port} connected={} refused-at-connect={refused_at_connect} closed-by-peer={closed} still-open={open} bytes-received={bytes} lowest-source-port={min_port}",
        conns.len()
    );
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Serve { port, count, wait } => serve(port, count, wait),
        Cmd::Dial { cid, port } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("tokio runtime")
            .and_then(|rt| rt.block_on(dial_once(cid, port))),
        Cmd::Flood {
            cid,
            port,
            count,
            wait,
        } => flood(cid, port, count, wait),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("error={e:#}");
            ExitCode::FAILURE
        }
    }
}
