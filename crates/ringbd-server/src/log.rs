//! Minimal stderr logging: warnings always, debug lines with `--verbose`.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};

static VERBOSE: AtomicBool = AtomicBool::new(false);

pub fn set_verbose(on: bool) {
    VERBOSE.store(on, Ordering::Relaxed);
}

pub fn verbose() -> bool {
    VERBOSE.load(Ordering::Relaxed)
}

pub fn warn(args: fmt::Arguments<'_>) {
    eprintln!("ringbd: {args}");
}

pub fn debug(args: fmt::Arguments<'_>) {
    if verbose() {
        eprintln!("ringbd: {args}");
    }
}
