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

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use ringbd_io::aio::{AioDone, CompletionQueue, Sink};
use ringbd_io::buf::{Arena, IoBuf};
use ringbd_io::uring::{
    is_cancelled, is_out_of_buffers, is_unsupported, BufPiece, Completion, Features, Ring, RingConfig,
    RingStats, SendSource, Sock,
};

use crate::access::{Limits, Ticket};
use crate::conn::{Connection, IoOp};
use crate::exports::Exports;
use crate::listener::{Listener, Stream};
use crate::log;
use crate::out::OutBuf;

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

// SAFETY: an OutBuf's iovecs point into heap memory that moving it does
// not move: its byte Vec's buffer, its payload IoBufs' buffers, pages of a
// memory export it holds an Arc to (written only through Arc::make_mut,
// which copies a page another reference shares), and the static zero
// page. Nothing writes them while the ring owns the queue: the connection
// swaps in a new queue when it hands one to a send (`take_out`).
unsafe impl SendSource for OutBuf {
    fn len(&self) -> usize {
        OutBuf::len(self)
    }

    fn iovecs<'a>(&'a self, skip: usize, out: &mut Vec<IoSlice<'a>>) {
        OutBuf::iovecs(self, skip, out)
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
        exports: Arc<Exports>,
        opts: UringOptions,
        features: Features,
        limits: Limits,
    ) -> io::Result<Engine> {
        let stats = Arc::new(EngineStats { tls: exports.tls(), ..EngineStats::default() });
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
        // onto an eventfd-signalled queue per ring.
        let aio = exports.iter().any(|e| e.backend.aio().is_some());
        // Registered buffers only serve file exports' ring operations.
        let buffers =
            if exports.iter().any(|e| e.backend.file_fd().is_some()) { opts.registered_buffers } else { 0 };
        let mut workers = Vec::new();
        for (i, (ctl_rx, wake_rx)) in inboxes.into_iter().enumerate() {
            let cfg = RingConfig {
                entries: 1024,
                recv_buffers: opts.recv_buffers,
                recv_buffer_size: opts.recv_buffer_size,
                bundle: opts.bundle && features.bundle,
                incremental: opts.incremental,
            };
            let state = State {
                index: i,
                peers: peers.clone(),
                ctl_rx,
                wake_rx,
                listeners: listeners.clone(),
                exports: exports.clone(),
                conns: Vec::new(),
                free: Vec::new(),
                live: 0,
                stopping: None,
                coalesce: opts.coalesce,
                receive_share: opts.receive_share,
                zerocopy: if opts.zerocopy && features.send_zc {
                    Some(opts.zerocopy_threshold)
                } else {
                    None
                },
                stats: stats.clone(),
                limits: limits.clone(),
                handshakes: VecDeque::new(),
                timer_armed: false,
                next_serial: 0,
                local: Local::default(),
                seen: RingStats::default(),
                io_scratch: Vec::new(),
                aio: if aio { Some(Arc::new(CompletionQueue::new()?)) } else { None },
                aio_done: Vec::new(),
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
                Worker { ring, state }.run()
            })?;
            match ready_rx.recv() {
                Ok(Ok(note)) => {
                    if i == 0 {
                        log::warn(format_args!("io_uring resources per ring: {note}"));
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
                log::warn(format_args!(
                    "ring {index}: registering buffers: {e}; file I/O uses plain buffers"
                ));
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
/// How long connections get to finish once a stop is requested.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

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
    exports: Arc<Exports>,
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

impl Worker {
    fn run(mut self) -> io::Result<()> {
        let r = self.serve();
        if let Err(e) = &r {
            log::warn(format_args!("ring worker failed: {e}"));
        }
        r
    }

    fn serve(&mut self) -> io::Result<()> {
        let s = &mut self.state;
        for (i, l) in s.listeners.iter().enumerate() {
            self.ring.accept_multi(l.as_fd(), i as u32)?;
        }
        self.ring.poll_readable(s.wake_rx.as_fd(), WAKE_TOKEN)?;
        if let Some(q) = &s.aio {
            self.ring.poll_readable(q.as_fd(), AIO_TOKEN)?;
        }
        loop {
            self.ring.submit_and_wait(1)?;
            let state = &mut self.state;
            self.ring.completions(|ring, c| state.complete(ring, c));
            // File reads and writes that hit the page cache finish during
            // submission: start them now and collect their completions
            // before sending, so their replies join this turn's sends.
            if self.state.start_io(&mut self.ring) {
                self.ring.submit_and_wait(0)?;
                let state = &mut self.state;
                self.ring.completions(|ring, c| state.complete(ring, c));
            }
            self.state.flush(&mut self.ring);
            self.state.arm_deadline_timer(&mut self.ring);
            self.state.fold_stats(&self.ring);
            if let Some(since) = self.state.stopping {
                if self.state.live == 0 {
                    return Ok(());
                }
                if since.elapsed() > DRAIN_TIMEOUT {
                    self.state.abort_all();
                }
            }
        }
    }
}

impl State {
    fn complete(&mut self, ring: &mut Ring<OutBuf>, c: Completion<OutBuf>) {
        match c {
            Completion::Accept { listener, result, more } => {
                match result {
                    Ok(fd) => {
                        // Over --max-connections: closed before any byte.
                        let Some(ticket) = self.limits.gate.admit() else {
                            drop(fd);
                            return self.rearm_accept(ring, listener, more);
                        };
                        // Spread connections over the rings round robin; the
                        // kernel tends to hand every accept to one ring.
                        let n = self.peers.ctl.len();
                        let target = self.peers.next.fetch_add(1, Ordering::Relaxed) % n;
                        if target == self.index {
                            self.accepted(ring, listener, fd, ticket);
                        } else if let Err(e) = self.peers.send(target, Ctl::Conn(fd, listener, ticket)) {
                            log::warn(format_args!("handing a connection to ring {target}: {e}"));
                        }
                    }
                    Err(e) => log::warn(format_args!("accept: {e}")),
                }
                self.rearm_accept(ring, listener, more);
            }
            Completion::Recv { conn, result, more } => self.received(ring, conn, result, more),
            Completion::Send { conn, result, source, skip, copied } => {
                if let Some(Some(c)) = self.conns.get_mut(conn as usize) {
                    c.note_zerocopy(copied);
                }
                self.sent(ring, conn, result, source, skip)
            }
            Completion::Readable { token: WAKE_TOKEN } => self.woken(ring),
            Completion::Timer { .. } => {
                self.timer_armed = false;
                self.expire_handshakes();
                self.expire_stalled();
            }
            Completion::Readable { token: AIO_TOKEN } => self.aio_completed(ring),
            Completion::File { conn, token, result, buf } => {
                if let Some(Some(c)) = self.conns.get_mut(conn as usize) {
                    c.conn.io_complete(token, result, buf);
                    c.dirty = true;
                }
            }
            Completion::Readable { .. } | Completion::Cancelled => {}
        }
    }

    /// A multishot accept that ended (`more` false) is armed again.
    fn rearm_accept(&mut self, ring: &mut Ring<OutBuf>, listener: u32, more: bool) {
        if !more && self.stopping.is_none() {
            if let Some(l) = self.listeners.get(listener as usize) {
                if let Err(e) = ring.accept_multi(l.as_fd(), listener) {
                    log::warn(format_args!("re-arming accept: {e}"));
                }
            }
        }
    }

    /// Drops the connections whose handshake deadline has passed while
    /// they are still haggling.
    fn expire_handshakes(&mut self) {
        let now = Instant::now();
        while let Some(&(deadline, id, serial)) = self.handshakes.front() {
            if deadline > now {
                break;
            }
            self.handshakes.pop_front();
            let Some(Some(c)) = self.conns.get_mut(id as usize) else { continue };
            if c.serial != serial || !c.conn.in_handshake() || c.broken {
                continue;
            }
            log::warn(format_args!(
                "{}: handshake not finished within {:?} (--handshake-timeout); closing",
                c.stream.peer(),
                self.limits.handshake_timeout.unwrap_or_default()
            ));
            c.broken = true;
            c.stream.shutdown(Shutdown::Both).ok();
            c.dirty = true;
        }
    }

    /// Closes the connections whose replies have waited `--reply-timeout`
    /// without the socket taking a byte (a client that stopped reading):
    /// what they hold comes back.
    fn expire_stalled(&mut self) {
        let Some(timeout) = self.limits.reply_timeout else { return };
        let now = Instant::now();
        for c in self.conns.iter_mut().flatten() {
            let Some(since) = c.stalled_since else { continue };
            if c.broken || now.duration_since(since) < timeout {
                continue;
            }
            c.end(format_args!(
                "none of its {} bytes of replies could be sent for {:?} (--reply-timeout)",
                c.sending + c.conn.out().len(),
                timeout
            ));
            self.local.reply_timeouts += 1;
            // The send in flight ends with an error once the socket is shut.
            c.stream.shutdown(Shutdown::Both).ok();
            c.dirty = true;
        }
    }

    /// Sets the ring timer for the oldest connection still haggling, a
    /// little after its deadline so that one wake-up covers a batch, and,
    /// while replies wait anywhere, for the next check of the reply
    /// timeout (a tick of a quarter of it, at most a second).
    fn arm_deadline_timer(&mut self, ring: &mut Ring<OutBuf>) {
        if self.timer_armed || self.stopping.is_some() {
            return;
        }
        let mut after: Option<Duration> = None;
        if let Some(timeout) = self.limits.handshake_timeout {
            // Connections that finished haggling (or left) need no wake-up.
            while let Some(&(_, id, serial)) = self.handshakes.front() {
                match self.conns.get(id as usize) {
                    Some(Some(c)) if c.serial == serial && c.conn.in_handshake() && !c.broken => break,
                    _ => {
                        self.handshakes.pop_front();
                    }
                }
            }
            if let Some(&(deadline, _, _)) = self.handshakes.front() {
                let slack = (timeout / 10).min(Duration::from_millis(100));
                after = Some(deadline.saturating_duration_since(Instant::now()) + slack);
            }
        }
        if let Some(timeout) = self.limits.reply_timeout {
            if self.conns.iter().flatten().any(|c| c.stalled_since.is_some()) {
                let tick = (timeout / 4).min(Duration::from_secs(1));
                after = Some(after.map_or(tick, |a| a.min(tick)));
            }
        }
        let Some(after) = after else { return };
        match ring.timer(after, DEADLINE_TOKEN) {
            Ok(armed) => self.timer_armed = armed,
            Err(e) => log::warn(format_args!("arming the deadline timer: {e}")),
        }
    }

    fn accepted(&mut self, ring: &mut Ring<OutBuf>, listener: u32, fd: OwnedFd, ticket: Ticket) {
        if self.stopping.is_some() {
            return; // dropping the fd closes it
        }
        let tcp = matches!(self.listeners.get(listener as usize), Some(Listener::Tcp(_)));
        let stream = match self.listeners.get(listener as usize) {
            Some(Listener::Tcp(_)) => {
                let s = TcpStream::from(fd);
                if let Err(e) = s.set_nodelay(true) {
                    log::warn(format_args!("TCP_NODELAY: {e}"));
                }
                Stream::Tcp(s)
            }
            _ => Stream::Unix(UnixStream::from(fd)),
        };
        let mut conn = Connection::new(self.exports.clone(), stream.peer());
        if tcp {
            conn.allow_ktls();
        }
        // File exports: reads, writes and flushes become ring operations.
        conn.enable_async_file_io(ring.arena().cloned());
        if !self.coalesce {
            conn.set_reply_limit(1);
        }
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                self.conns.push(None);
                (self.conns.len() - 1) as u32
            }
        };
        let sock = match ring.register_socket(stream.as_fd()) {
            Ok(Some(s)) => s,
            Ok(None) => Sock::raw(stream.as_fd()),
            Err(e) => {
                log::debug(format_args!("registering a socket: {e}"));
                Sock::raw(stream.as_fd())
            }
        };
        let serial = self.next_serial;
        self.next_serial += 1;
        if let Some(t) = self.limits.handshake_timeout {
            self.handshakes.push_back((Instant::now() + t, id, serial));
        }
        let mut c = Conn {
            stream,
            _ticket: ticket,
            serial,
            sock,
            conn,
            recv_armed: false,
            cancel_sent: false,
            send_inflight: false,
            backlog: VecDeque::new(),
            spill: Vec::new(),
            spill_at: 0,
            stalled_since: None,
            sending: 0,
            broken: false,
            zc_ok: tcp,
            zc_copied_streak: 0,
            shut: false,
            dirty: true,
        };
        match ring.recv_multi(c.sock, id, self.receive_share) {
            Ok(()) => c.recv_armed = true,
            Err(e) => c.end(format_args!("arming its receive: {e}")),
        }
        self.conns[id as usize] = Some(c);
        self.live += 1;
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
    }

    fn received(
        &mut self,
        ring: &mut Ring<OutBuf>,
        id: u32,
        result: io::Result<ringbd_io::uring::RecvBufs>,
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
            Err(e) => {
                c.conn.peer_closed();
                c.end(format_args!("receive: {e}"));
            }
        }
    }

    fn sent(
        &mut self,
        ring: &mut Ring<OutBuf>,
        id: u32,
        result: io::Result<usize>,
        source: OutBuf,
        skip: usize,
    ) {
        let Some(Some(c)) = self.conns.get_mut(id as usize) else { return };
        c.send_inflight = false;
        c.dirty = true;
        if matches!(result, Ok(n) if n > 0) {
            // The socket took bytes: the client is reading.
            c.stalled_since = None;
        }
        match result {
            Ok(n) if skip + n < source.len() && n > 0 => {
                // Short send (a full socket, or more than IOV_MAX pieces):
                // the rest goes first, before anything newer.
                let zc = c.zc_ok && self.zerocopy.is_some_and(|t| source.largest_payload() >= t);
                c.sending = source.len() - skip - n;
                match ring.send(c.sock, id, source, skip + n, false, zc) {
                    Ok(()) => c.send_inflight = true,
                    Err(e) => c.end(format_args!("send: {e}")),
                }
            }
            Ok(0) if !source.is_empty() => c.end(format_args!("send: the socket took no bytes")),
            Ok(_) => {
                self.local.replies += u64::from(source.replies());
                c.conn.recycle(source);
            }
            Err(e) if is_unsupported(&e) && c.zc_ok => {
                // This socket cannot do zero-copy: send normally from now on.
                c.zc_ok = false;
                c.sending = source.len() - skip;
                match ring.send(c.sock, id, source, skip, false, false) {
                    Ok(()) => c.send_inflight = true,
                    Err(e) => c.end(format_args!("send: {e}")),
                }
            }
            Err(e) => c.end(format_args!("send of {} bytes: {e}", source.len() - skip)),
        }
    }

    /// After a batch of completions: feed backlogs, send queued replies,
    /// re-arm receives, close finished connections.
    /// Feeds backlogs and starts the file operations they produce; returns
    /// whether any operation was started.
    fn start_io(&mut self, ring: &mut Ring<OutBuf>) -> bool {
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
    fn submit_io(&mut self, ring: &mut Ring<OutBuf>, id: usize) -> bool {
        let Some(Some(c)) = self.conns.get_mut(id) else { return false };
        c.conn.take_io(&mut self.io_scratch);
        if self.io_scratch.is_empty() {
            return false;
        }
        if let (Some(aio), Some(q)) = (c.conn.aio(), &self.aio) {
            // The backend runs them (librbd); completions come back
            // through the queue's eventfd.
            for io in self.io_scratch.drain(..) {
                let tag = (id as u64) << 32 | u64::from(io.token);
                let sink = Sink::Queue { queue: q.clone(), tag };
                match io.op {
                    IoOp::File(op) => aio.submit(op, io.buf, sink),
                    IoOp::Extents { offset, len } => aio.submit_extents(offset, len, sink),
                }
                self.local.aio += 1;
            }
            return false;
        }
        let mut started = false;
        for io in self.io_scratch.drain(..) {
            let r = match (c.conn.file_fd(io.direct), io.op) {
                (Some(fd), IoOp::File(op)) => ring.file_op(fd, id as u32, io.token, op, io.buf),
                (None, _) => Err(io::Error::other("no file behind this export")),
                // Connections only queue these for asynchronous backends.
                (Some(_), IoOp::Extents { .. }) => {
                    Err(io::Error::other("block status is not a ring operation"))
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

    fn flush(&mut self, ring: &mut Ring<OutBuf>) {
        for id in 0..self.conns.len() {
            match &self.conns[id] {
                Some(c) if c.dirty => {}
                _ => continue,
            }
            // Operations queued by completions collected after start_io
            // (the next piece of a large read, the rest of a short
            // transfer) start now: nothing else would start them.
            self.submit_io(ring, id);
            let Some(c) = &mut self.conns[id] else { continue };
            c.dirty = false;
            if !c.send_inflight && !c.conn.out().is_empty() && !c.broken {
                let out = c.conn.take_out();
                // More replies follow right after this send: let TCP cork.
                let more = c.has_backlog();
                let zc = c.zc_ok && self.zerocopy.is_some_and(|t| out.largest_payload() >= t);
                c.sending = out.len();
                match ring.send(c.sock, id as u32, out, 0, more, zc) {
                    Ok(()) => c.send_inflight = true,
                    Err(e) => c.end(format_args!("send: {e}")),
                }
            }
            // Replies waiting: the reply timeout runs from now, unless it
            // already runs (only a byte the socket takes resets it).
            if c.send_inflight {
                c.stalled_since.get_or_insert_with(Instant::now);
            } else {
                c.stalled_since = None;
            }
            // Input it cannot take now leaves the shared buffers.
            if !c.backlog.is_empty() && !c.conn.wants_input() && !c.conn.is_closed() {
                self.local.spilled += c.spill_backlog(ring) as u64;
            }
            if !c.broken && !c.send_inflight && !c.has_backlog() && c.conn.ktls_ready() {
                // Received bytes must not leave the socket between the last
                // record rustls sees and TLS_RX: stop the receive first.
                if !c.recv_armed {
                    if c.conn.enable_ktls(c.stream.as_fd()) {
                        // The kernel encrypts from our pages during the
                        // send itself: SEND_ZC would only add a
                        // notification (it always reports "copied").
                        c.zc_ok = false;
                    }
                } else if !c.cancel_sent && c.conn.ktls_stop_receive() && ring.cancel_recv(id as u32).is_ok()
                {
                    c.cancel_sent = true;
                }
            }
            let finished = c.conn.is_closed() || c.broken;
            if !finished
                && !c.recv_armed
                && !c.has_backlog()
                && c.conn.wants_input()
                && ring.free_recv_buffers() > 0
            {
                let share = self.receive_share.map(|n| c.conn.receive_share(n));
                match ring.recv_multi(c.sock, id as u32, share) {
                    Ok(()) => c.recv_armed = true,
                    Err(e) => c.end(format_args!("re-arming its receive: {e}")),
                }
            }
            if finished && !c.send_inflight && c.conn.io_pending() == 0 {
                if !c.shut {
                    c.shut = true;
                    if !c.broken {
                        c.conn.ktls_close_notify(c.stream.as_fd());
                    }
                    c.stream.shutdown(Shutdown::Both).ok();
                }
                if !c.recv_armed {
                    c.backlog.drain(..).for_each(|p| ring.recycle(p));
                    // The table holds a reference: without this the socket
                    // would stay open after the stream is dropped.
                    if let Err(e) = ring.unregister_socket(c.sock) {
                        log::warn(format_args!("unregistering a socket: {e}"));
                    }
                    self.conns[id] = None;
                    self.free.push(id as u32);
                    self.live -= 1;
                }
            } else if !c.recv_armed && !finished && !c.has_backlog() && c.conn.wants_input() {
                // Waiting for receive buffers: look again next turn.
                c.dirty = true;
            }
        }
    }

    /// The wake-up pipe is readable: drain it and the message channel, then
    /// poll again.
    fn woken(&mut self, ring: &mut Ring<OutBuf>) {
        let mut b = [0u8; 64];
        // The poll said readable, so this read does not block.
        if let Err(e) = (&self.wake_rx).read(&mut b) {
            log::warn(format_args!("wake-up pipe: {e}"));
        }
        while let Ok(msg) = self.ctl_rx.try_recv() {
            match msg {
                Ctl::Conn(fd, listener, ticket) => self.accepted(ring, listener, fd, ticket),
                Ctl::Stop => self.stop(),
            }
        }
        if let Err(e) = ring.poll_readable(self.wake_rx.as_fd(), WAKE_TOKEN) {
            log::warn(format_args!("re-arming the wake-up poll: {e}"));
        }
    }

    /// The asynchronous backends' queue is readable: hand each finished
    /// operation to its connection, then poll again.
    fn aio_completed(&mut self, ring: &mut Ring<OutBuf>) {
        let Some(q) = self.aio.clone() else { return };
        if let Err(e) = q.drain(&mut self.aio_done) {
            log::warn(format_args!("reading the completion eventfd: {e}"));
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
            log::warn(format_args!("re-arming the completion poll: {e}"));
        }
    }

    fn stop(&mut self) {
        if self.stopping.is_some() {
            return;
        }
        self.stopping = Some(Instant::now());
        for c in self.conns.iter_mut().flatten() {
            // Requests already received are answered; nothing new is read.
            c.stream.shutdown(Shutdown::Read).ok();
            c.dirty = true;
        }
    }

    fn abort_all(&mut self) {
        for c in self.conns.iter_mut().flatten() {
            c.broken = true;
            c.stream.shutdown(Shutdown::Both).ok();
            c.dirty = true;
        }
    }

    fn fold_stats(&mut self, ring: &Ring<OutBuf>) {
        let s = &self.stats;
        s.requests.fetch_add(std::mem::take(&mut self.local.requests), Ordering::Relaxed);
        s.replies.fetch_add(std::mem::take(&mut self.local.replies), Ordering::Relaxed);
        s.file_direct.fetch_add(std::mem::take(&mut self.local.direct), Ordering::Relaxed);
        s.aio_ops.fetch_add(std::mem::take(&mut self.local.aio), Ordering::Relaxed);
        s.spilled_bytes.fetch_add(std::mem::take(&mut self.local.spilled), Ordering::Relaxed);
        s.reply_timeouts.fetch_add(std::mem::take(&mut self.local.reply_timeouts), Ordering::Relaxed);
        // Ring counters are cumulative per ring: publish the deltas.
        let rs = ring.stats;
        s.recv_completions
            .fetch_add(rs.recv_completions.saturating_sub(self.seen.recv_completions), Ordering::Relaxed);
        s.recv_buffers.fetch_add(rs.recv_buffers.saturating_sub(self.seen.recv_buffers), Ordering::Relaxed);
        s.send_calls.fetch_add(rs.send_calls.saturating_sub(self.seen.send_calls), Ordering::Relaxed);
        s.enters.fetch_add(rs.enters.saturating_sub(self.seen.enters), Ordering::Relaxed);
        s.zc_sends.fetch_add(rs.zc_sends.saturating_sub(self.seen.zc_sends), Ordering::Relaxed);
        s.zc_copied.fetch_add(rs.zc_copied.saturating_sub(self.seen.zc_copied), Ordering::Relaxed);
        s.file_ops.fetch_add(rs.file_ops.saturating_sub(self.seen.file_ops), Ordering::Relaxed);
        s.file_fixed.fetch_add(rs.file_fixed.saturating_sub(self.seen.file_fixed), Ordering::Relaxed);
        s.buf_resyncs.fetch_add(rs.buf_resyncs.saturating_sub(self.seen.buf_resyncs), Ordering::Relaxed);
        self.seen = rs;
    }
}

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

/// Zero-copy sends the kernel copied in a row before a connection stops
/// asking for zero-copy (it only costs a notification and a pinned buffer).
const ZC_COPIED_LIMIT: u8 = 4;

impl Conn {
    /// Learns from a zero-copy notification whether zero-copy pays here.
    fn note_zerocopy(&mut self, copied: Option<bool>) {
        match copied {
            Some(true) => {
                self.zc_copied_streak += 1;
                if self.zc_copied_streak >= ZC_COPIED_LIMIT && self.zc_ok {
                    self.zc_ok = false;
                    log::debug(format_args!(
                        "the kernel copied {ZC_COPIED_LIMIT} zero-copy sends in a row (a local peer?); \
                         plain sends from now on for this connection"
                    ));
                }
            }
            Some(false) => self.zc_copied_streak = 0,
            None => {}
        }
    }

    /// Whether received bytes wait to be consumed.
    fn has_backlog(&self) -> bool {
        self.spill_at < self.spill.len() || !self.backlog.is_empty()
    }

    /// Feeds the spilled bytes, then the backlog buffers, to the connection
    /// while it takes input, returning fully consumed buffers to the ring.
    fn consume_backlog(&mut self, ring: &mut Ring<OutBuf>, local: &mut Local) {
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
    fn spill_backlog(&mut self, ring: &mut Ring<OutBuf>) -> usize {
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

    /// Ends the connection for an error of its socket, saying so.
    fn end(&mut self, why: std::fmt::Arguments<'_>) {
        if !self.broken {
            log::warn(format_args!("{}: {why}; closing the connection", self.stream.peer()));
        }
        self.broken = true;
    }
}
