//! The transmission-phase request decoder and validator
//! (`Session::decode`, `Session::check`, `check_block_status_payload`) under
//! any negotiation. Checks the promises the server relies on: an accepted
//! command lies inside the export, is aligned, fits the maximum payload and
//! is allowed on this export; a refusal says how much payload to discard.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use nbd_proto::transmission::MAX_BLOCK_STATUS_PAYLOAD;
use nbd_proto::{BlockSizes, Command, ExportCaps, ExportDescriptor, Negotiated, Session};
use ringbd_fuzz::Req;

#[derive(Arbitrary, Debug)]
struct Input {
    caps: [bool; 8],
    structured: bool,
    extended: bool,
    meta: bool,
    size: u64,
    min_shift: u8,
    max_pick: u8,
    reqs: Vec<Req>,
    bs_payload: Vec<u8>,
}

fuzz_target!(|input: Input| {
    let c = input.caps;
    let caps = ExportCaps {
        read_only: c[0],
        flush: c[1],
        fua: c[2],
        trim: c[3],
        write_zeroes: c[4],
        fast_zero: c[5],
        cache: c[6],
        multi_conn: c[7],
        rotational: false,
        base_allocation: true,
    };
    let minimum = 1u32 << (input.min_shift % 13);
    let maximum = [minimum.max(4096), 1 << 20, 32 << 20][usize::from(input.max_pick % 3)];
    let size = input.size >> 1; // at most i64::MAX, as exports are
    let export = ExportDescriptor {
        name: String::new(),
        description: String::new(),
        size,
        caps,
        block_sizes: BlockSizes { minimum, preferred: maximum.min(4096).max(minimum), maximum },
    };
    let structured = input.structured || input.extended;
    let meta = input.meta && structured;
    let flags = export.transmission_flags(structured, input.extended, meta);
    let s = Session::new(Negotiated {
        export,
        flags,
        structured,
        extended: input.extended,
        base_allocation: meta.then_some(1),
    });
    for r in &input.reqs {
        let mut wire = Vec::new();
        r.encode(input.extended, &mut wire);
        let Ok(req) = s.decode(&wire[..s.request_len()]) else {
            assert!(r.bad_magic.is_some());
            continue;
        };
        let payload = s.payload_len(&req);
        let in_export = |offset: u64, len: u64| {
            offset.checked_add(len).is_some_and(|e| e <= size)
                && offset % u64::from(minimum) == 0
                && len % u64::from(minimum) == 0
        };
        let writable = !caps.read_only;
        let mut out = Vec::new();
        match s.check(&req) {
            Ok(cmd) => {
                match cmd {
                    Command::Read { offset, len, .. } => {
                        assert!(in_export(offset, len) && len <= u64::from(maximum));
                        assert_eq!(payload, 0);
                    }
                    Command::Write { offset, len, .. } => {
                        assert!(writable && in_export(offset, len) && len <= u64::from(maximum));
                        assert_eq!(payload, len);
                    }
                    Command::Trim { offset, len, .. } => {
                        assert!(writable && caps.trim && in_export(offset, len))
                    }
                    Command::WriteZeroes { offset, len, .. } => {
                        assert!(writable && caps.write_zeroes && in_export(offset, len))
                    }
                    Command::Cache { offset, len } => assert!(caps.cache && in_export(offset, len)),
                    Command::BlockStatus { offset, len, .. } => assert!(meta && in_export(offset, len)),
                    Command::Flush => assert!(caps.flush && req.offset == 0 && req.length == 0),
                    Command::Disc => assert!(req.offset == 0 && req.length == 0),
                    Command::BlockStatusPayload { payload: p } => {
                        assert!(input.extended && p <= MAX_BLOCK_STATUS_PAYLOAD);
                        let body = &input.bs_payload[..input.bs_payload.len().min(p as usize)];
                        if let Ok(Command::BlockStatus { offset, len, .. }) =
                            s.check_block_status_payload(&req, body)
                        {
                            assert!(in_export(offset, len));
                        }
                    }
                }
                s.write_ok(&mut out, &req);
            }
            Err(rej) => {
                assert_eq!(rej.discard, payload);
                if rej.disconnect {
                    assert!(payload > u64::from(maximum).max(MAX_BLOCK_STATUS_PAYLOAD));
                }
                s.write_error(&mut out, &req, rej.errno, &rej.message);
            }
        }
        assert!(!out.is_empty());
    }
});
