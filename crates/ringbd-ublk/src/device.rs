//! A ublk device's life: create (ADD_DEV, SET_PARAMS, queue threads,
//! START_DEV) or re-attach after a crash (START_USER_RECOVERY, queue
//! threads, END_USER_RECOVERY); serve until a signal or until the device
//! is stopped from elsewhere; tear down (STOP_DEV, join, DEL_DEV).
//! Also `detach` and `list` for devices served by other processes.

use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::kernel::{sys, Control, DevInfo, Params, QueueConfig};
use ringbd_io::signal::TermSignals;

use crate::error::{Context, Error, Result};
use crate::queue::{self, QueueStats};
use crate::target::{Target, TargetInfo};

/// Options of `ringbd attach`.
#[derive(Debug, Clone)]
pub struct AttachOptions {
    pub queues: u16,
    pub depth: u16,
    /// Logical (and physical) block size.
    pub block_size: u32,
    /// Device size; default: the target's, rounded down to the block size.
    pub size: Option<u64>,
    /// Largest request (and per-tag buffer) in bytes.
    pub max_io: u32,
    pub read_only: bool,
    /// Ask for this device id (default: the driver picks).
    pub dev_id: Option<u32>,
    /// Create the device with USER_RECOVERY(+REISSUE) when the driver has it.
    pub recovery: bool,
    /// Create the device with `UBLK_F_AUTO_BUF_REG` (zero-copy) when the
    /// driver reports it and the target can use it; false forces the copy path.
    pub zero_copy: bool,
}

impl Default for AttachOptions {
    fn default() -> Self {
        AttachOptions {
            queues: 1,
            depth: 64,
            block_size: 512,
            size: None,
            max_io: 512 << 10,
            read_only: false,
            dev_id: None,
            recovery: true,
            zero_copy: true,
        }
    }
}

/// Feature bits that let requests skip the copy into ringbd's buffers
/// (6.15+). Only `UBLK_F_AUTO_BUF_REG` (6.16) is used, for targets that can
/// (see [`TargetInfo::zero_copy`]); `UBLK_F_SUPPORT_ZERO_COPY` alone would
/// need a REGISTER_IO_BUF command per request.
pub const ZERO_COPY_FEATURES: u64 = sys::UBLK_F_SUPPORT_ZERO_COPY | sys::UBLK_F_AUTO_BUF_REG;

/// How a device's request data moves, and why: for `ringbd attach`'s
/// message. `flags` are the device's, `features` the driver's.
pub fn data_path(flags: u64, features: u64, target: &TargetInfo, asked: bool) -> String {
    if flags & sys::UBLK_F_AUTO_BUF_REG != 0 {
        "zero-copy (AUTO_BUF_REG: the target reads and writes the request's pages as fixed buffers)"
            .to_owned()
    } else if features & sys::UBLK_F_AUTO_BUF_REG == 0 {
        "copy (the driver does not offer AUTO_BUF_REG, Linux 6.16+)".to_owned()
    } else if !asked {
        "copy (--no-zero-copy)".to_owned()
    } else if !target.zero_copy {
        "copy (this target cannot use the driver's AUTO_BUF_REG)".to_owned()
    } else {
        "copy".to_owned()
    }
}

/// The block device path of device `id`.
pub fn block_path(id: u32) -> String {
    format!("/dev/ublkb{id}")
}

fn char_path(id: u32) -> String {
    format!("/dev/ublkc{id}")
}

/// The feature flags the driver reports.
pub fn features() -> Result<u64> {
    let mut ctrl = Control::open().context(|| "ublk".to_owned())?;
    ctrl.get_features().context(|| "ublk GET_FEATURES (needs Linux 6.5+)".to_owned())
}

/// A device this process serves.
pub struct Device {
    ctrl: Control,
    pub info: DevInfo,
    pub params: Params,
    pub features: u64,
    queues: Vec<JoinHandle<Result<QueueStats>>>,
    /// Whether this process created the device (and so deletes it).
    created: bool,
}

fn check_options(o: &AttachOptions, t: &dyn Target) -> Result<()> {
    let bs = o.block_size;
    if !(512..=4096).contains(&bs) || !bs.is_power_of_two() {
        return Err(Error::msg(format!("--block-size {bs}: must be 512, 1024, 2048 or 4096"), libc::EINVAL));
    }
    let min = t.info().min_block_size;
    if bs < min {
        return Err(Error::msg(
            format!("--block-size {bs}: {} needs at least {min}", t.describe()),
            libc::EINVAL,
        ));
    }
    if o.depth == 0 || o.depth > sys::UBLK_MAX_QUEUE_DEPTH {
        return Err(Error::msg(
            format!("--depth {}: must be 1..={}", o.depth, sys::UBLK_MAX_QUEUE_DEPTH),
            libc::EINVAL,
        ));
    }
    if o.queues == 0 || o.queues > sys::UBLK_MAX_NR_QUEUES {
        return Err(Error::msg(
            format!("--queues {}: must be 1..={}", o.queues, sys::UBLK_MAX_NR_QUEUES),
            libc::EINVAL,
        ));
    }
    if o.max_io < 4096 || o.max_io > sys::UBLK_MAX_IO_BUF_BYTES || !o.max_io.is_multiple_of(4096) {
        return Err(Error::msg(
            format!("--max-io {}: must be a multiple of 4096 up to {}", o.max_io, sys::UBLK_MAX_IO_BUF_BYTES),
            libc::EINVAL,
        ));
    }
    Ok(())
}

fn device_size(o: &AttachOptions, t: &dyn Target) -> Result<u64> {
    let avail = t.info().size;
    let size = match o.size {
        Some(s) if s > avail => {
            return Err(Error::msg(
                format!("--size {s}: {} has only {avail} bytes", t.describe()),
                libc::EINVAL,
            ))
        }
        Some(s) => s,
        None => avail,
    };
    let size = size - size % u64::from(o.block_size);
    if size == 0 {
        return Err(Error::msg(
            format!("{}: size {avail} is smaller than one {}-byte block", t.describe(), o.block_size),
            libc::EINVAL,
        ));
    }
    Ok(size)
}

fn build_params(o: &AttachOptions, t: &dyn Target, size: u64, max_io: u32) -> Params {
    let info = t.info();
    let shift = o.block_size.trailing_zeros() as u8;
    let mut attrs = 0;
    if o.read_only || info.read_only {
        attrs |= sys::UBLK_ATTR_READ_ONLY;
    }
    if info.flush {
        attrs |= sys::UBLK_ATTR_VOLATILE_CACHE;
        if !info.no_fua {
            attrs |= sys::UBLK_ATTR_FUA;
        }
    }
    // The target's preferred I/O size, where it is a power of two above
    // the block size (an NBD export's INFO_BLOCK_SIZE preferred).
    let opt_shift = if info.opt_io.is_power_of_two() && info.opt_io > o.block_size {
        (info.opt_io.trailing_zeros() as u8).min(20)
    } else {
        shift
    };
    let mut p = Params {
        types: sys::UBLK_PARAM_TYPE_BASIC,
        basic: sys::ParamBasic {
            attrs,
            logical_bs_shift: shift,
            physical_bs_shift: shift,
            io_opt_shift: opt_shift,
            io_min_shift: shift,
            max_sectors: max_io >> 9,
            dev_sectors: size >> 9,
            ..Default::default()
        },
        ..Default::default()
    };
    if (info.discard || info.write_zeroes) && !o.read_only {
        p.types |= sys::UBLK_PARAM_TYPE_DISCARD;
        p.discard = sys::ParamDiscard {
            discard_alignment: 0,
            discard_granularity: o.block_size,
            max_discard_sectors: if info.discard { u32::MAX >> 9 } else { 0 },
            // At most one buffer's worth per request: a backend that cannot
            // zero a range writes zeroes, holding its queue that long.
            max_write_zeroes_sectors: if info.write_zeroes { max_io >> 9 } else { 0 },
            max_discard_segments: 1,
            reserved0: 0,
        };
    }
    p
}

/// Opens /dev/ublkcN, retrying while it is still busy (the previous
/// server's file not yet released) or not yet created by devtmpfs/udev.
fn open_char(id: u32) -> Result<File> {
    let path = char_path(id);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => return Ok(f),
            Err(e)
                if Instant::now() < deadline
                    && (e.raw_os_error() == Some(libc::EBUSY)
                        || e.kind() == std::io::ErrorKind::NotFound) =>
            {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => return Err(Error::new(format!("ublk device {id}: open {path}"), e)),
        }
    }
}

/// The CPUs blk-mq maps to each queue, for pinning its thread; empty
/// (no pinning) where the driver does not say.
fn queue_cpus(ctrl: &mut Control, info: &DevInfo) -> Vec<Vec<usize>> {
    let mut all = Vec::new();
    for q in 0..info.nr_hw_queues {
        match ctrl.get_queue_affinity(info.dev_id, q) {
            Ok(cpus) => all.push(cpus),
            Err(e) => {
                tracing::warn!("ublk device {} queue {q}: GET_QUEUE_AFFINITY: {e}; not pinning", info.dev_id);
                return Vec::new();
            }
        }
    }
    all
}

/// Starts a thread per queue (pinned to the queue's CPUs) and waits until
/// each has fetched its tags.
fn start_queues(
    ctrl: &mut Control,
    info: &DevInfo,
    target: &Arc<dyn Target>,
) -> Result<Vec<JoinHandle<Result<QueueStats>>>> {
    let cpus = queue_cpus(ctrl, info);
    if !cpus.is_empty() {
        let list: Vec<String> =
            cpus.iter().enumerate().map(|(q, c)| format!("queue {q}: {}", cpu_list(c))).collect();
        tracing::info!("ublk device {}: queue threads pinned to CPUs ({})", info.dev_id, list.join("; "));
    }
    let cdev = Arc::new(open_char(info.dev_id)?);
    let (tx, rx) = mpsc::channel();
    let mut handles = Vec::new();
    for q in 0..info.nr_hw_queues {
        let cfg = QueueConfig {
            dev_id: info.dev_id,
            q_id: q,
            depth: info.queue_depth,
            buf_size: info.max_io_buf_bytes as usize,
            auto_buf_reg: info.flags & sys::UBLK_F_AUTO_BUF_REG != 0,
        };
        let (cdev, target, tx) = (cdev.clone(), target.clone(), tx.clone());
        let pin = cpus.get(usize::from(q)).cloned().unwrap_or_default();
        let h = std::thread::Builder::new()
            .name(format!("ublk{}q{q}", info.dev_id))
            .spawn(move || queue::run(cdev, cfg, &pin, target, tx))
            .context(|| format!("ublk device {}: spawning queue {q}", info.dev_id))?;
        handles.push(h);
    }
    drop(tx);
    for _ in 0..info.nr_hw_queues {
        match rx.recv() {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(Error::msg(
                    format!("ublk device {}: a queue thread died at start", info.dev_id),
                    libc::EIO,
                ))
            }
        }
    }
    Ok(handles)
}

impl Device {
    /// Creates and starts a new device backed by `target`; returns once
    /// /dev/ublkbN is live.
    pub fn attach(target: Arc<dyn Target>, o: &AttachOptions) -> Result<Device> {
        check_options(o, target.as_ref())?;
        let size = device_size(o, target.as_ref())?;
        let mut ctrl = Control::open().context(|| "ublk".to_owned())?;
        let features = ctrl.get_features().context(|| "ublk GET_FEATURES (needs Linux 6.5+)".to_owned())?;
        let mut flags = sys::UBLK_F_CMD_IOCTL_ENCODE;
        if o.recovery {
            flags |= features & (sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE);
        }
        if o.zero_copy && target.info().zero_copy {
            flags |= features & sys::UBLK_F_AUTO_BUF_REG;
        }
        let want = DevInfo {
            nr_hw_queues: o.queues,
            queue_depth: o.depth,
            max_io_buf_bytes: o.max_io,
            dev_id: o.dev_id.unwrap_or(u32::MAX),
            flags,
            ..Default::default()
        };
        let info = ctrl.add_dev(&want).context(|| "ublk ADD_DEV".to_owned())?;
        let mut dev =
            Device { ctrl, info, params: Params::default(), features, queues: Vec::new(), created: true };
        // From here on a failure deletes the device again (teardown in Drop).
        let params = build_params(o, target.as_ref(), size, info.max_io_buf_bytes);
        dev.ctrl
            .set_params(info.dev_id, &params)
            .context(|| format!("ublk device {}: SET_PARAMS", info.dev_id))?;
        dev.params = params;
        dev.queues = start_queues(&mut dev.ctrl, &info, &target)?;
        dev.ctrl
            .start_dev(info.dev_id, std::process::id() as i32)
            .context(|| format!("ublk device {}: START_DEV", info.dev_id))?;
        dev.info = dev
            .ctrl
            .get_dev_info(info.dev_id)
            .context(|| format!("ublk device {}: GET_DEV_INFO", info.dev_id))?;
        Ok(dev)
    }

    /// Re-attaches to device `id`, whose server died, with a new server
    /// backed by `target` (USER_RECOVERY). Queued I/O then goes on.
    pub fn recover(target: Arc<dyn Target>, id: u32) -> Result<Device> {
        let mut ctrl = Control::open().context(|| "ublk".to_owned())?;
        let features = ctrl.get_features().context(|| "ublk GET_FEATURES (needs Linux 6.5+)".to_owned())?;
        let info = ctrl.get_dev_info(id).context(|| format!("ublk device {id}: GET_DEV_INFO"))?;
        if info.flags & sys::UBLK_F_USER_RECOVERY == 0 {
            return Err(Error::msg(
                format!("ublk device {id} was created without USER_RECOVERY; it cannot be re-attached"),
                libc::EINVAL,
            ));
        }
        if info.flags & sys::UBLK_F_AUTO_BUF_REG != 0 && !target.info().zero_copy {
            return Err(Error::msg(
                format!(
                    "ublk device {id} was created zero-copy (AUTO_BUF_REG), which {} cannot serve",
                    target.describe()
                ),
                libc::EINVAL,
            ));
        }
        let params = ctrl.get_params(id).context(|| format!("ublk device {id}: GET_PARAMS"))?;
        let dev_size = params.basic.dev_sectors << 9;
        let have = target.info().size;
        if have < dev_size {
            return Err(Error::msg(
                format!("ublk device {id} has {dev_size} bytes but {} only {have}", target.describe()),
                libc::EINVAL,
            ));
        }
        // EBUSY until the old server's /dev/ublkcN is released and the
        // driver has quiesced the device.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match ctrl.start_user_recovery(id) {
                Ok(()) => break,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(e) => {
                    return Err(Error::new(
                        format!(
                        "ublk device {id}: START_USER_RECOVERY (state {}; is its old server still running?)",
                        state_name(info.state)
                    ),
                        e,
                    ))
                }
            }
        }
        let mut dev = Device { ctrl, info, params, features, queues: Vec::new(), created: false };
        dev.queues = start_queues(&mut dev.ctrl, &info, &target)?;
        dev.ctrl
            .end_user_recovery(id, std::process::id() as i32)
            .context(|| format!("ublk device {id}: END_USER_RECOVERY"))?;
        dev.info = dev.ctrl.get_dev_info(id).context(|| format!("ublk device {id}: GET_DEV_INFO"))?;
        // This process serves it now, and removes it at the end.
        dev.created = true;
        Ok(dev)
    }

    pub fn id(&self) -> u32 {
        self.info.dev_id
    }

    /// Serves until SIGINT/SIGTERM or until a queue ends (the device was
    /// stopped by someone else, or failed), then tears the device down.
    pub fn run(mut self, signals: &TermSignals) -> Result<()> {
        let signal = loop {
            let ready = ringbd_io::net::poll_readable(&[signals.as_fd()], Some(Duration::from_millis(200)))
                .context(|| "waiting for signals".to_owned())?;
            if ready.first().copied().unwrap_or(false) {
                if let Some(sig) = signals.take().context(|| "reading the signalfd".to_owned())? {
                    break Some(sig);
                }
            }
            if self.queues.iter().any(|q| q.is_finished()) {
                break None;
            }
        };
        if signal.is_none() {
            tracing::warn!("ublk device {}: a queue ended; tearing down", self.id());
        }
        self.teardown()
    }

    /// STOP_DEV, join the queues, DEL_DEV.
    fn teardown(&mut self) -> Result<()> {
        let id = self.id();
        let mut first: Option<Error> = None;
        match self.ctrl.stop_dev(id) {
            Ok(()) => {}
            // Already deleted (by `ringbd detach`, or the driver).
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {}
            Err(e) => first = Some(Error::new(format!("ublk device {id}: STOP_DEV"), e)),
        }
        let mut total = QueueStats::default();
        let had_queues = !self.queues.is_empty();
        for (q, h) in self.queues.drain(..).enumerate() {
            match h.join() {
                Ok(Ok(st)) => total.add(&st),
                Ok(Err(e)) => {
                    first.get_or_insert(e);
                }
                Err(_) => {
                    first.get_or_insert(Error::msg(
                        format!("ublk device {id} queue {q}: thread panicked"),
                        libc::EIO,
                    ));
                }
            }
        }
        if had_queues {
            tracing::info!("ublk device {id}: {total}");
        }
        if self.created {
            self.created = false;
            match self.ctrl.del_dev(id) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {}
                Err(e) => {
                    first.get_or_insert(Error::new(format!("ublk device {id}: DEL_DEV"), e));
                }
            }
        }
        match first {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // Only on a failed attach (run() tears down itself). A failed
        // recovery leaves the device as it found it, quiesced and waiting
        // for another --recover: the queue threads end with the process.
        if self.created {
            if let Err(e) = self.teardown() {
                tracing::warn!("cleaning up: {e}");
            }
        }
    }
}

pub fn state_name(s: u16) -> &'static str {
    match s {
        sys::UBLK_S_DEV_DEAD => "dead",
        sys::UBLK_S_DEV_LIVE => "live",
        sys::UBLK_S_DEV_QUIESCED => "quiesced",
        sys::UBLK_S_DEV_FAIL_IO => "fail-io",
        _ => "unknown",
    }
}

/// "0-3,6" for a sorted CPU list.
fn cpu_list(cpus: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        out.push(if i == j { cpus[i].to_string() } else { format!("{}-{}", cpus[i], cpus[j]) });
        i = j + 1;
    }
    if out.is_empty() {
        "none".to_owned()
    } else {
        out.join(",")
    }
}

/// Parses `ID`, `/dev/ublkbN` or `/dev/ublkcN`.
pub fn parse_device(s: &str) -> std::result::Result<u32, String> {
    let n = s
        .strip_prefix("/dev/ublkb")
        .or_else(|| s.strip_prefix("/dev/ublkc"))
        .or_else(|| s.strip_prefix("ublkb"))
        .unwrap_or(s);
    n.parse().map_err(|_| format!("{s:?} is not a ublk device id or /dev/ublkbN"))
}

/// Stops and deletes device `id`. If a live process serves it, that
/// process is asked to (SIGTERM) and this waits until the device is gone.
pub fn detach(id: u32, timeout: Duration) -> Result<()> {
    let mut ctrl = Control::open().context(|| "ublk".to_owned())?;
    let info = ctrl.get_dev_info(id).context(|| format!("ublk device {id}: GET_DEV_INFO"))?;
    let pid = info.ublksrv_pid;
    let serving =
        pid > 0 && pid as u32 != std::process::id() && std::path::Path::new(&format!("/proc/{pid}")).exists();
    if serving {
        crate::kernel::signal_process(pid, libc::SIGTERM)
            .context(|| format!("ublk device {id}: SIGTERM to its server, pid {pid}"))?;
        let deadline = Instant::now() + timeout;
        loop {
            match ctrl.get_dev_info(id) {
                Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return Ok(()),
                Err(e) => return Err(Error::new(format!("ublk device {id}: GET_DEV_INFO"), e)),
                Ok(_) if Instant::now() >= deadline => {
                    return Err(Error::msg(
                        format!(
                            "ublk device {id}: still there {}s after SIGTERM to pid {pid}",
                            timeout.as_secs()
                        ),
                        libc::ETIMEDOUT,
                    ))
                }
                Ok(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
    // No server (it died, and nobody recovered the device): remove it here.
    match ctrl.stop_dev(id) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return Ok(()),
        Err(e) => return Err(Error::new(format!("ublk device {id}: STOP_DEV"), e)),
    }
    ctrl.del_dev(id).context(|| format!("ublk device {id}: DEL_DEV"))
}

/// One line of `ringbd list`.
#[derive(Debug, Clone)]
pub struct Listed {
    pub info: DevInfo,
    pub params: Option<Params>,
}

/// Every ublk device the driver knows (from /sys/class/ublk-char).
pub fn list() -> Result<Vec<Listed>> {
    let mut ctrl = Control::open().context(|| "ublk".to_owned())?;
    let mut ids: Vec<u32> = Vec::new();
    match std::fs::read_dir("/sys/class/ublk-char") {
        Ok(rd) => {
            for ent in rd {
                let ent = ent.context(|| "reading /sys/class/ublk-char".to_owned())?;
                if let Some(n) = ent.file_name().to_str().and_then(|n| n.strip_prefix("ublkc")) {
                    if let Ok(id) = n.parse() {
                        ids.push(id);
                    }
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::new("reading /sys/class/ublk-char", e)),
    }
    ids.sort_unstable();
    let mut out = Vec::new();
    for id in ids {
        match ctrl.get_dev_info(id) {
            Ok(info) => out.push(Listed { info, params: ctrl.get_params(id).ok() }),
            // Deleted between readdir and the query.
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {}
            Err(e) => return Err(Error::new(format!("ublk device {id}: GET_DEV_INFO"), e)),
        }
    }
    Ok(out)
}

/// `USER_RECOVERY|...` for a feature mask.
pub fn feature_names(flags: u64) -> String {
    sys::feature_names(flags)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendTarget;

    /// A null backend of `size` bytes as a target.
    fn null(size: u64) -> BackendTarget {
        BackendTarget::new(std::sync::Arc::new(ringbd_backend::null::NullBackend::new(size)), false)
    }

    fn opts() -> AttachOptions {
        AttachOptions::default()
    }

    #[test]
    fn data_path_names_the_mode_and_why() {
        let zc = TargetInfo { zero_copy: true, ..Default::default() };
        let no = TargetInfo::default();
        let abr = sys::UBLK_F_AUTO_BUF_REG;
        assert!(data_path(abr, abr, &zc, true).starts_with("zero-copy"));
        assert_eq!(data_path(0, 0, &zc, true), "copy (the driver does not offer AUTO_BUF_REG, Linux 6.16+)");
        assert_eq!(data_path(0, abr, &zc, false), "copy (--no-zero-copy)");
        assert_eq!(data_path(0, abr, &no, true), "copy (this target cannot use the driver's AUTO_BUF_REG)");
    }

    #[test]
    fn options_are_checked() {
        let t = null(1 << 30);
        assert!(check_options(&opts(), &t).is_ok());
        for bs in [256, 1000, 8192] {
            let e = check_options(&AttachOptions { block_size: bs, ..opts() }, &t).unwrap_err();
            assert!(e.to_string().contains("--block-size"), "{e}");
        }
        assert!(check_options(&AttachOptions { depth: 0, ..opts() }, &t).is_err());
        assert!(check_options(&AttachOptions { depth: 4097, ..opts() }, &t).is_err());
        assert!(check_options(&AttachOptions { queues: 0, ..opts() }, &t).is_err());
        assert!(check_options(&AttachOptions { max_io: 1000, ..opts() }, &t).is_err());
        assert!(check_options(&AttachOptions { max_io: 64 << 20, ..opts() }, &t).is_err());
    }

    #[test]
    fn size_is_rounded_to_the_block_size_and_bounded_by_the_backend() {
        let t = null((1 << 20) + 1000);
        assert_eq!(device_size(&opts(), &t).unwrap(), (1 << 20) + 512);
        let o = AttachOptions { block_size: 4096, ..opts() };
        assert_eq!(device_size(&o, &t).unwrap(), 1 << 20);
        let o = AttachOptions { size: Some(1 << 19), ..opts() };
        assert_eq!(device_size(&o, &t).unwrap(), 1 << 19);
        let e = device_size(&AttachOptions { size: Some(1 << 30), ..opts() }, &t).unwrap_err();
        assert!(e.to_string().contains("has only"), "{e}");
        assert!(device_size(&AttachOptions { size: Some(100), ..opts() }, &t).is_err());
    }

    #[test]
    fn params_describe_the_target() {
        let t = null(1 << 30);
        let o = AttachOptions { block_size: 4096, ..opts() };
        let p = build_params(&o, &t, 1 << 30, 512 << 10);
        assert_eq!(p.basic.logical_bs_shift, 12);
        assert_eq!(p.basic.physical_bs_shift, 12);
        assert_eq!(p.basic.dev_sectors, 1 << 21);
        assert_eq!(p.basic.max_sectors, 1024);
        assert_ne!(p.basic.attrs & sys::UBLK_ATTR_VOLATILE_CACHE, 0, "null takes flushes, as over NBD");
        assert_ne!(p.types & sys::UBLK_PARAM_TYPE_DISCARD, 0);
        assert_eq!(p.discard.max_discard_segments, 1);
        assert_eq!(p.discard.discard_granularity, 4096);
        assert_eq!(p.discard.max_write_zeroes_sectors, 1024, "one buffer");
        let ro = build_params(&AttachOptions { read_only: true, ..o }, &t, 1 << 30, 512 << 10);
        assert_ne!(ro.basic.attrs & sys::UBLK_ATTR_READ_ONLY, 0);
        assert_eq!(ro.types & sys::UBLK_PARAM_TYPE_DISCARD, 0);
    }

    /// A target with a cache but no FUA, and a preferred I/O size.
    struct NoFua;
    impl Target for NoFua {
        fn describe(&self) -> String {
            "nofua".into()
        }
        fn info(&self) -> crate::target::TargetInfo {
            crate::target::TargetInfo {
                size: 1 << 30,
                flush: true,
                no_fua: true,
                opt_io: 64 << 10,
                min_block_size: 512,
                ..Default::default()
            }
        }
        fn queue(&self, _q: u16, _d: u16) -> Result<crate::target::QueueSetup> {
            Err(Error::msg("no queues in this test", libc::EINVAL))
        }
    }

    #[test]
    fn cache_without_fua_and_preferred_io_size() {
        let p = build_params(&opts(), &NoFua, 1 << 30, 512 << 10);
        assert_ne!(p.basic.attrs & sys::UBLK_ATTR_VOLATILE_CACHE, 0);
        assert_eq!(
            p.basic.attrs & sys::UBLK_ATTR_FUA,
            0,
            "no FUA: the block layer flushes after such writes"
        );
        assert_eq!(p.basic.io_opt_shift, 16);
        assert_eq!(p.basic.io_min_shift, 9);
        let p = build_params(&opts(), &null(1 << 30), 1 << 30, 512 << 10);
        assert_eq!(p.basic.io_opt_shift, 9, "no preferred size: the block size");
    }

    #[test]
    fn cpu_lists_are_ranges() {
        assert_eq!(cpu_list(&[0, 1, 2, 3, 6, 8, 9]), "0-3,6,8-9");
        assert_eq!(cpu_list(&[5]), "5");
        assert_eq!(cpu_list(&[]), "none");
    }

    #[test]
    fn device_names_parse() {
        assert_eq!(parse_device("3"), Ok(3));
        assert_eq!(parse_device("/dev/ublkb12"), Ok(12));
        assert_eq!(parse_device("/dev/ublkc0"), Ok(0));
        assert!(parse_device("/dev/sda").is_err());
    }
}
