//! CVE-2019-5736: a container process that execs a file whose interpreter is
//! `/proc/self/exe` runs the runtime binary inside the container and can then
//! reopen it for writing. moat therefore runs every command that starts a
//! container process from a sealed, in-memory copy of itself: what the
//! container can reach is a memfd that no one can write, never the host file.
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
