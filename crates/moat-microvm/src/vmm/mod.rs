//! The VMM process: the container's OCI process. Forked by the runtime
//! into its own mount, PID, IPC, UTS and network namespaces, it waits for
//! the runtime to put it in the container's cgroup, jails itself
//! ([`crate::jail`]), starts the VMM as its only child, under the same
//! jail (QEMU; or a fork of itself running moat's own VMM, [`Backend::Builtin`],
//! which narrows its filter further first), and relays between the guest's agent and the host: its own
//! stdio is the container's, its control socket serves `start`, `kill` and
//! `exec`, and its exit status is the workload's (128+N for a signal), so
//! `moat run`, conmon and containerd's shim read the workload's status from
//! it as from any container process.
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::time::Duration;

mod boot;
pub mod qemu;
mod relay;
pub use relay::echo_oom;

pub use boot::RESTORE_TIMEOUT;

use crate::jail::JailPlan;
use crate::proto;

/// Which VMM runs the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// `qemu-system-x86_64 -M microvm` with this accelerator.
    Qemu { binary: PathBuf, accel: qemu::Accel },
    /// moat's own VMM (`moat-vmm`, [`crate::builtin`]) on KVM, in a child
    /// the VMM process forks: it executes nothing, and each of its threads
    /// runs under its role's filter.
    Builtin,
}

impl Backend {
    /// The guest kernel's command line on this backend.
    pub fn cmdline(&self) -> String {
        match self {
            Backend::Qemu { accel, .. } => qemu::cmdline(*accel),
            // moat's own VMM resets through its i8042 and adds the
            // `reboot=k` that asks for it.
            Backend::Builtin => qemu::guest_cmdline(qemu::Accel::Kvm, None),
        }
    }
}

/// The VMM's process (QEMU, or the child running moat's own VMM), reaped
/// once.
#[derive(Debug)]
pub struct VmChild {
    pid: nix::unistd::Pid,
    ended: bool,
}

impl VmChild {
    fn new(pid: i32) -> VmChild {
        VmChild {
            pid: nix::unistd::Pid::from_raw(pid),
            ended: false,
        }
    }

    /// Kills it (SIGKILL) unless it was reaped already.
    pub fn kill(&mut self) {
        if !self.ended {
            let _ = nix::sys::signal::kill(self.pid, nix::sys::signal::Signal::SIGKILL);
        }
    }

    /// Waits for its end (once).
    pub fn wait(&mut self) {
        while !self.ended {
            match nix::sys::wait::waitpid(self.pid, None) {
                Err(nix::Error::EINTR) => {}
                Ok(
                    nix::sys::wait::WaitStatus::Exited(..)
                    | nix::sys::wait::WaitStatus::Signaled(..),
                )
                | Err(_) => self.ended = true,
                Ok(_) => {}
            }
        }
    }

    /// Reaps it if it has ended (on SIGCHLD).
    pub fn reap_if_ended(&mut self) {
        if !self.ended {
            use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
            match waitpid(self.pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) | Err(_) => self.ended = true,
                Ok(_) => {}
            }
        }
    }
}

/// The host side of the guest's network device.
#[derive(Debug)]
pub enum GuestLink {
    /// A stream socket whose other end is the user-space stack (each
    /// Ethernet frame after its 4-byte big-endian length).
    Stream(OwnedFd),
    /// A TAP device beside the interface of a joined namespace, each
    /// redirected to the other ([`crate::podnet`]): one frame per read
    /// and write, after a virtio-net header ([`crate::podnet::make_tap`]),
    /// which either backend passes through to the guest's device with
    /// checksum and segmentation offloads.
    Tap(OwnedFd),
}

impl GuestLink {
    pub fn fd(&self) -> &OwnedFd {
        match self {
            GuestLink::Stream(fd) | GuestLink::Tap(fd) => fd,
        }
    }
}

/// The virtio-fs slots of a guest moat's own VMM saves or restores: its
/// read-write volumes (a pod's share among them), that many at most, as
/// QEMU's share ports ([`qemu::SHARE_PORTS`]). The VM's nineteen
/// interrupt lines (`moat_vmm::layout`, 5–23) hold a saved guest's six
/// disk slots, the entropy device, the balloon, the agent's console, the
/// network card and these eight.
pub const FS_SLOTS: usize = 8;

/// Everything the VMM process needs, prepared by the runtime before the
/// fork (so the VMM process opens nothing by path on the host).
#[derive(Debug)]
pub struct VmmPlan {
    pub backend: Backend,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    pub vcpus: u8,
    pub mem_mib: u64,
    /// Disk images, opened read-only, in the order the guest is told.
    pub disks: Vec<File>,
    /// The container's writable layer, opened read-write
    /// ([`crate::disk::scratch`]): the disk after `disks`, in a slot of
    /// its own ([`proto::RunRequest::scratch`]).
    pub scratch: Option<File>,
    /// With a kept layer's mirror (`proto::RunRequest::mirror_since`): the
    /// layer's stream file, opened for appending, where the relay writes
    /// the guest's [`proto::Kind::Mirror`] bytes.
    pub mirror: Option<File>,
    /// A tiny empty image for unused disk slots.
    pub spare: File,
    pub disk_slots: usize,
    pub run: proto::RunRequest,
    /// Run the container's process as soon as the agent answers (`launch`).
    pub autostart: bool,
    /// The container's process has a terminal: our stdio is its pty.
    pub terminal: bool,
    pub jail: JailPlan,
    /// Where the workload's end (status, OOM kills) is recorded for
    /// `events` after the VMM process is gone.
    pub events: File,
    /// How long the guest may take to answer.
    pub boot_timeout: Duration,
    /// Copy the guest's console to stderr (debugging).
    pub console: bool,
    /// Restore the cached snapshot, or save this boot as it.
    pub snapshot: SnapshotPlan,
    /// A snapshot saved now holds the guest with this run's disks mounted
    /// (they are all shared cached images: `snapshot::Identity::disks`).
    pub prime: bool,
    /// The guest's network device's host side.
    pub net: Option<GuestLink>,
    /// The TAPs of the guest's more network devices, beside the pod's
    /// other interfaces (`proto::GuestNet::extra`, in order).
    pub more_net: Vec<OwnedFd>,
    /// Make the device's host side a TAP of this name in the VMM process's
    /// own network namespace, before its jail: the engine's hooks put the
    /// container's interface there (Docker), and the runtime redirects it
    /// to the TAP once they ran ([`crate::podnet::take_into`]); the guest's
    /// configuration comes with [`crate::control::Go`].
    pub own_tap: Option<String>,
    /// Each read-write volume's vhost-user socket, connected to its
    /// virtiofsd ([`crate::volumes`]), in the order of `run.volumes`.
    pub volumes: Vec<OwnedFd>,
    /// QEMU only: the volumes (and the more network devices, with
    /// `hot_net`) are hot-added on a PCIe port once the guest said hello
    /// (restored, saved or cold alike) instead of being devices from the
    /// start, so that the guest before them can be saved and restored
    /// (QEMU saves no guest with a vhost-user device, and a snapshot's
    /// guest has the one network device), and volumes take no disk slot:
    /// each on a PCIe root port of its own ([`qemu::SHARE_PORTS`], the
    /// volumes' first), the guest's RAM a file the VMM process saves and
    /// loads itself.
    pub share_port: bool,
    /// moat's own VMM only: the guest's virtio-fs slots (0: one per
    /// volume). A saved or restored guest has [`FS_SLOTS`], placeholders
    /// (device ID 0) until the volumes fill them: at the restore, or after
    /// the save (the VMM process asks the VMM to show them); the guest's
    /// agent has its virtio-mmio driver probe them again.
    pub fs_slots: usize,
    /// With `share_port`: `more_net`'s devices are hot-added on the ports
    /// after the volumes' (they fit) rather than being there from the
    /// start.
    pub hot_net: bool,
    /// Connections made to the pod's `localhost`, passed to the guest
    /// ([`crate::portfwd`]): their listeners, and the link that steers
    /// them there (held, so that it lasts as long as this process).
    pub forward: Option<crate::portfwd::LocalForward>,
    /// The memory limit of the VMM's cgroup (bytes), when it has one: an
    /// OOM kill in the guest is echoed there once the VM is gone
    /// ([`relay::echo_oom`]), where engines look for one.
    pub cgroup_memory: Option<u64>,
    /// The host's `/proc/meminfo`, opened before the jail (which has no
    /// `/proc`): how much memory the host has available, read before an
    /// OOM kill is echoed.
    pub meminfo: Option<std::fs::File>,
}

/// What the VMM process does with snapshots ([`crate::snapshot`]).
#[derive(Debug)]
pub enum SnapshotPlan {
    /// Boot cold (why, for the debug log).
    Off(String),
    /// Restore this migration stream (opened read-only).
    Restore(File),
    /// Boot cold and save the booted guest into this file.
    Save(File),
}

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("jail")]
    Jail(#[from] crate::jail::JailError),
    #[error("cannot {step}")]
    Io {
        step: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot {step}")]
    Sys {
        step: String,
        #[source]
        source: nix::Error,
    },
    #[error("the guest did not answer within {secs} s{}", console_tail(.console))]
    BootTimeout { secs: u64, console: String },
    #[error("the VM ended before its agent answered{}", console_tail(.console))]
    VmEnded { console: String },
    #[error("agent protocol")]
    Proto(#[from] proto::ProtoError),
    #[error("the guest's agent refused: {0}")]
    Refused(String),
    #[error(
        "the guest's agent speaks protocol {theirs}, this moat {}",
        proto::VERSION
    )]
    Version { theirs: u32 },
}

fn console_tail(c: &str) -> String {
    let last: Vec<&str> = c.lines().rev().take(3).collect();
    if last.is_empty() {
        String::new()
    } else {
        let mut v = last;
        v.reverse();
        format!(" (guest console: {})", v.join(" | "))
    }
}

/// The VMM process's life; returns its exit status. `setup` is the
/// channel to the runtime ([`crate::control::Go`] in,
/// [`crate::control::Setup`] out),
/// `listener` the bound control socket.
pub fn main(
    mut plan: VmmPlan,
    setup: OwnedFd,
    listener: OwnedFd,
    one: moat_sys::process::OneThread,
) -> i32 {
    match start(&mut plan, &setup, &listener, &one) {
        Ok((booted, how)) => relay::Relay::new(plan, setup, listener, booted, how).run(&one),
        Err(e) => {
            let msg = crate::control::Setup::Failed {
                message: moat_core::error_chain(&e),
                exec_status: None,
            };
            let _ = crate::control::send(std::os::fd::AsFd::as_fd(&setup), &msg);
            255
        }
    }
}

/// Jails this process and gets the guest to its agent's hello: restored
/// from the snapshot, or booted cold.
fn start(
    plan: &mut VmmPlan,
    setup: &OwnedFd,
    listener: &OwnedFd,
    one: &moat_sys::process::OneThread,
) -> Result<(boot::Booted, crate::control::StartKind), VmmError> {
    if let Some(name) = &plan.own_tap {
        let tap = crate::podnet::make_tap(name).map_err(|source| VmmError::Io {
            step: format!("create the TAP device {name}"),
            source,
        })?;
        plan.net = Some(GuestLink::Tap(tap));
    }
    if plan.cgroup_memory.is_some() {
        plan.meminfo = std::fs::File::open("/proc/meminfo").ok();
    }
    let mut jail = plan.jail.clone();
    let mut keep: Vec<RawFd> = vec![
        setup.as_raw_fd(),
        listener.as_raw_fd(),
        plan.events.as_raw_fd(),
        plan.spare.as_raw_fd(),
    ];
    keep.extend(plan.disks.iter().map(|d| d.as_raw_fd()));
    keep.extend(plan.scratch.iter().map(|d| d.as_raw_fd()));
    keep.extend(plan.mirror.iter().map(|d| d.as_raw_fd()));
    keep.extend(plan.net.as_ref().map(|n| n.fd().as_raw_fd()));
    keep.extend(plan.more_net.iter().map(|n| n.as_raw_fd()));
    keep.extend(plan.volumes.iter().map(|v| v.as_raw_fd()));
    keep.extend(plan.meminfo.as_ref().map(|m| m.as_raw_fd()));
    if let Some(f) = &plan.forward {
        keep.push(f.link.as_raw_fd());
        keep.extend(f.listeners.iter().map(|l| l.as_raw_fd()));
    }
    match &plan.snapshot {
        SnapshotPlan::Restore(f) | SnapshotPlan::Save(f) => keep.push(f.as_raw_fd()),
        SnapshotPlan::Off(_) => {}
    }
    let mut channels = boot::Channels::new(plan)?;
    channels.relay_fds = vec![
        setup.as_raw_fd(),
        listener.as_raw_fd(),
        plan.events.as_raw_fd(),
    ];
    keep.extend(channels.fds());
    jail.keep_fds = keep;
    jail.enter()?;
    // Wait until the runtime has put us in the cgroup (it says so with one
    // byte, or closes the channel when it gave up) before anything of the
    // VM's is allocated. The jail is built meanwhile: on a cgroup v1 host
    // the move into the cpu controller's group waits for an RCU grace
    // period (~12 ms here). With it, the guest's network when the engine's
    // hooks gave this process's namespace one (`own_tap`).
    let go: crate::control::Go = crate::control::recv(setup.as_fd()).map_err(|e| VmmError::Io {
        step: "wait for the runtime".into(),
        source: match e {
            crate::control::ControlError::Closed => std::io::Error::other("the runtime gave up"),
            e => std::io::Error::other(moat_core::error_chain(&e)),
        },
    })?;
    if go.net.is_some() {
        plan.run.net = go.net;
    }
    boot::boot(plan, &mut channels, one)
}
