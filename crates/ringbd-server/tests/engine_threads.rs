//! The threaded engine over a real socket pair, spoken to in raw bytes.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread;

use ringbd_backend::memory::MemoryBackend;
use ringbd_server::engine_threads;
use ringbd_server::exports::{Export, Exports};
use ringbd_server::listener::Stream;

fn start(read_only: bool) -> (UnixStream, thread::JoinHandle<std::io::Result<()>>) {
    let mut exports = Exports::default();
    exports.add(Export::new("", Arc::new(MemoryBackend::new(1 << 20)), read_only)).unwrap();
    connect(&Arc::new(exports))
}

/// A connection to `exports`, served by the threaded engine on its thread.
fn connect(exports: &Arc<Exports>) -> (UnixStream, thread::JoinHandle<std::io::Result<()>>) {
    let (client, server) = UnixStream::pair().unwrap();
    let exports = exports.clone();
    let h = thread::spawn(move || engine_threads::serve(Stream::Unix(server), exports));
    (client, h)
}

fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut b = vec![0; n];
    s.read_exact(&mut b).unwrap();
    b
}

fn option(s: &mut UnixStream, opt: u32, data: &[u8]) {
    let mut m = b"IHAVEOPT".to_vec();
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m).unwrap();
}

/// Reads option replies until the final one; returns (type, data) of each.
fn replies(s: &mut UnixStream) -> Vec<(u32, Vec<u8>)> {
    let mut out = Vec::new();
    loop {
        let h = read_n(s, 20);
        let typ = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        out.push((typ, read_n(s, len)));
        if typ != 2 && typ != 3 && typ != 4 {
            return out;
        }
    }
}

/// Greeting, flags, STRUCTURED_REPLY, SET_META_CONTEXT base:allocation, GO.
fn negotiate(s: &mut UnixStream) {
    assert_eq!(&read_n(s, 18)[..16], b"NBDMAGICIHAVEOPT");
    s.write_all(&3u32.to_be_bytes()).unwrap();
    option(s, 8, &[]);
    assert_eq!(replies(s), vec![(1, vec![])]);
    let mut q = vec![0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 15];
    q.extend_from_slice(b"base:allocation");
    option(s, 10, &q);
    assert_eq!(replies(s).last().unwrap().0, 1);
    option(s, 7, &[0, 0, 0, 0, 0, 0]);
    let r = replies(s);
    assert_eq!(r.last().unwrap().0, 1, "GO acknowledged");
}

fn request(s: &mut UnixStream, flags: u16, typ: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) {
    let mut m = 0x2560_9513u32.to_be_bytes().to_vec();
    m.extend_from_slice(&flags.to_be_bytes());
    m.extend_from_slice(&typ.to_be_bytes());
    m.extend_from_slice(&cookie.to_be_bytes());
    m.extend_from_slice(&offset.to_be_bytes());
    m.extend_from_slice(&len.to_be_bytes());
    m.extend_from_slice(payload);
    s.write_all(&m).unwrap();
}

#[test]
fn write_then_read_round_trips_with_structured_replies_and_holes() {
    let (mut c, h) = start(false);
    negotiate(&mut c);
    // A 4 KiB write at 8192, header and payload in one send.
    let mut both = Vec::with_capacity(28 + 4096);
    let payload = vec![0x5a; 4096];
    both.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    both.extend_from_slice(&[0, 0, 0, 1]);
    both.extend_from_slice(&7u64.to_be_bytes());
    both.extend_from_slice(&8192u64.to_be_bytes());
    both.extend_from_slice(&4096u32.to_be_bytes());
    both.extend_from_slice(&payload);
    c.write_all(&both).unwrap();
    // simple reply to the write: magic, error 0, cookie 7
    assert_eq!(
        read_n(&mut c, 16),
        [&0x6744_6698u32.to_be_bytes()[..], &[0; 4], &7u64.to_be_bytes()].concat()
    );

    // Read 8 KiB at 4096: first 4 KiB unwritten page data (zeroes inside an
    // allocated 32 KiB page), then the data written above.
    request(&mut c, 0, 0, 9, 4096, 8192, &[]);
    let hdr = read_n(&mut c, 20);
    assert_eq!(&hdr[..4], &0x668e_33efu32.to_be_bytes());
    assert_eq!(u16::from_be_bytes([hdr[4], hdr[5]]), 1, "DONE on the only chunk");
    assert_eq!(u16::from_be_bytes([hdr[6], hdr[7]]), 1, "OFFSET_DATA");
    let body = read_n(&mut c, 8 + 8192);
    assert_eq!(u64::from_be_bytes(body[..8].try_into().unwrap()), 4096);
    assert!(body[8..8 + 4096].iter().all(|&b| b == 0));
    assert!(body[8 + 4096..].iter().all(|&b| b == 0x5a));

    // A read of a never-written page comes back as a hole.
    request(&mut c, 0, 0, 10, 512 * 1024, 4096, &[]);
    let hdr = read_n(&mut c, 20);
    assert_eq!(u16::from_be_bytes([hdr[6], hdr[7]]), 2, "OFFSET_HOLE");
    let body = read_n(&mut c, 12);
    assert_eq!(u32::from_be_bytes(body[8..12].try_into().unwrap()), 4096);

    request(&mut c, 0, 2, 11, 0, 0, &[]); // DISC
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "no reply to DISC");
    h.join().unwrap().unwrap();
}

#[test]
fn unknown_command_gets_einval_and_the_connection_goes_on() {
    let (mut c, h) = start(false);
    negotiate(&mut c);
    request(&mut c, 0, 99, 1, 0, 0, &[]);
    let hdr = read_n(&mut c, 20);
    assert_eq!(u16::from_be_bytes([hdr[6], hdr[7]]), 0x8001, "ERROR chunk");
    let len = u32::from_be_bytes(hdr[16..20].try_into().unwrap()) as usize;
    let body = read_n(&mut c, len);
    assert_eq!(u32::from_be_bytes(body[..4].try_into().unwrap()), 22);
    request(&mut c, 0, 3, 2, 0, 0, &[]); // FLUSH still works
    assert_eq!(&read_n(&mut c, 16)[4..8], &[0; 4]);
    drop(c);
    h.join().unwrap().unwrap();
}

#[test]
fn read_only_export_refuses_writes_with_eperm_and_consumes_the_payload() {
    let (mut c, h) = start(true);
    negotiate(&mut c);
    request(&mut c, 0, 1, 1, 0, 512, &[1; 512]);
    let hdr = read_n(&mut c, 20);
    let len = u32::from_be_bytes(hdr[16..20].try_into().unwrap()) as usize;
    assert_eq!(u32::from_be_bytes(read_n(&mut c, len)[..4].try_into().unwrap()), 1);
    // The payload was skipped, so the next header parses.
    request(&mut c, 0, 3, 2, 0, 0, &[]);
    assert_eq!(&read_n(&mut c, 16)[12..16], &2u32.to_be_bytes());
    drop(c);
    h.join().unwrap().unwrap();
}

/// A simple reply's error for `cookie`.
fn simple_reply(s: &mut UnixStream, cookie: u64) -> u32 {
    let r = read_n(s, 16);
    assert_eq!(&r[..4], &0x6744_6698u32.to_be_bytes());
    assert_eq!(&r[8..], &cookie.to_be_bytes());
    u32::from_be_bytes(r[4..8].try_into().unwrap())
}

/// Reads `len` bytes at `offset` (one OFFSET_DATA chunk expected).
fn read_data(s: &mut UnixStream, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    request(s, 0, 0, cookie, offset, len, &[]);
    let hdr = read_n(s, 20);
    assert_eq!(u16::from_be_bytes([hdr[6], hdr[7]]), 1, "OFFSET_DATA");
    read_n(s, 8 + len as usize)[8..].to_vec()
}

#[test]
fn client_vanishing_mid_payload_ends_only_that_connection() {
    let mut exports = Exports::default();
    exports.add(Export::new("", Arc::new(MemoryBackend::new(1 << 20)), false)).unwrap();
    let exports = Arc::new(exports);
    let (mut other, other_h) = connect(&exports);
    negotiate(&mut other);
    request(&mut other, 0, 1, 1, 0, 4096, &[3; 4096]);
    assert_eq!(simple_reply(&mut other, 1), 0);

    // 1000 bytes of a 64 KiB write over the same range, then gone.
    let (mut c, h) = start_on_and_negotiate(&exports);
    request(&mut c, 0, 1, 1, 0, 65536, &[7; 1000]);
    drop(c);
    h.join().unwrap().unwrap();

    // The other connection goes on. Write payloads stream to the backend as
    // they arrive (conn/mod.rs), so the 1000 bytes that came may have landed (an
    // unacknowledged write leaves its range undefined in NBD); nothing past
    // them changed.
    let got = read_data(&mut other, 2, 0, 4096);
    assert!(got[..1000].iter().all(|&b| b == 3 || b == 7), "{:?}", &got[..16]);
    assert_eq!(got[1000..], [3; 3096]);
    request(&mut other, 0, 1, 3, 4096, 4096, &[4; 4096]);
    assert_eq!(simple_reply(&mut other, 3), 0);
    assert_eq!(read_data(&mut other, 4, 4096, 4096), vec![4; 4096]);
    // And a new connection is served too.
    let (mut late, late_h) = start_on_and_negotiate(&exports);
    assert_eq!(read_data(&mut late, 5, 0, 8192), [got, vec![4; 4096]].concat());
    drop((late, other));
    late_h.join().unwrap().unwrap();
    other_h.join().unwrap().unwrap();
}

fn start_on_and_negotiate(exports: &Arc<Exports>) -> (UnixStream, thread::JoinHandle<std::io::Result<()>>) {
    let (mut c, h) = connect(exports);
    negotiate(&mut c);
    (c, h)
}

#[test]
fn bad_request_magic_disconnects() {
    let (mut c, h) = start(false);
    negotiate(&mut c);
    c.write_all(&[0xff; 28]).unwrap();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    h.join().unwrap().unwrap();
}
