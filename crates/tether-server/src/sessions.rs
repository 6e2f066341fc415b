//! Where WebSocket sessions run: one shard per worker thread, each a tokio task that polls the
//! sessions dealt to it when they are woken.
//!
//! A session that is one tokio task costs a 128-byte-aligned task allocation, and glibc's
//! aligned allocations leave about 160 bytes of unusable fragments beside each one; in a shard
//! it is one node of a `FuturesUnordered`, a plain allocation of about 100 bytes. With many
//! idle sockets that difference is a large part of what each costs (`docs/decisions.md`, 11
//! and 14). `tether echo` runs its connections the same way.
//!
//! A shard runs outside tokio's cooperative budget (which is per task: a shard spending it on
//! a few sessions would leave the others polled for nothing), so each session bounds its own
//! turn ([`Turn`]). A panicking session is logged and dropped; the others go on.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::task::{Context, Poll};

use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt as _, StreamExt as _};
use tokio::sync::mpsc;

/// A session, boxed.
pub type Session = Pin<Box<dyn Future<Output = ()> + Send>>;

enum Command {
    Run(Session),
    /// Poll every session once.
    Wake,
}

/// The shards.
#[derive(Debug)]
pub struct Sessions {
    shards: Vec<mpsc::UnboundedSender<Command>>,
    next: AtomicUsize,
}

impl Sessions {
    /// Starts one shard per worker thread of the current runtime.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn start() -> Sessions {
        let workers = tokio::runtime::Handle::current().metrics().num_workers();
        let shards = (0..workers.max(1))
            .map(|_| {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(tokio::task::unconstrained(run_shard(rx)));
                tx
            })
            .collect();
        Sessions {
            shards,
            next: AtomicUsize::new(0),
        }
    }

    /// Runs `session` in the next shard, in turn.
    pub fn spawn(&self, session: Session) {
        let shard = self.next.fetch_add(1, Relaxed) % self.shards.len();
        if let Err(refused) = self.shards[shard].send(Command::Run(session)) {
            // Only when the runtime is going away: the session goes with it.
            drop(refused);
            tracing::debug!("session not started: the runtime is shutting down");
        }
    }

    /// Polls every session once, woken or not. Sessions learn of the server's shutdown this
    /// way, from [`crate::app::App::is_shutting_down`], so none of them holds a future or a
    /// waker for it while idle.
    pub fn wake_all(&self) {
        for shard in &self.shards {
            let _ = shard.send(Command::Wake);
        }
    }
}

/// Runs one shard until its sender is gone and its sessions have ended.
async fn run_shard(mut commands: mpsc::UnboundedReceiver<Command>) {
    let mut sessions = FuturesUnordered::new();
    let mut open = true;
    while open || !sessions.is_empty() {
        tokio::select! {
            command = commands.recv(), if open => match command {
                Some(Command::Run(session)) => sessions.push(AssertUnwindSafe(session).catch_unwind()),
                // Pushed again, each is polled again.
                Some(Command::Wake) => sessions = sessions.into_iter().collect(),
                None => open = false,
            },
            Some(ended) = sessions.next() => {
                if ended.is_err() {
                    tracing::error!("a WebSocket session panicked: its connection was dropped");
                }
            }
        }
    }
}

/// How many steps (messages received or written) a session takes in one poll before it lets
/// the other sessions of its shard run.
pub const TURN: u32 = 64;

/// Counts a session's steps, and has it yield once it has taken [`TURN`] in a row.
#[derive(Debug, Default)]
pub struct Turn(u32);

impl Turn {
    /// Counts a step; every [`TURN`] steps, returns `Pending` once (waking the session at
    /// once), so that a client sending without pause cannot keep its shard to itself.
    pub fn poll_step(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.0 += 1;
        if self.0 < TURN {
            return Poll::Ready(());
        }
        self.0 = 0;
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// [`Turn::poll_step`] as a future.
    pub fn step(&mut self) -> impl Future<Output = ()> + '_ {
        let mut counted = false;
        std::future::poll_fn(move |cx| {
            if counted {
                return Poll::Ready(());
            }
            counted = true;
            self.poll_step(cx)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sessions_run_a_panic_stays_in_its_session_and_wake_all_polls_idle_ones() {
        let sessions = Sessions::start();
        assert_eq!(sessions.shards.len(), 2);
        sessions.spawn(Box::pin(async { panic!("a session that panics") }));
        // A session that waits for a flag without registering for it: only wake_all gets it
        // polled again.
        let flag = Arc::new(AtomicBool::new(false));
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        for _ in 0..2 {
            let flag = flag.clone();
            sessions.spawn(Box::pin(async move {
                std::future::poll_fn(|_| {
                    if flag.load(Relaxed) {
                        Poll::Ready(())
                    } else {
                        Poll::Pending
                    }
                })
                .await;
            }));
        }
        sessions.spawn(Box::pin(async move {
            let _ = done_tx.send(());
        }));
        tokio::time::timeout(std::time::Duration::from_secs(5), done_rx)
            .await
            .expect("sessions after a panicking one still run")
            .unwrap();
        flag.store(true, Relaxed);
        // Nothing wakes the waiters: they stay until every session is polled.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(Arc::strong_count(&flag), 3);
        sessions.wake_all();
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while Arc::strong_count(&flag) > 1 {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("wake_all polls sessions that registered no waker");
    }

    #[test]
    fn a_turn_yields_every_turn_steps() {
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut turn = Turn::default();
        let mut pending = 0;
        for _ in 0..TURN * 3 {
            if turn.poll_step(&mut cx).is_pending() {
                pending += 1;
            }
        }
        assert_eq!(pending, 3);
    }
}
