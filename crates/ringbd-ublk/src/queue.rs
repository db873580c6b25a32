//! A queue's thread: fetch every tag, then per loop turn reap the ring's
//! completions (new requests and finished target operations), let the
//! handler act, and send every commit of that turn in one submission.
//! The thread ends when the driver aborts all of its tags (STOP_DEV or
//! DEL_DEV), or on a ring failure.

use std::fs::File;
use std::os::fd::AsFd;
use std::sync::mpsc::Sender;
use std::sync::Arc;

use crate::kernel::{Event, QueueConfig, QueueRing};

use crate::error::{Context, Error, Result};
use crate::target::{Op, QueueHandler, Request, Step, Target};

/// Counters of one queue, reported when the device is torn down.
#[derive(Debug, Default, Clone, Copy)]
pub struct QueueStats {
    pub requests: u64,
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub write_zeroes: u64,
    /// Requests completed with an error.
    pub errors: u64,
    /// Loop turns (one submission each).
    pub turns: u64,
    /// Reads and writes done as READ_FIXED/WRITE_FIXED on the request's
    /// own pages (zero-copy devices).
    pub zero_copy_ops: u64,
}

impl QueueStats {
    fn count(&mut self, op: Op) {
        self.requests += 1;
        match op {
            Op::Read => self.reads += 1,
            Op::Write => self.writes += 1,
            Op::Flush => self.flushes += 1,
            Op::Discard => self.discards += 1,
            Op::WriteZeroes => self.write_zeroes += 1,
            Op::Other(_) => {}
        }
    }

    pub fn add(&mut self, o: &QueueStats) {
        self.requests += o.requests;
        self.reads += o.reads;
        self.writes += o.writes;
        self.flushes += o.flushes;
        self.discards += o.discards;
        self.write_zeroes += o.write_zeroes;
        self.errors += o.errors;
        self.turns += o.turns;
        self.zero_copy_ops += o.zero_copy_ops;
    }
}

impl std::fmt::Display for QueueStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} requests ({} reads, {} writes, {} flushes, {} discards, {} write-zeroes), {} failed, {} loop turns, {} zero-copy ops",
            self.requests,
            self.reads,
            self.writes,
            self.flushes,
            self.discards,
            self.write_zeroes,
            self.errors,
            self.turns,
            self.zero_copy_ops
        )
    }
}

/// Runs queue `cfg.q_id` (on `cpus`, if any) until the device goes away.
/// `ready` gets `Ok` once every tag is fetched (START_DEV /
/// END_USER_RECOVERY may then be sent), or the setup error.
pub fn run(
    cdev: Arc<File>,
    cfg: QueueConfig,
    cpus: &[usize],
    target: Arc<dyn Target>,
    ready: Sender<Result<u16>>,
) -> Result<QueueStats> {
    let where_ = format!("ublk device {} queue {}", cfg.dev_id, cfg.q_id);
    if !cpus.is_empty() {
        // Before the ring exists, so its memory is allocated near those CPUs.
        if let Err(e) = crate::kernel::pin_current_thread(cpus) {
            tracing::warn!("{where_}: pinning to CPUs {cpus:?}: {e}; running unpinned");
        }
    }
    let setup: Result<(QueueRing, Box<dyn QueueHandler>)> = (|| {
        let setup = target.queue(cfg.q_id, cfg.depth)?;
        let files: Vec<_> = setup.files.iter().map(|f| f.as_fd()).collect();
        let mut ring = QueueRing::new(cdev.as_fd(), cfg, &files).context(|| where_.clone())?;
        ring.fetch_all().context(|| format!("{where_}: FETCH_REQ"))?;
        ring.submit_and_wait(0).context(|| format!("{where_}: submitting FETCH_REQ"))?;
        Ok((ring, setup.handler))
    })();
    let (mut ring, mut handler) = match setup {
        Ok(v) => {
            // The receiver only goes away if attach already failed.
            let _ = ready.send(Ok(cfg.q_id));
            v
        }
        Err(e) => {
            let msg = e.to_string();
            let _ = ready.send(Err(e));
            return Err(Error::msg(msg, libc::EIO));
        }
    };
    drop(ready);
    serve(&mut ring, handler.as_mut(), &where_)
}

fn serve(ring: &mut QueueRing, handler: &mut dyn QueueHandler, where_: &str) -> Result<QueueStats> {
    let mut stats = QueueStats::default();
    let mut events = Vec::new();
    let mut done = Vec::new();
    let mut failure: Option<Error> = None;
    let mut stopped = false;
    while !ring.finished() {
        if !stopped && ring.tags_finished() {
            // Only the handler's own operations (a connection's receive)
            // are left: make them end.
            handler.stop(ring);
            stopped = true;
        }
        ring.submit_and_wait(1).context(|| format!("{where_}: io_uring_enter"))?;
        stats.turns += 1;
        events.clear();
        ring.reap(&mut events);
        for ev in events.drain(..) {
            let (tag, step) = match ev {
                Event::Request { tag, desc } => {
                    let req = Request::from_desc(&desc);
                    stats.count(req.op);
                    (tag, handler.start(ring, tag, &req))
                }
                Event::Op { tag, cookie, result } => (tag, handler.op_done(ring, tag, cookie, result)),
                Event::ConnOp { cookie, result } => {
                    handler.conn_op_done(ring, cookie, result);
                    continue;
                }
                Event::Aborted { .. } => continue,
                Event::CommandFailed { tag, error } => {
                    // The tag is lost to this queue; the device cannot go on
                    // serving it, so report and let teardown happen.
                    let e = Error::new(format!("{where_} tag {tag}: FETCH/COMMIT command"), error);
                    tracing::warn!("{e}");
                    failure.get_or_insert(e);
                    continue;
                }
            };
            done.push((tag, step));
        }
        handler.end_turn(ring, &mut done);
        for (tag, step) in done.drain(..) {
            let result = match step {
                Step::Pending => continue,
                Step::Done(n) => i32::try_from(n).unwrap_or(i32::MAX),
                Step::Failed(e) => {
                    stats.errors += 1;
                    tracing::warn!("{where_}: {e}");
                    -e.errno()
                }
            };
            ring.commit(tag, result).context(|| format!("{where_} tag {tag}: commit"))?;
        }
    }
    stats.zero_copy_ops = ring.fixed_ops();
    match failure {
        Some(e) => Err(e),
        None => Ok(stats),
    }
}
