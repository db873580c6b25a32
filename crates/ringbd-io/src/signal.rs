//! Termination signals as a readable file descriptor (`signalfd(2)`).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use crate::cvt;

/// SIGINT and SIGTERM (and SIGHUP with [`TermSignals::with_hangup`]),
/// blocked for normal delivery and read from an fd.
///
/// Create it on the main thread before spawning any other thread: threads
/// inherit the blocked mask, so the signals reach only this fd. Child
/// processes started with `std::process::Command` get an empty mask again.
pub struct TermSignals {
    fd: OwnedFd,
}

/// The signal number [`TermSignals::take`] returns for SIGHUP.
pub const HANGUP: i32 = libc::SIGHUP;

impl TermSignals {
    /// SIGINT and SIGTERM.
    pub fn new() -> io::Result<Self> {
        Self::with(false)
    }

    /// SIGINT, SIGTERM and SIGHUP (a daemon's "reload your configuration").
    pub fn with_hangup() -> io::Result<Self> {
        Self::with(true)
    }

    fn with(hangup: bool) -> io::Result<Self> {
        // SAFETY: sigset_t is plain old data; sigemptyset initialises it.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: set is a live sigset_t; these calls only write into it.
        unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            if hangup {
                libc::sigaddset(&mut set, libc::SIGHUP);
            }
        }
        // SAFETY: set is initialised; the old mask is not wanted (null).
        let ret = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if ret != 0 {
            return Err(io::Error::from_raw_os_error(ret));
        }
        // SAFETY: fd -1 asks for a new signalfd; set is initialised.
        let fd = cvt(unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) })?;
        // SAFETY: signalfd returned a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(TermSignals { fd })
    }

    /// The signal number waiting, if any (non-blocking).
    pub fn take(&self) -> io::Result<Option<i32>> {
        // SAFETY: signalfd_siginfo is plain old data; all-zero is valid.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: info is a live buffer of `size` bytes.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), &mut info as *mut _ as *mut libc::c_void, size) };
        if n == -1 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted {
                return Ok(None);
            }
            return Err(e);
        }
        if n as usize != size {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short read from signalfd"));
        }
        Ok(Some(info.ssi_signo as i32))
    }
}

impl AsFd for TermSignals {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
