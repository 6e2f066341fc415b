//! The outbound byte queue: encoded frames waiting to be written.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};

/// Payloads at least this large are queued by reference (no copy) after their header.
const SHARE_THRESHOLD: usize = 4096;

/// Encoded frames waiting for the socket, as a [`Buf`] whose chunks suit `write_vectored`.
///
/// Small frames are copied together into one contiguous buffer, so many of them go out in
/// one write; large unmasked payloads are queued as the caller's `Bytes`, without a copy.
/// The queue of those is boxed and exists only while one is queued. The contiguous buffer comes
/// from the thread's stock ([`crate::buffers`]) when a frame is queued and goes back once the
/// queue is written out: a connection with nothing to send holds no memory here.
#[derive(Debug, Default)]
pub struct Transmit {
    /// Written before `tail`: large payloads, and the tail bytes queued before them.
    shared: Option<Box<Shared>>,
    /// Small frames, after everything in `shared`.
    tail: BytesMut,
}

/// Chunks queued by reference, and how many bytes they hold.
#[derive(Debug, Default)]
struct Shared {
    chunks: VecDeque<Bytes>,
    len: usize,
}

impl Transmit {
    /// Queued bytes not yet written.
    pub fn len(&self) -> usize {
        self.tail.len() + self.shared.as_ref().map_or(0, |s| s.len)
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The buffer small frames are encoded into, after everything queued.
    pub(crate) fn tail(&mut self) -> &mut BytesMut {
        &mut self.tail
    }

    /// Queues `payload` by reference after whatever the tail holds.
    pub(crate) fn push_shared(&mut self, payload: Bytes) {
        if payload.len() < SHARE_THRESHOLD {
            self.tail.extend_from_slice(&payload);
            return;
        }
        let shared = self.shared.get_or_insert_with(Box::default);
        if !self.tail.is_empty() {
            shared.len += self.tail.len();
            shared.chunks.push_back(self.tail.split().freeze());
        }
        shared.len += payload.len();
        shared.chunks.push_back(payload);
    }

    /// Takes the tail's buffer out when nothing is queued, so the caller can free it or hand
    /// it to another connection; `None` while bytes wait. (A tail written to its last byte
    /// reports no capacity yet still owns its allocation, so it is handed out all the same.)
    /// Appends `payload` to the buffer, masked with `key` (a client's frame: masking changes
    /// the bytes, so the payload is copied in and masked there).
    pub(crate) fn tail_masked(&mut self, payload: &[u8], key: [u8; 4]) {
        let start = self.tail.len();
        self.tail.extend_from_slice(payload);
        crate::mask::apply_mask(&mut self.tail[start..], key, 0);
    }

    pub(crate) fn release(&mut self) -> Option<BytesMut> {
        if !self.is_empty() {
            return None;
        }
        self.shared = None;
        Some(std::mem::take(&mut self.tail))
    }

    /// Gives the tail an empty buffer to encode into when it has no memory of its own (after
    /// [`Transmit::release`]), instead of growing a fresh one frame by frame. `make` runs
    /// only then.
    pub(crate) fn provide(&mut self, make: impl FnOnce() -> BytesMut) {
        if self.tail.capacity() == 0 {
            let buf = make();
            debug_assert!(buf.is_empty());
            self.tail = buf;
        }
    }
}

impl Buf for Transmit {
    fn remaining(&self) -> usize {
        self.len()
    }

    fn chunk(&self) -> &[u8] {
        match self.shared.as_ref().and_then(|s| s.chunks.front()) {
            Some(c) => c,
            None => &self.tail,
        }
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [IoSlice<'a>]) -> usize {
        let shared = self.shared.iter().flat_map(|s| s.chunks.iter());
        let mut n = 0;
        for chunk in shared
            .map(|c| &c[..])
            .chain(std::iter::once(&self.tail[..]))
        {
            if n == dst.len() {
                break;
            }
            if !chunk.is_empty() {
                dst[n] = IoSlice::new(chunk);
                n += 1;
            }
        }
        n
    }

    fn advance(&mut self, mut cnt: usize) {
        assert!(
            cnt <= self.len(),
            "advance past the end of the transmit queue"
        );
        if let Some(shared) = self.shared.as_mut() {
            while cnt > 0 {
                let Some(front) = shared.chunks.front_mut() else {
                    break;
                };
                if front.len() <= cnt {
                    cnt -= front.len();
                    shared.len -= front.len();
                    shared.chunks.pop_front();
                } else {
                    front.advance(cnt);
                    shared.len -= cnt;
                    return;
                }
            }
        }
        self.tail.advance(cnt);
        // Everything written: the buffer serves other connections until the next frame, so
        // that a connection with nothing to send holds no write memory.
        if self.tail.is_empty() && self.shared.as_ref().is_none_or(|s| s.len == 0) {
            if let Some(tail) = self.release() {
                crate::buffers::give(tail);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_order_across_copied_and_shared_chunks() {
        let mut t = Transmit::default();
        t.tail().extend_from_slice(b"ab");
        t.push_shared(Bytes::from(vec![b'x'; 5000]));
        t.tail().extend_from_slice(b"cd");
        assert_eq!(t.len(), 5004);
        let mut slices = [IoSlice::new(&[]); 8];
        assert_eq!(t.chunks_vectored(&mut slices), 3);
        t.advance(3);
        assert_eq!(t.chunk().len(), 4999);
        t.advance(4999);
        assert_eq!(t.chunk(), b"cd");
        t.advance(2);
        assert!(t.is_empty());
        assert_eq!(t.tail.capacity(), 0, "written out, the buffer went back");
        assert!(t.shared.is_none());
    }

    #[test]
    fn the_buffer_comes_from_the_stock_and_goes_back_once_written() {
        let mut t = Transmit::default();
        t.provide(crate::buffers::take);
        t.provide(|| unreachable!("the tail has memory"));
        let address = t.tail().as_ptr();
        t.tail().extend_from_slice(b"abc");
        assert!(t.release().is_none(), "bytes are waiting");
        t.advance(2);
        assert!(t.tail.capacity() > 0, "a byte still waits");
        t.advance(1);
        assert_eq!(t.tail.capacity(), 0);
        assert_eq!(
            crate::buffers::take().as_ptr(),
            address,
            "back in the stock"
        );
    }

    #[test]
    fn advance_can_end_inside_the_tail_after_shared_chunks() {
        let mut t = Transmit::default();
        t.push_shared(Bytes::from(vec![b'x'; 5000]));
        t.tail().extend_from_slice(b"abc");
        t.advance(5001);
        assert_eq!(t.len(), 2);
        assert_eq!(t.chunk(), b"bc");
        let mut slices = [IoSlice::new(&[]); 8];
        assert_eq!(t.chunks_vectored(&mut slices), 1);
    }
}
