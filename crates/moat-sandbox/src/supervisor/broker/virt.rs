//! Virtualised views: what the workload reads about its machine describes
//! the sandbox ([`super::super::view`] has the contents).
//!
//! - An open of a virtual /proc or /sys file (by its path, or by a path
//!   whose canonical form is one: a symlink, a descriptor of /proc) is
//!   answered with a sealed memfd holding the sandbox's content, reopened
//!   read-only, installed with ADDFD like any brokered open; a write open
//!   of one fails with EACCES. mountinfo and mounts are the caller's real
//!   ones with host paths taken out.
//! - `uname`, `sysinfo` and `sched_getaffinity` are emulated: the result is
//!   written into the caller's memory.
//! - `getdents`/`getdents64` are carried out on the caller's directory (a
//!   duplicate of its descriptor, so the same offset) and the names the
//!   policy hides beneath that directory are left out.
use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::Instant;

use moat_sys::notify::Notif;
use rustix::fs::{Mode, OFlags};

use super::super::target;
use super::super::view::{self, Memory, SandboxView, Usage};
use super::{errno, Broker, Reply, PROC_SUPER_MAGIC, R};
use crate::policy::clean_components;

/// Largest real file read to transform (mountinfo of many mounts).
const VIEW_READ_MAX: usize = 1 << 20;
/// Largest directory read brokered at once.
const DENTS_MAX: usize = 256 * 1024;
const SYSFS_MAGIC: i64 = 0x6265_6572;

/// The cgroup files the supervisor reads the sandbox's usage from, opened
/// before it confines itself (the cgroup filesystem is the host's).
#[derive(Default)]
pub struct CgroupFiles {
    /// Memory in use, bytes (`memory.current`, v1 `memory.usage_in_bytes`).
    pub memory: Option<OwnedFd>,
    /// CPU time used: v2 `cpu.stat` (`usage_usec`) or v1 `cpuacct.usage`
    /// (nanoseconds), with which it is.
    pub cpu: Option<(OwnedFd, bool)>,
    /// Processes (`pids.current`).
    pub pids: Option<OwnedFd>,
}

impl CgroupFiles {
    /// The files of the cgroup process `pid` is in, those that open.
    pub fn of(pid: i32) -> CgroupFiles {
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        let open = |p: String| {
            rustix::fs::open(p.as_str(), OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()).ok()
        };
        let mut files = CgroupFiles::default();
        for line in text.lines() {
            let mut f = line.splitn(3, ':');
            let (Some(_), Some(ctrl), Some(path)) = (f.next(), f.next(), f.next()) else {
                continue;
            };
            if path.contains("..") {
                continue;
            }
            if ctrl.is_empty() {
                let base = format!("/sys/fs/cgroup{path}");
                files.memory = files
                    .memory
                    .or_else(|| open(format!("{base}/memory.current")));
                if files.cpu.is_none() {
                    files.cpu = open(format!("{base}/cpu.stat")).map(|f| (f, true));
                }
                files.pids = files.pids.or_else(|| open(format!("{base}/pids.current")));
                continue;
            }
            let names: Vec<&str> = ctrl.split(',').collect();
            let dirs = [ctrl.to_string()]
                .into_iter()
                .chain(names.iter().map(|s| s.to_string()));
            for d in dirs {
                let base = format!("/sys/fs/cgroup/{d}{path}");
                if names.contains(&"memory") && files.memory.is_none() {
                    files.memory = open(format!("{base}/memory.usage_in_bytes"));
                }
                if names.contains(&"cpuacct") && files.cpu.is_none() {
                    files.cpu = open(format!("{base}/cpuacct.usage")).map(|f| (f, false));
                }
                if names.contains(&"pids") && files.pids.is_none() {
                    files.pids = open(format!("{base}/pids.current"));
                }
            }
        }
        files
    }
}

/// The supervisor's side of the views.
pub struct ViewState {
    pub cfg: SandboxView,
    /// The sandbox shares the network namespace moat runs in.
    pub host_netns: bool,
    boot_id: String,
    started: Instant,
    started_wall: u64,
    cgroup: CgroupFiles,
    /// Directory (canonical path) → names the policy hides in it.
    hidden: Option<HashMap<Vec<u8>, HashSet<Vec<u8>>>>,
}

impl Default for ViewState {
    fn default() -> ViewState {
        ViewState::new(SandboxView::default(), false, CgroupFiles::default())
    }
}

impl ViewState {
    pub fn new(cfg: SandboxView, host_netns: bool, cgroup: CgroupFiles) -> ViewState {
        let mut random = [0u8; 16];
        let _ = rustix::rand::getrandom(&mut random, rustix::rand::GetRandomFlags::empty());
        let started_wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        ViewState {
            cfg,
            host_netns,
            boot_id: view::boot_id(random),
            started: Instant::now(),
            started_wall,
            cgroup,
            hidden: None,
        }
    }
}

/// The files served instead of the host's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum View {
    CpuInfo,
    MemInfo,
    Stat,
    Uptime,
    LoadAvg,
    Version,
    BootId,
    OsRelease,
    KernelVersion,
    CpuList,
    /// The real file, host paths removed.
    MountInfo,
    Mounts,
}

fn digits(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().all(u8::is_ascii_digit)
}

fn view_of(path: &[u8]) -> Option<View> {
    let comps = clean_components(path);
    Some(match comps.as_slice() {
        [b"proc", b"cpuinfo"] => View::CpuInfo,
        [b"proc", b"meminfo"] => View::MemInfo,
        [b"proc", b"stat"] => View::Stat,
        [b"proc", b"uptime"] => View::Uptime,
        [b"proc", b"loadavg"] => View::LoadAvg,
        [b"proc", b"version"] => View::Version,
        [b"proc", b"sys", b"kernel", b"random", b"boot_id"] => View::BootId,
        [b"proc", b"sys", b"kernel", b"osrelease"] => View::OsRelease,
        [b"proc", b"sys", b"kernel", b"version"] => View::KernelVersion,
        [b"sys", b"devices", b"system", b"cpu", b"online" | b"possible" | b"present"] => {
            View::CpuList
        }
        [b"proc", p, b"mountinfo"] if digits(p) => View::MountInfo,
        [b"proc", p, b"task", t, b"mountinfo"] if digits(p) && digits(t) => View::MountInfo,
        [b"proc", p, b"mounts"] if digits(p) => View::Mounts,
        [b"proc", p, b"task", t, b"mounts"] if digits(p) && digits(t) => View::Mounts,
        _ => return None,
    })
}

fn read_all(fd: BorrowedFd<'_>, max: usize) -> R<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match rustix::io::read(fd, &mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => {
                if out.len() + n > max {
                    return Err(libc::EFBIG);
                }
                out.extend_from_slice(&buf[..n]);
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(errno(e)),
        }
    }
}

fn pread_text(fd: &OwnedFd) -> Option<String> {
    let mut buf = vec![0u8; 4096];
    let n = rustix::io::pread(fd, &mut buf, 0).ok()?;
    buf.truncate(n);
    String::from_utf8(buf).ok()
}

impl Broker {
    /// An open of a path served virtually, decided by the policy first.
    pub(super) fn view_open(&mut self, n: &Notif, abs: &[u8], flags: u64) -> R<Option<Reply>> {
        let Some(kind) = view_of(abs) else {
            return Ok(None);
        };
        if matches!(kind, View::MountInfo | View::Mounts) {
            // Transformed from the real file, once it is open.
            return Ok(None);
        }
        let want = super::access_of(flags);
        self.decide(n, abs, want)?;
        if want.write {
            return Err(libc::EACCES);
        }
        let text = self.view_text(n, kind)?;
        self.serve_text(&text, flags).map(Some)
    }

    /// After a real open: if what was opened is a virtual file (reached
    /// through a symlink, or a mount table), the view instead. `magic` is
    /// the type of the filesystem `fd` is on (`f_type`).
    pub(super) fn view_after(
        &mut self,
        n: &Notif,
        fd: &OwnedFd,
        magic: i64,
        flags: u64,
    ) -> R<Option<Reply>> {
        if magic != PROC_SUPER_MAGIC && magic != SYSFS_MAGIC {
            return Ok(None);
        }
        let canon = self.path_of(fd.as_fd())?;
        let Some(kind) = view_of(&canon) else {
            return Ok(None);
        };
        if super::access_of(flags).write {
            return Err(libc::EACCES);
        }
        let text = match kind {
            View::MountInfo | View::Mounts => {
                let real = read_all(fd.as_fd(), VIEW_READ_MAX)?;
                let real = String::from_utf8_lossy(&real);
                if kind == View::MountInfo {
                    view::mountinfo(&real)
                } else {
                    view::mounts(&real)
                }
                .into_bytes()
            }
            k => self.view_text(n, k)?,
        };
        self.serve_text(&text, flags).map(Some)
    }

    /// A sealed memfd with `text`, reopened read-only.
    fn serve_text(&self, text: &[u8], flags: u64) -> R<Reply> {
        use rustix::fs::{MemfdFlags, SealFlags};
        let m =
            rustix::fs::memfd_create("moat-view", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
                .map_err(errno)?;
        let mut done = 0;
        while done < text.len() {
            done += rustix::io::write(&m, &text[done..]).map_err(errno)?;
        }
        rustix::fs::fcntl_add_seals(
            &m,
            SealFlags::SHRINK | SealFlags::GROW | SealFlags::WRITE | SealFlags::SEAL,
        )
        .map_err(errno)?;
        let via = format!("self/fd/{}", m.as_raw_fd());
        let ro = rustix::fs::openat(
            &self.proc,
            via.as_str(),
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(errno)?;
        Ok(Reply::Fd {
            fd: ro,
            cloexec: flags & libc::O_CLOEXEC as u64 != 0,
        })
    }

    /// CPUs the caller may run on (its affinity, as the kernel has it).
    fn host_cpus(&self, tid: u32) -> usize {
        moat_sys::sock::sched_getaffinity_raw(tid as i32, 1024)
            .map(|m| m.iter().map(|b| b.count_ones() as usize).sum())
            .unwrap_or(1)
    }

    fn ncpus(&self, tid: u32) -> usize {
        self.view.cfg.ncpus(self.host_cpus(tid))
    }

    fn memory(&self) -> Memory {
        let total = self.view.cfg.memory.unwrap_or_else(|| {
            // No limit: the machine's memory is what it may use.
            rustix::fs::openat(
                &self.proc,
                "meminfo",
                OFlags::RDONLY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .ok()
            .and_then(|f| pread_text(&f))
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .map(|kb| kb * 1024)
            .unwrap_or(0)
        });
        let used = self
            .view
            .cgroup
            .memory
            .as_ref()
            .and_then(pread_text)
            .and_then(|t| t.trim().parse::<u64>().ok())
            .unwrap_or(0);
        Memory { total, used }
    }

    fn usage(&self) -> Usage {
        let cpu = self
            .view
            .cgroup
            .cpu
            .as_ref()
            .and_then(|(f, v2)| {
                let t = pread_text(f)?;
                if *v2 {
                    t.lines()
                        .find_map(|l| l.strip_prefix("usage_usec "))
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(|us| us as f64 / 1e6)
                } else {
                    t.trim().parse::<u64>().ok().map(|ns| ns as f64 / 1e9)
                }
            })
            .unwrap_or(0.0);
        let procs = self
            .view
            .cgroup
            .pids
            .as_ref()
            .and_then(pread_text)
            .and_then(|t| t.trim().parse::<u64>().ok())
            .unwrap_or(1);
        Usage {
            uptime: self.view.started.elapsed().as_secs_f64(),
            cpu,
            procs,
            started: self.view.started_wall,
        }
    }

    fn view_text(&self, n: &Notif, kind: View) -> R<Vec<u8>> {
        let cfg = &self.view.cfg;
        let ncpu = || self.ncpus(n.pid);
        Ok(match kind {
            View::CpuInfo => {
                let host = rustix::fs::openat(
                    &self.proc,
                    "cpuinfo",
                    OFlags::RDONLY | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(errno)
                .and_then(|f| read_all(f.as_fd(), VIEW_READ_MAX))?;
                view::cpuinfo(&String::from_utf8_lossy(&host), ncpu())
            }
            View::MemInfo => view::meminfo(self.memory()),
            View::Stat => view::stat(self.usage(), ncpu()),
            View::Uptime => view::uptime(self.usage(), ncpu()),
            View::LoadAvg => view::loadavg(self.usage()),
            View::Version => view::version(&cfg.release, &cfg.version),
            View::BootId => self.view.boot_id.clone(),
            View::OsRelease => format!("{}\n", cfg.release),
            View::KernelVersion => format!("{}\n", cfg.version),
            View::CpuList => view::cpu_list(ncpu()),
            View::MountInfo | View::Mounts => return Err(libc::EIO),
        }
        .into_bytes())
    }

    /// uname, sysinfo, sched_getaffinity.
    pub(super) fn emulate(&mut self, n: &Notif, valid: &dyn Fn() -> bool) -> R<Reply> {
        let a = n.args;
        let (dst, bytes, ret) = match i64::from(n.nr) {
            libc::SYS_uname => {
                let cfg = &self.view.cfg;
                let host = if cfg.hostname.is_empty() {
                    "localhost"
                } else {
                    cfg.hostname.as_str()
                };
                let b = moat_sys::notify::utsname_bytes([
                    b"Linux",
                    host.as_bytes(),
                    cfg.release.as_bytes(),
                    cfg.version.as_bytes(),
                    b"x86_64",
                    b"(none)",
                ]);
                (a[0], b, 0)
            }
            libc::SYS_sysinfo => (a[0], view::sysinfo_bytes(self.usage(), self.memory()), 0),
            _ => {
                // sched_getaffinity(pid, len, mask)
                let pid = a[0] as i32;
                if pid < 0 {
                    return Err(libc::ESRCH);
                }
                let c = self.caller(n)?;
                if pid != 0 && pid != c.ns_tid {
                    // Another process of the sandbox: it must exist; it is
                    // shown the same CPUs.
                    let p = format!("/proc/{pid}");
                    super::open_in_root(self.root.as_fd(), p.as_bytes(), OFlags::PATH)
                        .map_err(|_| libc::ESRCH)?;
                }
                let len = usize::try_from(a[1]).map_err(|_| libc::EINVAL)?.min(8192);
                let mut mask = moat_sys::sock::sched_getaffinity_raw(n.pid as i32, len)
                    .map_err(|e| e.raw_os_error().unwrap_or(libc::EINVAL))?;
                let host: usize = mask.iter().map(|b| b.count_ones() as usize).sum();
                let mut keep = self.view.cfg.ncpus(host);
                for byte in mask.iter_mut() {
                    for bit in 0..8 {
                        if *byte & (1 << bit) != 0 {
                            if keep > 0 {
                                keep -= 1;
                            } else {
                                *byte &= !(1 << bit);
                            }
                        }
                    }
                }
                let ret = mask.len() as i64;
                (a[2], mask, ret)
            }
        };
        if !valid() {
            return Err(libc::ESRCH);
        }
        target::write_mem(n.pid, dst, &bytes)?;
        Ok(Reply::Val(ret))
    }

    /// Names the policy hides directly beneath directory `dir`.
    fn hidden_in(&mut self, dir: &[u8]) -> Option<&HashSet<Vec<u8>>> {
        if self.view.hidden.is_none() {
            let mut map: HashMap<Vec<u8>, HashSet<Vec<u8>>> = HashMap::new();
            for r in self.policy.rules().iter().filter(|r| r.access.hidden) {
                let comps = clean_components(r.path.as_bytes());
                let Some((last, parent)) = comps.split_last() else {
                    continue;
                };
                let mut p = Vec::new();
                for c in parent {
                    p.push(b'/');
                    p.extend_from_slice(c);
                }
                if p.is_empty() {
                    p.push(b'/');
                }
                map.entry(p).or_default().insert(last.to_vec());
            }
            self.view.hidden = Some(map);
        }
        self.view.hidden.as_ref().and_then(|m| m.get(dir))
    }

    /// getdents64(fd, buf, count) and getdents(fd, buf, count).
    pub(super) fn getdents(&mut self, n: &Notif, valid: &dyn Fn() -> bool) -> R<Reply> {
        let a = n.args;
        let c = self.caller(n)?;
        let dir = self.caller_fd(n, &c, a[0] as i32).map_err(|e| {
            if e == libc::ENOENT {
                libc::EBADF
            } else {
                e
            }
        })?;
        let count = usize::try_from(a[2]).unwrap_or(DENTS_MAX).min(DENTS_MAX);
        let old = i64::from(n.nr) == libc::SYS_getdents;
        let path = self.path_of(dir.as_fd()).unwrap_or_default();
        let hidden = if self.learned.is_some() {
            None
        } else {
            self.hidden_in(&path).cloned()
        };
        let mut out;
        // A read whose every name is hidden must not look like the end.
        let mut rounds = 0;
        loop {
            let raw = moat_sys::sock::getdents64_raw(dir.as_fd(), count)
                .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
            out = filter_dents(&raw, hidden.as_ref(), old);
            rounds += 1;
            if raw.is_empty() || !out.is_empty() || rounds >= 64 {
                break;
            }
        }
        if !valid() {
            return Err(libc::ESRCH);
        }
        target::write_mem(n.pid, a[1], &out)?;
        Ok(Reply::Val(out.len() as i64))
    }
}

/// The `linux_dirent64` records of `raw` without the names in `hidden` (and
/// as `linux_dirent` records when `old`: the same sizes, the type last).
pub fn filter_dents(raw: &[u8], hidden: Option<&HashSet<Vec<u8>>>, old: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    let mut at = 0;
    while at + 19 <= raw.len() {
        let reclen = u16::from_ne_bytes([raw[at + 16], raw[at + 17]]) as usize;
        if reclen < 19 || at + reclen > raw.len() {
            break;
        }
        let rec = &raw[at..at + reclen];
        let name_end = rec[19..].iter().position(|b| *b == 0).map(|p| 19 + p);
        let name = &rec[19..name_end.unwrap_or(reclen)];
        at += reclen;
        if hidden.is_some_and(|h| h.contains(name)) {
            continue;
        }
        if old {
            let mut r = vec![0u8; reclen];
            r[..18].copy_from_slice(&rec[..18]);
            r[18..18 + name.len()].copy_from_slice(name);
            r[reclen - 1] = rec[18];
            out.extend_from_slice(&r);
        } else {
            out.extend_from_slice(rec);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(ino: u64, name: &[u8], kind: u8) -> Vec<u8> {
        let len = (19 + name.len() + 1).div_ceil(8) * 8;
        let mut r = vec![0u8; len];
        r[..8].copy_from_slice(&ino.to_ne_bytes());
        r[8..16].copy_from_slice(&(ino as i64 * 10).to_ne_bytes());
        r[16..18].copy_from_slice(&(len as u16).to_ne_bytes());
        r[18] = kind;
        r[19..19 + name.len()].copy_from_slice(name);
        r
    }

    #[test]
    fn hidden_names_are_left_out() {
        let raw = [
            rec(1, b"passwd", 8),
            rec(2, b"shadow", 8),
            rec(3, b"ssh", 4),
        ]
        .concat();
        let hidden: HashSet<Vec<u8>> = [b"shadow".to_vec(), b"ssh".to_vec()].into();
        let out = filter_dents(&raw, Some(&hidden), false);
        assert_eq!(out, rec(1, b"passwd", 8));
        assert_eq!(filter_dents(&raw, None, false), raw);
        let old = filter_dents(&rec(1, b"ab", 4), None, true);
        assert_eq!(&old[18..20], b"ab");
        assert_eq!(old[old.len() - 1], 4);
        // A truncated record ends the walk.
        assert!(filter_dents(&raw[..10], None, false).is_empty());
    }

    #[test]
    fn views_by_path() {
        assert_eq!(view_of(b"/proc/cpuinfo"), Some(View::CpuInfo));
        assert_eq!(view_of(b"/proc/./meminfo"), Some(View::MemInfo));
        assert_eq!(view_of(b"/proc/12/mountinfo"), Some(View::MountInfo));
        assert_eq!(view_of(b"/proc/12/task/13/mounts"), Some(View::Mounts));
        assert_eq!(view_of(b"/proc/self/mountinfo"), None);
        assert_eq!(
            view_of(b"/sys/devices/system/cpu/online"),
            Some(View::CpuList)
        );
        assert_eq!(
            view_of(b"/proc/sys/kernel/random/boot_id"),
            Some(View::BootId)
        );
        assert_eq!(view_of(b"/proc/cpuinfo/x"), None);
    }
}
