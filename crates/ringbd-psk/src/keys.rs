//! The PSK file: psktool's `username:hexkey` lines, the format GnuTLS
//! (`gnutls_psk_set_server_credentials_file`), nbdkit `--tls-psk`, qemu's
//! `keys.psk` and libnbd's `tls-psk-file` read.
//!
//! ringbd is stricter than GnuTLS, which skips what it cannot use: every
//! line is `username:hexkey`, empty, or a comment starting with `#`; anything
//! else is an error naming the file and line.

use std::fmt;
use std::path::{Path, PathBuf};

/// OpenSSL's limit on a PSK identity (`PSK_MAX_IDENTITY_LEN`, 3.0).
pub const MAX_USERNAME: usize = 256;
/// OpenSSL's limit on a key (`PSK_MAX_PSK_LEN`, 3.0).
pub const MAX_KEY: usize = 512;

/// A PSK file that cannot be used: the file, the line (0 when the error is
/// about the whole file) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFileError {
    pub path: PathBuf,
    pub line: usize,
    pub what: String,
}

impl fmt::Display for KeyFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.path.display(), self.what)
        } else {
            write!(f, "{}:{}: {}", self.path.display(), self.line, self.what)
        }
    }
}

impl std::error::Error for KeyFileError {}

/// One user's key. The bytes are overwritten with zeroes when dropped.
pub struct Key(Vec<u8>);

impl Key {
    pub fn new(bytes: Vec<u8>) -> Self {
        Key(bytes)
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Key {
    fn drop(&mut self) {
        self.0.iter_mut().for_each(|b| *b = 0);
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({} bytes)", self.0.len())
    }
}

/// The usernames and keys of a PSK file, in file order.
#[derive(Debug)]
pub struct PskKeys {
    path: PathBuf,
    users: Vec<(String, Key)>,
}

impl PskKeys {
    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<Self, KeyFileError> {
        let text = std::fs::read(path).map_err(|e| KeyFileError {
            path: path.to_owned(),
            line: 0,
            what: e.to_string(),
        })?;
        Self::parse(path, &text)
    }

    /// Parses the contents of a PSK file; `path` is for the messages.
    pub fn parse(path: &Path, text: &[u8]) -> Result<Self, KeyFileError> {
        let err = |line: usize, what: String| KeyFileError { path: path.to_owned(), line, what };
        let mut users: Vec<(String, Key)> = Vec::new();
        let mut first_line = Vec::new();
        for (i, raw) in text.split(|&b| b == b'\n').enumerate() {
            let n = i + 1;
            let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
            if raw.is_empty() || raw.starts_with(b"#") {
                continue;
            }
            let line = std::str::from_utf8(raw).map_err(|_| err(n, "not UTF-8 text".into()))?;
            let Some((user, hex)) = line.split_once(':') else {
                return Err(err(n, "expected username:hexkey (no ':' in the line)".into()));
            };
            if user.is_empty() {
                return Err(err(n, "empty username".into()));
            }
            if user.len() > MAX_USERNAME {
                return Err(err(n, format!("username of {} bytes (at most {MAX_USERNAME})", user.len())));
            }
            if user.contains('\0') {
                return Err(err(n, "NUL byte in the username".into()));
            }
            let key = decode_hex(hex).map_err(|what| err(n, format!("key of {user:?}: {what}")))?;
            if key.bytes().len() > MAX_KEY {
                return Err(err(
                    n,
                    format!("key of {user:?}: {} bytes (at most {MAX_KEY})", key.bytes().len()),
                ));
            }
            if let Some(pos) = users.iter().position(|(u, _)| u == user) {
                return Err(err(n, format!("username {user:?} again (first on line {})", first_line[pos])));
            }
            users.push((user.to_owned(), key));
            first_line.push(n);
        }
        if users.is_empty() {
            return Err(err(0, "no username:hexkey line in it".into()));
        }
        Ok(PskKeys { path: path.to_owned(), users })
    }

    /// The file the keys came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The key of `username`, if the file has one.
    pub fn get(&self, username: &[u8]) -> Option<&Key> {
        self.users.iter().find(|(u, _)| u.as_bytes() == username).map(|(_, k)| k)
    }

    /// The usernames, in file order.
    pub fn usernames(&self) -> impl Iterator<Item = &str> {
        self.users.iter().map(|(u, _)| u.as_str())
    }
}

fn decode_hex(hex: &str) -> Result<Key, String> {
    if hex.is_empty() {
        return Err("empty key".into());
    }
    if let Some((col, c)) = hex.char_indices().find(|(_, c)| !c.is_ascii_hexdigit()) {
        return Err(format!("{c:?} at position {} is not a hex digit", col + 1));
    }
    if !hex.len().is_multiple_of(2) {
        return Err(format!("odd number of hex digits ({})", hex.len()));
    }
    let digit = |b: u8| (b as char).to_digit(16).unwrap_or(0) as u8;
    let bytes = hex.as_bytes().chunks_exact(2).map(|p| digit(p[0]) << 4 | digit(p[1])).collect();
    Ok(Key::new(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<PskKeys, KeyFileError> {
        PskKeys::parse(Path::new("keys.psk"), text.as_bytes())
    }

    fn error(text: &str) -> String {
        parse(text).map(|_| ()).unwrap_err().to_string()
    }

    #[test]
    fn psktool_lines_comments_blank_lines_and_crlf() {
        let keys = parse("# made by psktool\nalice:00ff10AB\r\n\nbob:c0ffee\n").unwrap();
        assert_eq!(keys.get(b"alice").unwrap().bytes(), [0x00, 0xff, 0x10, 0xab]);
        assert_eq!(keys.get(b"bob").unwrap().bytes(), [0xc0, 0xff, 0xee]);
        assert!(keys.get(b"carol").is_none());
        assert!(keys.get(b"alic").is_none());
        assert_eq!(keys.usernames().collect::<Vec<_>>(), ["alice", "bob"]);
    }

    #[test]
    fn a_key_may_contain_nothing_after_the_first_colon_but_hex() {
        // The username ends at the first ':'; a second one is in the key.
        assert_eq!(error("a:b:00\n"), "keys.psk:1: key of \"a\": ':' at position 2 is not a hex digit");
    }

    #[test]
    fn bad_lines_name_the_file_and_line() {
        assert_eq!(error("alice:0011\nbob\n"), "keys.psk:2: expected username:hexkey (no ':' in the line)");
        assert_eq!(error(":0011\n"), "keys.psk:1: empty username");
        assert_eq!(error("\n\nalice:\n"), "keys.psk:3: key of \"alice\": empty key");
        assert_eq!(error("alice:abc\n"), "keys.psk:1: key of \"alice\": odd number of hex digits (3)");
        assert_eq!(
            error("alice:00zz\n"),
            "keys.psk:1: key of \"alice\": 'z' at position 3 is not a hex digit"
        );
        assert_eq!(
            error("alice:00 11\n"),
            "keys.psk:1: key of \"alice\": ' ' at position 3 is not a hex digit"
        );
        assert_eq!(
            error("alice:0011 \n"),
            "keys.psk:1: key of \"alice\": ' ' at position 5 is not a hex digit"
        );
        assert_eq!(
            error("alice:00\nbob:11\nalice:22\n"),
            "keys.psk:3: username \"alice\" again (first on line 1)"
        );
        let long = format!("{}:00", "u".repeat(MAX_USERNAME + 1));
        assert_eq!(error(&long), "keys.psk:1: username of 257 bytes (at most 256)");
        let big = format!("alice:{}", "00".repeat(MAX_KEY + 1));
        assert_eq!(error(&big), "keys.psk:1: key of \"alice\": 513 bytes (at most 512)");
        assert_eq!(
            PskKeys::parse(Path::new("k"), b"al\xffce:00").map(|_| ()).unwrap_err().to_string(),
            "k:1: not UTF-8 text"
        );
    }

    #[test]
    fn a_file_without_keys_is_an_error() {
        assert_eq!(error(""), "keys.psk: no username:hexkey line in it");
        assert_eq!(error("# only a comment\n\n"), "keys.psk: no username:hexkey line in it");
    }

    #[test]
    fn a_missing_file_is_named() {
        let e = PskKeys::load(Path::new("/nonexistent/keys.psk")).unwrap_err().to_string();
        assert!(e.starts_with("/nonexistent/keys.psk: No such file"), "{e}");
    }
}
