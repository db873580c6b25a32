//! STARTTLS through the connection state machine, against a rustls client
//! in memory: no sockets, so the record batching and the backpressure path
//! (plaintext decrypted but not yet taken) are driven deterministically.
//! Certificates are made in-process (ringbd-testpki), so these tests always
//! run.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

use nbd_proto::TlsMode;
use ringbd_backend::memory::MemoryBackend;
use ringbd_server::conn::Connection;
use ringbd_server::exports::{Export, Exports};
use ringbd_server::tls::{TlsOptions, TlsServer};
use ringbd_testpki::Pki;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

mod wire;
use wire::{drain, feed, option, request};

/// A CA, a server certificate for localhost and a client certificate, in
/// a fresh directory (removed when dropped).
fn pki(tag: &str) -> Pki {
    Pki::new(&format!("server-{tag}"), "test-ca")
}

fn server(dir: &Path, mode: TlsMode, verify_peer: bool) -> Connection {
    let mut e = Exports::default();
    e.add(Export::new("", Arc::new(MemoryBackend::new(1 << 20)), false)).unwrap();
    let opts = TlsOptions { mode, certificates: Some(dir.to_owned()), verify_peer, ..TlsOptions::default() };
    e.set_tls(TlsServer::load(&opts).unwrap());
    Connection::new(Arc::new(e), "test".into())
}

fn client(dir: &Path, with_cert: bool) -> ClientConnection {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(dir.join("ca-cert.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let b = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let cfg = if with_cert {
        let certs =
            CertificateDer::pem_file_iter(dir.join("client-cert.pem")).unwrap().map(|c| c.unwrap()).collect();
        let key = PrivateKeyDer::from_pem_file(dir.join("client-key.pem")).unwrap();
        b.with_client_auth_cert(certs, key).unwrap()
    } else {
        b.with_no_client_auth()
    };
    ClientConnection::new(Arc::new(cfg), ServerName::try_from("localhost").unwrap()).unwrap()
}

/// Runs the TLS handshake between `cl` and the server to completion.
fn handshake(srv: &mut Connection, cl: &mut ClientConnection, chunk: usize) {
    for _ in 0..20 {
        let mut to_srv = Vec::new();
        while cl.wants_write() {
            cl.write_tls(&mut to_srv).unwrap();
        }
        let back = feed(srv, &to_srv, chunk);
        let mut rd = &back[..];
        while !rd.is_empty() {
            cl.read_tls(&mut rd).unwrap();
            cl.process_new_packets().unwrap();
        }
        if !cl.is_handshaking() && !cl.wants_write() {
            return;
        }
    }
    panic!("TLS handshake did not finish");
}

/// Plaintext greeting, client flags, STARTTLS, its ACK, then TLS.
fn starttls(srv: &mut Connection, cl: &mut ClientConnection, chunk: usize) {
    let mut hello = 3u32.to_be_bytes().to_vec();
    hello.extend(option(5, &[]));
    let out = feed(srv, &hello, chunk);
    assert_eq!(&out[..16], b"NBDMAGICIHAVEOPT");
    assert_eq!(&out[18..], &[0, 3, 0xe8, 0x89, 4, 0x55, 0x65, 0xa9, 0, 0, 0, 5, 0, 0, 0, 1, 0, 0, 0, 0]);
    assert!(srv.is_tls());
    handshake(srv, cl, chunk);
}

/// Encrypts `plain`, feeds it, returns the decrypted answer.
fn exchange(srv: &mut Connection, cl: &mut ClientConnection, plain: &[u8], chunk: usize) -> Vec<u8> {
    cl.writer().write_all(plain).unwrap();
    let mut to_srv = Vec::new();
    while cl.wants_write() {
        cl.write_tls(&mut to_srv).unwrap();
    }
    let back = feed(srv, &to_srv, chunk);
    let mut rd = &back[..];
    let mut got = Vec::new();
    while !rd.is_empty() {
        cl.read_tls(&mut rd).unwrap();
        cl.process_new_packets().unwrap();
        let mut b = vec![0; 1 << 20];
        while let Ok(n) = cl.reader().read(&mut b) {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&b[..n]);
        }
    }
    got
}

/// GO "" after STARTTLS; returns the option replies' types.
fn go(srv: &mut Connection, cl: &mut ClientConnection, chunk: usize) {
    let r = exchange(srv, cl, &option(7, &[0, 0, 0, 0, 0, 0]), chunk);
    // INFO(export), INFO(block size), ACK: the last reply is the ACK.
    assert_eq!(&r[r.len() - 20..r.len() - 8], &[0, 3, 0xe8, 0x89, 4, 0x55, 0x65, 0xa9, 0, 0, 0, 7]);
    assert_eq!(&r[r.len() - 8..r.len() - 4], &[0, 0, 0, 1]);
}

#[test]
fn starttls_then_writes_and_reads_over_tls_whatever_the_chunking() {
    let dir = pki("rw");
    for (chunk, reply_limit) in [(usize::MAX, u32::MAX), (1, u32::MAX), (4096, 1), (usize::MAX, 1)] {
        let mut srv = server(&dir, TlsMode::Require, false);
        srv.set_reply_limit(reply_limit);
        let mut cl = client(&dir, false);
        starttls(&mut srv, &mut cl, chunk);
        go(&mut srv, &mut cl, chunk);
        // Many pipelined requests in one TLS record: with a reply limit of
        // 1 the server must stop midway and take the rest later.
        let payload: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
        let mut reqs = request(1, 1, 4096, payload.len() as u32, &payload);
        for cookie in 2..12 {
            reqs.extend(request(0, cookie, 4096, 50_000, &[]));
        }
        let r = exchange(&mut srv, &mut cl, &reqs, chunk);
        // 1 write reply (16 bytes) + 10 read replies (16 + 50,000 each).
        assert_eq!(r.len(), 16 + 10 * 50_016, "chunk {chunk}, reply limit {reply_limit}");
        assert_eq!(&r[16 + 16..16 + 16 + 50_000], &payload[..]);
        assert_eq!(&r[r.len() - 50_000..], &payload[..]);
        // NBD_CMD_DISC ends the session; the server says close_notify.
        let _ = exchange(&mut srv, &mut cl, &request(2, 99, 0, 0, &[]), chunk);
        assert!(srv.is_closed());
        assert!(cl.process_new_packets().unwrap().peer_has_closed());
    }
}

#[test]
fn a_second_starttls_is_invalid() {
    let dir = pki("twice");
    let mut srv = server(&dir, TlsMode::On, false);
    let mut cl = client(&dir, false);
    starttls(&mut srv, &mut cl, usize::MAX);
    let r = exchange(&mut srv, &mut cl, &option(5, &[]), usize::MAX);
    assert_eq!(&r[12..16], &[0x80, 0, 0, 3]);
    assert!(!srv.is_closed());
}

#[test]
fn garbage_instead_of_a_client_hello_closes_the_connection() {
    let dir = pki("garbage");
    for garbage in [
        &b"GET / HTTP/1.0\r\n\r\n"[..],
        &[0x16, 3, 1, 0xff, 0xff][..],
        &[0x17, 3, 3, 0, 1, 0][..],
        &[0u8; 4096][..],
    ] {
        let mut srv = server(&dir, TlsMode::Require, false);
        let mut input = 3u32.to_be_bytes().to_vec();
        input.extend(option(5, &[]));
        input.extend_from_slice(garbage);
        let _ = feed(&mut srv, &input, usize::MAX);
        assert!(srv.is_closed(), "{garbage:?}");
    }
}

#[test]
fn verify_peer_refuses_a_client_without_a_certificate_and_takes_one_with() {
    let dir = pki("peer");
    let mut srv = server(&dir, TlsMode::Require, true);
    let mut cl = client(&dir, true);
    starttls(&mut srv, &mut cl, usize::MAX);
    go(&mut srv, &mut cl, usize::MAX);

    let mut srv = server(&dir, TlsMode::Require, true);
    let mut cl = client(&dir, false);
    let mut hello = 3u32.to_be_bytes().to_vec();
    hello.extend(option(5, &[]));
    feed(&mut srv, &hello, usize::MAX);
    for _ in 0..10 {
        let mut to_srv = Vec::new();
        while cl.wants_write() {
            cl.write_tls(&mut to_srv).unwrap();
        }
        let back = feed(&mut srv, &to_srv, usize::MAX);
        let mut rd = &back[..];
        while !rd.is_empty() && cl.read_tls(&mut rd).is_ok() {
            if cl.process_new_packets().is_err() {
                break;
            }
        }
        if srv.is_closed() {
            return;
        }
    }
    panic!("a client without a certificate got through --tls-verify-peer");
}

#[test]
fn random_bytes_after_starttls_never_panic_and_close_the_connection() {
    let dir = pki("fuzz");
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..200 {
        let mut srv = server(&dir, TlsMode::Require, round % 2 == 0);
        let len = (next() % 3000) as usize + 1;
        let mut input = 3u32.to_be_bytes().to_vec();
        input.extend(option(5, &[]));
        // Half the rounds start like a TLS handshake record, to get past
        // the first checks.
        if round % 2 == 1 {
            input.extend_from_slice(&[0x16, 3, 1]);
        }
        input.extend((0..len).map(|_| next() as u8));
        let _ = feed(&mut srv, &input, (next() % 700) as usize + 1);
        // Either closed already or waiting for more of a record that will
        // never be valid; the peer's FIN ends it.
        srv.peer_closed();
        assert!(srv.is_closed());
    }
}

#[test]
fn a_corrupt_record_mid_session_closes_the_connection() {
    let dir = pki("corrupt");
    let mut srv = server(&dir, TlsMode::Require, false);
    let mut cl = client(&dir, false);
    starttls(&mut srv, &mut cl, usize::MAX);
    go(&mut srv, &mut cl, usize::MAX);
    cl.writer().write_all(&request(0, 1, 0, 4096, &[])).unwrap();
    let mut rec = Vec::new();
    while cl.wants_write() {
        cl.write_tls(&mut rec).unwrap();
    }
    let last = rec.len() - 1;
    rec[last] ^= 0x55; // the authentication tag no longer matches
    let _ = feed(&mut srv, &rec, usize::MAX);
    assert!(srv.is_closed());
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
    let dir = pki("batch");
    for (reply_limit, expect) in [(u32::MAX, 3), (1, 32)] {
        let mut srv = server(&dir, TlsMode::Require, false);
        srv.set_reply_limit(reply_limit);
        let mut cl = client(&dir, false);
        starttls(&mut srv, &mut cl, usize::MAX);
        go(&mut srv, &mut cl, usize::MAX);
        // 32 pipelined 1 KiB reads in one TLS record: 32 x (16 + 1024)
        // bytes of replies, which fit in 3 records of 16 KiB when sealed
        // together, and take 32 when each reply is sealed alone.
        let mut reqs = Vec::new();
        for cookie in 0..32 {
            reqs.extend(request(0, cookie, cookie * 1024, 1024, &[]));
        }
        cl.writer().write_all(&reqs).unwrap();
        let mut to_srv = Vec::new();
        while cl.wants_write() {
            cl.write_tls(&mut to_srv).unwrap();
        }
        let back = feed(&mut srv, &to_srv, usize::MAX);
        assert_eq!(records(&back), expect, "reply limit {reply_limit}");
    }
}

// --- kTLS: when the session may leave rustls, and what its keys are ---------

/// A client that offers only `suite` (and its protocol version).
fn client_with(dir: &Path, suite: rustls::SupportedCipherSuite) -> ClientConnection {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(dir.join("ca-cert.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = rustls::crypto::CryptoProvider {
        cipher_suites: vec![suite],
        ..rustls::crypto::ring::default_provider()
    };
    let cfg = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[suite.version()])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    ClientConnection::new(Arc::new(cfg), ServerName::try_from("localhost").unwrap()).unwrap()
}

/// One direction as the kernel would use it, read back from the
/// crypto_info bytes (include/uapi/linux/tls.h): key, the 12-byte nonce
/// base (salt then iv; ChaCha: iv), the TLS 1.2 GCM explicit nonce (the
/// kernel's `iv` field), the next sequence number.
struct Dir {
    tls13: bool,
    alg: &'static ring::aead::Algorithm,
    key: Vec<u8>,
    base: [u8; 12],
    explicit: [u8; 8],
    seq: u64,
}

fn parse_info(b: &[u8]) -> Dir {
    let version = u16::from_ne_bytes([b[0], b[1]]);
    let cipher = u16::from_ne_bytes([b[2], b[3]]);
    let mut base = [0u8; 12];
    let mut explicit = [0u8; 8];
    let (alg, key, seq): (&'static ring::aead::Algorithm, Vec<u8>, &[u8]) = match cipher {
        51 | 52 => {
            let klen = if cipher == 51 { 16 } else { 32 };
            explicit.copy_from_slice(&b[4..12]);
            base[..4].copy_from_slice(&b[12 + klen..16 + klen]);
            base[4..].copy_from_slice(&b[4..12]);
            let alg = if cipher == 51 { &ring::aead::AES_128_GCM } else { &ring::aead::AES_256_GCM };
            (alg, b[12..12 + klen].to_vec(), &b[16 + klen..24 + klen])
        }
        54 => {
            base.copy_from_slice(&b[4..16]);
            (&ring::aead::CHACHA20_POLY1305, b[16..48].to_vec(), &b[48..56])
        }
        other => panic!("cipher type {other}"),
    };
    assert_eq!(b.len(), if cipher == 51 { 40 } else { 56 });
    Dir {
        tls13: version == 0x0304,
        alg,
        key,
        base,
        explicit,
        seq: u64::from_be_bytes(seq.try_into().unwrap()),
    }
}

impl Dir {
    fn xor_nonce(&self) -> [u8; 12] {
        let mut n = self.base;
        for (a, b) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *a ^= b;
        }
        n
    }

    fn key(&self) -> ring::aead::LessSafeKey {
        ring::aead::LessSafeKey::new(ring::aead::UnboundKey::new(self.alg, &self.key).unwrap())
    }

    fn tls12_aad(&self, len: usize) -> Vec<u8> {
        let mut aad = self.seq.to_be_bytes().to_vec();
        aad.extend_from_slice(&[23, 3, 3]);
        aad.extend_from_slice(&(len as u16).to_be_bytes());
        aad
    }

    /// Decrypts one application-data record the way the kernel's RX would.
    fn open(&self, record: &[u8]) -> Vec<u8> {
        assert_eq!(record[0], 23, "an application data record");
        let hdr = &record[..5];
        let mut body = record[5..].to_vec();
        let gcm12 = !self.tls13 && self.alg != &ring::aead::CHACHA20_POLY1305;
        let (nonce, aad) = if self.tls13 {
            (self.xor_nonce(), hdr.to_vec())
        } else if gcm12 {
            let mut n = [0u8; 12];
            n[..4].copy_from_slice(&self.base[..4]);
            n[4..].copy_from_slice(&body[..8]);
            body.drain(..8);
            (n, self.tls12_aad(body.len() - 16))
        } else {
            (self.xor_nonce(), self.tls12_aad(body.len() - 16))
        };
        let nonce = ring::aead::Nonce::assume_unique_for_key(nonce);
        let plain = self.key().open_in_place(nonce, ring::aead::Aad::from(aad), &mut body).unwrap().to_vec();
        if self.tls13 {
            let (inner_type, data) = plain.split_last().unwrap();
            assert_eq!(*inner_type, 23);
            data.to_vec()
        } else {
            plain
        }
    }

    /// Encrypts one application-data record the way the kernel's TX would.
    fn seal(&self, data: &[u8]) -> Vec<u8> {
        let mut body = data.to_vec();
        let gcm12 = !self.tls13 && self.alg != &ring::aead::CHACHA20_POLY1305;
        let (nonce, aad, prefix) = if self.tls13 {
            body.push(23);
            let len = body.len() + 16;
            (self.xor_nonce(), [23, 3, 3, (len >> 8) as u8, len as u8].to_vec(), Vec::new())
        } else if gcm12 {
            let mut n = [0u8; 12];
            n[..4].copy_from_slice(&self.base[..4]);
            n[4..].copy_from_slice(&self.explicit);
            (n, self.tls12_aad(body.len()), self.explicit.to_vec())
        } else {
            (self.xor_nonce(), self.tls12_aad(body.len()), Vec::new())
        };
        let nonce = ring::aead::Nonce::assume_unique_for_key(nonce);
        self.key().seal_in_place_append_tag(nonce, ring::aead::Aad::from(aad), &mut body).unwrap();
        let len = prefix.len() + body.len();
        let mut rec = vec![23, 3, 3, (len >> 8) as u8, len as u8];
        rec.extend(prefix);
        rec.extend(body);
        rec
    }
}

#[test]
fn ktls_keys_decrypt_and_encrypt_real_records_for_every_suite() {
    let dir = pki("ktls-keys");
    use rustls::crypto::ring::cipher_suite::*;
    let suites = [
        TLS13_AES_128_GCM_SHA256,
        TLS13_AES_256_GCM_SHA384,
        TLS13_CHACHA20_POLY1305_SHA256,
        TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    ];
    for suite in suites {
        let mut srv = server(&dir, TlsMode::Require, false);
        let mut cl = client_with(&dir, suite);
        starttls(&mut srv, &mut cl, usize::MAX);
        go(&mut srv, &mut cl, usize::MAX);
        assert!(srv.ktls_idle(), "{suite:?}: idle after GO");
        let keys = srv.extract_ktls_keys().unwrap();
        assert!(srv.is_closed() || !srv.is_ktls(), "extraction alone does not claim kTLS");
        let (tx, rx) = (parse_info(keys.tx.as_bytes()), parse_info(keys.rx.as_bytes()));
        assert!(rx.seq > 0 || !tx.tls13, "{suite:?}: the client's GO record was counted");
        // The client's next record, sealed by rustls, opens with the RX keys.
        cl.writer().write_all(b"a request for the kernel").unwrap();
        let mut rec = Vec::new();
        while cl.wants_write() {
            cl.write_tls(&mut rec).unwrap();
        }
        assert_eq!(rx.open(&rec), b"a request for the kernel", "{suite:?}");
        // A record sealed with the TX keys opens in the rustls client.
        let mut rd = &tx.seal(b"a reply from the kernel")[..];
        cl.read_tls(&mut rd).unwrap();
        cl.process_new_packets().unwrap();
        let mut got = vec![0u8; 64];
        let n = cl.reader().read(&mut got).unwrap();
        assert_eq!(&got[..n], b"a reply from the kernel", "{suite:?}");
    }
}

#[test]
fn ktls_waits_for_a_record_boundary_and_an_empty_wire() {
    let dir = pki("ktls-idle");
    let mut srv = server(&dir, TlsMode::Require, false);
    let mut cl = client(&dir, false);
    starttls(&mut srv, &mut cl, usize::MAX);
    assert!(srv.ktls_idle(), "idle once the handshake is done and its records were taken");
    // Half a record: rustls holds part of it, the rest is still in the socket.
    cl.writer().write_all(&option(7, &[0, 0, 0, 0, 0, 0])).unwrap();
    let mut rec = Vec::new();
    while cl.wants_write() {
        cl.write_tls(&mut rec).unwrap();
    }
    let half = rec.len() / 2;
    assert_eq!(srv.receive(&rec[..half]), half);
    assert!(!srv.ktls_idle(), "mid-record");
    assert_eq!(srv.receive(&rec[half..]), rec.len() - half);
    assert!(!srv.ktls_idle(), "GO's reply waits to be sent");
    let back = drain(&mut srv);
    assert!(!back.is_empty());
    assert!(srv.ktls_idle(), "idle after the reply went out");
    // Not for a closed connection.
    srv.peer_closed();
    assert!(!srv.ktls_idle());
}
