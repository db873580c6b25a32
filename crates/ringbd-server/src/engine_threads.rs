//! The portable engine: one blocking thread per connection around the shared
//! [`Connection`] state machine. Selected with `--engine threads`, and the
//! fallback where io_uring is unavailable (containers often block it).
//!
//! Each `read` may carry many pipelined requests; all of them are answered
//! before the replies leave in one vectored write.
//!
//! kTLS: once everything read was taken and every reply written, the
//! connection is idle and its TLS session can move to the kernel (bytes not
//! read yet are still in the socket, where the kernel picks them up); from
//! then on the same reads and writes carry plaintext.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::conn::Connection;
use crate::exports::Exports;
use crate::listener::Stream;

/// Receive-buffer size: room for many pipelined requests per `read`. A
/// connection starts with `IN_BUF_START` (hundreds of request headers) and
/// grows to `IN_BUF` the first time a read fills its buffer (bulk writes), so
/// idle and abandoned connections cost 16 KiB, not 256 KiB (a thousand
/// abandoned connections measured 279 MiB of RSS with 256 KiB each).
const IN_BUF_START: usize = 16 * 1024;
const IN_BUF: usize = 256 * 1024;

/// Serves one connection to completion. Errors are the connection's own
/// (I/O on the socket); they end this connection and nothing else.
pub fn serve(stream: Stream, exports: Arc<Exports>) -> io::Result<()> {
    serve_limited(stream, exports, Timeouts::default())
}

/// The deadlines of one connection (`--handshake-timeout`,
/// `--reply-timeout`); `None`: none.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timeouts {
    pub handshake: Option<Duration>,
    pub reply: Option<Duration>,
}

/// [`serve`] with deadlines: a client that has not finished option
/// haggling (TLS handshake included) within `handshake` of the call is
/// dropped (reads and writes time out at the deadline); in the
/// transmission phase a write of replies that moves no byte for `reply`
/// ends the connection (the socket's send timeout).
pub fn serve_limited(stream: Stream, exports: Arc<Exports>, timeouts: Timeouts) -> io::Result<()> {
    let handshake_timeout = timeouts.handshake;
    let deadline = handshake_timeout.map(|t| Instant::now() + t);
    let mut timed = false;
    let mut reply_timed = false;
    let mut rd = stream.try_clone()?;
    let mut wr = stream;
    let mut conn = Connection::new(exports, wr.peer());
    if matches!(wr, Stream::Tcp(_)) {
        conn.allow_ktls();
    }
    let mut buf = vec![0u8; IN_BUF_START];
    let (mut start, mut end) = (0usize, 0usize);
    let result = loop {
        if start < end {
            start += conn.receive(&buf[start..end]);
            if start == end {
                (start, end) = (0, 0);
            }
        }
        // Everything received so far is answered (or the queue is full):
        // send the batch.
        if !conn.out().is_empty() {
            if let Err(e) = send(&mut wr, &conn) {
                if timed && is_timeout(&e) {
                    break Err(handshake_expired(&wr, handshake_timeout));
                }
                if reply_timed && is_timeout(&e) {
                    break Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "none of its {} bytes of replies could be sent for {:?} (--reply-timeout); closing",
                            conn.out().len(),
                            timeouts.reply.unwrap_or_default()
                        ),
                    ));
                }
                break if is_disconnect(&e) { Ok(()) } else { Err(e) };
            }
            conn.sent();
            if !conn.out().is_empty() {
                // Sending made room for the next pieces of a large read.
                continue;
            }
        }
        if conn.is_closed() {
            break Ok(());
        }
        if start < end {
            continue;
        }
        if let Some(deadline) = deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if conn.in_handshake() && left.is_zero() {
                break Err(handshake_expired(&wr, handshake_timeout));
            }
            if conn.in_handshake() {
                // The write side is the same socket (a dup): one setting.
                rd.set_timeouts(Some(left))?;
                timed = true;
            } else if timed {
                rd.set_timeouts(None)?;
                timed = false;
            }
        }
        if !conn.in_handshake() && !reply_timed && timeouts.reply.is_some() {
            // (The write side is the same socket.)
            rd.set_write_timeout(timeouts.reply)?;
            reply_timed = true;
        }
        // Everything read was taken and everything queued was written.
        if conn.ktls_ready() {
            conn.enable_ktls(wr.as_fd());
            if conn.is_closed() {
                break Ok(());
            }
        }
        match rd.read(&mut buf) {
            Ok(0) => {
                conn.peer_closed();
                break Ok(());
            }
            Ok(n) => {
                end = n;
                if n == buf.len() && buf.len() < IN_BUF {
                    buf.resize(IN_BUF, 0);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if timed && is_timeout(&e) => break Err(handshake_expired(&wr, handshake_timeout)),
            Err(e) if is_disconnect(&e) => {
                conn.peer_closed();
                break Ok(());
            }
            // A record that is not application data (close_notify...):
            // the connection closes; after close_notify what is queued
            // still goes out.
            Err(e) if conn.is_ktls() => {
                if !conn.ktls_recv_error(rd.as_fd(), &e) {
                    break Ok(());
                }
            }
            Err(e) => break Err(e),
        }
    };
    conn.ktls_close_notify(wr.as_fd());
    wr.shutdown(Shutdown::Both).ok();
    result
}

fn send(w: &mut Stream, conn: &Connection) -> io::Result<()> {
    let out = conn.out();
    let total = out.len();
    let mut sent = 0;
    let mut iov = Vec::with_capacity(8);
    while sent < total {
        iov.clear();
        out.iovecs(sent, &mut iov);
        match w.write_vectored(&iov) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "socket accepted no bytes")),
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

fn handshake_expired(s: &Stream, timeout: Option<Duration>) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!(
            "handshake not finished within {:?} (--handshake-timeout); closing {}",
            timeout.unwrap_or_default(),
            s.peer()
        ),
    )
}

fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted | io::ErrorKind::BrokenPipe
    )
}
