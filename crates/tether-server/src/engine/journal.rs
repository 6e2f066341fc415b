//! The journal: one writer thread that stores chat messages and votes in batches, then
//! delivers them.
//!
//! Ids are assigned here, in commit order, so they are strictly increasing per room. A message
//! is handed to the hub only after its batch is committed: whatever a client has seen is
//! durable, and a client that resumes from an id finds every later message either in the store
//! or still to come live. Batching turns many small transactions into one commit.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::local::{Local, Sender};
use crate::engine::store::{now_rfc3339, ChatMessage, Store, StoreError, VoteOutcome, Voter};
use crate::metrics::Metrics;

const BATCH: usize = 512;

/// Where the outcome of a job goes.
#[derive(Debug)]
pub enum Reply<T> {
    /// To a waiting caller (the HTTP API).
    Wait(oneshot::Sender<Result<T, StoreError>>),
    /// A failure is told to the socket that sent the job.
    Socket(Arc<dyn Sender>),
}

impl<T> Reply<T> {
    /// Submits a job made with a waiting reply, then waits for its outcome.
    ///
    /// # Errors
    /// What `submit` or the job's outcome says; [`StoreError::Closed`] when the job was
    /// dropped unanswered.
    pub async fn wait<F, Fut>(submit: F) -> Result<T, StoreError>
    where
        F: FnOnce(Reply<T>) -> Fut,
        Fut: std::future::Future<Output = Result<(), StoreError>>,
    {
        let (tx, rx) = oneshot::channel();
        submit(Reply::Wait(tx)).await?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Hands over the outcome; a failure sent to a socket reads "`what`: error", or for an
    /// outcome that is unknown, "message outcome unknown …".
    pub fn send(self, result: Result<T, StoreError>, what: &str) {
        match self {
            Reply::Wait(tx) => {
                let _ = tx.send(result);
            }
            Reply::Socket(tx) => {
                if let Err(e) = result {
                    let text = match e {
                        StoreError::Unknown(_) => format!("message {e}"),
                        _ => format!("{what}: {e}"),
                    };
                    tx.failed(&text);
                }
            }
        }
    }
}

/// New rooms one identity may start: a token bucket per user or guest address.
pub type RoomQuota = std::sync::Arc<crate::throttle::Throttle<crate::identity::auth::Writer>>;

/// What a client past its [`RoomQuota`] is told.
pub const ROOM_QUOTA: &str =
    "you have started too many rooms lately (rooms_per_hour): use an existing room or wait";

/// A chat message to store, by the journal or by the cluster's appender (see
/// [`crate::node::Node::publish`]).
#[derive(Debug)]
pub struct ChatWrite {
    /// The room.
    pub room: String,
    /// The sender.
    pub user: String,
    /// The text (already validated).
    pub text: String,
    /// The sender's idempotency key: a message it sent to this room with the same key,
    /// while kept, is answered again instead of storing another.
    pub key: Option<String>,
    /// Whose budget of new rooms a message that starts one spends.
    pub writer: crate::identity::auth::Writer,
    /// Where the stored message (or the failure) goes.
    pub reply: Reply<ChatMessage>,
}

/// A vote to record, by the journal or in Redis (see [`crate::engine::Polls::vote`]).
#[derive(Debug)]
pub struct VoteWrite {
    /// The poll.
    pub poll: i64,
    /// The voter.
    pub voter: Voter,
    /// The chosen option.
    pub option: String,
    /// `Ok(false)` when the poll or option does not exist, or the voter's address is full.
    pub reply: Reply<bool>,
}

impl VoteWrite {
    /// Hands over what became of the vote: a socket is told why one was not counted.
    pub fn answer(self, outcome: VoteOutcome) {
        let reply = self.reply;
        match (outcome, reply) {
            (VoteOutcome::Counted, reply) => reply.send(Ok(true), "vote"),
            (refused, reply @ Reply::Socket(_)) => {
                let why = match refused {
                    VoteOutcome::AddressFull => {
                        "too many guests have voted in this poll from your address: log in to vote"
                    }
                    _ => "unknown option",
                };
                reply.send(Err(StoreError::Failed(why.into())), "vote");
            }
            (_, reply @ Reply::Wait(_)) => reply.send(Ok(false), "vote"),
        }
    }
}

/// A write for the journal.
#[derive(Debug)]
pub enum Job {
    /// Store and deliver a chat message.
    Chat(ChatWrite),
    /// Record a vote and deliver the poll's new counts.
    Vote(VoteWrite),
    /// Answers once every earlier job is committed and delivered.
    Flush(oneshot::Sender<()>),
}

/// The handle that submits jobs to the writer thread.
#[derive(Debug, Clone)]
pub struct Journal {
    tx: mpsc::Sender<Job>,
}

impl Journal {
    /// Starts the writer thread on `store`.
    ///
    /// # Errors
    /// The thread cannot be spawned.
    pub fn start(
        store: Store,
        hub: Arc<dyn Local>,
        metrics: Arc<Metrics>,
        history_limit: usize,
        max_rooms: usize,
        room_quota: RoomQuota,
    ) -> Result<Journal, StoreError> {
        let rooms = store.room_count()?;
        let (tx, rx) = mpsc::channel(4096);
        std::thread::Builder::new()
            .name("tether-journal".into())
            .spawn(move || {
                Writer {
                    store,
                    hub,
                    metrics,
                    history_limit,
                    max_rooms,
                    room_quota,
                    rooms,
                    last_ids: HashMap::new(),
                }
                .run(rx);
            })
            .map_err(|e| StoreError::Failed(format!("starting the journal: {e}")))?;
        Ok(Journal { tx })
    }

    /// Queues a job, waiting while the journal is full (backpressure).
    ///
    /// # Errors
    /// [`StoreError::Closed`] when the writer thread has stopped.
    pub async fn submit(&self, job: Job) -> Result<(), StoreError> {
        self.tx.send(job).await.map_err(|_| StoreError::Closed)
    }

    /// Waits until every job submitted before is committed and delivered.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Job::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

struct Writer {
    store: Store,
    hub: Arc<dyn Local>,
    metrics: Arc<Metrics>,
    history_limit: usize,
    /// Rooms with stored messages at most; a message to a new room past it is refused.
    max_rooms: usize,
    /// New rooms per identity.
    room_quota: RoomQuota,
    /// Rooms with stored messages (only this thread adds rooms).
    rooms: usize,
    /// The last id of each room this thread has stored (ids are only assigned here).
    last_ids: HashMap<String, u64>,
}

enum Outcome {
    Chat(ChatMessage),
    /// Stored before under the same idempotency key: answered again, not delivered again.
    Again(ChatMessage),
    /// Not stored: a limit is reached.
    Refused(StoreError),
    Vote(VoteOutcome),
    Flush,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        let mut jobs = Vec::with_capacity(BATCH);
        while let Some(first) = rx.blocking_recv() {
            jobs.push(first);
            while jobs.len() < BATCH {
                match rx.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
            match self.store_batch(&jobs) {
                Ok((outcomes, counts)) => {
                    self.metrics.stored(true);
                    for (job, outcome) in jobs.drain(..).zip(outcomes) {
                        self.finish(job, outcome);
                    }
                    for (poll, counts) in counts {
                        self.hub.deliver_counts(poll, &counts);
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, jobs = jobs.len(), "storing a batch failed; nothing of it was delivered");
                    self.metrics.stored(false);
                    self.last_ids.clear();
                    for job in jobs.drain(..) {
                        self.fail(job, &e);
                    }
                }
            }
        }
        tracing::debug!("journal stopped");
    }

    #[allow(clippy::type_complexity)]
    fn store_batch(
        &mut self,
        jobs: &[Job],
    ) -> Result<(Vec<Outcome>, Vec<(i64, BTreeMap<String, u64>)>), StoreError> {
        if self.last_ids.len() > 100_000 {
            self.last_ids.clear();
        }
        let batch = self.store.batch()?;
        let mut outcomes = Vec::with_capacity(jobs.len());
        let mut rooms: HashMap<&str, u64> = HashMap::new();
        let mut polls = Vec::new();
        // Ids this batch assigns; they become the writer's only once the batch commits.
        let mut last_ids: HashMap<String, u64> = HashMap::new();
        let mut new_rooms = 0;
        for job in jobs {
            if let Job::Chat(ChatWrite { room, .. }) = job {
                if let Some(id) = self.last_ids.get(room) {
                    last_ids.insert(room.clone(), *id);
                }
            }
        }
        for job in jobs {
            outcomes.push(match job {
                Job::Chat(ChatWrite {
                    room,
                    user,
                    text,
                    key,
                    writer,
                    ..
                }) => {
                    if let Some(key) = key {
                        if let Some(earlier) = batch.keyed_message(room, user, key)? {
                            outcomes.push(Outcome::Again(earlier));
                            continue;
                        }
                    }
                    let last = match last_ids.get(room.as_str()) {
                        Some(id) => *id,
                        None => batch.last_id(room)?,
                    };
                    // A user's notification stream is no room: it starts with the user's
                    // first notification, whoever sends it, and counts against no cap.
                    if last == 0
                        && !rooms.contains_key(room.as_str())
                        && !crate::wire::is_personal(room)
                    {
                        if self.rooms + new_rooms >= self.max_rooms {
                            outcomes.push(Outcome::Refused(StoreError::Limit(format!(
                                "the server keeps at most {} rooms (max_rooms): pick an existing room",
                                self.max_rooms
                            ))));
                            continue;
                        }
                        // A room with members here was paid for by its first member
                        // (`Node::may_join_room`); one without is started by this message.
                        if !self.hub.has_room(room)
                            && self
                                .room_quota
                                .take(writer, std::time::Instant::now())
                                .is_err()
                        {
                            outcomes.push(Outcome::Refused(StoreError::Limit(
                                ROOM_QUOTA.to_owned(),
                            )));
                            continue;
                        }
                        new_rooms += 1;
                    }
                    let message = ChatMessage {
                        id: last + 1,
                        room: room.clone(),
                        user: user.clone(),
                        text: text.clone(),
                        ts: now_rfc3339(),
                        guest: writer.is_guest(),
                        epoch: None,
                    };
                    batch.insert_message(&message, key.as_deref())?;
                    last_ids.insert(room.clone(), message.id);
                    rooms.insert(room, message.id);
                    Outcome::Chat(message)
                }
                Job::Vote(VoteWrite {
                    poll,
                    voter,
                    option,
                    ..
                }) => {
                    let outcome = batch.vote(*poll, voter, option)?;
                    if outcome == VoteOutcome::Counted && !polls.contains(poll) {
                        polls.push(*poll);
                    }
                    Outcome::Vote(outcome)
                }
                Job::Flush(_) => Outcome::Flush,
            });
        }
        for (room, last) in &rooms {
            batch.set_room(room, *last)?;
            batch.retain(room, *last, self.history_limit)?;
        }
        let mut counts = Vec::with_capacity(polls.len());
        for poll in polls {
            if let Some(c) = batch.poll_counts(poll)? {
                counts.push((poll, c));
            }
        }
        batch.commit()?;
        self.rooms += new_rooms;
        self.last_ids.extend(last_ids);
        Ok((outcomes, counts))
    }

    fn finish(&self, job: Job, outcome: Outcome) {
        match (job, outcome) {
            (Job::Chat(ChatWrite { reply, .. }), Outcome::Chat(message)) => {
                self.hub.deliver(&message);
                reply.send(Ok(message), "message");
            }
            (Job::Chat(ChatWrite { reply, .. }), Outcome::Again(message)) => {
                reply.send(Ok(message), "message");
            }
            (Job::Chat(ChatWrite { reply, .. }), Outcome::Refused(e)) => {
                reply.send(Err(e), "message not stored");
            }
            (Job::Vote(vote), Outcome::Vote(outcome)) => vote.answer(outcome),
            (Job::Flush(tx), _) => {
                let _ = tx.send(());
            }
            _ => debug_assert!(false, "outcomes follow their jobs"),
        }
    }

    fn fail(&self, job: Job, e: &StoreError) {
        match job {
            Job::Chat(ChatWrite { reply, .. }) => {
                self.metrics.store_failures.fetch_add(1, Relaxed);
                reply.send(Err(StoreError::Failed(e.to_string())), "message not stored");
            }
            Job::Vote(VoteWrite { reply, .. }) => {
                self.metrics.store_failures.fetch_add(1, Relaxed);
                reply.send(Err(StoreError::Failed(e.to_string())), "vote not stored");
            }
            Job::Flush(tx) => {
                let _ = tx.send(());
            }
        }
    }
}
