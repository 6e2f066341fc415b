//! Micro-benchmarks of the protocol core's hot paths, by payload size: masking (the
//! word-at-a-time XOR against the byte loop), UTF-8 validation (streaming validator against
//! `std::str::from_utf8`), and frame encode/decode through a client → server `Connection`.
//!
//! Run: `cargo bench -p tether-proto --bench codec` (throughput is reported per size).

#![allow(missing_docs)] // criterion_group! generates undocumented items.

use bytes::{Buf, Bytes, BytesMut};
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
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

criterion_group!(benches, mask, utf8, frame);
criterion_main!(benches);
