//! The ublk UAPI (`include/uapi/linux/ublk_cmd.h`) as Rust constants and
//! `#[repr(C)]` structs, in the layout of Linux 6.12 (the kernel the VM
//! tests run). Later kernels only append: newer feature bits and parameter
//! types are listed so that `GET_FEATURES` answers can be named, but they
//! are used only where the kernel reports them.

/// `_IOC(dir, 'u', nr, size)` as the kernel encodes ioctl numbers.
const fn ioc(dir: u32, nr: u32, size: usize) -> u32 {
    (dir << 30) | ((size as u32) << 16) | ((b'u' as u32) << 8) | nr
}
const IOC_READ: u32 = 2;
const IOC_RW: u32 = 3;
const CTRL: usize = std::mem::size_of::<CtrlCmd>();
const IO: usize = std::mem::size_of::<IoCmd>();

// Control commands (ioctl-encoded; 6.12 accepts only these unless the
// kernel was built with CONFIG_BLKDEV_UBLK_LEGACY_OPCODES).
pub const UBLK_U_CMD_GET_QUEUE_AFFINITY: u32 = ioc(IOC_READ, 0x01, CTRL);
pub const UBLK_U_CMD_GET_DEV_INFO: u32 = ioc(IOC_READ, 0x02, CTRL);
pub const UBLK_U_CMD_ADD_DEV: u32 = ioc(IOC_RW, 0x04, CTRL);
pub const UBLK_U_CMD_DEL_DEV: u32 = ioc(IOC_RW, 0x05, CTRL);
pub const UBLK_U_CMD_START_DEV: u32 = ioc(IOC_RW, 0x06, CTRL);
pub const UBLK_U_CMD_STOP_DEV: u32 = ioc(IOC_RW, 0x07, CTRL);
pub const UBLK_U_CMD_SET_PARAMS: u32 = ioc(IOC_RW, 0x08, CTRL);
pub const UBLK_U_CMD_GET_PARAMS: u32 = ioc(IOC_READ, 0x09, CTRL);
pub const UBLK_U_CMD_START_USER_RECOVERY: u32 = ioc(IOC_RW, 0x10, CTRL);
pub const UBLK_U_CMD_END_USER_RECOVERY: u32 = ioc(IOC_RW, 0x11, CTRL);
pub const UBLK_U_CMD_GET_FEATURES: u32 = ioc(IOC_READ, 0x13, CTRL);

// I/O commands, sent on /dev/ublkcN.
pub const UBLK_U_IO_FETCH_REQ: u32 = ioc(IOC_RW, 0x20, IO);
pub const UBLK_U_IO_COMMIT_AND_FETCH_REQ: u32 = ioc(IOC_RW, 0x21, IO);

/// Result of an I/O command when the queue is being torn down: no re-fetch.
pub const UBLK_IO_RES_ABORT: i32 = -libc::ENODEV;

/// Offset of queue 0's descriptor area in /dev/ublkcN; queue `q` is at
/// `q * max_cmd_buf_size()`.
pub const UBLKSRV_CMD_BUF_OFFSET: u64 = 0;
pub const UBLK_MAX_QUEUE_DEPTH: u16 = 4096;
pub const UBLK_MAX_NR_QUEUES: u16 = 4096;
/// Largest single I/O buffer (`1 << UBLK_IO_BUF_BITS`).
pub const UBLK_MAX_IO_BUF_BYTES: u32 = 1 << 25;

// Feature flags (ADD_DEV flags and the GET_FEATURES answer), with the
// kernel release that brought each.
pub const UBLK_F_SUPPORT_ZERO_COPY: u64 = 1 << 0; // never reported before 6.15
pub const UBLK_F_URING_CMD_COMP_IN_TASK: u64 = 1 << 1;
pub const UBLK_F_NEED_GET_DATA: u64 = 1 << 2;
pub const UBLK_F_USER_RECOVERY: u64 = 1 << 3;
pub const UBLK_F_USER_RECOVERY_REISSUE: u64 = 1 << 4;
pub const UBLK_F_UNPRIVILEGED_DEV: u64 = 1 << 5;
pub const UBLK_F_CMD_IOCTL_ENCODE: u64 = 1 << 6;
pub const UBLK_F_USER_COPY: u64 = 1 << 7;
pub const UBLK_F_ZONED: u64 = 1 << 8;
pub const UBLK_F_USER_RECOVERY_FAIL_IO: u64 = 1 << 9; // 6.13
pub const UBLK_F_UPDATE_SIZE: u64 = 1 << 10; // 6.14
pub const UBLK_F_AUTO_BUF_REG: u64 = 1 << 11; // 6.16
pub const UBLK_F_QUIESCE: u64 = 1 << 12; // 6.16
pub const UBLK_F_PER_IO_DAEMON: u64 = 1 << 13; // 6.16
pub const UBLK_F_BUF_REG_OFF_DAEMON: u64 = 1 << 14; // 6.16

/// `struct ublk_auto_buf_reg` flag: when the driver cannot register a
/// request's buffer, hand the request over with `UBLK_IO_F_NEED_REG_BUF`
/// instead of failing it (not used: ringbd registers a table big enough
/// for every tag, so a failure is a bug and the request fails with EIO).
pub const UBLK_AUTO_BUF_REG_FALLBACK: u8 = 1 << 0;

/// With `UBLK_F_AUTO_BUF_REG`, what FETCH_REQ and COMMIT_AND_FETCH_REQ
/// carry in the SQE's own `addr` field (not `ublksrv_io_cmd.addr`, which
/// must then be 0): `struct ublk_auto_buf_reg` packed into a u64 as
/// `ublk_auto_buf_reg_to_sqe_addr()` does (index in bits 0-15, flags in
/// 16-23, the reserved bits zero). The driver registers the request's
/// pages as fixed buffer `index` of the ring the command was issued on
/// before completing the command, and unregisters it at the commit.
pub fn auto_buf_reg_sqe_addr(index: u16, flags: u8) -> u64 {
    u64::from(index) | (u64::from(flags) << 16)
}

/// Names of the feature bits, for messages and `ringbd list`.
pub const FEATURE_NAMES: &[(u64, &str)] = &[
    (UBLK_F_SUPPORT_ZERO_COPY, "ZERO_COPY"),
    (UBLK_F_URING_CMD_COMP_IN_TASK, "URING_CMD_COMP_IN_TASK"),
    (UBLK_F_NEED_GET_DATA, "NEED_GET_DATA"),
    (UBLK_F_USER_RECOVERY, "USER_RECOVERY"),
    (UBLK_F_USER_RECOVERY_REISSUE, "USER_RECOVERY_REISSUE"),
    (UBLK_F_UNPRIVILEGED_DEV, "UNPRIVILEGED_DEV"),
    (UBLK_F_CMD_IOCTL_ENCODE, "CMD_IOCTL_ENCODE"),
    (UBLK_F_USER_COPY, "USER_COPY"),
    (UBLK_F_ZONED, "ZONED"),
    (UBLK_F_USER_RECOVERY_FAIL_IO, "USER_RECOVERY_FAIL_IO"),
    (UBLK_F_UPDATE_SIZE, "UPDATE_SIZE"),
    (UBLK_F_AUTO_BUF_REG, "AUTO_BUF_REG"),
    (UBLK_F_QUIESCE, "QUIESCE"),
    (UBLK_F_PER_IO_DAEMON, "PER_IO_DAEMON"),
    (UBLK_F_BUF_REG_OFF_DAEMON, "BUF_REG_OFF_DAEMON"),
];

/// `FLAG|FLAG|...` for a feature mask; unknown bits in hex.
pub fn feature_names(flags: u64) -> String {
    let mut names: Vec<String> = Vec::new();
    let mut rest = flags;
    for &(bit, name) in FEATURE_NAMES {
        if flags & bit != 0 {
            names.push(name.to_owned());
            rest &= !bit;
        }
    }
    if rest != 0 {
        names.push(format!("{rest:#x}"));
    }
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join("|")
    }
}

// Device states (ublksrv_ctrl_dev_info.state).
pub const UBLK_S_DEV_DEAD: u16 = 0;
pub const UBLK_S_DEV_LIVE: u16 = 1;
pub const UBLK_S_DEV_QUIESCED: u16 = 2;
pub const UBLK_S_DEV_FAIL_IO: u16 = 3;

// Request operations (ublksrv_io_desc.op_flags & 0xff) and flags (>> 8).
pub const UBLK_IO_OP_READ: u8 = 0;
pub const UBLK_IO_OP_WRITE: u8 = 1;
pub const UBLK_IO_OP_FLUSH: u8 = 2;
pub const UBLK_IO_OP_DISCARD: u8 = 3;
pub const UBLK_IO_OP_WRITE_SAME: u8 = 4;
pub const UBLK_IO_OP_WRITE_ZEROES: u8 = 5;
pub const UBLK_IO_F_FUA: u32 = 1 << 13;
pub const UBLK_IO_F_NOUNMAP: u32 = 1 << 15;

// ublk_param_basic.attrs
pub const UBLK_ATTR_READ_ONLY: u32 = 1 << 0;
pub const UBLK_ATTR_ROTATIONAL: u32 = 1 << 1;
pub const UBLK_ATTR_VOLATILE_CACHE: u32 = 1 << 2;
pub const UBLK_ATTR_FUA: u32 = 1 << 3;

// ublk_params.types
pub const UBLK_PARAM_TYPE_BASIC: u32 = 1 << 0;
pub const UBLK_PARAM_TYPE_DISCARD: u32 = 1 << 1;
pub const UBLK_PARAM_TYPE_DEVT: u32 = 1 << 2;

/// `struct ublksrv_ctrl_cmd`: the 32 bytes of a control command in the SQE.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct CtrlCmd {
    pub dev_id: u32,
    /// `u16::MAX` unless the command is for one queue.
    pub queue_id: u16,
    pub len: u16,
    pub addr: u64,
    pub data: [u64; 1],
    pub dev_path_len: u16,
    pub pad: u16,
    pub reserved: u32,
}

/// `struct ublksrv_ctrl_dev_info`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DevInfo {
    pub nr_hw_queues: u16,
    pub queue_depth: u16,
    pub state: u16,
    pub pad0: u16,
    pub max_io_buf_bytes: u32,
    pub dev_id: u32,
    pub ublksrv_pid: i32,
    pub pad1: u32,
    pub flags: u64,
    /// Ours to use; the driver stores and returns it.
    pub ublksrv_flags: u64,
    pub owner_uid: u32,
    pub owner_gid: u32,
    pub reserved1: u64,
    pub reserved2: u64,
}

/// `struct ublksrv_io_desc`: one request, written by the driver into the
/// queue's shared descriptor area at index `tag`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoDesc {
    /// op in bits 0-7, flags in 8-31
    pub op_flags: u32,
    pub nr_sectors: u32,
    pub start_sector: u64,
    pub addr: u64,
}

impl IoDesc {
    pub fn op(&self) -> u8 {
        (self.op_flags & 0xff) as u8
    }
    /// The `UBLK_IO_F_*` flags (already shifted into place, e.g. [`UBLK_IO_F_FUA`]).
    pub fn flags(&self) -> u32 {
        self.op_flags & !0xff
    }
}

/// `struct ublksrv_io_cmd`: the 16 bytes of an I/O command in the SQE.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct IoCmd {
    pub q_id: u16,
    pub tag: u16,
    pub result: i32,
    pub addr: u64,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParamBasic {
    pub attrs: u32,
    pub logical_bs_shift: u8,
    pub physical_bs_shift: u8,
    pub io_opt_shift: u8,
    pub io_min_shift: u8,
    pub max_sectors: u32,
    pub chunk_sectors: u32,
    pub dev_sectors: u64,
    pub virt_boundary_mask: u64,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParamDiscard {
    pub discard_alignment: u32,
    pub discard_granularity: u32,
    pub max_discard_sectors: u32,
    pub max_write_zeroes_sectors: u32,
    /// The driver accepts only 1 when discard is enabled.
    pub max_discard_segments: u16,
    pub reserved0: u16,
}

/// Read-only (GET_PARAMS): the char and block device numbers.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParamDevt {
    pub char_major: u32,
    pub char_minor: u32,
    pub disk_major: u32,
    pub disk_minor: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParamZoned {
    pub max_open_zones: u32,
    pub max_active_zones: u32,
    pub max_zone_append_sectors: u32,
    pub reserved: [u8; 20],
}

/// `struct ublk_params` as of 6.12 (basic, discard, devt, zoned; later
/// kernels append dma/segment parameters, and accept a shorter `len`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Params {
    /// Set to `size_of::<Params>()`; the driver may shorten it.
    pub len: u32,
    pub types: u32,
    pub basic: ParamBasic,
    pub discard: ParamDiscard,
    pub devt: ParamDevt,
    pub zoned: ParamZoned,
    /// The C struct's trailing padding (to 8-byte alignment), named so that
    /// every byte handed to the kernel is initialised. Later kernels put
    /// the DMA-alignment parameters here, used only when `types` says so.
    pub tail_pad: [u8; 4],
}

/// Size of one queue's descriptor area as the driver maps it:
/// `round_up(depth * sizeof(ublksrv_io_desc), PAGE_SIZE)`.
pub fn cmd_buf_size(depth: u16, page_size: usize) -> usize {
    let bytes = usize::from(depth) * std::mem::size_of::<IoDesc>();
    bytes.div_ceil(page_size) * page_size
}

/// mmap offset of queue `q_id`'s descriptor area (queues are spaced by the
/// area size at the largest depth).
pub fn cmd_buf_offset(q_id: u16, page_size: usize) -> u64 {
    UBLKSRV_CMD_BUF_OFFSET + u64::from(q_id) * cmd_buf_size(UBLK_MAX_QUEUE_DEPTH, page_size) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::size_of;

    #[test]
    fn struct_sizes_match_the_uapi() {
        assert_eq!(size_of::<CtrlCmd>(), 32);
        assert_eq!(size_of::<DevInfo>(), 64);
        assert_eq!(size_of::<IoDesc>(), 24);
        assert_eq!(size_of::<IoCmd>(), 16);
        assert_eq!(size_of::<ParamBasic>(), 32);
        assert_eq!(size_of::<ParamDiscard>(), 20);
        assert_eq!(size_of::<Params>(), 112);
        // No implicit padding anywhere: the fields add up to the size.
        assert_eq!(8 + size_of::<ParamBasic>() + 20 + 16 + 32 + 4, size_of::<Params>());
        assert_eq!(4 + 2 + 2 + 8 + 8 + 2 + 2 + 4, size_of::<CtrlCmd>());
        assert_eq!(4 * 2 + 4 * 2 + 4 * 2 + 8 + 8 + 4 * 2 + 8 + 8, size_of::<DevInfo>());
    }

    #[test]
    fn ioctl_numbers_match_the_uapi() {
        // Values computed by the C macros (_IOR/_IOWR('u', nr, struct)).
        assert_eq!(UBLK_U_CMD_GET_FEATURES, 0x8020_7513);
        assert_eq!(UBLK_U_CMD_ADD_DEV, 0xc020_7504);
        assert_eq!(UBLK_U_CMD_GET_DEV_INFO, 0x8020_7502);
        assert_eq!(UBLK_U_IO_FETCH_REQ, 0xc010_7520);
        assert_eq!(UBLK_U_IO_COMMIT_AND_FETCH_REQ, 0xc010_7521);
    }

    #[test]
    fn descriptor_areas_are_spaced_by_the_largest_depth() {
        assert_eq!(cmd_buf_size(1, 4096), 4096);
        assert_eq!(cmd_buf_size(128, 4096), 4096);
        assert_eq!(cmd_buf_size(256, 4096), 8192);
        assert_eq!(cmd_buf_offset(0, 4096), 0);
        assert_eq!(cmd_buf_offset(2, 4096), 2 * 24 * 4096);
    }

    #[test]
    fn feature_names_list_known_and_unknown_bits() {
        assert_eq!(feature_names(UBLK_F_USER_RECOVERY | UBLK_F_USER_COPY), "USER_RECOVERY|USER_COPY");
        assert_eq!(feature_names(1 << 40), "0x10000000000");
        assert_eq!(feature_names(0), "none");
    }

    #[test]
    fn auto_buf_reg_packs_like_the_uapi_helper() {
        assert_eq!(auto_buf_reg_sqe_addr(0, 0), 0);
        assert_eq!(auto_buf_reg_sqe_addr(0x1234, UBLK_AUTO_BUF_REG_FALLBACK), 0x1_1234);
        assert_eq!(auto_buf_reg_sqe_addr(u16::MAX, 0), 0xffff);
    }
}
