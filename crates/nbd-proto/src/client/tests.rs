//! Client-side tests: hex wire literals, and the client driven against this
//! crate's own server handshake in memory.

use super::*;
use crate::codec::hex;
use crate::export::{BlockSizes, ExportListing};
use crate::handshake::tests::catalog;
use crate::handshake::{Outcome, ServerHandshake};
use crate::transmission::Extent;
use crate::wire::{cmd_flags, tx_flags, CmdType, OptCode, RepType};

/// Drives client and server handshakes against each other, byte by byte
/// where `trickle`, until the client has an outcome (bounded).
fn pair(cfg: ClientConfig, trickle: bool) -> (ClientOutcome, Option<Outcome>) {
    pair_with(ServerHandshake::new(catalog()), cfg, trickle)
}

/// [`pair`] against a given server; when both sides wait for TLS the
/// (simulated, transparent) TLS layer starts on both.
fn pair_with(
    mut server: ServerHandshake<Vec<crate::ExportDescriptor>>,
    cfg: ClientConfig,
    trickle: bool,
) -> (ClientOutcome, Option<Outcome>) {
    let mut client = ClientHandshake::new(cfg);
    let (mut to_client, mut to_server) = (Vec::new(), Vec::new());
    for _ in 0..10_000 {
        to_client.extend(server.take_output());
        let n = if trickle { to_client.len().min(1) } else { to_client.len() };
        let mut avail = n;
        loop {
            let used = client.handle(&to_client[..avail]).expect("client handshake");
            to_client.drain(..used);
            if used == 0 {
                if avail < to_client.len() {
                    avail = (avail + 1).min(to_client.len());
                    continue;
                }
                break;
            }
            avail = to_client.len().min(avail);
        }
        to_server.extend(client.take_output());
        if let Some(o) = client.outcome() {
            return (o.clone(), server.outcome().cloned());
        }
        let used = server.handle(&to_server).expect("server handshake");
        to_server.drain(..used);
        to_client.extend(server.take_output());
        if client.tls_pending() && server.starttls_pending() && to_server.is_empty() {
            assert!(!client.tls(), "TLS starts once");
            server.tls_started();
            client.tls_started().expect("options after TLS");
            assert!(client.tls());
        }
    }
    panic!("handshake did not finish");
}

#[test]
fn starttls_then_negotiation_starts_again() {
    use crate::handshake::TlsMode;
    let mut cfg = ClientConfig::new("");
    cfg.starttls = true;
    for trickle in [false, true] {
        let server = ServerHandshake::with_tls(catalog(), TlsMode::Require);
        let (out, server) = pair_with(server, cfg.clone(), trickle);
        let ClientOutcome::Connected(neg) = out else { panic!("{out:?}") };
        assert!(neg.extended && neg.structured, "negotiated inside TLS");
        assert_eq!(neg.base_allocation, Some(crate::handshake::BASE_ALLOCATION_ID));
        assert!(neg.refused.is_empty(), "{:?}", neg.refused);
        assert!(matches!(server, Some(Outcome::Transmission(_))));
    }
    let mut list = cfg.clone();
    list.list_exports = true;
    let (out, _) = pair_with(ServerHandshake::with_tls(catalog(), TlsMode::On), list, false);
    assert!(matches!(out, ClientOutcome::Listed(ref l) if l.len() == 2), "{out:?}");
}

/// STARTTLS in wire literals: the option, its ACK, nothing consumed after
/// it until `tls_started`, then the first option again.
#[test]
fn starttls_on_the_wire() {
    let mut cfg = ClientConfig::new("");
    cfg.starttls = true;
    let mut c = ClientHandshake::new(cfg);
    assert_eq!(c.handle(&hex("4e42444d41474943 49484156454f5054 0003")), Ok(18));
    assert_eq!(c.take_output(), hex("00000003 49484156454f5054 00000005 00000000"));
    // The ACK, followed by what would be the TLS ServerHello.
    let mut ack = hex("0003e889045565a9 00000005 00000001 00000000");
    ack.extend(hex("16030300"));
    assert_eq!(c.handle(&ack), Ok(20));
    assert!(c.tls_pending() && !c.tls());
    assert_eq!(c.handle(&ack[20..]), Ok(0), "TLS bytes are not NBD's");
    assert!(c.take_output().is_empty());
    c.tls_started().unwrap();
    assert!(c.tls() && !c.tls_pending());
    assert_eq!(c.take_output(), hex("49484156454f5054 0000000b 00000000"));
}

#[test]
fn refused_starttls_is_an_error_never_plaintext() {
    for (reply, name) in [("80000001", RepType::ERR_UNSUP), ("80000002", RepType::ERR_POLICY)] {
        let mut cfg = ClientConfig::new("");
        cfg.starttls = true;
        let mut c = ClientHandshake::new(cfg);
        c.handle(&hex("4e42444d41474943 49484156454f5054 0003")).unwrap();
        c.take_output();
        let e = c.handle(&hex(&format!("0003e889045565a9 00000005 {reply} 00000002 6e6f"))).unwrap_err();
        assert_eq!(e, ClientHandshakeError::TlsRefused { reply: name, message: "no".into() });
        assert!(e.to_string().contains("not falling back to plaintext"), "{e}");
        assert!(c.take_output().is_empty(), "no option goes out in plaintext");
    }
    // Against our server with TLS off.
    let mut cfg = ClientConfig::new("");
    cfg.starttls = true;
    let mut server = ServerHandshake::new(catalog());
    let mut c = ClientHandshake::new(cfg.clone());
    let e = loop {
        match c.handle(&server.take_output()) {
            Ok(_) => {}
            Err(e) => break e,
        }
        let o = c.take_output();
        assert_eq!(server.handle(&o), Ok(o.len()));
    };
    assert!(matches!(e, ClientHandshakeError::TlsRefused { reply: RepType::ERR_UNSUP, .. }), "{e}");
    // No fixed newstyle: STARTTLS cannot be sent.
    let mut c = ClientHandshake::new(cfg.clone());
    assert!(matches!(
        c.handle(&hex("4e42444d41474943 49484156454f5054 0002")),
        Err(ClientHandshakeError::Unsupported(_))
    ));
    // An ACK with data is malformed.
    let mut c = ClientHandshake::new(cfg);
    c.handle(&hex("4e42444d41474943 49484156454f5054 0003")).unwrap();
    assert!(matches!(
        c.handle(&hex("0003e889045565a9 00000005 00000001 00000001 00")),
        Err(ClientHandshakeError::Malformed { .. })
    ));
}

#[test]
fn full_negotiation_against_our_server() {
    let (out, server) = pair(ClientConfig::new(""), false);
    let ClientOutcome::Connected(neg) = out else { panic!("{out:?}") };
    assert!(neg.extended && neg.structured);
    assert_eq!(neg.size, 0x10_0000);
    assert_eq!(neg.base_allocation, Some(crate::handshake::BASE_ALLOCATION_ID));
    assert_eq!(neg.block_sizes, Some(BlockSizes::default()));
    assert_eq!(neg.description.as_deref(), Some("mem"));
    assert!(neg.flags & tx_flags::CAN_MULTI_CONN != 0);
    let Some(Outcome::Transmission(s)) = server else { panic!("server not in transmission") };
    assert!(s.extended && s.base_allocation.is_some());
}

#[test]
fn byte_at_a_time_gives_the_same_result() {
    let mut cfg = ClientConfig::new("ro");
    cfg.list_meta = true;
    let (out, _) = pair(cfg, true);
    let ClientOutcome::Connected(neg) = out else { panic!("{out:?}") };
    assert_eq!(neg.size, 4096);
    assert!(neg.flags & tx_flags::READ_ONLY != 0);
    assert_eq!(neg.meta_contexts, vec!["base:allocation".to_owned()]);
}

#[test]
fn list_exports() {
    let mut cfg = ClientConfig::new("");
    cfg.list_exports = true;
    let (out, _) = pair(cfg, false);
    assert_eq!(
        out,
        ClientOutcome::Listed(vec![
            ExportListing { name: String::new(), description: "mem".into() },
            ExportListing { name: "ro".into(), description: String::new() },
        ])
    );
}

#[test]
fn unknown_export_is_refused_with_the_reply_name() {
    let mut server = ServerHandshake::new(catalog());
    let mut client = ClientHandshake::new(ClientConfig::new("nope"));
    let mut err = None;
    for _ in 0..20 {
        let b = server.take_output();
        match client.handle(&b) {
            Ok(n) => assert_eq!(n, b.len()),
            Err(e) => {
                err = Some(e);
                break;
            }
        }
        let o = client.take_output();
        assert_eq!(server.handle(&o), Ok(o.len()));
    }
    let e = err.expect("an error");
    assert!(
        matches!(e, ClientHandshakeError::Refused { option: OptCode::GO, reply: RepType::ERR_UNKNOWN, .. }),
        "{e}"
    );
}

/// A simple-replies-only server (nbd-server 3.24 style) in wire literals:
/// refuses EXTENDED_HEADERS and STRUCTURED_REPLY, answers GO.
#[test]
fn falls_back_to_simple_replies() {
    let mut c = ClientHandshake::new(ClientConfig::new("disk"));
    assert_eq!(c.handle(&hex("4e42444d41474943 49484156454f5054 0003")), Ok(18));
    let out = c.take_output();
    assert_eq!(out, hex("00000003 49484156454f5054 0000000b 00000000"));
    let unsup = |opt: &str| hex(&format!("0003e889045565a9 {opt} 80000001 00000000"));
    assert_eq!(c.handle(&unsup("0000000b")), Ok(20));
    assert_eq!(c.take_output(), hex("49484156454f5054 00000008 00000000"));
    assert_eq!(c.handle(&unsup("00000008")), Ok(20));
    // GO "disk", 3 info requests: NAME, DESCRIPTION, BLOCK_SIZE.
    assert_eq!(
        c.take_output(),
        hex("49484156454f5054 00000007 00000010 00000004 6469736b 0003 0001 0002 0003")
    );
    let mut replies = hex("0003e889045565a9 00000007 00000003 0000000c 0000 0000000000100000 0003");
    replies.extend(hex("0003e889045565a9 00000007 00000001 00000000"));
    assert_eq!(c.handle(&replies), Ok(replies.len()));
    let Some(ClientOutcome::Connected(neg)) = c.outcome() else { panic!() };
    assert!(!neg.structured && !neg.extended && neg.base_allocation.is_none());
    assert_eq!((neg.size, neg.flags), (0x10_0000, 3));
    assert_eq!(
        neg.refused,
        vec![
            (OptCode::EXTENDED_HEADERS, RepType::ERR_UNSUP),
            (OptCode::STRUCTURED_REPLY, RepType::ERR_UNSUP)
        ]
    );
}

#[test]
fn old_server_without_go_uses_export_name() {
    let mut cfg = ClientConfig::new("");
    cfg.extended = false;
    cfg.structured = false;
    let mut c = ClientHandshake::new(cfg);
    // Fixed newstyle without NO_ZEROES.
    assert_eq!(c.handle(&hex("4e42444d41474943 49484156454f5054 0001")), Ok(18));
    assert_eq!(
        c.take_output(),
        hex("00000001 49484156454f5054 00000007 0000000c 00000000 0003 0001 0002 0003")
    );
    assert_eq!(c.handle(&hex("0003e889045565a9 00000007 80000001 00000000")), Ok(20));
    assert_eq!(c.take_output(), hex("49484156454f5054 00000001 00000000"));
    let mut reply = hex("0000000000002000 0001");
    assert_eq!(c.handle(&reply), Ok(0), "waits for the 124 zero bytes");
    reply.extend(vec![0u8; 124]);
    assert_eq!(c.handle(&reply), Ok(134));
    let Some(ClientOutcome::Connected(neg)) = c.outcome() else { panic!() };
    assert_eq!(neg.size, 0x2000);
}

#[test]
fn hostile_handshakes_are_errors() {
    let mut c = ClientHandshake::new(ClientConfig::new(""));
    assert_eq!(
        c.handle(&hex("4142434441424344 49484156454f5054 0003")),
        Err(ClientHandshakeError::NotNbd(0x4142434441424344))
    );
    let mut c = ClientHandshake::new(ClientConfig::new(""));
    assert_eq!(c.handle(&hex("4e42444d41474943 0000420281861253 0000")), Err(ClientHandshakeError::Oldstyle));
    let mut c = ClientHandshake::new(ClientConfig::new(""));
    c.handle(&hex("4e42444d41474943 49484156454f5054 0003")).unwrap();
    // Reply to the wrong option.
    assert!(matches!(
        c.handle(&hex("0003e889045565a9 00000003 00000001 00000000")),
        Err(ClientHandshakeError::UnexpectedReply { .. })
    ));
    let mut c = ClientHandshake::new(ClientConfig::new(""));
    c.handle(&hex("4e42444d41474943 49484156454f5054 0003")).unwrap();
    assert!(matches!(
        c.handle(&hex("0003e889045565a9 0000000b 00000001 7fffffff")),
        Err(ClientHandshakeError::ReplyTooLarge { .. })
    ));
}

#[test]
fn go_without_export_info_is_malformed() {
    let mut cfg = ClientConfig::new("");
    cfg.extended = false;
    cfg.structured = false;
    let mut c = ClientHandshake::new(cfg);
    c.handle(&hex("4e42444d41474943 49484156454f5054 0003")).unwrap();
    let e = c.handle(&hex("0003e889045565a9 00000007 00000001 00000000")).unwrap_err();
    assert!(matches!(e, ClientHandshakeError::Malformed { .. }), "{e}");
    // Truncated INFO_EXPORT.
    let mut c =
        ClientHandshake::new(ClientConfig { extended: false, structured: false, ..ClientConfig::new("") });
    c.handle(&hex("4e42444d41474943 49484156454f5054 0003")).unwrap();
    let e = c.handle(&hex("0003e889045565a9 00000007 00000003 00000004 0000 0000")).unwrap_err();
    assert!(matches!(e, ClientHandshakeError::Malformed { .. }), "{e}");
}

fn neg(structured: bool, extended: bool) -> ClientNegotiated {
    ClientNegotiated {
        export: String::new(),
        size: 1 << 20,
        flags: tx_flags::HAS_FLAGS | tx_flags::SEND_DF | tx_flags::SEND_FLUSH,
        structured: structured || extended,
        extended,
        base_allocation: Some(1),
        block_sizes: None,
        name: None,
        description: None,
        meta_contexts: vec![],
        refused: vec![],
    }
}

fn req(typ: CmdType, offset: u64, len: u64) -> ClientRequest {
    ClientRequest { typ, flags: 0, cookie: 7, offset, len }
}

#[test]
fn encodes_compact_and_extended_requests() {
    let s = ClientSession::new(neg(true, false));
    let mut out = Vec::new();
    let r = ClientRequest { flags: cmd_flags::FUA, ..req(CmdType::WRITE, 0x1000, 0x200) };
    s.encode_request(&mut out, &r).unwrap();
    assert_eq!(out, hex("25609513 0001 0001 0000000000000007 0000000000001000 00000200"));
    assert_eq!(
        s.encode_request(&mut out, &req(CmdType::READ, 0, 1 << 32)),
        Err(EncodeError::LengthTooLarge(1 << 32))
    );
    let x = ClientSession::new(neg(false, true));
    out.clear();
    x.encode_request(&mut out, &r).unwrap();
    assert_eq!(out, hex("21e41c71 0021 0001 0000000000000007 0000000000001000 0000000000000200"));
    out.clear();
    x.encode_request(&mut out, &req(CmdType::BLOCK_STATUS, 0, 1 << 32)).unwrap();
    assert_eq!(out, hex("21e41c71 0000 0007 0000000000000007 0000000000000000 0000000100000000"));
    let e = x.encode_request(
        &mut out,
        &ClientRequest { flags: cmd_flags::FAST_ZERO, ..req(CmdType::WRITE_ZEROES, 0, 1) },
    );
    assert_eq!(e, Err(EncodeError::Flag("NBD_CMD_FLAG_FAST_ZERO")));
}

fn decode(
    s: &ClientSession,
    buf: &[u8],
    r: ClientRequest,
) -> Result<Option<(Reply<'static>, usize)>, ReplyError> {
    let leaked: &'static [u8] = Vec::leak(buf.to_vec());
    s.decode_reply(leaked, |c| (c == r.cookie).then_some(r))
}

#[test]
fn decodes_simple_replies() {
    let s = ClientSession::new(neg(false, false));
    let read = req(CmdType::READ, 0x200, 4);
    let b = hex("67446698 00000000 0000000000000007 deadbeef");
    assert_eq!(decode(&s, &b[..19], read), Ok(None));
    let (rep, n) = decode(&s, &b, read).unwrap().unwrap();
    assert_eq!(n, 20);
    assert_eq!(
        rep,
        Reply { cookie: 7, done: true, chunk: ReplyChunk::Data { offset: 0x200, data: &b[16..] } }
    );
    let err = hex("67446698 00000005 0000000000000007");
    let (rep, _) = decode(&s, &err, read).unwrap().unwrap();
    assert!(matches!(rep.chunk, ReplyChunk::Error { errno: 5, .. }));
    let (rep, n) = decode(&s, &err[..], req(CmdType::FLUSH, 0, 0)).unwrap().unwrap();
    assert_eq!((n, rep.done), (16, true));
    assert!(matches!(rep.chunk, ReplyChunk::Error { errno: 5, .. }));
    assert_eq!(
        decode(&s, &hex("67446698 00000000 0000000000000009"), read),
        Err(ReplyError::UnknownCookie(9))
    );
}

#[test]
fn decodes_structured_chunks() {
    let s = ClientSession::new(neg(true, false));
    let read = req(CmdType::READ, 0x1000, 0x2000);
    let data = hex("668e33ef 0000 0001 0000000000000007 0000000c 0000000000001000 01020304");
    let (rep, n) = decode(&s, &data, read).unwrap().unwrap();
    assert_eq!(n, data.len());
    assert!(!rep.done);
    assert!(matches!(rep.chunk, ReplyChunk::Data { offset: 0x1000, data: [1, 2, 3, 4] }));
    let hole = hex("668e33ef 0001 0002 0000000000000007 0000000c 0000000000001004 00001ffc");
    let (rep, _) = decode(&s, &hole, read).unwrap().unwrap();
    assert_eq!(rep, Reply { cookie: 7, done: true, chunk: ReplyChunk::Hole { offset: 0x1004, len: 0x1ffc } });
    let none = hex("668e33ef 0001 0000 0000000000000007 00000000");
    assert_eq!(decode(&s, &none, read).unwrap().unwrap().0.chunk, ReplyChunk::Ok);
    let bs = req(CmdType::BLOCK_STATUS, 0, 0x10000);
    let status =
        hex("668e33ef 0001 0005 0000000000000007 00000014 00000001 00001000 00000000 0000f000 00000003");
    let (rep, _) = decode(&s, &status, bs).unwrap().unwrap();
    assert_eq!(
        rep.chunk,
        ReplyChunk::BlockStatus {
            context: 1,
            extents: vec![Extent { len: 0x1000, flags: 0 }, Extent { len: 0xf000, flags: 3 }]
        }
    );
    let error = hex("668e33ef 0001 8001 0000000000000007 00000009 00000005 0003 626164");
    let (rep, _) = decode(&s, &error, read).unwrap().unwrap();
    assert_eq!(rep.chunk, ReplyChunk::Error { errno: 5, message: "bad".into(), offset: None });
    let error_off = hex("668e33ef 0001 8002 0000000000000007 0000000e 0000001c 0000 0000000000001800");
    let (rep, _) = decode(&s, &error_off, read).unwrap().unwrap();
    assert_eq!(rep.chunk, ReplyChunk::Error { errno: 28, message: String::new(), offset: Some(0x1800) });
    // Unknown error type: errored, not fatal.
    let unknown_err = hex("668e33ef 0001 8123 0000000000000007 00000008 00000005 0000 ffff");
    assert!(matches!(
        decode(&s, &unknown_err, read).unwrap().unwrap().0.chunk,
        ReplyChunk::Error { errno: 5, .. }
    ));
}

#[test]
fn decodes_extended_chunks() {
    let s = ClientSession::new(neg(false, true));
    let bs = req(CmdType::BLOCK_STATUS, 0, 0x10000);
    let status = hex("6e8a278c 0001 0006 0000000000000007 0000000000000000 0000000000000028
         00000001 00000002 0000000000001000 0000000000000000 000000000000f000 0000000000000003");
    let (rep, n) = decode(&s, &status, bs).unwrap().unwrap();
    assert_eq!(n, status.len());
    assert!(matches!(rep.chunk, ReplyChunk::BlockStatus { context: 1, ref extents } if extents.len() == 2));
    let read = req(CmdType::READ, 0, 4);
    let data = hex(
        "6e8a278c 0001 0001 0000000000000007 0000000000000000 000000000000000c 0000000000000000 aabbccdd",
    );
    let (rep, _) = decode(&s, &data, read).unwrap().unwrap();
    assert!(matches!(rep.chunk, ReplyChunk::Data { offset: 0, data: [0xaa, 0xbb, 0xcc, 0xdd] }));
    // Simple replies are forbidden with extended headers.
    assert_eq!(
        decode(&s, &hex("67446698 00000000 0000000000000007"), read),
        Err(ReplyError::BadMagic(0x67446698))
    );
}

#[test]
fn protocol_violations_are_errors() {
    let s = ClientSession::new(neg(true, false));
    let read = req(CmdType::READ, 0x1000, 4);
    let v = |b: &str, r| matches!(decode(&s, &hex(b), r), Err(ReplyError::Violation { .. }));
    // Data outside the requested range.
    assert!(v("668e33ef 0001 0001 0000000000000007 0000000c 0000000000000ffc 01020304", read));
    // More data than the request asked for.
    assert!(v("668e33ef 0001 0001 0000000000000007 0000000d 0000000000001000 0102030405", read));
    // Data chunk to a non-read.
    assert!(v(
        "668e33ef 0001 0001 0000000000000007 0000000c 0000000000001000 01020304",
        req(CmdType::WRITE, 0x1000, 4)
    ));
    // Block status of 4 + 7 bytes.
    assert!(v(
        "668e33ef 0001 0005 0000000000000007 0000000b 00000001 00001000 000000",
        req(CmdType::BLOCK_STATUS, 0, 4096)
    ));
    // Error chunk with a message longer than the chunk.
    assert!(v("668e33ef 0001 8001 0000000000000007 00000006 00000005 0009", read));
    // Error 0.
    assert!(v("668e33ef 0001 8001 0000000000000007 00000006 00000000 0000", read));
    // Simple success with data after structured replies.
    assert!(v("67446698 00000000 0000000000000007", read));
    // A huge length never makes the decoder wait for gigabytes or allocate.
    assert!(v("668e33ef 0001 0005 0000000000000007 ffffffff", req(CmdType::BLOCK_STATUS, 0, 4096)));
    assert!(matches!(decode(&s, &hex("deadbeef"), read), Err(ReplyError::BadMagic(0xdeadbeef))));
}

/// Every prefix and every single-byte corruption of valid replies decodes
/// to something or an error, never a panic.
#[test]
fn corrupted_replies_never_panic() {
    let s = ClientSession::new(neg(true, false));
    let x = ClientSession::new(neg(false, true));
    let samples = [
        hex("668e33ef 0000 0001 0000000000000007 0000000c 0000000000001000 01020304"),
        hex("668e33ef 0001 0005 0000000000000007 00000014 00000001 00001000 00000000 0000f000 00000003"),
        hex("668e33ef 0001 8002 0000000000000007 0000000e 0000001c 0000 0000000000001800"),
        hex("6e8a278c 0001 0006 0000000000000007 0000000000000000 0000000000000018 00000001 00000001 0000000000001000 0000000000000000"),
    ];
    let reqs = [req(CmdType::READ, 0x1000, 0x2000), req(CmdType::BLOCK_STATUS, 0x1000, 0x2000)];
    for b in &samples {
        for i in 0..b.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut c = b.clone();
                c[i] ^= flip;
                for sess in [&s, &x] {
                    for r in reqs {
                        let _ = sess.decode_reply(&c, |_| Some(r));
                        let _ = sess.decode_reply(&c[..i], |_| Some(r));
                    }
                }
            }
        }
    }
}

#[test]
fn peek_data_finds_large_payloads_and_nothing_else() {
    let read = req(CmdType::READ, 0x1000, 0x2000);
    let look = |c: u64| (c == 7).then_some(read);
    let s = ClientSession::new(neg(false, false));
    let simple = hex("67446698 00000000 0000000000000007 0102");
    assert_eq!(
        s.peek_data(&simple, look),
        Some(DataHead { cookie: 7, offset: 0x1000, len: 0x2000, header_len: 16, done: true })
    );
    assert_eq!(s.peek_data(&simple[..15], look), None, "incomplete header");
    assert_eq!(s.peek_data(&hex("67446698 00000005 0000000000000007"), look), None, "error reply");
    let st = ClientSession::new(neg(true, false));
    let chunk = hex("668e33ef 0000 0001 0000000000000007 00001008 0000000000001000 aa");
    assert_eq!(
        st.peek_data(&chunk, look),
        Some(DataHead { cookie: 7, offset: 0x1000, len: 0x1000, header_len: 28, done: false })
    );
    // Out of range, wrong type, unknown cookie, wrong request: None.
    assert_eq!(
        st.peek_data(&hex("668e33ef 0000 0001 0000000000000007 00003008 0000000000001000"), look),
        None
    );
    assert_eq!(
        st.peek_data(&hex("668e33ef 0000 0002 0000000000000007 0000000c 0000000000001000"), look),
        None
    );
    assert_eq!(
        st.peek_data(&hex("668e33ef 0000 0001 0000000000000009 00001008 0000000000001000"), look),
        None
    );
    let write = |_| Some(req(CmdType::WRITE, 0x1000, 0x2000));
    assert_eq!(st.peek_data(&chunk, write), None);
    let x = ClientSession::new(neg(false, true));
    let ext = hex("6e8a278c 0001 0001 0000000000000007 0000000000001000 0000000000002008 0000000000001000");
    assert_eq!(
        x.peek_data(&ext, look),
        Some(DataHead { cookie: 7, offset: 0x1000, len: 0x2000, header_len: 40, done: true })
    );
    assert_eq!(st.peek_data(&ext, look), None, "extended chunk without extended headers");
}
