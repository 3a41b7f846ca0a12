//! The jailer: what the VMM process does to itself, in the namespaces the
//! runtime cloned it into (mount, PID, IPC, UTS, network), before it starts
//! the VMM and reads a byte from the guest. In the order the kernel needs:
//!
//! 1. close every descriptor but the ones it was handed;
//! 2. a root of its own: a small tmpfs holding, read-only, exactly the
//!    host files the VMM reads (the kernel, the initramfs, QEMU and its
//!    libraries and firmware) and the devices it opens (`/dev/null`,
//!    `/dev/urandom`, `/dev/kvm` under KVM); `pivot_root` into it, the old
//!    root detached, the new one read-only;
//! 3. rlimits (no core dumps, bounded descriptors);
//! 4. an unprivileged host user of its own (a block from moat's ID
//!    allocator) with, under KVM, the group that may open /dev/kvm, and no
//!    capabilities (checked);
//! 5. no_new_privs, not dumpable;
//! 6. the seccomp filter of [`crate::seccomp`] (QEMU's allow-list, or moat's
//!    own VMM's process filter), every other syscall failing with EPERM.
//!
//! The disks and the agent channel are descriptors the runtime opened;
//! nothing in the jail can name them by path.
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("cannot {step}")]
    Sys {
        step: String,
        #[source]
        source: nix::Error,
    },
    #[error("cannot {step}")]
    Io {
        step: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the runtime ended before the VMM process was tied to it")]
    RuntimeGone,
    #[error("capabilities remain after the switch to host user {0}")]
    CapsRemain(u32),
    #[error("cannot build the VMM's seccomp profile: {0}")]
    Profile(String),
    #[error("seccomp")]
    Seccomp(#[from] moat_jail::seccomp::SeccompError),
    #[error("process attributes")]
    Attr(#[from] moat_jail::attrs::AttrError),
}

fn sys(step: impl Into<String>) -> impl FnOnce(nix::Error) -> JailError {
    let step = step.into();
    move |source| JailError::Sys { step, source }
}

fn io(step: impl Into<String>) -> impl FnOnce(std::io::Error) -> JailError {
    let step = step.into();
    move |source| JailError::Io { step, source }
}

/// What the VMM process keeps once jailed.
#[derive(Debug, Clone)]
pub struct JailPlan {
    /// An empty directory the jail's root is mounted on (in the VMM
    /// process's own mount namespace, so the host never sees it).
    pub root: PathBuf,
    /// Host files and directories visible read-only at their own paths.
    pub files: Vec<PathBuf>,
    /// Device nodes visible at their own paths.
    pub devices: Vec<PathBuf>,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (the group of /dev/kvm under KVM).
    pub groups: Vec<u32>,
    /// An unprivileged runtime's VMM: in a user namespace of its own, where
    /// it is `uid` (the user itself) and holds capabilities only until it
    /// drops them all; its supplementary groups stay the user's (`groups`
    /// is not used: that namespace cannot change them).
    pub rootless: bool,
    /// Descriptors kept open (besides 0, 1, 2).
    pub keep_fds: Vec<RawFd>,
    /// When the VMM process dies with its runtime (`moat run`): the setup
    /// channel, whose other end is the runtime's ([`tie_to_runtime`]).
    pub runtime: Option<RawFd>,
    /// The seccomp filter loaded last (EPERM for what it does not allow).
    pub seccomp: oci_spec::runtime::LinuxSeccomp,
    /// A writable tmpfs of this many MiB at [`RAM_DIR`], the VMM's user's
    /// alone: the guest's RAM as a file there, when QEMU's snapshot leaves
    /// it out (`VmmPlan::share_port`, `crate::snapshot::append_ram`).
    pub ram_mib: Option<u64>,
}

/// Where the jail's RAM tmpfs is mounted (`JailPlan::ram_mib`).
pub const RAM_DIR: &str = "/ram";

/// SIGKILL when the runtime dies, set again after the switch of user: a
/// change of credentials clears the parent-death signal the fork set, and
/// the VMM process of a killed `moat run` then lived on, its guest with
/// it. A runtime that died before the signal was set has hung up `setup`
/// (it holds its end until the VMM process says it is ready): an error.
fn tie_to_runtime(setup: RawFd) -> Result<(), JailError> {
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .map_err(sys("set the parent-death signal"))?;
    match moat_sys::fd::hung_up(setup) {
        Ok(false) => Ok(()),
        // A poll that cannot tell fails closed.
        Ok(true) | Err(_) => Err(JailError::RuntimeGone),
    }
}

impl JailPlan {
    /// Jails the calling process (single-threaded). Fails closed: the
    /// caller must not start the VMM after an error.
    pub fn enter(&self) -> Result<(), JailError> {
        self.close_other_fds()?;
        self.build_root()?;
        self.pivot()?;
        limits()?;
        self.switch_user()?;
        if let Some(fd) = self.runtime {
            tie_to_runtime(fd)?;
        }
        moat_jail::attrs::set_no_new_privs()?;
        nix::sys::prctl::set_dumpable(false).map_err(sys("make the VMM non-dumpable"))?;
        crate::seccomp::load(&self.seccomp)?;
        Ok(())
    }

    fn close_other_fds(&self) -> Result<(), JailError> {
        moat_sys::fd::close_all_except(&self.keep_fds).map_err(io("close inherited descriptors"))
    }

    fn build_root(&self) -> Result<(), JailError> {
        crate::disk::make_mounts_private().map_err(sys("make the mounts private"))?;
        mount(
            Some("moat-vmm"),
            &self.root,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some("mode=0755,size=1m,nr_inodes=4096"),
        )
        .map_err(sys(format!(
            "mount the jail's root on {}",
            self.root.display()
        )))?;
        for f in &self.files {
            bind_ro(&self.root, f, MsFlags::MS_NOSUID | MsFlags::MS_NODEV)?;
        }
        for d in &self.devices {
            bind_ro(&self.root, d, MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC)?;
        }
        if let Some(mib) = self.ram_mib {
            let dir = self.root.join(RAM_DIR.trim_start_matches('/'));
            std::fs::create_dir(&dir).map_err(io(format!("create {}", dir.display())))?;
            // Room for the guest's RAM and nothing else (one file).
            mount(
                Some("moat-ram"),
                &dir,
                Some("tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                Some(
                    format!(
                        "mode=0700,uid={},gid={},size={}m,nr_inodes=4",
                        self.uid,
                        self.gid,
                        mib + 1
                    )
                    .as_str(),
                ),
            )
            .map_err(sys(format!("mount the guest's RAM on {}", dir.display())))?;
        }
        Ok(())
    }

    fn pivot(&self) -> Result<(), JailError> {
        let old = self.root.join(".old");
        std::fs::create_dir(&old).map_err(io("create the old root's mount point"))?;
        nix::unistd::pivot_root(&self.root, &old).map_err(sys("pivot into the jail"))?;
        nix::unistd::chdir("/").map_err(sys("enter the jail's root"))?;
        umount2("/.old", MntFlags::MNT_DETACH).map_err(sys("detach the host's root"))?;
        std::fs::remove_dir("/.old").map_err(io("remove the old root's mount point"))?;
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REMOUNT
                | MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV
                | MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .map_err(sys("make the jail's root read-only"))
    }

    fn switch_user(&self) -> Result<(), JailError> {
        use nix::unistd::{setgroups, setresgid, setresuid, Gid, Uid};
        if !self.rootless {
            let groups: Vec<Gid> = self.groups.iter().map(|g| Gid::from_raw(*g)).collect();
            setgroups(&groups).map_err(sys("set the VMM's groups"))?;
        }
        let g = Gid::from_raw(self.gid);
        setresgid(g, g, g).map_err(sys(format!("switch to host group {}", self.gid)))?;
        let u = Uid::from_raw(self.uid);
        setresuid(u, u, u).map_err(sys(format!("switch to host user {}", self.uid)))?;
        if self.rootless {
            // Not root in its namespace, so the switch dropped nothing: the
            // bounding set first (that needs CAP_SETPCAP), then the rest.
            for set in [
                caps::CapSet::Bounding,
                caps::CapSet::Ambient,
                caps::CapSet::Inheritable,
                caps::CapSet::Effective,
                caps::CapSet::Permitted,
            ] {
                caps::clear(None, set).map_err(|_| JailError::CapsRemain(self.uid))?;
            }
        }
        for set in [
            caps::CapSet::Permitted,
            caps::CapSet::Effective,
            caps::CapSet::Ambient,
        ] {
            let held = caps::read(None, set).map_err(|_| JailError::CapsRemain(self.uid))?;
            if !held.is_empty() {
                return Err(JailError::CapsRemain(self.uid));
            }
        }
        Ok(())
    }
}

/// Binds `host` read-only at the same path under `root` (its parents made).
fn bind_ro(root: &Path, host: &Path, extra: MsFlags) -> Result<(), JailError> {
    let rel = host.strip_prefix("/").unwrap_or(host);
    let target = root.join(rel);
    let meta = std::fs::metadata(host).map_err(io(format!("stat {}", host.display())))?;
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(io(format!("create {}", parent.display())))?;
    }
    if meta.is_dir() {
        std::fs::create_dir_all(&target).map_err(io(format!("create {}", target.display())))?;
    } else if !target.exists() {
        std::fs::File::create(&target).map_err(io(format!("create {}", target.display())))?;
    }
    mount(
        Some(host),
        &target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(sys(format!("bind {}", host.display())))?;
    // The source mount's locked restrictions are kept where the kernel
    // insists (in a user namespace, rootless, it refuses a remount that
    // would drop one).
    let fd = rustix::fs::open(
        &target,
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| JailError::Io {
        step: format!("open {}", target.display()),
        source: e.into(),
    })?;
    moat_jail::rootfs::remount_bind(
        std::os::fd::AsFd::as_fd(&fd),
        MsFlags::MS_RDONLY | extra,
        MsFlags::empty(),
    )
    .map_err(io(format!("make {} read-only", host.display())))
}

/// No core dumps (guest memory would land on the host's disk), a bounded
/// descriptor table.
fn limits() -> Result<(), JailError> {
    use nix::sys::resource::{setrlimit, Resource};
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(sys("set RLIMIT_CORE"))?;
    setrlimit(Resource::RLIMIT_NOFILE, 1024, 1024).map_err(sys("set RLIMIT_NOFILE"))?;
    Ok(())
}
