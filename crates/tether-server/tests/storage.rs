//! Limits on what is stored, over real sockets: the room cap, `GET /api/rooms` in pages that
//! list every room once, and a database that cannot grow (a full disk) reported by
//! `/healthz` as it reports a lost Redis.

use serde_json::{json, Value};
use tether_server::engine::store::{now_rfc3339, ChatMessage, Store};

mod common;
use common::*;

/// Stores one message in each of `rooms` rooms named `r0000`, `r0001`, … directly (then, on
/// Redis, imported: [`Setup::seed`]).
fn fill(dir: &std::path::Path, rooms: usize) {
    let mut store = Store::open(dir).unwrap();
    let batch = store.batch().unwrap();
    for i in 0..rooms {
        let room = format!("r{i:04}");
        let m = ChatMessage {
            id: 1,
            room: room.clone(),
            user: "old".into(),
            text: "hi".into(),
            ts: now_rfc3339(),
            guest: false,
            epoch: None,
        };
        batch.insert_message(&m, None).unwrap();
        batch.set_room(&room, 1).unwrap();
    }
    batch.commit().unwrap();
}

/// The `Link: <…>; rel="next"` target of a response head, if any.
fn next_link(head: &str) -> Option<String> {
    let line = head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("link:"))?;
    let start = line.find('<')? + 1;
    let end = line.find('>')?;
    Some(line[start..end].to_owned())
}

async fn rooms_are_listed_in_pages_and_capped(kind: Kind) {
    let setup = Setup::new(kind);
    setup.seed(|dir| fill(dir, 250)).await;
    setup.add_user("ops", "pw").await;
    let mut c = setup.config();
    c.max_rooms = 252;
    c.api_publish_rate = 1000;
    let server = start(c).await;
    // A room with a member and no stored message, named between stored ones.
    let mut ann = connect(&server.ws("/ws/rooms/r0100x?name=ann")).await;
    next_of(&mut ann, "ready").await;

    // Every room once, in name order, 100 at a time, following the links.
    let mut path = Some("/api/rooms".to_owned());
    let mut seen: Vec<Value> = Vec::new();
    let mut pages = 0;
    while let Some(p) = path {
        let (status, head, page) =
            http_from([127, 0, 0, 1].into(), server.addr, "GET", &p, &[], None).await;
        assert_eq!(status, 200, "{head}");
        let page = page.as_array().unwrap().clone();
        assert!(page.len() <= 100);
        seen.extend(page);
        path = next_link(&head);
        pages += 1;
        assert!(pages < 10, "the links end");
    }
    let names: Vec<&str> = seen.iter().map(|r| r["room"].as_str().unwrap()).collect();
    assert_eq!(names.len(), 251, "250 stored rooms and one live one");
    assert!(
        names.windows(2).all(|w| w[0] < w[1]),
        "in order, none twice"
    );
    let live = seen.iter().find(|r| r["room"] == "r0100x").unwrap();
    assert_eq!(
        (live["members"].as_u64(), live["last_id"].as_u64()),
        (Some(1), Some(0))
    );
    let (status, page) = http(
        server.addr,
        "GET",
        "/api/rooms?after=r0248&limit=5",
        &[],
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(page, json!([{"room": "r0249", "members": 0, "last_id": 1}]));

    // Two more rooms may start; the next is refused, over the API and over a socket.
    let bearer = token(server.addr, "ops", "pw").await;
    let auth = format!("Bearer {bearer}");
    for room in ["new1", "new2"] {
        let (status, body) = http(
            server.addr,
            "POST",
            &format!("/api/rooms/{room}/messages"),
            &[("Authorization", &auth)],
            Some(json!({"text": "first"})),
        )
        .await;
        assert_eq!(status, 201, "{body}");
    }
    let (status, body) = http(
        server.addr,
        "POST",
        "/api/rooms/new3/messages",
        &[("Authorization", &auth)],
        Some(json!({"text": "first"})),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("max_rooms"),
        "{body}"
    );
    let mut ben = connect(&server.ws("/ws/rooms/new4?name=ben")).await;
    next_of(&mut ben, "ready").await;
    say(&mut ben, "hello?").await;
    let e = next_of(&mut ben, "error").await;
    assert!(e["error"].as_str().unwrap().contains("max_rooms"), "{e}");
    // A room with members but no stored message is not stored either; existing rooms go on,
    // and the refusals are not storage failures.
    say(&mut ann, "still here").await;
    let e = next_of(&mut ann, "error").await;
    assert!(e["error"].as_str().unwrap().contains("max_rooms"), "{e}");
    let mut cy = connect(&server.ws("/ws/rooms/r0001?name=cy")).await;
    next_of(&mut cy, "ready").await;
    say(&mut cy, "still here").await;
    assert_eq!(next_of(&mut cy, "message").await["id"], 2);
    let (status, _) = http(server.addr, "GET", "/healthz", &[], None).await;
    assert_eq!(status, 200);
    server.stop().await;
}

async fn one_person_may_start_only_so_many_rooms(kind: Kind) {
    let dir = Setup::new(kind);
    dir.add_user("ops", "pw").await;
    dir.add_user("eve", "pw").await;
    let mut c = dir.config();
    c.rooms_per_hour = 3;
    let server = start(c).await;
    let publish = |auth: String, room: &'static str| {
        let addr = server.addr;
        async move {
            http(
                addr,
                "POST",
                &format!("/api/rooms/{room}/messages"),
                &[("Authorization", &auth)],
                Some(json!({"text": "hi"})),
            )
            .await
        }
    };
    let ops = format!("Bearer {}", token(server.addr, "ops", "pw").await);
    let eve = format!("Bearer {}", token(server.addr, "eve", "pw").await);
    for room in ["a1", "a2", "a3"] {
        assert_eq!(publish(ops.clone(), room).await.0, 201);
    }
    let (status, body) = publish(ops.clone(), "a4").await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("rooms_per_hour"),
        "{body}"
    );
    // Existing rooms take more; someone else may start one.
    assert_eq!(publish(ops.clone(), "a1").await.0, 201);
    assert_eq!(publish(eve, "a4").await.0, 201);
    // A guest over a socket spends its address's budget.
    let mut gus = connect(&server.ws("/ws/rooms/g1?name=gus")).await;
    next_of(&mut gus, "ready").await;
    say(&mut gus, "hi").await;
    assert_eq!(next_of(&mut gus, "message").await["id"], 1);
    server.stop().await;
}

#[tokio::test]
async fn a_database_that_cannot_grow_is_reported_by_healthz() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.max_database_mb = 1;
    c.message_rate = 10_000.0;
    c.identity_message_rate = 10_000;
    let server = start(c).await;
    let mut ann = connect(&server.ws("/ws/rooms/big?name=ann")).await;
    next_of(&mut ann, "ready").await;
    let text = "x".repeat(4000);
    // About 1 MiB of 4 KB messages fills it; a failed write comes back as an error event.
    let mut failed = None;
    for _ in 0..400 {
        say(&mut ann, &text).await;
        let event = next(&mut ann).await;
        if event["type"] == "error" {
            failed = Some(event);
            break;
        }
        assert_eq!(event["type"], "message", "{event}");
    }
    let failed = failed.expect("a 1 MiB database is full after 400 messages of 4 KB");
    assert!(
        failed["error"].as_str().unwrap().contains("not stored"),
        "{failed}"
    );
    let (status, health) = http(server.addr, "GET", "/healthz", &[], None).await;
    assert_eq!(
        (status, health),
        (503, json!({"status": "degraded", "storage": "failing"}))
    );
    let metrics = http_text(server.addr, "/metrics").await;
    assert!(metrics.contains("tether_storage_failing 1"), "{metrics}");
    // Reading goes on.
    let (status, page) = http(
        server.addr,
        "GET",
        "/api/rooms/big/messages?limit=2",
        &[],
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(page.as_array().unwrap().len(), 2);
    server.stop().await;
}

async fn a_message_sent_again_with_its_key_is_stored_once(kind: Kind) {
    let dir = Setup::new(kind);
    dir.add_user("ops", "pw").await;
    let server = start(dir.config()).await;
    let auth = format!("Bearer {}", token(server.addr, "ops", "pw").await);
    let publish = |key: &'static str, text: &'static str| {
        let auth = auth.clone();
        let addr = server.addr;
        async move {
            http(
                addr,
                "POST",
                "/api/rooms/keys/messages",
                &[("Authorization", &auth), ("Idempotency-Key", key)],
                Some(json!({ "text": text })),
            )
            .await
        }
    };
    let (status, first) = publish("order-17", "deliver at 9").await;
    assert_eq!(status, 201, "{first}");
    // A retry (the client never saw the answer) is answered with the stored message.
    let (status, again) = publish("order-17", "deliver at 9").await;
    assert_eq!((status, &again), (201, &first));
    let (status, other) = publish("order-18", "deliver at 10").await;
    assert_eq!((status, other["id"].as_u64()), (201, Some(2)));
    let (status, body) = publish("has space", "x").await;
    assert_eq!(status, 400, "{body}");

    // Over a socket: the second send with the key stores nothing and delivers nothing.
    let mut ann = connect(&server.ws("/ws/rooms/keys?name=ann")).await;
    next_of(&mut ann, "ready").await;
    for _ in 0..2 {
        let m = json!({"text": "once", "key": "ann-1"}).to_string();
        ann.send(tether::Message::text(m)).await.unwrap();
    }
    say(&mut ann, "after").await;
    let texts = [
        next_of(&mut ann, "message").await,
        next_of(&mut ann, "message").await,
    ];
    assert_eq!(
        texts
            .iter()
            .map(|m| (m["id"].as_u64().unwrap(), m["text"].as_str().unwrap()))
            .collect::<Vec<_>>(),
        [(3, "once"), (4, "after")]
    );
    let (_, page) = http(server.addr, "GET", "/api/rooms/keys/messages", &[], None).await;
    assert_eq!(page.as_array().unwrap().len(), 4);
    server.stop().await;
}

on_both_engines!(
    a_message_sent_again_with_its_key_is_stored_once,
    one_person_may_start_only_so_many_rooms,
    rooms_are_listed_in_pages_and_capped,
);
