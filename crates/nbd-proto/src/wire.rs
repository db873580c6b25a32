//! Wire codes and magic numbers of the NBD protocol (doc/proto.md in
//! NetworkBlockDevice/nbd, plus the extended-headers extension).
//!
//! Codes are newtypes that keep unknown values: an option or command the
//! server does not know is still representable, printed in hex, and answered
//! with the proper error rather than failing to parse.

use std::fmt;

/// `NBDMAGIC`: first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle magic, also prefixes every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every fixed-newstyle option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Compact (28-byte) request header.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Extended (32-byte) request header.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Simple (16-byte) reply header.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Structured (20-byte) reply chunk header.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Extended (32-byte) reply chunk header.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Largest request payload the server accepts, and advertises as the
/// maximum in `NBD_INFO_BLOCK_SIZE` (the spec's portable 32 MiB).
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Longest string (export name, description, context name) the spec allows.
pub const MAX_STRING: usize = 4096;

macro_rules! wire_code {
    ($(#[$meta:meta])* $name:ident($ty:ty) { $($(#[$vmeta:meta])* $var:ident = $val:expr,)* }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash)]
        pub struct $name(pub $ty);

        impl $name {
            $($(#[$vmeta])* pub const $var: $name = $name($val);)*

            /// The spec's name for this code, if it is one we know.
            pub fn name(self) -> Option<&'static str> {
                match self.0 {
                    $($val => Some(stringify!($var)),)*
                    _ => None,
                }
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self.name() {
                    Some(n) => f.write_str(n),
                    None => write!(f, "{}(0x{:x})", stringify!($name), self.0),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(self, f)
            }
        }
    };
}

wire_code! {
    /// Option sent by the client during option haggling (`NBD_OPT_*`).
    OptCode(u32) {
        EXPORT_NAME = 1,
        ABORT = 2,
        LIST = 3,
        PEEK_EXPORT = 4,
        STARTTLS = 5,
        INFO = 6,
        GO = 7,
        STRUCTURED_REPLY = 8,
        LIST_META_CONTEXT = 9,
        SET_META_CONTEXT = 10,
        EXTENDED_HEADERS = 11,
    }
}

wire_code! {
    /// Option reply type (`NBD_REP_*`); errors have bit 31 set.
    RepType(u32) {
        ACK = 1,
        SERVER = 2,
        INFO = 3,
        META_CONTEXT = 4,
        ERR_UNSUP = 0x8000_0001,
        ERR_POLICY = 0x8000_0002,
        ERR_INVALID = 0x8000_0003,
        ERR_PLATFORM = 0x8000_0004,
        ERR_TLS_REQD = 0x8000_0005,
        ERR_UNKNOWN = 0x8000_0006,
        ERR_SHUTDOWN = 0x8000_0007,
        ERR_BLOCK_SIZE_REQD = 0x8000_0008,
        ERR_TOO_BIG = 0x8000_0009,
        ERR_EXT_HEADER_REQD = 0x8000_000a,
    }
}

impl RepType {
    /// Whether this reply type is an error (bit 31).
    pub fn is_error(self) -> bool {
        self.0 & 0x8000_0000 != 0
    }
}

wire_code! {
    /// Information type in `NBD_OPT_INFO`/`NBD_OPT_GO` (`NBD_INFO_*`).
    InfoType(u16) {
        EXPORT = 0,
        NAME = 1,
        DESCRIPTION = 2,
        BLOCK_SIZE = 3,
    }
}

wire_code! {
    /// Transmission-phase command (`NBD_CMD_*`).
    CmdType(u16) {
        READ = 0,
        WRITE = 1,
        DISC = 2,
        FLUSH = 3,
        TRIM = 4,
        CACHE = 5,
        WRITE_ZEROES = 6,
        BLOCK_STATUS = 7,
        RESIZE = 8,
    }
}

wire_code! {
    /// Structured/extended reply chunk type (`NBD_REPLY_TYPE_*`).
    ChunkType(u16) {
        NONE = 0,
        OFFSET_DATA = 1,
        OFFSET_HOLE = 2,
        BLOCK_STATUS = 5,
        BLOCK_STATUS_EXT = 6,
        ERROR = 0x8001,
        ERROR_OFFSET = 0x8002,
    }
}

wire_code! {
    /// Error values of the transmission phase (`NBD_E*`).
    Errno(u32) {
        EPERM = 1,
        EIO = 5,
        ENOMEM = 12,
        EINVAL = 22,
        ENOSPC = 28,
        EOVERFLOW = 75,
        ENOTSUP = 95,
        ESHUTDOWN = 108,
    }
}

/// Handshake flags, sent by the server (16 bits).
pub mod handshake_flags {
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags, sent once after the server's greeting (32 bits).
pub mod client_flags {
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    pub const NO_ZEROES: u32 = 1 << 1;
    /// Every flag this server understands; others make it close the session.
    pub const KNOWN: u32 = FIXED_NEWSTYLE | NO_ZEROES;
}

/// Transmission flags, per export (16 bits).
pub mod tx_flags {
    pub const HAS_FLAGS: u16 = 1 << 0;
    pub const READ_ONLY: u16 = 1 << 1;
    pub const SEND_FLUSH: u16 = 1 << 2;
    pub const SEND_FUA: u16 = 1 << 3;
    pub const ROTATIONAL: u16 = 1 << 4;
    pub const SEND_TRIM: u16 = 1 << 5;
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const SEND_DF: u16 = 1 << 7;
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    pub const SEND_RESIZE: u16 = 1 << 9;
    pub const SEND_CACHE: u16 = 1 << 10;
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
    pub const BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;
}

/// Command flags, per request (16 bits).
pub mod cmd_flags {
    pub const FUA: u16 = 1 << 0;
    pub const NO_HOLE: u16 = 1 << 1;
    pub const DF: u16 = 1 << 2;
    pub const REQ_ONE: u16 = 1 << 3;
    pub const FAST_ZERO: u16 = 1 << 4;
    pub const PAYLOAD_LEN: u16 = 1 << 5;
}

/// Reply chunk flags.
pub mod reply_flags {
    pub const DONE: u16 = 1 << 0;
}

/// `base:allocation` status flags.
pub mod state_flags {
    pub const HOLE: u32 = 1 << 0;
    pub const ZERO: u32 = 1 << 1;
}

/// The one metadata context ringbd serves.
pub const BASE_ALLOCATION: &str = "base:allocation";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_codes_print_their_names_and_unknown_ones_hex() {
        assert_eq!(format!("{}", OptCode::GO), "GO");
        assert_eq!(format!("{}", OptCode(0x1234)), "OptCode(0x1234)");
        assert_eq!(format!("{:?}", CmdType(99)), "CmdType(0x63)");
        assert!(RepType::ERR_UNSUP.is_error());
        assert!(!RepType::ACK.is_error());
    }

    #[test]
    fn magics_spell_their_ascii() {
        assert_eq!(&NBD_MAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
    }
}
