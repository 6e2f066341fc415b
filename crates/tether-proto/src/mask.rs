//! Masking (RFC 6455 §5.3): XOR of the payload with a 4-byte key.
//!
//! Written as safe word-at-a-time XOR: the bulk runs over 8-byte words, which the compiler
//! turns into SIMD; the criterion benchmark `mask` measures it against the byte loop.

/// XORs `buf` in place with `key`, as if the payload started `offset` bytes into the frame.
///
/// `offset` lets a frame that arrives in pieces be unmasked piece by piece.
#[inline]
pub fn apply_mask(buf: &mut [u8], key: [u8; 4], offset: usize) {
    let key = rotate(key, offset);
    if buf.len() < 16 {
        apply_mask_bytes(buf, key);
        return;
    }
    let word = u32::from_ne_bytes(key);
    let wide = u64::from(word) | (u64::from(word) << 32);
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(chunk);
        let value = u64::from_ne_bytes(bytes) ^ wide;
        chunk.copy_from_slice(&value.to_ne_bytes());
    }
    apply_mask_bytes(chunks.into_remainder(), key);
}

/// The plain byte-at-a-time loop; the reference the fast path is tested against.
#[inline]
pub fn apply_mask_bytes(buf: &mut [u8], key: [u8; 4]) {
    for (i, byte) in buf.iter_mut().enumerate() {
        *byte ^= key[i & 3];
    }
}

fn rotate(key: [u8; 4], offset: usize) -> [u8; 4] {
    let s = offset & 3;
    [key[s], key[(s + 1) & 3], key[(s + 2) & 3], key[(s + 3) & 3]]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn fast_mask_matches_byte_loop(data in proptest::collection::vec(any::<u8>(), 0..300), key: [u8; 4], split in 0usize..300) {
            let mut reference = data.clone();
            apply_mask_bytes(&mut reference, key);
            let mut fast = data.clone();
            let split = split.min(fast.len());
            let (a, b) = fast.split_at_mut(split);
            apply_mask(a, key, 0);
            apply_mask(b, key, split);
            prop_assert_eq!(reference, fast);
        }
    }

    #[test]
    fn rfc_example_hello() {
        // RFC 6455 §5.7: masked "Hello".
        let mut payload = [0x7f, 0x9f, 0x4d, 0x51, 0x58];
        apply_mask(&mut payload, [0x37, 0xfa, 0x21, 0x3d], 0);
        assert_eq!(&payload, b"Hello");
    }
}
