//! The server over real sockets: history then live delivery, resume, presence, the publish
//! API, polls, auth and Origin refusals, rate and slow-consumer limits, restart and shutdown.

use serde_json::{json, Value};
use tether::{ClientBuilder, Message};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;
use common::*;

async fn history_then_live_then_resume_without_gap_or_duplicate(kind: Kind) {
    let dir = Setup::new(kind);
    let server = start(dir.config()).await;
    let mut ann = connect(&server.ws("/ws/rooms/lobby?name=ann")).await;
    let welcome = next(&mut ann).await;
    assert_eq!(welcome["type"], "welcome");
    assert_eq!(welcome["members"], json!(["ann"]));
    assert_ready(&next(&mut ann).await, 0);
    for i in 1..=3 {
        say(&mut ann, &format!("m{i}")).await;
        let m = next_of(&mut ann, "message").await;
        assert_eq!(
            (m["id"].as_u64(), m["text"].as_str()),
            (Some(i), Some(format!("m{i}").as_str()))
        );
        assert_eq!(m["user"], "ann");
    }

    // A newcomer sees the history, then live messages; the others see it arrive.
    // Ben keeps his guest cookie for his reconnection, as a browser does.
    let (mut ben, ben_cookie) = connect_guest(&server.ws("/ws/rooms/lobby?name=ben")).await;
    assert_eq!(next(&mut ben).await["members"], json!(["ann", "ben"]));
    let ids: Vec<u64> = [
        next(&mut ben).await,
        next(&mut ben).await,
        next(&mut ben).await,
    ]
    .iter()
    .map(|m| m["id"].as_u64().unwrap())
    .collect();
    assert_eq!(ids, [1, 2, 3]);
    assert_ready(&next(&mut ben).await, 3);
    let join = next(&mut ann).await;
    assert_eq!(
        (
            join["event"].as_str(),
            join["user"].as_str(),
            join["count"].as_u64()
        ),
        (Some("join"), Some("ben"), Some(2))
    );

    // Ben drops after id 3; meanwhile 4 and 5 are sent; he resumes with since=3.
    drop(ben);
    let leave = next_of(&mut ann, "presence").await;
    assert_eq!(leave["event"], "leave");
    say(&mut ann, "m4").await;
    say(&mut ann, "m5").await;
    // Stored (ann hears them) before ben comes back, or his resume would find them live.
    assert_eq!(next_of(&mut ann, "message").await["id"], 4);
    assert_eq!(next_of(&mut ann, "message").await["id"], 5);
    let url = server.ws("/ws/rooms/lobby?name=ben&since=3");
    let mut ben = connect_with_cookie(&url, &ben_cookie).await;
    let welcome = next(&mut ben).await;
    assert_eq!(
        (&welcome["type"], &welcome["recovered"]),
        (&json!("welcome"), &json!(true))
    );
    assert_eq!(next(&mut ben).await["id"], 4);
    assert_eq!(next(&mut ben).await["id"], 5);
    assert_ready(&next(&mut ben).await, 5);
    say(&mut ann, "m6").await;
    assert_eq!(next_of(&mut ben, "message").await["id"], 6);

    // The same history over HTTP, paged.
    let (status, page) = http(
        server.addr,
        "GET",
        "/api/rooms/lobby/messages?since=2&limit=2",
        &[],
        None,
    )
    .await;
    assert_eq!(status, 200);
    let ids: Vec<u64> = page
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [3, 4]);

    // Hostile positions neither overflow nor return everything.
    let max = u64::MAX;
    let (status, page) = http(
        server.addr,
        "GET",
        &format!("/api/rooms/lobby/messages?since={max}"),
        &[],
        None,
    )
    .await;
    assert_eq!((status, page), (200, json!([])));
    // A position past the room's end is not this room's: the client is told, and gets the
    // recent history as on a first join; live messages still arrive.
    let mut far = connect(&server.ws(&format!("/ws/rooms/lobby?name=far&since={max}"))).await;
    let welcome = next(&mut far).await;
    assert_eq!(
        (&welcome["type"], &welcome["recovered"]),
        (&json!("welcome"), &json!(false))
    );
    assert_ready(&next_of(&mut far, "ready").await, 6);
    say(&mut ann, "m7").await;
    assert_eq!(next_of(&mut far, "message").await["id"], 7);
    server.stop().await;
}

async fn concurrent_writers_and_a_resuming_reader_see_every_id_once(kind: Kind) {
    let dir = Setup::new(kind);
    let mut c = dir.config();
    c.message_rate = 1e6;
    c.identity_message_rate = 1_000_000;
    let server = start(c).await;
    let mut writers = Vec::new();
    for w in 0..4 {
        let url = server.ws(&format!("/ws/rooms/busy?name=w{w}"));
        writers.push(tokio::spawn(async move {
            let mut ws = connect(&url).await;
            for i in 0..50 {
                say(&mut ws, &format!("w{w}-{i}")).await;
            }
            // Stay until our last message is back, so none is lost to an early close.
            let mut seen = 0;
            while seen < 50 {
                let m = next_of(&mut ws, "message").await;
                if m["user"] == format!("w{w}") {
                    seen += 1;
                }
            }
        }));
    }
    // A reader that reconnects several times while the writers run, resuming each time. Like
    // a browser it keeps its guest cookie, so its nickname is its own at once, even while the
    // server has not yet noticed the previous connection end.
    let mut last = 0u64;
    let mut got = Vec::new();
    let mut cookie: Option<String> = None;
    while last < 200 {
        let url = server.ws(&format!("/ws/rooms/busy?name=reader&since={last}"));
        let mut builder = ClientBuilder::new(&url).unwrap();
        if let Some(c) = &cookie {
            builder = builder.header("Cookie", c.clone());
        }
        let (mut ws, response) = within(builder.connect()).await.unwrap();
        if let Some(set) = response.headers.get_str("set-cookie") {
            cookie = Some(set.split(';').next().unwrap().to_owned());
        }
        for _ in 0..37 {
            let v = next(&mut ws).await;
            if v["type"] == "message" {
                let id = v["id"].as_u64().unwrap();
                got.push(id);
                last = id;
                if last == 200 {
                    break;
                }
            }
        }
    }
    for w in writers {
        within(w).await.unwrap();
    }
    assert_eq!(
        got,
        (1..=200).collect::<Vec<_>>(),
        "every id exactly once, in order"
    );
    server.stop().await;
}

async fn publish_api_needs_a_token_and_reaches_members(kind: Kind) {
    let dir = Setup::new(kind);
    dir.add_user("ops", "s3cret").await;
    let server = start(dir.config()).await;
    let mut ann = connect(&server.ws("/ws/rooms/news?name=ann")).await;
    next_of(&mut ann, "ready").await;
    let mut other = connect(&server.ws("/ws/rooms/other?name=zed")).await;
    next_of(&mut other, "ready").await;

    let body = Some(json!({"text": "deploy done"}));
    let (status, _) = http(
        server.addr,
        "POST",
        "/api/rooms/news/messages",
        &[],
        body.clone(),
    )
    .await;
    assert_eq!(status, 401);
    let (status, _) = http(
        server.addr,
        "POST",
        "/api/rooms/news/messages",
        &[("Authorization", "Bearer nope")],
        body.clone(),
    )
    .await;
    assert_eq!(status, 401);
    let (status, _) = http(
        server.addr,
        "POST",
        "/api/tokens",
        &[],
        Some(json!({"user": "ops", "password": "wrong"})),
    )
    .await;
    assert_eq!(status, 401);

    let token = token(server.addr, "ops", "s3cret").await;
    let bearer = format!("Bearer {token}");
    let (status, stored) = http(
        server.addr,
        "POST",
        "/api/rooms/news/messages",
        &[("Authorization", &bearer)],
        body,
    )
    .await;
    assert_eq!(status, 201);
    assert_eq!(
        (stored["id"].as_u64(), stored["user"].as_str()),
        (Some(1), Some("ops"))
    );
    assert!(
        stored.get("guest").is_none(),
        "a user's message is no guest's: {stored}"
    );
    let live = next_of(&mut ann, "message").await;
    assert_eq!(live, stored);

    let (status, reached) = http(
        server.addr,
        "POST",
        "/api/broadcast",
        &[("Authorization", &bearer)],
        Some(json!({"text": "maintenance"})),
    )
    .await;
    // One process counts the connections; through Redis, the nodes it reached (docs/api.md).
    let reach = match kind {
        Kind::Embedded => json!({"delivered": 2}),
        Kind::Redis => json!({"nodes": 1}),
    };
    assert_eq!((status, reached), (200, reach));
    assert_eq!(next_of(&mut ann, "broadcast").await["text"], "maintenance");
    assert_eq!(next_of(&mut other, "broadcast").await["user"], "ops");
    server.stop().await;
}

async fn votes_update_every_watcher_and_persist(kind: Kind) {
    let dir = Setup::new(kind);
    let server = start(dir.config()).await;
    let (status, poll) = http(
        server.addr,
        "POST",
        "/api/polls",
        &[],
        Some(json!({"question": "Lunch?", "options": ["soup", "salad"]})),
    )
    .await;
    assert_eq!(status, 201, "{poll}");
    let id = poll["id"].as_i64().unwrap();
    let (status, _) = http(
        server.addr,
        "POST",
        "/api/polls",
        &[],
        Some(json!({"question": "Dup?", "options": ["a", "a"]})),
    )
    .await;
    assert_eq!(status, 400);

    // Ann keeps her guest cookie, as a browser does: her vote is hers across connections.
    let (mut ann, ann_cookie) =
        connect_guest(&server.ws(&format!("/ws/polls/{id}?name=ann"))).await;
    let mut ben = connect(&server.ws(&format!("/ws/polls/{id}?name=ben"))).await;
    let first = next(&mut ann).await;
    assert_eq!(
        (first["type"].as_str(), first["vote"].clone()),
        (Some("poll"), Value::Null)
    );
    next(&mut ben).await;

    ann.send(Message::text(r#"{"vote":"soup"}"#)).await.unwrap();
    let counts = next_of(&mut ben, "counts").await;
    assert_eq!(counts["counts"], json!({"soup": 1, "salad": 0}));
    // A changed vote moves, it does not add.
    ann.send(Message::text(r#"{"vote":"salad"}"#))
        .await
        .unwrap();
    loop {
        let c = next_of(&mut ben, "counts").await;
        if c["counts"] == json!({"soup": 0, "salad": 1}) {
            assert_eq!(c["total"], 1);
            break;
        }
    }
    ben.send(Message::text(r#"{"vote":"pizza"}"#))
        .await
        .unwrap();
    assert!(next_of(&mut ben, "error").await["error"]
        .as_str()
        .unwrap()
        .contains("unknown option"));
    // What is not a vote is told so, and the connection stays for the next.
    let told = |event: Value| event["error"].as_str().unwrap_or_default().to_owned();
    ben.send(Message::text("soup")).await.unwrap();
    assert!(told(next_of(&mut ben, "error").await).contains("expected {\"vote\""));
    ben.send(Message::binary(vec![1u8, 2])).await.unwrap();
    assert!(told(next_of(&mut ben, "error").await).contains("not binary"));
    ben.send(Message::text(r#"{"vote":"soup"}"#)).await.unwrap();
    while next_of(&mut ann, "counts").await["total"] != 2 {}

    let (status, _) = http(server.addr, "GET", "/ws/polls/999?name=x", &[], None).await;
    assert_eq!(status, 404);
    drop((ann, ben));
    server.stop().await;

    let server = start(dir.config()).await;
    let (_, stored) = http(server.addr, "GET", &format!("/api/polls/{id}"), &[], None).await;
    assert_eq!(stored["counts"], json!({"soup": 1, "salad": 1}));
    let url = server.ws(&format!("/ws/polls/{id}?name=ann"));
    let mut ann = connect_with_cookie(&url, &ann_cookie).await;
    assert_eq!(next(&mut ann).await["vote"], "salad");
    server.stop().await;
}

async fn upgrades_are_refused_for_bad_identity_or_origin(kind: Kind) {
    let dir = Setup::new(kind);
    dir.add_user("alice", "pw").await;
    let server = start(dir.config()).await;
    let refused = |url: String, headers: Vec<(&'static str, String)>| async move {
        let mut b = ClientBuilder::new(&url).unwrap();
        for (k, v) in headers {
            b = b.header(k, v);
        }
        match within(b.connect()).await {
            Ok(_) => panic!("{url} was accepted"),
            Err(e) => e.to_string(),
        }
    };
    let e = refused(server.ws("/ws/rooms/r"), vec![]).await;
    assert!(e.contains("401"), "{e}");
    let e = refused(server.ws("/ws/rooms/r?name=alice"), vec![]).await;
    assert!(e.contains("401"), "registered name as a guest: {e}");
    let e = refused(server.ws("/ws/rooms/r?token=forged"), vec![]).await;
    assert!(e.contains("401"), "{e}");
    let e = refused(server.ws("/ws/rooms/bad%20room?name=x"), vec![]).await;
    assert!(e.contains("400"), "{e}");
    let e = refused(
        server.ws("/ws/rooms/r?name=x"),
        vec![("Origin", "http://evil.example".into())],
    )
    .await;
    assert!(e.contains("403"), "cross-site: {e}");

    // The server's own origin is fine, and a token (query or header) names the user.
    let own = format!("http://{}", server.addr);
    let (mut ws, _) = within(
        ClientBuilder::new(&server.ws("/ws/rooms/r?name=x"))
            .unwrap()
            .header("Origin", own)
            .connect(),
    )
    .await
    .unwrap();
    assert_eq!(next(&mut ws).await["user"], "x");
    let token = token(server.addr, "alice", "pw").await;
    let mut ws = connect(&server.ws(&format!("/ws/rooms/r?token={token}"))).await;
    let welcome = next(&mut ws).await;
    assert_eq!(
        (welcome["user"].as_str(), welcome["guest"].as_bool()),
        (Some("alice"), Some(false))
    );

    // A session cookie from the login works too.
    let (status, me) = http(server.addr, "GET", "/api/me", &[], None).await;
    assert_eq!(
        (status, &me["user"], &me["guest"]),
        (200, &serde_json::Value::Null, &serde_json::json!(true)),
        "not logged in is an answer, not an error"
    );
    assert_eq!(
        me["guests"], true,
        "a page learns whether to offer a nickname"
    );
    let (_, metrics) = (0, http_text(server.addr, "/metrics").await);
    assert!(
        metrics.contains("tether_handshake_failures_total{reason=\"auth\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tether_handshake_failures_total{reason=\"origin\"} 1"),
        "{metrics}"
    );
    server.stop().await;

    let mut c = dir.config();
    c.guests = false;
    let server = start(c).await;
    let e = refused(server.ws("/ws/rooms/r?name=guest"), vec![]).await;
    assert!(e.contains("401"), "no guests: {e}");
    server.stop().await;
}

async fn login_sets_a_session_cookie_that_opens_sockets(kind: Kind) {
    let dir = Setup::new(kind);
    dir.add_user("alice", "pw").await;
    let server = start(dir.config()).await;
    let addr = server.addr;
    let body = json!({"user": "alice", "password": "pw"}).to_string();
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(format!("POST /api/login HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).as_bytes()).await.unwrap();
    let mut raw = String::new();
    within(tcp.read_to_string(&mut raw)).await.unwrap();
    let cookie_line = raw
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .expect("a cookie");
    assert!(
        cookie_line.contains("HttpOnly") && cookie_line.contains("SameSite=Lax"),
        "{cookie_line}"
    );
    let cookie = cookie_line
        .split_once(':')
        .unwrap()
        .1
        .trim()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let (status, me) = http(addr, "GET", "/api/me", &[("Cookie", &cookie)], None).await;
    assert_eq!((status, me["user"].as_str()), (200, Some("alice")));
    let (mut ws, _) = within(
        ClientBuilder::new(&server.ws("/ws/rooms/r"))
            .unwrap()
            .header("Cookie", cookie.clone())
            .connect(),
    )
    .await
    .unwrap();
    assert_eq!(next(&mut ws).await["user"], "alice");
    let (status, _) = http(addr, "POST", "/api/logout", &[("Cookie", &cookie)], None).await;
    assert_eq!(status, 204);
    let (status, me) = http(addr, "GET", "/api/me", &[("Cookie", &cookie)], None).await;
    assert_eq!(
        (status, &me["user"]),
        (200, &serde_json::Value::Null),
        "the ended session's cookie is ignored: a guest"
    );
    server.stop().await;
}

async fn a_client_sending_too_fast_is_closed_with_1008(kind: Kind) {
    let dir = Setup::new(kind);
    let mut c = dir.config();
    c.message_rate = 2.0;
    let server = start(c).await;
    let mut ws = connect(&server.ws("/ws/rooms/r?name=spam")).await;
    next_of(&mut ws, "ready").await;
    for i in 0..10 {
        if ws
            .send(Message::text(json!({"text": format!("{i}")}).to_string()))
            .await
            .is_err()
        {
            break;
        }
    }
    assert_eq!(close_code(&mut ws).await, 1008);
    server.stop().await;
}

async fn a_slow_consumer_is_closed_with_1013_and_the_others_get_everything(kind: Kind) {
    let dir = Setup::new(kind);
    let mut c = dir.config();
    c.message_rate = 1e6;
    c.identity_message_rate = 1_000_000;
    // Above the journal's batch (512), which can arrive at once, so only a stalled reader overflows.
    c.outbox = 600;
    c.max_text = 16 << 10;
    let server = start(c).await;
    // Never reads: its socket buffers fill, then its queue.
    let mut slow = connect(&server.ws("/ws/rooms/r?name=slow")).await;
    let mut fast = connect(&server.ws("/ws/rooms/r?name=fast")).await;
    next_of(&mut fast, "ready").await;
    let text = "x".repeat(16 << 10);
    let count = 2000;
    let sender = connect(&server.ws("/ws/rooms/r?name=sender")).await;
    // The fast reader tells the sender how far it got; the sender stays at most 100 messages
    // ahead of it, so however slowly this machine runs the test, only `slow` falls behind.
    let (progress, mut fast_got) = tokio::sync::watch::channel(0usize);
    let sending = tokio::spawn(async move {
        // The sender is in the room too: it keeps reading so that it does not fall behind.
        let (mut tx, mut rx) = sender.split();
        let drain = tokio::spawn(async move { while let Some(Ok(_)) = rx.recv().await {} });
        for sent in 0..count {
            if sent % 100 == 0 {
                fast_got.wait_for(|got| *got + 100 >= sent).await.unwrap();
            }
            let msg = json!({ "text": text }).to_string();
            tx.send(Message::text(msg)).await.unwrap();
        }
        // Keep both halves (and so the reading) alive until the test ends.
        (tx, drain)
    });
    let mut got = 0;
    while got < count {
        if next(&mut fast).await["type"] == "message" {
            got += 1;
            progress.send_replace(got);
        }
    }
    let _sender = within(sending).await.unwrap();
    let metrics = http_text(server.addr, "/metrics").await;
    assert!(
        metrics.contains("tether_slow_consumer_disconnects_total 1"),
        "{metrics}"
    );
    // What the slow one finally reads ends with 1013 (or the transport was cut).
    let code = last_close_code(&mut slow).await;
    assert!(matches!(code, Some(1013) | None), "{code:?}");
    server.stop().await;
}

async fn history_survives_a_restart_and_ids_continue(kind: Kind) {
    let dir = Setup::new(kind);
    let server = start(dir.config()).await;
    let mut ws = connect(&server.ws("/ws/rooms/keep?name=ann")).await;
    next_of(&mut ws, "ready").await;
    say(&mut ws, "before").await;
    next_of(&mut ws, "message").await;
    // An idle echo socket is told too: sessions register nothing for
    // shutdown, they are all polled when it begins.
    let mut echo = connect(&server.ws("/ws/echo")).await;
    echo.send(Message::text("hi")).await.unwrap();
    assert_eq!(
        within(echo.recv()).await.unwrap().unwrap(),
        Message::text("hi")
    );
    server.stop().await;
    // Shutdown closed the sockets with 1001.
    assert_eq!(close_code(&mut ws).await, 1001);
    assert_eq!(close_code(&mut echo).await, 1001);

    let server = start(dir.config()).await;
    let mut ws = connect(&server.ws("/ws/rooms/keep?name=ann")).await;
    next(&mut ws).await;
    assert_eq!(next(&mut ws).await["text"], "before");
    next_of(&mut ws, "ready").await;
    say(&mut ws, "after").await;
    assert_eq!(next_of(&mut ws, "message").await["id"], 2);
    let (status, health) = http(server.addr, "GET", "/healthz", &[], None).await;
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")));
    server.stop().await;
}

async fn pages_and_echo_are_served(kind: Kind) {
    let dir = Setup::new(kind);
    let server = start(dir.config()).await;
    for path in [
        "/",
        "/polls",
        "/console",
        "/assets/chat.js",
        "/assets/style.css",
    ] {
        let raw = http_text(server.addr, path).await;
        assert!(
            raw.starts_with("HTTP/1.1 200"),
            "{path}: {}",
            &raw[..40.min(raw.len())]
        );
    }
    assert!(http_text(server.addr, "/nope")
        .await
        .starts_with("HTTP/1.1 404"));
    // The channel protocol's JavaScript client, as a module a page can import.
    let client = http_text(server.addr, "/assets/tether-client.js").await;
    assert!(client.starts_with("HTTP/1.1 200"), "{client:.60}");
    assert!(client.contains("text/javascript") && client.contains("export class Client"));
    let mut ws = connect(&server.ws("/ws/echo")).await;
    ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    assert_eq!(
        within(ws.recv()).await.unwrap().unwrap(),
        Message::binary(vec![1u8, 2, 3])
    );
    // A clean close: the echo answers the client's Close before it ends.
    let bye = tether::CloseFrame::new(tether::CloseCode::NORMAL, "bye");
    within(ws.close(Some(bye.clone())))
        .await
        .expect("the echo answers the Close");
    // So does a room member's session.
    let mut member = connect(&server.ws("/ws/rooms/lobby?name=ann")).await;
    next_of(&mut member, "ready").await;
    within(member.close(Some(bye)))
        .await
        .expect("the room session answers the Close");
    server.stop().await;
}

async fn compressing_clients_share_one_compressed_copy_and_read_it(kind: Kind) {
    let dir = Setup::new(kind);
    let server = start(dir.config()).await;
    let deflate = tether::Config::default().deflate(Some(Default::default()));
    let mut clients = Vec::new();
    for name in ["ann", "ben"] {
        let url = server.ws(&format!("/ws/rooms/z?name={name}"));
        let (mut ws, response) = within(
            ClientBuilder::new(&url)
                .unwrap()
                .config(deflate.clone())
                .connect(),
        )
        .await
        .unwrap();
        let ext = response.extensions.clone().unwrap_or_default();
        assert!(ext.contains("server_no_context_takeover"), "{ext}");
        assert!(ws.is_compressed());
        next_of(&mut ws, "ready").await;
        clients.push(ws);
    }
    let long = "a compressible sentence, again and again. ".repeat(20);
    say(&mut clients[0], &long).await;
    for ws in &mut clients {
        assert_eq!(next_of(ws, "message").await["text"], long.as_str());
    }
    server.stop().await;
}

async fn tls_serves_https_and_wss_on_one_port(kind: Kind) {
    let dir = Setup::new(kind);
    let mut c = dir.config();
    let tls = with_tls(&mut c, dir.path());
    let server = start(c).await;

    let port = server.addr.port();
    let url = format!("wss://localhost:{port}/ws/rooms/secure?name=ann");
    let (mut ws, _) = within(
        ClientBuilder::new(&url)
            .unwrap()
            .tls_config(tls.clone())
            .connect(),
    )
    .await
    .unwrap();
    assert_eq!(next(&mut ws).await["type"], "welcome");
    next_of(&mut ws, "ready").await;
    say(&mut ws, "over TLS").await;
    assert_eq!(next_of(&mut ws, "message").await["text"], "over TLS");

    // HTTPS on the same port.
    let raw = https_get(server.addr, tls, "/healthz").await;
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    server.stop().await;
}

async fn connection_limits_answer_429_per_address_and_503_in_all(kind: Kind) {
    let dir = Setup::new(kind);
    let mut c = dir.config();
    c.max_connections_per_ip = 2;
    c.max_connections = 3;
    let server = start(c).await;
    let url = server.ws("/ws/echo");
    let _first = connect(&url).await;
    let _second = connect(&url).await;
    let e = within(tether::connect(&url)).await.unwrap_err().to_string();
    assert!(e.contains("429"), "a third from one address: {e}");
    // Another loopback address counts separately, until the server is full.
    let other = |ip: &'static str| {
        let addr = server.addr;
        async move {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(format!("{ip}:0").parse().unwrap()).unwrap();
            let tcp = socket.connect(addr).await.unwrap();
            let req = ClientBuilder::new(&format!("ws://{addr}/ws/echo"))
                .unwrap()
                .request();
            tether::client(tcp, req, tether::Config::default())
                .await
                .map(|(ws, _)| ws)
        }
    };
    let _third = within(other("127.0.0.2")).await.unwrap();
    let e = within(other("127.0.0.3")).await.unwrap_err().to_string();
    assert!(e.contains("503"), "the server is full: {e}");
    let metrics = http_text(server.addr, "/metrics").await;
    assert!(
        metrics.contains("tether_handshake_failures_total{reason=\"limit\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("tether_connections 3"), "{metrics}");
    drop((_first, _second, _third));
    server.stop().await;
}

/// A deployment whose storage was lost and begun again (a new SQLite file, or a Redis that
/// lost its data) has a new epoch: a client's old position is not taken for one of its ids.
async fn a_resume_into_another_database_is_not_recovered(kind: Kind) {
    let old = Setup::new(kind);
    let server = start(old.config()).await;
    let mut ann = connect(&server.ws("/ws/rooms/r?name=ann")).await;
    let ready = next_of(&mut ann, "ready").await;
    let epoch = ready["epoch"].as_str().unwrap().to_owned();
    for i in 1..=3 {
        say(&mut ann, &format!("old {i}")).await;
        assert_eq!(next_of(&mut ann, "message").await["id"], i);
    }
    drop(ann);
    server.stop().await;

    // The same database again: the same epoch, and an exact resume.
    let server = start(old.config()).await;
    let url = server.ws(&format!("/ws/rooms/r?name=ann&since=2&epoch={epoch}"));
    let mut ann = connect(&url).await;
    let welcome = next(&mut ann).await;
    assert_eq!(
        (&welcome["recovered"], &welcome["epoch"]),
        (&json!(true), &json!(epoch))
    );
    assert_eq!(next(&mut ann).await["text"], "old 3");
    assert_ready(&next(&mut ann).await, 3);
    drop(ann);
    server.stop().await;

    // A new database (the old one lost): its ids name other messages. Without the epoch,
    // ann resuming after id 1 would take "new 2" for the one after "old 1" and never see
    // "new 1".
    let new = Setup::new(kind);
    let server = start(new.config()).await;
    let mut bob = connect(&server.ws("/ws/rooms/r?name=bob")).await;
    next_of(&mut bob, "ready").await;
    for i in 1..=2 {
        say(&mut bob, &format!("new {i}")).await;
        assert_eq!(next_of(&mut bob, "message").await["id"], i);
    }
    let url = server.ws(&format!("/ws/rooms/r?name=ann&since=1&epoch={epoch}"));
    let mut ann = connect(&url).await;
    let welcome = next(&mut ann).await;
    assert_eq!(welcome["recovered"], false, "{welcome}");
    assert_ne!(welcome["epoch"], json!(epoch));
    assert_eq!(next(&mut ann).await["text"], "new 1");
    assert_eq!(next(&mut ann).await["text"], "new 2");
    let ready = next(&mut ann).await;
    assert_ready(&ready, 2);
    assert_eq!(ready["epoch"], welcome["epoch"]);
    server.stop().await;
}

async fn every_api_error_is_json(kind: Kind) {
    let dir = Setup::new(kind);
    let server = start(dir.config()).await;
    // A query string that does not parse.
    let (status, body) = http(server.addr, "GET", "/api/rooms?limit=abc", &[], None).await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("limit"), "{body}");
    let (status, body) = http(server.addr, "GET", "/ws/rooms/r?since=-1", &[], None).await;
    assert_eq!(status, 400);
    assert!(body["error"].is_string(), "{body}");
    // A method the route does not take: 405 with Allow, and a JSON body.
    let (status, head, body) = http_from(
        [127, 0, 0, 1].into(),
        server.addr,
        "DELETE",
        "/api/rooms",
        &[("Content-Type", "application/json")],
        None,
    )
    .await;
    assert_eq!(status, 405, "{head}");
    assert!(head.to_ascii_lowercase().contains("allow: get"), "{head}");
    assert_eq!(body, json!({"error": "method not allowed"}));
    server.stop().await;
}

async fn plain_text_in_a_room_is_a_message_as_wscat_sends_it(kind: Kind) {
    let dir = Setup::new(kind);
    let server = start(dir.config()).await;
    let mut bob = connect(&server.ws("/ws/rooms/lobby?name=bob")).await;
    assert_ready(&next_of(&mut bob, "ready").await, 0);
    bob.send(Message::text("hello, everyone")).await.unwrap();
    let m = next_of(&mut bob, "message").await;
    assert_eq!(
        (m["text"].as_str(), m["user"].as_str()),
        (Some("hello, everyone"), Some("bob"))
    );
    // JSON is read as JSON: an object without `text` is a mistake, not a message.
    bob.send(Message::text(r#"{"txt": "typo"}"#)).await.unwrap();
    let e = next_of(&mut bob, "error").await;
    assert!(e["error"].as_str().unwrap().contains("plain text"), "{e}");
    server.stop().await;
}

on_both_engines!(
    history_then_live_then_resume_without_gap_or_duplicate,
    concurrent_writers_and_a_resuming_reader_see_every_id_once,
    publish_api_needs_a_token_and_reaches_members,
    votes_update_every_watcher_and_persist,
    upgrades_are_refused_for_bad_identity_or_origin,
    login_sets_a_session_cookie_that_opens_sockets,
    a_client_sending_too_fast_is_closed_with_1008,
    a_slow_consumer_is_closed_with_1013_and_the_others_get_everything,
    history_survives_a_restart_and_ids_continue,
    pages_and_echo_are_served,
    compressing_clients_share_one_compressed_copy_and_read_it,
    tls_serves_https_and_wss_on_one_port,
    connection_limits_answer_429_per_address_and_503_in_all,
    every_api_error_is_json,
    plain_text_in_a_room_is_a_message_as_wscat_sends_it,
    a_resume_into_another_database_is_not_recovered,
);
