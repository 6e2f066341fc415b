//! Accounts: users with their password hashes, and the sessions and tokens that prove them.
//!
//! [`SqliteAccounts`] keeps them in the node's SQLite file; [`RedisAccounts`] in Redis, where
//! every node (and `tether user --redis`) sees the same ones at once. Both tell open
//! connections when a credential goes: every call that deletes one announces a revocation
//! ([`Revocations`]), locally and, with Redis, to every node, whose connections check their
//! own credential again and close if it was the one.
//!
//! Secrets are never stored, only their SHA-256 digests ([`crate::identity::auth::digest`]); a
//! credential is named to people by the first 12 hex digits of its digest.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::link::Link;
use super::{Accounts, EngineFuture, Revocations};
use crate::engine::store::{
    credential_id, unix_now, CredentialInfo, CredentialKind, Db, StoreError, UserInfo,
};

/// Accounts in the node's SQLite file. Revocations reach this process's connections at once;
/// another process (`tether user`) writing the same file is noticed by the connections' own
/// periodic checks.
#[derive(Debug, Clone)]
pub struct SqliteAccounts {
    db: Db,
    revocations: Revocations,
}

impl SqliteAccounts {
    /// Accounts in the store behind `db`, announcing revocations on `revocations`.
    pub fn new(db: Db, revocations: Revocations) -> SqliteAccounts {
        SqliteAccounts { db, revocations }
    }

    /// Runs `f` on the store and announces a revocation when `revoked` says it made one.
    async fn revoking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&crate::engine::store::Store) -> Result<T, StoreError> + Send + 'static,
        revoked: impl FnOnce(&T) -> bool,
    ) -> Result<T, StoreError> {
        let out = self.db.call(f).await?;
        if revoked(&out) {
            self.revocations.announce();
        }
        Ok(out)
    }
}

impl Accounts for SqliteAccounts {
    fn add_user<'a>(&'a self, name: &'a str, hash: &'a str) -> EngineFuture<'a, ()> {
        let (name, hash) = (name.to_owned(), hash.to_owned());
        Box::pin(self.db.call(move |s| s.add_user(&name, &hash)))
    }

    fn user_named_like<'a>(&'a self, name: &'a str) -> EngineFuture<'a, Option<String>> {
        let name = name.to_owned();
        Box::pin(self.db.call(move |s| s.user_named_like(&name)))
    }

    fn password_hash<'a>(&'a self, name: &'a str) -> EngineFuture<'a, Option<String>> {
        let name = name.to_owned();
        Box::pin(self.db.call(move |s| s.password_hash(&name)))
    }

    fn users(&self) -> EngineFuture<'_, Vec<UserInfo>> {
        Box::pin(self.db.call(|s| s.users()))
    }

    fn remove_user<'a>(&'a self, name: &'a str) -> EngineFuture<'a, bool> {
        let name = name.to_owned();
        Box::pin(self.revoking(move |s| s.remove_user(&name), |removed| *removed))
    }

    fn set_password_hash<'a>(&'a self, name: &'a str, hash: &'a str) -> EngineFuture<'a, bool> {
        let (name, hash) = (name.to_owned(), hash.to_owned());
        Box::pin(self.revoking(move |s| s.set_password_hash(&name, &hash), |set| *set))
    }

    fn add_credential<'a>(
        &'a self,
        digest: [u8; 32],
        user: &'a str,
        kind: CredentialKind,
        ttl: Option<Duration>,
    ) -> EngineFuture<'a, ()> {
        let user = user.to_owned();
        Box::pin(
            self.db
                .call(move |s| s.add_credential(&digest, &user, kind, ttl)),
        )
    }

    fn credential_user(
        &self,
        digest: [u8; 32],
        kind: CredentialKind,
    ) -> EngineFuture<'_, Option<String>> {
        Box::pin(self.db.call(move |s| s.credential_user(&digest, kind)))
    }

    fn credentials<'a>(&'a self, user: &'a str) -> EngineFuture<'a, Vec<CredentialInfo>> {
        let user = user.to_owned();
        Box::pin(self.db.call(move |s| s.credentials(&user)))
    }

    fn delete_credential(&self, digest: [u8; 32]) -> EngineFuture<'_, usize> {
        Box::pin(self.revoking(move |s| s.delete_credential(&digest), |n| *n > 0))
    }

    fn revoke_credential<'a>(&'a self, user: &'a str, id: &'a str) -> EngineFuture<'a, usize> {
        let (user, id) = (user.to_owned(), id.to_owned());
        Box::pin(self.revoking(move |s| s.revoke_credential(&user, &id), |n| *n > 0))
    }

    fn revoke_credentials<'a>(&'a self, user: &'a str) -> EngineFuture<'a, usize> {
        let user = user.to_owned();
        Box::pin(self.revoking(move |s| s.revoke_credentials(&user), |n| *n > 0))
    }

    fn bound_token_lifetimes(&self, ttl: Duration) -> EngineFuture<'_, usize> {
        Box::pin(self.db.call(move |s| s.bound_token_lifetimes(ttl)))
    }
}

/// The Redis channel on which revocations are announced to every node: the payload names
/// who revoked (a node, or `tether user`), so that a node skips its own.
pub const REVOKED_CHANNEL: &str = "tether:revoked";

/// The users: a hash from the lowercased name to `name\tcreated\thash`. Every account key
/// has the hash tag `{tether:accounts}`, so that in Redis Cluster they share one slot and a
/// script may touch several.
pub(crate) const USERS: &str = "tether:{tether:accounts}:users";
/// The credentials: a hash from the digest (hex) to `user\tkind\tcreated\texpires`, `user`
/// as registered and `expires` empty for none.
pub(crate) const CREDENTIALS: &str = "tether:{tether:accounts}:credentials";
/// The digests of one user's credentials (a set), under the lowercased name.
const OF_PREFIX: &str = "tether:{tether:accounts}:of:";

pub(crate) fn of_key(user: &str) -> String {
    format!("{OF_PREFIX}{}", user.to_ascii_lowercase())
}

/// Lua: `revoke_all(creds, of)` deletes every credential listed in set `of` from hash
/// `creds`, and the set; returns how many of them had not expired (by Redis's clock).
macro_rules! revoke_all_fn {
    () => {
        r#"
local function revoke_all(creds, of)
  local now = tonumber(redis.call('TIME')[1])
  local n = 0
  for _, d in ipairs(redis.call('SMEMBERS', of)) do
    local rec = redis.call('HGET', creds, d)
    if rec then
      redis.call('HDEL', creds, d)
      local expires = string.match(rec, '\t(%d*)$')
      if expires == '' or tonumber(expires) > now then n = n + 1 end
    end
  end
  redis.call('DEL', of)
  return n
end
"#
    };
}

/// Removes user ARGV[2] (exactly as registered; lowercased ARGV[1]) from KEYS[1] with their
/// credentials (KEYS[2], KEYS[3]); announces on ARGV[3] (payload ARGV[4]) when one went.
/// Returns 1 when there was such a user.
const REMOVE_USER: &str = concat!(
    revoke_all_fn!(),
    r#"
local rec = redis.call('HGET', KEYS[1], ARGV[1])
if not rec or string.match(rec, '^([^\t]*)') ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
if revoke_all(KEYS[2], KEYS[3]) > 0 then redis.call('PUBLISH', ARGV[3], ARGV[4]) end
return 1
"#
);

/// Sets the password hash of user ARGV[2] (lowercased ARGV[1]) to ARGV[5] and revokes their
/// credentials, as [`REMOVE_USER`]. Returns 1 when there was such a user.
const SET_PASSWORD: &str = concat!(
    revoke_all_fn!(),
    r#"
local rec = redis.call('HGET', KEYS[1], ARGV[1])
if not rec then return 0 end
local name, created = string.match(rec, '^([^\t]*)\t([^\t]*)\t')
if name ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], name .. '\t' .. created .. '\t' .. ARGV[5])
if revoke_all(KEYS[2], KEYS[3]) > 0 then redis.call('PUBLISH', ARGV[3], ARGV[4]) end
return 1
"#
);

/// Revokes every credential of one user (KEYS[1] the credentials, KEYS[2] their set),
/// announcing as [`REMOVE_USER`]; returns how many.
const REVOKE_ALL: &str = concat!(
    revoke_all_fn!(),
    r#"
local n = revoke_all(KEYS[1], KEYS[2])
if n > 0 then redis.call('PUBLISH', ARGV[1], ARGV[2]) end
return n
"#
);

/// Deletes credential ARGV[1] from KEYS[1] and from its user's set (KEYS[2], whose user
/// ARGV[2] it must be), announcing on ARGV[3] (payload ARGV[4]); returns how many went.
const DELETE_CREDENTIAL: &str = r#"
local rec = redis.call('HGET', KEYS[1], ARGV[1])
if not rec or string.lower(string.match(rec, '^([^\t]*)')) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"#;

/// Stores credential ARGV[1] (record ARGV[2]) in KEYS[1] and its user's set KEYS[2], first
/// dropping from both the user's credentials that expired before ARGV[3] (so that expired
/// ones do not pile up); only while user ARGV[5] (lowercased ARGV[4]) is registered in KEYS[3]
/// under that very name (a login that raced a removal issues nothing): 0 when not.
const ADD_CREDENTIAL: &str = r#"
local user = redis.call('HGET', KEYS[3], ARGV[4])
if not user or string.match(user, '^([^\t]*)') ~= ARGV[5] then return 0 end
for _, d in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local rec = redis.call('HGET', KEYS[1], d)
  local expires = rec and string.match(rec, '\t(%d*)$')
  if not rec or (expires ~= '' and tonumber(expires) <= tonumber(ARGV[3])) then
    redis.call('HDEL', KEYS[1], d)
    redis.call('SREM', KEYS[2], d)
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"#;

/// Gives every token of KEYS[1] without an expiry the expiry ARGV[1]; returns how many.
const BOUND_TOKENS: &str = r#"
local n = 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local user, kind, created, expires = string.match(all[i + 1], '^([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)$')
  if kind == 'token' and expires == '' then
    redis.call('HSET', KEYS[1], all[i], user .. '\ttoken\t' .. created .. '\t' .. ARGV[1])
    n = n + 1
  end
end
return n
"#;

/// A user as stored in [`USERS`].
struct UserRecord<'a> {
    name: &'a str,
    created: &'a str,
    hash: &'a str,
}

impl<'a> UserRecord<'a> {
    fn parse(rec: &'a str) -> Option<UserRecord<'a>> {
        let mut parts = rec.splitn(3, '\t');
        Some(UserRecord {
            name: parts.next()?,
            created: parts.next()?,
            hash: parts.next()?,
        })
    }
}

/// A credential as stored in [`CREDENTIALS`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CredentialRecord {
    pub(crate) user: String,
    pub(crate) kind: CredentialKind,
    pub(crate) created: Option<i64>,
    pub(crate) expires: Option<i64>,
}

impl CredentialRecord {
    fn parse(rec: &str) -> Option<CredentialRecord> {
        let mut parts = rec.split('\t');
        let user = parts.next()?.to_owned();
        let kind = CredentialKind::from_stored(parts.next()?)?;
        let created = parts.next()?.parse().ok();
        let expires = parts.next()?.parse().ok();
        Some(CredentialRecord {
            user,
            kind,
            created,
            expires,
        })
    }

    pub(crate) fn format(&self) -> String {
        let number = |n: Option<i64>| n.map(|n| n.to_string()).unwrap_or_default();
        format!(
            "{}\t{}\t{}\t{}",
            self.user,
            self.kind.as_str(),
            number(self.created),
            number(self.expires)
        )
    }

    fn live(&self, now: i64) -> bool {
        self.expires.is_none_or(|e| e > now)
    }
}

pub(crate) fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    (text.len() % 2 == 0)
        .then(|| {
            (0..text.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
                .collect()
        })
        .flatten()
}

/// A failed command. A write that timed out may still have been applied: a credential whose
/// secret nobody was given proves nothing, a user added is told to exist when added again,
/// and a revocation that may have run is announced here all the same.
fn redis_error(e: redis::RedisError) -> StoreError {
    StoreError::Failed(format!("redis: {e}"))
}

/// Accounts in Redis, shared by every node.
#[derive(Clone)]
pub struct RedisAccounts {
    commands: Link,
    /// Who announces revocations: a node's name, or `tether user`.
    origin: String,
    revocations: Revocations,
    remove_user: Arc<redis::Script>,
    set_password: Arc<redis::Script>,
    revoke_all: Arc<redis::Script>,
    delete: Arc<redis::Script>,
    add_credential: Arc<redis::Script>,
    bound_tokens: Arc<redis::Script>,
    found: Arc<Mutex<Found>>,
}

/// Credentials found valid lately, forgotten at the next revocation signalled on this node
/// (from any node: they are announced through Redis) or after [`FOUND_FOR`]: a request or a
/// socket's periodic check with a known credential costs Redis nothing, and one with a
/// credential seen in the last minute still passes while Redis is slow to answer.
#[derive(Debug, Default)]
struct Found {
    /// The revocation generation the entries were found in.
    generation: u64,
    entries: HashMap<[u8; 32], FoundEntry>,
}

#[derive(Debug)]
struct FoundEntry {
    record: CredentialRecord,
    at: Instant,
}

/// How long a credential found valid is believed without asking Redis again.
const FOUND_FOR: Duration = Duration::from_secs(60);
/// Credentials believed at most; past it, the oldest beliefs are all dropped.
const FOUND_MAX: usize = 10_000;

impl std::fmt::Debug for RedisAccounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisAccounts")
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

/// How long a Redis command may take before it counts as failed.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

impl RedisAccounts {
    /// Accounts in the Redis at `url` (connected lazily, and again after a loss; the forms
    /// of the setting are [`Link`]'s), each change acknowledged once `replicas` replicas hold
    /// it ([`Link::confirmed_by`]). `origin` names who announces revocations: this node's
    /// own are signalled on `revocations` at once and skipped when they come back from Redis.
    ///
    /// # Errors
    /// The URL is not a valid Redis setting.
    pub fn connect(
        url: &str,
        replicas: usize,
        origin: String,
        revocations: Revocations,
    ) -> Result<RedisAccounts, StoreError> {
        let commands = Link::open(url, COMMAND_TIMEOUT)
            .map_err(redis_error)?
            .confirmed_by(replicas);
        Ok(RedisAccounts::new(commands, origin, revocations))
    }

    /// Accounts over `commands`, announcing as `origin` (see [`RedisAccounts::connect`]).
    pub fn new(commands: Link, origin: String, revocations: Revocations) -> RedisAccounts {
        let script = |s: &str| Arc::new(redis::Script::new(s));
        RedisAccounts {
            commands,
            origin,
            revocations,
            remove_user: script(REMOVE_USER),
            set_password: script(SET_PASSWORD),
            revoke_all: script(REVOKE_ALL),
            delete: script(DELETE_CREDENTIAL),
            add_credential: script(ADD_CREDENTIAL),
            bound_tokens: script(BOUND_TOKENS),
            found: Arc::default(),
        }
    }

    /// The user of credential `digest` of `kind` if it was found valid since the last
    /// revocation, within [`FOUND_FOR`], and has not expired.
    fn believed(&self, digest: &[u8; 32], kind: CredentialKind) -> Option<String> {
        let generation = self.revocations.generation();
        let mut found = self.found.lock().unwrap_or_else(PoisonError::into_inner);
        if found.generation != generation {
            found.generation = generation;
            found.entries.clear();
            return None;
        }
        let entry = found.entries.get(digest)?;
        (entry.record.kind == kind
            && entry.at.elapsed() < FOUND_FOR
            && entry.record.live(unix_now()))
        .then(|| entry.record.user.clone())
    }

    /// Believes `record` valid from now, unless a revocation was signalled since
    /// `generation`, when it was read.
    fn believe(&self, digest: [u8; 32], record: CredentialRecord, generation: u64) {
        let mut found = self.found.lock().unwrap_or_else(PoisonError::into_inner);
        if found.generation != generation || self.revocations.generation() != generation {
            return;
        }
        if found.entries.len() >= FOUND_MAX {
            found.entries.clear();
        }
        let at = Instant::now();
        found.entries.insert(digest, FoundEntry { record, at });
    }

    fn conn(&self) -> Link {
        self.commands.clone()
    }

    /// Signals this node's connections when credentials went (`went` of the script's answer),
    /// or may have: a script that failed, or timed out, may have run, and its own
    /// announcement is skipped by this node when it comes back.
    fn revoked<T>(
        &self,
        answer: redis::RedisResult<T>,
        went: impl Fn(&T) -> bool,
    ) -> Result<T, StoreError> {
        if answer.as_ref().map_or(true, &went) {
            self.revocations.announce();
        }
        answer.map_err(redis_error)
    }

    async fn user_record(&self, name: &str) -> Result<Option<String>, StoreError> {
        redis::cmd("HGET")
            .arg(USERS)
            .arg(name.to_ascii_lowercase())
            .query_async(&mut self.conn())
            .await
            .map_err(redis_error)
    }

    async fn all_credentials(&self) -> Result<HashMap<String, String>, StoreError> {
        redis::cmd("HGETALL")
            .arg(CREDENTIALS)
            .query_async(&mut self.conn())
            .await
            .map_err(redis_error)
    }

    /// The live credentials of `user` (any case): digest (hex) and record.
    async fn credentials_of(
        &self,
        user: &str,
    ) -> Result<Vec<(String, CredentialRecord)>, StoreError> {
        let digests: Vec<String> = redis::cmd("SMEMBERS")
            .arg(of_key(user))
            .query_async(&mut self.conn())
            .await
            .map_err(redis_error)?;
        if digests.is_empty() {
            return Ok(Vec::new());
        }
        let records: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(CREDENTIALS)
            .arg(&digests)
            .query_async(&mut self.conn())
            .await
            .map_err(redis_error)?;
        let now = unix_now();
        Ok(digests
            .into_iter()
            .zip(records)
            .filter_map(|(d, r)| Some((d, CredentialRecord::parse(&r?)?)))
            .filter(|(_, r)| r.live(now))
            .collect())
    }

    /// Runs [`REMOVE_USER`] or [`SET_PASSWORD`] (with the new hash) on the user named exactly
    /// `name`; whether there was one.
    async fn change_user(
        &self,
        script: &redis::Script,
        name: &str,
        hash: Option<&str>,
    ) -> Result<bool, StoreError> {
        let mut invocation = script.key(USERS);
        invocation
            .key(CREDENTIALS)
            .key(of_key(name))
            .arg(name.to_ascii_lowercase())
            .arg(name)
            .arg(REVOKED_CHANNEL)
            .arg(&self.origin);
        if let Some(hash) = hash {
            invocation.arg(hash);
        }
        let changed = invocation.invoke_async(&mut self.conn()).await;
        self.revoked(changed, |c: &bool| *c)
    }

    async fn delete_hex(&self, digest: &str, user: &str) -> Result<usize, StoreError> {
        let n = self
            .delete
            .key(CREDENTIALS)
            .key(of_key(user))
            .arg(digest)
            .arg(user.to_ascii_lowercase())
            .arg(REVOKED_CHANNEL)
            .arg(&self.origin)
            .invoke_async(&mut self.conn())
            .await;
        self.revoked(n, |n: &usize| *n > 0)
    }
}

impl Accounts for RedisAccounts {
    fn add_user<'a>(&'a self, name: &'a str, hash: &'a str) -> EngineFuture<'a, ()> {
        Box::pin(async move {
            let record = format!("{name}\t{}\t{hash}", crate::engine::store::now_rfc3339());
            let added: bool = redis::cmd("HSETNX")
                .arg(USERS)
                .arg(name.to_ascii_lowercase())
                .arg(record)
                .query_async(&mut self.conn())
                .await
                .map_err(redis_error)?;
            if added {
                Ok(())
            } else {
                Err(StoreError::UserExists(name.to_owned()))
            }
        })
    }

    fn user_named_like<'a>(&'a self, name: &'a str) -> EngineFuture<'a, Option<String>> {
        Box::pin(async move {
            let record = self.user_record(name).await?;
            Ok(record
                .as_deref()
                .and_then(UserRecord::parse)
                .map(|u| u.name.to_owned()))
        })
    }

    fn password_hash<'a>(&'a self, name: &'a str) -> EngineFuture<'a, Option<String>> {
        Box::pin(async move {
            let record = self.user_record(name).await?;
            Ok(record
                .as_deref()
                .and_then(UserRecord::parse)
                .filter(|u| u.name == name)
                .map(|u| u.hash.to_owned()))
        })
    }

    fn users(&self) -> EngineFuture<'_, Vec<UserInfo>> {
        Box::pin(async move {
            let users: HashMap<String, String> = redis::cmd("HGETALL")
                .arg(USERS)
                .query_async(&mut self.conn())
                .await
                .map_err(redis_error)?;
            let now = unix_now();
            // Live sessions and tokens per lowercased user.
            let mut held: HashMap<String, (u64, u64)> = HashMap::new();
            for record in self.all_credentials().await?.values() {
                let Some(c) = CredentialRecord::parse(record).filter(|c| c.live(now)) else {
                    continue;
                };
                let counts = held.entry(c.user.to_ascii_lowercase()).or_default();
                match c.kind {
                    CredentialKind::Session => counts.0 += 1,
                    CredentialKind::Token => counts.1 += 1,
                }
            }
            let mut list: Vec<UserInfo> = users
                .iter()
                .filter_map(|(lower, record)| {
                    let u = UserRecord::parse(record)?;
                    let (sessions, tokens) = held.get(lower).copied().unwrap_or_default();
                    Some(UserInfo {
                        name: u.name.to_owned(),
                        created: u.created.to_owned(),
                        sessions,
                        tokens,
                    })
                })
                .collect();
            list.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(list)
        })
    }

    fn remove_user<'a>(&'a self, name: &'a str) -> EngineFuture<'a, bool> {
        Box::pin(self.change_user(&self.remove_user, name, None))
    }

    fn set_password_hash<'a>(&'a self, name: &'a str, hash: &'a str) -> EngineFuture<'a, bool> {
        Box::pin(self.change_user(&self.set_password, name, Some(hash)))
    }

    fn add_credential<'a>(
        &'a self,
        digest: [u8; 32],
        user: &'a str,
        kind: CredentialKind,
        ttl: Option<Duration>,
    ) -> EngineFuture<'a, ()> {
        Box::pin(async move {
            let now = unix_now();
            let record = CredentialRecord {
                user: user.to_owned(),
                kind,
                created: Some(now),
                expires: ttl.map(|t| now.saturating_add(t.as_secs() as i64)),
            };
            let stored: i64 = self
                .add_credential
                .key(CREDENTIALS)
                .key(of_key(user))
                .key(USERS)
                .arg(hex(&digest))
                .arg(record.format())
                .arg(now)
                .arg(user.to_ascii_lowercase())
                .arg(user)
                .invoke_async(&mut self.conn())
                .await
                .map_err(redis_error)?;
            if stored == 1 {
                Ok(())
            } else {
                Err(StoreError::Failed(format!("no user named {user:?}")))
            }
        })
    }

    fn credential_user(
        &self,
        digest: [u8; 32],
        kind: CredentialKind,
    ) -> EngineFuture<'_, Option<String>> {
        Box::pin(async move {
            if let Some(user) = self.believed(&digest, kind) {
                return Ok(Some(user));
            }
            let generation = self.revocations.generation();
            let record: Option<String> = redis::cmd("HGET")
                .arg(CREDENTIALS)
                .arg(hex(&digest))
                .query_async(&mut self.conn())
                .await
                .map_err(redis_error)?;
            let now = unix_now();
            let Some(record) = record
                .as_deref()
                .and_then(CredentialRecord::parse)
                .filter(|c| c.kind == kind && c.live(now))
            else {
                return Ok(None);
            };
            let user = record.user.clone();
            self.believe(digest, record, generation);
            Ok(Some(user))
        })
    }

    fn credentials<'a>(&'a self, user: &'a str) -> EngineFuture<'a, Vec<CredentialInfo>> {
        Box::pin(async move {
            let mut list: Vec<(String, CredentialInfo)> = self
                .credentials_of(user)
                .await?
                .into_iter()
                .filter(|(_, r)| r.user == user)
                .filter_map(|(d, r)| {
                    let id = credential_id(&unhex(&d)?);
                    Some((
                        d,
                        CredentialInfo {
                            id,
                            kind: r.kind,
                            created: r.created,
                            expires: r.expires,
                        },
                    ))
                })
                .collect();
            // Newest first, as SQLite lists them.
            list.sort_by(|(da, a), (db, b)| b.created.cmp(&a.created).then_with(|| da.cmp(db)));
            Ok(list.into_iter().map(|(_, c)| c).collect())
        })
    }

    fn delete_credential(&self, digest: [u8; 32]) -> EngineFuture<'_, usize> {
        Box::pin(async move {
            let hex = hex(&digest);
            let record: Option<String> = redis::cmd("HGET")
                .arg(CREDENTIALS)
                .arg(&hex)
                .query_async(&mut self.conn())
                .await
                .map_err(redis_error)?;
            match record.as_deref().and_then(CredentialRecord::parse) {
                Some(c) => self.delete_hex(&hex, &c.user).await,
                None => Ok(0),
            }
        })
    }

    fn revoke_credential<'a>(&'a self, user: &'a str, id: &'a str) -> EngineFuture<'a, usize> {
        Box::pin(async move {
            let mut revoked = 0;
            for (digest, record) in self.credentials_of(user).await? {
                // Of the user named exactly so, as SQLite and `credentials` have it.
                if record.user == user && digest.starts_with(id) && id.len() == 12 {
                    revoked += self.delete_hex(&digest, user).await?;
                }
            }
            Ok(revoked)
        })
    }

    fn revoke_credentials<'a>(&'a self, user: &'a str) -> EngineFuture<'a, usize> {
        Box::pin(async move {
            let n = self
                .revoke_all
                .key(CREDENTIALS)
                .key(of_key(user))
                .arg(REVOKED_CHANNEL)
                .arg(&self.origin)
                .invoke_async(&mut self.conn())
                .await;
            self.revoked(n, |n: &usize| *n > 0)
        })
    }

    fn bound_token_lifetimes(&self, ttl: Duration) -> EngineFuture<'_, usize> {
        Box::pin(async move {
            self.bound_tokens
                .key(CREDENTIALS)
                .arg(unix_now().saturating_add(ttl.as_secs() as i64))
                .invoke_async(&mut self.conn())
                .await
                .map_err(redis_error)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_records_read_back_what_was_written() {
        let c = CredentialRecord {
            user: "Ann".into(),
            kind: CredentialKind::Token,
            created: Some(1_700_000_000),
            expires: None,
        };
        assert_eq!(c.format(), "Ann\ttoken\t1700000000\t");
        assert_eq!(CredentialRecord::parse(&c.format()), Some(c.clone()));
        assert!(c.live(i64::MAX));
        let s = CredentialRecord {
            kind: CredentialKind::Session,
            expires: Some(10),
            ..c
        };
        assert_eq!(CredentialRecord::parse(&s.format()), Some(s.clone()));
        assert!(s.live(9) && !s.live(10));
        assert_eq!(CredentialRecord::parse("Ann\tcookie\t1\t"), None);
    }

    #[test]
    fn digests_go_to_hex_and_back() {
        let d = crate::identity::auth::digest("secret");
        assert_eq!(unhex(&hex(&d)).as_deref(), Some(&d[..]));
        assert_eq!(credential_id(&d), hex(&d)[..12]);
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
    }

    #[test]
    fn user_records_keep_a_hash_whole() {
        let u = UserRecord::parse("Ann\t2026-01-01T00:00:00Z\t$argon2id$v=19$m=19456").unwrap();
        assert_eq!((u.name, u.hash), ("Ann", "$argon2id$v=19$m=19456"));
    }
}
