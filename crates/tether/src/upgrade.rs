//! Upgrading a hyper (or axum) HTTP request to a WebSocket.
//!
//! ```no_run
//! use http_body_util::Empty;
//! use hyper::body::Bytes;
//!
//! async fn handle(mut req: hyper::Request<hyper::body::Incoming>) -> hyper::Response<Empty<Bytes>> {
//!     match tether::upgrade::upgrade(&mut req, tether::Config::default()) {
//!         Ok((response, pending)) => {
//!             tokio::spawn(async move {
//!                 let Ok(mut ws) = pending.await else { return };
//!                 while let Some(Ok(msg)) = ws.recv().await {
//!                     if msg.is_data() && ws.send(msg).await.is_err() {
//!                         break;
//!                     }
//!                 }
//!             });
//!             response
//!         }
//!         Err(refused) => {
//!             let mut response = hyper::Response::new(Empty::new());
//!             *response.status_mut() = hyper::StatusCode::from_u16(refused.status()).unwrap();
//!             response
//!         }
//!     }
//! }
//! ```

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tether_proto::handshake::server::{HandshakeError, Request};
use tether_proto::handshake::{Header, Headers};
use tether_proto::Role;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::either::Either;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::handshake::{check_origin, negotiate_deflate};
use crate::websocket::{DirectIo, Parts, WebSocket};
use tether_proto::extension::deflate::Deflate;
use tether_proto::handshake::server::Accept;

/// The WebSocket over a hyper upgrade.
pub type UpgradedWebSocket = WebSocket<UpgradedIo>;

/// The transport of an [`UpgradedWebSocket`]: the TCP connection itself when a hyper
/// connection builder served it as `TokioIo<TcpStream>` (`tether serve` does), otherwise
/// hyper's [`Upgraded`] (TLS, HTTP/2 streams, `hyper_util`'s auto builder, which `axum::serve`
/// uses, and other transports).
///
/// Taking the socket back from hyper spares every read and write the two indirections of
/// `Upgraded` (a boxed transport behind a rewind buffer), and lets a
/// [`DirectWriter`](crate::DirectWriter) write to the socket without tokio's readiness
/// bookkeeping ([`DirectIo`]).
#[derive(Debug)]
pub struct UpgradedIo(Either<TcpStream, TokioIo<Upgraded>>);

impl UpgradedIo {
    /// Takes over `upgraded`: its TCP stream when it is one, with the bytes hyper read past
    /// the request (the peer's first frames, when it did not wait for the answer).
    pub fn new(upgraded: Upgraded) -> (UpgradedIo, Bytes) {
        match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => (
                UpgradedIo(Either::Left(parts.io.into_inner())),
                parts.read_buf,
            ),
            Err(upgraded) => (
                UpgradedIo(Either::Right(TokioIo::new(upgraded))),
                Bytes::new(),
            ),
        }
    }

    /// The TCP connection, when the WebSocket has it itself.
    pub fn tcp(&self) -> Option<&TcpStream> {
        match &self.0 {
            Either::Left(tcp) => Some(tcp),
            Either::Right(_) => None,
        }
    }
}

impl From<TokioIo<Upgraded>> for UpgradedIo {
    /// Keeps `io` as it is, behind hyper (see [`UpgradedIo::new`] to take the TCP stream).
    fn from(io: TokioIo<Upgraded>) -> Self {
        UpgradedIo(Either::Right(io))
    }
}

impl AsyncRead for UpgradedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for UpgradedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

impl DirectIo for UpgradedIo {
    fn write_now(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match &mut self.0 {
            Either::Left(io) => io.write_now(bufs),
            Either::Right(io) => io.write_now(bufs),
        }
    }

    fn flush_now(&mut self) -> io::Result<()> {
        match &mut self.0 {
            Either::Left(io) => io.flush_now(),
            Either::Right(io) => io.flush_now(),
        }
    }
}

/// Validates `req` as a WebSocket upgrade and answers it.
///
/// Returns the response to send (with any body type that has a default, such as
/// `http_body_util::Empty` or `axum::body::Body`) and a future that resolves to the WebSocket
/// once hyper hands over the connection. Over HTTP/1.1 that is a `101 Switching Protocols`
/// and the WebSocket takes the TCP connection; over HTTP/2 (the `http2` feature, a hyper
/// server with `enable_connect_protocol`) the request is an extended CONNECT (RFC 8441,
/// `:protocol: websocket`), the response a `200` without `Sec-WebSocket-Accept`, and the
/// WebSocket takes one stream of the connection, which it ends when it closes: many
/// WebSockets, and the page's other requests, share one TCP connection. The subprotocol is chosen
/// from [`Config::protocols`] and the Origin checked against [`Config::allowed_origins`].
/// Pass an `Arc<Config>` to share one configuration among many connections.
///
/// # Errors
/// A [`HandshakeError`] when the request is not a valid upgrade, its head (request line and
/// headers) exceeds [`Config::max_handshake_size`] (431), or its Origin is refused; answer
/// with [`HandshakeError::status`].
pub fn upgrade<B, R: Default>(
    req: &mut http::Request<B>,
    config: impl Into<Arc<Config>>,
) -> Result<(http::Response<R>, PendingUpgrade), HandshakeError> {
    let config = config.into();
    let head = head_size(req.method(), req.uri(), req.headers());
    check_size(head, &config)?;
    let request = parse(
        req.method(),
        req.uri(),
        req.version(),
        req.headers(),
        connect_protocol(req.extensions()),
    )?;
    let (response, agreed) = answer(&request, &config)?;
    Ok((response, agreed.pending(hyper::upgrade::on(req), config)))
}

/// The size of a request head as a handshake read from a socket counts it: request line
/// plus header lines.
pub(crate) fn head_size(
    method: &http::Method,
    uri: &http::Uri,
    headers: &http::HeaderMap,
) -> usize {
    method.as_str().len()
        + uri.path_and_query().map_or(1, |pq| pq.as_str().len())
        + 12
        + headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 4)
            .sum::<usize>()
}

/// Refuses a head over [`Config::max_handshake_size`] (431).
pub(crate) fn check_size(head: usize, config: &Config) -> Result<(), HandshakeError> {
    if head > config.max_handshake_size {
        return Err(HandshakeError::TooLarge {
            limit: config.max_handshake_size,
        });
    }
    Ok(())
}

/// The `:protocol` of an HTTP/2 extended CONNECT, as hyper hands it over (with the `http2`
/// feature; `None` without it, and for any other request).
pub(crate) fn connect_protocol(extensions: &http::Extensions) -> Option<&str> {
    #[cfg(feature = "http2")]
    {
        extensions
            .get::<hyper::ext::Protocol>()
            .map(hyper::ext::Protocol::as_str)
    }
    #[cfg(not(feature = "http2"))]
    {
        let _ = extensions;
        None
    }
}

/// Validates a request head as a WebSocket opening: an HTTP/1.1 upgrade, or over HTTP/2 an
/// extended CONNECT (RFC 8441) whose `:protocol` is `protocol`.
pub(crate) fn parse(
    method: &http::Method,
    uri: &http::Uri,
    version: http::Version,
    headers: &http::HeaderMap,
    protocol: Option<&str>,
) -> Result<Request, HandshakeError> {
    let headers = headers_of(headers);
    let target = uri
        .path_and_query()
        .map_or_else(|| "/".to_owned(), |pq| pq.as_str().to_owned());
    if version == http::Version::HTTP_2 {
        let authority = uri.authority().map(http::uri::Authority::as_str);
        return Request::from_extended_connect(
            method.as_str(),
            protocol,
            authority,
            target,
            headers,
        );
    }
    let http11 = version >= http::Version::HTTP_11;
    Request::from_parts(method.as_str(), http11, target, headers)
}

/// An `http` header map as the core's [`Headers`].
pub(crate) fn headers_of(headers: &http::HeaderMap) -> Headers {
    Headers(
        headers
            .iter()
            .map(|(name, value)| Header {
                name: name.as_str().to_owned(),
                value: value.as_bytes().to_vec(),
            })
            .collect(),
    )
}

/// What an answered upgrade agreed on.
pub(crate) struct Agreed {
    protocol: Option<String>,
    deflate: Option<Deflate>,
    /// An HTTP/2 stream (extended CONNECT), which ends by both sides ending it.
    half_close: bool,
}

impl Agreed {
    /// The WebSocket to come once hyper releases the connection.
    pub(crate) fn pending(self, on_upgrade: OnUpgrade, config: Arc<Config>) -> PendingUpgrade {
        PendingUpgrade {
            on_upgrade,
            config: Some(config),
            protocol: self.protocol,
            deflate: self.deflate,
            half_close: self.half_close,
        }
    }
}

/// The `101` for a valid upgrade under `config`: the Origin checked, the subprotocol and
/// permessage-deflate chosen.
pub(crate) fn answer<R: Default>(
    request: &Request,
    config: &Config,
) -> Result<(http::Response<R>, Agreed), HandshakeError> {
    check_origin(config, request)?;
    let protocol = request
        .select_protocol(&config.protocols)
        .map(str::to_owned);
    let mut negotiated = Accept::default();
    let deflate = negotiate_deflate(config, request, &mut negotiated);

    negotiated.protocol.clone_from(&protocol);

    // 101 with Upgrade, Connection and Sec-WebSocket-Accept over HTTP/1.1; 200 without them
    // for an extended CONNECT (RFC 8441 §5): the core says which.
    let mut response = http::Response::new(R::default());
    *response.status_mut() = http::StatusCode::from_u16(request.status())
        .map_err(|e| HandshakeError::Malformed(e.to_string()))?;
    let h = response.headers_mut();
    for (name, value) in request.answer_headers(&negotiated) {
        let name = http::HeaderName::from_bytes(name.as_bytes())
            .map_err(|e| HandshakeError::Malformed(e.to_string()))?;
        let value = http::HeaderValue::from_str(&value)
            .map_err(|e| HandshakeError::Malformed(e.to_string()))?;
        h.append(name, value);
    }
    let half_close = request.is_extended_connect();
    Ok((
        response,
        Agreed {
            protocol,
            deflate,
            half_close,
        },
    ))
}

/// Resolves to the WebSocket once the `101` response is sent and hyper releases the
/// connection.
#[must_use = "the WebSocket exists only once this future is awaited"]
pub struct PendingUpgrade {
    on_upgrade: OnUpgrade,
    config: Option<Arc<Config>>,
    protocol: Option<String>,
    deflate: Option<Deflate>,
    half_close: bool,
}

impl Future for PendingUpgrade {
    type Output = Result<UpgradedWebSocket>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let upgraded = ready!(Pin::new(&mut this.on_upgrade).poll(cx))
            .map_err(|e| Error::Io(std::io::Error::other(e)))?;
        let config = this.config.take().unwrap_or_default();
        let (io, read) = UpgradedIo::new(upgraded);
        Poll::Ready(Ok(WebSocket::from_parts(Parts {
            io,
            role: Role::Server,
            config,
            read_buf: BytesMut::from(read),
            protocol: this.protocol.take(),
            deflate: this.deflate.take(),
            half_close: this.half_close,
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(extra: &str) -> http::Request<()> {
        http::Request::get("/chat")
            .header(http::header::HOST, "example.test")
            .header(http::header::UPGRADE, "websocket")
            .header(http::header::CONNECTION, "Upgrade")
            .header(http::header::SEC_WEBSOCKET_KEY, "dGhlIHNhbXBsZSBub25jZQ==")
            .header(http::header::SEC_WEBSOCKET_VERSION, "13")
            .header("x-extra", extra)
            .body(())
            .unwrap()
    }

    #[test]
    fn a_head_over_the_handshake_limit_is_431() {
        let config = Config::default().max_handshake_size(1024);
        let (response, _pending) = upgrade::<_, ()>(&mut request(&"a".repeat(700)), config.clone())
            .expect("a head within the limit is accepted");
        assert_eq!(response.status(), http::StatusCode::SWITCHING_PROTOCOLS);
        let Err(err) = upgrade::<_, ()>(&mut request(&"a".repeat(1000)), config) else {
            panic!("a head over the limit is refused");
        };
        assert_eq!(err, HandshakeError::TooLarge { limit: 1024 });
        assert_eq!(err.status(), 431);
    }
}
