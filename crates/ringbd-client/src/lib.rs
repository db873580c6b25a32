//! ringbd's NBD client: URIs ([`uri`]), connecting and negotiating
//! ([`mod@connect`]), and pipelined requests over one or more connections on an
//! io_uring ring ([`engine`]), with TLS for `nbds://` ([`tls`]). The protocol is `nbd_proto::client`; every
//! system call is in `ringbd_io::client_ring`.
#![forbid(unsafe_code)]

pub mod connect;
pub mod engine;
pub mod error;
pub mod tls;
pub mod uri;

pub use connect::{connect, list_exports, Connected};
pub use engine::{Cmd, Completion, Engine};
pub use error::{Error, Result};
pub use nbd_proto::client::ClientConfig;
pub use tls::{ClientTls, TlsSetup};
pub use uri::{Address, NbdUri, TlsParams};
