//! Messages as streams over real loopback sockets: written in fragments as their bytes come,
//! read frame by frame as they arrive, with both halves of a split socket; a writer abandoned
//! mid-message; and a 1 GiB message through a receiver whose heap stays within a few MiB,
//! counted by a global allocator on the receiver's thread.

#![allow(unsafe_code)] // a counting GlobalAlloc must implement an unsafe trait

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use common::*;
use tether::{CloseCode, Config, Incoming, Message};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Counts, per thread, the heap bytes a thread holds (what it allocated minus what it freed)
/// and the most it held.
struct Counting;

thread_local! {
    // Const-initialised, without destructors: usable inside the allocator.
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn count(bytes: isize) {
    LIVE.with(|live| {
        let now = live.get() + bytes;
        live.set(now);
        PEAK.with(|peak| peak.set(peak.get().max(now)));
    });
}

// SAFETY: every call is forwarded to the system allocator unchanged; only counters are added.
// (The default `realloc` goes through `alloc` and `dealloc`, so it is counted too.)
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size() as isize);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(-(layout.size() as isize));
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// A server on its own thread that runs `serve` on the first connection it accepts, with
/// `config`; returns its address and the thread, which yields what `serve` returns and the
/// most heap the thread held above what it held once the connection was open.
fn server<T: Send + 'static, F>(
    config: Config,
    serve: impl FnOnce(tether::WebSocket<tokio::net::TcpStream>) -> F + Send + 'static,
) -> (std::net::SocketAddr, std::thread::JoinHandle<(T, isize)>)
where
    F: std::future::Future<Output = T>,
{
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let (tcp, _) = listener.accept().await.unwrap();
            let ws = tether::accept_with_config(tcp, config).await.unwrap();
            let base = LIVE.with(Cell::get);
            PEAK.with(|peak| peak.set(base));
            let result = serve(ws).await;
            (result, PEAK.with(Cell::get) - base)
        })
    });
    (addr, thread)
}

/// A client of `addr` with the default configuration.
async fn connect(addr: std::net::SocketAddr) -> tether::ClientStream {
    let url = format!("ws://{addr}/");
    tether::connect(&url).await.unwrap().0
}

#[tokio::test]
async fn a_message_is_written_in_fragments_and_read_as_it_arrives() {
    let (addr, server) = server(Config::default(), |mut ws| async move {
        // A streamed message, then a whole one, then a ping's pong comes whole too.
        let Some(Ok(Incoming::Stream(mut reader))) = ws.recv_stream().await else {
            panic!("expected a streamed message");
        };
        assert!(reader.is_text());
        let mut pieces = Vec::new();
        while let Some(piece) = reader.chunk().await {
            pieces.push(piece.unwrap());
        }
        let next = ws.recv().await.unwrap().unwrap();
        (pieces, next)
    });
    let mut ws = within(connect(addr)).await;
    let mut writer = ws.send_stream_text(4);
    // "é" split between two writes.
    for part in [&b"caf\xc3"[..], b"\xa9 ", b"au lait"] {
        writer.write_all(part).await.unwrap();
        writer.flush().await.unwrap();
    }
    writer.finish().await.unwrap();
    drop(writer);
    ws.send(Message::text("whole")).await.unwrap();
    let ((pieces, next), _) = server.join().unwrap();
    assert!(pieces.len() >= 3, "{pieces:?}");
    assert_eq!(pieces.concat(), "café au lait".as_bytes());
    assert_eq!(next, Message::text("whole"));
}

#[tokio::test]
async fn split_halves_stream_too_and_read_through_async_read() {
    let (addr, server) = server(Config::default(), |ws| async move {
        let (mut tx, mut rx) = ws.split();
        let Some(Ok(Incoming::Stream(mut reader))) = rx.recv_stream().await else {
            panic!("expected a streamed message");
        };
        let mut all = Vec::new();
        reader.read_to_end(&mut all).await.unwrap();
        // Answer with a stream of its own, from the sending half.
        let mut writer = tx.send_stream_binary(1000);
        writer.write_all(&all).await.unwrap();
        writer.shutdown().await.unwrap();
        drop(writer);
        let _ = rx.recv().await;
    });
    let ws = within(connect(addr)).await;
    let (mut tx, mut rx) = ws.split();
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let mut writer = tx.send_stream_binary(16 << 10);
    writer.write_all(&data).await.unwrap();
    writer.shutdown().await.unwrap();
    drop(writer);
    // The echo arrives in fragments of 1,000 bytes: read whole, it is the same bytes.
    let echoed = within(rx.recv()).await.unwrap().unwrap();
    assert_eq!(echoed, Message::binary(data));
    tx.close(None).await.unwrap();
    server.join().unwrap();
}

#[tokio::test]
async fn a_writer_dropped_mid_message_closes_the_connection_with_1011() {
    let (addr, server) = server(Config::default(), |mut ws| async move {
        let Some(Ok(Incoming::Stream(mut reader))) = ws.recv_stream().await else {
            panic!("expected a streamed message");
        };
        assert_eq!(reader.chunk().await.unwrap().unwrap(), "part"[..]);
        // The Close comes before the end of the message: the reader says so.
        let cut = reader.chunk().await.unwrap().unwrap_err();
        drop(reader);
        // The echo of the Close goes out as the connection ends.
        assert!(ws.recv().await.is_none());
        cut.to_string()
    });
    let mut ws = within(connect(addr)).await;
    let mut writer = ws.send_stream_binary(4);
    writer.write_all(b"part").await.unwrap();
    writer.flush().await.unwrap();
    drop(writer);
    let closed = within(ws.recv()).await;
    assert!(
        matches!(&closed, Some(Ok(Message::Close(Some(f)))) if f.code == CloseCode::INTERNAL_ERROR),
        "{closed:?}"
    );
    let (said, _) = server.join().unwrap();
    assert!(said.contains("in the middle of a message"), "{said}");
}

#[tokio::test]
async fn a_gibibyte_passes_through_a_receiver_holding_a_few_mebibytes() {
    const TOTAL: u64 = 1 << 30;
    const FRAME: usize = 256 << 10;
    let config = Config::default()
        .max_message_size(usize::MAX)
        .max_frame_size(FRAME)
        .max_message_fragments(u32::MAX);
    let (addr, server) = server(config, |mut ws| async move {
        let Some(Ok(Incoming::Stream(mut reader))) = ws.recv_stream().await else {
            panic!("expected a streamed message");
        };
        // Read as a proxy would: each piece passed on (here, summed) and let go.
        let (mut bytes, mut sum) = (0u64, 0u64);
        while let Some(piece) = reader.chunk().await {
            let piece = piece.unwrap();
            bytes += piece.len() as u64;
            sum = piece.iter().fold(sum, |s, &b| s.wrapping_add(u64::from(b)));
        }
        drop(reader);
        // Then the client closes.
        while let Some(message) = ws.recv().await {
            assert!(matches!(message.unwrap(), Message::Close(_)));
        }
        (bytes, sum)
    });
    let mut ws = within(connect(addr)).await;
    let block: Vec<u8> = (0..FRAME).map(|i| (i % 253) as u8).collect();
    let block_sum = block.iter().map(|&b| u64::from(b)).sum::<u64>();
    let mut writer = ws.send_stream_binary(FRAME);
    let mut sent = 0;
    while sent < TOTAL {
        writer.write_all(&block).await.unwrap();
        sent += FRAME as u64;
    }
    writer.finish().await.unwrap();
    drop(writer);
    ws.close(None).await.unwrap();
    let ((bytes, sum), peak) = tokio::task::spawn_blocking(move || server.join().unwrap())
        .await
        .unwrap();
    assert_eq!(bytes, TOTAL);
    assert_eq!(sum, block_sum * (TOTAL / FRAME as u64));
    println!("receiving 1 GiB held at most {} KiB of heap", peak >> 10);
    assert!(peak < 4 << 20, "the receiver held {peak} bytes at once");
}
