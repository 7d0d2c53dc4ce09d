//! The OpenBao reply buffer's growth leaves no copy of the secret in freed
//! memory. This test binary's allocator looks into every block freed by
//! an armed thread for a marker the test puts in its secret; a `Vec` that
//! grows by `realloc` frees blocks still holding it (the allocator's
//! `realloc` is the default one: a new block, a copy, the old block
//! freed), a buffer that wipes before it frees does not.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use vmcred_host::openbao::zbuf::ZBuf;
use zeroize::Zeroizing;

const MARK: &[u8; 16] = b"#vmcred-secret#!";

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static HITS: Cell<usize> = const { Cell::new(0) };
}

struct Watching;

// SAFETY: every call is forwarded to the system allocator unchanged;
// `dealloc` only reads the block it is given before freeing it.
unsafe impl GlobalAlloc for Watching {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if ARMED.try_with(Cell::get).unwrap_or(false) {
            // SAFETY: `ptr` is a live block of `layout.size()` bytes until
            // it is freed below; memmem only reads it (C reads the bytes
            // whether or not Rust initialised them).
            let found = unsafe {
                !libc::memmem(ptr.cast(), layout.size(), MARK.as_ptr().cast(), MARK.len()).is_null()
            };
            if found {
                let _ = HITS.try_with(|h| h.set(h.get() + 1));
            }
        }
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Watching = Watching;

/// Freed blocks holding the marker while `f` ran on this thread.
fn freed_with_mark(f: impl FnOnce()) -> usize {
    HITS.with(|h| h.set(0));
    ARMED.with(|a| a.set(true));
    f();
    ARMED.with(|a| a.set(false));
    HITS.with(Cell::get)
}

/// A reply body with the marker all through it, cut into the frames a
/// chunked reply arrives in (sizes that do not divide the marker's).
fn frames() -> (Zeroizing<Vec<u8>>, Vec<std::ops::Range<usize>>) {
    let mut body = Zeroizing::new(Vec::with_capacity(64 * 1024));
    while body.len() + MARK.len() <= 64 * 1024 {
        body.extend_from_slice(MARK);
    }
    let mut cuts = Vec::new();
    let mut at = 0;
    let mut size = 1;
    while at < body.len() {
        let end = (at + size).min(body.len());
        cuts.push(at..end);
        at = end;
        size = size * 3 % 1021 + 7;
    }
    (body, cuts)
}

#[test]
fn the_watch_sees_an_unwiped_block() {
    // The check itself works: a plain Vec with the marker, freed.
    let hits = freed_with_mark(|| {
        let v = MARK.to_vec();
        drop(std::hint::black_box(v));
    });
    assert_eq!(hits, 1);
}

#[test]
fn a_growing_reply_buffer_frees_no_copy_of_the_secret() {
    let (body, cuts) = frames();
    let mut grew = 0;
    let hits = freed_with_mark(|| {
        // No length known: a chunked reply.
        let mut buf = ZBuf::with_capacity(0);
        let mut cap = buf.capacity();
        for r in &cuts {
            buf.extend(&body[r.clone()]);
            if buf.capacity() != cap {
                grew += 1;
                cap = buf.capacity();
            }
        }
        let whole = buf.into_inner();
        assert_eq!(&whole[..], &body[..]);
    });
    assert!(grew >= 8, "the buffer grew only {grew} times");
    assert_eq!(
        hits, 0,
        "{hits} freed blocks still held secret bytes after {grew} growths"
    );
}

#[test]
fn serialising_into_the_buffer_frees_no_copy_of_the_secret() {
    // The AppRole login body: serde_json writes through io::Write in
    // pieces, with escapes the size guess cannot know.
    let secret = Zeroizing::new(format!("{}\n\n\n", String::from_utf8_lossy(MARK)).repeat(200));
    let hits = freed_with_mark(|| {
        let mut buf = ZBuf::with_capacity(16);
        serde_json::to_writer(&mut buf, &[secret.as_str()]).unwrap();
        assert!(buf.len() > secret.len());
    });
    assert_eq!(hits, 0);
}
