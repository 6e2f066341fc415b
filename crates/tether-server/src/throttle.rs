//! Budgets per key (an address, an account at an address, an identity): token buckets that
//! each counted act (a failed login, a stored write) drains and time refills, in a table of
//! bounded size.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The key under which a peer address is counted: IPv4 as it is, IPv6 by its /64 (one host
/// usually holds a whole /64 and can rotate through it freely).
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(prefix.into())
            }
        },
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// `burst` failures per key, then one more every `refill`; at most `capacity` keys are
/// remembered (when full, keys whose budget has refilled are forgotten first, else the eighth
/// idle longest).
#[derive(Debug)]
pub struct Throttle<K> {
    burst: f64,
    refill: Duration,
    capacity: usize,
    buckets: Mutex<HashMap<K, Bucket>>,
}

impl<K: Eq + Hash + Clone> Throttle<K> {
    /// A throttle allowing `burst` failures per key, regaining one every `refill`.
    pub fn new(burst: u32, refill: Duration, capacity: usize) -> Throttle<K> {
        Throttle {
            burst: f64::from(burst.max(1)),
            refill: refill.max(Duration::from_millis(1)),
            capacity: capacity.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn refilled(&self, bucket: &Bucket, now: Instant) -> f64 {
        let regained = now.duration_since(bucket.last).as_secs_f64() / self.refill.as_secs_f64();
        (bucket.tokens + regained).min(self.burst)
    }

    /// Spends one failure of `key` before the attempt it stands for, so that attempts made at
    /// once cannot all pass a check that only their results would fail. `Err(wait)` when none
    /// is left: how long until one is; nothing is spent then.
    pub fn take(&self, key: &K, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.lock();
        let tokens = match buckets.get(key) {
            Some(bucket) => self.refilled(bucket, now),
            None => self.burst,
        };
        if tokens < 1.0 {
            return Err(self.refill.mul_f64(1.0 - tokens));
        }
        if !buckets.contains_key(key) && buckets.len() >= self.capacity {
            self.evict(&mut buckets, now);
        }
        buckets.insert(
            key.clone(),
            Bucket {
                tokens: tokens - 1.0,
                last: now,
            },
        );
        Ok(())
    }

    /// Gives back what [`Throttle::take`] spent, for an attempt that did not fail.
    pub fn refund(&self, key: &K, now: Instant) {
        let mut buckets = self.lock();
        if let Some(bucket) = buckets.get_mut(key) {
            bucket.tokens = (self.refilled(bucket, now) + 1.0).min(self.burst);
            bucket.last = now;
            if bucket.tokens >= self.burst {
                buckets.remove(key);
            }
        }
    }

    /// Forgets `key`'s failures (after a success).
    pub fn forgive(&self, key: &K) {
        self.lock().remove(key);
    }

    /// Keys remembered.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no key is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Makes room in a full table in one pass: keys whose budget has refilled go, and if
    /// that is not enough, the eighth idle longest. Each pass frees many places, so a stream
    /// of new keys (one address after another) costs a scan per many inserts, not per insert.
    fn evict(&self, buckets: &mut HashMap<K, Bucket>, now: Instant) {
        buckets.retain(|_, b| self.refilled(b, now) < self.burst);
        if buckets.len() < self.capacity {
            return;
        }
        let mut idle: Vec<Instant> = buckets.values().map(|b| b.last).collect();
        let cut = (idle.len() / 8).max(1);
        let (_, &mut threshold, _) = idle.select_nth_unstable(cut - 1);
        let mut dropped = 0;
        buckets.retain(|_, b| {
            let keep = b.last > threshold || dropped >= cut;
            dropped += usize::from(!keep);
            keep
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, Bucket>> {
        self.buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_one_per_refill() {
        let t = Throttle::new(3, Duration::from_secs(10), 100);
        let now = Instant::now();
        for _ in 0..3 {
            assert_eq!(t.take(&"a", now), Ok(()));
        }
        let wait = t.take(&"a", now).unwrap_err();
        assert_eq!(wait, Duration::from_secs(10));
        assert_eq!(t.take(&"b", now), Ok(()), "other keys are untouched");
        assert_eq!(t.take(&"a", now + Duration::from_secs(10)), Ok(()));
        assert!(t.take(&"a", now + Duration::from_secs(10)).is_err());
        t.refund(&"a", now + Duration::from_secs(10));
        assert_eq!(t.take(&"a", now + Duration::from_secs(10)), Ok(()));
        t.forgive(&"a");
        assert_eq!(t.take(&"a", now), Ok(()));
    }

    #[test]
    fn the_table_stays_within_its_capacity() {
        let t = Throttle::new(2, Duration::from_secs(60), 50);
        let now = Instant::now();
        for i in 0..10_000u32 {
            t.take(&i, now + Duration::from_millis(u64::from(i)))
                .unwrap();
        }
        assert!(t.len() <= 50, "{}", t.len());
        // The newest keys are the ones kept.
        let later = now + Duration::from_secs(10);
        assert!(t.take(&9_999, later).is_ok());
        assert!(t.take(&9_999, later).is_err());
    }

    #[test]
    fn ipv6_is_counted_by_its_64_prefix() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(address_key(a), address_key(b));
        assert_ne!(address_key(a), address_key(c));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(address_key(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());
    }
}
