//! The control and launch protocols (`vmcred_host::control`): JSON lines
//! over a Unix socket. The first input byte picks what is read: a request
//! as the daemon reads it from `rotate`/`status`/`rotate-key`/`launched`
//! clients (both sockets), one reply line, or a streamed reply (items, then
//! a terminal line) as the CLI reads it with `LineReader`.
//! Invariants: no panic; a line over `MAX_LINE` is refused as too long; a
//! line without its newline is refused; what is accepted re-encodes to one
//! line that reads back to the same value; a stream ends at its first
//! terminal line; an accepted `rotate` or `status` item whose lists are
//! blown up past the line limit is cut by `bound_rotate`/`bound_status` to
//! a line the CLI can read, and a dropped failed unit is never hidden
//! behind a marker that says "ok".

use std::time::Duration;

use vmcred_fuzz::rt;
use vmcred_host::control::{
    bound_rotate, bound_status, read_line, write_line, LineError, LineReader, Reply, Request,
    MAX_LINE, OMITTED,
};

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

fn check<T>(input: &[u8]) -> Option<T>
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
            Some(v)
        }
        Err(LineError::TooLong) => {
            assert!(input.len() > MAX_LINE);
            None
        }
        Err(LineError::Closed) => {
            assert!(!input[..input.len().min(MAX_LINE + 1)].contains(&b'\n'));
            None
        }
        Err(LineError::Timeout(_)) => panic!("reading from memory timed out"),
        Err(_) => None,
    }
}

/// Most lines read from one streamed input.
const MAX_STREAM_LINES: usize = 64;

/// Whether the CLI can read `reply` as one line.
fn fits(reply: &Reply) -> bool {
    serde_json::to_vec(reply).expect("to json").len() < MAX_LINE
}

/// `items` `n` times over, in order.
fn repeated<T: Clone>(items: &[T], n: usize) -> Vec<T> {
    items
        .iter()
        .cycle()
        .take(items.len() * n)
        .cloned()
        .collect()
}

/// Blows the lists of an accepted item up past the line limit, then checks
/// what the daemon would send instead.
fn check_bound(reply: &Reply) {
    // Copies of an item's lists that take its line past the limit, made
    // at once (one serialization to size them, not one per doubling).
    let copies = |lists: usize| MAX_LINE / lists.max(1) + 1;
    match reply {
        Reply::Rotate(r) if !r.units.is_empty() || !r.credentials.is_empty() => {
            let lists = serde_json::to_vec(&(&r.units, &r.credentials))
                .expect("to json")
                .len();
            let n = copies(lists);
            let mut big = r.clone();
            big.units = repeated(&r.units, n);
            big.credentials = repeated(&r.credentials, n);
            let any_failed = big.units.iter().any(|u| !u.ok);
            let cut = bound_rotate(big);
            assert!(
                fits(&Reply::Rotate(cut.clone())),
                "bound_rotate left a line too long"
            );
            if any_failed {
                assert!(
                    cut.units.iter().any(|u| !u.ok),
                    "a failed unit action was dropped behind an \"ok\" marker"
                );
            }
            if let Some(m) = cut.units.iter().find(|u| u.unit == OMITTED) {
                assert!(m.error.is_some(), "a marker says how many were left out");
            }
        }
        Reply::Status(st) if !st.credentials.is_empty() => {
            let lists = serde_json::to_vec(&st.credentials).expect("to json").len();
            let n = copies(lists);
            let mut big = st.clone();
            big.credentials = repeated(&st.credentials, n);
            let cut = bound_status(big);
            assert!(
                fits(&Reply::Status(cut)),
                "bound_status left a line too long"
            );
        }
        _ => {}
    }
}

fn stream(input: &[u8]) {
    let lines = input.iter().filter(|b| **b == b'\n').count();
    let read = rt().block_on(async {
        let mut r = LineReader::new(input);
        let mut read = Vec::new();
        while read.len() < MAX_STREAM_LINES {
            match r.next::<Reply>(Duration::from_secs(5)).await {
                Ok(reply) => {
                    let end = reply.is_terminal();
                    read.push(reply);
                    if end {
                        break;
                    }
                }
                Err(LineError::Timeout(_)) => panic!("reading from memory timed out"),
                Err(_) => break,
            }
        }
        read
    });
    assert!(read.len() <= lines, "more lines read than the input has");
    for (i, reply) in read.iter().enumerate() {
        assert!(
            !reply.is_terminal() || i == read.len() - 1,
            "read past a terminal line"
        );
        round_trip(reply);
    }
}

fn main() {
    afl::fuzz!(|data: &[u8]| {
        // Bits 0-1: request, reply, stream; 13 exactly (a reply): blow up
        // the lists.
        let Some((&which, body)) = data.split_first() else {
            return;
        };
        match which & 3 {
            0 => {
                check::<Request>(body);
            }
            1 => {
                let reply = check::<Reply>(body);
                // Blowing an item up costs milliseconds: a flag asks for it.
                if let (Some(reply), true) = (reply, which == 13) {
                    check_bound(&reply);
                }
            }
            _ => stream(body),
        }
    });
}
