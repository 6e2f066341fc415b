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
#[derive(Debug, Default)]
pub struct Transmit {
    chunks: VecDeque<Bytes>,
    tail: BytesMut,
    len: usize,
}

impl Transmit {
    /// Queued bytes not yet written.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The buffer small frames are encoded into; the caller appends and then calls
    /// [`Transmit::commit`] with how many bytes it added.
    pub(crate) fn tail(&mut self) -> &mut BytesMut {
        &mut self.tail
    }

    /// Records `n` bytes appended to the tail.
    pub(crate) fn commit(&mut self, n: usize) {
        self.len += n;
    }

    /// Queues `payload` by reference after whatever the tail holds.
    pub(crate) fn push_shared(&mut self, payload: Bytes) {
        if payload.len() < SHARE_THRESHOLD {
            self.tail.extend_from_slice(&payload);
            self.len += payload.len();
            return;
        }
        if !self.tail.is_empty() {
            self.chunks.push_back(self.tail.split().freeze());
        }
        self.len += payload.len();
        self.chunks.push_back(payload);
    }

    /// Frees the tail's memory when nothing is queued (for idle connections).
    pub fn shrink(&mut self) {
        if self.len == 0 {
            self.tail = BytesMut::new();
            self.chunks = VecDeque::new();
        }
    }
}

impl Buf for Transmit {
    fn remaining(&self) -> usize {
        self.len
    }

    fn chunk(&self) -> &[u8] {
        match self.chunks.front() {
            Some(c) => c,
            None => &self.tail,
        }
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        for chunk in self
            .chunks
            .iter()
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
            cnt <= self.len,
            "advance past the end of the transmit queue"
        );
        self.len -= cnt;
        while cnt > 0 {
            match self.chunks.front_mut() {
                Some(front) if front.len() <= cnt => {
                    cnt -= front.len();
                    self.chunks.pop_front();
                }
                Some(front) => {
                    front.advance(cnt);
                    return;
                }
                None => {
                    self.tail.advance(cnt);
                    return;
                }
            }
        }
        if self.len == 0 {
            self.tail.clear();
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
        t.commit(2);
        t.push_shared(Bytes::from(vec![b'x'; 5000]));
        t.tail().extend_from_slice(b"cd");
        t.commit(2);
        assert_eq!(t.len(), 5004);
        let mut slices = [IoSlice::new(&[]); 8];
        assert_eq!(t.chunks_vectored(&mut slices), 3);
        t.advance(3);
        assert_eq!(t.chunk().len(), 4999);
        t.advance(4999);
        assert_eq!(t.chunk(), b"cd");
        t.advance(2);
        assert!(t.is_empty());
    }
}
