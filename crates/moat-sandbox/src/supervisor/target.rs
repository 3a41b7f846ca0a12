//! The workload thread behind a notification: its credentials (read from
//! `/proc/TID/status`, cached until a task is created or a credential
//! changes) and its memory (`process_vm_readv`/`writev`, bounded).
use std::collections::HashMap;
use std::io::IoSliceMut;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::sys::uio::{process_vm_readv, process_vm_writev, RemoteIoVec};
use nix::unistd::Pid;
use rustix::fs::{Mode, OFlags};

pub use super::decode::PATH_MAX;
/// Largest `/proc/TID/status` read.
const STATUS_MAX: usize = 8192;
/// Threads whose credentials are kept at once (each holds a descriptor).
const CACHE_MAX: usize = 256;

/// What the kernel would check an access of this thread against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Creds {
    /// Host thread-group ID (for pidfds).
    pub tgid: i32,
    /// PID and TID as the container's PID namespace names them.
    pub ns_tgid: i32,
    pub ns_tid: i32,
    pub ruid: u32,
    pub euid: u32,
    pub fsuid: u32,
    pub rgid: u32,
    pub egid: u32,
    pub fsgid: u32,
    pub groups: Vec<u32>,
    pub cap_eff: u64,
    pub cap_prm: u64,
    pub umask: u32,
}

/// Parses `/proc/TID/status` (as the reader's user namespace sees it).
pub fn parse_status(text: &str) -> Option<Creds> {
    let mut c = Creds {
        tgid: 0,
        ns_tgid: 0,
        ns_tid: 0,
        ruid: 0,
        euid: 0,
        fsuid: 0,
        rgid: 0,
        egid: 0,
        fsgid: 0,
        groups: Vec::new(),
        cap_eff: 0,
        cap_prm: 0,
        umask: 0o022,
    };
    let mut seen = 0u32;
    for line in text.lines() {
        let Some((key, val)) = line.split_once(':') else {
            continue;
        };
        let nums = || val.split_whitespace().map(|v| v.parse::<u64>().ok());
        let last = || {
            val.split_whitespace()
                .last()
                .and_then(|v| v.parse::<i32>().ok())
        };
        match key {
            "Umask" => c.umask = u32::from_str_radix(val.trim(), 8).ok()?,
            "Tgid" => c.tgid = val.trim().parse().ok()?,
            "NStgid" => c.ns_tgid = last()?,
            "NSpid" => c.ns_tid = last()?,
            "Uid" => {
                let v: Vec<Option<u64>> = nums().collect();
                c.ruid = u32::try_from((*v.first()?)?).ok()?;
                c.euid = u32::try_from((*v.get(1)?)?).ok()?;
                c.fsuid = u32::try_from((*v.get(3)?)?).ok()?;
                seen |= 1;
            }
            "Gid" => {
                let v: Vec<Option<u64>> = nums().collect();
                c.rgid = u32::try_from((*v.first()?)?).ok()?;
                c.egid = u32::try_from((*v.get(1)?)?).ok()?;
                c.fsgid = u32::try_from((*v.get(3)?)?).ok()?;
                seen |= 2;
            }
            "Groups" => {
                c.groups = nums()
                    .map(|g| g.and_then(|g| u32::try_from(g).ok()))
                    .collect::<Option<Vec<u32>>>()?;
                seen |= 4;
            }
            "CapEff" => {
                c.cap_eff = u64::from_str_radix(val.trim(), 16).ok()?;
                seen |= 8;
            }
            "CapPrm" => c.cap_prm = u64::from_str_radix(val.trim(), 16).ok()?,
            _ => {}
        }
    }
    (seen == 15 && c.tgid > 0).then_some(c)
}

/// Credentials of workload threads. Each entry holds a pidfd of its thread
/// (`PIDFD_THREAD`): a thread ID is reused only once its thread is gone,
/// and a gone thread's pidfd polls ready, so an entry whose pidfd is not
/// ready still describes the thread behind that ID (checked with one
/// `ppoll` per use, far cheaper than reading `/proc/TID/status`). Entries
/// are dropped by [`Cache::invalidate`] before any credential change runs
/// (set*id, capset, prctl, exec are notified for that). The umask is not
/// trusted from the cache: [`Cache::fresh`] reads it again where it matters.
#[derive(Default)]
pub struct Cache {
    map: HashMap<u32, (Creds, OwnedFd)>,
}

/// `PIDFD_THREAD` (Linux 6.9; `O_EXCL`): a pidfd of one thread.
const PIDFD_THREAD: u32 = libc::O_EXCL as u32;

impl Cache {
    pub fn invalidate(&mut self) {
        self.map.clear();
    }

    pub fn get(&mut self, proc_fd: BorrowedFd<'_>, tid: u32) -> Result<Creds, i32> {
        if let Some((c, fd)) = self.map.get(&tid) {
            if still_running(fd.as_fd()) {
                return Ok(c.clone());
            }
            self.map.remove(&tid);
        }
        self.fresh(proc_fd, tid)
    }

    /// The pidfd of thread `tid` kept with its cached credentials (checked
    /// by [`Cache::get`] just before), if any.
    pub fn pidfd(&self, tid: u32) -> Option<BorrowedFd<'_>> {
        self.map.get(&tid).map(|(_, fd)| fd.as_fd())
    }

    /// Reads the thread's credentials again (and caches them).
    pub fn fresh(&mut self, proc_fd: BorrowedFd<'_>, tid: u32) -> Result<Creds, i32> {
        let pid = rustix::process::Pid::from_raw(i32::try_from(tid).map_err(|_| libc::ESRCH)?)
            .ok_or(libc::ESRCH)?;
        // Opened before the status is read: if the thread is already gone,
        // the pidfd polls ready and the entry is never used.
        let pidfd = rustix::process::pidfd_open(
            pid,
            rustix::process::PidfdFlags::from_bits_retain(PIDFD_THREAD),
        )
        .map_err(|e| e.raw_os_error())?;
        let c = read_creds(proc_fd, tid)?;
        if self.map.len() >= CACHE_MAX {
            self.map.clear();
        }
        self.map.insert(tid, (c.clone(), pidfd));
        Ok(c)
    }
}

/// Whether the thread of `pidfd` has not exited (its ID not free for reuse).
fn still_running(pidfd: BorrowedFd<'_>) -> bool {
    let mut p = [rustix::event::PollFd::new(
        &pidfd,
        rustix::event::PollFlags::IN,
    )];
    let zero = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    matches!(rustix::event::poll(&mut p, Some(&zero)), Ok(0))
}

fn read_creds(proc_fd: BorrowedFd<'_>, tid: u32) -> Result<Creds, i32> {
    let path = format!("{tid}/status");
    let fd = rustix::fs::openat(
        proc_fd,
        path.as_str(),
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| e.raw_os_error())?;
    let mut buf = vec![0u8; STATUS_MAX];
    let mut len = 0;
    while len < buf.len() {
        match rustix::io::read(&fd, &mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.raw_os_error()),
        }
    }
    let text = std::str::from_utf8(&buf[..len]).map_err(|_| libc::EIO)?;
    parse_status(text).ok_or(libc::EIO)
}

/// Reads `len` bytes at `addr` of process `pid`.
pub fn read_mem(pid: u32, addr: u64, len: usize) -> Result<Vec<u8>, i32> {
    let mut buf = vec![0u8; len];
    if len == 0 {
        return Ok(buf);
    }
    let base = usize::try_from(addr).map_err(|_| libc::EFAULT)?;
    let remote = [RemoteIoVec { base, len }];
    let pid = Pid::from_raw(i32::try_from(pid).map_err(|_| libc::ESRCH)?);
    let n =
        process_vm_readv(pid, &mut [IoSliceMut::new(&mut buf)], &remote).map_err(|e| e as i32)?;
    if n != len {
        return Err(libc::EFAULT);
    }
    Ok(buf)
}

/// Reads a NUL-terminated string at `addr` ([`super::decode::cstr`]: at
/// most [`PATH_MAX`] bytes with its NUL).
pub fn read_cstr(pid: u32, addr: u64) -> Result<Vec<u8>, i32> {
    super::decode::cstr(addr, |at, len| read_mem(pid, at, len))
}

/// Reads through a `/proc/PID/mem` fd opened before the supervisor gave up
/// its host privileges: the container's init, until its exec, is not
/// dumpable and its memory belongs to the host's user namespace.
pub fn read_mem_fd(mem: BorrowedFd<'_>, addr: u64, len: usize) -> Result<Vec<u8>, i32> {
    let mut buf = vec![0u8; len];
    let n = rustix::io::pread(mem, &mut buf, addr).map_err(|e| e.raw_os_error())?;
    if n != len {
        return Err(libc::EFAULT);
    }
    Ok(buf)
}

/// Writes `data` at `addr` of process `pid`, all or `EFAULT`.
pub fn write_mem(pid: u32, addr: u64, data: &[u8]) -> Result<(), i32> {
    if data.is_empty() {
        return Ok(());
    }
    let base = usize::try_from(addr).map_err(|_| libc::EFAULT)?;
    let remote = [RemoteIoVec {
        base,
        len: data.len(),
    }];
    let pid = Pid::from_raw(i32::try_from(pid).map_err(|_| libc::ESRCH)?);
    let n =
        process_vm_writev(pid, &[std::io::IoSlice::new(data)], &remote).map_err(|e| e as i32)?;
    if n != data.len() {
        return Err(libc::EFAULT);
    }
    Ok(())
}

/// The path `link` (under host /proc) points to, bounded.
pub fn read_link(proc_fd: BorrowedFd<'_>, link: &str) -> Result<Vec<u8>, i32> {
    let v = rustix::fs::readlinkat(proc_fd.as_fd(), link, Vec::with_capacity(256))
        .map_err(|e| e.raw_os_error())?;
    let bytes = v.into_bytes();
    if bytes.len() >= PATH_MAX {
        return Err(libc::ENAMETOOLONG);
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_parses() {
        let text = "Name:\tsh\nUmask:\t0027\nState:\tS\nTgid:\t4242\nNgid:\t0\nPid:\t4243\n\
                    Uid:\t1000\t1001\t1002\t1003\nGid:\t100\t101\t102\t103\nGroups:\t5 6 \n\
                    NStgid:\t4242\t7\nNSpid:\t4243\t8\nCapPrm:\t0000000000000400\n\
                    CapEff:\t0000000000000002\n";
        let c = parse_status(text).unwrap();
        assert_eq!((c.tgid, c.ns_tgid, c.ns_tid), (4242, 7, 8));
        assert_eq!((c.ruid, c.fsuid, c.rgid, c.fsgid), (1000, 1003, 100, 103));
        assert_eq!((c.euid, c.egid), (1001, 101));
        assert_eq!(c.groups, vec![5, 6]);
        assert_eq!((c.cap_eff, c.cap_prm, c.umask), (2, 0x400, 0o027));
        assert!(parse_status("Uid:\tx\n").is_none());
        assert!(parse_status("").is_none());
    }

    #[test]
    fn own_memory_reads_and_bounds() {
        let me = std::process::id();
        let s = b"/usr/bin\0rest".to_vec();
        assert_eq!(read_cstr(me, s.as_ptr() as u64).unwrap(), b"/usr/bin");
        let long = vec![b'a'; PATH_MAX + 10];
        assert_eq!(read_cstr(me, long.as_ptr() as u64), Err(libc::ENAMETOOLONG));
        assert_eq!(read_cstr(me, 0), Err(libc::EFAULT));
        let mut dst = vec![0u8; 4];
        write_mem(me, dst.as_mut_ptr() as u64, b"abcd").unwrap();
        assert_eq!(&dst, b"abcd");
    }
}
