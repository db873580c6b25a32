//! Client side of NBD, sans-IO: the fixed-newstyle handshake as a state
//! machine, the request encoder, and a reply decoder that checks every
//! reply against the request it answers.
//!
//! Handshake: create a [`ClientHandshake`], then loop: send
//! [`ClientHandshake::take_output`], feed received bytes to
//! [`ClientHandshake::handle`] (it consumes only complete messages and says
//! how many bytes it used), until [`ClientHandshake::outcome`] is `Some`.
//! Options the server refuses fall back gracefully: no extended headers ->
//! structured replies -> simple replies; no `NBD_OPT_GO` -> `NBD_OPT_EXPORT_NAME`;
//! no meta context -> no block status.
//!
//! TLS ([`ClientConfig::starttls`]): the first option is `NBD_OPT_STARTTLS`.
//! After its ACK, [`ClientHandshake::tls_pending`] is true and `handle`
//! consumes nothing more: the driver runs the TLS handshake on the
//! connection and calls [`ClientHandshake::tls_started`], which starts the
//! option haggling again inside TLS (nothing negotiated before counts, as
//! the spec says). A server that refuses STARTTLS, or has no fixed
//! newstyle, is an error: there is no fallback to plaintext.
//!
//! Transmission: [`ClientSession::encode_request`] writes request headers
//! (the caller appends write payloads); [`ClientSession::decode_reply`] parses
//! one reply message or chunk from the front of a receive buffer, given a
//! lookup from cookie to the request in flight. Hostile input never panics:
//! lengths are bounded, offsets are checked against the request, and every
//! violation is a [`ReplyError`].

use std::fmt;

use crate::codec::{Put, Reader};
use crate::export::{BlockSizes, ExportListing};
use crate::transmission::Extent;
use crate::wire::{
    client_flags, cmd_flags, handshake_flags, reply_flags, tx_flags, ChunkType, CmdType, InfoType, OptCode,
    RepType, BASE_ALLOCATION, EXTENDED_REPLY_MAGIC, EXTENDED_REQUEST_MAGIC, IHAVEOPT, MAX_STRING, NBD_MAGIC,
    OPTION_REPLY_MAGIC, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
};

/// Oldstyle negotiation magic (`cliserv_magic`); not supported.
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Largest option reply accepted (a LIST entry or INFO is a few KiB).
pub const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// Largest non-data reply chunk payload accepted: 2^20 extended extents.
pub const MAX_CHUNK_PAYLOAD: u64 = 8 + 16 * (1 << 20);

/// What the client asks for during the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// Export to open.
    pub export: String,
    /// Ask for structured replies.
    pub structured: bool,
    /// Ask for extended headers (falls back to structured replies).
    pub extended: bool,
    /// Select `base:allocation` (needs structured replies).
    pub base_allocation: bool,
    /// List every meta context of the export (`NBD_OPT_LIST_META_CONTEXT`).
    pub list_meta: bool,
    /// Only list the exports (`NBD_OPT_LIST`), then abort.
    pub list_exports: bool,
    /// Send `NBD_OPT_STARTTLS` first and require the server to accept it.
    pub starttls: bool,
}

impl ClientConfig {
    /// Everything on, for `export`.
    pub fn new(export: &str) -> Self {
        ClientConfig {
            export: export.to_owned(),
            structured: true,
            extended: true,
            base_allocation: true,
            list_meta: false,
            list_exports: false,
            starttls: false,
        }
    }
}

/// What the handshake settled for the transmission phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientNegotiated {
    pub export: String,
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    pub structured: bool,
    pub extended: bool,
    /// The server's id for `base:allocation`, if selected.
    pub base_allocation: Option<u32>,
    /// `NBD_INFO_BLOCK_SIZE`, if the server sent it.
    pub block_sizes: Option<BlockSizes>,
    /// `NBD_INFO_NAME`, if sent.
    pub name: Option<String>,
    /// `NBD_INFO_DESCRIPTION`, if sent.
    pub description: Option<String>,
    /// Contexts from `NBD_OPT_LIST_META_CONTEXT` (when asked for).
    pub meta_contexts: Vec<String>,
    /// Options the server refused, with its reply, for diagnostics.
    pub refused: Vec<(OptCode, RepType)>,
}

/// How the client handshake ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOutcome {
    /// Enter transmission.
    Connected(ClientNegotiated),
    /// The export list (after `NBD_OPT_LIST`); `NBD_OPT_ABORT` was queued.
    Listed(Vec<ExportListing>),
}

/// Why the client handshake failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientHandshakeError {
    /// The server's first bytes were not `NBDMAGIC`.
    NotNbd(u64),
    /// An oldstyle server (not supported).
    Oldstyle,
    /// The greeting was not newstyle.
    BadNewstyleMagic(u64),
    /// An option reply with the wrong magic.
    BadReplyMagic(u64),
    /// A reply to an option we did not send.
    UnexpectedReply { sent: OptCode, got: OptCode },
    /// An option reply larger than [`MAX_OPTION_REPLY`].
    ReplyTooLarge { option: OptCode, len: u32 },
    /// A malformed option reply.
    Malformed { option: OptCode, what: String },
    /// The server refused an option we cannot do without.
    Refused { option: OptCode, reply: RepType, message: String },
    /// The server does not support what was asked (e.g. `NBD_OPT_LIST`
    /// from a server without fixed newstyle).
    Unsupported(&'static str),
    /// TLS was required and the server refused `NBD_OPT_STARTTLS`.
    TlsRefused { reply: RepType, message: String },
}

impl fmt::Display for ClientHandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use ClientHandshakeError as E;
        match self {
            E::NotNbd(m) => write!(f, "not an NBD server (greeting 0x{m:016x})"),
            E::Oldstyle => f.write_str("oldstyle NBD server (not supported; newstyle needed)"),
            E::BadNewstyleMagic(m) => write!(f, "bad newstyle magic 0x{m:016x}"),
            E::BadReplyMagic(m) => write!(f, "bad option reply magic 0x{m:016x}"),
            E::UnexpectedReply { sent, got } => write!(f, "reply to {got} while waiting for {sent}"),
            E::ReplyTooLarge { option, len } => write!(f, "reply to {option} of {len} bytes is too large"),
            E::Malformed { option, what } => write!(f, "malformed reply to {option}: {what}"),
            E::Refused { option, reply, message } => {
                write!(f, "server refused {option}: {reply}")?;
                if !message.is_empty() {
                    write!(f, " ({message})")?;
                }
                Ok(())
            }
            E::Unsupported(what) => write!(f, "server does not support {what}"),
            E::TlsRefused { reply, message } => {
                write!(f, "TLS is required, but the server refused NBD_OPT_STARTTLS: {reply}")?;
                if !message.is_empty() {
                    write!(f, " ({message})")?;
                }
                f.write_str("; not falling back to plaintext")
            }
        }
    }
}

impl std::error::Error for ClientHandshakeError {}

type HsResult<T> = Result<T, ClientHandshakeError>;

/// The step the handshake is waiting in. Each accepts only its message.
#[derive(Debug)]
enum Expect {
    Greeting,
    /// Reply to an option; `fixed` is false for `EXPORT_NAME` without fixed newstyle.
    Option(OptCode),
    /// The reply to `NBD_OPT_EXPORT_NAME`: size, flags, maybe 124 zeroes.
    ExportName,
    /// STARTTLS was acknowledged: the TLS handshake runs outside, until
    /// [`ClientHandshake::tls_started`].
    Tls,
    Done,
}

/// The client side of the fixed-newstyle handshake.
pub struct ClientHandshake {
    cfg: ClientConfig,
    expect: Expect,
    out: Vec<u8>,
    no_zeroes: bool,
    fixed: bool,
    neg: ClientNegotiated,
    have_export_info: bool,
    listing: Vec<ExportListing>,
    outcome: Option<ClientOutcome>,
    /// TLS was established (STARTTLS acknowledged and `tls_started` called).
    tls: bool,
}

impl ClientHandshake {
    pub fn new(cfg: ClientConfig) -> Self {
        let neg = ClientNegotiated {
            export: cfg.export.clone(),
            size: 0,
            flags: 0,
            structured: false,
            extended: false,
            base_allocation: None,
            block_sizes: None,
            name: None,
            description: None,
            meta_contexts: Vec::new(),
            refused: Vec::new(),
        };
        ClientHandshake {
            cfg,
            expect: Expect::Greeting,
            out: Vec::new(),
            no_zeroes: false,
            fixed: false,
            neg,
            have_export_info: false,
            listing: Vec::new(),
            outcome: None,
            tls: false,
        }
    }

    /// STARTTLS was acknowledged: run the TLS handshake on the connection
    /// (bytes after the ACK already belong to it), then call
    /// [`ClientHandshake::tls_started`]. `handle` consumes nothing meanwhile.
    pub fn tls_pending(&self) -> bool {
        matches!(self.expect, Expect::Tls)
    }

    /// The TLS handshake is done: option haggling starts again, inside
    /// TLS, from the first option (what was negotiated before STARTTLS
    /// does not count). Queues output; does nothing unless
    /// [`ClientHandshake::tls_pending`].
    pub fn tls_started(&mut self) -> HsResult<()> {
        if !self.tls_pending() {
            return Ok(());
        }
        self.tls = true;
        let refused = std::mem::take(&mut self.neg.refused);
        self.neg = ClientHandshake::new(self.cfg.clone()).neg;
        self.neg.refused = refused;
        self.have_export_info = false;
        self.listing.clear();
        self.first_option()
    }

    /// Whether the session runs inside TLS.
    pub fn tls(&self) -> bool {
        self.tls
    }

    /// Bytes to send now.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    pub fn outcome(&self) -> Option<&ClientOutcome> {
        self.outcome.as_ref()
    }

    pub fn into_outcome(self) -> Option<ClientOutcome> {
        self.outcome
    }

    /// Consumes complete messages from the front of `input`; returns how
    /// many bytes were used (0: wait for more).
    pub fn handle(&mut self, input: &[u8]) -> HsResult<usize> {
        let mut used = 0;
        while self.outcome.is_none() {
            let n = self.step(&input[used..])?;
            if n == 0 {
                break;
            }
            used += n;
        }
        Ok(used)
    }

    fn step(&mut self, input: &[u8]) -> HsResult<usize> {
        match self.expect {
            Expect::Greeting => self.greeting(input),
            Expect::Option(opt) => self.option_reply(opt, input),
            Expect::ExportName => self.export_name_reply(input),
            Expect::Tls | Expect::Done => Ok(0),
        }
    }

    fn send_option(&mut self, opt: OptCode, data: &[u8]) {
        self.out.put_u64(IHAVEOPT);
        self.out.put_u32(opt.0);
        self.out.put_u32(data.len() as u32);
        self.out.extend_from_slice(data);
        self.expect = if opt == OptCode::EXPORT_NAME { Expect::ExportName } else { Expect::Option(opt) };
    }

    fn greeting(&mut self, input: &[u8]) -> HsResult<usize> {
        if input.len() < 16 {
            return Ok(0);
        }
        let mut r = Reader::new(input);
        let magic = r.u64("magic").unwrap_or_default();
        if magic != NBD_MAGIC {
            return Err(ClientHandshakeError::NotNbd(magic));
        }
        let magic2 = r.u64("newstyle magic").unwrap_or_default();
        if magic2 == OLDSTYLE_MAGIC {
            return Err(ClientHandshakeError::Oldstyle);
        }
        if magic2 != IHAVEOPT {
            return Err(ClientHandshakeError::BadNewstyleMagic(magic2));
        }
        let Ok(hflags) = r.u16("handshake flags") else { return Ok(0) };
        self.fixed = hflags & handshake_flags::FIXED_NEWSTYLE != 0;
        self.no_zeroes = hflags & handshake_flags::NO_ZEROES != 0;
        let mut cflags = 0;
        if self.fixed {
            cflags |= client_flags::FIXED_NEWSTYLE;
        }
        if self.no_zeroes {
            cflags |= client_flags::NO_ZEROES;
        }
        self.out.put_u32(cflags);
        if self.cfg.starttls {
            if !self.fixed {
                return Err(ClientHandshakeError::Unsupported(
                    "NBD_OPT_STARTTLS (no fixed newstyle), which TLS needs",
                ));
            }
            self.send_option(OptCode::STARTTLS, &[]);
            return Ok(18);
        }
        self.first_option()?;
        Ok(18)
    }

    /// The first option after the greeting, or after TLS started.
    fn first_option(&mut self) -> HsResult<()> {
        if self.cfg.list_exports {
            if !self.fixed {
                return Err(ClientHandshakeError::Unsupported("NBD_OPT_LIST (no fixed newstyle)"));
            }
            self.send_option(OptCode::LIST, &[]);
        } else if !self.fixed {
            let name = self.cfg.export.clone();
            self.send_option(OptCode::EXPORT_NAME, name.as_bytes());
        } else {
            self.after(None);
        }
        Ok(())
    }

    /// Sends the next option of the sequence after `done` finished:
    /// EXTENDED_HEADERS | STRUCTURED_REPLY, LIST_META_CONTEXT,
    /// SET_META_CONTEXT, GO.
    fn after(&mut self, done: Option<OptCode>) {
        let cfg = &self.cfg;
        let structured = self.neg.structured;
        let next = match done {
            None if cfg.extended => OptCode::EXTENDED_HEADERS,
            None | Some(OptCode::EXTENDED_HEADERS) if cfg.structured && !structured => {
                OptCode::STRUCTURED_REPLY
            }
            None | Some(OptCode::EXTENDED_HEADERS) | Some(OptCode::STRUCTURED_REPLY)
                if structured && cfg.list_meta =>
            {
                OptCode::LIST_META_CONTEXT
            }
            None
            | Some(OptCode::EXTENDED_HEADERS)
            | Some(OptCode::STRUCTURED_REPLY)
            | Some(OptCode::LIST_META_CONTEXT)
                if structured && cfg.base_allocation =>
            {
                OptCode::SET_META_CONTEXT
            }
            _ => OptCode::GO,
        };
        let name = self.cfg.export.as_bytes().to_vec();
        match next {
            OptCode::LIST_META_CONTEXT | OptCode::SET_META_CONTEXT => {
                let mut d = Vec::new();
                d.put_u32(name.len() as u32);
                d.extend_from_slice(&name);
                if next == OptCode::SET_META_CONTEXT {
                    d.put_u32(1);
                    d.put_u32(BASE_ALLOCATION.len() as u32);
                    d.extend_from_slice(BASE_ALLOCATION.as_bytes());
                } else {
                    d.put_u32(0);
                }
                self.send_option(next, &d);
            }
            OptCode::GO => {
                let mut d = Vec::new();
                d.put_u32(name.len() as u32);
                d.extend_from_slice(&name);
                d.put_u16(3);
                d.put_u16(InfoType::NAME.0);
                d.put_u16(InfoType::DESCRIPTION.0);
                d.put_u16(InfoType::BLOCK_SIZE.0);
                self.send_option(next, &d);
            }
            _ => self.send_option(next, &[]),
        }
    }

    fn option_reply(&mut self, sent: OptCode, input: &[u8]) -> HsResult<usize> {
        if input.len() < 20 {
            return Ok(0);
        }
        let mut r = Reader::new(&input[..20]);
        let magic = r.u64("magic").unwrap_or_default();
        let opt = OptCode(r.u32("option").unwrap_or_default());
        let typ = RepType(r.u32("type").unwrap_or_default());
        let len = r.u32("length").unwrap_or_default();
        if magic != OPTION_REPLY_MAGIC {
            return Err(ClientHandshakeError::BadReplyMagic(magic));
        }
        if opt != sent {
            return Err(ClientHandshakeError::UnexpectedReply { sent, got: opt });
        }
        if len > MAX_OPTION_REPLY {
            return Err(ClientHandshakeError::ReplyTooLarge { option: opt, len });
        }
        let total = 20 + len as usize;
        if input.len() < total {
            return Ok(0);
        }
        let data = &input[20..total];
        if typ.is_error() {
            self.refused(sent, typ, data)?;
        } else {
            self.accepted(sent, typ, data)?;
        }
        Ok(total)
    }

    fn malformed(option: OptCode, what: impl Into<String>) -> ClientHandshakeError {
        ClientHandshakeError::Malformed { option, what: what.into() }
    }

    fn refused(&mut self, sent: OptCode, typ: RepType, data: &[u8]) -> HsResult<()> {
        let message = String::from_utf8_lossy(data).into_owned();
        self.neg.refused.push((sent, typ));
        match sent {
            OptCode::STARTTLS => return Err(ClientHandshakeError::TlsRefused { reply: typ, message }),
            OptCode::EXTENDED_HEADERS | OptCode::STRUCTURED_REPLY | OptCode::LIST_META_CONTEXT => {
                self.after(Some(sent));
            }
            OptCode::SET_META_CONTEXT => self.after(Some(OptCode::SET_META_CONTEXT)),
            // Old servers without NBD_OPT_GO: fall back to EXPORT_NAME
            // (forbidden once extended headers are on).
            OptCode::GO if typ == RepType::ERR_UNSUP && !self.neg.extended => {
                let name = self.cfg.export.clone();
                self.send_option(OptCode::EXPORT_NAME, name.as_bytes());
            }
            _ => return Err(ClientHandshakeError::Refused { option: sent, reply: typ, message }),
        }
        Ok(())
    }

    fn accepted(&mut self, sent: OptCode, typ: RepType, data: &[u8]) -> HsResult<()> {
        match (sent, typ) {
            (OptCode::STARTTLS, RepType::ACK) => {
                if !data.is_empty() {
                    return Err(Self::malformed(sent, format!("ACK with {} bytes of data", data.len())));
                }
                self.expect = Expect::Tls;
            }
            (OptCode::EXTENDED_HEADERS, RepType::ACK) => {
                self.neg.extended = true;
                self.neg.structured = true;
                self.after(Some(sent));
            }
            (OptCode::STRUCTURED_REPLY, RepType::ACK) => {
                self.neg.structured = true;
                self.after(Some(sent));
            }
            (OptCode::LIST, RepType::SERVER) => {
                let mut r = Reader::new(data);
                let name = r
                    .string32(MAX_STRING, "export name")
                    .map_err(|e| Self::malformed(sent, e.to_string()))?;
                let rest = r.bytes(r.remaining(), "description").unwrap_or_default();
                self.listing.push(ExportListing {
                    name: name.to_owned(),
                    description: String::from_utf8_lossy(rest).into_owned(),
                });
            }
            (OptCode::LIST, RepType::ACK) => {
                // Say goodbye politely; the server may or may not answer.
                self.send_option(OptCode::ABORT, &[]);
                self.expect = Expect::Done;
                self.outcome = Some(ClientOutcome::Listed(std::mem::take(&mut self.listing)));
            }
            (OptCode::LIST_META_CONTEXT | OptCode::SET_META_CONTEXT, RepType::META_CONTEXT) => {
                let mut r = Reader::new(data);
                let id = r.u32("context id").map_err(|e| Self::malformed(sent, e.to_string()))?;
                let rest = r.bytes(r.remaining(), "context name").unwrap_or_default();
                let name = std::str::from_utf8(rest)
                    .map_err(|_| Self::malformed(sent, "context name is not UTF-8"))?;
                if sent == OptCode::LIST_META_CONTEXT {
                    self.neg.meta_contexts.push(name.to_owned());
                } else if name == BASE_ALLOCATION {
                    self.neg.base_allocation = Some(id);
                } else {
                    return Err(Self::malformed(sent, format!("context {name:?} was not asked for")));
                }
            }
            (OptCode::LIST_META_CONTEXT | OptCode::SET_META_CONTEXT, RepType::ACK) => self.after(Some(sent)),
            (OptCode::GO, RepType::INFO) => self.info(data)?,
            (OptCode::GO, RepType::ACK) => {
                if !self.have_export_info {
                    return Err(Self::malformed(sent, "ACK without NBD_INFO_EXPORT"));
                }
                self.finish();
            }
            (opt, typ) => {
                return Err(Self::malformed(opt, format!("unexpected reply type {typ}")));
            }
        }
        Ok(())
    }

    fn info(&mut self, data: &[u8]) -> HsResult<()> {
        let go = OptCode::GO;
        let mut r = Reader::new(data);
        let bad = |e: crate::codec::DecodeError| Self::malformed(go, e.to_string());
        let typ = InfoType(r.u16("info type").map_err(bad)?);
        match typ {
            InfoType::EXPORT => {
                self.neg.size = r.u64("export size").map_err(bad)?;
                self.neg.flags = r.u16("transmission flags").map_err(bad)?;
                r.finish().map_err(bad)?;
                self.have_export_info = true;
            }
            InfoType::NAME | InfoType::DESCRIPTION => {
                let rest = r.bytes(r.remaining(), "string").unwrap_or_default();
                let s = String::from_utf8_lossy(rest).into_owned();
                if typ == InfoType::NAME {
                    self.neg.name = Some(s);
                } else {
                    self.neg.description = Some(s);
                }
            }
            InfoType::BLOCK_SIZE => {
                let minimum = r.u32("minimum block size").map_err(bad)?;
                let preferred = r.u32("preferred block size").map_err(bad)?;
                let maximum = r.u32("maximum block size").map_err(bad)?;
                r.finish().map_err(bad)?;
                let pow2 = |v: u32| v.is_power_of_two();
                if !pow2(minimum)
                    || minimum > 65536
                    || !pow2(preferred)
                    || preferred < minimum
                    || maximum < minimum
                {
                    return Err(Self::malformed(go, format!("block sizes {minimum}/{preferred}/{maximum}")));
                }
                self.neg.block_sizes = Some(BlockSizes { minimum, preferred, maximum });
            }
            // Unknown information types are ignored, as the spec asks.
            _ => {}
        }
        Ok(())
    }

    fn export_name_reply(&mut self, input: &[u8]) -> HsResult<usize> {
        let need = if self.no_zeroes { 10 } else { 134 };
        if input.len() < need {
            return Ok(0);
        }
        let mut r = Reader::new(&input[..10]);
        self.neg.size = r.u64("export size").unwrap_or_default();
        self.neg.flags = r.u16("transmission flags").unwrap_or_default();
        self.neg.base_allocation = None;
        self.finish();
        Ok(need)
    }

    fn finish(&mut self) {
        if !self.neg.structured {
            self.neg.base_allocation = None;
        }
        self.expect = Expect::Done;
        self.outcome = Some(ClientOutcome::Connected(self.neg.clone()));
    }
}

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

#[cfg(test)]
#[path = "client_tests.rs"]
mod tests;
