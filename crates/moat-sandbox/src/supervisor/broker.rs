//! Deciding one notification. Path syscalls are carried out here, inside
//! the container's root, with the calling thread's credentials; the
//! result goes back as a descriptor (ADDFD) or a value, with any buffer
//! written into the caller's memory. Value-only syscalls (clone flags,
//! prctl options, socket families, credential changes) are decided and
//! then continue in the kernel: their arguments are registers the caller
//! cannot change after the check.
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use moat_sys::notify::Notif;
use rustix::fs::{Mode, OFlags, ResolveFlags};
use rustix::thread::{CapabilitySet, CapabilitySets};

use super::decode::{self, Times};
use super::target::{self, Cache, Creds};
use crate::learn::{self, Kind, Learned};
use crate::policy::{clean_components, Policy, Verdict, Want};

mod net;
mod virt;

pub use net::Deferred;
pub use virt::{filter_dents, CgroupFiles, ViewState};

/// `AUDIT_ARCH_X86_64`: the only ABI the workload's filter lets through.
const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;

/// What to answer.
pub enum Reply {
    Val(i64),
    Err(i32),
    Continue,
    Fd {
        fd: OwnedFd,
        cloexec: bool,
    },
    /// A socket call that would block: answered later ([`Broker::progress`]).
    Defer(Box<Deferred>),
}

/// Capabilities the supervisor keeps for itself (docs/design.md, "sandbox
/// tier"): SYS_PTRACE to read and write the caller's memory and look at
/// its /proc files, SETUID and SETGID to take the caller's identity,
/// SYS_NICE to narrow a caller thread's CPU affinity while it hands it a
/// descriptor ([`super::colocate`]; in the container's user namespace,
/// over the container's processes only).
pub const BASE_CAPS: CapabilitySet = CapabilitySet::SYS_PTRACE
    .union(CapabilitySet::SETUID)
    .union(CapabilitySet::SETGID)
    .union(CapabilitySet::SYS_NICE);

/// Denials logged per second; the rest are counted and reported once.
const LOG_PER_SECOND: u32 = 20;

struct RateLimit {
    window: Instant,
    shown: u32,
    suppressed: u64,
}

impl RateLimit {
    fn allow(&mut self) -> bool {
        if self.window.elapsed() >= Duration::from_secs(1) {
            if self.suppressed > 0 {
                tracing::warn!("sandbox: {} more denials not shown", self.suppressed);
            }
            self.window = Instant::now();
            self.shown = 0;
            self.suppressed = 0;
        }
        if self.shown < LOG_PER_SECOND {
            self.shown += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

/// The fs identity currently taken.
#[derive(PartialEq, Eq, Clone)]
struct Identity {
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
}

pub struct Broker {
    root: OwnedFd,
    proc: OwnedFd,
    policy: Policy,
    creds: Cache,
    identity: Option<Identity>,
    /// The effective set in force now.
    effective: CapabilitySet,
    permitted: CapabilitySet,
    umask: u32,
    log: RateLimit,
    /// Learning mode: nothing is refused by the policy, everything recorded.
    pub learned: Option<Learned>,
    /// The container process and its /proc/PID/mem, for reads before its exec.
    init_mem: Option<(u32, OwnedFd)>,
    /// What the workload is shown of its machine ([`virt`]).
    view: ViewState,
    /// Socket calls waiting for their socket ([`net`]).
    pending: Vec<Deferred>,
    /// Processes `moat exec` started (host PIDs), most recent last: before
    /// their exec they run the runtime's code, like the init.
    runtime: Vec<u32>,
    /// Processes (host TGIDs) that changed their umask: their umask is
    /// read again before each call that creates a name.
    umask_changed: std::collections::HashSet<i32>,
    /// A process shares its umask with another (a clone with CLONE_FS but
    /// not CLONE_THREAD), or too many changed theirs to track: every
    /// create reads the caller's umask again.
    umask_untracked: bool,
    /// The supervisor's own CPU affinity ([`super::colocate`]); `None`
    /// once the workload set an affinity itself: no thread is narrowed
    /// for a hand-over any more.
    own_affinity: Option<rustix::thread::CpuSet>,
}

/// Most processes whose umask change is tracked one by one.
const UMASK_CHANGED_MAX: usize = 1024;

type R<T> = Result<T, i32>;

fn errno(e: rustix::io::Errno) -> i32 {
    e.raw_os_error()
}

fn access_of(flags: u64) -> Want {
    let f = OFlags::from_bits_retain(flags as u32);
    if f.contains(OFlags::PATH) {
        return Want::LOOKUP;
    }
    let mode = f & OFlags::RWMODE;
    let write = mode == OFlags::WRONLY
        || mode == OFlags::RDWR
        || f.intersects(OFlags::TRUNC | OFlags::CREATE)
        || f.contains(OFlags::TMPFILE);
    Want {
        read: mode == OFlags::RDONLY || mode == OFlags::RDWR,
        write,
        exec: false,
    }
}

impl Broker {
    /// The host's /proc (the supervisor's own entries are under `self/`).
    pub fn proc(&self) -> BorrowedFd<'_> {
        self.proc.as_fd()
    }

    pub fn new(
        root: OwnedFd,
        proc: OwnedFd,
        policy: Policy,
        permitted: CapabilitySet,
        learn: bool,
        init_mem: Option<(u32, OwnedFd)>,
    ) -> Broker {
        Broker {
            root,
            proc,
            policy,
            creds: Cache::default(),
            identity: None,
            effective: BASE_CAPS,
            permitted,
            umask: 0o022,
            log: RateLimit {
                window: Instant::now(),
                shown: 0,
                suppressed: 0,
            },
            learned: learn.then(Learned::default),
            init_mem,
            view: ViewState::default(),
            pending: Vec::new(),
            runtime: Vec::new(),
            umask_changed: std::collections::HashSet::new(),
            umask_untracked: false,
            own_affinity: super::colocate::own_affinity(),
        }
    }

    /// Narrows thread `tid` and the supervisor to one CPU for the hand-over
    /// of a descriptor, unless the workload sets affinities itself.
    pub fn colocate(&self, tid: u32) -> Option<super::colocate::Pinned> {
        super::colocate::pin(tid, self.own_affinity.as_ref()?)
    }

    /// Records a process `moat exec` started (its notify fd just arrived).
    pub fn runtime_process(&mut self, pid: u32) {
        if self.runtime.len() >= 64 {
            self.runtime.remove(0);
        }
        self.runtime.push(pid);
    }

    /// Whether `pid` is a process the runtime started, which has not
    /// exec'd yet if its memory cannot be read (`err` is EPERM): its
    /// memory still belongs to the host's user namespace, as the runtime's
    /// process it was forked from, which a workload process (all come from
    /// an exec in the container) never does. Its syscalls until then are
    /// the runtime's: reporting to the runtime, and the exec itself, which
    /// the workload's Landlock ruleset still confines to the policy's `x`
    /// paths.
    fn runtime_before_exec(&self, pid: u32, err: i32) -> bool {
        err == libc::EPERM
            && (self.init_mem.as_ref().is_some_and(|(p, _)| *p == pid)
                || self.runtime.contains(&pid))
    }

    /// Sets what the workload is shown of its machine.
    pub fn set_view(&mut self, view: ViewState) {
        self.view = view;
    }

    /// Decides one notification. `valid` says whether it still waits (after
    /// the caller's memory was read, before acting on what was read).
    pub fn handle(&mut self, n: &Notif, valid: &dyn Fn() -> bool) -> Reply {
        if n.arch != AUDIT_ARCH_X86_64 {
            return Reply::Err(libc::ENOSYS);
        }
        match self.dispatch(n, valid) {
            Ok(r) => r,
            Err(e) => Reply::Err(e),
        }
    }

    fn dispatch(&mut self, n: &Notif, valid: &dyn Fn() -> bool) -> R<Reply> {
        let a = n.args;
        let cwd = libc::AT_FDCWD as u64;
        match i64::from(n.nr) {
            libc::SYS_open => self.open(n, cwd, a[0], a[1], a[2], valid),
            libc::SYS_creat => self.open(
                n,
                cwd,
                a[0],
                (libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC) as u64,
                a[1],
                valid,
            ),
            libc::SYS_openat => self.open(n, a[0], a[1], a[2], a[3], valid),
            libc::SYS_openat2 => self.openat2(n, valid),
            libc::SYS_stat => self.stat(n, cwd, a[0], a[1], 0, None, valid),
            libc::SYS_lstat => self.stat(
                n,
                cwd,
                a[0],
                a[1],
                libc::AT_SYMLINK_NOFOLLOW as u64,
                None,
                valid,
            ),
            libc::SYS_newfstatat => self.stat(n, a[0], a[1], a[2], a[3], None, valid),
            libc::SYS_statx => self.stat(n, a[0], a[1], a[4], a[2], Some(a[3] as u32), valid),
            libc::SYS_statfs => self.statfs(n, a[0], a[1], valid),
            libc::SYS_access => self.access(n, cwd, a[0], a[1], 0, valid),
            libc::SYS_faccessat => self.access(n, a[0], a[1], a[2], 0, valid),
            libc::SYS_faccessat2 => self.access(n, a[0], a[1], a[2], a[3], valid),
            libc::SYS_readlink => self.readlink(n, cwd, a[0], a[1], a[2], valid),
            libc::SYS_readlinkat => self.readlink(n, a[0], a[1], a[2], a[3], valid),
            libc::SYS_mkdir => {
                self.fresh_creds(n)?;
                self.mkdir(n, cwd, a[0], a[1], valid)
            }
            libc::SYS_mkdirat => {
                self.fresh_creds(n)?;
                self.mkdir(n, a[0], a[1], a[2], valid)
            }
            libc::SYS_mknod => {
                self.fresh_creds(n)?;
                self.mknod(n, cwd, a[0], a[1], a[2], valid)
            }
            libc::SYS_mknodat => {
                self.fresh_creds(n)?;
                self.mknod(n, a[0], a[1], a[2], a[3], valid)
            }
            libc::SYS_rmdir => self.unlink(n, cwd, a[0], libc::AT_REMOVEDIR as u64, valid),
            libc::SYS_unlink => self.unlink(n, cwd, a[0], 0, valid),
            libc::SYS_unlinkat => self.unlink(n, a[0], a[1], a[2], valid),
            libc::SYS_rename => self.rename(n, cwd, a[0], cwd, a[1], 0, valid),
            libc::SYS_renameat => self.rename(n, a[0], a[1], a[2], a[3], 0, valid),
            libc::SYS_renameat2 => self.rename(n, a[0], a[1], a[2], a[3], a[4], valid),
            libc::SYS_link => self.link(n, cwd, a[0], cwd, a[1], 0, valid),
            libc::SYS_linkat => self.link(n, a[0], a[1], a[2], a[3], a[4], valid),
            libc::SYS_symlink => self.symlink(n, a[0], cwd, a[1], valid),
            libc::SYS_symlinkat => self.symlink(n, a[0], a[1], a[2], valid),
            libc::SYS_chmod => self.chmod(n, cwd, a[0], a[1], 0, valid),
            libc::SYS_fchmodat => self.chmod(n, a[0], a[1], a[2], 0, valid),
            libc::SYS_fchmodat2 => self.chmod(n, a[0], a[1], a[2], a[3], valid),
            libc::SYS_chown => self.chown(n, cwd, a[0], a[1], a[2], 0, valid),
            libc::SYS_lchown => self.chown(
                n,
                cwd,
                a[0],
                a[1],
                a[2],
                libc::AT_SYMLINK_NOFOLLOW as u64,
                valid,
            ),
            libc::SYS_fchownat => self.chown(n, a[0], a[1], a[2], a[3], a[4], valid),
            libc::SYS_utimensat => self.utimens(n, a[0], a[1], a[2], a[3], valid),
            libc::SYS_utime | libc::SYS_utimes | libc::SYS_futimesat => self.utimes_old(n, valid),
            libc::SYS_truncate => self.truncate(n, a[0], a[1], valid),
            libc::SYS_getxattr
            | libc::SYS_lgetxattr
            | libc::SYS_setxattr
            | libc::SYS_lsetxattr
            | libc::SYS_listxattr
            | libc::SYS_llistxattr
            | libc::SYS_removexattr
            | libc::SYS_lremovexattr => self.xattr(n, valid),
            libc::SYS_chdir => self.chdir(n, a[0], valid),
            libc::SYS_execve => self.exec(n, cwd, a[0], 0, valid),
            libc::SYS_execveat => self.exec(n, a[0], a[1], a[4], valid),
            libc::SYS_inotify_add_watch => self.inotify_add_watch(n, valid),
            libc::SYS_setuid
            | libc::SYS_setgid
            | libc::SYS_setreuid
            | libc::SYS_setregid
            | libc::SYS_setresuid
            | libc::SYS_setresgid
            | libc::SYS_setgroups
            | libc::SYS_setfsuid
            | libc::SYS_setfsgid
            | libc::SYS_capset => {
                // Decided by the kernel with the caller's capabilities; the
                // cached credentials must be read again after it.
                self.creds.invalidate();
                Ok(Reply::Continue)
            }
            libc::SYS_umask => Ok(self.umask_changes(n)),
            // Notified only with CLONE_FS and without CLONE_THREAD (the
            // filter decides the rest): two processes then share one
            // umask, and a change by one is not seen as the other's, so no
            // umask is trusted from the cache any more.
            libc::SYS_clone => {
                self.umask_untracked = true;
                Ok(Reply::Continue)
            }
            libc::SYS_sched_setaffinity => {
                // Run by the kernel; from now on no thread of this sandbox
                // is narrowed for a hand-over ([`super::colocate`]).
                self.own_affinity = None;
                Ok(Reply::Continue)
            }
            libc::SYS_prctl => self.prctl(n),
            libc::SYS_socket => self.socket(n),
            libc::SYS_connect
            | libc::SYS_bind
            | libc::SYS_sendto
            | libc::SYS_sendmsg
            | libc::SYS_sendmmsg => self.net(n, valid),
            libc::SYS_getdents | libc::SYS_getdents64 => self.getdents(n, valid),
            libc::SYS_uname | libc::SYS_sysinfo | libc::SYS_sched_getaffinity => {
                self.emulate(n, valid)
            }
            _ => Ok(Reply::Err(libc::ENOSYS)),
        }
    }

    // ----- the caller -----

    fn caller(&mut self, n: &Notif) -> R<Creds> {
        self.creds.get(self.proc.as_fd(), n.pid)
    }

    /// Before an operation that creates a name: the caller's umask as it
    /// is now. The cached one holds unless the caller's process changed its
    /// umask since (`umask` is notified: [`Self::umask_changes`]) or
    /// umasks are shared between processes; then the credentials are read
    /// again (`/proc/TID/status`, which has the umask).
    fn fresh_creds(&mut self, n: &Notif) -> R<()> {
        let c = self.caller(n)?;
        if self.umask_untracked || self.umask_changed.contains(&c.tgid) {
            self.creds.fresh(self.proc.as_fd(), n.pid)?;
        }
        Ok(())
    }

    /// `umask(2)`, run by the kernel: from now on the caller's process has
    /// its umask read for each create.
    fn umask_changes(&mut self, n: &Notif) -> Reply {
        match self.caller(n) {
            Ok(c) if self.umask_changed.len() < UMASK_CHANGED_MAX => {
                self.umask_changed.insert(c.tgid);
            }
            // Not known (or too many to track): trust none.
            _ => self.umask_untracked = true,
        }
        Reply::Continue
    }

    /// Reads the caller's memory; the init before its exec through the
    /// mem fd kept for it.
    fn read(&self, n: &Notif, addr: u64, len: usize) -> R<Vec<u8>> {
        match target::read_mem(n.pid, addr, len) {
            Err(libc::EPERM) => match &self.init_mem {
                Some((pid, mem)) if *pid == n.pid => target::read_mem_fd(mem.as_fd(), addr, len),
                _ => Err(libc::EPERM),
            },
            r => r,
        }
    }

    fn path_arg(&self, n: &Notif, addr: u64) -> R<Vec<u8>> {
        self.need_ptrace()?;
        decode::cstr(addr, |at, len| self.read(n, at, len))
    }

    /// The absolute container path of `path` relative to `dirfd` of the
    /// caller, with `/proc/self`, `/proc/thread-self` and `/dev/fd`
    /// written as the caller's own PID: the kernel resolves them for the
    /// supervisor, which has no PID in the container.
    fn absolute(&self, n: &Notif, c: &Creds, dirfd: u64, path: &[u8]) -> R<Vec<u8>> {
        if path.is_empty() {
            return Err(libc::ENOENT);
        }
        let mut abs = if path.first() == Some(&b'/') {
            path.to_vec()
        } else {
            let dirfd = dirfd as i32;
            let link = if dirfd == libc::AT_FDCWD {
                format!("{}/cwd", n.pid)
            } else if dirfd >= 0 {
                format!("{}/fd/{dirfd}", n.pid)
            } else {
                return Err(libc::EBADF);
            };
            self.need_ptrace()?;
            let base = target::read_link(self.proc.as_fd(), &link).map_err(|e| {
                if e == libc::ENOENT {
                    libc::EBADF
                } else {
                    e
                }
            })?;
            if base.first() != Some(&b'/') {
                return Err(libc::ENOTDIR);
            }
            if base.ends_with(b" (deleted)") {
                return Err(libc::ENOENT);
            }
            let mut v = base;
            v.push(b'/');
            v.extend_from_slice(path);
            v
        };
        if abs.len() >= target::PATH_MAX {
            return Err(libc::ENAMETOOLONG);
        }
        // Only paths under /proc or /dev can need it: most opens skip the
        // look (and its formatting) entirely.
        if !(abs.starts_with(b"/proc/") || abs.starts_with(b"/dev/")) {
            return Ok(abs);
        }
        const SELF: &[&[u8]] = &[
            b"/proc/self",
            b"/proc/thread-self",
            b"/dev/fd",
            b"/dev/stdin",
            b"/dev/stdout",
            b"/dev/stderr",
            // Symlinks to `self/…` in procfs, which would name the
            // supervisor.
            b"/proc/mounts",
            b"/proc/net",
        ];
        for (i, prefix) in SELF.iter().enumerate() {
            let rest = abs.strip_prefix(*prefix);
            if let Some(rest) = rest.filter(|r| r.is_empty() || r[0] == b'/') {
                let with = match i {
                    0 => format!("/proc/{}", c.ns_tgid),
                    1 => format!("/proc/{}/task/{}", c.ns_tgid, c.ns_tid),
                    2 => format!("/proc/{}/fd", c.ns_tgid),
                    3..=5 => format!("/proc/{}/fd/{}", c.ns_tgid, i - 3),
                    6 => format!("/proc/{}/mounts", c.ns_tgid),
                    _ => format!("/proc/{}/net", c.ns_tgid),
                };
                let mut v = with.into_bytes();
                v.extend_from_slice(rest);
                abs = v;
                break;
            }
        }
        Ok(abs)
    }

    /// If `abs` names a descriptor of the caller (`/proc/PID/fd/N`, its
    /// own PID), that number.
    fn own_fd(c: &Creds, abs: &[u8]) -> Option<i32> {
        let comps = clean_components(abs);
        match comps.as_slice() {
            [b"proc", pid, b"fd", n] if *pid == c.ns_tgid.to_string().as_bytes() => {
                std::str::from_utf8(n).ok()?.parse().ok()
            }
            _ => None,
        }
    }

    /// The caller's descriptor `fd` (a duplicate of the same open file);
    /// EBADF when it has none by that number.
    ///
    /// Through the pidfd of the calling thread kept with its cached
    /// credentials (one `pidfd_open` and `close` fewer per call; a thread
    /// pidfd reaches that thread's own descriptor table), else a pidfd of
    /// its process.
    fn caller_fd(&self, n: &Notif, c: &Creds, fd: i32) -> R<OwnedFd> {
        match self.creds.pidfd(n.pid) {
            Some(pidfd) => self.fd_through(pidfd, fd),
            None => self.process_fd(c, fd),
        }
    }

    /// The descriptor `fd` of the caller's process, through a pidfd of it.
    fn process_fd(&self, c: &Creds, fd: i32) -> R<OwnedFd> {
        let pid = rustix::process::Pid::from_raw(c.tgid).ok_or(libc::ESRCH)?;
        let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
            .map_err(errno)?;
        self.fd_through(pidfd.as_fd(), fd)
    }

    /// A duplicate of descriptor `fd` of the process or thread of `pidfd`.
    fn fd_through(&self, pidfd: BorrowedFd<'_>, fd: i32) -> R<OwnedFd> {
        self.need_ptrace()?;
        if fd < 0 {
            return Err(libc::EBADF);
        }
        rustix::process::pidfd_getfd(pidfd, fd, rustix::process::PidfdGetfdFlags::empty())
            .map_err(errno)
    }

    // ----- identity -----

    fn set_effective(&mut self, want: CapabilitySet) -> R<()> {
        let want = want & self.permitted;
        if self.effective == want {
            return Ok(());
        }
        rustix::thread::set_capabilities(
            None,
            CapabilitySets {
                effective: want,
                permitted: self.permitted,
                inheritable: CapabilitySet::empty(),
            },
        )
        .map_err(|_| libc::EPERM)?;
        self.effective = want;
        Ok(())
    }

    fn need_ptrace(&self) -> R<()> {
        if self.effective.contains(CapabilitySet::SYS_PTRACE) {
            Ok(())
        } else {
            // Every caller restores the base set first (see `act_as`).
            Err(libc::EPERM)
        }
    }

    /// Takes the caller's identity for a filesystem operation: its fs IDs
    /// (or real IDs, for access(2)), groups, umask and effective set.
    /// Fails closed: an identity that cannot be taken refuses the call.
    fn act_as(&mut self, c: &Creds, real: bool) -> R<()> {
        self.take_identity(c, real)?;
        let mut caps = CapabilitySet::from_bits_retain(c.cap_eff);
        if real && c.ruid != 0 {
            // access(2) checks a non-root caller without capabilities.
            caps = CapabilitySet::empty();
        }
        self.set_effective(caps)?;
        self.take_umask(c);
        Ok(())
    }

    /// [`Self::act_as`] for an open or a stat, keeping the supervisor's own
    /// set effective beside the caller's: SETUID and SETGID play no part
    /// in them, and SYS_PTRACE only on procfs, which the caller of this
    /// checks afterwards ([`on_procfs`]) and does again with
    /// [`Self::act_as`]. For a caller without capabilities that saves two
    /// `capset` calls per call. The fs capabilities (DAC_OVERRIDE…) are
    /// the caller's only.
    fn act_as_keeping_base(&mut self, c: &Creds) -> R<()> {
        self.take_identity(c, false)?;
        self.set_effective(CapabilitySet::from_bits_retain(c.cap_eff) | BASE_CAPS)?;
        self.take_umask(c);
        Ok(())
    }

    fn take_umask(&mut self, c: &Creds) {
        if self.umask != c.umask {
            rustix::process::umask(Mode::from_raw_mode(c.umask & 0o777));
            self.umask = c.umask;
        }
    }

    /// The caller's fs IDs (or real IDs) and groups, unless already taken.
    fn take_identity(&mut self, c: &Creds, real: bool) -> R<()> {
        let (uid, gid) = if real {
            (c.ruid, c.rgid)
        } else {
            (c.fsuid, c.fsgid)
        };
        let taken = self
            .identity
            .as_ref()
            .is_some_and(|i| i.uid == uid && i.gid == gid && i.groups == c.groups);
        if !taken {
            let id = Identity {
                uid,
                gid,
                groups: c.groups.clone(),
            };
            self.set_effective(BASE_CAPS)?;
            self.identity = None;
            nix::unistd::setfsgid(nix::unistd::Gid::from_raw(id.gid));
            nix::unistd::setfsuid(nix::unistd::Uid::from_raw(id.uid));
            // An invalid ID changes nothing and returns the current one.
            let uid_now = nix::unistd::setfsuid(nix::unistd::Uid::from_raw(u32::MAX));
            let gid_now = nix::unistd::setfsgid(nix::unistd::Gid::from_raw(u32::MAX));
            if uid_now.as_raw() != id.uid || gid_now.as_raw() != id.gid {
                return Err(libc::EPERM);
            }
            let groups: Vec<rustix::process::Gid> = id
                .groups
                .iter()
                .map(|g| rustix::process::Gid::from_raw(*g))
                .collect();
            rustix::thread::set_thread_groups(&groups).map_err(|_| libc::EPERM)?;
            self.identity = Some(id);
        }
        Ok(())
    }

    /// Back to the supervisor's own set, to read or write the caller's memory.
    fn restore(&mut self) -> R<()> {
        self.set_effective(BASE_CAPS)
    }

    // ----- policy -----

    fn decide(&mut self, n: &Notif, path: &[u8], want: Want) -> R<()> {
        if self.learned.is_some() {
            let kind = self.kind_of(path);
            if let Some(l) = &mut self.learned {
                l.record(path, want, kind);
            }
            return Ok(());
        }
        match self.policy.check(path, want) {
            (Verdict::Allow, _) => Ok(()),
            (Verdict::Deny { errno }, rule) => {
                // A name no rule covers that is not there either is
                // answered as the kernel would answer it (a shell searching
                // $PATH, a program probing for optional files): not worth
                // a line. One a `hidden` rule names always is.
                let absent = errno == libc::ENOENT
                    && rule.is_none()
                    && matches!(
                        open_in_root(self.root.as_fd(), path, OFlags::PATH | OFlags::NOFOLLOW),
                        Err(libc::ENOENT) | Err(libc::ENOTDIR)
                    );
                if !absent && self.log.allow() {
                    tracing::warn!(
                        "sandbox: denied {} {} ({}) for pid {}: {} by rule {}",
                        syscall_name(n.nr),
                        String::from_utf8_lossy(path),
                        want_str(want),
                        n.pid,
                        if errno == libc::ENOENT {
                            "hidden"
                        } else {
                            "not allowed"
                        },
                        rule.map(|r| format!("{:?} = {}", r.path, r.access))
                            .unwrap_or_else(|| "(no rule covers it)".into()),
                    );
                }
                Err(errno)
            }
        }
    }

    /// What `path` is now in the container's root (learning mode).
    fn kind_of(&self, path: &[u8]) -> Kind {
        let Ok((fd, _)) = open_in_root(self.root.as_fd(), path, OFlags::PATH | OFlags::NOFOLLOW)
        else {
            return Kind::Missing;
        };
        match rustix::fs::fstat(&fd) {
            Ok(st)
                if rustix::fs::FileType::from_raw_mode(st.st_mode)
                    == rustix::fs::FileType::Directory =>
            {
                Kind::Dir
            }
            _ => Kind::Other,
        }
    }

    /// Learning mode: the interpreters the kernel opens to run `prog`
    /// (an `O_PATH` fd of what is executed) are executed too.
    fn learn_interpreters(&mut self, n: &Notif, prog: &OwnedFd) {
        use std::os::fd::AsRawFd;
        let mut fd = prog.try_clone().ok();
        for _ in 0..learn::MAX_INTERPRETERS {
            let Some(cur) = fd.take() else { return };
            let via = format!("self/fd/{}", cur.as_raw_fd());
            let Ok(file) = rustix::fs::openat(
                &self.proc,
                via.as_str(),
                OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC,
                Mode::empty(),
            ) else {
                return;
            };
            let mut head = vec![0u8; 4096];
            let Ok(len) = rustix::io::pread(&file, &mut head, 0) else {
                return;
            };
            head.truncate(len);
            let Some(interp) = learn::interpreter(&head) else {
                return;
            };
            // Recorded as named and as resolved, as an exec is.
            let _ = self.decide(n, &interp, Want::EXEC);
            if let Ok((next, _)) = open_in_root(self.root.as_fd(), &interp, OFlags::PATH) {
                if let Ok(canon) = self.path_of(next.as_fd()) {
                    let _ = self.decide(n, &canon, Want::EXEC);
                }
                fd = Some(next);
            }
        }
    }

    /// The path of an fd the supervisor opened, in the container's terms
    /// (the kernel names it from the container's root, which the
    /// supervisor's own root does not contain).
    fn path_of(&self, fd: BorrowedFd<'_>) -> R<Vec<u8>> {
        use std::os::fd::AsRawFd;
        target::read_link(self.proc.as_fd(), &format!("self/fd/{}", fd.as_raw_fd()))
    }

    /// Resolves `abs` in the root (following a last symlink unless
    /// `nofollow`) as an `O_PATH` fd and checks its canonical path.
    fn lookup(&mut self, n: &Notif, abs: &[u8], nofollow: bool, want: Want) -> R<OwnedFd> {
        // A hidden path is not there; any other is looked up before the
        // rest of `want` is decided, so a name that does not exist is
        // ENOENT whatever the policy says of it, as the kernel answers
        // (a shell searching $PATH tells "not found" from "not allowed").
        self.decide(n, abs, Want::LOOKUP)?;
        let mut flags = OFlags::PATH;
        if nofollow {
            flags |= OFlags::NOFOLLOW;
        }
        let (fd, lexical) = open_in_root(self.root.as_fd(), abs, flags)?;
        if want != Want::LOOKUP {
            self.decide(n, abs, want)?;
        }
        if !lexical {
            let canon = self.path_of(fd.as_fd())?;
            self.decide(n, &canon, want)?;
        }
        Ok(fd)
    }

    /// The parent directory of `abs` (an `O_PATH` fd, checked) and the last
    /// name, for operations that create or remove a name.
    fn parent(&mut self, n: &Notif, abs: &[u8], want: Want) -> R<(OwnedFd, Vec<u8>)> {
        let trimmed = {
            let mut t = abs;
            while t.len() > 1 && t.ends_with(b"/") {
                t = &t[..t.len() - 1];
            }
            t
        };
        let cut = trimmed
            .iter()
            .rposition(|b| *b == b'/')
            .ok_or(libc::ENOENT)?;
        let (dir, name) = (&trimmed[..cut.max(1)], &trimmed[cut + 1..]);
        if name.is_empty() || name == b"." || name == b".." {
            return Err(libc::EINVAL);
        }
        let (dirfd, lexical) =
            open_in_root(self.root.as_fd(), dir, OFlags::PATH | OFlags::DIRECTORY)?;
        self.decide(n, abs, want)?;
        if !lexical {
            let mut canon = self.path_of(dirfd.as_fd())?;
            if canon != b"/" {
                canon.push(b'/');
            }
            canon.extend_from_slice(name);
            self.decide(n, &canon, want)?;
        }
        Ok((dirfd, name.to_vec()))
    }

    // ----- open -----

    fn open(
        &mut self,
        n: &Notif,
        dirfd: u64,
        path: u64,
        flags: u64,
        mode: u64,
        valid: &dyn Fn() -> bool,
    ) -> R<Reply> {
        // O_TMPFILE without the O_DIRECTORY it includes (`__O_TMPFILE`).
        const TMPFILE: u64 = 0o20_000_000;
        if flags & (libc::O_CREAT as u64 | TMPFILE) != 0 {
            self.fresh_creds(n)?;
        }
        let c = self.caller(n)?;
        let raw = self.path_arg(n, path)?;
        let abs = self.absolute(n, &c, dirfd, &raw)?;
        let want = access_of(flags);
        if let Some(fdnum) = Self::own_fd(&c, &abs) {
            return self.reopen_own(n, &c, fdnum, flags, valid);
        }
        if let Some(r) = self.view_open(n, &abs, flags)? {
            return Ok(r);
        }
        if !valid() {
            return Err(libc::ESRCH);
        }
        let cloexec = flags & libc::O_CLOEXEC as u64 != 0;
        self.act_as_keeping_base(&c)?;
        let mut r = self
            .decide_open(n, &abs, flags, want)
            .and_then(|()| self.open_checked(n, &abs, flags, mode, want));
        // The filesystem's magic, asked once: for the procfs check here
        // and for the virtual views after.
        let magic = |r: &R<OwnedFd>| r.as_ref().ok().map(|fd| fs_magic(fd.as_fd()));
        let mut fs = magic(&r);
        if matches!(fs, Some(Err(_)) | Some(Ok(PROC_SUPER_MAGIC))) {
            // Opened with SYS_PTRACE effective, which procfs honours: again
            // with the caller's capabilities alone.
            drop(r);
            self.act_as(&c, false)?;
            r = self.open_checked(n, &abs, flags, mode, want);
            fs = magic(&r);
        }
        self.restore()?;
        let fd = r?;
        let fs = fs.unwrap_or(Err(libc::EIO))?;
        if let Some(r) = self.view_after(n, &fd, fs, flags)? {
            return Ok(r);
        }
        Ok(Reply::Fd { fd, cloexec })
    }

    /// The policy's decision on an open. A name that is not there and is
    /// not to be created is ENOENT, as the kernel would answer, whatever
    /// the policy says of it (hidden names stay ENOENT too).
    fn decide_open(&mut self, n: &Notif, abs: &[u8], flags: u64, want: Want) -> R<()> {
        let f = legacy_open_flags(flags);
        let creates = f.contains(OFlags::CREATE) || f.contains(OFlags::TMPFILE);
        if self.learned.is_none() && !creates {
            if let (
                Verdict::Deny {
                    errno: libc::EACCES,
                },
                _,
            ) = self.policy.check(abs, want)
            {
                if let Err(libc::ENOENT) = open_in_root(self.root.as_fd(), abs, OFlags::PATH) {
                    return Err(libc::ENOENT);
                }
            }
        }
        self.decide(n, abs, want)
    }

    fn openat2(&mut self, n: &Notif, valid: &dyn Fn() -> bool) -> R<Reply> {
        let len = decode::open_how_len(n.args[3])?;
        self.need_ptrace()?;
        let how = decode::open_how(&self.read(n, n.args[2], len)?)?;
        self.open(n, n.args[0], n.args[1], how.flags, how.mode, valid)
    }

    fn open_checked(
        &mut self,
        n: &Notif,
        abs: &[u8],
        flags: u64,
        mode: u64,
        want: Want,
    ) -> R<OwnedFd> {
        let f = legacy_open_flags(flags);
        if f.contains(OFlags::PATH) {
            return self.open_path(n, abs, f);
        }
        let create = f.contains(OFlags::CREATE);
        // `name/` names a directory, which O_CREAT never makes.
        if create && abs.len() > 1 && abs.ends_with(b"/") {
            return Err(libc::EISDIR);
        }
        // O_EXCL: whatever has the name (a directory, a symlink) is EEXIST,
        // decided by the kernel in the parent below.
        let excl = create && f.contains(OFlags::EXCL);
        // Opened without blocking (a FIFO would stall the supervisor), never
        // as our terminal, and truncated only once the file is checked.
        let base = (f & !(OFlags::CREATE | OFlags::TRUNC | OFlags::EXCL | OFlags::CLOEXEC))
            | OFlags::NOCTTY
            | OFlags::NONBLOCK;
        for _ in 0..4 {
            if !excl {
                match open_in_root(self.root.as_fd(), abs, base) {
                    Ok((fd, lexical)) => return self.opened(n, fd, lexical, f, want),
                    Err(libc::ENOENT) if create => {}
                    Err(e) => return Err(e),
                }
            }
            let (dir, name) = self.parent(n, abs, Want::WRITE)?;
            let create =
                (base & !OFlags::NONBLOCK) | OFlags::CREATE | OFlags::EXCL | (f & OFlags::NONBLOCK);
            match rustix::fs::openat2(
                &dir,
                bytes_path(&name),
                create | OFlags::CLOEXEC,
                Mode::from_raw_mode((mode & 0o7777) as u32),
                ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
            ) {
                Ok(fd) => return Ok(fd),
                // Created meanwhile (without O_EXCL that is fine): open it.
                Err(rustix::io::Errno::EXIST) if !excl => continue,
                // A symlink in the way: what an O_CREAT open without
                // O_EXCL follows. The kernel names that ELOOP here.
                Err(rustix::io::Errno::LOOP) if excl => return Err(libc::EEXIST),
                Err(e) => return Err(errno(e)),
            }
        }
        Err(libc::EAGAIN)
    }

    /// `O_PATH`: seccomp's ADDFD cannot hand over an `O_PATH` file (the
    /// kernel's `fget` skips them), and letting the kernel open the path
    /// itself (CONTINUE) would let a racing thread swap it after the
    /// check. So the caller gets the same file opened for reading, without
    /// blocking: that needs read on it, from the policy and from the file's
    /// mode; a symlink itself (`O_NOFOLLOW`) cannot be opened so and is
    /// EOPNOTSUPP, which is what glibc's `fchmodat(AT_SYMLINK_NOFOLLOW)`,
    /// the common user, answers for a symlink anyway (docs/sandbox.md).
    fn open_path(&mut self, n: &Notif, abs: &[u8], f: OFlags) -> R<OwnedFd> {
        use std::os::fd::AsRawFd;
        self.decide(n, abs, Want::LOOKUP)?;
        let (fd, lexical) = open_in_root(self.root.as_fd(), abs, f)?;
        let kind =
            rustix::fs::FileType::from_raw_mode(rustix::fs::fstat(&fd).map_err(errno)?.st_mode);
        if kind == rustix::fs::FileType::Symlink {
            return Err(libc::EOPNOTSUPP);
        }
        self.decide(n, abs, Want::READ)?;
        if !lexical {
            let canon = self.path_of(fd.as_fd())?;
            self.decide(n, &canon, Want::READ)?;
        }
        let mut flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
        if kind == rustix::fs::FileType::Directory {
            flags |= OFlags::DIRECTORY;
        }
        let via = format!("self/fd/{}", fd.as_raw_fd());
        rustix::fs::openat(&self.proc, via.as_str(), flags, Mode::empty()).map_err(errno)
    }

    /// The rest of an open of an existing file: its canonical path checked
    /// (when a symlink led there), O_CREAT refused on a directory, the
    /// status flags the caller asked for, O_TRUNC.
    fn opened(
        &mut self,
        n: &Notif,
        fd: OwnedFd,
        lexical: bool,
        f: OFlags,
        want: Want,
    ) -> R<OwnedFd> {
        if !lexical {
            let canon = self.path_of(fd.as_fd())?;
            self.decide(n, &canon, want)?;
        }
        let is_regular = |fd: &OwnedFd| {
            rustix::fs::fstat(fd).map(|st| rustix::fs::FileType::from_raw_mode(st.st_mode))
        };
        if f.contains(OFlags::CREATE)
            && is_regular(&fd).map_err(errno)? == rustix::fs::FileType::Directory
        {
            return Err(libc::EISDIR);
        }
        if !f.contains(OFlags::NONBLOCK) {
            // F_SETFL takes only the status flags of `f`: those the caller
            // asked for, without O_NONBLOCK.
            rustix::fs::fcntl_setfl(&fd, f).map_err(errno)?;
        }
        let mode_w = f & OFlags::RWMODE;
        if f.contains(OFlags::TRUNC)
            && (mode_w == OFlags::WRONLY || mode_w == OFlags::RDWR)
            && is_regular(&fd).map_err(errno)? == rustix::fs::FileType::RegularFile
        {
            rustix::fs::ftruncate(&fd, 0).map_err(errno)?;
        }
        Ok(fd)
    }

    /// `/proc/self/fd/N` (and `/dev/stdout`…) of the caller itself: the
    /// same open file, if the access asked for is one it already has.
    fn reopen_own(
        &mut self,
        n: &Notif,
        c: &Creds,
        fdnum: i32,
        flags: u64,
        valid: &dyn Fn() -> bool,
    ) -> R<Reply> {
        // `/proc/self/fd/N` of a number it does not hold does not exist.
        let fd =
            self.caller_fd(n, c, fdnum)
                .map_err(|e| if e == libc::EBADF { libc::ENOENT } else { e })?;
        if !valid() {
            return Err(libc::ESRCH);
        }
        let have = rustix::fs::fcntl_getfl(&fd).map_err(errno)? & OFlags::RWMODE;
        let want = access_of(flags);
        let ok = (!want.read || have == OFlags::RDONLY || have == OFlags::RDWR)
            && (!want.write || have == OFlags::WRONLY || have == OFlags::RDWR);
        if !ok {
            return Err(libc::EACCES);
        }
        Ok(Reply::Fd {
            fd,
            cloexec: flags & libc::O_CLOEXEC as u64 != 0,
        })
    }

    // ----- stat family -----

    /// `fstat` of the caller's descriptor `fd` (`newfstatat(fd, "",
    /// AT_EMPTY_PATH)`, as libc's `fstat` is): the file behind
    /// `/proc/TID/fd/N` of the calling thread, in one call (no duplicate
    /// of the descriptor to take and close). Nothing is resolved by path:
    /// the magic link leads to the open file itself.
    fn stat_own_fd(
        &self,
        n: &Notif,
        fd: i32,
        buf: u64,
        flags: i32,
        statx_mask: Option<u32>,
        valid: &dyn Fn() -> bool,
    ) -> R<Reply> {
        self.need_ptrace()?;
        if fd < 0 {
            return Err(libc::EBADF);
        }
        let link =
            std::ffi::CString::new(format!("{}/fd/{fd}", n.pid)).map_err(|_| libc::EINVAL)?;
        let proc = self.proc.as_fd();
        let bytes = match statx_mask {
            Some(mask) => moat_sys::notify::statx_bytes_at(
                proc,
                &link,
                flags & libc::AT_STATX_SYNC_TYPE,
                mask,
            ),
            None => moat_sys::notify::stat_bytes_at(proc, &link, 0),
        }
        .map_err(|e| match e.raw_os_error() {
            // No such descriptor.
            Some(libc::ENOENT) => libc::EBADF,
            Some(v) => v,
            None => libc::EIO,
        })?;
        if !valid() {
            return Err(libc::ESRCH);
        }
        target::write_mem(n.pid, buf, &bytes)?;
        Ok(Reply::Val(0))
    }

    #[allow(clippy::too_many_arguments)]
    fn stat(
        &mut self,
        n: &Notif,
        dirfd: u64,
        path: u64,
        buf: u64,
        flags: u64,
        statx_mask: Option<u32>,
        valid: &dyn Fn() -> bool,
    ) -> R<Reply> {
        let flags = flags as i32;
        let empty_path = flags & libc::AT_EMPTY_PATH != 0;
        let raw = if path == 0 && empty_path {
            Vec::new()
        } else {
            self.path_arg(n, path)?
        };
        let d = dirfd as i32;
        if raw.is_empty() && empty_path && d != libc::AT_FDCWD {
            return self.stat_own_fd(n, d, buf, flags, statx_mask, valid);
        }
        let c = self.caller(n)?;
        let fd = if raw.is_empty() && empty_path {
            // fstat of the caller's cwd.
            let abs = self.absolute(n, &c, dirfd, b".")?;
            self.act_as(&c, false)?;
            let r = self.lookup(n, &abs, false, Want::LOOKUP);
            self.restore()?;
            r?
        } else {
            let abs = self.absolute(n, &c, dirfd, &raw)?;
            if !valid() {
                return Err(libc::ESRCH);
            }
            let nofollow = flags & libc::AT_SYMLINK_NOFOLLOW != 0;
            self.act_as_keeping_base(&c)?;
            let mut r = self.lookup(n, &abs, nofollow, Want::LOOKUP);
            if matches!(&r, Ok(fd) if on_procfs(fd.as_fd())) {
                drop(r);
                self.act_as(&c, false)?;
                r = self.lookup(n, &abs, nofollow, Want::LOOKUP);
            }
            self.restore()?;
            r?
        };
        let bytes = match statx_mask {
            Some(mask) => moat_sys::notify::statx_bytes(fd.as_fd(), flags, mask),
            None => moat_sys::notify::stat_bytes(fd.as_fd()),
        }
        .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
        if !valid() {
            return Err(libc::ESRCH);
        }
        target::write_mem(n.pid, buf, &bytes)?;
        Ok(Reply::Val(0))
    }

    fn statfs(&mut self, n: &Notif, path: u64, buf: u64, valid: &dyn Fn() -> bool) -> R<Reply> {
        let c = self.caller(n)?;
        let raw = self.path_arg(n, path)?;
        let abs = self.absolute(n, &c, libc::AT_FDCWD as u64, &raw)?;
        if !valid() {
            return Err(libc::ESRCH);
        }
        self.act_as(&c, false)?;
        let r = self.lookup(n, &abs, false, Want::LOOKUP);
        self.restore()?;
        let bytes = moat_sys::notify::statfs_bytes(r?.as_fd())
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
        if !valid() {
            return Err(libc::ESRCH);
        }
        target::write_mem(n.pid, buf, &bytes)?;
        Ok(Reply::Val(0))
    }

    fn access(
        &mut self,
        n: &Notif,
        dirfd: u64,
        path: u64,
        mode: u64,
        flags: u64,
        valid: &dyn Fn() -> bool,
    ) -> R<Reply> {
        let c = self.caller(n)?;
        let raw = self.path_arg(n, path)?;
        let abs = self.absolute(n, &c, dirfd, &raw)?;
        let mode = mode as i32;
        let want = Want {
            read: mode & libc::R_OK != 0,
            write: mode & libc::W_OK != 0,
            exec: mode & libc::X_OK != 0,
        };
        if !valid() {
            return Err(libc::ESRCH);
        }
        let flags = flags as i32;
        let eaccess = flags & libc::AT_EACCESS != 0;
        self.act_as(&c, !eaccess)?;
        let r = self
            .lookup(
                n,
                &abs,
                flags & libc::AT_SYMLINK_NOFOLLOW != 0,
                Want::LOOKUP,
            )
            .and_then(|fd| {
                let canon = self.path_of(fd.as_fd())?;
                // A directory is searched, not executed.
                let is_dir = rustix::fs::fstat(&fd)
                    .map(|s| {
                        rustix::fs::FileType::from_raw_mode(s.st_mode)
                            == rustix::fs::FileType::Directory
                    })
                    .unwrap_or(false);
                let policy_want = if is_dir {
                    Want {
                        exec: false,
                        ..want
                    }
                } else {
                    want
                };
                self.decide(n, &abs, policy_want)?;
                self.decide(n, &canon, policy_want)?;
                {
                    use std::os::fd::AsRawFd;
                    // Through the descriptor's /proc link: faccessat2 takes
                    // no AT_EMPTY_PATH for an O_PATH fd here.
                    let via = format!("self/fd/{}", fd.as_raw_fd());
                    rustix::fs::accessat(
                        &self.proc,
                        via.as_str(),
                        rustix::fs::Access::from_bits_retain(mode as u32),
                        rustix::fs::AtFlags::EACCESS,
                    )
                    .map_err(errno)
                }
            });
        self.restore()?;
        r?;
        Ok(Reply::Val(0))
    }

    fn readlink(
        &mut self,
        n: &Notif,
        dirfd: u64,
        path: u64,
        buf: u64,
        size: u64,
        valid: &dyn Fn() -> bool,
    ) -> R<Reply> {
        if size as i64 <= 0 {
            return Err(libc::EINVAL);
        }
        let c = self.caller(n)?;
        let raw = self.path_arg(n, path)?;
        let abs = self.absolute(n, &c, dirfd, &raw)?;
        if !valid() {
            return Err(libc::ESRCH);
        }
        self.act_as(&c, false)?;
        let r = self.lookup(n, &abs, true, Want::LOOKUP).and_then(|fd| {
            rustix::fs::readlinkat(&fd, "", Vec::with_capacity(256)).map_err(|e| {
                if e == rustix::io::Errno::NOENT {
                    libc::EINVAL
                } else {
                    errno(e)
                }
            })
        });
        self.restore()?;
        let text = r?.into_bytes();
        let len = text.len().min(usize::try_from(size).unwrap_or(usize::MAX));
        if !valid() {
            return Err(libc::ESRCH);
        }
        target::write_mem(n.pid, buf, &text[..len])?;
        Ok(Reply::Val(len as i64))
    }

    // ----- names -----

    /// Reads, resolves and checks the parent of a path argument, then runs
    /// `op` on (parent fd, name) with the caller's identity.
    fn with_parent<T>(
        &mut self,
        n: &Notif,
        dirfd: u64,
        path: u64,
        valid: &dyn Fn() -> bool,
        op: impl FnOnce(&mut Self, BorrowedFd<'_>, &Path) -> R<T>,
    ) -> R<T> {
        let c = self.caller(n)?;
        let raw = self.path_arg(n, path)?;
        let abs = self.absolute(n, &c, dirfd, &raw)?;
        if !valid() {
            return Err(libc::ESRCH);
        }
        self.act_as(&c, false)?;
        let r = self
            .parent(n, &abs, Want::WRITE)
            .and_then(|(dir, name)| op(self, dir.as_fd(), bytes_path(&name)));
        self.restore()?;
        r
    }

    fn mkdir(
        &mut self,
        n: &Notif,
        dirfd: u64,
        path: u64,
        mode: u64,
        valid: &dyn Fn() -> bool,
    ) -> R<Reply> {
        self.with_parent(n, dirfd, path, valid, |_, dir, name| {
            rustix::fs::mkdirat(dir, name, Mode::from_raw_mode((mode & 0o7777) as u32))
                .map_err(errno)
        })?;
        Ok(Reply::Val(0))
    }

    fn mknod(
        &mut self,
        n: &Notif,
        dirfd: u64,
        path: u64,
        mode: u64,
        dev: u64,
        valid: &dyn Fn() -> bool,
    ) -> R<Reply> {
        self.with_parent(n, dirfd, path, valid, |_, dir, name| {
            let kind = rustix::fs::FileType::from_raw_mode(mode as u32);
            let kind = if mode as u32 & libc::S_IFMT == 0 {
                rustix::fs::FileType::RegularFile
            } else {
                kind
            };
            rustix::fs::mknodat(
                dir,
                name,
                kind,
                Mode::from_raw_mode((mode & 0o7777) as u32),
                dev,
            )
            .map_err(errno)
        })?;
        Ok(Reply::Val(0))
    }

    fn unlink(
        &mut self,
        n: &Notif,
        dirfd: u64,
        path: u64,
        flags: u64,
        valid: &dyn Fn() -> bool,
    ) -> R<Reply> {
        let flags = rustix::fs::AtFlags::from_bits_retain(flags as u32);
        self.with_parent(n, dirfd, path, valid, |_, dir, name| {
            rustix::fs::unlinkat(dir, name, flags).map_err(errno)
        })?;
        Ok(Reply::Val(0))
    }

    #[allow(clippy::too_many_arguments)]
    fn rename(
        &mut self,
        n: &Notif,
        olddir: u64,
        old: u64,
        newdir: u64,
        new: u64,
        flags: u64,
        valid: &dyn Fn() -> bool,
    ) -> R<Reply> {
        let c = self.caller(n)?;
        let raw_old = self.path_arg(n, old)?;
        let raw_new = self.path_arg(n, new)?;
        let abs_old = self.absolute(n, &c, olddir, &raw_old)?;
        let abs_new = self.absolute(n, &c, newdir, &raw_new)?;
        if !valid() {
            return Err(libc::ESRCH);
        }
        self.act_as(&c, false)?;
        let r = self.parent(n, &abs_old, Want::WRITE).and_then(|(od, on)| {
            let (nd, nn) = self.parent(n, &abs_new, Want::WRITE)?;
            rustix::fs::renameat_with(
                &od,
                bytes_path(&on),
                &nd,
                bytes_path(&nn),
                rustix::fs::RenameFlags::from_bits_retain(flags as u32),
            )
            .map_err(errno)
        });
        self.restore()?;
        r?;
        Ok(Reply::Val(0))
    }

    #[allow(clippy::too_many_arguments)]
    fn link(
        &mut self,
        n: &Notif,
        olddir: u64,
        old: u64,
        newdir: u64,
        new: u64,
        flags: u64,
        valid: &dyn Fn() -> bool,
    ) -> R<Reply> {
        let c = self.caller(n)?;
        let raw_old = self.path_arg(n, old)?;
        let raw_new = self.path_arg(n, new)?;
        let abs_old = self.absolute(n, &c, olddir, &raw_old)?;
        let abs_new = self.absolute(n, &c, newdir, &raw_new)?;
        if !valid() {
            return Err(libc::ESRCH);
        }
        let follow = flags as i32 & libc::AT_SYMLINK_FOLLOW != 0;
        self.act_as(&c, false)?;
        let r = (|| {
            // A new name for a file needs read on the file and write where
            // the name goes.
            let src = self.lookup(n, &abs_old, !follow, Want::READ)?;
            let (nd, nn) = self.parent(n, &abs_new, Want::WRITE)?;
            let (od, on) = self.parent(n, &abs_old, Want::LOOKUP)?;
            if follow {
                use std::os::fd::AsRawFd;
                let via = format!("self/fd/{}", src.as_raw_fd());
                rustix::fs::linkat(
                    &self.proc,
                    via.as_str(),
                    &nd,
                    bytes_path(&nn),
                    rustix::fs::AtFlags::SYMLINK_FOLLOW,
                )
                .map_err(errno)
            } else {
                rustix::fs::linkat(
                    &od,
                    bytes_path(&on),
                    &nd,
                    bytes_path(&nn),
                    rustix::fs::AtFlags::empty(),
                )
                .map_err(errno)
            }
        })();
        self.restore()?;
        r?;
        Ok(Reply::Val(0))
    }

    fn symlink(
        &mut self,
        n: &Notif,
        target_ptr: u64,
        dirfd: u64,
        path: u64,
        valid: &dyn Fn() -> bool,
    ) -> R<Reply> {
        let text = self.path_arg(n, target_ptr)?;
        if text.is_empty() {
            return Err(libc::ENOENT);
        }
        self.with_parent(n, dirfd, path, valid, |_, dir, name| {
            rustix::fs::symlinkat(bytes_path(&text), dir, name).map_err(errno)
        })?;
        Ok(Reply::Val(0))
    }

    /// Runs `op` on the object `path` names (checked for `want`) through
    /// `/proc/self/fd/N` of an `O_PATH` fd of it.
    #[allow(clippy::too_many_arguments)]
    fn on_object<T>(
        &mut self,
        n: &Notif,
        dirfd: u64,
        path: u64,
        nofollow: bool,
        want: Want,
        valid: &dyn Fn() -> bool,
        op: impl FnOnce(&mut Self, &OwnedFd, &str) -> R<T>,
    ) -> R<T> {
        let c = self.caller(n)?;
        let raw = self.path_arg(n, path)?;
        let abs = self.absolute(n, &c, dirfd, &raw)?;
        if !valid() {
            return Err(libc::ESRCH);
        }
        self.act_as(&c, false)?;
        let r = self.lookup(n, &abs, nofollow, want).and_then(|fd| {
            use std::os::fd::AsRawFd;
            let via = format!("self/fd/{}", fd.as_raw_fd());
            op(self, &fd, &via)
        });
        self.restore()?;
        r
    }

    fn chmod(
        &mut self,
        n: &Notif,
        dirfd: u64,
        path: u64,
        mode: u64,
        flags: u64,
        valid: &dyn Fn() -> bool,
    ) -> R<Reply> {
        let nofollow = flags as i32 & libc::AT_SYMLINK_NOFOLLOW != 0;
        self.on_object(
            n,
            dirfd,
            path,
            nofollow,
            Want::WRITE,
            valid,
            |b, fd, via| {
                let is_link = rustix::fs::fstat(fd)
                    .map(|s| {
                        rustix::fs::FileType::from_raw_mode(s.st_mode)
                            == rustix::fs::FileType::Symlink
                    })
                    .unwrap_or(false);
                if is_link {
                    return Err(libc::EOPNOTSUPP);
                }
                rustix::fs::chmodat(
                    &b.proc,
                    via,
                    Mode::from_raw_mode((mode & 0o7777) as u32),
                    rustix::fs::AtFlags::empty(),
                )
                .map_err(errno)
            },
        )?;
        Ok(Reply::Val(0))
    }

    #[allow(clippy::too_many_arguments)]
    fn chown(
        &mut self,
        n: &Notif,
        dirfd: u64,
        path: u64,
        uid: u64,
        gid: u64,
        flags: u64,
        valid: &dyn Fn() -> bool,
    ) -> R<Reply> {
        let nofollow = flags as i32 & libc::AT_SYMLINK_NOFOLLOW != 0;
        let id = |v: u64| (v as u32 != u32::MAX).then_some(v as u32);
        self.on_object(n, dirfd, path, nofollow, Want::WRITE, valid, |_, fd, _| {
            rustix::fs::chownat(
                fd,
                "",
                id(uid).map(rustix::fs::Uid::from_raw),
                id(gid).map(rustix::fs::Gid::from_raw),
                rustix::fs::AtFlags::EMPTY_PATH,
            )
            .map_err(errno)
        })?;
        Ok(Reply::Val(0))
    }

    fn utimens(
        &mut self,
        n: &Notif,
        dirfd: u64,
        path: u64,
        times: u64,
        flags: u64,
        valid: &dyn Fn() -> bool,
    ) -> R<Reply> {
        let ts = if times == 0 {
            None
        } else {
            self.need_ptrace()?;
            Some(Times::Timespec.decode(&self.read(n, times, Times::Timespec.size())?)?)
        };
        let nofollow = flags as i32 & libc::AT_SYMLINK_NOFOLLOW != 0;
        self.set_times(n, dirfd, path, ts, nofollow, valid)
    }

    /// utime(path, utimbuf*), utimes(path, timeval[2]), futimesat(dirfd, path, timeval[2]).
    fn utimes_old(&mut self, n: &Notif, valid: &dyn Fn() -> bool) -> R<Reply> {
        let (dirfd, path, times, kind) = match i64::from(n.nr) {
            libc::SYS_utime => (libc::AT_FDCWD as u64, n.args[0], n.args[1], Times::Utimbuf),
            libc::SYS_utimes => (libc::AT_FDCWD as u64, n.args[0], n.args[1], Times::Timeval),
            _ => (n.args[0], n.args[1], n.args[2], Times::Timeval),
        };
        let ts = if times == 0 {
            None
        } else {
            self.need_ptrace()?;
            Some(kind.decode(&self.read(n, times, kind.size())?)?)
        };
        self.set_times(n, dirfd, path, ts, false, valid)
    }

    fn set_times(
        &mut self,
        n: &Notif,
        dirfd: u64,
        path: u64,
        ts: Option<[(i64, i64); 2]>,
        nofollow: bool,
        valid: &dyn Fn() -> bool,
    ) -> R<Reply> {
        self.on_object(n, dirfd, path, nofollow, Want::WRITE, valid, |b, _, via| {
            let spec = |(s, ns): (i64, i64)| rustix::fs::Timespec {
                tv_sec: s,
                tv_nsec: ns as _,
            };
            let now = rustix::fs::Timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_NOW as _,
            };
            let t = match ts {
                Some([a, m]) => rustix::fs::Timestamps {
                    last_access: spec(a),
                    last_modification: spec(m),
                },
                None => rustix::fs::Timestamps {
                    last_access: now,
                    last_modification: now,
                },
            };
            rustix::fs::utimensat(&b.proc, via, &t, rustix::fs::AtFlags::empty()).map_err(errno)
        })?;
        Ok(Reply::Val(0))
    }

    fn truncate(&mut self, n: &Notif, path: u64, len: u64, valid: &dyn Fn() -> bool) -> R<Reply> {
        if (len as i64) < 0 {
            return Err(libc::EINVAL);
        }
        let c = self.caller(n)?;
        let raw = self.path_arg(n, path)?;
        let abs = self.absolute(n, &c, libc::AT_FDCWD as u64, &raw)?;
        if !valid() {
            return Err(libc::ESRCH);
        }
        self.act_as(&c, false)?;
        let r = self
            .open_checked(n, &abs, (libc::O_WRONLY) as u64, 0, Want::WRITE)
            .and_then(|fd| rustix::fs::ftruncate(&fd, len).map_err(errno));
        self.restore()?;
        r?;
        Ok(Reply::Val(0))
    }

    fn xattr(&mut self, n: &Notif, valid: &dyn Fn() -> bool) -> R<Reply> {
        const XATTR_MAX: usize = 65536;
        let nr = i64::from(n.nr);
        let nofollow = matches!(
            nr,
            libc::SYS_lgetxattr
                | libc::SYS_lsetxattr
                | libc::SYS_llistxattr
                | libc::SYS_lremovexattr
        );
        let write = matches!(
            nr,
            libc::SYS_setxattr
                | libc::SYS_lsetxattr
                | libc::SYS_removexattr
                | libc::SYS_lremovexattr
        );
        let a = n.args;
        let name = if matches!(nr, libc::SYS_listxattr | libc::SYS_llistxattr) {
            Vec::new()
        } else {
            self.path_arg(n, a[1])?
        };
        let value = if matches!(nr, libc::SYS_setxattr | libc::SYS_lsetxattr) {
            let len = usize::try_from(a[3]).map_err(|_| libc::E2BIG)?;
            if len > XATTR_MAX {
                return Err(libc::E2BIG);
            }
            self.need_ptrace()?;
            self.read(n, a[2], len)?
        } else {
            Vec::new()
        };
        let want = if write { Want::WRITE } else { Want::READ };
        let out = self.on_object(
            n,
            libc::AT_FDCWD as u64,
            a[0],
            nofollow,
            want,
            valid,
            |b, fd, via| {
                let is_link = rustix::fs::fstat(fd)
                    .map(|s| {
                        rustix::fs::FileType::from_raw_mode(s.st_mode)
                            == rustix::fs::FileType::Symlink
                    })
                    .unwrap_or(false);
                let cname = std::ffi::CString::new(name.clone()).map_err(|_| libc::EINVAL)?;
                // Relative: the supervisor's cwd is host /proc.
                let p = via.to_string();
                let _ = b;
                match nr {
                    libc::SYS_getxattr | libc::SYS_lgetxattr => {
                        if is_link {
                            return Err(libc::ENODATA);
                        }
                        let size = usize::try_from(a[3]).unwrap_or(0).min(XATTR_MAX);
                        let mut buf = vec![0u8; size];
                        let len = rustix::fs::getxattr(p.as_str(), cname.as_c_str(), &mut buf)
                            .map_err(errno)?;
                        buf.truncate(len);
                        Ok((len, buf))
                    }
                    libc::SYS_listxattr | libc::SYS_llistxattr => {
                        if is_link {
                            return Ok((0, Vec::new()));
                        }
                        let size = usize::try_from(a[2]).unwrap_or(0).min(XATTR_MAX);
                        let mut buf = vec![0u8; size];
                        let len = rustix::fs::listxattr(p.as_str(), &mut buf).map_err(errno)?;
                        buf.truncate(len);
                        Ok((len, buf))
                    }
                    libc::SYS_setxattr | libc::SYS_lsetxattr => {
                        if is_link {
                            return Err(libc::EPERM);
                        }
                        let flags = rustix::fs::XattrFlags::from_bits_retain(a[4] as u32);
                        rustix::fs::setxattr(p.as_str(), cname.as_c_str(), &value, flags)
                            .map_err(errno)?;
                        Ok((0, Vec::new()))
                    }
                    _ => {
                        if is_link {
                            return Err(libc::EPERM);
                        }
                        rustix::fs::removexattr(p.as_str(), cname.as_c_str()).map_err(errno)?;
                        Ok((0, Vec::new()))
                    }
                }
            },
        )?;
        let (len, data) = out;
        let dst = match nr {
            libc::SYS_getxattr | libc::SYS_lgetxattr => a[2],
            libc::SYS_listxattr | libc::SYS_llistxattr => a[1],
            _ => 0,
        };
        if dst != 0 && !data.is_empty() {
            if !valid() {
                return Err(libc::ESRCH);
            }
            target::write_mem(n.pid, dst, &data)?;
        }
        Ok(Reply::Val(len as i64))
    }

    fn chdir(&mut self, n: &Notif, path: u64, valid: &dyn Fn() -> bool) -> R<Reply> {
        // The kernel changes the caller's directory itself: decided here,
        // and every later path relative to it is brokered and checked on
        // its canonical path, so a racing change gains nothing.
        let c = self.caller(n)?;
        let raw = self.path_arg(n, path)?;
        let abs = self.absolute(n, &c, libc::AT_FDCWD as u64, &raw)?;
        if !valid() {
            return Err(libc::ESRCH);
        }
        self.act_as(&c, false)?;
        let r = self.lookup(n, &abs, false, Want::LOOKUP);
        self.restore()?;
        r?;
        Ok(Reply::Continue)
    }

    fn exec(
        &mut self,
        n: &Notif,
        dirfd: u64,
        path: u64,
        flags: u64,
        valid: &dyn Fn() -> bool,
    ) -> R<Reply> {
        // The kernel opens the program again after this check: the
        // decision holds because the workload's Landlock ruleset grants
        // execute only beneath the policy's `x` paths (see
        // `Policy::exec_paths`). A thread that rewrites the path meanwhile
        // reaches only what the policy lets it execute anyway.
        self.creds.invalidate();
        let c = self.caller(n)?;
        let raw = match self.path_arg(n, path) {
            Err(e) if self.runtime_before_exec(n.pid, e) => return Ok(Reply::Continue),
            r => r?,
        };
        if raw.is_empty() && flags as i32 & libc::AT_EMPTY_PATH != 0 {
            return Ok(Reply::Continue);
        }
        let abs = self.absolute(n, &c, dirfd, &raw)?;
        if !valid() {
            return Err(libc::ESRCH);
        }
        self.act_as(&c, false)?;
        let r = self.lookup(n, &abs, false, Want::EXEC);
        if let (Ok(prog), true) = (&r, self.learned.is_some()) {
            self.learn_interpreters(n, prog);
        }
        self.restore()?;
        r?;
        Ok(Reply::Continue)
    }

    fn inotify_add_watch(&mut self, n: &Notif, valid: &dyn Fn() -> bool) -> R<Reply> {
        let c = self.caller(n)?;
        let ino = self.caller_fd(n, &c, n.args[0] as i32)?;
        let mask = n.args[2] as u32;
        let nofollow = mask & libc::IN_DONT_FOLLOW != 0;
        let wd = self.on_object(
            n,
            libc::AT_FDCWD as u64,
            n.args[1],
            nofollow,
            Want::READ,
            valid,
            |_, _, via| {
                let p = via.to_string();
                rustix::fs::inotify::add_watch(
                    &ino,
                    p.as_str(),
                    rustix::fs::inotify::WatchFlags::from_bits_retain(mask & !libc::IN_DONT_FOLLOW),
                )
                .map_err(errno)
            },
        )?;
        Ok(Reply::Val(i64::from(wd)))
    }

    // ----- values -----

    fn prctl(&mut self, n: &Notif) -> R<Reply> {
        let allowed = [
            libc::PR_SET_PDEATHSIG,
            libc::PR_GET_PDEATHSIG,
            libc::PR_GET_DUMPABLE,
            libc::PR_SET_DUMPABLE,
            libc::PR_GET_KEEPCAPS,
            libc::PR_SET_KEEPCAPS,
            libc::PR_SET_NAME,
            libc::PR_GET_NAME,
            libc::PR_GET_SECCOMP,
            libc::PR_SET_NO_NEW_PRIVS,
            libc::PR_GET_NO_NEW_PRIVS,
            libc::PR_CAPBSET_READ,
            libc::PR_CAPBSET_DROP,
            libc::PR_CAP_AMBIENT,
            libc::PR_GET_SECUREBITS,
            libc::PR_SET_CHILD_SUBREAPER,
            libc::PR_GET_CHILD_SUBREAPER,
            libc::PR_SET_TIMERSLACK,
            libc::PR_GET_TIMERSLACK,
            libc::PR_GET_TID_ADDRESS,
            libc::PR_SET_THP_DISABLE,
            libc::PR_GET_THP_DISABLE,
            libc::PR_SET_VMA,
            libc::PR_GET_TSC,
            libc::PR_MCE_KILL_GET,
            libc::PR_SET_PTRACER,
            libc::PR_GET_SPECULATION_CTRL,
            libc::PR_SET_SPECULATION_CTRL,
        ];
        let opt = n.args[0] as i32;
        if allowed.contains(&opt) {
            self.creds.invalidate();
            Ok(Reply::Continue)
        } else {
            if self.learned.is_none() && self.log.allow() {
                tracing::warn!("sandbox: denied prctl option {opt} for pid {}", n.pid);
            }
            Err(libc::EINVAL)
        }
    }

    fn socket(&mut self, n: &Notif) -> R<Reply> {
        let family = n.args[0] as i32;
        if let Some(l) = &mut self.learned {
            l.family(family);
            return Ok(Reply::Continue);
        }
        if self.policy.socket_families.contains(&family) {
            Ok(Reply::Continue)
        } else {
            if self.log.allow() {
                tracing::warn!(
                    "sandbox: denied socket family {family} (type {}, protocol {}) for pid {}: not in socket_families",
                    n.args[1], n.args[2], n.pid
                );
            }
            Err(libc::EAFNOSUPPORT)
        }
    }
}

fn want_str(w: Want) -> String {
    let mut s = String::new();
    for (on, c) in [(w.read, 'r'), (w.write, 'w'), (w.exec, 'x')] {
        if on {
            s.push(c);
        }
    }
    if s.is_empty() {
        s.push_str("lookup");
    }
    s
}

/// Whether `fd` is on a procfs (where ptrace access checks, and so the
/// supervisor's SYS_PTRACE, decide). Unknown counts as procfs.
fn on_procfs(fd: BorrowedFd<'_>) -> bool {
    fs_magic(fd).map_or(true, |m| m == PROC_SUPER_MAGIC)
}

/// `f_type` of procfs.
pub(super) const PROC_SUPER_MAGIC: i64 = 0x9fa0;

/// The type (`f_type`) of the filesystem `fd` is on.
fn fs_magic(fd: BorrowedFd<'_>) -> R<i64> {
    rustix::fs::fstatfs(fd).map(|st| st.f_type).map_err(errno)
}

/// The flags `open`/`openat` act on: unknown bits dropped, and with
/// `O_PATH` only the flags that go with it (as the kernel does for them;
/// `openat2`, which the broker uses, refuses what they ignore).
fn legacy_open_flags(flags: u64) -> OFlags {
    let f = OFlags::from_bits_truncate(flags as u32) & decode::valid_open_flags();
    if f.contains(OFlags::PATH) {
        f & (OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW)
    } else {
        f
    }
}

fn bytes_path(b: &[u8]) -> &Path {
    use std::os::unix::ffi::OsStrExt;
    Path::new(std::ffi::OsStr::from_bytes(b))
}

/// Opens `abs` in the container's root. First with no symlink allowed on
/// the way: then what was opened is the cleaned lexical path itself (`..`
/// stops at the root as the cleaning does), already decided by the caller,
/// and the second check on the canonical path is not needed (`true`).
/// A path with a symlink (ELOOP) is opened with [`in_root`] instead
/// (`false`: the caller checks the canonical path).
fn open_in_root(root: BorrowedFd<'_>, abs: &[u8], flags: OFlags) -> R<(OwnedFd, bool)> {
    let resolve = ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS | ResolveFlags::NO_SYMLINKS;
    for _ in 0..16 {
        match rustix::fs::openat2(
            root,
            bytes_path(abs),
            flags | OFlags::CLOEXEC,
            Mode::empty(),
            resolve,
        ) {
            Ok(fd) => return Ok((fd, true)),
            // A concurrent rename raced with `..`: again.
            Err(rustix::io::Errno::AGAIN) => continue,
            Err(rustix::io::Errno::LOOP) => break,
            Err(e) => return Err(errno(e)),
        }
    }
    in_root(root, abs, flags).map(|fd| (fd, false))
}

/// Opens `abs` in the container's root with the project's one in-root
/// opener (`openat2(RESOLVE_IN_ROOT)`, no magic links).
fn in_root(root: BorrowedFd<'_>, abs: &[u8], flags: OFlags) -> R<OwnedFd> {
    moat_jail::rootfs::resolve::in_root(root, bytes_path(abs), flags)
        .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))
}

/// The name of syscall `nr`, for logs.
pub fn syscall_name(nr: i32) -> String {
    libseccomp_name(nr).unwrap_or_else(|| format!("syscall {nr}"))
}

fn libseccomp_name(nr: i32) -> Option<String> {
    let names: &[(i64, &str)] = &[
        (libc::SYS_open, "open"),
        (libc::SYS_openat, "openat"),
        (libc::SYS_openat2, "openat2"),
        (libc::SYS_creat, "creat"),
        (libc::SYS_stat, "stat"),
        (libc::SYS_lstat, "lstat"),
        (libc::SYS_newfstatat, "newfstatat"),
        (libc::SYS_statx, "statx"),
        (libc::SYS_access, "access"),
        (libc::SYS_faccessat, "faccessat"),
        (libc::SYS_faccessat2, "faccessat2"),
        (libc::SYS_readlink, "readlink"),
        (libc::SYS_readlinkat, "readlinkat"),
        (libc::SYS_execve, "execve"),
        (libc::SYS_execveat, "execveat"),
        (libc::SYS_mkdir, "mkdir"),
        (libc::SYS_mkdirat, "mkdirat"),
        (libc::SYS_unlink, "unlink"),
        (libc::SYS_unlinkat, "unlinkat"),
        (libc::SYS_rmdir, "rmdir"),
        (libc::SYS_rename, "rename"),
        (libc::SYS_renameat, "renameat"),
        (libc::SYS_renameat2, "renameat2"),
        (libc::SYS_link, "link"),
        (libc::SYS_linkat, "linkat"),
        (libc::SYS_symlink, "symlink"),
        (libc::SYS_symlinkat, "symlinkat"),
        (libc::SYS_chdir, "chdir"),
        (libc::SYS_truncate, "truncate"),
        (libc::SYS_statfs, "statfs"),
        (libc::SYS_utimensat, "utimensat"),
        (libc::SYS_chmod, "chmod"),
        (libc::SYS_fchmodat, "fchmodat"),
        (libc::SYS_fchownat, "fchownat"),
        (libc::SYS_mknodat, "mknodat"),
        (libc::SYS_getxattr, "getxattr"),
        (libc::SYS_setxattr, "setxattr"),
        (libc::SYS_inotify_add_watch, "inotify_add_watch"),
        (libc::SYS_connect, "connect"),
        (libc::SYS_bind, "bind"),
        (libc::SYS_sendto, "sendto"),
        (libc::SYS_sendmsg, "sendmsg"),
        (libc::SYS_sendmmsg, "sendmmsg"),
    ];
    names
        .iter()
        .find(|(n, _)| *n == i64::from(nr))
        .map(|(_, s)| (*s).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_flags_map_to_access() {
        assert_eq!(access_of(libc::O_RDONLY as u64), Want::READ);
        assert_eq!(access_of(libc::O_WRONLY as u64), Want::WRITE);
        assert_eq!(
            access_of((libc::O_RDONLY | libc::O_CREAT) as u64),
            Want {
                read: true,
                write: true,
                exec: false
            }
        );
        assert_eq!(access_of(libc::O_PATH as u64), Want::LOOKUP);
    }
}
