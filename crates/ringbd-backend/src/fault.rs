//! Fault injection: a wrapper that makes a chosen fraction of another
//! backend's reads, writes, flushes, trims or zeroes fail with a chosen
//! errno, or delays them (nbdkit's `error` and `delay` filters in one).
//!
//! Spec syntax: `fault:RULE[,RULE...]:SPEC`, where `SPEC` is any export spec
//! and each `RULE` is one of
//!
//! - `OP=RATE[@ERRNO]`: fail that fraction of `OP` calls with `ERRNO`
//!   (default `EIO`); `RATE` is a fraction (`0.1`, `1`) or a percentage (`10%`);
//! - `delay-OP=DURATION`: sleep that long before each `OP` call
//!   (`500us`, `5ms`, `1s`);
//! - `seed=N`: the random sequence to use (default: a fresh one per run);
//! - `flush=ignore`: acknowledge every FLUSH, and the FUA of every write,
//!   trim and write-zeroes, without passing it to the inner backend: a
//!   server that loses acknowledged data at a power cut, the negative
//!   control of the VM power-cut test (docs/reliability.md).
//!
//! `OP` is `read`, `write`, `flush`, `trim` or `zero` (write zeroes), or `all`.
//! Example: `fault:read=0.1@EIO,write=5%@ENOSPC,delay-read=5ms:memory:1G`.
//!
//! A decision is made per backend call. A write whose payload arrives in
//! pieces is written piece by piece, so each piece is a call; the request
//! fails at its first failed piece (the pieces before it were written,
//! which a failed NBD write allows). A failure happens *instead of* the
//! call: the inner backend is not touched. Delays sleep on the calling
//! thread (with the io_uring engine, that ring's other connections wait too).
//!
//! The wrapper hides [`Backend::file_fd`] and [`Backend::direct_io`], so an
//! engine never bypasses it with its own file operations.

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::{Backend, Caps, Error, ErrorKind, Extent, Holes, Op, Piece, Result, ZeroFlags};

/// Rates are kept in parts per billion (exact for decimal fractions down to 1e-9).
const PPB: u32 = 1_000_000_000;

/// Operations a rule can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOp {
    Read,
    Write,
    Flush,
    Trim,
    Zero,
}

impl FaultOp {
    const ALL: [FaultOp; 5] = [FaultOp::Read, FaultOp::Write, FaultOp::Flush, FaultOp::Trim, FaultOp::Zero];

    fn parse(s: &str) -> Option<Vec<FaultOp>> {
        Some(match s {
            "read" => vec![FaultOp::Read],
            "write" => vec![FaultOp::Write],
            "flush" => vec![FaultOp::Flush],
            "trim" => vec![FaultOp::Trim],
            "zero" => vec![FaultOp::Zero],
            "all" => FaultOp::ALL.to_vec(),
            _ => return None,
        })
    }

    fn index(self) -> usize {
        self as usize
    }

    fn name(self) -> &'static str {
        match self {
            FaultOp::Read => "read",
            FaultOp::Write => "write",
            FaultOp::Flush => "flush",
            FaultOp::Trim => "trim",
            FaultOp::Zero => "zero",
        }
    }
}

/// Errnos a rule can inject: each maps to one NBD error
/// (see the table in docs/reliability.md).
const ERRNOS: &[(&str, i32)] = &[
    ("EIO", libc::EIO),
    ("ENOSPC", libc::ENOSPC),
    ("EDQUOT", libc::EDQUOT),
    ("EFBIG", libc::EFBIG),
    ("ENOMEM", libc::ENOMEM),
    ("EPERM", libc::EPERM),
    ("EACCES", libc::EACCES),
    ("EROFS", libc::EROFS),
    ("EINVAL", libc::EINVAL),
    ("EOVERFLOW", libc::EOVERFLOW),
];

fn errno_name(errno: i32) -> &'static str {
    ERRNOS.iter().find(|(_, n)| *n == errno).map_or("E?", |(s, _)| s)
}

/// What happens to one kind of operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FaultRule {
    /// Fraction of calls that fail, in parts per billion.
    pub rate_ppb: u32,
    /// The errno they fail with.
    pub errno: i32,
    /// Sleep before each call.
    pub delay: Duration,
}

/// A parsed `fault:` rule list.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FaultPlan {
    /// Indexed by [`FaultOp`].
    pub rules: [FaultRule; 5],
    pub seed: Option<u64>,
    /// `flush=ignore`: FLUSH and FUA are acknowledged and not done.
    pub ignore_flush: bool,
}

impl FaultPlan {
    /// Parses `RULE[,RULE...]` (the part between `fault:` and the inner spec).
    pub fn parse(s: &str) -> std::result::Result<FaultPlan, String> {
        let mut plan = FaultPlan::default();
        for r in plan.rules.iter_mut() {
            r.errno = libc::EIO;
        }
        if s.is_empty() {
            return Err("no fault rules (expected e.g. read=0.1@EIO,delay-write=5ms)".into());
        }
        for rule in s.split(',') {
            let (key, value) =
                rule.split_once('=').ok_or_else(|| format!("fault rule {rule:?} is not KEY=VALUE"))?;
            if key == "flush" && value == "ignore" {
                plan.ignore_flush = true;
            } else if key == "seed" {
                let seed = value.parse().map_err(|_| format!("fault seed {value:?} is not a number"))?;
                plan.seed = Some(seed);
            } else if let Some(op) = key.strip_prefix("delay-") {
                let ops = FaultOp::parse(op).ok_or_else(|| unknown_op(op))?;
                let d = parse_delay(value)?;
                ops.into_iter().for_each(|o| plan.rules[o.index()].delay = d);
            } else {
                let ops = FaultOp::parse(key).ok_or_else(|| unknown_op(key))?;
                let (rate, errno) = match value.split_once('@') {
                    Some((r, e)) => (r, parse_errno(e)?),
                    None => (value, libc::EIO),
                };
                let rate = parse_rate(rate)?;
                for o in ops {
                    plan.rules[o.index()].rate_ppb = rate;
                    plan.rules[o.index()].errno = errno;
                }
            }
        }
        Ok(plan)
    }
}

impl fmt::Display for FaultPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        for op in FaultOp::ALL {
            let r = &self.rules[op.index()];
            if r.rate_ppb > 0 {
                let pct = f64::from(r.rate_ppb) / f64::from(PPB) * 100.0;
                parts.push(format!("{} {pct}% {}", op.name(), errno_name(r.errno)));
            }
            if !r.delay.is_zero() {
                parts.push(format!("{} +{:?}", op.name(), r.delay));
            }
        }
        if self.ignore_flush {
            parts.push("flush and FUA ignored (acknowledged, not done)".into());
        }
        f.write_str(&parts.join(", "))
    }
}

fn unknown_op(op: &str) -> String {
    format!("fault rule names unknown operation {op:?} (read, write, flush, trim, zero or all)")
}

fn parse_errno(s: &str) -> std::result::Result<i32, String> {
    let up = s.to_ascii_uppercase();
    ERRNOS.iter().find(|(n, _)| *n == up).map(|(_, e)| *e).ok_or_else(|| {
        let names: Vec<&str> = ERRNOS.iter().map(|(n, _)| *n).collect();
        format!("fault errno {s:?} is not one of {}", names.join(", "))
    })
}

/// `0.25`, `1`, `0`, `25%`, `0.5%` -> parts per billion.
fn parse_rate(s: &str) -> std::result::Result<u32, String> {
    let (num, scale) = match s.strip_suffix('%') {
        Some(n) => (n, 100u64),
        None => (s, 1u64),
    };
    let bad = || format!("fault rate {s:?} is not a fraction from 0 to 1 (or a percentage, 0% to 100%)");
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if int.is_empty() && frac.is_empty()
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
        || frac.len() > 9
        || int.len() > 3
    {
        return Err(bad());
    }
    // Fixed point with 9 decimals, then divide by the scale.
    let int: u64 = if int.is_empty() { 0 } else { int.parse().map_err(|_| bad())? };
    let frac_val: u64 = if frac.is_empty() { 0 } else { frac.parse().map_err(|_| bad())? };
    let frac_val = frac_val * 10u64.pow(9 - frac.len() as u32);
    let nano = int * u64::from(PPB) + frac_val;
    let ppb = nano / scale;
    u32::try_from(ppb).ok().filter(|&p| p <= PPB).ok_or_else(bad)
}

/// `250us`, `5ms`, `2s` -> a duration (at most 60 s).
fn parse_delay(s: &str) -> std::result::Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 =
        digits.parse().map_err(|_| format!("fault delay {s:?} is not a number with a unit (us, ms, s)"))?;
    let d = match unit {
        "us" => Duration::from_micros(n),
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        _ => return Err(format!("fault delay {s:?} needs a unit: us, ms or s")),
    };
    if d > Duration::from_secs(60) {
        return Err(format!("fault delay {s:?} is longer than 60 s"));
    }
    Ok(d)
}

/// The wrapper backend.
pub struct FaultBackend {
    inner: Arc<dyn Backend>,
    plan: FaultPlan,
    /// splitmix64 state: shared by every thread, advanced atomically.
    rng: AtomicU64,
    injected: [AtomicU64; 5],
}

impl FaultBackend {
    pub fn new(inner: Arc<dyn Backend>, plan: FaultPlan) -> Self {
        let seed = plan.seed.unwrap_or_else(fresh_seed);
        FaultBackend { inner, plan, rng: AtomicU64::new(seed), injected: Default::default() }
    }

    /// Faults injected so far for `op`.
    pub fn injected(&self, op: FaultOp) -> u64 {
        self.injected[op.index()].load(Ordering::Relaxed)
    }

    fn next_random(&self) -> u64 {
        let mut z =
            self.rng.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed).wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Delays, then decides whether this call fails.
    fn gate(&self, op: FaultOp, eop: Op, offset: u64, len: u64) -> Result<()> {
        let rule = &self.plan.rules[op.index()];
        if !rule.delay.is_zero() {
            std::thread::sleep(rule.delay);
        }
        let fail = match rule.rate_ppb {
            0 => false,
            PPB => true,
            r => self.next_random() % u64::from(PPB) < u64::from(r),
        };
        if !fail {
            return Ok(());
        }
        self.injected[op.index()].fetch_add(1, Ordering::Relaxed);
        let os = io::Error::from_raw_os_error(rule.errno);
        let source = io::Error::new(os.kind(), format!("injected fault {} ({os})", errno_name(rule.errno)));
        Err(Error { kind: ErrorKind::of(&os), op: eop, offset, len, source })
    }
}

fn fresh_seed() -> u64 {
    let t =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    t ^ u64::from(std::process::id()).rotate_left(32)
}

impl Backend for FaultBackend {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn caps(&self) -> Caps {
        self.inner.caps()
    }

    fn describe(&self) -> String {
        format!("{} with injected faults: {}", self.inner.describe(), self.plan)
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<Holes> {
        self.gate(FaultOp::Read, Op::Read, offset, buf.len() as u64)?;
        self.inner.read(offset, buf)
    }

    fn read_shared(&self, offset: u64, len: usize, out: &mut Vec<Piece>) -> Result<bool> {
        // Decide only when the inner backend serves this read here; when it
        // cannot, the caller falls back to `read`, which decides then (one
        // decision per read either way).
        let before = out.len();
        if !self.inner.read_shared(offset, len, out)? {
            return Ok(false);
        }
        if let Err(e) = self.gate(FaultOp::Read, Op::Read, offset, len as u64) {
            out.truncate(before);
            return Err(e);
        }
        Ok(true)
    }

    // `file_fd` and `direct_io` stay `None`: every operation goes through
    // the gate.

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.gate(FaultOp::Write, Op::Write, offset, data.len() as u64)?;
        self.inner.write(offset, data, fua && !self.plan.ignore_flush)
    }

    fn flush(&self) -> Result<()> {
        self.gate(FaultOp::Flush, Op::Flush, 0, 0)?;
        if self.plan.ignore_flush {
            return Ok(());
        }
        self.inner.flush()
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.gate(FaultOp::Trim, Op::Trim, offset, len)?;
        self.inner.trim(offset, len, fua && !self.plan.ignore_flush)
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.gate(FaultOp::Zero, Op::WriteZeroes, offset, len)?;
        let flags = ZeroFlags { fua: flags.fua && !self.plan.ignore_flush, ..flags };
        self.inner.write_zeroes(offset, len, flags)
    }

    fn cache(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.cache(offset, len)
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.inner.extents(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryBackend;

    fn plan(s: &str) -> FaultPlan {
        FaultPlan::parse(s).unwrap()
    }

    #[test]
    fn rules_parse() {
        let p = plan("read=0.1@EIO,write=5%@enospc,flush=1,delay-read=5ms,seed=7");
        assert_eq!(p.rules[FaultOp::Read.index()].rate_ppb, 100_000_000);
        assert_eq!(p.rules[FaultOp::Read.index()].delay, Duration::from_millis(5));
        assert_eq!(p.rules[FaultOp::Write.index()].rate_ppb, 50_000_000);
        assert_eq!(p.rules[FaultOp::Write.index()].errno, libc::ENOSPC);
        assert_eq!(
            p.rules[FaultOp::Flush.index()],
            FaultRule { rate_ppb: PPB, errno: libc::EIO, delay: Duration::ZERO }
        );
        assert_eq!(p.rules[FaultOp::Trim.index()].rate_ppb, 0);
        assert_eq!(p.seed, Some(7));
        let all = plan("all=100%@EPERM,delay-all=250us");
        assert!(all.rules.iter().all(|r| r.rate_ppb == PPB && r.errno == libc::EPERM));
        assert!(all.rules.iter().all(|r| r.delay == Duration::from_micros(250)));
        assert_eq!(parse_rate(".5"), Ok(PPB / 2));
        assert_eq!(parse_rate("0.000000001"), Ok(1));
        assert_eq!(parse_rate("0"), Ok(0));
    }

    #[test]
    fn bad_rules_are_clear_errors() {
        let err = |s: &str| FaultPlan::parse(s).unwrap_err();
        assert!(err("").contains("no fault rules"));
        assert!(err("read").contains("KEY=VALUE"));
        assert!(err("reed=0.1").contains("unknown operation \"reed\""));
        assert!(err("read=1.5").contains("fraction from 0 to 1"));
        assert!(err("read=101%").contains("fraction"));
        assert!(err("read=-1").contains("fraction"));
        assert!(err("read=0.1@EWHAT").contains("not one of EIO"));
        assert!(err("delay-read=5").contains("unit"));
        assert!(err("delay-read=5h").contains("unit"));
        assert!(err("delay-read=120s").contains("60 s"));
        assert!(err("seed=x").contains("seed"));
        assert!(err("read=0.0000000001").contains("fraction"));
    }

    #[test]
    fn certain_faults_fail_every_call_without_touching_the_inner_backend() {
        let f = FaultBackend::new(Arc::new(MemoryBackend::new(1 << 20)), plan("write=1@ENOSPC,flush=1"));
        let e = f.write(4096, &[1; 512], false).unwrap_err();
        assert_eq!((e.kind, e.op, e.offset, e.len), (ErrorKind::NoSpace, Op::Write, 4096, 512));
        assert!(e.to_string().contains("injected fault ENOSPC"), "{e}");
        assert_eq!(f.flush().unwrap_err().kind, ErrorKind::Io);
        let mut b = [9u8; 512];
        f.read(4096, &mut b).unwrap();
        assert_eq!(b, [0; 512], "a failed write must not reach the backend");
        assert_eq!(f.injected(FaultOp::Write), 1);
        assert_eq!(f.injected(FaultOp::Flush), 1);
        assert_eq!(f.injected(FaultOp::Read), 0);
    }

    #[test]
    fn fractions_are_roughly_right_and_seeded_runs_repeat() {
        let run = |seed: u64| {
            let f = FaultBackend::new(
                Arc::new(MemoryBackend::new(1 << 20)),
                plan(&format!("read=0.25,seed={seed}")),
            );
            let mut b = [0u8; 8];
            (0..4000).map(|_| f.read(0, &mut b).is_err()).collect::<Vec<_>>()
        };
        let a = run(1);
        let fails = a.iter().filter(|&&x| x).count();
        assert!((800..1200).contains(&fails), "{fails} of 4000 failed at rate 0.25");
        assert_eq!(a, run(1));
        assert_ne!(a, run(2));
    }

    #[test]
    fn shared_reads_fail_as_one_decision_and_leave_no_pieces() {
        let f = FaultBackend::new(Arc::new(MemoryBackend::new(1 << 20)), plan("read=1@EIO"));
        let mut pieces = Vec::new();
        let e = f.read_shared(0, 4096, &mut pieces).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Io);
        assert!(pieces.is_empty());
        assert_eq!(f.injected(FaultOp::Read), 1);
    }

    /// An inner backend that counts flushes and FUA requests.
    struct Durability {
        inner: MemoryBackend,
        flushes: AtomicU64,
        fua: AtomicU64,
    }

    impl Backend for Durability {
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn caps(&self) -> Caps {
            self.inner.caps()
        }
        fn describe(&self) -> String {
            "counting".into()
        }
        fn read(&self, offset: u64, buf: &mut [u8]) -> Result<Holes> {
            self.inner.read(offset, buf)
        }
        fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
            self.fua.fetch_add(u64::from(fua), Ordering::Relaxed);
            self.inner.write(offset, data, fua)
        }
        fn flush(&self) -> Result<()> {
            self.flushes.fetch_add(1, Ordering::Relaxed);
            self.inner.flush()
        }
        fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
            self.fua.fetch_add(u64::from(fua), Ordering::Relaxed);
            self.inner.trim(offset, len, fua)
        }
        fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
            self.fua.fetch_add(u64::from(flags.fua), Ordering::Relaxed);
            self.inner.write_zeroes(offset, len, flags)
        }
        fn cache(&self, offset: u64, len: u64) -> Result<()> {
            self.inner.cache(offset, len)
        }
        fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
            self.inner.extents(offset, len)
        }
    }

    #[test]
    fn ignored_flushes_and_fua_are_acknowledged_and_never_reach_the_inner_backend() {
        let count = || Durability { inner: MemoryBackend::new(1 << 20), flushes: 0.into(), fua: 0.into() };
        let drive = |f: &FaultBackend| {
            f.write(0, &[7; 4096], true).unwrap();
            f.flush().unwrap();
            f.trim(4096, 4096, true).unwrap();
            f.write_zeroes(8192, 4096, ZeroFlags { fua: true, ..ZeroFlags::default() }).unwrap();
            let mut b = [0u8; 4096];
            f.read(0, &mut b).unwrap();
            assert_eq!(b, [7; 4096], "the write itself still happens");
        };
        let honest = Arc::new(count());
        drive(&FaultBackend::new(honest.clone(), plan("read=0")));
        assert_eq!((honest.flushes.load(Ordering::Relaxed), honest.fua.load(Ordering::Relaxed)), (1, 3));
        let liar = Arc::new(count());
        let p = plan("flush=ignore");
        assert!(p.ignore_flush && p.rules.iter().all(|r| r.rate_ppb == 0));
        assert!(p.to_string().contains("flush and FUA ignored"), "{p}");
        drive(&FaultBackend::new(liar.clone(), p));
        assert_eq!((liar.flushes.load(Ordering::Relaxed), liar.fua.load(Ordering::Relaxed)), (0, 0));
        assert!(FaultPlan::parse("flush=ignored").unwrap_err().contains("fraction"));
    }

    #[test]
    fn the_wrapper_hides_the_file_descriptor() {
        let path = std::env::temp_dir().join(format!("ringbd-fault-test-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        let inner = crate::file::FileBackend::open(&path, false, false).unwrap();
        let f = FaultBackend::new(Arc::new(inner), plan("read=0"));
        assert!(f.file_fd().is_none());
        assert!(f.direct_io().is_none());
        std::fs::remove_file(&path).unwrap();
    }
}
