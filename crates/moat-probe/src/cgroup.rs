//! Cgroup limits seen from inside (v1 and v2), and whether the cgroup
//! filesystem can be used to escape (release_agent, devices.allow, new
//! cgroups).
use std::path::{Path, PathBuf};

use super::{check, errno_name, open_write_close, read_trim, Check, Outcome};

const LIMITS: &str =
    "resource limits always set: memory, CPU, pids (PRODUCT; CIS 5.11, 5.12, 5.29)";
const CGFS: &str = "cgroup filesystem read-only inside (CVE-2022-0492 release_agent; CIS 5.25)";

/// One `/proc/self/cgroup` line: controllers (empty for v2) and path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgLine {
    pub controllers: Vec<String>,
    pub path: String,
}

pub fn parse_proc_cgroup(text: &str) -> Vec<CgLine> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            let _id = it.next()?;
            let ctrl = it.next()?;
            let path = it.next()?;
            Some(CgLine {
                controllers: ctrl
                    .split(',')
                    .filter(|c| !c.is_empty())
                    .map(str::to_string)
                    .collect(),
                path: path.to_string(),
            })
        })
        .collect()
}

/// Directories where `file` of this process's cgroup may be: under the v2
/// hierarchy or the v1 hierarchy of `controller`, at the cgroup's path and at
/// the root (a container that mounts its own cgroup sees it there).
fn candidates(lines: &[CgLine], controller: &str, file: &str) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for l in lines {
        let rel = l.path.trim_start_matches('/');
        if l.controllers.is_empty() {
            v.push(Path::new("/sys/fs/cgroup").join(rel).join(file));
            v.push(Path::new("/sys/fs/cgroup").join(file));
        } else if l.controllers.iter().any(|c| c == controller) {
            for dir in [l.controllers.join(","), controller.to_string()] {
                v.push(Path::new("/sys/fs/cgroup").join(&dir).join(rel).join(file));
                v.push(Path::new("/sys/fs/cgroup").join(&dir).join(file));
            }
        }
    }
    v
}

fn first_value(lines: &[CgLine], controller: &str, files: &[&str]) -> Option<(PathBuf, String)> {
    files
        .iter()
        .flat_map(|f| candidates(lines, controller, f))
        .find_map(|p| read_trim(&p.to_string_lossy()).map(|v| (p, v)))
}

fn mem_total() -> Option<u64> {
    let m = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = m
        .lines()
        .find(|l| l.starts_with("MemTotal:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Whether a memory limit value limits anything on this machine.
pub fn memory_limited(value: &str, mem_total: Option<u64>) -> bool {
    match value.parse::<u64>() {
        Ok(v) => v < (1 << 62) && mem_total.is_none_or(|t| v < t),
        Err(_) => false, // "max"
    }
}

/// Whether a cpu.max ("QUOTA PERIOD") or cfs_quota_us value sets a quota.
pub fn cpu_limited(value: &str) -> bool {
    let q = value.split_whitespace().next().unwrap_or("max");
    q != "max" && q != "-1" && q.parse::<i64>().is_ok_and(|v| v > 0)
}

pub fn checks() -> Vec<Check> {
    let lines =
        parse_proc_cgroup(&std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default());
    let mut out = Vec::new();
    out.push(
        match first_value(&lines, "memory", &["memory.max", "memory.limit_in_bytes"]) {
            Some((p, v)) if memory_limited(&v, mem_total()) => check(
                "cgroup.memory-limit",
                Outcome::Blocked,
                format!("{v} bytes ({})", p.display()),
                LIMITS,
            ),
            Some((p, v)) => check(
                "cgroup.memory-limit",
                Outcome::Allowed,
                format!("unlimited: {v} ({})", p.display()),
                LIMITS,
            ),
            None => check(
                "cgroup.memory-limit",
                Outcome::NotApplicable,
                "no memory controller file visible",
                LIMITS,
            ),
        },
    );
    out.push(match first_value(&lines, "pids", &["pids.max"]) {
        Some((p, v)) if v != "max" => check(
            "cgroup.pids-limit",
            Outcome::Blocked,
            format!("{v} ({})", p.display()),
            LIMITS,
        ),
        Some((p, v)) => check(
            "cgroup.pids-limit",
            Outcome::Allowed,
            format!("unlimited: {v} ({})", p.display()),
            LIMITS,
        ),
        None => check(
            "cgroup.pids-limit",
            Outcome::NotApplicable,
            "no pids controller file visible",
            LIMITS,
        ),
    });
    out.push(
        match first_value(&lines, "cpu", &["cpu.max", "cpu.cfs_quota_us"]) {
            Some((p, v)) if cpu_limited(&v) => check(
                "cgroup.cpu-limit",
                Outcome::Blocked,
                format!("quota {v} ({})", p.display()),
                LIMITS,
            ),
            Some((p, v)) => check(
                "cgroup.cpu-limit",
                Outcome::Allowed,
                format!("no quota: {v} ({})", p.display()),
                LIMITS,
            ),
            None => check(
                "cgroup.cpu-limit",
                Outcome::NotApplicable,
                "no cpu controller file visible",
                LIMITS,
            ),
        },
    );
    out.push(match rustix::fs::statvfs("/sys/fs/cgroup") {
        Ok(s) if s.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY) => check(
            "cgroup.fs-readonly",
            Outcome::Blocked,
            "/sys/fs/cgroup is read-only",
            CGFS,
        ),
        Ok(_) => check(
            "cgroup.fs-readonly",
            Outcome::Allowed,
            "/sys/fs/cgroup is writable",
            CGFS,
        ),
        Err(e) => check(
            "cgroup.fs-readonly",
            Outcome::Blocked,
            format!(
                "/sys/fs/cgroup not reachable: {}",
                errno_name(e.raw_os_error())
            ),
            CGFS,
        ),
    });
    out.push(release_agent());
    out.push(devices_allow(&lines));
    out.push(mkdir(&lines));
    out
}

fn release_agent() -> Check {
    let mut seen = Vec::new();
    for e in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        let p = e.path().join("release_agent");
        if p.exists() {
            if open_write_close(&p.to_string_lossy()).is_ok() {
                return check(
                    "escape.release-agent",
                    Outcome::Allowed,
                    format!("{} opens for writing (closed unwritten)", p.display()),
                    CGFS,
                );
            }
            seen.push(p.display().to_string());
        }
    }
    let d = if seen.is_empty() {
        "no release_agent visible".to_string()
    } else {
        format!("not writable: {}", seen.join(", "))
    };
    check("escape.release-agent", Outcome::Blocked, d, CGFS)
}

fn devices_allow(lines: &[CgLine]) -> Check {
    let cands = candidates(lines, "devices", "devices.allow");
    for p in &cands {
        if p.exists() {
            return match open_write_close(&p.to_string_lossy()) {
                Ok(()) => check(
                    "escape.devices-allow",
                    Outcome::Allowed,
                    format!("{} opens for writing (closed unwritten)", p.display()),
                    CGFS,
                ),
                Err(e) => check(
                    "escape.devices-allow",
                    Outcome::Blocked,
                    format!(
                        "{}: {}",
                        p.display(),
                        errno_name(e.raw_os_error().unwrap_or(0))
                    ),
                    CGFS,
                ),
            };
        }
    }
    check(
        "escape.devices-allow",
        Outcome::Blocked,
        "no devices.allow visible (cgroup v2 or not mounted)",
        CGFS,
    )
}

fn mkdir(lines: &[CgLine]) -> Check {
    let dirs: Vec<PathBuf> = candidates(lines, "pids", "")
        .into_iter()
        .chain(candidates(lines, "memory", ""))
        .filter(|p| p.is_dir())
        .collect();
    let Some(dir) = dirs.first() else {
        return check(
            "escape.cgroup-mkdir",
            Outcome::Blocked,
            "no cgroup directory visible",
            CGFS,
        );
    };
    let child = dir.join(format!("moat-probe-{}", std::process::id()));
    match std::fs::create_dir(&child) {
        Ok(()) => {
            let removed = std::fs::remove_dir(&child);
            let note = if removed.is_ok() {
                "removed"
            } else {
                "COULD NOT REMOVE"
            };
            check(
                "escape.cgroup-mkdir",
                Outcome::Allowed,
                format!("created a child cgroup {} ({note})", child.display()),
                CGFS,
            )
        }
        Err(e) => check(
            "escape.cgroup-mkdir",
            Outcome::Blocked,
            format!(
                "{}: {}",
                dir.display(),
                errno_name(e.raw_os_error().unwrap_or(0))
            ),
            CGFS,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_v1_and_v2() {
        let l = parse_proc_cgroup("12:cpu,cpuacct:/moat/abc\n0::/user.slice\n");
        assert_eq!(l[0].controllers, vec!["cpu", "cpuacct"]);
        assert_eq!(l[1].controllers, Vec::<String>::new());
        let c = candidates(&l, "cpu", "cpu.max");
        assert!(c.contains(&PathBuf::from(
            "/sys/fs/cgroup/cpu,cpuacct/moat/abc/cpu.max"
        )));
        assert!(c.contains(&PathBuf::from("/sys/fs/cgroup/user.slice/cpu.max")));
    }

    #[test]
    fn limits() {
        assert!(!memory_limited("max", None));
        assert!(!memory_limited("9223372036854771712", Some(1 << 34)));
        assert!(memory_limited("104857600", Some(1 << 34)));
        assert!(!memory_limited("104857600", Some(1 << 20)));
        assert!(cpu_limited("50000 100000"));
        assert!(!cpu_limited("max 100000"));
        assert!(!cpu_limited("-1"));
    }
}
