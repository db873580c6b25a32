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
//! - [`mem`]: heap thresholds that keep per-request buffers from being
//!   returned to the kernel and faulted back in.
//! - [`net`]: socket activation (LISTEN_FDS) and readiness polling.
//! - [`signal`]: SIGINT/SIGTERM delivered as a readable fd.
//! - [`user`]: user and group lookups, dropping privileges, the umask.
//!
//! `unsafe` is denied at the crate root; each module that needs it says so
//! with an allow of `unsafe_code` on its `mod` line below, so that grepping
//! the crates for that attribute lists every one.
#![deny(unsafe_code)]

pub mod aio;
#[allow(unsafe_code)]
pub mod buf;
#[allow(unsafe_code)]
pub mod client_ring;
#[allow(unsafe_code)]
pub mod eventfd;
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
#[allow(unsafe_code)]
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
