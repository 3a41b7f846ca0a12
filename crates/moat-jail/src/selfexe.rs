//! CVE-2019-5736: a container process that execs a file whose interpreter is
//! `/proc/self/exe` runs the runtime binary inside the container and can then
//! reopen it for writing. moat therefore runs every command that starts a
//! container process from a copy of itself that cannot be written:
//!
//! - nothing to do when the binary already lives on a read-only mount;
//! - as root: a copy on a read-only tmpfs at [`EXE_CACHE`], made once per
//!   binary (keyed by device, inode, size and mtime) and re-executed from
//!   there, which costs one `execve` and no copy;
//! - otherwise (rootless, or the cache cannot be set up): a write-sealed
//!   memfd copy, made on each invocation.
use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsFd;

use rustix::fs::{fcntl_add_seals, fcntl_get_seals, memfd_create, MemfdFlags, SealFlags};

#[derive(Debug, thiserror::Error)]
pub enum SelfExeError {
    #[error("cannot open /proc/self/exe")]
    Open(#[source] std::io::Error),
    #[error("cannot make a sealed copy of the moat binary")]
    Copy(#[source] std::io::Error),
    #[error("cannot re-execute the sealed copy of the moat binary")]
    Exec(#[source] nix::Error),
}

const SEALS: SealFlags = SealFlags::SEAL
    .union(SealFlags::SHRINK)
    .union(SealFlags::GROW)
    .union(SealFlags::WRITE);

/// Whether this process already runs from a write-sealed memfd.
pub fn is_sealed() -> Result<bool, SelfExeError> {
    let f = File::open("/proc/self/exe").map_err(SelfExeError::Open)?;
    Ok(fcntl_get_seals(f.as_fd()).is_ok_and(|s| s.contains(SealFlags::WRITE)))
}

/// Where root keeps read-only copies of the moat binary.
pub const EXE_CACHE: &str = "/run/moat-exe";

/// How many binaries the cache keeps.
const KEEP_BINARIES: usize = 3;

/// Re-executes this program from an unwritable copy unless it already runs
/// from one. Returns only when no re-exec was needed.
pub fn ensure_protected(args: &[std::ffi::OsString]) -> Result<(), SelfExeError> {
    let exe = File::open("/proc/self/exe").map_err(SelfExeError::Open)?;
    let on_ro_mount = rustix::fs::fstatvfs(&exe)
        .is_ok_and(|v| v.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY));
    if on_ro_mount || fcntl_get_seals(exe.as_fd()).is_ok_and(|s| s.contains(SealFlags::WRITE)) {
        return Ok(());
    }
    if rustix::process::geteuid().is_root() {
        if let Ok(copy) = install_ro_copy(&exe) {
            let e = exec_path(&copy, args);
            // Fall back to the memfd if the cached copy cannot be executed.
            drop(e);
        }
    }
    ensure_sealed(args)
}

/// The cache entry for the running binary, created if missing.
fn install_ro_copy(exe: &File) -> std::io::Result<std::path::PathBuf> {
    use rustix::mount::{mount, mount_remount, MountFlags};
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let m = exe.metadata()?;
    let key = format!(
        "moat-{:x}-{:x}-{}-{}.{}",
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec()
    );
    let dir = std::path::Path::new(EXE_CACHE);
    let target = dir.join(&key);
    let ro = |p: &std::path::Path| {
        rustix::fs::statvfs(p)
            .is_ok_and(|v| v.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY))
    };
    if target.is_file() && ro(dir) {
        return Ok(target);
    }
    std::fs::create_dir_all("/run")?;
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/run/moat-exe.lock")?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)?;
    let base = MountFlags::NOSUID | MountFlags::NODEV;
    if !is_mount_point(dir)? {
        std::fs::create_dir_all(dir)?;
        mount("moat-exe", dir, "tmpfs", base, Some(c"mode=0711,size=256m"))?;
    }
    if !target.is_file() {
        mount_remount(dir, base, c"")?;
        // Keep the newest few binaries (a debug and a release build may be
        // used in turn); older ones go. A process still running from one
        // keeps its unlinked inode until it exits.
        let mut entries: Vec<(std::time::SystemTime, std::path::PathBuf)> = std::fs::read_dir(dir)?
            .flatten()
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        entries.sort_by_key(|e| std::cmp::Reverse(e.0));
        for (_, old) in entries.iter().skip(KEEP_BINARIES - 1) {
            remove_unless_running(old);
        }
        let tmp = dir.join(format!(".{key}.tmp"));
        let copy = || {
            let mut src = exe.try_clone()?;
            std::io::Seek::rewind(&mut src)?;
            let mut dst = File::create(&tmp)?;
            std::io::copy(&mut src, &mut dst)?;
            dst.set_permissions(std::fs::Permissions::from_mode(0o555))?;
            std::fs::rename(&tmp, &target)
        };
        let mut r = copy();
        if r.is_err() {
            // Full (debug builds are large): this binary matters more than
            // the older ones kept beside it.
            let _ = std::fs::remove_file(&tmp);
            for (_, old) in &entries {
                remove_unless_running(old);
            }
            r = copy();
        }
        let _ = std::fs::remove_file(&tmp);
        mount_remount(dir, base | MountFlags::RDONLY, c"")?;
        r?;
    } else if !ro(dir) {
        mount_remount(dir, base | MountFlags::RDONLY, c"")?;
    }
    Ok(target)
}

fn is_mount_point(dir: &std::path::Path) -> std::io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(dir), dir.parent().map(std::fs::metadata)) {
        (Ok(d), Some(Ok(p))) => Ok(d.dev() != p.dev()),
        (Err(e), _) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        (Err(e), _) => Err(e),
        (_, _) => Ok(false),
    }
}

/// Removes a cached binary unless a process still runs it: removed, it
/// would stay in memory as an orphan inode, and a tmpfs holding one cannot
/// be made read-only again (every later moat would fall back to a memfd
/// copy). Opening a running executable for writing fails with ETXTBSY.
fn remove_unless_running(path: &std::path::Path) {
    match std::fs::OpenOptions::new().write(true).open(path) {
        Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {}
        _ => {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn exec_path(path: &std::path::Path, args: &[std::ffi::OsString]) -> SelfExeError {
    let c = |b: &[u8]| CString::new(b).map_err(|_| SelfExeError::Exec(nix::Error::EINVAL));
    let run = || -> Result<std::convert::Infallible, SelfExeError> {
        let p = c(path.as_os_str().as_encoded_bytes())?;
        let argv = args
            .iter()
            .map(|a| c(a.as_encoded_bytes()))
            .collect::<Result<Vec<_>, _>>()?;
        nix::unistd::execv(&p, &argv).map_err(SelfExeError::Exec)
    };
    match run() {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

/// Re-executes this program from a sealed memfd copy unless it already runs
/// from one. Returns only when no re-exec was needed.
pub fn ensure_sealed(args: &[std::ffi::OsString]) -> Result<(), SelfExeError> {
    if is_sealed()? {
        return Ok(());
    }
    let mut src = File::open("/proc/self/exe").map_err(SelfExeError::Open)?;
    let mem = memfd_create("moat", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
        .map_err(|e| SelfExeError::Copy(e.into()))?;
    let mut dst = File::from(mem);
    std::io::copy(&mut src, &mut dst).map_err(SelfExeError::Copy)?;
    fcntl_add_seals(dst.as_fd(), SEALS).map_err(|e| SelfExeError::Copy(e.into()))?;
    let argv: Vec<CString> = args
        .iter()
        .map(|a| {
            CString::new(a.as_encoded_bytes()).map_err(|_| SelfExeError::Exec(nix::Error::EINVAL))
        })
        .collect::<Result<_, _>>()?;
    let envp: Vec<CString> = std::env::vars_os()
        .filter_map(|(k, v)| {
            let mut kv = k.into_encoded_bytes();
            kv.push(b'=');
            kv.extend_from_slice(v.as_encoded_bytes());
            CString::new(kv).ok()
        })
        .collect();
    let e = nix::unistd::fexecve(dst.as_fd(), &argv, &envp).unwrap_err();
    Err(SelfExeError::Exec(e))
}
