//! A non-blocking eventfd: one thread signals, another (or a ring's poll)
//! wakes and clears it. Used by ringbd-backend's `aio::CompletionQueue`, the client
//! ring's wake-up ([`crate::client_ring::ClientRing::set_wake`]) and the NBD
//! proxy backend's worker.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

#[derive(Debug)]
pub struct EventFd(OwnedFd);

impl EventFd {
    /// A new eventfd (`EFD_CLOEXEC | EFD_NONBLOCK`), counter 0.
    pub fn new() -> io::Result<EventFd> {
        // SAFETY: eventfd takes no pointers; it returns a new descriptor or -1.
        let fd = crate::cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
        // SAFETY: eventfd returned a new descriptor that nothing else owns.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Another handle to the same eventfd (`dup`).
    pub fn try_clone(&self) -> io::Result<EventFd> {
        self.0.try_clone().map(EventFd)
    }

    /// Adds 1 to the counter, waking a poll. A saturated counter
    /// (`EAGAIN`) is already signalled: not an error.
    pub fn signal(&self) -> io::Result<()> {
        let one = 1u64.to_ne_bytes();
        // SAFETY: `one` is a live 8-byte buffer, the size an eventfd write takes.
        let n = unsafe { libc::write(self.0.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        match n {
            8 => Ok(()),
            -1 => match io::Error::last_os_error() {
                e if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
                e => Err(e),
            },
            _ => Err(io::Error::other("short write to an eventfd")),
        }
    }

    /// Resets the counter to 0. Nothing signalled (`EAGAIN`) is not an
    /// error.
    pub fn clear(&self) -> io::Result<()> {
        let mut b = [0u8; 8];
        // SAFETY: `b` is a live 8-byte buffer, the size an eventfd read takes.
        let n = unsafe { libc::read(self.0.as_raw_fd(), b.as_mut_ptr().cast(), b.len()) };
        match n {
            -1 => match io::Error::last_os_error() {
                e if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
                e => Err(e),
            },
            _ => Ok(()),
        }
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readable(e: &EventFd) -> bool {
        let mut p = libc::pollfd { fd: e.as_fd().as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: `p` is one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        n == 1 && p.revents & libc::POLLIN != 0
    }

    #[test]
    fn signal_wakes_and_clear_resets_through_a_clone() {
        let e = EventFd::new().unwrap();
        assert!(!readable(&e));
        e.clear().unwrap();
        let other = e.try_clone().unwrap();
        other.signal().unwrap();
        other.signal().unwrap();
        assert!(readable(&e));
        e.clear().unwrap();
        assert!(!readable(&e));
    }
}
