//! ringbd's io_uring crate: the server's and the client's rings, provided
//! buffer rings, registered and page-aligned buffers, and the few system
//! calls several crates share.
//! Each `unsafe` block carries the reasoning that makes it sound; callers get
//! safe functions that return `io::Result` and never drop a syscall's
//! result. Kernel and C interfaces with one user live next to that user
//! instead (the ublk driver in `ringbd-ublk`, kTLS and privilege dropping in
//! `ringbd-server`, librbd in `ringbd-backend`).
//!
//! - [`uring`]: the server's ring: accept, provided-buffer receives, sends
//!   (zero-copy included), file operations, registered files and buffers.
//! - [`buf`]: page-aligned I/O buffers and registered-buffer arenas.
//! - [`client_ring`]: the NBD client's ring (vectored sends, receives).
//! - [`eventfd`]: a non-blocking eventfd, to wake a thread or a ring.
//! - [`file_ring`]: a backend's own ring for file reads and writes
//!   scattered over one buffer (qcow2 clusters).
//! - [`fs`]: file and block-device calls (fallocate, SEEK_DATA/SEEK_HOLE,
//!   BLKGETSIZE64, fadvise).
//! - [`mem`]: heap thresholds that keep per-request buffers from being
//!   returned to the kernel and faulted back in.
//! - [`net`]: socket activation (LISTEN_FDS) and readiness polling.
//! - [`signal`]: SIGINT/SIGTERM delivered as a readable fd.
//!
//! `unsafe` is denied at the crate root; each module that needs it says so
//! with an allow of `unsafe_code` on its `mod` line below, so that grepping
//! the crates for that attribute lists every one.
#![deny(unsafe_code)]

#[allow(unsafe_code)]
pub mod buf;
#[allow(unsafe_code)]
pub mod client_ring;
#[allow(unsafe_code)]
pub mod eventfd;
#[allow(unsafe_code)]
pub mod file_ring;
#[allow(unsafe_code)]
pub mod fs;
#[allow(unsafe_code)]
pub mod mem;
#[allow(unsafe_code)]
pub mod net;
#[allow(unsafe_code)]
pub mod signal;
#[allow(unsafe_code)]
pub mod uring;

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
