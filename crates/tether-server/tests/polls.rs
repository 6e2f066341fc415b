//! The polls contract, one test body run against both engines: the node's SQLite file (votes
//! through the journal) and a real `redis-server`. What one answers, the other must answer too.

use std::sync::Arc;
use std::time::Duration;

use tether_server::engine::journal::{Journal, Reply, VoteWrite};
use tether_server::engine::polls::{RedisPolls, SqlitePolls};
use tether_server::engine::store::{Db, Store, Voter};
use tether_server::engine::Polls;
use tether_server::metrics::Metrics;
use tether_server::node::hub::Hub;
use tether_server::node::rooms::Rooms;

mod common;

/// Votes `option` in poll `poll` as `voter`: counted or not.
async fn vote(polls: &dyn Polls, poll: i64, voter: &Voter, option: &str) -> bool {
    Reply::wait(|reply| {
        polls.vote(VoteWrite {
            poll,
            voter: voter.clone(),
            option: option.to_owned(),
            reply,
        })
    })
    .await
    .unwrap()
}

fn user(name: &str) -> Voter {
    Voter {
        key: name.to_owned(),
        guest: None,
    }
}

/// A guest voting from `address`, where at most two guests may vote.
fn guest(id: &str, address: &str) -> Voter {
    Voter {
        key: format!("guest:{id}"),
        guest: Some((address.to_owned(), 2)),
    }
}

async fn contract(polls: &dyn Polls) {
    assert_eq!(polls.list(10).await.unwrap(), [], "none yet");
    let options = |list: &[&str]| list.iter().map(|o| o.to_string()).collect::<Vec<_>>();
    let first = polls
        .create("Tabs or spaces?", &options(&["tabs", "spaces"]))
        .await
        .unwrap();
    let second = polls
        .create("Lunch?", &options(&["soup", "salad", "nothing"]))
        .await
        .unwrap();
    assert!(second.id > first.id, "{} then {}", first.id, second.id);
    assert_eq!(second.counts.values().sum::<u64>(), 0);
    assert_eq!(second.counts.len(), 3);

    // Listed newest first, as created.
    let listed = polls.list(10).await.unwrap();
    assert_eq!(listed, [second.clone(), first.clone()]);
    assert_eq!(polls.list(1).await.unwrap(), std::slice::from_ref(&second));

    // Votes count once per voter; a second vote moves it.
    let (ann, bob) = (user("ann"), user("bob"));
    assert!(vote(polls, first.id, &ann, "tabs").await);
    assert!(vote(polls, first.id, &bob, "tabs").await);
    assert!(vote(polls, first.id, &ann, "tabs").await);
    assert!(vote(polls, first.id, &bob, "spaces").await);
    let (poll, ann_vote) = polls.poll(first.id, Some("ann")).await.unwrap();
    let poll = poll.unwrap();
    assert_eq!(
        (poll.counts["tabs"], poll.counts["spaces"], poll.total),
        (1, 1, 2)
    );
    assert_eq!(ann_vote.as_deref(), Some("tabs"));
    assert_eq!(polls.poll(first.id, Some("carol")).await.unwrap().1, None);

    // No such option, no such poll.
    assert!(!vote(polls, first.id, &ann, "both").await);
    assert!(!vote(polls, 9_999, &ann, "tabs").await);
    assert_eq!(polls.poll(9_999, None).await.unwrap(), (None, None));

    // Two guests per address: a third is refused, the first may change its mind, and
    // another address is another budget.
    let here = ["g1", "g2", "g3"].map(|g| guest(g, "10.0.0.1"));
    assert!(vote(polls, second.id, &here[0], "soup").await);
    assert!(vote(polls, second.id, &here[1], "soup").await);
    assert!(!vote(polls, second.id, &here[2], "soup").await);
    assert!(vote(polls, second.id, &here[0], "salad").await);
    assert!(vote(polls, second.id, &guest("g4", "10.0.0.2"), "nothing").await);
    let poll = polls.poll(second.id, None).await.unwrap().0.unwrap();
    let counts: Vec<u64> = ["soup", "salad", "nothing"]
        .iter()
        .map(|o| poll.counts[*o])
        .collect();
    assert_eq!(counts, [1, 1, 1]);
    assert_eq!(polls.list(10).await.unwrap()[0], poll);
}

#[tokio::test]
async fn polls_in_sqlite_keep_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::default());
    let hub = Rooms::new(Hub::new(64, metrics.clone()));
    let quota = Arc::new(tether_server::throttle::Throttle::new(
        100,
        Duration::from_secs(1),
        100,
    ));
    let journal = Journal::start(
        Store::open(dir.path()).unwrap(),
        hub.clone(),
        metrics,
        100,
        100,
        quota,
    )
    .unwrap();
    let db = Db::new(Store::open(dir.path()).unwrap()).unwrap();
    contract(&SqlitePolls::new(db, journal, hub)).await;
}

#[tokio::test]
async fn polls_in_redis_keep_the_contract() {
    let redis = common::RedisServer::start();
    let commands =
        tether_server::engine::link::Link::open(&redis.url, std::time::Duration::from_secs(2))
            .unwrap();
    let hub = Rooms::new(Hub::new(64, Arc::new(Metrics::default())));
    contract(&RedisPolls::new(commands, "test".into(), hub)).await;
}
