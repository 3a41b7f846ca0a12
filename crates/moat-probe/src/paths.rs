//! Masked and read-only kernel paths, writable kernel interfaces, the root
//! filesystem and /proc/self/exe.
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use super::{check, errno_name, open_read_close, open_write_close, Check, Outcome};

const MASKED: &str = "kernel paths masked (PRODUCT; Docker/runc maskedPaths)";
const READONLY: &str = "kernel paths read-only (PRODUCT; Docker/runc readonlyPaths)";
const WRITE: &str = "no writable kernel interfaces (PRODUCT; CIS 5.6 sensitive host paths; CDK mount-procfs, core_pattern)";

/// (check id, path) of paths Docker or runc mask.
const MASKED_PATHS: [(&str, &str); 11] = [
    ("masked.proc-kcore", "/proc/kcore"),
    ("masked.proc-keys", "/proc/keys"),
    ("masked.proc-timer-list", "/proc/timer_list"),
    ("masked.proc-sched-debug", "/proc/sched_debug"),
    ("masked.proc-latency-stats", "/proc/latency_stats"),
    ("masked.proc-acpi", "/proc/acpi"),
    ("masked.proc-scsi", "/proc/scsi"),
    ("masked.proc-asound", "/proc/asound"),
    ("masked.proc-interrupts", "/proc/interrupts"),
    ("masked.sys-firmware", "/sys/firmware"),
    ("masked.sys-powercap", "/sys/devices/virtual/powercap"),
];

const READONLY_PATHS: [(&str, &str); 5] = [
    ("readonly.proc-sys", "/proc/sys"),
    ("readonly.proc-sysrq-trigger", "/proc/sysrq-trigger"),
    ("readonly.proc-bus", "/proc/bus"),
    ("readonly.proc-fs", "/proc/fs"),
    ("readonly.proc-irq", "/proc/irq"),
];

const WRITE_PATHS: [(&str, &str); 5] = [
    ("escape.write-core-pattern", "/proc/sys/kernel/core_pattern"),
    ("escape.write-modprobe", "/proc/sys/kernel/modprobe"),
    ("escape.write-sysrq-trigger", "/proc/sysrq-trigger"),
    ("escape.write-uevent-helper", "/sys/kernel/uevent_helper"),
    ("escape.write-proc-sys-vm", "/proc/sys/vm/drop_caches"),
];

/// makedev(1, 3): /dev/null, what runtimes bind over masked files.
const DEV_NULL: u64 = (1 << 8) | 3;

pub fn checks() -> Vec<Check> {
    let mut out = Vec::new();
    for (id, p) in MASKED_PATHS {
        out.push(masked(id, p));
    }
    for (id, p) in READONLY_PATHS {
        out.push(readonly(id, p, READONLY));
    }
    out.push(readonly(
        "fs.root-readonly",
        "/",
        "read-only root filesystem (PRODUCT; CIS 5.13; PSS readOnlyRootFilesystem)",
    ));
    out.push(readonly(
        "fs.sys-readonly",
        "/sys",
        "/sys read-only (Docker and runc default mounts)",
    ));
    for (id, p) in WRITE_PATHS {
        out.push(write_attempt(id, p));
    }
    out.push(self_exe());
    out
}

fn masked(id: &'static str, path: &str) -> Check {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => check(
            id,
            Outcome::NotApplicable,
            format!("{path} absent (nothing to mask)"),
            MASKED,
        ),
        Err(e) => check(
            id,
            Outcome::Blocked,
            format!("{path}: {}", errno_name(e.raw_os_error().unwrap_or(0))),
            MASKED,
        ),
        Ok(m) if m.file_type().is_char_device() && m.rdev() == DEV_NULL => {
            check(id, Outcome::Blocked, format!("{path} is /dev/null"), MASKED)
        }
        Ok(m) if m.is_dir() => match std::fs::read_dir(path) {
            Ok(rd) => {
                let n = rd.count();
                if n == 0 {
                    check(
                        id,
                        Outcome::Blocked,
                        format!("{path} is empty (masked)"),
                        MASKED,
                    )
                } else {
                    check(
                        id,
                        Outcome::Allowed,
                        format!("{path} lists {n} entries"),
                        MASKED,
                    )
                }
            }
            Err(e) => check(
                id,
                Outcome::Blocked,
                format!("{path}: {}", errno_name(e.raw_os_error().unwrap_or(0))),
                MASKED,
            ),
        },
        Ok(_) => match open_read_close(path) {
            Ok(()) => check(
                id,
                Outcome::Allowed,
                format!("{path} opens for reading"),
                MASKED,
            ),
            Err(e) => check(
                id,
                Outcome::Blocked,
                format!("{path}: {}", errno_name(e.raw_os_error().unwrap_or(0))),
                MASKED,
            ),
        },
    }
}

fn readonly(id: &'static str, path: &str, practice: &'static str) -> Check {
    match rustix::fs::statvfs(path) {
        Ok(s) if s.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY) => check(
            id,
            Outcome::Blocked,
            format!("{path} is on a read-only mount"),
            practice,
        ),
        Ok(_) => check(
            id,
            Outcome::Allowed,
            format!("{path} is on a writable mount"),
            practice,
        ),
        Err(rustix::io::Errno::NOENT) => check(
            id,
            Outcome::NotApplicable,
            format!("{path} absent"),
            practice,
        ),
        Err(e) => check(
            id,
            Outcome::Blocked,
            format!("{path}: {}", errno_name(e.raw_os_error())),
            practice,
        ),
    }
}

fn write_attempt(id: &'static str, path: &str) -> Check {
    match open_write_close(path) {
        Ok(()) => check(
            id,
            Outcome::Allowed,
            format!("{path} opened for writing (closed without writing)"),
            WRITE,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            check(id, Outcome::NotApplicable, format!("{path} absent"), WRITE)
        }
        Err(e) => check(
            id,
            Outcome::Blocked,
            format!("{path}: {}", errno_name(e.raw_os_error().unwrap_or(0))),
            WRITE,
        ),
    }
}

/// CVE-2019-5736 class: can the process open its own executable for
/// writing? (Opened and closed, never written or truncated.)
fn self_exe() -> Check {
    const P: &str = "runtime binary protected from the container (CVE-2019-5736)";
    let target = std::fs::read_link("/proc/self/exe")
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    match open_write_close("/proc/self/exe") {
        Ok(()) => check(
            "escape.proc-self-exe",
            Outcome::Allowed,
            format!("/proc/self/exe ({target}) opened for writing (closed without writing)"),
            P,
        ),
        Err(e) => check(
            "escape.proc-self-exe",
            Outcome::Blocked,
            format!(
                "/proc/self/exe ({target}): {}",
                errno_name(e.raw_os_error().unwrap_or(0))
            ),
            P,
        ),
    }
}
