//! Passwords, sessions, tokens, names and origins.

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use base64::Engine as _;
use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};
use std::net::IpAddr;

/// Who makes a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// A registered user, proven by a session or token.
    User(String),
    /// A guest with a nickname; with an empty one, a visitor who gave no identity at all
    /// (the echo endpoint, or a channel-protocol client that only watches).
    Guest(String),
}

impl Identity {
    /// The name shown to others.
    pub fn name(&self) -> &str {
        match self {
            Identity::User(n) | Identity::Guest(n) => n,
        }
    }

    /// Whether this is a visitor without any identity: neither a user nor a named guest.
    pub fn is_anonymous(&self) -> bool {
        matches!(self, Identity::Guest(n) if n.is_empty())
    }

    /// Whether this is a guest.
    pub fn is_guest(&self) -> bool {
        matches!(self, Identity::Guest(_))
    }
}

/// Hashing a password failed (it never does with the default parameters).
#[derive(Debug, thiserror::Error)]
#[error("hashing the password: {0}")]
pub struct HashError(String);

/// Hashes a password with argon2id (a random salt, the crate's default cost), in the PHC
/// string format.
///
/// # Errors
/// Only if argon2 rejects its own defaults.
pub fn hash_password(password: &str) -> Result<String, HashError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| HashError(e.to_string()))
}

/// Whether `password` matches a hash made by [`hash_password`].
pub fn verify_password(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| {
        Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

/// A fresh random secret (256 bits, URL-safe base64) for a session or token.
pub fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::StdRng::from_os_rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The digest a secret is stored as: a leaked database does not leak live credentials.
pub fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')
}

/// Whether `name` is a valid room name: 1–64 of `A–Z a–z 0–9 _ - .`, not only dots (a
/// browser resolves `.` and `..` in a URL path before the request is made).
pub fn valid_room(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.chars().all(is_name_char)
        && !name.chars().all(|c| c == '.')
}

/// Whether `c` may not appear in text shown to others: control characters (but tab and line
/// breaks) and the bidirectional embeddings, overrides and isolates (U+202A–U+202E,
/// U+2066–U+2069), which can make a message display as something it is not.
pub fn is_forbidden_char(c: char) -> bool {
    (c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
        || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Whether `text` (a chat message, a poll question or option) has no forbidden character.
pub fn valid_text(text: &str) -> bool {
    !text.chars().any(is_forbidden_char)
}

/// Whether `name` is a valid user name or nickname: 1–32 of `A–Z a–z 0–9 _ - .`.
pub fn valid_user(name: &str) -> bool {
    (1..=32).contains(&name.len()) && name.chars().all(is_name_char)
}

/// Whether a browser `origin` may open a socket: it is the server's own (`scheme://host` of
/// the request) or listed in `allowed`. Comparison ignores ASCII case.
pub fn origin_allowed(
    origin: &str,
    own_scheme: &str,
    host: Option<&str>,
    allowed: &[String],
) -> bool {
    if let Some(host) = host {
        let own = format!("{own_scheme}://{host}");
        if origin.eq_ignore_ascii_case(&own) {
            return true;
        }
    }
    allowed
        .iter()
        .any(|a| a.trim_end_matches('/').eq_ignore_ascii_case(origin))
}

/// The value of cookie `name` in a `Cookie` header.
pub fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

/// Whether `key` may be an idempotency key: 1 to 64 visible ASCII characters.
pub fn valid_key(key: &str) -> bool {
    (1..=64).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic())
}

/// What is wrong with an idempotency key, for the client.
pub const KEY_RULE: &str = "an idempotency key is 1-64 visible ASCII characters";

/// Who a write is counted against: a registered user wherever they are, a guest or an
/// anonymous client by address (IPv6: its /64).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Writer {
    /// A registered user.
    User(Box<str>),
    /// Anyone else, by address.
    Address(IpAddr),
}

impl Writer {
    /// Whether the writer is not a registered user (a guest, counted by address).
    pub fn is_guest(&self) -> bool {
        matches!(self, Writer::Address(_))
    }

    /// The writer of a request by `user` (if logged in) from `ip`.
    pub fn new(user: Option<&str>, ip: Option<IpAddr>) -> Writer {
        match (user, ip) {
            (Some(user), _) => Writer::User(user.into()),
            (None, Some(ip)) => Writer::Address(crate::throttle::address_key(ip)),
            (None, None) => Writer::Address(IpAddr::from([0, 0, 0, 0])),
        }
    }
}

/// What is wrong with a room name, for the client.
pub const ROOM_RULE: &str = "a room name is 1-64 of A-Z a-z 0-9 _ - ., not only dots";

/// What is wrong with a text that has a forbidden character, for the client.
pub const FORBIDDEN_CHARS: &str =
    "text may not contain control characters or bidirectional overrides";

/// What is wrong with a chat or broadcast text of at most `max` bytes, if anything: the same
/// rule for the API and the sockets.
pub fn text_problem(text: &str, max: usize) -> Option<String> {
    if text.trim().is_empty() || text.len() > max {
        return Some(format!("text must be 1 to {max} bytes"));
    }
    if !valid_text(text) {
        return Some(FORBIDDEN_CHARS.to_owned());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_verify_only_with_the_right_password() {
        let hash = hash_password("correct horse").unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_password(&hash, "correct horse"));
        assert!(!verify_password(&hash, "correct horsE"));
        assert!(!verify_password("not a hash", "correct horse"));
    }

    #[test]
    fn secrets_are_distinct_and_digests_fixed_size() {
        let (a, b) = (new_secret(), new_secret());
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
        assert_eq!(digest(&a), digest(&a));
        assert_ne!(digest(&a), digest(&b));
    }

    #[test]
    fn names_are_restricted() {
        assert!(valid_room("lobby") && valid_room("a.b-c_9"));
        assert!(
            !valid_room("")
                && !valid_room("a b")
                && !valid_room("é")
                && !valid_room(&"x".repeat(65))
        );
        assert!(valid_user("ann") && !valid_user(&"x".repeat(33)) && !valid_user("a/b"));
        assert!(!valid_room(".") && !valid_room("..") && !valid_room("..."));
        assert!(valid_room(".a") && valid_room("a..b"));
    }

    #[test]
    fn texts_refuse_controls_and_bidi_overrides() {
        assert!(valid_text("hello\n\tworld ✓ مرحبا"));
        for bad in [
            "a\0b",
            "\u{202e}txt.exe",
            "x\u{2066}y",
            "bell\u{7}",
            "c1\u{85}",
            "del\u{7f}",
        ] {
            assert!(!valid_text(bad), "{bad:?}");
        }
    }

    #[test]
    fn origin_is_own_or_listed() {
        let allowed = vec!["https://app.example".to_owned()];
        assert!(origin_allowed(
            "http://127.0.0.1:8080",
            "http",
            Some("127.0.0.1:8080"),
            &[]
        ));
        assert!(origin_allowed(
            "HTTP://LOCALHOST:8080",
            "http",
            Some("localhost:8080"),
            &[]
        ));
        assert!(!origin_allowed(
            "https://127.0.0.1:8080",
            "http",
            Some("127.0.0.1:8080"),
            &[]
        ));
        assert!(!origin_allowed(
            "http://evil.example",
            "http",
            Some("127.0.0.1:8080"),
            &[]
        ));
        assert!(origin_allowed(
            "https://app.example",
            "http",
            Some("127.0.0.1:8080"),
            &allowed
        ));
        assert!(!origin_allowed(
            "http://evil.example",
            "http",
            None,
            &allowed
        ));
    }

    #[test]
    fn cookies_are_found_by_name() {
        assert_eq!(
            cookie("a=1; tether_session=xyz; b=2", "tether_session"),
            Some("xyz")
        );
        assert_eq!(cookie("tether_sessionx=1", "tether_session"), None);
    }
}
