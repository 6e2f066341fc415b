//! The server side of the opening handshake: parse and validate a request, answer it.

use super::{accept_key, is_safe_value, is_token, Headers, MAX_HEADERS, VERSION};
use base64::Engine as _;

/// A client's opening handshake, parsed and validated: an HTTP/1.1 upgrade (RFC 6455 §4.1)
/// or an HTTP/2 extended CONNECT (RFC 8441 §4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The request target: path and query, e.g. `/ws/chat?since=4`.
    pub target: String,
    /// Every header line.
    pub headers: Headers,
    /// The `Sec-WebSocket-Key`; `None` for an extended CONNECT, which has none.
    key: Option<String>,
}

/// Why a handshake request was refused; each maps to the HTTP status to answer with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// Not parseable as an HTTP/1.x request.
    #[error("malformed HTTP request: {0}")]
    Malformed(String),
    /// The request head is larger than the configured limit.
    #[error("request head larger than {limit} bytes")]
    TooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// More header lines than [`MAX_HEADERS`].
    #[error("more than {MAX_HEADERS} header lines")]
    TooManyHeaders,
    /// The method is not GET.
    #[error("method {0} is not GET")]
    Method(String),
    /// HTTP/1.0 (the upgrade needs HTTP/1.1 or later).
    #[error("HTTP/1.1 or later is required")]
    HttpVersion,
    /// No Host header.
    #[error("missing Host header")]
    MissingHost,
    /// No `Upgrade: websocket`.
    #[error("missing or wrong Upgrade header (expected websocket)")]
    NotWebSocket,
    /// `Connection` has no `upgrade` token.
    #[error("Connection header does not contain upgrade")]
    ConnectionNotUpgrade,
    /// `Sec-WebSocket-Key` missing or not 16 bytes of base64.
    #[error("missing or invalid Sec-WebSocket-Key")]
    InvalidKey,
    /// `Sec-WebSocket-Version` other than 13 (answered with 426 and `Sec-WebSocket-Version: 13`).
    #[error("unsupported Sec-WebSocket-Version {0:?} (only 13 is supported)")]
    UnsupportedVersion(String),
    /// The Origin is not allowed by the server's policy.
    #[error("origin {0:?} is not allowed")]
    OriginRefused(String),
    /// An HTTP/2 CONNECT whose `:protocol` is missing or not `websocket` (RFC 8441 §4).
    #[error("extended CONNECT with :protocol {0:?} (expected websocket)")]
    NotWebSocketProtocol(Option<String>),
    /// The application refused the request with a status and reason.
    #[error("refused with {status}: {reason}")]
    Refused {
        /// The HTTP status to answer with.
        status: u16,
        /// The reason, sent as the body.
        reason: String,
    },
}

impl HandshakeError {
    /// The HTTP status this refusal is answered with.
    pub fn status(&self) -> u16 {
        match self {
            HandshakeError::UnsupportedVersion(_) => 426,
            HandshakeError::TooLarge { .. } | HandshakeError::TooManyHeaders => 431,
            HandshakeError::Method(_) => 405,
            HandshakeError::OriginRefused(_) => 403,
            HandshakeError::Refused { status, .. } => *status,
            _ => 400,
        }
    }

    /// The complete HTTP response refusing the request, with the reason as a text body.
    pub fn response(&self) -> Vec<u8> {
        let extra: &[(&str, &str)] = match self {
            HandshakeError::UnsupportedVersion(_) => &[("Sec-WebSocket-Version", VERSION)],
            HandshakeError::Method(_) => &[("Allow", "GET")],
            _ => &[],
        };
        reject_response(self.status(), &self.to_string(), extra)
    }
}

/// What the server answers to a valid request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Accept {
    /// The subprotocol chosen from the client's list, if any.
    pub protocol: Option<String>,
    /// The `Sec-WebSocket-Extensions` answer, if an extension was negotiated.
    pub extensions: Option<String>,
    /// Extra response headers (name, value).
    pub headers: Vec<(String, String)>,
}

impl Request {
    /// Parses a request head from the start of `buf`.
    ///
    /// Returns `Ok(None)` while the head is incomplete (and under `max_len` bytes), or the
    /// validated request and the length of its head; bytes after it belong to the WebSocket.
    ///
    /// # Errors
    /// A [`HandshakeError`] for a malformed, oversized or non-WebSocket request; answer it
    /// with [`HandshakeError::response`].
    pub fn parse(buf: &[u8], max_len: usize) -> Result<Option<(Request, usize)>, HandshakeError> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let status = match req.parse(buf) {
            Ok(status) => status,
            Err(httparse::Error::TooManyHeaders) => return Err(HandshakeError::TooManyHeaders),
            Err(e) => return Err(HandshakeError::Malformed(e.to_string())),
        };
        let head_len = match status {
            httparse::Status::Partial if buf.len() > max_len => {
                return Err(HandshakeError::TooLarge { limit: max_len })
            }
            httparse::Status::Partial => return Ok(None),
            httparse::Status::Complete(n) if n > max_len => {
                return Err(HandshakeError::TooLarge { limit: max_len })
            }
            httparse::Status::Complete(n) => n,
        };
        let method = req.method.unwrap_or_default();
        let target = req.path.unwrap_or("/").to_owned();
        let request = Request::from_parts(
            method,
            req.version.unwrap_or(0) >= 1,
            target,
            Headers::from_httparse(req.headers),
        )?;
        Ok(Some((request, head_len)))
    }

    /// Validates a request that another HTTP stack (hyper, say) already parsed.
    ///
    /// # Errors
    /// A [`HandshakeError`] for anything RFC 6455 §4.2.1 forbids.
    pub fn from_parts(
        method: &str,
        http11_or_later: bool,
        target: String,
        headers: Headers,
    ) -> Result<Request, HandshakeError> {
        if method != "GET" {
            return Err(HandshakeError::Method(method.to_owned()));
        }
        if !http11_or_later {
            return Err(HandshakeError::HttpVersion);
        }
        if headers.get("host").is_none() {
            return Err(HandshakeError::MissingHost);
        }
        if !headers.has_token("upgrade", "websocket") {
            return Err(HandshakeError::NotWebSocket);
        }
        if !headers.has_token("connection", "upgrade") {
            return Err(HandshakeError::ConnectionNotUpgrade);
        }
        let version = headers.get_str("sec-websocket-version").unwrap_or("");
        if version != VERSION {
            return Err(HandshakeError::UnsupportedVersion(version.to_owned()));
        }
        let key = headers
            .get_str("sec-websocket-key")
            .filter(|k| {
                base64::engine::general_purpose::STANDARD
                    .decode(k)
                    .is_ok_and(|raw| raw.len() == 16)
            })
            .ok_or(HandshakeError::InvalidKey)?
            .to_owned();
        Ok(Request {
            target,
            headers,
            key: Some(key),
        })
    }

    /// Validates the head of an HTTP/2 extended CONNECT (RFC 8441 §4) as the opening of a
    /// WebSocket: `method` CONNECT, `protocol` (the `:protocol` pseudo-header) `websocket`,
    /// `Sec-WebSocket-Version: 13`. It has no `Sec-WebSocket-Key`, and its answer no
    /// `Sec-WebSocket-Accept` (RFC 8441 §5: the stream ties the answer to the request); the
    /// answer is a `200` ([`Request::status`], [`Request::answer_headers`]) and the WebSocket
    /// ends with the stream rather than the TCP connection. `authority` (the `:authority`
    /// pseudo-header) stands for the Host header when there is none, for the Origin policy.
    ///
    /// # Errors
    /// [`HandshakeError::Method`] for another method (405),
    /// [`HandshakeError::NotWebSocketProtocol`] without `:protocol: websocket`,
    /// [`HandshakeError::UnsupportedVersion`] (426), and [`HandshakeError::TooManyHeaders`].
    pub fn from_extended_connect(
        method: &str,
        protocol: Option<&str>,
        authority: Option<&str>,
        target: String,
        mut headers: Headers,
    ) -> Result<Request, HandshakeError> {
        if method != "CONNECT" {
            return Err(HandshakeError::Method(method.to_owned()));
        }
        if protocol != Some("websocket") {
            return Err(HandshakeError::NotWebSocketProtocol(
                protocol.map(str::to_owned),
            ));
        }
        let version = headers.get_str("sec-websocket-version").unwrap_or("");
        if version != VERSION {
            return Err(HandshakeError::UnsupportedVersion(version.to_owned()));
        }
        if headers.get("host").is_none() {
            if let Some(authority) = authority {
                if headers.0.len() >= MAX_HEADERS {
                    return Err(HandshakeError::TooManyHeaders);
                }
                headers.0.push(super::Header {
                    name: "host".to_owned(),
                    value: authority.as_bytes().to_vec(),
                });
            }
        }
        Ok(Request {
            target,
            headers,
            key: None,
        })
    }

    /// Whether this is an HTTP/2 extended CONNECT (RFC 8441) rather than an HTTP/1.1 upgrade.
    pub fn is_extended_connect(&self) -> bool {
        self.key.is_none()
    }

    /// The status that accepts it: `101 Switching Protocols` for an HTTP/1.1 upgrade, `200`
    /// for an extended CONNECT (RFC 8441 §5).
    pub fn status(&self) -> u16 {
        if self.is_extended_connect() {
            200
        } else {
            101
        }
    }

    /// The header fields of the answer that accepts it with `accept`, in order: for an
    /// HTTP/1.1 upgrade `Upgrade`, `Connection` and `Sec-WebSocket-Accept`, for either the
    /// chosen subprotocol and extensions and `accept`'s own headers. Names or values with
    /// CR/LF, and a subprotocol that is not an HTTP token, are left out.
    pub fn answer_headers(&self, accept: &Accept) -> Vec<(String, String)> {
        let mut out = Vec::with_capacity(5 + accept.headers.len());
        if let Some(key) = &self.key {
            out.push(("Upgrade".to_owned(), "websocket".to_owned()));
            out.push(("Connection".to_owned(), "Upgrade".to_owned()));
            out.push((
                "Sec-WebSocket-Accept".to_owned(),
                accept_key(key.as_bytes()),
            ));
        }
        if let Some(protocol) = accept.protocol.as_deref().filter(|p| is_token(p)) {
            out.push(("Sec-WebSocket-Protocol".to_owned(), protocol.to_owned()));
        }
        if let Some(ext) = accept.extensions.as_deref().filter(|e| is_safe_value(e)) {
            out.push(("Sec-WebSocket-Extensions".to_owned(), ext.to_owned()));
        }
        out.extend(
            accept
                .headers
                .iter()
                .filter(|(name, value)| is_token(name) && is_safe_value(value))
                .cloned(),
        );
        out
    }

    /// The path part of the target (before any `?`).
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("/")
    }

    /// The query part of the target (after `?`), if any.
    pub fn query(&self) -> Option<&str> {
        self.target.split_once('?').map(|(_, q)| q)
    }

    /// The `Sec-WebSocket-Key`; `None` for an extended CONNECT, which has none.
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// The `Origin` header, if the client sent one (browsers always do).
    pub fn origin(&self) -> Option<&str> {
        self.headers.get_str("origin")
    }

    /// The `Host` header.
    pub fn host(&self) -> Option<&str> {
        self.headers.get_str("host")
    }

    /// The subprotocols the client offered, in its order of preference.
    pub fn protocols(&self) -> impl Iterator<Item = &str> {
        self.headers.tokens("sec-websocket-protocol")
    }

    /// The first subprotocol in the client's list that `supported` contains.
    pub fn select_protocol<'a>(&'a self, supported: &[impl AsRef<str>]) -> Option<&'a str> {
        self.protocols()
            .find(|offered| supported.iter().any(|s| s.as_ref() == *offered))
    }

    /// The complete `101 Switching Protocols` response of an HTTP/1.1 upgrade, as bytes
    /// ([`Request::answer_headers`]). (An extended CONNECT is answered by the HTTP/2 layer,
    /// with [`Request::status`] and the same headers.)
    ///
    /// Header names or values with CR/LF, and a subprotocol that is not an HTTP token, are
    /// left out rather than written.
    pub fn accept(&self, accept: &Accept) -> Vec<u8> {
        let mut out = String::with_capacity(160);
        out.push_str("HTTP/1.1 101 Switching Protocols\r\n");
        push_headers(&mut out, &self.answer_headers(accept));
        out.push_str("\r\n");
        out.into_bytes()
    }
}

fn push_headers(out: &mut String, headers: &[(String, String)]) {
    for (name, value) in headers {
        if is_token(name) && is_safe_value(value) {
            out.push_str(name);
            out.push_str(": ");
            out.push_str(value);
            out.push_str("\r\n");
        }
    }
}

/// A complete HTTP error response with `reason` as a plain-text body; the connection closes.
pub fn reject_response(status: u16, reason: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    let body = format!("{reason}\n");
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n",
        reason_phrase(status),
        body.len()
    );
    let owned: Vec<(String, String)> = headers
        .iter()
        .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
        .collect();
    push_headers(&mut out, &owned);
    out.push_str("\r\n");
    out.push_str(&body);
    out.into_bytes()
}

/// The standard reason phrase of the statuses a handshake answers with.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "GET /chat?room=a HTTP/1.1\r\nHost: server.example.com\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: http://example.com\r\nSec-WebSocket-Protocol: chat, superchat\r\nSec-WebSocket-Version: 13\r\n\r\n";

    fn parse(s: &str) -> Result<Option<(Request, usize)>, HandshakeError> {
        Request::parse(s.as_bytes(), 8192)
    }

    #[test]
    fn accepts_rfc_request_and_answers_with_accept_key() {
        let (req, n) = parse(GOOD).unwrap().unwrap();
        assert_eq!(n, GOOD.len());
        assert_eq!(req.path(), "/chat");
        assert_eq!(req.query(), Some("room=a"));
        assert_eq!(req.origin(), Some("http://example.com"));
        assert_eq!(req.select_protocol(&["superchat", "chat"]), Some("chat"));
        let resp = String::from_utf8(req.accept(&Accept {
            protocol: Some("chat".into()),
            ..Accept::default()
        }))
        .unwrap();
        assert!(resp.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
        assert!(resp.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(resp.contains("Sec-WebSocket-Protocol: chat\r\n"));
        assert!(resp.ends_with("\r\n\r\n"));
    }

    /// The headers of an HTTP/2 extended CONNECT as the HTTP/2 layer hands them over.
    fn h2_headers(extra: &[(&str, &str)]) -> Headers {
        let mut all = vec![
            ("sec-websocket-version", "13"),
            ("origin", "https://a.test"),
        ];
        all.extend_from_slice(extra);
        Headers(
            all.into_iter()
                .map(|(name, value)| super::super::Header {
                    name: name.to_owned(),
                    value: value.as_bytes().to_vec(),
                })
                .collect(),
        )
    }

    #[test]
    fn an_extended_connect_opens_without_a_key_and_is_answered_200() {
        let offered = h2_headers(&[("sec-websocket-protocol", "chat")]);
        let req = Request::from_extended_connect(
            "CONNECT",
            Some("websocket"),
            Some("a.test:8443"),
            "/ws?x=1".into(),
            offered,
        )
        .unwrap();
        assert!(req.is_extended_connect());
        assert_eq!((req.key(), req.status()), (None, 200));
        // `:authority` stands for Host (the Origin policy compares them).
        assert_eq!(req.host(), Some("a.test:8443"));
        assert_eq!((req.path(), req.query()), ("/ws", Some("x=1")));
        let accept = Accept {
            protocol: Some("chat".into()),
            extensions: Some("permessage-deflate".into()),
            headers: vec![
                ("x-bad\r\n".into(), "v".into()),
                ("x-ok".into(), "v".into()),
            ],
        };
        // RFC 8441 §5: no Upgrade, Connection or Sec-WebSocket-Accept.
        assert_eq!(
            req.answer_headers(&accept),
            [
                ("Sec-WebSocket-Protocol", "chat"),
                ("Sec-WebSocket-Extensions", "permessage-deflate"),
                ("x-ok", "v"),
            ]
            .map(|(n, v)| (n.to_owned(), v.to_owned()))
        );
        // The HTTP/1.1 upgrade keeps its own.
        let (h1, _) = parse(GOOD).unwrap().unwrap();
        assert_eq!(h1.status(), 101);
        let names: Vec<String> = h1
            .answer_headers(&Accept::default())
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["Upgrade", "Connection", "Sec-WebSocket-Accept"]);
    }

    #[test]
    fn an_extended_connect_needs_its_method_protocol_and_version() {
        let open = |method, protocol, headers| {
            Request::from_extended_connect(method, protocol, None, "/".into(), headers)
                .map(|_| ())
                .map_err(|e| (e.status(), e))
        };
        assert_eq!(
            open("GET", Some("websocket"), h2_headers(&[]))
                .unwrap_err()
                .0,
            405
        );
        assert_eq!(
            open("CONNECT", None, h2_headers(&[])).unwrap_err(),
            (400, HandshakeError::NotWebSocketProtocol(None))
        );
        assert_eq!(
            open("CONNECT", Some("webtransport"), h2_headers(&[])).unwrap_err(),
            (
                400,
                HandshakeError::NotWebSocketProtocol(Some("webtransport".into()))
            )
        );
        let unversioned = Headers(Vec::new());
        assert_eq!(
            open("CONNECT", Some("websocket"), unversioned)
                .unwrap_err()
                .0,
            426
        );
        assert_eq!(open("CONNECT", Some("websocket"), h2_headers(&[])), Ok(()));
    }

    #[test]
    fn partial_head_is_incomplete_until_limit() {
        assert_eq!(parse(&GOOD[..40]).unwrap(), None);
        let err = Request::parse(&GOOD.as_bytes()[..40], 20).unwrap_err();
        assert_eq!(err.status(), 431);
    }

    #[test]
    fn refusals_map_to_statuses() {
        let cases = [
            (GOOD.replace("GET", "POST"), 405),
            (GOOD.replace("HTTP/1.1", "HTTP/1.0"), 400),
            (GOOD.replace("Host: server.example.com\r\n", ""), 400),
            (GOOD.replace("Upgrade: websocket", "Upgrade: h2c"), 400),
            (GOOD.replace("keep-alive, Upgrade", "keep-alive"), 400),
            (GOOD.replace("dGhlIHNhbXBsZSBub25jZQ==", "c2hvcnQ="), 400),
            (GOOD.replace("Version: 13", "Version: 8"), 426),
            ("GET / HTTP/1.1\r\nHost\r\n\r\n".to_owned(), 400),
        ];
        for (req, status) in cases {
            let err = parse(&req).unwrap_err();
            assert_eq!(err.status(), status, "{req:?}: {err}");
            let resp = String::from_utf8(err.response()).unwrap();
            assert!(resp.starts_with(&format!("HTTP/1.1 {status} ")), "{resp}");
        }
    }

    #[test]
    fn version_refusal_names_the_supported_version() {
        let err = parse(&GOOD.replace("Version: 13", "Version: 8")).unwrap_err();
        let resp = String::from_utf8(err.response()).unwrap();
        assert!(resp.contains("Sec-WebSocket-Version: 13\r\n"));
    }

    #[test]
    fn too_many_headers_is_431() {
        let mut req = String::from("GET / HTTP/1.1\r\n");
        for i in 0..100 {
            req.push_str(&format!("X-{i}: y\r\n"));
        }
        req.push_str("\r\n");
        assert_eq!(parse(&req).unwrap_err().status(), 431);
    }

    #[test]
    fn response_drops_header_injection() {
        let (req, _) = parse(GOOD).unwrap().unwrap();
        let resp = String::from_utf8(req.accept(&Accept {
            protocol: Some("bad\r\nX-Evil: 1".into()),
            extensions: None,
            headers: vec![
                ("X-Ok".into(), "1".into()),
                ("X-Bad".into(), "a\r\nb".into()),
            ],
        }))
        .unwrap();
        assert!(!resp.contains("Evil"));
        assert!(!resp.contains("X-Bad"));
        assert!(resp.contains("X-Ok: 1\r\n"));
    }
}
