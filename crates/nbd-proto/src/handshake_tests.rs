//! Handshake tests against hex wire literals.

use super::*;
use crate::codec::hex;
use crate::export::{BlockSizes, ExportCaps};
use crate::wire::tx_flags;

/// Two exports: a writable 1 MiB `""` and a read-only 4 KiB `"ro"` (also
/// the client tests' server catalog).
pub(crate) fn catalog() -> Vec<ExportDescriptor> {
    let caps = ExportCaps {
        read_only: false,
        flush: true,
        fua: true,
        trim: true,
        write_zeroes: true,
        fast_zero: true,
        cache: true,
        multi_conn: true,
        rotational: false,
        base_allocation: true,
    };
    vec![
        ExportDescriptor {
            name: String::new(),
            description: "mem".into(),
            size: 0x10_0000,
            caps,
            block_sizes: BlockSizes::default(),
        },
        ExportDescriptor {
            name: "ro".into(),
            description: String::new(),
            size: 4096,
            caps: ExportCaps { read_only: true, ..caps },
            block_sizes: BlockSizes::default(),
        },
    ]
}

/// A handshake past the greeting and client flags (fixed newstyle, no zeroes).
fn started() -> ServerHandshake<Vec<ExportDescriptor>> {
    let mut hs = ServerHandshake::new(catalog());
    assert_eq!(hs.take_output(), hex("4e42444d41474943 49484156454f5054 0003"));
    assert_eq!(hs.handle(&hex("00000003")), Ok(4));
    assert!(!hs.has_output());
    hs
}

fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut v = hex("49484156454f5054");
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn rep(opt: u32, typ: u32, data: &[u8]) -> Vec<u8> {
    let mut v = hex("0003e889045565a9");
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&typ.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn feed(hs: &mut ServerHandshake<Vec<ExportDescriptor>>, bytes: &[u8]) -> Vec<u8> {
    assert_eq!(hs.handle(bytes), Ok(bytes.len()));
    hs.take_output()
}

#[test]
fn unknown_client_flags_end_the_session() {
    let mut hs = ServerHandshake::new(catalog());
    hs.take_output();
    assert_eq!(hs.handle(&hex("00000004")), Err(HandshakeError::UnknownClientFlags(4)));
}

#[test]
fn partial_messages_are_not_consumed() {
    let mut hs = started();
    let msg = option(0x99, b"abc");
    assert_eq!(hs.handle(&msg[..10]), Ok(0));
    assert_eq!(hs.handle(&msg[..18]), Ok(0));
    assert!(!hs.has_output());
    assert_eq!(hs.handle(&msg), Ok(19));
}

#[test]
fn bad_option_magic_is_fatal() {
    let mut hs = started();
    let err = hs.handle(&hex("4141414141414141 00000003 00000000")).unwrap_err();
    assert_eq!(err, HandshakeError::BadOptionMagic(0x4141414141414141));
}

#[test]
fn option_over_the_skip_limit_is_fatal() {
    let mut hs = started();
    // 1 MiB + 1 bytes of LIST data: not worth reading.
    let err = hs.handle(&hex("49484156454f5054 00000003 00100001")).unwrap_err();
    assert!(matches!(err, HandshakeError::OptionTooLarge { len: 0x10_0001, .. }));
}

#[test]
fn option_over_the_data_limit_is_skipped_and_too_big() {
    let mut hs = started();
    // An unknown option with 64 KiB + 1 bytes: the header is consumed, the
    // data is dropped as it arrives (never staged), then ERR_TOO_BIG.
    assert_eq!(hs.handle(&hex("49484156454f5054 00000099 00010001")), Ok(16));
    assert_eq!(hs.handle(&[0xaa; 0x8000]), Ok(0x8000));
    assert!(!hs.has_output());
    assert_eq!(hs.handle(&[0xaa; 0x8000]), Ok(0x8000));
    assert!(!hs.has_output());
    // The last data byte, then a LIST in the same buffer.
    let mut tail = vec![0xaa];
    tail.extend(option(3, &[]));
    let out = feed(&mut hs, &tail);
    let msg = b"option OptCode(0x99) carries more than 65536 bytes of data";
    assert_eq!(&out[..20], &hex("0003e889045565a9 00000099 80000009 0000003a")[..]);
    assert_eq!(&out[20..78], msg);
    assert!(out[78..].starts_with(&rep(3, 2, &hex("00000000 6d656d"))));
    assert!(out.ends_with(&rep(3, 1, &[])));
}

#[test]
fn option_at_the_data_limit_is_processed() {
    let mut hs = started();
    let out = feed(&mut hs, &option(3, &vec![0; 0x1_0000]));
    // LIST with data: INVALID, not TOO_BIG.
    assert_eq!(&out[12..16], &hex("80000003")[..]);
}

#[test]
fn oversized_export_name_and_non_fixed_options_are_fatal() {
    let mut hs = started();
    let err = hs.handle(&hex("49484156454f5054 00000001 00010001")).unwrap_err();
    assert!(matches!(err, HandshakeError::OptionTooLarge { len: 0x10001, .. }));
    let mut hs = ServerHandshake::new(catalog());
    hs.take_output();
    assert_eq!(hs.handle(&hex("00000002")), Ok(4));
    let err = hs.handle(&hex("49484156454f5054 00000007 00010001")).unwrap_err();
    assert!(matches!(err, HandshakeError::OptionTooLarge { len: 0x10001, .. }));
}

#[test]
fn oversized_option_before_required_tls_is_tls_reqd() {
    let mut hs = ServerHandshake::with_tls(catalog(), TlsMode::Require);
    hs.take_output();
    assert_eq!(hs.handle(&hex("00000003")), Ok(4));
    let mut msg = hex("49484156454f5054 00000003 00010001");
    msg.extend(vec![0; 0x1_0001]);
    let out = feed(&mut hs, &msg);
    assert_eq!(&out[..16], &hex("0003e889045565a9 00000003 80000005")[..]);
}

#[test]
fn too_many_meta_context_queries_is_too_big() {
    let mut hs = started();
    feed(&mut hs, &option(8, &[]));
    // 129 queries of "base:" (the limit is 128).
    let mut data = hex("00000000 00000081");
    for _ in 0..129 {
        data.extend(hex("00000005 626173653a"));
    }
    for opt in [9, 10] {
        let out = feed(&mut hs, &option(opt, &data));
        assert_eq!(&out[12..16], &hex("80000009")[..], "option {opt}");
    }
    // 128 are fine.
    let mut data = hex("00000000 00000080");
    for _ in 0..128 {
        data.extend(hex("00000005 626173653a"));
    }
    let out = feed(&mut hs, &option(9, &data));
    assert!(out.ends_with(&rep(9, 1, &[])));
}

#[test]
fn export_name_over_4096_bytes_is_invalid() {
    let mut hs = started();
    let mut data = hex("00001001");
    data.extend(vec![b'a'; 0x1001]);
    data.extend(hex("0000"));
    let out = feed(&mut hs, &option(6, &data));
    assert_eq!(&out[12..16], &hex("80000003")[..]);
    assert!(hs.outcome().is_none());
}

#[test]
fn unknown_option_gets_err_unsup_and_haggling_goes_on() {
    let mut hs = started();
    let out = feed(&mut hs, &option(0x99, b"xyz"));
    assert_eq!(&out[..16], &hex("0003e889045565a9 00000099 80000001")[..]);
    assert!(hs.outcome().is_none());
    let out = feed(&mut hs, &option(3, &[]));
    assert!(out.ends_with(&rep(3, 1, &[])));
}

#[test]
fn list_names_every_export_with_description() {
    let mut hs = started();
    let out = feed(&mut hs, &option(3, &[]));
    let mut expected = rep(3, 2, &hex("00000000 6d656d"));
    expected.extend(rep(3, 2, &hex("00000002 726f")));
    expected.extend(rep(3, 1, &[]));
    assert_eq!(out, expected);
}

#[test]
fn list_with_data_is_invalid() {
    let mut hs = started();
    let out = feed(&mut hs, &option(3, b"x"));
    assert_eq!(&out[12..16], &hex("80000003")[..]);
}

#[test]
fn starttls_is_refused_until_tls_exists() {
    let mut hs = started();
    let out = feed(&mut hs, &option(5, &[]));
    assert_eq!(&out[12..16], &hex("80000001")[..]);
}

#[test]
fn go_with_structured_replies_and_meta_context() {
    let mut hs = started();
    assert_eq!(feed(&mut hs, &option(8, &[])), rep(8, 1, &[]));
    // SET_META_CONTEXT "" ["base:allocation"]
    let set = hex("00000000 00000001 0000000f 626173653a616c6c6f636174696f6e");
    let mut expected = rep(10, 4, &hex("00000001 626173653a616c6c6f636174696f6e"));
    expected.extend(rep(10, 1, &[]));
    assert_eq!(feed(&mut hs, &option(10, &set)), expected);
    // GO "" requesting NAME, DESCRIPTION, BLOCK_SIZE
    let out = feed(&mut hs, &option(7, &hex("00000000 0003 0001 0002 0003")));
    let mut expected = rep(7, 3, &hex("0000 0000000000100000 0ded"));
    expected.extend(rep(7, 3, &hex("0001")));
    expected.extend(rep(7, 3, &hex("0002 6d656d")));
    expected.extend(rep(7, 3, &hex("0003 00000001 00001000 02000000")));
    expected.extend(rep(7, 1, &[]));
    assert_eq!(out, expected);
    let Some(Outcome::Transmission(n)) = hs.outcome() else { panic!("not in transmission") };
    assert!(n.structured && !n.extended);
    assert_eq!(n.base_allocation, Some(BASE_ALLOCATION_ID));
}

#[test]
fn meta_context_for_another_export_is_not_selected() {
    let mut hs = started();
    feed(&mut hs, &option(8, &[]));
    let set = hex("00000002 726f 00000001 0000000f 626173653a616c6c6f636174696f6e");
    feed(&mut hs, &option(10, &set));
    feed(&mut hs, &option(7, &hex("00000000 0000")));
    let Some(Outcome::Transmission(n)) = hs.outcome() else { panic!() };
    assert_eq!(n.base_allocation, None);
}

#[test]
fn meta_context_needs_structured_replies() {
    let mut hs = started();
    let out = feed(&mut hs, &option(9, &hex("00000000 00000000")));
    assert_eq!(&out[12..16], &hex("80000003")[..]);
}

#[test]
fn list_meta_context_wildcards() {
    let mut hs = started();
    feed(&mut hs, &option(11, &[]));
    for query in [hex("00000000 00000000"), hex("00000000 00000001 00000005 626173653a")] {
        let out = feed(&mut hs, &option(9, &query));
        let mut expected = rep(9, 4, &hex("00000000 626173653a616c6c6f636174696f6e"));
        expected.extend(rep(9, 1, &[]));
        assert_eq!(out, expected);
    }
    // Unknown namespaces are ignored, not errors.
    let out = feed(&mut hs, &option(9, &hex("00000000 00000001 00000004 783a7a7a")));
    assert_eq!(out, rep(9, 1, &[]));
}

#[test]
fn malformed_meta_request_is_invalid() {
    let mut hs = started();
    feed(&mut hs, &option(8, &[]));
    // query length runs past the option data
    let out = feed(&mut hs, &option(10, &hex("00000000 00000001 000000ff 6261")));
    assert_eq!(&out[12..16], &hex("80000003")[..]);
}

#[test]
fn info_for_unknown_export_is_err_unknown_and_info_keeps_haggling() {
    let mut hs = started();
    let out = feed(&mut hs, &option(6, &hex("00000003 6e6f70 0000")));
    assert_eq!(&out[12..16], &hex("80000006")[..]);
    let out = feed(&mut hs, &option(6, &hex("00000002 726f 0000")));
    assert!(out.starts_with(&rep(6, 3, &hex("0000 0000000000001000 0507"))));
    assert!(hs.outcome().is_none());
}

#[test]
fn truncated_info_request_is_invalid() {
    let mut hs = started();
    let out = feed(&mut hs, &option(7, &hex("00000005 6162")));
    assert_eq!(&out[12..16], &hex("80000003")[..]);
    assert!(hs.outcome().is_none());
}

#[test]
fn export_name_sends_size_flags_and_zeroes_unless_no_zeroes() {
    let mut hs = ServerHandshake::new(catalog());
    hs.take_output();
    hs.handle(&hex("00000001")).unwrap();
    let out = feed(&mut hs, &option(1, b""));
    assert_eq!(out.len(), 8 + 2 + 124);
    assert_eq!(&out[..10], &hex("0000000000100000 0d6d")[..]);

    let mut hs = started();
    let out = feed(&mut hs, &option(1, b"ro"));
    assert_eq!(out, hex("0000000000001000 0507"));
    let Some(Outcome::Transmission(n)) = hs.outcome() else { panic!() };
    assert_ne!(n.flags & tx_flags::READ_ONLY, 0);
}

#[test]
fn export_name_of_unknown_export_ends_the_session() {
    let mut hs = started();
    assert_eq!(hs.handle(&option(1, b"zz")), Err(HandshakeError::UnknownExport("zz".into())));
}

#[test]
fn non_fixed_clients_may_only_send_export_name() {
    let mut hs = ServerHandshake::new(catalog());
    hs.take_output();
    hs.handle(&hex("00000000")).unwrap();
    assert_eq!(hs.handle(&option(3, &[])), Err(HandshakeError::NotFixedNewstyle(OptCode::LIST)));
}

#[test]
fn extended_headers_forbid_export_name_and_structured_downgrade() {
    let mut hs = started();
    assert_eq!(feed(&mut hs, &option(11, &[])), rep(11, 1, &[]));
    let out = feed(&mut hs, &option(8, &[]));
    assert_eq!(&out[12..16], &hex("8000000a")[..]);
    assert_eq!(hs.handle(&option(1, b"")), Err(HandshakeError::ExportNameWithExtendedHeaders));
}

#[test]
fn abort_is_acknowledged() {
    let mut hs = started();
    assert_eq!(feed(&mut hs, &option(2, &[])), rep(2, 1, &[]));
    assert_eq!(hs.outcome(), Some(&Outcome::Aborted));
}

#[test]
fn bytes_after_go_are_left_for_transmission() {
    let mut hs = started();
    let mut input = option(7, &hex("00000000 0000"));
    let n = input.len();
    input.extend_from_slice(&hex("25609513"));
    assert_eq!(hs.handle(&input), Ok(n));
}

/// A handshake past the greeting and client flags with a TLS policy.
fn started_tls(mode: TlsMode) -> ServerHandshake<Vec<ExportDescriptor>> {
    let mut hs = ServerHandshake::with_tls(catalog(), mode);
    assert_eq!(hs.take_output(), hex("4e42444d41474943 49484156454f5054 0003"));
    assert_eq!(hs.handle(&hex("00000003")), Ok(4));
    hs
}

#[test]
fn starttls_is_acknowledged_and_stops_the_handshake_until_tls_runs() {
    let mut hs = started_tls(TlsMode::On);
    // STARTTLS, then bytes that are already the TLS ClientHello.
    let mut input = option(5, &[]);
    input.extend_from_slice(&hex("16030100"));
    assert_eq!(hs.handle(&input), Ok(16));
    assert_eq!(hs.take_output(), hex("0003e889045565a9 00000005 00000001 00000000"));
    assert!(hs.starttls_pending());
    // Nothing more is consumed until the driver starts TLS.
    assert_eq!(hs.handle(&input[16..]), Ok(0));
    hs.tls_started();
    assert!(!hs.starttls_pending() && hs.tls_active());
    // A second STARTTLS is invalid.
    assert_eq!(feed(&mut hs, &option(5, &[])), rep(5, 0x8000_0003, b"TLS is already running"));
}

#[test]
fn starttls_forgets_what_was_negotiated_before() {
    let mut hs = started_tls(TlsMode::On);
    assert_eq!(feed(&mut hs, &option(8, &[])), rep(8, 1, &[]));
    feed(&mut hs, &option(5, &[]));
    hs.tls_started();
    // Structured replies are off again: meta contexts need them first.
    let list = hex("00000000 00000000");
    assert_eq!(feed(&mut hs, &option(9, &list)), rep(9, 0x8000_0003, b"negotiate structured replies first"));
}

#[test]
fn plaintext_options_are_refused_when_tls_is_required() {
    let mut hs = started_tls(TlsMode::Require);
    let tls_reqd = |opt: u32| rep(opt, 0x8000_0005, b"this server requires TLS: send NBD_OPT_STARTTLS first");
    // LIST, INFO "", GO "", STRUCTURED_REPLY, an unknown option: no names leak.
    assert_eq!(feed(&mut hs, &option(3, &[])), tls_reqd(3));
    assert_eq!(feed(&mut hs, &option(6, &hex("00000000 0000"))), tls_reqd(6));
    assert_eq!(feed(&mut hs, &option(7, &hex("00000000 0000"))), tls_reqd(7));
    assert_eq!(feed(&mut hs, &option(8, &[])), tls_reqd(8));
    assert_eq!(feed(&mut hs, &option(0x77, &[])), tls_reqd(0x77));
    // EXPORT_NAME cannot be refused: the session ends.
    assert_eq!(hs.handle(&option(1, b"")), Err(HandshakeError::ExportNameWithoutTls));
}

#[test]
fn abort_is_allowed_before_tls_when_tls_is_required() {
    let mut hs = started_tls(TlsMode::Require);
    assert_eq!(feed(&mut hs, &option(2, &[])), rep(2, 1, &[]));
    assert_eq!(hs.outcome(), Some(&Outcome::Aborted));
}

#[test]
fn after_starttls_a_required_tls_server_lists_and_goes() {
    let mut hs = started_tls(TlsMode::Require);
    feed(&mut hs, &option(5, &[]));
    hs.tls_started();
    let mut expected = rep(3, 2, &hex("00000000 6d656d"));
    expected.extend(rep(3, 2, &hex("00000002 726f")));
    expected.extend(rep(3, 1, &[]));
    assert_eq!(feed(&mut hs, &option(3, &[])), expected);
    feed(&mut hs, &option(7, &hex("00000002 726f 0000")));
    assert!(matches!(hs.outcome(), Some(Outcome::Transmission(n)) if n.export.name == "ro"));
}

#[test]
fn starttls_with_data_is_invalid_and_tls_off_is_unsupported() {
    let mut hs = started_tls(TlsMode::Require);
    assert_eq!(&feed(&mut hs, &option(5, b"x"))[12..16], &hex("80000003")[..]);
    assert!(!hs.starttls_pending());
    let mut hs = started_tls(TlsMode::Off);
    assert_eq!(feed(&mut hs, &option(5, &[])), rep(5, 0x8000_0001, b"TLS is not enabled on this server"));
}
