//! Backend I/O: file exports' reads, writes and flushes as ring
//! operations, and the operations of asynchronous backends (librbd), whose
//! completions come back through an eventfd-signalled queue.

use std::io;
use std::os::fd::AsFd;

use ringbd_backend::aio::Sink;
use ringbd_io::buf::IoBuf;
use ringbd_io::uring::Ring;

use super::{State, AIO_TOKEN};
use crate::conn::IoOp;
use crate::out::OutBuf;

impl State {
    /// Feeds backlogs and starts the file operations they produce; returns
    /// whether any operation was started.
    pub(super) fn start_io(&mut self, ring: &mut Ring<OutBuf>) -> bool {
        let mut started = false;
        for id in 0..self.conns.len() {
            let Some(c) = &mut self.conns[id] else { continue };
            if !c.dirty {
                continue;
            }
            if !c.send_inflight && c.has_backlog() && c.conn.wants_input() {
                c.consume_backlog(ring, &mut self.local);
            }
            started |= self.submit_io(ring, id);
        }
        started
    }

    /// Starts the operations connection `id` has queued (on the ring, or
    /// with its asynchronous backend); returns whether any ring operation
    /// was started.
    pub(super) fn submit_io(&mut self, ring: &mut Ring<OutBuf>, id: usize) -> bool {
        let Some(Some(c)) = self.conns.get_mut(id) else { return false };
        c.conn.take_io(&mut self.io_scratch);
        if self.io_scratch.is_empty() {
            return false;
        }
        if let (Some(aio), Some(q)) = (c.conn.aio(), &self.aio) {
            // The backend runs them (librbd, the NBD client); completions
            // come back through the queue's eventfd.
            let mut misrouted = Vec::new();
            for io in self.io_scratch.drain(..) {
                let tag = (id as u64) << 32 | u64::from(io.token);
                let sink = Sink::Queue { queue: q.clone(), tag };
                match io.op {
                    IoOp::Block(op) => aio.submit(op, io.buf, sink),
                    IoOp::Extents { offset, len } => aio.submit_extents(offset, len, sink),
                    // Connections queue file operations only for files.
                    IoOp::File(_) => {
                        misrouted.push(io.token);
                        continue;
                    }
                }
                self.local.aio += 1;
            }
            for token in misrouted {
                let e = io::Error::other("a file operation for an asynchronous backend");
                c.conn.io_complete(token, Err(e), IoBuf::new());
            }
            return false;
        }
        let mut started = false;
        for io in self.io_scratch.drain(..) {
            let r = match (c.conn.file_fd(io.direct), io.op) {
                (Some(fd), IoOp::File(op)) => ring.file_op(fd, id as u32, io.token, op, io.buf),
                (None, _) => Err(io::Error::other("no file behind this export")),
                // Connections only queue these for asynchronous backends.
                (Some(_), IoOp::Extents { .. } | IoOp::Block(_)) => {
                    Err(io::Error::other("not a ring operation"))
                }
            };
            match r {
                Ok(()) => {
                    started = true;
                    self.local.direct += u64::from(io.direct);
                }
                // The request gets an error reply; the buffer went with
                // the failed submission.
                Err(e) => c.conn.io_complete(io.token, Err(e), IoBuf::new()),
            }
        }
        started
    }

    /// The asynchronous backends' queue is readable: hand each finished
    /// operation to its connection, then poll again.
    pub(super) fn aio_completed(&mut self, ring: &mut Ring<OutBuf>) {
        let Some(q) = self.aio.clone() else { return };
        if let Err(e) = q.drain(&mut self.aio_done) {
            tracing::warn!("reading the completion eventfd: {e}");
        }
        for d in self.aio_done.drain(..) {
            let (conn, token) = ((d.tag >> 32) as usize, d.tag as u32);
            // A connection is only freed once none of its operations is in
            // flight, so the slot is still the one that started it.
            if let Some(Some(c)) = self.conns.get_mut(conn) {
                c.conn.io_complete(token, d.result, d.buf);
                c.dirty = true;
            }
        }
        if let Err(e) = ring.poll_readable(q.as_fd(), AIO_TOKEN) {
            tracing::warn!("re-arming the completion poll: {e}");
        }
    }
}
