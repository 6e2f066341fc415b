//! Fuzzes the frame decoder: the input, cut into pieces at fuzzer-chosen points, goes to a
//! server and to a client `Connection`. Whatever arrives, nothing panics; a failure has close
//! code 1002, 1007 or 1009, queues a Close with it as the last frame, and is sticky; text is
//! UTF-8; no message exceeds the limit; everything queued parses as this role's frames.
//!
//! Input: byte 0's low 3 bits say how many piece lengths follow (one byte each, cycled; none
//! means one piece); its bit 3 asks for small limits, read from the next two bytes; its bit 4
//! turns streaming on (data messages arrive frame by frame: their pieces, put together, obey the
//! same rules as a whole message); its bit 5 turns keepalive on. The rest is the stream.
//!
//! Time moves a second per byte of each piece, told to the connection after each piece; at
//! the end the transport closes: the connection ends cleanly or abnormally, wants the
//! transport closed, and runs no timer past the close timeout.

#![no_main]

use bytes::{Buf, BytesMut};
use libfuzzer_sys::fuzz_target;
use tether_proto::mask::apply_mask_bytes;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tether_proto::{
    Connection, Event, FrameHeader, Limits, OpCode, ProtocolError, Role, Settings, State, Timeouts,
};

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let (sizes, mut stream) = rest.split_at(usize::from(control & 0b111).min(rest.len()));
    let mut limits = Limits::default();
    if control & 0b1000 != 0 {
        if let [frame, message, tail @ ..] = stream {
            limits = limits
                .max_frame_size(usize::from(*frame))
                .max_message_size(usize::from(*message) * 4);
            stream = tail;
        }
    }
    let mut timeouts = Timeouts::default();
    if control & 0b10_0000 != 0 {
        timeouts = timeouts
            .ping_interval(Some(Duration::from_secs(3)))
            .pong_timeout(Duration::from_secs(5));
    }
    let settings = Arc::new(Settings::default().limits(limits).timeouts(timeouts));
    for role in [Role::Server, Role::Client] {
        let mut conn = Connection::with_settings(role, settings.clone());
        conn.set_mask_source(Box::new(|| [0x37, 0xfa, 0x21, 0x3d]));
        conn.set_streaming(control & 0b1_0000 != 0);
        run(&mut conn, stream, sizes);
    }
});

/// Feeds `stream` piece by piece as a driver would: parse, take events, write out.
fn run(conn: &mut Connection, mut stream: &[u8], sizes: &[u8]) {
    let mut pieces = sizes.iter().map(|&s| usize::from(s) + 1).cycle();
    let mut now = Instant::now();
    conn.handle_timeout(now);
    let mut buf = BytesMut::new();
    let mut closed = false;
    // The streamed message so far, and whether it is text.
    let mut streamed: Option<(bool, Vec<u8>)> = None;
    while !stream.is_empty() {
        let (piece, rest) =
            stream.split_at(pieces.next().unwrap_or(stream.len()).min(stream.len()));
        stream = rest;
        buf.extend_from_slice(piece);
        loop {
            let before = buf.len();
            let result = conn.receive(&mut buf);
            let mut progressed = buf.len() != before;
            while let Some(event) = conn.poll_event() {
                assert!(!closed, "an event after Close");
                check_event(&event, conn.limits().max_message_size);
                check_piece(&event, &mut streamed, conn.limits().max_frame_size);
                closed = matches!(event, Event::Close(_));
                progressed = true;
            }
            if let Err(err) = result {
                check_failure(conn, &err);
                end(conn, now);
                return;
            }
            // A partial header makes `wants_receive` say yes without progress: stop there.
            if !conn.wants_receive(&buf) || !progressed {
                break;
            }
        }
        now += Duration::from_secs(piece.len() as u64);
        conn.handle_timeout(now);
        written(conn);
    }
    end(conn, now);
}

/// The transport closes at `now`: whatever the state, the connection ends (cleanly only
/// after both Close frames), wants the transport closed, and its last timer is the close
/// handshake's.
fn end(conn: &mut Connection, now: Instant) {
    conn.receive_eof();
    assert_eq!(conn.state(), State::Closed);
    assert!(conn.should_close_transport());
    let clean = conn.close_received() && conn.error().is_none();
    assert!(clean || conn.error().is_some() || conn.abnormal().is_some());
    conn.handle_timeout(now);
    let later = now + Duration::from_secs(3600);
    conn.handle_timeout(later);
    assert!(conn.is_finished());
    assert_eq!(conn.poll_timeout(), None);
    written(conn);
}

fn check_event(event: &Event, max_message: usize) {
    match event {
        Event::Text(text) => {
            assert!(std::str::from_utf8(text.as_bytes()).is_ok());
            assert!(text.len() <= max_message);
        }
        Event::Binary(data) => assert!(data.len() <= max_message),
        Event::Ping(payload) | Event::Pong(payload) => assert!(payload.len() <= 125),
        _ => {}
    }
}

/// A streamed message's pieces: each within the frame limit (the fuzzer sends no compressed
/// data), of the message's kind, the first one first; put together, text is UTF-8.
fn check_piece(event: &Event, streamed: &mut Option<(bool, Vec<u8>)>, max_frame: usize) {
    let Event::Fragment { text, first, data, fin } = event else {
        assert!(
            !matches!(event, Event::Text(_) | Event::Binary(_)) || streamed.is_none(),
            "a whole message inside a streamed one"
        );
        return;
    };
    assert!(data.len() <= max_frame);
    assert_eq!(*first, streamed.is_none(), "the first piece comes first, once");
    let (kind, so_far) = streamed.get_or_insert_with(|| (*text, Vec::new()));
    assert_eq!(kind, text);
    so_far.extend_from_slice(data);
    if *fin {
        if *text {
            assert!(std::str::from_utf8(so_far).is_ok());
        }
        *streamed = None;
    }
}

fn check_failure(conn: &mut Connection, err: &ProtocolError) {
    let code = err.close_code().0;
    assert!(matches!(code, 1002 | 1007 | 1009), "{err} maps to {code}");
    let (last, payload) = written(conn).pop().expect("a Close is queued");
    assert_eq!(last.opcode, OpCode::Close);
    assert_eq!(payload, code.to_be_bytes());
    let mut more = BytesMut::from(&b"\x89\x80abcd\x89\x00"[..]);
    assert_eq!(conn.receive(&mut more).as_ref(), Err(err));
    assert!(conn.transmit().is_empty());
}

/// Takes everything queued, as a write would, and splits it into frames (payloads unmasked).
fn written(conn: &mut Connection) -> Vec<(FrameHeader, Vec<u8>)> {
    let out = conn.transmit();
    let wire = out.copy_to_bytes(out.remaining());
    let mut rest = &wire[..];
    let mut frames = Vec::new();
    while !rest.is_empty() {
        let (header, n) = FrameHeader::parse(rest).unwrap().expect("a whole header");
        assert_eq!(header.mask.is_some(), conn.role() == Role::Client);
        assert!(header.opcode.is_control() && header.payload_len <= 125);
        let end = n + header.payload_len as usize;
        let mut payload = rest[n..end].to_vec();
        if let Some(key) = header.mask {
            apply_mask_bytes(&mut payload, key);
        }
        frames.push((header, payload));
        rest = &rest[end..];
    }
    frames
}
