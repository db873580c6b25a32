//! NBD messages as a client puts them on the wire, shared by the
//! integration tests that drive a `Connection` with raw bytes.

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
