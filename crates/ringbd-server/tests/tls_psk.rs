//! STARTTLS with a pre-shared key through the connection state machine,
//! against ringbd-psk's client session in memory: the handshake, reads and
//! writes fed in any chunking with and without backpressure, record
//! batching, and the failures (wrong key, unknown username, garbage) that
//! must close the connection without a panic.

use std::path::Path;
use std::sync::Arc;

use nbd_proto::TlsMode;
use ringbd_backend::memory::MemoryBackend;
use ringbd_psk::{PskClientConfig, PskKeys, PskSession};
use ringbd_server::conn::Connection;
use ringbd_server::exports::{Export, Exports};
use ringbd_server::tls::{TlsOptions, TlsServer};

mod wire;
use wire::{feed, option, request};

const ALICE: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

/// A connection whose server knows alice and bob (keys in a temporary file).
fn server(tag: &str, mode: TlsMode) -> Connection {
    let path = std::env::temp_dir().join(format!("ringbd-psk-{tag}-{}.psk", std::process::id()));
    std::fs::write(&path, format!("alice:{ALICE}\nbob:c0ffee\n")).unwrap();
    let opts = TlsOptions { mode, psk: Some(path.clone()), ..TlsOptions::default() };
    let tls = TlsServer::load(&opts);
    std::fs::remove_file(&path).ok();
    let mut e = Exports::default();
    e.add(Export::new("", Arc::new(MemoryBackend::new(1 << 20)), false)).unwrap();
    e.set_tls(tls.unwrap());
    Connection::new(Arc::new(e), "test".into())
}

fn client(user: &str, hex: &str) -> PskSession {
    let keys = PskKeys::parse(Path::new("client.psk"), format!("{user}:{hex}").as_bytes()).unwrap();
    let key = keys.get(user.as_bytes()).unwrap();
    PskClientConfig::new(user, key.bytes()).unwrap().session().unwrap()
}

/// Gives the server's bytes to the client; returns the plaintext.
fn to_client(cl: &mut PskSession, mut back: &[u8]) -> Result<Vec<u8>, String> {
    let mut plain = Vec::new();
    while !back.is_empty() {
        let n = cl.read_tls(back);
        back = &back[n..];
        cl.process(&mut plain).map_err(|e| e.to_string())?;
    }
    Ok(plain)
}

fn from_client(cl: &mut PskSession) -> Vec<u8> {
    let mut out = Vec::new();
    cl.write_tls(&mut out);
    out
}

/// Greeting, flags and STARTTLS in plaintext, then the TLS handshake.
/// Err when the handshake fails on either side.
fn starttls(srv: &mut Connection, cl: &mut PskSession, chunk: usize) -> Result<(), String> {
    let mut hello = 3u32.to_be_bytes().to_vec();
    hello.extend(option(5, &[]));
    let out = feed(srv, &hello, chunk);
    assert_eq!(&out[..16], b"NBDMAGICIHAVEOPT");
    assert_eq!(&out[18..], &[0, 3, 0xe8, 0x89, 4, 0x55, 0x65, 0xa9, 0, 0, 0, 5, 0, 0, 0, 1, 0, 0, 0, 0]);
    assert!(srv.is_tls());
    cl.process(&mut Vec::new()).map_err(|e| e.to_string())?;
    for _ in 0..10 {
        let back = feed(srv, &from_client(cl), chunk);
        to_client(cl, &back)?;
        if srv.is_closed() {
            return Err("the server closed the connection".into());
        }
        if !cl.is_handshaking() && !cl.wants_write() {
            return Ok(());
        }
    }
    Err("TLS handshake did not finish".into())
}

/// Encrypts `plain`, feeds it, returns the decrypted answer.
fn exchange(srv: &mut Connection, cl: &mut PskSession, plain: &[u8], chunk: usize) -> Vec<u8> {
    cl.write(plain).unwrap();
    cl.flush().unwrap();
    let back = feed(srv, &from_client(cl), chunk);
    to_client(cl, &back).unwrap()
}

fn go(srv: &mut Connection, cl: &mut PskSession, chunk: usize) {
    let r = exchange(srv, cl, &option(7, &[0, 0, 0, 0, 0, 0]), chunk);
    // INFO(export), INFO(block size), ACK: the last reply is the ACK.
    assert_eq!(&r[r.len() - 20..r.len() - 8], &[0, 3, 0xe8, 0x89, 4, 0x55, 0x65, 0xa9, 0, 0, 0, 7]);
    assert_eq!(&r[r.len() - 8..r.len() - 4], &[0, 0, 0, 1]);
}

#[test]
fn psk_starttls_then_writes_and_reads_whatever_the_chunking() {
    for (chunk, reply_limit) in [(usize::MAX, u32::MAX), (1, u32::MAX), (4096, 1), (usize::MAX, 1)] {
        let mut srv = server("rw", TlsMode::Require);
        srv.set_reply_limit(reply_limit);
        let mut cl = client("alice", ALICE);
        starttls(&mut srv, &mut cl, chunk).unwrap();
        go(&mut srv, &mut cl, chunk);
        let payload: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
        let mut reqs = request(1, 1, 4096, payload.len() as u32, &payload);
        for cookie in 2..12 {
            reqs.extend(request(0, cookie, 4096, 50_000, &[]));
        }
        let r = exchange(&mut srv, &mut cl, &reqs, chunk);
        assert_eq!(r.len(), 16 + 10 * 50_016, "chunk {chunk}, reply limit {reply_limit}");
        assert_eq!(&r[16 + 16..16 + 16 + 50_000], &payload[..]);
        assert_eq!(&r[r.len() - 50_000..], &payload[..]);
        // NBD_CMD_DISC: the server closes with close_notify.
        let _ = exchange(&mut srv, &mut cl, &request(2, 99, 0, 0, &[]), chunk);
        assert!(srv.is_closed());
        assert!(cl.peer_closed());
    }
}

#[test]
fn the_second_user_of_the_file_gets_in_too() {
    let mut srv = server("bob", TlsMode::On);
    let mut cl = client("bob", "c0ffee");
    starttls(&mut srv, &mut cl, usize::MAX).unwrap();
    go(&mut srv, &mut cl, usize::MAX);
}

#[test]
fn a_wrong_key_or_an_unknown_username_closes_the_connection() {
    for (user, key) in [("alice", "c0ffee"), ("mallory", ALICE), ("bob", ALICE)] {
        let mut srv = server("wrong", TlsMode::Require);
        let mut cl = client(user, key);
        assert!(starttls(&mut srv, &mut cl, usize::MAX).is_err(), "{user}");
        assert!(srv.is_closed(), "{user}");
    }
}

#[test]
fn garbage_instead_of_a_client_hello_closes_the_connection() {
    for garbage in [&b"GET / HTTP/1.0\r\n\r\n"[..], &[0x16, 3, 1, 0xff, 0xff][..], &[0u8; 4096][..]] {
        let mut srv = server("garbage", TlsMode::Require);
        let mut input = 3u32.to_be_bytes().to_vec();
        input.extend(option(5, &[]));
        input.extend_from_slice(garbage);
        let _ = feed(&mut srv, &input, usize::MAX);
        srv.peer_closed();
        assert!(srv.is_closed(), "{garbage:?}");
    }
}

/// TLS records in a stream of whole records.
fn records(mut wire: &[u8]) -> usize {
    let mut n = 0;
    while wire.len() >= 5 {
        let len = u16::from_be_bytes([wire[3], wire[4]]) as usize;
        wire = &wire[(5 + len).min(wire.len())..];
        n += 1;
    }
    assert!(wire.is_empty(), "a partial record");
    n
}

#[test]
fn a_loop_turns_replies_share_records() {
    for (reply_limit, expect) in [(u32::MAX, 3), (1, 32)] {
        let mut srv = server("batch", TlsMode::Require);
        srv.set_reply_limit(reply_limit);
        let mut cl = client("alice", ALICE);
        starttls(&mut srv, &mut cl, usize::MAX).unwrap();
        go(&mut srv, &mut cl, usize::MAX);
        // 32 pipelined 1 KiB reads in one record: 32 x (16 + 1024) bytes
        // of replies, 3 records of 16 KiB when sealed together, 32 when
        // each reply is sealed alone.
        let mut reqs = Vec::new();
        for cookie in 0..32 {
            reqs.extend(request(0, cookie, cookie * 1024, 1024, &[]));
        }
        cl.write(&reqs).unwrap();
        cl.flush().unwrap();
        let back = feed(&mut srv, &from_client(&mut cl), usize::MAX);
        assert_eq!(records(&back), expect, "reply limit {reply_limit}");
    }
}
