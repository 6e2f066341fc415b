//! UTF-8: a streaming validator that fails as soon as a byte makes the text invalid, and
//! [`Utf8Bytes`], a `Bytes` known to hold UTF-8.

use bytes::Bytes;

/// Validates UTF-8 fed in arbitrary pieces (frame fragments, or parts of one frame).
///
/// An invalid sequence is reported on the piece that makes it invalid, not at the end of the
/// message; a code point split across pieces is carried over (at most 3 bytes).
#[derive(Debug, Default, Clone)]
pub struct Utf8Validator {
    pending: [u8; 4],
    pending_len: u8,
}

/// The input was not valid UTF-8.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid UTF-8")]
pub struct InvalidUtf8;

/// Below this length a piece is first checked for plain ASCII (simdutf8 itself switches to
/// the standard library's validator below 64 bytes).
const SHORT: usize = 64;

impl Utf8Validator {
    /// A validator at the start of a text.
    pub fn new() -> Self {
        Self::default()
    }

    /// Validates the next piece of the text.
    ///
    /// # Errors
    /// [`InvalidUtf8`] as soon as the bytes seen so far cannot begin a valid text.
    pub fn feed(&mut self, mut input: &[u8]) -> Result<(), InvalidUtf8> {
        if self.pending_len > 0 {
            let have = usize::from(self.pending_len);
            let width = sequence_width(self.pending[0]);
            let take = (width - have).min(input.len());
            self.pending[have..have + take].copy_from_slice(&input[..take]);
            let len = have + take;
            input = &input[take..];
            match std::str::from_utf8(&self.pending[..len]) {
                Ok(_) => self.pending_len = 0,
                Err(e) if e.error_len().is_none() => {
                    // Still a valid prefix; the piece is used up.
                    self.pending_len = len as u8;
                    return Ok(());
                }
                Err(_) => return Err(InvalidUtf8),
            }
        }
        // Short ASCII pieces, the usual chat or JSON message, skip the general validator,
        // which for inputs this small falls back to a byte-by-byte loop.
        if input.len() < SHORT && input.is_ascii() {
            return Ok(());
        }
        match simdutf8::compat::from_utf8(input) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_none() => {
                let tail = &input[e.valid_up_to()..];
                self.pending[..tail.len()].copy_from_slice(tail);
                self.pending_len = tail.len() as u8;
                Ok(())
            }
            Err(_) => Err(InvalidUtf8),
        }
    }

    /// Ends the text.
    ///
    /// # Errors
    /// [`InvalidUtf8`] if the text stopped inside a code point.
    pub fn finish(&mut self) -> Result<(), InvalidUtf8> {
        let incomplete = self.pending_len > 0;
        self.pending_len = 0;
        if incomplete {
            Err(InvalidUtf8)
        } else {
            Ok(())
        }
    }
}

/// `bytes` as text when they are whole UTF-8: short ASCII (the usual chat or JSON message)
/// is checked a word at a time, other input by simdutf8 (the standard library's validator for
/// short input goes a byte at a time).
#[allow(unsafe_code)]
pub(crate) fn whole_str(bytes: &[u8]) -> Result<&str, InvalidUtf8> {
    if bytes.len() < SHORT && bytes.is_ascii() {
        // SAFETY: ASCII bytes are valid UTF-8.
        return Ok(unsafe { std::str::from_utf8_unchecked(bytes) });
    }
    simdutf8::basic::from_utf8(bytes).map_err(|_| InvalidUtf8)
}

/// The length of the sequence a (valid) lead byte starts.
fn sequence_width(lead: u8) -> usize {
    match lead {
        0x00..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        _ => 4,
    }
}

/// Bytes that are known to be valid UTF-8: the payload of a text message, without a copy.
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Utf8Bytes(Bytes);

impl Utf8Bytes {
    /// An empty text.
    pub const fn new() -> Self {
        Utf8Bytes(Bytes::new())
    }

    /// Wraps `bytes` after validating them.
    ///
    /// # Errors
    /// [`InvalidUtf8`] when `bytes` is not UTF-8.
    pub fn try_from_bytes(bytes: Bytes) -> Result<Self, InvalidUtf8> {
        simdutf8::basic::from_utf8(&bytes).map_err(|_| InvalidUtf8)?;
        Ok(Utf8Bytes(bytes))
    }

    /// Wraps bytes the caller has already validated.
    pub(crate) fn from_validated(bytes: Bytes) -> Self {
        debug_assert!(std::str::from_utf8(&bytes).is_ok());
        Utf8Bytes(bytes)
    }

    /// The text.
    #[allow(unsafe_code)]
    pub fn as_str(&self) -> &str {
        // SAFETY: every constructor validates the bytes as UTF-8 (`try_from_bytes`, the
        // `From<String>`/`From<&'static str>` impls) or receives bytes the connection validated
        // with `Utf8Validator`; `Bytes` is immutable, so they stay valid.
        unsafe { std::str::from_utf8_unchecked(&self.0) }
    }

    /// The underlying bytes.
    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }

    /// Unwraps the underlying bytes.
    pub fn into_bytes(self) -> Bytes {
        self.0
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the text is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::ops::Deref for Utf8Bytes {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Utf8Bytes {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<[u8]> for Utf8Bytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Utf8Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for Utf8Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<String> for Utf8Bytes {
    fn from(s: String) -> Self {
        Utf8Bytes(Bytes::from(s))
    }
}

impl From<&'static str> for Utf8Bytes {
    fn from(s: &'static str) -> Self {
        Utf8Bytes(Bytes::from_static(s.as_bytes()))
    }
}

impl From<Utf8Bytes> for Bytes {
    fn from(s: Utf8Bytes) -> Self {
        s.0
    }
}

impl TryFrom<Bytes> for Utf8Bytes {
    type Error = InvalidUtf8;
    fn try_from(bytes: Bytes) -> Result<Self, InvalidUtf8> {
        Utf8Bytes::try_from_bytes(bytes)
    }
}

impl TryFrom<Vec<u8>> for Utf8Bytes {
    type Error = InvalidUtf8;
    fn try_from(bytes: Vec<u8>) -> Result<Self, InvalidUtf8> {
        Utf8Bytes::try_from_bytes(Bytes::from(bytes))
    }
}

impl PartialEq<str> for Utf8Bytes {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Utf8Bytes {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn feed_split(data: &[u8], cuts: &[usize]) -> Result<(), InvalidUtf8> {
        let mut v = Utf8Validator::new();
        let mut start = 0;
        for &cut in cuts {
            let cut = cut.clamp(start, data.len());
            v.feed(&data[start..cut])?;
            start = cut;
        }
        v.feed(&data[start..])?;
        v.finish()
    }

    proptest! {
        #[test]
        fn streaming_agrees_with_std(data in proptest::collection::vec(any::<u8>(), 0..64), mut cuts in proptest::collection::vec(0usize..64, 0..6)) {
            cuts.sort_unstable();
            prop_assert_eq!(feed_split(&data, &cuts).is_ok(), std::str::from_utf8(&data).is_ok());
        }

        #[test]
        fn streaming_accepts_any_split_of_valid_text(s in "\\PC{0,40}", mut cuts in proptest::collection::vec(0usize..160, 0..8)) {
            cuts.sort_unstable();
            prop_assert!(feed_split(s.as_bytes(), &cuts).is_ok());
        }
    }

    #[test]
    fn fails_fast_on_code_point_above_max_split_across_pieces() {
        let mut v = Utf8Validator::new();
        v.feed("κόσμε".as_bytes()).unwrap();
        v.feed(&[0xf4]).unwrap();
        assert_eq!(v.feed(&[0x90]), Err(InvalidUtf8));
    }

    #[test]
    fn truncated_sequence_fails_at_finish() {
        let mut v = Utf8Validator::new();
        v.feed(&[0xe2, 0x82]).unwrap();
        assert_eq!(v.finish(), Err(InvalidUtf8));
    }
}
