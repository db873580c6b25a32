//! ringbd's syscall layer. Every `unsafe` block of the project lives in this
//! crate, each with the reasoning that makes it sound; callers get safe
//! functions that return `io::Result` and never drop a syscall's result.
//!
//! - [`aio`]: completions from other libraries' threads, delivered to a ring
//!   worker through an eventfd (librbd's callbacks).
//! - [`buf`]: page-aligned I/O buffers and registered-buffer arenas.
//! - [`client_ring`]: the NBD client's ring (vectored sends, receives).
//! - [`eventfd`]: a non-blocking eventfd, to wake a thread or a ring.
//! - [`fs`]: file and block-device calls (fallocate, SEEK_DATA/SEEK_HOLE,
//!   BLKGETSIZE64, fadvise).
//! - [`ktls`]: kernel TLS: handing a TLS session's keys to the socket,
//!   and alert records under it.
//! - [`mem`]: heap thresholds that keep per-request buffers from being
//!   returned to the kernel and faulted back in.
//! - [`net`]: socket activation (LISTEN_FDS) and readiness polling.
//! - `rbd` (feature `rbd`): Ceph RBD images through librbd's asynchronous C API.
//! - [`signal`]: SIGINT/SIGTERM delivered as a readable fd.
//! - [`ublk`]: the ublk driver's control and queue commands.
//! - [`user`]: user and group lookups, dropping privileges, the umask.

pub mod aio;
pub mod buf;
pub mod client_ring;
pub mod eventfd;
pub mod fs;
pub mod ktls;
pub mod mem;
pub mod net;
#[cfg(feature = "rbd")]
pub mod rbd;
pub mod signal;
pub mod ublk;
pub mod uring;
pub mod user;

use std::io;

/// Turns a `-1` return into the thread's `errno`.
fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Like [`cvt`] for calls returning `off_t`/`ssize_t`.
fn cvt64(ret: i64) -> io::Result<i64> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}
