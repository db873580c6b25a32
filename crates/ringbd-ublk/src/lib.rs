//! The ublk frontend: exports as local block devices (/dev/ublkbN) through
//! the kernel's userspace block driver. `unsafe` only in [`kernel`] (the
//! driver's UAPI, its control commands, a queue's ring with the mmapped
//! descriptors and the buffers).
//!
//! - [`target`]: the [`Target`] / [`QueueHandler`] traits a backing implements.
//! - [`backend`]: every export backend of `ringbd serve` (memory, file, null,
//!   rbd, fault, NBD exports) as a target: on the queue's ring (files), through
//!   the backend's asynchronous I/O (rbd, NBD), or called inline (memory, null).
//! - [`kernel`]: the kernel interface (UAPI structs, `/dev/ublk-control`
//!   commands, a queue's ring).
//! - [`queue`]: a queue's thread and loop.
//! - [`device`]: attach, recover, serve, tear down; detach and list.
#![deny(unsafe_code)]

pub mod backend;
pub mod device;
pub mod error;
#[allow(unsafe_code)]
pub mod kernel;
pub mod queue;
pub mod target;

pub use backend::BackendTarget;
pub use device::{AttachOptions, Device};
pub use error::{Error, Result};
/// SIGINT/SIGTERM as an fd, for [`Device::run`] (create it before attaching).
pub use ringbd_io::signal::TermSignals;
pub use target::{QueueHandler, Target};
