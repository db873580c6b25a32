//! One client connection as a state machine over bytes, shared by every
//! engine: the engine feeds whatever the socket delivered to
//! [`Connection::receive`] and sends [`Connection::out`] when it likes.
//!
//! Requests are parsed straight out of the engine's receive buffers: a
//! request header may straddle buffers (it is staged, 28 or 32 bytes), but a
//! write payload is handed to the backend piece by piece from where it
//! landed, so it is copied once, into its destination. Commands run on the
//! backend as soon as they are complete; replies go to the output queue.
//!
//! TLS sits between the engine and all of this: after STARTTLS the bytes the
//! engine feeds in are ciphertext for a TLS session (rustls, or OpenSSL for
//! PSK; sans-IO too), whose plaintext goes to the same NBD state machine; the replies a loop turn
//! queued are encrypted together into the queue the engine sends
//! ([`crate::tls`]). Zero-copy sends do not apply there: the queue holds
//! ciphertext in one buffer, no read payload pages. Once the session has
//! moved to the kernel (kTLS, `conn_ktls.rs`), the connection is plaintext
//! again as far as it and the engine know.

use std::os::fd::BorrowedFd;
use std::sync::Arc;

use nbd_proto::handshake::BASE_ALLOCATION_ID;
use nbd_proto::transmission::EXTENDED_REQUEST_LEN;
use nbd_proto::wire::state_flags;
use nbd_proto::{
    clip_extents, Command, Errno, Extent, FramingError, Outcome, Request, ServerHandshake, Session,
};
use ringbd_backend::{Backend, ZeroFlags};
use ringbd_io::buf::{Arena, IoBuf};
use ringbd_io::fs::{fallocate_unsupported, Fallocate};
use ringbd_io::uring::FileOp;

use crate::exports::{nbd_errno, Exports};
use crate::log;
use crate::out::OutBuf;
use crate::tls::{TlsLayer, TlsServer};

#[path = "conn_ktls.rs"]
mod ktls_io;
#[path = "conn_tls.rs"]
mod tls_io;
use ktls_io::KtlsState;

/// Read payloads up to this size are copied into the inline queue; larger
/// ones travel as their own iovec.
const COPY_LIMIT: usize = 16 * 1024;
/// Stop taking requests while this many reply bytes wait to be sent
/// (backpressure: a client that does not read cannot grow the queue).
pub const OUT_HIGH_WATER: usize = 8 * 1024 * 1024;

/// Counters a connection keeps for the engine's statistics.
#[derive(Debug, Default, Clone, Copy)]
pub struct ConnStats {
    pub requests: u64,
}

pub struct Connection {
    exports: Arc<Exports>,
    phase: Phase,
    out: OutBuf,
    /// An empty queue with capacity, swapped in when `out` is taken.
    spare: OutBuf,
    /// Recycled payload buffers.
    pool: Vec<IoBuf>,
    peer: String,
    /// Most replies queued before input stops (1 = one send per reply).
    reply_limit: u32,
    /// The engine runs file reads, writes and flushes itself.
    async_file_io: bool,
    /// The engine's registered buffers, used first for file operations.
    arena: Option<Arc<Arena>>,
    /// The server's TLS policy and credentials, if TLS is enabled.
    tls_server: Option<Arc<TlsServer>>,
    /// TLS on this connection, from the STARTTLS ACK on; `out` then holds
    /// plaintext replies until they are encrypted into `TlsLayer::wire`.
    tls: Option<Box<TlsLayer>>,
    /// The handshake acknowledged STARTTLS: start TLS before the next byte.
    start_tls: bool,
    /// Whether the TLS session moves, or moved, to the kernel.
    ktls: KtlsState,
    pub stats: ConnStats,
}

enum Phase {
    Handshake { hs: ServerHandshake<Arc<Exports>>, staged: Vec<u8> },
    Transmission(Box<Tx>),
    Closed,
}

impl Connection {
    /// A new connection; the server greeting is already queued.
    pub fn new(exports: Arc<Exports>, peer: String) -> Self {
        let tls_server = exports.tls();
        let mode = tls_server.as_ref().map(|t| t.mode).unwrap_or_default();
        let mut hs = ServerHandshake::with_tls(exports.clone(), mode);
        let mut out = OutBuf::default();
        out.bytes().extend_from_slice(&hs.take_output());
        Connection {
            exports,
            phase: Phase::Handshake { hs, staged: Vec::new() },
            out,
            spare: OutBuf::default(),
            pool: Vec::new(),
            peer,
            reply_limit: u32::MAX,
            async_file_io: false,
            arena: None,
            tls_server,
            tls: None,
            start_tls: false,
            ktls: KtlsState::Off,
            stats: ConnStats::default(),
        }
    }

    /// File exports' reads, writes and flushes will be handed to the engine
    /// ([`Connection::take_io`]) instead of run inline. Call before the
    /// handshake ends. Buffers come from `arena` (the ring's registered
    /// buffers) while it has room, else from the heap.
    pub fn enable_async_file_io(&mut self, arena: Option<Arc<Arena>>) {
        self.async_file_io = true;
        self.arena = arena;
    }

    /// Moves the file operations waiting to be started into `out`.
    pub fn take_io(&mut self, out: &mut Vec<IoRequest>) {
        if let Phase::Transmission(tx) = &mut self.phase {
            out.append(&mut tx.io_out);
        }
    }

    /// The export's file, for the engine's file operations: the `O_DIRECT`
    /// descriptor when `direct` (see [`IoRequest::direct`]).
    pub fn file_fd(&self, direct: bool) -> Option<BorrowedFd<'_>> {
        match &self.phase {
            Phase::Transmission(tx) if direct => tx.backend.direct_io().map(|d| d.fd),
            Phase::Transmission(tx) => tx.backend.file_fd(),
            _ => None,
        }
    }

    /// The export's asynchronous backend (RBD), which runs the operations
    /// of [`Connection::take_io`] itself instead of the ring.
    pub fn aio(&self) -> Option<&dyn ringbd_backend::AsyncIo> {
        match &self.phase {
            Phase::Transmission(tx) => tx.backend.aio(),
            _ => None,
        }
    }

    /// File operations started and not completed.
    pub fn io_pending(&self) -> usize {
        match &self.phase {
            Phase::Transmission(tx) => tx.pending_count,
            _ => 0,
        }
    }

    /// A file operation finished: continue it (short transfer) or reply.
    pub fn io_complete(&mut self, token: u32, result: std::io::Result<usize>, buf: IoBuf) {
        if let Phase::Transmission(tx) = &mut self.phase {
            tx.io_complete(token, result, buf, &mut self.out, &mut self.pool);
        }
        self.seal();
    }

    /// Caps the replies queued per batch; `1` makes every reply its own
    /// send (the `--no-coalesce` A/B switch).
    pub fn set_reply_limit(&mut self, limit: u32) {
        self.reply_limit = limit.max(1);
    }

    /// Whether option haggling (and any TLS handshake) is still going on:
    /// the time the handshake deadline applies to.
    pub fn in_handshake(&self) -> bool {
        matches!(self.phase, Phase::Handshake { .. })
    }

    /// Whether the connection should be closed once `out` is sent.
    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }

    /// Whether the connection can take more input now (see [`OUT_HIGH_WATER`]).
    pub fn wants_input(&self) -> bool {
        let io_room = match &self.phase {
            Phase::Transmission(tx) => tx.io_room(),
            _ => true,
        };
        let wire = self.out();
        !self.is_closed()
            && io_room
            && self.out.len() < OUT_HIGH_WATER
            && self.out.replies() < self.reply_limit
            && wire.len() < OUT_HIGH_WATER
            && wire.replies() < self.reply_limit
    }

    /// Bytes waiting to be sent: the replies, or with TLS their records.
    pub fn out(&self) -> &OutBuf {
        match &self.tls {
            Some(t) => &t.wire,
            None => &self.out,
        }
    }

    /// Takes the queued bytes, leaving an empty queue (for engines that
    /// keep the buffer alive while the kernel sends it).
    pub fn take_out(&mut self) -> OutBuf {
        let spare = std::mem::take(&mut self.spare);
        match &mut self.tls {
            Some(t) => std::mem::replace(&mut t.wire, spare),
            None => std::mem::replace(&mut self.out, spare),
        }
    }

    /// Whether TLS runs on this connection (STARTTLS was acknowledged), in
    /// rustls or in the kernel.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some() || self.is_ktls()
    }

    /// Returns a sent queue's buffers for reuse.
    pub fn recycle(&mut self, mut sent: OutBuf) {
        sent.clear(&mut self.pool);
        self.spare = sent;
    }

    /// Marks the queue as sent (engines that write synchronously).
    pub fn sent(&mut self) {
        match &mut self.tls {
            Some(t) => t.wire.clear(&mut self.pool),
            None => self.out.clear(&mut self.pool),
        }
    }

    /// The peer closed its side: nothing more will arrive.
    pub fn peer_closed(&mut self) {
        if let Phase::Transmission(tx) = &self.phase {
            if !matches!(tx.rx, Rx::Header) || tx.hdr_len > 0 {
                log::warn(format_args!("{}: export {:?}: client closed mid-request", self.peer, tx.name));
            }
        }
        self.phase = Phase::Closed;
    }

    /// Processes received bytes; returns how many were consumed. Fewer than
    /// `data.len()` means: stop reading until `out` drains (backpressure), or
    /// the connection closed. The engine hands the unconsumed bytes back
    /// first when it calls again.
    pub fn receive(&mut self, data: &[u8]) -> usize {
        let mut used = 0;
        if self.tls.is_none() {
            used = self.receive_plain(data);
            if !self.start_tls {
                return used;
            }
            self.start_tls = false;
            if !self.begin_tls() {
                return data.len();
            }
        }
        let Some(mut t) = self.tls.take() else { return used };
        used += self.receive_tls(&mut t, &data[used..]);
        self.seal_into(&mut t);
        self.tls = Some(t);
        used
    }

    fn receive_plain(&mut self, data: &[u8]) -> usize {
        let mut used = 0;
        while used < data.len() && self.wants_input() && !self.start_tls {
            used += match &mut self.phase {
                Phase::Closed => return used,
                Phase::Handshake { .. } => self.handshake(&data[used..]),
                Phase::Transmission(tx) => {
                    let limit = self.reply_limit;
                    let n = tx.receive(&data[used..], &mut self.out, &mut self.pool, &mut self.stats, limit);
                    if tx.closed {
                        self.phase = Phase::Closed;
                    }
                    n
                }
            };
        }
        used
    }

    fn handshake(&mut self, data: &[u8]) -> usize {
        let Phase::Handshake { hs, staged } = &mut self.phase else { return 0 };
        staged.extend_from_slice(data);
        let result = hs.handle(staged);
        self.out.bytes().extend_from_slice(&hs.take_output());
        let consumed = match result {
            Ok(n) => n,
            Err(e) => {
                log::warn(format_args!("{}: handshake failed: {e}", self.peer));
                self.phase = Phase::Closed;
                return data.len();
            }
        };
        staged.drain(..consumed);
        if hs.starttls_pending() {
            // What follows STARTTLS is the TLS handshake: hand it back to
            // `receive`, which starts TLS first.
            hs.tls_started();
            self.start_tls = true;
            let leftover = std::mem::take(staged);
            return data.len() - leftover.len().min(data.len());
        }
        if hs.outcome().is_none() {
            return data.len();
        }
        // Bytes after the final option belong to the transmission phase.
        let leftover = std::mem::take(staged);
        let Phase::Handshake { hs, .. } = std::mem::replace(&mut self.phase, Phase::Closed) else {
            return data.len();
        };
        let neg = match hs.into_outcome() {
            Some(Outcome::Transmission(n)) => n,
            _ => return data.len(),
        };
        let Some(export) = self.exports.get(&neg.export.name) else { return data.len() };
        log::debug(format_args!(
            "{}: export {:?}: structured replies {}, extended headers {}, base:allocation {}, flags 0x{:04x}",
            self.peer,
            neg.export.name,
            neg.structured,
            neg.extended,
            neg.base_allocation.is_some(),
            neg.flags
        ));
        self.phase = Phase::Transmission(Box::new(Tx {
            session: Session::new(neg),
            backend: export.backend.clone(),
            name: export.name.clone(),
            hdr: [0; EXTENDED_REQUEST_LEN],
            hdr_len: 0,
            rx: Rx::Header,
            closed: false,
            pieces: Vec::new(),
            async_io: self.async_file_io
                && (export.backend.file_fd().is_some() || export.backend.aio().is_some()),
            arena: self.arena.clone(),
            io_out: Vec::new(),
            pending: Vec::new(),
            free_tokens: Vec::new(),
            pending_count: 0,
            pending_bytes: 0,
        }));
        // `leftover` came out of `data`: it is its tail. Consume only what
        // precedes it, so the caller hands the rest to the new phase.
        data.len() - leftover.len().min(data.len())
    }
}

/// Keeps a payload buffer for reuse; an arena chunk goes back to its arena
/// instead (the ring's registered buffers are shared by its connections).
pub(crate) fn recycle(pool: &mut Vec<IoBuf>, buf: IoBuf) {
    if !buf.is_chunk() && pool.len() < 8 {
        pool.push(buf);
    }
}

/// What the transmission phase expects next on the wire.
enum Rx {
    Header,
    /// Write payload: each piece goes to the backend where it landed, or,
    /// with asynchronous file I/O, into `collect` for one ring write.
    Write {
        req: Request,
        offset: u64,
        left: u64,
        fua: bool,
        failed: Option<ringbd_backend::Error>,
        collect: Option<IoBuf>,
    },
    /// A small payload collected whole (block-status filter).
    Payload {
        req: Request,
        buf: Vec<u8>,
        want: usize,
    },
    /// Payload of a refused request, read and dropped.
    Discard {
        left: u64,
    },
}

struct Tx {
    session: Session,
    backend: Arc<dyn Backend>,
    name: String,
    hdr: [u8; EXTENDED_REQUEST_LEN],
    hdr_len: usize,
    rx: Rx,
    closed: bool,
    /// Scratch list for zero-copy reads, reused across requests.
    pieces: Vec<ringbd_backend::Piece>,
    /// Reads, writes and flushes go to the engine as file operations.
    async_io: bool,
    arena: Option<Arc<Arena>>,
    /// File operations the engine has not taken yet.
    io_out: Vec<IoRequest>,
    /// Requests waiting for their file operation, by token.
    pending: Vec<Option<(Request, Pend)>>,
    free_tokens: Vec<u32>,
    pending_count: usize,
    pending_bytes: u64,
}

/// A file operation the engine should run for this connection.
pub struct IoRequest {
    /// Hand back to [`Connection::io_complete`] with the result.
    pub token: u32,
    pub op: IoOp,
    pub buf: IoBuf,
    /// Run it on the export's `O_DIRECT` descriptor
    /// ([`Connection::file_fd`]`(true)`): offset, length and buffer are
    /// aligned for it.
    pub direct: bool,
}

/// What the engine runs: a file operation (on the ring, or for an
/// asynchronous backend, [`AsyncIo::submit`](ringbd_backend::AsyncIo::submit)),
/// or a block-status query ([`AsyncIo::submit_extents`](ringbd_backend::AsyncIo::submit_extents),
/// asynchronous backends only).
#[derive(Debug, Clone, Copy)]
pub enum IoOp {
    File(FileOp),
    Extents { offset: u64, len: u64 },
}

/// What a request waiting on a file operation still needs.
#[derive(Debug, Clone, Copy)]
enum Pend {
    Read {
        offset: u64,
        len: u64,
        done: u64,
    },
    Write {
        offset: u64,
        len: u64,
        fua: bool,
        done: u64,
    },
    Flush,
    /// A punched hole (`fallocate`), then an fsync with `fua`.
    Trim {
        offset: u64,
        len: u64,
        fua: bool,
    },
    /// `fallocate` in the backend's first zeroing mode; the other ways are
    /// the backend's own, inline, if this one is unsupported.
    Zero {
        offset: u64,
        len: u64,
        flags: ZeroFlags,
        mode: Fallocate,
    },
    /// The fsync that makes a FUA trim or zeroing durable.
    SyncAfter {
        op: ringbd_backend::Op,
        offset: u64,
        len: u64,
    },
    /// Block status from an asynchronous backend.
    Status {
        offset: u64,
        len: u64,
        req_one: bool,
    },
}

impl Pend {
    /// Buffer bytes this operation holds.
    fn bytes(&self) -> u64 {
        match *self {
            Pend::Read { len, .. } | Pend::Write { len, .. } => len,
            Pend::Flush
            | Pend::Trim { .. }
            | Pend::Zero { .. }
            | Pend::SyncAfter { .. }
            | Pend::Status { .. } => 0,
        }
    }
}

/// Most file operations one connection keeps in flight, and their bytes;
/// beyond either, the connection stops taking requests until some finish.
const MAX_PENDING: usize = 256;
const MAX_PENDING_BYTES: u64 = 64 * 1024 * 1024;

impl Tx {
    fn receive(
        &mut self,
        data: &[u8],
        out: &mut OutBuf,
        pool: &mut Vec<IoBuf>,
        st: &mut ConnStats,
        reply_limit: u32,
    ) -> usize {
        let mut used = 0;
        while used < data.len() && !self.closed && out.len() < OUT_HIGH_WATER && out.replies() < reply_limit {
            let rest = &data[used..];
            // The in-flight limits hold for every request, also for
            // requests that arrive together in one buffer.
            if matches!(self.rx, Rx::Header) && self.hdr_len == 0 && !self.io_room() {
                break;
            }
            match &mut self.rx {
                Rx::Header => {
                    let hlen = self.session.request_len();
                    let n = (hlen - self.hdr_len).min(rest.len());
                    self.hdr[self.hdr_len..self.hdr_len + n].copy_from_slice(&rest[..n]);
                    self.hdr_len += n;
                    used += n;
                    if self.hdr_len == hlen {
                        self.hdr_len = 0;
                        st.requests += 1;
                        self.header(out, pool);
                    }
                }
                Rx::Write { req, left, fua, collect: Some(buf), .. } => {
                    let n = (*left).min(rest.len() as u64) as usize;
                    *left -= n as u64;
                    buf.extend_from_slice(&rest[..n]);
                    used += n;
                    if *left == 0 {
                        let (req, fua, buf) = (*req, *fua, std::mem::take(buf));
                        let start = req.offset;
                        self.rx = Rx::Header;
                        let len = buf.len() as u64;
                        self.submit(req, Pend::Write { offset: start, len, fua, done: 0 }, buf);
                    }
                }
                Rx::Write { req, offset, left, fua, failed, collect: None } => {
                    let n = (*left).min(rest.len() as u64) as usize;
                    *left -= n as u64;
                    if failed.is_none() {
                        // FUA on the last piece makes the whole write durable.
                        let last_fua = *fua && *left == 0;
                        if let Err(e) = self.backend.write(*offset, &rest[..n], last_fua) {
                            *failed = Some(e);
                        }
                    }
                    *offset += n as u64;
                    used += n;
                    if *left == 0 {
                        let (req, failed) = (*req, failed.take());
                        self.rx = Rx::Header;
                        match failed {
                            None => self.session.write_ok(out.bytes(), &req),
                            Some(e) => self.backend_error(&req, &e, out),
                        }
                        out.reply_done();
                    }
                }
                Rx::Payload { req, buf, want } => {
                    let n = (*want - buf.len()).min(rest.len());
                    buf.extend_from_slice(&rest[..n]);
                    used += n;
                    if buf.len() == *want {
                        let (req, buf) = (*req, std::mem::take(buf));
                        self.rx = Rx::Header;
                        match self.session.check_block_status_payload(&req, &buf) {
                            Ok(Command::BlockStatus { offset, len, req_one }) => {
                                self.status(req, offset, len, req_one, out);
                            }
                            Ok(_) => {
                                self.session.write_error(out.bytes(), &req, Errno::EINVAL, "bad payload");
                                out.reply_done();
                            }
                            Err(rej) => {
                                self.session.write_error(out.bytes(), &req, rej.errno, &rej.message);
                                out.reply_done();
                            }
                        }
                    }
                }
                Rx::Discard { left } => {
                    let n = (*left).min(rest.len() as u64) as usize;
                    *left -= n as u64;
                    used += n;
                    if *left == 0 {
                        self.rx = Rx::Header;
                    }
                }
            }
        }
        used
    }

    /// A complete header is in `self.hdr`.
    fn header(&mut self, out: &mut OutBuf, pool: &mut Vec<IoBuf>) {
        let hlen = self.session.request_len();
        let req = match self.session.decode(&self.hdr[..hlen]) {
            Ok(r) => r,
            Err(FramingError::BadMagic(m)) => {
                log::warn(format_args!("export {:?}: bad request magic 0x{m:08x}, disconnecting", self.name));
                self.closed = true;
                return;
            }
        };
        let cmd = match self.session.check(&req) {
            Ok(c) => c,
            Err(rej) => {
                self.session.write_error(out.bytes(), &req, rej.errno, &rej.message);
                out.reply_done();
                if rej.disconnect {
                    log::warn(format_args!("export {:?}: {}, disconnecting", self.name, rej.message));
                    self.closed = true;
                } else if rej.discard > 0 {
                    self.rx = Rx::Discard { left: rej.discard };
                }
                return;
            }
        };
        let b = &*self.backend;
        let result = match cmd {
            Command::Disc => {
                self.closed = true;
                return;
            }
            Command::Write { offset, len, fua } => {
                if len == 0 {
                    b.write(offset, &[], fua)
                } else {
                    let collect = self.async_io.then(|| self.io_buf(len as usize, pool));
                    self.rx = Rx::Write { req, offset, left: len, fua, failed: None, collect };
                    return;
                }
            }
            Command::BlockStatusPayload { payload } => {
                let want = payload as usize;
                self.rx = Rx::Payload { req, buf: Vec::with_capacity(want), want };
                return;
            }
            Command::Read { offset, len, .. } if self.async_io && len > 0 => {
                let mut buf = self.io_buf(len as usize, pool);
                // The file fills it; a failed read never sends it.
                buf.set_len(len as usize);
                self.submit(req, Pend::Read { offset, len, done: 0 }, buf);
                return;
            }
            Command::Flush if self.async_io => {
                self.submit(req, Pend::Flush, IoBuf::new());
                return;
            }
            Command::Trim { offset, len, fua } if self.async_io && len > 0 => {
                self.submit(req, Pend::Trim { offset, len, fua }, IoBuf::new());
                return;
            }
            Command::WriteZeroes { offset, len, fua, no_hole, fast } if self.async_io && len > 0 => {
                if let Some(mode) = self.backend.zero_mode(no_hole) {
                    let flags = ZeroFlags { fua, no_hole, fast };
                    self.submit(req, Pend::Zero { offset, len, flags, mode }, IoBuf::new());
                    return;
                }
                b.write_zeroes(offset, len, ZeroFlags { fua, no_hole, fast })
            }
            Command::Read { offset, len, df } => {
                let mut pieces = std::mem::take(&mut self.pieces);
                self.read(&req, (offset, len as usize, df), out, pool, &mut pieces);
                self.pieces = pieces;
                out.reply_done();
                return;
            }
            Command::BlockStatus { offset, len, req_one } => {
                self.status(req, offset, len, req_one, out);
                return;
            }
            Command::Flush => b.flush(),
            Command::Trim { offset, len, fua } => b.trim(offset, len, fua),
            Command::Cache { offset, len } => b.cache(offset, len),
            Command::WriteZeroes { offset, len, fua, no_hole, fast } => {
                b.write_zeroes(offset, len, ZeroFlags { fua, no_hole, fast })
            }
        };
        match result {
            Ok(()) => self.session.write_ok(out.bytes(), &req),
            Err(e) => self.backend_error(&req, &e, out),
        }
        out.reply_done();
    }

    /// Whether another request may start: file operations in flight and
    /// their bytes are under their limits.
    fn io_room(&self) -> bool {
        self.pending_count < MAX_PENDING && self.pending_bytes < MAX_PENDING_BYTES
    }

    /// An empty buffer for a file operation of `len` bytes: a registered
    /// one while the arena has room, else a recycled or new one.
    fn io_buf(&self, len: usize, pool: &mut Vec<IoBuf>) -> IoBuf {
        if let Some(b) = self.arena.as_ref().and_then(|a| a.take(len)) {
            return b;
        }
        let mut b = pool.pop().unwrap_or_default();
        b.clear();
        b.reserve(len);
        b
    }

    /// Queues a file operation for the engine.
    fn submit(&mut self, req: Request, pend: Pend, buf: IoBuf) {
        let token = match self.free_tokens.pop() {
            Some(t) => t,
            None => {
                self.pending.push(None);
                (self.pending.len() - 1) as u32
            }
        };
        self.pending_count += 1;
        self.pending_bytes += pend.bytes();
        self.pending[token as usize] = Some((req, pend));
        self.queue_op(token, pend, buf);
    }

    fn queue_op(&mut self, token: u32, pend: Pend, buf: IoBuf) {
        let (op, range) = match pend {
            Pend::Read { offset, len, done } => {
                (FileOp::Read { offset: offset + done, at: done as usize }, Some((offset, len, done)))
            }
            Pend::Write { offset, len, fua, done } => {
                let op = FileOp::Write { offset: offset + done, at: done as usize, dsync: fua };
                (op, Some((offset, len, done)))
            }
            Pend::Flush | Pend::SyncAfter { .. } => (FileOp::Fsync, None),
            Pend::Trim { offset, len, .. } => {
                (FileOp::Fallocate { mode: Fallocate::PunchHole, offset, len }, None)
            }
            Pend::Zero { offset, len, mode, .. } => (FileOp::Fallocate { mode, offset, len }, None),
            Pend::Status { offset, len, .. } => {
                let op = IoOp::Extents { offset, len };
                self.io_out.push(IoRequest { token, op, buf, direct: false });
                return;
            }
        };
        // O_DIRECT where the file range is aligned; the buffer is page
        // aligned, so its position `done` is aligned when offset is too.
        let direct = match (range, self.backend.direct_io()) {
            (Some((offset, len, done)), Some(d)) => {
                d.fits(offset, d.align.into()) && d.fits(offset + done, len - done)
            }
            _ => false,
        };
        self.io_out.push(IoRequest { token, op: IoOp::File(op), buf, direct });
    }

    fn io_complete(
        &mut self,
        token: u32,
        result: std::io::Result<usize>,
        buf: IoBuf,
        out: &mut OutBuf,
        pool: &mut Vec<IoBuf>,
    ) {
        let Some((req, pend)) = self.pending.get_mut(token as usize).and_then(Option::take) else { return };
        let finish = |this: &mut Self| {
            this.pending_count -= 1;
            this.pending_bytes = this.pending_bytes.saturating_sub(pend.bytes());
            this.free_tokens.push(token);
        };
        use ringbd_backend::Op;
        if let Pend::Status { offset, len, req_one } = pend {
            finish(self);
            match result {
                Ok(_) => self.status_reply(&req, len, req_one, &ringbd_backend::extents_from_buf(&buf), out),
                Err(e) => {
                    self.backend_error(&req, &ringbd_backend::Error::new(Op::Extents, offset, len, e), out)
                }
            }
            out.reply_done();
            return;
        }
        let fallocate = match pend {
            Pend::Trim { offset, len, fua } => Some((Op::Trim, offset, len, fua)),
            Pend::Zero { offset, len, flags, .. } => Some((Op::WriteZeroes, offset, len, flags.fua)),
            Pend::SyncAfter { op, offset, len } => Some((op, offset, len, false)),
            Pend::Read { .. } | Pend::Write { .. } | Pend::Flush | Pend::Status { .. } => None,
        };
        if let Some(what) = fallocate {
            if self.fallocate_complete(token, &req, pend, what, result, out) {
                finish(self);
                out.reply_done();
            }
            return;
        }
        let (op, offset, len) = match pend {
            Pend::Read { offset, len, .. } => (ringbd_backend::Op::Read, offset, len),
            Pend::Write { offset, len, .. } => (ringbd_backend::Op::Write, offset, len),
            // (Trims and zeroing were answered by fallocate_complete,
            // block status above.)
            Pend::Flush
            | Pend::Trim { .. }
            | Pend::Zero { .. }
            | Pend::SyncAfter { .. }
            | Pend::Status { .. } => (ringbd_backend::Op::Flush, 0, 0),
        };
        let failure = match &result {
            Err(_) => None,
            // A transfer that stops short without progress will never finish.
            Ok(0) if matches!(pend, Pend::Read { .. }) && pend.bytes() > 0 => {
                Some((ringbd_backend::ErrorKind::Io, "file is shorter than the export (truncated?)"))
            }
            Ok(0) if matches!(pend, Pend::Write { .. }) && pend.bytes() > 0 => {
                Some((ringbd_backend::ErrorKind::NoSpace, "write made no progress"))
            }
            Ok(_) => None,
        };
        let moved = match (result, failure) {
            (Err(e), _) => Err(ringbd_backend::Error::new(op, offset, len, e)),
            (Ok(_), Some((kind, msg))) => Err(ringbd_backend::Error::other(kind, op, offset, len, msg)),
            (Ok(n), None) => Ok(n as u64),
        };
        let moved = match moved {
            Ok(n) => n,
            Err(e) => {
                finish(self);
                self.backend_error(&req, &e, out);
                out.reply_done();
                recycle(pool, buf);
                return;
            }
        };
        let next = match pend {
            Pend::Read { offset, len, done } if done + moved < len => {
                Some(Pend::Read { offset, len, done: done + moved })
            }
            Pend::Write { offset, len, fua, done } if done + moved < len => {
                Some(Pend::Write { offset, len, fua, done: done + moved })
            }
            _ => None,
        };
        if let Some(p) = next {
            // Short transfer: continue where it stopped.
            self.pending[token as usize] = Some((req, p));
            self.queue_op(token, p, buf);
            return;
        }
        finish(self);
        match pend {
            Pend::Read { offset, len, .. } => {
                self.session.write_data_header(out.bytes(), &req, offset, len, true);
                if buf.len() <= COPY_LIMIT {
                    out.bytes().extend_from_slice(&buf);
                    recycle(pool, buf);
                } else {
                    out.push_large(buf);
                }
            }
            Pend::Write { .. }
            | Pend::Flush
            | Pend::Trim { .. }
            | Pend::Zero { .. }
            | Pend::SyncAfter { .. }
            | Pend::Status { .. } => {
                self.session.write_ok(out.bytes(), &req);
                recycle(pool, buf);
            }
        }
        out.reply_done();
    }

    /// Completion of a trim, a zeroing or the fsync after one: true when
    /// the reply is queued, false when a follow-up fsync was queued under
    /// the same token.
    fn fallocate_complete(
        &mut self,
        token: u32,
        req: &Request,
        pend: Pend,
        (op, offset, len, fua): (ringbd_backend::Op, u64, u64, bool),
        result: std::io::Result<usize>,
        out: &mut OutBuf,
    ) -> bool {
        let outcome = match (pend, result) {
            (_, Ok(_)) => Ok(()),
            // Trim is a hint: where holes cannot be punched, nothing is lost.
            (Pend::Trim { .. }, Err(e)) if fallocate_unsupported(&e) => Ok(()),
            // The backend knows the other ways to zero (and how to refuse a
            // fast zero); they run inline, as without the ring.
            (Pend::Zero { offset, len, flags, .. }, Err(e)) if fallocate_unsupported(&e) => {
                match self.backend.write_zeroes(offset, len, flags) {
                    Ok(()) => self.session.write_ok(out.bytes(), req),
                    Err(e) => self.backend_error(req, &e, out),
                }
                return true;
            }
            (_, Err(e)) => Err(ringbd_backend::Error::new(op, offset, len, e)),
        };
        match outcome {
            Ok(()) if fua => {
                let p = Pend::SyncAfter { op, offset, len };
                self.pending[token as usize] = Some((*req, p));
                self.queue_op(token, p, IoBuf::new());
                false
            }
            Ok(()) => {
                self.session.write_ok(out.bytes(), req);
                true
            }
            Err(e) => {
                self.backend_error(req, &e, out);
                true
            }
        }
    }

    fn backend_error(&self, req: &Request, e: &ringbd_backend::Error, out: &mut OutBuf) {
        let errno = nbd_errno(e);
        // A refused fast zero is the protocol working, not a failure.
        if errno != Errno::ENOTSUP {
            log::warn(format_args!("export {:?}: {e}", self.name));
        }
        self.session.write_error(out.bytes(), req, errno, &e.to_string());
    }

    /// Answers a read of `(offset, len, df)`.
    fn read(
        &self,
        req: &Request,
        (offset, len, df): (u64, usize, bool),
        out: &mut OutBuf,
        pool: &mut Vec<IoBuf>,
        pieces: &mut Vec<ringbd_backend::Piece>,
    ) {
        if len == 0 {
            self.session.write_ok(out.bytes(), req);
            return;
        }
        let s = &self.session;
        // Backends whose data sits in memory hand out their pages: the reply
        // is sent straight from them, with no staging copy.
        pieces.clear();
        match self.backend.read_shared(offset, len, pieces) {
            Ok(true) => return self.send_pieces(req, offset, len, df, pieces, out),
            Ok(false) => {}
            Err(e) => return self.backend_error(req, &e, out),
        }
        if len <= COPY_LIMIT {
            // Read straight into the queue behind room for the header.
            let hl = s.data_header_len();
            let start = out.bytes().len();
            out.bytes().resize(start + hl + len, 0);
            let holes = match self.backend.read(offset, &mut out.bytes()[start + hl..]) {
                Ok(h) => h,
                Err(e) => {
                    out.bytes().truncate(start);
                    return self.backend_error(req, &e, out);
                }
            };
            if !s.structured() || df || holes.0.is_empty() {
                let mut h = Vec::with_capacity(hl);
                s.write_data_header(&mut h, req, offset, len as u64, true);
                out.bytes()[start..start + hl].copy_from_slice(&h);
                return;
            }
            // Sparse: re-emit as data and hole chunks.
            let data = out.bytes()[start + hl..].to_vec();
            out.bytes().truncate(start);
            return self.chunks(req, offset, &data, &holes.0, out, false);
        }
        let mut buf = pool.pop().unwrap_or_default();
        // The backend fills every byte (zeroes where sparse).
        buf.set_len(len);
        let holes = match self.backend.read(offset, &mut buf) {
            Ok(h) => h,
            Err(e) => {
                recycle(pool, buf);
                return self.backend_error(req, &e, out);
            }
        };
        if !s.structured() || df || holes.0.is_empty() {
            s.write_data_header(out.bytes(), req, offset, len as u64, true);
            out.push_large(buf);
            return;
        }
        self.chunks(req, offset, &buf, &holes.0, out, true);
        recycle(pool, buf);
    }

    /// A read reply from zero-copy pieces: one data chunk (simple replies,
    /// DF, or no holes), else data chunks and hole chunks.
    fn send_pieces(
        &self,
        req: &Request,
        offset: u64,
        len: usize,
        df: bool,
        pieces: &mut Vec<ringbd_backend::Piece>,
        out: &mut OutBuf,
    ) {
        let s = &self.session;
        let has_hole = pieces.iter().any(|p| p.bytes().is_none());
        if !s.structured() || df || !has_hole {
            s.write_data_header(out.bytes(), req, offset, len as u64, true);
            pieces.drain(..).for_each(|p| out.push_piece(p));
            return;
        }
        // Runs of data pieces become one OFFSET_DATA chunk each.
        let mut runs: Vec<(usize, usize, bool)> = Vec::new(); // (start, len, hole)
        let mut pos = 0;
        for p in pieces.iter() {
            let hole = p.bytes().is_none();
            match runs.last_mut() {
                Some(r) if r.2 == hole && !hole => r.1 += p.len(),
                _ => runs.push((pos, p.len(), hole)),
            }
            pos += p.len();
        }
        let last = runs.len() - 1;
        let mut it = pieces.drain(..);
        for (i, (start, n, hole)) in runs.into_iter().enumerate() {
            let at = offset + start as u64;
            if hole {
                it.next();
                s.write_hole(out.bytes(), req, at, n as u32, i == last);
                continue;
            }
            s.write_data_header(out.bytes(), req, at, n as u64, i == last);
            let mut left = n;
            while left > 0 {
                let Some(p) = it.next() else { break };
                left = left.saturating_sub(p.len());
                out.push_piece(p);
            }
        }
    }

    /// A structured read reply with holes: data pieces as `OFFSET_DATA`,
    /// sparse pieces as `OFFSET_HOLE`.
    fn chunks(
        &self,
        req: &Request,
        offset: u64,
        data: &[u8],
        holes: &[std::ops::Range<usize>],
        out: &mut OutBuf,
        large: bool,
    ) {
        let mut pieces = Vec::with_capacity(holes.len() * 2 + 1);
        let mut pos = 0;
        for h in holes {
            if h.start > pos {
                pieces.push((pos..h.start, false));
            }
            pieces.push((h.clone(), true));
            pos = h.end;
        }
        if pos < data.len() {
            pieces.push((pos..data.len(), false));
        }
        let last = pieces.len() - 1;
        for (i, (range, hole)) in pieces.into_iter().enumerate() {
            let at = offset + range.start as u64;
            if hole {
                self.session.write_hole(out.bytes(), req, at, range.len() as u32, i == last);
            } else {
                self.session.write_data_header(out.bytes(), req, at, range.len() as u64, i == last);
                if large && range.len() > COPY_LIMIT {
                    out.push_large(IoBuf::from_slice(&data[range]));
                } else {
                    out.bytes().extend_from_slice(&data[range]);
                }
            }
        }
    }

    /// Answers a block-status request: through the backend's own
    /// asynchronous query where it has one (the reply follows in
    /// [`Tx::io_complete`]), else at once.
    fn status(&mut self, req: Request, offset: u64, len: u64, req_one: bool, out: &mut OutBuf) {
        if len > 0 && self.async_io && self.backend.aio().is_some() {
            return self.submit(req, Pend::Status { offset, len, req_one }, IoBuf::new());
        }
        if len == 0 {
            self.session.write_error(out.bytes(), &req, Errno::EINVAL, "block status of zero length");
        } else {
            match self.backend.extents(offset, len) {
                Ok(e) => self.status_reply(&req, len, req_one, &e, out),
                Err(e) => self.backend_error(&req, &e, out),
            }
        }
        out.reply_done();
    }

    fn status_reply(
        &self,
        req: &Request,
        len: u64,
        req_one: bool,
        extents: &[ringbd_backend::Extent],
        out: &mut OutBuf,
    ) {
        let mut ext: Vec<Extent> = extents
            .iter()
            .map(|e| Extent {
                len: e.len,
                flags: if e.hole { state_flags::HOLE } else { 0 }
                    | if e.zero { state_flags::ZERO } else { 0 },
            })
            .collect();
        clip_extents(&mut ext, len, req_one, self.session.extended());
        if ext.is_empty() {
            // "Allocated, contents unknown" is always a true answer.
            ext.push(Extent { len: len.min(u64::from(u32::MAX) & !0xfff).max(1), flags: 0 });
        }
        self.session.write_block_status(out.bytes(), req, BASE_ALLOCATION_ID, &ext);
    }
}
