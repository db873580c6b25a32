//! The control plane: URING_CMDs on `/dev/ublk-control` (ADD_DEV,
//! SET_PARAMS, START_DEV, STOP_DEV, DEL_DEV, GET_DEV_INFO, GET_PARAMS,
//! GET_FEATURES, START/END_USER_RECOVERY).
//!
//! Each command is one 128-byte SQE on a small ring of its own; the driver
//! runs control commands on an io-wq worker (it refuses non-blocking
//! issue), so START_DEV and END_USER_RECOVERY may wait there until every
//! queue has fetched its requests. A command is always waited for: its
//! payload buffer belongs to the [`Control`] and is never freed while the
//! kernel may still write to it. Errors are the driver's errno, unwrapped
//! (callers test for `EBUSY`, `ENODEV`) and given context by the caller.

use super::cvt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use super::sys::{self, CtrlCmd, DevInfo, Params};

/// Path of the control device.
pub const CONTROL_PATH: &str = "/dev/ublk-control";

/// Scratch space for a command's payload (dev info, params, features).
#[repr(C, align(8))]
struct Payload([u8; 256]);

/// An open `/dev/ublk-control` with its ring.
pub struct Control {
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    file: File,
    /// Heap payload whose address the kernel is given; leaked rather than
    /// freed if a command could not be waited for.
    payload: Option<Box<Payload>>,
}

impl Control {
    /// Opens the control device. A missing device gets an error that says
    /// the driver is not loaded.
    pub fn open() -> io::Result<Control> {
        let file = match OpenOptions::new().read(true).write(true).open(CONTROL_PATH) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{CONTROL_PATH} does not exist: ublk_drv not loaded (modprobe ublk_drv; needs Linux 6.0+)"),
                ))
            }
            Err(e) => return Err(io::Error::new(e.kind(), format!("open {CONTROL_PATH}: {e}"))),
        };
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder().build(4).map_err(|e| {
            io::Error::new(e.kind(), format!("io_uring with 128-byte SQEs for {CONTROL_PATH}: {e}"))
        })?;
        Ok(Control { ring, file, payload: Some(Box::new(Payload([0; 256]))) })
    }

    /// Runs one command; `payload_in` is copied into the payload buffer
    /// (whose address goes in `cmd.addr` when `len` > 0) and the first
    /// `out.len()` bytes of the buffer come back in `out`.
    fn run(&mut self, op: u32, mut cmd: CtrlCmd, payload_in: &[u8], out: &mut [u8]) -> io::Result<i32> {
        let payload = self
            .payload
            .as_mut()
            .ok_or_else(|| io::Error::other("an earlier ublk control command was left in flight"))?;
        let len = payload_in.len().max(out.len());
        if len > payload.0.len() {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        payload.0.fill(0);
        payload.0[..payload_in.len()].copy_from_slice(payload_in);
        if len > 0 {
            cmd.addr = payload.0.as_mut_ptr() as u64;
            cmd.len = len as u16;
        }
        let mut bytes = [0u8; 80];
        bytes[..32].copy_from_slice(as_bytes(&cmd));
        let sqe =
            opcode::UringCmd80::new(types::Fd(self.file.as_raw_fd()), op).cmd(bytes).build().user_data(1);
        // SAFETY: the SQE points at `payload`, a heap buffer owned by self
        // that is neither freed nor touched until the completion below is
        // reaped; if waiting fails the buffer is leaked (see below).
        unsafe { self.ring.submission().push(&sqe) }
            .map_err(|_| io::Error::other("ublk control ring is full"))?;
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) || e.raw_os_error() == Some(libc::EBUSY) => {
                    continue
                }
                Err(e) => {
                    // The command may still be in flight: keep its buffer.
                    if let Some(p) = self.payload.take() {
                        Box::leak(p);
                    }
                    return Err(e);
                }
            }
            if let Some(cqe) = self.ring.completion().next() {
                let res = cqe.result();
                if res < 0 {
                    return Err(io::Error::from_raw_os_error(-res));
                }
                let payload = self.payload.as_ref().ok_or_else(|| io::Error::other("payload gone"))?;
                out.copy_from_slice(&payload.0[..out.len()]);
                return Ok(res);
            }
        }
    }

    /// `UBLK_U_CMD_GET_FEATURES`: the feature flags this driver supports.
    pub fn get_features(&mut self) -> io::Result<u64> {
        let mut out = [0u8; 8];
        let cmd = CtrlCmd { dev_id: u32::MAX, queue_id: u16::MAX, ..Default::default() };
        self.run(sys::UBLK_U_CMD_GET_FEATURES, cmd, &[], &mut out)?;
        Ok(u64::from_ne_bytes(out))
    }

    /// `UBLK_U_CMD_ADD_DEV`: creates /dev/ublkcN. `info.dev_id` is the
    /// wanted id or `u32::MAX` for any; the returned info has the id the
    /// driver chose and the flags it accepted (unsupported ones cleared).
    pub fn add_dev(&mut self, info: &DevInfo) -> io::Result<DevInfo> {
        let cmd = CtrlCmd { dev_id: info.dev_id, queue_id: u16::MAX, ..Default::default() };
        let mut out = DevInfo::default();
        let mut buf = [0u8; 64];
        self.run(sys::UBLK_U_CMD_ADD_DEV, cmd, as_bytes(info), &mut buf)?;
        from_bytes(&buf, &mut out);
        Ok(out)
    }

    /// `UBLK_U_CMD_SET_PARAMS` (before START_DEV).
    pub fn set_params(&mut self, dev_id: u32, params: &Params) -> io::Result<()> {
        let mut p = *params;
        p.len = std::mem::size_of::<Params>() as u32;
        self.run(sys::UBLK_U_CMD_SET_PARAMS, dev_cmd(dev_id), as_bytes(&p), &mut [])?;
        Ok(())
    }

    /// `UBLK_U_CMD_GET_PARAMS`.
    pub fn get_params(&mut self, dev_id: u32) -> io::Result<Params> {
        let p = Params { len: std::mem::size_of::<Params>() as u32, ..Default::default() };
        let mut buf = [0u8; std::mem::size_of::<Params>()];
        self.run(sys::UBLK_U_CMD_GET_PARAMS, dev_cmd(dev_id), as_bytes(&p), &mut buf)?;
        let mut out = Params::default();
        from_bytes(&buf, &mut out);
        Ok(out)
    }

    /// `UBLK_U_CMD_START_DEV`: waits (in the kernel) until every queue has
    /// fetched all its tags, then adds /dev/ublkbN.
    pub fn start_dev(&mut self, dev_id: u32, pid: i32) -> io::Result<()> {
        let mut cmd = dev_cmd(dev_id);
        cmd.data[0] = pid as u64;
        self.run(sys::UBLK_U_CMD_START_DEV, cmd, &[], &mut [])?;
        Ok(())
    }

    /// `UBLK_U_CMD_STOP_DEV`: removes /dev/ublkbN; the queues' pending
    /// fetches then complete with `UBLK_IO_RES_ABORT`.
    pub fn stop_dev(&mut self, dev_id: u32) -> io::Result<()> {
        self.run(sys::UBLK_U_CMD_STOP_DEV, dev_cmd(dev_id), &[], &mut [])?;
        Ok(())
    }

    /// `UBLK_U_CMD_DEL_DEV`: removes /dev/ublkcN; waits until it is closed.
    pub fn del_dev(&mut self, dev_id: u32) -> io::Result<()> {
        self.run(sys::UBLK_U_CMD_DEL_DEV, dev_cmd(dev_id), &[], &mut [])?;
        Ok(())
    }

    /// `UBLK_U_CMD_GET_DEV_INFO`.
    pub fn get_dev_info(&mut self, dev_id: u32) -> io::Result<DevInfo> {
        let mut buf = [0u8; 64];
        self.run(sys::UBLK_U_CMD_GET_DEV_INFO, dev_cmd(dev_id), &[], &mut buf)?;
        let mut out = DevInfo::default();
        from_bytes(&buf, &mut out);
        Ok(out)
    }

    /// `UBLK_U_CMD_GET_QUEUE_AFFINITY`: the CPUs whose requests blk-mq
    /// sends to queue `q_id` (the queue's thread runs best on them).
    pub fn get_queue_affinity(&mut self, dev_id: u32, q_id: u16) -> io::Result<Vec<usize>> {
        let mut mask = [0u8; 256];
        let mut cmd = dev_cmd(dev_id);
        cmd.data[0] = u64::from(q_id);
        self.run(sys::UBLK_U_CMD_GET_QUEUE_AFFINITY, cmd, &[], &mut mask)?;
        let mut cpus = Vec::new();
        for (i, byte) in mask.iter().enumerate() {
            for bit in 0..8 {
                if byte & (1 << bit) != 0 {
                    cpus.push(i * 8 + bit);
                }
            }
        }
        Ok(cpus)
    }

    /// `UBLK_U_CMD_START_USER_RECOVERY`: `EBUSY` until the old server's
    /// /dev/ublkcN is closed and the device is quiesced.
    pub fn start_user_recovery(&mut self, dev_id: u32) -> io::Result<()> {
        self.run(sys::UBLK_U_CMD_START_USER_RECOVERY, dev_cmd(dev_id), &[], &mut [])?;
        Ok(())
    }

    /// `UBLK_U_CMD_END_USER_RECOVERY`: waits until every queue of the new
    /// server has fetched, then lets queued I/O go on.
    pub fn end_user_recovery(&mut self, dev_id: u32, pid: i32) -> io::Result<()> {
        let mut cmd = dev_cmd(dev_id);
        cmd.data[0] = pid as u64;
        self.run(sys::UBLK_U_CMD_END_USER_RECOVERY, cmd, &[], &mut [])?;
        Ok(())
    }
}

/// Sends `sig` to process `pid` (`kill(2)`): how `ringbd detach` asks the
/// process serving a device to tear it down.
pub fn signal_process(pid: i32, sig: i32) -> io::Result<()> {
    if pid <= 0 {
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    }
    // SAFETY: kill takes integers and has no memory effects.
    cvt(unsafe { libc::kill(pid, sig) })?;
    Ok(())
}

fn dev_cmd(dev_id: u32) -> CtrlCmd {
    CtrlCmd { dev_id, queue_id: u16::MAX, ..Default::default() }
}

/// Marker for the plain-old-data UAPI structs: integers only, and no
/// implicit padding (every byte is a named field, checked by the size tests
/// in `sys`), so viewing one as bytes reads only initialised memory.
trait Pod: Copy {}
impl Pod for CtrlCmd {}
impl Pod for DevInfo {}
impl Pod for Params {}

fn as_bytes<T: Pod>(v: &T) -> &[u8] {
    // SAFETY: T is a #[repr(C)] struct of integers with explicit padding
    // fields, so all size_of::<T>() bytes are initialised; the slice borrows v.
    unsafe { std::slice::from_raw_parts(v as *const T as *const u8, std::mem::size_of::<T>()) }
}

fn from_bytes<T: Pod>(b: &[u8], out: &mut T) {
    let n = b.len().min(std::mem::size_of::<T>());
    // SAFETY: T is plain integers, so any byte pattern is a valid T; at most
    // size_of::<T>() bytes are written into the live, exclusively borrowed out.
    unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), out as *mut T as *mut u8, n) }
}

pub(super) fn io_cmd_bytes(cmd: &sys::IoCmd) -> [u8; 80] {
    let mut b = [0u8; 80];
    // SAFETY: IoCmd is 16 bytes of integers (u16, u16, i32, u64) with no
    // padding; the bytes are copied out of the borrowed value.
    let src = unsafe { std::slice::from_raw_parts(cmd as *const sys::IoCmd as *const u8, 16) };
    b[..16].copy_from_slice(src);
    b
}
