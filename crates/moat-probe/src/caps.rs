//! The five capability sets, decoded, and the capabilities attackers use.
use super::{check, Check, Outcome, Status};

/// Capability names by number (`<linux/capability.h>`).
pub const NAMES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// Docker's 14 default capabilities (peers 5.1): the most a bounding set
/// should hold unless the workload needs more.
const DOCKER_DEFAULT: [usize; 14] = [0, 1, 4, 3, 27, 13, 6, 7, 31, 8, 10, 18, 5, 29];

/// Decodes a capability mask into names (unknown bits as `cap_N`).
pub fn decode(mask: u64) -> Vec<String> {
    (0..64)
        .filter(|b| mask & (1u64 << b) != 0)
        .map(|b| {
            NAMES
                .get(b)
                .map_or_else(|| format!("cap_{b}"), |n| (*n).to_string())
        })
        .collect()
}

fn names(mask: u64) -> String {
    let v = decode(mask);
    if v.is_empty() {
        "none".into()
    } else {
        v.join(",")
    }
}

const PRACTICE_CAPS: &str =
    "least privilege: no capabilities unless needed (PRODUCT; CIS 5.4; PSS restricted drop ALL)";

/// Dangerous capabilities checked one by one: (id, number, why).
const DANGEROUS: [(&str, usize, &str); 14] = [
    (
        "caps.sys-admin",
        21,
        "mount, namespaces, bpf and most escape primitives",
    ),
    (
        "caps.sys-ptrace",
        19,
        "ptrace and read other processes' memory",
    ),
    ("caps.sys-module", 16, "load kernel modules"),
    (
        "caps.dac-read-search",
        2,
        "open_by_handle_at host file read (shocker)",
    ),
    ("caps.dac-override", 1, "bypass file permission checks"),
    ("caps.sys-rawio", 17, "raw I/O ports and /dev/mem"),
    ("caps.net-admin", 12, "reconfigure the network namespace"),
    (
        "caps.net-raw",
        13,
        "raw sockets: spoofing, ARP/DNS poisoning",
    ),
    ("caps.sys-boot", 22, "reboot and kexec"),
    ("caps.sys-time", 25, "set the host clock (not namespaced)"),
    ("caps.syslog", 34, "read and clear the kernel log"),
    ("caps.bpf", 39, "load eBPF programs"),
    ("caps.perfmon", 38, "perf monitoring of the kernel"),
    ("caps.mknod", 27, "create device nodes"),
];

pub fn checks(st: &Status) -> Vec<Check> {
    let mut out = Vec::new();
    let sets = [
        ("caps.effective-empty", "CapEff", "effective"),
        ("caps.permitted-empty", "CapPrm", "permitted"),
        ("caps.inheritable-empty", "CapInh", "inheritable"),
        ("caps.ambient-empty", "CapAmb", "ambient"),
    ];
    for (id, key, what) in sets {
        out.push(match st.hex(key) {
            None => check(
                id,
                Outcome::NotApplicable,
                format!("no {key} in /proc/self/status"),
                PRACTICE_CAPS,
            ),
            Some(0) => check(
                id,
                Outcome::Blocked,
                format!("{what} set is empty"),
                PRACTICE_CAPS,
            ),
            Some(m) => check(
                id,
                Outcome::Allowed,
                format!("{what}: {}", names(m)),
                PRACTICE_CAPS,
            ),
        });
    }
    let bnd = st.hex("CapBnd");
    out.push(match bnd {
        None => check(
            "caps.bounding-minimal",
            Outcome::NotApplicable,
            "no CapBnd in /proc/self/status",
            PRACTICE_CAPS,
        ),
        Some(m) => {
            let default_mask = DOCKER_DEFAULT.iter().fold(0u64, |a, b| a | (1 << b));
            let extra = m & !default_mask;
            if extra == 0 {
                check(
                    "caps.bounding-minimal",
                    Outcome::Blocked,
                    format!("bounding: {}", names(m)),
                    PRACTICE_CAPS,
                )
            } else {
                check(
                    "caps.bounding-minimal",
                    Outcome::Allowed,
                    format!(
                        "bounding holds more than Docker's 14 defaults: {}",
                        names(extra)
                    ),
                    PRACTICE_CAPS,
                )
            }
        }
    });
    let eff = st.hex("CapEff").unwrap_or(0);
    let nnp = st.no_new_privs();
    for (id, bit, why) in DANGEROUS {
        let name = NAMES[bit];
        let r = if eff & (1 << bit) != 0 {
            check(
                id,
                Outcome::Allowed,
                format!("{name} effective: {why}"),
                PRACTICE_CAPS,
            )
        } else if bnd.unwrap_or(0) & (1 << bit) != 0 && !nnp {
            check(id, Outcome::Allowed, format!("{name} in the bounding set and no_new_privs off: a setuid or file-capability binary regains it ({why})"), PRACTICE_CAPS)
        } else {
            check(
                id,
                Outcome::Blocked,
                format!("{name} neither effective nor obtainable"),
                PRACTICE_CAPS,
            )
        };
        out.push(r);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_runc_default() {
        // CAP_KILL, CAP_NET_BIND_SERVICE, CAP_AUDIT_WRITE
        assert_eq!(
            decode(0x2000_0420),
            vec!["CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_AUDIT_WRITE"]
        );
        assert_eq!(decode(1 << 45), vec!["cap_45"]);
    }

    #[test]
    fn bounding_without_nnp_counts_as_obtainable() {
        let st = Status::parse("CapEff:\t0\nCapBnd:\t0000000000200000\nNoNewPrivs:\t0\n");
        let c = checks(&st);
        let sa = c.iter().find(|c| c.id == "caps.sys-admin").unwrap();
        assert_eq!(sa.result, Outcome::Allowed);
        let st = Status::parse("CapEff:\t0\nCapBnd:\t0000000000200000\nNoNewPrivs:\t1\n");
        let c = checks(&st);
        assert_eq!(
            c.iter().find(|c| c.id == "caps.sys-admin").unwrap().result,
            Outcome::Blocked
        );
        assert_eq!(
            c.iter()
                .find(|c| c.id == "caps.bounding-minimal")
                .unwrap()
                .result,
            Outcome::Allowed
        );
    }
}
