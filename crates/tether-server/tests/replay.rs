//! History replay over real sockets: a long history is replayed in pages, so clients that ask for
//! all of it and never read cost a bounded amount; the write timeout drops them; the replay
//! limit skips what is older and says so.
//!
//! One test binary of its own: the memory test reads this process's RSS, which other tests
//! running beside it would disturb; its two runs (one per engine) take turns ([`TURN`]).

use std::time::Duration;

use serde_json::{json, Value};
use tether_server::engine::store::{now_rfc3339, ChatMessage, Store};

mod common;
use common::*;

const MESSAGES: u64 = 10_000;

/// One run at a time: each reads the process's RSS.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Stores MESSAGES messages of ~4 KB in room `big`, as a busy room would have kept (then, on
/// Redis, imported: [`Setup::seed`]).
fn fill(dir: &std::path::Path) {
    let mut store = Store::open(dir).unwrap();
    let batch = store.batch().unwrap();
    let text = "x".repeat(4000);
    for id in 1..=MESSAGES {
        let m = ChatMessage {
            id,
            room: "big".into(),
            user: "old".into(),
            text: text.clone(),
            ts: now_rfc3339(),
            guest: false,
            epoch: None,
        };
        batch.insert_message(&m, None).unwrap();
    }
    // As the journal does after each batch: the rooms table lists the room and its last id.
    batch.set_room("big", MESSAGES).unwrap();
    batch.commit().unwrap();
}

async fn replay_is_paged_bounded_in_memory_and_limited(kind: Kind) {
    let _turn = TURN.lock().await;
    let setup = Setup::new(kind);
    setup.seed(fill).await;

    // 1. A client reading everything gets the whole history, in order, then ready.
    let mut c = setup.config();
    c.max_replay = MESSAGES as usize;
    let server = start(c).await;
    let mut reader = connect(&server.ws("/ws/rooms/big?name=reader&since=0")).await;
    let welcome = next(&mut reader).await;
    assert_eq!(welcome["type"], "welcome");
    assert_eq!(welcome.get("truncated"), None);
    for id in 1..=MESSAGES {
        assert_eq!(next(&mut reader).await["id"], id);
    }
    assert_ready(&next(&mut reader).await, MESSAGES);
    drop(reader);

    // 2. Twenty clients ask for all 40 MB of it and never read: each holds one page and its
    //    socket's write buffer, not the history.
    let before = rss_kib();
    let mut stuck = Vec::new();
    for i in 0..20 {
        stuck.push(
            raw_upgrade(
                server.addr,
                &format!("/ws/rooms/big?name=stuck{i}&since=0"),
                Some(4096),
            )
            .await,
        );
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let grown = rss_kib().saturating_sub(before);
    println!(
        "20 clients replaying {MESSAGES} messages of 4 KB without reading: RSS grew {grown} KiB"
    );
    assert!(grown < 100 << 10, "RSS grew {grown} KiB");
    // The same over the channel protocol: twenty clients subscribe with `since: 0` and never
    // read.
    let before = rss_kib();
    let mut silent = Vec::new();
    for i in 0..20 {
        let url = server.ws(&format!("/ws?name=silent{i}"));
        let builder = tether::ClientBuilder::new(&url)
            .unwrap()
            .protocol("tether.v1");
        let (mut ws, _) = within(builder.connect()).await.unwrap();
        for command in [
            json!({"id": 1, "op": "connect"}),
            json!({"id": 2, "op": "subscribe", "channel": "room:big", "since": 0}),
        ] {
            ws.send(tether::Message::text(command.to_string()))
                .await
                .unwrap();
        }
        silent.push(ws);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let grown = rss_kib().saturating_sub(before);
    println!(
        "20 channel clients replaying {MESSAGES} messages of 4 KB without reading: RSS grew {grown} KiB"
    );
    assert!(grown < 100 << 10, "RSS grew {grown} KiB on /ws");
    drop(silent);
    // Meanwhile the room works for everyone else.
    let mut ann = connect(&server.ws("/ws/rooms/big?name=ann")).await;
    next_of(&mut ann, "ready").await;
    say(&mut ann, "still here").await;
    assert_eq!(next_of(&mut ann, "message").await["id"], MESSAGES + 1);
    drop(stuck);
    server.stop().await;

    // 3. The write timeout drops a client that accepts nothing.
    let mut c = setup.config();
    c.max_replay = MESSAGES as usize;
    c.write_timeout = Duration::from_secs(1);
    let server = start(c).await;
    let _stuck = raw_upgrade(server.addr, "/ws/rooms/big?name=stuck&since=0", Some(4096)).await;
    // Dropped for the write timeout, and its slot freed (within the test's time limit).
    let dropped = async {
        loop {
            let metrics = http_text(server.addr, "/metrics").await;
            let timeouts = metric(&metrics, "tether_write_timeouts_total");
            if timeouts == 1 && metric(&metrics, "tether_connections") == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    within(dropped).await;
    server.stop().await;

    // 4. With the default replay limit, a resume from the beginning gets the last 1,000 and
    //    is told that older ones were skipped.
    let server = start(setup.config()).await;
    let mut late = connect(&server.ws("/ws/rooms/big?name=late&since=0")).await;
    let welcome: Value = next(&mut late).await;
    assert_eq!(welcome["truncated"], true, "{welcome}");
    // The room's last id is MESSAGES + 1 (ann's message): 1,000 back from it.
    assert_eq!(next(&mut late).await["id"], MESSAGES + 2 - 1000);
    let ready = next_of(&mut late, "ready").await;
    assert_eq!(ready["last_id"], MESSAGES + 1);
    server.stop().await;
}

on_both_engines!(multi_thread: replay_is_paged_bounded_in_memory_and_limited);
