//! A small per-thread stock of I/O buffers, so that connections which free their buffers
//! whenever they wait (to hold no memory while idle) reuse them instead of going back to the
//! allocator for every burst of traffic. A [`Connection`](crate::Connection) encodes into a
//! buffer from the stock and gives it back once everything queued is written; a driver can
//! keep its read buffers the same way ([`Connection::reserve_read`](crate::Connection::reserve_read),
//! [`give`]).
//!
//! A buffer is taken back only when no payload still shares its memory and it has the
//! ordinary size, so the stock never pins a large allocation; at most 16 buffers wait
//! per thread.

use std::cell::RefCell;

use bytes::{Bytes, BytesMut};

/// The size of the buffers in stock, and of a fresh one.
pub const BUFFER: usize = 16 << 10;
/// How many spare buffers one thread keeps at most.
const STOCK: usize = 16;

thread_local! {
    static SPARE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// An empty buffer with room for at least [`BUFFER`] bytes: a spare one when this thread has
/// one, otherwise a new one.
pub fn take() -> BytesMut {
    match SPARE.try_with(|s| s.borrow_mut().pop()).ok().flatten() {
        // Through `Bytes`: its one owner gets the allocation back without a copy.
        Some(vec) => BytesMut::from(Bytes::from(vec)),
        None => BytesMut::with_capacity(BUFFER),
    }
}

/// Gives back a buffer that is no longer needed: kept for [`take`] when it is empty, the only
/// owner of an allocation of the ordinary size, and the stock has room; freed otherwise.
pub fn give(buf: BytesMut) {
    // (Capacity alone says nothing: a buffer advanced to its end reports none yet still
    // owns its allocation.)
    if !buf.is_empty() {
        return;
    }
    // The whole allocation when `buf` is its only owner; an empty, unallocated vector (and
    // the shared memory released) when a payload still holds part of it.
    let vec = Vec::from(buf);
    if !(BUFFER..=2 * BUFFER).contains(&vec.capacity()) {
        return;
    }
    let _ = SPARE.try_with(|s| {
        let mut stock = s.borrow_mut();
        if stock.len() < STOCK {
            stock.push(vec);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Buf;

    fn stocked() -> usize {
        SPARE.with(|s| s.borrow().len())
    }

    #[test]
    fn reuses_the_allocation_of_a_buffer_given_back() {
        let buf = take();
        assert!(buf.is_empty() && buf.capacity() >= BUFFER);
        let address = buf.as_ptr();
        give(buf);
        assert_eq!(stocked(), 1);
        let again = take();
        assert_eq!(again.as_ptr(), address, "the same memory, not a copy");
        assert!(again.capacity() >= BUFFER);
        assert_eq!(stocked(), 0);
    }

    #[test]
    fn keeps_no_buffer_a_payload_still_shares() {
        let mut buf = take();
        buf.extend_from_slice(&[1; 100]);
        let payload = buf.split_to(100).freeze();
        give(buf);
        assert_eq!(stocked(), 0, "the payload still holds the allocation");
        assert_eq!(&payload[..], &[1; 100]);
    }

    #[test]
    fn takes_back_a_buffer_read_to_its_last_byte() {
        let mut buf = take();
        let room = buf.capacity();
        buf.extend_from_slice(&vec![7; room]);
        buf.advance(room);
        assert_eq!(buf.capacity(), 0, "no room left in view");
        give(buf);
        assert_eq!(stocked(), 1, "the allocation is whole again");
        assert!(take().capacity() >= BUFFER);
    }

    #[test]
    fn keeps_neither_full_nor_oversized_nor_too_many_buffers() {
        let mut full = take();
        full.extend_from_slice(b"x");
        give(full);
        give(BytesMut::with_capacity(4 * BUFFER));
        assert_eq!(stocked(), 0);
        for _ in 0..STOCK + 3 {
            give(BytesMut::with_capacity(BUFFER));
        }
        assert_eq!(stocked(), STOCK);
    }
}
