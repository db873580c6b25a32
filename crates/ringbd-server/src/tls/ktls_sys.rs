//! Kernel TLS (kTLS): hand an established TLS session's record layer to the
//! kernel's `tls` module, so plain `sendmsg`/`recv` (and the io_uring
//! operations built on them) carry plaintext and the kernel encrypts and
//! decrypts the records (Documentation/networking/tls.rst).
//!
//! The sequence is: [`attach_ulp`] (`setsockopt(TCP_ULP, "tls")`, which
//! fails with `ENOENT` where the kernel has no `tls` module), then
//! [`set_tx`] and [`set_rx`] with a [`CryptoInfo`] per direction: key, IV
//! and the next record sequence number. Attaching the ULP alone changes
//! nothing on the data path, so a caller can still fall back to userspace
//! TLS after it; after `set_tx`/`set_rx` it cannot.
//!
//! With `TLS_RX`, records that are not application data (alerts such as
//! close_notify, TLS 1.3 post-handshake messages such as KeyUpdate) make a
//! plain `recv` fail with `EIO`; [`recv_record`] reads such a record with
//! its type from the `TLS_GET_RECORD_TYPE` control message. [`send_alert`]
//! sends one with `TLS_SET_RECORD_TYPE`.

use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

/// Turns a `-1` return into the thread's `errno`.
fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// TLS record content types (RFC 8446, 5.1).
pub mod content_type {
    pub const ALERT: u8 = 21;
    pub const HANDSHAKE: u8 = 22;
    pub const APPLICATION_DATA: u8 = 23;
}

/// The negotiated protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Tls12,
    Tls13,
}

/// The AEADs the kernel and rustls have in common.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cipher {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
}

impl Cipher {
    pub const ALL: [Cipher; 3] = [Cipher::Aes128Gcm, Cipher::Aes256Gcm, Cipher::Chacha20Poly1305];

    fn key_len(self) -> usize {
        match self {
            Cipher::Aes128Gcm => libc::TLS_CIPHER_AES_GCM_128_KEY_SIZE,
            Cipher::Aes256Gcm => libc::TLS_CIPHER_AES_GCM_256_KEY_SIZE,
            Cipher::Chacha20Poly1305 => libc::TLS_CIPHER_CHACHA20_POLY1305_KEY_SIZE,
        }
    }

    /// The kernel's name, as in /proc/net/tls_stat and the docs.
    pub fn name(self) -> &'static str {
        match self {
            Cipher::Aes128Gcm => "AES-GCM-128",
            Cipher::Aes256Gcm => "AES-GCM-256",
            Cipher::Chacha20Poly1305 => "CHACHA20-POLY1305",
        }
    }
}

/// Length of the full per-record nonce base (TLS 1.3 `iv`, and TLS 1.2
/// salt plus explicit nonce) for every cipher here.
pub const IV_LEN: usize = 12;

/// One direction's `struct tls12_crypto_info_*` (the kernel uses these
/// structures for TLS 1.3 too), ready for `setsockopt(SOL_TLS, TLS_TX|TLS_RX)`.
/// The key material is zeroed when it is dropped.
pub struct CryptoInfo {
    inner: Info,
}

enum Info {
    Aes128(libc::tls12_crypto_info_aes_gcm_128),
    Aes256(libc::tls12_crypto_info_aes_gcm_256),
    Chacha(libc::tls12_crypto_info_chacha20_poly1305),
}

// The structures are byte arrays after two u16s: no padding, so viewing one
// as bytes (as_bytes) reads only initialized memory.
const _: () = assert!(std::mem::size_of::<libc::tls12_crypto_info_aes_gcm_128>() == 4 + 8 + 16 + 4 + 8);
const _: () = assert!(std::mem::size_of::<libc::tls12_crypto_info_aes_gcm_256>() == 4 + 8 + 32 + 4 + 8);
const _: () = assert!(std::mem::size_of::<libc::tls12_crypto_info_chacha20_poly1305>() == 4 + 12 + 32 + 8);

impl CryptoInfo {
    /// Lays out `key`, the 12-byte `iv` and the sequence number of the next
    /// record as the kernel wants them. For AES-GCM the first 4 bytes of
    /// `iv` are the kernel's `salt` and the other 8 its `iv` (for TLS 1.2 the
    /// initial explicit nonce, which the kernel then counts up per record;
    /// for TLS 1.3 the rest of the nonce base). ChaCha20-Poly1305 takes all
    /// 12 as `iv` and has no salt. `rec_seq` is big-endian.
    pub fn new(version: Version, cipher: Cipher, key: &[u8], iv: &[u8], seq: u64) -> io::Result<CryptoInfo> {
        if key.len() != cipher.key_len() || iv.len() != IV_LEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: key of {} bytes and IV of {} bytes (want {} and {IV_LEN})",
                    cipher.name(),
                    key.len(),
                    iv.len(),
                    cipher.key_len()
                ),
            ));
        }
        let info = |cipher_type| libc::tls_crypto_info {
            version: match version {
                Version::Tls12 => libc::TLS_1_2_VERSION,
                Version::Tls13 => libc::TLS_1_3_VERSION,
            },
            cipher_type,
        };
        let rec_seq = seq.to_be_bytes();
        let inner = match cipher {
            Cipher::Aes128Gcm => {
                let mut c = libc::tls12_crypto_info_aes_gcm_128 {
                    info: info(libc::TLS_CIPHER_AES_GCM_128),
                    iv: [0; 8],
                    key: [0; 16],
                    salt: [0; 4],
                    rec_seq,
                };
                c.salt.copy_from_slice(&iv[..4]);
                c.iv.copy_from_slice(&iv[4..]);
                c.key.copy_from_slice(key);
                Info::Aes128(c)
            }
            Cipher::Aes256Gcm => {
                let mut c = libc::tls12_crypto_info_aes_gcm_256 {
                    info: info(libc::TLS_CIPHER_AES_GCM_256),
                    iv: [0; 8],
                    key: [0; 32],
                    salt: [0; 4],
                    rec_seq,
                };
                c.salt.copy_from_slice(&iv[..4]);
                c.iv.copy_from_slice(&iv[4..]);
                c.key.copy_from_slice(key);
                Info::Aes256(c)
            }
            Cipher::Chacha20Poly1305 => {
                let mut c = libc::tls12_crypto_info_chacha20_poly1305 {
                    info: info(libc::TLS_CIPHER_CHACHA20_POLY1305),
                    iv: [0; 12],
                    key: [0; 32],
                    salt: [],
                    rec_seq,
                };
                c.iv.copy_from_slice(iv);
                c.key.copy_from_slice(key);
                Info::Chacha(c)
            }
        };
        Ok(CryptoInfo { inner })
    }

    /// The structure's bytes, as `setsockopt` passes them.
    pub fn as_bytes(&self) -> &[u8] {
        let (ptr, len) = match &self.inner {
            Info::Aes128(c) => (c as *const _ as *const u8, std::mem::size_of_val(c)),
            Info::Aes256(c) => (c as *const _ as *const u8, std::mem::size_of_val(c)),
            Info::Chacha(c) => (c as *const _ as *const u8, std::mem::size_of_val(c)),
        };
        // SAFETY: ptr/len cover exactly one live, fully initialized
        // structure borrowed from self for the returned lifetime; the
        // structures have no padding (the size assertions above).
        unsafe { std::slice::from_raw_parts(ptr, len) }
    }
}

impl Drop for CryptoInfo {
    fn drop(&mut self) {
        let (ptr, len) = match &mut self.inner {
            Info::Aes128(c) => (c as *mut _ as *mut u8, std::mem::size_of_val(c)),
            Info::Aes256(c) => (c as *mut _ as *mut u8, std::mem::size_of_val(c)),
            Info::Chacha(c) => (c as *mut _ as *mut u8, std::mem::size_of_val(c)),
        };
        for i in 0..len {
            // SAFETY: i < len, inside the structure exclusively borrowed
            // here; a volatile write so the zeroing is not optimized away.
            unsafe { std::ptr::write_volatile(ptr.add(i), 0) };
        }
    }
}

impl std::fmt::Debug for CryptoInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CryptoInfo").finish_non_exhaustive()
    }
}

/// `setsockopt(IPPROTO_TCP, TCP_ULP, "tls")`: makes the socket ready for
/// [`set_tx`]/[`set_rx`]. `ENOENT`: the kernel has no `tls` module (or may
/// not load it); `EEXIST`: a ULP is attached already. The data path is
/// unchanged until keys are set.
pub fn attach_ulp(fd: BorrowedFd<'_>) -> io::Result<()> {
    let name = b"tls";
    // SAFETY: name is a live buffer of the given length for the call; the
    // kernel copies it. fd is borrowed, so it is open.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_ULP,
            name.as_ptr() as *const libc::c_void,
            name.len() as libc::socklen_t,
        )
    })
    .map(drop)
}

fn set_sol_tls(fd: BorrowedFd<'_>, opt: libc::c_int, value: &[u8]) -> io::Result<()> {
    // SAFETY: value is a live buffer of the given length for the call; the
    // kernel copies it. fd is borrowed, so it is open.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_TLS,
            opt,
            value.as_ptr() as *const libc::c_void,
            value.len() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// Sets the transmit keys: from now on the kernel encrypts what is sent.
pub fn set_tx(fd: BorrowedFd<'_>, info: &CryptoInfo) -> io::Result<()> {
    set_sol_tls(fd, libc::TLS_TX, info.as_bytes())
}

/// Sets the receive keys: from now on reads return decrypted records.
pub fn set_rx(fd: BorrowedFd<'_>, info: &CryptoInfo) -> io::Result<()> {
    set_sol_tls(fd, libc::TLS_RX, info.as_bytes())
}

/// `TLS_RX_EXPECT_NO_PAD` (6.0+, TLS 1.3 only): decrypt straight into the
/// reader's buffer, assuming the peer does not pad records (rustls and
/// GnuTLS do not by default; a padded record is decrypted again, slower).
pub fn set_rx_expect_no_pad(fd: BorrowedFd<'_>) -> io::Result<()> {
    set_sol_tls(fd, libc::TLS_RX_EXPECT_NO_PAD, &1u32.to_ne_bytes())
}

/// Reads one record's worth of data and its content type (non-blocking;
/// for after a plain read failed with `EIO`: a record that is not
/// application data is next). Returns the type and the bytes read into
/// `buf`.
pub fn recv_record(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(u8, usize)> {
    // Room for one cmsghdr carrying one byte, aligned as cmsghdr wants.
    let mut control = [0u64; 4];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr() as *mut libc::c_void, iov_len: buf.len() };
    // SAFETY: msghdr is plain old data; all-zero is a valid empty message.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: msg points at live locals: one iovec over `buf` (writable,
    // of its length) and `control` (writable, of msg_controllen bytes),
    // all outliving the call.
    let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut record_type = None;
    // SAFETY: msg was filled in by a successful recvmsg: msg_control and
    // msg_controllen describe the control data the kernel wrote inside
    // `control`, which CMSG_FIRSTHDR/CMSG_NXTHDR walk without leaving it.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: cmsg is non-null, so it points at a complete header
        // inside `control` (CMSG_FIRSTHDR/CMSG_NXTHDR check the length).
        let hdr = unsafe { &*cmsg };
        if hdr.cmsg_level == libc::SOL_TLS && hdr.cmsg_type == libc::TLS_GET_RECORD_TYPE {
            // SAFETY: the kernel put one byte of data after this header
            // (put_cmsg of the record type), inside `control`.
            record_type = Some(unsafe { *libc::CMSG_DATA(cmsg) });
        }
        // SAFETY: as for CMSG_FIRSTHDR; returns null after the last one.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    match record_type {
        Some(t) => Ok((t, n as usize)),
        None if n == 0 => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "end of stream")),
        None => Err(io::Error::other("kTLS read carried no record type")),
    }
}

/// Sends a TLS alert record (`level`, `description`) through the kernel
/// (non-blocking: an alert that does not fit in the send buffer is
/// `EAGAIN`). close_notify is `(1, 0)`. A record the kernel holds open
/// (`MSG_MORE`) is pushed out first.
pub fn send_alert(fd: BorrowedFd<'_>, level: u8, description: u8) -> io::Result<()> {
    let mut body = [level, description];
    let mut control = [0u64; 4];
    let mut iov = libc::iovec { iov_base: body.as_mut_ptr() as *mut libc::c_void, iov_len: body.len() };
    // SAFETY: msghdr is plain old data; all-zero is a valid empty message.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    // SAFETY: CMSG_SPACE only computes a size.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(1) } as usize;
    // SAFETY: msg_control/msg_controllen describe `control`, which is large
    // enough for one header with one byte (CMSG_SPACE(1) <= 32 bytes), so
    // CMSG_FIRSTHDR returns a header inside it.
    let cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    if cmsg.is_null() {
        return Err(io::Error::other("no room for the record-type control message"));
    }
    // SAFETY: cmsg points at a header inside `control` (checked non-null);
    // CMSG_DATA(cmsg) + 1 byte is inside CMSG_SPACE(1).
    unsafe {
        (*cmsg).cmsg_level = libc::SOL_TLS;
        (*cmsg).cmsg_type = libc::TLS_SET_RECORD_TYPE;
        (*cmsg).cmsg_len = libc::CMSG_LEN(1) as usize;
        *libc::CMSG_DATA(cmsg) = content_type::ALERT;
    }
    // SAFETY: msg points at live locals (body, iov, control) for the call.
    let n = unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    match n {
        -1 => Err(io::Error::last_os_error()),
        2 => Ok(()),
        n => Err(io::Error::other(format!("alert: the kernel took {n} of 2 bytes"))),
    }
}

/// The `close_notify` alert (RFC 8446, 6.1).
pub fn send_close_notify(fd: BorrowedFd<'_>) -> io::Result<()> {
    send_alert(fd, 1, 0)
}

/// A plain read on a kTLS socket failed because the next record is not
/// application data (an alert, a post-handshake message): read it with
/// [`recv_record`].
pub fn is_control_record(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EIO)
}

/// The kernel could not decrypt or parse a record (`EBADMSG`: a bad tag,
/// a malformed record); the socket is unusable.
pub fn is_bad_record(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EBADMSG)
}

/// A read after a TLS 1.3 KeyUpdate whose new keys were not given
/// (`EKEYEXPIRED`, kernels with rekey support, 6.14+).
pub fn is_key_expired(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EKEYEXPIRED)
}

/// What the running kernel's kTLS can do, from trial sockets.
#[derive(Debug)]
pub struct Probe {
    /// Why kTLS is unusable (`TCP_ULP` failed: typically `ENOENT`, no
    /// `tls` module), or `None`.
    pub unavailable: Option<String>,
    /// (version, cipher) pairs whose transmit and receive keys the kernel
    /// accepted.
    pub supported: Vec<(Version, Cipher)>,
}

impl Probe {
    pub fn supports(&self, version: Version, cipher: Cipher) -> bool {
        self.supported.contains(&(version, cipher))
    }
}

/// Probes kTLS on a loopback TCP connection per (version, cipher): attach
/// the ULP, set dummy transmit and receive keys. Nothing is sent. Loading
/// the `tls` module on demand happens here, on the first `TCP_ULP`.
pub fn probe() -> Probe {
    let mut p = Probe { unavailable: None, supported: Vec::new() };
    for version in [Version::Tls13, Version::Tls12] {
        for cipher in Cipher::ALL {
            match probe_one(version, cipher) {
                Ok(true) => p.supported.push((version, cipher)),
                Ok(false) => {}
                Err(e) => {
                    p.unavailable = Some(e);
                    return p;
                }
            }
        }
    }
    p
}

/// Ok(true/false): the kernel took / refused these keys; Err: kTLS (or the
/// trial socket) does not work at all.
fn probe_one(version: Version, cipher: Cipher) -> Result<bool, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("trial socket: {e}"))?;
    let addr = l.local_addr().map_err(|e| format!("trial socket: {e}"))?;
    let c = TcpStream::connect(addr).map_err(|e| format!("trial connection: {e}"))?;
    let (_s, _) = l.accept().map_err(|e| format!("trial connection: {e}"))?;
    attach_ulp(c.as_fd()).map_err(|e| format!("setsockopt(TCP_ULP, \"tls\"): {e}"))?;
    let info = CryptoInfo::new(version, cipher, &[7u8; 32][..cipher.key_len()], &[9u8; IV_LEN], 0)
        .map_err(|e| e.to_string())?;
    Ok(set_tx(c.as_fd(), &info).is_ok() && set_rx(c.as_fd(), &info).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    // A layout vector: arbitrary key and nonce-base bytes, laid out as
    // include/uapi/linux/tls.h says. That these fields are the ones that
    // decrypt real records is checked in ringbd-server's tests/ktls.rs,
    // against records rustls wrote.
    const KEY: &str = "9f02283b6c9c07efc26bb9f2ac92e356";
    const IV: &str = "cf782b88dd83549aadf1e984";

    #[test]
    fn aes_gcm_128_layout_splits_salt_and_iv() {
        let c = CryptoInfo::new(Version::Tls13, Cipher::Aes128Gcm, &hex(KEY), &hex(IV), 1).unwrap();
        let mut want = Vec::new();
        want.extend_from_slice(&0x0304u16.to_ne_bytes()); // version: TLS 1.3
        want.extend_from_slice(&51u16.to_ne_bytes()); // TLS_CIPHER_AES_GCM_128
        want.extend_from_slice(&hex("dd83549aadf1e984")); // iv: nonce base[4..12]
        want.extend_from_slice(&hex(KEY)); // key
        want.extend_from_slice(&hex("cf782b88")); // salt: nonce base[0..4]
        want.extend_from_slice(&hex("0000000000000001")); // rec_seq, big-endian
        assert_eq!(c.as_bytes(), &want[..]);
        assert_eq!(c.as_bytes().len(), 40);
    }

    #[test]
    fn aes_gcm_256_tls12_layout() {
        let key: Vec<u8> = (0..32).collect();
        let iv: Vec<u8> = (0xa0..0xac).collect();
        let c = CryptoInfo::new(Version::Tls12, Cipher::Aes256Gcm, &key, &iv, 0x0102030405060708).unwrap();
        let b = c.as_bytes();
        assert_eq!(b.len(), 56);
        assert_eq!(&b[..4], &[0x0303u16.to_ne_bytes(), 52u16.to_ne_bytes()].concat()[..]);
        assert_eq!(&b[4..12], &hex("a4a5a6a7a8a9aaab")[..]);
        assert_eq!(&b[12..44], &key[..]);
        assert_eq!(&b[44..48], &hex("a0a1a2a3")[..]);
        assert_eq!(&b[48..56], &hex("0102030405060708")[..]);
    }

    #[test]
    fn chacha20_poly1305_takes_the_whole_iv_and_no_salt() {
        let key = [0x42u8; 32];
        let c = CryptoInfo::new(Version::Tls13, Cipher::Chacha20Poly1305, &key, &hex(IV), u64::MAX).unwrap();
        let b = c.as_bytes();
        assert_eq!(b.len(), 56);
        assert_eq!(&b[..4], &[0x0304u16.to_ne_bytes(), 54u16.to_ne_bytes()].concat()[..]);
        assert_eq!(&b[4..16], &hex(IV)[..]);
        assert_eq!(&b[16..48], &key[..]);
        assert_eq!(&b[48..56], &[0xff; 8]);
    }

    #[test]
    fn wrong_key_or_iv_lengths_are_refused() {
        assert!(CryptoInfo::new(Version::Tls13, Cipher::Aes128Gcm, &[0; 32], &[0; 12], 0).is_err());
        assert!(CryptoInfo::new(Version::Tls13, Cipher::Aes256Gcm, &[0; 32], &[0; 8], 0).is_err());
        assert!(CryptoInfo::new(Version::Tls12, Cipher::Chacha20Poly1305, &[0; 16], &[0; 12], 0).is_err());
    }

    #[test]
    fn probe_reports_either_a_reason_or_the_supported_ciphers() {
        // The host may or may not have the tls module: both answers must
        // be coherent. (The VM test covers a kernel that has it.)
        let p = probe();
        match &p.unavailable {
            Some(why) => {
                assert!(why.contains("TCP_ULP") || why.contains("trial"), "{why}");
                assert!(p.supported.is_empty());
            }
            None => assert!(p.supports(Version::Tls13, Cipher::Aes128Gcm), "{p:?}"),
        }
    }
}
