//! `nbds+unix://` through the engine against ringbd's threaded server with
//! STARTTLS: pipelined writes and reads inside TLS, a client certificate,
//! a server certificate from another CA refused, a server without TLS
//! refused (never plaintext), and `tls-psk-file` refused with a reason.
//! Certificates are made in-process (ringbd-testpki), so these tests always
//! run.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;

use nbd_proto::TlsMode;
use ringbd_backend::memory::MemoryBackend;
use ringbd_client::{ClientConfig, Cmd, Engine, NbdUri};
use ringbd_server::engine_threads;
use ringbd_server::exports::{Export, Exports};
use ringbd_server::listener::Stream;
use ringbd_server::tls::{TlsOptions, TlsServer};
use ringbd_testpki::Pki;

const SIZE: u64 = 4 << 20;

/// A scratch directory, removed when dropped.
struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

/// Two certificate directories signed by different CAs (removed when
/// dropped).
fn pkis(tag: &str) -> (Pki, Pki) {
    (Pki::new(&format!("client-{tag}-a"), "ca-a"), Pki::new(&format!("client-{tag}-b"), "ca-b"))
}

/// Serves `listener` with the threaded engine, a thread per connection.
fn accept(listener: UnixListener, exports: Exports) {
    let exports = Arc::new(exports);
    thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(s) = s else { return };
            let ex = exports.clone();
            thread::spawn(move || engine_threads::serve(Stream::Unix(s), ex));
        }
    });
}

/// A threaded ringbd server on a Unix socket in `dir`.
fn server(dir: &Path, certs: Option<&Path>, verify_peer: bool) -> PathBuf {
    let path = dir.join(format!("nbd-{}.sock", certs.is_some() as u8 + 2 * verify_peer as u8));
    let listener = UnixListener::bind(&path).unwrap();
    let mut exports = Exports::default();
    exports.add(Export::new("", Arc::new(MemoryBackend::new(SIZE)), false)).unwrap();
    if let Some(c) = certs {
        let opts = TlsOptions {
            mode: TlsMode::Require,
            certificates: Some(c.to_owned()),
            verify_peer,
            ..TlsOptions::default()
        };
        exports.set_tls(TlsServer::load(&opts).unwrap());
    }
    accept(listener, exports);
    path
}

/// A threaded ringbd server on a Unix socket in `dir` with TLS-PSK keys.
fn psk_server(dir: &Path, keys: &Path) -> PathBuf {
    let path = dir.join("nbd-psk.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let mut exports = Exports::default();
    exports.add(Export::new("", Arc::new(MemoryBackend::new(SIZE)), false)).unwrap();
    let opts = TlsOptions { mode: TlsMode::Require, psk: Some(keys.to_owned()), ..TlsOptions::default() };
    exports.set_tls(TlsServer::load(&opts).unwrap());
    accept(listener, exports);
    path
}

fn uri(sock: &Path, query: &str) -> NbdUri {
    format!("nbds+unix:///?socket={}&{query}", sock.display()).parse().unwrap()
}

fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| ((offset + i as u64) * 13 % 251) as u8).collect()
}

#[test]
fn pipelined_io_inside_tls_with_a_client_certificate() {
    let (a, _b) = pkis("io");
    let sock = server(&a, Some(&a), true);
    let u = uri(&sock, &format!("tls-certificates={}", a.display()));
    let mut e = Engine::connect(&u, &ClientConfig::new(""), 2).unwrap();
    assert_eq!(e.size(), SIZE);
    assert!(e.negotiated().unwrap().extended, "negotiated again inside TLS");
    // 48 writes of 20 KiB (not a record multiple) in flight at once, then
    // reads of them in reverse, and a 1 MiB read across data and a hole.
    let bs = 20 * 1024u64;
    for i in 0..48u64 {
        e.submit(e.least_busy(), i, Cmd::write(i * bs, bs), pattern(i * bs, bs as usize)).unwrap();
    }
    let mut done = Vec::new();
    while done.len() < 48 {
        e.poll(&mut done, true).unwrap();
    }
    assert!(done.iter().all(|c| c.result.is_ok() && c.buf.len() as u64 == bs), "payloads come back");
    done.clear();
    for i in (0..48u64).rev() {
        e.submit((i % 2) as usize, i, Cmd::read(i * bs, bs), Vec::new()).unwrap();
    }
    while done.len() < 48 {
        e.poll(&mut done, true).unwrap();
    }
    for c in &done {
        c.result.as_ref().unwrap();
        assert!(c.buf == pattern(c.tag * bs, bs as usize), "read at {}", c.tag * bs);
    }
    let c = e.run(1, Cmd::read(0, 2 << 20), Vec::new()).unwrap();
    c.result.unwrap();
    assert!(c.buf[..(48 * bs) as usize] == pattern(0, (48 * bs) as usize)[..]);
    assert!(c.buf[(48 * bs) as usize..].iter().all(|&b| b == 0), "hole");
    let c = e.run(0, Cmd::block_status(0, SIZE), Vec::new()).unwrap();
    c.result.unwrap();
    assert!(!c.extents.is_empty());
    e.run(0, Cmd::flush(), Vec::new()).unwrap().result.unwrap();
    e.disconnect().unwrap();
    // The listing goes through TLS too.
    let l = ringbd_client::list_exports(&u).unwrap();
    assert_eq!(l.len(), 1);
}

#[test]
fn verification_and_refusals() {
    let (a, b) = pkis("refuse");
    let tls = server(&a, Some(&a), false);
    let err = |u: &NbdUri| match Engine::connect(u, &ClientConfig::new(""), 1) {
        Ok(_) => panic!("{u} connected"),
        Err(e) => e.to_string(),
    };
    // The server's certificate is from CA a; trusting CA b refuses it.
    let e = err(&uri(&tls, &format!("tls-certificates={}", b.display())));
    assert!(e.contains("UnknownIssuer") && e.contains("not signed by the CA"), "{e}");
    // ... unless verification is off.
    let u = uri(&tls, &format!("tls-certificates={}&tls-verify-peer=false", b.display()));
    Engine::connect(&u, &ClientConfig::new(""), 1).unwrap().disconnect().unwrap();
    // tls-hostname is checked: the certificate names localhost only.
    let e = err(&uri(&tls, &format!("tls-certificates={}&tls-hostname=nbd.example.com", a.display())));
    assert!(e.contains("not valid for name"), "{e}");
    let u = uri(&tls, &format!("tls-certificates={}&tls-hostname=localhost", a.display()));
    Engine::connect(&u, &ClientConfig::new(""), 1).unwrap().disconnect().unwrap();
    // A server without TLS: STARTTLS is refused, and that is the end.
    let plain = server(&a, None, false);
    let e = err(&uri(&plain, &format!("tls-certificates={}", a.display())));
    assert!(e.contains("refused NBD_OPT_STARTTLS") && e.contains("not falling back"), "{e}");
    // A PSK file that is not there says so, before connecting.
    let e = err(&uri(&tls, "tls-username=alice&tls-psk-file=/nonexistent/keys.psk"));
    assert!(e.contains("/nonexistent/keys.psk"), "{e}");
    // A missing CA file says so.
    let e = err(&uri(&tls, &format!("tls-certificates={}", a.join("nope").display())));
    assert!(e.contains("ca-cert.pem does not exist"), "{e}");
}

#[test]
fn a_server_that_wants_a_client_certificate() {
    let (a, b) = pkis("peer");
    let sock = server(&a, Some(&a), true);
    // Only the CA: no client certificate to show.
    let only_ca = a.join("only-ca");
    std::fs::create_dir_all(&only_ca).unwrap();
    std::fs::copy(a.join("ca-cert.pem"), only_ca.join("ca-cert.pem")).unwrap();
    let e = Engine::connect(
        &uri(&sock, &format!("tls-certificates={}", only_ca.display())),
        &ClientConfig::new(""),
        1,
    )
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(e.contains("TLS"), "{e}");
    // A client certificate from another CA.
    let mixed = a.join("mixed");
    std::fs::create_dir_all(&mixed).unwrap();
    std::fs::copy(a.join("ca-cert.pem"), mixed.join("ca-cert.pem")).unwrap();
    std::fs::copy(b.join("client-cert.pem"), mixed.join("client-cert.pem")).unwrap();
    std::fs::copy(b.join("client-key.pem"), mixed.join("client-key.pem")).unwrap();
    let r = Engine::connect(
        &uri(&sock, &format!("tls-certificates={}", mixed.display())),
        &ClientConfig::new(""),
        1,
    );
    assert!(r.is_err(), "a client certificate from another CA is refused");
}

/// The client's TLS layer against a rustls server in memory: the handshake,
/// then one loop turn's worth of requests (32 request headers with 1 KiB
/// payloads, 33,664 bytes in 64 pieces) given to `ClientTls::send` at once
/// become 3 records (16 KiB each at most), not 64, and decrypt to the same
/// bytes; replies come back through `receive`, fed whole and byte by byte.
#[test]
fn a_batch_becomes_few_records_in_memory() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use std::io::{IoSlice, Read, Write};

    let (a, _b) = pkis("records");
    let u = uri(Path::new("/nonexistent.sock"), &format!("tls-certificates={}", a.display()));
    let setup = ringbd_client::TlsSetup::new(&u).unwrap().unwrap();
    let mut client = setup.session().unwrap();
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(a.join("server-cert.pem")).unwrap().map(|c| c.unwrap()).collect();
    let key = PrivateKeyDer::from_pem_file(a.join("server-key.pem")).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let mut server = rustls::ServerConnection::new(Arc::new(config)).unwrap();
    let mut plain = Vec::new();
    for _ in 0..20 {
        let mut c2s = Vec::new();
        client.flush(&mut c2s).unwrap();
        let mut rd = &c2s[..];
        while !rd.is_empty() {
            server.read_tls(&mut rd).unwrap();
        }
        server.process_new_packets().unwrap();
        let mut s2c = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut s2c).unwrap();
        }
        client.receive(&s2c, &mut plain).unwrap();
        if !client.is_handshaking() && !server.is_handshaking() && !client.wants_write() {
            break;
        }
    }
    assert!(!client.is_handshaking() && !server.is_handshaking(), "handshake done");
    assert!(plain.is_empty());

    let headers: Vec<Vec<u8>> = (0..32u8).map(|i| vec![i; 28]).collect();
    let payloads: Vec<Vec<u8>> = (0..32u8).map(|i| vec![i ^ 0xff; 1024]).collect();
    let mut pieces = Vec::new();
    for (h, p) in headers.iter().zip(&payloads) {
        pieces.push(IoSlice::new(h));
        pieces.push(IoSlice::new(p));
    }
    let expect: Vec<u8> = pieces.iter().flat_map(|s| s.iter().copied()).collect();
    let mut wire = Vec::new();
    client.send(&pieces, &mut wire).unwrap();
    // Count the TLS records: 5-byte headers with their lengths.
    let (mut records, mut at) = (0, 0);
    while at + 5 <= wire.len() {
        assert_eq!(wire[at], 23, "application data records");
        at += 5 + usize::from(u16::from_be_bytes([wire[at + 3], wire[at + 4]]));
        records += 1;
    }
    assert_eq!(at, wire.len());
    assert_eq!(records, 3, "{} bytes in {records} records", expect.len());
    let mut rd = &wire[..];
    while !rd.is_empty() {
        server.read_tls(&mut rd).unwrap();
        server.process_new_packets().unwrap();
    }
    let mut got = Vec::new();
    server.reader().read_to_end(&mut got).ok();
    assert_eq!(got, expect);

    // Replies, whole and one byte at a time.
    let reply: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
    server.writer().write_all(&reply).unwrap();
    let mut s2c = Vec::new();
    while server.wants_write() {
        server.write_tls(&mut s2c).unwrap();
    }
    let (half, rest) = s2c.split_at(s2c.len() / 2);
    for b in half {
        client.receive(std::slice::from_ref(b), &mut plain).unwrap();
    }
    let r = client.receive(rest, &mut plain).unwrap();
    assert!(!r.closed);
    assert_eq!(plain, reply);
    // close_notify is seen as the end.
    server.send_close_notify();
    let mut s2c = Vec::new();
    while server.wants_write() {
        server.write_tls(&mut s2c).unwrap();
    }
    assert!(client.receive(&s2c, &mut plain).unwrap().closed);
    // Garbage instead of a record is an error, not a panic.
    assert!(client.receive(&[0x17, 3, 3, 0, 5, 1, 2, 3, 4, 5], &mut plain).is_err());
}

#[test]
fn pipelined_io_inside_tls_psk_and_wrong_keys_refused() {
    let root = std::env::temp_dir().join(format!("ringbd-client-psk-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let _g = Dir(root.clone());
    let keys = root.join("keys.psk");
    std::fs::write(
        &keys,
        "alice:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\nbob:0badc0de\n",
    )
    .unwrap();
    let sock = psk_server(&root, &keys);
    let u = uri(&sock, &format!("tls-username=alice&tls-psk-file={}", keys.display()));
    let mut e = Engine::connect(&u, &ClientConfig::new(""), 2).unwrap();
    assert!(e.negotiated().unwrap().extended, "negotiated again inside TLS");
    let bs = 20 * 1024u64;
    for i in 0..32u64 {
        e.submit(e.least_busy(), i, Cmd::write(i * bs, bs), pattern(i * bs, bs as usize)).unwrap();
    }
    let mut done = Vec::new();
    while done.len() < 32 {
        e.poll(&mut done, true).unwrap();
    }
    assert!(done.iter().all(|c| c.result.is_ok()), "writes acknowledged");
    done.clear();
    for i in 0..32u64 {
        e.submit((i % 2) as usize, i, Cmd::read(i * bs, bs), Vec::new()).unwrap();
    }
    while done.len() < 32 {
        e.poll(&mut done, true).unwrap();
    }
    for c in &done {
        assert_eq!(c.buf, pattern(c.tag * bs, bs as usize), "read {} inside TLS-PSK", c.tag);
    }
    e.disconnect().unwrap();
    // The right username with another user's key file line is refused.
    let wrong = root.join("wrong.psk");
    std::fs::write(&wrong, "alice:ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100\n")
        .unwrap();
    let u = uri(&sock, &format!("tls-username=alice&tls-psk-file={}", wrong.display()));
    let e = match Engine::connect(&u, &ClientConfig::new(""), 1) {
        Ok(_) => panic!("a wrong key connected"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("the server refused the TLS-PSK handshake as username \"alice\" (a wrong key"), "{e}");
    // A username that the file has no line for fails before connecting.
    let u = uri(&sock, &format!("tls-username=carol&tls-psk-file={}", keys.display()));
    let e = Engine::connect(&u, &ClientConfig::new(""), 1).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("no key for username \"carol\""), "{e}");
}

/// A server that acknowledges STARTTLS, reads the ClientHello and hangs up
/// without an alert, as GnuTLS servers (nbdkit) do with a wrong PSK.
#[test]
fn a_psk_server_that_hangs_up_in_the_handshake_gets_a_hint() {
    use std::io::{Read, Write};
    let root = std::env::temp_dir().join(format!("ringbd-client-psk-hangup-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let _g = Dir(root.clone());
    let keys = root.join("keys.psk");
    std::fs::write(&keys, "alice:00112233445566778899aabbccddeeff\n").unwrap();
    let sock = root.join("hangup.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let server = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        // NBDMAGIC, IHAVEOPT, FIXED_NEWSTYLE | NO_ZEROES
        s.write_all(b"NBDMAGICIHAVEOPT\x00\x03").unwrap();
        // Client flags, then IHAVEOPT, NBD_OPT_STARTTLS (5), length 0.
        let mut opt = [0u8; 4 + 16];
        s.read_exact(&mut opt).unwrap();
        assert_eq!(&opt[4..], b"IHAVEOPT\x00\x00\x00\x05\x00\x00\x00\x00", "STARTTLS first");
        // The reply magic, STARTTLS, NBD_REP_ACK, length 0.
        let mut ack = 0x0003_e889_0455_65a9u64.to_be_bytes().to_vec();
        ack.extend_from_slice(&[0, 0, 0, 5, 0, 0, 0, 1, 0, 0, 0, 0]);
        s.write_all(&ack).unwrap();
        let mut hello = [0u8; 5];
        s.read_exact(&mut hello).unwrap();
        assert_eq!(hello[0], 22, "a handshake record (the ClientHello)");
        // All of it: unread input would make the close a reset.
        let mut body = vec![0u8; u16::from_be_bytes([hello[3], hello[4]]) as usize];
        s.read_exact(&mut body).unwrap();
    });
    let u = uri(&sock, &format!("tls-username=alice&tls-psk-file={}", keys.display()));
    let e = match Engine::connect(&u, &ClientConfig::new(""), 1) {
        Ok(_) => panic!("connected to a server that hung up"),
        Err(e) => e.to_string(),
    };
    server.join().unwrap();
    assert!(
        e.contains(
            "server closed the connection during the TLS handshake (TLS-PSK as username \"alice\": \
             the server refused it? a wrong key, or a username it has no key for)"
        ),
        "{e}"
    );
}
