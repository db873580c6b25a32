//! Heap settings for the data paths.
//!
//! glibc returns the free top of a heap to the kernel once it exceeds the
//! trim threshold (128 KiB by default, raised only after a large `mmap`ed
//! block is freed). A TLS connection allocates a record buffer per 16 KiB
//! record and frees them all once the records are copied out, so one 1 MiB
//! read reply frees about 1 MiB at once; on a ring thread's arena that was
//! trimmed, and every page faulted back in (and zeroed) on the next reply:
//! about 80 page faults per MiB served, half of the server's CPU in a TLS
//! read benchmark. Fixed thresholds, set once at start, keep up to 8 MiB of
//! free heap top per arena instead.

use std::io;

/// The free top of a heap may grow to this before it is returned.
pub const TRIM_THRESHOLD: usize = 8 << 20;
/// Allocations at least this large get their own mapping (their pages go
/// back to the kernel when freed). Setting the trim threshold also stops
/// glibc from raising this one on its own; kept low so that large,
/// long-lived buffers (reply queues of clients that do not read, up to
/// 8 MiB each) do not fragment the heaps: with 4 MiB here, the hostile-client
/// battery's RSS climbed by about 30 MiB per round instead of staying flat.
pub const MMAP_THRESHOLD: usize = 256 << 10;

/// Sets [`TRIM_THRESHOLD`] and [`MMAP_THRESHOLD`] for the process. Call it
/// before the worker threads start.
pub fn retain_heap() -> io::Result<()> {
    for (param, value, name) in [
        (libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD, "M_TRIM_THRESHOLD"),
        (libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD, "M_MMAP_THRESHOLD"),
    ] {
        // Both constants fit an int.
        let value = libc::c_int::try_from(value).map_err(io::Error::other)?;
        // SAFETY: mallopt only changes allocator parameters; it takes no
        // pointers and is safe to call at any time.
        if unsafe { libc::mallopt(param, value) } != 1 {
            return Err(io::Error::other(format!("mallopt({name}, {value}) refused")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn glibc_takes_the_thresholds() {
        super::retain_heap().unwrap();
    }
}
