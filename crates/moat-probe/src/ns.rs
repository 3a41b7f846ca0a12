//! Namespaces: each of this process's compared with the initial ones (fixed
//! inode numbers for user, pid, ipc, uts, cgroup, time) or with PID 1's.
use super::{check, Check, Outcome, Status};

const PRACTICE_NS: &str = "separate namespaces; host namespaces never shared (CIS 5.10, 5.16, 5.17, 5.21, 5.31; PSS baseline host namespaces)";

/// Inode numbers the kernel gives the initial namespaces (`PROC_*_INIT_INO`).
pub fn init_inode(kind: &str) -> Option<u64> {
    Some(match kind {
        "ipc" => 0xEFFF_FFFF,
        "uts" => 0xEFFF_FFFE,
        "user" => 0xEFFF_FFFD,
        "pid" => 0xEFFF_FFFC,
        "cgroup" => 0xEFFF_FFFB,
        "time" => 0xEFFF_FFFA,
        _ => return None,
    })
}

/// The inode in a namespace link's target, `pid:[4026531836]`.
pub fn link_inode(target: &str) -> Option<u64> {
    target.split_once(":[")?.1.strip_suffix(']')?.parse().ok()
}

fn ns_inode(pid: &str, kind: &str) -> Option<u64> {
    let t = std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).ok()?;
    link_inode(&t.to_string_lossy())
}

/// The root field of the mountinfo line for `/` (the source subtree mounted
/// as this process's root).
fn root_mount_source() -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.get(4) == Some(&"/")).then(|| f.get(3).map(|s| (*s).to_string()))?
    })
}

pub fn checks(st: &Status) -> Vec<Check> {
    let mut out = Vec::new();
    let in_init_pidns = ns_inode("self", "pid") == init_inode("pid");
    for (kind, id) in [
        ("user", "ns.user"),
        ("pid", "ns.pid"),
        ("mnt", "ns.mnt"),
        ("net", "ns.net"),
        ("ipc", "ns.ipc"),
        ("uts", "ns.uts"),
        ("cgroup", "ns.cgroup"),
        ("time", "ns.time"),
    ] {
        let Some(mine) = ns_inode("self", kind) else {
            out.push(check(
                id,
                Outcome::NotApplicable,
                format!("/proc/self/ns/{kind} not available"),
                PRACTICE_NS,
            ));
            continue;
        };
        let r = if let Some(init) = init_inode(kind) {
            if mine == init {
                check(
                    id,
                    Outcome::Allowed,
                    format!("the initial (host) {kind} namespace [{mine}]"),
                    PRACTICE_NS,
                )
            } else {
                check(
                    id,
                    Outcome::Blocked,
                    format!("own {kind} namespace [{mine}]"),
                    PRACTICE_NS,
                )
            }
        } else if in_init_pidns {
            // PID 1 is the host's init: compare with it.
            match ns_inode("1", kind) {
                Some(p1) if p1 == mine => check(
                    id,
                    Outcome::Allowed,
                    format!("same {kind} namespace as the host's PID 1 [{mine}]"),
                    PRACTICE_NS,
                ),
                Some(p1) => check(
                    id,
                    Outcome::Blocked,
                    format!("own {kind} namespace [{mine}], host PID 1 has [{p1}]"),
                    PRACTICE_NS,
                ),
                None => check(
                    id,
                    Outcome::NotApplicable,
                    format!("[{mine}]; PID 1's namespaces are not visible"),
                    PRACTICE_NS,
                ),
            }
        } else {
            heuristic(id, kind, mine)
        };
        out.push(r);
    }
    // NSpid lists the PID from the namespace of the /proc mount down: a
    // container with a procfs of its own shows one level, like the host.
    let nspid = st.get("NSpid").unwrap_or("");
    let (outcome, detail) = if nspid.split_whitespace().count() > 1 {
        (Outcome::Blocked, format!("NSpid: {nspid}"))
    } else if in_init_pidns {
        (
            Outcome::Allowed,
            format!("NSpid: {nspid}, in the initial PID namespace"),
        )
    } else {
        (
            Outcome::Blocked,
            format!("NSpid: {nspid} as this /proc shows it, in a PID namespace of its own"),
        )
    };
    out.push(check("ns.pid-levels", outcome, detail, PRACTICE_NS));
    out.push(fingerprint());
    out
}

/// In a PID namespace of its own, PID 1 is the container's init and shares
/// its namespaces, so mnt and net are judged from what they contain.
fn heuristic(id: &'static str, kind: &str, mine: u64) -> Check {
    match kind {
        "mnt" => match root_mount_source() {
            Some(src) if src != "/" => check(
                id,
                Outcome::Blocked,
                format!(
                    "own mount namespace [{mine}]: root is the subtree {src} of its filesystem"
                ),
                PRACTICE_NS,
            ),
            _ => check(
                id,
                Outcome::NotApplicable,
                format!("[{mine}]; cannot compare (PID 1 is this container's init)"),
                PRACTICE_NS,
            ),
        },
        "net" => {
            let ifs = super::net::interfaces();
            if ifs.iter().all(|i| i == "lo") {
                check(
                    id,
                    Outcome::Blocked,
                    format!("own network namespace [{mine}]: only loopback"),
                    PRACTICE_NS,
                )
            } else {
                check(
                    id,
                    Outcome::NotApplicable,
                    format!(
                        "[{mine}]; interfaces {}; cannot compare with the host",
                        ifs.join(",")
                    ),
                    PRACTICE_NS,
                )
            }
        }
        _ => check(id, Outcome::NotApplicable, format!("[{mine}]"), PRACTICE_NS),
    }
}

/// Which runtime or orchestrator started this process, from the signs
/// amicontained and deepce read.
pub fn runtime_from(cgroup: &str, dockerenv: bool, containerenv: bool) -> &'static str {
    if cgroup.contains("kubepods") {
        "kubernetes"
    } else if dockerenv || cgroup.contains("/docker") {
        "docker"
    } else if containerenv || cgroup.contains("libpod") {
        "podman"
    } else if cgroup.contains("/lxc") {
        "lxc"
    } else if cgroup.contains("moat") {
        "moat"
    } else if cgroup.contains("machine.slice") {
        "systemd-nspawn or libvirt"
    } else {
        "unknown"
    }
}

fn fingerprint() -> Check {
    let cg = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let rt = runtime_from(
        &cg,
        std::path::Path::new("/.dockerenv").exists(),
        std::path::Path::new("/run/.containerenv").exists(),
    );
    let first = cg
        .lines()
        .find(|l| l.starts_with("0::") || l.contains(":memory:"))
        .unwrap_or("")
        .to_string();
    check(
        "runtime.fingerprint",
        Outcome::NotApplicable,
        format!("runtime: {rt}; cgroup {first}"),
        "know what runs you (amicontained/deepce fingerprint)",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ns_links() {
        assert_eq!(link_inode("pid:[4026531836]"), Some(4026531836));
        assert_eq!(link_inode("garbage"), None);
        assert_eq!(init_inode("pid"), Some(4026531836));
        assert_eq!(init_inode("user"), Some(4026531837));
    }

    #[test]
    fn fingerprints() {
        assert_eq!(
            runtime_from("0::/kubepods/burstable/pod1/abc", false, false),
            "kubernetes"
        );
        assert_eq!(
            runtime_from("12:memory:/docker/abc", false, false),
            "docker"
        );
        assert_eq!(runtime_from("0::/", true, false), "docker");
        assert_eq!(runtime_from("0::/", false, false), "unknown");
    }
}
