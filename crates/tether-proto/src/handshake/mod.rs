//! The opening handshake (RFC 6455 §4): an HTTP/1.1 `Upgrade` exchange.
//!
//! [`server`] parses and validates a client's request and writes the `101` answer (or a
//! `400`/`426`/`431` with a reason); [`client`] writes a request and checks the server's answer.
//! Both are pure functions over byte slices.

pub mod client;
pub mod server;

use base64::Engine as _;
use rand::TryRngCore as _;
use sha1::{Digest, Sha1};

/// The GUID appended to the key before hashing (RFC 6455 §1.3).
pub const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The only protocol version tether speaks.
pub const VERSION: &str = "13";

/// How many header lines a handshake may have.
pub const MAX_HEADERS: usize = 64;

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key`: base64(SHA-1(key + GUID)).
pub fn accept_key(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// A fresh random `Sec-WebSocket-Key`: 16 random bytes, base64.
pub fn generate_key() -> String {
    let mut bytes = [0u8; 16];
    rand::rngs::OsRng
        .try_fill_bytes(&mut bytes)
        .expect("the operating system's random source failed");
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// One header line: the name as received and the raw value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The header name (compare case-insensitively).
    pub name: String,
    /// The raw value.
    pub value: Vec<u8>,
}

/// A list of header lines with case-insensitive lookups.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(pub Vec<Header>);

impl Headers {
    /// The first value of `name`, if any.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.0
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.as_slice())
    }

    /// The first value of `name` as text (trimmed), if present and UTF-8.
    pub fn get_str(&self, name: &str) -> Option<&str> {
        self.get(name)
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(str::trim)
    }

    /// Every value of `name`, in order.
    pub fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.0
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.as_slice())
    }

    /// The comma-separated tokens of every `name` header, trimmed, empty ones skipped.
    pub fn tokens<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.get_all(name)
            .filter_map(|v| std::str::from_utf8(v).ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| !t.is_empty())
    }

    /// Whether the comma-separated token list of `name` contains `token` (case-insensitive).
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.tokens(name).any(|t| t.eq_ignore_ascii_case(token))
    }

    fn from_httparse(headers: &[httparse::Header<'_>]) -> Headers {
        Headers(
            headers
                .iter()
                .map(|h| Header {
                    name: h.name.to_owned(),
                    value: h.value.to_vec(),
                })
                .collect(),
        )
    }
}

/// Whether `s` is an HTTP token (RFC 7230 §3.2.6), as subprotocol names must be.
pub(crate) fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Whether a header value is safe to write (no CR, LF or NUL).
pub(crate) fn is_safe_value(s: &str) -> bool {
    !s.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_accept_key_example() {
        // RFC 6455 §1.3.
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn generated_keys_decode_to_16_bytes_and_differ() {
        let a = generate_key();
        let b = generate_key();
        assert_ne!(a, b);
        let raw = base64::engine::general_purpose::STANDARD.decode(a).unwrap();
        assert_eq!(raw.len(), 16);
    }

    #[test]
    fn token_lists_are_case_insensitive_and_comma_separated() {
        let headers = Headers(vec![
            Header {
                name: "Connection".into(),
                value: b"keep-alive, Upgrade".to_vec(),
            },
            Header {
                name: "connection".into(),
                value: b"x".to_vec(),
            },
        ]);
        assert!(headers.has_token("CONNECTION", "upgrade"));
        assert!(headers.has_token("connection", "x"));
        assert!(!headers.has_token("connection", "close"));
    }
}
