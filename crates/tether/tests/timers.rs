//! The connection's timers with a simulated clock: two sockets joined by an in-memory pipe, on a
//! runtime whose time is paused, so that it jumps to the next timer whenever every task waits.
//! Keepalive, its pong deadline, the close timeout and the end of the stream are checked to the
//! second of simulated time, in no time at all.

use std::time::Duration;

use tether::{CloseCode, Config, Error, Message, Role, WebSocket};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::time::Instant;

/// A server and a client joined in memory, each with its configuration.
fn pair(server: Config, client: Config) -> (WebSocket<DuplexStream>, WebSocket<DuplexStream>) {
    let (a, b) = tokio::io::duplex(1 << 20);
    (
        WebSocket::from_raw(a, Role::Server, server),
        WebSocket::from_raw(b, Role::Client, client),
    )
}

fn keepalive(interval: u64, timeout: u64) -> Config {
    Config::default()
        .ping_interval(Some(Duration::from_secs(interval)))
        .ping_timeout(Duration::from_secs(timeout))
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_answers_pings_is_kept_and_pinged_every_interval() {
    let (mut server, mut client) = pair(keepalive(30, 20), Config::default());
    let started = Instant::now();
    // The client reads (so it answers every ping) for ten simulated minutes and a little.
    let client_task = tokio::spawn(async move {
        let mut pings = 0;
        let deadline = Instant::now() + Duration::from_secs(615);
        while let Ok(Some(message)) = tokio::time::timeout_at(deadline, client.recv()).await {
            if let Message::Ping(_) = message.unwrap() {
                pings += 1;
            }
        }
        (pings, client)
    });
    // The server reads too: each pong answering its ping comes out as a message.
    let server_task = tokio::spawn(async move {
        let mut pongs = 0;
        let deadline = Instant::now() + Duration::from_secs(615);
        loop {
            match tokio::time::timeout_at(deadline, server.recv()).await {
                Err(_) => return (pongs, server),
                Ok(Some(Ok(Message::Pong(_)))) => pongs += 1,
                Ok(other) => panic!("the connection ended: {other:?}"),
            }
        }
    });
    let (pongs, _server) = server_task.await.unwrap();
    let (pings, _client) = client_task.await.unwrap();
    // A ping 30 s after the start and 30 s after each pong: 20 in 615 s, each answered.
    assert_eq!((pings, pongs), (20, 20));
    assert_eq!(started.elapsed(), Duration::from_secs(615));
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_never_answers_is_closed_with_1011_at_the_pong_deadline() {
    let (a, mut peer) = tokio::io::duplex(1 << 16);
    let mut server = WebSocket::from_raw(a, Role::Server, keepalive(30, 20));
    let started = Instant::now();
    // The peer reads nothing until the end: no pong comes back.
    let ended = server.recv().await;
    assert!(
        matches!(ended, Some(Err(Error::KeepaliveTimeout))),
        "{ended:?}"
    );
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(50),
        "the ping at 30 s, its deadline 20 s later"
    );
    drop(server);
    // What the server wrote: a ping, then a Close with 1011.
    let mut raw = Vec::new();
    peer.read_to_end(&mut raw).await.unwrap();
    assert_eq!(raw[0], 0x89, "a ping first");
    raw.drain(..2 + usize::from(raw[1] & 0x7f));
    assert_eq!(raw[0], 0x88, "then a close");
    assert_eq!(
        u16::from_be_bytes([raw[2], raw[3]]),
        CloseCode::INTERNAL_ERROR.0
    );
}

#[tokio::test(start_paused = true)]
async fn close_waits_the_close_timeout_for_a_peer_that_never_answers() {
    let config = Config::default().close_timeout(Duration::from_secs(5));
    let (mut server, _client) = pair(config, Config::default());
    let started = Instant::now();
    // The Close is written, the peer never answers: the close gives up after 5 s.
    let closed = server.close(None).await;
    assert!(closed.is_ok(), "{closed:?}");
    assert_eq!(started.elapsed(), Duration::from_secs(5));
}

#[tokio::test(start_paused = true)]
async fn a_clean_close_takes_no_time_and_both_ends_see_the_code() {
    let (mut server, mut client) = pair(Config::default(), Config::default());
    let started = Instant::now();
    let client_task = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some(message) = client.recv().await {
            seen.push(message.unwrap());
        }
        seen
    });
    server
        .close(Some(tether::CloseFrame::new(CloseCode::from(4000), "bye")))
        .await
        .unwrap();
    let seen = client_task.await.unwrap();
    assert!(
        matches!(&seen[..], [Message::Close(Some(f))] if f.code.0 == 4000 && f.reason == "bye"),
        "{seen:?}"
    );
    assert_eq!(started.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn the_end_of_the_stream_in_the_middle_of_a_message_is_an_abnormal_closure() {
    let (a, mut b) = tokio::io::duplex(1 << 16);
    let mut server = WebSocket::from_raw(a, Role::Server, Config::default());
    // A masked text frame announcing 10 bytes, of which 3 arrive; then the peer is gone.
    b.write_all(&[0x81, 0x80 | 10, 1, 2, 3, 4, b'a' ^ 1, b'b' ^ 2, b'c' ^ 3])
        .await
        .unwrap();
    drop(b);
    let ended = server.recv().await;
    assert!(
        matches!(ended, Some(Err(Error::AbnormalClosure))),
        "{ended:?}"
    );
    assert!(server.recv().await.is_none());
}

#[tokio::test(start_paused = true)]
async fn a_write_to_a_peer_that_never_reads_fails_at_the_write_timeout() {
    let (a, _peer) = tokio::io::duplex(64 << 10);
    let config = Config::default().write_timeout(Some(Duration::from_secs(30)));
    let mut server = WebSocket::from_raw(a, Role::Server, config);
    let started = Instant::now();
    let chunk = Message::binary(vec![0; 16 << 10]);
    let failed = loop {
        if let Err(e) = server.send(chunk.clone()).await {
            break e;
        }
    };
    assert!(matches!(failed, Error::WriteTimeout), "{failed}");
    assert_eq!(started.elapsed(), Duration::from_secs(30));
}

#[tokio::test(start_paused = true)]
async fn a_client_waits_for_the_server_to_close_tcp_at_most_the_close_timeout() {
    let (a, mut peer) = tokio::io::duplex(1 << 16);
    let config = Config::default().close_timeout(Duration::from_secs(5));
    let mut client = WebSocket::from_raw(a, Role::Client, config);
    // The server answers the Close but keeps TCP open.
    let server = tokio::spawn(async move {
        let mut close = [0u8; 8]; // a masked Close with 1000: 2 + 4 + 2 bytes
        peer.read_exact(&mut close).await.unwrap();
        assert_eq!(close[0], 0x88);
        peer.write_all(&[0x88, 0x02, 0x03, 0xe8]).await.unwrap();
        tokio::time::sleep(Duration::from_secs(3600)).await;
        drop(peer);
    });
    let started = Instant::now();
    client.close(None).await.unwrap();
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(5),
        "RFC 6455 7.1.1: the server closes TCP first; the client waits, within bounds"
    );
    server.abort();
}

/// A connection set aside ([`tether::Idle`]) keeps its keepalive: its deadline is the next
/// ping's, and once resumed the ping goes out then, as if it had never left its task.
#[tokio::test(start_paused = true)]
async fn a_websocket_set_aside_keeps_its_keepalive_deadline() {
    let (mut server, mut client) = pair(keepalive(30, 20), Config::default());
    let started = Instant::now();
    client.send(Message::text("first")).await.unwrap();
    assert_eq!(
        server.recv().await.unwrap().unwrap(),
        Message::text("first")
    );
    let idle = server
        .into_idle()
        .expect("a socket with nothing in progress is at rest");
    assert_eq!(
        idle.deadline(),
        Some((started + Duration::from_secs(30)).into_std())
    );
    // The transport may change form while set aside (as a plain socket does and back).
    let idle = idle.try_map_io(Ok::<_, std::io::Error>).unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
    client.send(Message::text("later")).await.unwrap();
    let mut server = idle.resume();
    assert_eq!(
        server.recv().await.unwrap().unwrap(),
        Message::text("later")
    );
    // The client reads for a minute: the ping comes 30 s after the start, not after the resume.
    let client_task = tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(50);
        let mut pings = Vec::new();
        while let Ok(Some(message)) = tokio::time::timeout_at(deadline, client.recv()).await {
            if let Message::Ping(_) = message.unwrap() {
                pings.push(started.elapsed());
            }
        }
        pings
    });
    // The server reads too, for the pong (until the client lets go at the end).
    let server_task = tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(50);
        while let Ok(Some(Ok(_))) = tokio::time::timeout_at(deadline, server.recv()).await {}
    });
    server_task.await.unwrap();
    let pings = client_task.await.unwrap();
    assert_eq!(pings[0], Duration::from_secs(30), "{pings:?}");
}

/// Only a socket waiting on its peer alone is set aside: not one with bytes queued to write,
/// nor one holding a message it has read but not handed out; it is given back unchanged.
#[tokio::test(start_paused = true)]
async fn a_websocket_with_work_in_progress_is_not_set_aside() {
    let (mut server, mut client) = pair(Config::default(), Config::default());
    server.feed(Message::text("queued")).await.unwrap();
    let mut server = server.into_idle().expect_err("bytes are queued to write");
    server.flush().await.unwrap();
    assert_eq!(
        client.recv().await.unwrap().unwrap(),
        Message::text("queued")
    );
    // Two messages in one write: the server reads both and hands out the first.
    client.feed(Message::text("one")).await.unwrap();
    client.feed(Message::text("two")).await.unwrap();
    client.flush().await.unwrap();
    assert_eq!(server.recv().await.unwrap().unwrap(), Message::text("one"));
    let mut server = server.into_idle().expect_err("a message is buffered");
    assert_eq!(server.recv().await.unwrap().unwrap(), Message::text("two"));
    let server = server.into_idle().expect("nothing is left in progress");
    // What arrives while it is aside is read once it is resumed.
    client.send(Message::text("three")).await.unwrap();
    let mut server = server.resume();
    assert_eq!(
        server.recv().await.unwrap().unwrap(),
        Message::text("three")
    );
}
