//! The guard: the supervisor's parent, whose one job is that the workload
//! never outlives its supervisor. Once the supervisor is gone (it exited,
//! its own seccomp filter ended it, it was OOM-killed or SIGKILLed), every
//! notified syscall of the workload would fail with ENOSYS; instead the
//! guard kills the container's init (SIGKILL through a pidfd: with a PID
//! namespace, every process of the container dies with it).
//!
//! It holds nothing the workload can reach: no socket the container can
//! connect to, no descriptor of the container but a pidfd of its init. It
//! confines itself right after it forked the supervisor: CAP_KILL only
//! (to signal the init, which runs under another ID), no_new_privs, not
//! dumpable, no new processes, and a seccomp filter that lets it wait,
//! receive one PID from the runtime, send that one signal, and move itself
//! into the container's cgroup through the files the runtime sends it
//! (a write of "0" to each, answered).
use std::os::fd::{AsFd, OwnedFd};

use moat_jail::sync::{Channel, Msg};
use rustix::event::{PollFd, PollFlags};
use rustix::process::{Pid, PidfdFlags, Resource, Signal};
use rustix::thread::{CapabilitySet, CapabilitySets};

/// Every syscall the guard makes once confined, and why.
pub const GUARD_SYSCALLS: &[(&str, &str)] = &[
    (
        "ppoll",
        "wait for the supervisor's end and the runtime's message",
    ),
    ("poll", "as ppoll"),
    (
        "recvmsg",
        "the container process's PID and the container's cgroup files from the runtime",
    ),
    (
        "sendmsg",
        "answer the runtime: whether it joined the container's cgroup",
    ),
    ("pidfd_open", "a pidfd of the container process"),
    ("pidfd_send_signal", "kill the container process"),
    ("waitid", "reap the supervisor"),
    ("wait4", "reap the supervisor"),
    (
        "write",
        "log to stderr; join the container's cgroup (\"0\" to a cgroup file the runtime opened)",
    ),
    ("close", "descriptors"),
    ("brk", "memory"),
    ("mmap", "memory"),
    ("munmap", "memory"),
    ("mremap", "memory"),
    ("madvise", "memory"),
    ("futex", "stdio locks"),
    ("rt_sigreturn", "signal return"),
    ("rt_sigprocmask", "signal masks"),
    ("sigaltstack", "Rust's stack-overflow handler"),
    ("exit", "end"),
    ("exit_group", "end"),
];

/// The guard's body, after it forked the supervisor `sup`: returns its
/// exit status. `runtime` brings the container's cgroup files (to
/// join) and then the container process's PID (or EOF).
pub fn run(sup: i32, runtime: Channel) -> i32 {
    let sup_fd = Pid::from_raw(sup)
        .ok_or(rustix::io::Errno::SRCH)
        .and_then(|p| rustix::process::pidfd_open(p, PidfdFlags::empty()));
    let sup_fd = match sup_fd {
        Ok(fd) => fd,
        Err(e) => {
            tracing::error!("sandbox guard: cannot open a pidfd of the supervisor: {e}");
            return 1;
        }
    };
    if let Err(e) = confine() {
        // Fail closed: no guard, no supervisor (and so no container: the
        // runtime cannot hand the notify fd to a dead listener).
        tracing::error!("sandbox guard: cannot confine itself: {e}");
        let _ = rustix::process::pidfd_send_signal(&sup_fd, Signal::KILL);
    }
    let (init, runtime) = watch(&sup_fd, runtime);
    // The supervisor is gone: so is the container. A PID that comes only
    // now (the runtime was still creating it) is killed as soon as it does.
    let init = init.or_else(|| runtime.and_then(|ch| init_pidfd(&ch)));
    if let Some(init) = init {
        match rustix::process::pidfd_send_signal(&init, Signal::KILL) {
            Ok(()) | Err(rustix::io::Errno::SRCH) => {}
            Err(e) => tracing::error!("sandbox guard: cannot kill the container process: {e}"),
        }
    }
    let _ = rustix::process::waitid(
        rustix::process::WaitId::PidFd(sup_fd.as_fd()),
        rustix::process::WaitIdOptions::EXITED,
    );
    0
}

/// Waits until the supervisor ends; meanwhile takes the container
/// process's PID from the runtime (and joins the container's cgroup when
/// asked). Returns that process's pidfd, and the channel if the PID did
/// not come on it yet.
fn watch(sup: &OwnedFd, runtime: Channel) -> (Option<OwnedFd>, Option<Channel>) {
    let mut init = None;
    let mut runtime = Some(runtime);
    loop {
        let mut pfd = vec![PollFd::new(sup, PollFlags::IN)];
        if let Some(ch) = &runtime {
            pfd.push(PollFd::new(ch, PollFlags::IN));
        }
        match rustix::event::poll(&mut pfd, None) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            // Cannot wait: act as if the supervisor were gone.
            Err(_) => return (init, runtime),
        }
        let sup_done = !pfd[0].revents().is_empty();
        let msg = pfd.get(1).is_some_and(|p| !p.revents().is_empty());
        drop(pfd);
        if msg {
            if let Some(ch) = runtime.take() {
                match from_runtime(&ch) {
                    FromRuntime::Joined => runtime = Some(ch),
                    FromRuntime::Init(fd) => init = fd,
                }
            }
        }
        if sup_done {
            return (init, runtime);
        }
    }
}

/// What one message of the runtime brought.
enum FromRuntime {
    /// The container's cgroup, joined (or not) and answered.
    Joined,
    /// The container process (the last message), or the end of the channel.
    Init(Option<OwnedFd>),
}

fn from_runtime(ch: &Channel) -> FromRuntime {
    match ch.recv_with_fd() {
        Ok((Msg::Join { last }, fd)) => match super::answer_join(ch, fd, last) {
            Ok(()) => FromRuntime::Joined,
            Err(_) => FromRuntime::Init(None),
        },
        // The runtime has not reaped it yet, so its PID is not reused.
        Ok((Msg::Pid(p), _)) => FromRuntime::Init(
            Pid::from_raw(p).and_then(|p| rustix::process::pidfd_open(p, PidfdFlags::empty()).ok()),
        ),
        _ => FromRuntime::Init(None),
    }
}

/// The container process named on the runtime's channel, as a pidfd;
/// cgroup joins that come first are answered.
fn init_pidfd(ch: &Channel) -> Option<OwnedFd> {
    loop {
        if let FromRuntime::Init(fd) = from_runtime(ch) {
            return fd;
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum GuardError {
    #[error("cannot {0}")]
    Step(&'static str, #[source] std::io::Error),
    #[error("seccomp")]
    Seccomp(#[from] moat_jail::seccomp::SeccompError),
}

fn step(what: &'static str) -> impl FnOnce(rustix::io::Errno) -> GuardError {
    move |e| GuardError::Step(what, e.into())
}

/// CAP_KILL only, no new processes or core dumps, no_new_privs, not
/// dumpable, then its seccomp filter.
fn confine() -> Result<(), GuardError> {
    for c in ::caps::all() {
        if c == ::caps::Capability::CAP_KILL {
            continue;
        }
        ::caps::drop(None, ::caps::CapSet::Bounding, c)
            .map_err(|e| GuardError::Step("drop the bounding set", std::io::Error::other(e)))?;
    }
    ::caps::clear(None, ::caps::CapSet::Ambient)
        .map_err(|e| GuardError::Step("clear the ambient set", std::io::Error::other(e)))?;
    let held = rustix::thread::capabilities(None).map_err(step("read capabilities"))?;
    let keep = held.permitted & CapabilitySet::KILL;
    rustix::thread::set_capabilities(
        None,
        CapabilitySets {
            effective: keep,
            permitted: keep,
            inheritable: CapabilitySet::empty(),
        },
    )
    .map_err(step("set capabilities"))?;
    for (r, v) in [
        (Resource::Nproc, 0),
        (Resource::Core, 0),
        (Resource::Nofile, 16),
    ] {
        rustix::process::setrlimit(
            r,
            rustix::process::Rlimit {
                current: Some(v),
                maximum: Some(v),
            },
        )
        .map_err(step("set its rlimits"))?;
    }
    rustix::thread::set_no_new_privs(true).map_err(step("set no_new_privs"))?;
    nix::sys::prctl::set_dumpable(false)
        .map_err(|e| GuardError::Step("make itself non-dumpable", e.into()))?;
    moat_sys::seccomp::exit_on_trap(
        b"moat: sandbox guard: ended by its own seccomp filter on syscall ",
    )
    .map_err(|e| GuardError::Step("catch SIGSYS", e))?;
    let names: Vec<&str> = GUARD_SYSCALLS.iter().map(|(n, _)| *n).collect();
    // fcntl(F_GETFD) only: what Rust's standard library does before it
    // closes a dropped descriptor in builds with debug assertions (to check
    // that the descriptor is open); nothing else of fcntl.
    let doc = serde_json::json!({
        "defaultAction": "SCMP_ACT_TRAP",
        "syscalls": [
            {"names": names, "action": "SCMP_ACT_ALLOW"},
            {
                "names": ["fcntl"],
                "action": "SCMP_ACT_ALLOW",
                "args": [{"index": 1, "value": libc::F_GETFD, "op": "SCMP_CMP_EQ"}],
            },
        ],
    });
    let spec: oci_spec::runtime::LinuxSeccomp = serde_json::from_value(doc)
        .map_err(|e| GuardError::Step("build its seccomp filter", std::io::Error::other(e)))?;
    moat_jail::seccomp::compile(&spec)?.load()?;
    Ok(())
}
