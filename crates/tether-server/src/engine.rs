//! The engine seam: what the server asks of the place its state lives. One implementation per
//! deployment is chosen once, at startup ([`crate::serve`]): [`Embedded`] keeps everything in
//! this process and its SQLite file, and the Redis one ([`crate::cluster::Cluster`]) shares it
//! with every node. Handlers and sessions call the traits, never asking which one runs.
//!
//! [`Broker`] is the first part: chat streams, with ids, an epoch and history.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::app::Db;
use crate::hub::Hub;
use crate::journal::{ChatWrite, Job, Journal};
use crate::store::{ChatMessage, StoreError};

/// What the engine's calls return: a boxed future, so that the traits can be objects.
pub type EngineFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Chat streams: each room's messages, with ids that increase by one, an epoch that changes
/// when storage lost them, and their history. Stored messages reach this node's subscribers
/// through the hub, after they are stored, whichever node stored them.
pub trait Broker: Send + Sync + std::fmt::Debug {
    /// Queues `write` for storing; the stored message (or the failure) goes to its reply.
    ///
    /// # Errors
    /// [`StoreError::Closed`] when the writer has stopped.
    fn publish(&self, write: ChatWrite) -> EngineFuture<'_, ()>;

    /// The epoch of the rooms' streams.
    ///
    /// # Errors
    /// Storage failed.
    fn epoch(&self) -> EngineFuture<'_, String>;

    /// The first id `room` still keeps (`None` when it keeps none) and its last id (0 when
    /// none). Once this answers, what is published to `room` afterwards reaches this node.
    ///
    /// # Errors
    /// Storage failed.
    fn bounds<'a>(&'a self, room: &'a str) -> EngineFuture<'a, (Option<u64>, u64)>;

    /// Messages of `room` with `since < id <= until`, oldest first, at most `limit`.
    ///
    /// # Errors
    /// Storage failed.
    fn history<'a>(
        &'a self,
        room: &'a str,
        since: u64,
        until: u64,
        limit: usize,
    ) -> EngineFuture<'a, Vec<ChatMessage>>;

    /// The newest `count` messages of `room`, oldest first.
    ///
    /// # Errors
    /// Storage failed.
    fn recent<'a>(&'a self, room: &'a str, count: usize) -> EngineFuture<'a, Vec<ChatMessage>>;

    /// Whether `room` has stored messages.
    ///
    /// # Errors
    /// Storage failed.
    fn has_messages<'a>(&'a self, room: &'a str) -> EngineFuture<'a, bool>;

    /// Rooms with stored messages, `(room, last id)` in name order: the first `limit` after
    /// `after` (from the start when `None`).
    ///
    /// # Errors
    /// Storage failed.
    fn rooms<'a>(
        &'a self,
        after: Option<&'a str>,
        limit: usize,
    ) -> EngineFuture<'a, Vec<(String, u64)>>;
}

/// One process: messages go through the journal (the one writer, which delivers after
/// commit), reads go to the store's thread.
#[derive(Debug)]
pub struct Embedded {
    db: Db,
    journal: Journal,
    hub: Arc<Hub>,
}

impl Embedded {
    /// The engine over this process's store, journal and hub.
    pub fn new(db: Db, journal: Journal, hub: Arc<Hub>) -> Embedded {
        Embedded { db, journal, hub }
    }
}

impl Broker for Embedded {
    fn publish(&self, write: ChatWrite) -> EngineFuture<'_, ()> {
        Box::pin(self.journal.submit(Job::Chat(write)))
    }

    fn epoch(&self) -> EngineFuture<'_, String> {
        Box::pin(async move {
            // Kept by the hub once read: it changes only when the store is replaced.
            let known = self.hub.epoch();
            if !known.is_empty() {
                return Ok(known);
            }
            let epoch = self.db.call(|s| s.epoch()).await?;
            self.hub.observe_epoch(&epoch);
            Ok(epoch)
        })
    }

    fn bounds<'a>(&'a self, room: &'a str) -> EngineFuture<'a, (Option<u64>, u64)> {
        let room = room.to_owned();
        Box::pin(
            self.db
                .call(move |s| Ok((s.first_id(&room)?, s.last_id(&room)?))),
        )
    }

    fn history<'a>(
        &'a self,
        room: &'a str,
        since: u64,
        until: u64,
        limit: usize,
    ) -> EngineFuture<'a, Vec<ChatMessage>> {
        let room = room.to_owned();
        Box::pin(
            self.db
                .call(move |s| s.messages(&room, since, until, limit)),
        )
    }

    fn recent<'a>(&'a self, room: &'a str, count: usize) -> EngineFuture<'a, Vec<ChatMessage>> {
        let room = room.to_owned();
        Box::pin(self.db.call(move |s| {
            let until = s.last_id(&room)?;
            s.recent(&room, until, count)
        }))
    }

    fn has_messages<'a>(&'a self, room: &'a str) -> EngineFuture<'a, bool> {
        let room = room.to_owned();
        Box::pin(self.db.call(move |s| Ok(s.last_id(&room)? > 0)))
    }

    fn rooms<'a>(
        &'a self,
        after: Option<&'a str>,
        limit: usize,
    ) -> EngineFuture<'a, Vec<(String, u64)>> {
        let after = after.map(str::to_owned);
        Box::pin(self.db.call(move |s| s.rooms(after.as_deref(), limit)))
    }
}

impl Broker for crate::cluster::Cluster {
    fn publish(&self, write: ChatWrite) -> EngineFuture<'_, ()> {
        Box::pin(self.submit(write))
    }

    fn epoch(&self) -> EngineFuture<'_, String> {
        Box::pin(crate::cluster::Cluster::epoch(self))
    }

    fn bounds<'a>(&'a self, room: &'a str) -> EngineFuture<'a, (Option<u64>, u64)> {
        Box::pin(async move {
            // Read only once this node hears the room: what is published after the read
            // then arrives live.
            self.listen(room).await;
            let last = crate::cluster::Cluster::recent(self, room, 1)
                .await?
                .first()
                .map_or(0, |m| m.id);
            Ok((self.first_id(room).await?, last))
        })
    }

    fn history<'a>(
        &'a self,
        room: &'a str,
        since: u64,
        until: u64,
        limit: usize,
    ) -> EngineFuture<'a, Vec<ChatMessage>> {
        Box::pin(async move {
            let mut page = self.messages(room, since, limit).await?;
            page.retain(|m| m.id <= until);
            Ok(page)
        })
    }

    fn recent<'a>(&'a self, room: &'a str, count: usize) -> EngineFuture<'a, Vec<ChatMessage>> {
        Box::pin(crate::cluster::Cluster::recent(self, room, count))
    }

    fn has_messages<'a>(&'a self, room: &'a str) -> EngineFuture<'a, bool> {
        Box::pin(async move { Ok(self.first_id(room).await?.is_some()) })
    }

    fn rooms<'a>(
        &'a self,
        after: Option<&'a str>,
        limit: usize,
    ) -> EngineFuture<'a, Vec<(String, u64)>> {
        Box::pin(crate::cluster::Cluster::rooms(self, after, limit))
    }
}
