//! The library's error type.

use tether_proto::handshake::client::ClientHandshakeError;
use tether_proto::handshake::server::HandshakeError;
use tether_proto::{CloseCode, ProtocolError, SendError};

/// Everything that can go wrong with a WebSocket.
///
/// Each message names its cause, and [`std::error::Error::source`] returns the cause as a
/// value (an [`std::io::Error`], a [`rustls::Error`](https://docs.rs/rustls), a
/// [`url::ParseError`], …) for code that needs to tell causes apart.
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
    Url(#[from] UrlError),
    /// The TCP connection to the server (or to the proxy's target) could not be made: the
    /// name did not resolve, or nothing accepted on the port.
    #[error("connecting to {host}:{port}: {source}")]
    Connect {
        /// The host as the URL names it.
        host: String,
        /// The port.
        port: u16,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// TLS setup or handshake failed.
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    /// The HTTP proxy could not be reached or refused the tunnel.
    #[error("{0}")]
    Proxy(#[from] ProxyError),
    /// The peer did not take our Close within `close_timeout`.
    #[error("the peer did not take the Close within the close timeout")]
    CloseTimeout,
    /// The peer took nothing we wrote for `write_timeout` (it stopped reading); the transport
    /// was shut down.
    #[error("the peer took nothing we wrote within the write timeout")]
    WriteTimeout,
    /// HTTP/2 was required ([`HttpVersion::Http2`](crate::HttpVersion::Http2)) and the
    /// server does not speak it, or does not take WebSockets over it (RFC 8441).
    #[error("no WebSocket over HTTP/2: {0}")]
    Http2Unavailable(String),
}

/// A URL that cannot be used, as a server's or a proxy's.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UrlError {
    /// Not a URL at all.
    #[error("{url}: {source}")]
    Parse {
        /// The text given.
        url: String,
        /// Why it did not parse.
        #[source]
        source: url::ParseError,
    },
    /// A scheme this use does not take (a server's URL is `ws` or `wss`, a proxy's `http`).
    #[error("{url}: scheme {scheme:?} is not {expected}")]
    Scheme {
        /// The text given.
        url: String,
        /// Its scheme.
        scheme: String,
        /// What the URL may use.
        expected: &'static str,
    },
    /// No host to connect to.
    #[error("{url}: no host")]
    NoHost {
        /// The text given.
        url: String,
    },
}

/// Why TLS could not be set up or its handshake failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// `wss://` in a build without the `tls` feature.
    #[error("wss:// needs the `tls` feature")]
    Disabled,
    /// The URL's host cannot be a TLS server name.
    #[cfg(feature = "tls")]
    #[error("{host:?} is not a valid server name")]
    ServerName {
        /// The host.
        host: String,
        /// Why.
        #[source]
        source: rustls_pki_types::InvalidDnsNameError,
    },
    /// The handshake failed: rustls's reason (the certificate's, for one it does not trust).
    #[cfg(feature = "tls")]
    #[error("handshake with {host}: {source}")]
    Handshake {
        /// The server name.
        host: String,
        /// Why.
        #[source]
        source: rustls::Error,
    },
    /// The transport failed during the handshake.
    #[cfg(feature = "tls")]
    #[error("handshake with {host}: {source}")]
    Io {
        /// The server name.
        host: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A CA file is not PEM.
    #[cfg(feature = "tls")]
    #[error("reading a CA certificate: {0}")]
    CaPem(#[source] rustls_pki_types::pem::Error),
    /// A CA certificate cannot be a root.
    #[cfg(feature = "tls")]
    #[error("adding a CA certificate: {0}")]
    CaCertificate(#[source] rustls::Error),
    /// A CA file holds no certificate.
    #[error("no certificate found in the CA file")]
    NoCaCertificate,
    /// rustls refused the configuration.
    #[cfg(feature = "tls")]
    #[error("configuration: {0}")]
    Config(#[source] rustls::Error),
}

/// Why a tunnel through an HTTP proxy could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// The proxy's URL cannot be used.
    #[error("invalid proxy URL: {0}")]
    Url(#[source] UrlError),
    /// The proxy could not be reached, or the connection to it failed before it answered.
    #[error("talking to proxy {addr}: {source}")]
    Io {
        /// The proxy's `host:port`.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Its answer's head is longer than the library reads.
    #[error("proxy response head over {limit} bytes")]
    HeadTooLarge {
        /// The limit.
        limit: usize,
    },
    /// Its answer is not HTTP.
    #[error("malformed proxy response: {0}")]
    Malformed(#[source] httparse::Error),
    /// It answered `CONNECT` with an error status.
    #[error("proxy refused CONNECT {authority}: {status} {reason}")]
    Refused {
        /// The tunnel asked for (`host:port`).
        authority: String,
        /// The HTTP status.
        status: u16,
        /// The reason phrase.
        reason: String,
    },
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
