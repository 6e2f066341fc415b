//! How WebSocket sessions learn of the server's shutdown, and how a session that polls its
//! socket by hand shares its thread.
//!
//! A session holds no future for shutdown (a `watch` wait took 176 bytes of every idle
//! session). Shutdown sets [`Node::is_shutting_down`](crate::node::Node::is_shutting_down) and
//! wakes every session, which reads the flag when polled: the hub wakes the room and poll
//! members through their outboxes ([`crate::node::hub::Hub::wake_all`]), and sessions the hub does
//! not know (echo) keep their waker in [`Wakers`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

/// Wakers of sessions to wake at shutdown.
#[derive(Debug, Default)]
pub struct Wakers {
    table: Mutex<HashMap<u64, Waker>>,
    next: AtomicU64,
}

impl Wakers {
    /// Keeps `waker` until [`Wakers::remove`]; returns its key. A task's waker stays the same
    /// for the task's life, so a session registers once.
    pub fn insert(&self, waker: &Waker) -> u64 {
        let key = self.next.fetch_add(1, Relaxed);
        self.lock().insert(key, waker.clone());
        key
    }

    /// Forgets the waker kept under `key`.
    pub fn remove(&self, key: u64) {
        self.lock().remove(&key);
    }

    /// Wakes every waker kept.
    pub fn wake_all(&self) {
        let wakers: Vec<Waker> = self.lock().values().cloned().collect();
        for waker in wakers {
            waker.wake();
        }
    }

    /// Wakers kept.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Waker>> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// How many steps (messages received or written) a session takes in one poll before it lets
/// other tasks run.
pub const TURN: u32 = 64;

/// Counts a session's steps, and has it yield once it has taken [`TURN`] in a row. A session
/// that polls its socket by hand is outside tokio's cooperative budget.
#[derive(Debug, Default)]
pub struct Turn(u32);

impl Turn {
    /// Counts a step; every [`TURN`] steps, returns `Pending` once (waking the session at
    /// once), so that a client sending without pause cannot keep its thread to itself.
    pub fn poll_step(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.0 += 1;
        if self.0 < TURN {
            return Poll::Ready(());
        }
        self.0 = 0;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn wake_all_wakes_what_is_kept_and_nothing_removed() {
        let woken = Arc::new(AtomicU64::new(0));
        struct Count(Arc<AtomicU64>);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Relaxed);
            }
        }
        let waker = Waker::from(Arc::new(Count(woken.clone())));
        let wakers = Wakers::default();
        let a = wakers.insert(&waker);
        let _b = wakers.insert(&waker);
        wakers.remove(a);
        assert_eq!(wakers.len(), 1);
        wakers.wake_all();
        assert_eq!(woken.load(Relaxed), 1);
    }

    #[test]
    fn a_turn_yields_every_turn_steps() {
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut turn = Turn::default();
        let pending = (0..TURN * 3)
            .filter(|_| turn.poll_step(&mut cx).is_pending())
            .count();
        assert_eq!(pending, 3);
    }
}
