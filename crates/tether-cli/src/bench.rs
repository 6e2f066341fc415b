//! `tether bench`: a load generator for any WebSocket server.
//!
//! - `bench echo`: C connections each keep P messages in flight for a duration, verify every
//!   echo byte for byte, and report messages/s, MB/s and round-trip latency percentiles.
//! - `bench idle`: opens and holds C idle connections (spreading source addresses over
//!   127.0.0.0/8 past ~25,000 so local ports do not run out) and reports how many held.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use tether::proto::extension::deflate::DeflateConfig;
use tether::{ClientBuilder, Config, Message};

/// Options of `tether bench echo`.
#[derive(clap::Args, Debug, Clone)]
pub struct EchoArgs {
    /// The echo server, e.g. ws://127.0.0.1:9001/
    #[arg(long)]
    pub url: String,
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
    #[arg(long)]
    pub deflate: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Options of `tether bench idle`.
#[derive(clap::Args, Debug, Clone)]
pub struct IdleArgs {
    /// The server, e.g. ws://127.0.0.1:9001/
    #[arg(long)]
    pub url: String,
    /// Connections to open and hold.
    #[arg(long, default_value_t = 1000)]
    pub conns: usize,
    /// Seconds to hold them once all are open.
    #[arg(long, default_value_t = 5.0)]
    pub hold: f64,
    /// Connections opened at once.
    #[arg(long, default_value_t = 200)]
    pub concurrency: usize,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
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
    ClientBuilder::new(&args.url).map_err(|e| BenchError::Usage(e.to_string()))?;
    let body = payload(args.size, args.deflate);
    let message = if args.binary {
        Message::Binary(body.clone())
    } else {
        Message::Text(tether::Utf8Bytes::try_from_bytes(body.clone()).expect("ASCII payload"))
    };
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));

    // Connect everything first, so the measurement covers only the steady state.
    let mut sockets = Vec::with_capacity(args.conns);
    let mut first_error = None;
    for chunk in (0..args.conns).collect::<Vec<_>>().chunks(200) {
        let opens = chunk.iter().map(|_| {
            let url = args.url.clone();
            let deflate = args.deflate;
            tokio::spawn(async move {
                ClientBuilder::new(&url)?
                    .config(config(deflate))
                    .connect()
                    .await
            })
        });
        for open in opens.collect::<Vec<_>>() {
            match open.await.expect("connect task") {
                Ok((ws, _)) => sockets.push(ws),
                Err(e) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                    first_error.get_or_insert(e);
                }
            }
        }
    }
    if sockets.is_empty() {
        return Err(BenchError::Connect(
            first_error.expect("at least one attempt"),
        ));
    }
    let connections = sockets.len();
    let progress = (!args.quiet).then(|| progress_bar(duration));

    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + duration;
    let tasks: Vec<_> = sockets
        .into_iter()
        .map(|ws| {
            let (done, errors, message, body) =
                (done.clone(), errors.clone(), message.clone(), body.clone());
            tokio::spawn(drive(
                ws,
                message,
                body,
                args.pipeline,
                deadline,
                done,
                errors,
            ))
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
        errors: errors.load(Ordering::Relaxed),
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
    errors: Arc<AtomicU64>,
) -> Histogram<u64> {
    let mut latency = Histogram::<u64>::new(3).expect("histogram");
    let mut sent_at = std::collections::VecDeque::with_capacity(pipeline);
    let fail = |errors: &AtomicU64| {
        errors.fetch_add(1, Ordering::Relaxed);
    };
    for _ in 0..pipeline {
        if ws.feed(message.clone()).await.is_err() {
            fail(&errors);
            return latency;
        }
        sent_at.push_back(Instant::now());
    }
    if ws.flush().await.is_err() {
        fail(&errors);
        return latency;
    }
    while !sent_at.is_empty() {
        let received =
            match tokio::time::timeout_at(deadline + Duration::from_secs(5), ws.recv()).await {
                Ok(Some(Ok(msg))) => msg,
                _ => {
                    fail(&errors);
                    return latency;
                }
            };
        if !received.is_data() {
            continue;
        }
        let Some(at) = sent_at.pop_front() else { break };
        if received.as_payload() != &body[..] {
            fail(&errors);
        }
        // Only echoes inside the measured window count; the rest is draining.
        if tokio::time::Instant::now() < deadline {
            let _ = latency.record(at.elapsed().as_micros() as u64);
            done.fetch_add(1, Ordering::Relaxed);
            // Keep the pipeline full; `recv` writes what `feed` queued before it waits.
            if ws.feed(message.clone()).await.is_err() {
                fail(&errors);
                return latency;
            }
            sent_at.push_back(Instant::now());
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
    latency
}

fn progress_bar(duration: Duration) -> indicatif::ProgressBar {
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
        "{} conns × pipeline {} × {} B{}{}: {:.0} msg/s, {:.1} MB/s over {:.1} s\n\
         round trip: p50 {} µs, p90 {} µs, p99 {} µs, max {} µs; errors: {}",
        s.connections,
        args.pipeline,
        args.size,
        if args.binary { " binary" } else { " text" },
        if args.deflate { " deflate" } else { "" },
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
fn source_addr(i: usize) -> SocketAddr {
    let n = (i / 25_000) as u32 + 1;
    let ip = Ipv4Addr::new(127, (n >> 16) as u8, (n >> 8) as u8, n as u8);
    SocketAddr::new(IpAddr::V4(ip), 0)
}

/// Runs `bench idle`.
///
/// # Errors
/// [`BenchError`] for bad options.
pub async fn idle(args: IdleArgs) -> Result<IdleSummary, BenchError> {
    let url = url::Url::parse(&args.url).map_err(|e| BenchError::Usage(e.to_string()))?;
    if url.scheme() != "ws" {
        return Err(BenchError::Usage("bench idle takes a ws:// URL".into()));
    }
    let target = url
        .socket_addrs(|| Some(80))
        .map_err(|e| BenchError::Usage(e.to_string()))?
        .into_iter()
        .next()
        .ok_or_else(|| BenchError::Usage("the URL does not resolve".into()))?;
    let hold = Duration::try_from_secs_f64(args.hold)
        .map_err(|_| BenchError::Usage("--hold must be seconds".into()))?;
    crate::raise_fd_limit(args.conns + 64);
    let builder = ClientBuilder::new(&args.url).map_err(|e| BenchError::Usage(e.to_string()))?;
    let started = Instant::now();
    let semaphore = Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
    let opens: Vec<_> = (0..args.conns)
        .map(|i| {
            let semaphore = semaphore.clone();
            let request = builder.request();
            tokio::spawn(async move {
                let _permit = semaphore.acquire_owned().await.ok()?;
                let socket = tokio::net::TcpSocket::new_v4().ok()?;
                if target.ip().is_loopback() {
                    socket.bind(source_addr(i)).ok()?;
                }
                let tcp = tokio::time::timeout(Duration::from_secs(10), socket.connect(target))
                    .await
                    .ok()?
                    .ok()?;
                let (ws, _) = tether::client(tcp, request, Config::default()).await.ok()?;
                Some(ws)
            })
        })
        .collect();
    let mut sockets = Vec::with_capacity(args.conns);
    for open in opens {
        if let Ok(Some(ws)) = open.await {
            sockets.push(ws);
        }
    }
    let open_seconds = started.elapsed().as_secs_f64();
    tokio::time::sleep(hold).await;
    // Still open: no close or error is waiting to be read.
    let mut held = 0;
    for ws in &mut sockets {
        if tokio::time::timeout(Duration::from_millis(1), ws.recv())
            .await
            .is_err()
        {
            held += 1;
        }
    }
    for ws in &mut sockets {
        let _ = tokio::time::timeout(Duration::from_millis(50), ws.close(None)).await;
    }
    Ok(IdleSummary {
        requested: args.conns,
        held,
        failed: args.conns - held,
        open_seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn payloads_have_the_requested_size() {
        assert_eq!(payload(0, false).len(), 0);
        assert_eq!(payload(1 << 20, true).len(), 1 << 20);
        assert!(std::str::from_utf8(&payload(1000, true)).is_ok());
    }
}
