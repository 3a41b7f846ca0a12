//! What this host's kernel offers the tiers, read without changing anything:
//! namespaces and their limits, the cgroup layout and delegation, seccomp
//! actions, Landlock, KVM, and the guest kernel and QEMU the microVM tier
//! would use. `moat info` prints it; the dispatch point's availability
//! checks answer from it, so both always agree.
use std::path::{Path, PathBuf};

use serde::Serialize;

/// Everything `moat info` reports about the host.
#[derive(Debug, Clone, Serialize)]
pub struct HostFacts {
    pub kernel: Kernel,
    pub namespaces: Vec<Namespace>,
    pub user_namespaces: UserNamespaces,
    pub cgroup: Cgroups,
    pub seccomp: Seccomp,
    /// Landlock ABI version; `None` when the kernel has no Landlock.
    pub landlock_abi: Option<i64>,
    pub kvm: Kvm,
    /// A kernel the microVM tier can boot (Debian's cloud kernel).
    pub guest_kernel: Option<PathBuf>,
    pub qemu: Option<PathBuf>,
    pub rootless: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Kernel {
    pub release: String,
    pub version: String,
    pub machine: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Namespace {
    pub name: &'static str,
    pub available: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct UserNamespaces {
    /// `user.max_user_namespaces`: 0 disables them.
    pub max: Option<u64>,
    /// Debian's `kernel.unprivileged_userns_clone`, where the kernel has it.
    pub unprivileged_clone: Option<bool>,
    /// Ubuntu's `kernel.apparmor_restrict_unprivileged_userns`, where present.
    pub apparmor_restricted: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Cgroups {
    /// "v1", "hybrid" (v1 controllers plus a cgroup2 mount) or "v2".
    pub layout: String,
    /// Controllers this host mounts (v1 hierarchies, or those v2 offers).
    pub controllers: Vec<String>,
    /// For an unprivileged caller: whether its own cgroup lets it create
    /// children (systemd delegation). Always true for root.
    pub delegated: bool,
    pub problem: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Seccomp {
    /// From /proc/sys/kernel/seccomp/actions_avail.
    pub actions: Vec<String>,
    pub user_notification: bool,
    /// `SECCOMP_IOCTL_NOTIF_ADDFD` (kernel 5.9+).
    pub addfd: bool,
    /// `SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP` (kernel 6.6+).
    pub sync_wake_up: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Kvm {
    pub present: bool,
    /// Whether this process can open /dev/kvm read-write.
    pub accessible: bool,
    /// vmx or svm in /proc/cpuinfo: virtualisation in hardware.
    pub hardware: bool,
    /// A software-assisted or nested KVM module (e.g. `kvm_pvm`), which
    /// runs tiny guests but not a stock Linux kernel.
    pub software_module: Option<String>,
}

impl HostFacts {
    /// Reads the facts now.
    pub fn read() -> HostFacts {
        HostFacts {
            kernel: Kernel::read(),
            namespaces: namespaces(),
            user_namespaces: user_namespaces(),
            cgroup: cgroups(),
            seccomp: Seccomp::read(),
            landlock_abi: landlock_abi(),
            kvm: kvm(),
            guest_kernel: guest_kernel(),
            qemu: which("qemu-system-x86_64"),
            rootless: !rustix::process::geteuid().is_root(),
        }
    }
}

fn read_trim(p: impl AsRef<Path>) -> Option<String> {
    std::fs::read_to_string(p).ok().map(|s| s.trim().to_owned())
}

impl Kernel {
    pub fn read() -> Kernel {
        let u = rustix::system::uname();
        let text = |s: &std::ffi::CStr| s.to_string_lossy().into_owned();
        Kernel {
            release: text(u.release()),
            version: text(u.version()),
            machine: text(u.machine()),
        }
    }
}

/// The Landlock ABI version; `None` when the kernel has no Landlock.
pub fn landlock_abi() -> Option<i64> {
    moat_sys::probe::landlock_abi_version().ok()
}

/// (major, minor) of a release string like "6.18.44-fc-v1147".
pub fn release_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

fn namespaces() -> Vec<Namespace> {
    ["cgroup", "ipc", "mnt", "net", "pid", "time", "user", "uts"]
        .into_iter()
        .map(|name| Namespace {
            name,
            available: Path::new("/proc/self/ns").join(name).exists(),
        })
        .collect()
}

fn user_namespaces() -> UserNamespaces {
    let flag = |p: &str| read_trim(p).map(|v| v != "0");
    UserNamespaces {
        max: read_trim("/proc/sys/user/max_user_namespaces").and_then(|v| v.parse().ok()),
        unprivileged_clone: flag("/proc/sys/kernel/unprivileged_userns_clone"),
        apparmor_restricted: flag("/proc/sys/kernel/apparmor_restrict_unprivileged_userns"),
    }
}

fn cgroups() -> Cgroups {
    match crate::cgroup::host_layout() {
        Ok((layout, controllers)) => Cgroups {
            layout: layout.to_owned(),
            controllers,
            delegated: crate::cgroup::own_cgroup_writable(),
            problem: None,
        },
        Err(e) => Cgroups {
            layout: "unknown".into(),
            controllers: Vec::new(),
            delegated: false,
            problem: Some(moat_core::error_chain(&e)),
        },
    }
}

impl Seccomp {
    /// The seccomp actions this kernel offers, and the notification
    /// features its version implies.
    pub fn read() -> Seccomp {
        let actions: Vec<String> = read_trim("/proc/sys/kernel/seccomp/actions_avail")
            .map(|s| s.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default();
        let release = Kernel::read().release;
        let at_least = |want: (u32, u32)| release_version(&release).is_some_and(|v| v >= want);
        let user_notification = actions.iter().any(|a| a == "user_notif");
        Seccomp {
            user_notification,
            addfd: user_notification && at_least((5, 9)),
            sync_wake_up: user_notification && at_least((6, 6)),
            actions,
        }
    }
}

fn kvm() -> Kvm {
    let dev = Path::new("/dev/kvm");
    let flags = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("flags"))
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let hardware = flags.split_whitespace().any(|f| f == "vmx" || f == "svm");
    let software_module = ["kvm_pvm"]
        .into_iter()
        .find(|m| Path::new("/sys/module").join(m).exists())
        .map(str::to_owned);
    Kvm {
        present: dev.exists(),
        accessible: std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dev)
            .is_ok(),
        hardware,
        software_module,
    }
}

/// The newest Debian cloud kernel in /boot (`MOAT_GUEST_KERNEL` overrides).
fn guest_kernel() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MOAT_GUEST_KERNEL") {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    newest_cloud_kernel()
}

/// The newest Debian cloud kernel image in /boot (`vmlinuz-*-cloud-amd64`).
pub fn newest_cloud_kernel() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/boot")
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-") && n.ends_with("-cloud-amd64"))
        })
        .collect();
    found.sort();
    found.pop()
}

fn which(prog: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join(prog))
            .find(|p| p.is_file())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_versions() {
        assert_eq!(release_version("6.18.44-fc-v1147"), Some((6, 18)));
        assert_eq!(release_version("5.10.0-28-amd64"), Some((5, 10)));
        assert_eq!(release_version("garbage"), None);
    }

    #[test]
    fn facts_match_this_kernel() {
        let f = HostFacts::read();
        assert_eq!(
            f.kernel.release,
            std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap()
                .trim()
        );
        // This process has these namespaces, whatever the host.
        for ns in ["mnt", "pid", "net"] {
            assert!(f.namespaces.iter().any(|n| n.name == ns && n.available));
        }
        let avail = std::fs::read_to_string("/proc/sys/kernel/seccomp/actions_avail").unwrap();
        assert_eq!(f.seccomp.user_notification, avail.contains("user_notif"));
        assert_eq!(f.kvm.present, Path::new("/dev/kvm").exists());
        assert!(matches!(f.cgroup.layout.as_str(), "v1" | "hybrid" | "v2"));
    }
}
