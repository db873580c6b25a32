//! `ringbd copy SRC DST`: copies between NBD URIs, files, block devices and
//! stdin/stdout. Sparse-aware: the source's allocation map (NBD block
//! status, or SEEK_DATA/SEEK_HOLE on files) and all-zero reads turn into
//! `NBD_CMD_WRITE_ZEROES` on an NBD destination and nothing at all on a
//! freshly created file. NBD sides use several connections and many
//! requests in flight on one io_uring ring.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Read, Write};
use std::ops::Range;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::process::ExitCode;

use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use nbd_proto::wire::{state_flags, tx_flags, CmdType};
use ringbd_client::{ClientConfig, Cmd, Completion, Engine, NbdUri};

use crate::cmd_info::{allocation_map, MapEntry};

#[derive(Args)]
#[command(after_help = "\
SRC and DST are each an NBD URI (nbd://, nbd+unix://), a file or block device, or - (stdin/stdout).
Zero and unallocated areas of the source are written as NBD_CMD_WRITE_ZEROES (or skipped on a new file).

Examples:
  ringbd copy disk.img nbd://127.0.0.1/
  ringbd copy nbd+unix:///?socket=/tmp/a.sock nbd+unix:///?socket=/tmp/b.sock --flush
  ringbd copy nbd://host/disk - | gzip > disk.img.gz")]
pub struct CopyArgs {
    /// Source: NBD URI, file, block device, or - for stdin.
    src: String,
    /// Destination: NBD URI, file, block device, or - for stdout.
    dst: String,
    /// Connections to each NBD side [default: the number of CPUs, at most 4].
    #[arg(short = 'C', long)]
    connections: Option<usize>,
    /// Requests in flight in total [default: 16 per connection].
    #[arg(short = 'R', long)]
    requests: Option<usize>,
    /// Bytes per read/write request.
    #[arg(long, default_value = "256k", value_parser = ringbd_backend::parse_size)]
    request_size: u64,
    /// Flush the destination when done.
    #[arg(long)]
    flush: bool,
    /// Never show the progress bar (it is shown only when stderr is a terminal).
    #[arg(long)]
    no_progress: bool,
    /// The destination already reads as zeroes: skip zero areas entirely.
    #[arg(long)]
    destination_is_zero: bool,
}

enum Src {
    Nbd { conns: Range<usize> },
    File(File),
    Stdin(std::io::Stdin),
}

enum Dst {
    Nbd {
        conns: Range<usize>,
        zero: bool,
        multi_conn: bool,
    },
    /// `zeroed`: freshly created or truncated, so zero areas need nothing.
    File {
        f: File,
        zeroed: bool,
    },
    Stdout {
        out: std::io::Stdout,
        next: u64,
        waiting: BTreeMap<u64, Piece>,
    },
}

enum Piece {
    Data(Vec<u8>),
    Zero(u64),
}

#[derive(Clone, Copy)]
enum Work {
    Data(u64, u64),
    Zero(u64, u64),
}

/// Largest single WRITE_ZEROES request.
const ZERO_CHUNK: u64 = 1 << 30;

/// One connection per CPU, at most 4: on a small machine more connections
/// than cores only add context switches on both sides.
fn connections(a: &CopyArgs) -> usize {
    a.connections.unwrap_or_else(|| std::thread::available_parallelism().map_or(4, |n| n.get().min(4))).max(1)
}

fn err(msg: impl std::fmt::Display) -> String {
    msg.to_string()
}

pub fn run(a: CopyArgs) -> ExitCode {
    match copy(&a) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringbd copy: {e}");
            ExitCode::FAILURE
        }
    }
}

fn is_zero(b: &[u8]) -> bool {
    b.chunks(4096).all(|c| c.iter().fold(0u8, |acc, &x| acc | x) == 0)
}

fn open_src(a: &CopyArgs, e: &mut Option<Engine>) -> Result<(Src, Option<u64>), String> {
    if a.src == "-" {
        return Ok((Src::Stdin(std::io::stdin()), None));
    }
    if ringbd_client::uri::is_nbd_uri(&a.src) {
        let uri: NbdUri = a.src.parse().map_err(err)?;
        let eng = engine(e)?;
        let conns = eng.add(&uri, &ClientConfig::new(&uri.export), connections(a)).map_err(err)?;
        let size = eng.negotiated_of(conns.start).map(|n| n.size);
        return Ok((Src::Nbd { conns }, size));
    }
    let f = File::open(&a.src).map_err(|e| format!("open {}: {e}", a.src))?;
    let md = f.metadata().map_err(|e| format!("stat {}: {e}", a.src))?;
    let size = if md.file_type().is_block_device() {
        ringbd_io::fs::block_device_size(&f).map_err(|e| format!("size of {}: {e}", a.src))?
    } else {
        md.len()
    };
    Ok((Src::File(f), Some(size)))
}

fn engine(e: &mut Option<Engine>) -> Result<&mut Engine, String> {
    if e.is_none() {
        *e = Some(Engine::new().map_err(err)?);
    }
    e.as_mut().ok_or_else(|| "no engine".to_owned())
}

fn open_dst(a: &CopyArgs, e: &mut Option<Engine>, size: Option<u64>) -> Result<Dst, String> {
    if a.dst == "-" {
        return Ok(Dst::Stdout { out: std::io::stdout(), next: 0, waiting: BTreeMap::new() });
    }
    if ringbd_client::uri::is_nbd_uri(&a.dst) {
        let uri: NbdUri = a.dst.parse().map_err(err)?;
        let eng = engine(e)?;
        let conns = eng.add(&uri, &ClientConfig::new(&uri.export), connections(a)).map_err(err)?;
        let n = eng.negotiated_of(conns.start).ok_or("no destination connection")?;
        if n.flags & tx_flags::READ_ONLY != 0 {
            return Err(format!("{} is read-only", a.dst));
        }
        if let Some(s) = size {
            if n.size < s {
                return Err(format!("{} ({} bytes) is smaller than the source ({s} bytes)", a.dst, n.size));
            }
        }
        let zero = n.flags & tx_flags::SEND_WRITE_ZEROES != 0;
        let multi_conn = n.flags & tx_flags::CAN_MULTI_CONN != 0;
        return Ok(Dst::Nbd { conns, zero, multi_conn });
    }
    let existing = std::fs::metadata(&a.dst).ok();
    if existing.as_ref().is_some_and(|m| m.file_type().is_block_device()) {
        let f = OpenOptions::new().write(true).open(&a.dst).map_err(|e| format!("open {}: {e}", a.dst))?;
        return Ok(Dst::File { f, zeroed: false });
    }
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&a.dst)
        .map_err(|e| format!("create {}: {e}", a.dst))?;
    if let Some(s) = size {
        f.set_len(s).map_err(|e| format!("set the size of {} to {s}: {e}", a.dst))?;
    }
    Ok(Dst::File { f, zeroed: true })
}

/// The source's map: data and zero runs covering `0..size`.
fn plan(src: &Src, e: &mut Option<Engine>, size: u64) -> Result<Vec<MapEntry>, String> {
    let all_data = || vec![MapEntry { offset: 0, len: size, flags: 0 }];
    match src {
        Src::Nbd { conns } => {
            let Some(eng) = e.as_mut() else { return Ok(all_data()) };
            if eng.negotiated_of(conns.start).is_none_or(|n| n.base_allocation.is_none()) {
                return Ok(all_data());
            }
            allocation_map(eng, conns.start, size).map_err(|e| format!("map the source: {e}"))
        }
        Src::File(f) => {
            let mut out = Vec::new();
            let mut off = 0;
            while off < size {
                let data = match ringbd_io::fs::seek_data(f, off) {
                    Ok(Some(d)) => d.min(size),
                    Ok(None) => size,
                    // No SEEK_DATA here (e.g. a block device): all data.
                    Err(_) => return Ok(all_data()),
                };
                if data > off {
                    out.push(MapEntry { offset: off, len: data - off, flags: state_flags::ZERO });
                }
                if data >= size {
                    break;
                }
                let hole =
                    ringbd_io::fs::seek_hole(f, data).map_err(|e| format!("SEEK_HOLE at {data}: {e}"))?;
                let hole = hole.min(size).max(data + 1);
                out.push(MapEntry { offset: data, len: hole - data, flags: 0 });
                off = hole;
            }
            Ok(out)
        }
        Src::Stdin(_) => Ok(Vec::new()),
    }
}

/// Ranges the destination already reads as zeroes (from its block status
/// before the copy starts), so zeroing them again can be skipped.
struct ZeroMap(Vec<(u64, u64)>);

impl ZeroMap {
    fn covers(&self, off: u64, len: u64) -> bool {
        let i = self.0.partition_point(|&(_, end)| end <= off);
        self.0.get(i).is_some_and(|&(start, end)| start <= off && off + len <= end)
    }
}

/// The destination's zero ranges, when it is an NBD export with base:allocation.
fn dst_zero_map(dst: &Dst, e: &mut Option<Engine>) -> Result<ZeroMap, String> {
    let (Dst::Nbd { conns, .. }, Some(eng)) = (dst, e.as_mut()) else { return Ok(ZeroMap(Vec::new())) };
    let Some(n) = eng.negotiated_of(conns.start) else { return Ok(ZeroMap(Vec::new())) };
    if n.base_allocation.is_none() {
        return Ok(ZeroMap(Vec::new()));
    }
    let size = n.size;
    let map = allocation_map(eng, conns.start, size).map_err(|e| format!("map the destination: {e}"))?;
    let mut out: Vec<(u64, u64)> = Vec::new();
    for m in map.iter().filter(|m| m.flags & state_flags::ZERO != 0) {
        match out.last_mut() {
            Some(last) if last.1 == m.offset => last.1 += m.len,
            _ => out.push((m.offset, m.offset + m.len)),
        }
    }
    Ok(ZeroMap(out))
}

struct Copier<'a> {
    a: &'a CopyArgs,
    e: Option<Engine>,
    dst: Dst,
    dst_zero: ZeroMap,
    pool: Vec<Vec<u8>>,
    done_bytes: u64,
    zero_bytes: u64,
}

impl Copier<'_> {
    fn buf(&mut self, len: u64) -> Vec<u8> {
        let mut b = self.pool.pop().unwrap_or_default();
        b.resize(len as usize, 0);
        b
    }

    /// Writes zeroes at `off..off+len` on the destination.
    fn zero(&mut self, off: u64, len: u64) -> Result<(), String> {
        self.zero_bytes += len;
        match &mut self.dst {
            _ if self.a.destination_is_zero || self.dst_zero.covers(off, len) => self.done_bytes += len,
            Dst::Nbd { conns, zero: true, .. } => {
                let mut o = off;
                while o < off + len {
                    let l = (off + len - o).min(ZERO_CHUNK);
                    let eng = self.e.as_mut().ok_or("no engine")?;
                    let c = eng.least_busy_in(conns.clone());
                    eng.submit(c, 0, Cmd::zero(o, l), Vec::new()).map_err(err)?;
                    o += l;
                }
            }
            Dst::Nbd { .. } => {
                let mut o = off;
                while o < off + len {
                    let l = (off + len - o).min(self.a.request_size);
                    let b = self.buf(l);
                    self.write(o, b, false)?;
                    o += l;
                }
            }
            Dst::File { zeroed: true, .. } => self.done_bytes += len,
            Dst::File { f, .. } => {
                let z = vec![0u8; self.a.request_size as usize];
                let mut o = off;
                while o < off + len {
                    let l = (off + len - o).min(self.a.request_size) as usize;
                    f.write_all_at(&z[..l], o)
                        .map_err(|e| format!("write {l} bytes at {o} of {}: {e}", self.a.dst))?;
                    o += l as u64;
                }
                self.done_bytes += len;
            }
            Dst::Stdout { waiting, .. } => {
                waiting.insert(off, Piece::Zero(len));
                self.drain_stdout()?;
            }
        }
        Ok(())
    }

    /// Sends data read from the source to the destination.
    fn write(&mut self, off: u64, buf: Vec<u8>, detect_zero: bool) -> Result<(), String> {
        let len = buf.len() as u64;
        if detect_zero && is_zero(&buf) {
            let cheap = matches!(self.dst, Dst::Nbd { zero: true, .. } | Dst::File { zeroed: true, .. });
            if cheap || self.a.destination_is_zero {
                self.pool.push(buf);
                return self.zero(off, len);
            }
        }
        match &mut self.dst {
            Dst::Nbd { conns, .. } => {
                let eng = self.e.as_mut().ok_or("no engine")?;
                let c = eng.least_busy_in(conns.clone());
                eng.submit(c, 0, Cmd::write(off, len), buf).map_err(err)?;
            }
            Dst::File { f, .. } => {
                f.write_all_at(&buf, off)
                    .map_err(|e| format!("write {len} bytes at {off} of {}: {e}", self.a.dst))?;
                self.done_bytes += len;
                self.pool.push(buf);
            }
            Dst::Stdout { waiting, .. } => {
                waiting.insert(off, Piece::Data(buf));
                self.drain_stdout()?;
            }
        }
        Ok(())
    }

    fn drain_stdout(&mut self) -> Result<(), String> {
        let Dst::Stdout { out, next, waiting } = &mut self.dst else { return Ok(()) };
        while let Some(p) = waiting.remove(next) {
            let mut o = out.lock();
            match p {
                Piece::Data(b) => {
                    o.write_all(&b).map_err(|e| format!("write to stdout: {e}"))?;
                    *next += b.len() as u64;
                    self.done_bytes += b.len() as u64;
                    self.pool.push(b);
                }
                Piece::Zero(len) => {
                    let z = vec![0u8; (1 << 20).min(len) as usize];
                    let mut left = len;
                    while left > 0 {
                        let l = left.min(z.len() as u64) as usize;
                        o.write_all(&z[..l]).map_err(|e| format!("write to stdout: {e}"))?;
                        left -= l as u64;
                    }
                    *next += len;
                    self.done_bytes += len;
                }
            }
        }
        Ok(())
    }

    fn completion(&mut self, c: Completion) -> Result<(), String> {
        c.result.map_err(|e| format!("{e}"))?;
        match c.cmd.typ {
            CmdType::READ => self.write(c.cmd.offset, c.buf, true),
            _ => {
                self.done_bytes += c.cmd.len;
                if !c.buf.is_empty() {
                    self.pool.push(c.buf);
                }
                Ok(())
            }
        }
    }
}

/// The progress bar (indicatif): on stderr, only when it is a terminal
/// and `--no-progress` was not given; a byte count and rate when the size
/// is unknown (stdin).
fn progress_bar(on: bool, total: Option<u64>) -> ProgressBar {
    if !on {
        return ProgressBar::hidden();
    }
    let (pb, template) = match total {
        Some(t) if t > 0 => (
            ProgressBar::new(t),
            "[{bar:40}] {percent:>3}% {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta}",
        ),
        _ => (ProgressBar::no_length(), "{binary_bytes} {binary_bytes_per_sec}"),
    };
    pb.set_draw_target(ProgressDrawTarget::stderr_with_hz(5));
    if let Ok(style) = ProgressStyle::with_template(template) {
        pb.set_style(style.progress_chars("#> "));
    }
    pb
}

fn copy(a: &CopyArgs) -> Result<(), String> {
    let mut e = None;
    let (src, size) = open_src(a, &mut e)?;
    let dst = open_dst(a, &mut e, size)?;
    let map = match size {
        Some(s) => plan(&src, &mut e, s)?,
        None => Vec::new(),
    };
    let rs = a.request_size.max(512).min(e.as_ref().map_or(32 << 20, |e| e.max_request()));
    let mut work: VecDeque<Work> = VecDeque::new();
    for m in &map {
        let zero = m.flags & state_flags::ZERO != 0;
        let step = if zero { ZERO_CHUNK } else { rs };
        let mut o = m.offset;
        while o < m.offset + m.len {
            let l = (m.offset + m.len - o).min(step);
            work.push_back(if zero { Work::Zero(o, l) } else { Work::Data(o, l) });
            o += l;
        }
    }
    let dst_zero = dst_zero_map(&dst, &mut e)?;
    let mut c = Copier { a, e, dst, dst_zero, pool: Vec::new(), done_bytes: 0, zero_bytes: 0 };
    let progress = progress_bar(!a.no_progress && std::io::stderr().is_terminal(), size);
    let mut stdin_off = 0u64;
    let mut stdin_eof = false;
    let mut done = Vec::new();
    let max = a.requests.unwrap_or(16 * connections(a)).max(1);
    loop {
        let inflight = |c: &Copier| c.e.as_ref().map_or(0, |e| e.total_inflight());
        while inflight(&c) < max {
            if let Src::Stdin(s) = &src {
                if stdin_eof {
                    break;
                }
                let mut b = c.buf(rs);
                let mut got = 0;
                while got < b.len() {
                    let n = s
                        .lock()
                        .read(&mut b[got..])
                        .map_err(|e| format!("read stdin at {}: {e}", stdin_off + got as u64))?;
                    if n == 0 {
                        stdin_eof = true;
                        break;
                    }
                    got += n;
                }
                b.truncate(got);
                if got > 0 {
                    c.write(stdin_off, b, true)?;
                    stdin_off += got as u64;
                }
                continue;
            }
            let Some(w) = work.pop_front() else { break };
            match w {
                Work::Zero(o, l) => c.zero(o, l)?,
                Work::Data(o, l) => match &src {
                    Src::Nbd { conns } => {
                        let b = c.buf(l);
                        let eng = c.e.as_mut().ok_or("no engine")?;
                        let conn = eng.least_busy_in(conns.clone());
                        eng.submit(conn, 0, Cmd::read(o, l), b).map_err(err)?;
                    }
                    Src::File(f) => {
                        let mut b = c.buf(l);
                        f.read_exact_at(&mut b, o)
                            .map_err(|e| format!("read {l} bytes at {o} of {}: {e}", a.src))?;
                        c.write(o, b, true)?;
                    }
                    Src::Stdin(_) => {}
                },
            }
        }
        if inflight(&c) == 0 && work.is_empty() && (stdin_eof || !matches!(src, Src::Stdin(_))) {
            break;
        }
        if let Some(eng) = c.e.as_mut() {
            eng.poll(&mut done, true).map_err(err)?;
        }
        for comp in done.drain(..) {
            c.completion(comp)?;
        }
        progress.set_position(c.done_bytes);
    }
    let total = size.unwrap_or(stdin_off);
    if let Dst::Stdout { out, waiting, .. } = &mut c.dst {
        if !waiting.is_empty() {
            return Err(format!("{} pieces never reached stdout", waiting.len()));
        }
        out.flush().map_err(|e| format!("flush stdout: {e}"))?;
    }
    if a.flush {
        match &c.dst {
            Dst::Nbd { conns, multi_conn, .. } => {
                let eng = c.e.as_mut().ok_or("no engine")?;
                let targets: Vec<usize> =
                    if *multi_conn { vec![conns.start] } else { conns.clone().collect() };
                for conn in targets {
                    eng.run(conn, Cmd::flush(), Vec::new()).map_err(err)?.result.map_err(err)?;
                }
            }
            Dst::File { f, .. } => f.sync_all().map_err(|e| format!("fsync {}: {e}", a.dst))?,
            Dst::Stdout { .. } => {}
        }
    }
    progress.set_position(total);
    progress.finish();
    if let Some(eng) = c.e.take() {
        eng.disconnect().map_err(err)?;
    }
    if c.done_bytes != total {
        return Err(format!("copied {} of {total} bytes", c.done_bytes));
    }
    Ok(())
}
