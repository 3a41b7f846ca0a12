//! The agent's first steps as the guest's PID 1: the kernel filesystems,
//! the virtio modules, the agent channel.
use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::mount::{mount, MsFlags};

use super::AgentError;

/// Modules the guest loads before it says hello (so a snapshot holds
/// them loaded), in dependency order: the virtio transport, the agent
/// channel, the entropy device, the balloon that reports the guest's free
/// memory to the host (`virtio_balloon`: its free page reporting), and
/// overlayfs for a writable root.
pub const EARLY_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "virtio_console",
    "virtio-rng",
    "virtio_balloon",
    "overlay",
];
/// Modules loaded when a workload arrives: the disks (probed then, so a VM
/// restored from a snapshot sees this run's disks, not the ones it was
/// saved with).
pub const LATE_MODULES: &[&str] = &["virtio_blk"];

/// What a run with read-write volumes loads: FUSE and its virtio-fs
/// transport.
pub const FS_MODULES: &[&str] = &["fuse", "virtiofs"];

/// The kernel command-line word of a guest whose read-write volume (a
/// pod's share) is hot-added on a PCIe port after its start (QEMU's
/// native PCIe hotplug: the port's own interrupt, which Linux takes only
/// with this word, the firmware granting it nothing). The agent loads
/// [`PCI_MODULES`] and [`FS_MODULES`] before its hello when it sees it.
pub const SHARE_PORT_WORD: &str = "pcie_ports=native";

/// What a guest with a share port loads before its hello, with
/// [`FS_MODULES`] (so its snapshot holds them loaded): the virtio PCI
/// transport.
pub const PCI_MODULES: &[&str] = &[
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
];

/// Whether the kernel command line `cmdline` gives this guest a share port.
pub fn has_share_port(cmdline: &str) -> bool {
    cmdline
        .split(" -- ")
        .next()
        .is_some_and(|k| k.split_whitespace().any(|w| w == SHARE_PORT_WORD))
}

/// Every module the initramfs holds: the early and late ones, the
/// network driver a networked run loads ([`super::net::NET_MODULES`]) and
/// what a pod's guest loads ([`super::pod::POD_MODULES`]).
pub fn initramfs_modules() -> impl Iterator<Item = &'static str> {
    EARLY_MODULES
        .iter()
        .chain(LATE_MODULES)
        .chain(PCI_MODULES)
        .chain(FS_MODULES)
        .chain(super::net::NET_MODULES)
        .chain(super::pod::POD_MODULES)
        .copied()
}

/// The ACPI hardware ID of a virtio-mmio device: the guest's platform
/// devices of moat's own VMM's slots (and QEMU's `-M microvm`
/// transports) are named after it (`LNRO0005:03`).
const VIRTIO_MMIO_HID: &str = "LNRO0005";

/// Has the virtio-mmio driver probe again every slot it did not take: a
/// slot that was a placeholder (device ID 0) when the guest booted, and
/// that moat's own VMM has since filled with a read-write volume's device
/// (at a snapshot's restore, or after its save). A slot still empty is
/// refused again, silently. Returns how many slots were probed.
pub fn probe_unbound_virtio_slots() -> usize {
    let Ok(devices) = std::fs::read_dir("/sys/bus/platform/devices") else {
        return 0;
    };
    let mut probed = 0;
    for d in devices.flatten() {
        let name = d.file_name().to_string_lossy().into_owned();
        if !name.starts_with(VIRTIO_MMIO_HID) || d.path().join("driver").exists() {
            continue;
        }
        // A failed probe is the driver's answer, not an error of the write.
        if std::fs::write("/sys/bus/platform/drivers_probe", &name).is_ok() {
            probed += 1;
        }
    }
    probed
}

/// Where the initramfs keeps the modules.
pub const MODULE_DIR: &str = "/lib/modules";
/// The agent channel in the guest.
pub const CHANNEL: &str = "/dev/hvc0";

fn mount_fs(
    fstype: &str,
    target: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), AgentError> {
    std::fs::create_dir_all(target).map_err(|e| AgentError::Io {
        step: format!("create {target}"),
        source: e,
    })?;
    mount(Some(fstype), target, Some(fstype), flags, data).map_err(|e| AgentError::Sys {
        step: format!("mount {fstype} on {target}"),
        source: e,
    })
}

/// Moves the agent out of the initramfs onto a tmpfs root (what
/// `switch_root` does): the kernel refuses `pivot_root` while the root is
/// the initial rootfs, and the container tier in the guest pivots into the
/// container's root. The agent and the modules directory are bind-mounted
/// from the initramfs (copying the 10 MB agent cost ~80 ms under
/// emulation), the tmpfs moved onto `/`, and the agent chroots into it.
pub fn leave_initramfs() -> Result<(), AgentError> {
    let new = "/newroot";
    std::fs::create_dir_all(new).map_err(|e| AgentError::Io {
        step: format!("create {new}"),
        source: e,
    })?;
    mount(
        Some("tmpfs"),
        new,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )
    .map_err(|e| AgentError::Sys {
        step: "mount the agent's root".into(),
        source: e,
    })?;
    let mods = format!("{new}{MODULE_DIR}");
    std::fs::create_dir_all(&mods).map_err(|e| AgentError::Io {
        step: format!("create {mods}"),
        source: e,
    })?;
    let agent = format!("{new}{}", super::GUEST_MOAT);
    std::fs::File::create(&agent).map_err(|e| AgentError::Io {
        step: format!("create {agent}"),
        source: e,
    })?;
    for (from, to) in [(super::GUEST_MOAT, agent.as_str()), (MODULE_DIR, &mods)] {
        bind_read_only(from, to)?;
    }
    for d in ["dev", "proc", "sys", "run", "tmp"] {
        let _ = std::fs::create_dir(format!("{new}/{d}"));
    }
    nix::unistd::chdir(new).map_err(|e| AgentError::Sys {
        step: format!("enter {new}"),
        source: e,
    })?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>).map_err(|e| {
        AgentError::Sys {
            step: "move the agent's root onto /".into(),
            source: e,
        }
    })?;
    nix::unistd::chroot(".").map_err(|e| AgentError::Sys {
        step: "chroot into the agent's root".into(),
        source: e,
    })?;
    nix::unistd::chdir("/").map_err(|e| AgentError::Sys {
        step: "enter /".into(),
        source: e,
    })
}

/// Raises the agent's hard limits to the kernel's ceilings (unlimited;
/// open files to `fs.nr_open`), which the container's runtime, a fork of
/// the agent, inherits. The container's init sets its config's limits from
/// inside its user namespace, where it cannot raise a hard limit, and the
/// guest kernel's own are low: init's process limit is derived from the
/// guest's memory (414 with 160 MiB: `moat run -m 64m`, moat's default of
/// 1024 processes, failed in the guest), its pending signals likewise. The
/// host's runtime is root too and may raise its limits; the container's own
/// limits still come from its config, which the host side completes with
/// the host runtime's (`guestspec::inherit_rlimits`), and its cgroups bound
/// it either way.
pub fn raise_hard_limits() -> Result<(), AgentError> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok());
    for &(_, resource) in &crate::guestspec::RLIMITS {
        let ceiling = match resource {
            Resource::Nofile => nr_open,
            _ => None,
        };
        let soft = getrlimit(resource).current;
        setrlimit(
            resource,
            Rlimit {
                current: soft,
                maximum: ceiling,
            },
        )
        .map_err(|e| AgentError::Sys {
            step: format!("raise the hard limit {resource:?}"),
            source: nix::Error::from_raw(e.raw_os_error()),
        })?;
    }
    Ok(())
}

/// Bind-mounts `from` on `to`, read-only, no setuid or devices.
fn bind_read_only(from: &str, to: &str) -> Result<(), AgentError> {
    let sys = |step: String| move |e| AgentError::Sys { step, source: e };
    mount(Some(from), to, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(sys(format!("bind {from} on {to}")))?;
    mount(
        None::<&str>,
        to,
        None::<&str>,
        MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map_err(sys(format!("make {to} read-only")))
}

/// Makes the agent's root (the mount points; `/moat` and the modules are
/// read-only binds already) read-only, once everything is mounted on it:
/// the workload can never overwrite the guest's moat, and the guest's `moat run` and `moat exec`
/// see their binary on a read-only mount and skip copying and
/// re-executing themselves (`moat-jail::selfexe`), one exec fewer under
/// emulation for every workload.
pub fn seal_root() -> Result<(), AgentError> {
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map_err(|e| AgentError::Sys {
        step: "make the agent's root read-only".into(),
        source: e,
    })
}

/// /dev, /proc, /sys, /run and the cgroup2 hierarchy the container tier
/// uses in the guest.
pub fn mount_kernel_filesystems() -> Result<(), AgentError> {
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
    mount_fs("devtmpfs", "/dev", MsFlags::MS_NOSUID, Some("mode=0755"))?;
    mount_fs("proc", "/proc", nodev | MsFlags::MS_NODEV, None)?;
    mount_fs("sysfs", "/sys", nodev | MsFlags::MS_NODEV, None)?;
    mount_fs(
        "tmpfs",
        "/run",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    // favordynmods: moving a process between cgroups (the container's
    // init joins its cgroup) takes a plain lock instead of waiting for an
    // RCU grace period (~9 ms of a TCG guest's run here); forks and exits
    // pay a little more, which a guest with one workload does not notice.
    // Kernels before 6.0 lack the option: mounted without it there.
    let cgroup_flags = nodev | MsFlags::MS_NODEV;
    if mount_fs(
        "cgroup2",
        "/sys/fs/cgroup",
        cgroup_flags,
        Some("favordynmods"),
    )
    .is_err()
    {
        mount_fs("cgroup2", "/sys/fs/cgroup", cgroup_flags, None)?;
    }
    mount_fs(
        "devpts",
        "/dev/pts",
        nodev,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )?;
    // /dev/ptmx for openpty: the devpts instance's own.
    let _ = std::fs::remove_file("/dev/ptmx");
    std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx").map_err(|e| AgentError::Io {
        step: "link /dev/ptmx".into(),
        source: e,
    })?;
    mount_fs(
        "tmpfs",
        "/dev/shm",
        nodev | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    Ok(())
}

/// Loads `names` from [`MODULE_DIR`] in order; one already loaded is fine.
/// Each gets its parameters from the kernel's command line, as modprobe
/// gives them (`virtio_mmio.device=…`: the VMM's devices, when the guest
/// has no ACPI tables that list them).
pub fn load_modules(names: &[&str]) -> Result<(), AgentError> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    for name in names {
        // Loaded already (a share port's guest loads virtio-fs before its
        // hello): the kernel would read and check the whole module again
        // before it found the duplicate (~26 ms for fuse under TCG).
        if loaded(name) {
            continue;
        }
        let path = Path::new(MODULE_DIR).join(format!("{name}.ko"));
        let file = std::fs::File::open(&path).map_err(|e| AgentError::Io {
            step: format!("open {}", path.display()),
            source: e,
        })?;
        let params = CString::new(module_params(&cmdline, name)).unwrap_or_default();
        match nix::kmod::finit_module(&file, &params, nix::kmod::ModuleInitFlags::empty()) {
            Ok(()) | Err(nix::Error::EEXIST) => super::trace(&format!("module {name} loaded")),
            Err(e) => {
                return Err(AgentError::Sys {
                    step: format!("load module {name}"),
                    source: e,
                })
            }
        }
    }
    Ok(())
}

/// Whether module `name` is loaded and live (sysfs names it with `_`).
fn loaded(name: &str) -> bool {
    let state = Path::new("/sys/module")
        .join(name.replace('-', "_"))
        .join("initstate");
    std::fs::read_to_string(state).is_ok_and(|s| s.trim() == "live")
}

/// The parameters the kernel command line `cmdline` gives module `name`
/// (`name.param=value` words, `-` and `_` alike in the name), joined by
/// spaces as `finit_module` takes them. Quoted values are not supported
/// (no VMM of moat's writes them). Words after `--` count too: QEMU
/// appends its `virtio_mmio.device=` words after the agent's own.
pub fn module_params(cmdline: &str, name: &str) -> String {
    let norm = |s: &str| s.replace('-', "_");
    let want = norm(name);
    cmdline
        .split_whitespace()
        .filter_map(|w| {
            let (module, param) = w.split_once('.')?;
            (norm(module) == want && !param.is_empty() && !param.starts_with('=')).then_some(param)
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Waits (bounded) for a device node to appear.
pub fn wait_for(path: &Path, limit: Duration) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if path.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    path.exists()
}

/// Where the agent channel is: the virtio serial port QEMU names
/// [`crate::proto::AGENT_PORT`] (`/dev/vportNpM`, found through sysfs), or
/// the console port of moat's own VMM ([`CHANNEL`], a tty).
fn find_channel() -> Option<(std::path::PathBuf, bool)> {
    if let Ok(rd) = std::fs::read_dir("/sys/class/virtio-ports") {
        for e in rd.flatten() {
            let named = std::fs::read_to_string(e.path().join("name"))
                .is_ok_and(|n| n.trim() == crate::proto::AGENT_PORT);
            let dev = Path::new("/dev").join(e.file_name());
            if named && dev.exists() {
                return Some((dev, false));
            }
        }
    }
    let console = Path::new(CHANNEL);
    console.exists().then(|| (console.to_path_buf(), true))
}

/// Opens the agent channel. A console port (/dev/hvc0) is a tty, which
/// would turn "\n" into "\r\n" and echo input: it is made raw, and as it
/// resets on last close, the agent keeps it open for its whole life.
pub fn open_channel() -> Result<OwnedFd, AgentError> {
    let end = Instant::now() + Duration::from_secs(30);
    let (path, tty) = loop {
        if let Some(found) = find_channel() {
            break found;
        }
        if Instant::now() >= end {
            return Err(AgentError::NoChannel);
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| AgentError::Io {
            step: format!("open {}", path.display()),
            source: e,
        })?;
    if !tty {
        return Ok(OwnedFd::from(f));
    }
    let mut t = rustix::termios::tcgetattr(&f).map_err(|e| AgentError::Io {
        step: "read the channel's modes".into(),
        source: e.into(),
    })?;
    t.make_raw();
    rustix::termios::tcsetattr(&f, rustix::termios::OptionalActions::Now, &t).map_err(|e| {
        AgentError::Io {
            step: "make the channel raw".into(),
            source: e.into(),
        }
    })?;
    Ok(OwnedFd::from(f))
}

/// The UUID of the ext4 filesystem on `dev` (its superblock at 1024, the
/// UUID at 0x68), if it has one.
pub fn ext4_uuid(dev: &Path) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(dev).ok()?;
    f.seek(SeekFrom::Start(1024)).ok()?;
    let mut sb = [0u8; 0x78];
    f.read_exact(&mut sb).ok()?;
    uuid_from_superblock(&sb)
}

/// The UUID in an ext4 superblock (magic 0xEF53 at 0x38).
pub fn uuid_from_superblock(sb: &[u8]) -> Option<String> {
    if sb.len() < 0x78 || sb[0x38] != 0x53 || sb[0x39] != 0xef {
        return None;
    }
    Some(sb[0x68..0x78].iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_params_come_from_the_command_line() {
        let c = "console=ttyS0 virtio_mmio.device=512@0xfeb00e00:12 virtio-mmio.device=4K@0xd0000000:5 \
                 virtio_rng.x=1 virtio_mmio.=bad virtio_mmio -- agent virtio_mmio.device=512@0xfeb00c00:11";
        assert_eq!(
            module_params(c, "virtio_mmio"),
            "device=512@0xfeb00e00:12 device=4K@0xd0000000:5 device=512@0xfeb00c00:11"
        );
        assert_eq!(module_params(c, "virtio-rng"), "x=1");
        assert_eq!(module_params(c, "overlay"), "");
        assert_eq!(module_params("", "virtio_mmio"), "");
    }

    #[test]
    fn superblock_uuid() {
        let mut sb = vec![0u8; 0x78];
        assert_eq!(uuid_from_superblock(&sb), None);
        sb[0x38] = 0x53;
        sb[0x39] = 0xef;
        sb[0x68] = 0xab;
        sb[0x77] = 0x01;
        let u = uuid_from_superblock(&sb).unwrap();
        assert_eq!(u.len(), 32);
        assert!(u.starts_with("ab") && u.ends_with("01"));
        assert_eq!(uuid_from_superblock(&sb[..0x70]), None);
    }
}
