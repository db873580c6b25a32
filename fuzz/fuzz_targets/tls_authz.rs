//! `--tls-authz`'s reading of a client certificate's subject
//! (`tls_authz::subject_dn`): the peer controls these bytes, which go
//! through x509-parser and our RFC 4514 printing. Any input either gives a
//! subject or an error with a reason; a subject never holds a raw control
//! character from the certificate unescaped (it is compared and logged).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|der: &[u8]| {
    match ringbd_server::tls::authz::subject_dn(der) {
        Ok(s) => assert!(!s.contains('\0'), "a NUL in the subject {s:?}"),
        Err(e) => assert!(!e.is_empty(), "an error without a reason"),
    }
});
