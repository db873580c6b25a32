//! Backend I/O: file exports' reads, writes and flushes as ring
//! operations, and the operations of asynchronous backends (librbd, the
//! NBD client), whose completions come back through an eventfd-signalled
//! queue. Where the backend can run on this thread ([`AsyncIo::local`]:
//! the NBD client), the worker keeps a driver per export and drives it
//! from its loop: at the end of each turn in which it submitted, and when
//! the queue's eventfd (which the driver's ring signals) is readable.

use std::io;
use std::os::fd::AsFd;
use std::sync::Arc;

use ringbd_backend::aio::{LocalIo, Sink};
use ringbd_backend::{AsyncIo, Backend};
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
            // come back through the queue's eventfd, or from this
            // worker's driver of the backend.
            let mut driver = match c.conn.backend() {
                Some(b) => driver_for(&mut self.drivers, b, aio, q).and_then(|d| {
                    // Driven at the end of the turn (it sends then).
                    d.dirty = d.io.is_some();
                    d.io.as_mut()
                }),
                None => None,
            };
            let mut misrouted = Vec::new();
            for io in self.io_scratch.drain(..) {
                let tag = (id as u64) << 32 | u64::from(io.token);
                match (io.op, driver.as_deref_mut()) {
                    (IoOp::Block(op), Some(d)) => d.submit(op, io.buf, tag),
                    (IoOp::Extents { offset, len }, Some(d)) => d.submit_extents(offset, len, tag),
                    (IoOp::Block(op), None) => aio.submit(op, io.buf, Sink::Queue { queue: q.clone(), tag }),
                    (IoOp::Extents { offset, len }, None) => {
                        aio.submit_extents(offset, len, Sink::Queue { queue: q.clone(), tag })
                    }
                    // Connections queue file operations only for files.
                    (IoOp::File(_), _) => {
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

    /// The asynchronous backends' queue is readable: take what the drivers
    /// and the queue finished, hand each to its connection, then poll
    /// again.
    pub(super) fn aio_completed(&mut self, ring: &mut Ring<OutBuf>) {
        let Some(q) = self.aio.clone() else { return };
        // Cleared before the drivers reap their rings: a completion after
        // that signals it again.
        if let Err(e) = q.drain(&mut self.aio_done) {
            tracing::warn!("reading the completion eventfd: {e}");
        }
        for d in &mut self.drivers {
            d.dirty = false;
            if let Some(io) = d.io.as_deref_mut() {
                io.drive(&mut self.aio_done);
            }
        }
        self.aio_deliver();
        if let Err(e) = ring.poll_readable(q.as_fd(), AIO_TOKEN) {
            tracing::warn!("re-arming the completion poll: {e}");
        }
    }

    /// Hands each finished asynchronous operation to its connection.
    fn aio_deliver(&mut self) {
        for d in self.aio_done.drain(..) {
            let (conn, token) = ((d.tag >> 32) as usize, d.tag as u32);
            // A connection is only freed once none of its operations is in
            // flight, so the slot is still the one that started it.
            if let Some(Some(c)) = self.conns.get_mut(conn) {
                c.conn.io_complete(token, d.result, d.buf);
                c.dirty = true;
            }
        }
    }

    /// End of a loop turn: the drivers that were given work send it, and
    /// whatever they finished goes to its connection (the others cost
    /// nothing: a drive is a system call). Returns whether anything
    /// finished (the caller then flushes again).
    pub(super) fn drive(&mut self) -> bool {
        for d in &mut self.drivers {
            if !std::mem::take(&mut d.dirty) {
                continue;
            }
            if let Some(io) = d.io.as_deref_mut() {
                io.drive(&mut self.aio_done);
            }
        }
        let any = !self.aio_done.is_empty();
        self.aio_deliver();
        any
    }

    /// A connection using `backend` is gone: the worker's driver of it goes
    /// too once no other connection of this worker uses it and nothing is
    /// in flight on it.
    pub(super) fn release_driver(&mut self, backend: &Arc<dyn Backend>) {
        let used = |b: &Arc<dyn Backend>| {
            self.conns.iter().flatten().any(|c| c.conn.backend().is_some_and(|x| Arc::ptr_eq(x, b)))
        };
        if used(backend) {
            return;
        }
        self.drivers.retain(|d| {
            !Arc::ptr_eq(&d.backend, backend) || d.io.as_ref().is_some_and(|io| io.inflight() > 0)
        });
    }
}

/// A backend's driver on this worker: `io` is `None` where the backend has
/// none (it is asked once per export in use here).
pub(super) struct Driver {
    /// Holds the export, so no other one can take its address meanwhile.
    backend: Arc<dyn Backend>,
    io: Option<Box<dyn LocalIo>>,
    /// Given work since it was last driven.
    dirty: bool,
}

/// This worker's driver of `backend`, made on first use.
fn driver_for<'a>(
    drivers: &'a mut Vec<Driver>,
    backend: &Arc<dyn Backend>,
    aio: &dyn AsyncIo,
    q: &Arc<ringbd_backend::aio::CompletionQueue>,
) -> Option<&'a mut Driver> {
    let i = match drivers.iter().position(|d| Arc::ptr_eq(&d.backend, backend)) {
        Some(i) => i,
        None => {
            drivers.push(Driver { backend: backend.clone(), io: aio.local(q), dirty: false });
            drivers.len() - 1
        }
    };
    drivers.get_mut(i)
}
