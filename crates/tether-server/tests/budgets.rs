//! The channel protocol (`/ws`) under abuse: every budget the room and poll endpoints have
//! holds on `/ws` too, and what a client hands in is checked at the door with the limits it is
//! read back with. Each test is one class of attack, over real sockets on loopback.

mod common;

use common::v1::{error_code, open_raw, Client};
use common::*;
use serde_json::{json, Value};
use tether::Message;

async fn a_deeply_nested_info_is_refused_at_connect_and_bystanders_keep_their_presence(kind: Kind) {
    let setup = Setup::new(kind);
    let server = start(setup.config()).await;
    let (mut bob, _) = Client::open(&server, "?name=bob").await;
    bob.subscribe("room:x").await;

    // 200 levels in under 1,024 bytes: deeper than a reader of presence parses back.
    let deep = format!(
        r#"{{"id":1,"op":"connect","info":{{"a":{}1{}}}}}"#,
        "[".repeat(200),
        "]".repeat(200)
    );
    assert!(deep.len() < 1024);
    let nine = format!(
        r#"{{"id":1,"op":"connect","info":{}1{}}}"#,
        r#"{"a":"#.repeat(9),
        "}".repeat(9)
    );
    for command in [deep, nine] {
        let mut mal = open_raw(&server, "?name=mal").await;
        mal.send(Message::text(command)).await.unwrap();
        let refused = next(&mut mal).await;
        assert_eq!(error_code(&refused), 107, "{refused}");
        assert!(
            refused["error"]["message"]
                .as_str()
                .unwrap()
                .contains("nests at most 8"),
            "{refused}"
        );
    }

    // Eight levels are fine, and every member lists it.
    let eight = json!({"a": {"b": {"c": {"d": {"e": {"f": {"g": 1}}}}}}});
    let (mut eve, connected) = Client::open_with(
        &server,
        "?name=eve",
        json!({"op": "connect", "info": eight}),
    )
    .await;
    assert!(connected.get("error").is_none(), "{connected}");
    eve.subscribe("room:x").await;
    let presence = bob
        .call(json!({"op": "presence", "channel": "room:x"}))
        .await;
    assert_eq!(presence["members"][1]["info"], json!([eight]), "{presence}");
    let subscribed = Client::open(&server, "?name=cy")
        .await
        .0
        .subscribe("room:x")
        .await;
    assert_eq!(
        subscribed["presence"].as_array().map(Vec::len),
        Some(3),
        "{subscribed}"
    );
    drop((bob, eve));
    server.stop().await;
}

/// A server where one connection may send as fast as it likes, but one identity only 10
/// messages a second (bursts of 20) over all its connections.
async fn budgeted(kind: Kind) -> (Running, Setup) {
    let setup = Setup::new(kind);
    setup.add_user("mal", "pw").await;
    let mut c = setup.config();
    c.message_rate = 1000.0;
    c.identity_message_rate = 10;
    (start(c).await, setup)
}

/// How many of `replies` succeeded, checking that each other one is the identity's refusal.
fn passed(replies: &[Value]) -> usize {
    let mut passed = 0;
    for reply in replies {
        match reply.get("error") {
            None => passed += 1,
            Some(_) => {
                assert_eq!(error_code(reply), 110, "{reply}");
                assert!(
                    reply["error"]["message"]
                        .as_str()
                        .unwrap()
                        .contains("all your connections"),
                    "{reply}"
                );
            }
        }
    }
    passed
}

/// Sends `command` `count` times on each of `clients` at once, then reads every reply.
async fn flood(clients: &mut [Client], command: &Value, count: usize) -> Vec<Value> {
    let mut ids = Vec::new();
    for client in clients.iter_mut() {
        let mut sent = Vec::new();
        for _ in 0..count {
            sent.push(client.send(command.clone()).await);
        }
        ids.push(sent);
    }
    let mut replies = Vec::new();
    for (client, sent) in clients.iter_mut().zip(ids) {
        for id in sent {
            let reply = loop {
                let message = next(&mut client.ws).await;
                if message.get("id").is_some() {
                    break message;
                }
                client.pushes.push(message);
            };
            assert_eq!(reply["id"], id, "{reply}");
            replies.push(reply);
        }
    }
    replies
}

/// At most what a budget of 10 a second in bursts of 20 lets through since `started`.
fn budget_since(started: std::time::Instant) -> usize {
    20 + (10.0 * started.elapsed().as_secs_f64()).ceil() as usize
}

async fn one_guests_publications_share_one_budget_on_the_channel_and_room_endpoints(kind: Kind) {
    let (server, _dir) = budgeted(kind).await;
    // One guest (an address) with five channel connections and five room connections.
    let mut channel = Vec::new();
    for i in 0..5 {
        let (mut c, _) = Client::open(&server, &format!("?name=c{i}")).await;
        c.subscribe("room:spam").await;
        channel.push(c);
    }
    let mut rooms = Vec::new();
    for i in 0..5 {
        let mut ws = connect(&server.ws(&format!("/ws/rooms/spam?name=r{i}"))).await;
        next_of(&mut ws, "ready").await;
        rooms.push(ws);
    }
    let started = std::time::Instant::now();
    for ws in rooms.iter_mut() {
        for i in 0..10 {
            say(ws, &format!("room {i}")).await;
        }
    }
    let publish = json!({"op": "publish", "channel": "room:spam", "data": {"text": "hi"}});
    let replies = flood(&mut channel, &publish, 10).await;
    let mut stored = passed(&replies);
    // Each room socket is told of each of its own messages: stored (every member hears it)
    // or refused (an error on that socket).
    for (i, ws) in rooms.iter_mut().enumerate() {
        let me = format!("r{i}");
        let (mut mine, mut refused) = (0, 0);
        while mine + refused < 10 {
            let event = next(ws).await;
            match event["type"].as_str() {
                Some("error") => refused += 1,
                Some("message") if event["user"] == me.as_str() => mine += 1,
                _ => {}
            }
        }
        stored += mine;
    }
    let budget = budget_since(started);
    eprintln!("{stored} of 100 publications stored, budget {budget}");
    assert!(
        (20..=budget).contains(&stored),
        "{stored} of 100 stored, against a budget of {budget}"
    );
    // The store agrees.
    let (_, history) = http(
        server.addr,
        "GET",
        "/api/rooms/spam/messages?since=0&limit=1000",
        &[],
        None,
    )
    .await;
    assert_eq!(history.as_array().map(Vec::len), Some(stored), "{history}");
    drop((channel, rooms));
    server.stop().await;
}

async fn one_guests_typing_events_over_many_connections_reach_a_room_within_its_budget(kind: Kind) {
    let (server, _dir) = budgeted(kind).await;
    let mut mal = Vec::new();
    for i in 0..5 {
        let (mut c, _) = Client::open(&server, &format!("?name=m{i}")).await;
        c.subscribe("room:quiet").await;
        mal.push(c);
    }
    // A bystander (another identity: a registered user) in the room.
    let token = token(server.addr, "mal", "pw").await;
    let (mut bob, _) = Client::open(&server, &format!("?token={token}")).await;
    bob.subscribe("room:quiet").await;
    let started = std::time::Instant::now();
    let typing =
        json!({"op": "event", "channel": "room:quiet", "name": "typing", "data": {"on": true}});
    let replies = flood(&mut mal, &typing, 20).await;
    let relayed = passed(&replies);
    let budget = budget_since(started);
    eprintln!("{relayed} of 100 events relayed, budget {budget}");
    assert!(
        (20..=budget).contains(&relayed),
        "{relayed} of 100 events relayed, against a budget of {budget}"
    );
    // The bystander got exactly those.
    let heard = bob
        .drain()
        .await
        .iter()
        .filter(|p| p["type"] == "event")
        .count();
    assert_eq!(heard, relayed);
    drop((mal, bob));
    server.stop().await;
}

async fn one_users_votes_over_many_connections_are_counted_within_its_budget(kind: Kind) {
    let (server, _dir) = budgeted(kind).await;
    let token = token(server.addr, "mal", "pw").await;
    let bearer = format!("Bearer {token}");
    let (status, poll) = http(
        server.addr,
        "POST",
        "/api/polls",
        &[("Authorization", &bearer)],
        Some(json!({"question": "Lunch?", "options": ["soup", "salad"]})),
    )
    .await;
    assert_eq!(status, 201, "{poll}");
    let channel = format!("poll:{}", poll["id"]);
    let mut mal = Vec::new();
    for _ in 0..5 {
        let (mut c, _) = Client::open(&server, &format!("?token={token}")).await;
        c.subscribe(&channel).await;
        mal.push(c);
    }
    let started = std::time::Instant::now();
    let mut counted = 0;
    for option in ["soup", "salad"] {
        let vote = json!({"op": "publish", "channel": channel, "data": {"vote": option}});
        counted += passed(&flood(&mut mal, &vote, 10).await);
    }
    let budget = budget_since(started);
    eprintln!("{counted} of 100 votes counted, budget {budget}");
    assert!(
        (20..=budget).contains(&counted),
        "{counted} of 100 votes counted, against a budget of {budget}"
    );
    drop(mal);
    server.stop().await;
}

async fn bringing_rooms_into_being_is_paid_for_on_every_endpoint_and_listing_them_is_paged(
    kind: Kind,
) {
    let setup = Setup::new(kind);
    setup.add_user("ops", "pw").await;
    let mut c = setup.config();
    c.rooms_per_hour = 5;
    let server = start(c).await;
    // One guest address: five new rooms on /ws, then no more, on either endpoint.
    let (mut mal, _) = Client::open(&server, "?name=mal").await;
    for i in 0..5 {
        let reply = mal.subscribe(&format!("room:new{i}")).await;
        assert!(reply.get("error").is_none(), "{reply}");
    }
    let refused = mal.subscribe("room:new5").await;
    assert_eq!(error_code(&refused), 106, "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("rooms_per_hour"),
        "{refused}"
    );
    let mut shortcut = connect(&server.ws("/ws/rooms/new6?name=mal2")).await;
    let said = next(&mut shortcut).await;
    assert_eq!(said["type"], "error", "{said}");
    assert!(
        said["error"].as_str().unwrap().contains("rooms_per_hour"),
        "{said}"
    );
    assert_eq!(close_code(&mut shortcut).await, 1008);
    // Rooms that exist stay open to the same guest: one with members, one with history.
    let (mut again, _) = Client::open(&server, "?name=mal3").await;
    let reply = again.subscribe("room:new0").await;
    assert!(reply.get("error").is_none(), "{reply}");
    let ops = format!("Bearer {}", token(server.addr, "ops", "pw").await);
    let (status, _) = http(
        server.addr,
        "POST",
        "/api/rooms/kept/messages",
        &[("Authorization", &ops)],
        Some(json!({"text": "hi"})),
    )
    .await;
    assert_eq!(status, 201);
    let reply = again.subscribe("room:kept").await;
    assert!(reply.get("error").is_none(), "{reply}");
    // Another identity has a budget of its own.
    let (mut ann, _) = Client::open(&server, &format!("?token={}", &ops[7..])).await;
    let reply = ann.subscribe("room:new5").await;
    assert!(reply.get("error").is_none(), "{reply}");
    // The first message in a room its first member paid for is not charged again: that
    // member may still start none, but writes there.
    let stored = mal
        .call(json!({"op": "publish", "channel": "room:new1", "data": {"text": "first"}}))
        .await;
    assert!(stored.get("error").is_none(), "{stored}");

    // Listing rooms pages through the rooms with members, in name order.
    let (_, page) = http(
        server.addr,
        "GET",
        "/api/rooms?after=new1&limit=3",
        &[],
        None,
    )
    .await;
    assert_eq!(
        page,
        json!([
            {"room": "new2", "members": 1, "last_id": 0},
            {"room": "new3", "members": 1, "last_id": 0},
            {"room": "new4", "members": 1, "last_id": 0},
        ]),
        "{page}"
    );
    drop((mal, again, ann, shortcut));
    server.stop().await;
}

async fn a_crowd_is_counted_not_listed_and_a_visitor_without_a_name_reads_no_room(kind: Kind) {
    let setup = Setup::new(kind);
    let mut c = setup.config();
    c.max_connections_per_ip = 2000;
    // The crowd's members do not read: each join's push to them waits in their queues.
    c.outbox = 4096;
    let server = start(c).await;
    let crowd = tether_server::node::hub::PRESENCE_LIMIT + 1;
    let mut members = Vec::new();
    for i in 0..crowd {
        let path = format!("/ws/rooms/crowd?name=u{i}");
        members.push(raw_upgrade(server.addr, &path, Some(4096)).await);
    }
    // Every one of them joined.
    within(async {
        loop {
            let (_, page) = http(server.addr, "GET", "/api/rooms?limit=1", &[], None).await;
            if page[0]["members"].as_u64() == Some(crowd as u64) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    let (mut bob, _) = Client::open(&server, "?name=bob").await;
    let presence = bob
        .call(json!({"op": "presence", "channel": "room:crowd"}))
        .await;
    let size = presence.to_string().len();
    assert!(
        presence == json!({"id": 2, "users": crowd}),
        "a reply of {size} bytes"
    );

    // A visitor without a name may subscribe to no room, nor read one's history or presence.
    let (mut visitor, _) = Client::open(&server, "").await;
    for op in ["subscribe", "history", "presence"] {
        let refused = visitor
            .call(json!({"op": op, "channel": "room:crowd"}))
            .await;
        assert_eq!(error_code(&refused), 103, "{op}: {refused}");
    }
    drop((members, bob, visitor));
    server.stop().await;
}

async fn a_users_notifications_are_no_room_started_by_the_sender(kind: Kind) {
    let setup = Setup::new(kind);
    setup.add_user("ops", "pw").await;
    let users: Vec<String> = (0..4).map(|i| format!("user{i}")).collect();
    for user in &users {
        setup.add_user(user, "pw").await;
    }
    let mut c = setup.config();
    c.rooms_per_hour = 2;
    c.max_rooms = 2;
    let server = start(c).await;
    let ops = format!("Bearer {}", token(server.addr, "ops", "pw").await);
    let post = |path: String| {
        let ops = ops.clone();
        async move {
            http(
                server.addr,
                "POST",
                &path,
                &[("Authorization", &ops)],
                Some(json!({"text": "hi"})),
            )
            .await
        }
    };
    // Each user's first notification starts their stream: none of it is the sender's room
    // budget, nor counts against the server's rooms.
    for user in &users {
        let (status, body) = post(format!("/api/users/{user}/notifications")).await;
        assert_eq!(status, 201, "{user}: {body}");
    }
    // A user on their stream is no room with members either.
    let user0 = token(server.addr, "user0", "pw").await;
    let (mut device, _) = Client::open(&server, &format!("?token={user0}")).await;
    let reply = device.subscribe("user:user0").await;
    assert!(reply.get("error").is_none(), "{reply}");
    // The sender's two rooms are whole.
    for room in ["first", "second"] {
        let (status, body) = post(format!("/api/rooms/{room}/messages")).await;
        assert_eq!(status, 201, "{room}: {body}");
    }
    let (status, _) = post("/api/rooms/third/messages".to_owned()).await;
    assert_eq!(status, 403);
    server.stop().await;
}

/// The bytes waiting in the kernel to be sent on the connection from local port `local` to
/// remote port `remote` (IPv4 loopback), from `/proc/net/tcp`.
fn send_queue(local: u16, remote: u16) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let port = |addr: &str| u16::from_str_radix(addr.rsplit(':').next()?, 16).ok();
        if port(fields[1])? != local || port(fields[2])? != remote {
            return None;
        }
        let (tx, _) = fields[4].split_once(':')?;
        u64::from_str_radix(tx, 16).ok()
    })
}

async fn a_client_that_never_reads_holds_a_bounded_kernel_send_buffer(kind: Kind) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let setup = Setup::new(kind);
    let mut c = setup.config();
    c.message_rate = 100_000.0;
    c.identity_message_rate = 100_000;
    // Not closed as a slow consumer while the kernel's buffers fill.
    c.outbox = 100_000;
    let send_buffer = c.send_buffer as u64;
    let server = start(c).await;

    // A member who joins and then reads nothing.
    let mut lazy = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    lazy.write_all(
        format!(
            "GET /ws/rooms/flood?name=lazy HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\n\
             Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            server.addr
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(lazy.read_u8().await.unwrap());
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{head:?}");
    let lazy_port = lazy.local_addr().unwrap().port();

    // 16 MB for it: more than its receive buffer and any send buffer the kernel would grow.
    // The sender reads its own messages as they come; once it heard the last, the lazy
    // member's copy is queued too.
    let (mut sender, mut echoes) = connect(&server.ws("/ws/rooms/flood?name=sender"))
        .await
        .split();
    let heard = tokio::spawn(async move {
        let mut heard = 0;
        while heard < 4000 {
            match echoes.recv().await {
                Some(Ok(Message::Text(t))) if t.contains(r#""type":"message""#) => heard += 1,
                Some(Ok(_)) => {}
                other => panic!("the sender lost its connection: {other:?}"),
            }
        }
    });
    let text = "x".repeat(4000);
    let mut most = 0;
    for i in 0..4000 {
        let m = json!({ "text": text }).to_string();
        sender.send(Message::text(m)).await.unwrap();
        if i % 50 == 0 {
            most = most.max(send_queue(server.addr.port(), lazy_port).unwrap_or(0));
        }
    }
    heard.await.unwrap();
    for _ in 0..20 {
        most = most.max(send_queue(server.addr.port(), lazy_port).unwrap_or(0));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    eprintln!("most bytes queued in the kernel for the member who never reads: {most}");
    // Linux doubles the buffer asked for; autotuned, it grows to 4 MiB.
    assert!(
        most > send_buffer / 2,
        "the send buffer never filled: {most}"
    );
    assert!(most <= 2 * send_buffer + 64 * 1024, "{most} bytes queued");
    drop(lazy);
    server.stop().await;
}

on_both_engines!(
    a_deeply_nested_info_is_refused_at_connect_and_bystanders_keep_their_presence,
    one_guests_publications_share_one_budget_on_the_channel_and_room_endpoints,
    one_guests_typing_events_over_many_connections_reach_a_room_within_its_budget,
    one_users_votes_over_many_connections_are_counted_within_its_budget,
    bringing_rooms_into_being_is_paid_for_on_every_endpoint_and_listing_them_is_paged,
    a_users_notifications_are_no_room_started_by_the_sender,
);

/// Guests behind one address (a classroom, an office) open a new room at the same moment: the
/// room is started once, and charged once, however their joins interleave.
async fn guests_joining_a_new_room_at_once_start_it_once(kind: Kind) {
    let setup = Setup::new(kind);
    let mut c = setup.config();
    c.rooms_per_hour = 1;
    let server = start(c).await;
    let joins = (0..20).map(|i| {
        let url = server.ws(&format!("/ws/rooms/lesson?name=pupil{i}"));
        async move {
            let mut ws = connect(&url).await;
            let said = loop {
                let event = next(&mut ws).await;
                if event["type"] == "ready" || event["type"] == "error" {
                    break event;
                }
            };
            (said, ws)
        }
    });
    let joined = futures_util::future::join_all(joins).await;
    for (said, _) in &joined {
        assert_eq!(said["type"], "ready", "{said}");
    }
    // The one room this address may start this hour was the lesson.
    let mut other = connect(&server.ws("/ws/rooms/another?name=late")).await;
    let said = next(&mut other).await;
    assert!(
        said["error"].as_str().unwrap().contains("rooms_per_hour"),
        "{said}"
    );
    drop(joined);
    server.stop().await;
}

on_both_engines!(
    multi_thread:
    guests_joining_a_new_room_at_once_start_it_once,
    a_crowd_is_counted_not_listed_and_a_visitor_without_a_name_reads_no_room,
    a_client_that_never_reads_holds_a_bounded_kernel_send_buffer,
);
