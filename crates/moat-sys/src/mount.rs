//! mount_setattr(2), which neither rustix nor nix wraps, and the user
//! namespace an idmapped mount needs.
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

use crate::process::{clone_fork, Forked};

/// What to change on a mount with [`mount_setattr`]: `MOUNT_ATTR_*` bits to
/// set and to clear, and a propagation type (`MS_SHARED`, `MS_SLAVE`,
/// `MS_PRIVATE`, `MS_UNBINDABLE`, or 0 to leave it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MountAttr {
    pub set: u64,
    pub clear: u64,
    pub propagation: u64,
}

impl MountAttr {
    /// True when applying it would change nothing.
    pub fn is_empty(&self) -> bool {
        self.set == 0 && self.clear == 0 && self.propagation == 0
    }
}

fn setattr_raw(fd: BorrowedFd<'_>, recursive: bool, attr: &libc::mount_attr) -> io::Result<()> {
    let mut flags = libc::AT_EMPTY_PATH as libc::c_uint;
    if recursive {
        flags |= libc::AT_RECURSIVE as libc::c_uint;
    }
    let empty = c"";
    // SAFETY: `fd` is a live descriptor for the duration of the call (it is
    // borrowed), the path is a valid NUL-terminated empty string used with
    // AT_EMPTY_PATH, and `attr` points to an initialised `mount_attr` whose
    // exact size is passed, so the kernel reads only that struct.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd.as_raw_fd(),
            empty.as_ptr(),
            flags,
            attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `mount_setattr(fd, "", AT_EMPTY_PATH [| AT_RECURSIVE], attr)`: changes the
/// mount whose root `fd` refers to (an `O_PATH` fd of a mount root, or a
/// detached tree from `open_tree`), and with `recursive` every mount below it.
pub fn mount_setattr(fd: BorrowedFd<'_>, recursive: bool, attr: &MountAttr) -> io::Result<()> {
    let raw = libc::mount_attr {
        attr_set: attr.set,
        attr_clr: attr.clear,
        propagation: attr.propagation,
        userns_fd: 0,
    };
    setattr_raw(fd, recursive, &raw)
}

/// Makes the detached mount tree `tree` (from `open_tree(OPEN_TREE_CLONE)`)
/// idmapped with the mappings of the user namespace `userns`
/// (`MOUNT_ATTR_IDMAP`), on its top mount or, with `recursive`, on all.
pub fn mount_set_idmap(
    tree: BorrowedFd<'_>,
    recursive: bool,
    userns: BorrowedFd<'_>,
) -> io::Result<()> {
    let userns_fd =
        u64::try_from(userns.as_raw_fd()).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    let raw = libc::mount_attr {
        attr_set: libc::MOUNT_ATTR_IDMAP,
        attr_clr: 0,
        propagation: 0,
        userns_fd,
    };
    setattr_raw(tree, recursive, &raw)
}

/// Creates a user namespace, child of the caller's, whose `uid_map` and
/// `gid_map` are the given texts (lines of "inside outside count"), and
/// returns an fd for it (`/proc/<pid>/ns/user`). A short-lived child process
/// holds the namespace while the maps are written and is reaped before return.
///
/// The caller needs the privileges to write those maps for a child namespace
/// (CAP_SETUID/CAP_SETGID over its own user namespace, and every outside ID
/// mapped there).
pub fn userns_with_mappings(uid_map: &str, gid_map: &str) -> io::Result<OwnedFd> {
    let (rd, wr) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    // SAFETY: the child only calls close, read and _exit, which are
    // async-signal-safe, so the fork contract holds even when the caller is
    // multi-threaded; it never returns into Rust code of the parent.
    match unsafe { clone_fork(libc::CLONE_NEWUSER) }? {
        Forked::Child => {
            let mut byte = 0u8;
            // SAFETY: closing our copy of the write end (so EOF arrives when the
            // parent closes its copy), reading into a valid one-byte buffer,
            // then leaving without running any destructor.
            unsafe {
                libc::close(wr.as_raw_fd());
                libc::read(rd.as_raw_fd(), (&mut byte as *mut u8).cast(), 1);
                libc::_exit(0)
            }
        }
        Forked::Parent(pid) => {
            drop(rd);
            let result = (|| {
                std::fs::write(format!("/proc/{pid}/uid_map"), uid_map)?;
                std::fs::write(format!("/proc/{pid}/gid_map"), gid_map)?;
                let path = format!("/proc/{pid}/ns/user");
                let fd = rustix::fs::open(
                    path.as_str(),
                    rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
                    rustix::fs::Mode::empty(),
                )?;
                Ok::<OwnedFd, io::Error>(fd)
            })();
            // Let the child exit, then reap it whatever happened above.
            drop(wr);
            let mut status = 0;
            loop {
                // SAFETY: waitpid on our own child with a valid out-pointer.
                let r = unsafe { libc::waitpid(pid, &mut status, 0) };
                if r == pid || io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                    break;
                }
            }
            result
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userns_fd_has_the_mappings() {
        if moat_core::testing::needs_root("userns_fd_has_the_mappings") {
            return;
        }
        let fd = userns_with_mappings("0 100000 65536\n", "0 100000 65536\n").unwrap();
        let st = rustix::fs::fstat(&fd).unwrap();
        let mine = rustix::fs::stat("/proc/self/ns/user").unwrap();
        assert_ne!(st.st_ino, mine.st_ino, "a new user namespace");
    }
}
