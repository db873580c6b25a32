//! Sans-IO implementation of the NBD protocol, server and client sides.
//!
//! No sockets, no threads, no clocks: every type here consumes bytes and
//! produces bytes, so the same code is driven by the blocking engine, the
//! io_uring engine, fuzzers and in-memory tests.
//!
//! - [`wire`]: codes, flags and magic numbers.
//! - [`codec`]: bounded big-endian reader and writer helpers.
//! - [`export`]: what the handshake knows about exports.
//! - [`handshake`]: the option-haggling state machine.
//! - [`transmission`]: request decoding, validation and reply encoding.
//! - [`client`]: the client's handshake, request encoder and reply decoder.
#![forbid(unsafe_code)]

pub mod client;
pub mod codec;
pub mod export;
pub mod handshake;
pub mod transmission;
pub mod wire;

pub use client::{
    ClientConfig, ClientHandshake, ClientNegotiated, ClientOutcome, ClientRequest, ClientSession, Reply,
    ReplyChunk, ReplyError,
};
pub use export::{BlockSizes, ExportCaps, ExportCatalog, ExportDescriptor, ExportListing};
pub use handshake::{HandshakeError, Negotiated, Outcome, ServerHandshake, TlsMode};
pub use transmission::{clip_extents, Command, Extent, FramingError, Rejection, Request, Session};
pub use wire::{CmdType, Errno};
