//! The VMM process: the container's OCI process. Forked by the runtime
//! into its own mount, PID, IPC, UTS and network namespaces, it waits for
//! the runtime to put it in the container's cgroup, jails itself
//! ([`crate::jail`]), starts the VMM (QEMU as its only child, under the
//! same jail), and relays between the guest's agent and the host: its own
//! stdio is the container's, its control socket serves `start`, `kill` and
//! `exec`, and its exit status is the workload's (128+N for a signal), so
//! `moat run`, conmon and containerd's shim read the workload's status from
//! it as from any container process.
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub mod qemu;
mod relay;

use crate::jail::JailPlan;
use crate::proto;

/// Which VMM runs the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// `qemu-system-x86_64 -M microvm` with this accelerator.
    Qemu { binary: PathBuf, accel: qemu::Accel },
}

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
/// channel to the runtime (`Go` in, [`crate::control::Setup`] out),
/// `listener` the bound control socket.
pub fn main(plan: VmmPlan, setup: OwnedFd, listener: OwnedFd) -> i32 {
    // Wait until the runtime has put us in the cgroup (it says so with one
    // byte, or closes the channel when it gave up).
    let mut go = [0u8; 1];
    if !matches!(nix::unistd::read(&setup, &mut go), Ok(1)) {
        return 255;
    }
    match start(&plan, &setup, &listener) {
        Ok((vm, agent, serial)) => {
            relay::Relay::new(plan, setup, listener, vm, agent, serial).run()
        }
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

/// Jails this process and starts the VM: the child, our end of the agent
/// channel, and the console pipe.
fn start(
    plan: &VmmPlan,
    setup: &OwnedFd,
    listener: &OwnedFd,
) -> Result<(Child, File, File), VmmError> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(|e| VmmError::Io {
        step: "create the agent channel".into(),
        source: e,
    })?;
    let mut jail = plan.jail.clone();
    let mut keep: Vec<RawFd> = vec![
        setup.as_raw_fd(),
        listener.as_raw_fd(),
        ours.as_raw_fd(),
        theirs.as_raw_fd(),
        plan.events.as_raw_fd(),
        plan.spare.as_raw_fd(),
    ];
    keep.extend(plan.disks.iter().map(|d| d.as_raw_fd()));
    jail.keep_fds = keep;
    jail.enter()?;
    let Backend::Qemu { binary, accel } = &plan.backend;
    let args = qemu::QemuArgs {
        accel: *accel,
        kernel: plan.kernel.clone(),
        initrd: plan.initrd.clone(),
        cmdline: plan.cmdline.clone(),
        vcpus: plan.vcpus,
        mem_mib: plan.mem_mib,
        agent_fd: theirs.as_raw_fd(),
        disk_fds: plan.disks.iter().map(|d| d.as_raw_fd()).collect(),
        incoming_fd: None,
        qmp_fd: None,
        disk_slots: plan.disk_slots,
        spare_fd: plan.spare.as_raw_fd(),
    };
    // QEMU inherits exactly these (everything else is close-on-exec).
    let inherit: Vec<RawFd> = std::iter::once(theirs.as_raw_fd())
        .chain(plan.disks.iter().map(|d| d.as_raw_fd()))
        .chain(std::iter::once(plan.spare.as_raw_fd()))
        .collect();
    for fd in &inherit {
        moat_sys::fd::set_cloexec(*fd, false).map_err(|e| VmmError::Io {
            step: "pass a descriptor to QEMU".into(),
            source: e,
        })?;
    }
    let (serial_r, serial_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| VmmError::Sys {
            step: "create the console pipe".into(),
            source: e,
        })?;
    let child = Command::new(binary)
        .args(args.build())
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::from(serial_w.try_clone().map_err(|e| {
            VmmError::Io {
                step: "duplicate the console pipe".into(),
                source: e,
            }
        })?))
        .stderr(Stdio::from(serial_w))
        .spawn()
        .map_err(|e| VmmError::Io {
            step: format!("start {}", binary.display()),
            source: e,
        })?;
    drop(theirs);
    for fd in &inherit {
        let _ = moat_sys::fd::set_cloexec(*fd, true);
    }
    Ok((child, File::from(OwnedFd::from(ours)), File::from(serial_r)))
}
