//! Ceph RBD images through librbd's C API (feature `rbd`).
//!
//! - [`Cluster`]: a librados connection (`rados_create2`, the ceph.conf,
//!   bounded timeouts, `rados_connect`).
//! - [`Pool`]: an I/O context on one pool.
//! - [`Image`]: an open image or snapshot; [`Image::submit`] starts
//!   `rbd_aio_readv`/`writev`/`discard`/`write_zeroes`/`flush`, whose
//!   completion callback (on a librbd thread) hands the result and the
//!   buffer to a [`Sink`]: a ring worker's eventfd-signalled queue, or a
//!   waiting thread. FUA is the write, then a flush, before the sink hears.
//!
//! The declarations are in the `librbd-sys` crate; every call into them is
//! here, each with its `SAFETY` reasoning.

use std::ffi::{c_int, c_void, CStr, CString};
use std::fmt;
use std::io;
use std::path::Path;
use std::ptr;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use librbd_sys as ffi;

use ringbd_io::buf::IoBuf;

use crate::aio::Sink;
use crate::BlockOp;

/// A failed librados/librbd call: which call, and the errno it returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallError {
    pub call: &'static str,
    pub errno: i32,
}

impl CallError {
    fn check(call: &'static str, ret: c_int) -> Result<c_int, CallError> {
        if ret < 0 {
            Err(CallError { call, errno: ret.saturating_neg() })
        } else {
            Ok(ret)
        }
    }

    pub fn io_error(&self) -> io::Error {
        io::Error::from_raw_os_error(self.errno)
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.call, self.io_error())
    }
}

impl std::error::Error for CallError {}

fn cstring(what: &'static str, s: &str) -> Result<CString, CallError> {
    CString::new(s).map_err(|_| CallError { call: what, errno: libc::EINVAL })
}

/// How to reach the cluster.
#[derive(Debug, Clone, Default)]
pub struct ClusterConfig<'a> {
    /// ceph.conf; `None`: librados' own search ($CEPH_CONF, /etc/ceph/ceph.conf, ...).
    pub conf: Option<&'a Path>,
    /// Client id (`admin`, or `client.admin`); the keyring is found as
    /// librados finds it (the conf's `keyring`, /etc/ceph/ceph.client.ID.keyring...).
    pub id: Option<&'a str>,
    /// Bound on connecting, monitor commands and OSD operations
    /// (`client_mount_timeout`, `rados_mon_op_timeout`, `rados_osd_op_timeout`);
    /// `None` leaves librados' defaults (OSD operations wait forever).
    pub timeout: Option<Duration>,
    /// Settings the caller changes from librados' and librbd's defaults
    /// (`rados_conf_set`, before ceph.conf is read: it outranks ceph.conf
    /// and `CEPH_ARGS` whatever the order).
    pub settings: &'a [(&'a CStr, &'a CStr)],
}

/// A connected librados cluster handle.
pub struct Cluster {
    raw: ffi::rados_t,
}

// SAFETY: a rados_t is safe to use from any thread (librados locks
// internally); ringbd only creates I/O contexts from it.
unsafe impl Send for Cluster {}
// SAFETY: as above.
unsafe impl Sync for Cluster {}

impl Cluster {
    pub fn connect(cfg: &ClusterConfig<'_>) -> Result<Arc<Cluster>, CallError> {
        let id = cfg.id.unwrap_or("admin");
        let name = if id.starts_with("client.") { id.to_owned() } else { format!("client.{id}") };
        let name = cstring("client name", &name)?;
        let cluster_name = c"ceph";
        let mut raw: ffi::rados_t = ptr::null_mut();
        // SAFETY: raw is a live out-pointer; both strings are NUL-terminated
        // and outlive the call (librados copies them).
        CallError::check("rados_create2", unsafe {
            ffi::rados_create2(&mut raw, cluster_name.as_ptr(), name.as_ptr(), 0)
        })?;
        // From here on the handle is shut down by Drop, on every path.
        let c = Cluster { raw };
        // The caller's settings (ringbd's: the rbd backend's CLIENT_DEFAULTS).
        for &(key, value) in cfg.settings {
            // SAFETY: both strings are NUL terminated; librados copies them.
            CallError::check("rados_conf_set", unsafe {
                ffi::rados_conf_set(c.raw, key.as_ptr(), value.as_ptr())
            })?;
        }
        let conf = match cfg.conf {
            Some(p) => Some(cstring("ceph.conf path", &p.to_string_lossy())?),
            None => None,
        };
        let conf_ptr = conf.as_ref().map_or(ptr::null(), |c| c.as_ptr());
        // SAFETY: c.raw is a created, unconnected handle; the path is NUL
        // terminated or null (search the default locations).
        CallError::check("rados_conf_read_file", unsafe { ffi::rados_conf_read_file(c.raw, conf_ptr) })?;
        // SAFETY: null names the default variable, CEPH_ARGS.
        CallError::check("rados_conf_parse_env", unsafe { ffi::rados_conf_parse_env(c.raw, ptr::null()) })?;
        if let Some(t) = cfg.timeout {
            let secs = cstring("timeout", &t.as_secs().max(1).to_string())?;
            for key in [c"client_mount_timeout", c"rados_mon_op_timeout", c"rados_osd_op_timeout"] {
                // SAFETY: both strings are NUL terminated; librados copies them.
                CallError::check("rados_conf_set", unsafe {
                    ffi::rados_conf_set(c.raw, key.as_ptr(), secs.as_ptr())
                })?;
            }
        }
        // SAFETY: a configured handle; connecting blocks at most
        // client_mount_timeout.
        CallError::check("rados_connect", unsafe { ffi::rados_connect(c.raw) })?;
        Ok(Arc::new(c))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: every Pool holds an Arc<Cluster>, so none is left; the
        // handle is not used after this.
        unsafe { ffi::rados_shutdown(self.raw) }
    }
}

/// An I/O context on one pool.
pub struct Pool {
    raw: ffi::rados_ioctx_t,
    _cluster: Arc<Cluster>,
}

// SAFETY: an ioctx may be used from several threads for independent
// operations; ringbd only opens images from it.
unsafe impl Send for Pool {}
// SAFETY: as above.
unsafe impl Sync for Pool {}

impl Pool {
    pub fn open(cluster: &Arc<Cluster>, name: &str) -> Result<Arc<Pool>, CallError> {
        let cname = cstring("pool name", name)?;
        let mut raw: ffi::rados_ioctx_t = ptr::null_mut();
        // SAFETY: a connected cluster handle, a NUL-terminated name, a live
        // out-pointer.
        CallError::check("rados_ioctx_create", unsafe {
            ffi::rados_ioctx_create(cluster.raw, cname.as_ptr(), &mut raw)
        })?;
        Ok(Arc::new(Pool { raw, _cluster: cluster.clone() }))
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // SAFETY: every Image holds an Arc<Pool>, so none is left.
        unsafe { ffi::rados_ioctx_destroy(self.raw) }
    }
}

/// What an open image shares with its in-flight operations.
struct Shared {
    raw: ffi::rbd_image_t,
    /// Operations started and not yet delivered; close waits for zero.
    inflight: Mutex<usize>,
    idle: Condvar,
}

// SAFETY: librbd image handles are thread-safe for I/O (qemu and fio use
// one handle from many threads); closing is serialised by Image::drop.
unsafe impl Send for Shared {}
// SAFETY: as above.
unsafe impl Sync for Shared {}

impl Shared {
    fn add_inflight(&self, n: isize) {
        let mut g = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        *g = g.saturating_add_signed(n);
        if *g == 0 {
            self.idle.notify_all();
        }
    }
}

/// An image's feature bits (`rbd_get_features`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features(pub u64);

impl Features {
    /// Writers take the image's exclusive lock.
    pub fn exclusive_lock(self) -> bool {
        self.0 & ffi::RBD_FEATURE_EXCLUSIVE_LOCK != 0
    }

    /// Allocation comes from the object map (else listing objects on the OSDs).
    pub fn fast_diff(self) -> bool {
        self.0 & ffi::RBD_FEATURE_FAST_DIFF != 0
    }
}

/// An open RBD image (or snapshot).
pub struct Image {
    shared: Arc<Shared>,
    _pool: Arc<Pool>,
}

/// An operation in flight: owned by librbd's completion (as its callback
/// argument) from submission until the callback runs.
struct Pending {
    shared: Arc<Shared>,
    op: BlockOp,
    buf: IoBuf,
    /// The one iovec of a read or write, kept here (librbd may keep the
    /// pointer to the array until completion).
    iov: libc::iovec,
    sink: Option<Sink>,
    /// What a success reports: the bytes of a read or write, else 0.
    moved: usize,
    /// A FUA write: flush before delivering.
    then_flush: bool,
}

impl Image {
    /// Opens `name` in `pool`, at `snap` if given (read-only), or read-only
    /// when `read_only`.
    pub fn open(
        pool: &Arc<Pool>,
        name: &str,
        snap: Option<&str>,
        read_only: bool,
    ) -> Result<Image, CallError> {
        let cname = cstring("image name", name)?;
        let csnap = match snap {
            Some(s) => Some(cstring("snapshot name", s)?),
            None => None,
        };
        let snap_ptr = csnap.as_ref().map_or(ptr::null(), |s| s.as_ptr());
        let mut raw: ffi::rbd_image_t = ptr::null_mut();
        let ret = if read_only || snap.is_some() {
            // SAFETY: an open ioctx, NUL-terminated names (or null: no
            // snapshot), a live out-pointer.
            unsafe { ffi::rbd_open_read_only(pool.raw, cname.as_ptr(), &mut raw, snap_ptr) }
        } else {
            // SAFETY: as above.
            unsafe { ffi::rbd_open(pool.raw, cname.as_ptr(), &mut raw, snap_ptr) }
        };
        CallError::check("rbd_open", ret)?;
        Ok(Image {
            shared: Arc::new(Shared { raw, inflight: Mutex::new(0), idle: Condvar::new() }),
            _pool: pool.clone(),
        })
    }

    /// Size and object size in bytes.
    pub fn stat(&self) -> Result<(u64, u64), CallError> {
        // SAFETY: rbd_image_info_t is plain old data; all-zero is a valid value.
        let mut info: ffi::rbd_image_info_t = unsafe { std::mem::zeroed() };
        // SAFETY: an open image; info is a live struct of the size passed.
        CallError::check("rbd_stat", unsafe {
            ffi::rbd_stat(self.shared.raw, &mut info, std::mem::size_of::<ffi::rbd_image_info_t>())
        })?;
        Ok((info.size, info.obj_size))
    }

    /// The image's features.
    pub fn features(&self) -> Result<Features, CallError> {
        let mut f = 0u64;
        // SAFETY: an open image; f is a live out-value.
        CallError::check("rbd_get_features", unsafe { ffi::rbd_get_features(self.shared.raw, &mut f) })?;
        Ok(Features(f))
    }

    /// Takes the exclusive lock and keeps it: librbd stops handing it to
    /// other clients that ask (their writes fail instead of interleaving
    /// with ours). Blocks until acquired or refused.
    pub fn lock_exclusive(&self) -> Result<(), CallError> {
        // SAFETY: an open, writable image.
        CallError::check("rbd_lock_acquire", unsafe {
            ffi::rbd_lock_acquire(self.shared.raw, ffi::RBD_LOCK_MODE_EXCLUSIVE)
        })?;
        Ok(())
    }

    /// Allocated extents of `[offset, offset+len)` as librbd reports them
    /// (`rbd_diff_iterate2` from the image's creation, whole objects):
    /// `(offset, len, exists)` in order. Stops after `limit` extents.
    pub fn allocated(&self, offset: u64, len: u64, limit: usize) -> Result<Vec<(u64, u64, bool)>, CallError> {
        struct Acc {
            out: Vec<(u64, u64, bool)>,
            limit: usize,
        }
        extern "C" fn each(off: u64, len: usize, exists: c_int, arg: *mut c_void) -> c_int {
            // SAFETY: arg is the &mut Acc passed below, alive for the whole
            // synchronous rbd_diff_iterate2 call, used by one thread.
            let acc = unsafe { &mut *arg.cast::<Acc>() };
            acc.out.push((off, len as u64, exists != 0));
            if acc.out.len() >= acc.limit {
                -libc::ECANCELED
            } else {
                0
            }
        }
        let mut acc = Acc { out: Vec::new(), limit: limit.max(1) };
        // SAFETY: an open image; null fromsnapname = since creation; the
        // callback and its argument stay valid for the call (it returns only
        // when iteration ended).
        let ret = unsafe {
            ffi::rbd_diff_iterate2(
                self.shared.raw,
                ptr::null(),
                offset,
                len,
                1,
                1,
                each,
                (&mut acc as *mut Acc).cast(),
            )
        };
        if ret == -libc::ECANCELED && acc.out.len() >= acc.limit {
            return Ok(acc.out);
        }
        CallError::check("rbd_diff_iterate2", ret)?;
        Ok(acc.out)
    }

    /// Starts `op` on `buf`; the result and `buf` go to `sink` when it ends
    /// (at once, from this thread, if it cannot be started). Reads and
    /// writes report the bytes of `buf[at..]`; the rest report 0.
    pub fn submit(&self, op: BlockOp, buf: IoBuf, sink: Sink) {
        let iov = match op {
            BlockOp::Read { at, .. } | BlockOp::Write { at, .. } => {
                let rest = buf.get(at..).unwrap_or_default();
                libc::iovec { iov_base: rest.as_ptr() as *mut c_void, iov_len: rest.len() }
            }
            _ => libc::iovec { iov_base: ptr::null_mut(), iov_len: 0 },
        };
        let then_flush = matches!(op, BlockOp::Write { fua: true, .. });
        let moved = iov.iov_len;
        self.shared.add_inflight(1);
        // The buffer's heap memory does not move with the IoBuf value, so
        // `iov` stays valid inside the box.
        let sink = Some(sink);
        start(Box::new(Pending { shared: self.shared.clone(), op, buf, iov, sink, moved, then_flush }));
    }
}

/// Hands `p` to librbd; on failure delivers the error at once.
fn start(p: Box<Pending>) {
    let image = p.shared.raw;
    let op = p.op;
    let raw = Box::into_raw(p);
    let mut c: ffi::rbd_completion_t = ptr::null_mut();
    // SAFETY: raw is a live Box<Pending> that the callback takes back
    // exactly once; c is a live out-pointer.
    let r = unsafe { ffi::rbd_aio_create_completion(raw.cast(), on_complete, &mut c) };
    if r < 0 {
        // SAFETY: no completion exists, so nothing else owns raw.
        let p = unsafe { Box::from_raw(raw) };
        return p.finish(Err(io::Error::from_raw_os_error(-r)));
    }
    // SAFETY: raw is still ours until the submission succeeds; the iovec
    // is read before the call, and the memory it names lives in the box
    // (the box is freed only by the callback). After a successful
    // submission neither raw nor the box is touched here.
    let iov = unsafe { ptr::addr_of!((*raw).iov) };
    // SAFETY: an open image (Image::drop waits for in-flight operations
    // before closing it), a fresh completion, and for reads and writes an
    // iovec naming the live buffer held in the box.
    let r = unsafe {
        match op {
            BlockOp::Read { offset, .. } => ffi::rbd_aio_readv(image, iov, 1, offset, c),
            BlockOp::Write { offset, .. } => ffi::rbd_aio_writev(image, iov, 1, offset, c),
            BlockOp::Flush => ffi::rbd_aio_flush(image, c),
            BlockOp::Trim { offset, len } => ffi::rbd_aio_discard(image, offset, len, c),
            // (The backend refuses FAST_ZERO before it gets here; librbd
            // keeps or frees the range as it likes, never leaving old data.)
            BlockOp::WriteZeroes { offset, len, .. } => {
                let len = usize::try_from(len).unwrap_or(usize::MAX);
                ffi::rbd_aio_write_zeroes(image, offset, len, c, 0, 0)
            }
        }
    };
    if r < 0 {
        // SAFETY: a refused submission never completes: the completion is
        // ours to release and the box ours to take back.
        unsafe { ffi::rbd_aio_release(c) };
        // SAFETY: as above.
        let p = unsafe { Box::from_raw(raw) };
        p.finish(Err(io::Error::from_raw_os_error(-r)));
    }
}

/// librbd's completion callback (runs on a librbd thread).
extern "C" fn on_complete(c: ffi::rbd_completion_t, arg: *mut c_void) {
    // SAFETY: c is the completion being reported, released once, here.
    let ret = unsafe { ffi::rbd_aio_get_return_value(c) };
    // SAFETY: as above; nothing uses c afterwards.
    unsafe { ffi::rbd_aio_release(c) };
    // SAFETY: arg is the Box<Pending> that start() leaked for exactly this
    // completion; librbd calls the callback once.
    let mut p = unsafe { Box::from_raw(arg.cast::<Pending>()) };
    if ret < 0 {
        let errno = i32::try_from(ret.saturating_neg()).unwrap_or(libc::EIO);
        return p.finish(Err(io::Error::from_raw_os_error(errno)));
    }
    if p.then_flush {
        // FUA: the write is done; the flush after it decides the reply.
        p.then_flush = false;
        p.op = BlockOp::Flush;
        return start(p);
    }
    let moved = p.moved;
    p.finish(Ok(moved))
}

impl Pending {
    fn finish(mut self: Box<Self>, result: io::Result<usize>) {
        let buf = std::mem::take(&mut self.buf);
        if let Some(sink) = self.sink.take() {
            if let Err(e) = sink.deliver(result, buf) {
                tracing::warn!("rbd: waking the ring worker after a completion: {e}");
            }
        }
        let shared = self.shared.clone();
        drop(self);
        shared.add_inflight(-1);
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // Operations still in flight would complete onto a closed image:
        // wait for them (each is bounded by rados_osd_op_timeout).
        let mut g = self.shared.inflight.lock().unwrap_or_else(|p| p.into_inner());
        while *g > 0 {
            g = self.shared.idle.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        drop(g);
        // SAFETY: no operation is in flight and none can start (we hold
        // the only Image); the handle is not used after this. Closing also
        // flushes librbd's cache and releases the exclusive lock.
        let r = unsafe { ffi::rbd_close(self.shared.raw) };
        if r < 0 {
            tracing::warn!("rbd: closing the image: {}", io::Error::from_raw_os_error(-r));
        }
    }
}
