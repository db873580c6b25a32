//! Socket activation and readiness polling.

use std::io;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::time::Duration;

use crate::cvt;

/// A listening socket handed over by a service manager.
#[derive(Debug)]
pub enum ActivatedListener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// First fd of the systemd socket-activation protocol.
const SD_LISTEN_FDS_START: RawFd = 3;

/// The variables of the socket-activation protocol. This process does not
/// remove them from its own environment (changing the environment is not
/// thread-safe); whoever starts a child removes them from the child's
/// (`Command::env_remove`), and the sockets themselves are close-on-exec.
pub const ACTIVATION_VARS: [&str; 3] = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"];

/// Takes the listening sockets passed with `LISTEN_PID`/`LISTEN_FDS`, if
/// they are meant for this process. Returns `Ok(None)` without activation.
/// Call it once: the sockets are owned by what it returns.
pub fn take_activated_listeners() -> io::Result<Option<Vec<ActivatedListener>>> {
    activated_listeners(std::env::var("LISTEN_PID").ok(), std::env::var("LISTEN_FDS").ok())
}

fn activated_listeners(
    pid: Option<String>,
    fds: Option<String>,
) -> io::Result<Option<Vec<ActivatedListener>>> {
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(None);
    };
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(None);
    }
    let n: RawFd = fds.trim().parse().map_err(|_| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("LISTEN_FDS={fds:?} is not a number"))
    })?;
    if !(1..=64).contains(&n) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("LISTEN_FDS={n} is out of range")));
    }
    let mut out = Vec::with_capacity(n as usize);
    for fd in SD_LISTEN_FDS_START..SD_LISTEN_FDS_START + n {
        let family = socket_family(fd).map_err(|e| {
            io::Error::new(e.kind(), format!("LISTEN_FDS: fd {fd} is not a usable socket: {e}"))
        })?;
        // SAFETY: F_SETFD on an fd we were told we own; no memory effects.
        cvt(unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) })?;
        // SAFETY: the socket-activation protocol passes ownership of fds
        // 3..3+LISTEN_FDS to the process named by LISTEN_PID (checked above);
        // the variables were removed, so each fd is claimed exactly once, and
        // socket_family() proved it is an open socket.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        out.push(match family {
            libc::AF_UNIX => ActivatedListener::Unix(UnixListener::from(owned)),
            libc::AF_INET | libc::AF_INET6 => ActivatedListener::Tcp(TcpListener::from(owned)),
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("LISTEN_FDS: fd {fd} has unsupported address family {other}"),
                ))
            }
        });
    }
    Ok(Some(out))
}

fn socket_family(fd: RawFd) -> io::Result<libc::c_int> {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: addr and len point at live locals; len tells the kernel how
    // much it may write.
    cvt(unsafe { libc::getsockname(fd, &mut addr as *mut _ as *mut libc::sockaddr, &mut len) })?;
    Ok(libc::c_int::from(addr.ss_family))
}

/// Waits until any of `fds` is readable (or has hung up). Returns one flag
/// per fd; all false on timeout or when a signal interrupted the wait.
pub fn poll_readable(fds: &[BorrowedFd<'_>], timeout: Option<Duration>) -> io::Result<Vec<bool>> {
    let mut pfds: Vec<libc::pollfd> =
        fds.iter().map(|fd| libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 }).collect();
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as libc::c_int);
    // SAFETY: pfds is a live, correctly sized array of pollfd for the call.
    let ret = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
    if ret == -1 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(vec![false; fds.len()]);
        }
        return Err(e);
    }
    Ok(pfds.iter().map(|p| p.revents != 0).collect())
}

/// Shuts both directions of a socket down: operations pending on it
/// complete (a receive with end of file), and the peer sees the close.
pub fn shutdown_socket(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: shutdown on a descriptor the caller keeps open for the call;
    // no memory is involved.
    cvt(unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) }).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;

    #[test]
    fn poll_reports_the_readable_fd() {
        let (r1, mut w1) = std::io::pipe().unwrap();
        let (r2, _w2) = std::io::pipe().unwrap();
        w1.write_all(b"x").unwrap();
        let ready = poll_readable(&[r1.as_fd(), r2.as_fd()], Some(Duration::from_millis(100))).unwrap();
        assert_eq!(ready, vec![true, false]);
        let idle = poll_readable(&[r2.as_fd()], Some(Duration::from_millis(1))).unwrap();
        assert_eq!(idle, vec![false]);
    }

    #[test]
    fn activation_for_another_pid_is_ignored() {
        assert!(activated_listeners(Some("1".into()), Some("1".into())).unwrap().is_none());
        assert!(activated_listeners(None, Some("1".into())).unwrap().is_none());
        let me = std::process::id().to_string();
        let e = activated_listeners(Some(me.clone()), Some("x".into())).err().map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("is not a number")));
        let e = activated_listeners(Some(me), Some("0".into())).err().map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("out of range")));
    }
}
