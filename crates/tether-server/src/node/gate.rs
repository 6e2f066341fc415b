//! Counted admission: at most so many connections in all and per address, each held by a
//! [`Pass`] that gives its place back on drop.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use crate::throttle::address_key;

/// Why a connection was not let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// The total is reached.
    Total,
    /// The address (IPv6: its /64) has its share.
    Address,
}

#[derive(Debug, Default)]
struct State {
    open: usize,
    by_address: HashMap<IpAddr, usize>,
}

/// Admits at most `total` holders at once, and `per_address` from one address.
#[derive(Debug)]
pub struct Gate {
    total: usize,
    per_address: usize,
    state: Mutex<State>,
}

/// A place taken at a [`Gate`]; dropping it frees the place.
#[derive(Debug)]
pub struct Pass {
    gate: Arc<Gate>,
    address: Option<IpAddr>,
}

impl Gate {
    /// A gate for `total` holders, `per_address` from one address.
    pub fn new(total: usize, per_address: usize) -> Arc<Gate> {
        Arc::new(Gate {
            total,
            per_address,
            state: Mutex::new(State::default()),
        })
    }

    /// Takes a place for a holder from `ip` (`None`: counted only in the total).
    ///
    /// # Errors
    /// Which limit is reached.
    pub fn enter(self: &Arc<Self>, ip: Option<IpAddr>) -> Result<Pass, Full> {
        let mut state = self.lock();
        if state.open >= self.total {
            return Err(Full::Total);
        }
        let address = ip.map(address_key);
        if let Some(address) = address {
            let n = state.by_address.entry(address).or_insert(0);
            if *n >= self.per_address {
                return Err(Full::Address);
            }
            *n += 1;
        }
        state.open += 1;
        Ok(Pass {
            gate: self.clone(),
            address,
        })
    }

    /// Holders now.
    pub fn open(&self) -> usize {
        self.lock().open
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        let mut state = self.gate.lock();
        state.open -= 1;
        if let Some(address) = self.address {
            if let Some(n) = state.by_address.get_mut(&address) {
                *n -= 1;
                if *n == 0 {
                    state.by_address.remove(&address);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_hold_in_all_and_per_address_and_places_come_back() {
        let gate = Gate::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = gate.enter(Some(a)).unwrap();
        let _second = gate.enter(Some(a)).unwrap();
        assert_eq!(gate.enter(Some(a)).unwrap_err(), Full::Address);
        let _third = gate.enter(Some(b)).unwrap();
        assert_eq!(gate.enter(None).unwrap_err(), Full::Total);
        drop(first);
        assert_eq!(gate.open(), 2);
        let _again = gate.enter(Some(a)).unwrap();
        assert!(gate.lock().by_address.len() <= 2);
    }
}

/// The streams of one HTTP/2 connection in use: requests being answered and WebSockets, so
/// that a connection that carries none for a while can be closed.
#[derive(Debug, Default)]
pub struct Streams {
    open: AtomicUsize,
    opened: AtomicU64,
}

/// One stream in use; dropping it (the answer given, the WebSocket ended) ends the use.
#[derive(Debug)]
pub struct StreamUse {
    streams: Arc<Streams>,
}

impl Streams {
    /// Counts a stream in use until the returned guard is dropped.
    pub fn enter(self: &Arc<Self>) -> StreamUse {
        self.open.fetch_add(1, Relaxed);
        self.opened.fetch_add(1, Relaxed);
        StreamUse {
            streams: self.clone(),
        }
    }

    /// Streams in use now, and streams ever opened: a connection is idle over a span when the
    /// first is 0 at its end and the second did not move during it.
    pub fn usage(&self) -> (usize, u64) {
        (self.open.load(Relaxed), self.opened.load(Relaxed))
    }
}

impl Drop for StreamUse {
    fn drop(&mut self) {
        self.streams.open.fetch_sub(1, Relaxed);
    }
}
