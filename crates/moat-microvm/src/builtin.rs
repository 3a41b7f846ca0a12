//! moat's own VMM (`moat-vmm`) under the jailer. The tier's VMM process
//! runs it through [`run`] in a child of its own ([`crate::vmm`],
//! `Backend::Builtin`: design.md, "Which VMM"), with the jail `create`
//! builds; [`jail_plan`] is the same jail for a caller that runs a VM of
//! its own configuration in the calling process (the tests).
//!
//! [`jail_plan`] derives the jail from the VM's configuration: a root
//! holding, read-only, only the kernel, the initramfs, the disk images the
//! VM opens by path (none, when the caller opened them: `BlockConfig::file`)
//! and `/dev/kvm`; the descriptors it was handed (COM1's output, the agent
//! and network sockets, the virtio-fs back-ends', the opened disks) kept,
//! every other one closed; the
//! group that may open `/dev/kvm`; and the process filter
//! [`seccomp::builtin_setup_profile`] (KVM's ioctls only, threads but no
//! processes, no sockets of its own). [`run`] then builds the VM and runs
//! it with each thread under its role's filter, the calling thread's
//! included once the others have started.
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use moat_vmm::{ExitReason, Kernel, Vm, VmConfig, VmmError};

use crate::jail::JailPlan;
use crate::{seccomp, MicrovmError};

/// The device the VMM opens.
pub const KVM: &str = "/dev/kvm";

/// The jail for running `config` as host user `uid`/`gid`, its root
/// mounted on the empty directory `root`.
pub fn jail_plan(
    config: &VmConfig,
    root: &Path,
    uid: u32,
    gid: u32,
) -> Result<JailPlan, MicrovmError> {
    let mut files: Vec<PathBuf> = Vec::new();
    if let Kernel::Linux(k) = &config.kernel {
        files.push(k.clone());
    }
    files.extend(config.initrd.iter().cloned());
    // Disks the caller opened are descriptors the VM holds: not in the root.
    files.extend(
        config
            .block
            .iter()
            .filter(|b| b.file.is_none())
            .map(|b| b.path.clone()),
    );
    let kvm_gid = std::fs::metadata(KVM)
        .map_err(MicrovmError::io(format!("stat {KVM}")))?
        .gid();
    let mut keep_fds = Vec::new();
    keep_fds.extend(config.serial_out.as_ref().map(|f| f.as_raw_fd()));
    keep_fds.extend(config.agent.as_ref().map(|s| s.as_raw_fd()));
    keep_fds.extend(
        config
            .net
            .iter()
            .chain(&config.more_net)
            .map(|n| match &n.backend {
                moat_vmm::NetBackend::Stream(s) => s.as_raw_fd(),
                moat_vmm::NetBackend::Tap { file, .. } => file.as_raw_fd(),
            }),
    );
    keep_fds.extend(config.fs.iter().map(|f| f.socket.as_raw_fd()));
    keep_fds.extend(
        config
            .block
            .iter()
            .filter_map(|b| b.file.as_ref().map(|f| f.as_raw_fd())),
    );
    let seccomp = seccomp::builtin_setup_profile()
        .map_err(|e| MicrovmError::Invalid(format!("the built-in VMM's seccomp profile: {e}")))?;
    Ok(JailPlan {
        root: root.to_path_buf(),
        files,
        devices: vec![PathBuf::from(KVM)],
        uid,
        gid,
        groups: vec![kvm_gid],
        rootless: false,
        keep_fds,
        // Its parent is the VMM process, in whose PID namespace it ends.
        runtime: None,
        seccomp,
        ram_mib: None,
    })
}

/// Builds the VM and runs it to its end, every thread under its role's
/// filter ([`seccomp::builtin_thread_hook`]). Called in the jail
/// ([`JailPlan::enter`] with [`jail_plan`]'s plan); the calling thread can
/// then only report and exit.
pub fn run(config: VmConfig) -> Result<ExitReason, VmmError> {
    run_from(config, None, None)
}

/// [`run`], restoring the VM from the snapshot `incoming` instead of
/// booting it (`moat_vmm::Vm::restore`), and with `control`, a thread
/// (confined to [`moat_vmm::ThreadRole::Control`]) that saves a snapshot
/// into its file each time its socket says [`SAVE`], answering
/// [`SAVED`] or `error: <why>`, and shows the hidden virtio-fs devices
/// (`VmConfig::fs_later`) when it says [`SHOW`], answering [`shown`],
/// one line each.
pub fn run_from(
    mut config: VmConfig,
    incoming: Option<&std::fs::File>,
    control: Option<(std::os::unix::net::UnixStream, std::fs::File)>,
) -> Result<ExitReason, VmmError> {
    let hook = seccomp::builtin_thread_hook();
    config.thread_hook = Some(hook.clone());
    let vm = match incoming {
        Some(f) => Vm::restore(config, f)?,
        None => Vm::new(config)?,
    };
    if let Some((socket, out)) = control {
        let handle = (vm.snapshot_handle(), vm.fs_handle());
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                if hook.enter(moat_vmm::ThreadRole::Control).is_ok() {
                    serve_control(socket, &out, &handle);
                }
                // Unconfined, it does nothing: the relay sees its
                // socket close and boots cold.
            })
            .map_err(|source| VmmError::Spawn {
                name: "control".into(),
                source,
            })?;
    }
    vm.run()
}

/// The request to save a snapshot, and its answer.
pub const SAVE: &str = "save";
/// The answer once the snapshot is written.
pub const SAVED: &str = "saved";
/// The request to show the hidden virtio-fs devices.
pub const SHOW: &str = "show";

/// The answer once `n` devices are shown.
pub fn shown(n: usize) -> String {
    format!("shown {n}")
}

/// Answers the relay's requests until its socket closes.
fn serve_control(
    socket: std::os::unix::net::UnixStream,
    out: &std::fs::File,
    (snapshot, fs): &(moat_vmm::SnapshotHandle, moat_vmm::FsHandle),
) {
    use std::io::{BufRead, Write};
    let Ok(mut writer) = socket.try_clone() else {
        return;
    };
    let mut lines = std::io::BufReader::new(socket).lines();
    while let Some(Ok(line)) = lines.next() {
        let answer = if line == SAVE {
            match snapshot.save(out) {
                Ok(()) => SAVED.to_string(),
                Err(e) => format!("error: {}", moat_core::error_chain(&e)),
            }
        } else if line == SHOW {
            match fs.show() {
                Ok(n) => shown(n),
                Err(e) => format!("error: {}", moat_core::error_chain(&e)),
            }
        } else {
            format!("error: unknown request {line:?}")
        };
        if writeln!(writer, "{answer}").is_err() {
            return;
        }
    }
}
