//! Durable state in one SQLite file: users, credentials, room history, polls and votes.
//!
//! The schema is created (and upgraded) on open. Writes of chat messages and votes go through
//! the journal's single writer thread; everything else uses a short-lived lock on a second
//! connection. WAL mode lets readers proceed while the writer commits.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use rusqlite::{params, OptionalExtension};

/// A failure of the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// SQLite failed (I/O, corruption, a busy database past its timeout, …).
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The data directory could not be created.
    #[error("data directory {path}: {source}")]
    Dir {
        /// The directory.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A user with this name exists already.
    #[error("user {0:?} exists already")]
    UserExists(String),
    /// The batch this write was part of failed; nothing of it was stored.
    #[error("not stored: {0}")]
    Failed(String),
    /// The write may or may not have happened: storage did not answer in time (a stalled
    /// Redis), or the connection dropped after the request went out. Retrying with the same
    /// idempotency key cannot store it twice.
    #[error("outcome unknown ({0}): it may have been stored; send it again with the same key to be sure")]
    Unknown(String),
    /// A configured limit on what is stored is reached (nothing was stored).
    #[error("{0}")]
    Limit(String),
    /// The journal's writer thread has stopped (the server is shutting down).
    #[error("the store is shut down")]
    Closed,
}

pub use crate::wire::{ChatMessage, Poll};

/// Who casts a vote: one vote per key per poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Voter {
    /// A registered user's name, or `guest:` and a guest's id.
    pub key: String,
    /// For a guest: its address (IPv6: the /64) and how many guests may vote from there.
    pub guest: Option<(String, u32)>,
}

/// What became of a vote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VoteOutcome {
    /// Stored (or changed).
    Counted,
    /// No such poll or option.
    Unknown,
    /// Enough other guests have voted in this poll from the voter's address.
    AddressFull,
}

/// What a stored credential is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialKind {
    /// A browser session (cookie).
    Session,
    /// A bearer token for scripts.
    Token,
}

impl CredentialKind {
    /// `session` or `token`, as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            CredentialKind::Session => "session",
            CredentialKind::Token => "token",
        }
    }

    /// The kind [`CredentialKind::as_str`] names, if any.
    pub fn from_stored(name: &str) -> Option<CredentialKind> {
        match name {
            "session" => Some(CredentialKind::Session),
            "token" => Some(CredentialKind::Token),
            _ => None,
        }
    }
}

/// A user as stored, with the password hash: what moves with the store (`tether import`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRow {
    /// The name, as registered.
    pub name: String,
    /// When they were added (RFC 3339).
    pub created: String,
    /// The argon2id hash of their password.
    pub hash: String,
}

/// A live session or token as stored: what moves with the store (`tether import`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialRow {
    /// The SHA-256 digest of the secret.
    pub digest: Vec<u8>,
    /// Whose.
    pub user: String,
    /// Session or token.
    pub kind: CredentialKind,
    /// When it was issued (Unix seconds), if known.
    pub created: Option<i64>,
    /// When it expires (Unix seconds); `None` for never.
    pub expires: Option<i64>,
}

/// A vote as stored: what moves with the store (`tether import`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VoteRow {
    /// The voter's key ([`Voter::key`]).
    pub voter: String,
    /// The option chosen.
    pub option: String,
    /// For a guest, the address it voted from.
    pub address: Option<String>,
}

/// A registered user, as `tether user list` shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct UserInfo {
    /// The name, as registered.
    pub name: String,
    /// When they were added (RFC 3339).
    pub created: String,
    /// Sessions (browser logins) that have not expired.
    pub sessions: u64,
    /// Bearer tokens that have not expired.
    pub tokens: u64,
}

/// A session or token, as `tether user tokens` shows it: never the secret itself.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CredentialInfo {
    /// The first 12 hex digits of the stored digest: names the credential to
    /// [`Store::revoke_credential`] and reveals nothing of it.
    pub id: String,
    /// Session or token.
    pub kind: CredentialKind,
    /// When it was issued (Unix seconds); unknown for credentials issued before this was kept.
    pub created: Option<i64>,
    /// When it expires (Unix seconds); `None` for none.
    pub expires: Option<i64>,
}

pub(crate) fn credential_id(digest: &[u8]) -> String {
    digest.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

/// The current time as RFC 3339 with milliseconds.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// A fresh epoch: 64 random bits in hex.
pub fn new_epoch() -> String {
    use rand::{RngCore as _, SeedableRng as _};
    format!("{:016x}", rand::rngs::StdRng::from_os_rng().next_u64())
}

pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rooms (
    name TEXT PRIMARY KEY,
    last_id INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY,
    hash TEXT NOT NULL,
    created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS credentials (
    digest BLOB PRIMARY KEY,
    user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    expires INTEGER,
    created INTEGER
);
CREATE TABLE IF NOT EXISTS messages (
    room TEXT NOT NULL,
    id INTEGER NOT NULL,
    user TEXT NOT NULL,
    text TEXT NOT NULL,
    ts TEXT NOT NULL,
    guest INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (room, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS polls (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    question TEXT NOT NULL,
    options TEXT NOT NULL,
    created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS votes (
    poll INTEGER NOT NULL REFERENCES polls(id) ON DELETE CASCADE,
    user TEXT NOT NULL,
    option TEXT NOT NULL,
    address TEXT,
    PRIMARY KEY (poll, user)
) WITHOUT ROWID;
";

/// A connection to the store.
#[derive(Debug)]
pub struct Store {
    conn: rusqlite::Connection,
}

impl Store {
    /// Opens (creating if needed) `DIR/tether.db`, with WAL journaling and the schema.
    ///
    /// # Errors
    /// The directory cannot be created or the database cannot be opened.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
            path: dir.display().to_string(),
            source,
        })?;
        let conn = rusqlite::Connection::open(dir.join("tether.db"))?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.execute_batch(SCHEMA)?;
        // Columns that databases made by earlier versions lack, added where missing:
        // - votes.address: guest votes capped per address;
        // - messages.idem: idempotency keys;
        // - messages.guest: guests' messages marked (older ones read as a user's, as they
        //   showed then);
        // - credentials.created: credentials listed with their creation time.
        for (table, column, definition) in [
            ("votes", "address", "TEXT"),
            ("messages", "idem", "TEXT"),
            ("messages", "guest", "INTEGER NOT NULL DEFAULT 0"),
            ("credentials", "created", "INTEGER"),
        ] {
            let present: bool = conn.query_row(
                "SELECT COUNT(*) > 0 FROM pragma_table_info(?1) WHERE name = ?2",
                [table, column],
                |r| r.get(0),
            )?;
            if !present {
                conn.execute_batch(&format!(
                    "ALTER TABLE {table} ADD COLUMN {column} {definition}"
                ))?;
            }
        }
        conn.execute_batch(
            "CREATE UNIQUE INDEX IF NOT EXISTS messages_idem ON messages (room, user, idem)
             WHERE idem IS NOT NULL",
        )?;
        // Databases from before the rooms table list their rooms once, from their messages.
        let indexed: bool = conn.query_row(
            "SELECT COUNT(*) > 0 FROM meta WHERE key = 'rooms_indexed'",
            [],
            |r| r.get(0),
        )?;
        if !indexed {
            conn.execute_batch(
                "INSERT OR IGNORE INTO rooms (name, last_id)
                     SELECT room, MAX(id) FROM messages GROUP BY room;
                 INSERT INTO meta (key, value) VALUES ('rooms_indexed', '1');",
            )?;
        }
        // The rooms' epoch: made with the database, so a new database (or one whose rooms were
        // lost) is a new epoch and clients resuming from the old one are told.
        conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('epoch', ?1)",
            [new_epoch()],
        )?;
        Ok(Store { conn })
    }

    /// The epoch of every room's stream of ids in this database.
    ///
    /// # Errors
    /// A database failure.
    pub fn epoch(&self) -> Result<String, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |r| {
                r.get(0)
            })?)
    }

    /// Adds a user with an already hashed password.
    ///
    /// # Errors
    /// [`StoreError::UserExists`] (also for a name that differs from an existing one only in
    /// case: `Alice` and `alice` would look the same to people), or a database failure.
    pub fn add_user(&self, name: &str, hash: &str) -> Result<(), StoreError> {
        if self.user_named_like(name)?.is_some() {
            return Err(StoreError::UserExists(name.to_owned()));
        }
        let inserted = self.conn.execute(
            "INSERT OR IGNORE INTO users (name, hash, created) VALUES (?1, ?2, ?3)",
            params![name, hash, now_rfc3339()],
        )?;
        if inserted == 0 {
            return Err(StoreError::UserExists(name.to_owned()));
        }
        Ok(())
    }

    /// The registered user whose name equals `name` ignoring ASCII case, if any.
    ///
    /// # Errors
    /// A database failure.
    pub fn user_named_like(&self, name: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT name FROM users WHERE name = ?1 COLLATE NOCASE LIMIT 1",
                [name],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// The password hash of `name`, if such a user exists.
    ///
    /// # Errors
    /// A database failure.
    pub fn password_hash(&self, name: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT hash FROM users WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()?)
    }

    /// Stores the digest of a session or token for `user`, valid for `ttl` (forever if `None`).
    ///
    /// # Errors
    /// A database failure.
    pub fn add_credential(
        &self,
        digest: &[u8],
        user: &str,
        kind: CredentialKind,
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        let expires = ttl.map(|t| unix_now() + t.as_secs() as i64);
        self.conn.execute(
            "INSERT INTO credentials (digest, user, kind, expires, created)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![digest, user, kind.as_str(), expires, unix_now()],
        )?;
        Ok(())
    }

    /// The user a credential digest belongs to, if it exists, is of `kind` and has not expired.
    ///
    /// # Errors
    /// A database failure.
    pub fn credential_user(
        &self,
        digest: &[u8],
        kind: CredentialKind,
    ) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT user FROM credentials WHERE digest = ?1 AND kind = ?2
                 AND (expires IS NULL OR expires > ?3)",
                params![digest, kind.as_str(), unix_now()],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Deletes a credential (logout); returns how many were deleted (0 or 1).
    ///
    /// # Errors
    /// A database failure.
    pub fn delete_credential(&self, digest: &[u8]) -> Result<usize, StoreError> {
        Ok(self
            .conn
            .execute("DELETE FROM credentials WHERE digest = ?1", [digest])?)
    }

    /// Gives tokens stored without an expiry (by versions before tokens had a lifetime) one of
    /// `ttl` from now; returns how many.
    ///
    /// # Errors
    /// A database failure.
    pub fn bound_token_lifetimes(&self, ttl: Duration) -> Result<usize, StoreError> {
        Ok(self.conn.execute(
            "UPDATE credentials SET expires = ?1 WHERE kind = 'token' AND expires IS NULL",
            [unix_now() + ttl.as_secs() as i64],
        )?)
    }

    /// Deletes every session and token of `user` (any case of the name); returns how many of
    /// them had not expired.
    ///
    /// # Errors
    /// A database failure.
    pub fn revoke_credentials(&self, user: &str) -> Result<usize, StoreError> {
        // Expired ones go too, uncounted: they were no longer anyone's to use.
        self.conn.execute(
            "DELETE FROM credentials WHERE user = ?1 COLLATE NOCASE AND expires <= ?2",
            params![user, unix_now()],
        )?;
        Ok(self.conn.execute(
            "DELETE FROM credentials WHERE user = ?1 COLLATE NOCASE",
            [user],
        )?)
    }

    /// Every registered user, by name.
    ///
    /// # Errors
    /// A database failure.
    pub fn users(&self) -> Result<Vec<UserInfo>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT u.name, u.created,
                 (SELECT COUNT(*) FROM credentials c WHERE c.user = u.name AND c.kind = 'session'
                     AND (c.expires IS NULL OR c.expires > ?1)),
                 (SELECT COUNT(*) FROM credentials c WHERE c.user = u.name AND c.kind = 'token'
                     AND (c.expires IS NULL OR c.expires > ?1))
             FROM users u ORDER BY u.name",
        )?;
        let rows = stmt.query_map([unix_now()], |r| {
            Ok(UserInfo {
                name: r.get(0)?,
                created: r.get(1)?,
                sessions: r.get(2)?,
                tokens: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Deletes the user `name` (exactly as registered) with every session and token of
    /// theirs; their messages and votes stay. Returns whether there was such a user.
    ///
    /// # Errors
    /// A database failure.
    pub fn remove_user(&self, name: &str) -> Result<bool, StoreError> {
        let tx = self.conn.unchecked_transaction()?;
        tx.execute("DELETE FROM credentials WHERE user = ?1", [name])?;
        let removed = tx.execute("DELETE FROM users WHERE name = ?1", [name])?;
        tx.commit()?;
        Ok(removed > 0)
    }

    /// Replaces the password hash of `name` and deletes every session and token of theirs
    /// (whoever knew the old password may hold one). Returns whether there was such a user.
    ///
    /// # Errors
    /// A database failure.
    pub fn set_password_hash(&self, name: &str, hash: &str) -> Result<bool, StoreError> {
        let tx = self.conn.unchecked_transaction()?;
        let changed = tx.execute("UPDATE users SET hash = ?2 WHERE name = ?1", [name, hash])?;
        tx.execute("DELETE FROM credentials WHERE user = ?1", [name])?;
        tx.commit()?;
        Ok(changed > 0)
    }

    /// The sessions and tokens of `user` that have not expired, newest first.
    ///
    /// # Errors
    /// A database failure.
    pub fn credentials(&self, user: &str) -> Result<Vec<CredentialInfo>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT digest, kind, created, expires FROM credentials
             WHERE user = ?1 AND (expires IS NULL OR expires > ?2)
             ORDER BY created DESC, digest",
        )?;
        let rows = stmt.query_map(params![user, unix_now()], |r| {
            let digest: Vec<u8> = r.get(0)?;
            let kind: String = r.get(1)?;
            Ok(CredentialInfo {
                id: credential_id(&digest),
                kind: CredentialKind::from_stored(&kind).unwrap_or(CredentialKind::Token),
                created: r.get(2)?,
                expires: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Deletes the live session or token of `user` whose [`CredentialInfo::id`] is `id`;
    /// returns how many were deleted (0 or 1).
    ///
    /// # Errors
    /// A database failure.
    pub fn revoke_credential(&self, user: &str, id: &str) -> Result<usize, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT digest FROM credentials
             WHERE user = ?1 AND (expires IS NULL OR expires > ?2)",
        )?;
        let digests = stmt
            .query_map(params![user, unix_now()], |r| r.get::<_, Vec<u8>>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        let mut revoked = 0;
        for digest in digests.iter().filter(|d| credential_id(d) == id) {
            revoked += self.delete_credential(digest)?;
        }
        Ok(revoked)
    }

    /// The highest message id stored for `room` (0 when none).
    ///
    /// # Errors
    /// A database failure.
    pub fn last_id(&self, room: &str) -> Result<u64, StoreError> {
        let id: Option<i64> = self
            .conn
            .prepare_cached("SELECT MAX(id) FROM messages WHERE room = ?1")?
            .query_row([room], |r| r.get(0))?;
        Ok(id.unwrap_or(0) as u64)
    }

    /// The lowest message id still stored for `room`, if any.
    ///
    /// # Errors
    /// A database failure.
    pub fn first_id(&self, room: &str) -> Result<Option<u64>, StoreError> {
        let id: Option<i64> = self
            .conn
            .prepare_cached("SELECT MIN(id) FROM messages WHERE room = ?1")?
            .query_row([room], |r| r.get(0))?;
        Ok(id.map(|i| i as u64))
    }

    /// [`Store::first_id`] and [`Store::last_id`] of `room` in one read (every subscription
    /// asks for both).
    ///
    /// # Errors
    /// A database failure.
    pub fn bounds(&self, room: &str) -> Result<(Option<u64>, u64), StoreError> {
        let (first, last): (Option<i64>, Option<i64>) = self
            .conn
            // One aggregate per subquery: each reads one end of the room's index, where
            // MIN and MAX side by side would scan the room's rows.
            .prepare_cached(
                "SELECT (SELECT MIN(id) FROM messages WHERE room = ?1), \
                        (SELECT MAX(id) FROM messages WHERE room = ?1)",
            )?
            .query_row([room], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok((first.map(|i| i as u64), last.unwrap_or(0) as u64))
    }

    /// Messages of `room` with `since < id <= until`, oldest first, at most `limit`.
    ///
    /// # Errors
    /// A database failure.
    pub fn messages(
        &self,
        room: &str,
        since: u64,
        until: u64,
        limit: usize,
    ) -> Result<Vec<ChatMessage>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, user, text, ts, guest FROM messages
             WHERE room = ?1 AND id > ?2 AND id <= ?3 ORDER BY id LIMIT ?4",
        )?;
        let rows = stmt.query_map(
            params![
                room,
                since.min(i64::MAX as u64) as i64,
                until.min(i64::MAX as u64) as i64,
                limit as i64
            ],
            |r| {
                Ok(ChatMessage {
                    id: r.get::<_, i64>(0)? as u64,
                    room: room.to_owned(),
                    user: r.get(1)?,
                    text: r.get(2)?,
                    ts: r.get(3)?,
                    guest: r.get(4)?,
                    epoch: None,
                })
            },
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The last `count` messages of `room` up to `until`, oldest first.
    ///
    /// # Errors
    /// A database failure.
    pub fn recent(
        &self,
        room: &str,
        until: u64,
        count: usize,
    ) -> Result<Vec<ChatMessage>, StoreError> {
        let since = until.saturating_sub(count as u64);
        self.messages(room, since, until, count)
    }

    /// Rooms with stored messages, `(room, last id)` in name order: the first `limit` after
    /// `after` (from the start when `None`).
    ///
    /// # Errors
    /// A database failure.
    pub fn rooms(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT name, last_id FROM rooms WHERE name > ?1 ORDER BY name LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![after.unwrap_or(""), limit as i64], |r| {
            Ok((r.get(0)?, r.get::<_, i64>(1)? as u64))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// How many rooms have stored messages (users' notification streams are no rooms).
    ///
    /// # Errors
    /// A database failure.
    pub fn room_count(&self) -> Result<usize, StoreError> {
        let n: i64 = self.conn.query_row(
            "SELECT COUNT(*) FROM rooms WHERE name NOT LIKE '~%'",
            [],
            |r| r.get(0),
        )?;
        Ok(n as usize)
    }

    /// Caps the database file at about `max_bytes` (0: no cap): past it, writes fail with
    /// "database or disk is full", as on a full disk, and reads go on. Per connection.
    ///
    /// # Errors
    /// A database failure.
    pub fn limit_size(&self, max_bytes: u64) -> Result<(), StoreError> {
        if max_bytes == 0 {
            return Ok(());
        }
        let page: i64 = self.conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        let pages = (max_bytes / page.max(512) as u64).max(16);
        self.conn
            .query_row(&format!("PRAGMA max_page_count = {pages}"), [], |_| Ok(()))?;
        Ok(())
    }

    /// Starts a transaction for a batch of writes; see [`Batch`].
    ///
    /// # Errors
    /// A database failure.
    pub fn batch(&mut self) -> Result<Batch<'_>, StoreError> {
        Ok(Batch {
            tx: self.conn.transaction()?,
        })
    }

    /// Creates a poll.
    ///
    /// # Errors
    /// A database failure.
    pub fn create_poll(&self, question: &str, options: &[String]) -> Result<Poll, StoreError> {
        let created = now_rfc3339();
        let encoded = serde_json::to_string(options).expect("strings serialize");
        self.conn.execute(
            "INSERT INTO polls (question, options, created) VALUES (?1, ?2, ?3)",
            params![question, encoded, created],
        )?;
        let id = self.conn.last_insert_rowid();
        Ok(Poll {
            id,
            question: question.to_owned(),
            options: options.to_vec(),
            counts: options.iter().map(|o| (o.clone(), 0)).collect(),
            total: 0,
            created,
        })
    }

    /// One poll with its counts.
    ///
    /// # Errors
    /// A database failure.
    pub fn poll(&self, id: i64) -> Result<Option<Poll>, StoreError> {
        let row: Option<(String, String, String)> = self
            .conn
            .query_row(
                "SELECT question, options, created FROM polls WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let Some((question, options, created)) = row else {
            return Ok(None);
        };
        let options: Vec<String> = serde_json::from_str(&options).unwrap_or_default();
        let counts = self.counts(id, &options)?;
        let total = counts.values().sum();
        Ok(Some(Poll {
            id,
            question,
            options,
            counts,
            total,
            created,
        }))
    }

    /// The newest `limit` polls, newest first.
    ///
    /// # Errors
    /// A database failure.
    pub fn polls(&self, limit: usize) -> Result<Vec<Poll>, StoreError> {
        let ids: Vec<i64> = {
            let mut stmt = self
                .conn
                .prepare("SELECT id FROM polls ORDER BY id DESC LIMIT ?1")?;
            let rows = stmt.query_map([limit as i64], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        let mut polls = Vec::with_capacity(ids.len());
        for id in ids {
            polls.extend(self.poll(id)?);
        }
        Ok(polls)
    }

    /// Votes per option of poll `id`.
    ///
    /// # Errors
    /// A database failure.
    pub fn counts(&self, id: i64, options: &[String]) -> Result<BTreeMap<String, u64>, StoreError> {
        counts(&self.conn, id, options)
    }

    /// Every user with their password hash, by name.
    ///
    /// # Errors
    /// A database failure.
    pub fn export_users(&self) -> Result<Vec<UserRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT name, created, hash FROM users ORDER BY name")?;
        let rows = stmt.query_map([], |r| {
            Ok(UserRow {
                name: r.get(0)?,
                created: r.get(1)?,
                hash: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Every session and token that has not expired.
    ///
    /// # Errors
    /// A database failure.
    pub fn export_credentials(&self) -> Result<Vec<CredentialRow>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT digest, user, kind, created, expires FROM credentials
             WHERE expires IS NULL OR expires > ?1 ORDER BY digest",
        )?;
        let rows = stmt.query_map([unix_now()], |r| {
            let kind: String = r.get(2)?;
            Ok(CredentialRow {
                digest: r.get(0)?,
                user: r.get(1)?,
                kind: CredentialKind::from_stored(&kind).unwrap_or(CredentialKind::Token),
                created: r.get(3)?,
                expires: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The id of every poll, oldest first.
    ///
    /// # Errors
    /// A database failure.
    pub fn poll_ids(&self) -> Result<Vec<i64>, StoreError> {
        let mut stmt = self.conn.prepare("SELECT id FROM polls ORDER BY id")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Every vote of poll `id`.
    ///
    /// # Errors
    /// A database failure.
    pub fn export_votes(&self, id: i64) -> Result<Vec<VoteRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT user, option, address FROM votes WHERE poll = ?1 ORDER BY user")?;
        let rows = stmt.query_map([id], |r| {
            Ok(VoteRow {
                voter: r.get(0)?,
                option: r.get(1)?,
                address: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The option `user` voted for in poll `id`.
    ///
    /// # Errors
    /// A database failure.
    pub fn vote_of(&self, id: i64, user: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT option FROM votes WHERE poll = ?1 AND user = ?2",
                params![id, user],
                |r| r.get(0),
            )
            .optional()?)
    }
}

/// The options of poll `id`, if it exists.
fn poll_options(conn: &rusqlite::Connection, id: i64) -> Result<Option<Vec<String>>, StoreError> {
    let options: Option<String> = conn
        .query_row("SELECT options FROM polls WHERE id = ?1", [id], |r| {
            r.get(0)
        })
        .optional()?;
    Ok(options.map(|o| serde_json::from_str(&o).unwrap_or_default()))
}

fn counts(
    conn: &rusqlite::Connection,
    id: i64,
    options: &[String],
) -> Result<BTreeMap<String, u64>, StoreError> {
    let mut counts: BTreeMap<String, u64> = options.iter().map(|o| (o.clone(), 0)).collect();
    let mut stmt =
        conn.prepare_cached("SELECT option, COUNT(*) FROM votes WHERE poll = ?1 GROUP BY option")?;
    let rows = stmt.query_map([id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
    for row in rows {
        let (option, n) = row?;
        if let Some(c) = counts.get_mut(&option) {
            *c = n as u64;
        }
    }
    Ok(counts)
}

/// A transaction holding a batch of journal writes; nothing is visible until [`Batch::commit`].
#[derive(Debug)]
pub struct Batch<'a> {
    tx: rusqlite::Transaction<'a>,
}

impl Batch<'_> {
    /// The highest stored id of `room` as this transaction sees it.
    ///
    /// # Errors
    /// A database failure.
    pub fn last_id(&self, room: &str) -> Result<u64, StoreError> {
        let id: Option<i64> = self.tx.query_row(
            "SELECT MAX(id) FROM messages WHERE room = ?1",
            [room],
            |r| r.get(0),
        )?;
        Ok(id.unwrap_or(0) as u64)
    }

    /// Inserts a message, with the sender's idempotency key if it gave one.
    ///
    /// # Errors
    /// A database failure (a key the sender used in this room before included).
    pub fn insert_message(&self, m: &ChatMessage, key: Option<&str>) -> Result<(), StoreError> {
        self.tx
            .prepare_cached(
                "INSERT INTO messages (room, id, user, text, ts, idem, guest)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                m.room,
                m.id as i64,
                m.user,
                m.text,
                m.ts,
                key,
                m.guest
            ])?;
        Ok(())
    }

    /// The message `user` sent to `room` with idempotency key `key`, while it is kept.
    ///
    /// # Errors
    /// A database failure.
    pub fn keyed_message(
        &self,
        room: &str,
        user: &str,
        key: &str,
    ) -> Result<Option<ChatMessage>, StoreError> {
        Ok(self
            .tx
            .prepare_cached(
                "SELECT id, text, ts, guest FROM messages WHERE room = ?1 AND user = ?2 AND idem = ?3",
            )?
            .query_row(params![room, user, key], |r| {
                Ok(ChatMessage {
                    id: r.get::<_, i64>(0)? as u64,
                    room: room.to_owned(),
                    user: user.to_owned(),
                    text: r.get(1)?,
                    ts: r.get(2)?,
                    guest: r.get(3)?,
                    epoch: None,
                })
            })
            .optional()?)
    }

    /// Records `last_id` as the last id of `room` (listing it if it is new).
    ///
    /// # Errors
    /// A database failure.
    pub fn set_room(&self, room: &str, last_id: u64) -> Result<(), StoreError> {
        self.tx
            .prepare_cached(
                "INSERT INTO rooms (name, last_id) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET last_id = excluded.last_id",
            )?
            .execute(params![room, last_id as i64])?;
        Ok(())
    }

    /// Deletes the messages of `room` older than the newest `keep`, given its last id.
    ///
    /// # Errors
    /// A database failure.
    pub fn retain(&self, room: &str, last_id: u64, keep: usize) -> Result<(), StoreError> {
        let cutoff = last_id.saturating_sub(keep as u64);
        if cutoff > 0 {
            self.tx
                .prepare_cached("DELETE FROM messages WHERE room = ?1 AND id <= ?2")?
                .execute(params![room, cutoff as i64])?;
        }
        Ok(())
    }

    /// Records `voter`'s vote in poll `id` (replacing an earlier one), unless the poll or
    /// `option` does not exist, or the voter is a guest and enough other guests voted from its
    /// address.
    ///
    /// # Errors
    /// A database failure.
    pub fn vote(&self, id: i64, voter: &Voter, option: &str) -> Result<VoteOutcome, StoreError> {
        let Some(options) = poll_options(&self.tx, id)? else {
            return Ok(VoteOutcome::Unknown);
        };
        if !options.iter().any(|o| o == option) {
            return Ok(VoteOutcome::Unknown);
        }
        if let Some((address, cap)) = &voter.guest {
            // Other guests who voted from this address; this guest changing its vote is free.
            let others: u32 = self
                .tx
                .prepare_cached(
                    "SELECT COUNT(*) FROM votes WHERE poll = ?1 AND address = ?2 AND user != ?3",
                )?
                .query_row(params![id, address, voter.key], |r| r.get(0))?;
            let voted: bool = self
                .tx
                .prepare_cached("SELECT COUNT(*) > 0 FROM votes WHERE poll = ?1 AND user = ?2")?
                .query_row(params![id, voter.key], |r| r.get(0))?;
            if !voted && others >= *cap {
                return Ok(VoteOutcome::AddressFull);
            }
        }
        let address = voter.guest.as_ref().map(|(a, _)| a.as_str());
        self.tx
            .prepare_cached(
                "INSERT INTO votes (poll, user, option, address) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (poll, user) DO UPDATE SET option = excluded.option",
            )?
            .execute(params![id, voter.key, option, address])?;
        Ok(VoteOutcome::Counted)
    }

    /// The poll's counts as this transaction sees them, with its options.
    ///
    /// # Errors
    /// A database failure.
    pub fn poll_counts(&self, id: i64) -> Result<Option<BTreeMap<String, u64>>, StoreError> {
        let Some(options) = poll_options(&self.tx, id)? else {
            return Ok(None);
        };
        Ok(Some(counts(&self.tx, id, &options)?))
    }

    /// Makes the batch durable.
    ///
    /// # Errors
    /// A database failure; nothing of the batch is stored then.
    pub fn commit(self) -> Result<(), StoreError> {
        Ok(self.tx.commit()?)
    }
}

/// Jobs queued for the store's thread at most; a caller past it waits for room.
const DB_QUEUE: usize = 1024;

/// A job for the store's thread.
type DbJob = Box<dyn FnOnce(&Store) + Send>;

/// A handle to the store for short reads and writes off the async threads.
///
/// The store is one SQLite connection, so its calls run one at a time on a thread of its own,
/// in the order they were made. (Run as `spawn_blocking` tasks behind a lock, a burst of joins
/// parked one blocking thread per waiting call: 70 threads for 10,000 guests joining rooms,
/// each with its stack and allocator cache, for the ten seconds tokio keeps them.)
#[derive(Debug, Clone)]
pub struct Db {
    jobs: tokio::sync::mpsc::Sender<DbJob>,
}

impl Db {
    /// Starts the store's thread with `store`; it ends, closing the store, once every handle
    /// is dropped.
    ///
    /// # Errors
    /// The thread could not be spawned.
    pub fn new(store: Store) -> std::io::Result<Db> {
        let (jobs, mut queue) = tokio::sync::mpsc::channel::<DbJob>(DB_QUEUE);
        std::thread::Builder::new()
            .name("tether-store".into())
            .spawn(move || {
                while let Some(job) = queue.blocking_recv() {
                    // A panicking call loses its answer (its caller sees `Closed`), not
                    // the store.
                    let ran =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&store)));
                    if ran.is_err() {
                        tracing::error!("a store call panicked");
                    }
                }
            })?;
        Ok(Db { jobs })
    }

    /// Runs `f` on the store's thread.
    ///
    /// # Errors
    /// What `f` returns, or [`StoreError::Closed`] if the store's thread has stopped.
    pub async fn call<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let job: DbJob = Box::new(move |store| {
            let _ = answer.send(f(store));
        });
        self.jobs.send(job).await.map_err(|_| StoreError::Closed)?;
        answered.await.map_err(|_| StoreError::Closed)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_from_before_guest_vote_caps_gains_the_address_column() {
        let dir = tempfile::tempdir().unwrap();
        {
            let conn = rusqlite::Connection::open(dir.path().join("tether.db")).unwrap();
            conn.execute_batch(
                "CREATE TABLE polls (id INTEGER PRIMARY KEY, question TEXT NOT NULL,
                     options TEXT NOT NULL, created TEXT NOT NULL);
                 CREATE TABLE votes (poll INTEGER NOT NULL, user TEXT NOT NULL,
                     option TEXT NOT NULL, PRIMARY KEY (poll, user)) WITHOUT ROWID;
                 INSERT INTO polls VALUES (1, 'Q?', '[\"a\",\"b\"]', 'then');
                 INSERT INTO votes VALUES (1, 'alice', 'a');",
            )
            .unwrap();
        }
        let mut store = Store::open(dir.path()).unwrap();
        assert_eq!(store.vote_of(1, "alice").unwrap().as_deref(), Some("a"));
        let guest = |key: &str| Voter {
            key: key.into(),
            guest: Some(("10.0.0.1".into(), 1)),
        };
        let batch = store.batch().unwrap();
        assert_eq!(
            batch.vote(1, &guest("guest:x"), "b").unwrap(),
            VoteOutcome::Counted
        );
        assert_eq!(
            batch.vote(1, &guest("guest:y"), "b").unwrap(),
            VoteOutcome::AddressFull
        );
        assert_eq!(
            batch.vote(1, &guest("guest:x"), "a").unwrap(),
            VoteOutcome::Counted,
            "a change is free"
        );
        batch.commit().unwrap();
        drop(store);
        Store::open(dir.path()).expect("opening again leaves the column alone");
    }

    #[test]
    fn messages_from_before_guests_were_marked_read_as_users_and_new_ones_are_marked() {
        let dir = tempfile::tempdir().unwrap();
        {
            let conn = rusqlite::Connection::open(dir.path().join("tether.db")).unwrap();
            conn.execute_batch(
                "CREATE TABLE messages (room TEXT NOT NULL, id INTEGER NOT NULL,
                     user TEXT NOT NULL, text TEXT NOT NULL, ts TEXT NOT NULL,
                     PRIMARY KEY (room, id)) WITHOUT ROWID;
                 INSERT INTO messages VALUES ('lobby', 1, 'ann', 'then', 'ts');",
            )
            .unwrap();
        }
        let mut store = Store::open(dir.path()).unwrap();
        let batch = store.batch().unwrap();
        batch
            .insert_message(
                &ChatMessage {
                    id: 2,
                    room: "lobby".into(),
                    user: "bob".into(),
                    text: "now".into(),
                    ts: "ts".into(),
                    guest: true,
                    epoch: None,
                },
                None,
            )
            .unwrap();
        batch.commit().unwrap();
        let shown: Vec<_> = store
            .messages("lobby", 0, u64::MAX, 10)
            .unwrap()
            .into_iter()
            .map(|m| (m.user, m.guest))
            .collect();
        assert_eq!(shown, [("ann".into(), false), ("bob".into(), true)]);
        let json = serde_json::to_value(store.recent("lobby", 2, 2).unwrap()).unwrap();
        assert!(json[0].get("guest").is_none(), "absent when false: {json}");
        assert_eq!(json[1]["guest"], true);
    }

    #[test]
    fn credentials_from_before_their_creation_time_was_kept_are_listed_without_one() {
        let dir = tempfile::tempdir().unwrap();
        {
            let conn = rusqlite::Connection::open(dir.path().join("tether.db")).unwrap();
            conn.execute_batch(
                "CREATE TABLE users (name TEXT PRIMARY KEY, hash TEXT NOT NULL,
                     created TEXT NOT NULL);
                 CREATE TABLE credentials (digest BLOB PRIMARY KEY, user TEXT NOT NULL
                     REFERENCES users(name) ON DELETE CASCADE, kind TEXT NOT NULL,
                     expires INTEGER);
                 INSERT INTO users VALUES ('alice', 'h', 'then');
                 INSERT INTO credentials VALUES (x'00112233445566', 'alice', 'token', NULL);",
            )
            .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        store
            .add_credential(&[0xab; 32], "alice", CredentialKind::Session, None)
            .unwrap();
        let listed = store.credentials("alice").unwrap();
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0].id, "abababababab");
        assert!(listed[0].created.is_some());
        assert_eq!(
            (listed[1].id.as_str(), listed[1].created),
            ("001122334455", None)
        );
        assert_eq!(store.users().unwrap()[0].tokens, 1);
        assert_eq!(store.revoke_credential("alice", "001122334455").unwrap(), 1);
        assert_eq!(store.credentials("alice").unwrap().len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn store_calls_run_on_one_thread_however_many_wait() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::new(Store::open(dir.path()).unwrap()).unwrap();
        let calls: Vec<_> = (0..200)
            .map(|i| {
                let db = db.clone();
                tokio::spawn(async move {
                    db.call(move |_| {
                        std::thread::sleep(Duration::from_micros(200));
                        Ok((
                            i,
                            std::thread::current().id(),
                            std::thread::current().name().map(String::from),
                        ))
                    })
                    .await
                })
            })
            .collect();
        let mut threads = std::collections::HashSet::new();
        for call in calls {
            let (_, thread, name) = call.await.unwrap().unwrap();
            assert_eq!(name.as_deref(), Some("tether-store"));
            threads.insert(thread);
        }
        assert_eq!(
            threads.len(),
            1,
            "200 waiting calls ran on {} threads",
            threads.len()
        );
    }

    #[tokio::test]
    async fn a_panicking_store_call_loses_its_answer_not_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::new(Store::open(dir.path()).unwrap()).unwrap();
        let lost = db.call::<(), _>(|_| panic!("a bug in one call")).await;
        assert!(matches!(lost, Err(StoreError::Closed)), "{lost:?}");
        assert_eq!(
            db.call(|_| Ok(7)).await.unwrap(),
            7,
            "the next call is answered"
        );
    }
}
