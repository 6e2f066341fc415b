//! The client side of the opening handshake: write a request, check the server's answer.

use super::{accept_key, generate_key, is_safe_value, is_token, Headers, MAX_HEADERS, VERSION};

/// A client's opening handshake request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientRequest {
    /// The `Host` header value (`host` or `host:port`).
    pub host: String,
    /// The request target (path and query).
    pub target: String,
    /// The `Sec-WebSocket-Key` sent.
    pub key: String,
    /// Subprotocols offered, in order of preference.
    pub protocols: Vec<String>,
    /// The `Sec-WebSocket-Extensions` offer, if any.
    pub extensions: Option<String>,
    /// Extra request headers (name, value), e.g. `Origin` or `Authorization`.
    pub headers: Vec<(String, String)>,
}

/// The server's `101` answer, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Every header line of the response.
    pub headers: Headers,
    /// The subprotocol the server chose, if any (always one the client offered).
    pub protocol: Option<String>,
    /// The `Sec-WebSocket-Extensions` answer, if any.
    pub extensions: Option<String>,
}

/// Why the server's answer does not open a WebSocket.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClientHandshakeError {
    /// The request has a header the client refuses to write (CR/LF, or not a token name).
    #[error("invalid request header {0:?}")]
    InvalidRequestHeader(String),
    /// Not parseable as an HTTP/1.x response.
    #[error("malformed HTTP response: {0}")]
    Malformed(String),
    /// The response head is larger than the configured limit.
    #[error("response head larger than {limit} bytes")]
    TooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// A status other than 101: the server refused the upgrade.
    #[error("server answered {status} {reason} instead of 101")]
    Status {
        /// The HTTP status.
        status: u16,
        /// The reason phrase.
        reason: String,
        /// The response headers.
        headers: Headers,
        /// The start of the response body: the bytes that arrived with the head (a driver
        /// may read the rest), cut at `Content-Length`.
        body: Vec<u8>,
    },
    /// No `Upgrade: websocket`.
    #[error("response lacks Upgrade: websocket")]
    NotWebSocket,
    /// `Connection` has no `upgrade` token.
    #[error("response Connection header does not contain upgrade")]
    ConnectionNotUpgrade,
    /// `Sec-WebSocket-Accept` missing or wrong.
    #[error("wrong Sec-WebSocket-Accept")]
    BadAccept,
    /// A subprotocol the client did not offer (or one when none was offered).
    #[error("server chose subprotocol {0:?}, which was not offered")]
    UnexpectedProtocol(String),
    /// An extension the client did not offer.
    #[error("server answered extensions {0:?}, which were not offered")]
    UnexpectedExtension(String),
    /// An extension answer the client cannot honour (checked by the extension's negotiation).
    #[error("server's extension answer cannot be honoured: {0}")]
    Extension(String),
}

impl ClientRequest {
    /// A request for `target` on `host`, with a fresh random key.
    pub fn new(host: impl Into<String>, target: impl Into<String>) -> Self {
        ClientRequest {
            host: host.into(),
            target: target.into(),
            key: generate_key(),
            protocols: Vec::new(),
            extensions: None,
            headers: Vec::new(),
        }
    }

    /// The request head.
    ///
    /// # Errors
    /// [`ClientHandshakeError::InvalidRequestHeader`] when a name, value, subprotocol or
    /// target would break the request (CR, LF, NUL, or a non-token name).
    pub fn encode(&self) -> Result<Vec<u8>, ClientHandshakeError> {
        let bad = |what: &str| ClientHandshakeError::InvalidRequestHeader(what.to_owned());
        if !is_safe_value(&self.target) || self.target.contains(' ') || !is_safe_value(&self.host) {
            return Err(bad(&self.target));
        }
        let mut out = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {}\r\nSec-WebSocket-Version: {VERSION}\r\n",
            self.target, self.host, self.key
        );
        if !self.protocols.is_empty() {
            if let Some(p) = self.protocols.iter().find(|p| !is_token(p)) {
                return Err(bad(p));
            }
            out.push_str("Sec-WebSocket-Protocol: ");
            out.push_str(&self.protocols.join(", "));
            out.push_str("\r\n");
        }
        if let Some(ext) = &self.extensions {
            if !is_safe_value(ext) {
                return Err(bad(ext));
            }
            out.push_str("Sec-WebSocket-Extensions: ");
            out.push_str(ext);
            out.push_str("\r\n");
        }
        for (name, value) in &self.headers {
            if !is_token(name) || !is_safe_value(value) {
                return Err(bad(name));
            }
            out.push_str(name);
            out.push_str(": ");
            out.push_str(value);
            out.push_str("\r\n");
        }
        out.push_str("\r\n");
        Ok(out.into_bytes())
    }

    /// Parses the server's answer from the start of `buf`.
    ///
    /// Returns `Ok(None)` while the head is incomplete (and under `max_len`), or the checked
    /// response and the length of its head; bytes after it are the server's first frames.
    ///
    /// # Errors
    /// A [`ClientHandshakeError`] for anything but a valid `101` answering this request.
    pub fn parse_response(
        &self,
        buf: &[u8],
        max_len: usize,
    ) -> Result<Option<(Response, usize)>, ClientHandshakeError> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut headers);
        let head_len = match resp.parse(buf) {
            Ok(httparse::Status::Partial) if buf.len() > max_len => {
                return Err(ClientHandshakeError::TooLarge { limit: max_len })
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Ok(httparse::Status::Complete(n)) if n > max_len => {
                return Err(ClientHandshakeError::TooLarge { limit: max_len })
            }
            Ok(httparse::Status::Complete(n)) => n,
            Err(e) => return Err(ClientHandshakeError::Malformed(e.to_string())),
        };
        let headers = Headers::from_httparse(resp.headers);
        let status = resp.code.unwrap_or(0);
        if status != 101 {
            let mut body = buf[head_len..].to_vec();
            if let Some(len) = content_length(&headers) {
                body.truncate(len);
            }
            return Err(ClientHandshakeError::Status {
                status,
                reason: resp.reason.unwrap_or("").to_owned(),
                headers,
                body,
            });
        }
        self.check(headers).map(|r| Some((r, head_len)))
    }

    /// Checks a `101` answer's headers against this request (for use with another HTTP stack).
    ///
    /// # Errors
    /// A [`ClientHandshakeError`] for a missing upgrade, a wrong accept key, or a subprotocol or
    /// extension that was not offered.
    pub fn check(&self, headers: Headers) -> Result<Response, ClientHandshakeError> {
        if !headers.has_token("upgrade", "websocket") {
            return Err(ClientHandshakeError::NotWebSocket);
        }
        if !headers.has_token("connection", "upgrade") {
            return Err(ClientHandshakeError::ConnectionNotUpgrade);
        }
        if headers.get_str("sec-websocket-accept") != Some(accept_key(self.key.as_bytes()).as_str())
        {
            return Err(ClientHandshakeError::BadAccept);
        }
        self.negotiated(headers)
    }

    /// The header fields of this request sent as an HTTP/2 extended CONNECT (RFC 8441 §4),
    /// beside the pseudo-headers the HTTP/2 layer writes (`:method CONNECT`,
    /// `:protocol websocket`, `:scheme`, `:authority` from [`ClientRequest::host`], `:path` from
    /// [`ClientRequest::target`]): the version, the subprotocols and extensions offered, and the
    /// extra headers; no key, `Upgrade` or `Connection`, which HTTP/2 does without.
    ///
    /// # Errors
    /// [`ClientHandshakeError::InvalidRequestHeader`], as [`ClientRequest::encode`].
    pub fn extended_connect_headers(&self) -> Result<Vec<(String, String)>, ClientHandshakeError> {
        let bad = |what: &str| ClientHandshakeError::InvalidRequestHeader(what.to_owned());
        let mut out = vec![("sec-websocket-version".to_owned(), VERSION.to_owned())];
        if !self.protocols.is_empty() {
            if let Some(p) = self.protocols.iter().find(|p| !is_token(p)) {
                return Err(bad(p));
            }
            out.push((
                "sec-websocket-protocol".to_owned(),
                self.protocols.join(", "),
            ));
        }
        if let Some(ext) = &self.extensions {
            if !is_safe_value(ext) {
                return Err(bad(ext));
            }
            out.push(("sec-websocket-extensions".to_owned(), ext.clone()));
        }
        for (name, value) in &self.headers {
            if !is_token(name) || !is_safe_value(value) {
                return Err(bad(name));
            }
            out.push((name.to_ascii_lowercase(), value.clone()));
        }
        Ok(out)
    }

    /// Checks the answer to this request sent as an extended CONNECT (RFC 8441 §5): a `2xx`
    /// status, and a subprotocol and extensions this request offered; there is no accept key
    /// to check.
    ///
    /// # Errors
    /// [`ClientHandshakeError::Status`] for another status (with an empty body: the HTTP/2
    /// layer holds it), and as [`ClientRequest::check`] for the subprotocol and extensions.
    pub fn check_extended_connect(
        &self,
        status: u16,
        headers: Headers,
    ) -> Result<Response, ClientHandshakeError> {
        if !(200..300).contains(&status) {
            return Err(ClientHandshakeError::Status {
                status,
                reason: String::new(),
                headers,
                body: Vec::new(),
            });
        }
        self.negotiated(headers)
    }

    /// The subprotocol and extensions of an accepting answer, checked against the offer.
    fn negotiated(&self, headers: Headers) -> Result<Response, ClientHandshakeError> {
        let protocol = match headers.get_str("sec-websocket-protocol") {
            None => None,
            Some(p) if self.protocols.iter().any(|o| o == p) => Some(p.to_owned()),
            Some(p) => return Err(ClientHandshakeError::UnexpectedProtocol(p.to_owned())),
        };
        let extensions: Vec<&str> = headers.tokens("sec-websocket-extensions").collect();
        let extensions = if extensions.is_empty() {
            None
        } else if self.extensions.is_none() {
            return Err(ClientHandshakeError::UnexpectedExtension(
                extensions.join(", "),
            ));
        } else {
            Some(extensions.join(", "))
        };
        Ok(Response {
            headers,
            protocol,
            extensions,
        })
    }
}

/// The `Content-Length` of a response, if present and numeric.
pub fn content_length(headers: &Headers) -> Option<usize> {
    headers.get_str("content-length")?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> ClientRequest {
        let mut req = ClientRequest::new("example.com:9001", "/chat");
        req.key = "dGhlIHNhbXBsZSBub25jZQ==".into();
        req.protocols = vec!["chat".into()];
        req
    }

    const OK: &str = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: chat\r\n\r\n";

    #[test]
    fn an_extended_connect_sends_no_key_and_takes_a_2xx_without_accept() {
        let mut req = request();
        req.extensions = Some("permessage-deflate".into());
        req.headers = vec![("Origin".into(), "https://a.test".into())];
        assert_eq!(
            req.extended_connect_headers().unwrap(),
            [
                ("sec-websocket-version", "13"),
                ("sec-websocket-protocol", "chat"),
                ("sec-websocket-extensions", "permessage-deflate"),
                ("origin", "https://a.test"),
            ]
            .map(|(n, v)| (n.to_owned(), v.to_owned()))
        );
        let answer = |pairs: &[(&str, &str)]| {
            Headers(
                pairs
                    .iter()
                    .map(|(n, v)| super::super::Header {
                        name: (*n).to_owned(),
                        value: v.as_bytes().to_vec(),
                    })
                    .collect(),
            )
        };
        let ok = req
            .check_extended_connect(200, answer(&[("sec-websocket-protocol", "chat")]))
            .unwrap();
        assert_eq!(ok.protocol.as_deref(), Some("chat"));
        assert!(matches!(
            req.check_extended_connect(404, answer(&[])),
            Err(ClientHandshakeError::Status { status: 404, .. })
        ));
        assert_eq!(
            req.check_extended_connect(200, answer(&[("sec-websocket-protocol", "other")])),
            Err(ClientHandshakeError::UnexpectedProtocol("other".into()))
        );
        req.headers = vec![("bad name".into(), "v".into())];
        assert!(req.extended_connect_headers().is_err());
    }

    #[test]
    fn request_encodes_required_headers() {
        let text = String::from_utf8(request().encode().unwrap()).unwrap();
        assert!(text.starts_with("GET /chat HTTP/1.1\r\nHost: example.com:9001\r\n"));
        assert!(text.contains("Sec-WebSocket-Version: 13\r\n"));
        assert!(text.contains("Sec-WebSocket-Protocol: chat\r\n"));
    }

    #[test]
    fn request_refuses_header_injection() {
        let mut req = request();
        req.headers.push(("X-A".into(), "1\r\nX-B: 2".into()));
        assert!(req.encode().is_err());
    }

    #[test]
    fn accepts_valid_answer_and_keeps_trailing_bytes() {
        let mut buf = OK.as_bytes().to_vec();
        buf.extend_from_slice(&[0x81, 0x00]);
        let (resp, n) = request().parse_response(&buf, 4096).unwrap().unwrap();
        assert_eq!(n, OK.len());
        assert_eq!(resp.protocol.as_deref(), Some("chat"));
    }

    #[test]
    fn refuses_wrong_accept_protocol_status_and_extension() {
        let req = request();
        let bad_key = OK.replace("s3pP", "AAAA");
        assert_eq!(
            req.parse_response(bad_key.as_bytes(), 4096).unwrap_err(),
            ClientHandshakeError::BadAccept
        );
        let bad_proto = OK.replace("Protocol: chat", "Protocol: other");
        assert!(matches!(
            req.parse_response(bad_proto.as_bytes(), 4096).unwrap_err(),
            ClientHandshakeError::UnexpectedProtocol(_)
        ));
        let ext = OK.replace(
            "\r\n\r\n",
            "\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n",
        );
        assert!(matches!(
            req.parse_response(ext.as_bytes(), 4096).unwrap_err(),
            ClientHandshakeError::UnexpectedExtension(_)
        ));
        let refused = "HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n";
        assert!(matches!(
            req.parse_response(refused.as_bytes(), 4096).unwrap_err(),
            ClientHandshakeError::Status { status: 403, .. }
        ));
        assert_eq!(
            req.parse_response(&OK.as_bytes()[..30], 4096).unwrap(),
            None
        );
    }
}
