//! `tether bench fanout`: one channel, many subscribers, one publisher. Every connection is a
//! subscriber; the first also publishes, keeping `--window` publications in flight: the next
//! goes out once one has reached every subscriber. Each publication carries its number and
//! when it was sent, so every delivery is counted and timed. The report is deliveries per
//! second and the delivery latency's percentiles.
//!
//! Two kinds of server:
//! - `--channel CHANNEL`: `tether serve`'s `/ws` (tether.v1). Each connection connects and
//!   subscribes to CHANNEL; the publisher publishes `{"text": …}` to it, and a delivery is
//!   the `pub` push.
//! - without: a server that relays every message a connection sends to all of its
//!   connections, e.g. a uWebSockets.js app that subscribes each one to a topic and publishes
//!   what it receives (`bench/uws/fanout.mjs`). A delivery is the message itself.
//!
//! The connections speak WebSocket by hand over plain TCP: a fixed handshake, masked frames
//! out, frame headers parsed in place on the way in. Reading ten thousand sockets is the load
//! generator's whole job here; it should cost as little as a client can.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use hdrhistogram::Histogram;
use tether::proto::{FrameHeader, OpCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::bench::{
    handshake, masked_frame, number_url, progress_bar, target, BenchError, Failures,
    CHANNEL_PROTOCOL,
};

/// Options of `tether bench fanout`.
#[derive(clap::Args, Debug, Clone, serde::Serialize)]
pub struct FanoutArgs {
    /// The server: with --channel, a `tether serve` /ws URL; without, one that relays each
    /// message to every connection. `{n}` and `{n/K}` are numbered as in `bench idle`, e.g.
    /// ws://127.0.0.1:8080/ws?name=f{n}
    #[arg(value_name = "URL")]
    pub url: String,
    /// Connections, every one a subscriber (the publisher too).
    #[arg(long, default_value_t = 1000)]
    pub subscribers: usize,
    /// Speak tether.v1: every connection subscribes to CHANNEL, e.g. `room:fanout`, and the
    /// publisher publishes `{"text": …}` to it.
    #[arg(long, value_name = "CHANNEL")]
    pub channel: Option<String>,
    /// With --channel, send ephemeral events (`op: event`, stored nowhere) instead of
    /// publications: the path of messages that keep no history. The sender does not get its
    /// own events back, so each reaches every subscriber but the publisher.
    #[arg(long, requires = "channel")]
    pub events: bool,
    /// Publications in flight: the next is sent once one has reached every subscriber.
    #[arg(long, default_value_t = 4)]
    pub window: usize,
    /// Publications per second at most, evenly spaced (within the window): the cost and
    /// latency of a steady rate rather than of as many as the window allows. 0: no pacing.
    #[arg(long, default_value_t = 0.0, value_name = "PER_SECOND")]
    pub rate: f64,
    /// Print `publishing` on standard error when the first publication goes out, and
    /// `published` once the last one reached everyone: a harness can then measure the
    /// server over the publishing alone, without the opening of the subscribers.
    #[arg(long)]
    pub marks: bool,
    /// Characters in each publication's text (at least what its number and time take).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Seconds to publish.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Connections opened at once.
    #[arg(long, default_value_t = 200)]
    pub concurrency: usize,
    /// Open the subscribers as streams of `--http2-connections` HTTP/2 connections (h2c with
    /// prior knowledge, RFC 8441), e.g. against `tether serve --h2c`.
    #[arg(long)]
    pub http2: bool,
    /// HTTP/2 connections the subscribers share, in turn (with `--http2`).
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub http2_connections: usize,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// The result of `bench fanout`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FanoutSummary {
    /// Connections subscribed.
    pub subscribers: usize,
    /// Publications sent.
    pub publications: u64,
    /// Publications received, counted once per subscriber.
    pub deliveries: u64,
    /// From the first publication to the last delivery, seconds.
    pub seconds: f64,
    /// Deliveries per second.
    pub deliveries_per_sec: f64,
    /// Delivery latency (publication sent to received) percentiles, microseconds.
    pub p50_us: u64,
    /// 90th percentile, µs.
    pub p90_us: u64,
    /// 99th percentile, µs.
    pub p99_us: u64,
    /// Maximum, µs.
    pub max_us: u64,
    /// Deliveries that never came: publications × subscribers − deliveries.
    pub missing: u64,
    /// Connections that failed or ended, and error replies.
    pub errors: u64,
    /// The first of them, in words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
}

/// Publications whose deliveries are counted at once; far more than any window.
const RING: usize = 1 << 12;
/// How long the publisher waits for a publication to reach everyone before giving up.
const STALL: Duration = Duration::from_secs(5);
/// What every publication's text starts with: `fanout:NUMBER:NANOS:`.
const MARK: &[u8] = b"fanout:";

/// Finds [`MARK`] (built once: `memmem::find` builds a searcher on every call).
static STAMP: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(MARK));

/// What to change when `tether serve` refused a publication for its rate (error 110): one
/// publisher keeping a window in flight goes past a client's default budget at once.
fn refusal_hint(error: &str) -> &'static str {
    if error.contains("\"code\":110") {
        " (tether serve holds one client to --message-rate and --identity-message-rate: \
         raise both for a benchmark, as the README's bench lines do)"
    } else {
        ""
    }
}

/// Finds what every error reply holds, so that other messages are not parsed.
static ERROR: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"error\""));

/// What every connection's task shares.
struct Shared {
    started: Instant,
    /// Per publication (by number modulo `RING`): subscribers it has yet to reach.
    remaining: Box<[AtomicUsize]>,
    /// Publications that reached every subscriber.
    completed: AtomicU64,
    deliveries: AtomicU64,
    /// Wakes the publisher when a publication completes.
    progress: tokio::sync::Notify,
    latency: Mutex<Histogram<u64>>,
    failures: Failures,
    /// Frames the subscribers have read, publications or not.
    frames: AtomicU64,
    /// Set when the run is over: every task stops reading.
    over: tokio::sync::watch::Sender<bool>,
}

/// One open connection, with what it read past the handshake and the subscription.
struct Conn {
    tcp: Box<dyn Transport>,
    buf: BytesMut,
}

/// What a connection's frames go over: its TCP connection, or a stream of a shared HTTP/2
/// connection (`--http2`).
trait Transport: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Transport for T {}

/// The sending side of one of the run's HTTP/2 connections.
type H2 = hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>;

/// `n` HTTP/2 connections (prior knowledge) to `addr`, each allowed as many streams as the
/// server grants.
async fn h2_connections(addr: std::net::SocketAddr, n: usize) -> Result<Vec<H2>, BenchError> {
    let mut senders = Vec::with_capacity(n);
    for _ in 0..n {
        let opened = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr));
        let tcp = opened
            .await
            .map_err(|_| BenchError::Handshake(format!("no connection to {addr} within 10 s")))?
            .map_err(BenchError::Tcp)?;
        tcp.set_nodelay(true).map_err(BenchError::Tcp)?;
        let mut builder =
            hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
        builder
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(64 << 20);
        let handshake = builder.handshake(hyper_util::rt::TokioIo::new(tcp));
        let (sender, connection) = tokio::time::timeout(Duration::from_secs(10), handshake)
            .await
            .map_err(|_| BenchError::Handshake("no HTTP/2 handshake within 10 s".into()))?
            .map_err(|e| BenchError::Handshake(e.to_string()))?;
        tokio::spawn(connection);
        senders.push(sender);
    }
    Ok(senders)
}

/// An extended CONNECT (RFC 8441) to `url` on `sender`'s connection: the stream, once the
/// server answers 200.
async fn h2_stream(
    sender: &mut H2,
    url: &str,
    protocol: Option<&str>,
) -> Result<Box<dyn Transport>, String> {
    let target = url.replacen("ws://", "http://", 1);
    let mut req = http::Request::connect(target).header("sec-websocket-version", "13");
    if let Some(protocol) = protocol {
        req = req.header("sec-websocket-protocol", protocol);
    }
    let mut req = req
        .body(http_body_util::Empty::new())
        .map_err(|e| e.to_string())?;
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    sender.ready().await.map_err(|e| e.to_string())?;
    let response = sender.send_request(req).await.map_err(|e| e.to_string())?;
    if response.status() != 200 {
        return Err(format!(
            "the extended CONNECT was answered {}",
            response.status()
        ));
    }
    let stream = hyper::upgrade::on(response)
        .await
        .map_err(|e| e.to_string())?;
    Ok(Box::new(hyper_util::rt::TokioIo::new(stream)))
}

/// Runs `bench fanout`.
///
/// # Errors
/// [`BenchError`] for bad options or when not every connection could subscribe.
pub async fn fanout(args: FanoutArgs) -> Result<FanoutSummary, BenchError> {
    if !(args.rate.is_finite() && args.rate >= 0.0) {
        return Err(BenchError::Usage(
            "--rate must be a number of publications per second".into(),
        ));
    }
    if args.subscribers == 0 || args.window == 0 || args.window > RING / 2 {
        return Err(BenchError::Usage(format!(
            "--subscribers must be at least 1 and --window from 1 to {}",
            RING / 2
        )));
    }
    if args.events && args.subscribers < 2 {
        return Err(BenchError::Usage(
            "--events needs at least 2 subscribers: an event does not reach its sender".into(),
        ));
    }
    let duration = Duration::try_from_secs_f64(args.duration)
        .map_err(|_| BenchError::Usage("--duration must be a number of seconds".into()))?;
    let url = crate::connect::ws_url(&args.url);
    let addr = target(&number_url(&url, 0))?;
    crate::raise_fd_limit(args.subscribers + 64);
    let h2 = if args.http2 {
        h2_connections(addr, args.http2_connections.max(1)).await?
    } else {
        Vec::new()
    };

    let semaphore = Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
    let opening: Vec<_> = (0..args.subscribers)
        .map(|i| {
            let semaphore = semaphore.clone();
            let url = number_url(&url, i);
            let channel = args.channel.clone();
            let h2 = h2.get(i % h2.len().max(1)).cloned();
            tokio::spawn(async move {
                let _permit = semaphore.acquire_owned().await;
                tokio::time::timeout(Duration::from_secs(30), open(i, addr, &url, channel, h2))
                    .await
                    .unwrap_or_else(|_| Err("no subscription within 30 s".to_owned()))
            })
        })
        .collect();
    let mut conns = Vec::with_capacity(args.subscribers);
    let mut first_error = None;
    for task in opening {
        match task.await.expect("open task") {
            Ok(conn) => conns.push(conn),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_error {
        return Err(BenchError::Handshake(format!(
            "{} of {} connections subscribed; the first failure: {e}",
            conns.len(),
            args.subscribers
        )));
    }

    let subscribers = conns.len();
    let (over, stopped) = tokio::sync::watch::channel(false);
    let shared = Arc::new(Shared {
        started: Instant::now(),
        remaining: (0..RING).map(|_| AtomicUsize::new(0)).collect(),
        completed: AtomicU64::new(0),
        deliveries: AtomicU64::new(0),
        progress: tokio::sync::Notify::new(),
        latency: Mutex::new(Histogram::new(3).expect("histogram")),
        failures: Failures::default(),
        frames: AtomicU64::new(0),
        over,
    });
    let mut conns = conns.into_iter();
    let publisher = conns.next().expect("at least one connection");
    let readers: Vec<_> = conns
        .map(|conn| tokio::spawn(subscribe(conn, shared.clone(), stopped.clone())))
        .collect();
    // What the server sent while the others subscribed (with a channel, the joins of a room's
    // first members) is read and dropped before the first publication, as any client would
    // have read it meanwhile: it is not the fan-out's latency.
    let quiet = Instant::now() + Duration::from_secs(10);
    loop {
        let before = shared.frames.load(Relaxed);
        tokio::time::sleep(Duration::from_millis(100)).await;
        if shared.frames.load(Relaxed) == before || Instant::now() > quiet {
            break;
        }
    }
    let progress = (!args.quiet).then(|| progress_bar(duration));
    let ticker = progress.clone().map(|bar| {
        let shared = shared.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                bar.set_position(shared.started.elapsed().as_millis() as u64);
                bar.set_message(format!("{} deliveries", shared.deliveries.load(Relaxed)));
            }
        })
    });
    // An event does not come back to its sender.
    let reached = if args.events {
        subscribers - 1
    } else {
        subscribers
    };
    let publish = Publish {
        channel: args.channel.clone(),
        events: args.events,
        size: args.size,
        window: args.window as u64,
        subscribers: reached,
        began: Instant::now(),
        deadline: Instant::now() + duration,
        rate: args.rate,
    };
    if args.marks {
        eprintln!("publishing");
    }
    let (sent, seconds) = publish.run(publisher, &shared, stopped).await;
    if args.marks {
        eprintln!("published");
    }
    let _ = shared.over.send(true);
    for reader in readers {
        let _ = reader.await;
    }
    if let Some(ticker) = ticker {
        ticker.abort();
    }
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    let deliveries = shared.deliveries.load(Relaxed);
    let latency = shared.latency.lock().unwrap_or_else(|e| e.into_inner());
    Ok(FanoutSummary {
        subscribers,
        publications: sent,
        deliveries,
        seconds,
        deliveries_per_sec: deliveries as f64 / seconds.max(1e-9),
        p50_us: latency.value_at_quantile(0.50),
        p90_us: latency.value_at_quantile(0.90),
        p99_us: latency.value_at_quantile(0.99),
        max_us: latency.max(),
        missing: (sent * reached as u64).saturating_sub(deliveries),
        errors: shared.failures.count(),
        first_error: shared.failures.first(),
    })
}

/// Opens connection `i`: from its own loopback source address, the handshake (or, with `h2`,
/// a stream of that HTTP/2 connection), and with a channel the protocol's `connect` and
/// `subscribe`, both answered without an error.
async fn open(
    i: usize,
    addr: std::net::SocketAddr,
    url: &str,
    channel: Option<String>,
    h2: Option<H2>,
) -> Result<Conn, String> {
    let protocol = channel.as_ref().map(|_| CHANNEL_PROTOCOL);
    let tcp: Box<dyn Transport> = match h2 {
        Some(mut sender) => h2_stream(&mut sender, url, protocol).await?,
        None => {
            let socket = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
            if addr.ip().is_loopback() {
                socket.bind(source(i)).map_err(|e| e.to_string())?;
            }
            let mut tcp = socket.connect(addr).await.map_err(|e| e.to_string())?;
            tcp.set_nodelay(true).map_err(|e| e.to_string())?;
            handshake(&mut tcp, url, protocol)
                .await
                .map_err(|e| e.to_string())?;
            Box::new(tcp)
        }
    };
    let mut conn = Conn {
        tcp,
        buf: BytesMut::with_capacity(4096),
    };
    let Some(channel) = channel else {
        return Ok(conn);
    };
    let connect = serde_json::json!({"id": 1, "op": "connect"}).to_string();
    let subscribe = serde_json::json!({"id": 2, "op": "subscribe", "channel": channel}).to_string();
    let mut out = masked_frame(OpCode::Text, connect.as_bytes(), key(i));
    out.extend(masked_frame(OpCode::Text, subscribe.as_bytes(), key(i)));
    conn.tcp.write_all(&out).await.map_err(|e| e.to_string())?;
    // The two replies, then the publications the subscription replays (the channel's recent
    // history): those are not this run's.
    let (mut replies, mut replayed) = (0, 0);
    while replies < 2 || replayed > 0 {
        let Some((opcode, payload)) = conn.next_frame().await? else {
            return Err("the server closed before subscribing".into());
        };
        if opcode == OpCode::Close {
            return Err(close_reason(&payload));
        }
        if opcode != OpCode::Text {
            continue;
        }
        match reply(&payload) {
            Some(Err(error)) => return Err(error),
            Some(Ok(n)) => {
                replies += 1;
                replayed = n;
            }
            None if find(&payload, b"\"type\":\"pub\"").is_some() => {
                replayed = replayed.saturating_sub(1);
            }
            None => {}
        }
    }
    Ok(conn)
}

/// The loopback source address of connection `i`: 250 addresses per run, in a block of
/// 127.0.0.0/8 picked by the process id, so that runs one after another do not find the ports
/// of the last one's connections still in TIME_WAIT.
fn source(i: usize) -> std::net::SocketAddr {
    let block = (std::process::id() % 250) as u8;
    let host = (i % 250) as u8 + 1;
    std::net::SocketAddr::from(([127, 1, block, host], 0))
}

/// A mask key per connection (any will do; a server must unmask whatever it gets).
fn key(i: usize) -> [u8; 4] {
    (i as u32 ^ 0x5a5a_1234).to_le_bytes()
}

impl Conn {
    /// The next whole frame (opcode and payload), reading as needed; `None` at the end.
    async fn next_frame(&mut self) -> Result<Option<(OpCode, BytesMut)>, String> {
        loop {
            if let Some(frame) = self.parsed()? {
                return Ok(Some(frame));
            }
            self.buf.reserve(16 << 10);
            match self.tcp.read_buf(&mut self.buf).await {
                Ok(0) => return Ok(None),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// A whole frame from what was read, if there is one.
    fn parsed(&mut self) -> Result<Option<(OpCode, BytesMut)>, String> {
        let Some((header, at)) = FrameHeader::parse(&self.buf).map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        let len = usize::try_from(header.payload_len).map_err(|e| e.to_string())?;
        if header.mask.is_some() || !header.fin || len > 16 << 20 {
            return Err(
                "a frame this benchmark does not expect (masked, fragmented or huge)".into(),
            );
        }
        if self.buf.len() < at + len {
            return Ok(None);
        }
        self.buf.advance(at);
        Ok(Some((header.opcode, self.buf.split_to(len))))
    }

    /// Handles every whole frame read: deliveries counted and timed into `tally`, pings
    /// answered. `Err` when the connection must end.
    ///
    /// Frames are parsed in place and the buffer advanced once; the clock is read once for
    /// the whole read (its frames arrived together), and the counts go to the shared state
    /// once per publication in it. The load generator shares one core with ten thousand
    /// connections: what it spends per delivery would otherwise show up as latency.
    async fn take_frames(&mut self, shared: &Shared, tally: &mut Tally) -> Result<(), String> {
        let now = shared.started.elapsed().as_nanos() as u64;
        let mut at = 0;
        let mut frames = 0;
        let mut pongs = Vec::new();
        let mut result = Ok(());
        while let Some((opcode, payload)) = frame_at(&self.buf[at..])? {
            let payload_at = at + payload.start;
            at += payload.end;
            let payload = &self.buf[payload_at..at];
            frames += 1;
            match opcode {
                OpCode::Text | OpCode::Binary => {
                    if let Some((number, sent)) = stamp(payload) {
                        tally.delivered(shared, number, now.saturating_sub(sent));
                    } else if let Some(Err(error)) =
                        ERROR.find(payload).and_then(|_| reply(payload))
                    {
                        // A refused publication never arrives: the run is over.
                        result = Err(format!("an error reply: {error}{}", refusal_hint(&error)));
                        break;
                    }
                }
                OpCode::Ping => pongs.extend(masked_frame(OpCode::Pong, payload, key(0))),
                OpCode::Close => {
                    result = Err(close_reason(payload));
                    break;
                }
                _ => {}
            }
        }
        self.buf.advance(at);
        shared.frames.fetch_add(frames, Relaxed);
        tally.settle(shared);
        if !pongs.is_empty() {
            self.tcp
                .write_all(&pongs)
                .await
                .map_err(|e| e.to_string())?;
        }
        result
    }
}

/// The whole frame at the start of `buf`, if there is one: its opcode and where its payload
/// lies (its end is where the next frame starts).
fn frame_at(buf: &[u8]) -> Result<Option<(OpCode, std::ops::Range<usize>)>, String> {
    let Some((header, at)) = FrameHeader::parse(buf).map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    let len = usize::try_from(header.payload_len).map_err(|e| e.to_string())?;
    if header.mask.is_some() || !header.fin || len > 16 << 20 {
        return Err("a frame this benchmark does not expect (masked, fragmented or huge)".into());
    }
    if buf.len() < at + len {
        return Ok(None);
    }
    Ok(Some((header.opcode, at..at + len)))
}

/// One connection's deliveries not yet added to the shared state.
struct Tally {
    /// Latencies (µs), added to the histogram in batches.
    times: Vec<u32>,
    /// Per publication number, deliveries since the last settling (a read holds a few).
    counts: Vec<(u64, usize)>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            times: Vec::with_capacity(256),
            counts: Vec::with_capacity(32),
        }
    }

    /// A delivery of publication `number` after `latency` ns.
    fn delivered(&mut self, shared: &Shared, number: u64, latency: u64) {
        self.times
            .push((latency / 1000).min(u64::from(u32::MAX)) as u32);
        if self.times.len() == self.times.capacity() {
            shared.record(&mut self.times);
        }
        match self.counts.iter_mut().find(|(n, _)| *n == number) {
            Some((_, count)) => *count += 1,
            None => self.counts.push((number, 1)),
        }
    }

    /// Adds the counted deliveries to the shared state: a publication that has now reached
    /// every subscriber is completed, and the publisher told.
    fn settle(&mut self, shared: &Shared) {
        let mut total = 0;
        for (number, count) in self.counts.drain(..) {
            total += count;
            let slot = &shared.remaining[(number % RING as u64) as usize];
            let before = slot
                .fetch_update(Relaxed, Relaxed, |n| Some(n.saturating_sub(count)))
                .unwrap_or(0);
            if before > 0 && before <= count {
                shared.completed.fetch_add(1, Relaxed);
                shared.progress.notify_one();
            }
        }
        if total > 0 {
            shared.deliveries.fetch_add(total as u64, Relaxed);
        }
    }

    /// Everything left goes to the shared state.
    fn finish(mut self, shared: &Shared) {
        self.settle(shared);
        shared.record(&mut self.times);
    }
}

/// What a read came to: `Err` when `who`'s connection is over.
fn read_result(read: std::io::Result<usize>, who: &str) -> Result<(), String> {
    match read {
        Ok(1..) => Ok(()),
        Ok(_) => Err(format!("the server closed {who}")),
        Err(e) => Err(format!("{who} failed: {e}")),
    }
}

/// What a close frame says: its code and reason.
fn close_reason(payload: &[u8]) -> String {
    match payload {
        [a, b, reason @ ..] => format!(
            "closed by the server: {} {}",
            u16::from_be_bytes([*a, *b]),
            String::from_utf8_lossy(reason)
        ),
        _ => "closed by the server".into(),
    }
}

/// A reply of the channel protocol (a message with an `id`): how many publications it says
/// follow (`replayed`), or `Err` with its text when it is an error; `None` for anything else.
fn reply(message: &[u8]) -> Option<Result<u64, String>> {
    let value: serde_json::Value = serde_json::from_slice(message).ok()?;
    value.get("id")?;
    Some(match value.get("error") {
        Some(error) => Err(error.to_string()),
        None => Ok(value
            .get("replayed")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0)),
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(haystack, needle)
}

/// A publication's number and when it was sent (nanoseconds from the start), from
/// `fanout:NUMBER:NANOS:` anywhere in a message.
fn stamp(message: &[u8]) -> Option<(u64, u64)> {
    let rest = &message[STAMP.find(message)? + MARK.len()..];
    let (number, rest) = decimal(rest)?;
    let (sent, _) = decimal(rest)?;
    Some((number, sent))
}

/// The decimal number `bytes` starts with, ended by a `:`, and what follows the colon.
fn decimal(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let end = memchr::memchr(b':', bytes)?;
    if end == 0 || end > 19 {
        return None;
    }
    let mut value = 0u64;
    for &b in &bytes[..end] {
        if !b.is_ascii_digit() {
            return None;
        }
        value = value * 10 + u64::from(b - b'0');
    }
    Some((value, &bytes[end + 1..]))
}

impl Shared {
    fn record(&self, times: &mut Vec<u32>) {
        let mut latency = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        for t in times.drain(..) {
            let _ = latency.record(u64::from(t));
        }
    }
}

/// A subscriber: reads and counts until the run is over.
async fn subscribe(
    mut conn: Conn,
    shared: Arc<Shared>,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let mut tally = Tally::new();
    // One wait for the end, for the whole run (not one per read).
    let over = stopped.wait_for(|over| *over);
    tokio::pin!(over);
    loop {
        if let Err(why) = conn.take_frames(&shared, &mut tally).await {
            shared.failures.note(|| why);
            break;
        }
        conn.buf.reserve(16 << 10);
        tokio::select! {
            biased;
            read = conn.tcp.read_buf(&mut conn.buf) => {
                if let Err(why) = read_result(read, "a subscriber") {
                    shared.failures.note(|| why);
                    break;
                }
            }
            _ = &mut over => break,
        }
    }
    tally.finish(&shared);
}

/// The publisher's settings.
struct Publish {
    channel: Option<String>,
    /// Ephemeral events rather than publications.
    events: bool,
    size: usize,
    window: u64,
    /// Deliveries each publication makes.
    subscribers: usize,
    began: Instant,
    deadline: Instant,
    /// Publications per second at most (0: as many as the window allows).
    rate: f64,
}

impl Publish {
    /// How many publications may have gone out by now; `u64::MAX` when not paced.
    fn due(&self) -> u64 {
        if self.rate > 0.0 {
            (self.began.elapsed().as_secs_f64() * self.rate) as u64 + 1
        } else {
            u64::MAX
        }
    }

    /// How long until the next publication is due (at most 100 ms: the loop looks again).
    fn next_due(&self, sent: u64) -> Duration {
        let limit = Duration::from_millis(100);
        if self.rate > 0.0 {
            let at = self.began + Duration::from_secs_f64(sent as f64 / self.rate);
            at.saturating_duration_since(Instant::now()).min(limit)
        } else {
            limit
        }
    }

    /// Publication `number`'s frame: its text stamped with the time, padded to the size.
    fn frame(&self, number: u64, shared: &Shared) -> Vec<u8> {
        let now = shared.started.elapsed().as_nanos();
        let mut text = format!("fanout:{number}:{now}:");
        while text.len() < self.size {
            text.push('x');
        }
        let body = match &self.channel {
            Some(channel) if self.events => serde_json::json!({"id": number + 3, "op": "event",
                "channel": channel, "name": "fanout", "data": {"text": text}})
            .to_string(),
            Some(channel) => serde_json::json!({"id": number + 3, "op": "publish",
                "channel": channel, "data": {"text": text}})
            .to_string(),
            None => text,
        };
        masked_frame(OpCode::Text, body.as_bytes(), key(0))
    }

    /// Publishes until the deadline, `window` in flight, and reads its own deliveries like
    /// any subscriber. Returns the publications sent and the seconds from the first to the
    /// last delivery.
    async fn run(
        &self,
        mut conn: Conn,
        shared: &Shared,
        mut stopped: tokio::sync::watch::Receiver<bool>,
    ) -> (u64, f64) {
        let mut tally = Tally::new();
        let mut sent = 0u64;
        let mut last_progress = Instant::now();
        loop {
            let done = shared.completed.load(Relaxed);
            let open = Instant::now() < self.deadline;
            // Send while there is room in the window; a batch of them in one write.
            let mut out = Vec::new();
            let due = self.due();
            while open && sent - done < self.window && sent < due {
                let slot = &shared.remaining[(sent % RING as u64) as usize];
                slot.store(self.subscribers, Relaxed);
                out.extend(self.frame(sent, shared));
                sent += 1;
            }
            if !out.is_empty() {
                if let Err(e) = conn.tcp.write_all(&out).await {
                    shared.failures.note(|| format!("publishing failed: {e}"));
                    break;
                }
            }
            if !open && done == sent {
                break;
            }
            if sent == done {
                // Nothing in flight (a paced run between publications): nothing is late.
                last_progress = Instant::now();
            }
            if last_progress.elapsed() > STALL {
                shared.failures.note(|| {
                    format!(
                        "{} publications did not reach every subscriber within {STALL:?}",
                        sent - done
                    )
                });
                break;
            }
            conn.buf.reserve(16 << 10);
            tokio::select! {
                () = shared.progress.notified() => last_progress = Instant::now(),
                () = tokio::time::sleep(self.next_due(sent)) => {}
                _ = stopped.wait_for(|over| *over) => break,
                read = conn.tcp.read_buf(&mut conn.buf) => {
                    let taken = match read_result(read, "the publisher") {
                        Ok(()) => conn.take_frames(shared, &mut tally).await,
                        Err(why) => Err(why),
                    };
                    if let Err(why) = taken {
                        shared.failures.note(|| why);
                        break;
                    }
                }
            }
        }
        tally.finish(shared);
        (sent, shared.started.elapsed().as_secs_f64())
    }
}

/// Formats a fan-out summary for people.
pub fn render(s: &FanoutSummary, args: &FanoutArgs) -> String {
    let paced = if args.rate > 0.0 {
        format!(", {} publications/s", args.rate)
    } else {
        String::new()
    };
    format!(
        "{} subscribers, window {}{paced}, {} B{}: {:.0} deliveries/s ({} publications, {} deliveries \
         over {:.1} s)\ndelivery latency: p50 {} µs, p90 {} µs, p99 {} µs, max {} µs; \
         missing: {}, errors: {}",
        s.subscribers,
        args.window,
        args.size,
        args.channel.as_deref().map_or_else(String::new, |c| {
            let what = if args.events { " (events)" } else { "" };
            format!(" on {c}{what}")
        }),
        s.deliveries_per_sec,
        s.publications,
        s.deliveries,
        s.seconds,
        s.p50_us,
        s.p90_us,
        s.p99_us,
        s.max_us,
        s.missing,
        s.errors
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_is_found_in_a_push_or_alone() {
        assert_eq!(stamp(b"fanout:7:123456:xxxx"), Some((7, 123_456)));
        let push =
            br#"{"type":"pub","channel":"room:f","offset":9,"data":{"text":"fanout:41:99:xx"}}"#;
        assert_eq!(stamp(push), Some((41, 99)));
        assert_eq!(stamp(b"{\"id\":3,\"offset\":9}"), None);
        assert_eq!(stamp(b"fanout:x:1:"), None);
    }
}
