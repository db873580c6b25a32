//! Backends that run their I/O asynchronously themselves (Ceph RBD
//! through librbd's aio, NBD exports through the NBD client): each
//! request becomes one submitted operation ([`ringbd_backend::AsyncIo::submit`]
//! of a [`BlockOp`], as the server's engine submits them), whose completion arrives, from
//! the backend's thread, in this queue's [`CompletionQueue`]. The queue's
//! ring polls that queue's eventfd (registered as the ring's file 1), so a
//! completion wakes the queue's loop like any ring completion; no thread
//! waits per request. A backend that can run on the queue's thread
//! ([`ringbd_backend::AsyncIo::local`]: the NBD client, with a connection
//! of this queue's) gets a driver, which the loop drives at the end of each
//! turn and whenever the eventfd (which the driver's ring signals) is
//! readable: no thread of the backend's in between.
//!
//! Data is copied between the tag's buffer and the operation's buffer
//! (the backends take owned buffers, which outlive the request if the
//! device goes away): the device is never zero-copy on this path.
//! Buffers are kept for reuse, within `SPARE_BYTES` (8 MiB).
//!
//! The same choices as the server's engine: a discard is a trim, a
//! write-zeroes the backend's write-zeroes (keeping the range allocated when
//! the request says not to unmap), each with FUA followed by a flush; a
//! discard the backend refuses as unsupported succeeds (it is a hint).

use std::io;
use std::sync::Arc;

use crate::kernel::{FileSlot, QueueRing};
use ringbd_backend::aio::{AioDone, CompletionQueue, LocalIo, Sink};
use ringbd_backend::{Backend, BlockOp};
use ringbd_io::buf::IoBuf;

use super::fallocate_unsupported;
use crate::error::{Error, Result};
use crate::target::{Op, QueueHandler, Request, Step};

/// The completion queue's eventfd in the ring's file table.
const EVENTS: FileSlot = FileSlot(1);
/// Cookie of the poll on it.
const C_POLL: u32 = 1;
/// Bytes of operation buffers kept for reuse per queue.
const SPARE_BYTES: usize = 8 << 20;

/// A request waiting for its operation.
#[derive(Debug, Clone, Copy)]
struct Waiting {
    req: Request,
    /// The flush after a FUA discard or write-zeroes is in flight.
    sync_after: bool,
}

pub struct AioQueue {
    backend: Arc<dyn Backend>,
    completions: Arc<CompletionQueue>,
    reqs: Vec<Option<Waiting>>,
    /// Finished requests, handed to the loop at the end of the turn.
    finished: Vec<(u16, Step)>,
    /// Completions taken from the queue (reused).
    taken: Vec<AioDone>,
    spare: Vec<IoBuf>,
    spare_bytes: usize,
    /// A poll of the eventfd is in flight.
    polling: bool,
    /// The device is going away: no new poll.
    stopped: bool,
    /// The backend's driver on this queue's thread, asked for at the
    /// first request (`Some(None)`: it has none).
    driver: Option<Option<Box<dyn LocalIo>>>,
    /// The driver was given work since it was last driven.
    dirty: bool,
}

impl AioQueue {
    pub fn new(backend: Arc<dyn Backend>, depth: u16) -> Result<AioQueue> {
        let completions = CompletionQueue::new()
            .map_err(|e| Error::new(format!("{}: completion queue eventfd", backend.describe()), e))?;
        Ok(AioQueue {
            backend,
            completions: Arc::new(completions),
            reqs: vec![None; usize::from(depth)],
            finished: Vec::new(),
            taken: Vec::new(),
            spare: Vec::new(),
            spare_bytes: 0,
            polling: false,
            stopped: false,
            driver: None,
            dirty: false,
        })
    }

    pub fn completions(&self) -> &CompletionQueue {
        &self.completions
    }

    fn buffer(&mut self, len: usize) -> IoBuf {
        match self.spare.iter().position(|b| b.capacity() >= len) {
            Some(i) => {
                let mut b = self.spare.swap_remove(i);
                self.spare_bytes -= b.capacity();
                b.clear();
                b
            }
            None => IoBuf::with_capacity(len),
        }
    }

    fn recycle(&mut self, b: IoBuf) {
        if b.capacity() > 0 && self.spare_bytes + b.capacity() <= SPARE_BYTES {
            self.spare_bytes += b.capacity();
            self.spare.push(b);
        }
    }

    fn submit(&mut self, tag: u16, w: Waiting, op: BlockOp, buf: IoBuf) -> Step {
        let Some(aio) = self.backend.aio() else {
            return Step::Failed(Error::msg(format!("tag {tag}: the backend lost its aio"), libc::EIO));
        };
        self.reqs[usize::from(tag)] = Some(w);
        // The tag travels with the operation and comes back in AioDone.
        let driver = self.driver.get_or_insert_with(|| aio.local(&self.completions));
        match driver {
            Some(d) => {
                d.submit(op, buf, u64::from(tag));
                self.dirty = true;
            }
            None => aio.submit(op, buf, Sink::Queue { queue: self.completions.clone(), tag: u64::from(tag) }),
        }
        Step::Pending
    }

    fn arm(&mut self, ring: &mut QueueRing) {
        if self.polling || self.stopped {
            return;
        }
        match ring.poll_readable(EVENTS, C_POLL) {
            Ok(()) => self.polling = true,
            // Tried again at the end of the next turn; a completion
            // meanwhile waits in the queue (its eventfd stays readable).
            Err(e) => tracing::warn!("{}: polling the completion queue: {e}", self.backend.describe()),
        }
    }

    /// A submitted operation finished.
    fn complete(&mut self, ring: &mut QueueRing, d: AioDone) {
        let Ok(tag) = u16::try_from(d.tag) else { return };
        let Some(w) = self.reqs.get_mut(usize::from(tag)).and_then(Option::take) else {
            tracing::warn!("{}: completion for tag {tag}, which has no request", self.backend.describe());
            return;
        };
        let req = w.req;
        let len = req.len as usize;
        let step = match (req.op, d.result) {
            (_, Err(e)) if w.sync_after => self.fail(tag, &req, e),
            (_, Ok(_)) if w.sync_after => Step::Done(0),
            (Op::Read, Ok(n)) if n == len => match ring.buf_mut(tag).and_then(|b| b.get_mut(..len)) {
                Some(dst) if d.buf.len() >= len => {
                    dst.copy_from_slice(&d.buf[..len]);
                    Step::Done(req.len)
                }
                _ => self.fail(tag, &req, io::Error::other("no buffer for the data read")),
            },
            (Op::Write, Ok(n)) if n == len => Step::Done(req.len),
            (Op::Read | Op::Write, Ok(n)) => {
                self.fail(tag, &req, io::Error::new(io::ErrorKind::UnexpectedEof, format!("{n} bytes moved")))
            }
            (Op::Discard | Op::WriteZeroes, Ok(_)) => self.settled(tag, req),
            (Op::Discard, Err(e)) if fallocate_unsupported(&e) => self.settled(tag, req),
            (_, Ok(_)) => Step::Done(0),
            (_, Err(e)) => self.fail(tag, &req, e),
        };
        self.recycle(d.buf);
        if !matches!(step, Step::Pending) {
            self.finished.push((tag, step));
        }
    }

    /// A discard or write-zeroes is done: with FUA, flush first.
    fn settled(&mut self, tag: u16, req: Request) -> Step {
        if !req.fua {
            return Step::Done(0);
        }
        self.submit(tag, Waiting { req, sync_after: true }, BlockOp::Flush, IoBuf::new())
    }

    fn fail(&self, tag: u16, req: &Request, e: io::Error) -> Step {
        Step::Failed(Error::new(format!("tag {tag}: {} of {}", req.describe(), self.backend.describe()), e))
    }
}

impl QueueHandler for AioQueue {
    fn start(&mut self, ring: &mut QueueRing, tag: u16, req: &Request) -> Step {
        let req = *req;
        let len = req.len as usize;
        let (offset, w) = (req.offset, Waiting { req, sync_after: false });
        let step = match req.op {
            Op::Read | Op::Write if len == 0 => return Step::Done(0),
            Op::Read => {
                let mut buf = self.buffer(len);
                buf.set_len(len);
                self.submit(tag, w, BlockOp::Read { offset, at: 0 }, buf)
            }
            Op::Write => {
                let mut buf = self.buffer(len);
                match ring.buf(tag).and_then(|b| b.get(..len)) {
                    Some(data) => buf.extend_from_slice(data),
                    None => return self.fail(tag, &req, io::Error::other("no buffer for the data to write")),
                }
                self.submit(tag, w, BlockOp::Write { offset, at: 0, fua: req.fua }, buf)
            }
            Op::Flush => self.submit(tag, w, BlockOp::Flush, IoBuf::new()),
            Op::Discard => {
                self.submit(tag, w, BlockOp::Trim { offset, len: u64::from(req.len) }, IoBuf::new())
            }
            Op::WriteZeroes => {
                let op = BlockOp::WriteZeroes {
                    offset,
                    len: u64::from(req.len),
                    no_hole: req.no_unmap,
                    fast: false,
                };
                self.submit(tag, w, op, IoBuf::new())
            }
            Op::Other(_) => {
                return Step::Failed(Error::msg(format!("tag {tag}: {}", req.describe()), libc::EOPNOTSUPP))
            }
        };
        self.arm(ring);
        step
    }

    fn op_done(&mut self, _ring: &mut QueueRing, tag: u16, cookie: u32, _r: io::Result<u32>) -> Step {
        Step::Failed(Error::msg(
            format!("tag {tag}: an aio backend got a ring completion it never asked for ({cookie})"),
            libc::EIO,
        ))
    }

    fn conn_op_done(&mut self, ring: &mut QueueRing, cookie: u32, result: io::Result<u32>) {
        if cookie != C_POLL {
            return;
        }
        self.polling = false;
        if let Err(e) = result {
            tracing::warn!("{}: poll of the completion queue: {e}", self.backend.describe());
        }
        let mut taken = std::mem::take(&mut self.taken);
        // Cleared before the driver reaps its ring: a completion after
        // that signals it again.
        if let Err(e) = self.completions.drain(&mut taken) {
            tracing::warn!("{}: clearing the completion queue's eventfd: {e}", self.backend.describe());
        }
        if let Some(Some(d)) = self.driver.as_mut() {
            self.dirty = false;
            d.drive(&mut taken);
        }
        for d in taken.drain(..) {
            self.complete(ring, d);
        }
        self.taken = taken;
    }

    fn end_turn(&mut self, ring: &mut QueueRing, done: &mut Vec<(u16, Step)>) {
        // The driver sends what this turn submitted (a turn without any
        // costs nothing: a drive is a system call); what it finished
        // already (a refused request, a reply in) completes now, and may
        // submit again (a flush after a FUA trim): drive until quiet.
        while std::mem::take(&mut self.dirty) {
            let Some(Some(d)) = self.driver.as_mut() else { break };
            let mut taken = std::mem::take(&mut self.taken);
            d.drive(&mut taken);
            for d in taken.drain(..) {
                self.complete(ring, d);
            }
            self.taken = taken;
        }
        done.append(&mut self.finished);
        if self.reqs.iter().any(Option::is_some) {
            self.arm(ring);
        }
    }

    fn stop(&mut self, _ring: &mut QueueRing) {
        self.stopped = true;
        if self.polling {
            // End the poll in flight: the queue finishes once it completes.
            if let Err(e) = self.completions.wake() {
                tracing::warn!("{}: waking the completion queue to stop: {e}", self.backend.describe());
            }
        }
    }
}
