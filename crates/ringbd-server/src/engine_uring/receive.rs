//! The receive path: each connection's multishot receive into the ring's
//! provided buffers, the backlog of buffers it has not consumed yet, and
//! spilling that backlog into its own memory so that no connection holds
//! the shared buffers past a loop turn.

use std::io;
use std::os::fd::AsFd;

use ringbd_io::uring::{is_cancelled, is_out_of_buffers, RecvBufs, Ring};

use super::{Conn, Local, State};
use crate::out::OutBuf;

/// The default for `--receive-share`: the most bytes one arming of a
/// connection's receive takes from its socket (where the kernel honours
/// the limit, `Features::recv_limit`; it ends up to one buffer past it),
/// before the connection must consume them and arm again. It is how much
/// of the ring's buffers one connection can fill in a burst, and what a
/// connection that stops taking input can hold (spilled into its own
/// memory: docs/engine.md, "Resource model"); the rest waits in the
/// kernel's socket buffer. Each arming costs a ring enter: measured here
/// with 1 MiB TCP writes, 256 KiB took 4 enters per write and 70% more
/// server CPU than no limit, 1 MiB about 25% more; 1 MiB is 32 receive
/// buffers and 37,000 request headers.
pub const RECV_SHARE: u32 = 1024 * 1024;

impl State {
    pub(super) fn received(
        &mut self,
        ring: &mut Ring<OutBuf>,
        id: u32,
        result: io::Result<RecvBufs>,
        more: bool,
    ) {
        let Some(Some(c)) = self.conns.get_mut(id as usize) else {
            // Not ours any more: give the buffers back.
            if let Ok(b) = result {
                b.bufs.into_iter().for_each(|p| ring.recycle(p));
            }
            return;
        };
        if !more {
            c.recv_armed = false;
            c.cancel_sent = false;
        }
        c.dirty = true;
        match result {
            Ok(b) if b.len == 0 => {
                b.bufs.into_iter().for_each(|p| ring.recycle(p));
                c.conn.peer_closed();
            }
            Ok(b) => {
                c.backlog.extend(b.bufs);
                c.consume_backlog(ring, &mut self.local);
                if !c.backlog.is_empty() && c.recv_armed && !c.cancel_sent {
                    // Backpressure: stop receiving until the replies drain.
                    if ring.cancel_recv(id).is_ok() {
                        c.cancel_sent = true;
                    }
                }
            }
            // Out of receive buffers (re-armed in flush) or cancelled.
            Err(e) if is_out_of_buffers(&e) || is_cancelled(&e) => {}
            // kTLS: a record that is not application data (close_notify:
            // like end of stream), or a record the kernel refused.
            Err(e) if c.conn.is_ktls() => {
                if !c.conn.ktls_recv_error(c.stream.as_fd(), &e) {
                    c.broken = true;
                }
            }
            // The peer reset the connection: it went away, as with end of
            // stream (a TLS client that closes with our last records
            // unread resets it after its NBD_CMD_DISC and close_notify).
            // Not the server's failure: no warning, as the threaded engine.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ECONNRESET | libc::ECONNABORTED)) => {
                tracing::debug!("{}: receive: {e}; the peer is gone", c.stream.peer());
                c.conn.peer_closed();
                c.broken = true;
            }
            Err(e) => {
                c.conn.peer_closed();
                c.end(format_args!("receive: {e}"));
            }
        }
    }
}

impl Conn {
    /// Whether received bytes wait to be consumed.
    pub(super) fn has_backlog(&self) -> bool {
        self.spill_at < self.spill.len() || !self.backlog.is_empty()
    }

    /// Feeds the spilled bytes, then the backlog buffers, to the connection
    /// while it takes input, returning fully consumed buffers to the ring.
    pub(super) fn consume_backlog(&mut self, ring: &mut Ring<OutBuf>, local: &mut Local) {
        let before = self.conn.stats.requests;
        while self.spill_at < self.spill.len() && self.conn.wants_input() {
            let used = self.conn.receive(&self.spill[self.spill_at..]);
            self.spill_at += used;
            if used == 0 || self.conn.is_closed() {
                break;
            }
        }
        if self.spill_at == self.spill.len() || self.conn.is_closed() {
            self.spill.clear();
            self.spill_at = 0;
            if self.spill.capacity() > RECV_SHARE as usize {
                self.spill = Vec::new();
            }
        }
        while self.spill.is_empty() && !self.backlog.is_empty() {
            if !self.conn.wants_input() {
                break;
            }
            let used = self.conn.receive(ring.buffer(&self.backlog[0]));
            let piece = &mut self.backlog[0];
            piece.advance(used);
            if !piece.is_empty() {
                if self.conn.is_closed() {
                    // Nothing after DISC or a fatal error is read.
                    self.backlog.drain(..).for_each(|p| ring.recycle(p));
                }
                break;
            }
            if let Some(p) = self.backlog.pop_front() {
                ring.recycle(p);
            }
        }
        local.requests += self.conn.stats.requests - before;
    }

    /// Copies the backlog out of the ring's buffers (after what is already
    /// spilled) and gives the buffers back; returns the bytes copied.
    pub(super) fn spill_backlog(&mut self, ring: &mut Ring<OutBuf>) -> usize {
        if self.spill_at > 0 {
            self.spill.drain(..self.spill_at);
            self.spill_at = 0;
        }
        let mut n = 0;
        for p in self.backlog.drain(..) {
            let b = ring.buffer(&p);
            n += b.len();
            self.spill.extend_from_slice(b);
            ring.recycle(p);
        }
        n
    }
}
