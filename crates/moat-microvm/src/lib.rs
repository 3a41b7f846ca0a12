//! The `microvm` tier: each container in its own microVM with its own
//! guest kernel, the VMM jailed on the host, and the workload run by moat's
//! own container tier inside the guest (defence in depth). docs/design.md
//! ("The microvm tier") describes the processes, SECURITY.md what it adds.
//!
//! The OCI container process is the **VMM process** ([`vmm`]): a moat
//! process forked by the runtime into its own namespaces, jailed
//! ([`jail`]), that runs the VMM as its only child (QEMU, or a fork of
//! itself running moat's own VMM, [`builtin`]) and relays between the
//! guest's agent ([`agent`], moat itself as the guest's PID 1) and the
//! host. `state` shows its PID, `kill` reaches the workload through the
//! agent, `kill --all` and `delete --force` kill the VMM process (and with
//! it, its PID namespace: the VMM).
#![forbid(unsafe_code)]

use std::path::PathBuf;

use moat_core::runtime::{
    CreateRequest, Current, ExecOptions, Launched, Lifecycle, RuntimeError, Unavailable,
};
use moat_core::state::{ContainerStatus, State, StateDir};
use moat_core::stats::{LimitEvents, Stats};
use moat_core::Tier;
use oci_spec::runtime::{LinuxResources, Process, Spec};
use serde::{Deserialize, Serialize};

pub mod agent;
pub mod assets;
pub mod builtin;
pub mod control;
mod create;
pub mod disk;
pub mod guestspec;
pub mod jail;
pub mod layer;
pub mod mirror;
mod ops;
mod pod;
pub mod podnet;
pub mod portfwd;
pub mod proto;
pub mod seccomp;
pub mod snapshot;
pub mod tree_cache;
pub mod vmm;
pub mod volumes;

pub use vmm::Backend;

#[derive(Debug, thiserror::Error)]
pub enum MicrovmError {
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
    #[error("initramfs")]
    Cpio(#[from] moat_vmm::cpio::CpioError),
    #[error("cannot image {}: {message}", .source_dir.display())]
    Mkfs {
        source_dir: PathBuf,
        message: String,
    },
    #[error("{} has too many files to image", .0.display())]
    TooLarge(PathBuf),
    #[error("{0}")]
    Invalid(String),
    #[error("cgroup")]
    Cgroup(#[from] moat_jail::cgroup::CgroupError),
    #[error("host ID allocation")]
    IdAlloc(#[from] moat_jail::idalloc::IdAllocError),
    #[error("VMM control")]
    Control(#[from] control::ControlError),
    #[error("the guest's network")]
    Net(#[from] moat_container::network::NetError),
    #[error("the microVM failed: {0}")]
    Vmm(String),
    #[error("OCI hook")]
    Hook(#[from] moat_container::hooks::HookError),
    #[error("the pod's network")]
    PodNet(#[from] podnet::PodNetError),
}

impl MicrovmError {
    pub(crate) fn io(step: impl Into<String>) -> impl FnOnce(std::io::Error) -> MicrovmError {
        let step = step.into();
        move |source| MicrovmError::Io { step, source }
    }
    pub(crate) fn sys(step: impl Into<String>) -> impl FnOnce(nix::Error) -> MicrovmError {
        let step = step.into();
        move |source| MicrovmError::Sys { step, source }
    }
}

impl From<MicrovmError> for RuntimeError {
    fn from(e: MicrovmError) -> RuntimeError {
        match e {
            MicrovmError::Invalid(m) => RuntimeError::Invalid(m),
            e => RuntimeError::Tier(Box::new(e)),
        }
    }
}

/// Which VMM this host runs, and why (for `moat info` and errors).
#[derive(Debug, Clone)]
pub struct HostChoice {
    pub backend: Backend,
    pub kernel: assets::GuestKernel,
    /// e.g. "QEMU/TCG (no vmx/svm: software-assisted KVM (kvm_pvm))".
    pub why: String,
}

fn unavailable(reason: String, fix: &str) -> Unavailable {
    Unavailable {
        tier: Tier::Microvm,
        built: true,
        reason,
        fix: Some(fix.into()),
    }
}

fn which(prog: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join(prog))
            .find(|p| p.is_file())
    })
}

/// Chooses the VMM, from `MOAT_MICROVM_BACKEND`.
pub const BACKEND_ENV: &str = "MOAT_MICROVM_BACKEND";

/// Whether this host can run the microvm tier, and with which VMM: moat's
/// own where KVM virtualises in hardware (vmx or svm), QEMU with TCG where
/// KVM is missing or software-assisted (PVM, which cannot boot a stock
/// kernel). `MOAT_MICROVM_BACKEND=qemu` picks QEMU (with KVM where the
/// hardware allows), `=builtin` moat's own VMM (refused without vmx/svm).
pub fn check_host() -> Result<HostChoice, Unavailable> {
    let asked = asked_backend(&std::env::var(BACKEND_ENV).unwrap_or_default())
        .map_err(|(reason, fix)| unavailable(reason, fix))?;
    let kernel = assets::GuestKernel::find()
        .map_err(|r| unavailable(r, "apt-get install linux-image-cloud-amd64"))?;
    let facts = moat_jail::host::HostFacts::read();
    if !rustix::process::geteuid().is_root() {
        // Rootless, the VMM process and the image builds each need a user
        // namespace of their own.
        if let Some(why) = userns_why(&facts.user_namespaces) {
            return Err(unavailable(
                format!("an unprivileged user needs user namespaces: {why}"),
                "enable unprivileged user namespaces, or run as root",
            ));
        }
    }
    let kvm = facts.kvm;
    let kvm_why = if !kvm.present {
        "/dev/kvm missing".to_string()
    } else if !kvm.accessible {
        "/dev/kvm not accessible".to_string()
    } else if let Some(m) = &kvm.software_module {
        format!("no vmx/svm: software-assisted KVM ({m})")
    } else if !kvm.hardware {
        "no vmx/svm in /proc/cpuinfo".to_string()
    } else if rustix::process::geteuid().is_root() {
        kvm_group_why(std::path::Path::new(builtin::KVM))
    } else {
        // Rootless, the VMM keeps the user's own groups: it opens /dev/kvm
        // exactly when the user can (`accessible`, checked above).
        String::new()
    };
    if which("mke2fs").is_none() {
        return Err(unavailable(
            "mke2fs (e2fsprogs) is not installed: it builds the guest's disks".into(),
            "apt-get install e2fsprogs",
        ));
    }
    let (backend, why) = choose_backend(asked, &kvm_why, || which(moat_vmm::qemu::QEMU_BINARY))
        .map_err(|(reason, fix)| unavailable(reason, fix))?;
    Ok(HostChoice {
        backend,
        kernel,
        why,
    })
}

/// Why the VMM's host user could not open `kvm` (empty when it could):
/// the jail drops root and keeps only the device's group, so the group
/// needs read and write (udev's `kvm` group, mode 0660, on distributions).
fn kvm_group_why(kvm: &std::path::Path) -> String {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(kvm) {
        Ok(m) if m.mode() & 0o060 == 0o060 => String::new(),
        Ok(m) => format!(
            "{} is mode {:04o}: the VMM's host user, which has only its group, could not open it",
            kvm.display(),
            m.mode() & 0o7777
        ),
        Err(e) => format!("{}: {e}", kvm.display()),
    }
}

/// What `moat info` says of a microVM's memory: what of it goes back to
/// the host, and how often the page cache passes run by default (none
/// where the guest kernel's config does not show the multi-gen LRU:
/// `/boot/config-<release>` beside the kernel).
pub fn memory_note() -> String {
    let passes = match assets::GuestKernel::find() {
        Ok(k) if k.has_config("CONFIG_LRU_GEN") => format!(
            "its old page cache every {} s (annotation {})",
            create::RECLAIM_INTERVAL_DEFAULT_S,
            create::RECLAIM_INTERVAL_ANNOTATION
        ),
        Ok(k) => format!(
            "not its page cache (the guest kernel {}: no CONFIG_LRU_GEN=y in its config)",
            k.release
        ),
        Err(why) => format!("not its page cache ({why})"),
    };
    format!("freed pages go back to the host (free page reporting), {passes}")
}

/// How a microVM gets a read-write volume on this host (`moat info`), or
/// why it cannot.
pub fn volumes_note() -> Result<String, String> {
    check_host().map_err(|u| u.reason)?;
    volumes::virtiofsd().map(|p| format!("virtio-fs, served by {}", p.display()))
}

/// Why this host gives an unprivileged user no user namespace (None when
/// it does).
fn userns_why(u: &moat_jail::host::UserNamespaces) -> Option<String> {
    if u.max == Some(0) {
        Some("user.max_user_namespaces is 0".into())
    } else if u.unprivileged_clone == Some(false) {
        Some("kernel.unprivileged_userns_clone is 0".into())
    } else if u.apparmor_restricted == Some(true) {
        Some("kernel.apparmor_restrict_unprivileged_userns is 1".into())
    } else {
        None
    }
}

/// `MOAT_MICROVM_BACKEND`'s value: `Some(true)` for moat's own VMM,
/// `Some(false)` for QEMU, `None` to choose; else why not, and the fix.
fn asked_backend(value: &str) -> Result<Option<bool>, (String, &'static str)> {
    match value {
        "" | "auto" => Ok(None),
        "builtin" => Ok(Some(true)),
        "qemu" => Ok(Some(false)),
        other => Err((
            format!("{BACKEND_ENV}={other:?} names no VMM"),
            "set it to builtin, qemu or auto",
        )),
    }
}

/// The VMM for what was `asked` ([`asked_backend`]) on a host whose KVM
/// cannot boot a stock kernel for `kvm_why` (empty: it can, vmx/svm), with
/// QEMU where `qemu` finds it; and the choice in words for `moat info`.
fn choose_backend(
    asked: Option<bool>,
    kvm_why: &str,
    qemu: impl FnOnce() -> Option<PathBuf>,
) -> Result<(Backend, String), (String, &'static str)> {
    if asked != Some(false) && kvm_why.is_empty() {
        let why = match asked {
            Some(_) => format!("moat's own VMM on KVM ({BACKEND_ENV}=builtin)"),
            None => "moat's own VMM on KVM (vmx/svm)".to_string(),
        };
        return Ok((Backend::Builtin, why));
    }
    if asked == Some(true) {
        return Err((
            format!("{BACKEND_ENV}=builtin, but moat's own VMM boots Linux only on KVM with vmx/svm: {kvm_why}"),
            "unset it: QEMU with TCG then runs the guest",
        ));
    }
    let Some(binary) = qemu() else {
        let reason = if kvm_why.is_empty() {
            format!(
                "{BACKEND_ENV}=qemu, and {} is not installed",
                moat_vmm::qemu::QEMU_BINARY
            )
        } else {
            format!(
                "{kvm_why} and {} not installed",
                moat_vmm::qemu::QEMU_BINARY
            )
        };
        return Err((reason, "apt-get install qemu-system-x86"));
    };
    let (accel, why) = if kvm_why.is_empty() {
        (
            moat_vmm::qemu::Accel::Kvm,
            format!("QEMU/KVM ({BACKEND_ENV}=qemu)"),
        )
    } else {
        (moat_vmm::qemu::Accel::Tcg, format!("QEMU/TCG ({kvm_why})"))
    };
    Ok((Backend::Qemu { binary, accel }, why))
}

#[cfg(test)]
mod backend_tests {
    use super::*;
    use moat_vmm::qemu::Accel;

    fn qemu() -> Option<PathBuf> {
        Some(PathBuf::from("/usr/bin/qemu-system-x86_64"))
    }

    #[test]
    fn a_kvm_node_its_group_cannot_open_is_named() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let node = dir.path().join("kvm");
        std::fs::write(&node, b"").unwrap();
        std::fs::set_permissions(&node, std::fs::Permissions::from_mode(0o660)).unwrap();
        assert_eq!(kvm_group_why(&node), "");
        std::fs::set_permissions(&node, std::fs::Permissions::from_mode(0o600)).unwrap();
        let why = kvm_group_why(&node);
        assert!(why.ends_with("kvm is mode 0600: the VMM's host user, which has only its group, could not open it"), "{why}");
        assert!(kvm_group_why(&dir.path().join("none")).contains("No such file"));
    }

    /// What keeps an unprivileged user from user namespaces is named
    /// (the host's own facts are the real check: `check_host`).
    #[test]
    fn a_host_without_unprivileged_user_namespaces_is_named() {
        let u = |max, clone, apparmor| moat_jail::host::UserNamespaces {
            max,
            unprivileged_clone: clone,
            apparmor_restricted: apparmor,
        };
        assert_eq!(userns_why(&u(Some(96369), None, None)), None);
        assert_eq!(userns_why(&u(Some(96369), Some(true), Some(false))), None);
        assert!(userns_why(&u(Some(0), None, None))
            .unwrap()
            .contains("max_user_namespaces"));
        assert!(userns_why(&u(None, Some(false), None))
            .unwrap()
            .contains("unprivileged_userns_clone"));
        assert!(userns_why(&u(None, None, Some(true)))
            .unwrap()
            .contains("apparmor"));
        // This host gives them (the rootless e2e tests rely on it).
        assert_eq!(
            userns_why(&moat_jail::host::HostFacts::read().user_namespaces),
            None
        );
    }

    #[test]
    fn the_backend_follows_the_hardware_and_the_variable() {
        assert_eq!(asked_backend(""), Ok(None));
        assert_eq!(asked_backend("auto"), Ok(None));
        assert_eq!(asked_backend("builtin"), Ok(Some(true)));
        assert_eq!(asked_backend("qemu"), Ok(Some(false)));
        let (why, _) = asked_backend("firecracker").unwrap_err();
        assert!(why.contains("\"firecracker\" names no VMM"), "{why}");

        let pvm = "no vmx/svm: software-assisted KVM (kvm_pvm)";
        // With vmx/svm: moat's own VMM, unless QEMU is asked for.
        let (b, why) = choose_backend(None, "", qemu).unwrap();
        assert_eq!(b, Backend::Builtin);
        assert_eq!(why, "moat's own VMM on KVM (vmx/svm)");
        let (b, _) = choose_backend(Some(true), "", || None).unwrap();
        assert_eq!(b, Backend::Builtin, "QEMU is not needed for it");
        let (b, why) = choose_backend(Some(false), "", qemu).unwrap();
        assert_eq!(
            b,
            Backend::Qemu {
                binary: qemu().unwrap(),
                accel: Accel::Kvm
            }
        );
        assert!(why.starts_with("QEMU/KVM"), "{why}");
        // Without: QEMU with TCG; moat's own VMM refused, in one line.
        for asked in [None, Some(false)] {
            let (b, why) = choose_backend(asked, pvm, qemu).unwrap();
            assert_eq!(
                b,
                Backend::Qemu {
                    binary: qemu().unwrap(),
                    accel: Accel::Tcg
                }
            );
            assert_eq!(why, format!("QEMU/TCG ({pvm})"));
        }
        let (why, fix) = choose_backend(Some(true), pvm, qemu).unwrap_err();
        assert!(
            why.contains("only on KVM with vmx/svm: no vmx/svm"),
            "{why}"
        );
        assert!(!why.contains('\n') && !fix.is_empty());
        // No QEMU where it is needed.
        let (why, _) = choose_backend(None, pvm, || None).unwrap_err();
        assert!(why.ends_with("qemu-system-x86_64 not installed"), "{why}");
        let (why, _) = choose_backend(Some(false), "", || None).unwrap_err();
        assert!(why.contains("is not installed"), "{why}");
    }
}

/// The microvm tier's part of the state.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct MicrovmPart {
    #[serde(default)]
    cgroup: serde_json::Value,
    /// The control socket's directory.
    socket_dir: PathBuf,
    /// The VMM process's host user (its block in the ID allocator).
    vmm_uid: u32,
    /// That block's slot and the owner its allocation file records.
    #[serde(default)]
    vmm_slot: Option<(u32, String)>,
    /// The read-write volumes' block (their files' owners), when there are
    /// any.
    #[serde(default)]
    volume_slot: Option<(u32, String)>,
    /// Which VMM, in words.
    backend: String,
    /// The user-space network stack's process, when the config asked for
    /// the network.
    #[serde(default)]
    net_stack: Option<moat_container::network::StackProcess>,
    /// The read-write volumes' server ([`volumes`]), when there are any.
    #[serde(default)]
    volumes: Option<volumes::VolumeServer>,
    /// The joined namespace's interface the guest took over ([`podnet`]).
    #[serde(default)]
    pod_link: Option<podnet::PodLinkRecord>,
    /// A pod's sandbox container: the pod disk its VM has, which the
    /// pod's other containers join ([`pod`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pod_disk: Option<PathBuf>,
    /// That VM's share of the pod's read-write volumes (`pod::make_share`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pod_share: Option<PathBuf>,
    /// A pod's container that joined its pod's VM: the process of the
    /// state is the host process that stands for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    joined: Option<pod::Joined>,
    /// The container's kept writable layer, whose mirror `delete` applies
    /// to its root (`layer::settle_at_delete`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mirror: Option<MirrorPart>,
    /// Paused, its container frozen in the guest too (to mirror its
    /// writes): `resume` thaws it there.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    guest_frozen: bool,
}

/// Where a container's kept layer's mirror goes.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct MirrorPart {
    /// `layers/<key>.ext4` in the cache.
    layer: PathBuf,
    /// The container's root on the host.
    rootfs: PathBuf,
}

/// An update's limits for the VMM's cgroup on the host (CPU time, block
/// I/O) and for the container's in the guest (memory, processes, CPU time
/// but not CPU or memory node sets, whose numbers are the host's), as an
/// OCI `linux.resources` object; `None` when nothing is for the guest.
fn split_resources(r: &LinuxResources) -> (LinuxResources, Option<serde_json::Value>) {
    let mut host = LinuxResources::default();
    host.set_cpu(r.cpu().clone());
    host.set_block_io(r.block_io().clone());
    let mut guest = LinuxResources::default();
    guest.set_memory(*r.memory());
    guest.set_pids(*r.pids());
    guest.set_cpu(
        r.cpu()
            .clone()
            .map(|mut cpu| {
                cpu.set_cpus(None);
                cpu.set_mems(None);
                cpu
            })
            .filter(|cpu| *cpu != oci_spec::runtime::LinuxCpu::default()),
    );
    guest.set_unified(r.unified().clone());
    let guest = (guest != LinuxResources::default())
        .then(|| serde_json::to_value(&guest).unwrap_or_default());
    (host, guest)
}

/// The microvm tier, bound to a state root.
#[derive(Debug, Clone)]
pub struct MicrovmTier {
    sd: StateDir,
    systemd_cgroup: bool,
}

/// Longest unix socket path.
const MAX_SOCKET_PATH: usize = 107;
/// The control socket's name.
const SOCKET: &str = "vmm.sock";
/// The workload's end, written by the VMM process.
const EVENTS: &str = "events.json";
/// The config copy.
const CONFIG: &str = "config.json";

impl MicrovmTier {
    pub fn new(root: impl Into<PathBuf>, systemd_cgroup: bool) -> MicrovmTier {
        MicrovmTier {
            sd: StateDir::new(root),
            systemd_cgroup,
        }
    }

    /// The cache of initramfs and disk images: `MOAT_MICROVM_CACHE`, else
    /// `<root>/.cache/microvm` when the state root is on a disk, else (the
    /// default `/run/moat` is a tmpfs on most hosts, and the disk images
    /// take gigabytes that would be memory and gone at the next boot) a
    /// persistent place: [`persistent_cache`].
    pub fn cache_dir(&self) -> PathBuf {
        if let Some(d) = std::env::var_os("MOAT_MICROVM_CACHE").filter(|v| !v.is_empty()) {
            return PathBuf::from(d);
        }
        let root = self.sd.root();
        if on_memory_fs(root) {
            if let Some(d) = persistent_cache(
                nix::unistd::geteuid().is_root(),
                std::env::var_os("XDG_CACHE_HOME"),
                std::env::var_os("HOME"),
            ) {
                return d;
            }
        }
        root.join(".cache").join("microvm")
    }

    /// The control socket's directory for container `id`: under the state
    /// root, or under /run when that path would not fit a socket address.
    fn socket_dir(&self, id: &str) -> PathBuf {
        let dir = self.sd.root().join(".microvm").join(id);
        if dir.join(SOCKET).as_os_str().len() <= MAX_SOCKET_PATH {
            return dir;
        }
        use sha2::Digest;
        let key = sha2::Sha256::digest(dir.as_os_str().as_encoded_bytes());
        let name: String = key.iter().take(8).map(|b| format!("{b:02x}")).collect();
        let euid = rustix::process::geteuid();
        if euid.is_root() {
            PathBuf::from("/run/moat-microvm").join(name)
        } else {
            std::env::temp_dir()
                .join(format!("moat-microvm-{}", euid.as_raw()))
                .join(name)
        }
    }

    fn part(&self, st: &State) -> Result<MicrovmPart, RuntimeError> {
        Ok(st.tier_part(
            &self
                .sd
                .container_dir(&st.id)
                .join(moat_core::state::STATE_FILE),
        )?)
    }

    /// The network a config means when it joins `path`: where `path` is
    /// `/proc/PID/ns/net` of a running microVM's VMM process (Podman's and
    /// Docker's `--network container:NAME`, which name the namespace of
    /// NAME's process), the namespace whose interface that guest took
    /// over — the VMM's own is an empty jail's; otherwise `path` itself.
    /// Other paths (a pod's `/var/run/netns/…`) cost no lookup.
    fn network_meant(&self, path: PathBuf) -> PathBuf {
        let pid = path.strip_prefix("/proc").ok().and_then(|rest| {
            let mut parts = rest.components();
            let pid = parts.next()?.as_os_str().to_str()?.parse::<i32>().ok()?;
            (parts.as_path() == std::path::Path::new("ns/net")).then_some(pid)
        });
        let Some(pid) = pid else {
            return path;
        };
        let vmm = self
            .sd
            .list()
            .unwrap_or_default()
            .into_iter()
            .find_map(|id| {
                let st = self.sd.load(&id).ok()?;
                (st.tier == moat_core::tier::Tier::Microvm && st.pid == pid && Self::alive(&st))
                    .then_some(st)
            });
        vmm.and_then(|st| self.part(&st).ok()?.pod_link)
            .map_or(path, |rec| rec.netns)
    }

    fn alive(st: &State) -> bool {
        st.pid > 0
            && moat_jail::procfs::proc_stat(st.pid)
                .is_some_and(|(start, s)| start == st.pid_start_time && s != 'Z' && s != 'X')
    }

    fn current(&self, id: &str) -> Result<Current, RuntimeError> {
        let st = self.sd.load(id)?;
        let alive = Self::alive(&st);
        let status = match st.status {
            // A VMM process recorded during create that is gone died with
            // a runtime killed mid-create (a `moat run` killed as soon as
            // its workload spoke, before it saved the container running),
            // as the container tier's `live_status` says.
            ContainerStatus::Creating if st.pid > 0 && !alive => ContainerStatus::Stopped,
            ContainerStatus::Creating => ContainerStatus::Creating,
            s if alive => s,
            _ => ContainerStatus::Stopped,
        };
        Ok(Current { state: st, status })
    }

    fn control_path(&self, st: &State) -> Result<PathBuf, RuntimeError> {
        Ok(self.part(st)?.socket_dir.join(SOCKET))
    }
}

fn wrong(id: &str, status: ContainerStatus, why: &'static str) -> RuntimeError {
    RuntimeError::WrongStatus {
        id: id.to_owned(),
        status: status.as_str(),
        why,
    }
}

impl Lifecycle for MicrovmTier {
    fn tier(&self) -> Tier {
        Tier::Microvm
    }

    fn create(&self, req: &CreateRequest) -> Result<(), RuntimeError> {
        self.create_vm(req, false).map(|_| ())
    }

    fn launch(&self, req: &CreateRequest) -> Result<Launched, RuntimeError> {
        self.create_vm(req, true)
    }

    fn start(&self, id: &str) -> Result<(), RuntimeError> {
        self.start_vm(id)
    }

    fn state(&self, id: &str) -> Result<Current, RuntimeError> {
        self.current(id)
    }

    fn kill(&self, id: &str, signal: i32, all: bool) -> Result<(), RuntimeError> {
        self.kill_vm(id, signal, all)
    }

    fn delete(&self, id: &str, force: bool) -> Result<(), RuntimeError> {
        self.delete_vm(id, force)
    }

    fn exec(&self, id: &str, process: &Process, opts: &ExecOptions) -> Result<i32, RuntimeError> {
        self.exec_vm(id, process, opts)
    }

    fn ps(&self, id: &str) -> Result<Vec<i32>, RuntimeError> {
        let c = self.current(id)?;
        Ok(if c.status == ContainerStatus::Stopped {
            Vec::new()
        } else {
            vec![c.state.pid]
        })
    }

    fn pause(&self, id: &str) -> Result<(), RuntimeError> {
        self.freeze(id, true)
    }

    fn resume(&self, id: &str) -> Result<(), RuntimeError> {
        self.freeze(id, false)
    }

    /// New limits, split where they take effect: CPU time and block I/O
    /// on the VMM's cgroup on the host (its vCPU threads and its disk
    /// I/O), memory, processes and CPU time on the container's cgroup in
    /// the guest (through the agent; before `start`, merged into the config
    /// the guest creates it with). The VMM's own memory limit stays what
    /// the guest's RAM needs, and the RAM stays the size it booted with
    /// (what the guest reclaims under a lower limit goes back to the host
    /// through its balloon's free page reports).
    fn update(&self, id: &str, resources: &LinuxResources) -> Result<(), RuntimeError> {
        let c = self.current(id)?;
        if c.status == ContainerStatus::Stopped {
            return Err(wrong(id, c.status, "cannot update it"));
        }
        let (host, guest) = split_resources(resources);
        // The guest's part needs the agent, which a frozen VMM cannot
        // answer: refused before anything changes (runc's update of a
        // paused container only writes its cgroup, as the host's part
        // alone still does here).
        if guest.is_some() && c.status == ContainerStatus::Paused {
            return Err(wrong(
                id,
                c.status,
                "resume it to update its memory, process and CPU-time limits (the guest sets them)",
            ));
        }
        self.cgroup(&c.state)?
            .update(&host)
            .map_err(MicrovmError::from)?;
        let Some(guest) = guest else {
            return self.record_update(id, resources);
        };
        if resources.memory().is_some() {
            tracing::warn!(
                "microvm: the new memory limit applies in the guest; its RAM stays the size it booted with (what the guest frees goes back to the host)"
            );
        }
        let path = self.control_path(&c.state)?;
        let (_sock, reply) = control::call(
            &path,
            &control::Request::Update {
                resources: guest,
                container: None,
            },
            &[],
        )
        .map_err(MicrovmError::from)?;
        match reply {
            control::Reply::Ok => self.record_update(id, resources),
            control::Reply::Error { message, .. } => Err(MicrovmError::Vmm(message).into()),
            control::Reply::Exit { .. } => {
                Err(MicrovmError::Vmm("unexpected reply to update".into()).into())
            }
        }
    }

    fn stats(&self, id: &str) -> Result<Stats, RuntimeError> {
        let st = self.sd.load(id)?;
        Ok(self.cgroup(&st)?.stats().map_err(MicrovmError::from)?)
    }

    fn events(&self, id: &str) -> Result<LimitEvents, RuntimeError> {
        let st = self.sd.load(id)?;
        let mut ev = LimitEvents::default();
        let path = self.sd.container_dir(id).join(EVENTS);
        if let Ok(data) = std::fs::read(&path) {
            if let Ok(e) = serde_json::from_slice::<proto::Exit>(&data) {
                ev.oom_kills = e.oom_kills;
                ev.pids_limit_hits = e.pids_limit_hits;
            }
        }
        drop(st);
        Ok(ev)
    }

    fn config(&self, id: &str) -> Result<Spec, RuntimeError> {
        self.sd.lock(id)?;
        let path = self.sd.container_dir(id).join(CONFIG);
        let data =
            std::fs::read(&path).map_err(MicrovmError::io(format!("read {}", path.display())))?;
        serde_json::from_slice(&data)
            .map_err(|e| RuntimeError::Invalid(format!("{}: {e}", path.display())))
    }

    fn features(&self) -> serde_json::Value {
        let mut doc = moat_container::ContainerTier::new(self.sd.root(), false).features();
        let vmm = match check_host().map(|h| h.backend) {
            Ok(Backend::Builtin) => "moat-vmm",
            Ok(Backend::Qemu { .. }) => "qemu-microvm",
            Err(_) => "unavailable",
        };
        doc["annotations"]["dev.moat.microvm"] = serde_json::json!(vmm);
        doc
    }
}

impl MicrovmTier {
    /// Keeps an applied update's limits in the saved config
    /// ([`moat_core::spec::record_update`]), under the container's lock
    /// (two updates at once would each rewrite the file from what it read).
    fn record_update(&self, id: &str, resources: &LinuxResources) -> Result<(), RuntimeError> {
        let _lock = self.sd.lock(id)?;
        let path = self.sd.container_dir(id).join(CONFIG);
        moat_core::spec::record_update(&path, resources)
            .map_err(MicrovmError::io(
                "record the new limits in the saved config.json",
            ))
            .map_err(Into::into)
    }

    fn cgroup(&self, st: &State) -> Result<moat_jail::cgroup::CgroupManager, RuntimeError> {
        let part = self.part(st)?;
        if part.cgroup.is_null() {
            return Err(RuntimeError::Invalid(format!(
                "container {} has no cgroup",
                st.id
            )));
        }
        Ok(moat_jail::cgroup::CgroupManager::from_saved(&part.cgroup)
            .map_err(MicrovmError::from)?)
    }

    /// Freezes the container in its guest and mirrors its writes into its
    /// root on the host (`crate::mirror`), at `pause`: whether the guest
    /// froze it (a failure is a warning: the VM is still frozen whole on
    /// the host).
    fn mirror_at_pause(&self, st: &State, m: &MirrorPart) -> bool {
        match self.freeze_in_guest(st, true) {
            Ok(()) => {
                let cache = self.cache_dir();
                layer::settle_held(&cache.join(layer::DIR), &cache, &m.layer, &m.rootfs);
                true
            }
            Err(e) => {
                tracing::warn!(
                    "microvm: the paused container's writes were not mirrored: {}",
                    moat_core::error_chain(&e)
                );
                false
            }
        }
    }

    fn freeze(&self, id: &str, on: bool) -> Result<(), RuntimeError> {
        let _lock = self.sd.lock(id)?;
        let c = self.current(id)?;
        let (want, why) = if on {
            (ContainerStatus::Running, "it must be running to pause")
        } else {
            (ContainerStatus::Paused, "it must be paused to resume")
        };
        if c.status != want {
            return Err(wrong(id, c.status, why));
        }
        let mut part = self.part(&c.state)?;
        if part.joined.is_some() {
            // A container in its pod's VM: its cgroup in the guest, through
            // its stand-in (which keeps serving, unfrozen, for `resume`
            // and `kill`).
            self.freeze_in_guest(&c.state, on)?;
        } else {
            let cg = self.cgroup(&c.state)?;
            if on {
                // A kept layer's container is frozen in the guest first,
                // and what it wrote so far mirrored into its root on the
                // host, for the engine (`docker commit` pauses what it
                // commits).
                part.guest_frozen = match &part.mirror {
                    Some(m) => self.mirror_at_pause(&c.state, m),
                    None => false,
                };
                cg.freeze().map_err(MicrovmError::from)?;
            } else {
                cg.thaw().map_err(MicrovmError::from)?;
                if part.guest_frozen {
                    self.freeze_in_guest(&c.state, false)?;
                    part.guest_frozen = false;
                }
            }
        }
        let mut st = c.state;
        st.tier_state =
            serde_json::to_value(&part).map_err(|e| RuntimeError::Invalid(e.to_string()))?;
        st.status = if on {
            ContainerStatus::Paused
        } else {
            ContainerStatus::Running
        };
        self.sd.save(&st)?;
        Ok(())
    }

    /// Freezes (`on`) or thaws the container in its guest, through the
    /// control socket of its VMM process (a joined container's stand-in).
    fn freeze_in_guest(&self, st: &State, on: bool) -> Result<(), RuntimeError> {
        let (_sock, reply) = control::call(
            &self.control_path(st)?,
            &control::Request::Freeze {
                on,
                container: None,
            },
            &[],
        )
        .map_err(MicrovmError::from)?;
        if let control::Reply::Error { message, .. } = reply {
            return Err(MicrovmError::Vmm(message).into());
        }
        Ok(())
    }
}

/// Whether `path` (or, when it does not exist yet, its nearest existing
/// ancestor) is on a filesystem held in memory (tmpfs, ramfs).
fn on_memory_fs(path: &std::path::Path) -> bool {
    const TMPFS_MAGIC: u64 = 0x0102_1994;
    const RAMFS_MAGIC: u64 = 0x8584_58f6;
    let mut p = Some(path);
    while let Some(dir) = p {
        if let Ok(st) = rustix::fs::statfs(dir) {
            // f_type's width differs between architectures.
            #[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
            let t = st.f_type as u64;
            return t == TMPFS_MAGIC || t == RAMFS_MAGIC;
        }
        p = dir.parent();
    }
    false
}

/// The microVM cache's persistent place when the state root is in memory:
/// `/var/cache/moat/microvm` for root; for anyone else
/// `$XDG_CACHE_HOME/moat/microvm`, else `~/.cache/moat/microvm` (None
/// without either: the state root's own cache is used).
pub fn persistent_cache(
    root: bool,
    xdg_cache_home: Option<std::ffi::OsString>,
    home: Option<std::ffi::OsString>,
) -> Option<PathBuf> {
    if root {
        return Some(PathBuf::from("/var/cache/moat/microvm"));
    }
    let abs = |v: std::ffi::OsString| Some(PathBuf::from(v)).filter(|p| p.is_absolute());
    xdg_cache_home
        .and_then(abs)
        .map(|d| d.join("moat").join("microvm"))
        .or_else(|| {
            home.and_then(abs)
                .map(|h| h.join(".cache").join("moat").join("microvm"))
        })
}

#[cfg(test)]
mod cache_tests {
    use super::*;

    #[test]
    fn a_state_root_in_memory_gets_a_persistent_cache() {
        // Real filesystems: /dev/shm is a tmpfs on this machine kind (and
        // CI's), the repository is on a disk.
        assert!(on_memory_fs(std::path::Path::new("/dev/shm")));
        assert!(on_memory_fs(std::path::Path::new("/dev/shm/not/yet/made")));
        assert!(!on_memory_fs(std::path::Path::new(env!(
            "CARGO_MANIFEST_DIR"
        ))));
        assert_eq!(
            persistent_cache(true, None, None),
            Some(PathBuf::from("/var/cache/moat/microvm"))
        );
        assert_eq!(
            persistent_cache(false, Some("/x/cache".into()), Some("/home/u".into())),
            Some(PathBuf::from("/x/cache/moat/microvm"))
        );
        assert_eq!(
            persistent_cache(false, Some("relative".into()), Some("/home/u".into())),
            Some(PathBuf::from("/home/u/.cache/moat/microvm"))
        );
        assert_eq!(persistent_cache(false, None, None), None);
        let t = MicrovmTier::new("/dev/shm/moat-cache-test-root", false);
        if std::env::var_os("MOAT_MICROVM_CACHE").is_none() && nix::unistd::geteuid().is_root() {
            assert_eq!(t.cache_dir(), PathBuf::from("/var/cache/moat/microvm"));
        }
        let t = MicrovmTier::new(env!("CARGO_MANIFEST_DIR"), false);
        if std::env::var_os("MOAT_MICROVM_CACHE").is_none() {
            assert_eq!(
                t.cache_dir(),
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/microvm")
            );
        }
    }
}

#[cfg(test)]
mod update_tests {
    use super::*;

    #[test]
    fn an_update_splits_between_the_vmms_cgroup_and_the_guests() {
        let r: LinuxResources = serde_json::from_value(serde_json::json!({
            "memory": {"limit": 268435456},
            "pids": {"limit": 7},
            "cpu": {"quota": 50000, "period": 100000, "cpus": "0-1"},
            "blockIO": {"weight": 300}
        }))
        .unwrap();
        let (host, guest) = split_resources(&r);
        // The host: CPU time (its set too) and block I/O; never the
        // memory or process limits (the VMM's own).
        assert!(host.memory().is_none() && host.pids().is_none());
        assert_eq!(host.cpu().as_ref().unwrap().quota(), Some(50000));
        assert_eq!(host.cpu().as_ref().unwrap().cpus().as_deref(), Some("0-1"));
        assert!(host.block_io().is_some());
        let guest = guest.unwrap();
        assert_eq!(guest["memory"]["limit"], 268435456);
        assert_eq!(guest["pids"]["limit"], 7);
        assert_eq!(guest["cpu"]["quota"], 50000);
        assert!(guest["cpu"].get("cpus").is_none(), "{guest}");
        assert!(guest.get("blockIO").is_none(), "{guest}");
        // CPU sets and block I/O alone: nothing for the guest.
        let r: LinuxResources = serde_json::from_value(serde_json::json!({
            "cpu": {"cpus": "0"}, "blockIO": {"weight": 300}
        }))
        .unwrap();
        assert!(split_resources(&r).1.is_none());
    }
}
