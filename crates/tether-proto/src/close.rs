//! Close codes (RFC 6455 §7.4) and the close frame payload.

use bytes::{BufMut, Bytes, BytesMut};

/// A WebSocket close status code (RFC 6455 §7.4).
///
/// The named constants cover the registered codes; any `u16` can be held, and
/// [`CloseCode::is_sendable`] tells whether it may appear in a close frame on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CloseCode(pub u16);

impl CloseCode {
    /// 1000: the purpose of the connection has been fulfilled.
    pub const NORMAL: CloseCode = CloseCode(1000);
    /// 1001: the endpoint is going away (server shutdown, page navigation).
    pub const GOING_AWAY: CloseCode = CloseCode(1001);
    /// 1002: the peer violated the protocol.
    pub const PROTOCOL_ERROR: CloseCode = CloseCode(1002);
    /// 1003: the endpoint received a type of data it cannot accept.
    pub const UNSUPPORTED_DATA: CloseCode = CloseCode(1003);
    /// 1005: no status code was present. Never sent on the wire.
    pub const NO_STATUS: CloseCode = CloseCode(1005);
    /// 1006: the connection closed without a close frame. Never sent on the wire.
    pub const ABNORMAL: CloseCode = CloseCode(1006);
    /// 1007: a text message was not valid UTF-8 (or data was inconsistent with its type).
    pub const INVALID_PAYLOAD: CloseCode = CloseCode(1007);
    /// 1008: a message violated the endpoint's policy.
    pub const POLICY_VIOLATION: CloseCode = CloseCode(1008);
    /// 1009: a frame or message was too big to process.
    pub const MESSAGE_TOO_BIG: CloseCode = CloseCode(1009);
    /// 1010: the client expected the server to negotiate an extension it did not.
    pub const MANDATORY_EXTENSION: CloseCode = CloseCode(1010);
    /// 1011: the server met an unexpected condition (also used for a keepalive timeout).
    pub const INTERNAL_ERROR: CloseCode = CloseCode(1011);
    /// 1012: the service is restarting.
    pub const SERVICE_RESTART: CloseCode = CloseCode(1012);
    /// 1013: try again later (used for slow consumers and overload).
    pub const TRY_AGAIN_LATER: CloseCode = CloseCode(1013);
    /// 1014: a gateway received an invalid response from upstream.
    pub const BAD_GATEWAY: CloseCode = CloseCode(1014);
    /// 1015: the TLS handshake failed. Never sent on the wire.
    pub const TLS_HANDSHAKE: CloseCode = CloseCode(1015);

    /// Whether this code may be carried in a close frame.
    ///
    /// Valid on the wire: 1000–1003, 1007–1014 and 3000–4999. Codes below 1000, the reserved
    /// 1004–1006 and 1015, and the unassigned 1016–2999 and ≥ 5000 are protocol errors.
    pub const fn is_sendable(self) -> bool {
        matches!(self.0, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }
}

impl From<u16> for CloseCode {
    fn from(code: u16) -> Self {
        CloseCode(code)
    }
}

impl From<CloseCode> for u16 {
    fn from(code: CloseCode) -> Self {
        code.0
    }
}

impl std::fmt::Display for CloseCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The status carried by a close frame: a code and a UTF-8 reason of at most 123 bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseFrame {
    /// The status code.
    pub code: CloseCode,
    /// The reason, valid UTF-8; empty when the peer gave none.
    pub reason: String,
}

/// Why a close frame payload was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClosePayloadError {
    /// One byte: too short to hold a code.
    Truncated,
    /// A code that may not appear on the wire.
    InvalidCode(u16),
    /// The reason is not UTF-8.
    InvalidUtf8,
}

impl CloseFrame {
    /// The largest reason that fits a control frame (125 bytes minus the 2-byte code).
    pub const MAX_REASON_LEN: usize = 123;

    /// A close frame with `code` and `reason`.
    pub fn new(code: CloseCode, reason: impl Into<String>) -> Self {
        CloseFrame {
            code,
            reason: reason.into(),
        }
    }

    /// Parses a received close payload: empty (no status), or a sendable code plus UTF-8.
    pub(crate) fn parse(payload: &[u8]) -> Result<Option<CloseFrame>, ClosePayloadError> {
        match payload {
            [] => Ok(None),
            [_] => Err(ClosePayloadError::Truncated),
            [hi, lo, reason @ ..] => {
                let code = CloseCode(u16::from_be_bytes([*hi, *lo]));
                if !code.is_sendable() {
                    return Err(ClosePayloadError::InvalidCode(code.0));
                }
                let reason = simdutf8::basic::from_utf8(reason)
                    .map_err(|_| ClosePayloadError::InvalidUtf8)?;
                Ok(Some(CloseFrame {
                    code,
                    reason: reason.to_owned(),
                }))
            }
        }
    }

    /// Encodes the payload of a close frame, truncating the reason at a character boundary so
    /// that the payload fits in 125 bytes.
    pub(crate) fn encode(&self) -> Bytes {
        let mut reason = self.reason.as_str();
        if reason.len() > Self::MAX_REASON_LEN {
            let mut end = Self::MAX_REASON_LEN;
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            reason = &reason[..end];
        }
        let mut out = BytesMut::with_capacity(2 + reason.len());
        out.put_u16(self.code.0);
        out.put_slice(reason.as_bytes());
        out.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sendable_codes_follow_rfc_ranges() {
        for code in [1000, 1001, 1002, 1003, 1007, 1010, 1011, 1014, 3000, 4999] {
            assert!(CloseCode(code).is_sendable(), "{code}");
        }
        for code in [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535] {
            assert!(!CloseCode(code).is_sendable(), "{code}");
        }
    }

    #[test]
    fn parse_rejects_one_byte_and_bad_utf8() {
        assert_eq!(
            CloseFrame::parse(&[0x03]),
            Err(ClosePayloadError::Truncated)
        );
        assert_eq!(
            CloseFrame::parse(&[0x03, 0xe8, 0xff]),
            Err(ClosePayloadError::InvalidUtf8)
        );
        assert_eq!(
            CloseFrame::parse(&[0x03, 0xed]),
            Err(ClosePayloadError::InvalidCode(1005))
        );
        assert_eq!(CloseFrame::parse(&[]), Ok(None));
        let frame = CloseFrame::parse(b"\x03\xe8bye").unwrap().unwrap();
        assert_eq!(frame, CloseFrame::new(CloseCode::NORMAL, "bye"));
    }

    #[test]
    fn encode_truncates_reason_on_char_boundary() {
        let frame = CloseFrame::new(CloseCode::NORMAL, "é".repeat(100));
        let payload = frame.encode();
        assert!(payload.len() <= 125);
        assert!(std::str::from_utf8(&payload[2..]).is_ok());
    }
}
