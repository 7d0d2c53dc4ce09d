//! A growable byte buffer for secret bytes whose growth leaves no copy
//! behind. `Vec` grows by `realloc`, which frees (or leaves in place)
//! the old block without wiping it, and `Zeroizing` wipes only the block
//! the `Vec` holds when it is dropped; so a `Zeroizing<Vec<u8>>` that grows
//! leaves each earlier block's secret bytes in freed memory. [`ZBuf`]
//! grows by allocating the new block itself, copying, and wiping the old
//! one before it is freed.

use zeroize::Zeroizing;

/// Smallest block a growing buffer takes, so that small writes do not
/// reallocate on each byte.
const MIN_GROWTH: usize = 256;

/// Secret bytes, wiped when dropped and whenever they move.
#[derive(Default)]
pub struct ZBuf(Zeroizing<Vec<u8>>);

impl ZBuf {
    /// A buffer holding `capacity` bytes before its first growth (the
    /// reply's length, when known, so that it never moves).
    pub fn with_capacity(capacity: usize) -> ZBuf {
        ZBuf(Zeroizing::new(Vec::with_capacity(capacity)))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.0.capacity()
    }

    /// Appends `data`. When the block is full, the buffer moves to one of
    /// at least twice the size (so a reply of n bytes costs O(n) copying),
    /// and the old block is wiped before it is freed.
    pub fn extend(&mut self, data: &[u8]) {
        let need = self.0.len().saturating_add(data.len());
        if need > self.0.capacity() {
            let cap = need
                .max(self.0.capacity().saturating_mul(2))
                .max(MIN_GROWTH);
            let mut grown = Zeroizing::new(Vec::with_capacity(cap));
            grown.extend_from_slice(&self.0);
            // The old block is dropped here: `Zeroizing` wipes its whole
            // capacity before it is freed.
            drop(std::mem::replace(&mut self.0, grown));
        }
        // Within capacity: `extend_from_slice` does not reallocate.
        self.0.extend_from_slice(data);
    }

    pub fn into_inner(self) -> Zeroizing<Vec<u8>> {
        self.0
    }
}

impl AsRef<[u8]> for ZBuf {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// For serialisers (the AppRole login body): every write goes through
/// [`ZBuf::extend`].
impl std::io::Write for ZBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.extend(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_hold_everything_in_order() {
        let mut b = ZBuf::default();
        let mut want = Vec::new();
        for i in 0..1000u32 {
            let piece = i.to_le_bytes();
            b.extend(&piece);
            want.extend_from_slice(&piece);
        }
        assert_eq!(b.len(), 4000);
        assert!(b.capacity() < 2 * 4000 + MIN_GROWTH);
        assert_eq!(&b.into_inner()[..], &want[..]);
        let mut exact = ZBuf::with_capacity(10);
        exact.extend(b"0123456789");
        assert_eq!(exact.capacity(), 10, "a known length never grows");
    }
}
