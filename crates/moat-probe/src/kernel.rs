//! Which kernel answers: the host's, a VM guest's, or a user-space kernel
//! (gVisor); and what the kernel leaks (log, symbol addresses).
use super::{check, errno_name, read_trim, Check, Outcome};

const KERNEL: &str =
    "a kernel not shared with the host for untrusted code (PRODUCT tiers: sandbox, microvm)";
const LEAK: &str = "kernel information not exposed (dmesg_restrict, kptr_restrict)";

/// What the environment tells about the kernel.
#[derive(Debug, Default)]
pub struct KernelSigns {
    pub hypervisor: bool,
    pub dmi: String,
    pub gvisor: bool,
}

/// gVisor's Sentry prints its own boot messages and reports a fixed old
/// kernel version.
pub fn looks_like_gvisor(version: &str, dmesg: &str) -> bool {
    dmesg.contains("gVisor")
        || dmesg.contains("Starting gVisor")
        || (version.contains("4.4.0") && version.contains("#1 SMP Sun Jan 10 15:06:54 PST 2016"))
}

pub fn verdict(s: &KernelSigns) -> (Outcome, String) {
    if s.gvisor {
        (
            Outcome::Blocked,
            "a user-space kernel (gVisor signature)".into(),
        )
    } else if s.hypervisor {
        (Outcome::NotApplicable, format!("a VM guest kernel ({}): separate from the VM's host, shared with whatever else runs in this VM", if s.dmi.is_empty() { "no DMI" } else { s.dmi.as_str() }))
    } else {
        (
            Outcome::Allowed,
            "no hypervisor or gVisor sign: the host kernel".into(),
        )
    }
}

pub fn checks() -> Vec<Check> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hypervisor = cpuinfo
        .lines()
        .any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "hypervisor"));
    let dmi = [
        read_trim("/sys/class/dmi/id/sys_vendor"),
        read_trim("/sys/class/dmi/id/product_name"),
    ]
    .into_iter()
    .flatten()
    .collect::<Vec<_>>()
    .join(" ");
    let version = read_trim("/proc/version").unwrap_or_default();
    let log = moat_sys::probe::syslog_read_all(256 * 1024)
        .map(|b| String::from_utf8_lossy(&b).into_owned());
    let signs = KernelSigns {
        hypervisor,
        dmi: dmi.clone(),
        gvisor: looks_like_gvisor(&version, log.as_deref().unwrap_or("")),
    };
    let mut out = Vec::new();
    out.push(check(
        "kernel.version",
        Outcome::NotApplicable,
        version.clone(),
        KERNEL,
    ));
    out.push(check(
        "kernel.hypervisor",
        Outcome::NotApplicable,
        if hypervisor {
            "cpuinfo has the hypervisor flag"
        } else {
            "no hypervisor flag in cpuinfo"
        },
        KERNEL,
    ));
    out.push(check(
        "kernel.dmi",
        Outcome::NotApplicable,
        if dmi.is_empty() {
            "no DMI information visible".to_string()
        } else {
            dmi
        },
        KERNEL,
    ));
    out.push(check(
        "kernel.gvisor",
        if signs.gvisor {
            Outcome::Blocked
        } else {
            Outcome::NotApplicable
        },
        if signs.gvisor {
            "gVisor signature found"
        } else {
            "no gVisor signature"
        },
        KERNEL,
    ));
    let (r, d) = verdict(&signs);
    out.push(check("kernel.separate", r, d, KERNEL));
    out.push(match moat_sys::probe::syslog_size() {
        Ok(n) => check(
            "kernel.dmesg",
            Outcome::Allowed,
            format!("kernel log readable ({n}-byte buffer)"),
            LEAK,
        ),
        Err(e) => check(
            "kernel.dmesg",
            Outcome::Blocked,
            format!("syslog(2): {}", errno_name(e.raw_os_error().unwrap_or(0))),
            LEAK,
        ),
    });
    out.push(kallsyms());
    out
}

fn kallsyms() -> Check {
    use std::io::BufRead;
    let f = match std::fs::File::open("/proc/kallsyms") {
        Ok(f) => f,
        Err(e) => {
            return check(
                "kernel.kallsyms",
                Outcome::Blocked,
                format!(
                    "/proc/kallsyms: {}",
                    errno_name(e.raw_os_error().unwrap_or(0))
                ),
                LEAK,
            )
        }
    };
    let mut line = String::new();
    if std::io::BufReader::new(f).read_line(&mut line).is_err() || line.is_empty() {
        return check(
            "kernel.kallsyms",
            Outcome::Blocked,
            "/proc/kallsyms empty or unreadable",
            LEAK,
        );
    }
    let addr = line.split_whitespace().next().unwrap_or("0");
    if addr.chars().all(|c| c == '0') {
        check(
            "kernel.kallsyms",
            Outcome::Blocked,
            "symbol addresses hidden (kptr_restrict)",
            LEAK,
        )
    } else {
        check(
            "kernel.kallsyms",
            Outcome::Allowed,
            "kernel symbol addresses visible (KASLR defeated)",
            LEAK,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        assert_eq!(verdict(&KernelSigns::default()).0, Outcome::Allowed);
        let vm = KernelSigns {
            hypervisor: true,
            ..Default::default()
        };
        assert_eq!(verdict(&vm).0, Outcome::NotApplicable);
        assert!(looks_like_gvisor("", "[   0.000000] Starting gVisor..."));
        assert!(!looks_like_gvisor("Linux version 6.18.0", ""));
    }
}
