//! A client and a server session driven against each other in memory.

use std::path::Path;
use std::sync::Arc;

use openssl::ssl::SslVersion;

use super::*;

const KEYS: &str =
    "# test keys\nalice:000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\nbob:c0ffee\n";

fn server() -> PskSession {
    let keys = PskKeys::parse(Path::new("keys.psk"), KEYS.as_bytes()).unwrap();
    PskServerConfig::new(Arc::new(keys)).unwrap().session().unwrap()
}

fn client_config(user: &str, hex: &str) -> PskClientConfig {
    let keys = PskKeys::parse(Path::new("k"), format!("{user}:{hex}").as_bytes()).unwrap();
    PskClientConfig::new(user, keys.get(user.as_bytes()).unwrap().bytes()).unwrap()
}

fn client(user: &str, hex: &str) -> PskSession {
    client_config(user, hex).session().unwrap()
}

fn alice() -> PskSession {
    client("alice", "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f")
}

/// Moves `from`'s records to `to` in pieces of `chunk` bytes, processing
/// after each; returns the plaintext `to` decrypted.
fn deliver(from: &mut PskSession, to: &mut PskSession, chunk: usize) -> Result<Vec<u8>, PskError> {
    let mut wire = Vec::new();
    from.write_tls(&mut wire);
    let mut plain = Vec::new();
    let mut at = 0;
    while at < wire.len() {
        let end = (at + chunk).min(wire.len());
        let mut piece = &wire[at..end];
        while !piece.is_empty() {
            let n = to.read_tls(piece);
            piece = &piece[n..];
            to.process(&mut plain)?;
        }
        at = end;
    }
    Ok(plain)
}

/// Runs the handshake to the end: Ok once both sides finished.
fn handshake(cl: &mut PskSession, srv: &mut PskSession, chunk: usize) -> Result<(), PskError> {
    cl.process(&mut Vec::new())?;
    for _ in 0..10 {
        deliver(cl, srv, chunk)?;
        deliver(srv, cl, chunk)?;
        if !cl.is_handshaking() && !srv.is_handshaking() && !cl.wants_write() && !srv.wants_write() {
            return Ok(());
        }
    }
    Err(PskError("handshake did not finish in 10 rounds".into()))
}

/// Counts the TLS records in `wire`.
fn records(mut wire: &[u8]) -> usize {
    let mut n = 0;
    while wire.len() >= 5 {
        let len = u16::from_be_bytes([wire[3], wire[4]]) as usize;
        wire = &wire[(5 + len).min(wire.len())..];
        n += 1;
    }
    n
}

#[test]
fn tls13_handshake_then_data_both_ways_whatever_the_chunking() {
    for chunk in [1, 7, 4096, usize::MAX] {
        let (mut cl, mut srv) = (alice(), server());
        handshake(&mut cl, &mut srv, chunk).unwrap();
        assert!(srv.describe().starts_with("TLSv1.3 TLS_"), "{}", srv.describe());
        assert!(srv.describe().ends_with("PSK username \"alice\""), "{}", srv.describe());
        assert_eq!(srv.username().as_deref(), Some("alice"));

        let request: Vec<u8> = (0..50_000u32).map(|i| i as u8).collect();
        cl.write(&request).unwrap();
        cl.flush().unwrap();
        assert_eq!(deliver(&mut cl, &mut srv, chunk).unwrap(), request);
        srv.write(b"reply").unwrap();
        srv.flush().unwrap();
        assert_eq!(deliver(&mut srv, &mut cl, chunk).unwrap(), b"reply");

        cl.send_close_notify();
        deliver(&mut cl, &mut srv, chunk).unwrap();
        assert!(srv.peer_closed());
    }
}

#[test]
fn tls12_with_ecdhe_psk_works_too() {
    let cfg = client_config("bob", "c0ffee");
    let mut ssl = Ssl::new(&cfg.ctx).unwrap();
    ssl.set_connect_state();
    ssl.set_max_proto_version(Some(SslVersion::TLS1_2)).unwrap();
    let mut cl = PskSession::new(ssl, Side::Client("bob".into())).unwrap();
    let mut srv = server();
    handshake(&mut cl, &mut srv, usize::MAX).unwrap();
    assert!(srv.describe().starts_with("TLSv1.2 ECDHE-PSK-CHACHA20-POLY1305"), "{}", srv.describe());
    cl.write(b"hello").unwrap();
    cl.flush().unwrap();
    assert_eq!(deliver(&mut cl, &mut srv, usize::MAX).unwrap(), b"hello");
}

#[test]
fn plaintext_written_during_the_handshake_is_sealed_after_it() {
    let (mut cl, mut srv) = (alice(), server());
    cl.write(b"early").unwrap();
    cl.flush().unwrap();
    cl.process(&mut Vec::new()).unwrap();
    let mut got = Vec::new();
    for _ in 0..5 {
        got.extend(deliver(&mut cl, &mut srv, usize::MAX).unwrap());
        deliver(&mut srv, &mut cl, usize::MAX).unwrap();
    }
    assert_eq!(got, b"early");
}

#[test]
fn a_wrong_key_fails_the_handshake() {
    let (mut cl, mut srv) = (client("alice", "00"), server());
    let e = handshake(&mut cl, &mut srv, usize::MAX).unwrap_err();
    assert!(e.0.starts_with("TLS-PSK handshake with username \"alice\" failed (wrong key?)"), "{e}");
    // An alert was queued for the client; further input is refused.
    assert!(srv.wants_write());
    assert!(srv.process(&mut Vec::new()).is_err());
}

#[test]
fn an_unknown_username_fails_the_handshake_and_is_named() {
    let (mut cl, mut srv) = (client("mallory", "c0ffee"), server());
    let e = handshake(&mut cl, &mut srv, usize::MAX).unwrap_err();
    assert!(e.0.starts_with("unknown PSK username \"mallory\""), "{e}");
}

/// The server refuses the client's handshake; the client then gets the
/// server's alert. Returns the client's error.
fn refused_client(cl: &mut PskSession, srv: &mut PskSession) -> PskError {
    handshake(cl, srv, usize::MAX).unwrap_err();
    assert!(srv.wants_write(), "the server queued no alert");
    let e = deliver(srv, cl, usize::MAX).unwrap_err();
    assert!(cl.process(&mut Vec::new()).is_err(), "the client session went on after the failure");
    e
}

#[test]
fn the_client_says_the_server_refused_a_wrong_key() {
    let (mut cl, mut srv) = (client("alice", "00"), server());
    let e = refused_client(&mut cl, &mut srv);
    // Not the server's wording ("before a PSK username came"): the client
    // knows which username it offered.
    assert!(
        e.0.starts_with(
            "the server refused the TLS-PSK handshake as username \"alice\" \
             (a wrong key, or a username it has no key for?): "
        ),
        "{e}"
    );
    assert!(e.0.contains("alert"), "{e}");
}

#[test]
fn the_client_says_the_server_refused_an_unknown_username() {
    let (mut cl, mut srv) = (client("mallory", "c0ffee"), server());
    let e = refused_client(&mut cl, &mut srv);
    assert!(e.0.starts_with("the server refused the TLS-PSK handshake as username \"mallory\""), "{e}");
}

#[test]
fn garbage_from_the_server_is_not_called_a_refusal() {
    let mut cl = alice();
    cl.process(&mut Vec::new()).unwrap();
    cl.write_tls(&mut Vec::new());
    cl.read_tls(b"this is not a TLS ServerHello\r\n");
    let e = cl.process(&mut Vec::new()).unwrap_err();
    assert!(e.0.starts_with("TLS-PSK handshake as username \"alice\" failed: "), "{e}");
}

#[test]
fn garbage_instead_of_a_client_hello_fails() {
    let mut srv = server();
    let n = srv.read_tls(b"this is not a TLS ClientHello\r\n");
    assert_eq!(n, 31);
    let e = srv.process(&mut Vec::new()).unwrap_err();
    assert!(e.0.starts_with("TLS-PSK handshake failed before a PSK username came"), "{e}");
}

#[test]
fn small_writes_share_records_and_large_ones_fill_them() {
    let (mut cl, mut srv) = (alice(), server());
    handshake(&mut cl, &mut srv, usize::MAX).unwrap();
    // 32 replies of 16 + 1024 bytes: 33,280 bytes in 3 records, not 64.
    for i in 0..32u8 {
        srv.write(&[i; 16]).unwrap();
        srv.write(&[i; 1024]).unwrap();
    }
    srv.flush().unwrap();
    let mut wire = Vec::new();
    srv.write_tls(&mut wire);
    assert_eq!(records(&wire), 3);
    let mut plain = Vec::new();
    let mut rest = &wire[..];
    while !rest.is_empty() {
        let n = cl.read_tls(rest);
        rest = &rest[n..];
        cl.process(&mut plain).unwrap();
    }
    assert_eq!(plain.len(), 32 * 1040);
    // A header, then 1 MiB: 65 records (the first one filled from both).
    srv.write(&[1; 16]).unwrap();
    srv.write(&vec![2; 1 << 20]).unwrap();
    srv.flush().unwrap();
    wire.clear();
    srv.write_tls(&mut wire);
    assert_eq!(records(&wire), 65);
    let mut expect = vec![1u8; 16];
    expect.extend(vec![2u8; 1 << 20]);
    plain.clear();
    let mut rest = &wire[..];
    while !rest.is_empty() {
        let n = cl.read_tls(rest);
        rest = &rest[n..];
        cl.process(&mut plain).unwrap();
    }
    assert_eq!(plain, expect);
}
