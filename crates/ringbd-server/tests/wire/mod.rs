//! NBD messages as a client puts them on the wire, shared by the
//! integration tests that drive a `Connection` with raw bytes, and the
//! loop that feeds them to it as an engine would.

use ringbd_server::conn::Connection;

/// An `IHAVEOPT` option with its data.
pub fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut m = b"IHAVEOPT".to_vec();
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    m
}

/// A compact request header (no flags) followed by `payload`.
pub fn request(typ: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) -> Vec<u8> {
    request_with_flags(0, typ, cookie, offset, len, payload)
}

/// A compact request header with command flags, followed by `payload`.
pub fn request_with_flags(
    flags: u16,
    typ: u16,
    cookie: u64,
    offset: u64,
    len: u32,
    payload: &[u8],
) -> Vec<u8> {
    let mut m = 0x2560_9513u32.to_be_bytes().to_vec();
    m.extend_from_slice(&flags.to_be_bytes());
    m.extend_from_slice(&typ.to_be_bytes());
    m.extend_from_slice(&cookie.to_be_bytes());
    m.extend_from_slice(&offset.to_be_bytes());
    m.extend_from_slice(&len.to_be_bytes());
    m.extend_from_slice(payload);
    m
}

/// Takes what the server queued for the wire.
#[allow(dead_code)] // each test binary compiles this module; conn.rs has its own loop
pub fn drain(c: &mut Connection) -> Vec<u8> {
    let mut iov = Vec::new();
    c.out().iovecs(0, &mut iov);
    let v = iov.iter().flat_map(|s| s.iter().copied()).collect();
    c.sent();
    v
}

/// Feeds `input` to the server `chunk` bytes at a time the way an engine
/// does (unconsumed bytes are offered again after the queue drains);
/// returns everything the server sent.
#[allow(dead_code)] // as above
pub fn feed(c: &mut Connection, input: &[u8], chunk: usize) -> Vec<u8> {
    let mut wire = drain(c);
    let mut at = 0;
    while at < input.len() && !c.is_closed() {
        let end = (at + chunk).min(input.len());
        let mut spins = 0;
        let mut start = at;
        while start < end && !c.is_closed() {
            let n = c.receive(&input[start..end]);
            start += n;
            wire.extend(drain(c));
            spins += 1;
            assert!(spins < 10_000, "no progress");
        }
        at = end;
    }
    wire.extend(drain(c));
    wire
}
