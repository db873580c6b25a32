//! `ringbd bench URI`: a pipelined load generator on the client engine (one
//! thread, one io_uring ring, N connections x qd requests), reporting IOPS,
//! MiB/s, latency percentiles and client CPU per I/O; `--verify` stamps
//! every written sector with its offset and a generation and checks every
//! read against the last completed write.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use ringbd_client::{ClientConfig, Cmd, Completion, Engine, NbdUri};

#[derive(Args)]
#[command(after_help = "\
Examples:
  ringbd bench nbd://127.0.0.1/ --rw randread --bs 4k --qd 32 --conns 2 --time 10s
  ringbd bench nbd+unix:///?socket=/tmp/nbd.sock --sweep-bs 4k,16k,64k,256k,1m --json
  ringbd bench nbd://host/disk --rw randrw --rwmixread 70 --verify --time 30s")]
pub struct BenchArgs {
    /// NBD URI of the export to load.
    uri: NbdUri,
    /// Access pattern.
    #[arg(long, value_enum, default_value = "randread")]
    rw: Rw,
    /// Percentage of reads for randrw.
    #[arg(long, default_value_t = 70, value_parser = clap::value_parser!(u32).range(0..=100))]
    rwmixread: u32,
    /// Block size of each request, e.g. 4k, 64k, 1m.
    #[arg(long, default_value = "4k", value_parser = ringbd_backend::parse_size)]
    bs: u64,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 32)]
    qd: usize,
    /// Connections (requests are spread over them).
    #[arg(long, default_value_t = 2)]
    conns: usize,
    /// How long each run measures, e.g. 10s or 500ms.
    #[arg(long, default_value = "10s", value_parser = crate::parse_duration)]
    time: Duration,
    /// Bytes of the export to use, from offset 0 [default: the whole export].
    #[arg(long, value_parser = ringbd_backend::parse_size)]
    size: Option<u64>,
    /// Run once per block size and print a table, e.g. 4k,8k,16k,64k,1m.
    #[arg(long, value_delimiter = ',', value_parser = ringbd_backend::parse_size)]
    sweep_bs: Vec<u64>,
    /// Write the region with 1 MiB requests before measuring (reads of never-written areas measure nothing).
    #[arg(long)]
    prefill: bool,
    /// Stamp writes with offset and generation, check every read; a mismatch fails the run (implies --prefill).
    #[arg(long)]
    verify: bool,
    /// Print results as JSON.
    #[arg(long)]
    json: bool,
    /// Draw IOPS and MiB/s per block size into a PNG.
    #[arg(long, value_name = "FILE.png")]
    plot: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
enum Rw {
    Randread,
    Randwrite,
    Read,
    Write,
    Randrw,
}

impl Rw {
    fn name(self) -> &'static str {
        match self {
            Rw::Randread => "randread",
            Rw::Randwrite => "randwrite",
            Rw::Read => "read",
            Rw::Write => "write",
            Rw::Randrw => "randrw",
        }
    }
}

/// Figures of one run.
struct Stats {
    bs: u64,
    ops: u64,
    reads: u64,
    writes: u64,
    secs: f64,
    cpu_secs: f64,
    p50: u64,
    p99: u64,
    p999: u64,
    max: u64,
    mean: f64,
}

impl Stats {
    fn iops(&self) -> f64 {
        self.ops as f64 / self.secs
    }
    fn mibs(&self) -> f64 {
        (self.ops * self.bs) as f64 / self.secs / (1024.0 * 1024.0)
    }
    fn cpu_us_per_io(&self) -> f64 {
        self.cpu_secs * 1e6 / (self.ops.max(1) as f64)
    }
}

const STAMP_MAGIC: u64 = 0x5249_4e47_4244_5646; // "RINGBDVF"
const SECTOR: usize = 512;

fn stamp_word(off: u64, gen: u64, i: usize) -> u64 {
    match i {
        0 => STAMP_MAGIC,
        1 => off,
        2 => gen,
        _ => (off + 8 * i as u64) ^ gen.wrapping_mul(0x9e37_79b9_7f4a_7c15),
    }
}

/// Fills `buf` (covering `offset..`) with generation-`gen` stamps.
fn stamp(buf: &mut [u8], offset: u64, gen: u64) {
    for (s, sector) in buf.chunks_mut(SECTOR).enumerate() {
        let off = offset + (s * SECTOR) as u64;
        for (i, w) in sector.chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&stamp_word(off, gen, i).to_le_bytes());
        }
    }
}

/// Checks `buf` against generation-`gen` stamps; returns what differs first.
fn check(buf: &[u8], offset: u64, gen: u64) -> Result<(), String> {
    for (s, sector) in buf.chunks(SECTOR).enumerate() {
        let off = offset + (s * SECTOR) as u64;
        for (i, w) in sector.chunks_exact(8).enumerate() {
            let mut a = [0u8; 8];
            a.copy_from_slice(w);
            let got = u64::from_le_bytes(a);
            let want = stamp_word(off, gen, i);
            if got != want {
                let word = |j: usize| {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(&sector[j * 8..j * 8 + 8]);
                    u64::from_le_bytes(a)
                };
                let found = if word(0) == STAMP_MAGIC {
                    format!("a stamp of offset {:#x} generation {}", word(1), word(2))
                } else {
                    "no stamp".to_owned()
                };
                return Err(format!(
                    "data mismatch at offset {:#x} (sector {off:#x}, byte {}): expected generation {gen}, \
                     read {got:#018x} instead of {want:#018x}; the sector holds {found}",
                    off + 8 * i as u64,
                    i * 8
                ));
            }
        }
    }
    Ok(())
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

struct Slot {
    conn: usize,
    start: Instant,
    block: u64,
    gen: u64,
    buf: Option<Vec<u8>>,
}

struct Run<'a> {
    a: &'a BenchArgs,
    bs: u64,
    blocks: u64,
    rng: Rng,
    seq: u64,
    gens: Vec<u32>,
    busy: Vec<bool>,
}

impl Run<'_> {
    /// Picks the next command for `slot`, or `None` when every candidate
    /// block is busy (verify mode only).
    fn pick(&mut self, slot: &mut Slot) -> Option<Cmd> {
        let write = match self.a.rw {
            Rw::Randread | Rw::Read => false,
            Rw::Randwrite | Rw::Write => true,
            Rw::Randrw => (self.rng.next() % 100) as u32 >= self.a.rwmixread,
        };
        let seq = matches!(self.a.rw, Rw::Read | Rw::Write);
        for _ in 0..16 {
            let block = if seq {
                let b = self.seq;
                self.seq = (self.seq + 1) % self.blocks;
                b
            } else {
                self.rng.next() % self.blocks
            };
            if self.a.verify {
                if self.busy[block as usize] {
                    continue;
                }
                self.busy[block as usize] = true;
            }
            slot.block = block;
            let offset = block * self.bs;
            let buf = slot.buf.get_or_insert_with(Vec::new);
            buf.resize(self.bs as usize, 0x5a);
            if write {
                if self.a.verify {
                    slot.gen = u64::from(self.gens[block as usize]) + 1;
                    stamp(buf, offset, slot.gen);
                }
                return Some(Cmd::write(offset, self.bs));
            }
            slot.gen = if self.a.verify { u64::from(self.gens[block as usize]) } else { 0 };
            return Some(Cmd::read(offset, self.bs));
        }
        None
    }
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("ringbd bench: {msg}");
    ExitCode::FAILURE
}

pub fn run(a: BenchArgs) -> ExitCode {
    let sizes = if a.sweep_bs.is_empty() { vec![a.bs] } else { a.sweep_bs.clone() };
    let mut cfg = ClientConfig::new(&a.uri.export);
    cfg.base_allocation = false;
    let mut e = match Engine::connect(&a.uri, &cfg, a.conns) {
        Ok(e) => e,
        Err(err) => return fail(err),
    };
    let writes = !matches!(a.rw, Rw::Randread | Rw::Read);
    if (writes || a.verify || a.prefill) && e.has(nbd_proto::wire::tx_flags::READ_ONLY) {
        return fail(format!("{} is read-only", a.uri));
    }
    let region = a.size.unwrap_or(e.size()).min(e.size());
    let mut results = Vec::new();
    for &bs in &sizes {
        if bs == 0 || bs > e.max_request() || bs > region {
            return fail(format!(
                "block size {bs} must be between 1 and min(export region {region}, max request {})",
                e.max_request()
            ));
        }
        match one(&a, &mut e, bs, region) {
            Ok(s) => {
                if !a.json && sizes.len() == 1 {
                    print_one(&a, &s, region);
                }
                results.push(s);
            }
            Err(msg) => return fail(msg),
        }
    }
    if a.json {
        println!("{}", json(&a, region, &results));
    } else if sizes.len() > 1 {
        print_table(&a, region, &results);
    }
    if let Err(err) = e.disconnect() {
        return fail(err);
    }
    if let Some(p) = &a.plot {
        if let Err(msg) = plot(&a, &results, p) {
            return fail(msg);
        }
    }
    ExitCode::SUCCESS
}

/// Writes the region with 1 MiB requests (stamped with generation 1 when
/// verifying at block size `bs`).
fn prefill(a: &BenchArgs, e: &mut Engine, region: u64, bs: u64) -> Result<(), String> {
    let chunk = (1u64 << 20).min(e.max_request()) / bs * bs;
    let chunk = chunk.max(bs);
    let mut off = 0;
    let mut inflight = 0;
    let mut done = Vec::new();
    let mut spare: Vec<Vec<u8>> = Vec::new();
    let end = region / bs * bs;
    while off < end || inflight > 0 {
        while off < end && inflight < 4 * e.conns() {
            let len = chunk.min(end - off);
            let mut buf = spare.pop().unwrap_or_default();
            buf.resize(len as usize, 0x5a);
            if a.verify {
                stamp(&mut buf, off, 1);
            }
            let c = e.least_busy();
            e.submit(c, off, Cmd::write(off, len), buf).map_err(|e| format!("prefill: {e}"))?;
            off += len;
            inflight += 1;
        }
        e.poll(&mut done, true).map_err(|e| format!("prefill: {e}"))?;
        for c in done.drain(..) {
            c.result.map_err(|e| format!("prefill: {e}"))?;
            inflight -= 1;
            spare.push(c.buf);
        }
    }
    Ok(())
}

fn one(a: &BenchArgs, e: &mut Engine, bs: u64, region: u64) -> Result<Stats, String> {
    let blocks = region / bs;
    if a.prefill || a.verify {
        prefill(a, e, region, bs)?;
    }
    let nslots = a.qd.max(1) * e.conns();
    let now = Instant::now();
    let mut slots: Vec<Slot> = (0..nslots)
        .map(|i| Slot {
            conn: i % e.conns(),
            start: now,
            block: 0,
            gen: 0,
            buf: Some(vec![0x5a; bs as usize]),
        })
        .collect();
    let verify_blocks = if a.verify { blocks as usize } else { 0 };
    let mut run = Run {
        a,
        bs,
        blocks,
        rng: Rng(0x9e37_79b9_7f4a_7c15 ^ bs),
        seq: 0,
        gens: vec![1; verify_blocks],
        busy: vec![false; verify_blocks],
    };
    let mut lat: Vec<u64> = Vec::with_capacity(1 << 20);
    let (mut reads, mut writes) = (0u64, 0u64);
    let cpu0 = ringbd_io::client_ring::process_cpu_time().map_err(|e| format!("getrusage: {e}"))?;
    let t0 = Instant::now();
    let deadline = t0 + a.time;
    let mut idle: Vec<usize> = Vec::new();
    for (i, s) in slots.iter_mut().enumerate() {
        match run.pick(s) {
            Some(cmd) => {
                s.start = t0;
                let buf = s.buf.take().unwrap_or_default();
                e.submit(s.conn, i as u64, cmd, buf).map_err(|e| e.to_string())?;
            }
            None => idle.push(i),
        }
    }
    let mut done: Vec<Completion> = Vec::with_capacity(nslots);
    let mut inflight = nslots - idle.len();
    let mut end = t0;
    while inflight > 0 {
        e.poll(&mut done, true).map_err(|e| e.to_string())?;
        let now = Instant::now();
        let running = now < deadline;
        if running {
            end = now;
        }
        for c in done.drain(..) {
            inflight -= 1;
            let i = c.tag as usize;
            let Some(s) = slots.get_mut(i) else { continue };
            let cmd = c.cmd;
            c.result.map_err(|e| e.to_string())?;
            if a.verify {
                if cmd.typ == nbd_proto::wire::CmdType::READ {
                    check(&c.buf, cmd.offset, s.gen)?;
                } else {
                    run.gens[s.block as usize] = s.gen as u32;
                }
                run.busy[s.block as usize] = false;
            }
            s.buf = Some(c.buf);
            if running {
                lat.push(now.duration_since(s.start).as_nanos() as u64);
                if cmd.typ == nbd_proto::wire::CmdType::READ {
                    reads += 1;
                } else {
                    writes += 1;
                }
                idle.push(i);
            }
        }
        if running {
            let mut still = Vec::new();
            for i in idle.drain(..) {
                let s = &mut slots[i];
                match run.pick(s) {
                    Some(cmd) => {
                        s.start = now;
                        let buf = s.buf.take().unwrap_or_default();
                        e.submit(s.conn, i as u64, cmd, buf).map_err(|e| e.to_string())?;
                        inflight += 1;
                    }
                    None => still.push(i),
                }
            }
            idle = still;
            if inflight == 0 && !idle.is_empty() {
                return Err("every block is busy; use a larger --size or a smaller --qd".into());
            }
        }
    }
    let cpu1 = ringbd_io::client_ring::process_cpu_time().map_err(|e| format!("getrusage: {e}"))?;
    let secs = end.duration_since(t0).as_secs_f64().max(1e-9);
    let ops = lat.len() as u64;
    let mean = if ops > 0 { lat.iter().sum::<u64>() as f64 / ops as f64 } else { 0.0 };
    lat.sort_unstable();
    let pct = |p: f64| -> u64 {
        if lat.is_empty() {
            return 0;
        }
        let i = ((p / 100.0) * (lat.len() - 1) as f64).round() as usize;
        lat[i.min(lat.len() - 1)]
    };
    Ok(Stats {
        bs,
        ops,
        reads,
        writes,
        secs,
        cpu_secs: cpu1.saturating_sub(cpu0).as_secs_f64(),
        p50: pct(50.0),
        p99: pct(99.0),
        p999: pct(99.9),
        max: lat.last().copied().unwrap_or(0),
        mean,
    })
}

fn human(bs: u64) -> String {
    match bs {
        b if b >= 1 << 20 && b.is_multiple_of(1 << 20) => format!("{}m", b >> 20),
        b if b >= 1 << 10 && b.is_multiple_of(1 << 10) => format!("{}k", b >> 10),
        b => b.to_string(),
    }
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

fn print_one(a: &BenchArgs, s: &Stats, region: u64) {
    println!(
        "{} bs={} qd={} conns={} time={:.1}s region={} MiB{} uri={}",
        a.rw.name(),
        human(s.bs),
        a.qd,
        a.conns,
        s.secs,
        region >> 20,
        if a.verify { " verify" } else { "" },
        a.uri
    );
    println!("  IOPS:    {:.0} ({} reads, {} writes)", s.iops(), s.reads, s.writes);
    println!("  MiB/s:   {:.1}", s.mibs());
    println!(
        "  latency: p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us, max {:.1} us, mean {:.1} us",
        us(s.p50),
        us(s.p99),
        us(s.p999),
        us(s.max),
        s.mean / 1000.0
    );
    println!("  client CPU: {:.2} us per I/O ({:.2} s)", s.cpu_us_per_io(), s.cpu_secs);
    if a.verify {
        println!("  verify:  {} reads checked, no mismatch", s.reads);
    }
}

fn print_table(a: &BenchArgs, region: u64, rs: &[Stats]) {
    println!(
        "{} qd={} conns={} time={:?} region={} MiB{} uri={}",
        a.rw.name(),
        a.qd,
        a.conns,
        a.time,
        region >> 20,
        if a.verify { " verify" } else { "" },
        a.uri
    );
    println!(
        "{:>6} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10}",
        "bs", "IOPS", "MiB/s", "p50 us", "p99 us", "p99.9 us", "max us", "CPU us/IO"
    );
    for s in rs {
        println!(
            "{:>6} {:>10.0} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>10.2}",
            human(s.bs),
            s.iops(),
            s.mibs(),
            us(s.p50),
            us(s.p99),
            us(s.p999),
            us(s.max),
            s.cpu_us_per_io()
        );
    }
}

/// A JSON string literal.
pub fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn json(a: &BenchArgs, region: u64, rs: &[Stats]) -> String {
    let mut o = String::new();
    let _ = write!(
        o,
        "{{\"uri\": {}, \"rw\": \"{}\", \"rwmixread\": {}, \"qd\": {}, \"conns\": {}, \"region\": {}, \"verify\": {}, \"results\": [",
        json_str(&a.uri.to_string()),
        a.rw.name(),
        a.rwmixread,
        a.qd,
        a.conns,
        region,
        a.verify
    );
    for (i, s) in rs.iter().enumerate() {
        if i > 0 {
            o.push_str(", ");
        }
        let _ = write!(
            o,
            "{{\"bs\": {}, \"ops\": {}, \"reads\": {}, \"writes\": {}, \"seconds\": {:.3}, \"iops\": {:.0}, \"mib_per_s\": {:.2}, \
             \"lat_us\": {{\"p50\": {:.1}, \"p99\": {:.1}, \"p99.9\": {:.1}, \"max\": {:.1}, \"mean\": {:.1}}}, \
             \"cpu_s\": {:.3}, \"cpu_us_per_io\": {:.3}}}",
            s.bs,
            s.ops,
            s.reads,
            s.writes,
            s.secs,
            s.iops(),
            s.mibs(),
            us(s.p50),
            us(s.p99),
            us(s.p999),
            us(s.max),
            s.mean / 1000.0,
            s.cpu_secs,
            s.cpu_us_per_io()
        );
    }
    o.push_str("]}");
    o
}

/// Draws IOPS and MiB/s per block size into the PNG `path`.
fn plot(a: &BenchArgs, rs: &[Stats], path: &std::path::Path) -> Result<(), String> {
    let title = format!("ringbd bench {} qd={} conns={}", a.rw.name(), a.qd, a.conns);
    let points: Vec<_> = rs
        .iter()
        .map(|s| crate::bench_plot::Point { label: human(s.bs), iops: s.iops(), mibs: s.mibs() })
        .collect();
    crate::bench_plot::draw(&title, &points, path)?;
    eprintln!("ringbd bench: plot written to {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_check_and_report_the_offset() {
        let mut b = vec![0u8; 4096];
        stamp(&mut b, 0x10000, 3);
        assert_eq!(check(&b, 0x10000, 3), Ok(()));
        assert!(check(&b, 0x10000, 4).unwrap_err().contains("expected generation 4"));
        b[1000] ^= 1;
        let e = check(&b, 0x10000, 3).unwrap_err();
        assert!(e.contains("offset 0x103e8"), "{e}");
    }

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_str("a\"b\\\n"), "\"a\\\"b\\\\\\u000a\"");
    }
}
