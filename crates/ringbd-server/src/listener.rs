//! TCP and Unix listeners, accepted streams, and the URIs clients use.

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use ringbd_io::net::ActivatedListener;

/// A listening socket.
pub enum Listener {
    Tcp(TcpListener),
    /// The path is removed when the server stops, if it bound it.
    Unix(UnixListener, Option<PathBuf>),
}

impl Listener {
    /// Binds `ADDR:PORT` (names resolved; the first address that binds wins).
    pub fn bind_tcp(addr: &str) -> io::Result<Listener> {
        let addrs: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map_err(|e| io::Error::new(e.kind(), format!("listen address {addr:?}: {e}")))?
            .collect();
        let mut last = io::Error::new(io::ErrorKind::InvalidInput, format!("{addr:?} resolves to nothing"));
        for a in addrs {
            match TcpListener::bind(a) {
                Ok(l) => return Ok(Listener::Tcp(l)),
                Err(e) => last = io::Error::new(e.kind(), format!("cannot listen on {a}: {e}")),
            }
        }
        Err(last)
    }

    /// Binds a Unix socket, replacing a stale socket file nobody listens on.
    pub fn bind_unix(path: &Path) -> io::Result<Listener> {
        let ctx =
            |e: io::Error| io::Error::new(e.kind(), format!("cannot listen on {}: {e}", path.display()));
        match UnixListener::bind(path) {
            Ok(l) => Ok(Listener::Unix(l, Some(path.to_owned()))),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                if UnixStream::connect(path).is_ok() {
                    return Err(ctx(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        "another server is listening there",
                    )));
                }
                std::fs::remove_file(path).map_err(ctx)?;
                UnixListener::bind(path).map(|l| Listener::Unix(l, Some(path.to_owned()))).map_err(ctx)
            }
            Err(e) => Err(ctx(e)),
        }
    }

    pub fn from_activated(l: ActivatedListener) -> Listener {
        match l {
            ActivatedListener::Tcp(t) => Listener::Tcp(t),
            ActivatedListener::Unix(u) => Listener::Unix(u, None),
        }
    }

    pub fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.set_nonblocking(true),
            Listener::Unix(l, _) => l.set_nonblocking(true),
        }
    }

    /// Accepts one connection (`WouldBlock` when none is pending).
    pub fn accept(&self) -> io::Result<Stream> {
        let s = match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(false)?;
                s.set_nodelay(true)?;
                Stream::Tcp(s)
            }
            Listener::Unix(l, _) => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(false)?;
                Stream::Unix(s)
            }
        };
        Ok(s)
    }

    /// The socket path, for Unix listeners.
    pub fn unix_path(&self) -> Option<PathBuf> {
        match self {
            Listener::Unix(l, bound) => bound
                .clone()
                .or_else(|| l.local_addr().ok().and_then(|a| a.as_pathname().map(Path::to_owned))),
            Listener::Tcp(_) => None,
        }
    }

    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix(..) => None,
        }
    }

    /// The URI of the default export on this listener.
    pub fn uri(&self) -> String {
        self.uri_with(false)
    }

    /// The URI of the default export, `nbds` when TLS is required (as
    /// nbdkit's `$uri` under `--tls=require`).
    pub fn uri_with(&self, tls: bool) -> String {
        let s = if tls { "s" } else { "" };
        match (self.tcp_addr(), self.unix_path()) {
            (Some(a), _) => format!("nbd{s}://{a}"),
            (None, Some(p)) => format!("nbd{s}+unix:///?socket={}", p.display()),
            (None, None) => format!("nbd{s}+unix:///?socket=(unnamed)"),
        }
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Tcp(l) => l.as_fd(),
            Listener::Unix(l, _) => l.as_fd(),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, Some(path)) = self {
            // Best effort: a missing file is what we want anyway.
            let _ = std::fs::remove_file(path);
        }
    }
}

/// An accepted connection.
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Unix(s) => s.shutdown(how),
        }
    }

    /// Read and write timeouts (`SO_RCVTIMEO`/`SO_SNDTIMEO`, shared by
    /// every handle on this socket); `None` blocks for ever.
    pub fn set_timeouts(&self, t: Option<std::time::Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t).and_then(|()| s.set_write_timeout(t)),
            Stream::Unix(s) => s.set_read_timeout(t).and_then(|()| s.set_write_timeout(t)),
        }
    }

    /// Sets the socket's send timeout (`SO_SNDTIMEO`): a write that moves
    /// no byte for this long fails with `WouldBlock`.
    pub fn set_write_timeout(&self, t: Option<std::time::Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Unix(s) => s.set_write_timeout(t),
        }
    }

    /// A short description of the peer for logs.
    pub fn peer(&self) -> String {
        match self {
            Stream::Tcp(s) => s.peer_addr().map_or_else(|_| "tcp peer".into(), |a| a.to_string()),
            Stream::Unix(_) => "unix peer".into(),
        }
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
