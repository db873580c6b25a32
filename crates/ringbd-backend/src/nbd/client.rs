//! One NBD client's requests in flight: the jobs the block layer gives it,
//! turned into NBD commands on a [`ringbd_client::Engine`], and the replies
//! turned back into results. Shared by the export's worker thread (the
//! path every caller can use) and the drivers of the threads that run the
//! client themselves ([`super::local`]).

use std::collections::HashMap;
use std::io;

use nbd_proto::wire::{cmd_flags, state_flags};
use ringbd_client::{Cmd, Completion, Engine};
use ringbd_io::buf::IoBuf;

use super::Upstream;
use crate::aio::{AioDone, Sink};
use crate::{extents_to_buf, BlockOp, Extent};

/// Client buffers kept for reuse (a fresh 1 MiB buffer per request costs
/// its page faults: measured, a 1 MiB read through the proxy took 1,447 us
/// of server CPU with a new buffer each time).
const POOL_BUFS: usize = 64;
const POOL_BUF_MAX: usize = 2 << 20;

/// The client's request buffers, reused (`Vec<u8>`: the client engine's
/// buffer type; the server's `IoBuf` is copied in and out of them).
#[derive(Default)]
struct Pool(Vec<Vec<u8>>);

impl Pool {
    /// A buffer for a read of `n` bytes: one already that long if any (the
    /// client then shortens it without writing), else the largest.
    fn for_read(&mut self, n: usize) -> Vec<u8> {
        match self.0.iter().position(|v| v.len() >= n) {
            Some(i) => self.0.swap_remove(i),
            None => self.0.pop().unwrap_or_default(),
        }
    }

    /// A buffer holding a copy of `data`.
    fn with(&mut self, data: &[u8]) -> Vec<u8> {
        let mut v = self.0.pop().unwrap_or_default();
        v.clear();
        v.extend_from_slice(data);
        v
    }

    fn put(&mut self, v: Vec<u8>) {
        if self.0.len() < POOL_BUFS && v.capacity() <= POOL_BUF_MAX && v.capacity() > 0 {
            self.0.push(v);
        }
    }
}

/// Where a job's result goes: a sink (any thread), or back to the driver
/// of the thread that submitted it, by its tag.
pub(super) enum Reply {
    Sink(Sink),
    Tag(u64),
}

impl Reply {
    /// Hands the result over: to the sink, or appended to `local`.
    pub(super) fn deliver(self, result: io::Result<usize>, buf: IoBuf, local: &mut Vec<AioDone>) {
        match self {
            Reply::Sink(sink) => {
                // A sink that cannot be woken finds the result at its next
                // wake-up (`CompletionQueue::push`): say so, go on.
                if let Err(e) = sink.deliver(result, buf) {
                    tracing::warn!("NBD export: waking the engine with a reply: {e}");
                }
            }
            Reply::Tag(tag) => local.push(AioDone { tag, result, buf }),
        }
    }
}

/// One operation for a client.
pub(super) enum Job {
    Io { op: BlockOp, buf: IoBuf, reply: Reply },
    Extents { offset: u64, len: u64, reply: Reply },
}

impl Job {
    /// Ends the job with `e`.
    pub(super) fn fail(self, e: io::Error, local: &mut Vec<AioDone>) {
        match self {
            Job::Io { buf, reply, .. } => reply.deliver(Err(e), buf, local),
            Job::Extents { reply, .. } => reply.deliver(Err(e), IoBuf::new(), local),
        }
    }

    /// The same job, answering through `f(tag)` where it answered by tag.
    pub(super) fn map_tag(self, f: impl FnOnce(u64) -> Sink) -> Job {
        let m = |r: Reply| match r {
            Reply::Tag(t) => Reply::Sink(f(t)),
            s => s,
        };
        match self {
            Job::Io { op, buf, reply } => Job::Io { op, buf, reply: m(reply) },
            Job::Extents { offset, len, reply } => Job::Extents { offset, len, reply: m(reply) },
        }
    }
}

/// The error a job fails with once the upstream is gone.
pub(super) fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "the upstream NBD connection is gone")
}

/// The errno an upstream failure reaches our client with: the upstream's
/// own NBD errno (the same numbers as Linux's), else EIO.
fn to_io(e: &ringbd_client::Error) -> io::Error {
    match e {
        ringbd_client::Error::Request { errno, .. } => io::Error::from_raw_os_error(*errno as i32),
        other => io::Error::other(other.to_string()),
    }
}

/// A request sent upstream, waiting for its reply.
struct InFlight {
    reply: Reply,
    buf: IoBuf,
    /// Where a read's data goes in `buf`, and the bytes moved.
    at: usize,
    kind: Kind,
    /// What to send again if the connection is lost before the reply.
    resend: Resend,
}

enum Kind {
    Read,
    Write,
    Other,
    Extents,
}

#[derive(Clone, Copy)]
enum Resend {
    Io(BlockOp),
    Extents { offset: u64, len: u64 },
}

impl InFlight {
    /// The job again, for a new connection.
    fn into_job(self) -> Job {
        match self.resend {
            Resend::Io(op) => Job::Io { op, buf: self.buf, reply: self.reply },
            Resend::Extents { offset, len } => Job::Extents { offset, len, reply: self.reply },
        }
    }
}

/// An engine and the jobs it has in flight.
pub(super) struct Client {
    pub(super) engine: Engine,
    up: Upstream,
    inflight: HashMap<u64, InFlight>,
    next_tag: u64,
    pool: Pool,
    done: Vec<Completion>,
}

impl Client {
    pub(super) fn new(engine: Engine, up: Upstream) -> Client {
        Client { engine, up, inflight: HashMap::new(), next_tag: 0, pool: Pool::default(), done: Vec::new() }
    }

    pub(super) fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// Every job in flight, to send again elsewhere (the connection failed).
    pub(super) fn take_all(&mut self) -> Vec<Job> {
        self.inflight.drain().map(|(_, f)| f.into_job()).collect()
    }

    /// Queues one job on the least busy connection (it goes out at the
    /// next [`Client::poll`]); on refusal hands it back with the error.
    pub(super) fn start(&mut self, job: Job) -> Result<(), (Job, io::Error)> {
        self.next_tag = self.next_tag.wrapping_add(1);
        let tag = self.next_tag;
        let (engine, up) = (&mut self.engine, &self.up);
        let (op, buf, reply) = match job {
            Job::Extents { offset, len, reply } => {
                let conn = engine.least_busy();
                let len = len.min(up.size.saturating_sub(offset)).min(u64::from(u32::MAX));
                return match engine.submit(conn, tag, Cmd::block_status(offset, len), Vec::new()) {
                    Ok(()) => {
                        let resend = Resend::Extents { offset, len };
                        let f = InFlight { reply, buf: IoBuf::new(), at: 0, kind: Kind::Extents, resend };
                        self.inflight.insert(tag, f);
                        Ok(())
                    }
                    Err(e) => Err((Job::Extents { offset, len, reply }, to_io(&e))),
                };
            }
            Job::Io { op, buf, reply } => (op, buf, reply),
        };
        let pool = &mut self.pool;
        let (cmd, payload, at, kind) = match op {
            BlockOp::Read { offset, at } => {
                let n = buf.len().saturating_sub(at);
                (Cmd::read(offset, n as u64), pool.for_read(n), at, Kind::Read)
            }
            BlockOp::Write { offset, at, fua } => {
                let data = pool.with(buf.get(at..).unwrap_or_default());
                let flags = if fua { cmd_flags::FUA } else { 0 };
                (Cmd::write(offset, data.len() as u64).with_flags(flags), data, at, Kind::Write)
            }
            BlockOp::Flush => (Cmd::flush(), Vec::new(), 0, Kind::Other),
            BlockOp::Trim { offset, len } => (Cmd::trim(offset, len), Vec::new(), 0, Kind::Other),
            BlockOp::WriteZeroes { offset, len, no_hole, fast } => {
                let flags = if no_hole { cmd_flags::NO_HOLE } else { 0 }
                    | if fast { cmd_flags::FAST_ZERO } else { 0 };
                (Cmd::zero(offset, len).with_flags(flags), Vec::new(), 0, Kind::Other)
            }
        };
        if matches!(kind, Kind::Read | Kind::Write) && cmd.len > up.max_request {
            let e = io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} bytes is more than the upstream's largest request ({})", cmd.len, up.max_request),
            );
            return Err((Job::Io { op, buf, reply }, e));
        }
        let conn = engine.least_busy();
        match engine.submit(conn, tag, cmd, payload) {
            Ok(()) => {
                self.inflight.insert(tag, InFlight { reply, buf, at, kind, resend: Resend::Io(op) });
                Ok(())
            }
            Err(e) => Err((Job::Io { op, buf, reply }, to_io(&e))),
        }
    }

    /// Sends what was queued, waits for a reply when `wait` (and something
    /// is in flight), and delivers every finished job (those answering by
    /// tag go to `local`). An error is the connection's: the jobs in flight
    /// stay for [`Client::take_all`].
    pub(super) fn poll(&mut self, wait: bool, local: &mut Vec<AioDone>) -> Result<(), ringbd_client::Error> {
        let mut done = std::mem::take(&mut self.done);
        let r = self.engine.poll(&mut done, wait);
        for c in done.drain(..) {
            let Some(f) = self.inflight.remove(&c.tag) else { continue };
            finish(f, c, &mut self.pool, local);
        }
        self.done = done;
        r
    }
}

/// Hands a reply to the job's sink or driver.
fn finish(f: InFlight, c: Completion, pool: &mut Pool, local: &mut Vec<AioDone>) {
    let InFlight { reply, mut buf, at, kind, .. } = f;
    let result = match (&c.result, kind) {
        (Err(e), _) => Err(to_io(e)),
        (Ok(()), Kind::Read) => {
            let n = c.buf.len().min(buf.len().saturating_sub(at));
            if let Some(dst) = buf.get_mut(at..at + n) {
                dst.copy_from_slice(&c.buf[..n]);
            }
            Ok(n)
        }
        (Ok(()), Kind::Write) => Ok(buf.len().saturating_sub(at)),
        (Ok(()), Kind::Other) => Ok(0),
        (Ok(()), Kind::Extents) => {
            let extents: Vec<Extent> = c
                .extents
                .iter()
                .map(|e| Extent {
                    len: e.len,
                    hole: e.flags & state_flags::HOLE != 0,
                    zero: e.flags & state_flags::ZERO != 0,
                })
                .collect();
            buf = extents_to_buf(&extents);
            Ok(extents.len())
        }
    };
    pool.put(c.buf);
    reply.deliver(result, buf, local);
}
