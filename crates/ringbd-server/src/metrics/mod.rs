//! Counters of the data plane for `--metrics ADDR` (docs/metrics.md):
//! connections, requests, bytes, errors by errno and a latency histogram,
//! per export and operation, kept by each connection and summed when
//! scraped.
//!
//! The hot path: a connection in the transmission phase owns its
//! counters; answering a request adds to four of them (requests,
//! latency sum, one bucket, and bytes or an error) with a relaxed load and
//! store each (one writer per counter, so no locked instruction; each
//! connection's counters are an allocation of their own), after one clock read when
//! the request is parsed and one when its reply is queued. The export's
//! lock is taken when a connection starts or ends its transmission phase,
//! and by the scrape; never per request.
//!
//! - [`render`](render()): the text exposition (Prometheus 0.0.4) of the
//!   exports' counters and the io_uring engine's [`EngineStats`](crate::engine_uring::EngineStats).
//! - [`http`]: the `--metrics` listener, one thread answering `GET /metrics`.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nbd_proto::{CmdType, Errno};

pub mod http;
mod render;
pub use render::{render, CONTENT_TYPE};

/// The `op` label of each operation, in `op_index` order; `other` is
/// every command the server answers with an error only (unknown ones,
/// `resize`).
pub const OPS: [&str; 8] =
    ["read", "write", "flush", "trim", "cache", "write_zeroes", "block_status", "other"];

fn op_index(t: CmdType) -> usize {
    match t {
        CmdType::READ => 0,
        CmdType::WRITE => 1,
        CmdType::FLUSH => 2,
        CmdType::TRIM => 3,
        CmdType::CACHE => 4,
        CmdType::WRITE_ZEROES => 5,
        CmdType::BLOCK_STATUS => 6,
        _ => 7,
    }
}

/// The `errno` label of each error the server can reply with (the NBD
/// protocol's errnos), in `errno_index` order; `other` for any other.
pub const ERRNOS: [&str; 9] =
    ["EPERM", "EIO", "ENOMEM", "EINVAL", "ENOSPC", "EOVERFLOW", "ENOTSUP", "ESHUTDOWN", "other"];

fn errno_index(e: Errno) -> usize {
    match e {
        Errno::EPERM => 0,
        Errno::EIO => 1,
        Errno::ENOMEM => 2,
        Errno::EINVAL => 3,
        Errno::ENOSPC => 4,
        Errno::EOVERFLOW => 5,
        Errno::ENOTSUP => 6,
        Errno::ESHUTDOWN => 7,
        _ => 8,
    }
}

/// Upper bounds of the latency buckets, in nanoseconds: 250 ns (a small
/// read of a memory export, answered as it is parsed) to 10 s (a stalled
/// disk or cluster); one more bucket, `+Inf`, takes the rest.
pub const BUCKETS_NS: [u64; 24] = [
    250,
    500,
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];
const SLOTS: usize = BUCKETS_NS.len() + 1;

/// Adds `n` to a counter that only one thread writes (its connection's):
/// a relaxed load and store, not a read-modify-write, so no locked
/// instruction. A scrape reads some recent value; none is lost.
fn bump(c: &AtomicU64, n: u64) {
    c.store(c.load(Relaxed).wrapping_add(n), Relaxed);
}

/// One operation's counters of one connection.
#[derive(Default)]
struct OpCounters {
    requests: AtomicU64,
    bytes: AtomicU64,
    nanos: AtomicU64,
    /// Requests per latency bucket (not cumulative).
    buckets: [AtomicU64; SLOTS],
    errors: [AtomicU64; ERRNOS.len()],
}

/// A connection's counters, written by it alone.
#[derive(Default)]
struct Counters {
    ops: [OpCounters; OPS.len()],
}

/// One operation's totals, as the scrape sees them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpTotals {
    /// Requests answered (with data, success or an error).
    pub requests: u64,
    /// Bytes read or written by requests answered with success.
    pub bytes: u64,
    /// Latency sum, in nanoseconds.
    pub nanos: u64,
    /// Requests per latency bucket (not cumulative; the last is `+Inf`).
    pub buckets: [u64; SLOTS],
    /// Error replies by [`ERRNOS`].
    pub errors: [u64; ERRNOS.len()],
}

/// An export's totals at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Connections in the transmission phase now.
    pub connections: u64,
    /// Connections that entered the transmission phase since start.
    pub connections_total: u64,
    pub ops: [OpTotals; OPS.len()],
}

impl Snapshot {
    fn add(&mut self, c: &Counters) {
        for (t, c) in self.ops.iter_mut().zip(&c.ops) {
            t.requests += c.requests.load(Relaxed);
            t.bytes += c.bytes.load(Relaxed);
            t.nanos += c.nanos.load(Relaxed);
            for (t, c) in t.buckets.iter_mut().zip(&c.buckets) {
                *t += c.load(Relaxed);
            }
            for (t, c) in t.errors.iter_mut().zip(&c.errors) {
                *t += c.load(Relaxed);
            }
        }
    }
}

/// One export's metrics: its live connections' counters and what ended
/// connections left.
pub struct ExportMetrics {
    name: String,
    inner: Mutex<Shared>,
}

#[derive(Default)]
struct Shared {
    live: Vec<Arc<Counters>>,
    /// Totals of connections that ended (their `connections` is unused).
    retired: Snapshot,
}

impl ExportMetrics {
    pub fn new(name: impl Into<String>) -> Arc<Self> {
        Arc::new(ExportMetrics { name: name.into(), inner: Mutex::default() })
    }

    /// The export's name (the `export` label).
    pub fn name(&self) -> &str {
        &self.name
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        // The counters stay consistent whatever panicked while it was held.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A connection enters the transmission phase on this export; its
    /// counters live as long as the returned handle.
    pub fn connect(self: &Arc<Self>) -> ConnMetrics {
        let counters = Arc::new(Counters::default());
        let mut s = self.lock();
        s.live.push(counters.clone());
        s.retired.connections_total += 1;
        ConnMetrics { export: self.clone(), counters }
    }

    /// The totals now.
    pub fn snapshot(&self) -> Snapshot {
        let s = self.lock();
        let mut snap = s.retired.clone();
        snap.connections = s.live.len() as u64;
        for c in &s.live {
            snap.add(c);
        }
        snap
    }
}

/// A connection's share of its export's metrics; ending it (drop) folds
/// its counters into the export's totals.
pub struct ConnMetrics {
    export: Arc<ExportMetrics>,
    counters: Arc<Counters>,
}

impl ConnMetrics {
    /// Counts a request answered after `latency`: `bytes` moved (reads and
    /// writes that succeeded), or the error it was answered with.
    pub fn answered(&self, typ: CmdType, bytes: u64, latency: Duration, error: Option<Errno>) {
        let c = &self.counters.ops[op_index(typ)];
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        bump(&c.requests, 1);
        bump(&c.nanos, ns);
        bump(&c.buckets[BUCKETS_NS.partition_point(|&b| b < ns)], 1);
        match error {
            Some(e) => bump(&c.errors[errno_index(e)], 1),
            None if bytes > 0 => bump(&c.bytes, bytes),
            None => {}
        }
    }
}

impl Drop for ConnMetrics {
    fn drop(&mut self) {
        let mut s = self.export.lock();
        s.live.retain(|c| !Arc::ptr_eq(c, &self.counters));
        s.retired.add(&self.counters);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_land_in_their_op_bucket_and_errno() {
        let m = ExportMetrics::new("disk");
        let c = m.connect();
        c.answered(CmdType::WRITE, 4096, Duration::from_micros(3), None);
        c.answered(CmdType::WRITE, 4096, Duration::from_micros(10), None);
        c.answered(CmdType::READ, 512, Duration::from_secs(60), Some(Errno::EIO));
        c.answered(CmdType(99), 0, Duration::ZERO, Some(Errno(1234)));
        let s = m.snapshot();
        assert_eq!((s.connections, s.connections_total), (1, 1));
        let w = &s.ops[1];
        assert_eq!((w.requests, w.bytes, w.nanos), (2, 8192, 13_000));
        // 3 us is under 5 us; 10 us is exactly the 10 us bound (le).
        assert_eq!((w.buckets[4], w.buckets[5]), (1, 1));
        let r = &s.ops[0];
        assert_eq!((r.requests, r.bytes, r.errors[1]), (1, 0, 1));
        assert_eq!(r.buckets[SLOTS - 1], 1, "past the last bound: +Inf");
        assert_eq!((s.ops[7].requests, s.ops[7].errors[8], s.ops[7].buckets[0]), (1, 1, 1));
    }

    #[test]
    fn ended_connections_keep_their_counts() {
        let m = ExportMetrics::new("");
        let a = m.connect();
        let b = m.connect();
        a.answered(CmdType::FLUSH, 0, Duration::from_millis(2), None);
        b.answered(CmdType::FLUSH, 0, Duration::from_millis(2), None);
        drop(a);
        let s = m.snapshot();
        assert_eq!((s.connections, s.connections_total, s.ops[2].requests), (1, 2, 2));
        drop(b);
        let s = m.snapshot();
        assert_eq!((s.connections, s.connections_total, s.ops[2].requests), (0, 2, 2));
        assert_eq!(s.ops[2].buckets[12], 2, "2 ms: the 2.5 ms bucket");
    }
}
