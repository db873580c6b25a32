//! The `--metrics ADDR` listener: one thread that answers `GET /metrics`
//! with the exposition ([`render`](super::render())), one client at a time.
//!
//! Its own few lines of HTTP/1.x rather than a crate: the HTTP servers that
//! do not bring an async runtime (tiny_http) start an accept thread and a
//! pool of at least four more, one per concurrent client, and read header
//! lines without a length bound. Here everything is bounded and nothing it
//! does touches the data plane (the scrape reads counters and takes each
//! export's lock for the time of a sum):
//!
//! - one thread, one client at a time, `Connection: close`;
//! - a request head of at most [`MAX_HEAD`] bytes (else 431), which must
//!   arrive within [`HEAD_TIMEOUT`] (else the client is dropped); no body;
//! - the reply must be taken within [`WRITE_TIMEOUT`].
//!
//! A client that holds the thread delays other scrapes, never a request.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::engine_uring::EngineStats;
use crate::exports::ExportTable;

/// The most bytes of a request head (request line and headers) read.
pub const MAX_HEAD: usize = 8 * 1024;
/// How long a client has to send its whole request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client may take no byte of the reply before it is dropped.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds the metrics address (before privileges are dropped, like the NBD
/// listeners).
pub fn bind(addr: &str) -> Result<TcpListener, String> {
    let addrs: Vec<_> = addr
        .to_socket_addrs()
        .map_err(|e| format!("--metrics {addr:?}: not an address:port ({e})"))?
        .collect();
    TcpListener::bind(&addrs[..]).map_err(|e| format!("--metrics {addr}: cannot listen: {e}"))
}

/// Serves scrapes on `listener` from a thread of its own, for the life of
/// the process, of the exports in `exports` at each scrape (a SIGHUP reload
/// changes them); `engine`: the io_uring engine's counters, if it runs.
pub fn spawn(
    listener: TcpListener,
    exports: Arc<ExportTable>,
    engine: Option<Arc<EngineStats>>,
) -> io::Result<thread::JoinHandle<()>> {
    thread::Builder::new().name("metrics".into()).spawn(move || {
        for stream in listener.incoming() {
            match stream {
                Ok(s) => {
                    let body = || super::render(&exports.load(), engine.as_deref());
                    if let Err(e) = serve_one(s, HEAD_TIMEOUT, body) {
                        tracing::debug!("metrics: {e}");
                    }
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("metrics: accept: {e}");
                    thread::sleep(Duration::from_millis(100));
                }
            }
        }
    })
}

/// Reads one request from `s` and answers it.
fn serve_one(mut s: TcpStream, head_timeout: Duration, body: impl FnOnce() -> String) -> io::Result<()> {
    s.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let reply = match read_head(&mut s, head_timeout)? {
        Some(head) => respond(&head, body),
        None => status(431, "Request Header Fields Too Large", ""),
    };
    s.write_all(&reply)?;
    linger(&mut s);
    Ok(())
}

/// Ends the reply, then reads and drops what the client still sends (a
/// bounded amount, for a short while) before closing: closing a socket
/// with unread input resets it, and the reset can overtake the reply.
fn linger(s: &mut TcpStream) {
    if s.shutdown(std::net::Shutdown::Write).is_err() || s.set_read_timeout(Some(LINGER)).is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    let mut left: usize = 64 * 1024;
    while left > 0 {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

/// How long [`linger`] waits for the client's side to end.
const LINGER: Duration = Duration::from_millis(200);

/// The request head, up to the blank line; `None` when it is longer than
/// [`MAX_HEAD`]; an error when the client is too slow or goes away.
fn read_head(s: &mut TcpStream, timeout: Duration) -> io::Result<Option<Vec<u8>>> {
    let deadline = Instant::now() + timeout;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "request head not received in time"));
        }
        s.set_read_timeout(Some(left))?;
        let n = match s.read(&mut buf) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "client closed mid-request")),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let from = head.len().saturating_sub(3);
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = find_end(&head[from..]) {
            head.truncate(from + end);
            return Ok(Some(head));
        }
        if head.len() > MAX_HEAD {
            return Ok(None);
        }
    }
}

/// Where the head's blank line ends in `b` (CRLF CRLF, or LF LF).
fn find_end(b: &[u8]) -> Option<usize> {
    (0..b.len()).find_map(|i| {
        if b[i..].starts_with(b"\r\n\r\n") {
            Some(i + 4)
        } else if b[i..].starts_with(b"\n\n") {
            Some(i + 2)
        } else {
            None
        }
    })
}

/// The reply to a request head.
fn respond(head: &[u8], body: impl FnOnce() -> String) -> Vec<u8> {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_ascii_whitespace();
    let (method, target, version) = (words.next(), words.next(), words.next());
    if !version.is_some_and(|v| v.starts_with("HTTP/1.")) {
        return status(400, "Bad Request", "");
    }
    let path = target.unwrap_or_default().split('?').next().unwrap_or_default();
    if path != "/metrics" {
        return status(404, "Not Found", "");
    }
    let head_only = match method {
        Some("GET") => false,
        Some("HEAD") => true,
        _ => return status(405, "Method Not Allowed", "Allow: GET, HEAD\r\n"),
    };
    let body = body();
    let mut r = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        super::CONTENT_TYPE,
        body.len()
    )
    .into_bytes();
    if !head_only {
        r.extend_from_slice(body.as_bytes());
    }
    r
}

fn status(code: u16, reason: &str, extra: &str) -> Vec<u8> {
    let text = format!("{code} {reason}\n");
    format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{text}",
        text.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(req: &[u8]) -> String {
        String::from_utf8(respond(req, || "x 1\n".to_owned())).unwrap()
    }

    #[test]
    fn get_metrics_and_the_refusals() {
        let ok = answer(b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("Content-Type: text/plain; version=0.0.4"), "{ok}");
        assert!(ok.ends_with("Content-Length: 4\r\nConnection: close\r\n\r\nx 1\n"), "{ok}");
        assert!(answer(b"GET /metrics?x=1 HTTP/1.0\n\n").starts_with("HTTP/1.1 200"));
        let head = answer(b"HEAD /metrics HTTP/1.1\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 200") && head.ends_with("\r\n\r\n"), "{head}");
        assert!(answer(b"GET / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        let post = answer(b"POST /metrics HTTP/1.1\r\n\r\n");
        assert!(post.starts_with("HTTP/1.1 405") && post.contains("Allow: GET, HEAD"), "{post}");
        for bad in [&b""[..], b"\xff\xfe", b"GET", b"GET /metrics", b"GET /metrics SPDY/3\r\n\r\n"] {
            assert!(answer(bad).starts_with("HTTP/1.1 400"), "{bad:?}");
        }
    }

    #[test]
    fn head_end_is_found_across_reads() {
        assert_eq!(find_end(b"GET / HTTP/1.1\r\n\r\n"), Some(18));
        assert_eq!(find_end(b"a\n\nrest"), Some(3));
        assert_eq!(find_end(b"a\r\n\r"), None);
    }

    /// A served request over a socket, a head over the limit, a client
    /// too slow to send one.
    #[test]
    fn over_a_socket() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let exchange = |req: Vec<u8>, timeout: Duration| {
            let mut c = TcpStream::connect(addr).unwrap();
            let (s, _) = l.accept().unwrap();
            // Sent in two pieces: the blank line straddles them.
            let (a, b) = req.split_at(req.len().saturating_sub(3));
            c.write_all(a).unwrap();
            let t = thread::spawn(move || serve_one(s, timeout, || "m 2\n".to_owned()));
            thread::sleep(Duration::from_millis(if b.is_empty() { 0 } else { 20 }));
            c.write_all(b).ok();
            let served = t.join().unwrap();
            let mut got = String::new();
            c.read_to_string(&mut got).ok();
            (served.is_ok(), got)
        };
        let (ok, got) = exchange(b"GET /metrics HTTP/1.1\r\n\r\n".to_vec(), HEAD_TIMEOUT);
        assert!(ok && got.starts_with("HTTP/1.1 200") && got.ends_with("m 2\n"), "{got}");
        let mut big = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_HEAD + 2048, b'a');
        let (ok, got) = exchange(big, HEAD_TIMEOUT);
        assert!(ok && got.starts_with("HTTP/1.1 431"), "{got}");
        let (ok, got) = exchange(b"GET /metr".to_vec(), Duration::from_millis(50));
        assert!(!ok && got.is_empty(), "{got}");
    }
}
