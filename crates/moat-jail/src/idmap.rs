//! User namespace ID maps, written by the runtime for its child.
use std::path::PathBuf;

use oci_spec::runtime::LinuxIdMapping;

#[derive(Debug, thiserror::Error)]
pub enum IdMapError {
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} failed for pid {pid}: {stderr}")]
    Helper {
        tool: &'static str,
        pid: i32,
        stderr: String,
    },
    #[error("cannot run {tool}")]
    Spawn {
        tool: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// The text of a `uid_map`/`gid_map` file.
pub fn format_map(maps: &[LinuxIdMapping]) -> String {
    let mut s = String::with_capacity(maps.len() * 24);
    for m in maps {
        s.push_str(&format!(
            "{} {} {}\n",
            m.container_id(),
            m.host_id(),
            m.size()
        ));
    }
    s
}

/// Whether an unprivileged runtime can write these maps itself (a single
/// range mapping only its own ID); otherwise it needs newuidmap/newgidmap.
pub fn is_self_map(maps: &[LinuxIdMapping], own: u32) -> bool {
    matches!(maps, [m] if m.size() == 1 && m.host_id() == own)
}

fn write(path: PathBuf, data: &str) -> Result<(), IdMapError> {
    std::fs::write(&path, data).map_err(|source| IdMapError::Write { path, source })
}

fn helper(tool: &'static str, pid: i32, maps: &[LinuxIdMapping]) -> Result<(), IdMapError> {
    let mut cmd = std::process::Command::new(tool);
    cmd.arg(pid.to_string());
    for m in maps {
        cmd.args([
            m.container_id().to_string(),
            m.host_id().to_string(),
            m.size().to_string(),
        ]);
    }
    let out = cmd
        .output()
        .map_err(|source| IdMapError::Spawn { tool, source })?;
    if !out.status.success() {
        return Err(IdMapError::Helper {
            tool,
            pid,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// Writes the maps of `pid`'s new user namespace. As root: directly. Rootless:
/// directly for a self-map (denying setgroups first, as the kernel requires),
/// else through newuidmap/newgidmap (the /etc/subuid ranges).
pub fn write_maps(
    pid: i32,
    uid: &[LinuxIdMapping],
    gid: &[LinuxIdMapping],
) -> Result<(), IdMapError> {
    let euid = rustix::process::geteuid().as_raw();
    let egid = rustix::process::getegid().as_raw();
    let proc = PathBuf::from(format!("/proc/{pid}"));
    if euid == 0 {
        write(proc.join("uid_map"), &format_map(uid))?;
        return write(proc.join("gid_map"), &format_map(gid));
    }
    if is_self_map(uid, euid) {
        write(proc.join("uid_map"), &format_map(uid))?;
    } else {
        helper("newuidmap", pid, uid)?;
    }
    if is_self_map(gid, egid) {
        write(proc.join("setgroups"), "deny")?;
        write(proc.join("gid_map"), &format_map(gid))
    } else {
        helper("newgidmap", pid, gid)
    }
}

/// Maps the calling process's own new user namespace (just unshared or
/// cloned, not mapped yet) onto the one user and group it had before,
/// `uid` and `gid` (read before the unshare), as `inside` (user, group)
/// there;
/// setgroups is denied first, as the kernel requires of an unprivileged
/// map, so the supplementary groups stay what they were. The one map an
/// unprivileged process may write for itself.
pub fn map_self(uid: u32, gid: u32, inside: (u32, u32)) -> Result<(), IdMapError> {
    let proc = PathBuf::from("/proc/self");
    write(proc.join("uid_map"), &format!("{} {uid} 1\n", inside.0))?;
    write(proc.join("setgroups"), "deny")?;
    write(proc.join("gid_map"), &format!("{} {gid} 1\n", inside.1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::LinuxIdMappingBuilder;

    fn m(c: u32, h: u32, s: u32) -> LinuxIdMapping {
        LinuxIdMappingBuilder::default()
            .container_id(c)
            .host_id(h)
            .size(s)
            .build()
            .unwrap()
    }

    #[test]
    fn formats_kernel_map_text() {
        assert_eq!(
            format_map(&[m(0, 100000, 65536), m(65536, 1000, 1)]),
            "0 100000 65536\n65536 1000 1\n"
        );
    }

    #[test]
    fn self_map_detection() {
        assert!(is_self_map(&[m(0, 1000, 1)], 1000));
        assert!(!is_self_map(&[m(0, 1000, 2)], 1000));
        assert!(!is_self_map(&[m(0, 1001, 1)], 1000));
        assert!(!is_self_map(&[m(0, 1000, 1), m(1, 100000, 10)], 1000));
    }
}
