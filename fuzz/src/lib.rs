//! Structured inputs for the fuzz targets: NBD messages that `arbitrary`
//! builds field by field and that encode with the right magic numbers and
//! lengths (mostly), so the fuzzer gets past the framing into the state
//! machines instead of stalling at a 64-bit magic.
#![forbid(unsafe_code)]

use arbitrary::Arbitrary;
use nbd_proto::wire::{EXTENDED_REQUEST_MAGIC, IHAVEOPT, REQUEST_MAGIC};

/// An export name: usually one that exists.
#[derive(Arbitrary, Debug, Clone)]
pub enum Name {
    Default,
    A,
    ReadOnly,
    Other(String),
}

impl Name {
    pub fn as_str(&self) -> &str {
        match self {
            Name::Default => "",
            Name::A => "a",
            Name::ReadOnly => "ro",
            Name::Other(s) => s,
        }
    }
}

/// A meta context query.
#[derive(Arbitrary, Debug, Clone)]
pub enum Query {
    BaseAllocation,
    Base,
    Other(String),
}

/// One client message of the option phase.
#[derive(Arbitrary, Debug, Clone)]
pub enum Opt {
    ExportName(Name),
    Abort,
    List,
    StartTls,
    Info {
        name: Name,
        infos: Vec<u16>,
    },
    Go {
        name: Name,
        infos: Vec<u16>,
    },
    StructuredReply,
    ExtendedHeaders,
    ListMeta {
        name: Name,
        queries: Vec<Query>,
    },
    SetMeta {
        name: Name,
        queries: Vec<Query>,
    },
    /// Any option code with any data (correct length field).
    Unknown {
        code: u32,
        data: Vec<u8>,
    },
    /// A header whose length field disagrees with the data that follows.
    Lying {
        code: u32,
        len: u32,
        data: Vec<u8>,
    },
    /// Bytes with no framing at all.
    Garbage(Vec<u8>),
}

/// Client flags: mostly valid ones.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum ClientFlags {
    Fixed,
    FixedNoZeroes,
    None,
    Raw(u32),
}

#[derive(Arbitrary, Debug, Clone)]
pub struct Handshake {
    pub flags: ClientFlags,
    pub opts: Vec<Opt>,
}

fn put32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn option(out: &mut Vec<u8>, code: u32, data: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    put32(out, code);
    put32(out, data.len() as u32);
    out.extend_from_slice(data);
}

fn string32(out: &mut Vec<u8>, s: &str) {
    put32(out, s.len() as u32);
    out.extend_from_slice(s.as_bytes());
}

impl Handshake {
    /// The client's bytes, after the server's greeting.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let flags = match self.flags {
            ClientFlags::Fixed => 1,
            ClientFlags::FixedNoZeroes => 3,
            ClientFlags::None => 0,
            ClientFlags::Raw(v) => v,
        };
        put32(&mut out, flags);
        for o in &self.opts {
            o.encode(&mut out);
        }
        out
    }
}

impl Opt {
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Opt::ExportName(n) => option(out, 1, n.as_str().as_bytes()),
            Opt::Abort => option(out, 2, &[]),
            Opt::List => option(out, 3, &[]),
            Opt::StartTls => option(out, 5, &[]),
            Opt::Info { name, infos } | Opt::Go { name, infos } => {
                let mut d = Vec::new();
                string32(&mut d, name.as_str());
                d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
                for i in infos {
                    d.extend_from_slice(&i.to_be_bytes());
                }
                option(out, if matches!(self, Opt::Info { .. }) { 6 } else { 7 }, &d);
            }
            Opt::StructuredReply => option(out, 8, &[]),
            Opt::ExtendedHeaders => option(out, 11, &[]),
            Opt::ListMeta { name, queries } | Opt::SetMeta { name, queries } => {
                let mut d = Vec::new();
                string32(&mut d, name.as_str());
                put32(&mut d, queries.len() as u32);
                for q in queries {
                    string32(
                        &mut d,
                        match q {
                            Query::BaseAllocation => "base:allocation",
                            Query::Base => "base:",
                            Query::Other(s) => s,
                        },
                    );
                }
                option(out, if matches!(self, Opt::ListMeta { .. }) { 9 } else { 10 }, &d);
            }
            Opt::Unknown { code, data } => option(out, *code, data),
            Opt::Lying { code, len, data } => {
                out.extend_from_slice(&IHAVEOPT.to_be_bytes());
                put32(out, *code);
                put32(out, *len);
                out.extend_from_slice(data);
            }
            Opt::Garbage(b) => out.extend_from_slice(b),
        }
    }
}

/// One transmission-phase request.
#[derive(Arbitrary, Debug, Clone)]
pub struct Req {
    pub flags: u16,
    pub typ: CmdKind,
    pub cookie: u64,
    pub offset: Offset,
    pub length: u64,
    /// Payload bytes sent after the header (any length: the server must
    /// cope with short, long and missing payloads).
    pub payload: Vec<u8>,
    /// Send this instead of the right magic.
    pub bad_magic: Option<u32>,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum CmdKind {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    Raw(u16),
}

impl CmdKind {
    pub fn code(self) -> u16 {
        match self {
            CmdKind::Read => 0,
            CmdKind::Write => 1,
            CmdKind::Disc => 2,
            CmdKind::Flush => 3,
            CmdKind::Trim => 4,
            CmdKind::Cache => 5,
            CmdKind::WriteZeroes => 6,
            CmdKind::BlockStatus => 7,
            CmdKind::Raw(c) => c,
        }
    }
}

/// Offsets: small and aligned ones, near the end, and anything.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Offset {
    Block(u16),
    Byte(u32),
    FromTop(u32),
    Raw(u64),
}

impl Offset {
    pub fn value(self) -> u64 {
        match self {
            Offset::Block(b) => u64::from(b) * 4096,
            Offset::Byte(b) => u64::from(b),
            Offset::FromTop(d) => u64::MAX - u64::from(d),
            Offset::Raw(v) => v,
        }
    }
}

impl Req {
    /// Header (compact or extended) plus payload.
    pub fn encode(&self, extended: bool, out: &mut Vec<u8>) {
        let magic = self.bad_magic.unwrap_or(if extended { EXTENDED_REQUEST_MAGIC } else { REQUEST_MAGIC });
        put32(out, magic);
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&self.typ.code().to_be_bytes());
        out.extend_from_slice(&self.cookie.to_be_bytes());
        out.extend_from_slice(&self.offset.value().to_be_bytes());
        if extended {
            out.extend_from_slice(&self.length.to_be_bytes());
        } else {
            put32(out, self.length as u32);
        }
        out.extend_from_slice(&self.payload);
    }
}
