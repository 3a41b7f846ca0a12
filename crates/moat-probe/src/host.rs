//! What the workload learns of the machine it runs on: the kernel's release
//! and version, the CPU model and count, the memory size, the boot ID, and
//! host paths in the mount table. Informational (`n/a`): the probe cannot
//! tell the host's values from a sandbox's by itself; a test that knows the
//! host's compares (the sandbox tier shows its own, see docs/sandbox.md).
//! Host paths are an exposure: `allowed` when the mount table has some.
use super::{check, read_trim, Check, Outcome};

const IDENTITY: &str =
    "the workload sees its sandbox, not the host's kernel, hardware or paths (issue: sandbox tier)";

pub fn checks() -> Vec<Check> {
    let mut out = Vec::new();
    let u = rustix::system::uname();
    out.push(check(
        "host.kernel",
        Outcome::NotApplicable,
        format!(
            "uname: {} {}",
            u.release().to_string_lossy(),
            u.version().to_string_lossy()
        ),
        IDENTITY,
    ));
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.trim() == "model name"))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "no model name".into());
    let count = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let affinity = rustix::thread::sched_getaffinity(None)
        .map(|s| s.count())
        .unwrap_or(0);
    out.push(check(
        "host.cpu",
        Outcome::NotApplicable,
        format!("{model}; {count} in cpuinfo, {affinity} in the affinity mask"),
        IDENTITY,
    ));
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| "unreadable".into());
    let si = rustix::system::sysinfo();
    out.push(check(
        "host.memory",
        Outcome::NotApplicable,
        format!(
            "meminfo MemTotal {total}; sysinfo {} bytes",
            u64::from(si.mem_unit) * si.totalram
        ),
        IDENTITY,
    ));
    out.push(check(
        "host.boot_id",
        Outcome::NotApplicable,
        read_trim("/proc/sys/kernel/random/boot_id").unwrap_or_else(|| "unreadable".into()),
        IDENTITY,
    ));
    let paths = host_paths(&std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default());
    out.push(if paths.is_empty() {
        check(
            "host.paths",
            Outcome::Blocked,
            "no host path in /proc/self/mountinfo",
            IDENTITY,
        )
    } else {
        check(
            "host.paths",
            Outcome::Allowed,
            format!("mountinfo names host paths: {}", paths.join(", ")),
            IDENTITY,
        )
    });
    out
}

/// Host paths a mount table shows: where a mount came from within its
/// filesystem (not `/`), and option values that are paths.
pub fn host_paths(mountinfo: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if let Some(root) = left.split(' ').nth(3).filter(|r| *r != "/") {
            out.push(root.to_string());
        }
        let opts = right.split(' ').nth(2).unwrap_or("");
        for o in opts.split(',') {
            if let Some((_, v)) = o.split_once('=').filter(|(_, v)| v.starts_with('/')) {
                out.push(v.to_string());
            }
        }
    }
    out.sort();
    out.dedup();
    out.truncate(8);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_host_paths() {
        let mi = "22 1 0:21 / / ro - overlay overlay rw,lowerdir=/var/lib/x\n\
                  23 22 253:1 /home/a /data ro - ext4 /dev/vda1 rw\n\
                  24 22 0:5 / /proc rw - proc proc rw\n";
        assert_eq!(host_paths(mi), vec!["/home/a", "/var/lib/x"]);
        assert!(host_paths("24 22 0:5 / /proc rw - proc proc rw\n").is_empty());
    }
}
