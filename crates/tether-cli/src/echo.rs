//! `tether echo`: an echo server for text and binary messages, the conformance target.

use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use tether::{Config, WebSocket};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// How many messages one connection echoes in one poll before the other connections of its
/// shard get their turn.
const ECHO_BATCH: usize = 64;

/// Serves echo connections on `listener` until `shutdown` resolves; connections still open
/// then run on until they end.
///
/// Connections are dealt out in turn to one task per worker thread, a shard, which polls each
/// of its connections when that connection is woken; a failing (or panicking) connection is
/// logged and never affects the others. A shard rather than a task per connection: a tokio
/// task is a 128-byte-aligned allocation, and glibc's aligned allocation leaves 160 bytes of
/// unusable fragments beside each one, while in a shard a connection is one plain allocation
/// (docs/decisions.md, 11).
///
/// # Errors
/// Only when accepting fails in a way that is not specific to one connection.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let config = Arc::new(config);
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    let shards: Vec<_> = (0..workers.max(1))
        .map(|_| {
            let (tx, rx) = mpsc::unbounded_channel();
            // Unconstrained: tokio's cooperative budget is per task, and a shard spending it
            // on a few connections would leave the rest polled for nothing until the next
            // turn. Each connection bounds its own turn instead (`ECHO_BATCH`).
            tokio::spawn(tokio::task::unconstrained(run_shard(rx, config.clone())));
            tx
        })
        .collect();
    let mut next = 0;
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) if is_transient(&e) => {
                    tracing::warn!(error = %e, "accept failed; continuing");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
                Err(e) => return Err(e),
            },
            () = &mut shutdown => return Ok(()),
        };
        // A shard ends only after its sender is dropped, so sending cannot fail.
        let _ = shards[next].send((tcp, peer));
        next = (next + 1) % shards.len();
    }
}

/// Runs the connections dealt to one shard until the listener is gone and they have ended.
async fn run_shard(
    mut accepted: mpsc::UnboundedReceiver<(TcpStream, SocketAddr)>,
    config: Arc<Config>,
) {
    let mut connections = FuturesUnordered::new();
    let mut listening = true;
    while listening || !connections.is_empty() {
        tokio::select! {
            next = accepted.recv(), if listening => match next {
                Some((tcp, peer)) => {
                    let conn = EchoConnection::new(tcp, peer, config.clone());
                    connections.push(AssertUnwindSafe(conn).catch_unwind());
                }
                None => listening = false,
            },
            Some(ended) = connections.next() => {
                if ended.is_err() {
                    tracing::error!("an echo connection panicked; it was dropped");
                }
            }
        }
    }
}

/// Accept errors that concern one connection or a passing shortage (file descriptors).
fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    ) || e
        .raw_os_error()
        .is_some_and(|code| code == 24 || code == 23) // EMFILE, ENFILE
}

/// One echo connection, as its shard holds it for the connection's whole life: the boxed
/// handshake, then the WebSocket. Written out by hand rather than as an `async fn`, whose
/// state keeps its arguments, the handshake's output and each awaited future in separate
/// slots: the `async fn` it replaces took 1,024 bytes (656 around today's smaller
/// `WebSocket`), this takes 272 (docs/decisions.md, 11).
struct EchoConnection {
    peer: SocketAddr,
    state: Echo,
}

/// The handshake, boxed: its buffers and timer are freed once it is done instead of staying
/// in the connection's allocation.
type Handshake = Pin<Box<dyn Future<Output = tether::Result<WebSocket<TcpStream>>> + Send>>;

// Open is the state a connection spends its life in: boxing it would cost an allocation.
#[allow(clippy::large_enum_variant)]
enum Echo {
    Handshake(Handshake),
    Open(WebSocket<TcpStream>),
    Done,
}

impl EchoConnection {
    fn new(tcp: TcpStream, peer: SocketAddr, config: Arc<Config>) -> Self {
        let _ = tcp.set_nodelay(true);
        EchoConnection {
            peer,
            state: Echo::Handshake(Box::pin(tether::accept_with_config(tcp, config))),
        }
    }

    /// Echoes text and binary messages until the peer closes (`Ready`), or until it has
    /// echoed at least [`ECHO_BATCH`] in this turn (`Pending`, woken at once). Each message is
    /// lent from the read buffer and its echo copied straight into the outgoing one: no
    /// allocation per message (`WebSocket::poll_next_lent`).
    fn poll_echo(
        ws: &mut WebSocket<TcpStream>,
        peer: SocketAddr,
        cx: &mut Context<'_>,
    ) -> Poll<()> {
        let mut ws = Pin::new(ws);
        let mut echoed = 0;
        while echoed < ECHO_BATCH {
            // Receiving writes the queue whenever it would wait, so a burst of small messages
            // is echoed in one write; it stops reading while the queue is over its budget.
            let lent = ready!(ws.as_mut().poll_next_lent(cx, |message, replies| {
                // Fails only once our Close is queued: the stream ends after it.
                let _ = replies.send(message);
            }));
            match lent {
                Some(Ok(n)) => echoed += n,
                Some(Err(e)) => {
                    tracing::info!(%peer, error = %e, "connection ended");
                    return Poll::Ready(());
                }
                None => return Poll::Ready(()),
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl Future for EchoConnection {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let peer = this.peer;
        loop {
            match &mut this.state {
                Echo::Handshake(handshake) => match ready!(handshake.as_mut().poll(cx)) {
                    Ok(ws) => {
                        tracing::debug!(%peer, "connected");
                        this.state = Echo::Open(ws);
                    }
                    Err(e) => {
                        tracing::info!(%peer, error = %e, "handshake failed");
                        this.state = Echo::Done;
                    }
                },
                Echo::Open(ws) => {
                    ready!(Self::poll_echo(ws, peer, cx));
                    this.state = Echo::Done;
                }
                Echo::Done => return Poll::Ready(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shard holds each connection in one allocation of this plus about 64 bytes: the
    /// WebSocket and the peer's address, and nothing beside them (272 bytes in a release
    /// build; an `async fn` doing the same took 656).
    #[tokio::test]
    async fn an_echo_connection_is_its_websocket_and_peer() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tcp = TcpStream::connect(addr).await.unwrap();
        let conn = EchoConnection::new(tcp, addr, Arc::new(Config::default()));
        let size = std::mem::size_of_val(&conn);
        let parts = std::mem::size_of::<WebSocket<TcpStream>>() + std::mem::size_of::<SocketAddr>();
        assert!(
            size <= parts,
            "an echo connection takes {size} bytes, its parts {parts}"
        );
    }
}
