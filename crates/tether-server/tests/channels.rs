//! The channel protocol (`/ws`, tether.v1) against a running server: every command and push,
//! recovery, idempotent publishing, presence and ephemeral events, the broadcast channel, and
//! refusals with their codes. Each test drops its clients before stopping the server, which
//! then need not wait out their close handshakes.

mod common;

use common::v1::{error_code, open_raw, Client};
use common::*;
use serde_json::{json, Value};
use tether::Message;

async fn server(kind: Kind) -> (Running, Setup) {
    let setup = Setup::new(kind);
    (start(setup.config()).await, setup)
}

async fn the_endpoint_requires_the_subprotocol(kind: Kind) {
    let (server, _dir) = server(kind).await;
    let refused = within(tether::connect(&server.ws("/ws?name=ann"))).await;
    let err = refused.expect_err("refused without tether.v1");
    assert!(err.to_string().contains("400"), "{err}");

    // A client of another version only is told so in the protocol, with 4505.
    let (mut ws, response) = within(
        tether::ClientBuilder::new(&server.ws("/ws?name=ann"))
            .unwrap()
            .protocol("tether.v9")
            .connect(),
    )
    .await
    .expect("the upgrade is accepted, to tell why");
    assert_eq!(response.protocol, None, "no version agreed");
    let disconnect = next(&mut ws).await;
    assert_eq!(
        (
            &disconnect["type"],
            &disconnect["code"],
            &disconnect["reconnect"]
        ),
        (&json!("disconnect"), &json!(4505), &json!(false)),
        "{disconnect}"
    );
    assert_eq!(close_code(&mut ws).await, 4505);
    drop(ws);
    server.stop().await;
}

async fn connect_subscribe_publish_and_receive(kind: Kind) {
    let (server, _dir) = server(kind).await;
    let (mut ann, connected) = Client::open(&server, "?name=ann").await;
    assert_eq!(connected["user"], "ann");
    assert_eq!(connected["guest"], true);
    assert!(connected["limits"]["channels"].as_u64().unwrap() >= 10);

    let subscribed = ann.subscribe("room:lobby").await;
    assert_eq!(subscribed["offset"], 0, "{subscribed}");
    assert_eq!(subscribed["replayed"], 0);
    assert!(subscribed["epoch"].as_str().is_some_and(|e| !e.is_empty()));
    assert!(
        subscribed.get("recovered").is_none(),
        "no since, no verdict"
    );
    assert_eq!(
        subscribed["presence"],
        json!([{"user": "ann", "clients": 1}])
    );

    let ack = ann
        .call(
            json!({"op": "publish", "channel": "room:lobby", "data": {"text": "hi"}, "key": "k-1"}),
        )
        .await;
    assert_eq!(ack["offset"], 1, "{ack}");
    let publication = ann.push("pub").await;
    assert_eq!(publication["channel"], "room:lobby");
    assert_eq!(publication["offset"], 1);
    assert_eq!(publication["user"], "ann");
    assert_eq!(publication["guest"], true, "a guest's publication says so");
    assert_eq!(publication["data"], json!({"text": "hi"}));

    // A retry with the same key is acknowledged with the same offset and stored once.
    let again = ann
        .call(
            json!({"op": "publish", "channel": "room:lobby", "data": {"text": "hi"}, "key": "k-1"}),
        )
        .await;
    assert_eq!(again["offset"], 1, "{again}");
    let history = ann
        .call(json!({"op": "history", "channel": "room:lobby"}))
        .await;
    assert_eq!(history["offset"], 1, "{history}");
    let publications = history["publications"].as_array().unwrap();
    assert_eq!(publications.len(), 1);
    assert_eq!(publications[0]["data"]["text"], "hi");
    assert_eq!(publications[0]["guest"], true);
    assert!(ann.drain().await.iter().all(|p| p["type"] != "pub"));
    // The newest messages over HTTP, as a page shows a room before joining it.
    for i in 2..=4 {
        ann.publish("room:lobby", &format!("m{i}")).await;
    }
    let (status, last) = http(
        server.addr,
        "GET",
        "/api/rooms/lobby/messages?last=2",
        &[],
        None,
    )
    .await;
    assert_eq!(status, 200, "{last}");
    let texts: Vec<_> = last
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].clone())
        .collect();
    assert_eq!(texts, [json!("m3"), json!("m4")], "{last}");
    assert_eq!(last[0]["guest"], true);
    let (status, _) = http(
        server.addr,
        "GET",
        "/api/rooms/lobby/messages?last=2&since=1",
        &[],
        None,
    )
    .await;
    assert_eq!(status, 400, "last= goes alone");
    drop(ann);
    server.stop().await;
}

async fn one_connection_carries_several_rooms(kind: Kind) {
    let (server, _dir) = server(kind).await;
    let (mut ann, _) = Client::open(&server, "?name=ann").await;
    for room in ["room:a", "room:b"] {
        let reply = ann.subscribe(room).await;
        assert!(reply.get("error").is_none(), "{reply}");
    }
    let (mut ben, _) = Client::open(&server, "?name=ben").await;
    for room in ["room:a", "room:b"] {
        ben.subscribe(room).await;
        let ack = ben.publish(room, room).await;
        assert_eq!(ack["offset"], 1, "each room counts its own: {ack}");
    }
    let first = ann.push("pub").await;
    let second = ann.push("pub").await;
    assert_eq!(
        (&first["channel"], &first["data"]["text"]),
        (&json!("room:a"), &json!("room:a"))
    );
    assert_eq!(second["channel"], "room:b");

    // After leaving room:a, only room:b reaches ann.
    let left = ann
        .call(json!({"op": "unsubscribe", "channel": "room:a"}))
        .await;
    assert!(left.get("error").is_none(), "{left}");
    for room in ["room:a", "room:b"] {
        ben.publish(room, "later").await;
    }
    let later = ann.push("pub").await;
    assert_eq!(later["channel"], "room:b");
    assert!(ann.drain().await.iter().all(|p| p["type"] != "pub"));
    drop((ann, ben));
    server.stop().await;
}

async fn a_resubscription_recovers_exactly_what_was_missed(kind: Kind) {
    let (server, _dir) = server(kind).await;
    let (mut ann, _) = Client::open(&server, "?name=ann").await;
    ann.subscribe("room:r").await;
    for i in 1..=5 {
        ann.publish("room:r", &format!("m{i}")).await;
    }
    let epoch = ann
        .call(json!({"op": "history", "channel": "room:r", "limit": 1}))
        .await["epoch"]
        .clone();

    let (mut ben, _) = Client::open(&server, "?name=ben").await;
    let reply = ben
        .call(json!({"op": "subscribe", "channel": "room:r", "since": 2, "epoch": epoch}))
        .await;
    assert_eq!(reply["recovered"], true, "{reply}");
    assert_eq!(reply["replayed"], 3);
    assert_eq!(reply["offset"], 5);
    let offsets: Vec<Value> = ben
        .drain()
        .await
        .iter()
        .filter(|p| p["type"] == "pub")
        .map(|p| p["offset"].clone())
        .collect();
    assert_eq!(offsets, [json!(3), json!(4), json!(5)]);

    // Another epoch, or an offset the room never reached: not recovered; the recent
    // history follows instead.
    let (mut cay, _) = Client::open(&server, "?name=cay").await;
    let stale = cay
        .call(json!({"op": "subscribe", "channel": "room:r", "since": 2, "epoch": "other"}))
        .await;
    assert_eq!(stale["recovered"], false, "{stale}");
    assert_eq!(stale["replayed"], 5);
    let (mut dan, _) = Client::open(&server, "?name=dan").await;
    let ahead = dan
        .call(json!({"op": "subscribe", "channel": "room:r", "since": 99, "epoch": epoch}))
        .await;
    assert_eq!(ahead["recovered"], false, "{ahead}");
    drop((ann, ben, cay, dan));
    server.stop().await;
}

async fn presence_joins_leaves_and_typing(kind: Kind) {
    let (server, _dir) = server(kind).await;
    let (mut ann, _) = Client::open(&server, "?name=ann").await;
    ann.subscribe("room:t").await;
    let (mut ben, _) = Client::open(&server, "?name=ben").await;
    ben.subscribe("room:t").await;
    let join = ann.push("join").await;
    assert_eq!(
        (&join["channel"], &join["user"], &join["count"]),
        (&json!("room:t"), &json!("ben"), &json!(2))
    );
    let presence = ann
        .call(json!({"op": "presence", "channel": "room:t"}))
        .await;
    assert_eq!(
        presence["members"],
        json!([{"user": "ann", "clients": 1}, {"user": "ben", "clients": 1}])
    );

    let sent = ben
        .call(json!({"op": "event", "channel": "room:t", "name": "typing", "data": {"on": true}}))
        .await;
    assert!(sent.get("error").is_none(), "{sent}");
    let typing = ann.push("event").await;
    assert_eq!(typing["name"], "typing");
    assert_eq!(typing["user"], "ben");
    assert_eq!(typing["data"], json!({"on": true}));
    assert!(
        ben.drain().await.iter().all(|p| p["type"] != "event"),
        "not to its sender"
    );
    // Ephemeral: never stored.
    let history = ann
        .call(json!({"op": "history", "channel": "room:t"}))
        .await;
    assert_eq!(history["publications"], json!([]));

    ben.call(json!({"op": "unsubscribe", "channel": "room:t"}))
        .await;
    let leave = ann.push("leave").await;
    assert_eq!(
        (&leave["user"], &leave["count"]),
        (&json!("ben"), &json!(1))
    );
    // A connection that ends leaves every channel it was in.
    ben.subscribe("room:t").await;
    ben.subscribe("room:u").await;
    ann.subscribe("room:u").await;
    assert_eq!(ann.push("join").await["channel"], "room:t");
    drop(ben);
    let mut left: Vec<String> = Vec::new();
    for _ in 0..2 {
        let leave = ann.push("leave").await;
        assert_eq!(leave["user"], "ben");
        left.push(leave["channel"].as_str().unwrap().to_owned());
    }
    left.sort();
    assert_eq!(left, ["room:t", "room:u"]);
    let presence = ann
        .call(json!({"op": "presence", "channel": "room:u"}))
        .await;
    assert_eq!(presence["members"], json!([{"user": "ann", "clients": 1}]));
    drop(ann);
    server.stop().await;
}

async fn presence_shows_the_info_each_connection_attached(kind: Kind) {
    let dir = Setup::new(kind);
    dir.add_user("ann", "correct horse battery").await;
    let server = start(dir.config()).await;
    let ann_token = token(server.addr, "ann", "correct horse battery").await;
    let as_ann = format!("?token={ann_token}");
    let info = |device: &str| json!({"op": "connect", "info": {"device": device}});
    let (mut ann, connected) = Client::open_with(&server, &as_ann, info("phone")).await;
    assert!(connected.get("error").is_none(), "{connected}");
    ann.subscribe("room:i").await;
    let (mut ben, _) = Client::open_with(&server, "?name=ben", info("laptop")).await;
    ben.subscribe("room:i").await;
    // The join tells the info of the connection that joined.
    let join = ann.push("join").await;
    assert_eq!(
        (&join["user"], &join["info"]),
        (&json!("ben"), &json!({"device": "laptop"}))
    );
    // Ann's second device: counted, and its info listed beside the first's; a connection
    // without info adds none.
    let (mut ann2, _) = Client::open_with(&server, &as_ann, info("desk")).await;
    ann2.subscribe("room:i").await;
    let (mut ann3, _) = Client::open(&server, &as_ann).await;
    ann3.subscribe("room:i").await;
    let presence = ben
        .call(json!({"op": "presence", "channel": "room:i"}))
        .await;
    let members = presence["members"].as_array().unwrap();
    assert_eq!(members.len(), 2, "{presence}");
    assert_eq!(
        (&members[0]["user"], &members[0]["clients"]),
        (&json!("ann"), &json!(3))
    );
    let mut devices: Vec<&str> = members[0]["info"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["device"].as_str().unwrap())
        .collect();
    devices.sort_unstable();
    assert_eq!(devices, ["desk", "phone"]);
    assert_eq!(members[1]["info"], json!([{"device": "laptop"}]));
    // The subscribe reply lists the same.
    let (mut cat, _) = Client::open(&server, "?name=cat").await;
    let subscribed = cat.subscribe("room:i").await;
    assert_eq!(subscribed["presence"][1], members[1], "{subscribed}");
    assert!(subscribed["presence"][2].get("info").is_none());

    // Info is an object of at most 1 KiB, given once. (Each try is another guest, under a
    // name of its own: a name is free again only once the guest's socket has closed.)
    for (name, bad) in [
        ("dan", json!({"op": "connect", "info": "phone"})),
        (
            "dave",
            json!({"op": "connect", "info": {"pad": "x".repeat(1100)}}),
        ),
    ] {
        let (_, refused) = Client::open_with(&server, &format!("?name={name}"), bad).await;
        assert_eq!(error_code(&refused), 107, "{refused}");
    }
    drop((ann, ann2, ann3, ben, cat));
    server.stop().await;
}

async fn a_broadcast_reaches_every_channel_connection_named_or_not(kind: Kind) {
    let dir = Setup::new(kind);
    dir.add_user("root", "correct horse battery").await;
    let server = start(dir.config()).await;
    let token = token(server.addr, "root", "correct horse battery").await;
    // Subscribed to nothing at all; and a visitor who gave no identity, only watching.
    let (mut ann, _) = Client::open(&server, "?name=ann").await;
    let (mut visitor, connected) = Client::open(&server, "").await;
    assert_eq!(connected["user"], Value::Null, "{connected}");
    let refused = visitor
        .call(json!({"op": "subscribe", "channel": "room:lobby"}))
        .await;
    assert_eq!(error_code(&refused), 103, "rooms need a name: {refused}");
    let polls = visitor.subscribe("polls").await;
    assert_eq!(polls["polls"], json!([]), "{polls}");
    let bearer = format!("Bearer {token}");
    let (status, body) = http(
        server.addr,
        "POST",
        "/api/broadcast",
        &[("authorization", &bearer)],
        Some(json!({"text": "maintenance at noon"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let notice = ann.push("pub").await;
    assert_eq!(notice["channel"], "broadcast");
    assert_eq!(notice["data"]["text"], "maintenance at noon");
    assert_eq!(notice["user"], "root");
    let seen = visitor.push("pub").await;
    assert_eq!(seen["data"]["text"], "maintenance at noon");
    drop((ann, visitor));
    server.stop().await;
}

/// What an application embedding the server does to a user: end one subscription (the client
/// told with `unsub`, the others untouched, presence updated), then every connection, of
/// every endpoint, with or without asking them back.
async fn the_server_unsubscribes_and_disconnects_a_user(kind: Kind) {
    let dir = Setup::new(kind);
    dir.add_user("ann", "correct horse battery").await;
    let server = start(dir.config()).await;
    let as_ann = format!(
        "?token={}",
        token(server.addr, "ann", "correct horse battery").await
    );
    let (mut ann, _) = Client::open(&server, &as_ann).await;
    let (mut ann2, _) = Client::open(&server, &as_ann).await;
    let (mut ben, _) = Client::open(&server, "?name=ben").await;
    ann.subscribe("room:a").await;
    ann.subscribe("room:b").await;
    ann2.subscribe("room:a").await;
    ben.subscribe("room:a").await;
    let mut shortcut = connect(&server.ws(&format!("/ws/rooms/b{as_ann}"))).await;
    next_of(&mut shortcut, "ready").await;

    let node = &server.node;
    node.unsubscribe_user("ann", "room:a").await.unwrap();
    for client in [&mut ann, &mut ann2] {
        let ended = client.push("unsub").await;
        assert_eq!(
            (&ended["channel"], &ended["code"]),
            (&json!("room:a"), &json!(2000)),
            "{ended}"
        );
    }
    let left = ben.push("leave").await;
    assert_eq!((&left["user"], &left["count"]), (&json!("ann"), &json!(1)));
    // No longer subscribed there; room:b goes on.
    let refused = ann
        .call(json!({"op": "publish", "channel": "room:a", "data": {"text": "x"}}))
        .await;
    assert_eq!(error_code(&refused), 109, "{refused}");
    ben.publish("room:a", "only ben hears this").await;
    ann.publish("room:b", "still in b").await;
    let publication = ann.push("pub").await;
    assert_eq!(publication["data"]["text"], "still in b", "{publication}");
    // Ending nothing is no error; another user's subscriptions are untouched, and an empty
    // name is nobody's (not that of every connection without an identity).
    node.unsubscribe_user("ann", "room:nowhere").await.unwrap();
    let (mut visitor, _) = Client::open(&server, "").await;
    visitor.subscribe("polls").await;
    node.unsubscribe_user("", "polls").await.unwrap();
    node.disconnect_user("", false).await.unwrap();
    let again = ann.subscribe("room:a").await;
    assert_eq!(again["offset"], 1, "may subscribe again: {again}");

    // Every connection of ann, asked back (4003); then for good (4506): the shortcut too.
    node.disconnect_user("ann", true).await.unwrap();
    for client in [&mut ann, &mut ann2] {
        let bye = client.push("disconnect").await;
        assert_eq!(
            (&bye["code"], &bye["reconnect"]),
            (&json!(4003), &json!(true)),
            "{bye}"
        );
        assert_eq!(close_code(&mut client.ws).await, 4003);
    }
    assert_eq!(close_code(&mut shortcut).await, 1012);
    let (mut ann, _) = Client::open(&server, &as_ann).await;
    ann.subscribe("room:b").await;
    let mut shortcut = connect(&server.ws(&format!("/ws/rooms/b{as_ann}"))).await;
    next_of(&mut shortcut, "ready").await;
    node.disconnect_user("ann", false).await.unwrap();
    let bye = ann.push("disconnect").await;
    assert_eq!(
        (&bye["code"], &bye["reconnect"]),
        (&json!(4506), &json!(false)),
        "{bye}"
    );
    assert_eq!(close_code(&mut ann.ws).await, 4506);
    assert_eq!(close_code(&mut shortcut).await, 1008);
    // Ben and the visitor stay, the visitor still subscribed.
    let pong = ben.call(json!({"op": "ping"})).await;
    assert_eq!(pong.get("error"), None, "{pong}");
    let again = visitor.subscribe("polls").await;
    assert_eq!(error_code(&again), 105, "still subscribed: {again}");
    assert!(visitor.pushes.is_empty(), "{:?}", visitor.pushes);
    drop((ben, visitor));
    server.stop().await;
}

/// Two nodes on one Redis: what one node is told to do to a user holds on the other.
#[tokio::test]
async fn a_user_is_unsubscribed_and_disconnected_on_every_node() {
    let dir = Setup::new(Kind::Redis);
    dir.add_user("ann", "correct horse battery").await;
    let a = start(dir.config()).await;
    let b_data = tempfile::tempdir().unwrap();
    let mut b_config = dir.config();
    b_config.data = b_data.path().to_owned();
    b_config.node = Some("b".into());
    let b = start(b_config).await;
    let as_ann = format!(
        "?token={}",
        token(a.addr, "ann", "correct horse battery").await
    );
    let (mut ann, _) = Client::open(&b, &as_ann).await;
    ann.subscribe("room:far").await;
    let reach = a.node.unsubscribe_user("ann", "room:far").await.unwrap();
    assert_eq!(reach, tether_server::engine::Reach::Nodes(2));
    let ended = ann.push("unsub").await;
    assert_eq!(ended["channel"], "room:far", "{ended}");
    a.node.disconnect_user("ann", false).await.unwrap();
    let bye = ann.push("disconnect").await;
    assert_eq!(bye["code"], 4506, "{bye}");
    assert_eq!(close_code(&mut ann.ws).await, 4506);
    b.stop().await;
    a.stop().await;
}

async fn a_channel_client_and_a_room_shortcut_client_chat_together(kind: Kind) {
    let (server, _dir) = server(kind).await;
    let (mut ann, _) = Client::open(&server, "?name=ann").await;
    ann.subscribe("room:mix").await;
    let mut ben = connect(&server.ws("/ws/rooms/mix?name=ben")).await;
    next_of(&mut ben, "ready").await;
    say(&mut ben, "from the shortcut").await;
    let publication = ann.push("pub").await;
    assert_eq!(publication["data"]["text"], "from the shortcut");
    ann.publish("room:mix", "from /ws").await;
    let message = loop {
        let event = next_of(&mut ben, "message").await;
        if event["text"] == "from /ws" {
            break event;
        }
    };
    assert_eq!(message["user"], "ann");
    assert_eq!(message["guest"], true);
    drop((ann, ben));
    server.stop().await;
}

async fn errors_have_codes_and_violations_close_with_4500(kind: Kind) {
    let (server, _dir) = server(kind).await;
    let (mut ann, _) = Client::open(&server, "?name=ann").await;
    let cases = [
        (json!({"op": "dance"}), 104),
        (json!({"op": "subscribe", "channel": "nowhere:x"}), 102),
        (json!({"op": "subscribe", "channel": "room:bad name"}), 102),
        (json!({"op": "subscribe"}), 107),
        (json!({"op": "subscribe", "channel": "broadcast"}), 105),
        (
            json!({"op": "publish", "channel": "room:x", "data": {"text": "hi"}}),
            109,
        ),
        (
            json!({"op": "publish", "channel": "broadcast", "data": {"text": "hi"}}),
            103,
        ),
        (json!({"op": "unsubscribe", "channel": "room:x"}), 109),
    ];
    for (command, code) in cases {
        let reply = ann.call(command.clone()).await;
        assert_eq!(error_code(&reply), code, "{command} → {reply}");
    }
    ann.subscribe("room:x").await;
    let twice = ann.subscribe("room:x").await;
    assert_eq!(error_code(&twice), 105);
    let bad_data = ann
        .call(json!({"op": "publish", "channel": "room:x", "data": {"txt": 1}}))
        .await;
    assert_eq!(error_code(&bad_data), 107);
    let long = "x".repeat(4097);
    let too_long = ann
        .call(json!({"op": "publish", "channel": "room:x", "data": {"text": long}}))
        .await;
    assert_eq!(error_code(&too_long), 111, "over max_text: {too_long}");

    // Not JSON: the connection is closed with 4500 after a disconnect push.
    ann.ws.send(Message::text("hello?")).await.unwrap();
    let disconnect = ann.push("disconnect").await;
    assert_eq!(disconnect["code"], 4500);
    assert_eq!(disconnect["reconnect"], false);
    assert_eq!(close_code(&mut ann.ws).await, 4500);

    // A command before connect.
    let mut ben = open_raw(&server, "?name=ben").await;
    ben.send(Message::text(r#"{"id": 1, "op": "ping"}"#))
        .await
        .unwrap();
    assert_eq!(close_code(&mut ben).await, 4500);
    drop((ann, ben));
    server.stop().await;
}

/// Opens `/ws{query}` offering tether.v1 and returns the `disconnect` push and close code the
/// server ends it with, without a command sent.
/// (The upgrade is accepted, so that the client can read why it is refused.)
async fn refused_with(server: &Running, query: &str) -> (Value, u16) {
    let mut ws = open_raw(server, query).await;
    let push = next(&mut ws).await;
    (push, close_code(&mut ws).await)
}

async fn permanent_refusals_are_told_in_the_protocol_with_their_codes(kind: Kind) {
    let dir = Setup::new(kind);
    dir.add_user("root", "correct horse battery").await;
    let server = start(dir.config()).await;
    let (push, code) = refused_with(&server, "?name=root").await;
    assert_eq!(code, 4503, "a registered user's name: {push}");
    assert_eq!(push["type"], "disconnect");
    assert_eq!(push["code"], 4503);
    assert_eq!(push["reconnect"], false);
    assert!(
        push["reason"].as_str().unwrap().contains("registered"),
        "{push}"
    );
    let (push, code) = refused_with(&server, "?token=not-a-token").await;
    assert_eq!(code, 4501, "{push}");
    let (_, code) = refused_with(&server, "?name=a%20b").await;
    assert_eq!(code, 4503, "a name that is not allowed");
    // A name in use by another guest.
    let (ann, _) = Client::open(&server, "?name=ann").await;
    let (_, code) = refused_with(&server, "?name=ann").await;
    assert_eq!(code, 4503, "a name in use");
    // The single-channel endpoints keep answering with the HTTP status.
    let refused = within(tether::connect(&server.ws("/ws/rooms/x?name=root"))).await;
    assert!(refused.expect_err("refused").to_string().contains("401"));
    drop(ann);
    server.stop().await;

    let dir = Setup::new(kind);
    let mut no_guests = dir.config();
    no_guests.guests = false;
    let server = start(no_guests).await;
    let (push, code) = refused_with(&server, "?name=ann").await;
    assert_eq!(code, 4504, "{push}");
    let (status, me) = http(server.addr, "GET", "/api/me", &[], None).await;
    assert_eq!(
        (status, &me["guests"]),
        (200, &json!(false)),
        "no nickname to offer"
    );
    server.stop().await;
}

async fn poll_channels_vote_push_the_counts_and_list_new_polls(kind: Kind) {
    let dir = Setup::new(kind);
    dir.add_user("root", "correct horse battery").await;
    let server = start(dir.config()).await;
    let token = token(server.addr, "root", "correct horse battery").await;
    let bearer = format!("Bearer {token}");
    let (status, poll) = http(
        server.addr,
        "POST",
        "/api/polls",
        &[("authorization", &bearer)],
        Some(json!({"question": "Tea?", "options": ["yes", "no"]})),
    )
    .await;
    assert_eq!(status, 201, "{poll}");
    let channel = format!("poll:{}", poll["id"]);

    let (mut root, _) = Client::open(&server, &format!("?token={token}")).await;
    let (mut ann, _) = Client::open(&server, "?name=ann").await;

    // The list of polls: the latest in the reply, each new one pushed as it is created.
    let list = ann.subscribe("polls").await;
    assert_eq!(list["polls"][0]["question"], "Tea?", "{list}");
    assert_eq!(list["polls"].as_array().map(Vec::len), Some(1));
    let (status, second) = http(
        server.addr,
        "POST",
        "/api/polls",
        &[("authorization", &bearer)],
        Some(json!({"question": "Coffee?", "options": ["black", "white"]})),
    )
    .await;
    assert_eq!(status, 201, "{second}");
    let created = ann.push("pub").await;
    assert_eq!(created["channel"], "polls", "{created}");
    assert_eq!(created["data"]["created"], second);
    for (command, code) in [
        (
            json!({"op": "publish", "channel": "polls", "data": {}}),
            103,
        ),
        (json!({"op": "history", "channel": "polls"}), 108),
        (json!({"op": "event", "channel": "polls", "name": "x"}), 108),
    ] {
        let reply = ann.call(command.clone()).await;
        assert_eq!(error_code(&reply), code, "{command} → {reply}");
    }
    ann.call(json!({"op": "unsubscribe", "channel": "polls"}))
        .await;
    let subscribed = root.subscribe(&channel).await;
    assert_eq!(subscribed["poll"]["question"], "Tea?", "{subscribed}");
    assert_eq!(subscribed["vote"], Value::Null);
    assert_eq!(subscribed["can_vote"], true);
    ann.subscribe(&channel).await;

    let voted = root
        .call(json!({"op": "publish", "channel": channel, "data": {"vote": "yes"}}))
        .await;
    assert!(voted.get("error").is_none(), "{voted}");
    for client in [&mut root, &mut ann] {
        let counts = client.push("pub").await;
        assert_eq!(counts["channel"], channel.as_str());
        assert_eq!(counts["data"]["counts"], json!({"yes": 1, "no": 0}));
        assert_eq!(counts["data"]["total"], 1);
    }
    // A vote is remembered: subscribing again shows it.
    root.call(json!({"op": "unsubscribe", "channel": channel}))
        .await;
    let again = root.subscribe(&channel).await;
    assert_eq!(again["vote"], "yes", "{again}");

    let cases = [
        (
            json!({"op": "publish", "channel": channel, "data": {"vote": "maybe"}}),
            107,
        ),
        (
            json!({"op": "publish", "channel": channel, "data": {"text": "hi"}}),
            107,
        ),
        (json!({"op": "history", "channel": channel}), 108),
        (json!({"op": "presence", "channel": channel}), 108),
        (
            json!({"op": "event", "channel": channel, "name": "typing"}),
            108,
        ),
        (json!({"op": "subscribe", "channel": "poll:999"}), 102),
        (json!({"op": "subscribe", "channel": "poll:007"}), 102),
        (json!({"op": "subscribe", "channel": "poll:x"}), 102),
    ];
    for (command, code) in cases {
        let reply = root.call(command.clone()).await;
        assert_eq!(error_code(&reply), code, "{command} → {reply}");
    }
    drop((root, ann));
    server.stop().await;
}

async fn publications_in_flight_are_stored_in_order_and_answered_in_order(kind: Kind) {
    let (server, _dir) = server(kind).await;
    let (mut ann, _) = Client::open(&server, "?name=ann").await;
    ann.subscribe("room:flight").await;
    // 30 publications sent without waiting, a refused one among them, then a ping: every
    // reply in command order, the stored offsets in order too.
    let (mut ids, mut refused) = (Vec::new(), 0);
    for i in 0..30 {
        let data = if i == 10 {
            json!({ "txt": "no text" })
        } else {
            json!({ "text": format!("m{i}") })
        };
        let id = ann
            .send(json!({"op": "publish", "channel": "room:flight", "data": data}))
            .await;
        if i == 10 {
            refused = id;
        }
        ids.push(id);
    }
    let ping = ann.send(json!({"op": "ping"})).await;
    ids.push(ping);
    let mut offsets = Vec::new();
    for id in ids {
        let reply = loop {
            let message = next(&mut ann.ws).await;
            if message.get("id").is_some() {
                break message;
            }
            ann.pushes.push(message);
        };
        assert_eq!(reply["id"], id, "replies come in command order: {reply}");
        if id == refused {
            assert_eq!(error_code(&reply), 107, "{reply}");
        } else if id != ping {
            offsets.push(reply["offset"].as_u64().expect("an offset"));
        }
    }
    assert_eq!(offsets.len(), 29);
    assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");
    // And the room holds them in the order sent.
    let history = ann
        .call(json!({"op": "history", "channel": "room:flight"}))
        .await;
    let texts: Vec<&str> = history["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["data"]["text"].as_str().unwrap())
        .collect();
    let sent: Vec<String> = (0..30)
        .filter(|i| *i != 10)
        .map(|i| format!("m{i}"))
        .collect();
    assert_eq!(texts, sent);
    drop(ann);
    server.stop().await;
}

async fn a_users_notifications_reach_every_device_and_resume(kind: Kind) {
    let dir = Setup::new(kind);
    dir.add_user("root", "correct horse battery").await;
    dir.add_user("ann", "correct horse battery").await;
    let server = start(dir.config()).await;
    let root = format!(
        "Bearer {}",
        token(server.addr, "root", "correct horse battery").await
    );
    let ann_token = token(server.addr, "ann", "correct horse battery").await;
    let notify = |text: &str| {
        let body = json!({ "text": text });
        let root = root.clone();
        async move {
            http(
                server.addr,
                "POST",
                "/api/users/ann/notifications",
                &[("authorization", &root)],
                Some(body),
            )
            .await
        }
    };

    // Two devices of ann's; nobody else may listen.
    let (mut phone, _) = Client::open(&server, &format!("?token={ann_token}")).await;
    let (mut laptop, _) = Client::open(&server, &format!("?token={ann_token}")).await;
    let first = phone.subscribe("user:ann").await;
    assert!(first.get("error").is_none(), "{first}");
    assert!(
        first.get("presence").is_none() && first.get("users").is_none(),
        "{first}"
    );
    let epoch = first["epoch"].as_str().unwrap().to_owned();
    laptop.subscribe("user:ann").await;
    let (mut eve, _) = Client::open(&server, "?name=eve").await;
    let refused = eve.subscribe("user:ann").await;
    assert_eq!(error_code(&refused), 103, "{refused}");

    let (status, stored) = notify("your order shipped").await;
    assert_eq!(status, 201, "{stored}");
    let offset = stored["id"].as_u64().unwrap();
    for device in [&mut phone, &mut laptop] {
        let note = device.push("pub").await;
        assert_eq!(note["channel"], "user:ann", "{note}");
        assert_eq!(note["data"]["text"], "your order shipped");
        assert_eq!(note["user"], "root");
        assert_eq!(note["offset"].as_u64(), Some(offset));
    }
    assert!(
        phone.drain().await.is_empty(),
        "no presence between one's own devices"
    );

    // The laptop sleeps through one; it resumes exactly from where it was.
    laptop
        .call(json!({"op": "unsubscribe", "channel": "user:ann"}))
        .await;
    notify("and it arrived").await;
    let resumed = laptop
        .call(json!({"op": "subscribe", "channel": "user:ann", "since": offset, "epoch": epoch}))
        .await;
    assert_eq!(
        (&resumed["recovered"], &resumed["replayed"]),
        (&json!(true), &json!(1))
    );
    assert_eq!(laptop.push("pub").await["data"]["text"], "and it arrived");
    let history = laptop
        .call(json!({"op": "history", "channel": "user:ann"}))
        .await;
    assert_eq!(history["publications"].as_array().map(Vec::len), Some(2));

    for (command, code) in [
        (
            json!({"op": "publish", "channel": "user:ann", "data": {"text": "hi"}}),
            103,
        ),
        (
            json!({"op": "event", "channel": "user:ann", "name": "x"}),
            108,
        ),
        (json!({"op": "presence", "channel": "user:ann"}), 108),
        (json!({"op": "history", "channel": "user:root"}), 103),
        (json!({"op": "subscribe", "channel": "user:a b"}), 102),
    ] {
        let reply = phone.call(command.clone()).await;
        assert_eq!(error_code(&reply), code, "{command} → {reply}");
    }
    // Only to registered users, and never listed as a room.
    let (status, _) = http(
        server.addr,
        "POST",
        "/api/users/nobody/notifications",
        &[("authorization", &root)],
        Some(json!({"text": "hi"})),
    )
    .await;
    assert_eq!(status, 404);
    let (_, rooms) = http(server.addr, "GET", "/api/rooms", &[], None).await;
    assert_eq!(rooms, json!([]), "{rooms}");
    drop((phone, laptop, eve));
    server.stop().await;
}

async fn connect_takes_a_token_so_that_it_stays_out_of_the_url(kind: Kind) {
    let dir = Setup::new(kind);
    dir.add_user("root", "correct horse battery").await;
    let server = start(dir.config()).await;
    let root = token(server.addr, "root", "correct horse battery").await;
    let connect = |token: &str| json!({"id": 1, "op": "connect", "token": token}).to_string();

    let mut ws = open_raw(&server, "").await;
    ws.send(Message::text(connect(&root))).await.unwrap();
    let connected = next(&mut ws).await;
    assert_eq!(
        (&connected["user"], &connected["guest"]),
        (&json!("root"), &json!(false)),
        "{connected}"
    );
    // Who it is now: its own notifications are open to it.
    let subscribe = json!({"id": 2, "op": "subscribe", "channel": "user:root"});
    ws.send(Message::text(subscribe.to_string())).await.unwrap();
    let subscribed = next(&mut ws).await;
    assert!(subscribed.get("error").is_none(), "{subscribed}");
    // Logging the token out ends the connection, as for one opened with it.
    let bearer = format!("Bearer {root}");
    let (status, _) = http(
        server.addr,
        "POST",
        "/api/logout",
        &[("authorization", &bearer)],
        None,
    )
    .await;
    assert_eq!(status, 204);
    assert_eq!(close_code(&mut ws).await, 4502);

    // A token that is not one, or a second identity: refused for good, 4501.
    let mut bad = open_raw(&server, "").await;
    bad.send(Message::text(connect("not-a-token")))
        .await
        .unwrap();
    assert_eq!(close_code(&mut bad).await, 4501);
    let fresh = token(server.addr, "root", "correct horse battery").await;
    let mut twice = open_raw(&server, "?name=ann").await;
    twice.send(Message::text(connect(&fresh))).await.unwrap();
    assert_eq!(close_code(&mut twice).await, 4501);
    server.stop().await;
}

async fn a_client_that_ignores_too_many_requests_is_closed_with_4002(kind: Kind) {
    let (server, _dir) = server(kind).await;
    let (mut ann, _) = Client::open(&server, "?name=ann").await;
    for _ in 0..200 {
        ann.send(json!({"op": "ping"})).await;
    }
    let mut slowed = 0;
    let push = loop {
        let message = next(&mut ann.ws).await;
        if message.get("id").is_none() {
            break message;
        }
        if message.get("error").is_some() {
            assert_eq!(error_code(&message), 110, "{message}");
            slowed += 1;
        }
    };
    assert!(slowed > 0, "told to slow down first");
    assert_eq!(
        (&push["type"], &push["code"]),
        (&json!("disconnect"), &json!(4002)),
        "{push}"
    );
    assert_eq!(push["reconnect"], true);
    assert_eq!(close_code(&mut ann.ws).await, 4002);
    server.stop().await;
}

/// A server with fan-out's direct writes on or off (`--direct-fanout`), and a rate that lets
/// one client publish as fast as it can.
async fn busy_server(kind: Kind, direct: bool) -> (Running, Setup) {
    let dir = Setup::new(kind);
    let mut c = dir.config();
    c.direct_fanout = direct;
    c.message_rate = 1e6;
    c.identity_message_rate = 1_000_000;
    c.max_replay = 10_000;
    (start(c).await, dir)
}

/// Publishes `count` texts to `channel` without waiting for replies, then waits for them all.
async fn publish_many(client: &mut Client, channel: &str, count: usize) {
    for i in 0..count {
        let data = json!({ "text": format!("p{i}") });
        client
            .send(json!({"op": "publish", "channel": channel, "data": data}))
            .await;
    }
    // The replies come in command order: the ping's is the last.
    let ping = client.send(json!({"op": "ping"})).await;
    loop {
        let message = next(&mut client.ws).await;
        match message.get("id") {
            Some(id) if *id == ping => return,
            Some(_) => assert!(message.get("error").is_none(), "{message}"),
            None => client.pushes.push(message),
        }
    }
}

/// Reads `client`'s publications on `channel` until `last`; returns their offsets in the
/// order they came (pushes kept earlier first).
async fn offsets_until(client: &mut Client, channel: &str, last: u64) -> Vec<u64> {
    let mut offsets = Vec::new();
    let mut kept = std::mem::take(&mut client.pushes).into_iter();
    loop {
        let push = match kept.next() {
            Some(push) => push,
            None => next(&mut client.ws).await,
        };
        if push["type"] == "pub" && push["channel"] == channel {
            let offset = push["offset"].as_u64().unwrap();
            offsets.push(offset);
            if offset >= last {
                return offsets;
            }
        }
    }
}

/// Asserts that `offsets` are `first..=last`, naming the first one out of place.
fn assert_consecutive(offsets: &[u64], first: u64, last: u64, context: &str) {
    let expected = first..=last;
    if let Some((i, (got, want))) = offsets
        .iter()
        .zip(expected.clone())
        .enumerate()
        .find(|(_, (got, want))| **got != *want)
    {
        panic!("{context}: publication {i} has offset {got}, not {want}");
    }
    assert_eq!(
        offsets.len() as u64,
        last + 1 - first,
        "{context}: {} publications from {first} to {last}",
        offsets.len()
    );
}

/// The publisher of `publish_many`, once done: 1,500 acknowledged publications on one
/// debug-built thread take longer than one ordinary wait on a busy machine.
async fn publishing_done(publishing: tokio::task::JoinHandle<Client>) -> Client {
    tokio::time::timeout(std::time::Duration::from_secs(90), publishing)
        .await
        .expect("the publisher did not finish in 90 s")
        .unwrap()
}

/// Subscribers that join a room while it is busy, resuming from the start or not: each gets
/// every publication from where it starts, once, in order: the replay and the live stream
/// meet with no gap and no duplicate, whether fan-out writes to idle connections directly or
/// wakes them.
async fn subscribers_joining_a_busy_room_get_each_publication_once(kind: Kind, direct: bool) {
    let (server, _dir) = busy_server(kind, direct).await;
    let channel = "room:busy";
    let (mut ann, _) = Client::open(&server, "?name=ann").await;
    ann.subscribe(channel).await;
    // Watches from the start, idle between publications: direct writes reach it.
    let (mut eve, _) = Client::open(&server, "?name=eve").await;
    eve.subscribe(channel).await;
    let total = 1500;
    let publishing = tokio::spawn(async move {
        publish_many(&mut ann, channel, total).await;
        ann
    });
    // Two more join while it runs: one replays from the start, one takes what comes.
    let mut joined = Vec::new();
    for (name, since) in [("ben", Some(0)), ("cay", None)] {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let (mut client, _) = Client::open(&server, &format!("?name={name}")).await;
        let mut subscribe = json!({"op": "subscribe", "channel": channel});
        if let Some(since) = since {
            subscribe["since"] = since.into();
        }
        let reply = client.call(subscribe).await;
        joined.push((client, since, reply));
    }
    let mut ann = publishing_done(publishing).await;
    let last = ann
        .call(json!({"op": "history", "channel": channel, "limit": 1}))
        .await["publications"][0]["offset"]
        .as_u64()
        .unwrap();
    assert_eq!(last, total as u64);
    let watched = offsets_until(&mut eve, channel, last).await;
    assert_consecutive(&watched, 1, last, &format!("watching, direct: {direct}"));
    for (mut client, since, reply) in joined {
        let offsets = offsets_until(&mut client, channel, last).await;
        let first = match since {
            Some(_) => {
                assert_eq!(reply["recovered"], true, "{reply}");
                1
            }
            // The recent history, then what follows.
            None => reply["offset"].as_u64().unwrap() + 1 - reply["replayed"].as_u64().unwrap(),
        };
        let context = format!("since {since:?}, direct: {direct}; {reply}");
        assert_consecutive(&offsets, first, last, &context);
    }
    // Fan-out wrote to the idle ones itself, or woke every one: as configured.
    let metrics = http_text(server.addr, "/metrics").await;
    let direct_writes = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tether_fanout_direct_writes_total "))
        .and_then(|n| n.parse::<u64>().ok())
        .expect("the counter of direct writes");
    assert_eq!(direct_writes > 0, direct, "{direct_writes} direct writes");
    drop((ann, eve));
    server.stop().await;
}

async fn subscribers_joining_a_busy_room_get_each_publication_once_with_direct_writes(kind: Kind) {
    subscribers_joining_a_busy_room_get_each_publication_once(kind, true).await;
}

async fn subscribers_joining_a_busy_room_get_each_publication_once_with_wakes(kind: Kind) {
    subscribers_joining_a_busy_room_get_each_publication_once(kind, false).await;
}

async fn nothing_of_a_busy_channel_follows_its_unsubscribe_reply(kind: Kind) {
    let (server, _dir) = busy_server(kind, true).await;
    let (mut ann, _) = Client::open(&server, "?name=ann").await;
    ann.subscribe("room:a").await;
    let (mut ben, _) = Client::open(&server, "?name=ben").await;
    ben.subscribe("room:a").await;
    ben.subscribe("room:b").await;
    let publishing = tokio::spawn(async move {
        publish_many(&mut ann, "room:a", 1500).await;
        ann
    });
    // Wait for the stream to flow, then leave in the middle of it.
    loop {
        if next(&mut ben.ws).await["type"] == "pub" {
            break;
        }
    }
    ben.call(json!({"op": "unsubscribe", "channel": "room:a"}))
        .await;
    ben.pushes.clear();
    let ann = publishing_done(publishing).await;
    // Another channel's publication marks the end of what could still arrive.
    let (mut cay, _) = Client::open(&server, "?name=cay").await;
    cay.subscribe("room:b").await;
    cay.publish("room:b", "end").await;
    loop {
        let push = next(&mut ben.ws).await;
        assert_ne!(push["channel"], "room:a", "after unsubscribing: {push}");
        if push["type"] == "pub" && push["channel"] == "room:b" {
            break;
        }
    }
    drop((ann, ben, cay));
    server.stop().await;
}

async fn a_channel_subscriber_that_stops_reading_is_closed_with_4000_and_the_others_get_everything(
    kind: Kind,
) {
    let dir = Setup::new(kind);
    let mut c = dir.config();
    c.message_rate = 1e6;
    c.identity_message_rate = 1_000_000;
    // Above the journal's batch (512), which can arrive at once, so only a stalled reader
    // overflows.
    c.outbox = 600;
    c.max_text = 16 << 10;
    let server = start(c).await;
    let channel = "room:r";
    // Subscribes, then never reads: direct writes fill its socket, then its queue fills
    // (docs/protocol.md: a slow consumer is closed with 4000).
    let (mut slow, _) = Client::open(&server, "?name=slow").await;
    slow.subscribe(channel).await;
    let (mut fast, _) = Client::open(&server, "?name=fast").await;
    fast.subscribe(channel).await;
    let (mut sender, _) = Client::open(&server, "?name=sender").await;
    sender.subscribe(channel).await;
    let text = "x".repeat(16 << 10);
    let count = 2000u64;
    // The fast reader tells the sender how far it got; the sender stays at most 100
    // publications ahead, so however slowly this machine runs, only `slow` falls behind.
    let (progress, mut fast_got) = tokio::sync::watch::channel(0u64);
    let sending = tokio::spawn(async move {
        let (mut tx, mut rx) = sender.ws.split();
        // The sender is subscribed too: it keeps reading so that it does not fall behind.
        let drain = tokio::spawn(async move { while let Some(Ok(_)) = rx.recv().await {} });
        for sent in 0..count {
            if sent % 100 == 0 {
                fast_got.wait_for(|got| *got + 100 >= sent).await.unwrap();
            }
            let data = json!({ "text": text });
            let command =
                json!({"id": sent + 10, "op": "publish", "channel": channel, "data": data});
            tx.send(Message::text(command.to_string())).await.unwrap();
        }
        (tx, drain)
    });
    let mut got = 0;
    while got < count {
        let push = next(&mut fast.ws).await;
        if push["type"] == "pub" {
            got += 1;
            assert_eq!(push["offset"], got, "{}", push["offset"]);
            progress.send_replace(got);
        }
    }
    let _sender = within(sending).await.unwrap();
    let metrics = http_text(server.addr, "/metrics").await;
    assert!(
        metrics.contains("tether_slow_consumer_disconnects_total 1"),
        "{metrics}"
    );
    // What the slow one finally reads ends with 4000, slow consumer (or the transport was
    // cut).
    let code = last_close_code(&mut slow.ws).await;
    assert!(matches!(code, Some(4000) | None), "{code:?}");
    drop(fast);
    server.stop().await;
}

on_both_engines!(
    the_endpoint_requires_the_subprotocol,
    connect_subscribe_publish_and_receive,
    one_connection_carries_several_rooms,
    a_resubscription_recovers_exactly_what_was_missed,
    presence_joins_leaves_and_typing,
    presence_shows_the_info_each_connection_attached,
    a_broadcast_reaches_every_channel_connection_named_or_not,
    the_server_unsubscribes_and_disconnects_a_user,
    a_channel_client_and_a_room_shortcut_client_chat_together,
    errors_have_codes_and_violations_close_with_4500,
    permanent_refusals_are_told_in_the_protocol_with_their_codes,
    poll_channels_vote_push_the_counts_and_list_new_polls,
    publications_in_flight_are_stored_in_order_and_answered_in_order,
    a_users_notifications_reach_every_device_and_resume,
    connect_takes_a_token_so_that_it_stays_out_of_the_url,
    a_client_that_ignores_too_many_requests_is_closed_with_4002,
    subscribers_joining_a_busy_room_get_each_publication_once_with_direct_writes,
    subscribers_joining_a_busy_room_get_each_publication_once_with_wakes,
    nothing_of_a_busy_channel_follows_its_unsubscribe_reply,
    a_channel_subscriber_that_stops_reading_is_closed_with_4000_and_the_others_get_everything,
);
