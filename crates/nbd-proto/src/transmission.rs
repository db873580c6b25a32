//! Transmission phase: request decoding, validation against the negotiated
//! session, and reply encoding. Sans-IO: the driver reads a header of
//! [`Session::request_len`] bytes, asks [`Session::decode`] and
//! [`Session::check`] what it is, reads or discards the payload the answer
//! names, runs the command, and encodes the reply with the `Session::write_*`
//! functions.

use std::fmt;

use crate::codec::{Put, Reader};
use crate::handshake::Negotiated;
use crate::wire::{
    cmd_flags, reply_flags, tx_flags, ChunkType, CmdType, Errno, EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
};

/// Length of a compact request header.
pub const COMPACT_REQUEST_LEN: usize = 28;
/// Length of an extended request header.
pub const EXTENDED_REQUEST_LEN: usize = 32;
/// Largest `NBD_CMD_BLOCK_STATUS` payload accepted (effect length + ids).
pub const MAX_BLOCK_STATUS_PAYLOAD: u64 = 8 + 4 * 64;

/// A request header as sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub typ: CmdType,
    pub cookie: u64,
    pub offset: u64,
    /// Effect length, or payload length (`NBD_CMD_WRITE`, `PAYLOAD_LEN`).
    pub length: u64,
}

/// A fatal framing error: the stream can no longer be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FramingError {
    BadMagic(u32),
}

impl fmt::Display for FramingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FramingError::BadMagic(m) => write!(f, "bad request magic 0x{m:08x}"),
        }
    }
}

impl std::error::Error for FramingError {}

/// A validated command, ready for the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        len: u64,
        df: bool,
    },
    /// The payload (`len` bytes) follows the header.
    Write {
        offset: u64,
        len: u64,
        fua: bool,
    },
    Disc,
    Flush,
    Trim {
        offset: u64,
        len: u64,
        fua: bool,
    },
    Cache {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        fua: bool,
        no_hole: bool,
        fast: bool,
    },
    BlockStatus {
        offset: u64,
        len: u64,
        req_one: bool,
    },
    /// Block status with a client payload of `payload` bytes to read and
    /// hand to [`Session::check_block_status_payload`].
    BlockStatusPayload {
        payload: u64,
    },
}

/// A request the server must refuse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub errno: Errno,
    pub message: String,
    /// Payload bytes that follow the header and must be read and dropped.
    pub discard: u64,
    /// Reply with the error, then hard-disconnect (the payload is too large
    /// to consume).
    pub disconnect: bool,
}

impl Rejection {
    fn new(errno: Errno, message: impl Into<String>) -> Self {
        Rejection { errno, message: message.into(), discard: 0, disconnect: false }
    }
}

/// One block-status extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    pub flags: u32,
}

/// The negotiated transmission phase of one connection.
#[derive(Debug, Clone)]
pub struct Session {
    neg: Negotiated,
}

impl Session {
    pub fn new(neg: Negotiated) -> Self {
        Session { neg }
    }

    pub fn negotiated(&self) -> &Negotiated {
        &self.neg
    }

    pub fn structured(&self) -> bool {
        self.neg.structured
    }

    pub fn extended(&self) -> bool {
        self.neg.extended
    }

    /// Bytes in each request header.
    pub fn request_len(&self) -> usize {
        if self.neg.extended {
            EXTENDED_REQUEST_LEN
        } else {
            COMPACT_REQUEST_LEN
        }
    }

    /// Decodes one request header of exactly [`Session::request_len`] bytes.
    pub fn decode(&self, hdr: &[u8]) -> Result<Request, FramingError> {
        debug_assert_eq!(hdr.len(), self.request_len());
        let mut r = Reader::new(hdr);
        // The length was checked by the caller, so these reads cannot fail.
        let magic = r.u32("magic").unwrap_or_default();
        let expected = if self.neg.extended { EXTENDED_REQUEST_MAGIC } else { REQUEST_MAGIC };
        if magic != expected {
            return Err(FramingError::BadMagic(magic));
        }
        let flags = r.u16("flags").unwrap_or_default();
        let typ = CmdType(r.u16("type").unwrap_or_default());
        let cookie = r.u64("cookie").unwrap_or_default();
        let offset = r.u64("offset").unwrap_or_default();
        let length = if self.neg.extended {
            r.u64("length").unwrap_or_default()
        } else {
            u64::from(r.u32("length").unwrap_or_default())
        };
        Ok(Request { flags, typ, cookie, offset, length })
    }

    /// Payload bytes that follow this header on the wire. `NBD_CMD_WRITE`
    /// always carries its length as payload: the extension asks clients to
    /// also set `NBD_CMD_FLAG_PAYLOAD_LEN` on it, but qemu does not, and
    /// both forms frame the same bytes.
    pub fn payload_len(&self, req: &Request) -> u64 {
        let flagged = self.neg.extended && req.flags & cmd_flags::PAYLOAD_LEN != 0;
        if req.typ == CmdType::WRITE || flagged {
            req.length
        } else {
            0
        }
    }

    /// Validates a request against the export and negotiation.
    pub fn check(&self, req: &Request) -> Result<Command, Rejection> {
        let payload = self.payload_len(req);
        let max = u64::from(self.neg.export.block_sizes.maximum);
        let reject = |errno: Errno, msg: String| {
            let mut r = Rejection::new(errno, msg);
            r.discard = payload;
            r.disconnect = payload > max.max(MAX_BLOCK_STATUS_PAYLOAD);
            r
        };
        if payload > max && req.typ == CmdType::WRITE {
            return Err(reject(
                Errno::EINVAL,
                format!("payload of {payload} bytes exceeds the maximum of {max}"),
            ));
        }
        let known = match req.typ {
            CmdType::READ => cmd_flags::FUA | cmd_flags::DF,
            CmdType::WRITE => cmd_flags::FUA | cmd_flags::PAYLOAD_LEN,
            CmdType::WRITE_ZEROES => cmd_flags::FUA | cmd_flags::NO_HOLE | cmd_flags::FAST_ZERO,
            CmdType::BLOCK_STATUS => cmd_flags::FUA | cmd_flags::REQ_ONE | cmd_flags::PAYLOAD_LEN,
            CmdType::DISC | CmdType::FLUSH | CmdType::TRIM | CmdType::CACHE => cmd_flags::FUA,
            other => return Err(reject(Errno::EINVAL, format!("unknown command {other}"))),
        };
        let f = self.neg.flags;
        // Before the flags: a read-only export's write-type commands get
        // EPERM whatever flags they carry (FAST_ZERO, unadvertised there,
        // would otherwise be EINVAL), as nbdkit answers.
        let writes = matches!(req.typ, CmdType::WRITE | CmdType::TRIM | CmdType::WRITE_ZEROES);
        if writes && f & tx_flags::READ_ONLY != 0 {
            return Err(reject(Errno::EPERM, format!("{} on a read-only export", req.typ)));
        }
        let mut allowed = known;
        let payload_form = req.typ != CmdType::BLOCK_STATUS || f & tx_flags::BLOCK_STATUS_PAYLOAD != 0;
        if !self.neg.extended || !payload_form {
            allowed &= !cmd_flags::PAYLOAD_LEN;
        }
        if f & tx_flags::SEND_DF == 0 {
            allowed &= !cmd_flags::DF;
        }
        if f & tx_flags::SEND_FAST_ZERO == 0 {
            allowed &= !cmd_flags::FAST_ZERO;
        }
        if req.flags & !allowed != 0 {
            return Err(reject(
                Errno::EINVAL,
                format!("flags 0x{:x} are not valid for {}", req.flags & !allowed, req.typ),
            ));
        }

        let fua = req.flags & cmd_flags::FUA != 0;
        let (offset, len) = (req.offset, req.length);
        let feature = |bit: u16, name: &str| {
            if f & bit == 0 {
                Err(reject(Errno::EINVAL, format!("{name} is not supported by this export")))
            } else {
                Ok(())
            }
        };
        match req.typ {
            CmdType::FLUSH => feature(tx_flags::SEND_FLUSH, "NBD_CMD_FLUSH")?,
            CmdType::TRIM => feature(tx_flags::SEND_TRIM, "NBD_CMD_TRIM")?,
            CmdType::WRITE_ZEROES => feature(tx_flags::SEND_WRITE_ZEROES, "NBD_CMD_WRITE_ZEROES")?,
            CmdType::CACHE => feature(tx_flags::SEND_CACHE, "NBD_CMD_CACHE")?,
            _ => {}
        }
        if req.typ == CmdType::BLOCK_STATUS {
            if self.neg.base_allocation.is_none() {
                return Err(reject(
                    Errno::EINVAL,
                    "NBD_CMD_BLOCK_STATUS without a selected meta context".into(),
                ));
            }
            if payload > 0 {
                if payload > MAX_BLOCK_STATUS_PAYLOAD {
                    return Err(reject(
                        Errno::EINVAL,
                        format!("block status payload of {payload} bytes is too large"),
                    ));
                }
                return Ok(Command::BlockStatusPayload { payload });
            }
        }
        if matches!(req.typ, CmdType::DISC | CmdType::FLUSH) {
            if offset != 0 || len != 0 {
                return Err(reject(Errno::EINVAL, format!("{} with nonzero offset or length", req.typ)));
            }
            return Ok(if req.typ == CmdType::DISC { Command::Disc } else { Command::Flush });
        }
        self.check_range(req.typ, offset, len).map_err(|r| reject(r.errno, r.message))?;
        if req.typ == CmdType::READ && len > max {
            return Err(reject(Errno::EINVAL, format!("read of {len} bytes exceeds the maximum of {max}")));
        }
        Ok(match req.typ {
            CmdType::READ => Command::Read { offset, len, df: req.flags & cmd_flags::DF != 0 },
            CmdType::WRITE => Command::Write { offset, len, fua },
            CmdType::TRIM => Command::Trim { offset, len, fua },
            CmdType::CACHE => Command::Cache { offset, len },
            CmdType::WRITE_ZEROES => Command::WriteZeroes {
                offset,
                len,
                fua,
                no_hole: req.flags & cmd_flags::NO_HOLE != 0,
                fast: req.flags & cmd_flags::FAST_ZERO != 0,
            },
            _ => Command::BlockStatus { offset, len, req_one: req.flags & cmd_flags::REQ_ONE != 0 },
        })
    }

    fn check_range(&self, typ: CmdType, offset: u64, len: u64) -> Result<(), Rejection> {
        let size = self.neg.export.size;
        let end = offset.checked_add(len);
        if end.is_some_and(|e| e <= size) {
            let min = u64::from(self.neg.export.block_sizes.minimum.max(1));
            if !offset.is_multiple_of(min) || !len.is_multiple_of(min) {
                return Err(Rejection::new(
                    Errno::EINVAL,
                    format!("request at {offset} of {len} bytes is not aligned to {min}"),
                ));
            }
            return Ok(());
        }
        let errno =
            if matches!(typ, CmdType::WRITE | CmdType::WRITE_ZEROES) { Errno::ENOSPC } else { Errno::EINVAL };
        Err(Rejection::new(
            errno,
            format!("{typ} at {offset} of {len} bytes is beyond the end of the export ({size} bytes)"),
        ))
    }

    /// Validates the payload of a `BlockStatusPayload` command: an effect
    /// length and the context ids to answer for.
    pub fn check_block_status_payload(&self, req: &Request, payload: &[u8]) -> Result<Command, Rejection> {
        let mut r = Reader::new(payload);
        let bad = |m: &str| Err(Rejection::new(Errno::EINVAL, m.to_owned()));
        let Ok(len) = r.u64("effect length") else {
            return bad("block status payload shorter than 8 bytes");
        };
        if !r.remaining().is_multiple_of(4) || r.remaining() == 0 {
            return bad("block status payload is not 8 + 4n bytes with n > 0");
        }
        let mut seen = false;
        while r.remaining() > 0 {
            let id = r.u32("context id").unwrap_or_default();
            if Some(id) != self.neg.base_allocation || seen {
                return bad("unknown or repeated meta context id in block status payload");
            }
            seen = true;
        }
        self.check_range(CmdType::BLOCK_STATUS, req.offset, len)?;
        Ok(Command::BlockStatus { offset: req.offset, len, req_one: req.flags & cmd_flags::REQ_ONE != 0 })
    }

    fn chunk_header(&self, out: &mut Vec<u8>, flags: u16, typ: ChunkType, req: &Request, len: u64) {
        if self.neg.extended {
            out.put_u32(EXTENDED_REPLY_MAGIC);
            out.put_u16(flags);
            out.put_u16(typ.0);
            out.put_u64(req.cookie);
            out.put_u64(req.offset);
            out.put_u64(len);
        } else {
            debug_assert!(self.neg.structured);
            out.put_u32(STRUCTURED_REPLY_MAGIC);
            out.put_u16(flags);
            out.put_u16(typ.0);
            out.put_u64(req.cookie);
            out.put_u32(len as u32);
        }
    }

    fn simple_header(out: &mut Vec<u8>, errno: u32, cookie: u64) {
        out.put_u32(SIMPLE_REPLY_MAGIC);
        out.put_u32(errno);
        out.put_u64(cookie);
    }

    /// Success without payload: a simple reply where allowed, else a
    /// `NBD_REPLY_TYPE_NONE` chunk.
    pub fn write_ok(&self, out: &mut Vec<u8>, req: &Request) {
        if self.neg.extended || (self.neg.structured && req.typ == CmdType::READ) {
            self.chunk_header(out, reply_flags::DONE, ChunkType::NONE, req, 0);
        } else {
            Self::simple_header(out, 0, req.cookie);
        }
    }

    /// A failed request: an error chunk with the message when structured
    /// replies are in use, otherwise a simple reply with the errno.
    pub fn write_error(&self, out: &mut Vec<u8>, req: &Request, errno: Errno, message: &str) {
        if self.neg.structured {
            let msg = &message.as_bytes()[..message.len().min(4096)];
            self.chunk_header(out, reply_flags::DONE, ChunkType::ERROR, req, 6 + msg.len() as u64);
            out.put_u32(errno.0);
            out.put_u16(msg.len() as u16);
            out.extend_from_slice(msg);
        } else {
            Self::simple_header(out, errno.0, req.cookie);
        }
    }

    /// Bytes [`Session::write_data_header`] appends (one data piece).
    pub fn data_header_len(&self) -> usize {
        if self.neg.extended {
            32 + 8
        } else if self.neg.structured {
            20 + 8
        } else {
            16
        }
    }

    /// Header for `len` bytes of read data at `offset`, which the caller
    /// sends right after. Simple replies allow exactly one such piece
    /// covering the whole request.
    pub fn write_data_header(&self, out: &mut Vec<u8>, req: &Request, offset: u64, len: u64, last: bool) {
        if self.neg.structured {
            let flags = if last { reply_flags::DONE } else { 0 };
            self.chunk_header(out, flags, ChunkType::OFFSET_DATA, req, 8 + len);
            out.put_u64(offset);
        } else {
            debug_assert!(offset == req.offset && len == req.length && last);
            Self::simple_header(out, 0, req.cookie);
        }
    }

    /// A known-zero region of a read (structured replies only).
    pub fn write_hole(&self, out: &mut Vec<u8>, req: &Request, offset: u64, len: u32, last: bool) {
        debug_assert!(self.neg.structured);
        let flags = if last { reply_flags::DONE } else { 0 };
        self.chunk_header(out, flags, ChunkType::OFFSET_HOLE, req, 12);
        out.put_u64(offset);
        out.put_u32(len);
    }

    /// The one status chunk for `base:allocation`, extents already clipped
    /// to the request.
    pub fn write_block_status(&self, out: &mut Vec<u8>, req: &Request, context: u32, extents: &[Extent]) {
        let n = extents.len() as u64;
        if self.neg.extended {
            self.chunk_header(out, reply_flags::DONE, ChunkType::BLOCK_STATUS_EXT, req, 8 + 16 * n);
            out.put_u32(context);
            out.put_u32(n as u32);
            for e in extents {
                out.put_u64(e.len);
                out.put_u64(u64::from(e.flags));
            }
        } else {
            self.chunk_header(out, reply_flags::DONE, ChunkType::BLOCK_STATUS, req, 4 + 8 * n);
            out.put_u32(context);
            for e in extents {
                out.put_u32(e.len as u32);
                out.put_u32(e.flags);
            }
        }
    }
}

/// Clips extents for a block-status reply: they start at the request
/// offset, cover at most `len` bytes, fit the reply's length field, and with
/// `req_one` are a single extent.
pub fn clip_extents(extents: &mut Vec<Extent>, len: u64, req_one: bool, extended: bool) {
    let cap = if extended { u64::MAX } else { u64::from(u32::MAX) & !0xfff };
    let mut left = len;
    let mut keep = 0;
    for e in extents.iter_mut() {
        if left == 0 {
            break;
        }
        e.len = e.len.min(left).min(cap);
        left -= e.len;
        keep += 1;
        if req_one || e.len == cap {
            break;
        }
    }
    extents.truncate(keep);
}

#[cfg(test)]
#[path = "transmission_tests.rs"]
mod tests;
