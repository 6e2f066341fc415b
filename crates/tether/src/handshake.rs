//! The opening handshake over any transport, with the size limit and timeout of [`Config`],
//! and the types a handshake callback works with.

use std::sync::Arc;

use bytes::{Buf, BytesMut};
use tether_proto::extension::deflate::{self, Deflate};
use tether_proto::extension::{self, Extension};
pub use tether_proto::handshake::client::{ClientHandshakeError, ClientRequest, Response};
pub use tether_proto::handshake::server::{Accept, HandshakeError, Request};
use tether_proto::handshake::Headers;
use tether_proto::Role;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::websocket::{Parts, WebSocket};

/// Accepts a WebSocket on `stream` with the default [`Config`].
///
/// # Errors
/// See [`accept_hdr`].
pub async fn accept<S>(stream: S) -> Result<WebSocket<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    accept_hdr(stream, Config::default(), |_, _| Ok(())).await
}

/// Accepts a WebSocket on `stream` with `config`.
///
/// # Errors
/// See [`accept_hdr`].
pub async fn accept_with_config<S>(
    stream: S,
    config: impl Into<Arc<Config>>,
) -> Result<WebSocket<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    accept_hdr(stream, config, |_, _| Ok(())).await
}

/// Accepts a WebSocket on `stream`, letting `callback` inspect the request (path, headers,
/// origin) and shape the answer (subprotocol, extra headers) or refuse it.
///
/// The subprotocol is preselected from [`Config::protocols`] and the Origin checked against
/// [`Config::allowed_origins`] before the callback runs.
///
/// ```no_run
/// # async fn run(stream: tokio::net::TcpStream) -> tether::Result<()> {
/// use tether::handshake::{HandshakeError, Request};
/// let ws = tether::accept_hdr(stream, tether::Config::default(), |req: &Request, accept| {
///     if req.path() != "/ws" {
///         return Err(HandshakeError::Refused { status: 404, reason: "no such endpoint".into() });
///     }
///     accept.headers.push(("X-Served-By".into(), "tether".into()));
///     Ok(())
/// })
/// .await?;
/// # Ok(()) }
/// ```
///
/// # Errors
/// [`Error::Handshake`] for a request that is not a valid WebSocket upgrade, or that the
/// policy or callback refused — the client has been answered with the HTTP status and reason;
/// [`Error::HandshakeTimeout`], [`Error::HandshakeEof`], [`Error::Io`].
///
/// # Cancel safety
/// Not cancel-safe: dropping the future abandons the handshake (and the stream).
pub async fn accept_hdr<S, F>(
    mut stream: S,
    config: impl Into<Arc<Config>>,
    callback: F,
) -> Result<WebSocket<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnOnce(&Request, &mut Accept) -> Result<(), HandshakeError>,
{
    // A server may pass one `Arc<Config>` for all its connections.
    let config: Arc<Config> = config.into();
    let deadline = config.handshake_timeout;
    let handshake = async {
        let mut buf = BytesMut::with_capacity(1024);
        let parsed = read_head(&mut stream, &mut buf, config.max_handshake_size, |b| {
            Request::parse(b, config.max_handshake_size)
        })
        .await;
        let (request, head_len) = match parsed {
            Ok(found) => found,
            Err(HeadError::Parse(e)) => return Err(refuse(&mut stream, e).await),
            Err(HeadError::Io(e)) => return Err(e),
        };
        let mut accept = Accept {
            protocol: request
                .select_protocol(&config.protocols)
                .map(str::to_owned),
            ..Accept::default()
        };
        if let Err(e) =
            check_origin(&config, &request).and_then(|()| callback(&request, &mut accept))
        {
            return Err(refuse(&mut stream, e).await);
        }
        let deflate = negotiate_deflate(&config, &request, &mut accept);
        stream.write_all(&request.accept(&accept)).await?;
        stream.flush().await?;
        buf.advance(head_len);
        tracing::debug!(path = request.path(), protocol = ?accept.protocol, "accepted WebSocket");
        Ok(WebSocket::from_parts(Parts {
            io: stream,
            role: Role::Server,
            config: config.clone(),
            read_buf: buf,
            protocol: accept.protocol,
            deflate,
            half_close: false,
        }))
    };
    match tokio::time::timeout(deadline, handshake).await {
        Ok(result) => result,
        Err(_) => Err(Error::HandshakeTimeout),
    }
}

/// Refuses the handshake: writes the HTTP error (best effort) and returns the error.
async fn refuse<S: AsyncWrite + Unpin>(stream: &mut S, err: HandshakeError) -> Error {
    tracing::info!(status = err.status(), error = %err, "refused WebSocket handshake");
    let _ = stream.write_all(&err.response()).await;
    let _ = stream.shutdown().await;
    Error::Handshake(err)
}

/// The server side of permessage-deflate: accepts the first offer it can honour and writes
/// the answer into `accept`. A malformed extensions header declines compression.
pub(crate) fn negotiate_deflate(
    config: &Config,
    request: &Request,
    accept: &mut Accept,
) -> Option<Deflate> {
    let local = config.deflate.as_ref()?;
    let values = request
        .headers
        .get_all("sec-websocket-extensions")
        .filter_map(|v| std::str::from_utf8(v).ok());
    let offers: Vec<Extension> = match extension::parse(values) {
        Ok(offers) => offers,
        Err(e) => {
            tracing::debug!(error = %e, "declining extensions");
            return None;
        }
    };
    let params = deflate::negotiate_server(&offers, local)?;
    accept.extensions = Some(params.to_string());
    Some(Deflate::new(Role::Server, params, local))
}

/// The client side of permessage-deflate: checks the server's answer against the offer.
pub(crate) fn accept_deflate(config: &Config, response: &Response) -> Result<Option<Deflate>> {
    let (Some(local), Some(answer)) = (&config.deflate, response.extensions.as_deref()) else {
        return Ok(None);
    };
    let answer =
        extension::parse([answer]).map_err(|e| ClientHandshakeError::Extension(e.to_string()))?;
    let params =
        deflate::negotiate_client(&answer, local).map_err(ClientHandshakeError::Extension)?;
    Ok(params.map(|p| Deflate::new(Role::Client, p, local)))
}

pub(crate) fn check_origin(config: &Config, request: &Request) -> Result<(), HandshakeError> {
    let (Some(allowed), Some(origin)) = (&config.allowed_origins, request.origin()) else {
        return Ok(());
    };
    let own = match (&config.same_origin_scheme, request.host()) {
        (Some(scheme), Some(host)) => origin
            .split_once("://")
            .is_some_and(|(s, h)| s.eq_ignore_ascii_case(scheme) && h.eq_ignore_ascii_case(host)),
        _ => false,
    };
    if own
        || allowed
            .iter()
            .any(|a| a.trim_end_matches('/').eq_ignore_ascii_case(origin))
    {
        Ok(())
    } else {
        Err(HandshakeError::OriginRefused(origin.to_owned()))
    }
}

/// Runs the client handshake over an established `stream` (TCP, TLS, a proxy tunnel…).
///
/// # Errors
/// [`Error::ClientHandshake`] when the server refuses or answers wrongly;
/// [`Error::HandshakeTimeout`], [`Error::HandshakeEof`], [`Error::Io`].
///
/// # Cancel safety
/// Not cancel-safe: dropping the future abandons the handshake.
pub async fn client<S>(
    stream: S,
    request: ClientRequest,
    config: Config,
) -> Result<(WebSocket<S>, Response)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let deadline = tokio::time::Instant::now() + config.handshake_timeout;
    client_until(stream, request, config, deadline).await
}

/// [`client`] with an absolute deadline (shared with the TCP, proxy and TLS steps before it).
pub(crate) async fn client_until<S>(
    mut stream: S,
    mut request: ClientRequest,
    config: Config,
    deadline: tokio::time::Instant,
) -> Result<(WebSocket<S>, Response)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let config = Arc::new(config);
    if let Some(local) = &config.deflate {
        request.extensions = Some(local.offer());
    }
    let handshake = async {
        stream.write_all(&request.encode()?).await?;
        stream.flush().await?;
        let mut buf = BytesMut::with_capacity(1024);
        let parsed = read_head(&mut stream, &mut buf, config.max_handshake_size, |b| {
            request.parse_response(b, config.max_handshake_size)
        })
        .await
        .map_err(|e| match e {
            HeadError::Parse(e) => Error::ClientHandshake(e),
            HeadError::Io(e) => e,
        });
        let (response, head_len) = match parsed {
            Ok(found) => found,
            Err(Error::ClientHandshake(ClientHandshakeError::Status {
                status,
                reason,
                headers,
                mut body,
            })) => {
                read_refusal_body(&mut stream, &headers, &mut body).await;
                return Err(Error::ClientHandshake(ClientHandshakeError::Status {
                    status,
                    reason,
                    headers,
                    body,
                }));
            }
            Err(e) => return Err(e),
        };
        buf.advance(head_len);
        let deflate = accept_deflate(&config, &response)?;
        let ws = WebSocket::from_parts(Parts {
            io: stream,
            role: Role::Client,
            config: config.clone(),
            read_buf: buf,
            protocol: response.protocol.clone(),
            deflate,
            half_close: false,
        });
        Ok((ws, response))
    };
    match tokio::time::timeout_at(deadline, handshake).await {
        Ok(result) => result,
        Err(_) => Err(Error::HandshakeTimeout),
    }
}

/// The most of a refusal's body that is read (for error messages).
const MAX_REFUSAL_BODY: usize = 16 << 10;

/// Reads the rest of a refused handshake's body (up to `Content-Length`, or to EOF without
/// one), at most [`MAX_REFUSAL_BODY`] bytes and for at most two seconds.
async fn read_refusal_body<S: AsyncRead + Unpin>(
    stream: &mut S,
    headers: &Headers,
    body: &mut Vec<u8>,
) {
    let want = tether_proto::handshake::client::content_length(headers)
        .unwrap_or(MAX_REFUSAL_BODY)
        .min(MAX_REFUSAL_BODY);
    let read = async {
        let mut chunk = [0u8; 4096];
        while body.len() < want {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => body.extend_from_slice(&chunk[..n.min(want - body.len())]),
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), read).await;
}

enum HeadError<E> {
    Parse(E),
    Io(Error),
}

/// Reads until `parse` finds a complete head; parsing is retried only when a line ended.
async fn read_head<S, T, E>(
    stream: &mut S,
    buf: &mut BytesMut,
    max_len: usize,
    parse: impl Fn(&[u8]) -> Result<Option<T>, E>,
) -> Result<T, HeadError<E>>
where
    S: AsyncRead + Unpin,
{
    let mut fresh_from = 0;
    loop {
        if buf[fresh_from..].contains(&b'\n') || buf.len() > max_len {
            match parse(buf) {
                Ok(Some(found)) => return Ok(found),
                Ok(None) => {}
                Err(e) => return Err(HeadError::Parse(e)),
            }
        }
        fresh_from = buf.len();
        // Never read far past the limit: the rest of the buffer belongs to the WebSocket.
        buf.reserve(1024.min(max_len + 1 - buf.len().min(max_len)).max(1));
        match stream.read_buf(buf).await {
            Ok(0) => return Err(HeadError::Io(Error::HandshakeEof)),
            Ok(_) => {}
            Err(e) => return Err(HeadError::Io(e.into())),
        }
    }
}
