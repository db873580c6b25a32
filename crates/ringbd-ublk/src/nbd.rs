//! `nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH` (and with
//! TLS, `nbds://`, `nbds+unix://`): an NBD export, one connection per queue
//! (multi-conn), driven from the queue's own ring.
//!
//! Each connection is opened and negotiated with the client library's
//! blocking handshake (`ringbd_client::connect`, simple replies), then its
//! socket is registered with the queue's ring. A request becomes an NBD
//! command whose cookie is the request's tag; the commands queued in a loop
//! turn go out as one `sendmsg` (headers, then each write's payload straight
//! from its tag's buffer). One reply header at a time is received into the
//! ring's header area and decoded by `nbd_proto`'s client session; a read's
//! payload is received straight into its tag's buffer.
//!
//! `nbds://` (TLS): the connection's rustls session lives in the queue's
//! handler and runs on the queue's ring. The requests queued in a loop turn
//! (headers, and write payloads read from the tags' buffers) go through
//! rustls in one vectored write and leave as one send of records; whatever
//! ciphertext arrives (into the ring's stream area) is decrypted, and the
//! complete replies in the plaintext are parsed, read data copied into the
//! tags' buffers. A reconnect does STARTTLS and the TLS handshake again.
//!
//! A dropped connection (end of file, a send or receive error, a reply the
//! decoder refuses, `ESHUTDOWN`) is shut down; once its operations have
//! finished, the handler reconnects (up to [`RECONNECT_DELAYS`]`.len()`
//! tries, with growing delays) and sends every request still unanswered
//! again. If every try fails, those requests and all later ones fail with
//! EIO: nothing is dropped silently and nothing waits forever.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Mutex;
use std::time::Duration;

use nbd_proto::client::{ClientConfig, ClientNegotiated, ClientRequest, ClientSession, ReplyChunk};
use nbd_proto::wire::{cmd_flags, tx_flags, CmdType};
use ringbd_client::{ClientTls, Connected, NbdUri};
use ringbd_io::ublk::{FileSlot, QueueRing, SendPart, SEND_BATCH_MAX};

use crate::error::{Error, Result};
use crate::target::{Op, QueueHandler, QueueSetup, Request, Step, Target, TargetInfo};

/// The connection's socket in the queue ring's file table.
const SLOT: FileSlot = FileSlot(1);
/// Bytes of a simple reply header.
const REPLY_HEADER: usize = 16;
/// Delays before each reconnect try (about 8 s in all).
pub const RECONNECT_DELAYS: [Duration; 5] = [
    Duration::from_millis(200),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
];

// Cookies of ring operations.
const K_SEND: u32 = 1;
const K_HEADER: u32 = 2;
const K_PAYLOAD: u32 = 3;
const K_STREAM: u32 = 4;

/// Simple replies: a read's payload then follows its 16-byte header
/// directly, so it can be received into the request's own buffer.
fn client_config(uri: &NbdUri) -> ClientConfig {
    let mut cfg = ClientConfig::new(&uri.export);
    cfg.structured = false;
    cfg.extended = false;
    cfg.base_allocation = false;
    cfg
}

fn connect(uri: &NbdUri) -> Result<Connected> {
    ringbd_client::connect(uri, client_config(uri))
        .map_err(|e| Error::new(format!("{uri}"), io::Error::new(io::ErrorKind::ConnectionRefused, e)))
}

pub struct NbdTarget {
    uri: NbdUri,
    neg: ClientNegotiated,
    read_only: bool,
    /// The connection made at open, for queue 0.
    first: Mutex<Option<Connected>>,
}

impl NbdTarget {
    /// Connects once (for the export's size and flags); that connection
    /// serves queue 0.
    pub fn open(uri: NbdUri, read_only: bool) -> Result<NbdTarget> {
        let c = connect(&uri)?;
        let neg = c.negotiated.clone();
        Ok(NbdTarget { uri, neg, read_only, first: Mutex::new(Some(c)) })
    }

    fn has(&self, flag: u16) -> bool {
        self.neg.flags & flag != 0
    }
}

impl Target for NbdTarget {
    fn describe(&self) -> String {
        self.uri.to_string()
    }

    fn info(&self) -> TargetInfo {
        let ro = self.read_only || self.has(tx_flags::READ_ONLY);
        let bs = self.neg.block_sizes;
        TargetInfo {
            size: self.neg.size,
            read_only: ro,
            flush: self.has(tx_flags::SEND_FLUSH),
            no_fua: !self.has(tx_flags::SEND_FUA),
            discard: !ro && self.has(tx_flags::SEND_TRIM),
            write_zeroes: !ro && self.has(tx_flags::SEND_WRITE_ZEROES),
            min_block_size: bs.map_or(512, |b| b.minimum.max(512)),
            max_io: bs.map_or(0, |b| b.maximum),
            opt_io: bs.map_or(0, |b| b.preferred),
            max_queues: if self.has(tx_flags::CAN_MULTI_CONN) { 0 } else { 1 },
            any_size: false,
            // Copy path: a read's payload is received from the socket and a
            // write's is sent from the tag's buffer (one batched sendmsg with
            // the headers); with the request's pages only registered as a
            // fixed buffer these would need RECV/SEND with fixed buffers
            // (send zero-copy), which this target does not do yet.
            zero_copy: false,
        }
    }

    fn queue(&self, q_id: u16, depth: u16) -> Result<QueueSetup> {
        let first = match self.first.lock() {
            Ok(mut g) if q_id == 0 => g.take(),
            _ => None,
        };
        let c = match first {
            Some(c) => c,
            None => connect(&self.uri)?,
        };
        let what = format!("{} (queue {q_id})", self.uri);
        check_same_export(&what, &self.neg, &c.negotiated)?;
        let fd = c.fd.try_clone().map_err(|e| Error::new(format!("{what}: dup of the socket"), e))?;
        let handler = NbdQueue {
            what,
            uri: self.uri.clone(),
            neg: self.neg.clone(),
            session: ClientSession::new(c.negotiated),
            sock: c.fd,
            state: State::Up,
            slots: vec![Slot::Free; usize::from(depth)],
            queue: VecDeque::new(),
            recv: Recv::Idle,
            send_len: 0,
            done: Vec::new(),
            headers: Vec::with_capacity(SEND_BATCH_MAX * 28),
            parts: Vec::with_capacity(SEND_BATCH_MAX),
            last_loss: String::new(),
            unanswered: 0,
            tls: c.tls.map(QueueTls::new),
        };
        Ok(QueueSetup { handler: Box::new(handler), files: vec![fd] })
    }
}

/// A connection (or reconnection) must reach the export the device was
/// made from: at least as large, and no capability the device relies on
/// gone.
fn check_same_export(what: &str, want: &ClientNegotiated, got: &ClientNegotiated) -> Result<()> {
    let needed =
        tx_flags::SEND_FLUSH | tx_flags::SEND_FUA | tx_flags::SEND_TRIM | tx_flags::SEND_WRITE_ZEROES;
    let lost = want.flags & needed & !got.flags;
    let became_ro = got.flags & tx_flags::READ_ONLY != 0 && want.flags & tx_flags::READ_ONLY == 0;
    if got.size < want.size || lost != 0 || became_ro {
        return Err(Error::msg(
            format!(
                "{what}: the export changed: {} bytes, flags {:#06x} (was {} bytes, flags {:#06x})",
                got.size, got.flags, want.size, want.flags
            ),
            libc::EIO,
        ));
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Connected: requests are sent and replies received.
    Up,
    /// Lost: shut down, waiting for its ring operations to finish before
    /// reconnecting.
    Draining,
    /// Reconnecting failed: every request fails with EIO.
    Dead,
    /// The device is going away.
    Stopping,
}

#[derive(Debug, Clone, Copy)]
enum Slot {
    Free,
    /// Waiting to be sent (or sent again after a reconnect).
    Queued(Request),
    /// On the wire, waiting for its reply.
    Sent(Request),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recv {
    /// No receive of ours in flight (or a header receive: see
    /// `QueueRing::receiving`).
    Idle,
    /// `got` bytes of a reply header are in; the rest is being received.
    Header { got: usize },
    /// A read's payload is being received into its tag's buffer.
    Payload { tag: u16, off: u32, len: u32, got: u32 },
    /// TLS: ciphertext is being received into the ring's stream area.
    Stream,
}

/// The TLS session of a queue's connection (`nbds://`).
struct QueueTls {
    session: ClientTls,
    /// Decrypted reply bytes not parsed yet.
    plain: Vec<u8>,
    /// The records of the next send (swapped with the ring's send area).
    wire: Vec<u8>,
}

impl QueueTls {
    fn new(session: ClientTls) -> Self {
        QueueTls { session, plain: Vec::with_capacity(64 * 1024), wire: Vec::new() }
    }
}

struct NbdQueue {
    /// "nbd+unix:///disk?socket=/run/nbd.sock (queue 1)", for messages.
    what: String,
    uri: NbdUri,
    /// What the first connection negotiated; later ones must match it.
    neg: ClientNegotiated,
    session: ClientSession,
    sock: OwnedFd,
    state: State,
    slots: Vec<Slot>,
    /// Tags to send, in order.
    queue: VecDeque<u16>,
    recv: Recv,
    /// Bytes of the send in flight.
    send_len: u64,
    /// Requests completed since the last `end_turn`.
    done: Vec<(u16, Step)>,
    headers: Vec<u8>,
    parts: Vec<SendPart>,
    /// Why the connection was last lost, for the EIO when reconnecting fails.
    last_loss: String,
    /// Requests on the wire when it was lost (sent again after reconnecting).
    unanswered: usize,
    /// The TLS session, for `nbds://`.
    tls: Option<QueueTls>,
}

/// The NBD command for a request, with the tag as its cookie.
fn nbd_request(tag: u16, req: &Request, fua_ok: bool) -> ClientRequest {
    let (typ, mut flags) = match req.op {
        Op::Read => (CmdType::READ, 0),
        Op::Write => (CmdType::WRITE, 0),
        Op::Flush => (CmdType::FLUSH, 0),
        Op::Discard => (CmdType::TRIM, 0),
        Op::WriteZeroes => (CmdType::WRITE_ZEROES, if req.no_unmap { cmd_flags::NO_HOLE } else { 0 }),
        Op::Other(_) => (CmdType(u16::MAX), 0),
    };
    if req.fua && fua_ok && req.op != Op::Flush && req.op != Op::Read {
        flags |= cmd_flags::FUA;
    }
    let (offset, len) = if req.op == Op::Flush { (0, 0) } else { (req.offset, u64::from(req.len)) };
    ClientRequest { typ, flags, cookie: u64::from(tag), offset, len }
}

/// The errno a request completes with for an NBD error value: the wire
/// values are Linux's (ENOTSUP is EOPNOTSUPP); anything else is EIO.
pub fn nbd_errno(e: u32) -> i32 {
    match e {
        1 | 5 | 12 | 22 | 28 | 75 | 95 | 108 => e as i32,
        _ => libc::EIO,
    }
}

impl NbdQueue {
    fn fua_ok(&self) -> bool {
        self.neg.flags & tx_flags::SEND_FUA != 0
    }

    fn lookup(&self, cookie: u64) -> Option<ClientRequest> {
        let tag = u16::try_from(cookie).ok()?;
        match self.slots.get(usize::from(tag))? {
            Slot::Sent(req) => Some(nbd_request(tag, req, self.fua_ok())),
            _ => None,
        }
    }

    fn complete(&mut self, tag: u16, step: Step) {
        if let Some(s) = self.slots.get_mut(usize::from(tag)) {
            *s = Slot::Free;
        }
        self.done.push((tag, step));
    }

    fn fail(&self, tag: u16, req: &Request, errno: i32, why: &str) -> Step {
        Step::Failed(Error::new(
            format!("tag {tag}: {} on {}{why}", req.describe(), self.what),
            io::Error::from_raw_os_error(errno),
        ))
    }

    /// The connection is unusable: shut it down and put every request on
    /// the wire back in the send queue.
    fn lost(&mut self, why: String) {
        if self.state != State::Up {
            return;
        }
        eprintln!("ringbd: {}: connection lost: {why}; reconnecting", self.what);
        self.last_loss = why;
        self.state = State::Draining;
        if let Err(e) = ringbd_io::net::shutdown_socket(self.sock.as_fd()) {
            if e.raw_os_error() != Some(libc::ENOTCONN) {
                eprintln!("ringbd: {}: shutdown of the lost connection: {e}", self.what);
            }
        }
        let mut again: Vec<u16> = Vec::new();
        for (i, s) in self.slots.iter_mut().enumerate() {
            if let Slot::Sent(req) = *s {
                *s = Slot::Queued(req);
                again.push(i as u16);
            }
        }
        self.unanswered = again.len();
        for tag in again.into_iter().rev() {
            self.queue.push_front(tag);
        }
    }

    fn post_header(&mut self, ring: &mut QueueRing, got: usize) {
        match ring.recv_header(SLOT, got..REPLY_HEADER, K_HEADER) {
            Ok(()) => self.recv = Recv::Header { got },
            Err(e) => self.lost(format!("queueing a reply header receive: {e}")),
        }
    }

    /// A whole reply header is in the ring's header area.
    fn on_header(&mut self, ring: &mut QueueRing) {
        let mut hdr = [0u8; REPLY_HEADER];
        match ring.header() {
            Some(h) if h.len() >= REPLY_HEADER => hdr.copy_from_slice(&h[..REPLY_HEADER]),
            _ => return self.lost("reply header area busy".into()),
        }
        if let Some(d) = self.session.peek_data(&hdr, |c| self.lookup(c)) {
            // A read's data follows: straight into its buffer.
            let Ok(tag) = u16::try_from(d.cookie) else { return self.lost("read reply cookie".into()) };
            let Some(Slot::Sent(req)) = self.slots.get(usize::from(tag)).copied() else {
                return self.lost(format!("read reply for tag {tag}, which is not in flight"));
            };
            let off = d.offset.checked_sub(req.offset).map(u32::try_from);
            let (Some(Ok(off)), Ok(len)) = (off, u32::try_from(d.len)) else {
                return self.lost(format!("read reply for tag {tag}: {} bytes at {:#x}", d.len, d.offset));
            };
            return match ring.recv_into(tag, SLOT, off as usize, len, K_PAYLOAD) {
                Ok(()) => self.recv = Recv::Payload { tag, off, len, got: 0 },
                Err(e) => {
                    self.lost(format!("tag {tag}: queueing the receive of {len} bytes of read data: {e}"))
                }
            };
        }
        let reply = match self.session.decode_reply(&hdr, |c| self.lookup(c)) {
            Ok(Some((r, REPLY_HEADER))) => (r.cookie, r.chunk.clone()),
            Ok(Some((r, n))) => return self.lost(format!("reply to cookie {:#x} of {n} bytes", r.cookie)),
            Ok(None) => return self.lost("a reply the decoder cannot finish".into()),
            Err(e) => return self.lost(e.to_string()),
        };
        let tag = reply.0 as u16;
        let Some(Slot::Sent(req)) = self.slots.get(usize::from(tag)).copied() else {
            return self.lost(format!("reply for tag {tag}, which is not in flight"));
        };
        match reply.1 {
            ReplyChunk::Ok => {
                let n = if matches!(req.op, Op::Read | Op::Write) { req.len } else { 0 };
                self.complete(tag, Step::Done(n));
            }
            ReplyChunk::Error { errno: 108, .. } => {
                return self
                    .lost(format!("tag {tag}: {}: the server is shutting down (ESHUTDOWN)", req.describe()))
            }
            ReplyChunk::Error { errno, .. } => {
                let step = self.fail(tag, &req, nbd_errno(errno), "");
                self.complete(tag, step);
            }
            other => return self.lost(format!("tag {tag}: unexpected reply {other:?}")),
        }
        self.post_header(ring, 0);
    }

    /// Sends what is queued as one batch, if no send is in flight.
    fn send_queued(&mut self, ring: &mut QueueRing) {
        if ring.sending() || self.queue.is_empty() {
            return;
        }
        self.headers.clear();
        self.parts.clear();
        let mut total = 0u64;
        while self.parts.len() < SEND_BATCH_MAX {
            let Some(tag) = self.queue.pop_front() else { break };
            let Some(Slot::Queued(req)) = self.slots.get(usize::from(tag)).copied() else { continue };
            let r = nbd_request(tag, &req, self.fua_ok());
            let before = self.headers.len();
            if let Err(e) = self.session.encode_request(&mut self.headers, &r) {
                let step = Step::Failed(Error::msg(
                    format!("tag {tag}: {} on {}: {e}", req.describe(), self.what),
                    libc::EINVAL,
                ));
                self.complete(tag, step);
                continue;
            }
            let header_len = self.headers.len() - before;
            let payload = if req.op == Op::Write { req.len } else { 0 };
            total += (header_len as u64) + u64::from(payload);
            self.parts.push(SendPart { tag, header_len, payload });
            self.slots[usize::from(tag)] = Slot::Sent(req);
        }
        if self.parts.is_empty() {
            return;
        }
        self.send_len = total;
        if self.tls.is_some() {
            return self.send_tls(ring);
        }
        if let Err(e) = ring.send_requests(SLOT, &self.headers, &self.parts, K_SEND) {
            self.lost(format!("queueing a send of {} requests: {e}", self.parts.len()));
        }
    }

    /// TLS: encrypts the batch in `headers`/`parts` (payloads from the
    /// tags' buffers; copied into the records, so the tags are free again
    /// at once) and sends the records, with anything else the session has
    /// to send, as one send.
    fn send_tls(&mut self, ring: &mut QueueRing) {
        let Some(t) = self.tls.as_mut() else { return };
        let mut slices = Vec::with_capacity(self.parts.len() * 2);
        let mut off = 0;
        let mut bad = None;
        for p in &self.parts {
            slices.push(io::IoSlice::new(&self.headers[off..off + p.header_len]));
            off += p.header_len;
            if p.payload > 0 {
                match ring.buf(p.tag).and_then(|b| b.get(..p.payload as usize)) {
                    Some(b) => slices.push(io::IoSlice::new(b)),
                    None => bad = Some(p.tag),
                }
            }
        }
        let r = match bad {
            Some(tag) => Err(format!("tag {tag}: its buffer is not ours to send")),
            None => t.session.send(&slices, &mut t.wire),
        };
        drop(slices);
        if let Err(e) = r {
            return self.lost(format!("TLS: encrypting {} requests: {e}", self.parts.len()));
        }
        self.flush_tls(ring);
    }

    /// TLS: sends the records built so far (and whatever else the session
    /// wants to send), if no send is in flight.
    fn flush_tls(&mut self, ring: &mut QueueRing) {
        let Some(t) = self.tls.as_mut() else { return };
        if ring.sending() {
            return;
        }
        if let Err(e) = t.session.flush(&mut t.wire) {
            return self.lost(format!("TLS: {e}"));
        }
        if t.wire.is_empty() {
            return;
        }
        self.send_len = t.wire.len() as u64;
        if let Err(e) = ring.send_owned(SLOT, &mut t.wire, K_SEND) {
            self.lost(format!("queueing a send of {} bytes of TLS records: {e}", self.send_len));
        }
    }

    fn post_stream(&mut self, ring: &mut QueueRing) {
        match ring.recv_stream(SLOT, K_STREAM) {
            Ok(()) => self.recv = Recv::Stream,
            Err(e) => self.lost(format!("queueing a receive: {e}")),
        }
    }

    /// TLS: `n` bytes of ciphertext arrived in the ring's stream area:
    /// decrypt them and complete every reply that is whole.
    fn on_stream(&mut self, ring: &mut QueueRing, n: usize) {
        let Some(t) = self.tls.as_mut() else { return self.lost("stream receive without TLS".into()) };
        let r = match ring.stream().and_then(|s| s.get(..n)) {
            Some(data) => t.session.receive(data, &mut t.plain),
            None => return self.lost(format!("{n} bytes received but the stream area is busy")),
        };
        let closed = match r {
            Ok(r) => r.closed,
            Err(e) => return self.lost(format!("TLS: {e}")),
        };
        let plain = std::mem::take(&mut t.plain);
        let (res, pos) = self.replies(ring, &plain);
        let mut plain = plain;
        plain.drain(..pos);
        if let Some(t) = self.tls.as_mut() {
            t.plain = plain;
        }
        match res {
            Err(e) => self.lost(e),
            Ok(()) if closed => self.lost("the server closed the TLS session".into()),
            Ok(()) => {
                // rustls may have something to answer (a key update).
                self.flush_tls(ring);
                if self.state == State::Up {
                    self.post_stream(ring);
                }
            }
        }
    }

    /// Completes every whole reply at the front of `plain`; returns the
    /// bytes used, and why the connection is unusable if it is.
    fn replies(&mut self, ring: &mut QueueRing, plain: &[u8]) -> (std::result::Result<(), String>, usize) {
        let mut pos = 0;
        loop {
            let (cookie, chunk, used) = match self.session.decode_reply(&plain[pos..], |c| self.lookup(c)) {
                Ok(Some((r, used))) => (r.cookie, r.chunk, used),
                Ok(None) => return (Ok(()), pos),
                Err(e) => return (Err(e.to_string()), pos),
            };
            pos += used;
            let Ok(tag) = u16::try_from(cookie) else {
                return (Err(format!("reply cookie {cookie:#x}")), pos);
            };
            let Some(Slot::Sent(req)) = self.slots.get(usize::from(tag)).copied() else {
                return (Err(format!("reply for tag {tag}, which is not in flight")), pos);
            };
            match chunk {
                ReplyChunk::Ok => {
                    let n = if matches!(req.op, Op::Read | Op::Write) { req.len } else { 0 };
                    self.complete(tag, Step::Done(n));
                }
                ReplyChunk::Data { offset, data } => {
                    // The decoder checked that the data lies inside the read.
                    let at = offset.saturating_sub(req.offset) as usize;
                    match ring.buf_mut(tag).and_then(|b| b.get_mut(at..at + data.len())) {
                        Some(dst) => dst.copy_from_slice(data),
                        None => {
                            return (
                                Err(format!("tag {tag}: no room for {} bytes of read data", data.len())),
                                pos,
                            )
                        }
                    }
                    self.complete(tag, Step::Done(req.len));
                }
                ReplyChunk::Error { errno: 108, .. } => {
                    let what =
                        format!("tag {tag}: {}: the server is shutting down (ESHUTDOWN)", req.describe());
                    return (Err(what), pos);
                }
                ReplyChunk::Error { errno, .. } => {
                    let step = self.fail(tag, &req, nbd_errno(errno), "");
                    self.complete(tag, step);
                }
                other => return (Err(format!("tag {tag}: unexpected reply {other:?}")), pos),
            }
        }
    }

    /// Opens a new connection (bounded tries with growing delays); on
    /// failure every queued request fails with EIO, and so will later ones.
    fn reconnect(&mut self, ring: &mut QueueRing) {
        let mut last = String::new();
        for (i, delay) in RECONNECT_DELAYS.iter().enumerate() {
            std::thread::sleep(*delay);
            let r = connect(&self.uri).and_then(|c| {
                check_same_export(&self.what, &self.neg, &c.negotiated)?;
                ring.replace_file(SLOT, c.fd.as_fd())
                    .map_err(|e| Error::new(format!("{}: registering the new socket", self.what), e))?;
                Ok(c)
            });
            match r {
                Ok(c) => {
                    eprintln!(
                        "ringbd: {}: reconnected (try {}); sending {} request(s) that had no reply again, and {} that arrived meanwhile",
                        self.what,
                        i + 1,
                        self.unanswered,
                        self.queue.len().saturating_sub(self.unanswered)
                    );
                    self.sock = c.fd;
                    self.session = ClientSession::new(c.negotiated);
                    self.tls = c.tls.map(QueueTls::new);
                    self.state = State::Up;
                    self.recv = Recv::Idle;
                    return;
                }
                Err(e) => last = e.to_string(),
            }
        }
        eprintln!(
            "ringbd: {}: giving up after {} reconnect tries ({last}); requests now fail with EIO",
            self.what,
            RECONNECT_DELAYS.len()
        );
        self.last_loss =
            format!("{}; {} reconnect tries failed: {last}", self.last_loss, RECONNECT_DELAYS.len());
        self.state = State::Dead;
    }

    fn fail_queued(&mut self) {
        while let Some(tag) = self.queue.pop_front() {
            if let Some(Slot::Queued(req)) = self.slots.get(usize::from(tag)).copied() {
                let why = format!(": connection lost ({})", self.last_loss);
                let step = self.fail(tag, &req, libc::EIO, &why);
                self.complete(tag, step);
            }
        }
    }
}

impl QueueHandler for NbdQueue {
    fn start(&mut self, _ring: &mut QueueRing, tag: u16, req: &Request) -> Step {
        let flags = self.neg.flags;
        let unsupported = |what: &str| {
            Step::Failed(Error::msg(
                format!("tag {tag}: {} on {}: the export has no {what}", req.describe(), self.what),
                libc::EOPNOTSUPP,
            ))
        };
        match req.op {
            Op::Read | Op::Write if req.len == 0 => return Step::Done(0),
            Op::Write if flags & tx_flags::READ_ONLY != 0 => {
                return self.fail(tag, req, libc::EROFS, ": read-only export")
            }
            Op::Flush if flags & tx_flags::SEND_FLUSH == 0 => return Step::Done(0),
            Op::Discard if flags & tx_flags::SEND_TRIM == 0 => return unsupported("trim"),
            Op::WriteZeroes if flags & tx_flags::SEND_WRITE_ZEROES == 0 => {
                return unsupported("write-zeroes")
            }
            Op::Other(_) => return unsupported("such command"),
            _ => {}
        }
        if self.state == State::Dead {
            let why = format!(": connection lost ({})", self.last_loss);
            return self.fail(tag, req, libc::EIO, &why);
        }
        match self.slots.get_mut(usize::from(tag)) {
            Some(s) => *s = Slot::Queued(*req),
            None => return self.fail(tag, req, libc::EIO, ": no such tag"),
        }
        self.queue.push_back(tag);
        Step::Pending
    }

    fn op_done(&mut self, ring: &mut QueueRing, tag: u16, cookie: u32, result: io::Result<u32>) -> Step {
        let Recv::Payload { tag: t, off, len, got } = self.recv else {
            self.lost(format!("tag {tag}: completion {cookie} with no receive in flight"));
            return Step::Pending;
        };
        if cookie != K_PAYLOAD || t != tag {
            self.lost(format!("tag {tag}: completion {cookie} while receiving for tag {t}"));
            return Step::Pending;
        }
        self.recv = Recv::Idle;
        if self.state != State::Up {
            return Step::Pending;
        }
        match result {
            Ok(0) => self.lost(format!("tag {tag}: server closed the connection in read data")),
            Ok(n) if got + n < len => {
                let got = got + n;
                match ring.recv_into(tag, SLOT, (off + got) as usize, len - got, K_PAYLOAD) {
                    Ok(()) => self.recv = Recv::Payload { tag, off, len, got },
                    Err(e) => self.lost(format!("tag {tag}: queueing the rest of the read data: {e}")),
                }
            }
            Ok(_) => {
                if let Some(Slot::Sent(req)) = self.slots.get(usize::from(tag)).copied() {
                    self.complete(tag, Step::Done(req.len));
                }
                self.post_header(ring, 0);
            }
            Err(e) => self.lost(format!("tag {tag}: receiving read data: {e}")),
        }
        Step::Pending
    }

    fn conn_op_done(&mut self, ring: &mut QueueRing, cookie: u32, result: io::Result<u32>) {
        match cookie {
            K_SEND => {
                if self.state == State::Up && !matches!(result, Ok(n) if u64::from(n) == self.send_len) {
                    let r = match result {
                        Ok(n) => format!("{n} bytes"),
                        Err(e) => e.to_string(),
                    };
                    self.lost(format!("send of {} bytes: {r}", self.send_len));
                }
            }
            K_HEADER => {
                let Recv::Header { got } = self.recv else { return };
                self.recv = Recv::Idle;
                if self.state != State::Up {
                    return;
                }
                match result {
                    Ok(0) => self.lost("server closed the connection".into()),
                    Ok(n) if got + (n as usize) < REPLY_HEADER => self.post_header(ring, got + n as usize),
                    Ok(_) => self.on_header(ring),
                    Err(e) => self.lost(format!("receiving a reply header: {e}")),
                }
            }
            K_STREAM => {
                if self.recv != Recv::Stream {
                    return;
                }
                self.recv = Recv::Idle;
                if self.state != State::Up {
                    return;
                }
                match result {
                    Ok(0) => self.lost("server closed the connection".into()),
                    Ok(n) => self.on_stream(ring, n as usize),
                    Err(e) => self.lost(format!("receiving: {e}")),
                }
            }
            c => self.lost(format!("unknown connection completion {c}")),
        }
    }

    fn end_turn(&mut self, ring: &mut QueueRing, done: &mut Vec<(u16, Step)>) {
        for _ in 0..3 {
            if self.state == State::Draining
                && !ring.sending()
                && !ring.receiving()
                && !matches!(self.recv, Recv::Payload { .. })
            {
                self.reconnect(ring);
            }
            if self.state == State::Up {
                if self.recv == Recv::Idle && !ring.receiving() {
                    if self.tls.is_some() {
                        self.post_stream(ring);
                    } else {
                        self.post_header(ring, 0);
                    }
                }
                self.send_queued(ring);
                if self.tls.is_some() {
                    self.flush_tls(ring);
                }
            }
            if self.state == State::Dead {
                self.fail_queued();
            }
            // Once more only if the connection was lost with nothing of it in
            // flight (no completion would wake the loop).
            if self.state != State::Draining || ring.sending() || ring.receiving() {
                break;
            }
        }
        // A write's reply can be reaped before the completion of the send
        // that carried its payload; its tag is committed once that is in.
        let mut i = 0;
        while i < self.done.len() {
            if ring.tag_busy(self.done[i].0) {
                i += 1;
            } else {
                done.push(self.done.swap_remove(i));
            }
        }
    }

    fn stop(&mut self, _ring: &mut QueueRing) {
        self.state = State::Stopping;
        if let Err(e) = ringbd_io::net::shutdown_socket(self.sock.as_fd()) {
            if e.raw_os_error() != Some(libc::ENOTCONN) {
                eprintln!("ringbd: {}: shutdown: {e}", self.what);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_map_to_nbd_commands() {
        let w = Request { op: Op::Write, offset: 4096, len: 8192, fua: true, no_unmap: false };
        let r = nbd_request(7, &w, true);
        assert_eq!(
            (r.typ, r.flags, r.cookie, r.offset, r.len),
            (CmdType::WRITE, cmd_flags::FUA, 7, 4096, 8192)
        );
        assert_eq!(nbd_request(7, &w, false).flags, 0, "no FUA where the export has none");
        let f = Request { op: Op::Flush, offset: 0, len: 0, fua: false, no_unmap: false };
        assert_eq!(nbd_request(1, &f, true).typ, CmdType::FLUSH);
        let z = Request { op: Op::WriteZeroes, no_unmap: true, ..w };
        assert_eq!(nbd_request(2, &z, false).flags, cmd_flags::NO_HOLE);
        let d = Request { op: Op::Discard, fua: false, ..w };
        assert_eq!(nbd_request(3, &d, true).typ, CmdType::TRIM);
        let rd = Request { op: Op::Read, fua: false, ..w };
        assert_eq!(nbd_request(4, &rd, true).typ, CmdType::READ);
    }

    #[test]
    fn nbd_errors_map_to_errnos() {
        assert_eq!(nbd_errno(28), libc::ENOSPC);
        assert_eq!(nbd_errno(95), libc::EOPNOTSUPP);
        assert_eq!(nbd_errno(1), libc::EPERM);
        assert_eq!(nbd_errno(9999), libc::EIO);
        assert_eq!(nbd_errno(2), libc::EIO, "ENOENT is not an NBD error value");
    }

    fn neg(size: u64, flags: u16) -> ClientNegotiated {
        ClientNegotiated {
            export: String::new(),
            size,
            flags,
            structured: false,
            extended: false,
            base_allocation: None,
            block_sizes: None,
            name: None,
            description: None,
            meta_contexts: Vec::new(),
            refused: Vec::new(),
        }
    }

    fn target(neg: ClientNegotiated, read_only: bool) -> NbdTarget {
        let uri = "nbd+unix:///d?socket=/x".parse().unwrap();
        NbdTarget { uri, neg, read_only, first: Mutex::new(None) }
    }

    #[test]
    fn the_export_describes_the_device() {
        let all = tx_flags::HAS_FLAGS
            | tx_flags::SEND_FLUSH
            | tx_flags::SEND_FUA
            | tx_flags::SEND_TRIM
            | tx_flags::SEND_WRITE_ZEROES
            | tx_flags::CAN_MULTI_CONN;
        let mut n = neg(1 << 30, all);
        n.block_sizes = Some(nbd_proto::BlockSizes { minimum: 1, preferred: 65536, maximum: 1 << 20 });
        let i = target(n.clone(), false).info();
        assert_eq!(
            (i.size, i.read_only, i.flush, i.no_fua, i.discard, i.write_zeroes),
            (1 << 30, false, true, false, true, true)
        );
        assert_eq!((i.min_block_size, i.opt_io, i.max_io, i.max_queues), (512, 65536, 1 << 20, 0));
        n.block_sizes = Some(nbd_proto::BlockSizes { minimum: 4096, preferred: 4096, maximum: 1 << 20 });
        assert_eq!(target(n.clone(), false).info().min_block_size, 4096);
        // No multi-conn: one queue. Read-only: no discard or write-zeroes.
        let i = target(neg(1 << 20, tx_flags::HAS_FLAGS | tx_flags::READ_ONLY | tx_flags::SEND_TRIM), false)
            .info();
        assert_eq!(
            (i.read_only, i.discard, i.flush, i.max_queues, i.min_block_size),
            (true, false, false, 1, 512)
        );
        let i = target(neg(1 << 20, all), true).info();
        assert!(i.read_only && !i.write_zeroes);
        let i = target(neg(1 << 20, tx_flags::HAS_FLAGS | tx_flags::SEND_FLUSH), false).info();
        assert!(i.flush && i.no_fua);
    }

    #[test]
    fn a_changed_export_is_refused() {
        let f = tx_flags::HAS_FLAGS | tx_flags::SEND_FLUSH | tx_flags::SEND_TRIM;
        assert!(check_same_export("x", &neg(1 << 20, f), &neg(1 << 20, f)).is_ok());
        assert!(check_same_export("x", &neg(1 << 20, f), &neg(2 << 20, f | tx_flags::SEND_FUA)).is_ok());
        assert!(check_same_export("x", &neg(1 << 20, f), &neg(1 << 19, f)).is_err());
        assert!(check_same_export("x", &neg(1 << 20, f), &neg(1 << 20, tx_flags::HAS_FLAGS)).is_err());
        assert!(check_same_export("x", &neg(1 << 20, f), &neg(1 << 20, f | tx_flags::READ_ONLY)).is_err());
    }
}
