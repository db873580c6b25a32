//! The client's transmission phase: [`ClientSession`] encodes request
//! headers and decodes each reply message or chunk, checking it against the
//! request in flight that it answers.

use std::fmt;

use super::ClientNegotiated;
use crate::codec::{Put, Reader};
use crate::transmission::Extent;
use crate::wire::{
    cmd_flags, reply_flags, tx_flags, ChunkType, CmdType, EXTENDED_REPLY_MAGIC, EXTENDED_REQUEST_MAGIC,
    REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
};

/// Largest non-data reply chunk payload accepted: 2^20 extended extents.
pub const MAX_CHUNK_PAYLOAD: u64 = 8 + 16 * (1 << 20);

/// A request as the client sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientRequest {
    pub typ: CmdType,
    pub flags: u16,
    pub cookie: u64,
    pub offset: u64,
    /// Effect length (the payload length for writes).
    pub len: u64,
}

/// A request the encoder refuses to put on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EncodeError {
    /// A length that does not fit 32 bits without extended headers.
    LengthTooLarge(u64),
    /// A flag the negotiated session does not allow.
    Flag(&'static str),
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EncodeError::LengthTooLarge(l) => write!(f, "length {l} needs extended headers"),
            EncodeError::Flag(n) => write!(f, "{n} is not allowed on this connection"),
        }
    }
}

impl std::error::Error for EncodeError {}

/// A reply message or chunk, borrowed from the receive buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyChunk<'a> {
    /// Success without data (simple reply, or `NBD_REPLY_TYPE_NONE`).
    Ok,
    /// Read data at `offset` (a simple reply's data, or `OFFSET_DATA`).
    Data { offset: u64, data: &'a [u8] },
    /// A zero region of a read.
    Hole { offset: u64, len: u64 },
    /// Block status for meta context `context`.
    BlockStatus { context: u32, extents: Vec<Extent> },
    /// An error; `offset` for `ERROR_OFFSET`.
    Error { errno: u32, message: String, offset: Option<u64> },
}

/// Where the payload of a read reply goes (see [`ClientSession::peek_data`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataHead {
    pub cookie: u64,
    /// Export offset of the first payload byte.
    pub offset: u64,
    /// Payload bytes.
    pub len: u64,
    /// Bytes of header before the payload.
    pub header_len: usize,
    /// The reply's last message.
    pub done: bool,
}

/// One decoded reply message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply<'a> {
    pub cookie: u64,
    /// The last message for this cookie.
    pub done: bool,
    pub chunk: ReplyChunk<'a>,
}

/// A reply the client cannot accept: the connection must be closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyError {
    BadMagic(u32),
    /// A reply for a cookie that is not in flight.
    UnknownCookie(u64),
    /// A reply form the negotiation forbids, or inconsistent contents.
    Violation {
        cookie: u64,
        what: String,
    },
}

impl fmt::Display for ReplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplyError::BadMagic(m) => write!(f, "bad reply magic 0x{m:08x}"),
            ReplyError::UnknownCookie(c) => write!(f, "reply for cookie {c:#x}, which is not in flight"),
            ReplyError::Violation { cookie, what } => {
                write!(f, "protocol violation in reply to cookie {cookie:#x}: {what}")
            }
        }
    }
}

impl std::error::Error for ReplyError {}

/// The transmission phase of one client connection.
#[derive(Debug, Clone)]
pub struct ClientSession {
    neg: ClientNegotiated,
}

impl ClientSession {
    pub fn new(neg: ClientNegotiated) -> Self {
        ClientSession { neg }
    }

    pub fn negotiated(&self) -> &ClientNegotiated {
        &self.neg
    }

    /// Whether the server advertised transmission flag `bit` (`tx_flags`).
    pub fn has(&self, bit: u16) -> bool {
        self.neg.flags & bit != 0
    }

    /// Largest read or write payload to send in one request.
    pub fn max_payload(&self) -> u64 {
        let max = self
            .neg
            .block_sizes
            .map_or(crate::wire::MAX_PAYLOAD, |b| b.maximum.min(crate::wire::MAX_PAYLOAD));
        u64::from(max.max(512))
    }

    /// Appends the request header; for `NBD_CMD_WRITE` the caller sends
    /// `len` payload bytes right after it. With extended headers writes
    /// carry `NBD_CMD_FLAG_PAYLOAD_LEN`, as the extension requires.
    pub fn encode_request(&self, out: &mut Vec<u8>, req: &ClientRequest) -> Result<(), EncodeError> {
        let mut flags = req.flags;
        if flags & cmd_flags::DF != 0 && !self.has(tx_flags::SEND_DF) {
            return Err(EncodeError::Flag("NBD_CMD_FLAG_DF"));
        }
        if flags & cmd_flags::FAST_ZERO != 0 && !self.has(tx_flags::SEND_FAST_ZERO) {
            return Err(EncodeError::Flag("NBD_CMD_FLAG_FAST_ZERO"));
        }
        if self.neg.extended {
            if req.typ == CmdType::WRITE {
                flags |= cmd_flags::PAYLOAD_LEN;
            }
            out.put_u32(EXTENDED_REQUEST_MAGIC);
            out.put_u16(flags);
            out.put_u16(req.typ.0);
            out.put_u64(req.cookie);
            out.put_u64(req.offset);
            out.put_u64(req.len);
        } else {
            if flags & cmd_flags::PAYLOAD_LEN != 0 {
                return Err(EncodeError::Flag("NBD_CMD_FLAG_PAYLOAD_LEN"));
            }
            let len = u32::try_from(req.len).map_err(|_| EncodeError::LengthTooLarge(req.len))?;
            out.put_u32(REQUEST_MAGIC);
            out.put_u16(flags);
            out.put_u16(req.typ.0);
            out.put_u64(req.cookie);
            out.put_u64(req.offset);
            out.put_u32(len);
        }
        Ok(())
    }

    /// For a driver that wants to receive a large read payload straight into
    /// the caller's buffer: when `buf` starts with the complete header of a
    /// data-bearing reply to a read (a simple reply without error, or an
    /// `OFFSET_DATA` chunk including its offset field) whose payload has not
    /// fully arrived, says where the payload goes. Anything else, including
    /// anything malformed, is `None`: [`ClientSession::decode_reply`] then
    /// decides, and reports violations.
    pub fn peek_data(
        &self,
        buf: &[u8],
        lookup: impl FnOnce(u64) -> Option<ClientRequest>,
    ) -> Option<DataHead> {
        let mut r = Reader::new(buf);
        let magic = r.u32("magic").ok()?;
        let (cookie, done, offset_field, plen, hlen) = match magic {
            SIMPLE_REPLY_MAGIC if !self.neg.structured => {
                let errno = r.u32("error").ok()?;
                let cookie = r.u64("cookie").ok()?;
                if errno != 0 {
                    return None;
                }
                (cookie, true, None, None, 16)
            }
            STRUCTURED_REPLY_MAGIC | EXTENDED_REPLY_MAGIC => {
                let extended = magic == EXTENDED_REPLY_MAGIC;
                if extended != self.neg.extended || !self.neg.structured {
                    return None;
                }
                let flags = r.u16("flags").ok()?;
                if ChunkType(r.u16("type").ok()?) != ChunkType::OFFSET_DATA {
                    return None;
                }
                let cookie = r.u64("cookie").ok()?;
                let plen = if extended {
                    r.u64("offset").ok()?;
                    r.u64("length").ok()?
                } else {
                    u64::from(r.u32("length").ok()?)
                };
                let offset = r.u64("data offset").ok()?;
                let hlen = if extended { 40 } else { 28 };
                (cookie, flags & reply_flags::DONE != 0, Some(offset), Some(plen), hlen)
            }
            _ => return None,
        };
        let req = lookup(cookie)?;
        if req.typ != CmdType::READ {
            return None;
        }
        let (offset, len) = match (offset_field, plen) {
            (Some(off), Some(plen)) => (off, plen.checked_sub(8)?),
            _ => (req.offset, req.len),
        };
        let end = offset.checked_add(len)?;
        if len == 0 || offset < req.offset || end > req.offset.saturating_add(req.len) {
            return None;
        }
        if (buf.len() as u64) >= hlen as u64 + len {
            return None;
        }
        Some(DataHead { cookie, offset, len, header_len: hlen, done })
    }

    /// Decodes one reply message from the front of `buf`. `lookup` gives the
    /// request in flight for a cookie. Returns the reply and the bytes it
    /// used, or `Ok(None)` when `buf` does not hold a complete message yet.
    pub fn decode_reply<'a>(
        &self,
        buf: &'a [u8],
        lookup: impl FnOnce(u64) -> Option<ClientRequest>,
    ) -> Result<Option<(Reply<'a>, usize)>, ReplyError> {
        if buf.len() < 4 {
            return Ok(None);
        }
        let magic = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        match magic {
            SIMPLE_REPLY_MAGIC if !self.neg.extended => self.decode_simple(buf, lookup),
            STRUCTURED_REPLY_MAGIC if self.neg.structured && !self.neg.extended => {
                self.decode_chunk(buf, false, lookup)
            }
            EXTENDED_REPLY_MAGIC if self.neg.extended => self.decode_chunk(buf, true, lookup),
            m => Err(ReplyError::BadMagic(m)),
        }
    }

    fn decode_simple<'a>(
        &self,
        buf: &'a [u8],
        lookup: impl FnOnce(u64) -> Option<ClientRequest>,
    ) -> Result<Option<(Reply<'a>, usize)>, ReplyError> {
        if buf.len() < 16 {
            return Ok(None);
        }
        let mut r = Reader::new(&buf[4..16]);
        let errno = r.u32("error").unwrap_or_default();
        let cookie = r.u64("cookie").unwrap_or_default();
        let req = lookup(cookie).ok_or(ReplyError::UnknownCookie(cookie))?;
        let violation = |what: &str| ReplyError::Violation { cookie, what: what.to_owned() };
        if errno != 0 {
            let chunk = ReplyChunk::Error { errno, message: String::new(), offset: None };
            return Ok(Some((Reply { cookie, done: true, chunk }, 16)));
        }
        if req.typ != CmdType::READ {
            return Ok(Some((Reply { cookie, done: true, chunk: ReplyChunk::Ok }, 16)));
        }
        if self.neg.structured {
            return Err(violation(
                "simple reply with data to a read after structured replies were negotiated",
            ));
        }
        let len = usize::try_from(req.len).map_err(|_| violation("read length"))?;
        let total = 16usize.checked_add(len).ok_or_else(|| violation("read length"))?;
        if buf.len() < total {
            return Ok(None);
        }
        let chunk = ReplyChunk::Data { offset: req.offset, data: &buf[16..total] };
        Ok(Some((Reply { cookie, done: true, chunk }, total)))
    }

    fn decode_chunk<'a>(
        &self,
        buf: &'a [u8],
        extended: bool,
        lookup: impl FnOnce(u64) -> Option<ClientRequest>,
    ) -> Result<Option<(Reply<'a>, usize)>, ReplyError> {
        let hlen = if extended { 32 } else { 20 };
        if buf.len() < hlen {
            return Ok(None);
        }
        let mut r = Reader::new(&buf[4..hlen]);
        let flags = r.u16("flags").unwrap_or_default();
        let typ = ChunkType(r.u16("type").unwrap_or_default());
        let cookie = r.u64("cookie").unwrap_or_default();
        let plen = if extended {
            let _offset = r.u64("offset").unwrap_or_default();
            r.u64("length").unwrap_or_default()
        } else {
            u64::from(r.u32("length").unwrap_or_default())
        };
        let req = lookup(cookie).ok_or(ReplyError::UnknownCookie(cookie))?;
        let violation = |what: String| ReplyError::Violation { cookie, what };
        let limit = if typ == ChunkType::OFFSET_DATA { req.len.saturating_add(8) } else { MAX_CHUNK_PAYLOAD };
        if plen > limit {
            return Err(violation(format!(
                "{typ} chunk of {plen} bytes for a {} of {} bytes",
                req.typ, req.len
            )));
        }
        // plen <= MAX_CHUNK_PAYLOAD or a read length the caller allocated.
        let total = hlen + plen as usize;
        if buf.len() < total {
            return Ok(None);
        }
        let payload = &buf[hlen..total];
        let done = flags & reply_flags::DONE != 0;
        let chunk = self.chunk(typ, &req, payload).map_err(violation)?;
        Ok(Some((Reply { cookie, done, chunk }, total)))
    }

    fn chunk<'a>(
        &self,
        typ: ChunkType,
        req: &ClientRequest,
        payload: &'a [u8],
    ) -> Result<ReplyChunk<'a>, String> {
        let mut r = Reader::new(payload);
        let e = |e: crate::codec::DecodeError| format!("{typ} chunk: {e}");
        let in_range = |off: u64, len: u64| {
            off >= req.offset
                && off.checked_add(len).is_some_and(|end| end <= req.offset.saturating_add(req.len))
        };
        let is_read = req.typ == CmdType::READ;
        match typ {
            ChunkType::NONE => {
                r.finish().map_err(e)?;
                Ok(ReplyChunk::Ok)
            }
            ChunkType::OFFSET_DATA if is_read => {
                let offset = r.u64("offset").map_err(e)?;
                let data = &payload[8..];
                if data.is_empty() || !in_range(offset, data.len() as u64) {
                    return Err(format!(
                        "data chunk at {offset} of {} bytes is outside the read",
                        data.len()
                    ));
                }
                Ok(ReplyChunk::Data { offset, data })
            }
            ChunkType::OFFSET_HOLE if is_read => {
                let offset = r.u64("offset").map_err(e)?;
                let len = if self.neg.extended && r.remaining() == 8 {
                    r.u64("hole length").map_err(e)?
                } else {
                    u64::from(r.u32("hole length").map_err(e)?)
                };
                r.finish().map_err(e)?;
                if len == 0 || !in_range(offset, len) {
                    return Err(format!("hole at {offset} of {len} bytes is outside the read"));
                }
                Ok(ReplyChunk::Hole { offset, len })
            }
            ChunkType::BLOCK_STATUS | ChunkType::BLOCK_STATUS_EXT if req.typ == CmdType::BLOCK_STATUS => {
                let ext = typ == ChunkType::BLOCK_STATUS_EXT;
                if ext != self.neg.extended {
                    return Err(format!("{typ} chunk does not match the negotiated headers"));
                }
                let context = r.u32("context id").map_err(e)?;
                let mut extents = Vec::new();
                if ext {
                    let n = r.u32("extent count").map_err(e)?;
                    if r.remaining() as u64 != u64::from(n) * 16 {
                        return Err(format!("{n} extents do not fill {} bytes", r.remaining()));
                    }
                    for _ in 0..n {
                        let len = r.u64("extent length").map_err(e)?;
                        let flags = r.u64("extent flags").map_err(e)?;
                        extents.push(Extent { len, flags: flags as u32 });
                    }
                } else {
                    if !r.remaining().is_multiple_of(8) {
                        return Err("block status chunk is not 4 + 8n bytes".into());
                    }
                    while r.remaining() > 0 {
                        let len = r.u32("extent length").map_err(e)?;
                        let flags = r.u32("extent flags").map_err(e)?;
                        extents.push(Extent { len: u64::from(len), flags });
                    }
                }
                if extents.is_empty() || extents.iter().any(|x| x.len == 0) {
                    return Err("block status with no extents or an empty extent".into());
                }
                Ok(ReplyChunk::BlockStatus { context, extents })
            }
            t if t.0 & 0x8000 != 0 => {
                // ERROR, ERROR_OFFSET, and unknown error types alike.
                let errno = r.u32("error").map_err(e)?;
                let mlen = r.u16("message length").map_err(e)?;
                let msg = r.bytes(usize::from(mlen), "message").map_err(e)?;
                let message = String::from_utf8_lossy(msg).into_owned();
                let offset = if t == ChunkType::ERROR_OFFSET {
                    let off = r.u64("error offset").map_err(e)?;
                    if !in_range(off, 0) {
                        return Err(format!("error offset {off} is outside the request"));
                    }
                    Some(off)
                } else {
                    None
                };
                if t == ChunkType::ERROR || t == ChunkType::ERROR_OFFSET {
                    r.finish().map_err(e)?;
                }
                if errno == 0 {
                    return Err(format!("{t} chunk with error 0"));
                }
                Ok(ReplyChunk::Error { errno, message, offset })
            }
            t => Err(format!("unexpected {t} chunk for {}", req.typ)),
        }
    }
}
