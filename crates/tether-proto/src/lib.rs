//! # tether-proto
//!
//! A sans-IO WebSocket (RFC 6455) protocol core: bytes in, events out; messages in, bytes out.
//! No sockets, no clock (the time is passed in), no async runtime — drive it from tokio (the `tether` crate does),
//! from a test with a byte slice, or from a fuzzer.
//!
//! - [`handshake`]: the HTTP/1.1 upgrade, both roles ([`handshake::server::Request`],
//!   [`handshake::client::ClientRequest`]).
//! - [`Connection`]: frames, masking, fragmentation, UTF-8, the close handshake, with every
//!   protocol violation mapped to its close code ([`ProtocolError::close_code`]).
//!
//! ```
//! use bytes::{Buf, BytesMut};
//! use tether_proto::{Connection, Event, Role, CloseCode, CloseFrame};
//!
//! let mut client = Connection::new(Role::Client);
//! let mut server = Connection::new(Role::Server);
//!
//! // Carry whatever one side queued to the other, as a socket would.
//! fn carry(from: &mut Connection, to: &mut Connection) {
//!     let out = from.transmit();
//!     let mut wire = BytesMut::from(out.copy_to_bytes(out.remaining()).as_ref());
//!     to.receive(&mut wire).unwrap();
//! }
//!
//! client.send_text("hello".into()).unwrap();
//! carry(&mut client, &mut server);
//! while let Some(event) = server.poll_event() {
//!     if let Event::Text(text) = event {
//!         server.send_text(text).unwrap(); // echo
//!     }
//! }
//! carry(&mut server, &mut client);
//! assert_eq!(client.poll_event(), Some(Event::Text("hello".into())));
//!
//! client.send_close(Some(CloseFrame::new(CloseCode::NORMAL, "bye"))).unwrap();
//! carry(&mut client, &mut server);
//! assert!(matches!(server.poll_event(), Some(Event::Close(Some(f))) if f.code == CloseCode::NORMAL));
//! carry(&mut server, &mut client); // the echo
//! assert_eq!(client.state(), tether_proto::State::Closed);
//! ```

#![deny(unsafe_code)]

pub mod buffers;
pub mod close;
pub mod config;
pub mod connection;
pub mod error;
pub mod extension;
pub mod frame;
pub mod handshake;
pub mod mask;
pub mod prepared;
pub mod transmit;
pub mod utf8;

pub use bytes;
pub use close::{CloseCode, CloseFrame};
pub use config::{Limits, Settings, Timeouts};
pub use connection::{Abnormal, Connection, Event, Lent, MaskSource, Role, State};
pub use error::{ProtocolError, SendError};
pub use frame::{FrameHeader, OpCode};
pub use prepared::Prepared;
pub use transmit::Transmit;
pub use utf8::{InvalidUtf8, Utf8Bytes, Utf8Validator};
