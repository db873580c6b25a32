//! `--tls-authz`: only clients whose certificate subject is on an allow
//! list, like qemu's `authz-simple` object. The identity is the subject
//! distinguished name as an RFC 4514 string, the way qemu (GnuTLS) prints
//! it: most specific attribute first, e.g. `CN=backup-host,O=Example`.
//!
//! The check runs inside the TLS handshake, after the usual verification
//! against the CA (it wraps rustls' verifier): a client that is not listed
//! gets an `access_denied` alert and never reaches option haggling.
//!
//! The subject is read with a small DER reader (certificate, TBS
//! certificate, subject `Name`); nothing else of the certificate is parsed.

use std::fmt::Write as _;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};

use crate::log;

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
                log::warn(format_args!("client certificate: cannot read its subject: {e}"));
                return Err(Error::InvalidCertificate(CertificateError::BadEncoding));
            }
        };
        if self.allowed.contains(&subject) {
            log::debug(format_args!("client certificate {subject:?} is in --tls-authz"));
            return Ok(verified);
        }
        log::warn(format_args!("client certificate {subject:?} is not in --tls-authz: refused"));
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

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
const VERSION: u8 = 0xa0;

/// One DER element: tag, contents, and the whole encoding.
struct Tlv<'a> {
    tag: u8,
    body: &'a [u8],
    raw: &'a [u8],
}

/// A cursor over DER elements; every read is bounds-checked.
struct Der<'a>(&'a [u8]);

impl<'a> Der<'a> {
    fn next(&mut self) -> Result<Tlv<'a>, &'static str> {
        let d = self.0;
        let (&tag, rest) = d.split_first().ok_or("truncated DER")?;
        if tag & 0x1f == 0x1f {
            return Err("DER tag in the long form");
        }
        let (&first, mut rest) = rest.split_first().ok_or("truncated DER length")?;
        let len = match first {
            0..=0x7f => usize::from(first),
            0x81..=0x84 => {
                let n = usize::from(first & 0x7f);
                if rest.len() < n {
                    return Err("truncated DER length");
                }
                let len = rest[..n].iter().fold(0usize, |a, &b| (a << 8) | usize::from(b));
                rest = &rest[n..];
                len
            }
            _ => return Err("unsupported DER length"),
        };
        if rest.len() < len {
            return Err("DER element runs past its container");
        }
        let header = d.len() - rest.len();
        self.0 = &rest[len..];
        Ok(Tlv { tag, body: &rest[..len], raw: &d[..header + len] })
    }

    fn expect(&mut self, tag: u8, what: &'static str) -> Result<Tlv<'a>, &'static str> {
        let t = self.next()?;
        if t.tag != tag {
            return Err(what);
        }
        Ok(t)
    }
}

/// The subject of a DER certificate as an RFC 4514 string.
pub fn subject_dn(cert: &[u8]) -> Result<String, &'static str> {
    let cert = Der(cert).expect(SEQUENCE, "certificate is not a SEQUENCE")?;
    let mut tbs = Der(Der(cert.body).expect(SEQUENCE, "TBS certificate is not a SEQUENCE")?.body);
    if tbs.next()?.tag == VERSION {
        tbs.next()?; // the serial number follows the version
    }
    tbs.expect(SEQUENCE, "signature algorithm is not a SEQUENCE")?;
    tbs.expect(SEQUENCE, "issuer is not a SEQUENCE")?;
    tbs.expect(SEQUENCE, "validity is not a SEQUENCE")?;
    let subject = tbs.expect(SEQUENCE, "subject is not a SEQUENCE")?;
    name_to_string(subject.body)
}

/// An RDNSequence's contents in RFC 4514 form: RDNs last to first, joined
/// by `,`; the attributes of a multi-valued RDN joined by `+`.
fn name_to_string(rdns: &[u8]) -> Result<String, &'static str> {
    let mut parts = Vec::new();
    let mut seq = Der(rdns);
    while !seq.0.is_empty() {
        let rdn = seq.expect(SET, "RDN is not a SET")?;
        let mut atvs = Der(rdn.body);
        let mut one = Vec::new();
        while !atvs.0.is_empty() {
            let atv = atvs.expect(SEQUENCE, "attribute is not a SEQUENCE")?;
            let mut a = Der(atv.body);
            let oid = a.expect(OID, "attribute type is not an OID")?;
            let value = a.next()?;
            one.push(format!("{}={}", attribute_name(oid.body)?, attribute_value(&value)));
        }
        parts.push(one.join("+"));
    }
    parts.reverse();
    Ok(parts.join(","))
}

/// The short names GnuTLS (and so qemu) prints; others are dotted OIDs.
fn attribute_name(oid: &[u8]) -> Result<String, &'static str> {
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
    if let Some((_, name)) = known.iter().find(|(o, _)| *o == oid) {
        return Ok((*name).to_owned());
    }
    dotted(oid)
}

fn dotted(oid: &[u8]) -> Result<String, &'static str> {
    let mut arcs: Vec<u64> = Vec::new();
    let mut v: u64 = 0;
    for (i, &b) in oid.iter().enumerate() {
        if v > u64::MAX >> 8 {
            return Err("OID arc too large");
        }
        v = (v << 7) | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            arcs.push(v);
            v = 0;
        } else if i + 1 == oid.len() {
            return Err("truncated OID");
        }
    }
    let Some(&first) = arcs.first() else { return Err("empty OID") };
    let (a, b) = if first < 80 { (first / 40, first % 40) } else { (2, first - 80) };
    let mut s = format!("{a}.{b}");
    for arc in &arcs[1..] {
        let _ = write!(s, ".{arc}");
    }
    Ok(s)
}

/// A string value escaped as RFC 4514 says; other types as `#` and the hex
/// of their DER encoding.
fn attribute_value(v: &Tlv<'_>) -> String {
    let text = match v.tag {
        // UTF8String, PrintableString, IA5String, VisibleString
        0x0c | 0x13 | 0x16 | 0x1a => std::str::from_utf8(v.body).ok().map(str::to_owned),
        // TeletexString (in practice Latin-1)
        0x14 => Some(v.body.iter().map(|&b| char::from(b)).collect()),
        // BMPString (UCS-2, big endian)
        0x1e if v.body.len().is_multiple_of(2) => {
            char::decode_utf16(v.body.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])))
                .collect::<Result<String, _>>()
                .ok()
        }
        _ => None,
    };
    let Some(text) = text else {
        let mut s = String::from("#");
        for b in v.raw {
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

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    /// A Name SEQUENCE: O=ringbd tests, CN=client (in DER order).
    const NAME: &str = "3028 \
        3115 3013 0603 55040a 0c0c 72696e676264207465737473 \
        310f 300d 0603 550403 0c06 636c69656e74";

    #[test]
    fn names_are_printed_most_specific_first() {
        let name = hex(NAME);
        let Tlv { body, .. } = Der(&name).next().unwrap();
        assert_eq!(name_to_string(body).unwrap(), "CN=client,O=ringbd tests");
    }

    #[test]
    fn a_certificate_subject_is_found_after_the_issuer() {
        // Certificate { TBS { [0] v3, serial 1, alg, issuer CN=ca, validity, subject, ... } }
        let issuer = "300d 310b 3009 0603 550403 0c02 6361";
        let tbs_body = format!("a003 020102 020101 3005 0603 2a0304 {issuer} 3000 {NAME} 3000");
        let tbs_len = hex(&tbs_body).len();
        let cert_body = format!("30{tbs_len:02x} {tbs_body}");
        let cert = format!("30{:02x} {cert_body}", hex(&cert_body).len());
        assert_eq!(subject_dn(&hex(&cert)).unwrap(), "CN=client,O=ringbd tests");
        // Without the optional version field too.
        let tbs_body = format!("020101 3005 0603 2a0304 {issuer} 3000 {NAME}");
        let cert_body = format!("30{:02x} {tbs_body}", hex(&tbs_body).len());
        let cert = format!("30{:02x} {cert_body}", hex(&cert_body).len());
        assert_eq!(subject_dn(&hex(&cert)).unwrap(), "CN=client,O=ringbd tests");
    }

    #[test]
    fn special_characters_multi_valued_rdns_and_unknown_types() {
        // SET { CN="#a,b+c ", OU=x } ; SET { 1.2.3.4 = INTEGER 5 } ; SET { EMAIL=IA5 "a@b" }
        let name = hex("3114 3008 0603 550403 0c01 23 3008 0603 55040b 1301 78 \
             310a 3008 0603 2a0304 020105 \
             3112 3010 0609 2a864886f70d010901 1603 614062");
        assert_eq!(name_to_string(&name).unwrap(), "EMAIL=a@b,1.2.3.4=#020105,CN=\\#+OU=x");
        let name = hex("310f 300d 0603 550403 0c06 612c622b6320");
        assert_eq!(name_to_string(&name).unwrap(), "CN=a\\,b\\+c\\ ");
    }

    #[test]
    fn broken_der_is_an_error_not_a_panic() {
        for bad in ["", "30", "3005 3003", "3084ffffffff", "1f00", "3080", "3103 0601"] {
            let b = hex(bad);
            assert!(subject_dn(&b).is_err(), "{bad}");
            if !b.is_empty() {
                let _ = name_to_string(&b);
            }
        }
        assert!(dotted(&[0x81]).is_err());
        assert!(dotted(&[]).is_err());
        assert_eq!(dotted(&[0x2a, 0x86, 0x48]).unwrap(), "1.2.840");
        // Truncations of a real name never panic.
        let name = hex(NAME);
        for n in 0..name.len() {
            let _ = name_to_string(&name[2..n.max(2)]);
        }
    }

    #[test]
    fn allow_list_files_skip_blanks_and_comments() {
        let l = parse_list("# who may connect\nCN=a,O=x\n\n  CN=b  \n#CN=c\n");
        assert_eq!(l, ["CN=a,O=x", "CN=b"]);
    }
}
