//! A client that stays connected: when the connection fails or the server closes it, it
//! connects again after a backoff that doubles up to a cap, with jitter so that many
//! clients of a restarted server do not return at the same instant. A connection that lasted
//! resets the backoff; a refusal that cannot heal (HTTP 4xx, a bad URL) stops it.
//!
//! Run: `cargo run -p tether --example reconnect -- ws://127.0.0.1:9001/`, then stop and
//! start `tether echo --port 9001` and watch it come back.

use std::time::{Duration, Instant};

use tether::handshake::ClientHandshakeError;
use tether::{Error, Message};

const FIRST: Duration = Duration::from_millis(250);
const CAP: Duration = Duration::from_secs(30);
/// A connection that lasted this long was healthy: the next failure starts from `FIRST`.
const STABLE: Duration = Duration::from_secs(10);

/// Whether trying again can help: not after the server refused the request itself.
fn permanent(e: &Error) -> bool {
    match e {
        Error::Url(_) => true,
        Error::ClientHandshake(ClientHandshakeError::Status { status, .. }) => {
            (400..500).contains(status) && *status != 429
        }
        _ => false,
    }
}

/// One connection's life: a message every second, the echoes printed. Returns why it ended.
async fn session(url: &str) -> Result<(), Error> {
    let (mut ws, _) = tether::connect(url).await?;
    println!("connected");
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                n += 1;
                ws.send(Message::text(format!("tick {n}"))).await?;
            }
            message = ws.recv() => match message {
                Some(Ok(Message::Text(text))) => println!("< {text}"),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
                None => return Ok(()), // closed by the server
            },
        }
    }
}

#[tokio::main]
async fn main() {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "ws://127.0.0.1:9001/".into());
    let mut backoff = FIRST;
    loop {
        let started = Instant::now();
        let ended = session(&url).await;
        match &ended {
            Err(e) if permanent(e) => {
                eprintln!("giving up: {e}");
                return;
            }
            Err(e) => eprintln!("connection failed: {e}"),
            Ok(()) => eprintln!("closed by the server"),
        }
        if started.elapsed() >= STABLE {
            backoff = FIRST;
        }
        // Full jitter: anywhere from half the backoff to all of it.
        let jitter = rand_fraction();
        let wait = backoff.mul_f64(0.5 + 0.5 * jitter);
        eprintln!("reconnecting in {:.1} s", wait.as_secs_f64());
        tokio::time::sleep(wait).await;
        backoff = (backoff * 2).min(CAP);
    }
}

/// A number in [0, 1) from the clock's nanoseconds: enough to spread clients apart.
fn rand_fraction() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    f64::from(nanos % 1_000_000) / 1_000_000.0
}
