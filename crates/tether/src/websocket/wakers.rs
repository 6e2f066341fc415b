//! Wakers for a connection that two tasks poll: a socket remembers one waker per direction,
//! so when both halves may wait to write, the socket is given one that wakes both.

use std::sync::{Arc, Mutex};
use std::task::{Wake, Waker};

/// Which half of a connection is polling: both can write, after [`WebSocket::split`].
#[derive(Clone, Copy)]
pub(super) enum Waiter {
    Reader = 0,
    Sender = 1,
}

/// Wakes every task that waits for the socket to become writable.
///
/// The reader (flushing pongs and close echoes) and the sender can both wait for write
/// readiness, but a socket remembers one waker per direction; the socket is given this
/// combined waker, which wakes both.
#[derive(Default)]
pub(super) struct WriteWakers {
    pub(super) slots: Mutex<[Option<Waker>; 2]>,
}

impl WriteWakers {
    pub(super) fn register(&self, who: Waiter, waker: &Waker) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let slot = &mut slots[who as usize];
        if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *slot = Some(waker.clone());
        }
    }
}

impl Wake for WriteWakers {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let taken = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            [slots[0].take(), slots[1].take()]
        };
        for waker in taken.into_iter().flatten() {
            waker.wake();
        }
    }
}

/// The wakers of a connection that two tasks poll: the halves of [`WebSocket::split`], or a
/// socket polled from a second task (through `futures`' `StreamExt::split`, say).
pub(super) struct Shared {
    pub(super) wakers: Arc<WriteWakers>,
    /// Given to the socket for every write: wakes both tasks.
    pub(super) write_waker: Waker,
    /// The task last waiting in `poll_next_message`, woken when a Close is queued from the
    /// sending side so that it arms the close timer.
    pub(super) read_waker: Option<Waker>,
}

impl Shared {
    pub(super) fn new() -> Self {
        let wakers = Arc::new(WriteWakers::default());
        Shared {
            write_waker: Waker::from(wakers.clone()),
            wakers,
            read_waker: None,
        }
    }
}
