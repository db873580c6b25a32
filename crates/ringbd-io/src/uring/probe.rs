//! What the running kernel's io_uring offers ([`Features`]), probed once at
//! start, and the one submission field the io-uring crate's builders do not
//! expose (a multishot receive's byte limit).

use std::os::fd::AsRawFd;

use io_uring::{cqueue, opcode, squeue, types, IoUring, Probe};

use super::buf_ring::BufRing;
use super::BGID;

/// What the running kernel offers, probed once at start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Features {
    pub io_uring: bool,
    pub single_issuer: bool,
    pub defer_taskrun: bool,
    pub accept_multishot: bool,
    pub recv_multishot: bool,
    pub buf_ring: bool,
    pub bundle: bool,
    pub send_zc: bool,
    /// Incremental buffer consumption (`IOU_PBUF_RING_INC`, 6.12+).
    pub buf_inc: bool,
    /// A multishot receive takes a total byte limit (`sqe->optlen`, Linux
    /// 6.16+): it ends by itself once it has delivered that much.
    pub recv_limit: bool,
}

impl Features {
    /// Probes the kernel (creates and drops a small ring).
    pub fn probe() -> Features {
        let mut f = Features::default();
        let ring = match IoUring::builder().setup_single_issuer().setup_defer_taskrun().build(8) {
            Ok(r) => {
                f.single_issuer = true;
                f.defer_taskrun = true;
                r
            }
            Err(_) => match IoUring::new(8) {
                Ok(r) => r,
                Err(_) => return f,
            },
        };
        f.io_uring = true;
        let mut probe = Probe::new();
        if ring.submitter().register_probe(&mut probe).is_ok() {
            // Multishot accept and recv came with 5.19/6.0, buffer rings with
            // 5.19; the opcodes are older, so check the feature bits too.
            f.accept_multishot = probe.is_supported(opcode::AcceptMulti::CODE);
            f.recv_multishot =
                probe.is_supported(opcode::RecvMulti::CODE) && ring.params().is_feature_linked_file();
            f.send_zc = probe.is_supported(opcode::SendZc::CODE);
        }
        f.bundle = ring.params().is_feature_recvsend_bundle();
        f.buf_ring = BufRing::new(&ring, 8, 4096, false).is_ok();
        // A second group: the probe ring already has group 0.
        f.buf_inc = f.buf_ring && BufRing::with_group(&ring, 8, 4096, true, 1).is_ok();
        // Multishot accept (5.19) and receive (6.0) arrived with buffer
        // rings (5.19); their opcodes are older than that, so the probe alone
        // cannot tell. A kernel with buffer rings and the 6.0-era linked-file
        // feature has both.
        f.accept_multishot &= f.buf_ring;
        f.recv_multishot &= f.buf_ring;
        f.recv_limit = f.recv_multishot && probe_recv_limit();
        f
    }
}

/// Sets a multishot receive's total byte limit: the SQE's `optlen`
/// (bytes 44..48, a union with `file_index`), which the io-uring crate's
/// builder does not expose.
pub(super) fn with_recv_limit(e: squeue::Entry, limit: u32) -> squeue::Entry {
    // SAFETY: squeue::Entry is #[repr(C)] around the kernel's 64-byte
    // io_uring_sqe (a size the transmute checks at compile time), plain
    // data for which every bit pattern is valid.
    let mut raw: [u8; 64] = unsafe { std::mem::transmute::<squeue::Entry, [u8; 64]>(e) };
    raw[44..48].copy_from_slice(&limit.to_ne_bytes());
    // SAFETY: as above; only the optlen bytes changed.
    unsafe { std::mem::transmute::<[u8; 64], squeue::Entry>(raw) }
}

/// Whether the kernel honours a multishot receive's byte limit: one byte
/// waits on a socket and a receive limited to one byte must end with it.
/// Older kernels refuse the field (`EINVAL`).
fn probe_recv_limit() -> bool {
    use std::io::Write;
    let Ok(mut ring) = IoUring::new(8) else { return false };
    let Ok((mut a, b)) = std::os::unix::net::UnixStream::pair() else { return false };
    let Ok(mut br) = BufRing::new(&ring, 8, 4096, false) else { return false };
    if a.write_all(b"x").is_err() {
        return false;
    }
    let e = with_recv_limit(opcode::RecvMulti::new(types::Fd(b.as_raw_fd()), BGID).build(), 1).user_data(1);
    // SAFETY: the receive selects from `br`, which stays allocated until
    // the receive's final completion below, or forever (leaked) if it never
    // comes.
    if unsafe { ring.submission().push(&e) }.is_err() {
        return false;
    }
    let mut verdict = None;
    for _ in 0..4 {
        if ring.submit_and_wait(1).is_err() {
            break;
        }
        let Some(cqe) = ring.completion().next() else { continue };
        let more = cqueue::more(cqe.flags());
        if !more {
            // Ended on its own after the byte: honoured; refused: EINVAL.
            verdict = Some(*verdict.get_or_insert(cqe.result() == 1));
            break;
        }
        // Still armed after the limit: ignored. End it with end of stream.
        verdict = Some(false);
        if b.shutdown(std::net::Shutdown::Both).is_err() {
            break;
        }
    }
    if verdict.is_none() {
        // The receive may still be armed: its buffers must outlive it.
        br.leak();
    }
    drop(ring);
    drop(br);
    verdict.unwrap_or(false)
}
