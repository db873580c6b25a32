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
//! moved to the kernel (kTLS, `conn/ktls_io.rs`), the connection is plaintext
//! again as far as it and the engine know.

use std::cell::Cell;
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::time::Instant;

use nbd_proto::handshake::BASE_ALLOCATION_ID;
use nbd_proto::transmission::EXTENDED_REQUEST_LEN;
use nbd_proto::wire::state_flags;
use nbd_proto::{
    clip_extents, Command, Errno, Extent, FramingError, Outcome, Request, ServerHandshake, Session,
};
use ringbd_backend::{Backend, BlockOp, ZeroFlags};
use ringbd_io::buf::{Arena, IoBuf};
use ringbd_io::fs::{fallocate_unsupported, Fallocate};
use ringbd_io::uring::FileOp;

use crate::budget::Share;
use crate::exports::{nbd_errno, Exports};
use crate::metrics::ConnMetrics;
use crate::out::OutBuf;
use crate::tls::{TlsLayer, TlsServer};

mod file_io;
mod ktls_io;
mod reply;
mod tls_io;
use file_io::{ChunkedRead, ChunkedWrite, Pend};
pub use file_io::{IoOp, IoRequest};
use ktls_io::KtlsState;

/// Read payloads up to this size are copied into the inline queue; larger
/// ones travel as their own iovec.
const COPY_LIMIT: usize = 16 * 1024;
/// Stop taking requests while this many reply bytes wait to be sent,
/// counting the bytes of file operations in flight (they become replies or
/// were payloads) and what a send has taken (backpressure: a client that
/// does not read cannot grow the queue). The most a connection's share of
/// the server's reply budget can be ([`crate::budget`]): with many
/// connections the limit is smaller.
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

    /// The export's backend, once the handshake chose one.
    pub fn backend(&self) -> Option<&Arc<dyn Backend>> {
        match &self.phase {
            Phase::Transmission(tx) => Some(&tx.backend),
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
        self.trim_pool();
        if let Phase::Transmission(tx) = &mut self.phase {
            tx.io_complete(token, result, buf, &mut self.out, &mut self.pool);
            if tx.chunks_waiting {
                // The finished operation's bytes may be what a large read
                // waited for.
                tx.resume_chunked_reads(&mut self.out, &mut self.pool);
            }
            if tx.pending_count == 0 {
                if tx.in_order_chunked_read() {
                    // A large read with a simple reply waited for the others.
                    tx.resume_chunked_reads(&mut self.out, &mut self.pool);
                } else if tx.closed {
                    // (Only with nothing in flight: the engine frees the
                    // connection once nothing is.)
                    self.phase = Phase::Closed;
                }
            }
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
        let (io_room, held, limit) = match &self.phase {
            Phase::Transmission(tx) => (tx.io_room(), tx.held(), tx.share.limit()),
            _ => (true, 0, OUT_HIGH_WATER),
        };
        let wire = self.out();
        !self.is_closed()
            && io_room
            && self.out.len() < limit
            && self.out.replies() < self.reply_limit
            && wire.len() + held < limit
            && wire.replies() < self.reply_limit
    }

    /// The most one arming of this connection's receive should take from
    /// its socket: the engine's `configured` limit, or the connection's
    /// share of the reply budget if that is smaller (docs/engine.md,
    /// "Resource model").
    pub fn receive_share(&self, configured: u32) -> u32 {
        match &self.phase {
            Phase::Transmission(tx) => configured.min(u32::try_from(tx.share.limit()).unwrap_or(u32::MAX)),
            _ => configured,
        }
    }

    /// The reply queue's limit now (its share of the reply budget).
    pub fn queue_limit(&self) -> usize {
        match &self.phase {
            Phase::Transmission(tx) => tx.share.limit(),
            _ => OUT_HIGH_WATER,
        }
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
        let taken = match &mut self.tls {
            Some(t) => std::mem::replace(&mut t.wire, spare),
            None => std::mem::replace(&mut self.out, spare),
        };
        // Until it is handed back (`recycle`), it counts against the queue's
        // limit: a client that stops reading holds one limit's worth, not
        // one in the send and another in the queue.
        if let Phase::Transmission(tx) = &mut self.phase {
            tx.sending = taken.len();
        }
        taken
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
        if let Phase::Transmission(tx) = &mut self.phase {
            tx.sending = 0;
        }
        self.queue_drained();
    }

    /// Marks the queue as sent (engines that write synchronously).
    pub fn sent(&mut self) {
        match &mut self.tls {
            Some(t) => t.wire.clear(&mut self.pool),
            None => self.out.clear(&mut self.pool),
        }
        self.queue_drained();
    }

    /// The reply queue has room again: large reads waiting for it go on.
    fn queue_drained(&mut self) {
        if let Phase::Transmission(tx) = &mut self.phase {
            if tx.chunks_waiting {
                tx.resume_chunked_reads(&mut self.out, &mut self.pool);
                self.seal();
            }
        }
        self.trim_pool();
    }

    /// Keeps the recycled payload buffers within a quarter of the
    /// connection's share: they are memory it holds too (`crate::budget`).
    fn trim_pool(&mut self) {
        let Phase::Transmission(tx) = &self.phase else { return };
        let cap = tx.share.limit() / 4;
        let mut kept: usize = self.pool.iter().map(IoBuf::capacity).sum();
        while kept > cap {
            let Some(b) = self.pool.pop() else { break };
            kept -= b.capacity();
        }
    }

    /// The peer closed its side: nothing more will arrive.
    pub fn peer_closed(&mut self) {
        if let Phase::Transmission(tx) = &self.phase {
            if !matches!(tx.rx, Rx::Header) || tx.hdr_len > 0 {
                tracing::warn!("{}: export {:?}: client closed mid-request", self.peer, tx.name);
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
                tracing::warn!("{}: handshake failed: {e}", self.peer);
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
        tracing::debug!(
            conn = ?self.peer,
            export = ?neg.export.name,
            "{}: export {:?}: structured replies {}, extended headers {}, base:allocation {}, flags 0x{:04x}",
            self.peer,
            neg.export.name,
            neg.structured,
            neg.extended,
            neg.base_allocation.is_some(),
            neg.flags
        );
        self.phase = Phase::Transmission(Box::new(Tx {
            session: Session::new(neg),
            backend: export.backend.clone(),
            name: export.name.clone(),
            peer: self.peer.clone(),
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
            chunked: Vec::new(),
            chunked_writes: Vec::new(),
            chunks_waiting: false,
            sending: 0,
            share: self.exports.budget().join(),
            metrics: export.metrics.connect(),
            reply_error: Cell::new(None),
            started: Vec::new(),
        }));
        // `leftover` came out of `data`: it is its tail. Consume only what
        // precedes it, so the caller hands the rest to the new phase.
        data.len() - leftover.len().min(data.len())
    }
}

/// Keeps a payload buffer for reuse; an arena chunk goes back to its arena
/// instead (the ring's registered buffers are shared by its connections).
pub(crate) fn recycle(pool: &mut Vec<IoBuf>, buf: IoBuf) {
    // Large buffers go: kept, a burst of 32 MiB reads would leave each
    // connection holding eight of them.
    if !buf.is_chunk() && pool.len() < 8 && buf.capacity() <= POOL_BUF_MAX {
        pool.push(buf);
    }
}

/// The largest payload buffer a connection keeps for reuse.
const POOL_BUF_MAX: usize = 1 << 20;

/// What the transmission phase expects next on the wire.
enum Rx {
    Header,
    /// Write payload: each piece goes to the backend where it landed, or,
    /// with asynchronous file I/O, into `collect` for one ring write.
    Write {
        req: Request,
        /// When its header was parsed (the metrics' latency starts there).
        t0: Instant,
        offset: u64,
        left: u64,
        fua: bool,
        failed: Option<ringbd_backend::Error>,
        collect: Option<IoBuf>,
        /// A write larger than a piece ([`Share::piece`]), gathered and
        /// written in pieces (`Tx::chunked_writes`).
        parent: Option<u32>,
        /// The size of those pieces (the share when the write began).
        piece_len: u64,
    },
    /// A small payload collected whole (block-status filter).
    Payload {
        req: Request,
        t0: Instant,
        buf: Vec<u8>,
        want: usize,
    },
    /// Payload of a refused request, read and dropped.
    Discard {
        left: u64,
    },
}

struct Tx {
    /// The client, for log events (`conn=`).
    peer: String,
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
    /// Large reads being read and sent in pieces ([`Share::piece`]).
    chunked: Vec<Option<ChunkedRead>>,
    /// Large writes being gathered and written in pieces ([`Share::piece`]).
    chunked_writes: Vec<Option<ChunkedWrite>>,
    /// Some chunked read waits for room in the reply queue.
    chunks_waiting: bool,
    /// Bytes of the queue an engine took to send and has not handed back
    /// (`Connection::take_out`): they count against [`OUT_HIGH_WATER`].
    sending: usize,
    /// This connection's share of the server's reply budget: the limit of
    /// its queue and the size of its large reads' and writes' pieces.
    share: Share,
    /// Its counters in the export's metrics.
    metrics: ConnMetrics,
    /// The error the reply being built carries ([`Tx::error_reply`]),
    /// taken by [`Tx::reply_done`].
    reply_error: Cell<Option<Errno>>,
    /// When the request waiting on each token's file operation was parsed.
    started: Vec<Instant>,
}

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
        let limit = self.share.limit();
        while used < data.len()
            && !self.closed
            && out.len() + self.held() < limit
            && out.replies() < reply_limit
        {
            let rest = &data[used..];
            // The in-flight limits hold for every request, also for
            // requests that arrive together in one buffer, and a large
            // write's payload waits while its pieces in flight are full.
            if matches!(self.rx, Rx::Header) && self.hdr_len == 0 && !self.io_room() {
                break;
            }
            if self.write_pieces_full() {
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
                Rx::Write { req, t0, offset, left, fua, collect: Some(buf), parent, piece_len, .. } => {
                    let room = match parent {
                        Some(_) => *piece_len - buf.len() as u64,
                        None => u64::MAX,
                    };
                    let n = (*left).min(rest.len() as u64).min(room) as usize;
                    *left -= n as u64;
                    buf.extend_from_slice(&rest[..n]);
                    used += n;
                    if *left == 0 || (parent.is_some() && buf.len() as u64 == *piece_len) {
                        let (req, t0, start, left, fua, parent, piece_len) =
                            (*req, *t0, *offset, *left, *fua, *parent, *piece_len);
                        let piece = std::mem::take(buf);
                        *offset += piece.len() as u64;
                        if left == 0 {
                            self.rx = Rx::Header;
                        }
                        self.write_piece((req, t0), (parent, piece_len), start, fua, left, piece, pool);
                    }
                }
                Rx::Write { req, t0, offset, left, fua, failed, collect: None, .. } => {
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
                        let (req, t0, failed) = (*req, *t0, failed.take());
                        self.rx = Rx::Header;
                        match failed {
                            None => self.session.write_ok(out.bytes(), &req),
                            Some(e) => self.backend_error(&req, &e, out),
                        }
                        self.reply_done(&req, t0, out);
                    }
                }
                Rx::Payload { req, t0, buf, want } => {
                    let n = (*want - buf.len()).min(rest.len());
                    buf.extend_from_slice(&rest[..n]);
                    used += n;
                    if buf.len() == *want {
                        let (req, t0, buf) = (*req, *t0, std::mem::take(buf));
                        self.rx = Rx::Header;
                        match self.session.check_block_status_payload(&req, &buf) {
                            Ok(Command::BlockStatus { offset, len, req_one }) => {
                                self.status((req, t0), offset, len, req_one, out);
                            }
                            Ok(_) => {
                                self.error_reply(&req, Errno::EINVAL, "bad payload", out);
                                self.reply_done(&req, t0, out);
                            }
                            Err(rej) => {
                                self.error_reply(&req, rej.errno, &rej.message, out);
                                self.reply_done(&req, t0, out);
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
        let t0 = Instant::now();
        let hlen = self.session.request_len();
        let req = match self.session.decode(&self.hdr[..hlen]) {
            Ok(r) => r,
            Err(FramingError::BadMagic(m)) => {
                tracing::warn!("export {:?}: bad request magic 0x{m:08x}, disconnecting", self.name);
                self.closed = true;
                return;
            }
        };
        let cmd = match self.session.check(&req) {
            Ok(c) => c,
            Err(rej) => {
                self.error_reply(&req, rej.errno, &rej.message, out);
                self.reply_done(&req, t0, out);
                if rej.disconnect {
                    tracing::warn!("export {:?}: {}, disconnecting", self.name, rej.message);
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
                    let piece_len = self.share.piece();
                    let parent =
                        (self.async_io && len > piece_len).then(|| self.start_chunked_write(req, t0));
                    let first = len.min(piece_len) as usize;
                    let collect = self.async_io.then(|| self.io_buf(first, pool));
                    self.rx = Rx::Write {
                        req,
                        t0,
                        offset,
                        left: len,
                        fua,
                        failed: None,
                        collect,
                        parent,
                        piece_len,
                    };
                    return;
                }
            }
            Command::BlockStatusPayload { payload } => {
                let want = payload as usize;
                self.rx = Rx::Payload { req, t0, buf: Vec::with_capacity(want), want };
                return;
            }
            Command::Read { offset, len, df } if self.async_io && len > self.share.piece() => {
                self.start_chunked_read((req, t0), offset, len, df, out, pool);
                return;
            }
            Command::Read { offset, len, df } if self.async_io && len > 0 => {
                // A backend may answer without reading: a qcow2 image's
                // range that stores nothing is a hole.
                if self.read_without_io((&req, t0), (offset, len as usize, df), out) {
                    return;
                }
                let mut buf = self.io_buf(len as usize, pool);
                // The file fills it; a failed read never sends it.
                buf.set_len(len as usize);
                self.submit((req, t0), Pend::Read { offset, len, done: 0 }, buf);
                return;
            }
            Command::Flush if self.async_io => {
                self.submit((req, t0), Pend::Flush, IoBuf::new());
                return;
            }
            Command::Trim { offset, len, fua } if self.async_io && len > 0 => {
                self.submit((req, t0), Pend::Trim { offset, len, fua }, IoBuf::new());
                return;
            }
            Command::WriteZeroes { offset, len, fua, no_hole, fast } if self.async_io && len > 0 => {
                let flags = ZeroFlags { fua, no_hole, fast };
                // A file: fallocate in the backend's first mode; an
                // asynchronous backend: its own write-zeroes, flags and all.
                let mode = self.backend.zero_mode(no_hole);
                if mode.is_some() || self.backend.aio().is_some() {
                    self.submit((req, t0), Pend::Zero { offset, len, flags, mode }, IoBuf::new());
                    return;
                }
                b.write_zeroes(offset, len, flags)
            }
            Command::Read { offset, len, df } => {
                let mut pieces = std::mem::take(&mut self.pieces);
                let answered = self.read(&req, (offset, len as usize, df), out, pool, &mut pieces);
                self.pieces = pieces;
                if answered {
                    self.reply_done(&req, t0, out);
                } else {
                    self.start_chunked_read((req, t0), offset, len, df, out, pool);
                }
                return;
            }
            Command::BlockStatus { offset, len, req_one } => {
                self.status((req, t0), offset, len, req_one, out);
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
        self.reply_done(&req, t0, out);
    }
}
