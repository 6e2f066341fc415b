//! A socket other threads write to directly (`SharedWebSocket`, `DirectWriter`), over real
//! loopback sockets: writes from a plain thread while the owner waits to read, a peer that
//! stops reading (the writer declines, the owner flushes what it left), and a closed socket.

mod common;

use common::{listener, within};
use tether::{CloseCode, DirectSend, Message, Prepared};

/// A server socket made shareable, and the client connected to it.
async fn pair() -> (
    tether::SharedWebSocket<tokio::net::TcpStream>,
    tether::ClientStream,
) {
    let (listener, addr) = listener().await;
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        tether::accept(tcp).await.unwrap()
    });
    let (client, _) = within(tether::connect(&format!("ws://{addr}/")))
        .await
        .unwrap();
    let server = within(server).await.unwrap();
    (server.into_shared(), client)
}

#[tokio::test]
async fn a_writer_on_another_thread_writes_while_the_owner_waits_to_read() {
    let (mut ws, mut client) = pair().await;
    let writer = ws.writer();
    // The owner waits to read, as a session does between events.
    let owner = tokio::spawn(async move {
        let first = ws.recv().await;
        (ws, first)
    });
    // The owner is waiting (it has polled once and let the socket go) before the thread
    // writes: a write while the owner's poll holds the socket is declined, by design.
    tokio::task::yield_now().await;
    let thread = std::thread::spawn(move || {
        let mut outcomes = Vec::new();
        for batch in 0..10 {
            let msgs: Vec<Prepared> = (0..10)
                .map(|i| Prepared::text(format!("{}", batch * 10 + i)))
                .collect();
            outcomes.push(writer.try_send(msgs.iter()));
        }
        outcomes
    });
    for i in 0..100 {
        let msg = within(client.recv()).await.unwrap().unwrap();
        assert_eq!(msg, Message::text(format!("{i}")));
    }
    // Loopback takes a hundred small frames at once: every batch went out from the thread.
    assert_eq!(thread.join().unwrap(), [DirectSend::Written; 10]);
    // Reading was not disturbed.
    client.send(Message::text("hello")).await.unwrap();
    let (mut ws, first) = within(owner).await.unwrap();
    assert_eq!(first.unwrap().unwrap(), Message::text("hello"));
    ws.feed(Message::text("bye")).await.unwrap();
    within(ws.flush()).await.unwrap();
    assert_eq!(
        within(client.recv()).await.unwrap().unwrap(),
        Message::text("bye")
    );
}

#[tokio::test]
async fn a_writer_declines_while_bytes_wait_and_the_owner_flushes_what_it_left() {
    let (mut ws, mut client) = pair().await;
    let writer = ws.writer();
    let chunk = Prepared::binary(vec![7u8; 256 << 10]);
    // The client reads nothing: loopback's buffers fill, and the write that finds them full
    // leaves its bytes queued.
    let mut sent = 0;
    let outcome = loop {
        match writer.try_send([&chunk]) {
            DirectSend::Written => sent += 1,
            other => break other,
        }
        assert!(sent < 1000, "loopback took 256 MiB");
    };
    assert_eq!(outcome, DirectSend::Queued);
    sent += 1;
    assert!(ws.queued_len() > 0);
    // With bytes waiting, a write from elsewhere would overtake them or steal the owner's
    // wake-up: declined, nothing queued.
    let queued = ws.queued_len();
    assert_eq!(writer.try_send([&chunk]), DirectSend::Declined);
    assert_eq!(ws.queued_len(), queued);
    let reader = tokio::spawn(async move {
        for _ in 0..sent {
            let msg = client.recv().await.unwrap().unwrap();
            assert!(matches!(msg, Message::Binary(b) if b.len() == 256 << 10));
        }
        client
    });
    within(ws.flush()).await.unwrap();
    assert_eq!(ws.queued_len(), 0);
    let mut client = within(reader).await.unwrap();
    // Drained: direct writes go out again.
    assert_eq!(
        writer.try_send([&Prepared::text("after")]),
        DirectSend::Written
    );
    assert_eq!(
        within(client.recv()).await.unwrap().unwrap(),
        Message::text("after")
    );
}

#[tokio::test]
async fn a_closing_socket_declines_direct_writes() {
    let (mut ws, mut client) = pair().await;
    let writer = ws.writer();
    let closing = tokio::spawn(async move {
        ws.close(None).await.unwrap();
        ws
    });
    let msg = within(client.recv()).await.unwrap().unwrap();
    assert!(matches!(msg, Message::Close(Some(f)) if f.code == CloseCode::NORMAL));
    assert!(within(client.recv()).await.is_none());
    let _ws = within(closing).await.unwrap();
    assert_eq!(
        writer.try_send([&Prepared::text("late")]),
        DirectSend::Declined
    );
}
