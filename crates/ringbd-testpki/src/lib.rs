//! Test certificates for the TLS tests, made in-process with rcgen: a CA,
//! a server certificate for `localhost` and a client certificate, written
//! under the names the server (`--tls-certificates DIR`, as qemu and nbdkit
//! name them) and the clients read. Making them cannot fail for a missing
//! tool, so the tests that use them always run.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose,
};

/// A fresh directory with a CA (`ca-cert.pem`), a server certificate for
/// `localhost` (`server-cert.pem`, `server-key.pem`) and a client
/// certificate (`client-cert.pem`, `client-key.pem`); removed when dropped.
pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// Makes the directory `ringbd-pki-{tag}-{pid}` under the temporary
    /// directory, with a CA named `ca_name`. Panics with the reason if a
    /// certificate or a file cannot be made: a test never goes on without.
    pub fn new(tag: &str, ca_name: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("ringbd-pki-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        if let Err(e) = write(&dir, ca_name) {
            panic!("making test certificates in {}: {e}", dir.display());
        }
        Pki { dir }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl std::ops::Deref for Pki {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

/// Writes the CA (common name `ca_name`), the server's and the client's
/// certificates and keys into `dir` (created if missing).
pub fn write(dir: &Path, ca_name: &str) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir)?;
    let mut ca = CertificateParams::new(Vec::new())?;
    ca.distinguished_name = name(ca_name);
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate()?;
    std::fs::write(dir.join("ca-cert.pem"), ca.self_signed(&ca_key)?.pem())?;
    let issuer = Issuer::new(ca, ca_key);

    let mut server = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
    server.distinguished_name = name("localhost");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let mut client = CertificateParams::new(Vec::new())?;
    client.distinguished_name = name("client");
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    for (who, params) in [("server", server), ("client", client)] {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        std::fs::write(dir.join(format!("{who}-cert.pem")), cert.pem())?;
        std::fs::write(dir.join(format!("{who}-key.pem")), key.serialize_pem())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn writes_every_file_and_removes_them() {
        let p = super::Pki::new("self", "ca-self");
        for f in ["ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem", "client-key.pem"] {
            let text = std::fs::read_to_string(p.join(f)).unwrap();
            assert!(text.starts_with("-----BEGIN "), "{f}: {text}");
        }
        let dir = p.path().to_owned();
        drop(p);
        assert!(!dir.exists());
    }
}
