//! `tether bench`: a load generator for any WebSocket server.
//!
//! - `bench echo`: C connections each keep P messages in flight for a duration, verify every
//!   echo byte for byte, and report messages/s, MB/s and round-trip latency percentiles.
//! - `bench idle`: opens and holds C idle connections (spreading source addresses over
//!   127.0.0.0/8 past ~25,000 so local ports do not run out) and reports how many held.
//!
//! Both take `--raw` for a plain TCP echo server (the ceiling a WebSocket server is measured
//! against): no handshake; `bench echo --raw` writes the exact bytes a WebSocket client would
//! put on the wire for each message (masked frame header and payload) and expects those same
//! bytes back, with the same pipeline, latency and throughput accounting.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use hdrhistogram::Histogram;
use tether::proto::extension::deflate::DeflateConfig;
use tether::proto::{FrameHeader, OpCode};
use tether::{ClientBuilder, ClientStream, Config, HttpVersion, Message, Pool};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Options of `tether bench echo`.
#[derive(clap::Args, Debug, Clone, serde::Serialize)]
pub struct EchoArgs {
    /// The echo server, e.g. ws://127.0.0.1:9001/ (http(s):// means ws(s)://, no scheme
    /// means ws://).
    #[arg(value_name = "URL", required_unless_present = "url_flag")]
    pub url: Option<String>,
    /// The server, as `--url URL` (the positional URL's older spelling).
    #[arg(long = "url", value_name = "URL", hide = true, conflicts_with = "url")]
    #[serde(skip)]
    pub url_flag: Option<String>,
    /// Concurrent connections.
    #[arg(long, default_value_t = 100)]
    pub conns: usize,
    /// Message size in bytes.
    #[arg(long, default_value_t = 20)]
    pub size: usize,
    /// Messages each connection keeps in flight.
    #[arg(long, default_value_t = 1)]
    pub pipeline: usize,
    /// Seconds to measure.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Send binary messages (default: text).
    #[arg(long)]
    pub binary: bool,
    /// Offer permessage-deflate (and send compressible JSON-like text).
    #[arg(long, conflicts_with = "raw")]
    pub deflate: bool,
    /// Plain TCP without a handshake, for a raw TCP echo server: write each message as the
    /// masked frame a WebSocket client would send and expect exactly those bytes back.
    #[arg(long)]
    pub raw: bool,
    /// After a real opening handshake, write pre-encoded masked frames and compare each echo
    /// byte for byte with the unmasked frame a server sends back: the cheapest correct client,
    /// so a fast server is not hidden behind the load generator. For servers that echo each
    /// message as one frame; no extensions are offered.
    #[arg(long, conflicts_with_all = ["raw", "deflate"])]
    pub prebuilt: bool,
    /// Open the WebSockets over HTTP/2 (RFC 8441: ALPN `h2` for wss://, h2c for ws://), as
    /// streams of `--http2-connections` shared connections.
    #[arg(long, conflicts_with_all = ["raw", "prebuilt"])]
    pub http2: bool,
    /// HTTP/2 connections the WebSockets share, in turn (with `--http2`).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub http2_connections: usize,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Options of `tether bench idle`.
#[derive(clap::Args, Debug, Clone, serde::Serialize)]
pub struct IdleArgs {
    /// The server, e.g. ws://127.0.0.1:9001/; `{n}` in it becomes the connection's number
    /// (0, 1, …) and `{n/K}` that number divided by K, e.g.
    /// ws://127.0.0.1:8080/ws/rooms/r{n/100}?name=guest{n} (100 guests per room)
    #[arg(value_name = "URL", required_unless_present = "url_flag")]
    pub url: Option<String>,
    /// The server, as `--url URL` (the positional URL's older spelling).
    #[arg(long = "url", value_name = "URL", hide = true, conflicts_with = "url")]
    #[serde(skip)]
    pub url_flag: Option<String>,
    /// Connections to open and hold.
    #[arg(long, default_value_t = 1000)]
    pub conns: usize,
    /// Seconds to hold them once all are open.
    #[arg(long, default_value_t = 5.0)]
    pub hold: f64,
    /// Connections opened at once.
    #[arg(long, default_value_t = 200)]
    pub concurrency: usize,
    /// Plain TCP connections without a handshake, for a raw TCP echo server.
    #[arg(long)]
    pub raw: bool,
    /// Open the WebSockets over HTTP/2 (RFC 8441: ALPN `h2` for wss://, h2c for ws://), as
    /// streams of `--http2-connections` shared connections.
    #[arg(long, conflicts_with = "raw")]
    pub http2: bool,
    /// HTTP/2 connections the WebSockets share, in turn (with `--http2`).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub http2_connections: usize,
    /// Speak tether's channel protocol (tether.v1, to a `tether serve` `/ws` URL): connect,
    /// then subscribe to this channel (repeat for several; `{n}` and `{n/K}` as in the URL),
    /// e.g. `--subscribe 'room:r{n/100}'`. A connection counts as open once every
    /// subscription is acknowledged.
    #[arg(long, value_name = "CHANNEL", conflicts_with = "raw")]
    pub subscribe: Vec<String>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// No live count.
    #[arg(long)]
    pub quiet: bool,
}

impl EchoArgs {
    /// The server's URL, given either way, with `http(s)://` and no scheme mapped as
    /// `connect` maps them.
    pub fn server_url(&self) -> String {
        given_url(&self.url, &self.url_flag)
    }
}

/// The URL given positionally or with `--url`, mapped as `connect` maps it.
fn given_url(positional: &Option<String>, flag: &Option<String>) -> String {
    crate::connect::ws_url(
        positional
            .as_deref()
            .or(flag.as_deref())
            .unwrap_or_default(),
    )
}

impl IdleArgs {
    /// The server's URL, given either way, with `http(s)://` and no scheme mapped as
    /// `connect` maps them.
    pub fn server_url(&self) -> String {
        given_url(&self.url, &self.url_flag)
    }
}

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Bad options.
    #[error("{0}")]
    Usage(String),
    /// Not one connection could be opened.
    #[error("could not connect: {0}")]
    Connect(tether::Error),
    /// Not one plain TCP connection (`--raw`) could be opened.
    #[error("could not connect: {0}")]
    Tcp(std::io::Error),
    /// The server refused the `--prebuilt` handshake.
    #[error("handshake: {0}")]
    Handshake(String),
}

/// The result of `bench echo`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EchoSummary {
    /// Connections that took part.
    pub connections: usize,
    /// Echoes received and verified.
    pub messages: u64,
    /// Seconds measured.
    pub seconds: f64,
    /// Verified echoes per second.
    pub messages_per_sec: f64,
    /// Payload megabytes (10^6) per second, one way.
    pub mb_per_sec: f64,
    /// Round-trip latency percentiles, microseconds.
    pub p50_us: u64,
    /// 90th percentile, µs.
    pub p90_us: u64,
    /// 99th percentile, µs.
    pub p99_us: u64,
    /// Maximum, µs.
    pub max_us: u64,
    /// Connections that failed, and echoes that did not match.
    pub errors: u64,
    /// The first of them, in words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
}

/// Failures during a run: how many, and the first in words.
#[derive(Debug, Default)]
pub(crate) struct Failures {
    count: AtomicU64,
    first: std::sync::Mutex<Option<String>>,
}

impl Failures {
    /// Counts one; keeps `what` if it is the first.
    pub(crate) fn note(&self, what: impl FnOnce() -> String) {
        self.count.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first.lock().unwrap_or_else(|e| e.into_inner());
        if first.is_none() {
            *first = Some(what());
        }
    }

    pub(crate) fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub(crate) fn first(&self) -> Option<String> {
        self.first.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// One message's payload: `size` bytes, compressible JSON-like text with `--deflate`.
fn payload(size: usize, deflate: bool) -> Bytes {
    let pattern: &[u8] = if deflate {
        br#"{"type":"message","room":"lobby","user":"bench","text":"hello from tether bench"},"#
    } else {
        b"tether-bench-0123456789abcdefghijklmnopqrstuvwxyz"
    };
    pattern
        .iter()
        .copied()
        .cycle()
        .take(size)
        .collect::<Vec<u8>>()
        .into()
}

/// The mask key of every `--raw` frame (RFC 6455's own example key): a byte echo cannot tell.
const RAW_MASK_KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// The bytes a WebSocket client puts on the wire for one unfragmented message: header with
/// the mask bit and `key`, then the masked payload.
fn client_frame(payload: &[u8], binary: bool, key: [u8; 4]) -> Vec<u8> {
    let opcode = if binary { OpCode::Binary } else { OpCode::Text };
    masked_frame(opcode, payload, key)
}

/// A client's unfragmented frame of `opcode`, masked with `key`.
pub(crate) fn masked_frame(opcode: OpCode, payload: &[u8], key: [u8; 4]) -> Vec<u8> {
    let header = FrameHeader {
        fin: true,
        rsv: 0,
        opcode,
        mask: Some(key),
        payload_len: payload.len() as u64,
    };
    let mut frame = BytesMut::with_capacity(header.encoded_len() + payload.len());
    header.encode(&mut frame);
    let start = frame.len();
    frame.extend_from_slice(payload);
    tether::proto::mask::apply_mask(&mut frame[start..], key, 0);
    frame.to_vec()
}

/// The bytes a server puts on the wire echoing that message: the header without a mask, then
/// the payload.
fn server_frame(payload: &[u8], binary: bool) -> Vec<u8> {
    let header = FrameHeader {
        fin: true,
        rsv: 0,
        opcode: if binary { OpCode::Binary } else { OpCode::Text },
        mask: None,
        payload_len: payload.len() as u64,
    };
    let mut frame = BytesMut::with_capacity(header.encoded_len() + payload.len());
    header.encode(&mut frame);
    frame.extend_from_slice(payload);
    frame.to_vec()
}

/// The opening handshake of `--prebuilt`, by hand over `tcp`: a fixed key, and the exact
/// accept key checked in the answer; `protocol` is offered when given. The server must send
/// nothing after it until we send.
pub(crate) async fn handshake(
    tcp: &mut TcpStream,
    url: &str,
    protocol: Option<&str>,
) -> Result<(), BenchError> {
    let parsed = url::Url::parse(url).map_err(|e| BenchError::Usage(e.to_string()))?;
    let host = parsed.host_str().unwrap_or("localhost");
    let host = match parsed.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    };
    let path = match parsed.query() {
        Some(q) => format!("{}?{q}", parsed.path()),
        None => parsed.path().to_owned(),
    };
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    let offer = protocol.map_or_else(String::new, |p| format!("Sec-WebSocket-Protocol: {p}\r\n"));
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n"
    );
    tcp.write_all(request.as_bytes())
        .await
        .map_err(BenchError::Tcp)?;
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 16 << 10 || tcp.read(&mut byte).await.map_err(BenchError::Tcp)? == 0 {
            return Err(BenchError::Handshake(
                "the server closed during the handshake".into(),
            ));
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    let accept = tether::proto::handshake::accept_key(key.as_bytes());
    let accepted = head.starts_with("HTTP/1.1 101")
        && head.lines().any(|l| {
            l.split_once(':').is_some_and(|(k, v)| {
                k.trim().eq_ignore_ascii_case("sec-websocket-accept") && v.trim() == accept
            })
        });
    if !accepted {
        let line = head.lines().next().unwrap_or("").to_owned();
        return Err(BenchError::Handshake(format!("not upgraded: {line}")));
    }
    Ok(())
}

/// The address a `ws://` URL points at, for the plain TCP connections of `--raw` and `idle`.
pub(crate) fn target(url: &str) -> Result<SocketAddr, BenchError> {
    let url = url::Url::parse(url).map_err(|e| BenchError::Usage(e.to_string()))?;
    if url.scheme() != "ws" {
        return Err(BenchError::Usage("this benchmark takes a ws:// URL".into()));
    }
    url.socket_addrs(|| Some(80))
        .map_err(|e| BenchError::Usage(e.to_string()))?
        .into_iter()
        .next()
        .ok_or_else(|| BenchError::Usage("the URL does not resolve".into()))
}

/// An open benchmark connection: a WebSocket `W`, or plain TCP with `--raw`.
enum Peer<W> {
    Ws(Box<W>),
    Raw(TcpStream),
}

fn config(deflate: bool) -> Config {
    Config::default()
        .max_message_size(256 << 20)
        .max_frame_size(256 << 20)
        .deflate(deflate.then(DeflateConfig::default))
}

/// Runs `bench echo`.
///
/// # Errors
/// [`BenchError`] for bad options or when no connection could be opened.
pub async fn echo(args: EchoArgs) -> Result<EchoSummary, BenchError> {
    if args.conns == 0 || args.pipeline == 0 {
        return Err(BenchError::Usage(
            "--conns and --pipeline must be at least 1".into(),
        ));
    }
    let duration = Duration::try_from_secs_f64(args.duration)
        .map_err(|_| BenchError::Usage("--duration must be a number of seconds".into()))?;
    let url = args.server_url();
    let target = if args.raw || args.prebuilt {
        Some(target(&url)?)
    } else {
        ClientBuilder::new(&url).map_err(|e| BenchError::Usage(e.to_string()))?;
        None
    };
    let body = payload(args.size, args.deflate);
    let message = if args.binary {
        Message::Binary(body.clone())
    } else {
        Message::Text(tether::Utf8Bytes::try_from_bytes(body.clone()).expect("ASCII payload"))
    };
    // `--raw` and `--prebuilt`: the frame, repeated so that any run of in-flight frames is one
    // slice of it, and the echo expected for each: the same bytes from a TCP echo, the
    // unmasked frame from a WebSocket server.
    let (frames, frame_len, expected) = if args.raw || args.prebuilt {
        let frame = client_frame(&body, args.binary, RAW_MASK_KEY);
        let expected = if args.prebuilt {
            server_frame(&body, args.binary)
        } else {
            frame.clone()
        };
        (
            Bytes::from(frame.repeat(args.pipeline + 1)),
            frame.len(),
            Bytes::from(expected),
        )
    } else {
        (Bytes::new(), 0, Bytes::new())
    };
    let prebuilt = args.prebuilt;
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(Failures::default());

    // Connect everything first, so the measurement covers only the steady state.
    let mut sockets = Vec::with_capacity(args.conns);
    let mut first_error = None;
    let pools = http2_pools(args.http2, args.http2_connections);
    for chunk in (0..args.conns).collect::<Vec<_>>().chunks(200) {
        let opens = chunk.iter().map(|&i| {
            let url = url.clone();
            let deflate = args.deflate;
            let pool = pools.get(i % pools.len().max(1)).cloned();
            tokio::spawn(async move {
                match target {
                    Some(addr) => {
                        let mut tcp = TcpStream::connect(addr).await.map_err(BenchError::Tcp)?;
                        tcp.set_nodelay(true).map_err(BenchError::Tcp)?;
                        if prebuilt {
                            handshake(&mut tcp, &url, None).await?;
                        }
                        Ok::<_, BenchError>(Peer::Raw(tcp))
                    }
                    None => {
                        let builder = ClientBuilder::new(&url)
                            .map_err(BenchError::Connect)?
                            .config(config(deflate));
                        let (ws, _) = over_http2(builder, pool)
                            .connect()
                            .await
                            .map_err(BenchError::Connect)?;
                        Ok(Peer::Ws(Box::new(ws)))
                    }
                }
            })
        });
        for open in opens.collect::<Vec<_>>() {
            match open.await.expect("connect task") {
                Ok(peer) => sockets.push(peer),
                Err(e) => {
                    errors.note(|| e.to_string());
                    first_error.get_or_insert(e);
                }
            }
        }
    }
    if sockets.is_empty() {
        return Err(first_error.expect("at least one attempt"));
    }
    let connections = sockets.len();
    let progress = (!args.quiet).then(|| progress_bar(duration));

    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + duration;
    let tasks: Vec<_> = sockets
        .into_iter()
        .map(|peer| {
            let (done, errors) = (done.clone(), errors.clone());
            match peer {
                Peer::Ws(ws) => tokio::spawn(drive(
                    *ws,
                    message.clone(),
                    body.clone(),
                    args.pipeline,
                    deadline,
                    done,
                    errors,
                )),
                Peer::Raw(tcp) => tokio::spawn(drive_raw(
                    tcp,
                    frames.clone(),
                    frame_len,
                    expected.clone(),
                    deadline,
                    done,
                    errors,
                )),
            }
        })
        .collect();
    if let Some(bar) = &progress {
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            bar.set_position(started.elapsed().as_millis() as u64);
            bar.set_message(format!("{} echoes", done.load(Ordering::Relaxed)));
        }
    }
    let mut latency = Histogram::<u64>::new(3).expect("histogram");
    for task in tasks {
        if let Ok(h) = task.await {
            let _ = latency.add(&h);
        }
    }
    let seconds = duration.as_secs_f64();
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    let messages = latency.len();
    Ok(EchoSummary {
        connections,
        messages,
        seconds,
        messages_per_sec: messages as f64 / seconds,
        mb_per_sec: messages as f64 * args.size as f64 / seconds / 1e6,
        p50_us: latency.value_at_quantile(0.50),
        p90_us: latency.value_at_quantile(0.90),
        p99_us: latency.value_at_quantile(0.99),
        max_us: latency.max(),
        errors: errors.count(),
        first_error: errors.first(),
    })
}

/// One connection: keeps `pipeline` messages in flight until the deadline, verifying each
/// echo and recording its round trip; then drains and closes.
async fn drive(
    mut ws: tether::ClientStream,
    message: Message,
    body: Bytes,
    pipeline: usize,
    deadline: tokio::time::Instant,
    done: Arc<AtomicU64>,
    errors: Arc<Failures>,
) -> Histogram<u64> {
    let mut latency = Histogram::<u64>::new(3).expect("histogram");
    let mut sent_at = VecDeque::with_capacity(pipeline);
    for _ in 0..pipeline {
        if let Err(e) = ws.feed(message.clone()).await {
            errors.note(|| format!("sending failed: {e}"));
            return latency;
        }
        sent_at.push_back(Instant::now());
    }
    if let Err(e) = ws.flush().await {
        errors.note(|| format!("sending failed: {e}"));
        return latency;
    }
    // One timer for the whole loop, and one clock read per echo: at millions of echoes a
    // second, a timer per `recv` and three clock reads took over a tenth of the client's CPU.
    let window_end = deadline.into_std();
    let echoes = async {
        while !sent_at.is_empty() {
            let received = match ws.recv().await {
                Some(Ok(received)) => received,
                Some(Err(e)) => return Err(format!("the connection failed: {e}")),
                None => return Err("the server closed the connection".to_owned()),
            };
            if !received.is_data() {
                continue;
            }
            let Some(at) = sent_at.pop_front() else { break };
            if received.as_payload() != &body[..] {
                errors.note(|| {
                    format!(
                        "an echo of {} bytes differs from the {} bytes sent",
                        received.as_payload().len(),
                        body.len()
                    )
                });
            }
            // Only echoes inside the measured window count; the rest is draining.
            let now = Instant::now();
            if now < window_end {
                let _ = latency.record((now - at).as_micros() as u64);
                done.fetch_add(1, Ordering::Relaxed);
                // Keep the pipeline full; `recv` writes what `feed` queued before it waits.
                ws.feed(message.clone())
                    .await
                    .map_err(|e| format!("sending failed: {e}"))?;
                sent_at.push_back(now);
            }
        }
        Ok(())
    };
    match tokio::time::timeout_at(deadline + Duration::from_secs(5), echoes).await {
        Ok(Ok(())) => {}
        Ok(Err(why)) => {
            errors.note(|| why);
            return latency;
        }
        Err(_) => {
            errors.note(|| "echoes still missing 5 s after the run".to_owned());
            return latency;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
    latency
}

/// One `--raw` or `--prebuilt` connection: the same loop as [`drive`] over bytes. `frames`
/// holds the frame (`frame_len` bytes) repeated pipeline + 1 times, so the bytes still to
/// write — at most `pipeline` frames, starting anywhere inside one — are always a single slice
/// of it; every echo must be exactly `expected`.
async fn drive_raw(
    mut tcp: TcpStream,
    frames: Bytes,
    frame_len: usize,
    expected: Bytes,
    deadline: tokio::time::Instant,
    done: Arc<AtomicU64>,
    errors: Arc<Failures>,
) -> Histogram<u64> {
    let mut latency = Histogram::<u64>::new(3).expect("histogram");
    let pipeline = frames.len() / frame_len - 1;
    let frame = &expected[..];
    let echo_len = frame.len();
    let mut sent_at: VecDeque<Instant> = (0..pipeline).map(|_| Instant::now()).collect();
    // Bytes queued and not yet written, and where in a frame the next written byte falls.
    let (mut unsent, mut write_pos) = (pipeline * frame_len, 0);
    // Where in a frame the next echoed byte falls.
    let mut read_pos = 0;
    let mut buf = vec![0u8; 256 << 10];
    let window_end = deadline.into_std();
    let give_up = tokio::time::sleep_until(deadline + Duration::from_secs(5));
    tokio::pin!(give_up);
    let (mut rd, mut wr) = tcp.split();
    while !sent_at.is_empty() {
        tokio::select! {
            read = rd.read(&mut buf) => {
                let Ok(n @ 1..) = read else { break };
                let mut echoed = &buf[..n];
                while !echoed.is_empty() {
                    let take = echoed.len().min(echo_len - read_pos);
                    if echoed[..take] != frame[read_pos..read_pos + take] {
                        // Out of step with the frames: nothing after this can be matched.
                        errors.note(|| "an echo differs from the frame sent".to_owned());
                        return latency;
                    }
                    echoed = &echoed[take..];
                    read_pos += take;
                    if read_pos < echo_len {
                        continue;
                    }
                    read_pos = 0;
                    let Some(at) = sent_at.pop_front() else {
                        errors.note(|| "more echoes than frames sent".to_owned());
                        return latency;
                    };
                    // Only echoes inside the measured window count; the rest is draining.
                    let now = Instant::now();
                    if now < window_end {
                        let _ = latency.record((now - at).as_micros() as u64);
                        done.fetch_add(1, Ordering::Relaxed);
                        sent_at.push_back(now);
                        unsent += frame_len;
                    }
                }
            }
            written = wr.write(&frames[write_pos..write_pos + unsent]), if unsent > 0 => {
                let Ok(n @ 1..) = written else { break };
                unsent -= n;
                write_pos = (write_pos + n) % frame_len;
            }
            () = &mut give_up => break,
        }
    }
    if !sent_at.is_empty() {
        errors.note(|| "the connection ended with echoes missing".to_owned());
    }
    latency
}

pub(crate) fn progress_bar(duration: Duration) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(duration.as_millis() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {msg}")
            .expect("template"),
    );
    bar
}

/// Formats an echo summary for people.
pub fn render_echo(s: &EchoSummary, args: &EchoArgs) -> String {
    format!(
        "{} conns × pipeline {} × {} B{}{}{}: {:.0} msg/s, {:.1} MB/s over {:.1} s\n\
         round trip: p50 {} µs, p90 {} µs, p99 {} µs, max {} µs; errors: {}",
        s.connections,
        args.pipeline,
        args.size,
        if args.binary { " binary" } else { " text" },
        if args.deflate { " deflate" } else { "" },
        if args.raw {
            " raw TCP"
        } else if args.prebuilt {
            " prebuilt frames"
        } else {
            ""
        },
        s.messages_per_sec,
        s.mb_per_sec,
        s.seconds,
        s.p50_us,
        s.p90_us,
        s.p99_us,
        s.max_us,
        s.errors
    )
}

/// The result of `bench idle`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct IdleSummary {
    /// Connections asked for.
    pub requested: usize,
    /// Connections opened and still open at the end of the hold.
    pub held: usize,
    /// Connections that failed to open or dropped while held.
    pub failed: usize,
    /// Seconds it took to open them all.
    pub open_seconds: f64,
}

/// Source address for connection `i`: 127.0.0.1 for the first 25,000, then 127.0.0.2, …
pub(crate) fn source_addr(i: usize) -> SocketAddr {
    let n = (i / 25_000) as u32 + 1;
    let ip = Ipv4Addr::new(127, (n >> 16) as u8, (n >> 8) as u8, n as u8);
    SocketAddr::new(IpAddr::V4(ip), 0)
}

/// `url` with `{n}` replaced by `i` and `{n/K}` by `i / K`.
pub(crate) fn number_url(url: &str, i: usize) -> String {
    let mut out = String::with_capacity(url.len());
    let mut rest = url;
    while let Some(start) = rest.find("{n") {
        out.push_str(&rest[..start]);
        let tail = &rest[start..];
        let Some(end) = tail.find('}') else {
            break;
        };
        let value = match tail[2..end].strip_prefix('/').map(str::parse::<usize>) {
            Some(Ok(k)) if k > 0 => i / k,
            _ => i,
        };
        out.push_str(&value.to_string());
        rest = &tail[end + 1..];
    }
    out.push_str(rest);
    out
}

/// Runs `bench idle`.
///
/// # Errors
/// [`BenchError`] for bad options.
pub async fn idle(args: IdleArgs) -> Result<IdleSummary, BenchError> {
    let url = args.server_url();
    let target = target(&url)?;
    let hold = Duration::try_from_secs_f64(args.hold)
        .map_err(|_| BenchError::Usage("--hold must be seconds".into()))?;
    crate::raise_fd_limit(args.conns + 64);
    let numbered = url.contains("{n");
    let offer = |builder: ClientBuilder| {
        if args.subscribe.is_empty() {
            builder
        } else {
            builder.protocol(CHANNEL_PROTOCOL)
        }
    };
    let builder = ClientBuilder::new(&number_url(&url, 0))
        .map(offer)
        .map_err(|e| BenchError::Usage(e.to_string()))?;
    let subscribe = Arc::new(args.subscribe.clone());
    let started = Instant::now();
    let semaphore = Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
    let raw = args.raw;
    let count = Arc::new(IdleCount::default());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let pools = http2_pools(args.http2, args.http2_connections);
    let peers: Vec<_> = (0..args.conns)
        .map(|i| {
            let semaphore = semaphore.clone();
            let over = pools.get(i % pools.len().max(1)).map(|pool| {
                let builder = ClientBuilder::new(&number_url(&url, i))
                    .map_or_else(|_| builder.clone(), offer);
                over_http2(builder, Some(pool.clone()))
            });
            let request = if numbered {
                ClientBuilder::new(&number_url(&url, i))
                    .map_or_else(|_| builder.request(), |b| offer(b).request())
            } else {
                builder.request()
            };
            let subscribe = subscribe.clone();
            let count = count.clone();
            let mut stopped = stopped.clone();
            tokio::spawn(async move {
                let permit = semaphore.acquire_owned().await.ok();
                let mut peer = match over {
                    Some(builder) => builder
                        .connect_with(request)
                        .await
                        .ok()
                        .map(|(ws, _)| Peer::Ws(Box::new(ws))),
                    None => open_idle(i, target, raw, request).await,
                };
                if let (Some(Peer::Ws(ws)), false) = (&mut peer, subscribe.is_empty()) {
                    if !subscribed(ws, i, &subscribe).await {
                        peer = None;
                    }
                }
                drop(permit);
                count.tried.fetch_add(1, Ordering::Relaxed);
                let mut peer = peer?;
                count.open.fetch_add(1, Ordering::Relaxed);
                // Held until told to stop, unless it ends first: a close, an error or a
                // stray byte.
                let held = tokio::select! {
                    _ = stopped.wait_for(|stop| *stop) => true,
                    () = ended(&mut peer) => false,
                };
                if !held {
                    count.open.fetch_sub(1, Ordering::Relaxed);
                    count.dropped.fetch_add(1, Ordering::Relaxed);
                }
                match &mut peer {
                    Peer::Ws(ws) => {
                        let _ =
                            tokio::time::timeout(Duration::from_millis(50), ws.close(None)).await;
                    }
                    Peer::Raw(tcp) => {
                        let _ = tcp.shutdown().await;
                    }
                }
                Some(held)
            })
        })
        .collect();
    // A live count on a terminal: how many are open while they open, then while they hold.
    let bar = (!args.quiet).then(indicatif::ProgressBar::new_spinner);
    let show = |what: String| {
        if let Some(bar) = &bar {
            bar.set_message(what);
            bar.tick();
        }
    };
    let mut every = tokio::time::interval(Duration::from_millis(200));
    while count.tried.load(Ordering::Relaxed) < args.conns {
        every.tick().await;
        show(format!(
            "opening: {} of {} open, {} failed, {} dropped",
            count.open.load(Ordering::Relaxed),
            args.conns,
            count.tried.load(Ordering::Relaxed)
                - count.open.load(Ordering::Relaxed)
                - count.dropped.load(Ordering::Relaxed),
            count.dropped.load(Ordering::Relaxed),
        ));
    }
    let open_seconds = started.elapsed().as_secs_f64();
    let until = tokio::time::Instant::now() + hold;
    loop {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        show(format!(
            "holding {} of {} ({} dropped), {:.0} s left",
            count.open.load(Ordering::Relaxed),
            args.conns,
            count.dropped.load(Ordering::Relaxed),
            left.as_secs_f64().ceil(),
        ));
        if left.is_zero() {
            break;
        }
        tokio::time::sleep(left.min(Duration::from_millis(200))).await;
    }
    let _ = stop.send(true);
    let mut held = 0;
    for peer in peers {
        held += usize::from(matches!(peer.await, Ok(Some(true))));
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(IdleSummary {
        requested: args.conns,
        held,
        failed: args.conns - held,
        open_seconds,
    })
}

/// Counts of `bench idle`'s connections, for the live count.
#[derive(Default)]
struct IdleCount {
    /// Connections tried, open or not.
    tried: AtomicUsize,
    /// Open now.
    open: AtomicUsize,
    /// Opened, then ended before the hold was over.
    dropped: AtomicUsize,
}

/// Opens connection number `i` of `bench idle`: from its own loopback source address, so that
/// many connections do not run out of ports.
async fn open_idle(
    i: usize,
    target: std::net::SocketAddr,
    raw: bool,
    request: tether::proto::handshake::client::ClientRequest,
) -> Option<Peer<ClientStream>> {
    let socket = tokio::net::TcpSocket::new_v4().ok()?;
    if target.ip().is_loopback() {
        socket.bind(source_addr(i)).ok()?;
    }
    let tcp = tokio::time::timeout(Duration::from_secs(10), socket.connect(target))
        .await
        .ok()?
        .ok()?;
    if raw {
        return Some(Peer::Raw(tcp));
    }
    let tcp = tether::tls::MaybeTlsStream::Plain(tcp);
    let (ws, _) = tether::client(tcp, request, Config::default()).await.ok()?;
    Some(Peer::Ws(Box::new(ws)))
}

/// One pool per HTTP/2 connection asked for (none without `--http2`): connection `i` opens
/// through pool `i % n`, so the WebSockets spread over `n` connections.
fn http2_pools(http2: bool, connections: usize) -> Vec<Pool> {
    if !http2 {
        return Vec::new();
    }
    (0..connections.max(1)).map(|_| Pool::new()).collect()
}

/// `builder` over HTTP/2 through `pool`, when there is one.
fn over_http2(builder: ClientBuilder, pool: Option<Pool>) -> ClientBuilder {
    match pool {
        Some(pool) => builder.http_version(HttpVersion::Http2).pool(pool),
        None => builder,
    }
}

/// The channel protocol's subprotocol (docs/protocol.md).
pub(crate) const CHANNEL_PROTOCOL: &str = "tether.v1";

/// Connects over the channel protocol and subscribes connection `i` to `channels` (numbered
/// like the URL); true once every command is acknowledged without an error, within 10 s.
async fn subscribed(ws: &mut ClientStream, i: usize, channels: &[String]) -> bool {
    let mut commands = vec![serde_json::json!({"id": 1, "op": "connect"})];
    for (k, channel) in channels.iter().enumerate() {
        let channel = number_url(channel, i);
        commands.push(serde_json::json!({"id": k + 2, "op": "subscribe", "channel": channel}));
    }
    let answered = async {
        for command in &commands {
            ws.feed(Message::text(command.to_string())).await.ok()?;
        }
        ws.flush().await.ok()?;
        let mut replies = 0;
        while replies < commands.len() {
            let text = match ws.recv().await {
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                _ => return None,
            };
            let Ok(reply) = serde_json::from_str::<serde_json::Value>(&text) else {
                return None;
            };
            if reply.get("id").is_some() {
                if reply.get("error").is_some() {
                    return None;
                }
                replies += 1;
            }
        }
        Some(())
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(10), answered).await,
        Ok(Some(()))
    )
}

/// Resolves when an idle connection ends: a close, an error, or (for plain TCP) any byte.
/// What a WebSocket server sends on its own (a greeting) is read and passed over.
async fn ended(peer: &mut Peer<ClientStream>) {
    match peer {
        Peer::Ws(ws) => loop {
            match ws.recv().await {
                Some(Ok(message)) if !matches!(message, Message::Close(_)) => {}
                _ => return,
            }
        },
        Peer::Raw(tcp) => {
            let _ = tcp.read(&mut [0]).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_urls() {
        let url = "ws://h/ws/rooms/r{n/100}?name=g{n}";
        assert_eq!(number_url(url, 0), "ws://h/ws/rooms/r0?name=g0");
        assert_eq!(number_url(url, 250), "ws://h/ws/rooms/r2?name=g250");
        assert_eq!(number_url("ws://h/", 7), "ws://h/");
    }

    #[test]
    fn source_addresses_spread_over_loopback() {
        assert_eq!(source_addr(0).ip(), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)));
        assert_eq!(
            source_addr(24_999).ip(),
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1))
        );
        assert_eq!(
            source_addr(25_000).ip(),
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))
        );
        assert_eq!(
            source_addr(300 * 25_000).ip(),
            IpAddr::V4(Ipv4Addr::new(127, 0, 1, 45))
        );
    }

    #[test]
    fn raw_frames_are_what_a_client_sends() {
        for len in [0, 20, 125, 126, 65_535, 65_536] {
            let body = payload(len, false);
            let frame = client_frame(&body, true, RAW_MASK_KEY);
            let (header, at) = FrameHeader::parse(&frame).unwrap().unwrap();
            assert!(header.fin);
            assert_eq!(header.opcode, OpCode::Binary);
            assert_eq!(header.mask, Some(RAW_MASK_KEY));
            assert_eq!(header.payload_len, len as u64);
            let mut unmasked = frame[at..].to_vec();
            tether::proto::mask::apply_mask(&mut unmasked, RAW_MASK_KEY, 0);
            assert_eq!(unmasked, &body[..], "{len}");
        }
        let text = client_frame(b"hi", false, RAW_MASK_KEY);
        assert_eq!(text[..2], [0x81, 0x82]);
    }

    #[test]
    fn payloads_have_the_requested_size() {
        assert_eq!(payload(0, false).len(), 0);
        assert_eq!(payload(1 << 20, true).len(), 1 << 20);
        assert!(std::str::from_utf8(&payload(1000, true)).is_ok());
    }
}
