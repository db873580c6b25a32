//! The client engine against ringbd's threaded server over a Unix socket:
//! pipelined writes and reads over several connections, holes, block
//! status, and each reply form (simple, structured, extended).

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread;

use nbd_proto::wire::{state_flags, CmdType};
use ringbd_backend::memory::MemoryBackend;
use ringbd_client::{ClientConfig, Cmd, Engine, NbdUri};
use ringbd_server::engine_threads;
use ringbd_server::exports::{Export, Exports};
use ringbd_server::listener::Stream;

const SIZE: u64 = 4 << 20;

fn server(name: &str) -> (NbdUri, PathBuf) {
    server_with(name, false)
}

fn server_with(name: &str, read_only: bool) -> (NbdUri, PathBuf) {
    let dir = std::env::temp_dir().join(format!("ringbd-client-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("nbd.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let mut exports = Exports::default();
    exports.add(Export::new("", Arc::new(MemoryBackend::new(SIZE)), read_only)).unwrap();
    let exports = Arc::new(exports);
    thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(s) = s else { return };
            let ex = exports.clone();
            thread::spawn(move || engine_threads::serve(Stream::Unix(s), ex));
        }
    });
    let uri = format!("nbd+unix:///?socket={}", path.display()).parse().unwrap();
    (uri, dir)
}

fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| ((offset + i as u64) * 7 % 251) as u8).collect()
}

fn exercise(cfg: ClientConfig, name: &str) -> Engine {
    let (uri, _dir) = server(name);
    let mut e = Engine::connect(&uri, &cfg, 3).unwrap();
    assert_eq!(e.size(), SIZE);
    // 64 writes of 16 KiB spread over the connections, all in flight at once.
    let bs = 16 * 1024u64;
    for i in 0..64u64 {
        let off = i * bs;
        e.submit(e.least_busy(), i, Cmd::write(off, bs), pattern(off, bs as usize)).unwrap();
    }
    assert_eq!(e.total_inflight(), 64);
    let mut done = Vec::new();
    while done.len() < 64 {
        e.poll(&mut done, true).unwrap();
    }
    for c in &done {
        c.result.as_ref().unwrap();
        assert_eq!(c.buf.len() as u64, bs, "write payload comes back");
    }
    // Read back in reverse, out of order completion allowed.
    done.clear();
    for i in (0..64u64).rev() {
        e.submit((i % 3) as usize, i, Cmd::read(i * bs, bs), Vec::new()).unwrap();
    }
    while done.len() < 64 {
        e.poll(&mut done, true).unwrap();
    }
    for c in &done {
        c.result.as_ref().unwrap();
        assert!(c.buf == pattern(c.tag * bs, bs as usize), "read at {}", c.tag * bs);
    }
    // A read across written data and a hole.
    let c = e.run(0, Cmd::read(512 << 10, 1 << 20), vec![0xee; 1 << 20]).unwrap();
    c.result.unwrap();
    assert!(c.buf[..512 << 10] == pattern(512 << 10, 512 << 10)[..], "data half");
    assert!(c.buf[512 << 10..].iter().all(|&b| b == 0), "hole half");
    // A read larger than the receive buffer: where the server sends it in
    // big pieces (simple replies), the payload goes straight into the buffer.
    let c = e.run(1, Cmd::read(0, SIZE), vec![0xee; 1 << 20]).unwrap();
    c.result.unwrap();
    assert!(c.buf[..1 << 20] == pattern(0, 1 << 20), "1 MiB of data");
    assert!(c.buf[1 << 20..].iter().all(|&b| b == 0), "3 MiB of hole");
    let c = e.run(0, Cmd::read(SIZE - 8192, 8192), vec![0xee; 8192]).unwrap();
    c.result.unwrap();
    assert!(c.buf.iter().all(|&b| b == 0), "hole reads as zeroes");
    e.run(1, Cmd::flush(), Vec::new()).unwrap().result.unwrap();
    e
}

#[test]
fn extended_headers() {
    let e = exercise(ClientConfig::new(""), "ext");
    assert!(e.negotiated().unwrap().extended);
    block_status(e);
}

#[test]
fn structured_replies() {
    let mut cfg = ClientConfig::new("");
    cfg.extended = false;
    let e = exercise(cfg, "sr");
    assert!(e.negotiated().unwrap().structured && !e.negotiated().unwrap().extended);
    block_status(e);
}

#[test]
fn simple_replies() {
    let mut cfg = ClientConfig::new("");
    cfg.extended = false;
    cfg.structured = false;
    let mut e = exercise(cfg, "simple");
    assert!(!e.negotiated().unwrap().structured);
    assert!(e.direct_receives() > 0, "a 4 MiB simple reply is received directly");
    let err = e.submit(0, 0, Cmd::block_status(0, 4096), Vec::new()).unwrap_err();
    assert!(err.to_string().contains("base:allocation"), "{err}");
    e.disconnect().unwrap();
}

fn block_status(mut e: Engine) {
    let c = e.run(0, Cmd::block_status(0, SIZE), Vec::new()).unwrap();
    c.result.unwrap();
    assert_eq!(c.extents[0].flags & state_flags::HOLE, 0, "written data first");
    assert!(c.extents.iter().map(|x| x.len).sum::<u64>() <= SIZE);
    // Zero the first MiB; it becomes a hole.
    e.run(0, Cmd::zero(0, 1 << 20), Vec::new()).unwrap().result.unwrap();
    let c = e.run(2, Cmd::block_status(0, 1 << 20), Vec::new()).unwrap();
    assert_eq!(c.extents[0].flags & state_flags::ZERO, state_flags::ZERO);
    // An error reply carries the command and its range.
    let err = e.run(0, Cmd { typ: CmdType::CACHE, flags: 0, offset: 0, len: 512 }, Vec::new());
    match err {
        Ok(c) => c.result.unwrap(),
        Err(e) => panic!("{e}"),
    }
    let err = e.submit(0, 0, Cmd::read(SIZE, 512), Vec::new()).unwrap_err();
    assert!(err.to_string().contains("beyond the end"), "{err}");
    e.disconnect().unwrap();
}

#[test]
fn refused_requests_complete_with_the_errno_and_context() {
    let (uri, _dir) = server_with("ro", true);
    for extended in [true, false] {
        let mut cfg = ClientConfig::new("");
        cfg.extended = extended;
        cfg.structured = extended;
        let mut e = Engine::connect(&uri, &cfg, 1).unwrap();
        // The client refuses writes to a read-only export only if asked to;
        // here the server must refuse them, with EPERM, and the connection lives on.
        let c = e.run(0, Cmd::write(4096, 512), vec![1; 512]).unwrap();
        let err = c.result.unwrap_err();
        match &err {
            ringbd_client::Error::Request { cmd, offset, len, errno, .. } => {
                assert_eq!((*cmd, *offset, *len, *errno), (CmdType::WRITE, 4096, 512, 1));
            }
            other => panic!("{other}"),
        }
        assert!(err.to_string().starts_with("WRITE of 512 bytes at 0x1000: EPERM"), "{err}");
        assert_eq!(c.buf.len(), 512, "the payload comes back even on error");
        e.run(0, Cmd::read(0, 4096), Vec::new()).unwrap().result.unwrap();
        e.disconnect().unwrap();
    }
}
