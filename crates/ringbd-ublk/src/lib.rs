//! The ublk frontend: exports as local block devices (/dev/ublkbN) through
//! the kernel's userspace block driver. No `unsafe` here: the driver's
//! commands, the mmapped descriptors and the buffers are `ringbd_io::ublk`.
//!
//! - [`target`]: the [`Target`] / [`QueueHandler`] traits a backing implements.
//! - [`null`], [`file`](mod@file), [`nbd`]: the null, file and NBD targets;
//!   [`backend`]: any other export backend of `ringbd serve` (memory, fault).
//! - [`queue`]: a queue's thread and loop.
//! - [`device`]: attach, recover, serve, tear down; detach and list.
//! - [`spec`]: `null:SIZE`, `file:PATH[,direct]`, NBD URIs, `memory:SIZE`,
//!   `fault:RULES:SPEC`.
#![forbid(unsafe_code)]

pub mod backend;
pub mod device;
pub mod error;
pub mod file;
pub mod nbd;
pub mod null;
pub mod queue;
pub mod spec;
pub mod target;

pub use device::{AttachOptions, Device};
pub use error::{Error, Result};
/// SIGINT/SIGTERM as an fd, for [`Device::run`] (create it before attaching).
pub use ringbd_io::signal::TermSignals;
pub use spec::TargetSpec;
pub use target::{QueueHandler, Target};
