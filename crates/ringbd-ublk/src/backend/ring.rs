//! Backends with a file behind them: every read, write, fdatasync and
//! fallocate is an operation on the queue's own ring, on the backend's
//! descriptor (its `O_DIRECT` one with `,direct`), registered as the
//! ring's file 1. Reads and writes go through `read_data`/`write_data`, so
//! a zero-copy device moves the request's own pages.
//!
//! The same choices as the server's io_uring engine: a discard punches a
//! hole (a hint: where the filesystem cannot, nothing is lost); a
//! write-zeroes uses the backend's first zeroing mode
//! ([`Backend::zero_mode`]: punch a hole unless the range must stay
//! allocated) and, where that mode is unsupported, the backend's own
//! `write_zeroes`, which knows the other ways; FUA on either is an
//! fdatasync after it; FUA writes are `RWF_DSYNC`.

use std::io;
use std::sync::Arc;

use crate::kernel::{AllocMode, FileIo, FileSlot, QueueRing};
use ringbd_backend::{Backend, ZeroFlags};
use ringbd_io::fs::Fallocate;

use super::{backend_failure, fallocate_unsupported};
use crate::error::Error;
use crate::target::{Op, QueueHandler, Request, Step};

/// The one registered file.
const SLOT: FileSlot = FileSlot(1);

// Cookies: which operation of a request completed.
const C_RW: u32 = 1;
const C_SYNC: u32 = 2;
const C_ALLOC: u32 = 3;
/// The fdatasync after a discard or write-zeroes with FUA.
const C_SYNC_AFTER: u32 = 4;

/// A request in progress: `done` bytes moved so far.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    req: Request,
    done: u32,
}

pub struct RingQueue {
    backend: Arc<dyn Backend>,
    reqs: Vec<Option<InFlight>>,
}

impl RingQueue {
    pub fn new(backend: Arc<dyn Backend>, depth: u16) -> RingQueue {
        RingQueue { backend, reqs: vec![None; usize::from(depth)] }
    }

    fn fail(&self, tag: u16, req: &Request, e: io::Error) -> Step {
        Step::Failed(Error::new(format!("tag {tag}: {} of {}", req.describe(), self.backend.describe()), e))
    }

    /// Records `f` as waiting for an operation `queued` tried to start.
    fn pending(&mut self, tag: u16, f: InFlight, queued: io::Result<()>) -> Step {
        match queued {
            Ok(()) => {
                self.reqs[usize::from(tag)] = Some(f);
                Step::Pending
            }
            Err(e) => self.fail(tag, &f.req, e),
        }
    }

    /// Queues the rest of a read or write.
    fn continue_rw(&mut self, ring: &mut QueueRing, tag: u16, f: InFlight) -> Step {
        let io = FileIo {
            tag,
            file: SLOT,
            offset: f.req.offset + u64::from(f.done),
            buf_off: f.done as usize,
            len: f.req.len - f.done,
            cookie: C_RW,
        };
        let r = if f.req.op == Op::Read { ring.read_data(&io) } else { ring.write_data(&io, f.req.fua) };
        self.pending(tag, f, r)
    }

    fn fallocate(&mut self, ring: &mut QueueRing, tag: u16, req: Request, mode: Fallocate) -> Step {
        let mode = match mode {
            Fallocate::PunchHole => AllocMode::PunchHole,
            Fallocate::ZeroRange => AllocMode::ZeroRange,
        };
        let r = ring.fallocate(tag, SLOT, mode, req.offset, u64::from(req.len), C_ALLOC);
        self.pending(tag, InFlight { req, done: 0 }, r)
    }

    /// A discard or write-zeroes is done: with FUA, make it durable first.
    fn settled(&mut self, ring: &mut QueueRing, tag: u16, req: Request) -> Step {
        if !req.fua {
            return Step::Done(0);
        }
        let r = ring.fdatasync(tag, SLOT, C_SYNC_AFTER);
        self.pending(tag, InFlight { req, done: 0 }, r)
    }
}

impl QueueHandler for RingQueue {
    fn start(&mut self, ring: &mut QueueRing, tag: u16, req: &Request) -> Step {
        let req = *req;
        match req.op {
            Op::Read | Op::Write if req.len == 0 => Step::Done(0),
            Op::Read | Op::Write => self.continue_rw(ring, tag, InFlight { req, done: 0 }),
            Op::Flush => {
                let r = ring.fdatasync(tag, SLOT, C_SYNC);
                self.pending(tag, InFlight { req, done: 0 }, r)
            }
            Op::Discard => self.fallocate(ring, tag, req, Fallocate::PunchHole),
            Op::WriteZeroes => {
                let mode = self.backend.zero_mode(req.no_unmap).unwrap_or(Fallocate::ZeroRange);
                self.fallocate(ring, tag, req, mode)
            }
            Op::Other(_) => {
                Step::Failed(Error::msg(format!("tag {tag}: {}", req.describe()), libc::EOPNOTSUPP))
            }
        }
    }

    fn op_done(&mut self, ring: &mut QueueRing, tag: u16, cookie: u32, result: io::Result<u32>) -> Step {
        let Some(f) = self.reqs.get_mut(usize::from(tag)).and_then(Option::take) else {
            return Step::Failed(Error::msg(
                format!("tag {tag}: completion {cookie} for no request"),
                libc::EIO,
            ));
        };
        let req = f.req;
        match (cookie, result) {
            (C_RW, Ok(0)) => {
                let what = if req.op == Op::Read { "end of file" } else { "no progress" };
                self.fail(
                    tag,
                    &req,
                    io::Error::new(io::ErrorKind::UnexpectedEof, format!("{what} after {} bytes", f.done)),
                )
            }
            (C_RW, Ok(n)) => {
                let done = f.done.saturating_add(n).min(req.len);
                if done == req.len {
                    Step::Done(req.len)
                } else {
                    self.continue_rw(ring, tag, InFlight { req, done })
                }
            }
            (C_SYNC | C_SYNC_AFTER, Ok(_)) => Step::Done(0),
            (C_ALLOC, Ok(_)) => self.settled(ring, tag, req),
            // A discard is a hint: where holes cannot be punched, nothing is lost.
            (C_ALLOC, Err(e)) if req.op == Op::Discard && fallocate_unsupported(&e) => {
                self.settled(ring, tag, req)
            }
            // The backend knows the other ways to zero; they run inline, as
            // in the server's engine.
            (C_ALLOC, Err(e)) if fallocate_unsupported(&e) => {
                let flags = ZeroFlags { fua: req.fua, no_hole: req.no_unmap, fast: false };
                match self.backend.write_zeroes(req.offset, u64::from(req.len), flags) {
                    Ok(()) => Step::Done(0),
                    Err(e) => Step::Failed(backend_failure(tag, &e)),
                }
            }
            (_, Err(e)) => self.fail(tag, &req, e),
            (c, Ok(_)) => Step::Failed(Error::msg(format!("tag {tag}: unknown completion {c}"), libc::EIO)),
        }
    }
}
