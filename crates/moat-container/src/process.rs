//! The last steps before a container process runs its program, shared by the
//! container's init and by `exec`: limits, identity, capabilities,
//! no_new_privs, seccomp, descriptors, and the exec itself.
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Uid};
use oci_spec::runtime::{LinuxSeccomp, Process};

use moat_jail::sync::{Channel, FdKind, Msg, RemoteError};
use moat_jail::{attrs, caps, landlock, rlimit, seccomp};

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("rlimits")]
    Rlimit(#[from] rlimit::RlimitError),
    #[error("process attributes")]
    Attr(#[from] attrs::AttrError),
    #[error("capabilities")]
    Caps(#[from] caps::CapsError),
    #[error("seccomp")]
    Seccomp(#[from] seccomp::SeccompError),
    #[error("landlock")]
    Landlock(#[from] landlock::LandlockError),
    #[error("cannot {step}")]
    Sys {
        step: String,
        #[source]
        source: nix::Error,
    },
    #[error("cannot chdir to {path}")]
    Cwd {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    // Worded as Go's exec package words them: Docker and Podman find the
    // exit status of a program that cannot run (127, 126) in the runtime's
    // error text by these words, as runc writes them.
    #[error("{0:?}: executable file not found in $PATH")]
    NotFound(String),
    #[error("cannot exec {path}: {}", errno_text(*.errno))]
    Exec { path: String, errno: nix::Error },
    #[error("argument or environment contains a NUL byte")]
    Nul,
    #[error("cannot hand the seccomp notify fd to the runtime")]
    NotifyFd(#[source] moat_jail::sync::SyncError),
    #[error("cannot set up file descriptors")]
    Fds(#[source] std::io::Error),
    #[error("cannot reset signal dispositions")]
    Signals(#[source] std::io::Error),
}

/// `errno`'s text in lower case, as Go's `syscall.Errno` gives it ("no such
/// file or directory", "permission denied"): the words engines look for.
fn errno_text(errno: nix::Error) -> String {
    errno.desc().to_lowercase()
}

impl ProcessError {
    /// The shell's status for a program that could not be run: 127 when it
    /// does not exist, 126 when it cannot be executed.
    pub fn exec_status(&self) -> Option<u8> {
        match self {
            ProcessError::NotFound(_) => Some(127),
            ProcessError::Exec { errno, .. } => match errno {
                nix::Error::ENOENT => Some(127),
                nix::Error::EACCES | nix::Error::ENOEXEC | nix::Error::EISDIR => Some(126),
                _ => None,
            },
            _ => None,
        }
    }

    /// The message that reports this failure to the runtime.
    pub fn report(&self) -> Msg {
        Msg::Error(match self.exec_status() {
            Some(status) => RemoteError::exec(status, self),
            None => RemoteError::new(self),
        })
    }
}

fn sys(step: impl Into<String>) -> impl FnOnce(nix::Error) -> ProcessError {
    let step = step.into();
    move |source| ProcessError::Sys { step, source }
}

/// What the final steps need beyond the OCI `process` object.
pub struct Finalize<'a> {
    pub process: &'a Process,
    pub seccomp: Option<&'a LinuxSeccomp>,
    /// The ruleset of moat's Landlock policy (`dev.moat.landlock`).
    pub landlock: Option<&'a landlock::Prepared>,
    /// SIGKILL when the runtime that created us dies (set after the
    /// identity change, which would clear it).
    pub die_with_runtime: bool,
    /// `seccomp` already compiled by the runtime ([`seccomp::prepare`]):
    /// loaded instead of compiling `seccomp` here.
    pub seccomp_program: Option<&'a seccomp::Program>,
    /// Keep fds 3..3+preserve_fds open across exec.
    pub preserve_fds: u32,
    /// Where to send the seccomp notify fd, if the filter has notify rules.
    pub notify_channel: Option<&'a Channel>,
    pub in_user_ns: bool,
    /// Send the steps' durations on `notify_channel` before the filter
    /// is loaded (`--debug`; moat_core::steps).
    pub steps: bool,
}

/// Applies everything and execs; returns only on failure.
pub fn finalize_and_exec(f: &Finalize) -> ProcessError {
    match finalize(f) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

enum Never {}

/// The steps, in this order so that nothing after the seccomp filter is
/// loaded depends on the filter allowing it: only `execve` follows it (the
/// profile must allow that, as for every runtime). Everything else, marking
/// fds close-on-exec, the identity, the capability sets, the parent-death
/// signal and the signal mask included, happens before; a filter loaded
/// without no_new_privs is loaded while CAP_SYS_ADMIN is still held (kept in
/// the permitted and effective sets only, which `execve` recomputes).
fn finalize(f: &Finalize) -> Result<Never, ProcessError> {
    let p = f.process;
    let mut rec = moat_core::steps::Recorder::new(f.steps && f.notify_channel.is_some());
    let (path, exec) = prepare_exec(p)?;
    rec.step("find-program");
    if let Some(r) = p.rlimits() {
        rlimit::apply(r)?;
    }
    if let Some(adj) = p.oom_score_adj() {
        attrs::set_oom_score_adj(None, adj)?;
    }
    if let Some(s) = p.scheduler() {
        attrs::set_scheduler(s)?;
    }
    if let Some(io) = p.io_priority() {
        attrs::set_io_priority(io)?;
    }
    let nnp = p.no_new_privileges().unwrap_or(false);
    if nnp {
        attrs::set_no_new_privs()?;
    }
    // Before any seccomp filter (which may not allow the Landlock calls) and
    // while CAP_SYS_ADMIN is held, in case no_new_privs is not asked for.
    if let Some(ruleset) = f.landlock {
        ruleset.restrict()?;
    }
    rec.step("rlimits-attrs-landlock");
    let filter = match f.seccomp_program {
        Some(p) => Some(Seccomp::Program(p)),
        None => f
            .seccomp
            .map(seccomp::compile)
            .transpose()?
            .map(Seccomp::Filter),
    };
    rec.step("seccomp-compile");
    // No `capabilities` object means no capabilities (fail closed).
    let none = no_caps();
    let c = p.capabilities().as_ref().unwrap_or(&none);
    caps::drop_bounding(c)?;
    switch_user(p)?;
    // Without no_new_privs, loading the filter needs CAP_SYS_ADMIN.
    let hold = (filter.is_some() && !nnp).then_some(::caps::Capability::CAP_SYS_ADMIN);
    caps::apply_sets_holding(c, hold)?;
    rec.step("capabilities-user");
    if let Some(u) = p.user().umask() {
        rustix::process::umask(rustix::fs::Mode::from_bits_truncate(u));
    }
    nix::unistd::chdir(p.cwd()).map_err(|source| ProcessError::Cwd {
        path: p.cwd().clone(),
        source,
    })?;
    moat_sys::process::close_from(3 + f.preserve_fds, true).map_err(ProcessError::Fds)?;
    clear_cloexec(f.preserve_fds)?;
    if f.die_with_runtime {
        nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
            .map_err(sys("set the parent-death signal"))?;
    }
    // The workload starts with every signal at its default disposition
    // (execve keeps what the runtime's caller ignored) and none blocked,
    // whatever the runtime that forked us had blocked (moat run blocks the
    // ones it forwards).
    moat_sys::process::default_signal_dispositions().map_err(ProcessError::Signals)?;
    nix::sys::signal::pthread_sigmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&nix::sys::signal::SigSet::empty()),
        None,
    )
    .map_err(sys("unblock signals"))?;
    rec.step("cwd-fds-signals");
    if let (true, Some(ch)) = (rec.active(), f.notify_channel) {
        // Before the filter, which need not allow sendmsg; the runtime
        // times the load and the exec itself (until the channel's EOF).
        ch.send(&Msg::Steps(rec.take()))
            .map_err(ProcessError::NotifyFd)?;
    }
    load_filter(filter.as_ref(), f)?;
    let e = exec.exec();
    Err(ProcessError::Exec {
        path: path.display().to_string(),
        errno: nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EINVAL)),
    })
}

/// Resolves the program and builds argv/env, before anything is dropped.
fn prepare_exec(p: &Process) -> Result<(PathBuf, moat_sys::process::Exec), ProcessError> {
    let args = p.args().as_deref().unwrap_or(&[]);
    let mut env: Vec<String> = p.env().clone().unwrap_or_default();
    let prog = args
        .first()
        .ok_or_else(|| ProcessError::NotFound(String::new()))?;
    let path = find_program(prog, &env, p.cwd())?;
    // As runc and crun do: a process given no HOME gets its user's home
    // from the container's /etc/passwd, or `/` (engines leave HOME unset
    // unless the image names one; programs from shells to pip read it).
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push(format!("HOME={}", home_of(p.user().uid())));
    }
    let c_path =
        CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| ProcessError::Nul)?;
    let cstrings = |v: &[String]| {
        v.iter()
            .map(|a| CString::new(a.as_bytes()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| ProcessError::Nul)
    };
    let exec = moat_sys::process::Exec::new(c_path, cstrings(args)?, cstrings(&env)?);
    Ok((path, exec))
}

fn no_caps() -> oci_spec::runtime::LinuxCapabilities {
    let empty = oci_spec::runtime::Capabilities::new();
    let mut c = oci_spec::runtime::LinuxCapabilities::default();
    c.set_bounding(Some(empty.clone()))
        .set_effective(Some(empty.clone()))
        .set_permitted(Some(empty.clone()))
        .set_inheritable(Some(empty.clone()))
        .set_ambient(Some(empty));
    c
}

/// The seccomp filter to load: compiled by the runtime, or here.
enum Seccomp<'a> {
    Program(&'a seccomp::Program),
    Filter(seccomp::Filter),
}

fn load_filter(filter: Option<&Seccomp>, f: &Finalize) -> Result<(), ProcessError> {
    let Some(filter) = filter else {
        return Ok(());
    };
    let load = || match filter {
        Seccomp::Program(p) => p.load(),
        Seccomp::Filter(filter) => filter.load(),
    };
    if let (Some(ch), true) = (f.notify_channel, f.seccomp.is_some_and(notifies_sendmsg)) {
        return load_and_hand_over(load, ch);
    }
    let fd: Option<OwnedFd> = load()?;
    if let (Some(fd), Some(ch)) = (fd, f.notify_channel) {
        ch.send_with_fd(&Msg::Fd(FdKind::Seccomp), Some(fd.as_raw_fd()))
            .map_err(ProcessError::NotifyFd)?;
    }
    Ok(())
}

/// Whether a filter sends `sendmsg` to its listener (the sandbox's does:
/// socket addresses are decided there).
fn notifies_sendmsg(s: &LinuxSeccomp) -> bool {
    s.syscalls().as_ref().is_some_and(|calls| {
        calls.iter().any(|c| {
            c.action() == oci_spec::runtime::LinuxSeccompAction::ScmpActNotify
                && c.names().iter().any(|n| n == "sendmsg")
        })
    })
}

/// Loads a filter that notifies `sendmsg` and hands its listener fd over
/// from a thread started before the load: that thread is outside the
/// filter, so its `sendmsg` cannot wait for the listener it carries (the
/// filter is per thread; the thread ends before the exec).
fn load_and_hand_over(
    load: impl FnOnce() -> Result<Option<OwnedFd>, seccomp::SeccompError>,
    ch: &Channel,
) -> Result<(), ProcessError> {
    let (tx, rx) = std::sync::mpsc::channel::<Option<i32>>();
    std::thread::scope(|scope| {
        let sender = scope.spawn(move || match rx.recv() {
            Ok(Some(fd)) => ch.send_with_fd(&Msg::Fd(FdKind::Seccomp), Some(fd)),
            _ => Ok(()),
        });
        let loaded = load();
        let number = loaded
            .as_ref()
            .ok()
            .and_then(|fd| fd.as_ref().map(|f| f.as_raw_fd()));
        let _ = tx.send(number);
        let sent = sender
            .join()
            .map_err(|_| ProcessError::NotifyFd(moat_jail::sync::SyncError::Eof))?;
        // The listener fd stays open until it was sent.
        drop(loaded?);
        sent.map_err(ProcessError::NotifyFd)
    })
}

fn clear_cloexec(n: u32) -> Result<(), ProcessError> {
    for fd in 3..3 + n {
        let fd = i32::try_from(fd)
            .map_err(|_| ProcessError::Fds(std::io::Error::from_raw_os_error(libc::EBADF)))?;
        moat_sys::fd::set_cloexec(fd, false).map_err(ProcessError::Fds)?;
    }
    Ok(())
}

/// setgroups, setresgid, setresuid, keeping capabilities across the switch so
/// `apply_sets` can set exactly the requested ones.
fn switch_user(p: &Process) -> Result<(), ProcessError> {
    let u = p.user();
    nix::sys::prctl::set_keepcaps(true).map_err(sys("set keepcaps"))?;
    let groups: Vec<Gid> = u
        .additional_gids()
        .as_deref()
        .unwrap_or(&[])
        .iter()
        .map(|g| Gid::from_raw(*g))
        .collect();
    // setgroups is denied in a user namespace whose gid_map an unprivileged
    // runtime wrote; with no extra groups requested, that is fine.
    match nix::unistd::setgroups(&groups) {
        Ok(()) => {}
        Err(nix::Error::EPERM) if groups.is_empty() => {}
        Err(e) => return Err(sys("set additional groups")(e)),
    }
    let g = Gid::from_raw(u.gid());
    nix::unistd::setresgid(g, g, g).map_err(sys(format!("set gid {}", u.gid())))?;
    let uid = Uid::from_raw(u.uid());
    nix::unistd::setresuid(uid, uid, uid).map_err(sys(format!("set uid {}", u.uid())))?;
    nix::sys::prctl::set_keepcaps(false).map_err(sys("clear keepcaps"))?;
    Ok(())
}

/// Whether the process's program is there to run, from the container's
/// root: found in `$PATH`, or, given as a path, existing. Whether it can
/// be executed is for the exec itself to say.
pub fn check_program(p: &Process) -> Result<(), ProcessError> {
    let Some(prog) = p.args().as_deref().and_then(|a| a.first()) else {
        return Ok(());
    };
    let env: Vec<String> = p.env().clone().unwrap_or_default();
    let path = find_program(prog, &env, p.cwd())?;
    // A `$PATH` search found an existing file; a path given is not looked at.
    if !prog.contains('/') {
        return Ok(());
    }
    match std::fs::metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(ProcessError::Exec {
            path: path.display().to_string(),
            errno: nix::Error::ENOENT,
        }),
        _ => Ok(()),
    }
}

/// The home directory of `uid` in the container's `/etc/passwd` (read
/// from the current root, which is the container's by now), or `/`. Only a
/// regular file is read (a FIFO there must not hang the start), and only
/// its first MiB.
fn home_of(uid: u32) -> String {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let text = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/etc/passwd")
        .ok()
        .filter(|f| f.metadata().is_ok_and(|m| m.is_file()))
        .and_then(|f| {
            let mut buf = Vec::new();
            f.take(1 << 20).read_to_end(&mut buf).ok().map(|_| buf)
        })
        .unwrap_or_default();
    passwd_home(&String::from_utf8_lossy(&text), uid)
        .unwrap_or("/")
        .to_owned()
}

/// The home field of the first `/etc/passwd` entry of `uid`, if it has one.
fn passwd_home(passwd: &str, uid: u32) -> Option<&str> {
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 6 && f[2].parse::<u32>().is_ok_and(|u| u == uid))
        .map(|f| f[5])
        .filter(|h| !h.is_empty())
}

/// Finds `prog` like execvp, in the container's `$PATH` (relative to the
/// current root, which is the container's by now).
pub fn find_program(prog: &str, env: &[String], cwd: &Path) -> Result<PathBuf, ProcessError> {
    if prog.contains('/') {
        let p = Path::new(prog);
        return Ok(if p.is_absolute() {
            p.to_owned()
        } else {
            cwd.join(p)
        });
    }
    let path = env
        .iter()
        .rev()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let cand = Path::new(dir).join(prog);
        if rustix::fs::access(&cand, rustix::fs::Access::EXEC_OK).is_ok() && cand.is_file() {
            return Ok(cand);
        }
    }
    Err(ProcessError::NotFound(prog.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn home_comes_from_the_users_passwd_entry() {
        let passwd = "root:x:0:0:root:/root:/bin/sh\n\
                      # a comment\n\
                      short:x:5\n\
                      app:x:1000:1000::/home/app:/bin/sh\n\
                      nohome:x:1001:1001:::/bin/sh\n\
                      dup:x:1000:1000::/home/dup:/bin/sh\n";
        assert_eq!(passwd_home(passwd, 0), Some("/root"));
        assert_eq!(
            passwd_home(passwd, 1000),
            Some("/home/app"),
            "the first entry"
        );
        assert_eq!(passwd_home(passwd, 1001), None, "an empty home field");
        assert_eq!(passwd_home(passwd, 5), None, "a short line is no entry");
        assert_eq!(passwd_home(passwd, 4242), None);
        assert_eq!(passwd_home("", 0), None);
    }

    #[test]
    fn finds_programs_in_path() {
        let env = vec!["PATH=/nonexistent:/bin".to_string()];
        assert_eq!(
            find_program("sh", &env, Path::new("/")).unwrap(),
            PathBuf::from("/bin/sh")
        );
        assert!(matches!(
            find_program("no-such-prog-xyz", &env, Path::new("/")),
            Err(ProcessError::NotFound(_))
        ));
        assert_eq!(
            find_program("./x", &env, Path::new("/w")).unwrap(),
            PathBuf::from("/w/./x")
        );
    }
}
