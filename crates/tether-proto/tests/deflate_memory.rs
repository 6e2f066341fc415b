//! Memory of permessage-deflate per connection, measured with a counting allocator: the
//! compressor and the inflater after one message each way, for several window sizes. Prints
//! the figures and checks them against the bound documented on `DeflateConfig`.

#![allow(unsafe_code)] // a counting GlobalAlloc must implement an unsafe trait

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::{Buf, BytesMut};
use tether_proto::extension::deflate::{Deflate, DeflateConfig, DeflateParams};
use tether_proto::{Connection, Role};

/// Counts live heap bytes.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: same layout contract as our caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// A server connection that compressed one message and inflated one, kept alive.
fn exchanged(params: DeflateParams) -> Connection {
    let config = DeflateConfig::default();
    let message = br#"{"type":"message","id":1,"room":"lobby","user":"ann","text":"hello, this is a chat message"}"#.repeat(4);
    let mut client = Connection::new(Role::Client);
    client.set_deflate(Deflate::new(Role::Client, params, &config));
    client.send_binary(message.clone().into()).unwrap();
    let out = client.transmit();
    let mut wire = BytesMut::from(out.copy_to_bytes(out.remaining()).as_ref());
    drop(client);

    let mut server = Connection::new(Role::Server);
    server.set_deflate(Deflate::new(Role::Server, params, &config));
    server.receive(&mut wire).unwrap();
    drop(server.poll_event());
    server.send_binary(message.into()).unwrap();
    let out = server.transmit();
    let n = out.remaining();
    // Written out: the write buffer goes back to the thread's stock.
    out.advance(n);
    server
}

/// Live bytes held per connection by `count` connections after one message each way.
fn per_connection(params: DeflateParams, count: usize) -> usize {
    drop(exchanged(params)); // warm this thread's codec pool
    let before = LIVE.load(Ordering::Relaxed);
    let conns: Vec<Connection> = (0..count).map(|_| exchanged(params)).collect();
    let held = LIVE.load(Ordering::Relaxed).saturating_sub(before);
    drop(conns);
    held / count
}

#[test]
fn deflate_memory_per_connection_is_bounded() {
    for bits in [9u8, 12, 15] {
        let params = DeflateParams {
            server_max_window_bits: Some(bits),
            client_max_window_bits: Some(bits),
            ..DeflateParams::default()
        };
        let held = per_connection(params, 4);
        println!(
            "context takeover, window {bits:>2} bits: {held} B ({} KiB) per connection",
            held / 1024
        );
        // Documented: compressor 243 KiB + 2^(w+2), inflater 46 KiB; 16 KiB of slack for the
        // connection's own state.
        let bound = (243 << 10) + (1 << (bits + 2)) + (47 << 10) + (16 << 10);
        assert!(held <= bound, "{held} > {bound} for {bits} bits");
    }
    let pooled = DeflateParams {
        server_no_context_takeover: true,
        client_no_context_takeover: true,
        ..DeflateParams::default()
    };
    let held = per_connection(pooled, 50);
    println!("no context takeover (pooled codecs): {held} B per idle connection");
    assert!(held <= 1024, "{held} B per idle connection");
}
