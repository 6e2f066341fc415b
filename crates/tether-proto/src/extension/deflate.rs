//! permessage-deflate (RFC 7692): negotiation for both roles and the message codec.
//!
//! A compressed message has RSV1 set on its first frame; its payload is raw DEFLATE data that
//! ends with a sync flush whose `00 00 ff ff` tail is stripped by the sender and restored by
//! the receiver. Each direction keeps its LZ77 window between messages ("context takeover")
//! unless `*_no_context_takeover` was agreed, and may be limited to a smaller window by
//! `*_max_window_bits`.
//!
//! zlib cannot produce raw DEFLATE with an 8-bit window. When our direction is limited to 8
//! bits, messages are sent uncompressed — RFC 7692 lets a sender leave any message
//! uncompressed — while messages we receive are always inflated (a 15-bit inflater reads
//! streams made with any smaller window).

use std::cell::RefCell;

use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::Extension;
use crate::connection::Role;
use crate::error::ProtocolError;

/// The extension's registered name.
pub const NAME: &str = "permessage-deflate";

/// The tail of a sync flush, stripped from every compressed message (RFC 7692 §7.2.1).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Local permessage-deflate preferences: what a client offers, or what a server accepts.
///
/// # Memory
/// Measured with the zlib-rs backend (`tests/deflate_memory.rs`): a compressor holds
/// 243 KiB + `2^(w+2)` bytes for a window of `w` bits (371 KiB at 15, 245 KiB at 9), an
/// inflater 46 KiB; each is allocated when first needed. A direction without context takeover
/// keeps no state between messages, so its compressor (or inflater) is borrowed from a small
/// per-thread pool for each message and returned after it: with `server_no_context_takeover`
/// and `client_no_context_takeover` an idle connection holds no compression memory at all.
/// That is the per-connection memory cap; context takeover compresses repetitive traffic
/// better at the cost above.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeflateConfig {
    /// The server resets its compressor after every message.
    pub server_no_context_takeover: bool,
    /// The client resets its compressor after every message.
    pub client_no_context_takeover: bool,
    /// The largest window the server compresses with (8–15). Default 15.
    pub server_max_window_bits: u8,
    /// The largest window the client compresses with (8–15). Default 15.
    pub client_max_window_bits: u8,
    /// Compression level, 0 (none) to 9 (smallest). Default 1, the fastest.
    pub level: u32,
    /// Messages shorter than this are sent uncompressed. Default 64 bytes.
    pub threshold: usize,
}

impl Default for DeflateConfig {
    fn default() -> Self {
        DeflateConfig {
            server_no_context_takeover: false,
            client_no_context_takeover: false,
            server_max_window_bits: 15,
            client_max_window_bits: 15,
            level: 1,
            threshold: 64,
        }
    }
}

impl DeflateConfig {
    /// Sets [`DeflateConfig::server_no_context_takeover`].
    pub fn server_no_context_takeover(mut self, on: bool) -> Self {
        self.server_no_context_takeover = on;
        self
    }

    /// Sets [`DeflateConfig::client_no_context_takeover`].
    pub fn client_no_context_takeover(mut self, on: bool) -> Self {
        self.client_no_context_takeover = on;
        self
    }

    /// Sets [`DeflateConfig::server_max_window_bits`], clamped to 8–15.
    pub fn server_max_window_bits(mut self, bits: u8) -> Self {
        self.server_max_window_bits = bits.clamp(8, 15);
        self
    }

    /// Sets [`DeflateConfig::client_max_window_bits`], clamped to 8–15.
    pub fn client_max_window_bits(mut self, bits: u8) -> Self {
        self.client_max_window_bits = bits.clamp(8, 15);
        self
    }

    /// Sets [`DeflateConfig::level`], clamped to 0–9.
    pub fn level(mut self, level: u32) -> Self {
        self.level = level.min(9);
        self
    }

    /// Sets [`DeflateConfig::threshold`].
    pub fn threshold(mut self, bytes: usize) -> Self {
        self.threshold = bytes;
        self
    }

    /// The client's offer, e.g. `permessage-deflate; client_max_window_bits`.
    ///
    /// `client_max_window_bits` is always offered (with a value only below 15), telling the
    /// server it may limit the client's window.
    pub fn offer(&self) -> String {
        let mut offer = format!("{NAME}; client_max_window_bits");
        if self.client_max_window_bits < 15 {
            offer.push_str(&format!("={}", self.client_max_window_bits));
        }
        if self.client_no_context_takeover {
            offer.push_str("; client_no_context_takeover");
        }
        if self.server_no_context_takeover {
            offer.push_str("; server_no_context_takeover");
        }
        if self.server_max_window_bits < 15 {
            offer.push_str(&format!(
                "; server_max_window_bits={}",
                self.server_max_window_bits
            ));
        }
        offer
    }
}

/// The parameters both ends agreed on; its `Display` is the server's response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeflateParams {
    /// The server resets its compressor after every message.
    pub server_no_context_takeover: bool,
    /// The client resets its compressor after every message.
    pub client_no_context_takeover: bool,
    /// The server's window limit, if one was agreed.
    pub server_max_window_bits: Option<u8>,
    /// The client's window limit, if one was agreed.
    pub client_max_window_bits: Option<u8>,
}

impl std::fmt::Display for DeflateParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(NAME)?;
        if self.server_no_context_takeover {
            f.write_str("; server_no_context_takeover")?;
        }
        if self.client_no_context_takeover {
            f.write_str("; client_no_context_takeover")?;
        }
        if let Some(bits) = self.server_max_window_bits {
            write!(f, "; server_max_window_bits={bits}")?;
        }
        if let Some(bits) = self.client_max_window_bits {
            write!(f, "; client_max_window_bits={bits}")?;
        }
        Ok(())
    }
}

/// Parameters of one offer or response, validated but not yet negotiated.
#[derive(Debug, Default)]
struct Raw {
    server_no_context_takeover: bool,
    client_no_context_takeover: bool,
    server_max_window_bits: Option<u8>,
    /// `Some(None)`: offered without a value.
    client_max_window_bits: Option<Option<u8>>,
}

/// Validates the parameters of a permessage-deflate element: known names, each at most once,
/// flags without values, window bits 8–15 without leading zeros.
fn parse_params(ext: &Extension, offer: bool) -> Result<Raw, String> {
    let mut raw = Raw::default();
    let mut seen: Vec<&str> = Vec::new();
    for (key, value) in &ext.params {
        if seen.contains(&key.as_str()) {
            return Err(format!("duplicate parameter {key}"));
        }
        seen.push(key);
        let flag = || match value {
            None => Ok(true),
            Some(v) => Err(format!("{key} takes no value (got {v:?})")),
        };
        match key.as_str() {
            "server_no_context_takeover" => raw.server_no_context_takeover = flag()?,
            "client_no_context_takeover" => raw.client_no_context_takeover = flag()?,
            "server_max_window_bits" => match value {
                Some(v) => raw.server_max_window_bits = Some(window_bits(key, v)?),
                None => return Err(format!("{key} needs a value")),
            },
            "client_max_window_bits" => match value {
                Some(v) => raw.client_max_window_bits = Some(Some(window_bits(key, v)?)),
                None if offer => raw.client_max_window_bits = Some(None),
                None => return Err(format!("{key} needs a value in a response")),
            },
            other => return Err(format!("unknown parameter {other}")),
        }
    }
    Ok(raw)
}

fn window_bits(key: &str, value: &str) -> Result<u8, String> {
    match value.parse::<u8>() {
        Ok(bits @ 8..=15) if !value.starts_with('0') => Ok(bits),
        _ => Err(format!("{key}={value} is not 8 to 15")),
    }
}

/// The server's choice: the first permessage-deflate offer it can honour, answered with
/// `config`'s preferences. Invalid offers (unknown or duplicate parameters, bad values) are
/// declined, as RFC 7692 §5.1 requires; other extensions are ignored.
pub fn negotiate_server(offers: &[Extension], config: &DeflateConfig) -> Option<DeflateParams> {
    offers
        .iter()
        .filter(|ext| ext.name == NAME)
        .find_map(|ext| parse_params(ext, true).ok())
        .map(|raw| DeflateParams {
            server_no_context_takeover: raw.server_no_context_takeover
                || config.server_no_context_takeover,
            client_no_context_takeover: raw.client_no_context_takeover
                || config.client_no_context_takeover,
            server_max_window_bits: match raw.server_max_window_bits {
                Some(bits) => Some(bits.min(config.server_max_window_bits)),
                None => {
                    (config.server_max_window_bits < 15).then_some(config.server_max_window_bits)
                }
            },
            // Only limits the client if the client said it can be limited.
            client_max_window_bits: match raw.client_max_window_bits {
                None => None,
                Some(None) => {
                    (config.client_max_window_bits < 15).then_some(config.client_max_window_bits)
                }
                Some(Some(bits)) => Some(bits.min(config.client_max_window_bits)),
            },
        })
}

/// Checks the server's answer to the client's `offer` (from [`DeflateConfig::offer`]).
///
/// `Ok(None)`: the server declined compression.
///
/// # Errors
/// A description of what the client cannot honour: another extension, several answers, an
/// unknown, duplicate or malformed parameter, or a window larger than was offered.
pub fn negotiate_client(
    response: &[Extension],
    offer: &DeflateConfig,
) -> Result<Option<DeflateParams>, String> {
    let ext = match response {
        [] => return Ok(None),
        [ext] if ext.name == NAME => ext,
        [ext] => return Err(format!("extension {} was not offered", ext.name)),
        _ => return Err("more than one extension in the response".into()),
    };
    let raw = parse_params(ext, false)?;
    if let Some(bits) = raw.server_max_window_bits {
        if offer.server_max_window_bits < 15 && bits > offer.server_max_window_bits {
            return Err(format!(
                "server_max_window_bits={bits} exceeds the offered {}",
                offer.server_max_window_bits
            ));
        }
    }
    let client_bits = raw.client_max_window_bits.flatten();
    if let Some(bits) = client_bits {
        if bits > offer.client_max_window_bits {
            return Err(format!(
                "client_max_window_bits={bits} exceeds the offered {}",
                offer.client_max_window_bits
            ));
        }
    }
    Ok(Some(DeflateParams {
        server_no_context_takeover: raw.server_no_context_takeover,
        client_no_context_takeover: raw.client_no_context_takeover
            || offer.client_no_context_takeover,
        server_max_window_bits: raw.server_max_window_bits,
        client_max_window_bits: client_bits,
    }))
}

/// How many idle codecs each thread keeps for connections without context takeover.
const POOL_MAX: usize = 8;

thread_local! {
    /// Idle compressors, with the (window bits, level) they were made for.
    static COMPRESSORS: RefCell<Vec<(u8, u32, Compress)>> = const { RefCell::new(Vec::new()) };
    /// Idle inflaters (all read with a 15-bit window).
    static INFLATERS: RefCell<Vec<Decompress>> = const { RefCell::new(Vec::new()) };
}

fn new_compressor(bits: u8, level: u32) -> Compress {
    Compress::new_with_window_bits(Compression::new(level), false, bits)
}

fn new_inflater() -> Decompress {
    Decompress::new_with_window_bits(false, 15)
}

/// The compression state of one connection, created after a successful negotiation.
///
/// The compressor and inflater are allocated on first use, so a connection that never sends
/// (or never receives) a compressed message never pays for them; a direction without context
/// takeover borrows them from a per-thread pool per message (see [`DeflateConfig`]).
pub struct Deflate {
    level: u32,
    threshold: usize,
    /// Our compressor's window; 8 means "send uncompressed" (see the module docs).
    window_bits: u8,
    /// Our direction has no context takeover: reset (and pool) the compressor per message.
    reset_after_message: bool,
    /// The peer's direction has no context takeover: our inflater is idle between messages.
    peer_resets: bool,
    compressor: Option<Compress>,
    inflater: Option<Decompress>,
}

impl std::fmt::Debug for Deflate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deflate")
            .field("window_bits", &self.window_bits)
            .field("reset_after_message", &self.reset_after_message)
            .field("peer_resets", &self.peer_resets)
            .finish_non_exhaustive()
    }
}

impl Deflate {
    /// The codec for `role` with the agreed `params` and local `config` (level, threshold).
    pub fn new(role: Role, params: DeflateParams, config: &DeflateConfig) -> Self {
        let (ours, theirs) = match role {
            Role::Server => (
                (
                    params.server_max_window_bits,
                    params.server_no_context_takeover,
                ),
                params.client_no_context_takeover,
            ),
            Role::Client => (
                (
                    params.client_max_window_bits,
                    params.client_no_context_takeover,
                ),
                params.server_no_context_takeover,
            ),
        };
        Deflate {
            level: config.level,
            threshold: config.threshold,
            window_bits: ours.0.unwrap_or(15),
            reset_after_message: ours.1,
            peer_resets: theirs,
            compressor: None,
            inflater: None,
        }
    }

    /// `(window bits, level)` when every message is compressed from a fresh state (our
    /// direction has no context takeover), so its output can be shared between connections.
    pub(crate) fn fresh_per_message(&self) -> Option<(u8, u32)> {
        self.reset_after_message
            .then_some((self.window_bits, self.level))
    }

    /// Whether a message of `len` bytes is sent compressed.
    pub(crate) fn should_compress(&self, len: usize) -> bool {
        self.window_bits > 8 && len >= self.threshold
    }

    /// Compresses one whole message; the `00 00 ff ff` tail is stripped. The result is the
    /// payload of a message whose first frame carries RSV1.
    pub fn compress(&mut self, input: &[u8]) -> Bytes {
        let (bits, level) = (self.window_bits, self.level);
        let mut c = match self.compressor.take() {
            Some(c) => c,
            None if self.reset_after_message => COMPRESSORS
                .with_borrow_mut(|pool| {
                    let i = pool
                        .iter()
                        .position(|(b, l, _)| (*b, *l) == (bits, level))?;
                    Some(pool.swap_remove(i).2)
                })
                .unwrap_or_else(|| new_compressor(bits, level)),
            None => new_compressor(bits, level),
        };
        let mut out: Vec<u8> = Vec::with_capacity(input.len() / 2 + 64);
        let start = c.total_in();
        loop {
            let used = (c.total_in() - start) as usize;
            if out.len() == out.capacity() {
                out.reserve(out.capacity().max(256));
            }
            // Sync flush of an in-memory stream: the only error is a misuse of the API.
            c.compress_vec(&input[used..], &mut out, FlushCompress::Sync)
                .expect("deflate of an in-memory buffer");
            // Done once every input byte is in and the flush left room to spare.
            if (c.total_in() - start) as usize == input.len() && out.len() < out.capacity() {
                break;
            }
        }
        if out.ends_with(&TAIL) {
            out.truncate(out.len() - TAIL.len());
        }
        if self.reset_after_message {
            c.reset();
            COMPRESSORS.with_borrow_mut(|pool| {
                if pool.len() < POOL_MAX {
                    pool.push((bits, level, c));
                }
            });
        } else {
            self.compressor = Some(c);
        }
        Bytes::from(out)
    }

    /// Inflates one frame's payload of a compressed message into `out`, and with `fin` the
    /// restored tail. `out` never grows past `limit + 1` bytes: beyond `limit` the message
    /// fails with [`ProtocolError::MessageTooLarge`] (a decompression bomb costs `limit`).
    pub(crate) fn inflate(
        &mut self,
        payload: &[u8],
        fin: bool,
        out: &mut Vec<u8>,
        limit: usize,
    ) -> Result<(), ProtocolError> {
        let mut d = match self.inflater.take() {
            Some(d) => d,
            None if self.peer_resets => INFLATERS
                .with_borrow_mut(Vec::pop)
                .unwrap_or_else(new_inflater),
            None => new_inflater(),
        };
        let mut result = inflate_part(&mut d, payload, out, limit);
        if fin && result.is_ok() {
            result = inflate_part(&mut d, &TAIL, out, limit);
        }
        if fin && self.peer_resets && result.is_ok() {
            // The next message starts from an empty window: the inflater can serve others.
            d.reset(false);
            INFLATERS.with_borrow_mut(|pool| {
                if pool.len() < POOL_MAX {
                    pool.push(d);
                }
            });
        } else {
            self.inflater = Some(d);
        }
        result
    }

    /// Inflates from `input` into `out` until `input` is consumed or `out` holds `cap`
    /// bytes, whichever comes first; returns how many input bytes were consumed. A message
    /// received as a stream is inflated this way, a piece of at most `cap` bytes at a time,
    /// so that however much a frame inflates to, the receiver holds one piece of it. Call
    /// [`Deflate::end_inflate`] once the message's tail is consumed.
    ///
    /// # Errors
    /// [`ProtocolError::Extension`] for data that is not DEFLATE.
    pub(crate) fn inflate_some(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        cap: usize,
    ) -> Result<usize, ProtocolError> {
        let peer_resets = self.peer_resets;
        let d = self.inflater.get_or_insert_with(|| {
            if peer_resets {
                INFLATERS
                    .with_borrow_mut(Vec::pop)
                    .unwrap_or_else(new_inflater)
            } else {
                new_inflater()
            }
        });
        let start = d.total_in();
        loop {
            let used = (d.total_in() - start) as usize;
            if used == input.len() || out.len() >= cap {
                return Ok(used);
            }
            if out.len() == out.capacity() {
                let room = (cap - out.len()).min(out.capacity().max(4096));
                out.reserve_exact(room);
            }
            let before = (d.total_in(), out.len());
            let status = d
                .decompress_vec(&input[used..], out, FlushDecompress::Sync)
                .map_err(|e| ProtocolError::Extension(format!("inflate: {e}")))?;
            if status == Status::StreamEnd {
                // A final DEFLATE block: the next message starts a new stream.
                d.reset(false);
                return Ok(input.len());
            }
            if (d.total_in(), out.len()) == before && out.len() < out.capacity() {
                return Err(ProtocolError::Extension("inflate made no progress".into()));
            }
        }
    }

    /// Ends a message inflated with [`Deflate::inflate_some`]: without context takeover, the
    /// inflater goes back to the thread's pool for the next message, of any connection.
    pub(crate) fn end_inflate(&mut self) {
        if !self.peer_resets {
            return;
        }
        if let Some(mut d) = self.inflater.take() {
            d.reset(false);
            INFLATERS.with_borrow_mut(|pool| {
                if pool.len() < POOL_MAX {
                    pool.push(d);
                }
            });
        }
    }

    /// The bytes that end every compressed message, removed by the sender (RFC 7692 §7.2.2).
    pub(crate) const TAIL: [u8; 4] = TAIL;

    /// Inflates one whole compressed message payload into `out`, at most `limit` bytes.
    ///
    /// # Errors
    /// [`ProtocolError::MessageTooLarge`] past `limit`; [`ProtocolError::Extension`] for data
    /// that is not DEFLATE.
    pub fn decompress_message(
        &mut self,
        payload: &[u8],
        out: &mut Vec<u8>,
        limit: usize,
    ) -> Result<(), ProtocolError> {
        self.inflate(payload, true, out, limit)
    }
}

/// Inflates `input` into `out`, never growing `out` past `limit + 1` bytes.
fn inflate_part(
    d: &mut Decompress,
    input: &[u8],
    out: &mut Vec<u8>,
    limit: usize,
) -> Result<(), ProtocolError> {
    let start = d.total_in();
    loop {
        if out.len() == out.capacity() {
            if out.len() > limit {
                return Err(ProtocolError::MessageTooLarge { limit });
            }
            let room = (limit + 1 - out.len()).min(out.capacity().max(4096));
            out.reserve_exact(room);
        }
        let before = (d.total_in(), out.len());
        let used = (d.total_in() - start) as usize;
        let status = d
            .decompress_vec(&input[used..], out, FlushDecompress::Sync)
            .map_err(|e| ProtocolError::Extension(format!("inflate: {e}")))?;
        if out.len() > limit {
            return Err(ProtocolError::MessageTooLarge { limit });
        }
        if status == Status::StreamEnd {
            // A final DEFLATE block: the next message starts a new stream.
            d.reset(false);
            return Ok(());
        }
        let consumed = (d.total_in() - start) as usize == input.len();
        if consumed && out.len() < out.capacity() {
            return Ok(());
        }
        if (d.total_in(), out.len()) == before && out.len() < out.capacity() {
            return Err(ProtocolError::Extension("inflate made no progress".into()));
        }
    }
}

#[cfg(test)]
mod tests;
