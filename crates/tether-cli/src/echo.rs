//! `tether echo`: an echo server for text and binary messages, the conformance target.

use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
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
/// A connection quiet for `park_after` (looked at every second, or as often as `park_after`
/// when it is shorter) is set aside ([`tether::Idle`]): no task and no registration with the
/// runtime, only the WebSocket's state and its socket in one `epoll` set per shard, until its
/// peer sends something or a timer of its own (keepalive) comes due. `None` keeps every
/// connection in its task (and so does any system but Linux).
///
/// # Errors
/// Only when accepting fails in a way that is not specific to one connection.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    park_after: Option<Duration>,
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
            let shard = run_shard(rx, config.clone(), park_after);
            tokio::spawn(tokio::task::unconstrained(shard));
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
    park_after: Option<Duration>,
) {
    let mut connections = FuturesUnordered::new();
    let mut resting = park_after.and_then(|after| match rest::Resting::new(after) {
        Ok(resting) => Some(resting),
        Err(e) => {
            tracing::warn!(error = %e, "quiet connections cannot be set aside here; they keep their tasks");
            None
        }
    });
    let every = resting.as_ref().map_or(rest::SWEEP, rest::Resting::every);
    let mut sweep = tokio::time::interval(every);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut listening = true;
    let resting_len = |r: &Option<rest::Resting>| r.as_ref().map_or(0, rest::Resting::len);
    while listening || !connections.is_empty() || resting_len(&resting) > 0 {
        let has_resting = resting_len(&resting) > 0;
        tokio::select! {
            next = accepted.recv(), if listening => match next {
                Some((tcp, peer)) => connections.push(EchoConnection::new(tcp, peer, config.clone())),
                None => listening = false,
            },
            Some(()) = connections.next() => {}
            _ = sweep.tick(), if resting.is_some() => {
                let Some(resting) = resting.as_mut() else { continue };
                for conn in connections.iter_mut() {
                    conn.sweep(resting);
                }
                for (ws, peer) in resting.due() {
                    connections.push(EchoConnection::open(ws, peer));
                }
            }
            keys = async {
                match resting.as_mut() {
                    Some(resting) => resting.ready().await,
                    None => None,
                }
            }, if has_resting => {
                let woken = match keys {
                    Some(keys) => resting.as_mut().map(|r| r.take(keys)),
                    None => {
                        // The set's thread stopped: nothing would wake a connection set aside.
                        // All go back to their tasks, and none is set aside again.
                        tracing::error!("quiet connections can no longer be set aside");
                        resting.take().map(rest::Resting::take_all)
                    }
                };
                for (ws, peer) in woken.into_iter().flatten() {
                    connections.push(EchoConnection::open(ws, peer));
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
    /// Sweeps since the connection was last polled (see [`rest::Resting::every`]).
    quiet: u8,
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
            quiet: 0,
        }
    }

    /// A connection resumed from rest.
    fn open(ws: WebSocket<TcpStream>, peer: SocketAddr) -> Self {
        EchoConnection {
            peer,
            state: Echo::Open(ws),
            quiet: 0,
        }
    }

    /// Counts one more sweep without a poll, and sets the connection aside in `resting` once it
    /// has been quiet for long enough and is at rest. Its task is woken by
    /// [`WebSocket::into_idle`] and ends ([`Echo::Done`]).
    fn sweep(&mut self, resting: &mut rest::Resting) {
        self.quiet = self.quiet.saturating_add(1);
        if self.quiet <= resting.sweeps() || !matches!(self.state, Echo::Open(_)) {
            return;
        }
        let Echo::Open(ws) = std::mem::replace(&mut self.state, Echo::Done) else {
            return;
        };
        match ws.into_idle() {
            Ok(idle) => {
                if let Some(ws) = resting.park(idle, self.peer) {
                    // Could not be set aside: it goes on in its task.
                    self.state = Echo::Open(ws);
                }
            }
            Err(ws) => {
                tracing::trace!(peer = %self.peer, ?ws, "quiet, but not at rest: kept in its task");
                self.state = Echo::Open(ws);
            }
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

impl EchoConnection {
    fn poll_connection(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let peer = self.peer;
        self.quiet = 0;
        loop {
            match &mut self.state {
                Echo::Handshake(handshake) => match ready!(handshake.as_mut().poll(cx)) {
                    Ok(ws) => {
                        tracing::debug!(%peer, "connected");
                        self.state = Echo::Open(ws);
                    }
                    Err(e) => {
                        tracing::info!(%peer, error = %e, "handshake failed");
                        self.state = Echo::Done;
                    }
                },
                Echo::Open(ws) => {
                    ready!(Self::poll_echo(ws, peer, cx));
                    self.state = Echo::Done;
                }
                Echo::Done => return Poll::Ready(()),
            }
        }
    }
}

impl Future for EchoConnection {
    type Output = ();

    /// A connection that panics is logged and dropped; the shard's others go on.
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        match std::panic::catch_unwind(AssertUnwindSafe(|| this.poll_connection(cx))) {
            Ok(poll) => poll,
            Err(_) => {
                tracing::error!(peer = %this.peer, "an echo connection panicked; it was dropped");
                this.state = Echo::Done;
                Poll::Ready(())
            }
        }
    }
}

/// Quiet connections set aside: each is its WebSocket's state and its socket, registered in
/// one `epoll` set per shard rather than with the runtime, and no task. A thread of the
/// shard's own waits on the set and tells the shard which sockets became readable (or hung
/// up); each is taken out of the set and resumed in a task.
#[cfg(target_os = "linux")]
mod rest {
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use nix::errno::Errno;
    use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
    use slab::Slab;
    use tether::{Idle, WebSocket};
    use tokio::net::TcpStream;
    use tokio::sync::mpsc;

    /// How often a shard looks for quiet connections (and for resting ones whose timer
    /// comes due before the next look), at most: as often as `--park-after` when it is
    /// shorter.
    pub(super) const SWEEP: Duration = Duration::from_secs(1);

    /// The shortest time between sweeps.
    const MIN_SWEEP: Duration = Duration::from_millis(10);

    /// Ready sockets taken from the set per `epoll_wait`.
    const EVENTS: usize = 256;

    /// How long the set's thread waits at most before it looks whether its shard has ended.
    const WATCH_TIMEOUT_MS: u16 = 1000;

    /// A connection set aside: its WebSocket's state and its socket (the peer's address, for
    /// the logs, is asked of the socket again when it comes back).
    type Parked = Idle<std::net::TcpStream>;

    /// A shard's connections set aside.
    pub(in crate::echo) struct Resting {
        set: Arc<Epoll>,
        parked: Slab<Parked>,
        /// Keys of parked connections whose sockets became ready, from the set's thread.
        ready: mpsc::UnboundedReceiver<Vec<usize>>,
        /// How often the shard sweeps.
        every: Duration,
        /// Sweeps a connection must stay quiet for before it is set aside.
        sweeps: u8,
    }

    impl Resting {
        /// An empty set and its thread.
        pub(in crate::echo) fn new(after: Duration) -> std::io::Result<Resting> {
            let set = Arc::new(Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?);
            let (tx, ready) = mpsc::unbounded_channel();
            let watched = set.clone();
            std::thread::Builder::new()
                .name("echo-rest".into())
                .spawn(move || watch(&watched, &tx))?;
            let every = after.clamp(MIN_SWEEP, SWEEP);
            let sweeps = after.as_secs_f64() / every.as_secs_f64();
            Ok(Resting {
                set,
                parked: Slab::new(),
                ready,
                every,
                sweeps: sweeps.ceil().clamp(1.0, 250.0) as u8,
            })
        }

        pub(in crate::echo) fn len(&self) -> usize {
            self.parked.len()
        }

        pub(in crate::echo) fn sweeps(&self) -> u8 {
            self.sweeps
        }

        /// How often the shard sweeps.
        pub(in crate::echo) fn every(&self) -> Duration {
            self.every
        }

        /// Sets `ws` aside until its peer sends something (or hangs up) or its deadline; gives
        /// it back when the set refuses it.
        pub(in crate::echo) fn park(
            &mut self,
            ws: Idle<TcpStream>,
            peer: SocketAddr,
        ) -> Option<WebSocket<TcpStream>> {
            let ws = match ws.try_map_io(TcpStream::into_std) {
                Ok(ws) => ws,
                Err(e) => {
                    tracing::info!(%peer, error = %e, "setting a quiet connection aside failed; dropped");
                    return None;
                }
            };
            let entry = self.parked.vacant_entry();
            // One report per registration: the socket is taken out of the set once reported.
            let flags = EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLONESHOT;
            let event = EpollEvent::new(flags, entry.key() as u64);
            match self.set.add(ws.get_ref(), event) {
                Ok(()) => {
                    tracing::trace!(%peer, "set aside");
                    entry.insert(ws);
                    None
                }
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "a quiet connection stays in its task");
                    resume(ws, peer)
                }
            }
        }

        /// The next keys the set's thread reports ready (`None` once it has stopped).
        pub(in crate::echo) fn ready(
            &mut self,
        ) -> impl std::future::Future<Output = Option<Vec<usize>>> + Send + '_ {
            self.ready.recv()
        }

        /// The connections set aside under `keys`, taken out of the set. A key may have been
        /// taken already (its timer came due) and given to another connection since: that one
        /// is resumed early, and set aside again once quiet.
        pub(in crate::echo) fn take(
            &mut self,
            keys: Vec<usize>,
        ) -> Vec<(WebSocket<TcpStream>, SocketAddr)> {
            keys.into_iter()
                .filter_map(|key| self.take_one(key))
                .collect()
        }

        /// Every connection set aside, taken out of the set.
        pub(in crate::echo) fn take_all(mut self) -> Vec<(WebSocket<TcpStream>, SocketAddr)> {
            let all = self.parked.iter().map(|(key, _)| key).collect();
            self.take(all)
        }

        /// The connections set aside whose timer (keepalive) comes due before the next sweep.
        pub(in crate::echo) fn due(&mut self) -> Vec<(WebSocket<TcpStream>, SocketAddr)> {
            let soon = Instant::now() + self.every;
            let due: Vec<usize> = self
                .parked
                .iter()
                .filter(|(_, ws)| ws.deadline().is_some_and(|d| d <= soon))
                .map(|(key, _)| key)
                .collect();
            self.take(due)
        }

        /// Takes connection `key` out of the set, to be resumed in a task.
        fn take_one(&mut self, key: usize) -> Option<(WebSocket<TcpStream>, SocketAddr)> {
            let ws = self.parked.try_remove(key)?;
            // A peer that hung up may have no address left to tell.
            let peer = ws
                .get_ref()
                .peer_addr()
                .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
            if let Err(e) = self.set.delete(ws.get_ref()) {
                tracing::warn!(%peer, error = %e, "taking a quiet connection out of its set failed");
            }
            resume(ws, peer).map(|ws| (ws, peer))
        }
    }

    /// The set's thread: reports ready keys until its shard is gone.
    fn watch(set: &Epoll, ready: &mpsc::UnboundedSender<Vec<usize>>) {
        let mut events = [EpollEvent::empty(); EVENTS];
        while !ready.is_closed() {
            let n = match set.wait(&mut events, EpollTimeout::from(WATCH_TIMEOUT_MS)) {
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::error!(error = %e, "waiting on quiet connections failed; they go back to their tasks");
                    return;
                }
            };
            if n == 0 {
                continue;
            }
            let keys = events[..n]
                .iter()
                .filter_map(|event| usize::try_from(event.data()).ok())
                .collect();
            if ready.send(keys).is_err() {
                return;
            }
        }
    }

    /// Registers a connection's socket with the runtime again.
    fn resume(ws: Parked, peer: SocketAddr) -> Option<WebSocket<TcpStream>> {
        match ws.try_map_io(TcpStream::from_std) {
            Ok(ws) => Some(ws.resume()),
            Err(e) => {
                tracing::info!(%peer, error = %e, "resuming a quiet connection failed; dropped");
                None
            }
        }
    }
}

/// Elsewhere, no connection is set aside: [`rest::Resting::new`] says so and the shard keeps
/// every connection in its task.
#[cfg(not(target_os = "linux"))]
mod rest {
    use std::net::SocketAddr;
    use std::time::Duration;

    use tether::{Idle, WebSocket};
    use tokio::net::TcpStream;

    pub(super) const SWEEP: Duration = Duration::from_secs(1);

    /// Never made.
    pub(in crate::echo) struct Resting {
        never: std::convert::Infallible,
    }

    type Woken = Vec<(WebSocket<TcpStream>, SocketAddr)>;

    impl Resting {
        pub(in crate::echo) fn new(_after: Duration) -> std::io::Result<Resting> {
            Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "setting connections aside needs Linux's epoll",
            ))
        }
        pub(in crate::echo) fn len(&self) -> usize {
            match self.never {}
        }
        pub(in crate::echo) fn sweeps(&self) -> u8 {
            match self.never {}
        }
        pub(in crate::echo) fn every(&self) -> Duration {
            match self.never {}
        }
        pub(in crate::echo) fn park(
            &mut self,
            _: Idle<TcpStream>,
            _: SocketAddr,
        ) -> Option<WebSocket<TcpStream>> {
            match self.never {}
        }
        pub(in crate::echo) fn ready(
            &mut self,
        ) -> impl std::future::Future<Output = Option<Vec<usize>>> + Send + '_ {
            async move {
                let never: Option<Vec<usize>> = match self.never {};
                never
            }
        }
        pub(in crate::echo) fn take(&mut self, _: Vec<usize>) -> Woken {
            match self.never {}
        }
        pub(in crate::echo) fn take_all(self) -> Woken {
            match self.never {}
        }
        pub(in crate::echo) fn due(&mut self) -> Woken {
            match self.never {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shard holds each connection in one allocation of this plus about 64 bytes: the
    /// WebSocket, the peer's address and the count of quiet sweeps (a byte, padded to a
    /// word), and nothing beside them (280 bytes in a release build, within jemalloc's
    /// 384-byte class with the node around it; an `async fn` doing the same took 656).
    #[tokio::test]
    async fn an_echo_connection_is_its_websocket_peer_and_quiet_count() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tcp = TcpStream::connect(addr).await.unwrap();
        let conn = EchoConnection::new(tcp, addr, Arc::new(Config::default()));
        let size = std::mem::size_of_val(&conn);
        let parts = std::mem::size_of::<WebSocket<TcpStream>>()
            + std::mem::size_of::<SocketAddr>()
            + std::mem::size_of::<u64>();
        assert!(
            size <= parts,
            "an echo connection takes {size} bytes, its parts {parts}"
        );
    }
}
