//! The client side of the fixed-newstyle handshake: [`ClientHandshake`]
//! sends options and accepts only the reply it waits for, falling back when
//! the server refuses an option, until it settles a [`ClientNegotiated`]
//! (or an export list) for the transmission phase.

use std::fmt;

use crate::codec::{Put, Reader};
use crate::export::{BlockSizes, ExportListing};
use crate::wire::{
    client_flags, handshake_flags, InfoType, OptCode, RepType, BASE_ALLOCATION, IHAVEOPT, MAX_STRING,
    NBD_MAGIC, OPTION_REPLY_MAGIC,
};

/// Oldstyle negotiation magic (`cliserv_magic`); not supported.
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Largest option reply accepted (a LIST entry or INFO is a few KiB).
pub const MAX_OPTION_REPLY: u32 = 64 * 1024;

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
