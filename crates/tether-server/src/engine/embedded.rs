//! The engine of one process: chat and votes through the journal (the one writer, which
//! delivers after commit), reads from the store's thread, presence and broadcasts in the hub.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::accounts::SqliteAccounts;
use super::journal::{ChatWrite, Job, Journal};
use super::local::{Local, Member};
use super::polls::SqlitePolls;
use super::store::{ChatMessage, Db};
use super::{Broker, Control, Engine, EngineFuture, Leases, Presence, Reach, Revocations};

impl Engine {
    /// One process: this process's store, journal and hub.
    pub fn embedded(
        db: Db,
        journal: Journal,
        hub: Arc<dyn Local>,
        revocations: Revocations,
    ) -> Engine {
        let accounts = Arc::new(SqliteAccounts::new(db.clone(), revocations.clone()));
        let polls = Arc::new(SqlitePolls::new(db.clone(), journal.clone(), hub.clone()));
        let embedded = Arc::new(Embedded { db, journal, hub });
        Engine {
            broker: embedded.clone(),
            presence: embedded.clone(),
            control: embedded.clone(),
            leases: embedded,
            accounts,
            polls,
            revocations,
        }
    }
}

/// One process: messages go through the journal (the one writer, which delivers after
/// commit), reads go to the store's thread.
#[derive(Debug)]
pub struct Embedded {
    db: Db,
    journal: Journal,
    hub: Arc<dyn Local>,
}

impl Broker for Embedded {
    fn publish(&self, write: ChatWrite) -> EngineFuture<'_, ()> {
        Box::pin(self.journal.submit(Job::Chat(write)))
    }

    fn event<'a>(&'a self, room: &'a str, from: u64, push: &'a str) -> EngineFuture<'a, usize> {
        // One node: its hub is everyone.
        Box::pin(async move { Ok(self.hub.ephemeral(room, Some(from), push)) })
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
        Box::pin(self.db.call(move |s| s.bounds(&room)))
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

    fn flush(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(self.journal.flush())
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

/// One process: there are no other nodes, and the hub knows everyone.
impl Presence for Embedded {
    fn counts<'a>(&'a self, rooms: &'a [String]) -> EngineFuture<'a, Vec<usize>> {
        Box::pin(async move { Ok(rooms.iter().map(|r| self.hub.user_count(r)).collect()) })
    }

    fn users<'a>(&'a self, _room: &'a str) -> EngineFuture<'a, BTreeSet<String>> {
        Box::pin(async { Ok(BTreeSet::new()) })
    }

    fn elsewhere<'a>(&'a self, _room: &'a str) -> EngineFuture<'a, Vec<Member>> {
        Box::pin(async { Ok(Vec::new()) })
    }
}

impl Control for Embedded {
    fn broadcast<'a>(&'a self, user: &'a str, text: &'a str) -> EngineFuture<'a, Reach> {
        let ts = crate::engine::store::now_rfc3339();
        Box::pin(async move { Ok(Reach::Connections(self.hub.broadcast(user, text, &ts))) })
    }

    fn disconnect_user<'a>(&'a self, user: &'a str, reconnect: bool) -> EngineFuture<'a, Reach> {
        let ended = self.hub.disconnect_user(user, reconnect);
        Box::pin(async move { Ok(Reach::Connections(ended)) })
    }

    fn unsubscribe_user<'a>(&'a self, user: &'a str, channel: &'a str) -> EngineFuture<'a, Reach> {
        let ended = self.hub.unsubscribe_user(user, channel);
        Box::pin(async move { Ok(Reach::Connections(ended)) })
    }

    fn trouble(&self) -> Option<&'static str> {
        None
    }
}

/// One process: the hub's holds are all there is.
impl Leases for Embedded {
    fn claim<'a>(&'a self, _name: &'a str, _holder: &'a str) -> EngineFuture<'a, bool> {
        Box::pin(async { Ok(true) })
    }
}
