//! Micro-benchmarks of the protocol core's hot paths, by payload size: masking (the
//! word-at-a-time XOR against the byte loop), UTF-8 validation (streaming validator against
//! `std::str::from_utf8`), frame encode/decode through a client → server `Connection`, and
//! permessage-deflate compress/decompress of small JSON-like and 64 KiB messages.
//!
//! Run: `cargo bench -p tether-proto --bench codec` (throughput is reported per size).

#![allow(missing_docs)] // criterion_group! generates undocumented items.

use bytes::{Buf, Bytes, BytesMut};
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tether_proto::extension::deflate::{Deflate, DeflateConfig, DeflateParams};
use tether_proto::mask::{apply_mask, apply_mask_bytes};
use tether_proto::{Connection, Role, Utf8Bytes, Utf8Validator};

const SIZES: [usize; 4] = [16, 1024, 64 * 1024, 1024 * 1024];

fn mask(c: &mut Criterion) {
    let mut group = c.benchmark_group("mask");
    for size in SIZES {
        let mut data = vec![0x5au8; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("word", size), &size, |b, _| {
            b.iter(|| apply_mask(black_box(&mut data), [1, 2, 3, 4], 0))
        });
        group.bench_with_input(BenchmarkId::new("bytewise", size), &size, |b, _| {
            b.iter(|| apply_mask_bytes(black_box(&mut data), [1, 2, 3, 4]))
        });
    }
    group.finish();
}

fn text(size: usize) -> Vec<u8> {
    "Ünïcödé text — with ascii, κόσμε and 🚀 emoji. "
        .bytes()
        .cycle()
        .take(size)
        .collect::<Vec<_>>()
}

fn utf8(c: &mut Criterion) {
    let mut group = c.benchmark_group("utf8");
    for size in SIZES {
        let ascii = vec![b'a'; size];
        let mixed = text(size);
        group.throughput(Throughput::Bytes(size as u64));
        for (name, data) in [("ascii", &ascii), ("mixed", &mixed)] {
            group.bench_with_input(
                BenchmarkId::new(format!("streaming/{name}"), size),
                data,
                |b, d| {
                    b.iter(|| {
                        let mut v = Utf8Validator::new();
                        let _ = v.feed(black_box(d));
                        let _ = v.finish();
                    })
                },
            );
            group.bench_with_input(
                BenchmarkId::new(format!("std/{name}"), size),
                data,
                |b, d| b.iter(|| std::str::from_utf8(black_box(d)).is_ok()),
            );
        }
    }
    group.finish();
}

fn frame(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame");
    for size in SIZES {
        let payload = Bytes::from(vec![b'x'; size]);
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("encode/client", size), &payload, |b, p| {
            let mut client = Connection::new(Role::Client);
            b.iter(|| {
                client.send_binary(p.clone()).unwrap();
                let out = client.transmit();
                let n = out.remaining();
                out.advance(n);
            })
        });
        group.bench_with_input(BenchmarkId::new("encode/server", size), &payload, |b, p| {
            let mut server = Connection::new(Role::Server);
            b.iter(|| {
                server.send_binary(p.clone()).unwrap();
                let out = server.transmit();
                let n = out.remaining();
                out.advance(n);
            })
        });
        // A masked client text frame decoded (unmasked + validated) by a server.
        let mut client = Connection::new(Role::Client);
        client
            .send_text(Utf8Bytes::try_from_bytes(payload.clone()).unwrap())
            .unwrap();
        let out = client.transmit();
        let wire = out.copy_to_bytes(out.remaining());
        group.bench_with_input(BenchmarkId::new("decode/text", size), &wire, |b, w| {
            let mut server = Connection::new(Role::Server);
            let mut buf = BytesMut::with_capacity(w.len());
            b.iter(|| {
                buf.extend_from_slice(w);
                server.receive(&mut buf).unwrap();
                black_box(server.poll_event());
            })
        });
    }
    group.finish();
}

/// A chat-like JSON message of about `size` bytes.
fn json(size: usize, i: usize) -> Vec<u8> {
    let mut s = String::new();
    let mut n = i;
    while s.len() < size {
        s.push_str(&format!(
            r#"{{"type":"message","id":{n},"room":"lobby","user":"user{}","text":"hello there, message {n}","ts":"2026-11-22T21:{:02}:00Z"}},"#,
            n % 17,
            n % 60
        ));
        n += 1;
    }
    s.truncate(size);
    s.into_bytes()
}

fn deflate(c: &mut Criterion) {
    let mut group = c.benchmark_group("deflate");
    let config = DeflateConfig::default();
    for (name, size) in [("json-200B", 200usize), ("json-64KiB", 64 << 10)] {
        let messages: Vec<Vec<u8>> = (0..64).map(|i| json(size, i * 3)).collect();
        group.throughput(Throughput::Bytes(size as u64));
        for takeover in [true, false] {
            let params = DeflateParams {
                server_no_context_takeover: !takeover,
                ..DeflateParams::default()
            };
            let mode = if takeover { "takeover" } else { "no-takeover" };
            group.bench_function(BenchmarkId::new(format!("compress/{mode}"), name), |b| {
                let mut tx = Deflate::new(Role::Server, params, &config);
                let mut i = 0;
                b.iter(|| {
                    i = (i + 1) % messages.len();
                    black_box(tx.compress(&messages[i]))
                })
            });
            // Decompress a stream compressed with the same settings, message by message.
            let mut tx = Deflate::new(Role::Server, params, &config);
            let compressed: Vec<Bytes> = (0..2000)
                .map(|i| tx.compress(&messages[i % messages.len()]))
                .collect();
            group.bench_function(BenchmarkId::new(format!("decompress/{mode}"), name), |b| {
                let mut rx = Deflate::new(Role::Client, params, &config);
                let mut out = Vec::with_capacity(size + 64);
                let mut i = 0;
                b.iter(|| {
                    if i == compressed.len() {
                        rx = Deflate::new(Role::Client, params, &config);
                        i = 0;
                    }
                    out.clear();
                    rx.decompress_message(&compressed[i], &mut out, 1 << 20)
                        .unwrap();
                    i += 1;
                    black_box(out.len())
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, mask, utf8, frame, deflate);
criterion_main!(benches);
