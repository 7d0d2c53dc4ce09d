//! The control and launch protocols (`vmcred_host::control`): one JSON
//! line each way over a Unix socket. The first input byte picks what is
//! read: a request as the daemon reads it from `rotate`/`status`/`launched`
//! clients (both sockets), or a reply as `rotate`/`status` read it.
//! Invariants: no panic; a line over `MAX_LINE` is refused as too long; a
//! line without its newline is refused; what is accepted re-encodes to one
//! line that reads back to the same value.

use std::time::Duration;

use vmcred_fuzz::rt;
use vmcred_host::control::{read_line, write_line, LineError, Reply, Request, MAX_LINE};

fn round_trip<T>(value: &T)
where
    T: serde::Serialize + for<'de> serde::Deserialize<'de>,
{
    let mut line = Vec::new();
    rt().block_on(write_line(&mut line, value))
        .expect("write_line to memory");
    assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1, "one line");
    assert_eq!(line.last(), Some(&b'\n'));
    let back: T = rt()
        .block_on(read_line(line.as_slice(), Duration::from_secs(5)))
        .expect("a written line reads back");
    assert_eq!(
        serde_json::to_value(&back).expect("to json"),
        serde_json::to_value(value).expect("to json"),
        "round trip"
    );
}

fn check<T>(input: &[u8])
where
    T: serde::Serialize + for<'de> serde::Deserialize<'de>,
{
    match rt().block_on(read_line::<_, T>(input, Duration::from_secs(5))) {
        Ok(v) => {
            let nl = input
                .iter()
                .position(|b| *b == b'\n')
                .expect("accepted without a newline");
            assert!(nl < MAX_LINE, "accepted a line of {} bytes", nl + 1);
            round_trip(&v);
        }
        Err(LineError::TooLong) => assert!(input.len() > MAX_LINE),
        Err(LineError::Closed) => assert!(!input[..input.len().min(MAX_LINE + 1)].contains(&b'\n')),
        Err(LineError::Timeout(_)) => panic!("reading from memory timed out"),
        Err(_) => {}
    }
}

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Some((&which, body)) = data.split_first() else {
            return;
        };
        if which & 1 == 0 {
            check::<Request>(body);
        } else {
            check::<Reply>(body);
        }
    });
}
