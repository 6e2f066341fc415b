//! Rooms and polls as channels of the hub: what their names are (`room:NAME`, `user:NAME`,
//! `poll:ID`, `polls`), what kind of channel each is, how what the engine delivers is encoded
//! in each format, and the rooms' epoch. The engine sees this node through [`Rooms`]
//! ([`Local`]); the hub below it knows channels, outboxes and prepared bytes only.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde_json::value::RawValue;
use tether::Prepared;
use tokio::sync::mpsc;

use crate::engine::local::{Local, Member, Sender, Shared};
use crate::node::hub::{Format, Hub, Joined, Kind, Outbox, Outgoing, Subscription, Verdict};
use crate::wire::channels::{self, channel_room, channel_stream, room_channel};
use crate::wire::{self, encode, is_personal, rooms, ChatMessage};

/// The channel a room's members subscribe to: a room has presence, a user's notification
/// stream has none; both are streams.
fn room_kind(room: &str) -> Kind {
    Kind {
        presence: !is_personal(room),
        stream: true,
    }
}

/// A poll's channel, and the list of polls: no presence, no stream (counts replace each
/// other).
const POLL: Kind = Kind {
    presence: false,
    stream: false,
};

/// The channel of the list of polls.
pub const POLL_LIST: &str = "polls";

/// The channel of poll `poll`.
pub fn poll_channel(poll: i64) -> String {
    format!("poll:{poll}")
}

/// This node's rooms and polls, on its hub.
#[derive(Debug)]
pub struct Rooms {
    hub: Arc<Hub>,
    /// The epoch of the rooms' streams in storage, once known (empty before).
    epoch: Mutex<String>,
}

impl Rooms {
    /// Rooms and polls on `hub`.
    pub fn new(hub: Arc<Hub>) -> Arc<Rooms> {
        Arc::new(Rooms {
            hub,
            epoch: Mutex::new(String::new()),
        })
    }

    /// The hub they are channels of.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Subscribes a connection of `user` to `room`, in the room endpoints' format; the others
    /// learn of a new user.
    pub fn join(&self, room: &str, user: &str) -> Joined {
        self.join_with(room, &Arc::from(user), None, Format::Room)
    }

    /// Subscribes a connection speaking `format` to `room`, its events going to `outbox` (a
    /// new one when `None`); the others learn of a new user. A connection in several rooms
    /// passes the same `user` to each, which they share.
    pub fn join_with(
        &self,
        room: &str,
        user: &Arc<str>,
        outbox: Option<Arc<Outbox>>,
        format: Format,
    ) -> Joined {
        let channel = room_channel(room);
        self.hub
            .subscribe(&channel, room_kind(room), user, outbox, format)
    }

    /// Subscribes a connection to poll `poll`'s counts, in the poll endpoint's format.
    pub fn watch_poll(&self, poll: i64, user: &str) -> Subscription {
        self.watch_poll_with(poll, &Arc::from(user), None, Format::Room)
    }

    /// Subscribes a connection speaking `format` to poll `poll`'s counts, its events going to
    /// `outbox` (a new one when `None`).
    pub fn watch_poll_with(
        &self,
        poll: i64,
        user: &Arc<str>,
        outbox: Option<Arc<Outbox>>,
        format: Format,
    ) -> Subscription {
        let channel = poll_channel(poll);
        self.hub
            .subscribe(&channel, POLL, user, outbox, format)
            .subscription
    }

    /// Subscribes a channel-protocol connection to the `polls` channel, its events going to
    /// `outbox`.
    pub fn watch_poll_list(&self, user: &Arc<str>, outbox: Arc<Outbox>) -> Subscription {
        let format = Format::Channels;
        self.hub
            .subscribe(POLL_LIST, POLL, user, Some(outbox), format)
            .subscription
    }

    /// The epoch of the rooms' streams, as last seen in storage (empty before it is known).
    pub fn epoch(&self) -> String {
        lock(&self.epoch).clone()
    }

    /// Takes note of the rooms' epoch as read from storage. When it differs from the one seen
    /// before, storage lost the streams and started their ids again: every room here forgets
    /// what it delivered and every member is told to reconnect, since the ids it holds now
    /// name other messages. Returns whether that happened.
    pub fn observe_epoch(&self, epoch: &str) -> bool {
        let mut current = lock(&self.epoch);
        if *current == epoch {
            return false;
        }
        let known = !current.is_empty();
        let before = std::mem::replace(&mut *current, epoch.to_owned());
        if !known {
            return false;
        }
        let reset = self.hub.reset_streams();
        tracing::error!(old = %before, new = %epoch, rooms = reset, "storage lost the rooms' history (a new epoch): their members reconnect and resume from what it holds now");
        true
    }

    /// After a connection that created `room` read its history up to `high`: older ids need
    /// not be delivered here. Only when it is alone, so no other member can miss anything.
    pub fn advance(&self, room: &str, high: u64) {
        self.hub.advance(&room_channel(room), high);
    }

    /// The last id delivered in `room` (0 when none or the room has no local members).
    pub fn position(&self, room: &str) -> u64 {
        self.hub.position(&room_channel(room))
    }

    /// How many distinct users `room` has on this node.
    pub fn user_count(&self, room: &str) -> usize {
        self.hub.user_count(&room_channel(room))
    }

    /// The users in `room` on this node, with how many connections each has there and the
    /// public information they attached, in name order.
    pub fn members(&self, room: &str) -> Vec<Member> {
        self.hub.members(&room_channel(room))
    }

    /// Whether `room` has local members.
    pub fn has_room(&self, room: &str) -> bool {
        self.hub.has(&room_channel(room))
    }

    /// How many rooms have members here (users' notification streams are no rooms).
    pub fn room_count(&self) -> usize {
        self.hub.listed_count()
    }

    /// The first `limit` rooms with connected members whose names sort after `after` (from
    /// the first when `None`): `(room, distinct users)`, in name order. Costs the page,
    /// whatever the number of rooms.
    pub fn rooms_page(&self, after: Option<&str>, limit: usize) -> Vec<(String, usize)> {
        let after = after.map(room_channel);
        self.hub
            .listed_page(after.as_deref(), limit)
            .into_iter()
            .filter_map(|(channel, users)| Some((channel_room(&channel)?.to_owned(), users)))
            .collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The engine's view of this node: rooms by name, polls by id.
impl Local for Rooms {
    fn deliver(&self, message: &ChatMessage) {
        if let Some(epoch) = &message.epoch {
            self.observe_epoch(epoch);
        }
        let encode = |f: Format| match f {
            Format::Room => encode(message),
            Format::Channels => channels::publication(message),
        };
        self.hub
            .publish(&room_channel(&message.room), message.id, &encode);
    }

    fn deliver_counts(&self, poll: i64, counts: &BTreeMap<String, u64>) {
        let channel = poll_channel(poll);
        let total = counts.values().sum();
        let encode = |f: Format| match f {
            Format::Room => encode(&rooms::Counts {
                id: poll,
                counts,
                total,
            }),
            Format::Channels => encode(&channels::Publication {
                channel: &channel,
                offset: None,
                user: None,
                guest: false,
                ts: None,
                data: channels::Counts { counts, total },
            }),
        };
        self.hub.publish(&channel, 0, &encode);
    }

    fn poll_created(&self, poll: &wire::Poll) {
        let encode = |_: Format| {
            encode(&channels::Publication {
                channel: POLL_LIST,
                offset: None,
                user: None,
                guest: false,
                ts: None,
                data: channels::Created { created: poll },
            })
        };
        self.hub.publish(POLL_LIST, 0, &encode);
    }

    /// Room endpoints' members hear it in their room; the channel protocol's connections on
    /// their `broadcast` channel.
    fn broadcast(&self, user: &str, text: &str, ts: &str) -> usize {
        let encode = |f: Format| match f {
            Format::Room => encode(&rooms::Broadcast { user, text, ts }),
            Format::Channels => encode(&channels::Publication {
                channel: "broadcast",
                offset: None,
                user: Some(user),
                guest: false,
                ts: Some(ts),
                data: channels::Text { text },
            }),
        };
        self.hub.broadcast(Format::Room, &encode)
    }

    fn disconnect_user(&self, user: &str, reconnect: bool) -> usize {
        if user.is_empty() {
            // The name of connections without an identity: nobody's.
            return 0;
        }
        let verdict = if reconnect {
            Verdict::Reconnect
        } else {
            Verdict::Disconnected
        };
        self.hub.disconnect_user(user, verdict)
    }

    fn unsubscribe_user(&self, user: &str, channel: &str) -> usize {
        if user.is_empty() || !self.hub.has(channel) {
            return 0;
        }
        let push = Arc::new(encode(&channels::Unsubscribed {
            channel,
            code: channels::UNSUBSCRIBED_BY_SERVER,
            reason: "unsubscribed by the server",
        }));
        self.hub.end_subscriptions(channel, user, &push)
    }

    fn ephemeral(&self, room: &str, from: Option<u64>, push: &str) -> usize {
        let channel = room_channel(room);
        if !self.hub.has(&channel) {
            return 0;
        }
        let push = Arc::new(Prepared::text(push.to_owned()));
        self.hub.publish_to(&channel, Format::Channels, from, &push)
    }

    fn remote_presence(
        &self,
        room: &str,
        user: &str,
        join: bool,
        remote: usize,
        info: Option<&RawValue>,
    ) {
        self.hub
            .remote_presence(&room_channel(room), user, join, remote, info);
    }

    fn has_room(&self, room: &str) -> bool {
        Rooms::has_room(self, room)
    }

    fn room_names(&self) -> Vec<String> {
        self.hub
            .channels()
            .into_iter()
            .filter(|(_, kind)| kind.stream)
            .filter_map(|(channel, _)| channel_stream(&channel).map(|room| room.into_owned()))
            .collect()
    }

    fn position(&self, room: &str) -> u64 {
        Rooms::position(self, room)
    }

    fn epoch(&self) -> String {
        Rooms::epoch(self)
    }

    fn observe_epoch(&self, epoch: &str) -> bool {
        Rooms::observe_epoch(self, epoch)
    }

    fn watched_polls(&self) -> Vec<i64> {
        self.hub
            .channels()
            .into_iter()
            .filter_map(|(channel, _)| channel.strip_prefix("poll:")?.parse().ok())
            .collect()
    }

    fn user_count(&self, room: &str) -> usize {
        Rooms::user_count(self, room)
    }

    fn local_users(&self) -> BTreeMap<String, Vec<String>> {
        self.hub
            .present()
            .into_iter()
            .filter_map(|(channel, users)| Some((channel_room(&channel)?.to_owned(), users)))
            .collect()
    }

    fn infos(&self, room: &str) -> BTreeMap<String, Vec<Box<RawValue>>> {
        self.hub.infos(&room_channel(room))
    }

    fn share_presence(&self, tx: mpsc::UnboundedSender<Shared>) {
        self.hub
            .on_presence(Box::new(move |channel, user, change, info| {
                if let Some(room) = channel_stream(channel) {
                    let _ = tx.send(Shared {
                        room: room.into_owned(),
                        user: user.to_owned(),
                        change,
                        info: info.map(ToOwned::to_owned),
                    });
                }
            }));
    }

    fn follow_rooms(&self, tx: mpsc::UnboundedSender<Arc<str>>) {
        self.hub.on_interest(Box::new(move |channel| {
            if let Some(room) = channel_stream(channel) {
                let _ = tx.send(Arc::from(room.as_ref()));
            }
        }));
    }
}

/// A failed job is told to its socket as an `error` event.
impl Sender for Outbox {
    fn failed(&self, text: &str) {
        let event = serde_json::json!({"type": "error", "error": text});
        let _ = self.push(Outgoing {
            id: 0,
            sub: 0,
            msg: encode(&event),
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::Relaxed;

    use super::*;
    use crate::metrics::Metrics;
    use crate::node::hub::{Verdict, PRESENCE_LIMIT};

    fn counted(queue_len: usize) -> (Arc<Metrics>, Arc<Rooms>) {
        let metrics = Arc::new(Metrics::default());
        (metrics.clone(), Rooms::new(Hub::new(queue_len, metrics)))
    }

    /// Delivers a message and counts whom it reached by the metrics.
    fn deliver(metrics: &Metrics, rooms: &Rooms, message: &ChatMessage) -> u64 {
        let before = metrics.messages_out.load(Relaxed);
        rooms.deliver(message);
        metrics.messages_out.load(Relaxed) - before
    }

    fn text(o: &Outgoing) -> &str {
        std::str::from_utf8(o.msg.payload()).unwrap()
    }

    fn message(room: &str, id: u64) -> ChatMessage {
        ChatMessage {
            id,
            room: room.into(),
            user: "ann".into(),
            text: "hi".into(),
            ts: "2026-01-01T00:00:00.000Z".into(),
            guest: false,
            epoch: None,
        }
    }

    #[test]
    fn presence_counts_users_not_connections() {
        let rooms = Rooms::new(Hub::new(16, Arc::default()));
        let ann = rooms.join("r", "ann").subscription;
        let ben1 = rooms.join("r", "ben");
        assert_eq!(ben1.members, ["ann", "ben"]);
        let ben2 = rooms.join("r", "ben");
        assert_eq!(ben2.members, ["ann", "ben"]);
        drop(ben1);
        drop(ben2);
        let join = ann.outbox.try_recv().unwrap();
        assert!(text(&join).contains("\"event\":\"join\""));
        let leave = ann.outbox.try_recv().unwrap();
        assert!(text(&leave).contains("\"event\":\"leave\""));
        assert!(
            ann.outbox.try_recv().is_none(),
            "one join and one leave for two connections"
        );
    }

    #[test]
    fn a_crowd_is_counted_not_listed_and_its_comings_and_goings_are_not_told() {
        let rooms = Rooms::new(Hub::new(4, Arc::default()));
        let first = rooms.join("r", "u0").subscription;
        let mut others = Vec::new();
        for i in 1..PRESENCE_LIMIT {
            others.push(rooms.join("r", &format!("u{i}")));
            while first.outbox.try_recv().is_some() {}
        }
        assert_eq!(others.last().unwrap().members.len(), PRESENCE_LIMIT);
        let crowd = rooms.join("r", "one-too-many");
        assert_eq!((crowd.users, crowd.members.len()), (PRESENCE_LIMIT + 1, 0));
        assert!(first.outbox.try_recv().is_none(), "no join past the limit");
        assert_eq!(rooms.user_count("r"), PRESENCE_LIMIT + 1);
        others.pop();
        assert!(first.outbox.try_recv().is_none(), "no leave from a crowd");
        others.pop();
        let leave = first.outbox.try_recv().expect("told again at the limit");
        assert!(text(&leave).contains("\"event\":\"leave\""));
        assert!(text(&leave).contains(&format!("\"count\":{}", PRESENCE_LIMIT - 1)));
    }

    #[test]
    fn full_queue_marks_only_that_subscriber_slow() {
        let (metrics, rooms) = counted(2);
        let slow = rooms.join("r", "slow").subscription;
        let fast = rooms.join("r", "fast").subscription;
        for id in 1..=3 {
            assert!(deliver(&metrics, &rooms, &message("r", id)) >= 1);
            while fast.outbox.try_recv().is_some() {}
        }
        assert!(slow.outbox.is_slow());
        assert!(!fast.outbox.is_slow());
        assert_eq!(metrics.messages_out.load(Relaxed), 5);
    }

    #[test]
    fn a_new_epoch_resets_every_room_and_its_members() {
        let (metrics, rooms) = counted(16);
        assert!(
            !rooms.observe_epoch("a"),
            "the first epoch seen is no change"
        );
        let ann = rooms.join("r", "ann").subscription;
        assert_eq!(deliver(&metrics, &rooms, &message("r", 7)), 1);
        assert_eq!(rooms.position("r"), 7);
        assert!(!rooms.observe_epoch("a"));
        assert_eq!(ann.outbox.verdict(), None);
        let mut lost = message("r", 1);
        lost.epoch = Some("b".into());
        // Id 1 of the new stream is below what was delivered, yet it is a new message.
        rooms.deliver(&lost);
        assert_eq!(rooms.epoch(), "b");
        assert_eq!(ann.outbox.verdict(), Some(Verdict::Reset));
        assert_eq!(rooms.position("r"), 1, "the new stream's ids are followed");
        let ben = rooms.join("r", "ben").subscription;
        assert_eq!(ben.outbox.verdict(), None, "later members are not reset");
    }

    #[test]
    fn rooms_are_listed_in_pages_by_name() {
        let rooms = Rooms::new(Hub::new(4, Arc::default()));
        let held: Vec<_> = ["c", "a", "d", "b"]
            .into_iter()
            .map(|r| rooms.join(r, "ann"))
            .collect();
        let _own = rooms.join(&crate::wire::personal("ann"), "ann");
        let _two = rooms.join("b", "ben");
        let names = |page: Vec<(String, usize)>| page.into_iter().map(|r| r.0).collect::<Vec<_>>();
        assert_eq!(names(rooms.rooms_page(None, 2)), ["a", "b"]);
        assert_eq!(rooms.rooms_page(Some("a"), 1), [("b".to_owned(), 2)]);
        assert_eq!(
            names(rooms.rooms_page(Some("b"), 10)),
            ["c", "d"],
            "no user streams"
        );
        drop(held);
        assert_eq!(names(rooms.rooms_page(None, 10)), ["b"]);
    }

    #[test]
    fn empty_rooms_are_forgotten() {
        let (metrics, rooms) = counted(4);
        let s = rooms.join("r", "ann");
        assert_eq!(rooms.rooms_page(None, 10), [("r".to_owned(), 1)]);
        drop(s);
        assert!(rooms.rooms_page(None, 10).is_empty());
        assert_eq!(deliver(&metrics, &rooms, &message("r", 1)), 0);
    }

    #[test]
    fn each_format_is_encoded_once_and_reaches_its_speakers() {
        let (metrics, rooms) = counted(16);
        let room = rooms.join("r", "ann").subscription;
        let user: Arc<str> = Arc::from("ben");
        let outbox = rooms.hub().outbox(&user, Format::Channels);
        let channels = rooms.join_with("r", &user, Some(outbox), Format::Channels);
        let channels = channels.subscription;
        room.outbox.take_all();
        assert_eq!(deliver(&metrics, &rooms, &message("r", 1)), 2);
        let (a, b) = (
            room.outbox.try_recv().unwrap(),
            channels.outbox.try_recv().unwrap(),
        );
        assert!(text(&a).starts_with(r#"{"type":"message""#), "{}", text(&a));
        assert!(
            text(&b).starts_with(r#"{"type":"pub","channel":"room:r""#),
            "{}",
            text(&b)
        );
        assert!(!Arc::ptr_eq(&a.msg, &b.msg));
        drop(channels);
        room.outbox.take_all();
        assert_eq!(deliver(&metrics, &rooms, &message("r", 2)), 1);
    }

    #[test]
    fn rooms_over_every_shard_are_kept_listed_and_reset() {
        let (metrics, rooms) = counted(4);
        assert!(!rooms.observe_epoch("a"));
        let names: Vec<String> = (0..200).map(|i| format!("room{i:03}")).collect();
        let held: Vec<_> = names.iter().map(|r| rooms.join(r, "ann")).collect();
        assert_eq!(rooms.room_count(), 200);
        let mut listed = rooms.room_names();
        listed.sort();
        assert_eq!(listed, names);
        assert_eq!(rooms.local_users().len(), 200);
        let page: Vec<String> = rooms
            .rooms_page(Some("room099"), 3)
            .into_iter()
            .map(|r| r.0)
            .collect();
        assert_eq!(page, ["room100", "room101", "room102"]);
        for (i, room) in names.iter().enumerate() {
            assert_eq!(deliver(&metrics, &rooms, &message(room, 5)), 1, "room {i}");
        }
        assert!(rooms.observe_epoch("b"));
        for joined in &held {
            assert_eq!(joined.subscription.outbox.verdict(), Some(Verdict::Reset));
        }
        assert!(names.iter().all(|room| rooms.position(room) == 0));
        drop(held);
        assert_eq!(rooms.room_count(), 0);
        assert!(rooms.hub().channels().is_empty());
    }
}
