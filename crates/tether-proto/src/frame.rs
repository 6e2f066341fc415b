//! The frame header (RFC 6455 §5.2): parse and encode.
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-------+-+-------------+-------------------------------+
//! |F|R|R|R| opcode|M| Payload len |    Extended payload length    |
//! |I|S|S|S|  (4)  |A|     (7)     |             (16/64)           |
//! |N|V|V|V|       |S|             |   (if payload len==126/127)   |
//! | |1|2|3|       |K|             |                               |
//! +-+-+-+-+-------+-+-------------+ - - - - - - - - - - - - - - - +
//! |     Extended payload length continued, if payload len == 127  |
//! + - - - - - - - - - - - - - - - +-------------------------------+
//! |                               |Masking-key, if MASK set to 1  |
//! +-------------------------------+-------------------------------+
//! ```

use bytes::{BufMut, BytesMut};

/// A frame opcode (RFC 6455 §5.2). Reserved opcodes are not representable: parsing one is an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpCode {
    /// 0x0: continues a fragmented message.
    Continuation,
    /// 0x1: the first frame of a text message.
    Text,
    /// 0x2: the first frame of a binary message.
    Binary,
    /// 0x8: close.
    Close,
    /// 0x9: ping.
    Ping,
    /// 0xA: pong.
    Pong,
}

impl OpCode {
    /// The opcode for the 4-bit wire value, or `None` for a reserved one (0x3–0x7, 0xB–0xF).
    pub const fn from_bits(bits: u8) -> Option<OpCode> {
        Some(match bits {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xa => OpCode::Pong,
            _ => return None,
        })
    }

    /// The 4-bit wire value.
    pub const fn bits(self) -> u8 {
        match self {
            OpCode::Continuation => 0x0,
            OpCode::Text => 0x1,
            OpCode::Binary => 0x2,
            OpCode::Close => 0x8,
            OpCode::Ping => 0x9,
            OpCode::Pong => 0xa,
        }
    }

    /// Close, ping and pong are control frames: at most 125 bytes and never fragmented.
    pub const fn is_control(self) -> bool {
        matches!(self, OpCode::Close | OpCode::Ping | OpCode::Pong)
    }
}

/// RSV1, the bit permessage-deflate uses to mark a compressed message.
pub const RSV1: u8 = 0b100;
/// RSV2, unused by any extension tether supports.
pub const RSV2: u8 = 0b010;
/// RSV3, unused by any extension tether supports.
pub const RSV3: u8 = 0b001;

/// The largest payload a control frame may carry.
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Whether this is the final frame of a message.
    pub fin: bool,
    /// The three reserved bits, as [`RSV1`] | [`RSV2`] | [`RSV3`].
    pub rsv: u8,
    /// The opcode.
    pub opcode: OpCode,
    /// The masking key; present on every client-to-server frame.
    pub mask: Option<[u8; 4]>,
    /// The payload length.
    pub payload_len: u64,
}

/// A header that no valid frame can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// A reserved opcode.
    #[error("reserved opcode {0:#x}")]
    ReservedOpcode(u8),
    /// A 64-bit length with the most significant bit set.
    #[error("64-bit payload length has its most significant bit set")]
    LengthTooLong,
}

impl FrameHeader {
    /// The longest header: 2 bytes, 8 of extended length, 4 of mask.
    pub const MAX_LEN: usize = 14;

    /// Parses a header from the start of `buf`.
    ///
    /// Returns `Ok(None)` when `buf` does not hold a whole header yet, otherwise the header
    /// and how many bytes it took.
    ///
    /// # Errors
    /// [`HeaderError`] for a reserved opcode or an oversized 64-bit length.
    pub fn parse(buf: &[u8]) -> Result<Option<(FrameHeader, usize)>, HeaderError> {
        let [b0, b1, ..] = *buf else {
            return Ok(None);
        };
        let opcode = OpCode::from_bits(b0 & 0x0f).ok_or(HeaderError::ReservedOpcode(b0 & 0x0f))?;
        let masked = b1 & 0x80 != 0;
        let (payload_len, mut pos) = match b1 & 0x7f {
            126 => {
                let Some(ext) = buf.get(2..4) else {
                    return Ok(None);
                };
                (u64::from(u16::from_be_bytes([ext[0], ext[1]])), 4)
            }
            127 => {
                let Some(ext) = buf.get(2..10) else {
                    return Ok(None);
                };
                let mut raw = [0u8; 8];
                raw.copy_from_slice(ext);
                let len = u64::from_be_bytes(raw);
                if len >> 63 != 0 {
                    return Err(HeaderError::LengthTooLong);
                }
                (len, 10)
            }
            n => (u64::from(n), 2),
        };
        let mask = if masked {
            let Some(key) = buf.get(pos..pos + 4) else {
                return Ok(None);
            };
            pos += 4;
            Some([key[0], key[1], key[2], key[3]])
        } else {
            None
        };
        Ok(Some((
            FrameHeader {
                fin: b0 & 0x80 != 0,
                rsv: (b0 >> 4) & 0b111,
                opcode,
                mask,
                payload_len,
            },
            pos,
        )))
    }

    /// How many bytes [`FrameHeader::encode`] writes.
    pub const fn encoded_len(&self) -> usize {
        let len = match self.payload_len {
            0..=125 => 2,
            126..=0xffff => 4,
            _ => 10,
        };
        if self.mask.is_some() {
            len + 4
        } else {
            len
        }
    }

    /// Appends the encoded header to `dst`, using the shortest length form.
    ///
    /// Written as one or two fixed-size stores (a 2-byte header, the usual case, is a single
    /// `u16`), each of which the compiler inlines, rather than a byte at a time.
    #[inline]
    pub fn encode(&self, dst: &mut BytesMut) {
        let b0 = (u8::from(self.fin) << 7) | ((self.rsv & 0b111) << 4) | self.opcode.bits();
        let mask_bit = if self.mask.is_some() { 0x80 } else { 0 };
        dst.reserve(self.encoded_len());
        match self.payload_len {
            n @ 0..=125 => dst.put_u16(u16::from_be_bytes([b0, mask_bit | n as u8])),
            n @ 126..=0xffff => {
                dst.put_u32((u32::from(b0) << 24) | (u32::from(mask_bit | 126) << 16) | n as u32)
            }
            n => {
                dst.put_u16(u16::from_be_bytes([b0, mask_bit | 127]));
                dst.put_u64(n);
            }
        }
        if let Some(key) = self.mask {
            dst.put_slice(&key);
        }
    }

    /// How long the header at the start of `buf` is, from its first two bytes (`None` with
    /// fewer): whether it is whole is `buf.len() >= len`.
    #[inline]
    pub fn len_at(buf: &[u8]) -> Option<usize> {
        let [_, b1, ..] = *buf else {
            return None;
        };
        let len = match b1 & 0x7f {
            126 => 4,
            127 => 10,
            _ => 2,
        };
        Some(if b1 & 0x80 != 0 { len + 4 } else { len })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header(opcode: OpCode, payload_len: u64, mask: Option<[u8; 4]>) -> FrameHeader {
        FrameHeader {
            fin: true,
            rsv: 0,
            opcode,
            mask,
            payload_len,
        }
    }

    #[test]
    fn parses_rfc_single_frame_unmasked_text() {
        let (h, n) = FrameHeader::parse(&[0x81, 0x05, b'H']).unwrap().unwrap();
        assert_eq!(n, 2);
        assert_eq!(h, header(OpCode::Text, 5, None));
    }

    #[test]
    fn uses_all_three_length_forms() {
        for (len, expect) in [
            (125u64, 2usize),
            (126, 4),
            (65535, 4),
            (65536, 10),
            (1 << 40, 10),
        ] {
            let h = header(OpCode::Binary, len, None);
            let mut buf = BytesMut::new();
            h.encode(&mut buf);
            assert_eq!(buf.len(), expect);
            assert_eq!(FrameHeader::parse(&buf).unwrap(), Some((h, expect)));
            // Every strict prefix is incomplete, not an error.
            for cut in 0..buf.len() {
                assert_eq!(FrameHeader::parse(&buf[..cut]).unwrap(), None);
            }
        }
    }

    #[test]
    fn rejects_reserved_opcode_and_top_bit_length() {
        assert_eq!(
            FrameHeader::parse(&[0x83, 0x00]),
            Err(HeaderError::ReservedOpcode(3))
        );
        assert_eq!(
            FrameHeader::parse(&[0x8b, 0x00]),
            Err(HeaderError::ReservedOpcode(0xb))
        );
        let mut buf = vec![0x82, 127];
        buf.extend_from_slice(&(1u64 << 63).to_be_bytes());
        assert_eq!(FrameHeader::parse(&buf), Err(HeaderError::LengthTooLong));
    }

    proptest! {
        #[test]
        fn encode_parse_round_trip(fin: bool, rsv in 0u8..8, op in prop::sample::select(vec![OpCode::Continuation, OpCode::Text, OpCode::Binary, OpCode::Close, OpCode::Ping, OpCode::Pong]), mask: Option<[u8; 4]>, len in 0u64..(1 << 63)) {
            let h = FrameHeader { fin, rsv, opcode: op, mask, payload_len: len };
            let mut buf = BytesMut::new();
            h.encode(&mut buf);
            prop_assert_eq!(buf.len(), h.encoded_len());
            prop_assert_eq!(FrameHeader::parse(&buf).unwrap(), Some((h, buf.len())));
        }
    }
}
