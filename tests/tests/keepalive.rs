//! The keepalive probe of an idle session: mostly HTTP/2 PINGs, every
//! second one a `Hello` (ARCHITECTURE.md, "Keepalive"). PINGs must keep a
//! live session up, and a guest that stops answering (a VMM that passes
//! no close on) must still be noticed. Real agents behind the muxer
//! stand-in; no timed assertions.

use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use vmcred_tests::{wait_until, World};

const T: Duration = Duration::from_secs(60);
const VM: &str = "vm1";

fn booted() -> World {
    vmcred_tests::booted_one(VM, "token", b"one", "keepalive_interval = \"1s\"", T).expect("booted")
}

fn connected(w: &World) -> bool {
    w.status_json()
        .ok()
        .and_then(|v| v[0]["connected"].as_bool())
        == Some(true)
}

fn host_log(w: &World) -> String {
    std::fs::read_to_string(&w.host_log).unwrap_or_default()
}

fn guest_log(w: &World) -> String {
    std::fs::read_to_string(&w.guests[VM].log).unwrap_or_default()
}

fn guest_pid(w: &World) -> Pid {
    Pid::from_raw(w.guests[VM].child.as_ref().expect("guest running").id() as i32)
}

/// Probes alternate between PING and `Hello` on one session: the guest
/// sees `Hello`s keep coming (the PINGs between them never reach its
/// service) and the host never loses the session over a PING.
#[test]
fn pings_keep_an_idle_session_up_with_a_hello_every_second_probe() {
    let w = booted();
    let hellos = |w: &World| guest_log(w).matches("host said hello").count();
    // Sessions brought in sync, and dials, so far (the first dial may
    // have come before the guest listened).
    let sessions = |w: &World| host_log(w).matches("and in sync").count();
    let dials = |w: &World| host_log(w).matches("connected to guest agent").count();
    wait_until(T, || sessions(&w) == 1).expect("in sync");
    let (start, dialled) = (hellos(&w), dials(&w));
    // Four more Hellos: about eight probes, half of them PINGs.
    wait_until(T, || hellos(&w) >= start + 4).expect("keepalive Hellos kept coming");
    assert!(connected(&w), "still connected");
    let log = host_log(&w);
    assert_eq!(sessions(&w), 1, "the session was never lost:\n{log}");
    assert_eq!(dials(&w), dialled, "no redial:\n{log}");
}

/// A guest that stops answering without closing (its agent stopped, as a
/// VMM up to cloud-hypervisor 52 would leave the connection of a dead
/// guest open) is shown disconnected once a probe goes unanswered for
/// `rpc_timeout`, whether that probe was a PING or a `Hello`; once it
/// answers again the host is back in sync on a new session.
#[test]
fn a_guest_that_stops_answering_is_noticed_and_found_again() {
    let w = booted();
    wait_until(T, || connected(&w)).expect("connected");
    let pid = guest_pid(&w);
    kill(pid, Signal::SIGSTOP).expect("stop the guest agent");
    let noticed = wait_until(T, || !connected(&w));
    kill(pid, Signal::SIGCONT).expect("continue the guest agent");
    noticed.expect("the host noticed the silent guest");
    wait_until(T, || connected(&w)).expect("connected again");
    assert!(
        host_log(&w).contains("reachable again"),
        "a new session after the silent one"
    );
}
