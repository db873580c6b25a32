//! The few librados and librbd functions ringbd calls, declared by hand from
//! Ceph 16.2's `rados/librados.h` and `rbd/librbd.h` (a stable C ABI;
//! docs/rbd.md says why not bindgen). Only [`super`] calls them.

use std::ffi::{c_char, c_int, c_void};

pub type RadosT = *mut c_void;
pub type RadosIoctxT = *mut c_void;
pub type RbdImageT = *mut c_void;
pub type RbdCompletionT = *mut c_void;
pub type RbdCallbackT = extern "C" fn(c: RbdCompletionT, arg: *mut c_void);
pub type DiffCallback = extern "C" fn(offset: u64, len: usize, exists: c_int, arg: *mut c_void) -> c_int;

/// `RBD_LOCK_MODE_EXCLUSIVE` of `rbd_lock_mode_t`.
pub const RBD_LOCK_MODE_EXCLUSIVE: c_int = 0;
/// `RBD_FEATURE_EXCLUSIVE_LOCK` (`rbd/features.h`).
pub const RBD_FEATURE_EXCLUSIVE_LOCK: u64 = 1 << 2;
/// `RBD_FEATURE_FAST_DIFF` (`rbd/features.h`): allocation from the object map.
pub const RBD_FEATURE_FAST_DIFF: u64 = 1 << 4;

/// `rbd_image_info_t` (160 bytes on x86-64 and aarch64; a unit test checks
/// the size, which `rbd_stat` also checks against its own).
#[repr(C)]
pub struct RbdImageInfo {
    pub size: u64,
    pub obj_size: u64,
    pub num_objs: u64,
    pub order: c_int,
    pub block_name_prefix: [c_char; 24],
    pub parent_pool: i64,
    pub parent_name: [c_char; 96],
}

extern "C" {
    pub fn rados_create2(
        cluster: *mut RadosT,
        clustername: *const c_char,
        name: *const c_char,
        flags: u64,
    ) -> c_int;
    pub fn rados_conf_read_file(cluster: RadosT, path: *const c_char) -> c_int;
    pub fn rados_conf_parse_env(cluster: RadosT, var: *const c_char) -> c_int;
    pub fn rados_conf_set(cluster: RadosT, option: *const c_char, value: *const c_char) -> c_int;
    pub fn rados_connect(cluster: RadosT) -> c_int;
    pub fn rados_shutdown(cluster: RadosT);
    pub fn rados_ioctx_create(cluster: RadosT, pool_name: *const c_char, ioctx: *mut RadosIoctxT) -> c_int;
    pub fn rados_ioctx_destroy(io: RadosIoctxT);
}

extern "C" {
    pub fn rbd_open(
        io: RadosIoctxT,
        name: *const c_char,
        image: *mut RbdImageT,
        snap_name: *const c_char,
    ) -> c_int;
    pub fn rbd_open_read_only(
        io: RadosIoctxT,
        name: *const c_char,
        image: *mut RbdImageT,
        snap_name: *const c_char,
    ) -> c_int;
    pub fn rbd_close(image: RbdImageT) -> c_int;
    pub fn rbd_stat(image: RbdImageT, info: *mut RbdImageInfo, infosize: usize) -> c_int;
    pub fn rbd_get_features(image: RbdImageT, features: *mut u64) -> c_int;
    pub fn rbd_lock_acquire(image: RbdImageT, lock_mode: c_int) -> c_int;
    pub fn rbd_diff_iterate2(
        image: RbdImageT,
        fromsnapname: *const c_char,
        ofs: u64,
        len: u64,
        include_parent: u8,
        whole_object: u8,
        cb: DiffCallback,
        arg: *mut c_void,
    ) -> c_int;
    pub fn rbd_aio_create_completion(
        cb_arg: *mut c_void,
        complete_cb: RbdCallbackT,
        c: *mut RbdCompletionT,
    ) -> c_int;
    pub fn rbd_aio_get_return_value(c: RbdCompletionT) -> isize;
    pub fn rbd_aio_release(c: RbdCompletionT);
    pub fn rbd_aio_readv(
        image: RbdImageT,
        iov: *const libc::iovec,
        iovcnt: c_int,
        off: u64,
        c: RbdCompletionT,
    ) -> c_int;
    pub fn rbd_aio_writev(
        image: RbdImageT,
        iov: *const libc::iovec,
        iovcnt: c_int,
        off: u64,
        c: RbdCompletionT,
    ) -> c_int;
    pub fn rbd_aio_discard(image: RbdImageT, off: u64, len: u64, c: RbdCompletionT) -> c_int;
    pub fn rbd_aio_write_zeroes(
        image: RbdImageT,
        off: u64,
        len: usize,
        c: RbdCompletionT,
        zero_flags: c_int,
        op_flags: c_int,
    ) -> c_int;
    pub fn rbd_aio_flush(image: RbdImageT, c: RbdCompletionT) -> c_int;
}

#[cfg(test)]
mod tests {
    #[test]
    fn image_info_has_librbds_layout() {
        assert_eq!(std::mem::size_of::<super::RbdImageInfo>(), 160);
        assert_eq!(std::mem::offset_of!(super::RbdImageInfo, parent_pool), 56);
    }
}
