//! The library's error type.

use tether_proto::handshake::client::ClientHandshakeError;
use tether_proto::handshake::server::HandshakeError;
use tether_proto::{CloseCode, ProtocolError, SendError};

/// Everything that can go wrong with a WebSocket.
///
/// A clean close is not an error: the stream yields [`Message::Close`](crate::Message::Close)
/// and then ends.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The transport failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The peer violated the protocol or a limit; a Close with
    /// [`ProtocolError::close_code`] was sent before the transport was closed.
    #[error("protocol error (closed with {code}): {0}", code = .0.close_code())]
    Protocol(#[from] ProtocolError),
    /// The application asked for something the protocol does not allow (sending after close,
    /// an oversized control frame, …); the connection is unharmed unless it was closed.
    #[error("cannot send: {0}")]
    Send(#[from] SendError),
    /// A server refused a client's handshake request (and answered it with an HTTP error).
    #[error("handshake refused ({status}): {0}", status = .0.status())]
    Handshake(#[from] HandshakeError),
    /// A client's handshake failed: the server refused, or answered wrongly.
    #[error("handshake failed: {0}")]
    ClientHandshake(#[from] ClientHandshakeError),
    /// The opening handshake took longer than `handshake_timeout`.
    #[error("handshake timed out")]
    HandshakeTimeout,
    /// The transport closed before the handshake completed.
    #[error("connection closed during the handshake")]
    HandshakeEof,
    /// No pong arrived within `ping_timeout` of a keepalive ping; closed with 1011.
    #[error("keepalive timeout: no pong within the ping timeout (closed with 1011)")]
    KeepaliveTimeout,
    /// The transport closed without a close handshake (close code 1006).
    #[error("connection closed without a close handshake (1006)")]
    AbnormalClosure,
    /// A URL that is not `ws://` or `wss://`, or has no host.
    #[error("invalid URL: {0}")]
    Url(String),
    /// TLS setup or handshake failed.
    #[error("TLS error: {0}")]
    Tls(String),
    /// The HTTP proxy could not be reached or refused the tunnel.
    #[error("proxy error: {0}")]
    Proxy(String),
}

impl Error {
    /// The close code that describes how the connection ended because of this error.
    pub fn close_code(&self) -> CloseCode {
        match self {
            Error::Protocol(e) => e.close_code(),
            Error::KeepaliveTimeout => CloseCode::INTERNAL_ERROR,
            Error::Tls(_) => CloseCode::TLS_HANDSHAKE,
            _ => CloseCode::ABNORMAL,
        }
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
