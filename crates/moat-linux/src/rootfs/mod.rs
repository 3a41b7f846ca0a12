//! The container's filesystem: mounts, devices, pivot_root, masked and read-only paths.
//!
//! CONTRACT (called in the container's init process, already in its new mount and
//! user namespaces and with full capabilities there):
//! ```ignore
//! pub struct RootfsConfig<'a> { pub spec: &'a Spec, pub rootfs: &'a Path /*absolute host path*/,
//!     pub bundle: &'a Path, pub cgroup_mounts: &'a [(String, PathBuf)], pub no_pivot: bool,
//!     pub in_user_ns: bool /* devices are bind-mounted from the host, not mknod'ed */ }
//! /// Propagation, bind rootfs on itself, every spec mount (targets resolved inside the
//! /// rootfs with openat2 RESOLVE_IN_ROOT, never by joining strings), default devices and
//! /// spec devices, /dev symlinks, /dev/ptmx, /dev/pts. Runs before createRuntime hooks.
//! pub fn prepare(cfg: &RootfsConfig) -> Result<(), RootfsError>;
//! /// pivot_root (or MS_MOVE + chroot with no_pivot), detach the old root, chdir("/").
//! pub fn pivot(cfg: &RootfsConfig) -> Result<(), RootfsError>;
//! /// After pivot: masked paths, read-only paths, read-only root, rootfsPropagation.
//! pub fn finish(cfg: &RootfsConfig) -> Result<(), RootfsError>;
//! /// Write `value` to /proc/sys/<key with dots as slashes>, checking the open fd is on procfs.
//! pub fn write_sysctl(key: &str, value: &str) -> Result<(), RootfsError>;
//! ```
