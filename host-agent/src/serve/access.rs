//! Who may use the control socket, decided only from what the kernel
//! recorded about the peer when it connected: its uid and primary gid
//! (`SO_PEERCRED`) and its supplementary groups (`SO_PEERGROUPS`).
//!
//! No user or group database is asked. NSS (files, but also LDAP, sssd,
//! systemd-userdb) can block for as long as its backend likes, and the
//! control socket is served by one thread: one hanging lookup, which any
//! member of `control_group` could start at will, would stall every
//! control client, root's `rotate` included. The kernel's answer is also
//! the one the socket's file mode was checked against at `connect`: a
//! process reaches the 0660 socket exactly when it holds the group, and is
//! then admitted; a member removed from the group keeps reading `status`
//! until its processes end, as it keeps any other group-readable file.

use std::os::fd::{AsRawFd, BorrowedFd};

/// What a control-socket peer may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Full,
    ReadOnly,
    None,
}

/// The most supplementary groups a Linux process can hold
/// (`NGROUPS_MAX`); a longer answer is not believed.
const MAX_GROUPS: usize = 65536;

/// Groups asked for in the first `getsockopt`; a peer with more costs a
/// second call.
const FIRST_GUESS: usize = 32;

/// `SO_PEERGROUPS` (Linux 4.13): asm-generic's number, which x86, arm,
/// riscv, powerpc and mips share (sparc numbers it otherwise, and the
/// agent does not build there); the `libc` crate does not export it.
#[cfg(not(any(target_arch = "sparc", target_arch = "sparc64")))]
const SO_PEERGROUPS: libc::c_int = 59;

/// Everything for root and the agent's own uid, without looking at
/// groups; `status` only for a member of `control_group` by its primary
/// gid, or else by its supplementary groups, which `groups` reads (only
/// when needed); nothing for anyone else.
pub fn decide(
    uid: u32,
    gid: u32,
    me: u32,
    control_gid: Option<u32>,
    groups: impl FnOnce() -> std::io::Result<Vec<u32>>,
) -> std::io::Result<Access> {
    if uid == 0 || uid == me {
        return Ok(Access::Full);
    }
    let Some(group) = control_gid else {
        return Ok(Access::None);
    };
    if gid == group || groups()?.contains(&group) {
        Ok(Access::ReadOnly)
    } else {
        Ok(Access::None)
    }
}

/// The supplementary groups of a connected Unix socket's peer, as the
/// kernel recorded them at `connect` (in this process's user namespace).
/// A system call that never blocks.
pub fn peer_groups(socket: BorrowedFd<'_>) -> std::io::Result<Vec<u32>> {
    peer_groups_from(socket, FIRST_GUESS)
}

fn peer_groups_from(socket: BorrowedFd<'_>, first: usize) -> std::io::Result<Vec<u32>> {
    let mut groups: Vec<libc::gid_t> = vec![0; first];
    loop {
        let mut len = libc::socklen_t::try_from(std::mem::size_of_val(groups.as_slice()))
            .map_err(|_| std::io::Error::from_raw_os_error(libc::ERANGE))?;
        // SAFETY: getsockopt writes at most `len` bytes into the buffer we
        // own and pass with its length, and the answer's length into `len`.
        let r = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / std::mem::size_of::<libc::gid_t>();
        if r == 0 {
            groups.truncate(n);
            return Ok(groups);
        }
        let e = std::io::Error::last_os_error();
        // Too small: the kernel said how much it needs.
        if e.raw_os_error() != Some(libc::ERANGE) || n <= groups.len() || n > MAX_GROUPS {
            return Err(e);
        }
        groups.resize(n, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    fn never() -> std::io::Result<Vec<u32>> {
        panic!("the groups were read although the answer did not need them")
    }

    #[test]
    fn root_and_the_agents_own_uid_never_need_their_groups() {
        assert_eq!(decide(0, 0, 990, Some(7), never).unwrap(), Access::Full);
        assert_eq!(decide(990, 5, 990, Some(7), never).unwrap(), Access::Full);
        assert_eq!(decide(0, 0, 0, None, never).unwrap(), Access::Full);
    }

    #[test]
    fn membership_by_primary_or_supplementary_group() {
        assert_eq!(
            decide(1000, 7, 0, Some(7), never).unwrap(),
            Access::ReadOnly
        );
        assert_eq!(
            decide(1000, 100, 0, Some(7), || Ok(vec![3, 7])).unwrap(),
            Access::ReadOnly
        );
        assert_eq!(
            decide(1000, 100, 0, Some(7), || Ok(vec![3, 8])).unwrap(),
            Access::None
        );
        assert_eq!(decide(1000, 7, 0, None, never).unwrap(), Access::None);
        let unreadable = decide(1000, 100, 0, Some(7), || {
            Err(std::io::Error::from_raw_os_error(libc::ENOPROTOOPT))
        });
        assert!(unreadable.is_err());
    }

    #[test]
    fn a_peers_groups_are_its_own_supplementary_groups() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut mine: Vec<u32> = nix::unistd::getgroups()
            .unwrap()
            .iter()
            .map(|g| g.as_raw())
            .collect();
        mine.sort_unstable();
        // A buffer too small for any group takes the second call.
        for first in [FIRST_GUESS, 0] {
            let mut got = peer_groups_from(a.as_fd(), first).unwrap();
            got.sort_unstable();
            assert_eq!(got, mine, "first guess {first}");
        }
    }

    /// Another process with more groups than the first guess holds (made
    /// by `setpriv`, so this needs root); no group database is involved.
    #[test]
    fn a_peer_with_many_groups_costs_a_second_call_and_gets_them_all() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let want: Vec<u32> = (1000..1000 + 2 * FIRST_GUESS as u32 + 3).collect();
        let list: Vec<String> = want.iter().map(u32::to_string).collect();
        let mut child = std::process::Command::new("setpriv")
            .arg(format!("--groups={}", list.join(",")))
            .args(["socat", "-u", "OPEN:/dev/null"])
            .arg(format!("UNIX-CONNECT:{}", path.display()))
            .spawn()
            .unwrap();
        let (peer, _) = listener.accept().unwrap();
        let mut got = peer_groups(peer.as_fd()).unwrap();
        let _ = child.wait();
        got.sort_unstable();
        assert_eq!(got, want);
    }
}
