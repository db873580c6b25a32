//! qcow2 headers and tables (crates/ringbd-backend/src/qcow2/): any bytes,
//! taken as an image file held in memory, are either refused with a field
//! and a reason or opened, mapped and read (each extent's first 4 KiB;
//! extents reported zero must read as zeroes) without a panic; then
//! written, zeroed, discarded and flushed as a read-write export, and what
//! that leaves opened and read again, without a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringbd_backend::qcow2;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = qcow2::parse_header(data) {
        assert!(!e.field.is_empty() && !e.reason.is_empty(), "an error without a field or reason: {e:?}");
    }
    let _ = qcow2::fuzz_image(data);
    let _ = qcow2::fuzz_write(data);
});
