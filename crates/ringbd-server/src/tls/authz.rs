//! `--tls-authz`: only clients whose certificate subject is on an allow
//! list, like qemu's `authz-simple` object. The identity is the subject
//! distinguished name as an RFC 4514 string, the way qemu (GnuTLS) prints
//! it: most specific attribute first, e.g. `CN=backup-host,O=Example`.
//!
//! The check runs inside the TLS handshake, after the usual verification
//! against the CA (it wraps rustls' verifier): a client that is not listed
//! gets an `access_denied` alert and never reaches option haggling.
//!
//! The certificate is parsed with x509-parser; this module only prints
//! the subject's distinguished name the way qemu does.

use std::fmt::Write as _;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};
use x509_parser::der_parser::asn1_rs::{Any, Oid, Tag, ToDer};
use x509_parser::x509::X509Name;

/// A client certificate verifier that also requires the subject to be on
/// the allow list.
#[derive(Debug)]
pub(crate) struct AllowList {
    inner: Arc<dyn ClientCertVerifier>,
    allowed: Vec<String>,
}

impl AllowList {
    pub(crate) fn new(inner: Arc<dyn ClientCertVerifier>, allowed: Vec<String>) -> Self {
        AllowList { inner, allowed }
    }
}

impl ClientCertVerifier for AllowList {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        let subject = match subject_dn(end_entity) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("client certificate: cannot read its subject: {e}");
                return Err(Error::InvalidCertificate(CertificateError::BadEncoding));
            }
        };
        if self.allowed.contains(&subject) {
            tracing::debug!("client certificate {subject:?} is in --tls-authz");
            return Ok(verified);
        }
        tracing::warn!("client certificate {subject:?} is not in --tls-authz: refused");
        Err(Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Reads an allow-list file: one distinguished name per line; blank lines
/// and lines starting with `#` are skipped.
pub(crate) fn parse_list(text: &str) -> Vec<String> {
    text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_owned).collect()
}

/// The subject of a DER certificate as an RFC 4514 string. The certificate
/// is parsed by x509-parser (the peer controls these bytes: no hand-written
/// DER reader); only the printing of the name, in the form qemu and GnuTLS
/// use, is ours.
pub fn subject_dn(cert: &[u8]) -> Result<String, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert).map_err(|e| e.to_string())?;
    Ok(name_to_string(cert.subject()))
}

/// A Name in RFC 4514 form: RDNs last to first, joined by `,`; the
/// attributes of a multi-valued RDN joined by `+`.
fn name_to_string(name: &X509Name<'_>) -> String {
    let mut parts: Vec<String> = name
        .iter()
        .map(|rdn| {
            rdn.iter()
                .map(|atv| {
                    format!("{}={}", attribute_name(atv.attr_type()), attribute_value(atv.attr_value()))
                })
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect();
    parts.reverse();
    parts.join(",")
}

/// The short names GnuTLS (and so qemu) prints; others are dotted OIDs.
fn attribute_name(oid: &Oid<'_>) -> String {
    let known: &[(&[u8], &str)] = &[
        (&[0x55, 0x04, 0x03], "CN"),
        (&[0x55, 0x04, 0x06], "C"),
        (&[0x55, 0x04, 0x07], "L"),
        (&[0x55, 0x04, 0x08], "ST"),
        (&[0x55, 0x04, 0x09], "STREET"),
        (&[0x55, 0x04, 0x0a], "O"),
        (&[0x55, 0x04, 0x0b], "OU"),
        (&[0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x19], "DC"),
        (&[0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x01], "UID"),
        (&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x01], "EMAIL"),
    ];
    match known.iter().find(|(o, _)| *o == oid.as_bytes()) {
        Some((_, name)) => (*name).to_owned(),
        None => oid.to_id_string(),
    }
}

/// A string value escaped as RFC 4514 says; other types as `#` and the hex
/// of their DER encoding.
fn attribute_value(v: &Any<'_>) -> String {
    let text = match v.tag() {
        Tag::Utf8String | Tag::PrintableString | Tag::Ia5String | Tag::VisibleString => {
            std::str::from_utf8(v.data).ok().map(str::to_owned)
        }
        // TeletexString (in practice Latin-1)
        Tag::T61String => Some(v.data.iter().map(|&b| char::from(b)).collect()),
        // BMPString (UCS-2, big endian)
        Tag::BmpString if v.data.len().is_multiple_of(2) => {
            char::decode_utf16(v.data.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])))
                .collect::<Result<String, _>>()
                .ok()
        }
        _ => None,
    };
    let Some(text) = text else {
        let mut s = String::from("#");
        for b in v.to_der_vec().unwrap_or_default() {
            let _ = write!(s, "{b:02x}");
        }
        return s;
    };
    let mut out = String::with_capacity(text.len());
    let last = text.chars().count().saturating_sub(1);
    for (i, c) in text.chars().enumerate() {
        match c {
            ',' | '+' | '"' | '\\' | '<' | '>' | ';' => {
                out.push('\\');
                out.push(c);
            }
            '#' if i == 0 => out.push_str("\\#"),
            ' ' if i == 0 || i == last => out.push_str("\\ "),
            '\0' => out.push_str("\\00"),
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::FromDer;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    fn name(der_hex: &str) -> String {
        let der = hex(der_hex);
        let (rest, n) = X509Name::from_der(&der).unwrap();
        assert!(rest.is_empty());
        name_to_string(&n)
    }

    /// A Name SEQUENCE: O=ringbd tests, CN=client (in DER order).
    const NAME: &str = "3028 \
        3115 3013 0603 55040a 0c0c 72696e676264207465737473 \
        310f 300d 0603 550403 0c06 636c69656e74";

    #[test]
    fn names_are_printed_most_specific_first() {
        assert_eq!(name(NAME), "CN=client,O=ringbd tests");
    }

    #[test]
    fn the_subject_of_a_real_certificate() {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::OrganizationName, "Example, Inc.");
        dn.push(rcgen::DnType::CommonName, "backup-host");
        params.distinguished_name = dn;
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(subject_dn(cert.der()).unwrap(), "CN=backup-host,O=Example\\, Inc.");
    }

    #[test]
    fn special_characters_multi_valued_rdns_and_unknown_types() {
        // SET { CN="#", OU=x } ; SET { 1.2.3.4 = INTEGER 5 } ; SET { EMAIL=IA5 "a@b" }
        let n = "3036 3114 3008 0603 550403 0c01 23 3008 0603 55040b 1301 78 \
             310a 3008 0603 2a0304 020105 \
             3112 3010 0609 2a864886f70d010901 1603 614062";
        assert_eq!(name(n), "EMAIL=a@b,1.2.3.4=#020105,CN=\\#+OU=x");
        assert_eq!(name("3011 310f 300d 0603 550403 0c06 612c622b6320"), "CN=a\\,b\\+c\\ ");
    }

    #[test]
    fn broken_certificates_are_an_error_not_a_panic() {
        for bad in ["", "30", "3005 3003", "3084ffffffff", "1f00", "3080", "3103 0601"] {
            assert!(subject_dn(&hex(bad)).is_err(), "{bad}");
        }
        // Truncations of a real certificate never panic.
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x".to_owned()]).unwrap().self_signed(&key).unwrap();
        let der = cert.der().to_vec();
        assert!(subject_dn(&der).is_ok());
        for n in 0..der.len() {
            assert!(subject_dn(&der[..n]).is_err(), "a certificate cut at {n} bytes parsed");
        }
    }

    #[test]
    fn allow_list_files_skip_blanks_and_comments() {
        let l = parse_list("# who may connect\nCN=a,O=x\n\n  CN=b  \n#CN=c\n");
        assert_eq!(l, ["CN=a,O=x", "CN=b"]);
    }
}
