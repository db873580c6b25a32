//! The portable engine: one blocking thread per connection, driving the
//! sans-IO handshake and transmission state machines of `nbd-proto`.
//!
//! Requests are read through a buffer, so everything a client pipelined
//! arrives in one `read`; replies are queued and sent when no complete
//! request is left in the buffer, so the replies to a burst of requests
//! leave in one vectored write. Large read payloads are sent straight from
//! the read buffer as a second iovec, never copied into the reply queue.

use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;
use std::sync::Arc;

use nbd_proto::handshake::BASE_ALLOCATION_ID;
use nbd_proto::wire::state_flags;
use nbd_proto::{
    clip_extents, Command, Errno, Extent, FramingError, Outcome, Request, ServerHandshake, Session,
};
use ringbd_backend::{Backend, ZeroFlags};

use crate::exports::{nbd_errno, Exports};
use crate::listener::Stream;
use crate::log;

/// Read-buffer size: room for many pipelined headers plus small payloads.
const IN_BUF: usize = 256 * 1024;
/// Read payloads up to this size are copied into the reply queue (one
/// write for many small replies); larger ones go out as their own iovec.
const COPY_LIMIT: usize = 16 * 1024;

/// Serves one connection to completion. Errors are the connection's own
/// (I/O on the socket); they end this connection and nothing else.
pub fn serve(stream: Stream, exports: Arc<Exports>) -> io::Result<()> {
    let peer = stream.peer();
    let mut input = InBuf::new(stream.try_clone()?);
    let mut out = OutQueue { buf: Vec::with_capacity(64 * 1024), stream };

    let mut hs = ServerHandshake::new(&*exports);
    loop {
        if hs.has_output() {
            out.buf.extend_from_slice(&hs.take_output());
            out.flush()?;
        }
        if hs.outcome().is_some() {
            break;
        }
        if input.fill()? == 0 {
            log::debug(format_args!("{peer}: disconnected during the handshake"));
            return Ok(());
        }
        match hs.handle(input.data()) {
            Ok(used) => input.consume(used),
            Err(e) => {
                out.buf.extend_from_slice(&hs.take_output());
                out.flush()?;
                log::warn(format_args!("{peer}: handshake failed: {e}"));
                return Ok(());
            }
        }
    }
    let neg = match hs.into_outcome() {
        Some(Outcome::Transmission(n)) => n,
        _ => return Ok(()),
    };
    let Some(export) = exports.get(&neg.export.name) else {
        return Ok(());
    };
    log::debug(format_args!(
        "{peer}: export {:?}: structured replies {}, extended headers {}, base:allocation {}, flags 0x{:04x}",
        neg.export.name,
        neg.structured,
        neg.extended,
        neg.base_allocation.is_some(),
        neg.flags
    ));
    let mut conn = Transmission {
        session: Session::new(neg),
        backend: export.backend.as_ref(),
        name: &export.name,
        data: Vec::new(),
    };
    let result = conn.run(&mut input, &mut out);
    // Whatever was answered must reach the client before the socket closes.
    let flushed = out.flush();
    out.stream.shutdown(Shutdown::Both).ok();
    result.and(flushed)
}

struct Transmission<'a> {
    session: Session,
    backend: &'a dyn Backend,
    name: &'a str,
    /// Payload buffer for reads and writes, reused across requests.
    data: Vec<u8>,
}

impl Transmission<'_> {
    fn run(&mut self, input: &mut InBuf, out: &mut OutQueue) -> io::Result<()> {
        let hlen = self.session.request_len();
        loop {
            if input.len() < hlen {
                // About to wait for the client: send what is queued first.
                out.flush()?;
                if !input.fill_to(hlen)? {
                    if input.len() > 0 {
                        log::warn(format_args!("export {:?}: client closed mid-request", self.name));
                    }
                    return Ok(());
                }
            }
            let req = match self.session.decode(&input.data()[..hlen]) {
                Ok(r) => r,
                Err(FramingError::BadMagic(m)) => {
                    log::warn(format_args!(
                        "export {:?}: bad request magic 0x{m:08x}, disconnecting",
                        self.name
                    ));
                    return Ok(());
                }
            };
            input.consume(hlen);
            match self.session.check(&req) {
                Err(rej) => {
                    self.session.write_error(&mut out.buf, &req, rej.errno, &rej.message);
                    if rej.disconnect {
                        log::warn(format_args!("export {:?}: {}, disconnecting", self.name, rej.message));
                        return Ok(());
                    }
                    if !input.discard(rej.discard)? {
                        return Ok(());
                    }
                }
                Ok(Command::Disc) => return Ok(()),
                Ok(cmd) => {
                    if !self.execute(&req, cmd, input, out)? {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Runs one valid command and queues its reply. `Ok(false)`: the client
    /// went away mid-request.
    fn execute(
        &mut self,
        req: &Request,
        cmd: Command,
        input: &mut InBuf,
        out: &mut OutQueue,
    ) -> io::Result<bool> {
        let b = self.backend;
        let result = match cmd {
            Command::Read { offset, len, df } => return self.read(req, offset, len, df, out).map(|()| true),
            Command::Write { offset, len, fua } => {
                self.data.resize(len as usize, 0);
                if !input.read_exact(&mut self.data)? {
                    return Ok(false);
                }
                b.write(offset, &self.data, fua)
            }
            Command::Flush => b.flush(),
            Command::Trim { offset, len, fua } => b.trim(offset, len, fua),
            Command::Cache { offset, len } => b.cache(offset, len),
            Command::WriteZeroes { offset, len, fua, no_hole, fast } => {
                b.write_zeroes(offset, len, ZeroFlags { fua, no_hole, fast })
            }
            Command::BlockStatus { offset, len, req_one } => {
                self.block_status(req, offset, len, req_one, out);
                return Ok(true);
            }
            Command::BlockStatusPayload { payload } => {
                self.data.resize(payload as usize, 0);
                if !input.read_exact(&mut self.data)? {
                    return Ok(false);
                }
                match self.session.check_block_status_payload(req, &self.data) {
                    Ok(Command::BlockStatus { offset, len, req_one }) => {
                        self.block_status(req, offset, len, req_one, out)
                    }
                    Ok(_) => unreachable!("check_block_status_payload only returns BlockStatus"),
                    Err(rej) => self.session.write_error(&mut out.buf, req, rej.errno, &rej.message),
                }
                return Ok(true);
            }
            Command::Disc => return Ok(false),
        };
        match result {
            Ok(()) => self.session.write_ok(&mut out.buf, req),
            Err(e) => self.backend_error(req, &e, out),
        }
        Ok(true)
    }

    fn backend_error(&self, req: &Request, e: &ringbd_backend::Error, out: &mut OutQueue) {
        let errno = nbd_errno(e);
        // A refused fast zero is the protocol working, not a failure.
        if errno != Errno::ENOTSUP {
            log::warn(format_args!("export {:?}: {e}", self.name));
        }
        self.session.write_error(&mut out.buf, req, errno, &e.to_string());
    }

    fn read(&mut self, req: &Request, offset: u64, len: u64, df: bool, out: &mut OutQueue) -> io::Result<()> {
        let len = len as usize;
        self.data.resize(len, 0);
        let holes = match self.backend.read(offset, &mut self.data) {
            Ok(h) => h,
            Err(e) => {
                self.backend_error(req, &e, out);
                return Ok(());
            }
        };
        if len == 0 {
            self.session.write_ok(&mut out.buf, req);
            return Ok(());
        }
        if !self.session.structured() || df || holes.0.is_empty() {
            self.session.write_data_header(&mut out.buf, req, offset, len as u64, true);
            return out.push_payload(&self.data);
        }
        // Structured reply: data pieces as OFFSET_DATA, sparse ones as holes.
        let mut pos = 0usize;
        let mut pieces = Vec::with_capacity(holes.0.len() * 2 + 1);
        for h in &holes.0 {
            if h.start > pos {
                pieces.push((pos..h.start, false));
            }
            pieces.push((h.clone(), true));
            pos = h.end;
        }
        if pos < len {
            pieces.push((pos..len, false));
        }
        let last = pieces.len() - 1;
        for (i, (range, hole)) in pieces.into_iter().enumerate() {
            let at = offset + range.start as u64;
            if hole {
                self.session.write_hole(&mut out.buf, req, at, range.len() as u32, i == last);
            } else {
                self.session.write_data_header(&mut out.buf, req, at, range.len() as u64, i == last);
                out.push_payload(&self.data[range])?;
            }
        }
        Ok(())
    }

    fn block_status(&mut self, req: &Request, offset: u64, len: u64, req_one: bool, out: &mut OutQueue) {
        if len == 0 {
            self.session.write_error(&mut out.buf, req, Errno::EINVAL, "block status of zero length");
            return;
        }
        let extents = match self.backend.extents(offset, len) {
            Ok(e) => e,
            Err(e) => return self.backend_error(req, &e, out),
        };
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
            // A backend that could say nothing: "allocated, unknown" is always true.
            ext.push(Extent { len: len.min(u64::from(u32::MAX) & !0xfff).max(1), flags: 0 });
        }
        self.session.write_block_status(&mut out.buf, req, BASE_ALLOCATION_ID, &ext);
    }
}

/// Buffered reader over the connection.
struct InBuf {
    stream: Stream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl InBuf {
    fn new(stream: Stream) -> Self {
        InBuf { stream, buf: vec![0; IN_BUF], start: 0, end: 0 }
    }

    fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn len(&self) -> usize {
        self.end - self.start
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// One read into free space; returns the bytes read (0 at EOF).
    fn fill(&mut self) -> io::Result<usize> {
        if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            return Err(io::Error::other("input buffer full"));
        }
        loop {
            match self.stream.read(&mut self.buf[self.end..]) {
                Ok(n) => {
                    self.end += n;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_disconnect(&e) => return Ok(0),
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads until `n` bytes are buffered; false at EOF.
    fn fill_to(&mut self, n: usize) -> io::Result<bool> {
        if self.buf.len() - self.start < n {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        while self.len() < n {
            if self.fill()? == 0 {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Fills `dst` from the buffer, then straight from the socket; false at EOF.
    fn read_exact(&mut self, dst: &mut [u8]) -> io::Result<bool> {
        let have = self.len().min(dst.len());
        dst[..have].copy_from_slice(&self.buf[self.start..self.start + have]);
        self.consume(have);
        let mut done = have;
        while done < dst.len() {
            match self.stream.read(&mut dst[done..]) {
                Ok(0) => return Ok(false),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_disconnect(&e) => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Reads and drops `n` bytes; false at EOF.
    fn discard(&mut self, mut n: u64) -> io::Result<bool> {
        while n > 0 {
            if self.len() == 0 && self.fill()? == 0 {
                return Ok(false);
            }
            let k = (self.len() as u64).min(n) as usize;
            self.consume(k);
            n -= k as u64;
        }
        Ok(true)
    }
}

fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted | io::ErrorKind::BrokenPipe
    )
}

/// Replies waiting to be sent.
struct OutQueue {
    buf: Vec<u8>,
    stream: Stream,
}

impl OutQueue {
    /// Queues a read payload: copied when small, otherwise sent now together
    /// with everything queued before it in one vectored write.
    fn push_payload(&mut self, payload: &[u8]) -> io::Result<()> {
        if payload.len() <= COPY_LIMIT {
            self.buf.extend_from_slice(payload);
            return Ok(());
        }
        write_all_vectored(&mut self.stream, &mut [IoSlice::new(&self.buf), IoSlice::new(payload)])?;
        self.buf.clear();
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.stream.write_all(&self.buf)?;
            self.buf.clear();
        }
        Ok(())
    }
}

fn write_all_vectored(w: &mut impl Write, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "socket accepted no bytes")),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
