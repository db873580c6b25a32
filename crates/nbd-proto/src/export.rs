//! What the handshake needs to know about the server's exports.

use crate::wire::{tx_flags, MAX_PAYLOAD};

/// What an export can do; turned into transmission flags truthfully.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExportCaps {
    pub read_only: bool,
    pub flush: bool,
    pub fua: bool,
    pub trim: bool,
    pub write_zeroes: bool,
    pub fast_zero: bool,
    pub cache: bool,
    pub multi_conn: bool,
    pub rotational: bool,
    /// The export can answer `base:allocation` block-status queries.
    pub base_allocation: bool,
}

/// Size constraints sent as `NBD_INFO_BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

impl Default for BlockSizes {
    /// The spec's defaults: any alignment, 4 KiB preferred, 32 MiB payloads.
    fn default() -> Self {
        BlockSizes { minimum: 1, preferred: 4096, maximum: MAX_PAYLOAD }
    }
}

/// One export as the handshake sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportDescriptor {
    pub name: String,
    pub description: String,
    pub size: u64,
    pub caps: ExportCaps,
    pub block_sizes: BlockSizes,
}

impl ExportDescriptor {
    /// Transmission flags for this export, given what the client negotiated.
    pub fn transmission_flags(&self, structured: bool, extended: bool, has_meta: bool) -> u16 {
        let c = &self.caps;
        let mut f = tx_flags::HAS_FLAGS;
        let writable = !c.read_only;
        let set = |f: &mut u16, cond: bool, bit: u16| {
            if cond {
                *f |= bit;
            }
        };
        set(&mut f, c.read_only, tx_flags::READ_ONLY);
        set(&mut f, c.flush, tx_flags::SEND_FLUSH);
        set(&mut f, c.fua && writable, tx_flags::SEND_FUA);
        set(&mut f, c.rotational, tx_flags::ROTATIONAL);
        set(&mut f, c.trim && writable, tx_flags::SEND_TRIM);
        let zeroes = c.write_zeroes && writable;
        set(&mut f, zeroes, tx_flags::SEND_WRITE_ZEROES);
        set(&mut f, zeroes && c.fast_zero, tx_flags::SEND_FAST_ZERO);
        set(&mut f, structured || extended, tx_flags::SEND_DF);
        set(&mut f, c.multi_conn, tx_flags::CAN_MULTI_CONN);
        set(&mut f, c.cache, tx_flags::SEND_CACHE);
        set(&mut f, extended && has_meta, tx_flags::BLOCK_STATUS_PAYLOAD);
        f
    }
}

/// One line of `NBD_OPT_LIST`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportListing {
    pub name: String,
    pub description: String,
}

/// The server's exports, as the handshake state machine queries them.
pub trait ExportCatalog {
    fn list(&self) -> Vec<ExportListing>;
    fn lookup(&self, name: &str) -> Option<ExportDescriptor>;
}

impl<T: ExportCatalog + ?Sized> ExportCatalog for &T {
    fn list(&self) -> Vec<ExportListing> {
        (**self).list()
    }

    fn lookup(&self, name: &str) -> Option<ExportDescriptor> {
        (**self).lookup(name)
    }
}

impl<T: ExportCatalog + ?Sized> ExportCatalog for std::sync::Arc<T> {
    fn list(&self) -> Vec<ExportListing> {
        (**self).list()
    }

    fn lookup(&self, name: &str) -> Option<ExportDescriptor> {
        (**self).lookup(name)
    }
}

/// A catalog held in memory; handy for tests and simple servers.
impl ExportCatalog for Vec<ExportDescriptor> {
    fn list(&self) -> Vec<ExportListing> {
        self.iter()
            .map(|e| ExportListing { name: e.name.clone(), description: e.description.clone() })
            .collect()
    }

    fn lookup(&self, name: &str) -> Option<ExportDescriptor> {
        self.iter().find(|e| e.name == name).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_caps() -> ExportCaps {
        ExportCaps {
            read_only: false,
            flush: true,
            fua: true,
            trim: true,
            write_zeroes: true,
            fast_zero: true,
            cache: true,
            multi_conn: true,
            rotational: false,
            base_allocation: true,
        }
    }

    fn export(caps: ExportCaps) -> ExportDescriptor {
        ExportDescriptor {
            name: String::new(),
            description: String::new(),
            size: 1 << 20,
            caps,
            block_sizes: BlockSizes::default(),
        }
    }

    #[test]
    fn flags_follow_caps_and_negotiation() {
        let e = export(all_caps());
        assert_eq!(e.transmission_flags(false, false, false), 0x0d6d);
        assert_eq!(e.transmission_flags(true, false, true), 0x0ded);
        assert_eq!(e.transmission_flags(true, true, true), 0x1ded);
    }

    #[test]
    fn read_only_exports_advertise_no_write_features() {
        let e = export(ExportCaps { read_only: true, ..all_caps() });
        let f = e.transmission_flags(true, false, false);
        assert_ne!(f & tx_flags::READ_ONLY, 0);
        for bit in
            [tx_flags::SEND_FUA, tx_flags::SEND_TRIM, tx_flags::SEND_WRITE_ZEROES, tx_flags::SEND_FAST_ZERO]
        {
            assert_eq!(f & bit, 0, "bit {bit:#x} set on a read-only export");
        }
    }
}
