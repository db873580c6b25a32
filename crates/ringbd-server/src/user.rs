//! Users, groups and privileges: name lookups (`getpwnam_r`,
//! `getgrnam_r`), dropping root after the sockets are bound and the exports
//! opened, and the umask around binding a Unix socket.

use std::ffi::CString;
use std::io;

/// Turns a `-1` return into the thread's `errno`.
fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A user's id and primary group, from the password database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserIds {
    pub uid: u32,
    pub gid: u32,
}

/// Looks up a user by name, or takes a number as a uid (its primary group
/// then comes from the database when it has an entry, else the same number).
pub fn lookup_user(name: &str) -> io::Result<UserIds> {
    let by_name = passwd_entry(name)?;
    match (by_name, name.parse::<u32>()) {
        (Some(ids), _) => Ok(ids),
        (None, Ok(uid)) => Ok(passwd_by_uid(uid)?.unwrap_or(UserIds { uid, gid: uid })),
        (None, Err(_)) => Err(io::Error::new(io::ErrorKind::NotFound, format!("no user named {name:?}"))),
    }
}

/// Looks up a group by name, or takes a number as a gid.
pub fn lookup_group(name: &str) -> io::Result<u32> {
    let cname = c_name(name)?;
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: group is plain old data; all-zero is a valid value.
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call: the name is a
        // NUL-terminated string, grp and result are locals, and buf has
        // buf.len() writable bytes that the entry's strings point into.
        let rc = unsafe {
            libc::getgrnam_r(cname.as_ptr(), &mut grp, buf.as_mut_ptr().cast(), buf.len(), &mut result)
        };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        if !result.is_null() {
            return Ok(grp.gr_gid);
        }
        return name
            .parse::<u32>()
            .map_err(|_| io::Error::new(io::ErrorKind::NotFound, format!("no group named {name:?}")));
    }
}

fn c_name(name: &str) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a name with a NUL byte"))
}

fn passwd_entry(name: &str) -> io::Result<Option<UserIds>> {
    let cname = c_name(name)?;
    passwd_query(|pw, buf, result| {
        // SAFETY: as in passwd_query: valid name, entry, buffer and result.
        unsafe { libc::getpwnam_r(cname.as_ptr(), pw, buf.as_mut_ptr().cast(), buf.len(), result) }
    })
}

fn passwd_by_uid(uid: u32) -> io::Result<Option<UserIds>> {
    passwd_query(|pw, buf, result| {
        // SAFETY: as in passwd_query: valid entry, buffer and result.
        unsafe { libc::getpwuid_r(uid, pw, buf.as_mut_ptr().cast(), buf.len(), result) }
    })
}

/// Runs a `getpw*_r` call with a growing buffer.
fn passwd_query(
    mut call: impl FnMut(&mut libc::passwd, &mut [u8], &mut *mut libc::passwd) -> libc::c_int,
) -> io::Result<Option<UserIds>> {
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: passwd is plain old data; all-zero is a valid value.
        let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = call(&mut pw, &mut buf, &mut result);
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        return Ok((!result.is_null()).then_some(UserIds { uid: pw.pw_uid, gid: pw.pw_gid }));
    }
}

/// Becomes `uid`/`gid` for good: supplementary groups set to `gid` alone,
/// then the group, then the user (in that order: after `setuid` the others
/// are no longer allowed). Checks afterwards that the real and effective
/// ids are the new ones and that root cannot be regained. glibc applies
/// each call to every thread of the process.
pub fn drop_privileges(uid: u32, gid: u32) -> io::Result<()> {
    let ctx = |what: &str, e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"));
    let groups = [gid];
    // SAFETY: the pointer and length describe `groups`, a live array.
    cvt(unsafe { libc::setgroups(groups.len(), groups.as_ptr()) })
        .map_err(|e| ctx(&format!("setgroups([{gid}])"), e))?;
    // SAFETY: plain syscalls with integer arguments.
    cvt(unsafe { libc::setgid(gid) }).map_err(|e| ctx(&format!("setgid({gid})"), e))?;
    // SAFETY: as above.
    cvt(unsafe { libc::setuid(uid) }).map_err(|e| ctx(&format!("setuid({uid})"), e))?;
    let now = current_ids();
    if (now.uid, now.euid, now.gid, now.egid) != (uid, uid, gid, gid) {
        return Err(io::Error::other(format!(
            "after setuid({uid})/setgid({gid}) the process runs as uid {}/{} gid {}/{}",
            now.uid, now.euid, now.gid, now.egid
        )));
    }
    // SAFETY: as above; expected to fail with EPERM.
    if uid != 0 && unsafe { libc::setuid(0) } == 0 {
        return Err(io::Error::other("root could be regained after dropping privileges"));
    }
    Ok(())
}

/// The process's real and effective user and group ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CurrentIds {
    pub uid: u32,
    pub euid: u32,
    pub gid: u32,
    pub egid: u32,
}

pub fn current_ids() -> CurrentIds {
    // SAFETY: these calls cannot fail and touch no memory.
    unsafe {
        CurrentIds { uid: libc::getuid(), euid: libc::geteuid(), gid: libc::getgid(), egid: libc::getegid() }
    }
}

/// Runs `f` with the process umask set to `mask`, then restores it (for
/// creating a Unix socket with exact permissions: `bind` applies the
/// umask, and a `chmod` after it would leave a window).
pub fn with_umask<T>(mask: u32, f: impl FnOnce() -> T) -> T {
    // SAFETY: umask only swaps the process's mask; it cannot fail.
    let old = unsafe { libc::umask(mask as libc::mode_t) };
    let r = f();
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_numbers_resolve() {
        assert_eq!(lookup_user("root").unwrap(), UserIds { uid: 0, gid: 0 });
        assert_eq!(lookup_user("0").unwrap().uid, 0);
        assert_eq!(lookup_user("4242").unwrap(), UserIds { uid: 4242, gid: 4242 });
        assert_eq!(lookup_group("0").unwrap(), 0);
        assert_eq!(lookup_group("root").unwrap(), 0);
    }

    #[test]
    fn unknown_names_are_errors() {
        let e = lookup_user("no-such-user-ringbd").unwrap_err();
        assert!(e.to_string().contains("no user named"), "{e}");
        let e = lookup_group("no-such-group-ringbd").unwrap_err();
        assert!(e.to_string().contains("no group named"), "{e}");
        assert!(lookup_user("a\0b").is_err());
    }
}
