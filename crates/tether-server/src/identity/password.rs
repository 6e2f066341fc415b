//! Password checks with bounded memory and a bounded queue, whatever the rate of logins.
//!
//! An argon2id check costs ~20 ms of CPU and, with the default parameters, 19 MiB of memory by
//! design. Run on tokio's blocking pool, every check allocated and freed 19 MiB on whichever
//! thread it landed; glibc kept those buffers in per-thread arenas, so a burst of logins
//! stranded hundreds of MiB to GiB that stayed after the burst. Here a fixed set of threads
//! each owns one work area, allocated once and reused by every check; jobs wait in a bounded
//! queue, and a full queue is refused at once ([`Busy`]) instead of delaying every login.
//!
//! A login for an unknown user runs the same computation (default parameters, a fixed salt), so
//! its answer takes as long as a wrong password's: the timing does not tell which names exist.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use argon2::password_hash::PasswordHash;
use argon2::{Algorithm, Argon2, Block, Params, Version};
use tokio::sync::oneshot;

/// Work areas larger than this (a hash with a huge memory cost in the store) are refused
/// rather than allocated: 256 MiB.
const MAX_BLOCKS: usize = 256 << 10;

/// The salt of the stand-in check for unknown users (its result is never used).
const STAND_IN_SALT: &[u8] = b"tether-unknown-user";

/// Every check thread is busy and the queue is full: answer 503 and let the client retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many password checks waiting")]
pub struct Busy;

struct Job {
    /// The stored PHC hash; `None` for an unknown user (a stand-in check that fails).
    hash: Option<String>,
    password: String,
    reply: oneshot::Sender<bool>,
}

/// A fixed pool of password-check threads behind a bounded queue.
#[derive(Debug)]
pub struct PasswordChecker {
    jobs: SyncSender<Job>,
    checks: Arc<AtomicU64>,
}

impl PasswordChecker {
    /// Starts `threads` check threads (at least one) behind a queue of `queue` waiting checks.
    ///
    /// # Errors
    /// A thread could not be spawned.
    pub fn start(threads: usize, queue: usize) -> std::io::Result<PasswordChecker> {
        let (jobs, rx) = mpsc::sync_channel::<Job>(queue);
        let rx = Arc::new(Mutex::new(rx));
        let checks = Arc::new(AtomicU64::new(0));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            let checks = checks.clone();
            std::thread::Builder::new()
                .name(format!("tether-password-{i}"))
                .spawn(move || worker(&rx, &checks))?;
        }
        Ok(PasswordChecker { jobs, checks })
    }

    /// Whether `password` matches `hash` (`None`: an unknown user, always false after the same
    /// work as a real check).
    ///
    /// # Errors
    /// [`Busy`] when the queue is full; nothing was checked.
    pub async fn verify(&self, hash: Option<String>, password: String) -> Result<bool, Busy> {
        let (reply, answer) = oneshot::channel();
        match self.jobs.try_send(Job {
            hash,
            password,
            reply,
        }) {
            Ok(()) => Ok(answer.await.unwrap_or(false)),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => Err(Busy),
        }
    }

    /// Checks done so far, stand-ins for unknown users included.
    pub fn checks(&self) -> u64 {
        self.checks.load(Relaxed)
    }
}

fn worker(rx: &Mutex<mpsc::Receiver<Job>>, checks: &AtomicU64) {
    // This thread's work area: grown once to the largest check it has run, then reused.
    let mut blocks: Vec<Block> = Vec::new();
    loop {
        let job = {
            let rx = rx.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            match rx.recv() {
                Ok(job) => job,
                Err(_) => return, // the checker is gone
            }
        };
        let ok = match &job.hash {
            Some(hash) => verify_with(&mut blocks, hash, job.password.as_bytes()),
            None => {
                stand_in(&mut blocks, job.password.as_bytes());
                false
            }
        };
        checks.fetch_add(1, Relaxed);
        let _ = job.reply.send(ok);
    }
}

/// `blocks`, grown to at least `n` (never shrunk), or `None` past [`MAX_BLOCKS`].
fn area(blocks: &mut Vec<Block>, n: usize) -> Option<&mut [Block]> {
    if n > MAX_BLOCKS {
        return None;
    }
    if blocks.len() < n {
        blocks.resize(n, Block::default());
    }
    Some(&mut blocks[..n])
}

/// Checks `password` against a PHC argon2 hash, in `blocks`.
fn verify_with(blocks: &mut Vec<Block>, hash: &str, password: &[u8]) -> bool {
    let Ok(parsed) = PasswordHash::new(hash) else {
        return false;
    };
    let (Some(expected), Some(salt)) = (parsed.hash, parsed.salt) else {
        return false;
    };
    let Ok(algorithm) = Algorithm::try_from(parsed.algorithm) else {
        return false;
    };
    let version = match parsed.version.map(Version::try_from).transpose() {
        Ok(v) => v.unwrap_or_default(),
        Err(_) => return false,
    };
    let Ok(params) = Params::try_from(&parsed) else {
        return false;
    };
    let mut salt_buf = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else {
        return false;
    };
    let Some(area) = area(blocks, params.block_count()) else {
        return false;
    };
    let mut out = [0u8; 64];
    let Some(out) = out.get_mut(..expected.len()) else {
        return false;
    };
    Argon2::new(algorithm, version, params)
        .hash_password_into_with_memory(password, salt, out, area)
        .is_ok()
        && constant_time_eq(out, expected.as_bytes())
}

/// The work of a check with the default parameters, for a user that does not exist.
fn stand_in(blocks: &mut Vec<Block>, password: &[u8]) {
    let params = Params::default();
    let mut out = [0u8; Params::DEFAULT_OUTPUT_LEN];
    if let Some(area) = area(blocks, params.block_count()) {
        let _ = Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
            .hash_password_into_with_memory(password, STAND_IN_SALT, &mut out, area);
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::auth::hash_password;

    #[tokio::test]
    async fn checks_match_the_stored_hash_and_unknown_users_fail_after_the_same_work() {
        let checker = PasswordChecker::start(1, 4).unwrap();
        let hash = hash_password("correct horse").unwrap();
        assert_eq!(
            checker
                .verify(Some(hash.clone()), "correct horse".into())
                .await,
            Ok(true)
        );
        assert_eq!(
            checker.verify(Some(hash), "correct horsE".into()).await,
            Ok(false)
        );
        assert_eq!(
            checker.verify(Some("garbage".into()), "x".into()).await,
            Ok(false)
        );
        assert_eq!(
            checker.verify(None, "correct horse".into()).await,
            Ok(false)
        );
        assert_eq!(checker.checks(), 4, "the unknown user's check ran too");
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once() {
        let checker = PasswordChecker::start(1, 1).unwrap();
        let hash = hash_password("pw").unwrap();
        let attempts = (0..8).map(|_| checker.verify(Some(hash.clone()), "pw".into()));
        let results = futures_util::future::join_all(attempts).await;
        assert!(results.contains(&Err(Busy)), "{results:?}");
        assert!(results.contains(&Ok(true)), "{results:?}");
    }

    #[test]
    fn a_hash_asking_for_too_much_memory_is_refused_without_allocating() {
        let mut blocks = Vec::new();
        let huge = "$argon2id$v=19$m=4194304,t=1,p=1$c29tZXNhbHRzb21lc2FsdA$\
                    AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
        assert!(!verify_with(&mut blocks, huge, b"pw"));
        assert!(blocks.is_empty());
    }
}
