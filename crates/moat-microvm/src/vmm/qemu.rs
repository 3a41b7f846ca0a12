//! The QEMU backend's command line: `qemu-system-x86_64 -M microvm` with
//! the same devices moat's own VMM offers (virtio-mmio block, rng, console
//! for the agent; COM1 for the kernel's messages), every host resource
//! handed over as an inherited descriptor (disks through `-add-fd` fd sets,
//! the agent channel as a connected socket), so QEMU opens nothing on the
//! host but its kernel, initramfs and firmware, which its jail holds.
use std::ffi::OsString;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use crate::proto;

pub use moat_vmm::qemu::Accel;

/// The network device's host side, by descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetFd {
    /// A stream socket to the user-space stack (length-prefixed frames).
    Stream(RawFd),
    /// A TAP device (one frame per read and write).
    Tap(RawFd),
}

/// What the command line needs.
#[derive(Debug, Clone)]
pub struct QemuArgs {
    pub accel: Accel,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    pub vcpus: u8,
    pub mem_mib: u64,
    /// The agent channel: a connected stream socket.
    pub agent_fd: RawFd,
    /// Disk images, opened read-only.
    pub disk_fds: Vec<RawFd>,
    /// The container's writable layer (`disk::scratch`), opened
    /// read-write: the disk after `disk_fds`, the only one the guest may
    /// write.
    pub scratch_fd: Option<RawFd>,
    /// Restore from a migration stream on this descriptor.
    pub incoming_fd: Option<RawFd>,
    /// A QMP monitor on this connected socket (to save a snapshot).
    pub qmp_fd: Option<RawFd>,
    /// Slots for disks: a snapshot's VM must have the devices it was
    /// saved with, so runs attach at least this many (unused ones are
    /// backed by `spare_fd`, an empty image).
    pub disk_slots: usize,
    pub spare_fd: RawFd,
    /// A virtio-net device whose frames go over this connected stream
    /// socket (4-byte big-endian length, frame), to the user-space stack.
    pub net: Option<NetFd>,
    /// Read-write volumes: each a vhost-user socket connected to its
    /// virtiofsd, tagged [`crate::guestspec::volume_tag`] in order.
    pub volume_fds: Vec<RawFd>,
    /// More network devices from the start, each on a TAP (a pod's other
    /// interfaces), the `k`-th with [`crate::proto::extra_device_mac`]`(k)`
    /// (none when they are hot-added: [`hot_add_nic`]).
    pub more_tap_fds: Vec<RawFd>,
    /// The volumes (and the more network devices, `VmmPlan::hot_net`)
    /// are hot-added later ([`hot_add_volume`], [`hot_add_nic`]) on PCIe
    /// ports the VM has from the start: only the volumes' sockets are on
    /// the command line (`VmmPlan::share_port`).
    pub share_port: bool,
}

/// The guest's RAM as a file in the jail's RAM tmpfs, with a share port.
pub const RAM_FILE: &str = "/ram/guest";

/// How many PCIe root ports a guest with hot-added devices has (one
/// snapshot serves runs with one to this many read-write volumes and more
/// network interfaces together).
pub const SHARE_PORTS: usize = 8;

/// The PCIe root port `i`: volume `i` is hot-added on it, and the more
/// network devices on the ports after the volumes'.
pub fn share_port_id(i: usize) -> String {
    format!("moatport{i}")
}

/// The QMP command that hot-adds volume `i` (its socket is the chardev
/// `fs<i>` of the command line) on its port: a virtio-fs device on the
/// virtio PCI transport, tagged as a cold-plugged one would be.
pub fn hot_add_volume(i: usize) -> serde_json::Value {
    serde_json::json!({
        "execute": "device_add",
        "arguments": {
            "driver": "vhost-user-fs-pci",
            "id": format!("fsdev{i}"),
            "bus": share_port_id(i),
            "chardev": format!("fs{i}"),
            "tag": crate::guestspec::volume_tag(i),
        }
    })
}

/// The QMP commands that hot-add the `k`-th more network device on share
/// port `port`: its back end, the TAP QEMU inherited as descriptor `fd`
/// (a netdev named on the command line without a device would have QEMU
/// warn on the workload's stderr that it has no peer), then a virtio-net
/// card on the virtio PCI transport with the address the agent finds it
/// by ([`crate::proto::extra_device_mac`]) and the stack's MTU, as a
/// cold-plugged one has.
pub fn hot_add_nic(k: usize, port: usize, fd: RawFd) -> [serde_json::Value; 2] {
    let mac = proto::mac_text(proto::extra_device_mac(k));
    [
        serde_json::json!({
            "execute": "netdev_add",
            "arguments": {
                "type": "tap",
                "id": format!("net{}", k + 1),
                "fd": fd.to_string(),
                "vhost": false,
            }
        }),
        serde_json::json!({
            "execute": "device_add",
            "arguments": {
                "driver": "virtio-net-pci",
                "id": format!("nicdev{k}"),
                "bus": share_port_id(port),
                "netdev": format!("net{}", k + 1),
                "mac": mac,
                "host_mtu": moat_net::NetConfig::default().mtu,
                // No option ROM (a boot firmware's driver): the jail has
                // no ROM files, and the guest boots without firmware.
                "romfile": "",
            }
        }),
    ]
}

/// The guest's Ethernet address (locally administered, "moat" and 0x64).
pub const GUEST_MAC: &str = "02:6d:6f:61:74:64";
/// [`GUEST_MAC`] as bytes (moat's own VMM takes them).
pub const GUEST_MAC_BYTES: [u8; 6] = [0x02, 0x6d, 0x6f, 0x61, 0x74, 0x64];

/// TCG's translation cache, in MiB: bounds QEMU's memory beyond the guest.
pub const TCG_TB_MIB: u64 = 64;

impl QemuArgs {
    pub fn build(&self) -> Vec<OsString> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |s: &[&str]| a.extend(s.iter().map(|x| x.to_string()));
        // ACPI stays on although a trivial TCG boot without it took ~1.1 s
        // instead of ~1.5 s here: its tables are how the guest finds the
        // virtio-mmio devices, and Debian's kernels lack
        // VIRTIO_MMIO_CMDLINE_DEVICES (the `virtio_mmio.device=` words
        // QEMU appends without ACPI).
        // vhost-user devices (virtio-fs) map the guest's RAM in virtiofsd:
        // it must be shared then, and the transports modern (the legacy
        // virtio-mmio QEMU's microvm defaults to is not something
        // vhost-user backends serve). They are hot-added on the share
        // ports, which need the PCIe host bridge (`pcie=on`): volumes come
        // with `share_port`.
        let mut machine = String::from("microvm,x-option-roms=off,rtc=on,isa-serial=on");
        if self.share_port {
            machine.push_str(",memory-backend=mem,pcie=on");
        }
        push(&["-M", &machine]);
        if self.share_port {
            // A file of the jail's RAM tmpfs that the VMM process saves
            // and restores itself (QEMU's migration leaves shared RAM out
            // with `x-ignore-shared`: a restore into a memfd read every
            // zero page of the stream in, which allocated the guest's
            // whole RAM).
            let backend = format!(
                "memory-backend-file,id=mem,size={}M,share=on,mem-path={RAM_FILE}",
                self.mem_mib
            );
            push(&[
                "-object",
                &backend,
                "-global",
                "virtio-mmio.force-legacy=false",
            ]);
        }
        match self.accel {
            Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
            Accel::Tcg => push(&[
                "-accel",
                &format!("tcg,tb-size={TCG_TB_MIB}"),
                "-cpu",
                moat_vmm::qemu::TCG_CPU,
            ]),
        }
        push(&["-m", &format!("{}M", self.mem_mib)]);
        push(&["-smp", &self.vcpus.to_string()]);
        push(&[
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        ]);
        // COM1 is QEMU's stdout (a pipe the VMM process reads).
        push(&[
            "-chardev",
            "stdio,id=serial0,signal=off",
            "-serial",
            "chardev:serial0",
        ]);
        push(&["-kernel", &self.kernel.to_string_lossy()]);
        push(&["-initrd", &self.initrd.to_string_lossy()]);
        push(&["-append", &self.cmdline]);
        let disks = self.disk_fds.len() + usize::from(self.scratch_fd.is_some());
        for i in 0..self.disk_slots.max(disks) {
            let scratch = self.scratch_fd.filter(|_| i == self.disk_fds.len());
            let fd = self
                .disk_fds
                .get(i)
                .copied()
                .or(scratch)
                .unwrap_or(self.spare_fd);
            let set = i + 1;
            // Read-write: opened so at once (QEMU would open it read-only
            // first, which the one read-write descriptor cannot serve).
            // Its discards punch holes in the file (the guest mounts it
            // with `discard`).
            let readonly = if scratch.is_some() {
                "off,auto-read-only=off,discard=unmap"
            } else {
                "on"
            };
            push(&["-add-fd", &format!("fd={fd},set={set}")]);
            push(&[
                "-drive",
                &format!("id=vd{i},if=none,format=raw,readonly={readonly},file=/dev/fdset/{set}"),
                "-device",
                &format!("virtio-blk-device,drive=vd{i}"),
            ]);
        }
        push(&[
            "-object",
            "rng-builtin,id=rng0",
            "-device",
            "virtio-rng-device,rng=rng0",
            // The guest reports the memory it frees, 2 MiB blocks at a
            // time, and QEMU hands it back to the host (the cgroup the
            // guest's memory is charged to): nothing else of the balloon
            // (no target size, no statistics).
            "-device",
            "virtio-balloon-device,free-page-reporting=on",
            "-chardev",
            &format!("socket,id=agent,fd={}", self.agent_fd),
            "-device",
            // Port 0 is kept for a console port: the agent's is port 1.
            "virtio-serial-device,max_ports=2",
            "-device",
            &format!("virtserialport,chardev=agent,name={}", proto::AGENT_PORT),
        ]);
        if let Some(net) = self.net {
            let netdev = match net {
                NetFd::Stream(fd) => {
                    format!("stream,id=net0,server=off,addr.type=fd,addr.str={fd}")
                }
                // No vhost: the VMM's jail has no /dev/vhost-net, and its
                // filter no such requests. QEMU finds the TAP's virtio-net
                // header on the descriptor (`IFF_VNET_HDR`: `vnet_hdr=` is
                // refused with `fd=`) and then offers the guest checksum
                // and segmentation offloads.
                NetFd::Tap(fd) => format!("tap,id=net0,fd={fd},vhost=off"),
            };
            // host_mtu: the guest's device offers the stack's MTU (large
            // frames, fewer of them through the emulated device); the
            // agent sets eth0's own (a pod interface's is smaller). The
            // same arguments either way; the offloads a TAP's header
            // brings key its snapshots apart (`snapshot::NetDevice`).
            push(&[
                "-netdev",
                &netdev,
                "-device",
                &format!(
                    "virtio-net-device,netdev=net0,mac={GUEST_MAC},host_mtu={}",
                    moat_net::NetConfig::default().mtu
                ),
            ]);
        }
        for (k, fd) in self.more_tap_fds.iter().enumerate() {
            let mac = proto::mac_text(proto::extra_device_mac(k));
            push(&[
                "-netdev",
                &format!("tap,id=net{},fd={fd},vhost=off", k + 1),
                "-device",
                &format!(
                    "virtio-net-device,netdev=net{},mac={mac},host_mtu={}",
                    k + 1,
                    moat_net::NetConfig::default().mtu
                ),
            ]);
        }
        if self.share_port {
            // Empty slots (their hotplug controllers' power off): a device
            // added there later is probed as its slot powers on.
            for i in 0..SHARE_PORTS {
                push(&[
                    "-device",
                    &format!(
                        "pcie-root-port,id={},bus=pcie.0,chassis={},slot=1",
                        share_port_id(i),
                        i + 1
                    ),
                ]);
            }
        }
        // Hot-added on the share ports ([`hot_add_volume`]).
        for (i, fd) in self.volume_fds.iter().enumerate() {
            push(&["-chardev", &format!("socket,id=fs{i},fd={fd}")]);
        }
        if let Some(fd) = self.qmp_fd {
            push(&[
                "-chardev",
                &format!("socket,id=qmp,fd={fd}"),
                "-mon",
                "chardev=qmp,mode=control",
            ]);
        }
        if let Some(fd) = self.incoming_fd {
            // No self-announcement after the restore: QEMU would send RARP
            // frames from the snapshot's MAC (the same in every snapshot,
            // not the interface's the agent is about to set) onto a pod's
            // wire, five over ~0.8 s, and have the guest send gratuitous
            // ARPs. A migrated guest needs them to redirect its peers; a
            // restored one is new on its wire, as a cold-booted one is.
            // With a share port the monitor first sets `x-ignore-shared`
            // (QEMU 7.2 takes it no other way) and then names the stream
            // (`migrate-incoming`).
            let incoming = if self.share_port {
                "defer".to_string()
            } else {
                format!("fd:{fd}")
            };
            push(&[
                "-global",
                "migration.announce-rounds=0",
                "-incoming",
                &incoming,
            ]);
        }
        a.into_iter().map(OsString::from).collect()
    }
}

/// Built-in initializers of Debian's cloud kernel the guest does without,
/// skipped with `initcall_blacklist=`. Under TCG they took ~300 ms of a
/// boot (`initcall_debug`, 2026-12-04): kprobe-based trace events (165 ms;
/// no one traces the guest's kernel), the CUBIC congestion control (49 ms;
/// TCP falls back to Reno, which the user-space stack's link does not
/// notice), the KDF108 self-test (25 ms; nothing in the guest uses it), the
/// CMOS clock's driver (17 ms; the agent sets the clock from the host's at
/// every run) and VGA arbitration (12 ms; there is no VGA). And, measured
/// the same way on 2026-12-05 (~36 ms together): the ACPI Generic Event
/// Device's driver (10 ms; it delivers QEMU's power-button event, and moat
/// ends its VMs from the agent or by ending QEMU, never by the button),
/// BLAKE2s's boot self-test (7 ms; only the test is skipped, the code stays
/// in use), the trace_printk file in tracefs (6 ms), TOMOYO's securityfs
/// interface (5 ms; TOMOYO is not enabled), /dev/snapshot for hibernation
/// (3 ms) and the "encrypted" key type (2 ms; `moat run`'s seccomp profile
/// allows no key syscalls).
pub const SKIPPED_INITCALLS: &[&str] = &[
    "init_kprobe_trace",
    "cubictcp_register",
    "crypto_kdf108_init",
    "cmos_init",
    "vga_arb_device_init",
    "ged_driver_init",
    "blake2s_mod_init",
    "init_trace_printk_function_export",
    "tomoyo_initerface_init",
    "snapshot_device_init",
    "init_encrypted",
];

/// The guest kernel's command line under QEMU: [`guest_cmdline`] with a
/// triple fault on reboot (`reboot=t`: QEMU's microvm has no keyboard
/// controller).
pub fn cmdline(accel: Accel) -> String {
    guest_cmdline(accel, Some("reboot=t"))
}

/// The guest kernel's command line: quiet, the agent as init, `reboot`'s
/// method when given (moat's own VMM adds its own, `reboot=k`), the
/// initializers the guest does without ([`SKIPPED_INITCALLS`]), no test
/// of the IO-APIC's timer interrupt (`no_timer_check`: it waits for PIT
/// ticks, ~200 ms of a TCG boot here; QEMU's timer routing is known good),
/// the TSC rate under TCG and the TSC as a reliable clocksource there.
pub fn guest_cmdline(accel: Accel, reboot: Option<&str>) -> String {
    let mut c = String::from("console=ttyS0 quiet panic=-1");
    if let Some(r) = reboot {
        c.push(' ');
        c.push_str(r);
    }
    c.push_str(
        " nomodeset cryptomgr.notests random.trust_cpu=on 8250.nr_uarts=1 no_timer_check rdinit=/moat",
    );
    c.push_str(" initcall_blacklist=");
    c.push_str(&SKIPPED_INITCALLS.join(","));
    if accel == Accel::Tcg {
        if let Some(khz) = moat_vmm::qemu::host_khz() {
            c.push_str(&format!(" tsc_early_khz={khz}"));
        }
        // TCG's TSC is QEMU's own monotonic counter. Without this the
        // clocksource watchdog marks it unstable (after a snapshot restore
        // above all) and the guest falls back to jiffies: a 4 ms clock,
        // which makes the workload's timings (`moat bench`) read 0.
        c.push_str(" tsc=reliable");
    }
    c.push_str(" -- ");
    c.push_str(crate::agent::SUBCOMMAND);
    c
}

/// The host files QEMU reads: its binary, the shared libraries `ldd`
/// names, the dynamic linker's cache and QEMU's firmware directory. The
/// jail binds exactly these.
pub fn host_files(qemu: &Path) -> Result<Vec<PathBuf>, String> {
    let out = std::process::Command::new("ldd")
        .arg(qemu)
        .output()
        .map_err(|e| format!("cannot run ldd on {}: {e}", qemu.display()))?;
    if !out.status.success() {
        return Err(format!("ldd {} failed", qemu.display()));
    }
    let mut files = vec![qemu.to_owned()];
    files.extend(ldd_paths(&String::from_utf8_lossy(&out.stdout)));
    for extra in [
        "/etc/ld.so.cache",
        "/usr/share/qemu",
        "/usr/share/seabios",
        // Debian builds TCG as a QEMU module.
        "/usr/lib/x86_64-linux-gnu/qemu/accel-tcg-x86_64.so",
        "/usr/lib64/qemu/accel-tcg-x86_64.so",
    ] {
        if Path::new(extra).exists() {
            files.push(PathBuf::from(extra));
        }
    }
    Ok(files)
}

/// [`host_files`], remembered in `cache` (`qemu-files-<key>`, keyed by
/// the QEMU binary's and the dynamic linker cache's path, size, mtime and
/// inode: an upgrade of either asks `ldd` again). Saves running `ldd`
/// (~40 ms) on every create.
pub fn host_files_cached(cache: &Path, qemu: &Path) -> Result<Vec<PathBuf>, String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"moat-qemu-files-1");
    let ld_cache = Path::new("/etc/ld.so.cache");
    for p in std::iter::once(qemu).chain(ld_cache.exists().then_some(ld_cache)) {
        crate::assets::stat_key(&mut h, p).map_err(|e| moat_core::error_chain(&e))?;
    }
    let key = crate::assets::short_key(h);
    let path = cache.join(format!("qemu-files-{key}"));
    if let Ok(text) = std::fs::read_to_string(&path) {
        let files: Vec<PathBuf> = text.lines().map(PathBuf::from).collect();
        if files.first().is_some_and(|f| f == qemu) && files.iter().all(|f| f.exists()) {
            return Ok(files);
        }
    }
    let files = host_files(qemu)?;
    let text: String = files
        .iter()
        .filter_map(|f| f.to_str())
        .map(|f| format!("{f}\n"))
        .collect();
    // Best effort: without the record the next create asks ldd again.
    let tmp = cache.join(format!(".qemu-files-{key}.{}.tmp", std::process::id()));
    if std::fs::write(&tmp, text).is_ok() && std::fs::rename(&tmp, &path).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    Ok(files)
}

/// The absolute paths in `ldd` output.
pub fn ldd_paths(text: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for l in text.lines() {
        let path = match l.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => l.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            out.push(PathBuf::from(p));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_names_qemus_reset_only_for_qemu() {
        let q = cmdline(Accel::Kvm);
        assert!(
            q.starts_with("console=ttyS0 quiet panic=-1 reboot=t nomodeset "),
            "{q}"
        );
        assert!(q.ends_with(" -- microvm-agent"), "{q}");
        let own = crate::Backend::Builtin.cmdline();
        assert_eq!(own, q.replace(" reboot=t", ""));
    }

    #[test]
    fn ldd_output_is_parsed() {
        let t = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x1)\n\t/lib64/ld-linux-x86-64.so.2 (0x2)\n\tlibgone.so => not found\n";
        assert_eq!(
            ldd_paths(t),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libz.so.1"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
    }

    #[test]
    fn qemus_files_are_remembered_until_they_change() {
        let qemu = Path::new("/usr/bin/qemu-system-x86_64");
        assert!(qemu.is_file(), "scripts/deps installs qemu-system-x86");
        let cache = tempfile::tempdir().unwrap();
        let fresh = host_files(qemu).unwrap();
        assert_eq!(host_files_cached(cache.path(), qemu).unwrap(), fresh);
        let record: Vec<PathBuf> = std::fs::read_dir(cache.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert_eq!(record.len(), 1, "{record:?}");
        assert_eq!(host_files_cached(cache.path(), qemu).unwrap(), fresh);
        // A record naming a file that is gone is not trusted.
        std::fs::write(&record[0], "/usr/bin/qemu-system-x86_64\n/gone.so\n").unwrap();
        assert_eq!(host_files_cached(cache.path(), qemu).unwrap(), fresh);
        assert!(!std::fs::read_to_string(&record[0])
            .unwrap()
            .contains("gone"));
    }

    #[test]
    fn arguments_pass_everything_by_descriptor() {
        let q = QemuArgs {
            more_tap_fds: Vec::new(),
            accel: Accel::Tcg,
            kernel: "/k".into(),
            initrd: "/i".into(),
            cmdline: cmdline(Accel::Tcg),
            vcpus: 2,
            mem_mib: 300,
            agent_fd: 5,
            disk_fds: vec![6, 7],
            scratch_fd: None,
            incoming_fd: Some(9),
            qmp_fd: None,
            disk_slots: 3,
            spare_fd: 8,
            net: Some(NetFd::Stream(10)),
            volume_fds: Vec::new(),
            share_port: false,
        };
        let a: Vec<String> = q
            .build()
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        let after = |flag: &str| a[a.iter().position(|x| x == flag).unwrap() + 1].clone();
        assert_eq!(after("-accel"), format!("tcg,tb-size={TCG_TB_MIB}"));
        assert_eq!(after("-m"), "300M");
        assert!(
            after("-append").ends_with("rdinit=/moat -- microvm-agent")
                || after("-append").contains("-- microvm-agent")
        );
        assert!(a.contains(&"fd=6,set=1".to_string()));
        assert!(
            a.contains(&"fd=8,set=3".to_string()),
            "the unused slot is the spare: {a:?}"
        );
        assert!(a.contains(&"socket,id=agent,fd=5".to_string()));
        assert_eq!(after("-incoming"), "fd:9");
        assert_eq!(after("-global"), "migration.announce-rounds=0");
        assert_eq!(
            after("-netdev"),
            "stream,id=net0,server=off,addr.type=fd,addr.str=10"
        );
        let tap = QemuArgs {
            net: Some(NetFd::Tap(11)),
            more_tap_fds: vec![13],
            ..q.clone()
        };
        let a: Vec<String> = tap
            .build()
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        let netdev = a[a.iter().position(|x| x == "-netdev").unwrap() + 1].clone();
        assert_eq!(netdev, "tap,id=net0,fd=11,vhost=off");
        assert!(after("-device").starts_with("virtio-blk-device"));
        assert!(a
            .iter()
            .any(|x| x.starts_with("virtio-net-device,netdev=net0,")));
        // A pod's second interface: a device of its own, found in the
        // guest by its address.
        assert!(a.contains(&"tap,id=net1,fd=13,vhost=off".to_string()));
        assert!(a
            .iter()
            .any(|x| x.starts_with("virtio-net-device,netdev=net1,mac=02:6d:6f:61:75:00,")));
        assert!(a.iter().any(|x| x.starts_with("on,obsolete=deny")));
        assert!(!a
            .iter()
            .any(|x| x.contains("file=/") && !x.contains("/dev/fdset/")));
        assert!(!a.iter().any(|x| x.contains("memory-backend")));
        assert!(!a.iter().any(|x| x.contains("pcie")));
        // Read-write volumes, on share ports: the PCIe bridge and empty
        // root ports, the volumes' sockets but no device (each is
        // hot-added), the guest's RAM a shared file of the same size,
        // modern transports.
        let p = QemuArgs {
            volume_fds: vec![11, 12],
            share_port: true,
            ..q
        };
        let a: Vec<String> = p
            .build()
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        let machine = &a[a.iter().position(|x| x == "-M").unwrap() + 1];
        assert!(machine.contains(",memory-backend=mem") && machine.contains(",pcie=on"));
        assert!(a.contains(&"pcie-root-port,id=moatport0,bus=pcie.0,chassis=1,slot=1".to_string()));
        assert!(a.contains(&"pcie-root-port,id=moatport7,bus=pcie.0,chassis=8,slot=1".to_string()));
        assert_eq!(
            a.iter().filter(|x| x.starts_with("pcie-root-port")).count(),
            SHARE_PORTS
        );
        assert!(a.contains(&"socket,id=fs0,fd=11".to_string()));
        assert!(a.contains(&"socket,id=fs1,fd=12".to_string()));
        assert!(!a.iter().any(|x| x.starts_with("vhost-user-fs")));
        assert!(a.contains(&"virtio-mmio.force-legacy=false".to_string()));
        assert!(a.contains(&format!(
            "memory-backend-file,id=mem,size=300M,share=on,mem-path={RAM_FILE}"
        )));
        assert_eq!(
            a[a.iter().position(|x| x == "-incoming").unwrap() + 1],
            "defer"
        );
        let add = hot_add_volume(0);
        assert_eq!(add["arguments"]["chardev"], "fs0");
        assert_eq!(add["arguments"]["bus"], "moatport0");
        assert_eq!(hot_add_volume(2)["arguments"]["bus"], "moatport2");
        assert_eq!(add["arguments"]["tag"], "moatfs0");
        // A pod's second interface hot-added: its netdev named by the
        // monitor on the TAP QEMU inherited, its card on a port.
        let [netdev, card] = hot_add_nic(0, 1, 13);
        assert_eq!(netdev["execute"], "netdev_add");
        assert_eq!(netdev["arguments"]["type"], "tap");
        assert_eq!(netdev["arguments"]["id"], "net1");
        assert_eq!(netdev["arguments"]["fd"], "13");
        assert_eq!(netdev["arguments"]["vhost"], false);
        assert_eq!(card["execute"], "device_add");
        assert_eq!(card["arguments"]["driver"], "virtio-net-pci");
        assert_eq!(card["arguments"]["netdev"], "net1");
        assert_eq!(card["arguments"]["bus"], "moatport1");
        assert_eq!(card["arguments"]["mac"], "02:6d:6f:61:75:00");
        assert_eq!(card["arguments"]["romfile"], "");
        assert_eq!(hot_add_nic(2, 3, 20)[0]["arguments"]["id"], "net3");
    }
}
