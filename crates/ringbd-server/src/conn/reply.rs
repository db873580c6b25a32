//! Replies the transmission phase builds inline: reads (straight from a
//! memory export's pages, or through a buffer), block status, and backend
//! errors. A child module of `conn`.

use super::*;

impl Tx {
    pub(super) fn backend_error(&self, req: &Request, e: &ringbd_backend::Error, out: &mut OutBuf) {
        let errno = nbd_errno(e);
        // A refused fast zero is the protocol working, not a failure.
        if errno != Errno::ENOTSUP {
            tracing::warn!(
                conn = ?self.peer,
                export = ?self.name,
                op = %e.op,
                offset = e.offset,
                len = e.len,
                errno = %errno,
                "export {:?}: {e}",
                self.name
            );
        }
        self.error_reply(req, errno, &e.to_string(), out);
    }

    /// Queues an error reply to `req`; every error reply goes through
    /// here, so the metrics count it (in [`Tx::reply_done`]).
    pub(super) fn error_reply(&self, req: &Request, errno: Errno, msg: &str, out: &mut OutBuf) {
        self.reply_error.set(Some(errno));
        self.session.write_error(out.bytes(), req, errno, msg);
    }

    /// The reply to `req`, whose header was parsed at `t0`, is complete in
    /// `out`: counts it in the queue and in the export's metrics.
    pub(super) fn reply_done(&self, req: &Request, t0: Instant, out: &mut OutBuf) {
        out.reply_done();
        let error = self.reply_error.take();
        let bytes = match req.typ {
            nbd_proto::CmdType::READ | nbd_proto::CmdType::WRITE => req.length,
            _ => 0,
        };
        self.metrics.answered(req.typ, bytes, t0.elapsed(), error);
    }

    /// Answers a read of `(offset, len, df)` inline; false (nothing
    /// queued) when it is to be read and sent in pieces instead (a read
    /// through a buffer larger than a piece, [`Share::piece`]).
    pub(super) fn read(
        &self,
        req: &Request,
        (offset, len, df): (u64, usize, bool),
        out: &mut OutBuf,
        pool: &mut Vec<IoBuf>,
        pieces: &mut Vec<ringbd_backend::Piece>,
    ) -> bool {
        if len == 0 {
            self.session.write_ok(out.bytes(), req);
            return true;
        }
        // Backends whose data sits in memory hand out their pages: the reply
        // is sent straight from them, with no staging copy.
        pieces.clear();
        match self.backend.read_shared(offset, len, pieces) {
            Ok(true) => {
                self.send_pieces(req, offset, len, df, pieces, out);
                return true;
            }
            Ok(false) => {}
            Err(e) => {
                self.backend_error(req, &e, out);
                return true;
            }
        }
        if len as u64 > self.share.piece() {
            return false;
        }
        self.read_through_buffer(req, (offset, len, df), out, pool);
        true
    }

    /// Answers a read from [`Backend::read_shared`] when the backend can
    /// (before a read would be started on the ring); false: nothing queued.
    pub(super) fn read_without_io(
        &mut self,
        (req, t0): (&Request, Instant),
        (offset, len, df): (u64, usize, bool),
        out: &mut OutBuf,
    ) -> bool {
        let mut pieces = std::mem::take(&mut self.pieces);
        pieces.clear();
        let answered = match self.backend.read_shared(offset, len, &mut pieces) {
            Ok(true) => {
                self.send_pieces(req, offset, len, df, &mut pieces, out);
                true
            }
            Ok(false) => false,
            Err(e) => {
                self.backend_error(req, &e, out);
                true
            }
        };
        self.pieces = pieces;
        if answered {
            self.reply_done(req, t0, out);
        }
        answered
    }

    /// [`Tx::read`] of a backend that does not share its pages.
    fn read_through_buffer(
        &self,
        req: &Request,
        (offset, len, df): (u64, usize, bool),
        out: &mut OutBuf,
        pool: &mut Vec<IoBuf>,
    ) {
        let s = &self.session;
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
    pub(super) fn send_pieces(
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
    pub(super) fn chunks(
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
    pub(super) fn status(
        &mut self,
        (req, t0): (Request, Instant),
        offset: u64,
        len: u64,
        req_one: bool,
        out: &mut OutBuf,
    ) {
        if len > 0 && self.async_io && self.backend.aio().is_some() {
            return self.submit((req, t0), Pend::Status { offset, len, req_one }, IoBuf::new());
        }
        if len == 0 {
            self.error_reply(&req, Errno::EINVAL, "block status of zero length", out);
        } else {
            match self.backend.extents(offset, len) {
                Ok(e) => self.status_reply(&req, len, req_one, &e, out),
                Err(e) => self.backend_error(&req, &e, out),
            }
        }
        self.reply_done(&req, t0, out);
    }

    pub(super) fn status_reply(
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
