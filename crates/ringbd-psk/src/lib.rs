//! TLS with pre-shared keys (TLS-PSK), as nbdkit `--tls-psk`, qemu
//! `tls-creds-psk` and libnbd `tls-psk-file` speak it.
//!
//! rustls has no external PSKs, so these sessions use OpenSSL (the `openssl`
//! crate over the system's libssl); X.509 stays on rustls. Like rustls here,
//! a session is driven from memory buffers and never touches a socket.
//!
//! - [`keys`]: the psktool key file (`username:hexkey` lines).
//! - [`session`]: server and client sessions over memory buffers, with
//!   plaintext sealed in full records.
#![forbid(unsafe_code)]

pub mod keys;
pub mod session;

pub use keys::{Key, KeyFileError, PskKeys};
pub use session::{PskClientConfig, PskError, PskServerConfig, PskSession};
