//! Writing `linux.sysctl` values under /proc/sys, only ever on procfs.
use std::io::Write;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags, ResolveFlags};

use super::RootfsError;

/// "net.ipv4.ip_forward" -> "net/ipv4/ip_forward". A key already written
/// with slashes is taken as is (its dots may belong to names, e.g. a VLAN
/// interface "eth0.1"). Empty, "." and ".." components are refused.
pub fn key_to_path(key: &str) -> Result<PathBuf, RootfsError> {
    let rel = if key.contains('/') {
        key.to_owned()
    } else {
        key.replace('.', "/")
    };
    let parts: Vec<&str> = rel.split('/').collect();
    if parts
        .iter()
        .any(|p| p.is_empty() || *p == "." || *p == "..")
    {
        return Err(RootfsError::InvalidSysctl {
            key: key.to_owned(),
        });
    }
    Ok(PathBuf::from(rel))
}

/// Fails unless `fd` is on procfs.
pub fn check_procfs(fd: impl std::os::fd::AsFd, path: &Path) -> Result<(), RootfsError> {
    let st = rustix::fs::fstatfs(fd).map_err(|e| RootfsError::Resolve {
        path: path.to_owned(),
        source: e.into(),
    })?;
    if st.f_type == rustix::fs::PROC_SUPER_MAGIC {
        Ok(())
    } else {
        Err(RootfsError::NotProcfs {
            path: path.to_owned(),
        })
    }
}

pub fn write(key: &str, value: &str) -> Result<(), RootfsError> {
    let rel = key_to_path(key)?;
    let full = Path::new("/proc/sys").join(&rel);
    let err = |e: rustix::io::Errno| RootfsError::Sysctl {
        key: key.to_owned(),
        source: e.into(),
    };
    let dir = rustix::fs::open(
        "/proc/sys",
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(err)?;
    check_procfs(&dir, Path::new("/proc/sys"))?;
    let resolve = ResolveFlags::BENEATH
        | ResolveFlags::NO_SYMLINKS
        | ResolveFlags::NO_MAGICLINKS
        | ResolveFlags::NO_XDEV;
    let flags = OFlags::WRONLY | OFlags::CLOEXEC | OFlags::NOCTTY;
    let fd = rustix::fs::openat2(&dir, &rel, flags, Mode::empty(), resolve).map_err(err)?;
    check_procfs(&fd, &full)?;
    std::fs::File::from(fd)
        .write_all(value.as_bytes())
        .map_err(|source| RootfsError::Sysctl {
            key: key.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        assert_eq!(
            key_to_path("net.ipv4.ip_forward").unwrap(),
            PathBuf::from("net/ipv4/ip_forward")
        );
        assert_eq!(
            key_to_path("net/ipv4/conf/eth0.1/forwarding").unwrap(),
            PathBuf::from("net/ipv4/conf/eth0.1/forwarding")
        );
        for bad in [
            "",
            "net..x",
            ".net",
            "net/../../etc",
            "/kernel/x",
            "kernel.",
        ] {
            assert!(key_to_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn refuses_to_escape_proc_sys() {
        // Even a well-formed but absent key fails cleanly, naming the key.
        let e = write("moat.no.such.key", "1").unwrap_err();
        assert!(e.to_string().contains("moat.no.such.key"));
    }
}
