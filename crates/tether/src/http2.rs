//! WebSockets over HTTP/2 for clients (RFC 8441): ALPN, extended CONNECT, shared connections.
//!
//! [`ClientBuilder::connect`](crate::ClientBuilder::connect) offers `h2` by ALPN for `wss://`
//! ([`HttpVersion::Auto`]); when the server chooses it, the WebSocket
//! is an extended CONNECT on a stream of that connection. A [`Pool`] lets several WebSockets to
//! one origin share one connection, as a browser's page does:
//!
//! ```no_run
//! # async fn run() -> tether::Result<()> {
//! let pool = tether::Pool::new();
//! let mut sockets = Vec::new();
//! for room in ["a", "b", "c"] {
//!     let url = format!("wss://example.com/ws/rooms/{room}");
//!     let (ws, _) = tether::ClientBuilder::new(&url)?.pool(pool.clone()).connect().await?;
//!     sockets.push(ws); // three WebSockets, one TCP connection (if the server speaks h2)
//! }
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tether_proto::extension::deflate::Deflate;
use tether_proto::handshake::client::{ClientRequest, Response};
use tokio::net::TcpStream;

use crate::client::{ClientBuilder, ClientStream, HttpVersion};
use crate::error::{Error, Result};
use crate::tls::MaybeTlsStream;
use crate::websocket::{Parts, WebSocket};

/// The sending side of a pooled HTTP/2 connection.
type Sender = SendRequest<Empty<Bytes>>;

/// HTTP/2 connections shared by the WebSockets opened through it, one per origin (scheme, host
/// and port). Cheap to clone: clones share the connections.
///
/// WebSockets opened at once to a new origin wait for the one connection the first of them
/// makes. A connection stays open while the pool holds it, idle or not (keepalive pings find
/// a dead one, which the next WebSocket then replaces); [`Pool::clear`] lets go of all of
/// them, each closing once its WebSockets have ended. An origin whose server speaks HTTP/2
/// without extended CONNECT is remembered, and its WebSockets go straight to HTTP/1.1. The
/// first WebSocket to an origin makes its connection with its own builder's TLS and proxy
/// settings.
#[derive(Debug, Clone, Default)]
pub struct Pool {
    origins: Arc<Mutex<HashMap<String, Arc<Slot>>>>,
}

/// What the pool knows of one origin; locked while its connection is being made.
type Slot = tokio::sync::Mutex<Held>;

#[derive(Debug, Default)]
enum Held {
    /// Nothing yet, or the connection ended.
    #[default]
    Nothing,
    /// A connection.
    Connection(Sender),
    /// The server speaks HTTP/2 but refused an extended CONNECT.
    NoExtendedConnect,
}

impl Held {
    fn live(&self) -> Option<Sender> {
        match self {
            Held::Connection(sender) if !sender.is_closed() => Some(sender.clone()),
            _ => None,
        }
    }
}

impl Pool {
    /// An empty pool.
    pub fn new() -> Pool {
        Pool::default()
    }

    /// How many open connections the pool holds (not counting one being made).
    pub fn len(&self) -> usize {
        self.lock()
            .values()
            .filter(|slot| slot.try_lock().is_ok_and(|held| held.live().is_some()))
            .count()
    }

    /// Whether the pool holds no open connection.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Lets go of every connection (each closes once its WebSockets have ended) and forgets
    /// which origins refused extended CONNECTs.
    pub fn clear(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Slot>>> {
        // A panic while holding it cannot leave the map half-changed.
        self.origins
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// What the pool holds for `origin`.
    fn slot(&self, origin: &str) -> Arc<Slot> {
        self.lock().entry(origin.to_owned()).or_default().clone()
    }
}

/// What an attempt over HTTP/2 came to.
pub(crate) enum Opened {
    /// The WebSocket, on a stream.
    WebSocket(Box<ClientStream>, Response),
    /// TLS chose HTTP/1.1 by ALPN: upgrade on this transport.
    Http1(MaybeTlsStream<TcpStream>),
    /// The server speaks HTTP/2 but takes no extended CONNECT: HTTP/1.1 on a new connection.
    Refused,
}

/// Why a stream did not become a WebSocket.
enum Failure {
    /// The connection is gone (closed, or failed): another one may do.
    Connection(Error),
    /// The server reset the stream without an answer: it takes no extended CONNECT.
    Unsupported(Error),
    /// The server answered, and not with a WebSocket (a 4xx, a wrong header): final.
    Answered(Error),
}

/// Opens `request`'s WebSocket over HTTP/2: on the pool's connection to the origin if there is
/// one, else on a new connection offering `h2` by ALPN (prior knowledge for `ws://`).
pub(crate) async fn connect(builder: &ClientBuilder, request: &ClientRequest) -> Result<Opened> {
    let required = builder.http_version_asked() == HttpVersion::Http2;
    let url = builder.url();
    let origin = format!(
        "{}://{}:{}",
        url.scheme(),
        url.host_str().unwrap_or_default(),
        url.port_or_known_default().unwrap_or(0)
    );
    let slot = builder.pool_ref().map(|pool| pool.slot(&origin));
    let mut held = match &slot {
        Some(slot) => Some(slot.lock().await),
        None => None,
    };
    let pooled = match held.as_deref() {
        Some(Held::NoExtendedConnect) if !required => return Ok(Opened::Refused),
        Some(known) => known.live(),
        None => None,
    };
    if let Some(mut sender) = pooled {
        // Streams open concurrently: the slot is only held while a connection is made.
        drop(held.take());
        match open_stream(builder, &mut sender, request).await {
            Ok(opened) => return Ok(opened),
            Err(Failure::Answered(e)) => return Err(e),
            Err(Failure::Unsupported(e)) if required => return Err(unavailable(&e)),
            Err(Failure::Unsupported(_)) => return Ok(Opened::Refused),
            Err(Failure::Connection(e)) => {
                tracing::debug!(%origin, error = %e, "pooled HTTP/2 connection failed; opening another");
                if let Some(slot) = &slot {
                    *slot.lock().await = Held::Nothing;
                }
            }
        }
        // Under the caller's handshake deadline, as the first attempt.
        return Box::pin(connect(builder, request)).await;
    }
    let transport = builder.open(true).await?;
    let h2 = match &transport {
        MaybeTlsStream::Plain(_) => true, // `ws://` comes here only when HTTP/2 is required
        #[cfg(feature = "tls")]
        MaybeTlsStream::Rustls(tls) => tls.get_ref().1.alpn_protocol() == Some(b"h2"),
        MaybeTlsStream::Http2(_) => false,
    };
    if !h2 {
        if required {
            return Err(Error::Http2Unavailable(
                "the server chose HTTP/1.1 by ALPN".into(),
            ));
        }
        return Ok(Opened::Http1(transport));
    }
    let config = builder.config_ref();
    let mut http2 = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    http2.timer(TokioTimer::new());
    if let Some(interval) = config.ping_interval {
        // A connection that many WebSockets share is watched as each of them is.
        http2
            .keep_alive_interval(interval)
            .keep_alive_timeout(config.ping_timeout)
            .keep_alive_while_idle(true);
    }
    let (mut sender, connection) = http2
        .handshake(TokioIo::new(transport))
        .await
        .map_err(io_error)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "HTTP/2 connection ended with an error");
        }
    });
    let opened = open_stream(builder, &mut sender, request).await;
    if let Some(held) = &mut held {
        **held = match &opened {
            Err(Failure::Unsupported(_)) => Held::NoExtendedConnect,
            _ => Held::Connection(sender),
        };
    }
    match opened {
        Ok(opened) => Ok(opened),
        Err(Failure::Answered(e) | Failure::Connection(e)) => Err(e),
        Err(Failure::Unsupported(e)) if required => Err(unavailable(&e)),
        Err(Failure::Unsupported(e)) => {
            tracing::debug!(%origin, error = %e, "no extended CONNECT over HTTP/2; using HTTP/1.1");
            Ok(Opened::Refused)
        }
    }
}

fn unavailable(e: &Error) -> Error {
    Error::Http2Unavailable(format!(
        "the server does not speak HTTP/2 here, or refused the extended CONNECT: {e}"
    ))
}

/// The WebSocket on a new stream of `sender`'s connection.
async fn open_stream(
    builder: &ClientBuilder,
    sender: &mut Sender,
    request: &ClientRequest,
) -> Result<Opened, Failure> {
    let (io, response, deflate) =
        extended_connect(builder, sender, request)
            .await
            .map_err(|e| match e {
                Sent::Connection(e) => Failure::Connection(e),
                Sent::Reset(e) => Failure::Unsupported(e),
                Sent::Answered(e) => Failure::Answered(e),
            })?;
    let ws = WebSocket::from_parts(Parts {
        io: MaybeTlsStream::Http2(Box::new(io)),
        role: tether_proto::Role::Client,
        config: Arc::new(builder.config_ref().clone()),
        read_buf: bytes::BytesMut::new(),
        protocol: response.protocol.clone(),
        deflate,
        half_close: true,
    });
    Ok(Opened::WebSocket(Box::new(ws), response))
}

/// How an extended CONNECT failed.
pub(crate) enum Sent {
    /// The connection is closed or failed.
    Connection(Error),
    /// The stream was reset before any answer.
    Reset(Error),
    /// The server answered, and not with a WebSocket.
    Answered(Error),
}

impl From<Sent> for Error {
    fn from(sent: Sent) -> Error {
        match sent {
            Sent::Connection(e) | Sent::Reset(e) | Sent::Answered(e) => e,
        }
    }
}

/// Sends `request` as an extended CONNECT (RFC 8441) on `sender`'s connection and checks the
/// answer: the stream, the response and the permessage-deflate agreed.
pub(crate) async fn extended_connect<B>(
    builder: &ClientBuilder,
    sender: &mut SendRequest<B>,
    request: &ClientRequest,
) -> Result<(TokioIo<Upgraded>, Response, Option<Deflate>), Sent>
where
    B: hyper::body::Body + Default + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let scheme = if builder.url().scheme() == "wss" {
        "https"
    } else {
        "http"
    };
    let mut req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(format!("{scheme}://{}{}", request.host, request.target));
    for (name, value) in request
        .extended_connect_headers()
        .map_err(|e| Sent::Answered(e.into()))?
    {
        req = req.header(name, value);
    }
    let mut req = req
        .body(B::default())
        .map_err(|e| Sent::Answered(io_error(e)))?;
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    sender
        .ready()
        .await
        .map_err(|e| Sent::Connection(io_error(e)))?;
    let response = match sender.send_request(req).await {
        Ok(response) => response,
        Err(e) if e.is_closed() || e.is_canceled() => return Err(Sent::Connection(io_error(e))),
        Err(e) => return Err(Sent::Reset(io_error(e))),
    };
    let headers = crate::upgrade::headers_of(response.headers());
    let checked = request
        .check_extended_connect(response.status().as_u16(), headers)
        .map_err(|e| Sent::Answered(e.into()))?;
    let deflate =
        crate::handshake::accept_deflate(builder.config_ref(), &checked).map_err(Sent::Answered)?;
    let upgraded = hyper::upgrade::on(response)
        .await
        .map_err(|e| Sent::Connection(io_error(e)))?;
    Ok((TokioIo::new(upgraded), checked, deflate))
}

fn io_error(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Error {
    Error::Io(std::io::Error::other(e))
}
