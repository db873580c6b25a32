//! kTLS for the server: what the kernel offers (probed once at start), the
//! counters, and the translation from a rustls session to the kernel's
//! crypto_info structures. The switch itself is `Connection`'s
//! (`conn/ktls_io.rs`); the syscalls are [`super::ktls_sys`].

use std::sync::atomic::{AtomicU64, Ordering};

use crate::tls::ktls_sys::{Cipher, CryptoInfo, Probe, Version};
use rustls::{CipherSuite, ConnectionTrafficSecrets, ServerConnection};

/// What the kernel's kTLS offers, probed once at start.
#[derive(Debug)]
pub struct Ktls {
    pub probe: Probe,
}

/// TLS sessions by where their records are encrypted.
#[derive(Debug, Default)]
pub struct KtlsStats {
    /// TLS handshakes completed.
    pub sessions: AtomicU64,
    /// Sessions handed to the kernel (TX and RX).
    pub ktls: AtomicU64,
    /// Sessions on TCP that stayed in userspace although kTLS was on
    /// (no `tls` module, a cipher the kernel lacks, a client that never
    /// paused between records).
    pub fallbacks: AtomicU64,
    /// Sessions whose keys the kernel refused after they left rustls
    /// (the connection is closed).
    pub failed: AtomicU64,
}

impl KtlsStats {
    pub fn summary(&self) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "TLS sessions {}, ktls_conns {}, kTLS fallbacks to userspace {}, kTLS failures {}",
            g(&self.sessions),
            g(&self.ktls),
            g(&self.fallbacks),
            g(&self.failed)
        )
    }

    pub(crate) fn bump(a: &AtomicU64) {
        a.fetch_add(1, Ordering::Relaxed);
    }
}

impl Ktls {
    /// Probes the kernel; the line says what was found (for `-v`).
    pub fn probe() -> (Ktls, String) {
        let probe = crate::tls::ktls_sys::probe();
        let line = match &probe.unavailable {
            Some(why) => format!("kTLS unavailable ({why}); TLS stays in userspace (rustls)"),
            None if probe.supported.is_empty() => {
                "kTLS: the kernel took no cipher; TLS stays in userspace (rustls)".to_owned()
            }
            None => {
                let list: Vec<String> = probe
                    .supported
                    .iter()
                    .map(|(v, c)| format!("{} {}", version_name(*v), c.name()))
                    .collect();
                format!("kTLS available: {}", list.join(", "))
            }
        };
        (Ktls { probe }, line)
    }
}

pub(crate) fn version_name(v: Version) -> &'static str {
    match v {
        Version::Tls12 => "TLS 1.2",
        Version::Tls13 => "TLS 1.3",
    }
}

/// The kernel's name for a session's version and AEAD; `None` for a suite
/// the kernel cannot take (none of rustls' defaults).
pub(crate) fn kernel_suite(session: &ServerConnection) -> Option<(Version, Cipher)> {
    let suite = session.negotiated_cipher_suite()?.suite();
    Some(match suite {
        CipherSuite::TLS13_AES_128_GCM_SHA256 => (Version::Tls13, Cipher::Aes128Gcm),
        CipherSuite::TLS13_AES_256_GCM_SHA384 => (Version::Tls13, Cipher::Aes256Gcm),
        CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => (Version::Tls13, Cipher::Chacha20Poly1305),
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        | CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => (Version::Tls12, Cipher::Aes128Gcm),
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
        | CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => (Version::Tls12, Cipher::Aes256Gcm),
        CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
        | CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => {
            (Version::Tls12, Cipher::Chacha20Poly1305)
        }
        _ => return None,
    })
}

/// One direction's keys from rustls, as the kernel's crypto_info.
pub(crate) fn crypto_info(
    version: Version,
    (seq, secrets): (u64, ConnectionTrafficSecrets),
) -> std::io::Result<CryptoInfo> {
    let (cipher, key, iv) = match &secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (Cipher::Aes128Gcm, key.as_ref(), iv.as_ref()),
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (Cipher::Aes256Gcm, key.as_ref(), iv.as_ref()),
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
            (Cipher::Chacha20Poly1305, key.as_ref(), iv.as_ref())
        }
        _ => return Err(std::io::Error::other("rustls exported an AEAD the kernel does not know")),
    };
    CryptoInfo::new(version, cipher, key, iv, seq)
}

/// The keys of both directions, ready for `TLS_TX`/`TLS_RX`.
#[derive(Debug)]
pub struct KtlsKeys {
    pub version: Version,
    pub cipher: Cipher,
    pub tx: CryptoInfo,
    pub rx: CryptoInfo,
    /// Sequence numbers of the next record each way (logged).
    pub tx_seq: u64,
    pub rx_seq: u64,
}

/// Follows TLS record boundaries in the ciphertext handed to rustls, so the
/// connection knows whether rustls holds part of a record (then the rest
/// is still on its way and the kernel must not take over the receive side).
#[derive(Debug, Default)]
pub(crate) struct RecordFramer {
    hdr: [u8; 5],
    hdr_len: usize,
    body_left: usize,
}

impl RecordFramer {
    /// `data` was given to rustls (`read_tls` took all of it).
    pub(crate) fn advance(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.body_left > 0 {
                let n = self.body_left.min(data.len());
                self.body_left -= n;
                data = &data[n..];
                continue;
            }
            let n = (self.hdr.len() - self.hdr_len).min(data.len());
            self.hdr[self.hdr_len..self.hdr_len + n].copy_from_slice(&data[..n]);
            self.hdr_len += n;
            data = &data[n..];
            if self.hdr_len == self.hdr.len() {
                // type, legacy version, then a big-endian length.
                self.body_left = usize::from(u16::from_be_bytes([self.hdr[3], self.hdr[4]]));
                self.hdr_len = 0;
            }
        }
    }

    /// Every record given to rustls so far is complete.
    pub(crate) fn at_boundary(&self) -> bool {
        self.hdr_len == 0 && self.body_left == 0
    }
}

#[cfg(test)]
mod tests {
    use super::RecordFramer;

    #[test]
    fn framer_tracks_boundaries_across_any_split() {
        // Three records: 3, 0 and 300 bytes of body.
        let mut wire = vec![23, 3, 3, 0, 3, 1, 2, 3, 21, 3, 3, 0, 0, 23, 3, 3, 1, 44];
        wire.extend(std::iter::repeat_n(7u8, 300));
        let ends = [8, 13, wire.len()];
        for split in 1..wire.len() {
            let mut f = RecordFramer::default();
            let mut at = 0;
            while at < wire.len() {
                let end = (at + split).min(wire.len());
                f.advance(&wire[at..end]);
                at = end;
                assert_eq!(f.at_boundary(), ends.contains(&at), "split {split}, at {at}");
            }
        }
    }
}
