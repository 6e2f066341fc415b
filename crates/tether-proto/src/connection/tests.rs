use super::*;
use crate::close::CloseCode;
use crate::frame::{RSV1, RSV2};

/// Encodes one raw frame as the given sender would put it on the wire.
fn raw(opcode: u8, fin: bool, rsv: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = vec![(u8::from(fin) << 7) | (rsv << 4) | opcode];
    let m = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n @ 0..=125 => out.push(m | n as u8),
        n @ 126..=0xffff => {
            out.push(m | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(m | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let mut body = payload.to_vec();
    if let Some(key) = mask {
        out.extend_from_slice(&key);
        crate::mask::apply_mask_bytes(&mut body, key);
    }
    out.extend_from_slice(&body);
    out
}

/// A frame from a client (masked).
fn from_client(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    raw(opcode, fin, 0, payload, Some([0x11, 0x22, 0x33, 0x44]))
}

thread_local! {
    /// Events `feed` collected, per connection (by address), until `events` takes them.
    static FED: std::cell::RefCell<std::collections::HashMap<usize, Vec<Event>>> = Default::default();
}

fn key(conn: &Connection) -> usize {
    conn as *const Connection as usize
}

/// Feeds `bytes` and parses all of them, as a driver does between reads.
fn feed(conn: &mut Connection, bytes: &[u8]) -> Result<(), ProtocolError> {
    let mut buf = BytesMut::from(bytes);
    let mut events = Vec::new();
    let result = loop {
        if let Err(e) = conn.receive(&mut buf) {
            break Err(e);
        }
        events.extend(std::iter::from_fn(|| conn.poll_event()));
        if !conn.wants_receive(&buf) {
            break Ok(());
        }
    };
    FED.with_borrow_mut(|fed| fed.entry(key(conn)).or_default().extend(events));
    result
}

/// The events `feed` collected, then any the connection still holds.
fn events(conn: &mut Connection) -> Vec<Event> {
    let mut all = FED.with_borrow_mut(|fed| fed.remove(&key(conn)).unwrap_or_default());
    all.extend(std::iter::from_fn(|| conn.poll_event()));
    all
}

fn drain(conn: &mut Connection) -> Vec<u8> {
    let out = conn.transmit();
    out.copy_to_bytes(out.remaining()).to_vec()
}

/// The close code of the Close frame `conn` queued.
fn queued_close_code(conn: &mut Connection) -> Option<u16> {
    let bytes = drain(conn);
    let (h, n) = FrameHeader::parse(&bytes).unwrap()?;
    assert_eq!(h.opcode, OpCode::Close);
    let mut payload = bytes[n..].to_vec();
    if let Some(key) = h.mask {
        crate::mask::apply_mask_bytes(&mut payload, key);
    }
    Some(u16::from_be_bytes([payload[0], payload[1]]))
}

fn server() -> Connection {
    Connection::new(Role::Server)
}

fn expect_failure(bytes: &[u8], code: CloseCode) {
    let mut s = server();
    let err = feed(&mut s, bytes).unwrap_err();
    assert_eq!(err.close_code(), code, "{err}");
    assert_eq!(queued_close_code(&mut s), Some(code.0));
    assert_eq!(s.state(), State::Closed);
    // The failure is sticky.
    assert_eq!(
        feed(&mut s, &from_client(0x1, true, b"x")).unwrap_err(),
        err
    );
}

#[test]
fn client_and_server_round_trip_text_and_binary() {
    let mut c = Connection::new(Role::Client);
    let mut s = server();
    c.send_text("héllo".into()).unwrap();
    c.send_binary(Bytes::from(vec![7u8; 70_000])).unwrap();
    feed(&mut s, &drain(&mut c)).unwrap();
    assert_eq!(
        events(&mut s),
        vec![
            Event::Text("héllo".into()),
            Event::Binary(Bytes::from(vec![7u8; 70_000]))
        ]
    );
    s.send_binary(Bytes::from_static(b"\x00\x01")).unwrap();
    feed(&mut c, &drain(&mut s)).unwrap();
    assert_eq!(
        events(&mut c),
        vec![Event::Binary(Bytes::from_static(b"\x00\x01"))]
    );
}

#[test]
fn byte_at_a_time_delivery_gives_the_same_events() {
    let mut wire = from_client(0x1, false, "frag".as_bytes());
    wire.extend(from_client(0x9, true, b"p"));
    wire.extend(from_client(0x0, true, "ment ✓".as_bytes()));
    wire.extend(from_client(0x2, true, &[1, 2, 3]));
    let mut s = server();
    let mut buf = BytesMut::new();
    let mut seen = Vec::new();
    for byte in wire {
        buf.extend_from_slice(&[byte]);
        s.receive(&mut buf).unwrap();
        seen.extend(events(&mut s));
    }
    assert_eq!(
        seen,
        vec![
            Event::Ping(Bytes::from_static(b"p")),
            Event::Text("fragment ✓".into()),
            Event::Binary(Bytes::from_static(&[1, 2, 3])),
        ]
    );
}

#[test]
fn ping_is_answered_with_pong_carrying_its_payload() {
    let mut s = server();
    feed(&mut s, &from_client(0x9, true, b"are you there")).unwrap();
    assert_eq!(drain(&mut s), raw(0xa, true, 0, b"are you there", None));
}

#[test]
fn server_rejects_unmasked_client_frame() {
    expect_failure(&raw(0x1, true, 0, b"hi", None), CloseCode::PROTOCOL_ERROR);
}

#[test]
fn client_rejects_masked_server_frame() {
    let mut c = Connection::new(Role::Client);
    let err = feed(&mut c, &raw(0x1, true, 0, b"hi", Some([1, 2, 3, 4]))).unwrap_err();
    assert_eq!(err, ProtocolError::MaskedFrame);
    assert_eq!(queued_close_code(&mut c), Some(1002));
}

#[test]
fn reserved_bits_and_opcodes_fail_with_1002() {
    expect_failure(
        &raw(0x1, true, RSV1, b"x", Some([1, 2, 3, 4])),
        CloseCode::PROTOCOL_ERROR,
    );
    expect_failure(
        &raw(0x1, true, RSV2, b"x", Some([1, 2, 3, 4])),
        CloseCode::PROTOCOL_ERROR,
    );
    expect_failure(&from_client(0x3, true, b""), CloseCode::PROTOCOL_ERROR);
    expect_failure(&from_client(0xb, true, b""), CloseCode::PROTOCOL_ERROR);
}

#[test]
fn control_frames_must_be_short_and_final() {
    expect_failure(
        &from_client(0x9, true, &[0u8; 126]),
        CloseCode::PROTOCOL_ERROR,
    );
    expect_failure(&from_client(0x9, false, b"x"), CloseCode::PROTOCOL_ERROR);
}

#[test]
fn fragmentation_order_is_enforced() {
    expect_failure(&from_client(0x0, true, b"x"), CloseCode::PROTOCOL_ERROR);
    let mut wire = from_client(0x1, false, b"a");
    wire.extend(from_client(0x1, true, b"b"));
    expect_failure(&wire, CloseCode::PROTOCOL_ERROR);
}

#[test]
fn invalid_utf8_fails_fast_inside_an_incomplete_frame() {
    let mut s = server();
    let mut payload = b"valid".to_vec();
    payload.extend_from_slice(&[0xf4, 0x90, 0x80, 0x80]);
    payload.extend_from_slice(&[b'a'; 100]);
    let wire = from_client(0x1, true, &payload);
    // Everything up to the bad code point, but not the whole frame.
    let err = feed(&mut s, &wire[..6 + 5 + 4]).unwrap_err();
    assert_eq!(err.close_code(), CloseCode::INVALID_PAYLOAD);
}

#[test]
fn invalid_utf8_split_across_fragments_fails_with_1007() {
    let mut wire = from_client(0x1, false, &[b'a', 0xe2, 0x82]);
    wire.extend(from_client(0x0, true, &[0x28]));
    expect_failure(&wire, CloseCode::INVALID_PAYLOAD);
    // A message that ends inside a code point.
    expect_failure(
        &from_client(0x1, true, &[b'a', 0xe2, 0x82]),
        CloseCode::INVALID_PAYLOAD,
    );
}

#[test]
fn oversized_frame_fails_at_its_header_with_1009() {
    let mut s = Connection::with_limits(Role::Server, Limits::default().max_frame_size(1000));
    // Only the header of a 2000-byte frame has arrived.
    let wire = from_client(0x2, true, &[0u8; 2000]);
    let err = feed(&mut s, &wire[..8]).unwrap_err();
    assert_eq!(err.close_code(), CloseCode::MESSAGE_TOO_BIG);
}

#[test]
fn oversized_message_across_fragments_fails_with_1009() {
    let limits = Limits::default().max_message_size(100);
    let mut s = Connection::with_limits(Role::Server, limits);
    let mut wire = from_client(0x2, false, &[0u8; 60]);
    wire.extend(from_client(0x0, true, &[0u8; 60]));
    let err = feed(&mut s, &wire).unwrap_err();
    assert_eq!(err, ProtocolError::MessageTooLarge { limit: 100 });
}

#[test]
fn endless_empty_continuations_fail_with_1009_at_the_fragment_limit() {
    let limits = Limits::default().max_message_fragments(4);
    let mut s = Connection::with_limits(Role::Server, limits.clone());
    // Four frames (the first and three continuations) are within the limit, and each
    // message counts afresh.
    let mut wire = from_client(0x1, false, b"a");
    for _ in 0..2 {
        wire.extend(from_client(0x0, false, b""));
    }
    wire.extend(from_client(0x0, true, b"b"));
    for _ in 0..2 {
        feed(&mut s, &wire).unwrap();
        assert_eq!(events(&mut s), vec![Event::Text("ab".into())]);
    }

    // A fifth frame of the same message fails, however small.
    let mut s = Connection::with_limits(Role::Server, limits);
    let mut wire = from_client(0x2, false, b"");
    for _ in 0..4 {
        wire.extend(from_client(0x0, false, b""));
    }
    let err = feed(&mut s, &wire).unwrap_err();
    assert_eq!(err, ProtocolError::TooManyFragments { limit: 4 });
    assert_eq!(err.close_code(), CloseCode::MESSAGE_TOO_BIG);
    assert_eq!(queued_close_code(&mut s), Some(1009));
}

#[test]
fn close_is_echoed_with_its_code_and_ends_the_connection() {
    let mut s = server();
    feed(&mut s, &from_client(0x8, true, b"\x0b\xb8custom")).unwrap();
    assert_eq!(
        events(&mut s),
        vec![Event::Close(Some(CloseFrame::new(
            CloseCode(3000),
            "custom"
        )))]
    );
    assert_eq!(queued_close_code(&mut s), Some(3000));
    assert_eq!(s.state(), State::Closed);
    assert_eq!(s.send_text("late".into()), Err(SendError::Closed));
    // Anything after the Close is ignored.
    feed(&mut s, &from_client(0x1, true, b"ignored")).unwrap();
    assert!(events(&mut s).is_empty());
}

#[test]
fn empty_close_is_echoed_empty() {
    let mut s = server();
    feed(&mut s, &from_client(0x8, true, b"")).unwrap();
    assert_eq!(events(&mut s), vec![Event::Close(None)]);
    assert_eq!(drain(&mut s), raw(0x8, true, 0, b"", None));
}

#[test]
fn bad_close_payloads_fail_with_the_right_code() {
    expect_failure(&from_client(0x8, true, b"\x03"), CloseCode::PROTOCOL_ERROR);
    expect_failure(
        &from_client(0x8, true, b"\x03\xed"),
        CloseCode::PROTOCOL_ERROR,
    );
    expect_failure(
        &from_client(0x8, true, b"\x03\xe7"),
        CloseCode::PROTOCOL_ERROR,
    );
    expect_failure(
        &from_client(0x8, true, b"\x03\xe8\xff"),
        CloseCode::INVALID_PAYLOAD,
    );
}

#[test]
fn locally_started_close_waits_for_the_peer() {
    let mut c = Connection::new(Role::Client);
    let mut s = server();
    c.send_close(Some(CloseFrame::new(CloseCode::GOING_AWAY, "bye")))
        .unwrap();
    assert_eq!(c.state(), State::Closing);
    assert_eq!(c.send_ping(Bytes::new()), Err(SendError::Closed));
    feed(&mut s, &drain(&mut c)).unwrap();
    assert_eq!(s.state(), State::Closed);
    feed(&mut c, &drain(&mut s)).unwrap();
    assert_eq!(c.state(), State::Closed);
    assert!(
        matches!(&events(&mut c)[..], [Event::Close(Some(f))] if f.code == CloseCode::GOING_AWAY)
    );
}

#[test]
fn ping_after_our_close_is_still_answered() {
    let mut s = server();
    s.send_close(Some(CloseFrame::new(CloseCode::NORMAL, "")))
        .unwrap();
    drain(&mut s);
    feed(&mut s, &from_client(0x9, true, b"still there?")).unwrap();
    assert_eq!(drain(&mut s), raw(0xa, true, 0, b"still there?", None));
    // But no data after our Close.
    assert_eq!(s.send_text("late".into()), Err(SendError::Closed));
    assert_eq!(s.send_ping(Bytes::new()), Err(SendError::Closed));
}

#[test]
fn small_payloads_do_not_pin_the_read_buffer() {
    let mut s = server();
    let mut buf = BytesMut::with_capacity(1 << 20);
    buf.extend_from_slice(&from_client(0x2, true, b"tiny"));
    s.receive(&mut buf).unwrap();
    let Some(Event::Binary(payload)) = s.poll_event() else {
        panic!("no message")
    };
    // A copy: the read buffer keeps its capacity and is not shared.
    assert!(
        buf.try_reclaim(1 << 19),
        "the read buffer is still shared with the payload"
    );
    assert_eq!(&payload[..], b"tiny");
}

#[test]
fn send_rejects_misuse_without_harm() {
    let mut s = server();
    assert_eq!(
        s.send_ping(Bytes::from(vec![0; 126])),
        Err(SendError::ControlTooLong(126))
    );
    assert_eq!(
        s.send_close(Some(CloseFrame::new(CloseCode::NO_STATUS, ""))),
        Err(SendError::InvalidCloseCode(1005))
    );
    assert_eq!(
        s.send_fragment(OpCode::Continuation, Bytes::new(), true),
        Err(SendError::FragmentOrder)
    );
    s.send_fragment(OpCode::Text, Bytes::from_static(b"a"), false)
        .unwrap();
    assert_eq!(s.send_text("x".into()), Err(SendError::FragmentOrder));
    s.send_fragment(OpCode::Continuation, Bytes::from_static(b"b"), true)
        .unwrap();
    assert_eq!(s.state(), State::Open);
}

#[test]
fn fixed_mask_source_makes_client_output_deterministic() {
    let mut c = Connection::new(Role::Client);
    c.set_mask_source(Box::new(|| [0x37, 0xfa, 0x21, 0x3d]));
    c.send_text("Hello".into()).unwrap();
    // RFC 6455 §5.7: a single-frame masked text message.
    assert_eq!(
        drain(&mut c),
        [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58]
    );
}

#[test]
fn sixty_four_bit_length_frame_round_trips() {
    let mut c = Connection::new(Role::Client);
    let mut s = server();
    let big = Bytes::from(vec![b'z'; 70_000]);
    c.send_text(Utf8Bytes::try_from_bytes(big.clone()).unwrap())
        .unwrap();
    let wire = drain(&mut c);
    assert_eq!(wire[1] & 0x7f, 127);
    feed(&mut s, &wire).unwrap();
    assert_eq!(
        events(&mut s),
        vec![Event::Text(Utf8Bytes::try_from_bytes(big).unwrap())]
    );
}

#[test]
fn receive_stops_at_each_event_so_earlier_messages_are_answered_first() {
    // A valid message, then a frame with a reserved bit, in one read (Autobahn 3.2).
    let mut wire = from_client(0x1, true, b"first");
    wire.extend(raw(0x1, true, RSV2, b"bad", Some([1, 2, 3, 4])));
    let mut s = server();
    let mut buf = BytesMut::from(&wire[..]);
    s.receive(&mut buf).unwrap();
    assert_eq!(s.poll_event(), Some(Event::Text("first".into())));
    s.send_text("first".into()).unwrap();
    assert!(s.wants_receive(&buf));
    assert_eq!(s.receive(&mut buf), Err(ProtocolError::ReservedBits(RSV2)));
    // The echo went out before the Close.
    let out = drain(&mut s);
    assert_eq!(&out[..7], &raw(0x1, true, 0, b"first", None)[..]);
    assert_eq!(out[7], 0x88);
}

#[test]
fn an_idle_connection_is_small() {
    // Most of what a server holds per idle connection; it was 296 bytes, then 136 before it
    // took over the timers (whose settings it shares with other connections).
    assert!(std::mem::size_of::<Connection>() <= 144);
}

#[test]
fn a_fragmented_message_leaves_nothing_boxed_behind() {
    let mut server = Connection::new(Role::Server);
    assert!(server.extras.is_none());
    feed(&mut server, &from_client(0x1, false, b"hel")).unwrap();
    assert!(server.extras.is_some(), "the first fragment is kept");
    feed(&mut server, &from_client(0x0, true, b"lo")).unwrap();
    assert_eq!(events(&mut server), vec![Event::Text("hello".into())]);
    assert!(server.extras.is_none());
}

#[test]
fn frame_missing_counts_what_the_partial_frame_still_needs() {
    let mut s = server();
    let wire = from_client(0x2, true, &[5u8; 70_000]);
    // Header (2 + 8 + 4 mask bytes) and the first 1,000 payload bytes.
    let mut buf = BytesMut::from(&wire[..14 + 1_000]);
    assert_eq!(s.frame_missing(&buf), 0, "no header parsed yet");
    s.receive(&mut buf).unwrap();
    assert_eq!(s.frame_missing(&buf), 69_000);
    buf.extend_from_slice(&wire[14 + 1_000..14 + 50_000]);
    assert_eq!(s.frame_missing(&buf), 20_000);
    buf.extend_from_slice(&wire[14 + 50_000..]);
    s.receive(&mut buf).unwrap();
    assert_eq!(s.frame_missing(&buf), 0, "between frames");
    assert_eq!(
        s.poll_event(),
        Some(Event::Binary(Bytes::from(vec![5u8; 70_000])))
    );
}

#[test]
fn a_streamed_message_arrives_frame_by_frame_with_its_utf8_checked() {
    let mut s = server();
    s.set_streaming(true);
    // "é" is C3 A9: split across the first two frames; a ping in the middle.
    let mut wire = from_client(0x1, false, b"caf\xc3");
    wire.extend(from_client(0x9, true, b"p"));
    wire.extend(from_client(0x0, false, b"\xa9 au"));
    wire.extend(from_client(0x0, true, b" lait"));
    feed(&mut s, &wire).unwrap();
    let piece = |data: &'static [u8], first, fin| Event::Fragment {
        text: true,
        first,
        data: Bytes::from_static(data),
        fin,
    };
    assert_eq!(
        events(&mut s),
        [
            piece(b"caf\xc3", true, false),
            Event::Ping(Bytes::from_static(b"p")),
            piece(b"\xa9 au", false, false),
            piece(b" lait", false, true),
        ]
    );
    // Nothing of the message was kept aside.
    assert!(s.extras.is_none());

    // Turned off, the next message arrives whole again.
    s.set_streaming(false);
    let mut wire = from_client(0x2, false, b"ab");
    wire.extend(from_client(0x0, true, b"cd"));
    feed(&mut s, &wire).unwrap();
    assert_eq!(events(&mut s), [Event::Binary(Bytes::from_static(b"abcd"))]);
}

#[test]
fn a_streamed_message_keeps_its_limits_and_its_utf8_rule() {
    // Invalid UTF-8 fails as soon as it arrives, with 1007.
    let mut s = server();
    s.set_streaming(true);
    let err = feed(&mut s, &from_client(0x1, false, b"ok\xff")).unwrap_err();
    assert_eq!(err.close_code(), CloseCode::INVALID_PAYLOAD);
    // A text message that ends inside a code point: its pieces came, its end does not.
    let mut s = server();
    s.set_streaming(true);
    let mut wire = from_client(0x1, false, b"ok");
    wire.extend(from_client(0x0, true, b"\xc3"));
    let err = feed(&mut s, &wire).unwrap_err();
    assert_eq!(err.close_code(), CloseCode::INVALID_PAYLOAD);
    assert_eq!(
        events(&mut s),
        [Event::Fragment {
            text: true,
            first: true,
            data: Bytes::from_static(b"ok"),
            fin: false
        }]
    );
    // The message size limit counts every frame, streamed or not.
    let mut s = Connection::with_limits(Role::Server, Limits::default().max_message_size(5));
    s.set_streaming(true);
    let mut wire = from_client(0x2, false, b"abc");
    wire.extend(from_client(0x0, true, b"def"));
    let err = feed(&mut s, &wire).unwrap_err();
    assert_eq!(err.close_code(), CloseCode::MESSAGE_TOO_BIG);
}

/// Reads `wire` as a driver does, `reserve_read` before each read and a read filling what
/// room there is: returns how many reads it took, the messages received, and the largest
/// capacity the read buffer had.
fn read_like_a_driver(conn: &mut Connection, mut wire: &[u8]) -> (usize, usize, usize) {
    let mut buf = BytesMut::new();
    let (mut reads, mut messages, mut largest) = (0, 0, 0);
    while !wire.is_empty() {
        conn.reserve_read(&mut buf);
        largest = largest.max(buf.capacity());
        let n = (buf.capacity() - buf.len()).min(wire.len());
        buf.extend_from_slice(&wire[..n]);
        wire = &wire[n..];
        reads += 1;
        loop {
            conn.receive(&mut buf).unwrap();
            while let Some(event) = conn.poll_event() {
                if matches!(event, Event::Binary(_) | Event::Text(_)) {
                    messages += 1;
                }
            }
            if !conn.wants_receive(&buf) {
                break;
            }
        }
        if buf.is_empty() {
            // A driver gives an empty buffer back while it waits.
            buf = BytesMut::new();
        }
    }
    (reads, messages, largest)
}

#[test]
fn a_stream_of_large_frames_is_read_several_frames_at_a_time() {
    let frame = from_client(0x2, true, &vec![7; 64 << 10]);
    let stream: Vec<u8> = (0..16).flat_map(|_| frame.iter().copied()).collect();
    let (reads, messages, largest) = read_like_a_driver(&mut server(), &stream);
    assert_eq!(messages, 16);
    // Each frame alone would take two reads (a buffer, then the rest); once one large frame
    // came, a full buffer makes room for four more.
    assert!(reads <= 16 / 2, "{reads} reads for 16 frames");
    assert!(
        largest <= 4 * (frame.len() + 64) + crate::buffers::BUFFER,
        "{largest}"
    );
}

#[test]
fn after_a_large_frame_a_trickle_gets_a_buffer_not_room_for_large_frames() {
    let mut conn = server();
    let frame = from_client(0x2, true, &vec![7; 256 << 10]);
    let (_, messages, _) = read_like_a_driver(&mut conn, &frame);
    assert_eq!(messages, 1);
    // Small frames after it, a few bytes per read: the buffer stays a buffer.
    let small = from_client(0x1, true, b"hi");
    let mut buf = BytesMut::new();
    for byte in small.iter().chain(small.iter()) {
        conn.reserve_read(&mut buf);
        assert!(
            buf.capacity() <= crate::buffers::BUFFER,
            "{}",
            buf.capacity()
        );
        buf.extend_from_slice(&[*byte]);
        conn.receive(&mut buf).unwrap();
    }
    // And a large frame's first bytes, a buffer's worth at a time, are read into at most
    // the room for one frame of the size it announced past what came.
    let mut conn = server();
    let (_, _, _) = read_like_a_driver(&mut conn, &from_client(0x2, true, &vec![1; 64 << 10]));
    let announced = from_client(0x2, true, &vec![1; 2 << 20]);
    let mut buf = BytesMut::new();
    conn.reserve_read(&mut buf);
    let n = buf.capacity();
    buf.extend_from_slice(&announced[..n]);
    conn.receive(&mut buf).unwrap();
    conn.reserve_read(&mut buf);
    assert!(
        buf.capacity() <= (1 << 20) + crate::buffers::BUFFER,
        "{}",
        buf.capacity()
    );
}
