//! Errors: the peer's protocol violations (each with its close code) and local API misuse.

use crate::close::CloseCode;
use crate::frame::HeaderError;

/// The peer broke RFC 6455 (or a configured limit). The connection is failed: a close frame
/// with [`ProtocolError::close_code`] has been queued, and every later call returns this error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// A frame header no valid frame can have.
    #[error(transparent)]
    Header(#[from] HeaderError),
    /// An RSV bit that no negotiated extension owns.
    #[error("reserved bits {0:#05b} set without a negotiated extension")]
    ReservedBits(u8),
    /// A client frame without a mask (servers require masking).
    #[error("client frame is not masked")]
    UnmaskedFrame,
    /// A server frame with a mask (clients refuse masking).
    #[error("server frame is masked")]
    MaskedFrame,
    /// A control frame with more than 125 bytes.
    #[error("control frame payload of {0} bytes exceeds 125")]
    ControlTooLong(u64),
    /// A control frame with FIN clear.
    #[error("fragmented control frame")]
    FragmentedControl,
    /// A continuation frame outside a fragmented message.
    #[error("continuation frame without a message to continue")]
    UnexpectedContinuation,
    /// A new text or binary frame while a fragmented message is unfinished.
    #[error("new data frame inside an unfinished fragmented message")]
    ExpectedContinuation,
    /// A text message (or close reason) that is not UTF-8.
    #[error("text is not valid UTF-8")]
    InvalidUtf8,
    /// A frame larger than `max_frame_size`.
    #[error("frame of {size} bytes exceeds the limit of {limit}")]
    FrameTooLarge {
        /// The frame's payload length.
        size: u64,
        /// The configured limit.
        limit: usize,
    },
    /// A message larger than `max_message_size`.
    #[error("message exceeds the limit of {limit} bytes")]
    MessageTooLarge {
        /// The configured limit.
        limit: usize,
    },
    /// A message spread over more frames than `max_message_fragments`.
    #[error("message spans more than {limit} frames")]
    TooManyFragments {
        /// The configured limit.
        limit: u32,
    },
    /// A close frame whose payload is a single byte.
    #[error("close frame payload of one byte")]
    TruncatedClose,
    /// A close frame with a code that may not be sent.
    #[error("invalid close code {0}")]
    InvalidCloseCode(u16),
    /// An extension (permessage-deflate) could not decode a message.
    #[error("extension error: {0}")]
    Extension(String),
}

impl ProtocolError {
    /// The close code this violation is answered with.
    pub fn close_code(&self) -> CloseCode {
        match self {
            ProtocolError::InvalidUtf8 => CloseCode::INVALID_PAYLOAD,
            ProtocolError::FrameTooLarge { .. }
            | ProtocolError::MessageTooLarge { .. }
            | ProtocolError::TooManyFragments { .. } => CloseCode::MESSAGE_TOO_BIG,
            _ => CloseCode::PROTOCOL_ERROR,
        }
    }
}

/// The caller asked for something the protocol does not allow. The connection is unharmed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// A close frame was already sent (or the connection failed): no more frames may follow.
    #[error("the connection is closing or closed")]
    Closed,
    /// A ping, pong or close payload larger than 125 bytes.
    #[error("control frame payload of {0} bytes exceeds 125")]
    ControlTooLong(usize),
    /// A close code that may not be sent (1005, 1006, 1015, reserved or unassigned ranges).
    #[error("close code {0} may not be sent")]
    InvalidCloseCode(u16),
    /// A continuation without a started message, or a new message inside an unfinished one.
    #[error("fragment out of order")]
    FragmentOrder,
}
