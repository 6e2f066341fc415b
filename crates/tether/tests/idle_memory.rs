//! Memory of idle server connections, counted by a global allocator on the server's thread
//! (the clients run on another).
//!
//! An idle `WebSocket` owns no heap memory: what a server holds per idle connection is the
//! `WebSocket` value itself plus what tokio allocates for any socket. The tests hold many
//! connections, after the handshake and again after a message each way, and compare them with
//! plain `TcpStream`s. Run with `--nocapture` for the figures.

#![allow(unsafe_code)] // a counting GlobalAlloc must implement an unsafe trait

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{mpsc, Arc, Barrier};
use std::task::Poll;

use futures_util::StreamExt;
use tether::{Config, Message, WebSocket};
use tokio::net::{TcpListener, TcpStream};

/// Counts, per thread, the heap bytes and allocations a thread allocates minus those it
/// frees. Each test's server runs on a thread of its own, so tests may run in parallel.
struct Counting;

thread_local! {
    // Const-initialised, without destructors: usable inside the allocator.
    static LIVE_BYTES: Cell<isize> = const { Cell::new(0) };
    static LIVE_ALLOCS: Cell<isize> = const { Cell::new(0) };
}

fn count(bytes: isize, allocs: isize) {
    LIVE_BYTES.with(|b| b.set(b.get() + bytes));
    LIVE_ALLOCS.with(|a| a.set(a.get() + allocs));
}

// SAFETY: every call is forwarded to the system allocator unchanged; only counters are added.
// (The default `realloc` goes through `alloc` and `dealloc`, so it is counted too.)
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same layout contract as our caller's.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            count(layout.size() as isize, 1);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(-(layout.size() as isize), -1);
        // SAFETY: `ptr` came from `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Connections held per measurement (two sockets each in this process).
const CONNECTIONS: usize = 300;

/// The most a `WebSocket` may add to the size of its transport: with the transport, it is
/// most of what a server holds per idle connection (it added 576 bytes to a 32-byte
/// `TcpStream`; it adds 224, of which 16 are keepalive's timer and state, kept inline so that
/// a connection with keepalive on allocates nothing else for it).
const MAX_WEBSOCKET_ADDED: usize = 224;

/// Live heap bytes and allocations.
#[derive(Debug, Clone, Copy)]
struct Live {
    bytes: isize,
    allocs: isize,
}

/// This thread's count.
fn live() -> Live {
    Live {
        bytes: LIVE_BYTES.with(Cell::get),
        allocs: LIVE_ALLOCS.with(Cell::get),
    }
}

/// What the server thread allocated per connection while taking `CONNECTIONS` of them.
#[derive(Debug, Clone, Copy)]
struct PerConnection {
    bytes: f64,
    allocs: f64,
}

fn per_connection(before: Live, after: Live) -> PerConnection {
    PerConnection {
        bytes: (after.bytes - before.bytes) as f64 / CONNECTIONS as f64,
        allocs: (after.allocs - before.allocs) as f64 / CONNECTIONS as f64,
    }
}

/// Runs `server` on a thread of its own (a current-thread runtime) with a bound
/// listener, and `client` on this thread with the listener's address. `server` gets a
/// barrier to wait on before it returns, which the client passes once it has done its part
/// (its sockets stay open until then).
fn measure<S, F, C, G>(server: S, client: C) -> F::Output
where
    S: FnOnce(TcpListener, Arc<Barrier>) -> F + Send + 'static,
    F: Future + 'static,
    F::Output: Send + 'static,
    C: FnOnce(SocketAddr) -> G,
    G: Future<Output = Vec<Box<dyn Send>>>,
{
    let barrier = Arc::new(Barrier::new(2));
    let (addr_tx, addr_rx) = mpsc::channel();
    let server_barrier = barrier.clone();
    let server = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            addr_tx.send(listener.local_addr().unwrap()).unwrap();
            server(listener, server_barrier).await
        })
    });
    let addr = addr_rx.recv().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let held = rt.block_on(client(addr));
    barrier.wait();
    let result = server.join().unwrap();
    drop(held);
    result
}

/// Opens `CONNECTIONS` WebSockets (plus one to warm up with), and with `echo` then sends one
/// message on each and reads its echo.
async fn websocket_clients(addr: SocketAddr, echo: bool) -> Vec<Box<dyn Send>> {
    let url = format!("ws://{addr}/");
    let mut held: Vec<Box<dyn Send>> = Vec::new();
    for _ in 0..=CONNECTIONS {
        let (mut ws, _) = tether::connect(&url).await.unwrap();
        if echo {
            ws.send(Message::text("hello")).await.unwrap();
            assert_eq!(ws.recv().await.unwrap().unwrap(), Message::text("hello"));
        }
        held.push(Box::new(ws));
    }
    held
}

/// Accepts one connection and brings it to idle; with `echo` after echoing one message.
async fn accept_idle(
    listener: &TcpListener,
    config: &Arc<Config>,
    echo: bool,
) -> WebSocket<TcpStream> {
    let (tcp, _) = listener.accept().await.unwrap();
    let mut ws = tether::accept_with_config(tcp, config.clone())
        .await
        .unwrap();
    if echo {
        let msg = ws.recv().await.unwrap().unwrap();
        ws.send(msg).await.unwrap();
    }
    // The read that finds nothing to read, from this task: from here on the connection is
    // idle. (A poll from another task, or with another waker, would make the connection keep
    // wakers for two tasks.)
    let polled = std::future::poll_fn(|cx| Poll::Ready(ws.poll_next_unpin(cx))).await;
    assert!(polled.is_pending(), "the connection is idle");
    ws
}

/// What a server thread holds per idle WebSocket kept in a `Vec`, and per `TcpStream`.
fn held_in_a_vec(echo: bool) -> (PerConnection, PerConnection) {
    let websockets = measure(
        move |listener, done| async move {
            let config = Arc::new(Config::default());
            let warm = accept_idle(&listener, &config, echo).await;
            let mut held = Vec::with_capacity(CONNECTIONS);
            let before = live();
            for _ in 0..CONNECTIONS {
                held.push(accept_idle(&listener, &config, echo).await);
            }
            let after = live();
            done.wait();
            drop((warm, held));
            per_connection(before, after)
        },
        move |addr| websocket_clients(addr, echo),
    );
    let sockets = measure(
        |listener, done| async move {
            let warm = listener.accept().await.unwrap();
            let mut held = Vec::with_capacity(CONNECTIONS);
            let before = live();
            for _ in 0..CONNECTIONS {
                held.push(listener.accept().await.unwrap());
            }
            let after = live();
            done.wait();
            drop((warm, held));
            per_connection(before, after)
        },
        |addr| async move {
            let mut held: Vec<Box<dyn Send>> = Vec::new();
            for _ in 0..=CONNECTIONS {
                held.push(Box::new(TcpStream::connect(addr).await.unwrap()));
            }
            held
        },
    );
    (websockets, sockets)
}

fn assert_no_heap_of_its_own(echo: bool) {
    let (ws, tcp) = held_in_a_vec(echo);
    let inline = std::mem::size_of::<WebSocket<TcpStream>>();
    println!(
        "idle {} WebSocket: {inline} B inline + {:.1} B in {:.2} allocations on the heap; \
         a TcpStream alone: {:.1} B in {:.2} allocations",
        if echo {
            "(after an echo)"
        } else {
            "(after the handshake)"
        },
        ws.bytes,
        ws.allocs,
        tcp.bytes,
        tcp.allocs
    );
    // Anything the library kept per connection (a buffer, a waker's Arc, a timer) would be at
    // least one allocation per connection; tokio's own for the socket are in both figures.
    assert!(
        ws.allocs - tcp.allocs < 0.05,
        "an idle WebSocket holds {:.2} allocations of its own",
        ws.allocs - tcp.allocs
    );
    assert!(
        ws.bytes - tcp.bytes < 8.0,
        "an idle WebSocket holds {:.1} heap bytes of its own",
        ws.bytes - tcp.bytes
    );
}

#[test]
fn an_idle_websocket_holds_no_heap_memory_after_the_handshake() {
    assert_no_heap_of_its_own(false);
}

#[test]
fn an_idle_websocket_holds_no_heap_memory_after_a_message_each_way() {
    assert_no_heap_of_its_own(true);
}

#[test]
fn a_websocket_adds_little_to_its_transport() {
    let added = std::mem::size_of::<WebSocket<TcpStream>>() - std::mem::size_of::<TcpStream>();
    assert!(
        added <= MAX_WEBSOCKET_ADDED,
        "a WebSocket adds {added} bytes to its transport"
    );
    let conn = std::mem::size_of::<tether::proto::Connection>();
    assert!(conn <= 144, "Connection takes {conn} bytes");
}

/// A server as most are written: a task per connection, the handshake boxed, then a `recv`
/// and `feed` loop.
async fn echo_task(tcp: TcpStream, config: Arc<Config>) {
    let Ok(mut ws) = Box::pin(tether::accept_with_config(tcp, config)).await else {
        return;
    };
    loop {
        let msg = match ws.recv().await {
            Some(Ok(msg)) => msg,
            _ => break,
        };
        if msg.is_data() && ws.feed(msg).await.is_err() {
            break;
        }
    }
}

/// The live heap per idle connection of [`echo_task`] is the task (tokio's header and the
/// future, which holds the `WebSocket`) and tokio's state for the socket, nothing else: 768
/// bytes, where it was 1,336 in three allocations. The future is 376 bytes (392 in a debug
/// build); tokio rounds a task up to a multiple of 128 bytes, and one more step would fail.
#[test]
fn an_idle_echo_task_costs_two_allocations_and_less_than_800_bytes() {
    let per = measure(
        |listener, done| async move {
            let config = Arc::new(Config::default());
            // One connection to warm up with, then the measured ones: the first measured
            // connection arrives once the warm one has echoed its message and gone idle.
            let (tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(echo_task(tcp, config.clone()));
            let (tcp, _) = listener.accept().await.unwrap();
            let before = live();
            tokio::spawn(echo_task(tcp, config.clone()));
            for _ in 1..CONNECTIONS {
                let (tcp, _) = listener.accept().await.unwrap();
                tokio::spawn(echo_task(tcp, config.clone()));
            }
            // A last plain connection arrives once every echo was read: on one thread each
            // task then already waits for its next message, with nothing half done.
            let (_last, _) = listener.accept().await.unwrap();
            let after = live();
            done.wait();
            per_connection(before, after)
        },
        |addr| async move {
            let mut held = websocket_clients(addr, true).await;
            held.push(Box::new(TcpStream::connect(addr).await.unwrap()));
            held
        },
    );
    let task = {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let tcp = TcpStream::connect(listener.local_addr().unwrap())
                .await
                .unwrap();
            std::mem::size_of_val(&echo_task(tcp, Arc::new(Config::default())))
        })
    };
    println!(
        "an idle echo task ({task} B future): {:.1} B in {:.2} allocations per connection",
        per.bytes, per.allocs
    );
    assert!(
        per.allocs < 2.05,
        "{:.2} allocations per idle connection",
        per.allocs
    );
    assert!(
        per.bytes < 900.0,
        "{:.1} heap bytes per idle connection",
        per.bytes
    );
}

/// Accepts one connection to warm up with and then `CONNECTIONS` more, brings each to the
/// state `setup` leaves it in, and returns what the measured ones hold.
async fn hold_each<T, F>(
    listener: TcpListener,
    done: Arc<Barrier>,
    setup: impl Fn(TcpStream) -> F,
) -> PerConnection
where
    F: Future<Output = T>,
{
    let mut held = Vec::with_capacity(CONNECTIONS + 1);
    let mut before = live();
    for i in 0..=CONNECTIONS {
        let (tcp, _) = listener.accept().await.unwrap();
        held.push(setup(tcp).await);
        if i == 0 {
            before = live();
        }
    }
    let after = live();
    done.wait();
    drop(held);
    per_connection(before, after)
}

/// A peer that announces a large frame and sends little of it makes the connection reserve
/// room for what it has sent, not for what it announced: a connection can read a large frame
/// into one allocation, but a header alone is not a licence to allocate megabytes.
#[test]
fn a_frame_header_alone_reserves_little_of_the_length_it_announces() {
    const ANNOUNCED: u64 = 15 << 20; // under the default 16 MiB frame limit
    const SENT: usize = 1_000;
    let per = measure(
        |listener, done| {
            hold_each(listener, done, |tcp| async move {
                let mut ws = tether::accept(tcp).await.unwrap();
                // The handshake, the header and the first bytes were written at once: one
                // poll reads them all and waits for the rest of the frame.
                let polled = std::future::poll_fn(|cx| Poll::Ready(ws.poll_next_unpin(cx))).await;
                assert!(polled.is_pending(), "the frame is incomplete");
                ws
            })
        },
        |addr| async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut wire = b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
                Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                Sec-WebSocket-Version: 13\r\n\r\n"
                .to_vec();
            wire.extend_from_slice(&[0x82, 0x80 | 127]);
            wire.extend_from_slice(&ANNOUNCED.to_be_bytes());
            wire.extend_from_slice(&[1, 2, 3, 4]);
            wire.extend_from_slice(&[0; SENT]);
            let mut held: Vec<Box<dyn Send>> = Vec::new();
            for _ in 0..=CONNECTIONS {
                let mut tcp = TcpStream::connect(addr).await.unwrap();
                tcp.write_all(&wire).await.unwrap();
                let mut response = [0u8; 12];
                tcp.read_exact(&mut response).await.unwrap();
                assert_eq!(&response, b"HTTP/1.1 101");
                held.push(Box::new(tcp));
            }
            held
        },
    );
    println!(
        "a {ANNOUNCED}-byte frame header with {SENT} bytes: {:.0} B per connection",
        per.bytes
    );
    // A 16 KiB chunk to read into, plus tokio's socket state.
    assert!(
        per.bytes < 20_000.0,
        "{:.0} heap bytes per connection for a frame barely begun",
        per.bytes
    );
}

/// A sending half that has flushed keeps no write buffer while its receiving half waits: the
/// buffer goes back for other connections to use.
#[test]
fn a_split_connection_that_sent_and_waits_keeps_no_write_buffer() {
    let per = measure(
        |listener, done| {
            hold_each(listener, done, |tcp| async move {
                let (mut tx, mut rx) = tether::accept(tcp).await.unwrap().split();
                let polled = std::future::poll_fn(|cx| Poll::Ready(rx.poll_next_unpin(cx))).await;
                assert!(polled.is_pending(), "nothing to read");
                tx.send(Message::text("hello")).await.unwrap();
                (tx, rx)
            })
        },
        |addr| async move {
            let url = format!("ws://{addr}/");
            let mut held: Vec<Box<dyn Send>> = Vec::new();
            for _ in 0..=CONNECTIONS {
                let (mut ws, _) = tether::connect(&url).await.unwrap();
                assert_eq!(ws.recv().await.unwrap().unwrap(), Message::text("hello"));
                held.push(Box::new(ws));
            }
            held
        },
    );
    println!(
        "a split connection after a send: {:.0} B in {:.2} allocations per connection",
        per.bytes, per.allocs
    );
    // The halves' shared state and wakers, and tokio's socket state; a kept 16 KiB write
    // buffer would be far above this.
    assert!(
        per.bytes < 2_048.0,
        "{:.0} heap bytes per split connection that sent and waits",
        per.bytes
    );
}

/// A client that sent a large message (copied into its write buffer to be masked) and then
/// waits keeps no write buffer of that size.
#[test]
fn a_client_that_sent_a_large_message_and_waits_keeps_no_write_buffer() {
    const SIZE: usize = 64 << 10;
    let per = measure(
        // Here the measured side is the WebSocket client, over connections it accepted.
        |listener, done| {
            hold_each(listener, done, |tcp| async move {
                let request = tether::proto::handshake::client::ClientRequest::new("x", "/");
                let (mut ws, _) = tether::client(tcp, request, Config::default())
                    .await
                    .unwrap();
                ws.send(Message::binary(vec![9u8; SIZE])).await.unwrap();
                let polled = std::future::poll_fn(|cx| Poll::Ready(ws.poll_next_unpin(cx))).await;
                assert!(polled.is_pending(), "nothing to read");
                ws
            })
        },
        |addr| async move {
            let mut held: Vec<Box<dyn Send>> = Vec::new();
            for _ in 0..=CONNECTIONS {
                let tcp = TcpStream::connect(addr).await.unwrap();
                let mut ws = tether::accept(tcp).await.unwrap();
                let msg = ws.recv().await.unwrap().unwrap();
                assert_eq!(msg, Message::binary(vec![9u8; SIZE]));
                held.push(Box::new(ws));
            }
            held
        },
    );
    println!(
        "a client after sending {SIZE} B: {:.0} B in {:.2} allocations per connection",
        per.bytes, per.allocs
    );
    assert!(
        per.bytes < 2_048.0,
        "{:.0} heap bytes per idle client that sent {SIZE} bytes",
        per.bytes
    );
}

/// A connection set aside ([`tether::Idle`]) is its protocol state and its transport, without
/// the driver's buffer, timer and waker: what a server holding many quiet ones keeps for each.
#[test]
fn a_websocket_set_aside_is_its_state_and_its_transport() {
    let idle = std::mem::size_of::<tether::Idle<std::net::TcpStream>>();
    let whole = std::mem::size_of::<WebSocket<std::net::TcpStream>>();
    println!("set aside: {idle} bytes; the whole WebSocket: {whole}");
    assert!(idle <= 168, "an idle connection takes {idle} bytes");
    assert!(idle + 48 <= whole, "{idle} set aside, {whole} whole");
}
