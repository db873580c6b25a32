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

mod handshake;
mod transmission;

pub use handshake::{
    ClientConfig, ClientHandshake, ClientHandshakeError, ClientNegotiated, ClientOutcome, MAX_OPTION_REPLY,
    OLDSTYLE_MAGIC,
};
pub use transmission::{
    ClientRequest, ClientSession, DataHead, EncodeError, Reply, ReplyChunk, ReplyError, MAX_CHUNK_PAYLOAD,
};

#[cfg(test)]
mod tests;
