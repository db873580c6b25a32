//! Pipelined requests over one or more connections, driven by one io_uring
//! ring in the calling thread.
//!
//! [`Engine::submit`] encodes a request into its connection's next send
//! batch (request headers and write payloads go out together as one
//! `sendmsg` per connection per [`Engine::poll`]); replies are received into
//! a large buffer per connection, parsed many per completion, matched to
//! their requests by cookie, and handed back as [`Completion`]s in whatever
//! order the server answered. Buffers travel with requests: a read's buffer
//! comes back filled, a write's payload comes back once it was sent and
//! acknowledged, so steady-state I/O allocates nothing.
//!
//! TLS (`nbds://`): a connection's session sits between the batch and the
//! ring. At send time the whole batch (headers and write payloads) goes
//! through rustls in one vectored write, which packs it into as few 16 KiB
//! records as its bytes allow, and the records leave as one send (write
//! payloads are given back right away: they were copied into the records).
//! Received ciphertext is decrypted into the same receive buffer the
//! plaintext path parses; there is no direct receive into read buffers.

use std::collections::HashMap;
use std::ops::Range;

use nbd_proto::client::{ClientRequest, ClientSession, ReplyChunk};
use nbd_proto::wire::{cmd_flags, tx_flags, CmdType};
use nbd_proto::{ClientConfig, ClientNegotiated, Extent};
use ringbd_io::client_ring::{ClientRing, Piece, RingEvent, SendBatch};

use crate::connect::connect;
use crate::error::{Error, Result};
use crate::tls::ClientTls;
use crate::uri::NbdUri;

/// Smallest receive buffer per connection.
const RECV_BUF: usize = 1024 * 1024;
/// Largest receive buffer (a 32 MiB read chunk plus headers).
const RECV_BUF_MAX: usize = 33 * 1024 * 1024;

/// One command as the caller describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cmd {
    pub typ: CmdType,
    /// `NBD_CMD_FLAG_*` (`PAYLOAD_LEN` is added by the encoder where needed).
    pub flags: u16,
    pub offset: u64,
    /// Effect length; for writes, the payload's length.
    pub len: u64,
}

impl Cmd {
    pub fn read(offset: u64, len: u64) -> Self {
        Cmd { typ: CmdType::READ, flags: 0, offset, len }
    }
    pub fn write(offset: u64, len: u64) -> Self {
        Cmd { typ: CmdType::WRITE, flags: 0, offset, len }
    }
    pub fn zero(offset: u64, len: u64) -> Self {
        Cmd { typ: CmdType::WRITE_ZEROES, flags: 0, offset, len }
    }
    pub fn trim(offset: u64, len: u64) -> Self {
        Cmd { typ: CmdType::TRIM, flags: 0, offset, len }
    }
    pub fn flush() -> Self {
        Cmd { typ: CmdType::FLUSH, flags: 0, offset: 0, len: 0 }
    }
    pub fn block_status(offset: u64, len: u64) -> Self {
        Cmd { typ: CmdType::BLOCK_STATUS, flags: 0, offset, len }
    }
    pub fn with_flags(mut self, flags: u16) -> Self {
        self.flags |= flags;
        self
    }
}

/// A finished request.
#[derive(Debug)]
pub struct Completion {
    /// The caller's tag from [`Engine::submit`].
    pub tag: u64,
    pub conn: usize,
    pub cmd: Cmd,
    /// The read data (`cmd.len` bytes), or the write payload given back.
    pub buf: Vec<u8>,
    /// `base:allocation` extents of a block-status request.
    pub extents: Vec<Extent>,
    pub result: Result<()>,
}

struct Pending {
    tag: u64,
    cmd: Cmd,
    /// `None` while a write payload is in the ring.
    buf: Option<Vec<u8>>,
    extents: Vec<Extent>,
    /// Read bytes covered by data and hole chunks.
    covered: u64,
    error: Option<Error>,
    /// The final reply arrived.
    replied: bool,
}

struct Conn {
    sock: usize,
    session: ClientSession,
    pending: HashMap<u64, Pending>,
    /// Requests encoded since the last send.
    next: SendBatch,
    /// Cookies of `next.bufs`, in order.
    next_cookies: Vec<u64>,
    /// Cookies of the batch in the ring.
    sent_cookies: Vec<u64>,
    /// Recycled batch.
    spare: Option<SendBatch>,
    /// The receive buffer when it is not in the ring.
    rbuf: Option<Vec<u8>>,
    /// Parse position in the receive buffer.
    rpos: usize,
    /// A large read payload being received straight into its buffer.
    direct: Option<Direct>,
    /// Payloads received that way.
    directs: u64,
    /// The TLS session, for `nbds://`.
    tls: Option<TlsConn>,
}

/// A connection's TLS session and its ciphertext receive buffer.
struct TlsConn {
    session: ClientTls,
    /// The ciphertext buffer when it is not in the ring.
    cipher: Option<Vec<u8>>,
    /// Send close_notify after the next batch (`NBD_CMD_DISC`).
    closing: bool,
    /// Recycled ciphertext batch.
    wire_spare: Option<SendBatch>,
}

/// Ciphertext received per receive on a TLS connection.
const TLS_RECV_BUF: usize = 256 * 1024;

/// The rest of one data payload, received into the read's own buffer
/// instead of the receive buffer (saves a copy of every large read).
struct Direct {
    cookie: u64,
    /// The read's buffer while it is not in the ring.
    buf: Option<Vec<u8>>,
    /// Next byte of `buf` to fill, and the end of the payload.
    next: usize,
    end: usize,
    /// Payload length, and whether the chunk is the reply's last.
    len: u64,
    done: bool,
}

/// Payloads with at least this much still to arrive are received directly.
const DIRECT_MIN: usize = 64 * 1024;

/// N connections to one export on one ring.
pub struct Engine {
    ring: ClientRing,
    conns: Vec<Conn>,
    events: Vec<RingEvent>,
    next_cookie: u64,
    uri: String,
    done: Vec<Completion>,
    /// Reused for encoding request headers.
    scratch: Vec<u8>,
}

impl Engine {
    /// An engine with no connections yet (see [`Engine::add`]).
    pub fn new() -> Result<Engine> {
        let ring = ClientRing::new(256).map_err(|e| Error::io("create io_uring", e))?;
        Ok(Engine {
            ring,
            conns: Vec::new(),
            events: Vec::new(),
            next_cookie: 1,
            uri: String::new(),
            done: Vec::new(),
            scratch: Vec::with_capacity(32),
        })
    }

    /// Opens `conns` connections to `uri` with `cfg` (the export comes from
    /// the URI). Every connection must agree on size and flags.
    pub fn connect(uri: &NbdUri, cfg: &ClientConfig, conns: usize) -> Result<Engine> {
        let mut e = Engine::new()?;
        e.add(uri, cfg, conns)?;
        Ok(e)
    }

    /// Adds `n` connections to `uri` (one export; several exports may share
    /// an engine, as a copy's source and destination do). Returns their indices.
    pub fn add(&mut self, uri: &NbdUri, cfg: &ClientConfig, n: usize) -> Result<Range<usize>> {
        let first = self.conns.len();
        if self.uri.is_empty() {
            self.uri = uri.to_string();
        } else {
            self.uri = format!("{} + {uri}", self.uri);
        }
        for i in 0..n.max(1) {
            let c = connect(uri, cfg.clone())?;
            if let Some(f) = self.conns.get(first) {
                let a = f.session.negotiated();
                if a.size != c.negotiated.size || a.flags != c.negotiated.flags {
                    return Err(Error::Invalid(format!(
                        "connection {i} to {uri} negotiated size {} flags {:#x}, connection 0 size {} flags {:#x}",
                        c.negotiated.size, c.negotiated.flags, a.size, a.flags
                    )));
                }
            }
            self.adopt(c);
        }
        Ok(first..self.conns.len())
    }

    /// Takes a connection already past its handshake ([`connect`], which
    /// another thread may have run: the ring must be driven by the thread
    /// that made it, the handshake need not). Returns its index.
    pub fn adopt(&mut self, c: crate::Connected) -> usize {
        let sock = self.ring.add_socket(c.fd);
        self.conns.push(Conn {
            sock,
            session: ClientSession::new(c.negotiated),
            pending: HashMap::new(),
            next: SendBatch::default(),
            next_cookies: Vec::new(),
            sent_cookies: Vec::new(),
            spare: Some(SendBatch::default()),
            rbuf: Some(Vec::with_capacity(RECV_BUF)),
            rpos: 0,
            direct: None,
            directs: 0,
            tls: c.tls.map(|session| TlsConn {
                session,
                cipher: Some(Vec::with_capacity(TLS_RECV_BUF)),
                closing: false,
                wire_spare: None,
            }),
        });
        self.conns.len() - 1
    }

    /// Names the engine's peer in its errors (an engine whose connections
    /// come from [`Engine::adopt`] has no URI of its own).
    pub fn set_name(&mut self, name: &str) {
        self.uri = name.to_string();
    }

    /// Has the kernel signal `fd` whenever this engine's ring has a
    /// completion ([`ClientRing::notify`]): a thread that waits on another
    /// ring polls `fd` there and calls [`Engine::poll`] without waiting.
    pub fn notify(&self, fd: std::os::fd::BorrowedFd<'_>) -> Result<()> {
        self.ring
            .notify(fd)
            .map_err(|e| Error::io(format!("io_uring eventfd registration ({})", self.uri), e))
    }

    /// What connection `conn` negotiated.
    pub fn negotiated_of(&self, conn: usize) -> Option<&ClientNegotiated> {
        self.conns.get(conn).map(|c| c.session.negotiated())
    }

    /// The connection of `range` with the fewest requests in flight.
    pub fn least_busy_in(&self, range: Range<usize>) -> usize {
        let start = range.start;
        range.min_by_key(|&i| self.conns.get(i).map_or(usize::MAX, |c| c.pending.len())).unwrap_or(start)
    }

    /// Largest read or write to send in one request on `conn`.
    pub fn max_request_of(&self, conn: usize) -> u64 {
        self.conns.get(conn).map_or(512, |c| c.session.max_payload())
    }

    /// What connection 0 negotiated (the connections of one
    /// [`Engine::connect`] agree on size and flags); `None` without connections.
    pub fn negotiated(&self) -> Option<&ClientNegotiated> {
        self.negotiated_of(0)
    }

    /// Size of connection 0's export (0 without connections).
    pub fn size(&self) -> u64 {
        self.negotiated().map_or(0, |n| n.size)
    }

    /// Whether connection 0's export has transmission flag `flag`.
    pub fn has(&self, flag: u16) -> bool {
        self.negotiated().is_some_and(|n| n.flags & flag != 0)
    }

    pub fn conns(&self) -> usize {
        self.conns.len()
    }

    /// Largest read or write to send in one request.
    pub fn max_request(&self) -> u64 {
        self.max_request_of(0)
    }

    /// Requests in flight on `conn`.
    pub fn inflight(&self, conn: usize) -> usize {
        self.conns.get(conn).map_or(0, |c| c.pending.len())
    }

    /// A block-status request for `base:allocation` in the payload form
    /// (extended headers with `BLOCK_STATUS_PAYLOAD`): the command and its
    /// payload for [`Engine::submit`], or `None` where the form is not offered.
    pub fn block_status_payload(&self, conn: usize, offset: u64, len: u64) -> Option<(Cmd, Vec<u8>)> {
        let n = self.negotiated_of(conn)?;
        let id = n.base_allocation?;
        if !n.extended || n.flags & tx_flags::BLOCK_STATUS_PAYLOAD == 0 {
            return None;
        }
        let mut payload = len.to_be_bytes().to_vec();
        payload.extend_from_slice(&id.to_be_bytes());
        let cmd = Cmd::block_status(offset, payload.len() as u64).with_flags(cmd_flags::PAYLOAD_LEN);
        Some((cmd, payload))
    }

    /// Read payloads received straight into their buffers so far.
    pub fn direct_receives(&self) -> u64 {
        self.conns.iter().map(|c| c.directs).sum()
    }

    pub fn total_inflight(&self) -> usize {
        self.conns.iter().map(|c| c.pending.len()).sum()
    }

    /// The connection with the fewest requests in flight.
    pub fn least_busy(&self) -> usize {
        (0..self.conns.len()).min_by_key(|&i| self.conns[i].pending.len()).unwrap_or(0)
    }

    /// Queues a request on `conn`; it goes out at the next [`Engine::poll`].
    /// Writes send `buf` (its length must be `cmd.len`); reads fill `buf`.
    pub fn submit(&mut self, conn: usize, tag: u64, cmd: Cmd, mut buf: Vec<u8>) -> Result<()> {
        let nconns = self.conns.len();
        let c = self
            .conns
            .get_mut(conn)
            .ok_or_else(|| Error::Invalid(format!("no connection {conn} of {nconns}")))?;
        let neg = c.session.negotiated();
        let ctx = |what: &str| {
            Error::Invalid(format!("{} of {} bytes at {:#x}: {what}", cmd.typ, cmd.len, cmd.offset))
        };
        match cmd.typ {
            CmdType::READ | CmdType::WRITE => {
                if cmd.len > c.session.max_payload() {
                    return Err(ctx(&format!(
                        "larger than the maximum request of {}",
                        c.session.max_payload()
                    )));
                }
                if cmd.typ == CmdType::WRITE && buf.len() as u64 != cmd.len {
                    return Err(ctx(&format!("payload of {} bytes", buf.len())));
                }
                if cmd.typ == CmdType::READ && buf.len() as u64 != cmd.len {
                    buf.resize(cmd.len as usize, 0);
                }
            }
            CmdType::BLOCK_STATUS if neg.base_allocation.is_none() => {
                return Err(ctx("the server did not agree to base:allocation"));
            }
            _ => {}
        }
        // Block status with a payload (extended headers): `cmd.len` is the
        // payload's length, the effect length is its first 8 bytes.
        let payload_bs = cmd.typ == CmdType::BLOCK_STATUS && cmd.flags & cmd_flags::PAYLOAD_LEN != 0;
        let mut effect_len = cmd.len;
        if payload_bs {
            if !neg.extended || neg.flags & tx_flags::BLOCK_STATUS_PAYLOAD == 0 {
                return Err(ctx("the server does not take block status payloads"));
            }
            let head: Option<[u8; 8]> = buf.get(..8).and_then(|b| b.try_into().ok());
            match head {
                Some(h)
                    if buf.len() as u64 == cmd.len && (buf.len() - 8).is_multiple_of(4) && buf.len() > 8 =>
                {
                    effect_len = u64::from_be_bytes(h);
                }
                _ => return Err(ctx(&format!("block status payload of {} bytes is not 8 + 4n", buf.len()))),
            }
        }
        let needs = match cmd.typ {
            CmdType::FLUSH => Some((tx_flags::SEND_FLUSH, "flush")),
            CmdType::TRIM => Some((tx_flags::SEND_TRIM, "trim")),
            CmdType::WRITE_ZEROES => Some((tx_flags::SEND_WRITE_ZEROES, "write zeroes")),
            CmdType::CACHE => Some((tx_flags::SEND_CACHE, "cache")),
            _ => None,
        };
        if let Some((bit, name)) = needs {
            if neg.flags & bit == 0 {
                return Err(ctx(&format!("the export does not support {name}")));
            }
        }
        if cmd.flags & cmd_flags::FUA != 0 && neg.flags & tx_flags::SEND_FUA == 0 {
            return Err(ctx("the export does not support FUA"));
        }
        if cmd.typ != CmdType::FLUSH
            && cmd.typ != CmdType::DISC
            && cmd.offset.checked_add(effect_len).is_none_or(|e| e > neg.size)
        {
            return Err(ctx(&format!("beyond the end of the export ({} bytes)", neg.size)));
        }
        let cookie = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1).max(1);
        let req = ClientRequest { typ: cmd.typ, flags: cmd.flags, cookie, offset: cmd.offset, len: cmd.len };
        let mut hdr = std::mem::take(&mut self.scratch);
        hdr.clear();
        let encoded = c.session.encode_request(&mut hdr, &req);
        if encoded.is_ok() {
            c.next.push_head(&hdr);
        }
        self.scratch = hdr;
        encoded.map_err(|e| ctx(&e.to_string()))?;
        let buf = if cmd.typ == CmdType::WRITE || payload_bs {
            c.next.push_buf(buf);
            c.next_cookies.push(cookie);
            None
        } else {
            Some(buf)
        };
        c.pending.insert(
            cookie,
            Pending { tag, cmd, buf, extents: Vec::new(), covered: 0, error: None, replied: false },
        );
        Ok(())
    }

    /// Lets another thread end a [`Engine::poll`] wait early: signalling
    /// `fd` makes the poll return, with no completions if none finished (a
    /// proxy's worker takes new requests that way while others are in
    /// flight).
    pub fn set_wake(&mut self, fd: ringbd_io::eventfd::EventFd) {
        self.ring.set_wake(fd);
    }

    /// Sends what was submitted, waits for at least one event when `wait`
    /// and requests are in flight, and appends finished requests to `out`.
    pub fn poll(&mut self, out: &mut Vec<Completion>, wait: bool) -> Result<()> {
        // Completions held back by `run` count as progress: no waiting then.
        let had = !self.done.is_empty();
        out.append(&mut self.done);
        self.arm()?;
        self.ring.arm_wake().map_err(|e| Error::io(format!("io_uring wake poll ({})", self.uri), e))?;
        let want = usize::from(wait && !had && self.ring.inflight() > 0);
        self.ring.submit_and_wait(want).map_err(|e| Error::io(format!("io_uring wait ({})", self.uri), e))?;
        let mut events = std::mem::take(&mut self.events);
        self.ring
            .completions(&mut events)
            .map_err(|e| Error::io(format!("io_uring resubmit ({})", self.uri), e))?;
        let mut res = Ok(());
        for ev in events.drain(..) {
            if res.is_ok() {
                res = self.event(ev, out);
            }
        }
        self.events = events;
        res?;
        if !wait {
            // The events may have left work for the ring (the next receive
            // of a connection with requests in flight, the rest of a short
            // send): a caller that does not call again until the ring has a
            // completion ([`Engine::notify`]) must find it submitted.
            self.arm()?;
            self.ring.submit_queued().map_err(|e| Error::io(format!("io_uring submit ({})", self.uri), e))?;
        }
        Ok(())
    }

    /// Runs one request to completion (for tools that need one answer);
    /// other requests' completions are kept for the next [`Engine::poll`].
    /// Its tag is `u64::MAX`, which callers mixing the two must not use.
    pub fn run(&mut self, conn: usize, cmd: Cmd, buf: Vec<u8>) -> Result<Completion> {
        let tag = u64::MAX;
        self.submit(conn, tag, cmd, buf)?;
        let mut got = Vec::new();
        let mut others = Vec::new();
        loop {
            self.poll(&mut got, true)?;
            let mut mine = None;
            for c in got.drain(..) {
                if c.tag == tag && mine.is_none() {
                    mine = Some(c);
                } else {
                    others.push(c);
                }
            }
            if let Some(c) = mine {
                self.done.append(&mut others);
                return Ok(c);
            }
        }
    }

    fn arm(&mut self) -> Result<()> {
        for (ci, c) in self.conns.iter_mut().enumerate() {
            let tls_wants = c.tls.as_ref().is_some_and(|t| t.session.wants_write());
            if (!c.next.is_empty() || tls_wants) && !self.ring.sending(c.sock) {
                let mut batch = std::mem::replace(&mut c.next, c.spare.take().unwrap_or_default());
                if c.tls.is_some() {
                    batch = encrypt(c, batch).map_err(|what| Error::Tls {
                        context: format!("{} (connection {ci})", self.uri),
                        what,
                    })?;
                } else {
                    std::mem::swap(&mut c.sent_cookies, &mut c.next_cookies);
                }
                c.next_cookies.clear();
                self.ring.send(c.sock, batch).map_err(|e| Error::io(format!("send to {}", self.uri), e))?;
            }
            if let Some(t) = c.tls.as_mut() {
                if !c.pending.is_empty() {
                    if let Some(mut buf) = t.cipher.take() {
                        buf.clear();
                        self.ring
                            .recv(c.sock, buf)
                            .map_err(|e| Error::io(format!("receive from {}", self.uri), e))?;
                    }
                }
            } else if let Some(d) = c.direct.as_mut() {
                if let Some(buf) = d.buf.take() {
                    self.ring
                        .recv_into(c.sock, buf, d.next..d.end)
                        .map_err(|e| Error::io(format!("receive from {}", self.uri), e))?;
                }
            } else if !c.pending.is_empty() {
                if let Some(buf) = c.rbuf.take() {
                    self.ring
                        .recv(c.sock, buf)
                        .map_err(|e| Error::io(format!("receive from {}", self.uri), e))?;
                }
            }
        }
        Ok(())
    }

    fn event(&mut self, ev: RingEvent, out: &mut Vec<Completion>) -> Result<()> {
        let uri = &self.uri;
        match ev {
            RingEvent::Woken => {}
            RingEvent::Sent { sock, mut batch, result } => {
                let Some(ci) = self.conns.iter().position(|c| c.sock == sock) else { return Ok(()) };
                result.map_err(|e| Error::io(format!("send to {uri} (connection {ci})"), e))?;
                let c = &mut self.conns[ci];
                let mut cookies = std::mem::take(&mut c.sent_cookies);
                for (cookie, buf) in cookies.drain(..).zip(batch.bufs.drain(..)) {
                    if let Some(p) = c.pending.get_mut(&cookie) {
                        p.buf = Some(buf);
                        if p.replied {
                            finish(c, cookie, ci, out);
                        }
                    }
                }
                c.sent_cookies = cookies;
                batch.clear();
                match c.tls.as_mut() {
                    Some(t) => t.wire_spare = Some(batch),
                    None => c.spare = Some(batch),
                }
            }
            RingEvent::Received { sock, buf, result } => {
                let Some(ci) = self.conns.iter().position(|c| c.sock == sock) else { return Ok(()) };
                let n = result.map_err(|e| Error::io(format!("receive from {uri} (connection {ci})"), e))?;
                let closed = |c: &Conn, how: &str| Error::Protocol {
                    context: format!("{uri} (connection {ci})"),
                    what: format!("server closed the {how} with {} requests in flight", c.pending.len()),
                };
                if n == 0 {
                    return Err(closed(&self.conns[ci], "connection"));
                }
                let c = &mut self.conns[ci];
                if let Some(t) = c.tls.as_mut() {
                    let mut cipher = buf;
                    let plain = c.rbuf.get_or_insert_with(Vec::new);
                    let r = t.session.receive(&cipher, plain);
                    cipher.clear();
                    t.cipher = Some(cipher);
                    let r =
                        r.map_err(|what| Error::Tls { context: format!("{uri} (connection {ci})"), what })?;
                    parse(c, ci, out).map_err(|what| Error::Protocol {
                        context: format!("{uri} (connection {ci})"),
                        what,
                    })?;
                    if r.closed && !c.pending.is_empty() {
                        return Err(closed(c, "TLS session"));
                    }
                    return Ok(());
                }
                c.rbuf = Some(buf);
                parse(c, ci, out)
                    .map_err(|what| Error::Protocol { context: format!("{uri} (connection {ci})"), what })?;
            }
            RingEvent::ReceivedInto { sock, buf, result, .. } => {
                let Some(ci) = self.conns.iter().position(|c| c.sock == sock) else { return Ok(()) };
                let n = result.map_err(|e| Error::io(format!("receive from {uri} (connection {ci})"), e))?;
                let c = &mut self.conns[ci];
                let Some(d) = c.direct.as_mut() else { return Ok(()) };
                if n == 0 {
                    return Err(Error::Protocol {
                        context: format!("{uri} (connection {ci})"),
                        what: format!("server closed the connection {} bytes into a read payload", d.next),
                    });
                }
                d.next += n;
                d.buf = Some(buf);
                if d.next >= d.end {
                    let (cookie, len, done, buf) = (d.cookie, d.len, d.done, d.buf.take());
                    c.direct = None;
                    let ctx = |what| Error::Protocol { context: format!("{uri} (connection {ci})"), what };
                    let p = c
                        .pending
                        .get_mut(&cookie)
                        .ok_or_else(|| ctx(format!("cookie {cookie:#x} vanished")))?;
                    p.buf = buf;
                    p.covered += len;
                    if done {
                        chunk_done(c, cookie, ci, out).map_err(ctx)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Sends `NBD_CMD_DISC` on every connection and waits until it is sent.
    pub fn disconnect(mut self) -> Result<()> {
        for ci in 0..self.conns.len() {
            let c = &mut self.conns[ci];
            let req = ClientRequest { typ: CmdType::DISC, flags: 0, cookie: 0, offset: 0, len: 0 };
            let mut v = Vec::new();
            c.session.encode_request(&mut v, &req).map_err(|e| Error::Invalid(e.to_string()))?;
            c.next.push_head(&v);
            if let Some(t) = c.tls.as_mut() {
                // close_notify goes out in the same send, after the DISC.
                t.closing = true;
            }
        }
        for _ in 0..1000 {
            self.arm()?;
            if self.conns.iter().all(|c| c.next.is_empty()) && self.ring.inflight() == 0 {
                break;
            }
            let busy = self.conns.iter().any(|c| self.ring.sending(c.sock));
            self.ring.submit_and_wait(usize::from(busy)).map_err(|e| Error::io("io_uring wait", e))?;
            self.ring.completions(&mut self.events).map_err(|e| Error::io("io_uring", e))?;
            for ev in std::mem::take(&mut self.events) {
                if let RingEvent::Sent { result: Err(e), .. } = ev {
                    return Err(Error::io(format!("send NBD_CMD_DISC to {}", self.uri), e));
                }
            }
            if !busy && self.conns.iter().all(|c| c.next.is_empty()) {
                break;
            }
        }
        Ok(())
    }
}

/// Encrypts `batch` (headers and write payloads, in order) into one batch
/// of TLS records. The write payloads go back to their requests at once:
/// the records hold copies of them.
fn encrypt(c: &mut Conn, mut batch: SendBatch) -> std::result::Result<SendBatch, String> {
    let Some(t) = c.tls.as_mut() else { return Ok(batch) };
    let mut wire = t.wire_spare.take().unwrap_or_default();
    wire.clear();
    {
        let slices: Vec<std::io::IoSlice<'_>> = batch
            .pieces
            .iter()
            .filter_map(|p| {
                let buf: &[u8] =
                    if p.buf == SendBatch::HEAD { &batch.head } else { batch.bufs.get(p.buf as usize)? };
                buf.get(p.start..p.start.checked_add(p.len)?).map(std::io::IoSlice::new)
            })
            .collect();
        t.session.send(&slices, &mut wire.head)?;
    }
    if t.closing {
        t.closing = false;
        t.session.close();
        t.session.flush(&mut wire.head)?;
    }
    let len = wire.head.len();
    if len > 0 {
        wire.pieces.push(Piece { buf: SendBatch::HEAD, start: 0, len });
    }
    for (cookie, buf) in c.next_cookies.drain(..).zip(batch.bufs.drain(..)) {
        if let Some(p) = c.pending.get_mut(&cookie) {
            p.buf = Some(buf);
        }
    }
    batch.clear();
    c.spare = Some(batch);
    Ok(wire)
}

/// Parses every complete reply in the connection's receive buffer.
fn parse(c: &mut Conn, ci: usize, out: &mut Vec<Completion>) -> std::result::Result<(), String> {
    let Some(mut buf) = c.rbuf.take() else { return Ok(()) };
    let mut pos = c.rpos;
    let res = loop {
        let pending = &c.pending;
        let lookup = |cookie: u64| {
            pending.get(&cookie).map(|p| ClientRequest {
                typ: p.cmd.typ,
                flags: p.cmd.flags,
                cookie,
                offset: p.cmd.offset,
                len: p.cmd.len,
            })
        };
        let (reply, used) = match c.session.decode_reply(&buf[pos..], lookup) {
            Ok(Some(r)) => r,
            Ok(None) => {
                if c.tls.is_none() {
                    start_direct(c, &buf[pos..]);
                }
                if c.direct.is_some() {
                    pos = buf.len();
                }
                break Ok(());
            }
            Err(e) => break Err(e.to_string()),
        };
        pos += used;
        let cookie = reply.cookie;
        let base = c.session.negotiated().base_allocation;
        let Some(p) = c.pending.get_mut(&cookie) else { break Err(format!("cookie {cookie:#x} vanished")) };
        match reply.chunk {
            ReplyChunk::Ok => {}
            ReplyChunk::Data { offset, data } => {
                let at = offset.saturating_sub(p.cmd.offset) as usize; // the decoder checked the range
                if let Some(dst) = p.buf.as_mut().and_then(|b| b.get_mut(at..at + data.len())) {
                    dst.copy_from_slice(data);
                }
                p.covered += data.len() as u64;
            }
            ReplyChunk::Hole { offset, len } => {
                let at = offset.saturating_sub(p.cmd.offset) as usize; // the decoder checked the range
                if let Some(dst) = p.buf.as_mut().and_then(|b| b.get_mut(at..at + len as usize)) {
                    dst.fill(0);
                }
                p.covered += len;
            }
            ReplyChunk::BlockStatus { context, extents } => {
                if Some(context) == base {
                    p.extents.extend(extents);
                }
            }
            ReplyChunk::Error { errno, message, offset } => {
                let cmd = p.cmd;
                p.error.get_or_insert(Error::Request {
                    cmd: cmd.typ,
                    offset: offset.unwrap_or(cmd.offset),
                    len: cmd.len,
                    errno,
                    message,
                });
            }
        }
        if reply.done {
            if let Err(e) = chunk_done(c, cookie, ci, out) {
                break Err(e);
            }
        }
    };
    // Unparsed bytes stay where they are while there is room behind them;
    // they move to the front only when the free space runs low, and the
    // buffer grows only when one message does not fit in it.
    if pos == buf.len() {
        buf.clear();
        pos = 0;
    } else if buf.capacity() - buf.len() < (buf.capacity() / 4).max(64 * 1024) && pos > 0 {
        buf.copy_within(pos.., 0);
        buf.truncate(buf.len() - pos);
        pos = 0;
    }
    if buf.len() == buf.capacity() {
        if buf.capacity() >= RECV_BUF_MAX {
            return Err(format!("a reply does not fit in {RECV_BUF_MAX} bytes"));
        }
        buf.reserve(buf.capacity());
    }
    c.rpos = pos;
    c.rbuf = Some(buf);
    res
}

/// The last chunk of `cookie`'s reply arrived: check it is whole, and
/// complete the request unless its write payload is still in the ring.
fn chunk_done(
    c: &mut Conn,
    cookie: u64,
    ci: usize,
    out: &mut Vec<Completion>,
) -> std::result::Result<(), String> {
    let Some(p) = c.pending.get_mut(&cookie) else { return Err(format!("cookie {cookie:#x} vanished")) };
    if p.cmd.typ == CmdType::READ && p.error.is_none() && p.covered != p.cmd.len {
        return Err(format!(
            "read of {} bytes at {:#x} got {} bytes of data and holes",
            p.cmd.len, p.cmd.offset, p.covered
        ));
    }
    if p.cmd.typ == CmdType::BLOCK_STATUS && p.error.is_none() && p.extents.is_empty() {
        return Err(format!("block status at {:#x} without base:allocation extents", p.cmd.offset));
    }
    p.replied = true;
    if p.buf.is_some() {
        finish(c, cookie, ci, out);
    }
    Ok(())
}

/// `rest` is an incomplete message at the end of the receive buffer: if it
/// is the header of a large read payload, copy what arrived of the payload
/// into the read's buffer and receive the rest straight there.
fn start_direct(c: &mut Conn, rest: &[u8]) {
    let pending = &c.pending;
    let lookup = |cookie: u64| {
        pending.get(&cookie).map(|p| ClientRequest {
            typ: p.cmd.typ,
            flags: p.cmd.flags,
            cookie,
            offset: p.cmd.offset,
            len: p.cmd.len,
        })
    };
    let Some(h) = c.session.peek_data(rest, lookup) else { return };
    let have = rest.len() - h.header_len;
    let Ok(len) = usize::try_from(h.len) else { return };
    if len - have < DIRECT_MIN {
        return;
    }
    let Some(p) = c.pending.get_mut(&h.cookie) else { return };
    let at = h.offset.saturating_sub(p.cmd.offset) as usize;
    let Some(mut buf) = p.buf.take() else { return };
    match buf.get_mut(at..at + have) {
        Some(dst) => dst.copy_from_slice(&rest[h.header_len..]),
        None => {
            p.buf = Some(buf);
            return;
        }
    }
    c.directs += 1;
    c.direct = Some(Direct {
        cookie: h.cookie,
        buf: Some(buf),
        next: at + have,
        end: at + len,
        len: h.len,
        done: h.done,
    });
}

fn finish(c: &mut Conn, cookie: u64, ci: usize, out: &mut Vec<Completion>) {
    if let Some(p) = c.pending.remove(&cookie) {
        out.push(Completion {
            tag: p.tag,
            conn: ci,
            cmd: p.cmd,
            buf: p.buf.unwrap_or_default(),
            extents: p.extents,
            result: p.error.map_or(Ok(()), Err),
        });
    }
}
