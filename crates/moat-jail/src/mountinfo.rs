//! /proc/self/mountinfo helpers shared by the cgroup and rootfs modules.

use std::path::{Path, PathBuf};

/// Mount points of this mount namespace at or below `dir` (which must be
/// absolute and free of symlinks, as mountinfo shows paths).
pub fn mounts_under(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape(p)))
        .filter(|p| p.starts_with(dir))
        .collect())
}

/// Detaches (lazily, not following symlinks) every mount at or below `dir`,
/// deepest first, going on past failures; returns how many were detached,
/// or the first failure.
pub fn detach_under(dir: &Path) -> std::io::Result<usize> {
    let mut points = mounts_under(dir)?;
    // Deepest first; a path mounted over several times appears once per
    // mount and is detached as often.
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    let mut first = Ok(());
    let mut n = 0;
    for p in points {
        use rustix::mount::{unmount, UnmountFlags};
        match unmount(&p, UnmountFlags::DETACH | UnmountFlags::NOFOLLOW) {
            Ok(()) => n += 1,
            Err(e) => {
                if first.is_ok() {
                    first = Err(std::io::Error::from(e));
                }
            }
        }
    }
    first.map(|()| n)
}

/// Undoes mountinfo's octal escapes (`\040` for space and so on).
pub(crate) fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            if let Ok(c) = u8::try_from(v) {
                out.push(c);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn octal_escapes() {
        assert_eq!(unescape("a\\040b\\134c"), "a b\\c");
        assert_eq!(unescape("trailing\\04"), "trailing\\04");
        assert_eq!(unescape("big\\777"), "big\\777");
    }
}
