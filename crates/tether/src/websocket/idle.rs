//! A WebSocket at rest, taken away from the task that polled it ([`Idle`]).

use std::sync::Arc;

use bytes::BytesMut;
use tether_proto::{buffers, Connection};

use super::driver::{Extra, Inner, Phase};
use super::WebSocket;
use crate::config::Config;

/// A WebSocket at rest: open, nothing half-read in its buffer, nothing queued to write, no
/// task polling it. It holds its transport and the protocol's state (a message half received,
/// compression, keepalive) and nothing else: no timer, no waker, no buffer (168 bytes with a
/// plain `std::net::TcpStream`, against 224 for the whole `WebSocket`).
///
/// A server holding many quiet connections can keep each as an `Idle` instead of a task and a
/// registered socket, wait for their transports to become readable by other means (say, one
/// `epoll` set for all of them, with the transport turned into a plain
/// `std::net::TcpStream` by [`Idle::try_map_io`]), and [`Idle::resume`] the one that has
/// something to read. `tether echo` does so (`--park-after`). A connection must be resumed by
/// its [`Idle::deadline`] too, for its keepalive ping or pong timeout to run on time.
pub struct Idle<S> {
    io: S,
    conn: Connection,
    config: Arc<Config>,
    extra: Option<Box<Extra>>,
    protocol: Option<u8>,
    half_close: bool,
}

impl<S> WebSocket<S> {
    /// Takes the connection to rest, when it waits on its peer alone: open, its read buffer
    /// empty, nothing queued to write, no other task sharing it (not split or shared). The
    /// task that last polled it is woken, so that a future that held it sees it gone;
    /// otherwise the socket is given back unchanged.
    ///
    /// # Errors
    /// The socket itself, when it is not at rest.
    // The socket itself comes back when it is busy (as `Arc::try_unwrap` gives back the
    // `Arc`): boxing it would cost an allocation each time a busy socket is asked.
    #[allow(clippy::result_large_err)]
    pub fn into_idle(self) -> Result<Idle<S>, WebSocket<S>> {
        let inner = &self.inner;
        let at_rest = inner.phase == Phase::Running
            && inner.read_buf.is_empty()
            && inner.conn.is_at_rest()
            && inner
                .extra
                .as_ref()
                .is_none_or(|x| x.shared.is_none() && !x.write_stalled && x.error.is_none());
        if !at_rest {
            return Err(self);
        }
        let Inner {
            io,
            conn,
            read_buf,
            config,
            mut extra,
            timer: _,
            task,
            phase: _,
            protocol,
            half_close,
        } = self.inner;
        if read_buf.capacity() > 0 {
            buffers::give(read_buf);
        }
        // Timers belong to the runtime the task ran on; resuming makes them again.
        if let Some(extra) = &mut extra {
            extra.write_timer = None;
        }
        if let Some(task) = task {
            task.wake();
        }
        Ok(Idle {
            io,
            conn,
            config,
            extra,
            protocol,
            half_close,
        })
    }
}

impl<S> Idle<S> {
    /// When the connection must be resumed even if its peer sends nothing: its next keepalive
    /// ping, or the end of a pong's wait (`None` without keepalive).
    pub fn deadline(&self) -> Option<std::time::Instant> {
        self.conn.poll_timeout()
    }

    /// The transport.
    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// Puts the transport in another form (a registered socket into a plain one, and back):
    /// `f` must give the same byte stream.
    ///
    /// # Errors
    /// `f`'s error; the connection is dropped with its transport.
    pub fn try_map_io<T, E>(self, f: impl FnOnce(S) -> Result<T, E>) -> Result<Idle<T>, E> {
        Ok(Idle {
            io: f(self.io)?,
            conn: self.conn,
            config: self.config,
            extra: self.extra,
            protocol: self.protocol,
            half_close: self.half_close,
        })
    }

    /// The WebSocket again, to be polled by a task: it reads what arrived and runs any timer
    /// that came due meanwhile.
    pub fn resume(self) -> WebSocket<S> {
        WebSocket {
            inner: Inner {
                io: self.io,
                conn: self.conn,
                read_buf: BytesMut::new(),
                config: self.config,
                extra: self.extra,
                timer: None,
                task: None,
                phase: Phase::Running,
                protocol: self.protocol,
                half_close: self.half_close,
            },
        }
    }
}

impl<S> std::fmt::Debug for Idle<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idle")
            .field("connection", &self.conn)
            .field("deadline", &self.deadline())
            .finish_non_exhaustive()
    }
}
