//! File and asynchronous-backend operations of the transmission phase:
//! what the engine runs for a connection ([`IoRequest`]), the requests
//! waiting for them, the in-flight limits, and their completions. A child
//! module of `conn`, so it works on the connection's own fields.

use super::*;

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

/// What the engine runs: a file operation on its ring (file exports), an
/// operation of an asynchronous backend
/// ([`AsyncIo::submit`](ringbd_backend::AsyncIo::submit), in the block
/// layer's words: write-zeroes keep their `NO_HOLE` and `FAST_ZERO`), or a
/// block-status query ([`AsyncIo::submit_extents`](ringbd_backend::AsyncIo::submit_extents),
/// asynchronous backends only).
#[derive(Debug, Clone, Copy)]
pub enum IoOp {
    File(FileOp),
    Block(BlockOp),
    Extents { offset: u64, len: u64 },
}

/// What a request waiting on a file operation still needs.
#[derive(Debug, Clone, Copy)]
pub(super) enum Pend {
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
    /// One piece of a chunked write (`parent` in `Tx::chunked_writes`).
    WriteChunk {
        parent: u32,
        offset: u64,
        len: u64,
        fua: bool,
        done: u64,
    },
    /// One piece of a chunked read (`parent` in `Tx::chunked`).
    ReadChunk {
        parent: u32,
        offset: u64,
        len: u64,
        done: u64,
    },
    Flush,
    /// A punched hole (`fallocate`), then an fsync with `fua`.
    Trim {
        offset: u64,
        len: u64,
        fua: bool,
    },
    /// A file's zeroing: `fallocate` in the backend's first zeroing mode
    /// (`mode`); the other ways are the backend's own, inline, if this one
    /// is unsupported. An asynchronous backend's (`mode` `None`): its
    /// write-zeroes, with the request's flags.
    Zero {
        offset: u64,
        len: u64,
        flags: ZeroFlags,
        mode: Option<Fallocate>,
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
    pub(super) fn bytes(&self) -> u64 {
        match *self {
            Pend::Read { len, .. }
            | Pend::Write { len, .. }
            | Pend::ReadChunk { len, .. }
            | Pend::WriteChunk { len, .. } => len,
            Pend::Flush
            | Pend::Trim { .. }
            | Pend::Zero { .. }
            | Pend::SyncAfter { .. }
            | Pend::Status { .. } => 0,
        }
    }
}

/// Reads of file exports larger than a piece (the connection's
/// [`Share::piece`]: 1 MiB, less when many connections share the reply
/// budget) are read and sent in pieces: what such a read holds is
/// `READ_CHUNKS_AHEAD` pieces in flight and what the reply queue takes,
/// whatever its length (docs/engine.md, "Resource model").
/// Pieces of one chunked read in flight at once (2: one being read while
/// the one before it is sent).
const READ_CHUNKS_AHEAD: u32 = 2;

/// A large read answered piece by piece, each piece sent once it is read.
/// With structured replies (and no DF) each piece is its own `OFFSET_DATA`
/// chunk, in any order; the last to finish carries `DONE`, or an error
/// chunk ends the reply. A simple reply, and a structured one with DF (one
/// `OFFSET_DATA` chunk), is one header and the data in order, with nothing
/// else in between: such a read starts only when no other operation of the
/// connection is in flight, takes no new request until it is done, and
/// sends its pieces in order; its header goes with the first piece, so a
/// first piece that fails is an ordinary error reply, and a later one,
/// after the header said success, can only end the connection.
pub(super) struct ChunkedRead {
    req: Request,
    t0: Instant,
    /// The size of its pieces (the share when the read began).
    piece: u64,
    /// Next byte to read, and the end of the request.
    next: u64,
    end: u64,
    inflight: u32,
    failed: Option<ringbd_backend::Error>,
    /// In order (see above): the next byte to send, the pieces read
    /// ahead of it, and whether its pieces have started.
    in_order: bool,
    sent_to: u64,
    stash: Vec<(u64, IoBuf)>,
    started: bool,
}

/// Writes of file exports larger than a piece ([`Share::piece`]) are
/// gathered and written in pieces, so their buffers do not grow with their
/// length.
/// Pieces of one chunked write in flight at once; the rest of its payload
/// waits (in the socket) meanwhile.
const WRITE_CHUNKS_AHEAD: u32 = 2;

/// A large write written piece by piece as its payload arrives; one reply
/// when the last piece is written (the first failure is the reply's).
pub(super) struct ChunkedWrite {
    req: Request,
    t0: Instant,
    inflight: u32,
    /// The whole payload has arrived (and gone into pieces).
    received_all: bool,
    failed: Option<ringbd_backend::Error>,
}

/// Most file operations one connection keeps in flight, and their bytes;
/// beyond either, the connection stops taking requests until some finish.
pub(super) const MAX_PENDING: usize = 256;
pub(super) const MAX_PENDING_BYTES: u64 = 64 * 1024 * 1024;

impl Tx {
    /// Takes a large read to answer in pieces ([`Share::piece`]).
    pub(super) fn start_chunked_read(
        &mut self,
        (req, t0): (Request, Instant),
        offset: u64,
        len: u64,
        df: bool,
        out: &mut OutBuf,
        pool: &mut Vec<IoBuf>,
    ) {
        let in_order = df || !self.session.structured();
        let cr = ChunkedRead {
            req,
            t0,
            piece: self.share.piece(),
            next: offset,
            end: offset + len,
            inflight: 0,
            failed: None,
            in_order,
            sent_to: offset,
            stash: Vec::new(),
            // An in-order reply waits for the connection's other operations.
            started: !in_order || self.pending_count == 0,
        };
        let id = match self.chunked.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                self.chunked.push(None);
                self.chunked.len() - 1
            }
        };
        self.chunked[id] = Some(cr);
        self.issue_chunks(id, out, pool);
    }

    /// Whether a read with an in-order reply is being sent in pieces (or
    /// waits to be): the connection takes no new request meanwhile.
    pub(super) fn in_order_chunked_read(&self) -> bool {
        self.chunked.iter().flatten().any(|cr| cr.in_order)
    }

    /// Starts the next pieces of chunked read `id` while it has fewer than
    /// [`READ_CHUNKS_AHEAD`] in flight and the reply queue has room (else
    /// it waits for the queue: [`Tx::resume_chunked_reads`]).
    fn issue_chunks(&mut self, id: usize, out: &mut OutBuf, pool: &mut Vec<IoBuf>) {
        loop {
            let (pending, held) = (self.pending_count, self.held());
            let Some(Some(cr)) = self.chunked.get_mut(id) else { return };
            if !cr.started {
                if pending > 0 {
                    return;
                }
                cr.started = true;
            }
            if cr.next >= cr.end || cr.failed.is_some() || cr.inflight >= READ_CHUNKS_AHEAD {
                return;
            }
            // A piece needs room in the reply queue (counting what is in
            // flight); without it the read waits until a send drains the
            // queue or an operation finishes (`resume_chunked_reads`).
            if out.len() + held >= self.share.limit() {
                self.chunks_waiting = true;
                return;
            }
            let (req, t0, next) = (cr.req, cr.t0, cr.next);
            let n = cr.piece.min(cr.end - next);
            cr.next += n;
            cr.inflight += 1;
            let mut buf = self.io_buf(n as usize, pool);
            // The file fills it; a failed read never sends it.
            buf.set_len(n as usize);
            if self.async_io {
                self.submit(
                    (req, t0),
                    Pend::ReadChunk { parent: id as u32, offset: next, len: n, done: 0 },
                    buf,
                );
            } else {
                // A backend read inline (tmpfs files, the threaded engine):
                // the piece is ready at once.
                let r = self.backend.read(next, &mut buf).map(|_| ());
                self.chunk_complete(id as u32, (next, n), r, buf, out, pool);
            }
        }
    }

    /// The reply queue drained, or the connection's operations finished:
    /// chunked reads that waited for either go on.
    pub(super) fn resume_chunked_reads(&mut self, out: &mut OutBuf, pool: &mut Vec<IoBuf>) {
        self.chunks_waiting = false;
        for id in 0..self.chunked.len() {
            self.issue_chunks(id, out, pool);
        }
    }

    /// A piece of chunked read `parent` finished (whole, or failed).
    fn chunk_complete(
        &mut self,
        parent: u32,
        (offset, len): (u64, u64),
        result: Result<(), ringbd_backend::Error>,
        buf: IoBuf,
        out: &mut OutBuf,
        pool: &mut Vec<IoBuf>,
    ) {
        let id = parent as usize;
        let Some(Some(cr)) = self.chunked.get_mut(id) else {
            recycle(pool, buf);
            return;
        };
        cr.inflight -= 1;
        let req = cr.req;
        match result {
            Err(e) => {
                cr.failed.get_or_insert(e);
                recycle(pool, buf);
            }
            Ok(()) if cr.failed.is_some() => recycle(pool, buf),
            Ok(()) if cr.in_order => {
                // In order, the header with the first piece.
                cr.stash.push((offset, buf));
                while let Some(i) = cr.stash.iter().position(|(o, _)| *o == cr.sent_to) {
                    let (o, b) = cr.stash.swap_remove(i);
                    if o == req.offset {
                        self.session.write_data_header(out.bytes(), &req, req.offset, req.length, true);
                    }
                    cr.sent_to += b.len() as u64;
                    out.push_large(b);
                }
            }
            Ok(()) => {
                let last = cr.inflight == 0 && cr.next >= cr.end;
                self.session.write_data_header(out.bytes(), &req, offset, len, last);
                out.push_large(buf);
            }
        }
        let Some(Some(cr)) = self.chunked.get_mut(id) else { return };
        let done = cr.inflight == 0 && (cr.failed.is_some() || cr.next >= cr.end);
        if !done {
            // (Inline pieces are issued by the loop that read this one.)
            if self.async_io {
                self.issue_chunks(id, out, pool);
            }
            return;
        }
        let Some(cr) = self.chunked[id].take() else { return };
        match cr.failed {
            None => {}
            // Nothing of a simple reply went out yet: an ordinary error.
            Some(e) if !cr.in_order || cr.sent_to == req.offset => self.backend_error(&req, &e, out),
            Some(e) => {
                tracing::warn!(
                    "export {:?}: {e}; the reply's header already said success, so the connection ends",
                    self.name
                );
                self.closed = true;
            }
        }
        for (_, b) in cr.stash {
            recycle(pool, b);
        }
        self.reply_done(&req, cr.t0, out);
        // An in-order chunked read that waited for this one may start.
        if self.in_order_chunked_read() {
            self.resume_chunked_reads(out, pool);
        }
    }

    /// Takes a large write to write in pieces ([`Share::piece`]); returns
    /// its id.
    pub(super) fn start_chunked_write(&mut self, req: Request, t0: Instant) -> u32 {
        let cw = ChunkedWrite { req, t0, inflight: 0, received_all: false, failed: None };
        let id = match self.chunked_writes.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                self.chunked_writes.push(None);
                self.chunked_writes.len() - 1
            }
        };
        self.chunked_writes[id] = Some(cw);
        id as u32
    }

    /// Whether the payload being received belongs to a chunked write whose
    /// pieces in flight are at their limit: it waits.
    pub(super) fn write_pieces_full(&self) -> bool {
        match self.rx {
            Rx::Write { parent: Some(p), .. } => {
                matches!(self.chunked_writes.get(p as usize), Some(Some(cw)) if cw.inflight >= WRITE_CHUNKS_AHEAD)
            }
            _ => false,
        }
    }

    /// Writes `piece` (payload bytes at `start`), the whole payload of a
    /// write or, with `parent`, one piece of a chunked write (pieces of
    /// `piece_len`); `left`: payload bytes still to come.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn write_piece(
        &mut self,
        (req, t0): (Request, Instant),
        (parent, piece_len): (Option<u32>, u64),
        start: u64,
        fua: bool,
        left: u64,
        piece: IoBuf,
        pool: &mut Vec<IoBuf>,
    ) {
        let len = piece.len() as u64;
        let Some(p) = parent else {
            self.submit((req, t0), Pend::Write { offset: start, len, fua, done: 0 }, piece);
            return;
        };
        self.submit((req, t0), Pend::WriteChunk { parent: p, offset: start, len, fua, done: 0 }, piece);
        if let Some(Some(cw)) = self.chunked_writes.get_mut(p as usize) {
            cw.inflight += 1;
            cw.received_all = left == 0;
        }
        if left > 0 {
            let next = self.io_buf(left.min(piece_len) as usize, pool);
            if let Rx::Write { collect: Some(b), .. } = &mut self.rx {
                *b = next;
            }
        }
    }

    /// A piece of chunked write `parent` finished (whole, or failed).
    fn write_chunk_complete(
        &mut self,
        parent: u32,
        result: Result<(), ringbd_backend::Error>,
        buf: IoBuf,
        out: &mut OutBuf,
        pool: &mut Vec<IoBuf>,
    ) {
        recycle(pool, buf);
        let id = parent as usize;
        let Some(Some(cw)) = self.chunked_writes.get_mut(id) else { return };
        cw.inflight -= 1;
        if let Err(e) = result {
            cw.failed.get_or_insert(e);
        }
        if !cw.received_all || cw.inflight > 0 {
            return;
        }
        let Some(cw) = self.chunked_writes[id].take() else { return };
        match cw.failed {
            None => self.session.write_ok(out.bytes(), &cw.req),
            Some(e) => self.backend_error(&cw.req, &e, out),
        }
        self.reply_done(&cw.req, cw.t0, out);
    }

    /// Bytes the connection holds outside its reply queue: what a send has
    /// taken and not handed back, and the buffers of file operations in
    /// flight (a read's become its reply). They count against the queue's
    /// limit ([`Share::limit`]) with the queue.
    pub(super) fn held(&self) -> usize {
        self.sending.saturating_add(usize::try_from(self.pending_bytes).unwrap_or(usize::MAX))
    }

    /// Whether another request may start: file operations in flight and
    /// their bytes are under their limits.
    pub(super) fn io_room(&self) -> bool {
        self.pending_count < MAX_PENDING
            && self.pending_bytes < MAX_PENDING_BYTES
            && !self.in_order_chunked_read()
            && !self.write_pieces_full()
    }

    /// An empty buffer for a file operation of `len` bytes: a registered
    /// one while the arena has room, else a recycled or new one.
    pub(super) fn io_buf(&self, len: usize, pool: &mut Vec<IoBuf>) -> IoBuf {
        if let Some(b) = self.arena.as_ref().and_then(|a| a.take(len)) {
            return b;
        }
        let mut b = pool.pop().unwrap_or_default();
        b.clear();
        b.reserve(len);
        b
    }

    /// Queues a file operation for the engine.
    /// Queues a file operation for the engine; `t0`: when the request it
    /// serves was parsed.
    pub(super) fn submit(&mut self, (req, t0): (Request, Instant), pend: Pend, buf: IoBuf) {
        let token = match self.free_tokens.pop() {
            Some(t) => {
                self.started[t as usize] = t0;
                t
            }
            None => {
                self.pending.push(None);
                self.started.push(t0);
                (self.pending.len() - 1) as u32
            }
        };
        self.pending_count += 1;
        self.pending_bytes += pend.bytes();
        self.pending[token as usize] = Some((req, pend));
        self.queue_op(token, pend, buf);
    }

    pub(super) fn queue_op(&mut self, token: u32, pend: Pend, buf: IoBuf) {
        if self.backend.aio().is_some() {
            let op = match pend {
                Pend::Read { offset, done, .. } | Pend::ReadChunk { offset, done, .. } => {
                    IoOp::Block(BlockOp::Read { offset: offset + done, at: done as usize })
                }
                Pend::Write { offset, fua, done, .. } | Pend::WriteChunk { offset, fua, done, .. } => {
                    IoOp::Block(BlockOp::Write { offset: offset + done, at: done as usize, fua })
                }
                Pend::Flush | Pend::SyncAfter { .. } => IoOp::Block(BlockOp::Flush),
                Pend::Trim { offset, len, .. } => IoOp::Block(BlockOp::Trim { offset, len }),
                Pend::Zero { offset, len, flags, .. } => IoOp::Block(BlockOp::WriteZeroes {
                    offset,
                    len,
                    no_hole: flags.no_hole,
                    fast: flags.fast,
                }),
                Pend::Status { offset, len, .. } => IoOp::Extents { offset, len },
            };
            self.io_out.push(IoRequest { token, op, buf, direct: false });
            return;
        }
        let (op, range) = match pend {
            Pend::Read { offset, len, done } | Pend::ReadChunk { offset, len, done, .. } => {
                (FileOp::Read { offset: offset + done, at: done as usize }, Some((offset, len, done)))
            }
            Pend::Write { offset, len, fua, done } | Pend::WriteChunk { offset, len, fua, done, .. } => {
                let op = FileOp::Write { offset: offset + done, at: done as usize, dsync: fua };
                (op, Some((offset, len, done)))
            }
            Pend::Flush | Pend::SyncAfter { .. } => (FileOp::Fsync, None),
            Pend::Trim { offset, len, .. } => {
                (FileOp::Fallocate { mode: Fallocate::PunchHole, offset, len }, None)
            }
            Pend::Zero { offset, len, mode, .. } => {
                let mode = mode.unwrap_or(Fallocate::ZeroRange);
                (FileOp::Fallocate { mode, offset, len }, None)
            }
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

    pub(super) fn io_complete(
        &mut self,
        token: u32,
        result: std::io::Result<usize>,
        buf: IoBuf,
        out: &mut OutBuf,
        pool: &mut Vec<IoBuf>,
    ) {
        let Some((req, pend)) = self.pending.get_mut(token as usize).and_then(Option::take) else { return };
        // (`started` grows with `pending`.)
        let t0 = self.started.get(token as usize).copied().unwrap_or_else(Instant::now);
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
            self.reply_done(&req, t0, out);
            return;
        }
        let fallocate = match pend {
            Pend::Trim { offset, len, fua } => Some((Op::Trim, offset, len, fua)),
            Pend::Zero { offset, len, flags, .. } => Some((Op::WriteZeroes, offset, len, flags.fua)),
            Pend::SyncAfter { op, offset, len } => Some((op, offset, len, false)),
            Pend::Read { .. }
            | Pend::ReadChunk { .. }
            | Pend::Write { .. }
            | Pend::WriteChunk { .. }
            | Pend::Flush
            | Pend::Status { .. } => None,
        };
        if let Some(what) = fallocate {
            if self.fallocate_complete(token, &req, pend, what, result, out) {
                finish(self);
                self.reply_done(&req, t0, out);
            }
            return;
        }
        let (op, offset, len) = match pend {
            Pend::Read { offset, len, .. } | Pend::ReadChunk { offset, len, .. } => {
                (ringbd_backend::Op::Read, offset, len)
            }
            Pend::Write { offset, len, .. } | Pend::WriteChunk { offset, len, .. } => {
                (ringbd_backend::Op::Write, offset, len)
            }
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
            Ok(0) if matches!(pend, Pend::Read { .. } | Pend::ReadChunk { .. }) && pend.bytes() > 0 => {
                Some((ringbd_backend::ErrorKind::Io, "file is shorter than the export (truncated?)"))
            }
            Ok(0) if matches!(pend, Pend::Write { .. } | Pend::WriteChunk { .. }) && pend.bytes() > 0 => {
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
                if let Pend::ReadChunk { parent, offset, len, .. } = pend {
                    return self.chunk_complete(parent, (offset, len), Err(e), buf, out, pool);
                }
                if let Pend::WriteChunk { parent, .. } = pend {
                    return self.write_chunk_complete(parent, Err(e), buf, out, pool);
                }
                self.backend_error(&req, &e, out);
                self.reply_done(&req, t0, out);
                recycle(pool, buf);
                return;
            }
        };
        let next = match pend {
            Pend::Read { offset, len, done } if done + moved < len => {
                Some(Pend::Read { offset, len, done: done + moved })
            }
            Pend::ReadChunk { parent, offset, len, done } if done + moved < len => {
                Some(Pend::ReadChunk { parent, offset, len, done: done + moved })
            }
            Pend::WriteChunk { parent, offset, len, fua, done } if done + moved < len => {
                Some(Pend::WriteChunk { parent, offset, len, fua, done: done + moved })
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
            Pend::ReadChunk { parent, offset, len, .. } => {
                return self.chunk_complete(parent, (offset, len), Ok(()), buf, out, pool);
            }
            Pend::WriteChunk { parent, .. } => {
                return self.write_chunk_complete(parent, Ok(()), buf, out, pool);
            }
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
        self.reply_done(&req, t0, out);
    }

    /// Completion of a trim, a zeroing or the fsync after one: true when
    /// the reply is queued, false when a follow-up fsync was queued under
    /// the same token.
    pub(super) fn fallocate_complete(
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
            // A file's backend knows the other ways to zero (and how to
            // refuse a fast zero); they run inline, as without the ring. (An
            // asynchronous backend's refusal is its answer.)
            (Pend::Zero { offset, len, flags, mode: Some(_) }, Err(e)) if fallocate_unsupported(&e) => {
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
}
