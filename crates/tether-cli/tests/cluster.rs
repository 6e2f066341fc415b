//! Several `tether serve` processes joined through a real `redis-server`: cross-node chat,
//! publish through any node, resume on another node, a crashed node's users expiring, and a
//! Redis restart. Needs `redis-server` on the PATH (scripts/test installs Debian's).

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tether::{ClientStream, Message};

mod common;
use common::http;

const BIN: &str = env!("CARGO_BIN_EXE_tether");
const LIMIT: Duration = Duration::from_secs(20);

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A redis-server on `port` keeping its data (append-only file, synced on every write) in `dir`.
fn redis(port: u16, dir: &std::path::Path) -> Proc {
    let mut command = Command::new("redis-server");
    command
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes",
            // Every write on disk before Redis answers: a restart keeps all it acknowledged
            // (with the default, once a second, it may lose the last second: a new epoch).
            "--appendfsync",
            "always",
        ])
        .arg("--dir")
        .arg(dir);
    spawn_redis(command, port)
}

/// Runs `command` (a redis-server) and waits until it listens on `port`.
fn spawn_redis(mut command: Command, port: u16) -> Proc {
    let child = command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server is needed for the cluster tests (apt-get install redis-server)");
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < LIMIT, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Proc(child)
}

struct Node {
    serve: common::Serve,
    addr: String,
    data: tempfile::TempDir,
}

impl Node {
    fn ws(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }
}

fn node(name: &str, redis_port: u16) -> Node {
    node_with(name, redis_port, "")
}

/// A node whose config file holds `toml`.
fn node_with(name: &str, redis_port: u16, toml: &str) -> Node {
    node_at(name, &format!("redis://127.0.0.1:{redis_port}/"), toml)
}

/// A node whose `--redis` setting is `redis` and whose config file holds `toml`.
fn node_at(name: &str, redis: &str, toml: &str) -> Node {
    let data = tempfile::tempdir().unwrap();
    let config = data.path().join("node.toml");
    std::fs::write(&config, toml).unwrap();
    // Accounts live in Redis: the first node's `user add` is every node's.
    let (added, said) = user(&["add", "ops", "--redis", redis], Some("pw-for-ops"));
    assert!(added || said.contains("exists already"), "{said}");
    let serve = common::start_serve(&[
        "--node",
        name,
        "--message-rate",
        "1000",
        "--data",
        data.path().to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "--redis",
        redis,
    ]);
    // Ready as a load balancer would see it: `/healthz` answers 200 only once the node is
    // subscribed to Redis and caught up, so a member who joins from here on is heard live.
    until_healthy(&serve.addr);
    Node {
        addr: serve.addr.clone(),
        serve,
        data,
    }
}

/// Runs `tether user ARGS`, with `password` on standard input when given; whether it
/// succeeded, and what it said (standard output and error).
fn user(args: &[&str], password: Option<&str>) -> (bool, String) {
    let mut command = Command::new(BIN);
    command
        .arg("user")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null());
    if password.is_some() {
        command.arg("--password-stdin").stdin(Stdio::piped());
    }
    let mut child = command.spawn().unwrap();
    if let (Some(mut stdin), Some(password)) = (child.stdin.take(), password) {
        writeln!(stdin, "{password}").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

/// Waits until `/healthz` on `addr` answers 200.
fn until_healthy(addr: &str) {
    let started = Instant::now();
    loop {
        let (status, health) = http(addr, "GET", "/healthz", None, None);
        if status == 200 {
            return;
        }
        assert!(
            started.elapsed() < LIMIT,
            "{addr} never became healthy: {health}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, f).await.expect("timed out")
}

async fn join(url: &str) -> ClientStream {
    join_as(url, None).await.0
}

/// Joins as the guest whose cookie is `cookie` (a new guest when `None`), as a browser does;
/// returns the socket and the guest's cookie (`tether_guest=…`), to come back as the same guest.
async fn join_as(url: &str, cookie: Option<&str>) -> (ClientStream, String) {
    let (mut ws, cookie) = connect_as(url, cookie).await;
    next_of(&mut ws, "ready").await;
    (ws, cookie)
}

/// Opens `url` as the guest of `cookie` (a new one when `None`, whose cookie the server sets).
async fn connect_as(url: &str, cookie: Option<&str>) -> (ClientStream, String) {
    connect_with(tether::ClientBuilder::new(url).unwrap(), cookie).await
}

/// Connects with `builder` as the guest of `cookie` (a new one when `None`); returns the
/// socket and the guest's cookie.
async fn connect_with(
    mut builder: tether::ClientBuilder,
    cookie: Option<&str>,
) -> (ClientStream, String) {
    if let Some(cookie) = cookie {
        builder = builder.header("Cookie", cookie);
    }
    let (ws, response) = connect_retrying(builder).await;
    let cookie = match cookie {
        Some(kept) => kept.to_owned(),
        None => guest_cookie(&response),
    };
    (ws, cookie)
}

/// Connects with `builder`, again while the node refuses: a node that just lost Redis
/// cannot tell whether a guest's name is a user's, and refuses the upgrade (503) until it
/// can, as it refuses anything it cannot check.
async fn connect_retrying(
    builder: tether::ClientBuilder,
) -> (ClientStream, tether::proto::handshake::client::Response) {
    let started = Instant::now();
    loop {
        match within(builder.clone().connect()).await {
            Ok(connected) => return connected,
            Err(e) => assert!(started.elapsed() < LIMIT, "never connected: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `tether_guest=…` pair of the response's `Set-Cookie`.
fn guest_cookie(response: &tether::proto::handshake::client::Response) -> String {
    let set = response
        .headers
        .get("set-cookie")
        .expect("a new guest is given a cookie");
    let set = std::str::from_utf8(set).unwrap();
    let pair = set.split(';').next().unwrap().trim();
    assert!(pair.starts_with("tether_guest="), "{set}");
    pair.to_owned()
}

async fn next(ws: &mut ClientStream) -> Value {
    next_within(ws, LIMIT).await
}

/// The next event, waited for at most `limit`.
async fn next_within(ws: &mut ClientStream, limit: Duration) -> Value {
    loop {
        let received = tokio::time::timeout(limit, ws.recv()).await;
        match received.expect("timed out") {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).unwrap(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("expected an event, got {other:?}"),
        }
    }
}

async fn next_of(ws: &mut ClientStream, kind: &str) -> Value {
    loop {
        let v = next(ws).await;
        if v["type"] == kind {
            return v;
        }
    }
}

async fn say(ws: &mut ClientStream, text: &str) {
    ws.send(Message::text(json!({ "text": text }).to_string()))
        .await
        .unwrap();
}

/// Asks `node` for a token of `ops`: the status and the answer.
fn ask_token(node: &Node) -> (u16, Value) {
    http(
        &node.addr,
        "POST",
        "/api/tokens",
        None,
        Some(json!({"user": "ops", "password": "pw-for-ops"})),
    )
}

/// A token from `node`, asked again while the node cannot reach Redis.
async fn token_when_ready(node: &Node) -> String {
    let started = Instant::now();
    loop {
        let (status, body) = ask_token(node);
        if status == 201 {
            return body["token"].as_str().unwrap().to_owned();
        }
        assert!(started.elapsed() < LIMIT, "no token: {status} {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn token(node: &Node) -> String {
    let (status, body) = ask_token(node);
    assert_eq!(status, 201, "{body}");
    body["token"].as_str().unwrap().to_owned()
}

/// `ann` and `ben` (members of one room, maybe on two nodes) each say something; both hear
/// both, in the same order: the ids.
async fn both_say(ann: &mut ClientStream, ben: &mut ClientStream) -> Vec<u64> {
    say(ann, "from a").await;
    say(ben, "from b").await;
    let mut seen = [Vec::new(), Vec::new()];
    for (i, ws) in [ann, ben].into_iter().enumerate() {
        for _ in 0..2 {
            let m = next_of(ws, "message").await;
            seen[i].push((
                m["id"].as_u64().unwrap(),
                m["text"].as_str().unwrap().to_owned(),
            ));
        }
    }
    assert_eq!(seen[0], seen[1]);
    seen[0].iter().map(|m| m.0).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_publish_and_resume_across_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _redis = redis(port, dir.path());
    let a = node("a", port);
    let b = node("b", port);

    let (mut ann, ann_cookie) = join_as(&a.ws("/ws/rooms/hall?name=ann"), None).await;
    let mut ben = join(&b.ws("/ws/rooms/hall?name=ben")).await;
    let presence = next_of(&mut ann, "presence").await;
    assert_eq!(
        (presence["user"].as_str(), presence["event"].as_str()),
        (Some("ben"), Some("join"))
    );

    // Both see both, in the same order, with ids 1 and 2.
    assert_eq!(both_say(&mut ann, &mut ben).await, [1, 2]);

    // Published through node b's API: everyone gets it exactly once.
    let t = token(&b);
    let (status, stored) = http(
        &b.addr,
        "POST",
        "/api/rooms/hall/messages",
        Some(&t),
        Some(json!({"text": "api"})),
    );
    assert_eq!((status, stored["id"].as_u64()), (201, Some(3)));
    assert_eq!(next_of(&mut ann, "message").await, stored);
    assert_eq!(next_of(&mut ben, "message").await, stored);

    // Ann leaves node a after id 3; messages 4 and 5 are sent on b; she resumes on b, the
    // same guest (her cookie), so her nickname is hers on b whether or not node a has
    // released it yet.
    drop(ann);
    say(&mut ben, "four").await;
    say(&mut ben, "five").await;
    assert_eq!(next_of(&mut ben, "message").await["id"], 4);
    assert_eq!(next_of(&mut ben, "message").await["id"], 5);
    let (mut ann, _) =
        connect_as(&b.ws("/ws/rooms/hall?name=ann&since=3"), Some(&ann_cookie)).await;
    next_of(&mut ann, "welcome").await;
    assert_eq!(next(&mut ann).await["id"], 4);
    assert_eq!(next(&mut ann).await["id"], 5);
    assert_ready(&next(&mut ann).await, 5);
    let (_, page) = http(
        &a.addr,
        "GET",
        "/api/rooms/hall/messages?since=0",
        None,
        None,
    );
    assert_eq!(
        page.as_array().unwrap().len(),
        5,
        "the same history on every node"
    );
    // Guests' messages say so through Redis too; the API's, by a user, do not.
    let guests: Vec<_> = page
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["guest"] == true)
        .collect();
    assert_eq!(guests, [true, true, false, true, true], "{page}");

    // A broadcast reaches both nodes.
    let (status, reply) = http(
        &a.addr,
        "POST",
        "/api/broadcast",
        Some(&token(&a)),
        Some(json!({"text": "all"})),
    );
    assert_eq!((status, reply["nodes"].as_u64()), (200, Some(2)));
    assert_eq!(next_of(&mut ann, "broadcast").await["text"], "all");
    assert_eq!(next_of(&mut ben, "broadcast").await["text"], "all");
    drop((a.data, b.data));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_nodes_users_leave_and_redis_loss_is_reported_then_survived() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut redis_proc = Some(redis(port, dir.path()));
    let a = node("a", port);
    let c = node("c", port);
    let mut ann = join(&a.ws("/ws/rooms/ops?name=ann")).await;
    let _carl = join(&c.ws("/ws/rooms/ops?name=carl")).await;
    let p = next_of(&mut ann, "presence").await;
    assert_eq!(
        (p["user"].as_str(), p["event"].as_str()),
        (Some("carl"), Some("join"))
    );

    // Node c dies without a word: its heartbeat goes stale and node a sweeps its presence,
    // announcing the leave. A heartbeat is stale 15 s after it was made (every 3 s), and node a
    // looks for stale ones every 3 s: the leave comes 12 to 18 s after the crash, later on a
    // busy machine.
    drop(c);
    let started = Instant::now();
    let p = loop {
        let event = next_within(&mut ann, Duration::from_secs(60)).await;
        if event["type"] == "presence" {
            break event;
        }
    };
    assert_eq!(
        (p["user"].as_str(), p["event"].as_str()),
        (Some("carl"), Some("leave"))
    );
    // Nothing of node c is left in Redis: its entry, its list of entries, carl's nickname.
    until_members(port, "ops", 1).await;
    until_gone(port, &["tether:np:c", "tether:nn:c", "tether:nk:carl"]).await;
    eprintln!(
        "crashed node's user left after {:.1} s",
        started.elapsed().as_secs_f64()
    );

    say(&mut ann, "before").await;
    assert_eq!(next_of(&mut ann, "message").await["id"], 1);

    // Redis goes away: node a keeps its sockets, reports unhealthy, and refuses to lose a message.
    drop(redis_proc.take());
    let started = Instant::now();
    while http(&a.addr, "GET", "/healthz", None, None).0 != 503 {
        assert!(
            started.elapsed() < LIMIT,
            "healthz never reported the lost redis"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    say(&mut ann, "during").await;
    let e = next_of(&mut ann, "error").await;
    // "not stored" when the connection was refused; "outcome unknown" when the dropped
    // connection may have carried the script (it cannot tell which).
    let why = e["error"].as_str().unwrap();
    assert!(
        why.contains("not stored") || why.contains("outcome unknown"),
        "{e}"
    );

    // Redis is back (with its data): node a resubscribes and the room goes on.
    redis_proc = Some(redis(port, dir.path()));
    let started = Instant::now();
    while http(&a.addr, "GET", "/healthz", None, None).0 != 200 {
        assert!(started.elapsed() < LIMIT, "node a did not reconnect");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    say(&mut ann, "after").await;
    let m = next_of(&mut ann, "message").await;
    assert_eq!(
        (m["id"].as_u64(), m["text"].as_str()),
        (Some(2), Some("after"))
    );
    drop(redis_proc);
}

/// Waits until Redis (on `port`) holds the presence entries of `members` users in `room`.
async fn until_members(port: u16, room: &str, members: u64) {
    let started = Instant::now();
    loop {
        let out = Command::new("redis-cli")
            .args([
                "-p",
                &port.to_string(),
                "ZCARD",
                &format!("tether:{{{room}}}:m"),
            ])
            .output()
            .expect("redis-cli comes with redis-server");
        let now = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if now == members.to_string() {
            return;
        }
        assert!(
            started.elapsed() < LIMIT,
            "{room} has {now} members in redis, not {members}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asserts `event` is a `ready` at `last_id`, with an epoch.
fn assert_ready(event: &Value, last_id: u64) {
    assert_eq!(
        (&event["type"], event["last_id"].as_u64()),
        (&json!("ready"), Some(last_id)),
        "{event}"
    );
    assert_eq!(event["epoch"].as_str().map(str::len), Some(16), "{event}");
}

/// Joins and returns the socket with its `welcome` and `ready`.
async fn join_with(url: &str) -> (ClientStream, Value, Value) {
    let (mut ws, _) = within(tether::connect(url)).await.unwrap();
    let welcome = next_of(&mut ws, "welcome").await;
    let ready = next_of(&mut ws, "ready").await;
    (ws, welcome, ready)
}

/// Reads until the server closes; returns the close code.
async fn closed(ws: &mut ClientStream) -> u16 {
    loop {
        match within(ws.recv()).await {
            Some(Ok(Message::Close(frame))) => return frame.map_or(1005, |f| f.code.0),
            Some(Ok(_)) => {}
            other => panic!("expected a close, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_lost_its_data_is_a_new_epoch_and_nothing_is_lost_silently() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut redis_proc = Some(redis(port, dir.path()));
    let redis_url = format!("redis://127.0.0.1:{port}/");
    let a = node("a", port);
    let b = node("b", port);
    let (mut ann, ann_cookie) = connect_as(&a.ws("/ws/rooms/ops?name=ann"), None).await;
    let ready = next_of(&mut ann, "ready").await;
    let (mut bob, bob_cookie) = join_as(&b.ws("/ws/rooms/ops?name=bob"), None).await;
    let old_epoch = ready["epoch"].as_str().unwrap().to_owned();
    for i in 1..=5 {
        say(&mut ann, &format!("old {i}")).await;
    }
    for ws in [&mut ann, &mut bob] {
        for id in 1..=5 {
            assert_eq!(next_of(ws, "message").await["id"], id);
        }
    }

    // Redis comes back empty (a new data directory): ids start again at 1. Messages published
    // before the nodes resubscribe are stored in the new stream.
    drop(redis_proc.take());
    let empty = tempfile::tempdir().unwrap();
    redis_proc = Some(redis(port, empty.path()));
    // The accounts went with the data: the operator adds the user again.
    let (added, said) = user(&["add", "ops", "--redis", &redis_url], Some("pw-for-ops"));
    assert!(added, "{said}");
    let bearer = token_when_ready(&b).await;
    let started = Instant::now();
    let mut sent = 0;
    while sent < 3 {
        let (status, _) = http(
            &b.addr,
            "POST",
            "/api/rooms/ops/messages",
            Some(&bearer),
            Some(json!({"text": format!("new {}", sent + 1)})),
        );
        if status == 201 {
            sent += 1;
        } else {
            assert!(started.elapsed() < LIMIT, "publishing never worked again");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // Both members are told their ids are stale (1012), then resume from the old position.
    let mut back = Vec::new();
    for (ws, node, name, cookie) in [
        (&mut ann, &a, "ann", &ann_cookie),
        (&mut bob, &b, "bob", &bob_cookie),
    ] {
        assert_eq!(closed(ws).await, 1012, "{name}");
        let url = node.ws(&format!(
            "/ws/rooms/ops?name={name}&since=5&epoch={old_epoch}"
        ));
        // The same guest comes back: the name is still hers while the old socket winds down.
        let (mut again, _) = connect_as(&url, Some(cookie)).await;
        let welcome = next_of(&mut again, "welcome").await;
        assert_eq!(welcome["recovered"], false, "{name}: {welcome}");
        assert_ne!(welcome["epoch"], old_epoch.as_str());
        // Every message of the new stream is replayed, none taken as already seen.
        for id in 1..=3 {
            let m = next_of(&mut again, "message").await;
            assert_eq!(
                (m["id"].as_u64(), m["text"].clone()),
                (Some(id), json!(format!("new {id}"))),
                "{name}"
            );
        }
        let ready = next_of(&mut again, "ready").await;
        assert_ready(&ready, 3);
        assert_eq!(ready["epoch"], welcome["epoch"]);
        back.push(again);
    }
    // And the room goes on across both nodes.
    say(&mut back[0], "ann is back").await;
    for ws in &mut back {
        let m = next_of(ws, "message").await;
        assert_eq!(
            (m["id"].as_u64(), m["text"].as_str()),
            (Some(4), Some("ann is back"))
        );
    }
    drop(redis_proc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_are_listed_in_pages_with_members_of_every_node_and_capped() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _redis = redis(port, dir.path());
    let limits = "max_rooms = 5\nrooms_per_hour = 4\napi_publish_rate = 1000\n";
    let a = node_with("a", port, limits);
    let b = node_with("b", port, limits);
    let bearer = token(&a);
    let publish = |room: &str| {
        http(
            &a.addr,
            "POST",
            &format!("/api/rooms/{room}/messages"),
            Some(&bearer),
            Some(json!({"text": "first"})),
        )
    };
    for room in ["r1", "r2", "r3", "r4"] {
        let (status, body) = publish(room);
        assert_eq!(status, 201, "{body}");
    }
    // One user may start four rooms an hour; a message to an existing room still goes.
    let (status, body) = publish("r5");
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("rooms_per_hour"),
        "{body}"
    );
    assert_eq!(publish("r1").0, 201);
    // Someone else starts the fifth.
    let mut gil = join(&b.ws("/ws/rooms/r5?name=gil")).await;
    say(&mut gil, "first").await;
    assert_eq!(next_of(&mut gil, "message").await["id"], 1);
    // The cap is the cluster's: node b refuses a sixth room too.
    let bearer_b = token(&b);
    let (status, body) = http(
        &b.addr,
        "POST",
        "/api/rooms/r6/messages",
        Some(&bearer_b),
        Some(json!({"text": "first"})),
    );
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("max_rooms"),
        "{body}"
    );

    // Ann is in r2 on node a, bob and cy on node b: every node counts three, once each node
    // has shared its members (presence is written to Redis after the join, not before).
    let _ann = join(&a.ws("/ws/rooms/r2?name=ann")).await;
    let _bob = join(&b.ws("/ws/rooms/r2?name=bob")).await;
    let _cy = join(&b.ws("/ws/rooms/r2?name=cy")).await;
    let expected = json!([
        {"room": "r2", "members": 3, "last_id": 1},
        {"room": "r3", "members": 0, "last_id": 1}
    ]);
    for node in [&a, &b] {
        let started = Instant::now();
        loop {
            let (_, page) = http(&node.addr, "GET", "/api/rooms?after=r1&limit=2", None, None);
            if page == expected {
                break;
            }
            // Never more than three, and r3 as it is.
            assert!(page[0]["members"].as_u64() <= Some(3), "{page}");
            assert_eq!(page[1], expected[1], "{page}");
            assert!(
                started.elapsed() < LIMIT,
                "{}: {page}, not {expected}",
                node.addr
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let (_, page) = http(&a.addr, "GET", "/api/rooms?after=r3", None, None);
    let names: Vec<&str> = page
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["room"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["r4", "r5"]);
}

fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_redis_is_reported_and_a_retried_publish_is_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let redis_proc = redis(port, dir.path());
    let a = node("a", port);
    let bearer = token(&a);
    let publish = |key: &str| {
        let addr = a.addr.clone();
        let bearer = bearer.clone();
        let key = key.to_owned();
        // A blocking exchange with an Idempotency-Key, off the test's runtime threads.
        tokio::task::spawn_blocking(move || {
            let body = json!({"text": "ship it"}).to_string();
            let mut tcp = std::net::TcpStream::connect(&addr).unwrap();
            write!(tcp, "POST /api/rooms/ops/messages HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAuthorization: Bearer {bearer}\r\nIdempotency-Key: {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
            let mut raw = String::new();
            std::io::Read::read_to_string(&mut tcp, &mut raw).unwrap();
            let status: u16 = raw[9..12].parse().unwrap();
            let body = raw.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
            (
                status,
                serde_json::from_str::<Value>(body).unwrap_or(Value::Null),
            )
        })
    };
    let (status, _) = publish("warmup").await.unwrap();
    assert_eq!(status, 201);

    // Redis stops answering (SIGSTOP): the publish times out with "outcome unknown" (the
    // script is queued in Redis and will run), and /healthz says Redis is not answering.
    signal(redis_proc.0.id(), "-STOP");
    let (status, body) = publish("deploy-42").await.unwrap();
    assert_eq!(status, 504, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("unknown"),
        "{body}"
    );
    let started = Instant::now();
    loop {
        // The failed publish already marks storage as failing; the probe then finds Redis
        // silent.
        let (status, health) = http(&a.addr, "GET", "/healthz", None, None);
        if health["redis"] == "not answering" {
            assert_eq!(status, 503);
            break;
        }
        assert!(
            started.elapsed() < LIMIT,
            "healthz never reported the stall"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Redis resumes: healthy again; the retry with the same key is answered with the message
    // the first attempt stored, and the room holds it once.
    signal(redis_proc.0.id(), "-CONT");
    let started = Instant::now();
    while http(&a.addr, "GET", "/healthz", None, None).0 != 200 {
        assert!(started.elapsed() < LIMIT, "healthz never recovered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, again) = publish("deploy-42").await.unwrap();
    assert_eq!((status, again["id"].as_u64()), (201, Some(2)), "{again}");
    let (_, page) = http(&a.addr, "GET", "/api/rooms/ops/messages", None, None);
    let texts: Vec<&str> = page
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        texts,
        ["ship it", "ship it"],
        "warmup and deploy-42, once each"
    );
    drop(redis_proc);
}

/// Reads a socket until it closes or `want` messages have arrived; returns the texts of the
/// messages and the close code, if the server closed.
async fn collect(
    mut rx: tether::WsReceiver<tether::tls::MaybeTlsStream<tokio::net::TcpStream>>,
    want: usize,
) -> (Vec<String>, Option<u16>) {
    let mut texts = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while texts.len() < want {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "message" {
                    texts.push(v["text"].as_str().unwrap().to_owned());
                } else if v["type"] == "error" {
                    eprintln!("error event: {v}");
                }
            }
            Ok(Some(Ok(Message::Close(frame)))) => {
                return (texts, Some(frame.map_or(1005, |f| f.code.0)))
            }
            Ok(Some(Ok(_))) => {}
            _ => break,
        }
    }
    (texts, None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_node_drains_its_backlog_without_closing_members_or_losing_messages() {
    // Over 10 s: bob (on node b) sends 400 a second, sam (on node a) 100 a second, so sam
    // stays within his burst allowance however his messages bunch up.
    const BOB: usize = 4000;
    const SAM: usize = 1000;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _redis = redis(port, dir.path());
    // Every guest here comes from 127.0.0.1: lift the budget they would share. On resuming,
    // node a owes each member the whole backlog (5,000 messages) at once; how fast this
    // test's readers take it depends on how busy the machine is, so the members' queues hold
    // all of it, and what is tested is that it is drained in order, without loss or a close.
    let limits = "identity_message_rate = 100000\noutbox = 8192\n";
    let a = node_with("a", port, limits);
    let b = node_with("b", port, limits);
    let ann = join(&a.ws("/ws/rooms/busy?name=ann")).await;
    let sam = join(&a.ws("/ws/rooms/busy?name=sam")).await;
    let bob = join(&b.ws("/ws/rooms/busy?name=bob")).await;
    let mut sockets: Vec<_> = [ann, sam, bob]
        .into_iter()
        .map(|ws| {
            let (tx, rx) = ws.split();
            (tx, Some(tokio::spawn(collect(rx, BOB + SAM))))
        })
        .collect();

    // Node a stops while they send: sam's messages wait in a's socket, bob's in Redis's
    // buffer for a's subscription, and reach a at once when it resumes.
    signal(a.serve.pid(), "-STOP");
    let started = Instant::now();
    for i in 0..BOB {
        let mut texts = vec![(2, format!("bob {i}"))];
        if i % (BOB / SAM) == 0 {
            texts.push((1, format!("sam {}", i / (BOB / SAM))));
        }
        for (who, text) in texts {
            let m = json!({ "text": text }).to_string();
            sockets[who].0.send(Message::text(m)).await.unwrap();
        }
        let due = started + Duration::from_micros(2500 * i as u64);
        tokio::time::sleep_until(due.into()).await;
    }
    signal(a.serve.pid(), "-CONT");

    // Everyone gets every message, in each sender's order; nobody is closed.
    for (name, (_, handle)) in ["ann", "sam", "bob"].iter().zip(sockets.iter_mut()) {
        let (texts, closed) = handle.take().unwrap().await.unwrap();
        let from_sam = texts.iter().filter(|t| t.starts_with("sam")).count();
        assert_eq!(closed, None, "{name} was closed");
        assert_eq!(
            texts.len(),
            BOB + SAM,
            "{name} got {} messages ({from_sam} from sam)",
            texts.len()
        );
        for (who, count) in [("sam", SAM), ("bob", BOB)] {
            let own = texts.iter().filter(|t| t.starts_with(who));
            let expected: Vec<String> = (0..count).map(|i| format!("{who} {i}")).collect();
            assert!(
                own.eq(expected.iter()),
                "{name}: {who}'s messages out of order"
            );
        }
    }
}

/// The status of a WebSocket upgrade request to `path` on `addr`.
fn upgrade_status(addr: &str, path: &str) -> u16 {
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    .unwrap();
    let mut head = [0u8; 12];
    std::io::Read::read_exact(&mut tcp, &mut head).unwrap();
    std::str::from_utf8(&head[9..12]).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_nickname_belongs_to_one_guest_across_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _redis = redis(port, dir.path());
    let a = node("a", port);
    let b = node("b", port);
    // A guest on node a is "Zed"; another guest (no cookie: a new one) may not be "zed" on b.
    let zed = join(&a.ws("/ws/rooms/lobby?name=Zed")).await;
    assert_eq!(upgrade_status(&b.addr, "/ws/rooms/lobby?name=zed"), 409);
    assert_eq!(upgrade_status(&a.addr, "/ws/rooms/lobby?name=ZED"), 409);
    // Once Zed leaves, the name is free on every node.
    drop(zed);
    let started = Instant::now();
    loop {
        let status = upgrade_status(&b.addr, "/ws/rooms/lobby?name=zed");
        if status == 101 {
            break;
        }
        assert_eq!(status, 409);
        assert!(started.elapsed() < LIMIT, "the name was never released");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Copies directory `from` (flat, or one level of subdirectories) into `to`.
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restored_from_an_older_copy_starts_a_new_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut redis_proc = Some(redis(port, dir.path()));
    let a = node("a", port);
    let (mut ann, _, ready) = join_with(&a.ws("/ws/rooms/ops?name=ann")).await;
    let old_epoch = ready["epoch"].as_str().unwrap().to_owned();
    for i in 1..=2 {
        say(&mut ann, &format!("kept {i}")).await;
        assert_eq!(next_of(&mut ann, "message").await["id"], i);
    }
    // A copy of Redis's data now (every write is on disk before it answers), then more.
    let copy = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), copy.path());
    for i in 3..=5 {
        say(&mut ann, &format!("lost {i}")).await;
        assert_eq!(next_of(&mut ann, "message").await["id"], i);
    }

    // Redis comes back from the copy: the same epoch, but ids 3-5 are gone and will be given
    // to other messages. The node starts a new epoch and its members reconnect.
    drop(redis_proc.take());
    redis_proc = Some(redis(port, copy.path()));
    assert_eq!(closed(&mut ann).await, 1012);
    // A client that was away, resuming from id 2 of the old epoch, is told too.
    let url = a.ws(&format!("/ws/rooms/ops?name=ben&since=2&epoch={old_epoch}"));
    let (mut ben, _) = connect_retrying(tether::ClientBuilder::new(&url).unwrap()).await;
    let welcome = next_of(&mut ben, "welcome").await;
    assert_eq!(welcome["recovered"], false, "{welcome}");
    assert_ne!(welcome["epoch"], old_epoch.as_str());
    let texts: Vec<Value> = vec![
        next_of(&mut ben, "message").await["text"].clone(),
        next_of(&mut ben, "message").await["text"].clone(),
    ];
    assert_eq!(texts, [json!("kept 1"), json!("kept 2")]);
    assert_ready(&next_of(&mut ben, "ready").await, 2);
    drop(redis_proc);
}

/// A client of the channel protocol (`/ws`, tether.v1): replies by id, pushes kept aside.
struct V1 {
    ws: ClientStream,
    next_id: u64,
    pushes: Vec<Value>,
    /// The guest's cookie, to come back as the same guest.
    cookie: String,
}

impl V1 {
    /// Opens `url` offering tether.v1 and connects, a new guest.
    async fn open(url: &str) -> V1 {
        V1::open_as(url, json!({"op": "connect"}), None).await
    }

    /// Opens `url` offering tether.v1 as the guest of `cookie` (a new one when `None`) and
    /// sends `connect`, the command given.
    async fn open_as(url: &str, connect: Value, cookie: Option<&str>) -> V1 {
        let builder = tether::ClientBuilder::new(url)
            .unwrap()
            .protocol("tether.v1");
        let (ws, cookie) = connect_with(builder, cookie).await;
        let mut client = V1 {
            ws,
            next_id: 1,
            pushes: Vec::new(),
            cookie,
        };
        let connected = client.call(connect).await;
        assert!(connected.get("error").is_none(), "{connected}");
        client
    }

    /// Sends `command` and returns its reply.
    async fn call(&mut self, mut command: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        command["id"] = id.into();
        self.ws
            .send(Message::text(command.to_string()))
            .await
            .unwrap();
        loop {
            let message = next(&mut self.ws).await;
            if message.get("id").is_some() {
                assert_eq!(message["id"], id, "{message}");
                return message;
            }
            self.pushes.push(message);
        }
    }

    /// The next push of `kind` on `channel` (those kept first).
    async fn push(&mut self, kind: &str, channel: &str) -> Value {
        let wanted = |p: &Value| p["type"] == kind && p["channel"] == channel;
        if let Some(i) = self.pushes.iter().position(wanted) {
            return self.pushes.remove(i);
        }
        loop {
            let message = next(&mut self.ws).await;
            if wanted(&message) {
                return message;
            }
            self.pushes.push(message);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_channel_protocol_across_nodes_publishes_resumes_and_broadcasts() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _redis = redis(port, dir.path());
    let a = node("a", port);
    let b = node("b", port);

    let info = |device: &str| json!({"op": "connect", "info": {"device": device}});
    let mut ann = V1::open_as(&a.ws("/ws?name=ann"), info("phone"), None).await;
    let mut ben = V1::open_as(&b.ws("/ws?name=ben"), info("laptop"), None).await;
    ann.call(json!({"op": "subscribe", "channel": "room:deck"}))
        .await;
    // Node a shares ann's presence after her subscription: ben subscribes once it is shared.
    until_members(port, "deck", 1).await;
    let subscribed = ben
        .call(json!({"op": "subscribe", "channel": "room:deck"}))
        .await;
    let epoch = subscribed["epoch"].as_str().unwrap().to_owned();
    // Presence spans the nodes, with the info each connection attached: ann sees ben join,
    // and ben's list has ann.
    let joined = ann.push("join", "room:deck").await;
    assert_eq!(
        (&joined["user"], &joined["info"]),
        (&json!("ben"), &json!({"device": "laptop"}))
    );
    assert_eq!(
        subscribed["presence"],
        json!([
            {"user": "ann", "clients": 1, "info": [{"device": "phone"}]},
            {"user": "ben", "clients": 1, "info": [{"device": "laptop"}]},
        ]),
        "{subscribed}"
    );

    // An ephemeral event crosses the nodes (through the room's presence channel), stored
    // nowhere; its sender does not get it back.
    let typing =
        json!({"op": "event", "channel": "room:deck", "name": "typing", "data": {"on": true}});
    let sent = ann.call(typing).await;
    assert!(sent.get("error").is_none(), "{sent}");
    let heard = ben.push("event", "room:deck").await;
    assert_eq!(
        (&heard["user"], &heard["name"], &heard["data"]),
        (&json!("ann"), &json!("typing"), &json!({"on": true}))
    );

    // Published on a, pushed on b with the offset the publisher was told.
    let data = json!({"text": "from a"});
    let stored = ann
        .call(json!({"op": "publish", "channel": "room:deck", "data": data}))
        .await;
    let first = stored["offset"].as_u64().expect("an offset");
    let seen = ben.push("pub", "room:deck").await;
    assert_eq!(
        (seen["offset"].as_u64(), &seen["data"]),
        (Some(first), &data)
    );
    assert_eq!(
        ann.push("pub", "room:deck").await["offset"],
        first,
        "hers too"
    );
    // Her event, had it come back to her, came before her publication.
    assert!(
        ann.pushes.iter().all(|p| p["type"] != "event"),
        "{:?}",
        ann.pushes
    );
    // A single-channel client on b chats in the same room.
    let mut cat = join(&b.ws("/ws/rooms/deck?name=cat")).await;
    say(&mut cat, "from the shortcut").await;
    let shortcut = ann.push("pub", "room:deck").await;
    assert_eq!(shortcut["data"]["text"], "from the shortcut");
    ben.push("pub", "room:deck").await;

    // Ben leaves; two more arrive; he resumes on the other node with his offset and epoch.
    let since = shortcut["offset"].as_u64().unwrap();
    let ben_cookie = ben.cookie.clone();
    drop(ben);
    for text in ["three", "four"] {
        ann.call(json!({"op": "publish", "channel": "room:deck", "data": {"text": text}}))
            .await;
    }
    // The same guest (his cookie): his nickname is his on node a whether or not node b has
    // released it yet.
    let mut ben = V1::open_as(
        &a.ws("/ws?name=ben"),
        json!({"op": "connect"}),
        Some(&ben_cookie),
    )
    .await;
    let resumed = ben
        .call(json!({"op": "subscribe", "channel": "room:deck", "since": since, "epoch": epoch}))
        .await;
    assert_eq!(
        (&resumed["recovered"], &resumed["replayed"]),
        (&json!(true), &json!(2)),
        "{resumed}"
    );
    let three = ben.push("pub", "room:deck").await;
    let four = ben.push("pub", "room:deck").await;
    assert_eq!(
        (
            three["data"]["text"].as_str(),
            four["data"]["text"].as_str()
        ),
        (Some("three"), Some("four"))
    );
    assert_eq!(three["offset"].as_u64(), Some(since + 1));

    // A broadcast through node b reaches every channel connection of both nodes.
    let (status, _) = http(
        &b.addr,
        "POST",
        "/api/broadcast",
        Some(&token(&b)),
        Some(json!({"text": "all hands"})),
    );
    assert_eq!(status, 200);
    for client in [&mut ann, &mut ben] {
        assert_eq!(
            client.push("pub", "broadcast").await["data"]["text"],
            "all hands"
        );
    }
    drop((a.data, b.data));
}

/// How many subscribers (nodes) Redis has for each of `channels`.
fn subscribers(port: u16, channels: &[&str]) -> Vec<u64> {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "PUBSUB", "NUMSUB"])
        .args(channels)
        .output()
        .expect("redis-cli comes with redis-server");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    lines
        .chunks(2)
        .map(|pair| pair[1].trim().parse().unwrap())
        .collect()
}

/// Waits until Redis counts `expected` subscribers for `channels`.
async fn until_subscribers(port: u16, channels: &[&str], expected: &[u64]) {
    let start = Instant::now();
    loop {
        let now = subscribers(port, channels);
        if now == expected {
            return;
        }
        assert!(
            start.elapsed() < LIMIT,
            "{channels:?}: {now:?}, not {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_hears_only_the_rooms_its_members_are_in() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _redis = redis(port, dir.path());
    let a = node("a", port);
    let b = node("b", port);
    let rooms = [
        "tether:{alpha}:r",
        "tether:{alpha}:p",
        "tether:{beta}:r",
        "tether:{beta}:p",
    ];
    until_subscribers(port, &rooms, &[0, 0, 0, 0]).await;

    let mut ann = V1::open(&a.ws("/ws?name=ann")).await;
    ann.call(json!({"op": "subscribe", "channel": "room:alpha"}))
        .await;
    let bob = join(&b.ws("/ws/rooms/beta?name=bob")).await;
    // Each node listens to its own room alone: a subscription is in place before the reply.
    assert_eq!(subscribers(port, &rooms), [1, 1, 1, 1]);

    // While ann publishes without pause, ben joins alpha on the other node from its start:
    // history and live publications meet with no gap and no repeat.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let publisher = tokio::spawn(async move {
        let mut stopped = stopped;
        let (mut last, mut after) = (0, 0);
        // Until ben is subscribed, and a few more.
        while after < 5 {
            let reply = ann
                .call(json!({"op": "publish", "channel": "room:alpha", "data": {"text": format!("m{last}")}}))
                .await;
            last = reply["offset"].as_u64().expect("stored");
            if !matches!(
                stopped.try_recv(),
                Err(tokio::sync::oneshot::error::TryRecvError::Empty)
            ) {
                after += 1;
            }
        }
        (ann, last)
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut ben = V1::open(&b.ws("/ws?name=ben")).await;
    let subscribed = ben
        .call(json!({"op": "subscribe", "channel": "room:alpha", "since": 0}))
        .await;
    assert!(subscribed.get("error").is_none(), "{subscribed}");
    let _ = stop.send(());
    let (ann, last) = publisher.await.unwrap();
    let mut offsets = Vec::new();
    while offsets.last() != Some(&last) {
        offsets.push(
            ben.push("pub", "room:alpha").await["offset"]
                .as_u64()
                .unwrap(),
        );
    }
    assert_eq!(offsets, (1..=last).collect::<Vec<_>>());
    assert_eq!(subscribers(port, &rooms), [2, 2, 1, 1]);

    // A node stops listening to a room when its last member there leaves.
    drop(ben);
    drop(bob);
    until_subscribers(port, &rooms, &[1, 1, 0, 0]).await;
    drop(ann);
    until_subscribers(port, &rooms, &[0, 0, 0, 0]).await;
    // Everyone left, so nothing of their presence is left in Redis.
    until_gone(
        port,
        &[
            "tether:{alpha}:m",
            "tether:{beta}:m",
            "tether:np:a",
            "tether:np:b",
        ],
    )
    .await;
    drop((a.data, b.data));
}

/// Waits until none of `keys` exists in Redis (on `port`).
async fn until_gone(port: u16, keys: &[&str]) {
    let started = Instant::now();
    loop {
        let out = Command::new("redis-cli")
            .args(["-p", &port.to_string(), "EXISTS"])
            .args(keys)
            .output()
            .expect("redis-cli comes with redis-server");
        let now = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if now == "0" {
            return;
        }
        assert!(started.elapsed() < LIMIT, "{now} of {keys:?} still exist");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Commands Redis on `port` has processed so far.
fn redis_commands(port: u16) -> u64 {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "INFO", "stats"])
        .output()
        .expect("redis-cli comes with redis-server");
    let text = String::from_utf8(out.stdout).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .expect("INFO stats counts commands")
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_rooms_cost_redis_nothing_per_second() {
    const CONNECTIONS: usize = 8;
    const ROOMS_EACH: usize = 125;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _redis = redis(port, dir.path());
    let limits = "rooms_per_hour = 100000\n";
    let a = node_with("a", port, limits);
    let b = node_with("b", port, limits);
    // 1,000 rooms with a member each on node a, and one shared with node b.
    let mut clients = Vec::new();
    for i in 0..CONNECTIONS {
        let mut client = V1::open(&a.ws(&format!("/ws?name=idle{i}"))).await;
        for j in 0..ROOMS_EACH {
            let reply = client
                .call(json!({"op": "subscribe", "channel": format!("room:idle-{i}-{j}")}))
                .await;
            assert!(reply.get("error").is_none(), "{reply}");
        }
        clients.push(client);
    }
    let mut ann = V1::open(&a.ws("/ws?name=ann")).await;
    ann.call(json!({"op": "subscribe", "channel": "room:shared"}))
        .await;
    let _bob = join(&b.ws("/ws/rooms/shared?name=bob")).await;
    ann.push("join", "room:shared").await;
    until_members(
        port,
        &format!("idle-{}-{}", CONNECTIONS - 1, ROOMS_EACH - 1),
        1,
    )
    .await;

    // Over two heartbeats and more, Redis hears a few commands from the two nodes, whatever
    // the number of rooms: each beat is one script of six commands (counted one by one),
    // and the two INFO calls count too. Refreshing entries per room cost about 7,000.
    let window = Duration::from_secs(7);
    let before = redis_commands(port);
    tokio::time::sleep(window).await;
    let during = redis_commands(port) - before;
    eprintln!(
        "{} idle rooms: {during} redis commands in {} s",
        CONNECTIONS * ROOMS_EACH + 1,
        window.as_secs()
    );
    assert!(during <= 100, "{during} commands in {window:?}");

    // The rooms are still shared: bob on node b leaves, ann on node a hears it.
    drop(_bob);
    let left = ann.push("leave", "room:shared").await;
    assert_eq!(left["user"], "bob", "{left}");
    drop((a.data, b.data));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_swept_while_paused_writes_its_presence_back() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _redis = redis(port, dir.path());
    let a = node("a", port);
    let b = node("b", port);
    let mut ann = join(&a.ws("/ws/rooms/ops?name=ann")).await;
    let _bob = join(&b.ws("/ws/rooms/ops?name=bob")).await;
    let presence = |p: &Value| (p["user"].clone(), p["event"].clone());
    let p = next_of(&mut ann, "presence").await;
    assert_eq!(presence(&p), (json!("bob"), json!("join")));

    // Node b stops beating for longer than a heartbeat lasts: node a sweeps it.
    signal(b.serve.pid(), "-STOP");
    let p = loop {
        let event = next_within(&mut ann, Duration::from_secs(60)).await;
        if event["type"] == "presence" {
            break event;
        }
    };
    assert_eq!(presence(&p), (json!("bob"), json!("leave")));
    until_members(port, "ops", 1).await;

    // Back, node b finds it was swept and writes what it has again: bob is announced anew.
    signal(b.serve.pid(), "-CONT");
    let p = next_of(&mut ann, "presence").await;
    assert_eq!(presence(&p), (json!("bob"), json!("join")));
    until_members(port, "ops", 2).await;
    drop((a.data, b.data));
}

/// An HTTP/1.1 exchange with `addr` carrying `headers`: the status, the response's head and
/// its JSON body (`Null` when it is not JSON).
fn exchange(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> (u16, String, Value) {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    write!(
        tcp,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{extra}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    std::io::Read::read_to_string(&mut tcp, &mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head[9..12].parse().unwrap();
    (
        status,
        head.to_owned(),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

/// The `tether_session=…` pair a login response sets.
fn session_cookie(head: &str) -> String {
    head.lines()
        .filter_map(|l| l.strip_prefix("set-cookie: "))
        .filter_map(|v| v.split(';').next())
        .find(|pair| pair.starts_with("tether_session="))
        .unwrap_or_else(|| panic!("no session cookie in {head}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_tokens_and_revocations_hold_on_every_node() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _redis = redis(port, dir.path());
    let url = format!("redis://127.0.0.1:{port}/");
    // Connections check their credential again only every hour: a socket that closes within
    // this test was told of the revocation.
    let toml = "credential_check = \"1h\"\n";
    let (a, b) = (node_with("a", port, toml), node_with("b", port, toml));

    // One `tether user add`, through Redis, and every node knows the user.
    let (added, said) = user(&["add", "ann", "--redis", &url], Some("pw-for-ann"));
    assert!(added, "{said}");
    let login = json!({"user": "ann", "password": "pw-for-ann"});

    // A session cookie from a login on a is good on b, and a token issued by b on a.
    let (status, head, _) = exchange(&a.addr, "POST", "/api/login", &[], Some(login.clone()));
    assert_eq!(status, 200, "{head}");
    let cookie = session_cookie(&head);
    let with_cookie = [("Cookie", cookie.as_str())];
    let (status, _, me) = exchange(&b.addr, "GET", "/api/me", &with_cookie, None);
    assert_eq!((status, &me["user"]), (200, &json!("ann")));
    let (status, _, issued) = exchange(&b.addr, "POST", "/api/tokens", &[], Some(login.clone()));
    assert_eq!(status, 201, "{issued}");
    let token = issued["token"].as_str().unwrap().to_owned();
    let (status, me) = http(&a.addr, "GET", "/api/me", Some(&token), None);
    assert_eq!((status, &me["user"]), (200, &json!("ann")));

    // Two sockets on a: one opened with the token, one with the cookie.
    let by_token_url = a.ws(&format!("/ws/rooms/lobby?token={token}"));
    let (mut by_token, _) = within(tether::connect(&by_token_url)).await.unwrap();
    next_of(&mut by_token, "ready").await;
    let builder = tether::ClientBuilder::new(&a.ws("/ws/rooms/lobby")).unwrap();
    let (mut by_cookie, _) = connect_with(builder, Some(&cookie)).await;
    next_of(&mut by_cookie, "ready").await;

    // The token is revoked on b (a logout with it): its socket on a closes with 1008 at
    // once; the cookie's stays.
    let bearer = format!("Bearer {token}");
    let (status, _, _) = exchange(
        &b.addr,
        "POST",
        "/api/logout",
        &[("Authorization", &bearer)],
        None,
    );
    assert_eq!(status, 204);
    assert_eq!(closed(&mut by_token).await, 1008);
    assert_eq!(http(&a.addr, "GET", "/api/me", Some(&token), None).0, 401);
    say(&mut by_cookie, "still here").await;
    assert_eq!(
        next_of(&mut by_cookie, "message").await["text"],
        "still here"
    );

    // `tether user` reads and revokes through Redis too: the session is listed, and revoking
    // it closes its socket on a; neither node knows the cookie any more.
    let (listed, said) = user(&["tokens", "ann", "--redis", &url], None);
    assert!(
        listed && said.lines().count() == 1 && said.contains("\tsession\t"),
        "{said}"
    );
    let (revoked, said) = user(&["revoke", "ann", "--redis", &url], None);
    assert!(revoked && said.contains("revoked 1 "), "{said}");
    assert_eq!(closed(&mut by_cookie).await, 1008);
    for node in [&a, &b] {
        let (status, _, me) = exchange(&node.addr, "GET", "/api/me", &with_cookie, None);
        assert_eq!((status, &me["user"]), (200, &Value::Null), "{}", node.addr);
    }

    // A new password, set once, is the one both nodes check.
    let (changed, said) = user(&["passwd", "ann", "--redis", &url], Some("new-pw-for-ann"));
    assert!(changed, "{said}");
    let new_login = json!({"user": "ann", "password": "new-pw-for-ann"});
    for node in [&a, &b] {
        let (old, _, _) = exchange(&node.addr, "POST", "/api/login", &[], Some(login.clone()));
        let (new, _, _) = exchange(
            &node.addr,
            "POST",
            "/api/login",
            &[],
            Some(new_login.clone()),
        );
        assert_eq!((old, new), (401, 200), "{}", node.addr);
    }
    let (listed, said) = user(&["list", "--redis", &url], None);
    assert!(listed, "{said}");
    let names: Vec<&str> = said.lines().filter_map(|l| l.split('\t').next()).collect();
    assert_eq!(names, ["ann", "ops"], "{said}");
    assert!(
        said.starts_with("ann\t") && said.contains("\t2 sessions\t0 tokens"),
        "{said}"
    );
}

/// Watches poll `id` on `a` and on `b`, votes yes from a's watcher and no from b's, and waits
/// until both see both votes counted; the watchers.
async fn vote_on_both(a: &Node, b: &Node, id: i64) -> Vec<ClientStream> {
    let mut watchers = Vec::new();
    for (node, name) in [(a, "wa"), (b, "wb")] {
        let url = node.ws(&format!("/ws/polls/{id}?name={name}"));
        let (mut ws, _) = connect_as(&url, None).await;
        assert_eq!(next_of(&mut ws, "poll").await["poll"]["id"], id);
        watchers.push(ws);
    }
    for (ws, option) in watchers.iter_mut().zip(["yes", "no"]) {
        ws.send(Message::text(json!({ "vote": option }).to_string()))
            .await
            .unwrap();
    }
    until_counted(&mut watchers, 2, json!({"yes": 1, "no": 1})).await;
    watchers
}

/// Waits until every watcher is told of `total` votes, and checks they are `counts`.
async fn until_counted(watchers: &mut [ClientStream], total: u64, counts: Value) {
    for ws in watchers {
        let told = loop {
            let told = next_of(ws, "counts").await;
            if told["total"] == total {
                break told;
            }
        };
        assert_eq!(told["counts"], counts, "{told}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polls_ids_and_counts_are_the_same_on_every_node() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _redis = redis(port, dir.path());
    let (a, b) = (node("a", port), node("b", port));

    // Polls created on both nodes at once never share an id.
    let creating: Vec<_> = [&a, &b]
        .into_iter()
        .flat_map(|node| {
            (0..5).map(|i| {
                let addr = node.addr.clone();
                std::thread::spawn(move || {
                    let poll =
                        json!({"question": format!("Q{i} on {addr}"), "options": ["yes", "no"]});
                    http(&addr, "POST", "/api/polls", None, Some(poll))
                })
            })
        })
        .collect();
    let mut ids: Vec<i64> = creating
        .into_iter()
        .map(|t| {
            let (status, created) = t.join().unwrap();
            assert_eq!(status, 201, "{created}");
            created["id"].as_i64().unwrap()
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 10, "{ids:?}");
    let (_, on_a) = http(&a.addr, "GET", "/api/polls", None, None);
    let (_, on_b) = http(&b.addr, "GET", "/api/polls", None, None);
    assert_eq!(on_a.as_array().map(Vec::len), Some(10), "{on_a}");
    assert_eq!(on_a, on_b);

    // Watched on both nodes, voted on from both: the counts are the same everywhere, live
    // and stored.
    let id = ids[0];
    let mut watchers = vote_on_both(&a, &b, id).await;
    let path = format!("/api/polls/{id}");
    let (_, stored_a) = http(&a.addr, "GET", &path, None, None);
    let (_, stored_b) = http(&b.addr, "GET", &path, None, None);
    assert_eq!(stored_a["total"], 2, "{stored_a}");
    assert_eq!(stored_a, stored_b);

    // A vote counted while the nodes' subscriptions are down (they wait 100 ms before
    // subscribing again) is not heard: each node reads the counts of its polls once it is back.
    let killed = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "CLIENT", "KILL", "TYPE", "pubsub"])
        .output()
        .expect("redis-cli comes with redis-server");
    assert!(killed.status.success());
    let (late, _) = connect_as(&a.ws(&format!("/ws/polls/{id}?name=late")), None).await;
    let mut late = late;
    next_of(&mut late, "poll").await;
    late.send(Message::text(json!({ "vote": "yes" }).to_string()))
        .await
        .unwrap();
    until_counted(&mut watchers, 3, json!({"yes": 2, "no": 1})).await;
}

/// The ids of the subscribing (pub/sub) connections of Redis on `port`.
fn pubsub_clients(port: u16) -> Vec<String> {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "CLIENT", "LIST", "TYPE", "pubsub"])
        .output()
        .expect("redis-cli comes with redis-server");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .next()?
                .strip_prefix("id=")
                .map(str::to_owned)
        })
        .collect()
}

/// `redis-cli -p PORT ARGS`, which must answer OK.
fn redis_ok(port: u16, args: &[&str]) {
    let said = redis_cli(port, args);
    assert_eq!(said.trim(), "OK", "{args:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poll_created_while_a_nodes_subscription_was_down_is_announced_once_it_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _redis = redis(port, dir.path());
    let (a, b) = (node("a", port), node("b", port));
    let mut watcher = V1::open(&b.ws("/ws?name=watcher")).await;
    watcher
        .call(json!({"op": "subscribe", "channel": "polls"}))
        .await;
    let create = |question: &str| {
        let poll = json!({"question": question, "options": ["yes", "no"]});
        let (status, created) = http(&a.addr, "POST", "/api/polls", None, Some(poll));
        assert_eq!(status, 201, "{created}");
        created["id"].clone()
    };
    // Heard at once while b listens.
    let first = create("First?");
    let pushed = watcher.push("pub", "polls").await;
    assert_eq!(pushed["data"]["created"]["id"], first, "{pushed}");

    // The nodes' subscriptions are dropped and may not subscribe again (an ACL takes the
    // subscribing commands away), so the news of the next poll reaches no node (a announces
    // its own at once).
    redis_ok(
        port,
        &[
            "ACL",
            "SETUSER",
            "default",
            "-subscribe",
            "-psubscribe",
            "-ssubscribe",
        ],
    );
    redis_cli(port, &["CLIENT", "KILL", "TYPE", "pubsub"]);
    let started = Instant::now();
    while !pubsub_clients(port).is_empty() {
        assert!(
            started.elapsed() < LIMIT,
            "a node subscribed without the right to"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let second = create("Second?");
    redis_ok(
        port,
        &[
            "ACL",
            "SETUSER",
            "default",
            "+subscribe",
            "+psubscribe",
            "+ssubscribe",
        ],
    );
    // Back, b reads the polls created since the newest it announced, and announces them.
    let pushed = watcher.push("pub", "polls").await;
    assert_eq!(pushed["data"]["created"]["id"], second, "{pushed}");
    assert_eq!(pushed["data"]["created"]["question"], "Second?");
}

/// A single node on a SQLite file of its own with user `ann` (password `pw-for-ann`) and a
/// token of hers: the directory, its path, the node and the token.
fn single_node_with_ann() -> (tempfile::TempDir, String, common::Serve, String) {
    let single = tempfile::tempdir().unwrap();
    let data = single.path().to_str().unwrap().to_owned();
    let (added, said) = user(&["add", "ann", "--data", &data], Some("pw-for-ann"));
    assert!(added, "{said}");
    let serve = common::start_serve(&["--data", &data]);
    let login = json!({"user": "ann", "password": "pw-for-ann"});
    let (status, issued) = http(&serve.addr, "POST", "/api/tokens", None, Some(login));
    assert_eq!(status, 201, "{issued}");
    let token = issued["token"].as_str().unwrap().to_owned();
    (single, data, serve, token)
}

/// Runs `tether import` of the store in `data` into `redis`: whether it succeeded, and what
/// it said.
fn import_into(data: &str, redis: &str) -> (bool, String) {
    import_with(data, redis, &[])
}

/// [`import_into`] with more options.
fn import_with(data: &str, redis: &str, options: &[&str]) -> (bool, String) {
    let out = Command::new(BIN)
        .args(["import", "--data", data, "--redis", redis])
        .args(options)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_nodes_store_imported_into_redis_keeps_its_users_history_and_polls() {
    // One node on its SQLite file, used: a user with a token, three messages, a poll voted on.
    let (_single, data, serve, token) = single_node_with_ann();
    let login = json!({"user": "ann", "password": "pw-for-ann"});
    for i in 1..=3 {
        let text = Some(json!({ "text": format!("before {i}") }));
        let (status, _) = http(
            &serve.addr,
            "POST",
            "/api/rooms/lobby/messages",
            Some(&token),
            text,
        );
        assert_eq!(status, 201);
    }
    let poll = json!({"question": "Move?", "options": ["yes", "no"]});
    let (status, created) = http(&serve.addr, "POST", "/api/polls", None, Some(poll));
    assert_eq!(status, 201);
    let poll_id = created["id"].as_i64().unwrap();
    let url = format!("ws://{}/ws/polls/{poll_id}?token={token}", serve.addr);
    let (mut voter, _) = within(tether::connect(&url)).await.unwrap();
    next_of(&mut voter, "poll").await;
    voter
        .send(Message::text(json!({"vote": "yes"}).to_string()))
        .await
        .unwrap();
    assert_eq!(next_of(&mut voter, "counts").await["total"], 1);
    let url = format!("ws://{}/ws/rooms/lobby?token={token}", serve.addr);
    let (mut reader, _) = within(tether::connect(&url)).await.unwrap();
    let epoch = next_of(&mut reader, "welcome").await["epoch"].clone();
    drop((voter, reader, serve));

    // Imported once into an empty Redis; a second import is refused.
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _redis = redis(port, dir.path());
    let redis_url = format!("redis://127.0.0.1:{port}/");
    let import = |what: &str| {
        let (done, said) = import_into(&data, &redis_url);
        (done, format!("{what}: {said}"))
    };
    // An import that stopped midway (its mark says so) is told, and refused until Redis is
    // emptied.
    let redis_cli = |args: &[&str]| {
        let out = Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli comes with redis-server");
        assert!(out.status.success());
    };
    redis_cli(&["SET", "tether:imported", "started"]);
    let (unfinished, said) = import("after a stopped one");
    assert!(!unfinished && said.contains("did not finish"), "{said}");
    redis_cli(&["FLUSHDB"]);
    let (imported, said) = import("first");
    assert!(imported, "{said}");
    assert!(
        said.contains("1 users, 1 sessions and tokens, 1 rooms with 3 messages")
            && said.contains("1 polls with 1 votes"),
        "{said}"
    );
    let (again, said) = import("second");
    assert!(
        !again && said.contains("already holds tether data"),
        "{said}"
    );

    // Two nodes on it: the token and the password work on both.
    let (a, b) = (node("a", port), node("b", port));
    for node in [&a, &b] {
        let (status, me) = http(&node.addr, "GET", "/api/me", Some(&token), None);
        assert_eq!((status, &me["user"]), (200, &json!("ann")), "{}", node.addr);
        let (status, _, _) = exchange(&node.addr, "POST", "/api/login", &[], Some(login.clone()));
        assert_eq!(status, 200, "{}", node.addr);
    }

    // A client that read up to message 1 resumes on node a in the same stream: messages 2 and
    // 3, then what is said next gets id 4.
    let url = a.ws(&format!(
        "/ws/rooms/lobby?name=gus&since=1&epoch={}",
        epoch.as_str().unwrap()
    ));
    let (mut gus, _) = connect_as(&url, None).await;
    let welcome = next_of(&mut gus, "welcome").await;
    assert_eq!(
        (&welcome["recovered"], &welcome["epoch"]),
        (&json!(true), &epoch),
        "{welcome}"
    );
    for (id, text) in [(2, "before 2"), (3, "before 3")] {
        let m = next_of(&mut gus, "message").await;
        assert_eq!(
            (m["id"].as_u64(), m["text"].as_str()),
            (Some(id), Some(text))
        );
    }
    next_of(&mut gus, "ready").await;
    say(&mut gus, "after").await;
    assert_eq!(next_of(&mut gus, "message").await["id"], 4);

    // The poll keeps its id and votes; the next one created takes the next id.
    let (_, polls) = http(&b.addr, "GET", "/api/polls", None, None);
    assert_eq!(polls[0]["id"], poll_id, "{polls}");
    assert_eq!(polls[0]["counts"], json!({"yes": 1, "no": 0}), "{polls}");
    let poll = json!({"question": "Next?", "options": ["a", "b"]});
    let (status, created) = http(&a.addr, "POST", "/api/polls", None, Some(poll));
    assert_eq!((status, created["id"].as_i64()), (201, Some(poll_id + 1)));
}

/// Messages [`publish_through`] sends.
const TOTAL: usize = 200;

/// What [`publish_through`] has been answered so far.
#[derive(Default)]
struct Progress {
    /// Messages acknowledged.
    acknowledged: AtomicUsize,
    /// Refusals (the message is sent again).
    refused: AtomicUsize,
}

/// A publisher on `node` that sends [`TOTAL`] messages through the HTTP API, each with its
/// idempotency key, sending one again with the same key until it is acknowledged (counted in
/// `progress`); it returns the id and text of each.
fn publish_through(
    node: &Node,
    progress: Arc<Progress>,
) -> std::thread::JoinHandle<Vec<(u64, String)>> {
    let bearer = token(node);
    let addr = node.addr.clone();
    std::thread::spawn(move || {
        let auth = format!("Bearer {bearer}");
        let started = Instant::now();
        let mut ids = Vec::with_capacity(TOTAL);
        for i in 1..=TOTAL {
            let key = format!("k{i}");
            loop {
                let headers = [("Authorization", auth.as_str()), ("Idempotency-Key", &key)];
                let text = Some(json!({ "text": format!("m{i}") }));
                let (status, _, body) =
                    exchange(&addr, "POST", "/api/rooms/ops/messages", &headers, text);
                if status == 201 {
                    ids.push((body["id"].as_u64().unwrap(), format!("m{i}")));
                    progress.acknowledged.fetch_add(1, SeqCst);
                    break;
                }
                assert!(matches!(status, 500 | 503 | 504), "m{i}: {status} {body}");
                progress.refused.fetch_add(1, SeqCst);
                assert!(started.elapsed() < LIMIT * 3, "m{i} never stored: {body}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        ids
    })
}

/// Asserts that the publisher's acknowledgements `ids` were 1 to [`TOTAL`] in order, and
/// that `node` keeps each message once, under the id it was acknowledged with.
fn assert_stored_once(node: &Node, ids: &[(u64, String)]) {
    let expected: Vec<(u64, String)> = (1..=TOTAL as u64).map(|i| (i, format!("m{i}"))).collect();
    assert_eq!(ids, expected);
    let (status, stored) = http(
        &node.addr,
        "GET",
        "/api/rooms/ops/messages?since=0&limit=1000",
        None,
        None,
    );
    assert_eq!(status, 200, "{stored}");
    let stored: Vec<(u64, String)> = stored
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["id"].as_u64().unwrap(),
                m["text"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(stored, expected);
}

/// Waits until the publisher has `at_least` acknowledgements.
async fn until_acknowledged(progress: &Progress, at_least: usize) {
    let started = Instant::now();
    while progress.acknowledged.load(SeqCst) < at_least {
        assert!(started.elapsed() < LIMIT, "the publisher never got going");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_from_its_log_loses_and_doubles_no_acknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut redis_proc = Some(redis(port, dir.path()));
    let toml = "api_publish_rate = 100000\n";
    let (a, b) = (node_with("a", port, toml), node_with("b", port, toml));
    let (mut member, _) = join_as(&b.ws("/ws/rooms/ops?name=watcher"), None).await;

    let progress = Arc::new(Progress::default());
    let publisher = publish_through(&a, progress.clone());

    // Mid-run, Redis dies without warning and comes back from its append-only log.
    until_acknowledged(&progress, 50).await;
    drop(redis_proc.take());
    let at_kill = progress.acknowledged.load(SeqCst);
    redis_proc = Some(redis(port, dir.path()));
    let ids = tokio::task::spawn_blocking(move || publisher.join().unwrap())
        .await
        .unwrap();
    assert!(redis_proc.is_some());
    // Else the run was over before the fault, and proves nothing.
    assert!(
        at_kill < TOTAL,
        "all {TOTAL} were acknowledged before Redis died"
    );

    assert_stored_once(&b, &ids);

    // The member on the other node received each once, in order, without being closed.
    for (id, text) in &ids {
        let m = next_of(&mut member, "message").await;
        assert_eq!(
            (m["id"].as_u64(), m["text"].as_str()),
            (Some(*id), Some(text.as_str()))
        );
    }
}

/// What `redis-cli -p PORT ARGS` prints.
fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .output()
        .expect("redis-cli comes with redis-server");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until what `redis-cli -p PORT ARGS` prints contains `wanted`.
async fn until_cli(port: u16, args: &[&str], wanted: &str) {
    let started = Instant::now();
    loop {
        let said = redis_cli(port, args);
        if said.contains(wanted) {
            return;
        }
        assert!(
            started.elapsed() < LIMIT,
            "{args:?} on {port} never said {wanted:?}: {said}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_with_redis_replicas_returns_once_a_replica_holds_it() {
    let (_single, data, serve, _token) = single_node_with_ann();
    drop(serve);
    let dir = tempfile::tempdir().unwrap();
    let (main, spare) = (free_port(), free_port());
    let _master = redis_role(main, None, false, dir.path());
    let url = format!("redis://127.0.0.1:{main}/");
    // No replica to hold it: the first batch is not confirmed, and the import stops there,
    // unfinished.
    let (done, said) = import_with(&data, &url, &["--redis-replicas", "1"]);
    assert!(
        !done && said.contains("0 of 1 redis replicas confirmed"),
        "{said}"
    );
    let (again, said) = import_with(&data, &url, &["--redis-replicas", "1"]);
    assert!(!again && said.contains("did not finish"), "{said}");
    assert!(redis_cli(main, &["FLUSHDB"]).starts_with("OK"));
    // With a replica: once the import says it is done, the replica holds all of it.
    let _replica = redis_role(spare, Some(main), false, dir.path());
    // Synced, though the master streams to it only after its first acknowledgement (its
    // cron sends one a second): the import waits that out rather than stop.
    until_cli(spare, &["INFO", "replication"], "master_link_status:up").await;
    let (done, said) = import_with(&data, &url, &["--redis-replicas", "1"]);
    assert!(done, "{said}");
    assert_eq!(redis_cli(spare, &["GET", "tether:imported"]).trim(), "done");
    let users = redis_cli(spare, &["HLEN", "tether:{tether:accounts}:users"]);
    assert_eq!(users.trim(), "1");
}

/// With `redis_replicas`, a vote's counts are announced only once a replica holds the vote:
/// while the replica does not take in what its master writes, a vote is not acknowledged and
/// nobody hears its counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_replicas_a_votes_counts_are_heard_only_once_a_replica_holds_it() {
    let dir = tempfile::tempdir().unwrap();
    let (main, spare) = (free_port(), free_port());
    let _master = redis_role(main, None, false, dir.path());
    let replica = redis_role(spare, Some(main), false, dir.path());
    until_cli(spare, &["INFO", "replication"], "master_link_status:up").await;
    let a = node_at(
        "a",
        &format!("redis://127.0.0.1:{main}/"),
        "redis_replicas = 1\n",
    );
    let auth = format!("Bearer {}", token(&a));
    let lunch = json!({"question": "Lunch?", "options": ["soup", "salad"]});
    // Created once a replica acknowledges its first write (a replica that just synced
    // acknowledges within a second).
    let started = Instant::now();
    let poll = loop {
        let (status, _, poll) = exchange(&a.addr, "POST", "/api/polls", &[], Some(lunch.clone()));
        if status == 201 {
            break poll;
        }
        assert!(started.elapsed() < LIMIT, "{status} {poll}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let channel = format!("poll:{}", poll["id"]);
    let mut watcher = V1::open(&a.ws("/ws?name=watcher")).await;
    let mut voter = V1::open(&a.ws("/ws?name=voter")).await;
    for client in [&mut watcher, &mut voter] {
        let subscribed = client
            .call(json!({"op": "subscribe", "channel": channel}))
            .await;
        assert!(subscribed.get("error").is_none(), "{subscribed}");
    }
    let vote =
        |option: &str| json!({"op": "publish", "channel": channel, "data": {"vote": option}});
    let counted = voter.call(vote("soup")).await;
    assert!(counted.get("error").is_none(), "{counted}");
    let counts = watcher.push("pub", &channel).await;
    assert_eq!(counts["data"]["counts"], json!({"soup": 1, "salad": 0}));

    // The replica stops: the next vote is applied by the master but not acknowledged, and its
    // counts are not announced. A broadcast published after it is heard, alone.
    signal(replica.0.id(), "-STOP");
    let refused = voter.call(vote("salad")).await;
    assert!(refused.get("error").is_some(), "{refused}");
    let (status, _, sent) = exchange(
        &a.addr,
        "POST",
        "/api/broadcast",
        &[("Authorization", auth.as_str())],
        Some(json!({"text": "marker"})),
    );
    assert_eq!(status, 200, "{sent}");
    let marker = watcher.push("pub", "broadcast").await;
    assert_eq!(marker["data"]["text"], "marker");
    let heard: Vec<&Value> = watcher
        .pushes
        .iter()
        .filter(|p| p["channel"] == *channel)
        .collect();
    assert!(
        heard.is_empty(),
        "counts of an unacknowledged vote: {heard:?}"
    );

    // Back: the vote again is acknowledged, and its counts heard.
    signal(replica.0.id(), "-CONT");
    let started = Instant::now();
    loop {
        let answer = voter.call(vote("salad")).await;
        if answer.get("error").is_none() {
            break;
        }
        assert!(started.elapsed() < LIMIT, "{answer}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let counts = watcher.push("pub", &channel).await;
    assert_eq!(counts["data"]["counts"], json!({"soup": 0, "salad": 1}));
}

/// A redis-server on `port` keeping nothing on disk, the replica of the one on `master` when
/// given, or a Redis Sentinel watching it as `tmain` when `sentinel` (whose config file, which
/// Sentinel rewrites, is in `dir`).
fn redis_role(port: u16, master: Option<u16>, sentinel: bool, dir: &std::path::Path) -> Proc {
    let mut command = Command::new("redis-server");
    if sentinel {
        let config = dir.join(format!("sentinel-{port}.conf"));
        let master = master.expect("a sentinel watches a master");
        std::fs::write(
            &config,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\n\
                 sentinel monitor tmain 127.0.0.1 {master} 1\n\
                 sentinel down-after-milliseconds tmain 1000\n\
                 sentinel failover-timeout tmain 10000\n",
                dir.display()
            ),
        )
        .unwrap();
        command.arg(&config).arg("--sentinel");
    } else {
        command
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir);
        if let Some(master) = master {
            command.args(["--replicaof", "127.0.0.1", &master.to_string()]);
        }
    }
    spawn_redis(command, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_promoted_by_sentinel_is_followed_and_holds_every_acknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    // A master and two replicas: once one is promoted, the other replicates from it.
    let (main, spares, watch) = (free_port(), [free_port(), free_port()], free_port());
    let mut master = Some(redis_role(main, None, false, dir.path()));
    let _replicas = spares.map(|spare| redis_role(spare, Some(main), false, dir.path()));
    for spare in spares {
        until_cli(spare, &["INFO", "replication"], "master_link_status:up").await;
    }
    let _sentinel = redis_role(watch, Some(main), true, dir.path());
    // Sentinel has found the replicas (from the master's INFO): it can promote one.
    for spare in spares {
        until_cli(
            watch,
            &["SENTINEL", "REPLICAS", "tmain"],
            &format!("127.0.0.1:{spare}"),
        )
        .await;
    }

    // The nodes find the master through Sentinel, and acknowledge a write only once the
    // replica holds it too.
    let setting = format!("redis+sentinel://127.0.0.1:{watch}/tmain");
    let toml = "api_publish_rate = 100000\nredis_replicas = 1\n";
    let (a, b) = (node_at("a", &setting, toml), node_at("b", &setting, toml));
    let progress = Arc::new(Progress::default());
    let publisher = publish_through(&a, progress.clone());

    // Mid-run, the master dies without warning; Sentinel promotes a replica.
    until_acknowledged(&progress, 50).await;
    drop(master.take());
    let at_kill = progress.acknowledged.load(SeqCst);
    let ids = tokio::task::spawn_blocking(move || publisher.join().unwrap())
        .await
        .unwrap();
    assert!(master.is_none());
    assert!(
        at_kill < TOTAL,
        "all {TOTAL} were acknowledged before the master died"
    );
    let promoted = spares.map(|spare| redis_cli(spare, &["ROLE"]).starts_with("master"));
    assert!(
        matches!(promoted, [true, false] | [false, true]),
        "{promoted:?}"
    );

    // Nothing acknowledged was lost with the old master, nor stored twice by a retry.
    assert_stored_once(&b, &ids);

    // Both nodes use the new master for everything: a login on one holds on the other, and
    // a member who joins on b hears, live, what is said on a.
    let b_token = token_when_ready(&b).await;
    let (status, me) = http(&a.addr, "GET", "/api/me", Some(&b_token), None);
    assert_eq!((status, me["user"].as_str()), (200, Some("ops")), "{me}");
    until_healthy(&a.addr);
    until_healthy(&b.addr);
    let (mut member, _) = join_as(&b.ws("/ws/rooms/ops?name=watcher"), None).await;
    let (mut speaker, _) = join_as(&a.ws("/ws/rooms/ops?name=speaker"), None).await;
    say(&mut speaker, "after the failover").await;
    let heard = next_of(&mut member, "message").await;
    assert_eq!(heard["text"], "after the failover", "{heard}");
    assert_eq!(heard["id"].as_u64(), Some(TOTAL as u64 + 1), "{heard}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_promoted_by_hand_among_the_candidates_is_followed() {
    let dir = tempfile::tempdir().unwrap();
    let (main, spare) = (free_port(), free_port());
    let mut master = Some(redis_role(main, None, false, dir.path()));
    let _replica = redis_role(spare, Some(main), false, dir.path());
    until_cli(spare, &["INFO", "replication"], "master_link_status:up").await;
    let setting = format!("redis://127.0.0.1:{main}/,redis://127.0.0.1:{spare}/");
    let a = node_at("a", &setting, "");
    let bearer = token(&a);
    let publish = |text: &str| {
        http(
            &a.addr,
            "POST",
            "/api/rooms/ops/messages",
            Some(&bearer),
            Some(json!({ "text": text })),
        )
    };
    assert_eq!(publish("before").0, 201);
    until_cli(spare, &["XLEN", "tether:{ops}:s"], "1").await;

    // The master dies; an operator promotes the replica, and the node moves to it.
    drop(master.take());
    assert!(master.is_none());
    assert!(redis_cli(spare, &["REPLICAOF", "NO", "ONE"]).starts_with("OK"));
    let started = Instant::now();
    loop {
        let (status, body) = publish("after");
        if status == 201 {
            assert_eq!(body["id"].as_u64(), Some(2), "{body}");
            break;
        }
        assert!(
            started.elapsed() < LIMIT,
            "never stored on the new master: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    until_healthy(&a.addr);
    assert_eq!(redis_cli(spare, &["XLEN", "tether:{ops}:s"]).trim(), "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keys_of_the_layout_before_hash_tags_are_moved_once_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _redis = redis(port, dir.path());
    // What an earlier version left: the epoch, the rooms' list, a stream, an idempotency key
    // (of user ops, for message 2), and a presence entry.
    let stored = |id: u64, text: &str| {
        json!({"type": "message", "id": id, "epoch": "old-epoch", "room": "ops",
               "user": "ops", "text": text, "ts": "2026-01-01T00:00:00.000Z"})
        .to_string()
    };
    for args in [
        vec!["SET", "tether:epoch", "old-epoch"],
        vec!["ZADD", "tether:room-names", "0", "ops"],
        vec!["XADD", "tether:s:ops", "0-1", "m", &stored(1, "one")],
        vec!["XADD", "tether:s:ops", "0-2", "m", &stored(2, "two")],
        vec!["SET", "tether:k:ops\tops\tkey-2", "2", "EX", "3600"],
        vec!["ZADD", "tether:m:ops", "0", "gone\tghost"],
    ] {
        let said = redis_cli(port, &args);
        assert!(!said.contains("ERR"), "{args:?}: {said}");
    }

    let a = node("a", port);
    // Moved: the old keys are gone, the room's keys carry its hash tag, under the old epoch.
    for old in [
        "tether:epoch",
        "tether:room-names",
        "tether:s:ops",
        "tether:m:ops",
    ] {
        assert_eq!(redis_cli(port, &["EXISTS", old]).trim(), "0", "{old}");
    }
    assert_eq!(redis_cli(port, &["XLEN", "tether:{ops}:s"]).trim(), "2");
    assert_eq!(
        redis_cli(port, &["GET", "tether:{ops}:e"]).trim(),
        "old-epoch"
    );

    // And kept: the history, the epoch, the ids, the idempotency key, the room's listing.
    let (status, history) = http(
        &a.addr,
        "GET",
        "/api/rooms/ops/messages?since=0",
        None,
        None,
    );
    assert_eq!(status, 200, "{history}");
    let texts: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["one", "two"]);
    let bearer = format!("Bearer {}", token(&a));
    let publish = |key: &str, text: &str| {
        let headers = [("Authorization", bearer.as_str()), ("Idempotency-Key", key)];
        let body = Some(json!({ "text": text }));
        exchange(&a.addr, "POST", "/api/rooms/ops/messages", &headers, body)
    };
    let (status, _, again) = publish("key-2", "two again");
    assert_eq!((status, again["id"].as_u64()), (201, Some(2)), "{again}");
    assert_eq!(again["text"], "two", "{again}");
    let (status, _, third) = publish("key-3", "three");
    assert_eq!((status, third["id"].as_u64()), (201, Some(3)), "{third}");
    let (mut member, _) = connect_as(&a.ws("/ws/rooms/ops?name=ann"), None).await;
    let welcome = next_of(&mut member, "welcome").await;
    assert_eq!(welcome["epoch"], "old-epoch", "{welcome}");
    let (status, rooms) = http(&a.addr, "GET", "/api/rooms", None, None);
    assert_eq!(status, 200);
    assert!(rooms.to_string().contains("\"ops\""), "{rooms}");
    // Once: a node that starts later finds nothing to move.
    let b = node("b", port);
    let (status, history) = http(
        &b.addr,
        "GET",
        "/api/rooms/ops/messages?since=0",
        None,
        None,
    );
    assert_eq!((status, history.as_array().map(Vec::len)), (200, Some(3)));
}

/// A Redis Cluster of three masters on loopback (slots split evenly, in port order), with
/// replicas when asked.
struct RedisCluster {
    /// The masters'.
    ports: [u16; 3],
    /// The replicas' (empty when none).
    spares: Vec<u16>,
    nodes: Vec<Option<Proc>>,
    _dir: tempfile::TempDir,
}

impl RedisCluster {
    fn start() -> RedisCluster {
        RedisCluster::start_with(0)
    }

    /// With `replicas` of each master, one of which the cluster promotes when their master
    /// has been unreachable for a second.
    fn start_with(replicas: usize) -> RedisCluster {
        let dir = tempfile::tempdir().unwrap();
        let ports = [free_port(), free_port(), free_port()];
        let spares: Vec<u16> = (0..3 * replicas).map(|_| free_port()).collect();
        let nodes = ports
            .iter()
            .chain(&spares)
            .map(|port| {
                let data = dir.path().join(port.to_string());
                std::fs::create_dir(&data).unwrap();
                let mut command = Command::new("redis-server");
                command
                    .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                    .args(["--cluster-enabled", "yes", "--cluster-config-file"])
                    .arg(data.join("nodes.conf"))
                    .args(["--cluster-port", &free_port().to_string()])
                    .args(["--cluster-node-timeout", "1000"])
                    .args(["--save", "", "--appendonly", "no", "--dir"])
                    .arg(&data);
                Some(spawn_redis(command, *port))
            })
            .collect();
        let members: Vec<String> = ports
            .iter()
            .chain(&spares)
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&members)
            .args(["--cluster-replicas", &replicas.to_string()])
            .arg("--cluster-yes")
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli comes with redis-server");
        assert!(
            created.status.success(),
            "{}",
            String::from_utf8_lossy(&created.stdout)
        );
        RedisCluster {
            ports,
            spares,
            nodes,
            _dir: dir,
        }
    }

    /// The replicas of master `shard`.
    fn replicas_of(&self, shard: usize) -> Vec<u16> {
        let wanted = format!("master_port:{}\r", self.ports[shard]);
        let found: Vec<u16> = self
            .spares
            .iter()
            .copied()
            .filter(|&spare| redis_cli(spare, &["INFO", "replication"]).contains(&wanted))
            .collect();
        assert_eq!(found.len(), self.spares.len() / 3, "{found:?}");
        found
    }

    /// Kills master `shard` without warning.
    fn kill(&mut self, shard: usize) {
        drop(self.nodes[shard].take());
    }

    /// The `--redis` setting that names it.
    fn setting(&self) -> String {
        let nodes: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis+cluster://{}", nodes.join(","))
    }

    /// Waits until every master says the cluster is ok, and every replica is in sync.
    async fn until_ok(&self) {
        for port in self.ports {
            until_cli(port, &["CLUSTER", "INFO"], "cluster_state:ok").await;
        }
        for &port in &self.spares {
            until_cli(port, &["INFO", "replication"], "master_link_status:up").await;
        }
    }

    /// A room whose keys sit on master `shard` (0, 1 or 2).
    fn room_on(&self, shard: usize) -> String {
        (0..1000)
            .map(|i| format!("r{i}"))
            .find(|room| self.shard_of(room) == shard)
            .expect("some room on every shard")
    }

    /// The master (0, 1 or 2) that holds `key`, or the keys of a room so named (they carry
    /// its name as their hash tag): slots are split evenly in order.
    fn shard_of(&self, key: &str) -> usize {
        let slot: usize = redis_cli(self.ports[0], &["CLUSTER", "KEYSLOT", key])
            .trim()
            .parse()
            .unwrap();
        slot * 3 / 16384
    }

    /// The process id of the server on `port`.
    fn pid(&self, port: u16) -> u32 {
        let at = self
            .ports
            .iter()
            .chain(&self.spares)
            .position(|&p| p == port)
            .expect("a server of the cluster");
        self.nodes[at].as_ref().expect("running").0.id()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_carries_chat_history_presence_accounts_and_polls_over_its_shards() {
    let cluster = RedisCluster::start();
    cluster.until_ok().await;
    let rooms: Vec<String> = (0..3).map(|shard| cluster.room_on(shard)).collect();
    let setting = cluster.setting();
    let (a, b) = (node_at("a", &setting, ""), node_at("b", &setting, ""));

    for (shard, room) in rooms.iter().enumerate() {
        // Members on both nodes: presence crosses them.
        let (mut ann, ann_cookie) =
            join_as(&a.ws(&format!("/ws/rooms/{room}?name=ann")), None).await;
        let mut ben = join(&b.ws(&format!("/ws/rooms/{room}?name=ben"))).await;
        let presence = next_of(&mut ann, "presence").await;
        assert_eq!(
            (presence["user"].as_str(), presence["event"].as_str()),
            (Some("ben"), Some("join")),
            "{room}"
        );
        // Messages from both nodes reach both members, in one order.
        assert_eq!(both_say(&mut ann, &mut ben).await, [1, 2], "{room}");
        // The room's keys sit on its shard.
        let stream = format!("tether:{{{room}}}:s");
        assert_eq!(
            redis_cli(cluster.ports[shard], &["XLEN", &stream]).trim(),
            "2",
            "{room}"
        );
        // Resumed on the other node from id 1: the history after it, then live.
        drop(ann);
        let url = b.ws(&format!("/ws/rooms/{room}?name=ann&since=1"));
        let (mut ann, _) = connect_as(&url, Some(&ann_cookie)).await;
        next_of(&mut ann, "welcome").await;
        assert_eq!(next(&mut ann).await["id"], 2, "{room}");
        assert_ready(&next(&mut ann).await, 2);
    }

    // A token made on one node holds on the other; a publish through one node's API reaches
    // the history on the other.
    let bearer = token(&a);
    let (status, me) = http(&b.addr, "GET", "/api/me", Some(&bearer), None);
    assert_eq!((status, me["user"].as_str()), (200, Some("ops")), "{me}");
    let path = format!("/api/rooms/{}/messages", rooms[1]);
    let (status, stored) = http(
        &a.addr,
        "POST",
        &path,
        Some(&bearer),
        Some(json!({"text": "api"})),
    );
    assert_eq!((status, stored["id"].as_u64()), (201, Some(3)), "{stored}");
    let (_, history) = http(&b.addr, "GET", &format!("{path}?since=0"), None, None);
    assert_eq!(history.as_array().map(Vec::len), Some(3), "{history}");
    let (_, listed) = http(&b.addr, "GET", "/api/rooms", None, None);
    for room in &rooms {
        assert!(
            listed.to_string().contains(&format!("\"{room}\"")),
            "{listed}"
        );
    }

    // Polls made on both nodes have distinct ids; votes from both are counted everywhere.
    let mut ids = Vec::new();
    for node in [&a, &b] {
        let poll = json!({"question": format!("on {}", node.addr), "options": ["yes", "no"]});
        let (status, created) = http(&node.addr, "POST", "/api/polls", None, Some(poll));
        assert_eq!(status, 201, "{created}");
        ids.push(created["id"].as_i64().unwrap());
    }
    assert_ne!(ids[0], ids[1]);
    vote_on_both(&a, &b, ids[0]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_shard_whose_master_died_is_served_by_its_promoted_replica() {
    let mut cluster = RedisCluster::start_with(1);
    cluster.until_ok().await;
    let room = cluster.room_on(0);
    let (a, b) = (
        node_at("a", &cluster.setting(), ""),
        node_at("b", &cluster.setting(), ""),
    );
    let bearer = token(&a);
    let (mut ann, _) = join_as(&a.ws(&format!("/ws/rooms/{room}?name=ann")), None).await;
    let mut ben = join(&b.ws(&format!("/ws/rooms/{room}?name=ben"))).await;
    next_of(&mut ann, "presence").await;
    assert_eq!(both_say(&mut ann, &mut ben).await, [1, 2]);
    let spare = cluster.replicas_of(0)[0];
    until_cli(spare, &["XLEN", &format!("tether:{{{room}}}:s")], "2").await;

    // The room's master dies; the cluster promotes its replica, which the nodes then use for
    // the room's commands and its sharded channels.
    cluster.kill(0);
    until_cli(spare, &["ROLE"], "master").await;
    until_cli(cluster.ports[1], &["CLUSTER", "INFO"], "cluster_state:ok").await;
    let path = format!("/api/rooms/{room}/messages");
    let started = Instant::now();
    let stored = loop {
        let (status, stored) = http(
            &a.addr,
            "POST",
            &path,
            Some(&bearer),
            Some(json!({"text": "after"})),
        );
        if status == 201 {
            break stored;
        }
        assert!(
            started.elapsed() < LIMIT,
            "never stored after the failover: {stored}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(stored["id"].as_u64(), Some(3), "{stored}");
    // A member who joins b now hears, live, what a stores on the promoted replica.
    let (mut carl, _) = connect_as(&b.ws(&format!("/ws/rooms/{room}?name=carl")), None).await;
    let ready = next_of(&mut carl, "ready").await;
    assert_eq!(ready["last_id"], 3, "{ready}");
    let (status, fourth) = http(
        &a.addr,
        "POST",
        &path,
        Some(&bearer),
        Some(json!({"text": "live"})),
    );
    assert_eq!(status, 201, "{fourth}");
    let heard = next_of(&mut carl, "message").await;
    assert_eq!(
        (heard["id"].as_u64(), heard["text"].as_str()),
        (Some(4), Some("live"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_shard_with_redis_replicas_loses_no_acknowledged_message_with_its_master() {
    // Two replicas a master: one is left to confirm writes once the other is promoted.
    let mut cluster = RedisCluster::start_with(2);
    cluster.until_ok().await;
    let shard = cluster.shard_of("ops");
    let toml = "api_publish_rate = 100000\nredis_replicas = 1\n";
    let setting = cluster.setting();
    let (a, b) = (node_at("a", &setting, toml), node_at("b", &setting, toml));
    let progress = Arc::new(Progress::default());
    let publisher = publish_through(&a, progress.clone());
    until_acknowledged(&progress, 50).await;

    // The replicas of the room's shard stop taking in what their master writes: the master
    // stores the next message, but it is not acknowledged while no replica holds it (the
    // publisher is refused and sends it again, with its key).
    let spares = cluster.replicas_of(shard);
    for &spare in &spares {
        signal(cluster.pid(spare), "-STOP");
    }
    let refused = progress.refused.load(SeqCst);
    let started = Instant::now();
    while progress.refused.load(SeqCst) < refused + 2 {
        assert!(
            started.elapsed() < LIMIT,
            "writes no replica holds were acknowledged"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Then the master dies without warning, holding a message its replicas never confirmed
    // (they may have received it, too late), and the cluster promotes one of them.
    cluster.kill(shard);
    for &spare in &spares {
        signal(cluster.pid(spare), "-CONT");
    }
    let at_kill = progress.acknowledged.load(SeqCst);
    let ids = tokio::task::spawn_blocking(move || publisher.join().unwrap())
        .await
        .unwrap();
    assert!(
        at_kill < TOTAL,
        "all {TOTAL} were acknowledged before the master died"
    );
    let promoted: Vec<bool> = spares
        .iter()
        .map(|&spare| redis_cli(spare, &["ROLE"]).starts_with("master"))
        .collect();
    assert!(promoted.contains(&true), "{promoted:?}");

    // Every acknowledged message is on the promoted replica once, under the id it was
    // acknowledged with: the unconfirmed one was acknowledged once it was sent again with its
    // key (found there, or stored anew).
    assert_stored_once(&b, &ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_imported_into_redis_cluster_needs_every_shard_empty_and_spreads_over_them() {
    let cluster = RedisCluster::start();
    cluster.until_ok().await;
    let rooms: Vec<String> = (0..3).map(|shard| cluster.room_on(shard)).collect();

    // One node on its SQLite file: a user with a token, a message in a room on each shard.
    let (_single, data, serve, token) = single_node_with_ann();
    for room in &rooms {
        let path = format!("/api/rooms/{room}/messages");
        let text = Some(json!({ "text": format!("in {room}") }));
        let (status, stored) = http(&serve.addr, "POST", &path, Some(&token), text);
        assert_eq!(status, 201, "{stored}");
    }
    drop(serve);

    let import = || import_into(&data, &cluster.setting());
    // A key of tether's on any one master (here a node's heartbeat on the last) is refused.
    let stray = (0..1000)
        .map(|i| format!("tether:np:n{i}"))
        .find(|key| cluster.shard_of(key) == 2)
        .unwrap();
    assert_eq!(
        redis_cli(cluster.ports[2], &["SET", &stray, "1"]).trim(),
        "OK"
    );
    let (imported, said) = import();
    assert!(
        !imported && said.contains("already holds tether data"),
        "{said}"
    );
    assert_eq!(redis_cli(cluster.ports[2], &["DEL", &stray]).trim(), "1");
    let (imported, said) = import();
    assert!(imported, "{said}");

    // Each room's stream is on its shard; two nodes on the cluster know the token and the
    // history.
    for (shard, room) in rooms.iter().enumerate() {
        let stream = format!("tether:{{{room}}}:s");
        assert_eq!(
            redis_cli(cluster.ports[shard], &["XLEN", &stream]).trim(),
            "1",
            "{room}"
        );
    }
    let (a, b) = (
        node_at("a", &cluster.setting(), ""),
        node_at("b", &cluster.setting(), ""),
    );
    for node in [&a, &b] {
        let (status, me) = http(&node.addr, "GET", "/api/me", Some(&token), None);
        assert_eq!((status, &me["user"]), (200, &json!("ann")), "{}", node.addr);
        for room in &rooms {
            let path = format!("/api/rooms/{room}/messages?since=0");
            let (_, history) = http(&node.addr, "GET", &path, None, None);
            assert_eq!(history[0]["text"], format!("in {room}"), "{history}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_replicas_a_message_is_heard_and_read_only_once_a_replica_holds_it() {
    let mut cluster = RedisCluster::start_with(2);
    cluster.until_ok().await;
    let shard = cluster.shard_of("ops");
    let elsewhere = cluster.room_on((shard + 1) % 3);
    let toml = "redis_replicas = 1\n";
    let setting = cluster.setting();
    let (a, b) = (node_at("a", &setting, toml), node_at("b", &setting, toml));
    let auth = format!("Bearer {}", token(&a));
    let post = |room: &str, text: &str, key: &str| {
        let headers = [("Authorization", auth.as_str()), ("Idempotency-Key", key)];
        let text = Some(json!({ "text": text }));
        let path = format!("/api/rooms/{room}/messages");
        exchange(&a.addr, "POST", &path, &headers, text)
    };
    let history = || {
        let path = "/api/rooms/ops/messages?since=0";
        let (status, stored) = http(&b.addr, "GET", path, None, None);
        assert_eq!(status, 200, "{stored}");
        let texts: Vec<String> = stored
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["text"].as_str().unwrap().to_owned())
            .collect();
        texts
    };
    // A watcher on b hears both rooms, in the order b hears them.
    let connect = json!({"op": "connect"});
    let mut watcher = V1::open_as(&b.ws("/ws?name=watcher"), connect, None).await;
    for room in ["ops", elsewhere.as_str()] {
        let subscribed = watcher
            .call(json!({"op": "subscribe", "channel": format!("room:{room}")}))
            .await;
        assert!(subscribed.get("error").is_none(), "{subscribed}");
    }
    let mut heard = async || loop {
        let push = next(&mut watcher.ws).await;
        if push["type"] == "pub" {
            return (push["channel"].clone(), push["data"]["text"].clone());
        }
    };
    let (status, _, stored) = post("ops", "before", "k1");
    assert_eq!(status, 201, "{stored}");
    assert_eq!(heard().await, (json!("room:ops"), json!("before")));

    // The shard's replicas stop taking in what their master writes: a message the master
    // stores now is not acknowledged, and neither heard nor read on the other node, while a
    // message in a room on another shard is.
    let spares = cluster.replicas_of(shard);
    for &spare in &spares {
        signal(cluster.pid(spare), "-STOP");
    }
    let (status, _, said) = post("ops", "unconfirmed", "k2");
    assert_eq!(status, 504, "{said}");
    assert_eq!(history(), ["before"]);
    let (status, _, stored) = post(&elsewhere, "marker", "k3");
    assert_eq!(status, 201, "{stored}");
    let marker = (json!(format!("room:{elsewhere}")), json!("marker"));
    assert_eq!(heard().await, marker);

    // The master dies. The replicas had received the message, though too late to confirm
    // it: the one promoted has it, and publishes it before the next.
    cluster.kill(shard);
    for &spare in &spares {
        signal(cluster.pid(spare), "-CONT");
    }
    // Node b subscribes again on the promoted replica and catches up, before the next message:
    // the unpublished message at the stream's end is no sign of lost ones.
    let started = Instant::now();
    loop {
        let subscribed = spares.iter().any(|&spare| {
            let said = redis_cli(spare, &["PUBSUB", "SHARDNUMSUB", "tether:{ops}:r"]);
            said.lines().last().map(str::trim) == Some("1")
        });
        if subscribed {
            break;
        }
        assert!(started.elapsed() < LIMIT, "b never subscribed again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = Instant::now();
    let stored = loop {
        let (status, _, stored) = post("ops", "after", "k4");
        if status == 201 {
            break stored;
        }
        assert!(matches!(status, 500 | 503 | 504), "{status} {stored}");
        assert!(started.elapsed() < LIMIT * 2, "never stored: {stored}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(stored["id"].as_u64(), Some(3), "{stored}");
    assert_eq!(heard().await, (json!("room:ops"), json!("unconfirmed")));
    assert_eq!(heard().await, (json!("room:ops"), json!("after")));
    assert_eq!(history(), ["before", "unconfirmed", "after"]);
}
