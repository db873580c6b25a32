//! The io_uring engine: one ring per worker thread, each running the same
//! [`Connection`] state machine as the portable engine.
//!
//! - Every worker arms a multishot accept on every listener; the kernel
//!   hands each new connection to one of them, spreading connections over
//!   the rings.
//! - Each connection has one multishot receive into the worker's
//!   provided-buffer ring, with bundles where the kernel has them, so one
//!   completion can carry many requests; buffers go back to the ring as soon
//!   as their bytes are consumed.
//! - After each batch of completions, every connection's queued replies
//!   leave in one `sendmsg` (headers and payloads as iovecs); one send is in
//!   flight per connection, and replies produced meanwhile join the next.
//! - Backpressure: a connection whose reply queue is full keeps its unread
//!   buffers as a backlog and its receive is cancelled until the queue
//!   drains.
//! - kTLS: a TLS connection whose session is idle (see `conn/ktls_io.rs`) with
//!   no send in flight gets its receive stopped; once the receive's last
//!   completion is in and the connection is still idle, the keys go to the
//!   kernel and the receive is armed again, now reading plaintext. A
//!   record that is not application data ends a receive with `EIO`.
//!
//! Files: this one holds the engine's public face (options, counters,
//! start and stop) and the state of a worker and of each connection;
//! `worker.rs` the loop that drives a ring; `receive.rs` the receive path
//! (backlogs of provided buffers, spilling); `send.rs` the send path
//! (batched replies, zero-copy); `backend_io.rs` the file operations on
//! the ring and the asynchronous backends' completions.

mod backend_io;
mod receive;
// `unsafe impl SendSource for OutBuf`: the ring's zero-copy sends read the
// reply queue's memory until their notification.
#[allow(unsafe_code)]
mod send;
mod worker;

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::Instant;

use ringbd_backend::aio::{AioDone, CompletionQueue};
use ringbd_io::buf::Arena;
use ringbd_io::uring::{BufPiece, Features, Ring, RingConfig, RingStats, Sock};

use crate::access::{Limits, Ticket};
use crate::conn::Connection;
use crate::exports::ExportTable;
use crate::listener::{Listener, Stream};
use crate::out::OutBuf;

pub use receive::RECV_SHARE;

/// Switches of the io_uring engine (the A/B knobs of the benchmarks).
#[derive(Debug, Clone, Copy)]
pub struct UringOptions {
    pub threads: usize,
    /// Receive bundles (several buffers per completion).
    pub bundle: bool,
    /// Batch all ready replies into one send (off: one send per reply).
    pub coalesce: bool,
    pub recv_buffers: u16,
    pub recv_buffer_size: u32,
    /// Zero-copy sends (SENDMSG_ZC) over TCP for batches carrying at least
    /// `zerocopy_threshold` bytes of read payload.
    pub zerocopy: bool,
    pub zerocopy_threshold: usize,
    /// Incremental receive-buffer consumption (IOU_PBUF_RING_INC).
    pub incremental: bool,
    /// Sockets in each ring's registered-file table.
    pub fixed_files: bool,
    /// Bytes of registered buffers per ring for file exports' reads and
    /// writes (0: none).
    pub registered_buffers: usize,
    /// Most bytes one arming of a connection's receive takes (`None`: no
    /// limit); see [`RECV_SHARE`].
    pub receive_share: Option<u32>,
}

impl Default for UringOptions {
    fn default() -> Self {
        UringOptions {
            threads: thread::available_parallelism().map_or(1, |n| n.get()),
            bundle: true,
            coalesce: true,
            recv_buffers: 512,
            recv_buffer_size: 32 * 1024,
            zerocopy: true,
            zerocopy_threshold: 64 * 1024,
            fixed_files: true,
            incremental: true,
            registered_buffers: 8 << 20,
            receive_share: Some(RECV_SHARE),
        }
    }
}

/// Counters shared by all workers, for `--stats-interval` and the exit report.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub connections: AtomicU64,
    pub requests: AtomicU64,
    pub recv_completions: AtomicU64,
    pub recv_buffers: AtomicU64,
    pub send_calls: AtomicU64,
    pub replies: AtomicU64,
    pub enters: AtomicU64,
    pub zc_sends: AtomicU64,
    pub zc_copied: AtomicU64,
    pub file_ops: AtomicU64,
    pub file_fixed: AtomicU64,
    pub file_direct: AtomicU64,
    /// Operations run by an asynchronous backend (librbd) for this engine.
    pub aio_ops: AtomicU64,
    /// Received bytes copied out of the shared receive buffers because
    /// their connection could not take them yet.
    pub spilled_bytes: AtomicU64,
    /// Connections closed by `--reply-timeout`.
    pub reply_timeouts: AtomicU64,
    /// Receive completions that disagreed with our view of the buffer ring.
    pub buf_resyncs: AtomicU64,
    /// TLS sessions by where they are encrypted (when TLS is on).
    pub tls: Option<Arc<crate::tls::TlsServer>>,
}

impl EngineStats {
    /// One line of ratios that show each technique engaged.
    pub fn summary(&self) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (req, rc, rb, sc, rep, en) = (
            g(&self.requests),
            g(&self.recv_completions),
            g(&self.recv_buffers),
            g(&self.send_calls),
            g(&self.replies),
            g(&self.enters),
        );
        let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        format!(
            "connections {}, requests {req}, requests/recv completion {:.2}, buffers/recv completion {:.2}, \
             replies/send {:.2}, ring enters/request {:.3}, zero-copy sends {}, zero-copy sends the kernel copied {}, \
             file ops on the ring {}, file ops with registered buffers {}, file ops with O_DIRECT {}, \
             async backend ops {}, received bytes spilled {}, reply timeouts {}, buffer ring resyncs {}",
            g(&self.connections),
            ratio(req, rc),
            ratio(rb, rc),
            ratio(rep, sc),
            ratio(en, req),
            g(&self.zc_sends),
            g(&self.zc_copied),
            g(&self.file_ops),
            g(&self.file_fixed),
            g(&self.file_direct),
            g(&self.aio_ops),
            g(&self.spilled_bytes),
            g(&self.reply_timeouts),
            g(&self.buf_resyncs),
        ) + &self.tls.as_ref().map_or_else(String::new, |t| format!(", {}", t.stats.summary()))
    }
}

/// Running workers.
pub struct Engine {
    workers: Vec<thread::JoinHandle<io::Result<()>>>,
    peers: Arc<Peers>,
    pub stats: Arc<EngineStats>,
}

/// A message to a worker.
enum Ctl {
    /// A connection accepted by another worker, handed over to spread load.
    Conn(OwnedFd, u32, Ticket),
    Stop,
}

/// How workers reach each other: a channel plus a wake-up pipe each.
struct Peers {
    ctl: Vec<(mpsc::Sender<Ctl>, std::io::PipeWriter)>,
    /// Round-robin counter choosing the worker for each new connection.
    next: AtomicUsize,
}

impl Peers {
    fn send(&self, worker: usize, msg: Ctl) -> io::Result<()> {
        let (tx, wake) = &self.ctl[worker];
        tx.send(msg).map_err(|_| io::Error::other("worker has exited"))?;
        let mut w: &std::io::PipeWriter = wake;
        w.write_all(b"w")
    }
}

impl Engine {
    /// Starts `opts.threads` workers serving `listeners`.
    pub fn start(
        listeners: Arc<Vec<Listener>>,
        exports: Arc<ExportTable>,
        opts: UringOptions,
        features: Features,
        limits: Limits,
    ) -> io::Result<Engine> {
        let stats = Arc::new(EngineStats { tls: exports.load().tls(), ..EngineStats::default() });
        let n = opts.threads.max(1);
        let mut ctl = Vec::with_capacity(n);
        let mut inboxes = Vec::with_capacity(n);
        for _ in 0..n {
            let (wake_rx, wake_tx) = io::pipe()?;
            let (tx, rx) = mpsc::channel();
            ctl.push((tx, wake_tx));
            inboxes.push((rx, wake_rx));
        }
        let peers = Arc::new(Peers { ctl, next: AtomicUsize::new(0) });
        // Exports whose backend runs its own asynchronous I/O (RBD) complete
        // onto an eventfd-signalled queue per ring. Every ring has one (an
        // eventfd and a poll that never fires without such exports): a
        // reload may add one.
        // Registered buffers only serve file exports' ring operations (a
        // file export added by a reload to a server that had none uses
        // plain buffers).
        let buffers = if exports.load().iter().any(|e| e.backend.file_fd().is_some()) {
            opts.registered_buffers
        } else {
            0
        };
        let mut workers = Vec::new();
        for (i, (ctl_rx, wake_rx)) in inboxes.into_iter().enumerate() {
            let cfg = RingConfig {
                entries: 1024,
                recv_buffers: opts.recv_buffers,
                recv_buffer_size: opts.recv_buffer_size,
                bundle: opts.bundle && features.bundle,
                incremental: opts.incremental,
            };
            let (peers_i, listeners_i, exports_i, stats_i, limits_i) =
                (peers.clone(), listeners.clone(), exports.clone(), stats.clone(), limits.clone());
            let aio = Arc::new(CompletionQueue::new()?);
            let (coalesce, receive_share) = (opts.coalesce, opts.receive_share);
            let zerocopy =
                if opts.zerocopy && features.send_zc { Some(opts.zerocopy_threshold) } else { None };
            // Made on the worker's thread: its drivers (`drivers`) stay there.
            let make_state = move || State {
                index: i,
                peers: peers_i,
                ctl_rx,
                wake_rx,
                listeners: listeners_i,
                exports: exports_i,
                conns: Vec::new(),
                free: Vec::new(),
                live: 0,
                stopping: None,
                coalesce,
                receive_share,
                zerocopy,
                stats: stats_i,
                limits: limits_i,
                handshakes: VecDeque::new(),
                timer_armed: false,
                next_serial: 0,
                local: Local::default(),
                seen: RingStats::default(),
                io_scratch: Vec::new(),
                aio: Some(aio),
                aio_done: Vec::new(),
                drivers: Vec::new(),
            };
            // The ring is created on its own thread: a SINGLE_ISSUER ring
            // accepts submissions only from the thread that made it.
            let (ready_tx, ready_rx) = mpsc::channel();
            let h = thread::Builder::new().name(format!("ring-{i}")).spawn(move || {
                let ring = match Ring::new(cfg, &features) {
                    Ok(mut r) => {
                        let note = register(&mut r, i, opts.fixed_files, buffers);
                        ready_tx.send(Ok(note)).ok();
                        r
                    }
                    Err(e) => {
                        let msg = e.to_string();
                        ready_tx.send(Err(e)).ok();
                        return Err(io::Error::other(msg));
                    }
                };
                Worker { ring, state: make_state() }.run()
            })?;
            match ready_rx.recv() {
                Ok(Ok(note)) => {
                    if i == 0 {
                        tracing::info!("io_uring resources per ring: {note}");
                    }
                    workers.push(h)
                }
                Ok(Err(e)) => {
                    h.join().ok();
                    return Err(io::Error::new(e.kind(), format!("creating io_uring ring: {e}")));
                }
                Err(_) => return Err(io::Error::other("ring worker died during start-up")),
            }
        }
        Ok(Engine { workers, peers, stats })
    }
    /// Asks every worker to stop: no new connections, in-flight requests
    /// answered, then sockets closed. Waits for them.
    pub fn stop(self) -> io::Result<()> {
        let mut first_err = None;
        for i in 0..self.workers.len() {
            if let Err(e) = self.peers.send(i, Ctl::Stop) {
                first_err.get_or_insert(e);
            }
        }
        for h in self.workers {
            match h.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(_) => {
                    first_err.get_or_insert(io::Error::other("a ring worker panicked"));
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// Sockets per ring's registered-file table (more connections use their
/// plain descriptors).
const FIXED_FILE_SLOTS: u32 = 4096;

/// Registers a new ring's file table and buffers; says what it got. Either
/// failing (old kernel, RLIMIT_MEMLOCK) leaves the plain path.
fn register(ring: &mut Ring<OutBuf>, index: usize, fixed_files: bool, buffers: usize) -> String {
    let mut said = Vec::new();
    if fixed_files {
        match ring.enable_fixed_files(FIXED_FILE_SLOTS) {
            Ok(()) => said.push(format!("registered file table ({FIXED_FILE_SLOTS} sockets)")),
            Err(e) => said.push(format!("no registered file table ({e})")),
        }
    }
    if buffers > 0 {
        // Small chunks for small I/O, a few large ones for large I/O.
        let large = if buffers >= 4 << 20 { (buffers / 2) >> 20 } else { 0 };
        let small = (buffers - (large << 20)) / (64 << 10);
        let classes = [(64 << 10, small.min(4096) as u16), (1 << 20, large.min(4096) as u16)];
        match Arena::with_classes(&classes).and_then(|a| ring.register_arena(a)) {
            Ok(()) => said.push(format!(
                "{} MiB registered buffers ({small} x 64 KiB, {large} x 1 MiB)",
                buffers >> 20
            )),
            Err(e) => {
                tracing::warn!("ring {index}: registering buffers: {e}; file I/O uses plain buffers");
                said.push("no registered buffers".into());
            }
        }
    }
    if said.is_empty() {
        "none".into()
    } else {
        said.join(", ")
    }
}

/// Token of the wake-up pipe's poll.
const WAKE_TOKEN: u32 = u32::MAX;
/// Token of the handshake-deadline timer.
const DEADLINE_TOKEN: u32 = u32::MAX - 1;
/// Token of the asynchronous-backend completion queue's poll.
const AIO_TOKEN: u32 = u32::MAX - 2;

struct Worker {
    ring: Ring<OutBuf>,
    state: State,
}

/// Per-worker counters, folded into the shared ones once per loop turn.
#[derive(Default)]
struct Local {
    requests: u64,
    replies: u64,
    direct: u64,
    aio: u64,
    spilled: u64,
    reply_timeouts: u64,
}

struct State {
    index: usize,
    peers: Arc<Peers>,
    ctl_rx: mpsc::Receiver<Ctl>,
    wake_rx: std::io::PipeReader,
    listeners: Arc<Vec<Listener>>,
    /// Each new connection takes the table current at its accept.
    exports: Arc<ExportTable>,
    conns: Vec<Option<Conn>>,
    free: Vec<u32>,
    live: usize,
    stopping: Option<Instant>,
    coalesce: bool,
    /// `--receive-share`.
    receive_share: Option<u32>,
    /// Zero-copy threshold, when zero-copy sends are on.
    zerocopy: Option<usize>,
    stats: Arc<EngineStats>,
    /// `--max-connections` and the handshake deadline.
    limits: Limits,
    /// Connections in accept order with their handshake deadlines (all
    /// connections get the same timeout, so the front expires first):
    /// (deadline, slot, serial).
    handshakes: VecDeque<(Instant, u32, u64)>,
    /// A ring timer is set for the front of `handshakes`.
    timer_armed: bool,
    next_serial: u64,
    local: Local,
    /// Ring counters already published.
    seen: RingStats,
    /// File operations being started (reused).
    io_scratch: Vec<crate::conn::IoRequest>,
    /// Where asynchronous backends (RBD) deliver this ring's completions.
    aio: Option<Arc<CompletionQueue>>,
    /// Completions taken from `aio` (reused).
    aio_done: Vec<AioDone>,
    /// Asynchronous backends driven by this worker itself (the NBD
    /// client's connections of this thread), one per export in use here.
    drivers: Vec<backend_io::Driver>,
}

struct Conn {
    stream: Stream,
    /// Its place under `--max-connections`, freed when the slot is.
    _ticket: Ticket,
    /// Tells apart connections that reuse a slot (for `handshakes`).
    serial: u64,
    /// How ring operations name the socket (registered slot or descriptor).
    sock: Sock,
    conn: Connection,
    recv_armed: bool,
    cancel_sent: bool,
    send_inflight: bool,
    /// Received bytes not yet consumed, in the ring's shared buffers.
    backlog: VecDeque<BufPiece>,
    /// Received bytes not yet consumed, copied out of the shared buffers
    /// (`spill[spill_at..]`; they come before `backlog`): a connection
    /// that cannot take its input now holds none of the ring's buffers
    /// past the loop turn that received them (docs/engine.md).
    spill: Vec<u8>,
    spill_at: usize,
    /// Since when replies have been waiting without the socket taking a
    /// byte of them (`--reply-timeout`); `None` with nothing waiting.
    stalled_since: Option<Instant>,
    /// Bytes of the send in flight not yet taken by the socket.
    sending: usize,
    /// The socket failed; drop whatever is queued.
    broken: bool,
    /// TCP (zero-copy sends apply); false after the kernel refused one, or
    /// copied several in a row (loopback peers: nothing to gain).
    zc_ok: bool,
    /// Consecutive zero-copy sends the kernel copied anyway.
    zc_copied_streak: u8,
    shut: bool,
    dirty: bool,
}

impl Conn {
    /// Ends the connection for an error of its socket, saying so.
    fn end(&mut self, why: std::fmt::Arguments<'_>) {
        if !self.broken {
            tracing::warn!("{}: {why}; closing the connection", self.stream.peer());
        }
        self.broken = true;
    }
}
