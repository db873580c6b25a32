//! Transmission-phase tests against hex wire literals.

use super::*;
use crate::codec::hex;
use crate::export::{BlockSizes, ExportCaps, ExportDescriptor};

fn session(structured: bool, extended: bool, read_only: bool) -> Session {
    let caps = ExportCaps {
        read_only,
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
    let export = ExportDescriptor {
        name: String::new(),
        description: String::new(),
        size: 0x10_0000,
        caps,
        block_sizes: BlockSizes::default(),
    };
    let base = if structured || extended { Some(1) } else { None };
    let flags = export.transmission_flags(structured || extended, extended, base.is_some());
    Session::new(Negotiated {
        export,
        flags,
        structured: structured || extended,
        extended,
        base_allocation: base,
    })
}

fn compact(flags: u16, typ: u16, offset: u64, len: u32) -> Vec<u8> {
    let mut v = hex("25609513");
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&typ.to_be_bytes());
    v.extend_from_slice(&hex("0102030405060708"));
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v
}

fn check(s: &Session, hdr: &[u8]) -> Result<Command, Rejection> {
    s.check(&s.decode(hdr).expect("framing"))
}

#[test]
fn decodes_a_compact_read() {
    let s = session(true, false, false);
    let req = s.decode(&hex("25609513 0004 0000 0102030405060708 0000000000001000 00000200")).unwrap();
    assert_eq!(
        req,
        Request { flags: 4, typ: CmdType::READ, cookie: 0x0102030405060708, offset: 0x1000, length: 0x200 }
    );
    assert_eq!(s.check(&req), Ok(Command::Read { offset: 0x1000, len: 0x200, df: true }));
}

#[test]
fn decodes_an_extended_write_with_64_bit_length() {
    let s = session(false, true, false);
    assert_eq!(s.request_len(), 32);
    let req =
        s.decode(&hex("21e41c71 0021 0001 0000000000000009 0000000000000000 0000000000000200")).unwrap();
    assert_eq!(s.payload_len(&req), 0x200);
    assert_eq!(s.check(&req), Ok(Command::Write { offset: 0, len: 0x200, fua: true }));
}

#[test]
fn wrong_magic_is_a_framing_error() {
    let s = session(false, false, false);
    assert_eq!(s.decode(&compact(0, 0, 0, 0)[..]).map(|_| ()), Ok(()));
    let mut bad = compact(0, 0, 0, 0);
    bad[0] = 0x21;
    assert_eq!(s.decode(&bad), Err(FramingError::BadMagic(0x21609513)));
    let ext = session(false, true, false);
    let mut compact_on_extended = compact(0, 0, 0, 0);
    compact_on_extended.extend_from_slice(&[0; 4]);
    assert!(ext.decode(&compact_on_extended).is_err());
}

#[test]
fn unknown_command_is_einval() {
    let s = session(true, false, false);
    let r = check(&s, &compact(0, 99, 0, 0)).unwrap_err();
    assert_eq!(r.errno, Errno::EINVAL);
    assert!(!r.disconnect);
}

#[test]
fn unknown_flags_are_einval() {
    let s = session(true, false, false);
    assert_eq!(check(&s, &compact(0x80, 0, 0, 512)).unwrap_err().errno, Errno::EINVAL);
    // NO_HOLE is only for WRITE_ZEROES
    assert_eq!(check(&s, &compact(2, 1, 0, 512)).unwrap_err().errno, Errno::EINVAL);
    // DF needs structured replies
    let simple = session(false, false, false);
    assert_eq!(check(&simple, &compact(4, 0, 0, 512)).unwrap_err().errno, Errno::EINVAL);
}

#[test]
fn out_of_range_reads_are_einval_and_writes_enospc() {
    let s = session(true, false, false);
    assert_eq!(check(&s, &compact(0, 0, 0x10_0000, 1)).unwrap_err().errno, Errno::EINVAL);
    let w = check(&s, &compact(0, 1, 0x0f_ffff, 2)).unwrap_err();
    assert_eq!((w.errno, w.discard, w.disconnect), (Errno::ENOSPC, 2, false));
    assert_eq!(check(&s, &compact(0, 6, 0x10_0000, 1)).unwrap_err().errno, Errno::ENOSPC);
    assert_eq!(check(&s, &compact(0, 4, 0x10_0000, 1)).unwrap_err().errno, Errno::EINVAL);
}

#[test]
fn offset_plus_length_overflow_is_rejected_not_wrapped() {
    let s = session(true, false, false);
    let r = check(&s, &compact(0, 0, u64::MAX - 10, 512)).unwrap_err();
    assert_eq!(r.errno, Errno::EINVAL);
    let ext = session(false, true, false);
    let hdr = hex("21e41c71 0000 0004 0000000000000001 0000000000000001 ffffffffffffffff");
    assert_eq!(check(&ext, &hdr).unwrap_err().errno, Errno::EINVAL);
}

#[test]
fn oversized_write_payload_disconnects() {
    let s = session(true, false, false);
    let r = check(&s, &compact(0, 1, 0, 0x0200_0001)).unwrap_err();
    assert_eq!(r.errno, Errno::EINVAL);
    assert!(r.disconnect);
}

#[test]
fn oversized_read_is_einval() {
    let s = session(true, false, false);
    let r = check(&s, &compact(0, 0, 0, 0x0200_0001)).unwrap_err();
    assert_eq!((r.errno, r.disconnect), (Errno::EINVAL, false));
}

#[test]
fn read_only_refuses_every_write_type_with_eperm() {
    let s = session(true, false, true);
    for typ in [1u16, 4, 6] {
        let r = check(&s, &compact(0, typ, 0, 512)).unwrap_err();
        assert_eq!(r.errno, Errno::EPERM, "command {typ}");
        // Zero length, and past the end, are EPERM too.
        for (offset, len) in [(0, 0), (0x10_0000, 512)] {
            let r = check(&s, &compact(0, typ, offset, len)).unwrap_err();
            assert_eq!(r.errno, Errno::EPERM, "command {typ} at {offset:#x}+{len}");
        }
    }
    // WRITE_ZEROES with FUA, NO_HOLE and FAST_ZERO (not advertised on a
    // read-only export): EPERM, not EINVAL for the flag.
    for flags in ["0001", "0002", "0010", "0013"] {
        let mut req = hex("25609513");
        req.extend(hex(flags));
        req.extend(hex("0006 0000000000000001 0000000000000000 00000200"));
        let r = check(&s, &req).unwrap_err();
        assert_eq!(r.errno, Errno::EPERM, "flags {flags}");
    }
    // A write's payload is still discarded.
    let r = check(&s, &compact(1, 1, 0, 512)).unwrap_err();
    assert_eq!((r.errno, r.discard), (Errno::EPERM, 512));
    assert!(check(&s, &compact(0, 0, 0, 512)).is_ok());
    assert!(check(&s, &compact(0, 5, 0, 512)).is_ok()); // CACHE reads
}

#[test]
fn flush_and_disc_need_zero_offset_and_length() {
    let s = session(true, false, false);
    assert_eq!(check(&s, &compact(0, 3, 0, 0)), Ok(Command::Flush));
    assert_eq!(check(&s, &compact(0, 3, 1, 0)).unwrap_err().errno, Errno::EINVAL);
    assert_eq!(check(&s, &compact(0, 2, 0, 0)), Ok(Command::Disc));
}

#[test]
fn block_status_needs_a_context() {
    let s = session(false, false, false);
    assert_eq!(check(&s, &compact(0, 7, 0, 4096)).unwrap_err().errno, Errno::EINVAL);
    let s = session(true, false, false);
    assert_eq!(
        check(&s, &compact(8, 7, 0, 4096)),
        Ok(Command::BlockStatus { offset: 0, len: 4096, req_one: true })
    );
}

#[test]
fn block_status_payload_form() {
    let s = session(false, true, false);
    let hdr = hex("21e41c71 0020 0007 0000000000000001 0000000000001000 000000000000000c");
    let req = s.decode(&hdr).unwrap();
    assert_eq!(s.check(&req), Ok(Command::BlockStatusPayload { payload: 12 }));
    assert_eq!(
        s.check_block_status_payload(&req, &hex("0000000000002000 00000001")),
        Ok(Command::BlockStatus { offset: 0x1000, len: 0x2000, req_one: false })
    );
    let bad = s.check_block_status_payload(&req, &hex("0000000000002000 00000007")).unwrap_err();
    assert_eq!(bad.errno, Errno::EINVAL);
    // PAYLOAD_LEN on a command without a payload form: consume it, EINVAL.
    let hdr = hex("21e41c71 0020 0004 0000000000000001 0000000000000000 0000000000000010");
    let r = check(&s, &hdr).unwrap_err();
    assert_eq!((r.errno, r.discard, r.disconnect), (Errno::EINVAL, 16, false));
}

fn req(typ: CmdType, offset: u64, length: u64) -> Request {
    Request { flags: 0, typ, cookie: 0x0102030405060708, offset, length }
}

#[test]
fn simple_replies() {
    let s = session(false, false, false);
    let mut out = Vec::new();
    s.write_ok(&mut out, &req(CmdType::WRITE, 0, 1));
    s.write_error(&mut out, &req(CmdType::READ, 0, 1), Errno::EIO, "ignored");
    s.write_data_header(&mut out, &req(CmdType::READ, 0, 1), 0, 1, true);
    assert_eq!(
        out,
        hex("67446698 00000000 0102030405060708  67446698 00000005 0102030405060708  67446698 00000000 0102030405060708")
    );
}

#[test]
fn structured_replies() {
    let s = session(true, false, false);
    let r = req(CmdType::READ, 0x1000, 0x3000);
    let mut out = Vec::new();
    s.write_data_header(&mut out, &r, 0x1000, 0x1000, false);
    s.write_hole(&mut out, &r, 0x2000, 0x2000, true);
    assert_eq!(
        out,
        hex("668e33ef 0000 0001 0102030405060708 00001008 0000000000001000
             668e33ef 0001 0002 0102030405060708 0000000c 0000000000002000 00002000")
    );
    out.clear();
    s.write_error(&mut out, &r, Errno::EINVAL, "no");
    assert_eq!(out, hex("668e33ef 0001 8001 0102030405060708 00000008 00000016 0002 6e6f"));
    out.clear();
    // Non-read success stays a simple reply; a zero-length read gets NONE.
    s.write_ok(&mut out, &req(CmdType::FLUSH, 0, 0));
    s.write_ok(&mut out, &req(CmdType::READ, 0, 0));
    assert_eq!(out, hex("67446698 00000000 0102030405060708 668e33ef 0001 0000 0102030405060708 00000000"));
    out.clear();
    let ext = [Extent { len: 0x1000, flags: 0 }, Extent { len: 0x2000, flags: 3 }];
    s.write_block_status(&mut out, &req(CmdType::BLOCK_STATUS, 0, 0x3000), 1, &ext);
    assert_eq!(
        out,
        hex("668e33ef 0001 0005 0102030405060708 00000014 00000001 00001000 00000000 00002000 00000003")
    );
}

#[test]
fn extended_replies_echo_the_offset() {
    let s = session(false, true, false);
    let mut out = Vec::new();
    s.write_ok(&mut out, &req(CmdType::WRITE, 0x200, 0x200));
    assert_eq!(out, hex("6e8a278c 0001 0000 0102030405060708 0000000000000200 0000000000000000"));
    out.clear();
    s.write_block_status(
        &mut out,
        &req(CmdType::BLOCK_STATUS, 0, 0x1000),
        1,
        &[Extent { len: 0x1000, flags: 3 }],
    );
    assert_eq!(
        out,
        hex("6e8a278c 0001 0006 0102030405060708 0000000000000000 0000000000000018
             00000001 00000001 0000000000001000 0000000000000003")
    );
}

#[test]
fn clip_extents_to_request_and_req_one() {
    let mut e =
        vec![Extent { len: 100, flags: 0 }, Extent { len: 100, flags: 3 }, Extent { len: 100, flags: 0 }];
    clip_extents(&mut e, 150, false, false);
    assert_eq!(e, vec![Extent { len: 100, flags: 0 }, Extent { len: 50, flags: 3 }]);
    clip_extents(&mut e, 150, true, false);
    assert_eq!(e, vec![Extent { len: 100, flags: 0 }]);
    let mut big = vec![Extent { len: 1 << 40, flags: 3 }];
    clip_extents(&mut big, 1 << 41, false, false);
    assert_eq!(big[0].len, 0xffff_f000);
}

#[test]
fn extended_write_without_payload_len_flag_is_framed_the_same() {
    // qemu 10 sends extended writes without NBD_CMD_FLAG_PAYLOAD_LEN.
    let s = session(false, true, false);
    let req =
        s.decode(&hex("21e41c71 0000 0001 0000000000000009 0000000000000000 0000000000000200")).unwrap();
    assert_eq!(s.payload_len(&req), 0x200);
    assert_eq!(s.check(&req), Ok(Command::Write { offset: 0, len: 0x200, fua: false }));
}

#[test]
fn rejected_extended_write_still_names_its_payload_to_discard() {
    let s = session(false, true, false);
    // 4 KiB write at the last byte of the export: ENOSPC, and the 4096
    // payload bytes must be read and dropped to stay in step.
    let req =
        s.decode(&hex("21e41c71 0000 0001 0000000000000001 00000000000fffff 0000000000001000")).unwrap();
    let r = s.check(&req).unwrap_err();
    assert_eq!((r.errno, r.discard, r.disconnect), (Errno::ENOSPC, 4096, false));
    let ro = session(false, true, true);
    let r = ro.check(&req).unwrap_err();
    assert_eq!((r.errno, r.discard), (Errno::EPERM, 4096));
}
