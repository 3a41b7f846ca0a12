//! no_new_privs, seccomp, the LSMs and Landlock.
use super::{check, errno_name, read_trim, Check, Outcome, Status};

pub fn checks(st: &Status, scratch: Option<&std::path::Path>) -> Vec<Check> {
    let mut out = Vec::new();
    out.push(match st.get("NoNewPrivs") {
        Some("1") => check(
            "security.no-new-privs",
            Outcome::Blocked,
            "NoNewPrivs: 1",
            "no_new_privs on (PRODUCT; CIS 5.26; PSS allowPrivilegeEscalation=false)",
        ),
        Some(v) => check(
            "security.no-new-privs",
            Outcome::Allowed,
            format!("NoNewPrivs: {v}: setuid binaries can raise privileges"),
            "no_new_privs on (PRODUCT; CIS 5.26; PSS allowPrivilegeEscalation=false)",
        ),
        None => check(
            "security.no-new-privs",
            Outcome::NotApplicable,
            "no NoNewPrivs line",
            "no_new_privs on (PRODUCT; CIS 5.26)",
        ),
    });
    const SECCOMP: &str =
        "a seccomp allow-list filter (PRODUCT; CIS 5.22; PSS seccomp RuntimeDefault)";
    out.push(match st.get("Seccomp") {
        Some("2") => check(
            "seccomp.mode",
            Outcome::Blocked,
            "filter mode (Seccomp: 2)",
            SECCOMP,
        ),
        Some("1") => check(
            "seccomp.mode",
            Outcome::Blocked,
            "strict mode (Seccomp: 1)",
            SECCOMP,
        ),
        Some("0") => check(
            "seccomp.mode",
            Outcome::Allowed,
            "disabled (Seccomp: 0)",
            SECCOMP,
        ),
        Some(v) => check(
            "seccomp.mode",
            Outcome::NotApplicable,
            format!("Seccomp: {v}"),
            SECCOMP,
        ),
        None => check(
            "seccomp.mode",
            Outcome::NotApplicable,
            "kernel without seccomp status",
            SECCOMP,
        ),
    });
    out.push(
        match st
            .get("Seccomp_filters")
            .and_then(|v| v.parse::<u64>().ok())
        {
            Some(0) => check(
                "seccomp.filters",
                Outcome::Allowed,
                "0 filters installed",
                SECCOMP,
            ),
            Some(n) => check(
                "seccomp.filters",
                Outcome::Blocked,
                format!("{n} filter(s) installed"),
                SECCOMP,
            ),
            None => check(
                "seccomp.filters",
                Outcome::NotApplicable,
                "no Seccomp_filters line (kernel < 5.9)",
                SECCOMP,
            ),
        },
    );
    out.push(apparmor());
    out.push(selinux());
    out.push(match moat_sys::probe::landlock_abi_version() {
        Ok(v) => check(
            "security.landlock",
            Outcome::NotApplicable,
            format!("Landlock ABI {v} available: the workload can sandbox itself further"),
            "defense in depth: Landlock available for self-sandboxing",
        ),
        Err(e) => check(
            "security.landlock",
            Outcome::NotApplicable,
            format!(
                "Landlock unavailable: {}",
                errno_name(e.raw_os_error().unwrap_or(0))
            ),
            "defense in depth: Landlock available for self-sandboxing",
        ),
    });
    out.push(landlock_domain(scratch));
    out
}

/// Whether a Landlock ruleset restricts this process, seen through device
/// node creation in a directory DAC and the mount let us write: without a
/// ruleset `mknod(S_IFCHR)` fails the capability check (EPERM), or succeeds
/// with CAP_MKNOD; a ruleset that does not grant "make char" refuses it
/// first, with EACCES. The node is removed if it was made.
fn landlock_domain(scratch: Option<&std::path::Path>) -> Check {
    const PRACTICE: &str =
        "defense in depth: a Landlock ruleset confines file access (write only where the container may write)";
    // The probe's scratch directory: made where DAC and the mounts let it write.
    let Some(dir) = scratch else {
        return check(
            "security.landlock-domain",
            Outcome::NotApplicable,
            "no writable directory to test in",
            PRACTICE,
        );
    };
    let node = dir.join("landlock-node");
    let r = rustix::fs::mknodat(
        rustix::fs::CWD,
        &node,
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::from_raw_mode(0o600),
        rustix::fs::makedev(1, 3),
    );
    match r {
        Err(rustix::io::Errno::ACCESS) => check(
            "security.landlock-domain",
            Outcome::Blocked,
            format!(
                "mknod in {}: EACCES before the capability check: a Landlock (or other LSM) ruleset is in force",
                dir.display()
            ),
            PRACTICE,
        ),
        other => {
            if other.is_ok() {
                let _ = std::fs::remove_file(&node);
            }
            let how = match other {
                Ok(()) => "succeeded".to_string(),
                Err(e) => errno_name(e.raw_os_error()).to_string(),
            };
            check(
                "security.landlock-domain",
                Outcome::Allowed,
                format!(
                    "mknod in {}: {how}: no Landlock ruleset restricts this process",
                    dir.display()
                ),
                PRACTICE,
            )
        }
    }
}

const MAC: &str = "a mandatory access control profile (CIS 5.2 AppArmor, 5.3 SELinux)";

fn apparmor() -> Check {
    let enabled = read_trim("/sys/module/apparmor/parameters/enabled").is_some_and(|v| v == "Y");
    let label = read_trim("/proc/self/attr/apparmor/current")
        .or_else(|| read_trim("/proc/self/attr/current"));
    match label {
        Some(l) if l.contains("(enforce)") || l.contains("(complain)") => {
            let r = if l.contains("(enforce)") {
                Outcome::Blocked
            } else {
                Outcome::Allowed
            };
            check("security.apparmor", r, format!("profile {l}"), MAC)
        }
        Some(l) if l == "unconfined" => {
            check("security.apparmor", Outcome::Allowed, "unconfined", MAC)
        }
        _ if !enabled => check(
            "security.apparmor",
            Outcome::NotApplicable,
            "AppArmor not enabled on this kernel (or not visible)",
            MAC,
        ),
        other => check(
            "security.apparmor",
            Outcome::NotApplicable,
            format!("label {:?}", other.unwrap_or_default()),
            MAC,
        ),
    }
}

fn selinux() -> Check {
    let enforce = read_trim("/sys/fs/selinux/enforce");
    let label = read_trim("/proc/self/attr/current").filter(|l| l.split(':').count() >= 3);
    match (enforce.as_deref(), label) {
        (Some("1"), Some(l)) if l.contains("unconfined_t") || l.contains("spc_t") => check(
            "security.selinux",
            Outcome::Allowed,
            format!("unconfined domain {l}"),
            MAC,
        ),
        (Some("1"), Some(l)) => check(
            "security.selinux",
            Outcome::Blocked,
            format!("enforcing, domain {l}"),
            MAC,
        ),
        (Some("0"), l) => check(
            "security.selinux",
            Outcome::Allowed,
            format!("permissive ({})", l.unwrap_or_default()),
            MAC,
        ),
        _ => check(
            "security.selinux",
            Outcome::NotApplicable,
            "SELinux not enabled (or not visible)",
            MAC,
        ),
    }
}
