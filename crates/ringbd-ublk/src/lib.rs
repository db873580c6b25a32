//! The ublk frontend: exports as local block devices (/dev/ublkbN) through
//! the kernel's userspace block driver. No `unsafe` here: the driver's
//! commands, the mmapped descriptors and the buffers are `ringbd_io::ublk`.
//!
//! - [`target`]: the [`Target`] / [`QueueHandler`] traits a backing implements.
//! - [`backend`]: every export backend of `ringbd serve` (memory, file, null,
//!   rbd, fault, NBD exports) as a target: on the queue's ring (files), through
//!   the backend's asynchronous I/O (rbd, NBD), or called inline (memory, null).
//! - [`queue`]: a queue's thread and loop.
//! - [`device`]: attach, recover, serve, tear down; detach and list.
#![forbid(unsafe_code)]

pub mod backend;
pub mod device;
pub mod error;
pub mod queue;
pub mod target;

pub use backend::BackendTarget;
pub use device::{AttachOptions, Device};
pub use error::{Error, Result};
/// SIGINT/SIGTERM as an fd, for [`Device::run`] (create it before attaching).
pub use ringbd_io::signal::TermSignals;
pub use target::{QueueHandler, Target};
