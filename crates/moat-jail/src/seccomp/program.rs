//! A seccomp filter compiled once, by the runtime, to the classic BPF program
//! libseccomp would load, and the cache that keeps such programs between
//! runs. Compiling a few hundred rules through libseccomp (building its rule
//! database, then generating BPF, which `seccomp_load` does again each time)
//! cost ~1.5 ms per container; loading a kept program is one syscall.
//!
//! A kept program is a security artefact: whoever could change it could
//! weaken every container's filter. So a cache file is
//! - named by the SHA-256 of everything the program depends on: the whole
//!   profile (as JSON), the running moat binary (device, inode, size, mtime:
//!   the translation rules and the statically linked libseccomp live in it),
//!   libseccomp's version and the kernel (release, version, machine);
//! - written mode 0600 under a private name and renamed into place;
//! - used only when it, and its directory, belong to the runtime's user and
//!   nobody else can write them (else the run fails: refused, not repaired),
//!   and when its content checks out: magic, the same key inside, a length
//!   that matches, the SHA-256 of all of it. A file that fails the content
//!   check (a crash mid-write) is replaced by a fresh compile.
//!
//! No cache when the binary runs from a memfd (rootless: its identity
//! changes each run); the program is then compiled each time, as it is when
//! no state root is given.
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use oci_spec::runtime::LinuxSeccomp;
use sha2::{Digest, Sha256};

use super::{compile, SeccompError};
use crate::cache;

/// The BPF program of a filter and the `SECCOMP_FILTER_FLAG_*` bits to load
/// it with. Only [`Filter::program`](super::Filter::program) and the cache
/// make one, both from libseccomp's own output.
#[derive(Clone, PartialEq, Eq)]
pub struct Program {
    /// `struct sock_filter` array, native byte order, as libseccomp exports it.
    insns: Vec<u8>,
    flags: libc::c_ulong,
}

impl std::fmt::Debug for Program {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Program")
            .field("instructions", &self.len())
            .field("flags", &self.flags)
            .finish()
    }
}

const INSN: usize = 8;
/// In a program's flags: the filter notifies a listener, which loading it
/// returns.
const NEW_LISTENER: libc::c_ulong = libc::SECCOMP_FILTER_FLAG_NEW_LISTENER;
const MAGIC: &[u8; 8] = b"MOATBPF1";
const KEY_LEN: usize = 64;
const HEADER: usize = MAGIC.len() + KEY_LEN + 4 + 4;
const SUM: usize = 32;
/// Cache files kept (other profiles, older binaries or kernels go).
const KEEP: usize = 16;

impl Program {
    /// A program from its instructions (`struct sock_filter` array, native
    /// byte order) and load flags, as [`instructions`](Program::instructions)
    /// and [`flags`](Program::flags) give them: its shape is checked (whole
    /// instructions, 1 to `BPF_MAXINSNS` of them, known flags), its
    /// content is the giver's word.
    pub fn from_parts(insns: Vec<u8>, flags: libc::c_ulong) -> Result<Program, SeccompError> {
        let n = insns.len() / INSN;
        let max = usize::try_from(libc::BPF_MAXINSNS).unwrap_or(0);
        if !insns.len().is_multiple_of(INSN)
            || n == 0
            || n > max
            || flags & !(moat_sys::seccomp::LISTENER_FLAGS | NEW_LISTENER) != 0
        {
            return Err(SeccompError::BadProgram {
                len: insns.len(),
                flags,
            });
        }
        Ok(Program { insns, flags })
    }

    /// Instructions in the program.
    pub fn len(&self) -> usize {
        self.insns.len() / INSN
    }

    pub fn is_empty(&self) -> bool {
        self.insns.is_empty()
    }

    /// The `SECCOMP_FILTER_FLAG_*` bits it is loaded with.
    pub fn flags(&self) -> libc::c_ulong {
        self.flags
    }

    /// The instructions, native byte order.
    pub fn instructions(&self) -> &[u8] {
        &self.insns
    }

    /// Installs the program on the calling thread, as
    /// [`Filter::load`](super::Filter::load) would: the listener fd when the
    /// filter has notify rules.
    pub fn load(&self) -> Result<Option<std::os::fd::OwnedFd>, SeccompError> {
        let prog: Vec<moat_sys::seccomp::SockFilter> = self
            .insns
            .chunks_exact(INSN)
            .map(|c| moat_sys::seccomp::SockFilter {
                code: u16::from_ne_bytes([c[0], c[1]]),
                jt: c[2],
                jf: c[3],
                k: u32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
            })
            .collect();
        let err = |source| SeccompError::LoadProgram { source };
        if self.flags & NEW_LISTENER != 0 {
            moat_sys::seccomp::set_mode_filter_listener(self.flags & !NEW_LISTENER, &prog)
                .map(Some)
                .map_err(err)
        } else {
            moat_sys::seccomp::set_mode_filter(self.flags, &prog)
                .map(|()| None)
                .map_err(err)
        }
    }

    fn encode(&self, key: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + self.insns.len() + SUM);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(key.as_bytes());
        // from_parts keeps the flags within ALLOWED_FLAGS: they fit in 32 bits.
        out.extend_from_slice(&u32::try_from(self.flags).unwrap_or(u32::MAX).to_le_bytes());
        out.extend_from_slice(&(self.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.insns);
        let sum = Sha256::digest(&out);
        out.extend_from_slice(&sum);
        out
    }

    /// The program in a cache file's bytes, if they are whole and made for `key`.
    fn decode(bytes: &[u8], key: &str) -> Option<Program> {
        if bytes.len() < HEADER + SUM || key.len() != KEY_LEN {
            return None;
        }
        let (body, sum) = bytes.split_at(bytes.len() - SUM);
        if Sha256::digest(body).as_slice() != sum {
            return None;
        }
        let (magic, rest) = body.split_at(MAGIC.len());
        let (k, rest) = rest.split_at(KEY_LEN);
        let (flags, rest) = rest.split_at(4);
        let (n, insns) = rest.split_at(4);
        let n = u32::from_le_bytes(n.try_into().ok()?) as usize;
        if magic != MAGIC || k != key.as_bytes() || insns.len() != n.checked_mul(INSN)? {
            return None;
        }
        let flags = libc::c_ulong::from(u32::from_le_bytes(flags.try_into().ok()?));
        Program::from_parts(insns.to_vec(), flags).ok()
    }
}

/// The program for `seccomp`, compiled here (in the runtime, before the
/// container process is forked) or taken from the cache under
/// `state_root`. Filters with notify rules too: loading their program
/// returns the listener, as libseccomp's load does.
pub fn prepare(
    seccomp: &LinuxSeccomp,
    state_root: Option<&Path>,
) -> Result<Option<Program>, SeccompError> {
    let Some((dir, key)) = cache_slot(seccomp, state_root)? else {
        return compile(seccomp)?.program();
    };
    let path = dir.join(format!("{key}.bpf"));
    if let Some(p) = read_entry(&path, &key)? {
        return Ok(Some(p));
    }
    let Some(program) = compile(seccomp)?.program()? else {
        return Ok(None);
    };
    // Best effort: a program that cannot be kept is still used.
    if store(&dir, &path, &program.encode(&key)) {
        cache::trim(&dir, KEEP);
    }
    Ok(Some(program))
}

/// Keeps `program` in the cache under `state_root` as `seccomp`'s, where
/// a later [`prepare`] finds it instead of compiling: for a program this
/// same moat compiled elsewhere from this profile (a microVM's host
/// compiles its guest's filter natively, which under emulation took the
/// guest ~35 ms). The caller vouches that it is this profile's program.
/// Whether it was kept (no cache without a stable binary identity).
pub fn seed(
    seccomp: &LinuxSeccomp,
    program: &Program,
    state_root: &Path,
) -> Result<bool, SeccompError> {
    let Some((dir, key)) = cache_slot(seccomp, Some(state_root))? else {
        return Ok(false);
    };
    let path = dir.join(format!("{key}.bpf"));
    Ok(store(&dir, &path, &program.encode(&key)))
}

/// The cache directory and the key for `seccomp`, or `None` without a
/// state root or a stable identity of the running binary.
fn cache_slot(
    seccomp: &LinuxSeccomp,
    state_root: Option<&Path>,
) -> Result<Option<(std::path::PathBuf, String)>, SeccompError> {
    let Some(root) = state_root else {
        return Ok(None);
    };
    let Some(binary) = binary_identity() else {
        return Ok(None);
    };
    // The listener's path and metadata do not change the program (the
    // sandbox tier's name each container): they are not part of the key.
    let mut filter_only = seccomp.clone();
    filter_only.set_listener_path(None);
    filter_only.set_listener_metadata(None);
    let profile =
        serde_json::to_vec(&filter_only).map_err(|source| SeccompError::Serialize { source })?;
    let u = rustix::system::uname();
    let v = libseccomp::ScmpVersion::current().ok();
    let lib = v.map(|v| format!("{}.{}.{}", v.major, v.minor, v.micro));
    let key = cache::key(&[
        b"moat-seccomp-bpf-v1",
        binary.as_bytes(),
        lib.unwrap_or_default().as_bytes(),
        u.release().to_bytes(),
        u.version().to_bytes(),
        u.machine().to_bytes(),
        &profile,
    ]);
    Ok(Some((cache::dir(root, "seccomp")?, key)))
}

/// Device, inode, size and mtime of the running binary; `None` for a memfd
/// copy (made anew each run).
fn binary_identity() -> Option<String> {
    let link = std::fs::read_link("/proc/self/exe").ok()?;
    if link.as_os_str().as_encoded_bytes().starts_with(b"/memfd:") {
        return None;
    }
    let m = std::fs::metadata("/proc/self/exe").ok()?;
    Some(format!(
        "{:x}:{:x}:{}:{}.{}",
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec()
    ))
}

/// The cached program at `path`: `None` when there is none or its content
/// does not check out (then removed, to be replaced); an error when the
/// file is not ours or others may write it.
fn read_entry(path: &Path, key: &str) -> Result<Option<Program>, SeccompError> {
    let err = |step| {
        move |source| SeccompError::CacheFile {
            step,
            path: path.to_owned(),
            source,
        }
    };
    let mut f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err("open")(e)),
    };
    let md = f.metadata().map_err(err("inspect"))?;
    if !md.is_file() || !cache::trusted(&md) {
        return Err(err("trust")(std::io::Error::other(
            "not a regular file of ours, or writable by others",
        )));
    }
    let max = HEADER + SUM + INSN * usize::try_from(libc::BPF_MAXINSNS).unwrap_or(0);
    let mut bytes = Vec::with_capacity(usize::try_from(md.len()).unwrap_or(0).min(max));
    (&mut f)
        .take(max as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(err("read"))?;
    match Program::decode(&bytes, key) {
        Some(p) => Ok(Some(p)),
        None => {
            std::fs::remove_file(path).map_err(err("remove the damaged"))?;
            Ok(None)
        }
    }
}

/// Writes `bytes` to a private file and renames it to `path`; whether it
/// was published.
fn store(dir: &Path, path: &Path, bytes: &[u8]) -> bool {
    let tmp = cache::temp_name(dir);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .and_then(|mut f| f.write_all(bytes));
    let published = written.is_ok() && cache::publish(&tmp, path).unwrap_or(false);
    if !published {
        let _ = std::fs::remove_file(&tmp);
    }
    published
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> LinuxSeccomp {
        serde_json::from_str(json).expect("test seccomp JSON parses")
    }

    const PROFILE: &str = r#"{"defaultAction": "SCMP_ACT_ALLOW", "flags": ["SECCOMP_FILTER_FLAG_LOG"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]}"#;

    #[test]
    fn encoding_round_trips_and_refuses_damage() {
        let p = compile(&parse(PROFILE))
            .unwrap()
            .program()
            .unwrap()
            .unwrap();
        assert_eq!(p.flags(), libc::SECCOMP_FILTER_FLAG_LOG);
        assert!(p.len() > 3);
        let key = "a".repeat(KEY_LEN);
        let bytes = p.encode(&key);
        assert_eq!(Program::decode(&bytes, &key), Some(p.clone()));
        assert_eq!(Program::decode(&bytes, &"b".repeat(KEY_LEN)), None);
        assert_eq!(Program::decode(&bytes[..bytes.len() - 1], &key), None);
        for i in [0, HEADER - 1, HEADER + 3, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[i] ^= 1;
            assert_eq!(Program::decode(&bad, &key), None, "byte {i}");
        }
    }

    /// A filter with notify rules is compiled and cached like any other;
    /// loading its program returns a listener that receives the notified
    /// call and answers it (here: getppid answered 4242 by a thread of the
    /// loading process, which the filter does not cover: it began before).
    #[test]
    fn notify_programs_are_cached_and_hand_back_a_working_listener() {
        let dir = tempfile::tempdir().unwrap();
        let s = parse(
            r#"{"defaultAction": "SCMP_ACT_ALLOW", "flags": ["SECCOMP_FILTER_FLAG_TSYNC"], "listenerPath": "/x",
                "syscalls": [{"names": ["getppid"], "action": "SCMP_ACT_NOTIFY"}]}"#,
        );
        let program = prepare(&s, Some(dir.path())).unwrap().unwrap();
        assert_ne!(program.flags() & NEW_LISTENER, 0);
        // TSYNC with a listener: the load adds TSYNC_ESRCH, as the kernel asks.
        assert_ne!(program.flags() & libc::SECCOMP_FILTER_FLAG_TSYNC, 0);
        // From the cache the second time, the same program; and for another
        // listener (the sandbox tier names one per container) too: one entry.
        assert_eq!(prepare(&s, Some(dir.path())).unwrap().unwrap(), program);
        let other = parse(
            r#"{"defaultAction": "SCMP_ACT_ALLOW", "flags": ["SECCOMP_FILTER_FLAG_TSYNC"],
                "listenerPath": "/y", "listenerMetadata": "z",
                "syscalls": [{"names": ["getppid"], "action": "SCMP_ACT_NOTIFY"}]}"#,
        );
        assert_eq!(prepare(&other, Some(dir.path())).unwrap().unwrap(), program);
        let entries = std::fs::read_dir(dir.path().join(".cache/seccomp"))
            .unwrap()
            .count();
        assert_eq!(entries, 1);
        let code = moat_sys::process::run_in_child(0, || {
            let (tx, rx) = std::sync::mpsc::channel::<std::os::fd::OwnedFd>();
            let agent = std::thread::spawn(move || -> i32 {
                let Ok(fd) = rx.recv() else { return 10 };
                let Ok(n) = moat_sys::notify::recv(std::os::fd::AsFd::as_fd(&fd)) else {
                    return 11;
                };
                if n.nr != libc::SYS_getppid as i32 {
                    return 12;
                }
                match moat_sys::notify::send(std::os::fd::AsFd::as_fd(&fd), n.id, 4242, 0, 0) {
                    Ok(()) => 0,
                    Err(_) => 13,
                }
            });
            if rustix::thread::set_no_new_privs(true).is_err() {
                return 3;
            }
            let Ok(Some(fd)) = program.load() else {
                return 4;
            };
            if tx.send(fd).is_err() {
                return 5;
            }
            let ppid = rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get());
            let agent = agent.join().unwrap_or(20);
            if agent != 0 {
                return agent;
            }
            if ppid == 4242 {
                0
            } else {
                6
            }
        })
        .unwrap();
        assert_eq!(code, 0);
    }

    #[test]
    fn the_cache_serves_the_same_program_and_refuses_foreign_files() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let s = parse(PROFILE);
        let fresh = compile(&s).unwrap().program().unwrap().unwrap();
        let first = prepare(&s, Some(tmp.path())).unwrap().unwrap();
        assert_eq!(first, fresh);
        let dir = tmp.path().join(".cache/seccomp");
        let files: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().collect();
        assert_eq!(files.len(), 1);
        let file = files[0].path();
        let md = std::fs::metadata(&file).unwrap();
        assert_eq!(md.mode() & 0o777, 0o600);
        assert_eq!(prepare(&s, Some(tmp.path())).unwrap().unwrap(), fresh);

        // A damaged file is replaced by a fresh compile.
        let mut bytes = std::fs::read(&file).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        std::fs::write(&file, &bytes).unwrap();
        assert_eq!(prepare(&s, Some(tmp.path())).unwrap().unwrap(), fresh);
        assert_ne!(std::fs::read(&file).unwrap(), bytes);

        // A file others may write is refused: the run fails.
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(matches!(
            prepare(&s, Some(tmp.path())),
            Err(SeccompError::CacheFile { step: "trust", .. })
        ));

        // Another profile is another entry.
        let other = parse(
            r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["rmdir"], "action": "SCMP_ACT_ERRNO"}]}"#,
        );
        prepare(&other, Some(tmp.path())).unwrap().unwrap();
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2);
    }

    /// A program handed over as parts (a microVM's host to its guest) and
    /// seeded into a cache is what `prepare` serves there, without a
    /// compile; and a seeded entry is keyed by its profile like any other.
    #[test]
    fn a_seeded_program_is_served_by_prepare() {
        let tmp = tempfile::tempdir().unwrap();
        let s = parse(PROFILE);
        let fresh = compile(&s).unwrap().program().unwrap().unwrap();
        let handed = Program::from_parts(fresh.instructions().to_vec(), fresh.flags()).unwrap();
        assert_eq!(handed, fresh);
        // Marked so the test can tell a served seed from a fresh compile:
        // the same shape, one instruction's constant changed.
        let mut insns = fresh.instructions().to_vec();
        let last = insns.len() - INSN;
        insns[last + 4] ^= 1;
        let marked = Program::from_parts(insns, fresh.flags()).unwrap();
        assert!(seed(&s, &marked, tmp.path()).unwrap());
        assert_eq!(prepare(&s, Some(tmp.path())).unwrap().unwrap(), marked);
        // Another profile does not find it.
        let other = parse(
            r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["rmdir"], "action": "SCMP_ACT_ERRNO"}]}"#,
        );
        assert_ne!(prepare(&other, Some(tmp.path())).unwrap().unwrap(), marked);
        // Parts of the wrong shape are refused.
        assert!(Program::from_parts(vec![0; INSN + 1], 0).is_err());
        assert!(Program::from_parts(Vec::new(), 0).is_err());
        assert!(Program::from_parts(fresh.instructions().to_vec(), 1 << 20).is_err());
    }

    #[test]
    fn a_loaded_program_filters_like_libseccomp() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("d");
        let s = parse(
            r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
                {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
                {"names": ["personality"], "action": "SCMP_ACT_ERRNO", "errnoRet": 42,
                 "args": [{"index": 0, "value": 4294967295, "op": "SCMP_CMP_NE"}]}]}"#,
        );
        let program = prepare(&s, Some(dir.path())).unwrap().unwrap();
        let code = moat_sys::process::run_in_child(0, || {
            // Loading needs no_new_privs (or CAP_SYS_ADMIN, dropped here).
            if rustix::thread::set_no_new_privs(true).is_err() {
                return 3;
            }
            if program.load().is_err() {
                return 4;
            }
            match std::fs::create_dir(&target) {
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
                _ => return 5,
            }
            if moat_sys::process::personality(0xffff_ffff).is_err() {
                return 6;
            }
            match moat_sys::process::personality(0) {
                Err(e) if e.raw_os_error() == Some(42) => {}
                _ => return 7,
            }
            0
        })
        .unwrap();
        assert_eq!(code, 0);
        assert!(!target.exists());
    }
}
