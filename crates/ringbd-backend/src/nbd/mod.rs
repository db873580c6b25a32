//! `nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH` and their
//! TLS forms: another server's export as a backend, so `ringbd serve
//! nbd://...` is a proxy (nbdkit's nbd plugin, qemu-nbd over an nbd
//! block node).
//!
//! Two ways to run the client ([`ringbd_client::Engine`]: connections on
//! one io_uring ring):
//! - **On the caller's thread** ([`AsyncIo::local`], module `local`): a server
//!   worker or a ublk queue gets a driver with its own connection, whose
//!   ring the kernel reports through the caller's completion eventfd; the
//!   caller's loop sends and receives for it. No thread hop, no channel.
//!   Only where the upstream allows several connections
//!   (`CAN_MULTI_CONN`), since every caller thread adds one.
//! - **On the export's worker thread**, which every caller can use: the
//!   threaded engine, blocking callers ([`Backend`]'s methods), an upstream
//!   that allows one connection, and a driver's requests while it connects
//!   or after its connection failed. A submission goes to the worker over a
//!   channel and an eventfd write wakes it out of its ring wait
//!   ([`Engine::set_wake`]); the reply comes back through the operation's
//!   sink, like librbd's callbacks.
//!
//! Connections: the worker has as many as the upstream allows
//! (`CAN_MULTI_CONN`: 4, else 1), requests going to the least busy; each
//! driver has one more. A flush on any of them covers every write completed
//! through this export (the upstream is multi-conn wherever there is more
//! than one), so the export is multi-conn either way.
//!
//! Passed through: reads, writes with FUA, flush, trim, write-zeroes (with
//! FUA as a following flush), block status (`base:allocation`, where the
//! upstream agreed to it), structured replies and extended headers on the
//! upstream side as negotiated, and write-zeroes' `NO_HOLE` and
//! `FAST_ZERO` (offered where the upstream offers it). Not passed through:
//! `CACHE`.
//! A lost upstream is reconnected (every second): the requests it had not
//! answered are sent again, and requests wait for it up to 30 s (or the
//! URI's `reconnect-delay=SECONDS`), then fail
//! with EIO, as do later ones until it is back; the log says each step. A
//! driver whose connection fails hands its requests to the worker, which
//! owns that policy, and tries a connection of its own again every second.

mod client;
mod local;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::aio::{AioDone, CompletionQueue, LocalIo, Sink, Waiter};
use client::{gone, Client, Job, Reply};
use nbd_proto::wire::tx_flags;
use ringbd_client::{ClientConfig, Engine, NbdUri};
use ringbd_io::buf::IoBuf;
use ringbd_io::eventfd::EventFd;

use crate::{
    blocking, AsyncIo, Backend, BlockOp, Caps, Error, ErrorKind, Extent, Holes, Op, Result, ZeroFlags,
};

/// Upstream connections of the worker when the upstream allows several.
const MULTI_CONNS: usize = 4;

/// What the upstream agreed to.
#[derive(Debug, Clone, Copy)]
struct Upstream {
    size: u64,
    flags: u16,
    extents: bool,
    max_request: u64,
    preferred: Option<u32>,
}

pub struct NbdBackend {
    shared: Arc<Shared>,
    read_only: bool,
}

/// What the worker and every driver share.
struct Shared {
    uri: NbdUri,
    up: Upstream,
    jobs: Mutex<Sender<Job>>,
    wake: EventFd,
    failed: Arc<AtomicBool>,
}

impl Shared {
    /// Hands a job to the worker.
    fn send(&self, job: Job) {
        if self.failed.load(Ordering::Relaxed) {
            return job.fail(gone(), &mut Vec::new());
        }
        let sent = self.jobs.lock().unwrap_or_else(|p| p.into_inner()).send(job);
        match sent {
            Ok(()) => {
                if let Err(e) = self.wake.signal() {
                    tracing::warn!("NBD export {}: waking the client thread: {e}", self.uri);
                }
            }
            // The worker is gone (the upstream failed): answer at once.
            Err(mpsc::SendError(job)) => job.fail(gone(), &mut Vec::new()),
        }
    }
}

fn open_error(uri: &NbdUri, e: impl std::fmt::Display) -> Error {
    Error::other(ErrorKind::Io, Op::Open, 0, 0, &format!("NBD export {uri}: {e}"))
}

impl NbdBackend {
    /// Connects to the upstream export (the handshake happens here, so a
    /// bad URI or an unreachable server fails the start).
    pub fn open(uri: &NbdUri, read_only: bool) -> Result<NbdBackend> {
        let wake = EventFd::new().map_err(|e| open_error(uri, e))?;
        let worker_wake = wake.try_clone().map_err(|e| open_error(uri, e))?;
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let failed = Arc::new(AtomicBool::new(false));
        let (u, f) = (uri.clone(), failed.clone());
        std::thread::Builder::new()
            .name("ringbd-nbd".into())
            .spawn(move || worker(u, worker_wake, rx, ready_tx, f))
            .map_err(|e| open_error(uri, e))?;
        let up = match ready_rx.recv() {
            Ok(Ok(up)) => up,
            Ok(Err(e)) => return Err(open_error(uri, e)),
            Err(_) => return Err(open_error(uri, "the client thread ended during the handshake")),
        };
        let shared = Shared { uri: uri.clone(), up, jobs: Mutex::new(tx), wake, failed };
        Ok(NbdBackend { shared: Arc::new(shared), read_only })
    }

    fn send(&self, job: Job) {
        self.shared.send(job)
    }
}

impl Backend for NbdBackend {
    fn size(&self) -> u64 {
        self.shared.up.size
    }

    fn caps(&self) -> Caps {
        let has = |f: u16| self.shared.up.flags & f != 0;
        Caps {
            read_only: self.read_only || has(tx_flags::READ_ONLY),
            flush: has(tx_flags::SEND_FLUSH),
            fua: has(tx_flags::SEND_FUA),
            trim: has(tx_flags::SEND_TRIM),
            write_zeroes: has(tx_flags::SEND_WRITE_ZEROES),
            fast_zero: has(tx_flags::SEND_WRITE_ZEROES) && has(tx_flags::SEND_FAST_ZERO),
            cache: false,
            multi_conn: true,
            extents: self.shared.up.extents,
        }
    }

    fn describe(&self) -> String {
        format!("NBD export {}", self.shared.uri)
    }

    fn preferred_block_size(&self) -> Option<u32> {
        self.shared.up.preferred
    }

    fn aio(&self) -> Option<&dyn AsyncIo> {
        Some(self)
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<Holes> {
        blocking::read(self, offset, buf)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        blocking::write(self, offset, data, fua)
    }

    fn flush(&self) -> Result<()> {
        blocking::flush(self)
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        blocking::trim(self, offset, len, fua)
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        if flags.fast && !self.caps().fast_zero {
            return Err(Error::other(
                ErrorKind::Unsupported,
                Op::WriteZeroes,
                offset,
                len,
                "the upstream export does not offer fast zeroing",
            ));
        }
        blocking::write_zeroes(self, offset, len, flags)
    }

    fn cache(&self, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let w = Arc::new(Waiter::default());
        self.send(Job::Extents { offset, len, reply: Reply::Sink(Sink::Wait(w.clone())) });
        let (r, buf) = w.wait();
        r.map_err(|e| Error::new(Op::Extents, offset, len, e))?;
        Ok(crate::extents_from_buf(&buf))
    }
}

impl AsyncIo for NbdBackend {
    fn submit(&self, op: BlockOp, buf: IoBuf, sink: Sink) {
        self.send(Job::Io { op, buf, reply: Reply::Sink(sink) });
    }

    fn submit_extents(&self, offset: u64, len: u64, sink: Sink) {
        self.send(Job::Extents { offset, len, reply: Reply::Sink(sink) });
    }

    fn local(&self, queue: &Arc<CompletionQueue>) -> Option<Box<dyn LocalIo>> {
        if self.shared.up.flags & tx_flags::CAN_MULTI_CONN == 0 {
            return None;
        }
        Some(Box::new(local::Driver::new(self.shared.clone(), queue.clone())))
    }
}

impl Drop for NbdBackend {
    fn drop(&mut self) {
        // Closing the channel ends the worker once its requests are done;
        // waking it makes it notice while it waits on the ring. (Drivers
        // keep `shared`; their later jobs fail at once.)
        let (tx, _rx) = mpsc::channel();
        drop(std::mem::replace(&mut *self.shared.jobs.lock().unwrap_or_else(|p| p.into_inner()), tx));
        if let Err(e) = self.shared.wake.signal() {
            tracing::warn!("NBD export {}: waking the client thread to stop: {e}", self.shared.uri);
        }
    }
}

/// How long requests wait for a lost upstream to come back before they
/// fail with EIO (later ones then fail at once until it is back), and how
/// often the worker tries it (nbdkit's nbd plugin `retry=` and qemu's
/// `reconnect-delay` play the same part).
const RECONNECT_WINDOW: Duration = Duration::from_secs(30);

/// The export's reconnect window: the URI's `reconnect-delay`, else
/// [`RECONNECT_WINDOW`].
fn reconnect_window(uri: &NbdUri) -> Duration {
    uri.reconnect_delay.map_or(RECONNECT_WINDOW, Duration::from_secs)
}
const RECONNECT_EVERY: Duration = Duration::from_secs(1);

/// Opens the client's connections (the first, then more if the upstream
/// allows multi-conn) and hooks up the wake-up.
fn connect(uri: &NbdUri, wake: &EventFd) -> std::result::Result<(Engine, Upstream), String> {
    let cfg = ClientConfig::new(&uri.export);
    let mut engine = Engine::connect(uri, &cfg, 1).map_err(|e| e.to_string())?;
    let conns = if engine.has(tx_flags::CAN_MULTI_CONN) { MULTI_CONNS } else { 1 };
    if conns > 1 {
        engine.add(uri, &cfg, conns - 1).map_err(|e| format!("opening connection 2 of {conns}: {e}"))?;
    }
    let neg = engine.negotiated().cloned();
    let up = Upstream {
        size: engine.size(),
        flags: neg.as_ref().map_or(0, |n| n.flags),
        extents: neg.as_ref().is_some_and(|n| n.base_allocation.is_some()),
        max_request: engine.max_request(),
        preferred: neg.and_then(|n| n.block_sizes).map(|b| b.preferred),
    };
    engine.set_wake(wake.try_clone().map_err(|e| format!("the wake-up eventfd: {e}"))?);
    Ok((engine, up))
}

/// The worker: the handshake, then requests in, replies out, until the
/// backend is dropped (and nothing is in flight). A lost upstream is
/// reconnected: the requests it had not answered are sent again (an NBD
/// request may be repeated: each says what its range must hold), and
/// requests wait for it up to [`RECONNECT_WINDOW`].
fn worker(
    uri: NbdUri,
    wake: EventFd,
    jobs: Receiver<Job>,
    ready: Sender<std::result::Result<Upstream, String>>,
    failed: Arc<AtomicBool>,
) {
    let (engine, up) = match connect(&uri, &wake) {
        Ok(c) => c,
        Err(e) => {
            // (`open` waits on `ready`; if it is gone, nobody asked.)
            ready.send(Err(e)).ok();
            return;
        }
    };
    if ready.send(Ok(up)).is_err() {
        return;
    }
    let mut client = Client::new(engine, up);
    // The worker's jobs all answer through sinks: nothing lands here.
    let mut none: Vec<AioDone> = Vec::new();
    let mut open = true;
    loop {
        // Take what was submitted.
        loop {
            let job = if client.inflight() == 0 && open {
                // Nothing in flight: wait for work (or the end).
                match jobs.recv() {
                    Ok(j) => j,
                    Err(_) => {
                        open = false;
                        break;
                    }
                }
            } else {
                match jobs.try_recv() {
                    Ok(j) => j,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            };
            if let Err((job, e)) = client.start(job) {
                job.fail(e, &mut none);
            }
        }
        if !open && client.inflight() == 0 {
            if let Err(e) = client.engine.disconnect() {
                tracing::warn!("NBD export {uri}: disconnecting: {e}");
            }
            return;
        }
        if let Err(e) = client.poll(true, &mut none) {
            tracing::warn!(
                "NBD export {uri}: the upstream failed: {e}; reconnecting ({} request(s) to send again)",
                client.inflight()
            );
            let mut retry = client.take_all();
            match reconnect(&uri, &wake, &up, &jobs, &mut retry, &failed) {
                Some(e) => client = Client::new(e, up),
                None => return,
            }
            for job in retry {
                if let Err((job, e)) = client.start(job) {
                    job.fail(e, &mut none);
                }
            }
        }
        none.clear();
    }
}

/// Tries to reach the upstream again every [`RECONNECT_EVERY`]. Requests
/// (`retry`, and new ones) wait for up to [`RECONNECT_WINDOW`], then fail
/// with EIO, as do later ones (`failed`) until a connection succeeds. An
/// upstream that comes back with another size is not the same export: the
/// worker stops there. `None`: the backend was dropped meanwhile, or the
/// upstream changed.
fn reconnect(
    uri: &NbdUri,
    wake: &EventFd,
    up: &Upstream,
    jobs: &Receiver<Job>,
    retry: &mut Vec<Job>,
    failed: &AtomicBool,
) -> Option<Engine> {
    let since = Instant::now();
    let mut tries = 0u64;
    loop {
        tries += 1;
        match connect(uri, wake) {
            Ok((engine, now)) if now.size == up.size => {
                failed.store(false, Ordering::Relaxed);
                tracing::warn!(
                    "NBD export {uri}: reconnected after {:.1} s ({tries} attempt(s)); {} request(s) sent again",
                    since.elapsed().as_secs_f64(),
                    retry.len()
                );
                return Some(engine);
            }
            Ok((_, now)) => {
                tracing::warn!(
                    "NBD export {uri}: the upstream came back with {} bytes instead of {}: not the same \
                     export; every request fails from now on",
                    now.size,
                    up.size
                );
                failed.store(true, Ordering::Relaxed);
                for job in retry.drain(..) {
                    job.fail(gone(), &mut Vec::new());
                }
                while let Ok(job) = jobs.recv() {
                    job.fail(gone(), &mut Vec::new());
                }
                return None;
            }
            Err(e) if tries == 1 || tries.is_multiple_of(30) => {
                tracing::warn!("NBD export {uri}: reconnecting: {e}");
            }
            Err(_) => {}
        }
        let window = reconnect_window(uri);
        if since.elapsed() >= window && !failed.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "NBD export {uri}: no upstream for {} s: {} waiting request(s) fail, and new ones until it is back",
                window.as_secs(),
                retry.len()
            );
        }
        if failed.load(Ordering::Relaxed) {
            for job in retry.drain(..) {
                job.fail(gone(), &mut Vec::new());
            }
        }
        // Wait for the next try, taking (or failing) new requests meanwhile.
        let next = Instant::now() + RECONNECT_EVERY;
        loop {
            let left = next.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match jobs.recv_timeout(left) {
                Ok(job) if failed.load(Ordering::Relaxed) => job.fail(gone(), &mut Vec::new()),
                Ok(job) => retry.push(job),
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    for job in retry.drain(..) {
                        job.fail(gone(), &mut Vec::new());
                    }
                    return None;
                }
            }
        }
    }
}
