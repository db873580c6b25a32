//! NBD URI parsing (`NbdUri::from_str` in crates/ringbd-client/src/uri.rs;
//! the syntax is docs/client.md's, after the NBD project's doc/uri.md): any
//! string either parses or is refused with a reason; a parsed URI prints as
//! a URI that parses back to the same address and export.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringbd_client::NbdUri;

fuzz_target!(|s: &str| {
    match s.parse::<NbdUri>() {
        Ok(u) => {
            let again: NbdUri = u.to_string().parse().expect("a printed URI parses");
            assert_eq!(again, u, "round trip of {s:?} via {u}");
        }
        Err(e) => assert!(!e.reason.is_empty(), "an error without a reason for {s:?}"),
    }
});
