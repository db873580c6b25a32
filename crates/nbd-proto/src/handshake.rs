//! Server side of the fixed-newstyle handshake, as a sans-IO state machine.
//!
//! Drive it like this: send [`ServerHandshake::take_output`], feed whatever
//! bytes arrive to [`ServerHandshake::handle`] (it consumes only complete
//! messages and says how many bytes it used), send the output again, and stop
//! when [`ServerHandshake::outcome`] is `Some` or `handle` returns an error
//! (then close the connection after sending what output remains). Bytes left
//! over after the outcome belong to the transmission phase.
//!
//! TLS: with [`TlsMode::On`] or [`TlsMode::Require`] an `NBD_OPT_STARTTLS`
//! is acknowledged and `handle` stops right after it: the driver sends the
//! output (the plaintext ACK), sees [`ServerHandshake::starttls_pending`],
//! starts TLS on the connection and calls [`ServerHandshake::tls_started`];
//! every later byte in both directions is TLS. Option haggling then starts
//! again with nothing negotiated before STARTTLS kept (as the spec demands).
//! In `Require` mode every option but STARTTLS and ABORT is refused with
//! `NBD_REP_ERR_TLS_REQD` until then, so a plaintext client learns no export
//! names; `NBD_OPT_EXPORT_NAME` cannot be refused and ends the session.
//!
//! Each step is an `Expect*` value that accepts only its own message and is
//! consumed by the transition, in the manner of rustls.

use std::fmt;

use crate::codec::{DecodeError, Put, Reader};
use crate::export::{ExportCatalog, ExportDescriptor};
use crate::wire::{
    client_flags, handshake_flags, InfoType, OptCode, RepType, BASE_ALLOCATION, IHAVEOPT, MAX_STRING,
    NBD_MAGIC, OPTION_REPLY_MAGIC,
};

/// Options with more data than this are not processed: their data is
/// skipped as it arrives (never buffered) and the option gets
/// `NBD_REP_ERR_TOO_BIG`. No defined option needs more than a few KiB
/// (export names are at most 4096 bytes).
pub const MAX_OPTION_DATA: u32 = 64 * 1024;
/// Options with more data than this end the session: skipping megabytes
/// of option data is a denial of service, which the spec lets a server
/// answer with a hard disconnect (nbdkit disconnects too).
pub const MAX_OPTION_SKIP: u32 = 1024 * 1024;
/// Most queries one LIST/SET_META_CONTEXT may carry before `ERR_TOO_BIG`.
pub const MAX_META_QUERIES: u32 = 128;
/// The context id ringbd gives `base:allocation`.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Why the handshake ended without reaching transmission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeError {
    /// The client set flags this server does not know.
    UnknownClientFlags(u32),
    /// An option header did not start with `IHAVEOPT`.
    BadOptionMagic(u64),
    /// An option carried more data than [`MAX_OPTION_SKIP`].
    OptionTooLarge { option: OptCode, len: u32 },
    /// `NBD_OPT_EXPORT_NAME` named an export that does not exist.
    UnknownExport(String),
    /// A client that did not ask for fixed newstyle sent an option other
    /// than `NBD_OPT_EXPORT_NAME`.
    NotFixedNewstyle(OptCode),
    /// `NBD_OPT_EXPORT_NAME` after extended headers were negotiated.
    ExportNameWithExtendedHeaders,
    /// `NBD_OPT_EXPORT_NAME` before TLS on a server that requires TLS.
    ExportNameWithoutTls,
}

/// What the server does with `NBD_OPT_STARTTLS` (the `--tls` option).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// No TLS: STARTTLS gets `NBD_REP_ERR_UNSUP` (NOTLS in the spec).
    #[default]
    Off,
    /// TLS when the client asks for it; plaintext clients are served too.
    On,
    /// TLS or nothing (FORCEDTLS in the spec).
    Require,
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandshakeError::UnknownClientFlags(v) => write!(f, "unknown client flags 0x{v:08x}"),
            HandshakeError::BadOptionMagic(m) => write!(f, "bad option magic 0x{m:016x}"),
            HandshakeError::OptionTooLarge { option, len } => {
                write!(f, "option {option} carries {len} bytes (limit {MAX_OPTION_SKIP})")
            }
            HandshakeError::UnknownExport(n) => write!(f, "client asked for unknown export {n:?}"),
            HandshakeError::NotFixedNewstyle(o) => {
                write!(f, "option {o} from a client without fixed newstyle")
            }
            HandshakeError::ExportNameWithExtendedHeaders => {
                f.write_str("NBD_OPT_EXPORT_NAME after extended headers were negotiated")
            }
            HandshakeError::ExportNameWithoutTls => {
                f.write_str("NBD_OPT_EXPORT_NAME without TLS, which this server requires")
            }
        }
    }
}

impl std::error::Error for HandshakeError {}

/// Everything the transmission phase needs from the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub export: ExportDescriptor,
    /// Transmission flags as sent to the client.
    pub flags: u16,
    /// Structured replies are in use (also true with extended headers).
    pub structured: bool,
    /// Extended headers are in use.
    pub extended: bool,
    /// The id of `base:allocation`, if the client selected it for this export.
    pub base_allocation: Option<u32>,
}

/// How the handshake ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Enter the transmission phase.
    Transmission(Negotiated),
    /// The client sent `NBD_OPT_ABORT` (acknowledged); close the connection.
    Aborted,
}

#[derive(Debug, Default)]
struct Options {
    tls_mode: TlsMode,
    /// TLS is running (STARTTLS was acknowledged).
    tls: bool,
    fixed: bool,
    no_zeroes: bool,
    structured: bool,
    extended: bool,
    /// Export name and whether `base:allocation` was selected by the last
    /// `NBD_OPT_SET_META_CONTEXT`.
    meta: Option<(String, bool)>,
}

/// Shared state the `Expect*` steps write into.
struct Context<'a, C> {
    catalog: &'a C,
    out: &'a mut Vec<u8>,
    opts: &'a mut Options,
}

enum State {
    ClientFlags(ExpectClientFlags),
    Option(ExpectOption),
    /// STARTTLS was acknowledged; waiting for the driver to start TLS.
    StartTls(ExpectOption),
    /// Dropping the data of an option over [`MAX_OPTION_DATA`]; `left`
    /// bytes to go, then `NBD_REP_ERR_TOO_BIG`.
    Skip(SkipOption),
    Done(Outcome),
    /// Transient, only while a step runs.
    Poisoned,
}

/// Server handshake over any export catalog.
pub struct ServerHandshake<C> {
    catalog: C,
    state: State,
    out: Vec<u8>,
    opts: Options,
}

impl<C: ExportCatalog> ServerHandshake<C> {
    /// Starts a handshake without TLS; the greeting is queued as output.
    pub fn new(catalog: C) -> Self {
        Self::with_tls(catalog, TlsMode::Off)
    }

    /// Starts a handshake with the given TLS policy; the greeting is queued.
    pub fn with_tls(catalog: C, tls_mode: TlsMode) -> Self {
        let mut out = Vec::with_capacity(18);
        out.put_u64(NBD_MAGIC);
        out.put_u64(IHAVEOPT);
        out.put_u16(handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES);
        ServerHandshake {
            catalog,
            state: State::ClientFlags(ExpectClientFlags),
            out,
            opts: Options { tls_mode, ..Options::default() },
        }
    }

    /// STARTTLS was acknowledged: once the output is sent, start TLS and
    /// call [`ServerHandshake::tls_started`]. `handle` consumes nothing
    /// until then (what follows the option is the TLS handshake).
    pub fn starttls_pending(&self) -> bool {
        matches!(self.state, State::StartTls(_))
    }

    /// The driver switched the connection to TLS: option haggling goes on
    /// over it, with everything negotiated before forgotten.
    pub fn tls_started(&mut self) {
        if let State::StartTls(step) = std::mem::replace(&mut self.state, State::Poisoned) {
            self.opts = Options {
                tls_mode: self.opts.tls_mode,
                tls: true,
                fixed: self.opts.fixed,
                no_zeroes: self.opts.no_zeroes,
                ..Options::default()
            };
            self.state = State::Option(step);
        }
    }

    /// Whether TLS has been started on this connection.
    pub fn tls_active(&self) -> bool {
        self.opts.tls
    }

    /// Bytes to send to the client now.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// Whether output is waiting to be sent.
    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// `Some` once the handshake is over.
    pub fn outcome(&self) -> Option<&Outcome> {
        match &self.state {
            State::Done(o) => Some(o),
            _ => None,
        }
    }

    /// Consumes the finished handshake.
    pub fn into_outcome(self) -> Option<Outcome> {
        match self.state {
            State::Done(o) => Some(o),
            _ => None,
        }
    }

    /// Handles every complete message at the front of `input`, returning how
    /// many bytes were consumed. Stops at the outcome.
    pub fn handle(&mut self, input: &[u8]) -> Result<usize, HandshakeError> {
        let mut used = 0;
        loop {
            let rest = &input[used..];
            let state = std::mem::replace(&mut self.state, State::Poisoned);
            let mut cx = Context { catalog: &self.catalog, out: &mut self.out, opts: &mut self.opts };
            let (next, n) = match state {
                State::Done(_) | State::StartTls(_) | State::Poisoned => {
                    self.state = state;
                    return Ok(used);
                }
                State::ClientFlags(step) => {
                    if rest.len() < 4 {
                        self.state = State::ClientFlags(step);
                        return Ok(used);
                    }
                    let flags = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
                    (step.handle(flags, &mut cx)?, 4)
                }
                State::Option(step) => {
                    if rest.len() < 16 {
                        self.state = State::Option(step);
                        return Ok(used);
                    }
                    let mut r = Reader::new(&rest[..16]);
                    let magic = r.u64("option magic").unwrap_or_default();
                    let option = OptCode(r.u32("option").unwrap_or_default());
                    let len = r.u32("option length").unwrap_or_default();
                    if magic != IHAVEOPT {
                        return Err(HandshakeError::BadOptionMagic(magic));
                    }
                    if len > MAX_OPTION_SKIP
                        || (len > MAX_OPTION_DATA && (!cx.opts.fixed || option == OptCode::EXPORT_NAME))
                    {
                        // (EXPORT_NAME and clients without fixed newstyle
                        // cannot be sent an error reply.)
                        return Err(HandshakeError::OptionTooLarge { option, len });
                    }
                    if len > MAX_OPTION_DATA {
                        (State::Skip(SkipOption { option, left: len }), 16)
                    } else {
                        let total = 16 + len as usize;
                        if rest.len() < total {
                            self.state = State::Option(step);
                            return Ok(used);
                        }
                        (step.handle(option, &rest[16..total], &mut cx)?, total)
                    }
                }
                State::Skip(skip) => {
                    if rest.is_empty() {
                        self.state = State::Skip(skip);
                        return Ok(used);
                    }
                    skip.handle(rest, &mut cx)
                }
            };
            self.state = next;
            used += n;
        }
    }
}

/// Drops the data of an option over [`MAX_OPTION_DATA`] as it arrives.
struct SkipOption {
    option: OptCode,
    left: u32,
}

impl SkipOption {
    /// Consumes up to `left` bytes of `input`; returns the next state and
    /// how many bytes it took.
    fn handle<C>(self, input: &[u8], cx: &mut Context<'_, C>) -> (State, usize) {
        let n = input.len().min(self.left as usize);
        // n <= left, a u32.
        let left = self.left - n as u32;
        if left > 0 {
            return (State::Skip(SkipOption { left, ..self }), n);
        }
        if cx.opts.tls_mode == TlsMode::Require && !cx.opts.tls {
            // FORCEDTLS: every option before STARTTLS gets TLS_REQD.
            error(cx.out, self.option, RepType::ERR_TLS_REQD, "this server requires TLS");
        } else {
            let msg = format!("option {} carries more than {MAX_OPTION_DATA} bytes of data", self.option);
            error(cx.out, self.option, RepType::ERR_TOO_BIG, &msg);
        }
        (State::Option(ExpectOption), n)
    }
}

/// Waits for the client's 32-bit flags.
struct ExpectClientFlags;

impl ExpectClientFlags {
    fn handle<C>(self, flags: u32, cx: &mut Context<'_, C>) -> Result<State, HandshakeError> {
        if flags & !client_flags::KNOWN != 0 {
            return Err(HandshakeError::UnknownClientFlags(flags));
        }
        cx.opts.fixed = flags & client_flags::FIXED_NEWSTYLE != 0;
        cx.opts.no_zeroes = flags & client_flags::NO_ZEROES != 0;
        Ok(State::Option(ExpectOption))
    }
}

/// Waits for the next option (header plus data).
struct ExpectOption;

impl ExpectOption {
    fn handle<C: ExportCatalog>(
        self,
        option: OptCode,
        data: &[u8],
        cx: &mut Context<'_, C>,
    ) -> Result<State, HandshakeError> {
        if !cx.opts.fixed && option != OptCode::EXPORT_NAME {
            return Err(HandshakeError::NotFixedNewstyle(option));
        }
        let tls_missing = cx.opts.tls_mode == TlsMode::Require && !cx.opts.tls;
        if tls_missing && option == OptCode::EXPORT_NAME {
            return Err(HandshakeError::ExportNameWithoutTls);
        }
        if tls_missing && option != OptCode::STARTTLS && option != OptCode::ABORT {
            error(
                cx.out,
                option,
                RepType::ERR_TLS_REQD,
                "this server requires TLS: send NBD_OPT_STARTTLS first",
            );
            return Ok(State::Option(self));
        }
        match option {
            OptCode::EXPORT_NAME => export_name(data, cx),
            OptCode::ABORT => {
                reply(cx.out, option, RepType::ACK, &[]);
                Ok(State::Done(Outcome::Aborted))
            }
            OptCode::LIST => {
                if !data.is_empty() {
                    error(cx.out, option, RepType::ERR_INVALID, "NBD_OPT_LIST takes no data");
                } else {
                    for e in cx.catalog.list() {
                        let mut d = Vec::with_capacity(4 + e.name.len() + e.description.len());
                        d.put_u32(e.name.len() as u32);
                        d.extend_from_slice(e.name.as_bytes());
                        d.extend_from_slice(e.description.as_bytes());
                        reply(cx.out, option, RepType::SERVER, &d);
                    }
                    reply(cx.out, option, RepType::ACK, &[]);
                }
                Ok(State::Option(self))
            }
            OptCode::STARTTLS => {
                if !data.is_empty() {
                    error(cx.out, option, RepType::ERR_INVALID, "NBD_OPT_STARTTLS takes no data");
                } else if cx.opts.tls_mode == TlsMode::Off {
                    error(cx.out, option, RepType::ERR_UNSUP, "TLS is not enabled on this server");
                } else if cx.opts.tls {
                    error(cx.out, option, RepType::ERR_INVALID, "TLS is already running");
                } else {
                    reply(cx.out, option, RepType::ACK, &[]);
                    return Ok(State::StartTls(self));
                }
                Ok(State::Option(self))
            }
            OptCode::INFO | OptCode::GO => info_or_go(option, data, cx, self),
            OptCode::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    error(cx.out, option, RepType::ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data");
                } else if cx.opts.extended {
                    error(
                        cx.out,
                        option,
                        RepType::ERR_EXT_HEADER_REQD,
                        "extended headers are already negotiated",
                    );
                } else {
                    cx.opts.structured = true;
                    reply(cx.out, option, RepType::ACK, &[]);
                }
                Ok(State::Option(self))
            }
            OptCode::EXTENDED_HEADERS => {
                if !data.is_empty() {
                    error(cx.out, option, RepType::ERR_INVALID, "NBD_OPT_EXTENDED_HEADERS takes no data");
                } else {
                    cx.opts.extended = true;
                    reply(cx.out, option, RepType::ACK, &[]);
                }
                Ok(State::Option(self))
            }
            OptCode::LIST_META_CONTEXT | OptCode::SET_META_CONTEXT => {
                meta_context(option, data, cx);
                Ok(State::Option(self))
            }
            _ => {
                let msg = format!("option {option} is not supported");
                error(cx.out, option, RepType::ERR_UNSUP, &msg);
                Ok(State::Option(self))
            }
        }
    }
}

fn export_name<C: ExportCatalog>(data: &[u8], cx: &mut Context<'_, C>) -> Result<State, HandshakeError> {
    if cx.opts.extended {
        return Err(HandshakeError::ExportNameWithExtendedHeaders);
    }
    let name = String::from_utf8_lossy(data).into_owned();
    let Some(export) = cx.catalog.lookup(&name) else {
        return Err(HandshakeError::UnknownExport(name));
    };
    let negotiated = negotiated(export, cx.opts);
    cx.out.put_u64(negotiated.export.size);
    cx.out.put_u16(negotiated.flags);
    if !cx.opts.no_zeroes {
        cx.out.extend_from_slice(&[0u8; 124]);
    }
    Ok(State::Done(Outcome::Transmission(negotiated)))
}

fn negotiated(export: ExportDescriptor, opts: &Options) -> Negotiated {
    let base_allocation = match &opts.meta {
        Some((name, true)) if *name == export.name && export.caps.base_allocation => Some(BASE_ALLOCATION_ID),
        _ => None,
    };
    let structured = opts.structured || opts.extended;
    let flags = export.transmission_flags(structured, opts.extended, base_allocation.is_some());
    Negotiated { export, flags, structured, extended: opts.extended, base_allocation }
}

/// Data of `NBD_OPT_INFO` / `NBD_OPT_GO`: export name and info requests.
pub fn parse_info_request(data: &[u8]) -> Result<(&str, Vec<InfoType>), DecodeError> {
    let mut r = Reader::new(data);
    let name = r.string32(MAX_STRING, "export name")?;
    let n = r.u16("number of info requests")?;
    let mut infos = Vec::with_capacity(n as usize);
    for _ in 0..n {
        infos.push(InfoType(r.u16("info request")?));
    }
    r.finish()?;
    Ok((name, infos))
}

fn info_or_go<C: ExportCatalog>(
    option: OptCode,
    data: &[u8],
    cx: &mut Context<'_, C>,
    step: ExpectOption,
) -> Result<State, HandshakeError> {
    let (name, infos) = match parse_info_request(data) {
        Ok(v) => v,
        Err(e) => {
            error(cx.out, option, RepType::ERR_INVALID, &format!("malformed {option} request: {e}"));
            return Ok(State::Option(step));
        }
    };
    let Some(export) = cx.catalog.lookup(name) else {
        error(cx.out, option, RepType::ERR_UNKNOWN, &format!("export {name:?} does not exist"));
        return Ok(State::Option(step));
    };
    let negotiated = negotiated(export, cx.opts);
    let e = &negotiated.export;

    let mut d = Vec::with_capacity(14);
    d.put_u16(InfoType::EXPORT.0);
    d.put_u64(e.size);
    d.put_u16(negotiated.flags);
    reply(cx.out, option, RepType::INFO, &d);

    if infos.contains(&InfoType::NAME) {
        let mut d = Vec::with_capacity(2 + e.name.len());
        d.put_u16(InfoType::NAME.0);
        d.extend_from_slice(e.name.as_bytes());
        reply(cx.out, option, RepType::INFO, &d);
    }
    if infos.contains(&InfoType::DESCRIPTION) && !e.description.is_empty() {
        let mut d = Vec::with_capacity(2 + e.description.len());
        d.put_u16(InfoType::DESCRIPTION.0);
        d.extend_from_slice(e.description.as_bytes());
        reply(cx.out, option, RepType::INFO, &d);
    }
    // Sent unrequested too: the spec allows it, and clients ignore what they
    // did not ask for.
    let mut d = Vec::with_capacity(14);
    d.put_u16(InfoType::BLOCK_SIZE.0);
    d.put_u32(e.block_sizes.minimum);
    d.put_u32(e.block_sizes.preferred);
    d.put_u32(e.block_sizes.maximum);
    reply(cx.out, option, RepType::INFO, &d);

    reply(cx.out, option, RepType::ACK, &[]);
    if option == OptCode::GO {
        Ok(State::Done(Outcome::Transmission(negotiated)))
    } else {
        Ok(State::Option(step))
    }
}

/// Data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
pub fn parse_meta_request(data: &[u8]) -> Result<(&str, Vec<&str>), DecodeError> {
    let mut r = Reader::new(data);
    let name = r.string32(MAX_STRING, "export name")?;
    let n = r.u32("number of queries")?;
    if n > MAX_META_QUERIES {
        return Err(DecodeError::Invalid("number of queries (too many)"));
    }
    let mut queries = Vec::with_capacity(n as usize);
    for _ in 0..n {
        queries.push(r.string32(MAX_STRING, "query")?);
    }
    r.finish()?;
    Ok((name, queries))
}

fn meta_context<C: ExportCatalog>(option: OptCode, data: &[u8], cx: &mut Context<'_, C>) {
    let set = option == OptCode::SET_META_CONTEXT;
    if set {
        // A SET replaces the selection even when it fails.
        cx.opts.meta = None;
    }
    if !(cx.opts.structured || cx.opts.extended) {
        error(cx.out, option, RepType::ERR_INVALID, "negotiate structured replies first");
        return;
    }
    let (name, queries) = match parse_meta_request(data) {
        Ok(v) => v,
        Err(DecodeError::Invalid("number of queries (too many)")) => {
            error(cx.out, option, RepType::ERR_TOO_BIG, "too many meta context queries");
            return;
        }
        Err(e) => {
            error(cx.out, option, RepType::ERR_INVALID, &format!("malformed {option} request: {e}"));
            return;
        }
    };
    let Some(export) = cx.catalog.lookup(name) else {
        error(cx.out, option, RepType::ERR_UNKNOWN, &format!("export {name:?} does not exist"));
        return;
    };
    let available = export.caps.base_allocation;
    // LIST with no queries lists everything; `base:` is the namespace
    // wildcard for LIST only; SET selects exact names.
    let matched = available
        && if set {
            queries.contains(&BASE_ALLOCATION)
        } else {
            queries.is_empty() || queries.iter().any(|q| *q == BASE_ALLOCATION || *q == "base:")
        };
    if matched {
        let id = if set { BASE_ALLOCATION_ID } else { 0 };
        let mut d = Vec::with_capacity(4 + BASE_ALLOCATION.len());
        d.put_u32(id);
        d.extend_from_slice(BASE_ALLOCATION.as_bytes());
        reply(cx.out, option, RepType::META_CONTEXT, &d);
    }
    if set {
        cx.opts.meta = Some((name.to_owned(), matched));
    }
    reply(cx.out, option, RepType::ACK, &[]);
}

/// Appends one option reply.
fn reply(out: &mut Vec<u8>, option: OptCode, typ: RepType, data: &[u8]) {
    out.put_u64(OPTION_REPLY_MAGIC);
    out.put_u32(option.0);
    out.put_u32(typ.0);
    out.put_u32(data.len() as u32);
    out.extend_from_slice(data);
}

/// Appends an error reply carrying a human-readable message.
fn error(out: &mut Vec<u8>, option: OptCode, typ: RepType, msg: &str) {
    debug_assert!(typ.is_error());
    reply(out, option, typ, msg.as_bytes());
}

#[cfg(test)]
#[path = "handshake_tests.rs"]
pub(crate) mod tests;
