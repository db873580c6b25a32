//! The ringbd NBD server.
//!
//! - [`access`]: `--max-connections`, the handshake deadline, socket mode, `--user`/`--group`.
//! - [`exports`]: export names bound to backends; the handshake's catalog.
//! - [`listener`]: TCP/Unix listeners, socket activation, URIs.
//! - [`conn`]: one connection as a state machine over bytes, shared by the engines.
//! - [`out`]: the reply queue, sent as one vectored write.
//! - [`engine_uring`]: the io_uring engine (a ring per worker thread).
//! - [`engine_threads`]: the portable blocking engine (a thread per connection).
//! - [`tls`]: all of the server's TLS but the connection's two TLS states
//!   (`conn/tls_io.rs`, `conn/ktls_io.rs`): STARTTLS credentials and the
//!   per-connection TLS layer (rustls with certificates, OpenSSL with
//!   pre-shared keys), the `--tls-authz` allow list ([`tls::authz`]), and
//!   kernel TLS ([`tls::ktls`]: the probe, the counters, rustls keys as
//!   crypto_info; [`tls::ktls_sys`]: the socket options and record calls).
//! - [`metrics`]: per-export counters and latency histograms, and the
//!   `--metrics` listener that serves them to Prometheus.
//! - [`server`]: start-up, the accept loop, captive `--run`, clean shutdown;
//!   [`reload`]: SIGHUP, the exports opened again.
//! - [`user`]: user and group lookups, dropping privileges, the umask.
//!
//! `unsafe` only in modules marked `#[allow(unsafe_code)]`, each next to its
//! one user: [`user`], kTLS's socket calls ([`tls::ktls_sys`]), and the io_uring
//! engine's send module (the reply queue as memory zero-copy sends read).
#![deny(unsafe_code)]

pub mod access;
pub mod budget;
pub mod conn;
pub mod engine_threads;
pub mod engine_uring;
pub mod exports;
pub mod listener;
pub mod metrics;
pub mod out;
pub mod reload;
pub mod server;
pub mod tls;
// getpwnam/getgrnam, setgroups/setgid/setuid and the umask for --user/--group.
#[allow(unsafe_code)]
pub mod user;

pub use exports::ExportConfig;
pub use reload::Reload;
pub use server::{run, Config, ServeError, DEFAULT_LISTEN};
