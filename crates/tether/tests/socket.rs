//! The tokio library over real loopback sockets: echo, batching, split halves, cancel safety,
//! every limit and timeout in `Config`, keepalive, subprotocols, headers and the Origin policy.

mod common;

use std::future::poll_fn;
use std::pin::Pin;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tether::handshake::{ClientHandshakeError, HandshakeError};
use tether::proto::extension::deflate::DeflateConfig;
use tether::{CloseCode, Config, Error, Message};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// Accepts connections forever, echoing data messages, with `config`.
async fn echo_server(config: Config) -> std::net::SocketAddr {
    let (listener, addr) = listener().await;
    tokio::spawn(serve_echo(listener, config));
    addr
}

async fn serve_echo(listener: TcpListener, config: Config) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        let config = config.clone();
        tokio::spawn(async move {
            let Ok(mut ws) = tether::accept_with_config(tcp, config).await else {
                return;
            };
            while let Some(Ok(msg)) = ws.recv().await {
                if msg.is_data() && ws.feed(msg).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// Sends a text and a binary message of every length form (7-bit, 16-bit and 64-bit, at the
/// edges) and requires each echoed unchanged; returns how many it sent.
async fn round_trip_every_length_form<S>(ws: &mut tether::WebSocket<S>) -> usize
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let lengths = [0usize, 1, 125, 126, 65_535, 65_536, 1 << 20];
    for len in lengths {
        let text: String = "é".repeat(len / 2);
        ws.send(Message::text(text.clone())).await.unwrap();
        assert_eq!(
            within(ws.recv()).await.unwrap().unwrap(),
            Message::text(text)
        );
        let data = vec![0xa5u8; len];
        ws.send(Message::binary(data.clone())).await.unwrap();
        assert_eq!(
            within(ws.recv()).await.unwrap().unwrap(),
            Message::binary(data)
        );
    }
    2 * lengths.len()
}

fn url(addr: std::net::SocketAddr) -> String {
    format!("ws://{addr}/")
}

#[tokio::test]
async fn echo_round_trips_text_and_binary_of_every_length_form() {
    let addr = echo_server(Config::default()).await;
    let (mut ws, _) = within(tether::connect(&url(addr))).await.unwrap();
    round_trip_every_length_form(&mut ws).await;
    within(ws.close(None)).await.unwrap();
}

#[tokio::test]
async fn fed_messages_are_batched_and_all_echoed_in_order() {
    let addr = echo_server(Config::default()).await;
    let (mut ws, _) = within(tether::connect(&url(addr))).await.unwrap();
    for i in 0..2000 {
        ws.feed(Message::text(format!("m{i}"))).await.unwrap();
    }
    ws.flush().await.unwrap();
    for i in 0..2000 {
        let msg = within(ws.recv()).await.unwrap().unwrap();
        assert_eq!(msg.as_text(), Some(format!("m{i}").as_str()));
    }
}

#[tokio::test]
async fn stream_and_sink_work_with_futures_combinators() {
    let addr = echo_server(Config::default()).await;
    let (mut ws, _) = within(tether::connect(&url(addr))).await.unwrap();
    let mut outgoing =
        futures_util::stream::iter((0..100).map(|i| Ok(Message::binary(vec![i as u8; 10]))));
    ws.send_all(&mut outgoing).await.unwrap();
    let got: Vec<Message> = within(ws.by_ref().take(100).map(Result::unwrap).collect()).await;
    assert_eq!(got.len(), 100);
    assert_eq!(got[99], Message::binary(vec![99u8; 10]));
    within(SinkExt::close(&mut ws)).await.unwrap();
}

#[tokio::test]
async fn split_halves_send_and_receive_from_two_tasks() {
    let addr = echo_server(Config::default()).await;
    let (ws, _) = within(tether::connect(&url(addr))).await.unwrap();
    let (mut tx, mut rx) = ws.split();
    let sender = tokio::spawn(async move {
        for i in 0..500u32 {
            tx.send(Message::binary(i.to_be_bytes().to_vec()))
                .await
                .unwrap();
        }
        tx
    });
    for i in 0..500u32 {
        let msg = within(rx.recv()).await.unwrap().unwrap();
        assert_eq!(msg, Message::binary(i.to_be_bytes().to_vec()));
    }
    let mut tx = sender.await.unwrap();
    tx.close(None).await.unwrap();
    // The receiving half sees the echoed Close, then the end.
    let last = within(rx.recv()).await.unwrap().unwrap();
    assert!(matches!(last, Message::Close(Some(f)) if f.code == CloseCode::NORMAL));
    assert!(within(rx.recv()).await.is_none());
}

#[tokio::test]
async fn a_socket_shared_by_two_tasks_loses_no_wake_up() {
    // `futures`' `StreamExt::split` shares the socket itself (not `split()`'s halves) between
    // two tasks. Both come to wait for the full socket to take more; both must be woken.
    let (listener, addr) = listener().await;
    let (start_reading, reading) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut ws = tether::accept(tcp).await.unwrap();
        reading.await.unwrap();
        ws.recv().await.unwrap().unwrap()
    });
    let (ws, _) = within(tether::connect(&url(addr))).await.unwrap();
    let (mut sink, mut stream) = StreamExt::split(ws);
    let sender = tokio::spawn(async move {
        sink.send(Message::binary(vec![7u8; 8 << 20]))
            .await
            .unwrap();
        sink
    });
    // The sender fills the socket and waits; then this task waits to write the rest too.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let polled = tokio::time::timeout(Duration::from_millis(100), stream.next()).await;
    assert!(polled.is_err(), "nothing to receive yet");
    start_reading.send(()).unwrap();
    // Only the sender is left polling: it finishes writing once the server reads.
    drop(within(sender).await.unwrap());
    let received = within(server).await.unwrap();
    assert_eq!(received.as_payload().len(), 8 << 20);
}

#[tokio::test]
async fn recv_is_cancel_safe_inside_select() {
    let addr = echo_server(Config::default()).await;
    let (mut ws, _) = within(tether::connect(&url(addr))).await.unwrap();
    let (tx, mut ticks) = tokio::sync::mpsc::channel::<()>(1);
    tokio::spawn(async move {
        while tx.send(()).await.is_ok() {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    });
    for i in 0..300u32 {
        ws.feed(Message::text(i.to_string())).await.unwrap();
    }
    ws.flush().await.unwrap();
    let mut next = 0u32;
    let mut cancelled = 0;
    while next < 300 {
        tokio::select! {
            msg = ws.recv() => {
                assert_eq!(msg.unwrap().unwrap().as_text(), Some(next.to_string().as_str()));
                next += 1;
            }
            _ = ticks.recv() => cancelled += 1,
        }
    }
    assert!(cancelled > 0, "the select never cancelled a recv");
}

#[tokio::test]
async fn handshake_head_over_the_limit_gets_431() {
    let addr = echo_server(Config::default().max_handshake_size(1024)).await;
    let big = format!("X-Filler: {}\r\n", "a".repeat(4000));
    let (_tcp, head) = within(raw_exchange(addr, &request(addr, &big))).await;
    assert!(head.starts_with("HTTP/1.1 431 "), "{head}");
}

#[tokio::test]
async fn silent_client_hits_the_handshake_timeout() {
    let (listener, addr) = listener().await;
    let _idle = TcpStream::connect(addr).await.unwrap();
    let (tcp, _) = listener.accept().await.unwrap();
    let started = std::time::Instant::now();
    let config = Config::default().handshake_timeout(Duration::from_millis(200));
    let err = within(tether::accept_with_config(tcp, config))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::HandshakeTimeout), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn wrong_version_gets_426_and_the_server_keeps_serving() {
    let addr = echo_server(Config::default()).await;
    let req = request(addr, "").replace("Version: 13", "Version: 8");
    let (_tcp, head) = within(raw_exchange(addr, &req)).await;
    assert!(head.starts_with("HTTP/1.1 426 "), "{head}");
    assert!(head.contains("Sec-WebSocket-Version: 13"), "{head}");
    let (_tcp, head) = within(raw_exchange(addr, "GARBAGE\r\n\r\n")).await;
    assert!(head.starts_with("HTTP/1.1 400 "), "{head}");
    // Others are still served.
    let (mut ws, _) = within(tether::connect(&url(addr))).await.unwrap();
    ws.send(Message::text("still here")).await.unwrap();
    assert_eq!(
        within(ws.recv()).await.unwrap().unwrap(),
        Message::text("still here")
    );
}

#[tokio::test]
async fn oversized_frame_is_closed_with_1009() {
    let addr = echo_server(Config::default().max_frame_size(1000)).await;
    let mut tcp = within(raw_client(addr)).await;
    // Only the header of a 5000-byte frame: the limit applies before the payload arrives.
    let frame = client_frame(0x2, &[0u8; 5000]);
    tcp.write_all(&frame[..8]).await.unwrap();
    let (code, _) = within(read_until_close(&mut tcp)).await.unwrap();
    assert_eq!(code, 1009);
}

#[tokio::test]
async fn oversized_message_is_closed_with_1009_and_reported_to_the_client() {
    let addr = echo_server(Config::default().max_message_size(1000)).await;
    let (mut ws, _) = within(tether::connect(&url(addr))).await.unwrap();
    ws.send(Message::binary(vec![1u8; 2000])).await.unwrap();
    let msg = within(ws.recv()).await.unwrap().unwrap();
    assert!(matches!(msg, Message::Close(Some(f)) if f.code == CloseCode::MESSAGE_TOO_BIG));
    assert!(within(ws.recv()).await.is_none());
}

#[tokio::test]
async fn client_limit_fails_oversized_server_message_with_1009() {
    let addr = echo_server(Config::default()).await;
    let config = Config::default().max_message_size(100);
    let mut ws = within(ClientBuilderExt::connect_with_config(addr, config)).await;
    ws.send(Message::binary(vec![0u8; 500])).await.unwrap();
    let err = within(ws.recv()).await.unwrap().unwrap_err();
    assert_eq!(err.close_code(), CloseCode::MESSAGE_TOO_BIG, "{err}");
    assert!(within(ws.recv()).await.is_none());
}

#[tokio::test]
async fn unmasked_client_frame_is_closed_with_1002() {
    let addr = echo_server(Config::default()).await;
    let mut tcp = within(raw_client(addr)).await;
    tcp.write_all(&[0x81, 0x02, b'h', b'i']).await.unwrap();
    let (code, _) = within(read_until_close(&mut tcp)).await.unwrap();
    assert_eq!(code, 1002);
    // And the server closes TCP.
    let mut rest = Vec::new();
    within(tcp.read_to_end(&mut rest)).await.unwrap();
}

#[tokio::test]
async fn invalid_utf8_is_closed_with_1007() {
    let addr = echo_server(Config::default()).await;
    let mut tcp = within(raw_client(addr)).await;
    tcp.write_all(&client_frame(0x1, &[b'o', b'k', 0xff]))
        .await
        .unwrap();
    let (code, _) = within(read_until_close(&mut tcp)).await.unwrap();
    assert_eq!(code, 1007);
}

#[tokio::test]
async fn write_buffer_bounds_what_a_non_reading_peer_can_make_us_queue() {
    let (listener, addr) = listener().await;
    // A peer that never reads.
    let _tcp = within(raw_client_deferred(addr, &listener)).await;
}

/// Accepts one connection with a small write buffer and feeds it until feeding blocks.
async fn raw_client_deferred(addr: std::net::SocketAddr, listener: &TcpListener) -> TcpStream {
    let connect = tokio::spawn(raw_client(addr));
    let (tcp, _) = listener.accept().await.unwrap();
    let limit = 64 << 10;
    let mut ws = tether::accept_with_config(tcp, Config::default().write_buffer_size(limit))
        .await
        .unwrap();
    let peer = connect.await.unwrap();
    let chunk = vec![0u8; 16 << 10];
    let mut blocked = false;
    for _ in 0..10_000 {
        let fed = tokio::time::timeout(
            Duration::from_millis(200),
            ws.feed(Message::binary(chunk.clone())),
        )
        .await;
        assert!(
            ws.queued_len() <= limit + chunk.len() + 16,
            "queued {}",
            ws.queued_len()
        );
        if fed.is_err() {
            blocked = true;
            break;
        }
    }
    assert!(blocked, "feeding never waited for the peer");
    peer
}

#[tokio::test]
async fn peer_vanishing_without_close_is_an_abnormal_closure() {
    let (listener, addr) = listener().await;
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut ws = tether::accept(tcp).await.unwrap();
        ws.recv().await
    });
    let tcp = within(raw_client(addr)).await;
    drop(tcp);
    let result = within(server).await.unwrap().unwrap();
    let err = result.unwrap_err();
    assert!(matches!(err, Error::AbnormalClosure), "{err}");
    assert_eq!(err.close_code(), CloseCode::ABNORMAL);
}

#[tokio::test]
async fn subprotocol_headers_and_callback_shape_the_handshake() {
    let (listener, addr) = listener().await;
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let config = Config::default().protocols(vec!["v2.chat".into(), "v1.chat".into()]);
        let ws = tether::accept_hdr(tcp, config, |req, accept| {
            assert_eq!(req.headers.get_str("x-token"), Some("abc"));
            assert_eq!(req.path(), "/room");
            assert_eq!(req.query(), Some("name=ann"));
            accept.headers.push(("X-Served-By".into(), "tether".into()));
            Ok(())
        })
        .await
        .unwrap();
        ws.protocol().map(str::to_owned)
    });
    let (_ws, response) = within(
        tether::ClientBuilder::new(&format!("ws://{addr}/room?name=ann"))
            .unwrap()
            .protocol("v1.chat")
            .protocol("v2.chat")
            .header("X-Token", "abc")
            .connect(),
    )
    .await
    .unwrap();
    // The client's order of preference wins among what the server supports.
    assert_eq!(response.protocol.as_deref(), Some("v1.chat"));
    assert_eq!(response.headers.get_str("x-served-by"), Some("tether"));
    assert_eq!(within(server).await.unwrap().as_deref(), Some("v1.chat"));
}

#[tokio::test]
async fn callback_refusal_reaches_the_client_with_its_status() {
    let (listener, addr) = listener().await;
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let result = tether::accept_hdr(tcp, Config::default(), |_, _| {
            Err(HandshakeError::Refused {
                status: 401,
                reason: "log in first".into(),
            })
        })
        .await;
        assert!(matches!(result, Err(Error::Handshake(_))));
    });
    let err = within(tether::connect(&url(addr))).await.unwrap_err();
    assert!(
        matches!(
            &err,
            Error::ClientHandshake(ClientHandshakeError::Status { status: 401, .. })
        ),
        "{err}"
    );
}

#[tokio::test]
async fn foreign_origin_is_refused_with_403() {
    let config = Config::default().allowed_origins(Some(vec!["https://app.example".into()]));
    let addr = echo_server(config).await;
    let (_tcp, head) = within(raw_exchange(
        addr,
        &request(addr, "Origin: https://evil.example\r\n"),
    ))
    .await;
    assert!(head.starts_with("HTTP/1.1 403 "), "{head}");
    let (_tcp, head) = within(raw_exchange(
        addr,
        &request(addr, "Origin: https://app.example\r\n"),
    ))
    .await;
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
}

#[tokio::test]
async fn bad_urls_are_clear_errors() {
    for bad in ["http://example.com/", "not a url", "ws://"] {
        let err = tether::ClientBuilder::new(bad).unwrap_err();
        assert!(matches!(err, Error::Url(_)), "{bad}: {err}");
    }
    // Nothing listens on this port (held, bound but not listening, so that nothing else
    // takes it meanwhile): a refused connection names where it went.
    let held = tokio::net::TcpSocket::new_v4().unwrap();
    held.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = held.local_addr().unwrap();
    let err = within(tether::connect(&url(addr))).await.unwrap_err();
    assert!(
        matches!(&err, Error::Connect { port, source, .. }
            if *port == addr.port() && source.kind() == std::io::ErrorKind::ConnectionRefused),
        "{err:?}"
    );
}

#[tokio::test]
async fn many_concurrent_clients_are_served() {
    let addr = echo_server(Config::default()).await;
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            tokio::spawn(async move {
                let (mut ws, _) = tether::connect(&url(addr)).await.unwrap();
                for j in 0..20 {
                    let text = format!("{i}-{j}");
                    ws.send(Message::text(text.clone())).await.unwrap();
                    assert_eq!(ws.recv().await.unwrap().unwrap(), Message::text(text));
                }
                ws.close(None).await.unwrap();
            })
        })
        .collect();
    for t in tasks {
        within(t).await.unwrap();
    }
}

/// A peer that completes the handshake by hand, then reads nothing and answers nothing.
async fn silent_server() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let (listener, addr) = listener().await;
    let task = tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tcp.read(&mut buf).await.unwrap();
        let req = String::from_utf8_lossy(&buf[..n]).to_string();
        let key = req
            .lines()
            .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
            .unwrap()
            .trim()
            .to_owned();
        let resp = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
            tether::proto::handshake::accept_key(key.as_bytes())
        );
        tcp.write_all(resp.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(tcp);
    });
    (addr, task)
}

#[tokio::test]
async fn split_close_ends_the_parked_receiver_within_the_close_timeout() {
    let (addr, peer) = silent_server().await;
    let config = Config::default().close_timeout(Duration::from_millis(300));
    let ws = within(ClientBuilderExt::connect_with_config(addr, config)).await;
    let (mut tx, mut rx) = ws.split();
    // The receiver is parked on a read when the sender closes.
    let receiver = tokio::spawn(async move {
        let started = std::time::Instant::now();
        while let Some(msg) = rx.recv().await {
            let _ = msg;
        }
        started.elapsed()
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    tx.close(None).await.unwrap();
    let waited = within(receiver).await.unwrap();
    assert!(waited < Duration::from_secs(3), "{waited:?}");
    // Sending after the end fails instead of hanging.
    let sent = within(tx.send(Message::text("late"))).await;
    assert!(sent.is_err());
    peer.abort();
}

#[tokio::test]
async fn a_sender_parked_on_a_full_socket_is_released_when_the_reader_ends() {
    let (addr, peer) = silent_server().await;
    let config = Config::default()
        .write_buffer_size(16 << 10)
        .ping_interval(Some(Duration::from_millis(100)))
        .ping_timeout(Duration::from_millis(300))
        .close_timeout(Duration::from_millis(300));
    let ws = within(ClientBuilderExt::connect_with_config(addr, config)).await;
    let (mut tx, mut rx) = ws.split();
    // The peer never reads, so the sender eventually parks on a full socket.
    let sender = tokio::spawn(async move {
        let chunk = vec![0u8; 64 << 10];
        loop {
            if tx.send(Message::binary(chunk.clone())).await.is_err() {
                return;
            }
        }
    });
    // The reader's keepalive gives up on the silent peer and ends the connection...
    let end = within(async {
        loop {
            match rx.recv().await {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Some(e),
                None => return None,
            }
        }
    })
    .await;
    assert!(matches!(end, Some(Error::KeepaliveTimeout)), "{end:?}");
    // ...and the parked sender is woken to find it closed.
    within(sender).await.unwrap();
    peer.abort();
}

/// Connecting with a config in one call.
struct ClientBuilderExt;

impl ClientBuilderExt {
    async fn connect_with_config(
        addr: std::net::SocketAddr,
        config: Config,
    ) -> tether::ClientStream {
        tether::ClientBuilder::new(&format!("ws://{addr}/"))
            .unwrap()
            .config(config)
            .connect()
            .await
            .unwrap()
            .0
    }
}

#[tokio::test]
async fn closing_toward_a_peer_that_never_reads_ends_with_close_timeout() {
    let (listener, addr) = listener().await;
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        // Completes the handshake, then reads nothing more.
        let _ws = tether::accept(tcp).await.unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    let config = Config::default().close_timeout(Duration::from_millis(300));
    let (ws, _) = within(
        tether::ClientBuilder::new(&url(addr))
            .unwrap()
            .config(config)
            .connect(),
    )
    .await
    .unwrap();
    let (mut sender, _receiver) = ws.split();
    // More than loopback's socket buffers can hold.
    within(sender.feed(Message::binary(vec![0u8; 64 << 20])))
        .await
        .unwrap();
    let err = within(sender.close(None)).await.unwrap_err();
    assert!(matches!(err, Error::CloseTimeout), "{err:?}");
}

#[tokio::test]
async fn a_peer_that_stops_reading_fails_writes_after_the_write_timeout() {
    let (addr, peer) = silent_server().await;
    let config = Config::default()
        .write_timeout(Some(Duration::from_millis(300)))
        .write_buffer_size(64 << 10);
    let ws = within(ClientBuilderExt::connect_with_config(addr, config)).await;
    let (mut tx, mut rx) = ws.split();
    let receiver = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some(msg) = rx.recv().await {
            seen.push(msg.map(|_| ()).map_err(|e| e.to_string()));
        }
        seen
    });
    // The kernel's buffers take the first megabytes; then every write waits, and 300 ms
    // after the peer last took anything the sender is told.
    let chunk = Message::binary(vec![0u8; 64 << 10]);
    let failed = within(async {
        loop {
            if let Err(e) = tx.send(chunk.clone()).await {
                break e;
            }
        }
    })
    .await;
    assert!(matches!(failed, Error::WriteTimeout), "{failed}");
    // The connection is over for the receiving half too: it is told why, once, and ends.
    let seen = within(receiver).await.unwrap();
    assert_eq!(
        seen,
        [Err(
            "the peer took nothing we wrote within the write timeout".to_owned()
        )]
    );
    assert!(tx.send(Message::text("late")).await.is_err());
    peer.abort();
}

/// An echo server that receives by lending (`poll_next_lent`); each connection reports how
/// its stream ended (`Ok(messages)` after `None`, or the error) on `ended`.
async fn lending_echo_server(
    config: Config,
) -> (
    std::net::SocketAddr,
    mpsc::UnboundedReceiver<Result<usize, String>>,
) {
    let (listener, addr) = listener().await;
    let (report, ended) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (config, report) = (config.clone(), report.clone());
            tokio::spawn(async move {
                let Ok(mut ws) = tether::accept_with_config(tcp, config).await else {
                    return;
                };
                let mut echoed = 0;
                let end = loop {
                    let lent = poll_fn(|cx| {
                        Pin::new(&mut ws).poll_next_lent(cx, |message, replies| {
                            replies.send(message).unwrap();
                        })
                    });
                    match lent.await {
                        Some(Ok(n)) => echoed += n,
                        Some(Err(e)) => break Err(e.to_string()),
                        None => break Ok(echoed),
                    }
                };
                let _ = report.send(end);
            });
        }
    });
    (addr, ended)
}

#[tokio::test]
async fn a_lending_receive_echoes_every_kind_of_message_and_ends_with_the_close() {
    for deflate in [false, true] {
        let config = Config::default().deflate(deflate.then(DeflateConfig::default));
        let (addr, mut ended) = lending_echo_server(config.clone()).await;
        let (mut ws, _) = within(
            tether::ClientBuilder::new(&url(addr))
                .unwrap()
                .config(config)
                .connect(),
        )
        .await
        .unwrap();
        // Every length form: small ones are lent from the read buffer, large ones arrive
        // over several reads and are assembled first.
        let mut sent = round_trip_every_length_form(&mut ws).await;
        // A burst, lent several per read and echoed in order.
        for i in 0..2000 {
            ws.feed(Message::text(format!("m{i}"))).await.unwrap();
        }
        ws.flush().await.unwrap();
        for i in 0..2000 {
            let msg = within(ws.recv()).await.unwrap().unwrap();
            assert_eq!(msg.as_text(), Some(format!("m{i}").as_str()));
        }
        sent += 2000;
        // A fragmented message is assembled, then lent whole.
        {
            let mut writer = ws.send_stream_text(3);
            writer.write_all(b"fragmented text").await.unwrap();
            writer.finish().await.unwrap();
        }
        assert_eq!(
            within(ws.recv()).await.unwrap().unwrap(),
            Message::text("fragmented text")
        );
        sent += 1;
        // Pings are answered by the core and not lent.
        ws.send(Message::Ping("are you there".into()))
            .await
            .unwrap();
        assert_eq!(
            within(ws.recv()).await.unwrap().unwrap(),
            Message::Pong("are you there".into())
        );
        within(ws.close(None)).await.unwrap();
        assert_eq!(
            within(ended.recv()).await,
            Some(Ok(sent)),
            "deflate {deflate}"
        );
    }
}

#[tokio::test]
async fn a_lending_receive_fails_invalid_text_with_1007() {
    let (addr, mut ended) = lending_echo_server(Config::default()).await;
    let mut tcp = within(raw_client(addr)).await;
    let mut frames = client_frame(0x1, b"fine");
    frames.extend(client_frame(0x1, &[b'o', b'k', 0xff]));
    frames.extend(client_frame(0x1, b"never seen"));
    tcp.write_all(&frames).await.unwrap();
    let (code, seen) = within(read_until_close(&mut tcp)).await.unwrap();
    assert_eq!(
        (code, seen),
        (1007, vec![0x1]),
        "the first message is echoed, then the close"
    );
    let end = within(ended.recv()).await.unwrap();
    assert!(end.as_ref().is_err_and(|e| e.contains("UTF-8")), "{end:?}");
}
