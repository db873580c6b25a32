//! The server's option phase (nbd-proto `ServerHandshake`), fed structured
//! client messages in arbitrary chunks. Checks: it never panics, never
//! consumes more than it was given, every reply it writes is a well-formed
//! option reply (or the final `NBD_OPT_EXPORT_NAME` answer), and it stops at
//! its outcome or first error.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use nbd_proto::wire::OPTION_REPLY_MAGIC;
use nbd_proto::{BlockSizes, ExportCaps, ExportDescriptor, Outcome, ServerHandshake};
use ringbd_fuzz::Handshake;

#[derive(Arbitrary, Debug)]
struct Input {
    hs: Handshake,
    /// Sizes of the pieces the bytes arrive in.
    chunks: Vec<u8>,
    read_only: bool,
    min_block: u8,
}

fn catalog(read_only: bool, min_block: u8) -> Vec<ExportDescriptor> {
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
    let e = |name: &str, size: u64| ExportDescriptor {
        name: name.into(),
        description: format!("export {name}"),
        size,
        caps,
        block_sizes: BlockSizes { minimum: 1 << (min_block % 13), ..BlockSizes::default() },
    };
    vec![e("", 1 << 30), e("a", 4096), e("ro", u64::MAX >> 1)]
}

/// Checks the server's output: option replies, or the 10/134-byte export
/// name answer at the very end.
fn check_output(mut out: &[u8], done: bool) {
    while !out.is_empty() {
        if out.len() < 20 {
            assert!(done, "partial option reply {out:02x?}");
            return;
        }
        let magic = u64::from_be_bytes(out[..8].try_into().unwrap());
        if magic != OPTION_REPLY_MAGIC {
            assert!(done && (out.len() == 10 || out.len() == 134), "bad reply {out:02x?}");
            return;
        }
        let len = u32::from_be_bytes(out[16..20].try_into().unwrap()) as usize;
        assert!(out.len() >= 20 + len, "reply shorter than its length field");
        out = &out[20 + len..];
    }
}

fuzz_target!(|input: Input| {
    let bytes = input.hs.encode();
    let mut hs = ServerHandshake::new(catalog(input.read_only, input.min_block));
    assert_eq!(hs.take_output().len(), 18);
    let mut staged = Vec::new();
    let mut pos = 0;
    let mut chunks = input.chunks.iter().map(|&c| usize::from(c) + 1).cycle();
    while pos < bytes.len() {
        let n = chunks.next().unwrap_or(bytes.len()).min(bytes.len() - pos);
        staged.extend_from_slice(&bytes[pos..pos + n]);
        pos += n;
        let result = hs.handle(&staged);
        let out = hs.take_output();
        match result {
            Ok(used) => {
                assert!(used <= staged.len());
                staged.drain(..used);
                check_output(&out, hs.outcome().is_some());
                if let Some(o) = hs.outcome() {
                    if let Outcome::Transmission(n) = o {
                        assert!(n.structured || !n.extended);
                        assert_eq!(n.flags & 1, 1, "HAS_FLAGS");
                    }
                    // Further input is not the handshake's.
                    assert_eq!(hs.handle(&staged), Ok(0));
                    return;
                }
            }
            Err(_) => {
                check_output(&out, true);
                return;
            }
        }
    }
});
