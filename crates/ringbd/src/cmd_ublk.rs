//! `ringbd attach`, `ringbd detach`, `ringbd list`: the ublk frontend.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use ringbd_ublk::backend::{is_volatile, BackendTarget};
use ringbd_ublk::device::{self, block_path, state_name};
use ringbd_ublk::{AttachOptions, Device, TermSignals};

#[derive(Args)]
#[command(after_help = "\
TARGET is any export spec of `ringbd serve`, driven through the same backend layer:
  memory:SIZE           a memory export (gone when this process ends: such a device
                        is never recoverable)
  file:PATH[,direct]    a regular file or block device (direct: O_DIRECT); reads,
                        writes, flushes and fallocates run on the queue's ring
  null:SIZE             reads zeroes, drops writes, e.g. null:1G
  qcow2:PATH[,direct]   a qcow2 image (read-write, or --read-only) and its backing chain
  rbd:POOL/IMAGE[@SNAPSHOT]
                        a Ceph RBD image through librbd's asynchronous API (one process,
                        no kernel nbd driver; see --ceph-conf and docs/rbd.md)
  nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH (and nbds://, nbds+unix://)
                        another server's export through ringbd's client (up to 4
                        connections with multi-conn); size, read-only, flush/FUA/trim/
                        write-zeroes come from the export; a lost server is reconnected
                        every second and unanswered requests sent again; after 30 s
                        they fail with EIO (docs/proxy.md)
  fault:RULES:SPEC      SPEC with injected errors and delays, e.g.
                        fault:write=1%@ENOSPC:memory:1G (errors reach the writer with
                        their errno; delays hold the queue)

The block device path (/dev/ublkbN) is printed on stdout once the device is live;
attach then serves it in the foreground until SIGINT/SIGTERM or `ringbd detach`.
Devices are created with USER_RECOVERY where the kernel has it: if this process
dies, `ringbd attach TARGET --recover N` re-attaches /dev/ublkbN and queued I/O
goes on. Needs root and the ublk_drv module (Linux 6.0+; 6.5+ for GET_FEATURES).

Examples:
  ringbd attach null:1G --block-size 4096
  ringbd attach file:/srv/disk.img --queues 2 --depth 128
  ringbd attach file:/srv/disk.img --recover 0
  ringbd attach rbd:rbd/disk --ceph-id admin
  ringbd attach nbd+unix:///disk?socket=/run/ringbd.sock")]
pub struct AttachArgs {
    /// What backs the device.
    target: ringbd_backend::Spec,
    /// Queues (a thread and ring each) [default: CPUs, at most 4].
    #[arg(long, value_name = "N")]
    queues: Option<u16>,
    /// Requests in flight per queue.
    #[arg(long, value_name = "N", default_value = "64")]
    depth: u16,
    /// Logical and physical block size: 512, 1024, 2048 or 4096 [default: 512,
    /// or the target's minimum: the alignment O_DIRECT needs].
    #[arg(long, value_name = "BYTES")]
    block_size: Option<u32>,
    /// Device size [default: the target's, rounded down to the block size].
    #[arg(long, value_name = "SIZE", value_parser = ringbd_backend::parse_size)]
    size: Option<u64>,
    /// Largest request, and the buffer per tag [default: 512K].
    #[arg(long, value_name = "SIZE", value_parser = ringbd_backend::parse_size)]
    max_io: Option<u64>,
    /// Refuse writes, discards and write-zeroes.
    #[arg(long)]
    read_only: bool,
    /// Ask for device id N (/dev/ublkbN) [default: the driver picks].
    #[arg(long, value_name = "N", conflicts_with = "recover")]
    id: Option<u32>,
    /// Create the device without USER_RECOVERY: if ringbd dies, the device goes away.
    #[arg(long, conflicts_with = "recover")]
    no_recovery: bool,
    /// Copy request data through ringbd's buffers even where the driver offers
    /// zero-copy (UBLK_F_AUTO_BUF_REG, Linux 6.16+) and the target can use it.
    #[arg(long, conflicts_with = "recover")]
    no_zero_copy: bool,
    /// Re-attach device N (ID or /dev/ublkbN), whose previous server died.
    #[arg(long, value_name = "ID", value_parser = device::parse_device)]
    recover: Option<u32>,
    #[command(flatten)]
    ceph: crate::CephArgs,
    /// Log debug events too (see -q, RUST_LOG).
    #[arg(short, long)]
    verbose: bool,
}

impl AttachArgs {
    pub fn verbose(&self) -> bool {
        self.verbose
    }
}

#[derive(Args)]
pub struct DetachArgs {
    /// Device id or /dev/ublkbN.
    #[arg(value_parser = device::parse_device)]
    device: u32,
    /// How long to wait for the serving process to tear the device down.
    #[arg(long, value_name = "SECONDS", default_value = "30")]
    timeout: u64,
}

#[derive(Args)]
pub struct ListArgs {}

fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("ringbd: error: {e}");
    ExitCode::FAILURE
}

pub fn attach(a: AttachArgs) -> ExitCode {
    // Before any thread exists, so SIGINT/SIGTERM reach only this fd.
    let signals = match TermSignals::new() {
        Ok(s) => s,
        Err(e) => return fail(format!("signalfd: {e}")),
    };
    let volatile = is_volatile(&a.target);
    if volatile && a.recover.is_some() {
        return fail(
            "a memory export lives only in the process that served it: a new one starts empty, so \
                     there is no data to recover the device with (detach it, or attach a new one)",
        );
    }
    let target = match BackendTarget::open(&a.target, a.read_only, &a.ceph.config()) {
        Ok(t) => t,
        Err(e) => return fail(e),
    };
    let path = target.path();
    let target: std::sync::Arc<dyn ringbd_ublk::Target> = std::sync::Arc::new(target);
    let info = target.info();
    let max_io = match a.max_io {
        Some(m) => match u32::try_from(m) {
            Ok(v) => v,
            Err(_) => return fail(format!("--max-io {m} is too large")),
        },
        None => 512 << 10,
    };
    let block_size = a.block_size.unwrap_or(info.min_block_size.max(512));
    let dev = match a.recover {
        Some(id) => Device::recover(target.clone(), id),
        None => {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()).min(4) as u16;
            let queues = a.queues.unwrap_or(cpus);
            let o = AttachOptions {
                queues,
                depth: a.depth,
                block_size,
                size: a.size,
                max_io,
                read_only: a.read_only,
                dev_id: a.id,
                // A device whose data died with this process must go away
                // with it, not wait for a recovery that cannot bring it back.
                recovery: !a.no_recovery && !volatile,
                zero_copy: !a.no_zero_copy,
            };
            Device::attach(target.clone(), &o)
        }
    };
    let dev = match dev {
        Ok(d) => d,
        Err(e) => return fail(e),
    };
    let (i, p) = (&dev.info, &dev.params.basic);
    tracing::info!(
        "ublk device {} {}: {} bytes, {}-byte blocks, {} queue(s) x {} deep, {} KiB max I/O, device flags {}; driver features {}",
        i.dev_id,
        if a.recover.is_some() { "recovered" } else { "started" },
        p.dev_sectors << 9,
        1u32 << p.logical_bs_shift,
        i.nr_hw_queues,
        i.queue_depth,
        i.max_io_buf_bytes >> 10,
        ringbd_io_names(i.flags),
        ringbd_io_names(dev.features),
    );
    tracing::info!(
        "ublk device {} data path: {}",
        i.dev_id,
        ringbd_ublk::device::data_path(i.flags, dev.features, &info, !a.no_zero_copy)
    );
    tracing::info!("serving {} on {} ({})", target.describe(), block_path(i.dev_id), path.name());
    let mut out = std::io::stdout();
    if let Err(e) = writeln!(out, "{}", block_path(i.dev_id)).and_then(|()| out.flush()) {
        tracing::warn!("writing the device path to stdout: {e}");
    }
    let id = dev.id();
    match dev.run(&signals) {
        Ok(()) => {
            tracing::info!("ublk device {id} removed");
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

fn ringbd_io_names(flags: u64) -> String {
    format!("{flags:#x} ({})", ringbd_ublk::device::feature_names(flags))
}

pub fn detach(a: DetachArgs) -> ExitCode {
    match device::detach(a.device, Duration::from_secs(a.timeout)) {
        Ok(()) => {
            eprintln!("ringbd: ublk device {} detached", a.device);
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

pub fn list(_a: ListArgs) -> ExitCode {
    let features = match device::features() {
        Ok(f) => f,
        Err(e) => return fail(e),
    };
    let devs = match device::list() {
        Ok(d) => d,
        Err(e) => return fail(e),
    };
    println!("# ublk_drv features {}", ringbd_io_names(features));
    println!(
        "{:<4} {:<16} {:<9} {:>14} {:>5} {:>6} {:>8} {:>7}  flags",
        "id", "device", "state", "bytes", "bs", "queues", "depth", "pid"
    );
    for d in devs {
        let (size, bs) = match d.params {
            Some(p) => {
                ((p.basic.dev_sectors << 9).to_string(), (1u32 << p.basic.logical_bs_shift).to_string())
            }
            None => ("?".to_owned(), "?".to_owned()),
        };
        println!(
            "{:<4} {:<16} {:<9} {:>14} {:>5} {:>6} {:>8} {:>7}  {}",
            d.info.dev_id,
            block_path(d.info.dev_id),
            state_name(d.info.state),
            size,
            bs,
            d.info.nr_hw_queues,
            d.info.queue_depth,
            d.info.ublksrv_pid,
            ringbd_ublk::device::feature_names(d.info.flags)
        );
    }
    ExitCode::SUCCESS
}
