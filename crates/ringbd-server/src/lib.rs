//! The ringbd NBD server.
//!
//! - [`access`]: `--max-connections`, the handshake deadline, socket mode, `--user`/`--group`.
//! - [`exports`]: export names bound to backends; the handshake's catalog.
//! - [`listener`]: TCP/Unix listeners, socket activation, URIs.
//! - [`conn`]: one connection as a state machine over bytes, shared by the engines.
//! - [`out`]: the reply queue, sent as one vectored write.
//! - [`engine_uring`]: the io_uring engine (a ring per worker thread).
//! - [`engine_threads`]: the portable blocking engine (a thread per connection).
//! - [`tls`]: STARTTLS credentials and the per-connection TLS layer (rustls
//!   with certificates, OpenSSL with pre-shared keys); [`tls_authz`]: the
//!   `--tls-authz` allow list of client certificate subjects.
//! - [`ktls`]: kernel TLS: the probe, the counters, rustls keys as crypto_info.
//! - [`server`]: start-up, the accept loop, captive `--run`, clean shutdown;
//!   [`reload`]: SIGHUP, the exports opened again.

pub mod access;
pub mod budget;
pub mod conn;
pub mod engine_threads;
pub mod engine_uring;
pub mod exports;
pub mod ktls;
pub mod listener;
pub mod log;
pub mod out;
pub mod reload;
pub mod server;
pub mod tls;
pub mod tls_authz;

pub use exports::ExportConfig;
pub use reload::Reload;
pub use server::{run, Config, ServeError, DEFAULT_LISTEN};
