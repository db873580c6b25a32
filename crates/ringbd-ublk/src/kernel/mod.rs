//! The kernel side of the ublk frontend: the userspace block device driver
//! (`ublk_drv`, Linux 6.0+) driven over io_uring passthrough commands.
//!
//! - [`sys`]: the UAPI constants and structs (6.12 layout).
//! - [`ctrl`]: `/dev/ublk-control` commands (add, parameters, start, stop,
//!   delete, info, features, user recovery).
//! - [`queue`]: one queue's ring, mmapped request descriptors and per-tag
//!   buffers; FETCH_REQ / COMMIT_AND_FETCH_REQ, the target's file
//!   operations and polls on the same ring.
//!
//! Every `unsafe` line of the ublk frontend is here, next to its one user:
//! the rest of the crate (targets, queue threads, device lifecycle) has none.

pub mod ctrl;
pub mod queue;
pub mod sys;

pub use ctrl::{signal_process, Control, CONTROL_PATH};
pub use queue::{pin_current_thread, AllocMode, Event, FileIo, FileSlot, QueueConfig, QueueRing};
pub use sys::{DevInfo, IoDesc, Params};

/// Turns a `-1` return into the thread's `errno`.
fn cvt(ret: libc::c_int) -> std::io::Result<libc::c_int> {
    if ret == -1 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}
