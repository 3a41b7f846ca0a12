//! `exec`: a new process in a running container's namespaces and cgroup,
//! with the container's seccomp profile and the process's own identity.
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

use moat_core::runtime::ExecOptions as ExecOpts;
use moat_core::state::State;
use nix::sched::CloneFlags;
use nix::sys::wait::waitpid;
use nix::unistd::Pid;
use oci_spec::runtime::{Process, Spec};

use crate::lifecycle::{write_pid_file, ContainerError};
use crate::process::{self, Finalize};
use moat_jail::cgroup::CgroupManager;
use moat_jail::ns;
use moat_jail::procfs::pid_start_time;
use moat_jail::supervise::wait_forwarding_signals;
use moat_jail::sync::{self, FdKind, Msg, RemoteError, SyncError};

/// What the exec'd process's intermediate and the process itself report
/// when a step before the final checklist fails.
#[derive(Debug, thiserror::Error)]
enum ExecSetupError {
    #[error("setup channel")]
    Sync(#[source] SyncError),
    #[error("cannot join the container's cgroup")]
    Cgroup(#[source] moat_jail::cgroup::CgroupError),
    #[error("cannot make the exec process non-dumpable")]
    Dumpable(#[source] nix::Error),
    #[error("cannot join the container's namespaces")]
    Setns(#[source] nix::Error),
    #[error("cannot fork")]
    Fork(#[source] std::io::Error),
    #[error("cannot start a session")]
    Setsid(#[source] nix::Error),
    #[error("terminal")]
    Console(#[source] moat_jail::console::ConsoleError),
    #[error("landlock")]
    Landlock(#[source] moat_jail::landlock::LandlockError),
    #[error("cannot enter the container's root")]
    Root(#[source] std::io::Error),
    #[error("cannot set the process's OOM score adjustment")]
    OomScoreAdj(#[source] moat_jail::attrs::AttrError),
}

/// chroot into `root` (an fd of a directory) and chdir to its top.
fn enter_root(root: std::os::fd::BorrowedFd<'_>) -> std::io::Result<()> {
    rustix::process::fchdir(root)?;
    rustix::process::chroot(".")?;
    rustix::process::chdir("/")?;
    Ok(())
}

fn io_err(step: &str) -> impl FnOnce(std::io::Error) -> ContainerError + '_ {
    move |source| ContainerError::Io {
        step: step.to_owned(),
        source,
    }
}

/// Namespaces of `pid` that differ from ours, as setns flags.
fn namespaces_to_join(pid: i32, spec: &Spec) -> CloneFlags {
    let mut flags = CloneFlags::empty();
    for n in spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_deref())
        .unwrap_or(&[])
    {
        let name = ns::name(n.typ());
        let theirs = std::fs::metadata(format!("/proc/{pid}/ns/{name}"));
        let ours = std::fs::metadata(format!("/proc/self/ns/{name}"));
        match (theirs, ours) {
            (Ok(t), Ok(o)) if t.ino() == o.ino() && t.dev() == o.dev() => {}
            _ => flags |= ns::flag(n.typ()),
        }
    }
    flags
}

pub fn exec(
    st: &State,
    spec: &Spec,
    process: &Process,
    opts: &ExecOpts,
    cg: Option<&CgroupManager>,
) -> Result<i32, ContainerError> {
    if process.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(ContainerError::Invalid("exec needs a command".into()));
    }
    if !process.cwd().is_absolute() {
        return Err(ContainerError::Invalid(format!(
            "cwd {:?} must be absolute",
            process.cwd()
        )));
    }
    let pidfd = rustix::process::pidfd_open(
        rustix::process::Pid::from_raw(st.pid)
            .ok_or_else(|| ContainerError::Invalid("container has no process".into()))?,
        rustix::process::PidfdFlags::empty(),
    )
    .map_err(|e| ContainerError::Io {
        step: format!("open pidfd of {}", st.pid),
        source: e.into(),
    })?;
    if pid_start_time(st.pid) != Some(st.pid_start_time) {
        return Err(ContainerError::Invalid(format!(
            "container {} is not running",
            st.id
        )));
    }
    let flags = namespaces_to_join(st.pid, spec);
    // A container without a mount namespace of its own shares ours: setns
    // does not change the root then, so enter the container's root (its
    // init's, a chroot into the rootfs) by hand.
    let root = if flags.contains(CloneFlags::CLONE_NEWNS) {
        None
    } else {
        Some(
            rustix::fs::open(
                format!("/proc/{}/root", st.pid),
                rustix::fs::OFlags::PATH
                    | rustix::fs::OFlags::DIRECTORY
                    | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )
            .map_err(|e| ContainerError::Io {
                step: format!("open the root of pid {}", st.pid),
                source: e.into(),
            })?,
        )
    };
    let mut local_console = None;
    let console = match (&opts.console_socket, process.terminal().unwrap_or(false)) {
        (Some(p), true) => Some(OwnedFd::from(
            std::os::unix::net::UnixStream::connect(p)
                .map_err(io_err("connect to the console socket"))?,
        )),
        (None, true) if opts.detach => {
            return Err(ContainerError::Invalid(
                "a detached process with a terminal needs --console-socket".into(),
            ))
        }
        (None, true) => {
            // moat holds the terminal itself (see console::proxy).
            let (ours, theirs) = std::os::unix::net::UnixStream::pair()
                .map_err(io_err("create a console socket pair"))?;
            local_console = Some(OwnedFd::from(ours));
            Some(OwnedFd::from(theirs))
        }
        _ => None,
    };
    let join = cg.map(CgroupManager::join_files).transpose()?;
    let (parent, child) = sync::pair()?;
    let seccomp = spec.linux().as_ref().and_then(|l| l.seccomp().as_ref());
    let landlock = moat_core::landlock::LandlockPolicy::from_spec(spec)?;
    let in_user_ns = flags.contains(CloneFlags::CLONE_NEWUSER);
    let grandchild = || -> i32 {
        if let Some(c) = &console {
            let r = nix::unistd::setsid()
                .map_err(ExecSetupError::Setsid)
                .and_then(|_| {
                    moat_jail::console::setup_pty(c.as_fd(), process.console_size())
                        .map_err(ExecSetupError::Console)
                });
            if let Err(e) = r {
                let _ = child.send(&Msg::Error(RemoteError::new(&e)));
                return 1;
            }
        }
        let ruleset = match landlock
            .as_ref()
            .map(moat_jail::landlock::prepare)
            .transpose()
        {
            Ok(r) => r,
            Err(e) => {
                let _ = child.send(&Msg::Error(RemoteError::new(&ExecSetupError::Landlock(e))));
                return 1;
            }
        };
        let fin = Finalize {
            process,
            seccomp,
            landlock: ruleset.as_ref(),
            die_with_runtime: false,
            seccomp_program: None,
            preserve_fds: opts.preserve_fds,
            notify_channel: Some(&child),
            in_user_ns,
            steps: false,
        };
        let err = process::finalize_and_exec(&fin);
        let _ = child.send(&err.report());
        1
    };
    let oom_score_adj = process.oom_score_adj();
    let intermediate = |one: moat_sys::process::OneThread| -> i32 {
        let r = (|| -> Result<i32, ExecSetupError> {
            child.expect(Msg::Go, "go").map_err(ExecSetupError::Sync)?;
            if let Some(j) = &join {
                j.join_self().map_err(ExecSetupError::Cgroup)?;
            }
            // Still in the runtime's user namespace (lowering it needs
            // CAP_SYS_RESOURCE there) and still dumpable (so that a rootless
            // runtime may open its own /proc file). The exec'd process
            // inherits it.
            if let Some(adj) = oom_score_adj {
                moat_jail::attrs::set_oom_score_adj(None, adj)
                    .map_err(ExecSetupError::OomScoreAdj)?;
            }
            crate::lifecycle::protect_runtime_process().map_err(ExecSetupError::Dumpable)?;
            nix::sched::setns(pidfd.as_fd(), flags).map_err(ExecSetupError::Setns)?;
            if let Some(r) = &root {
                enter_root(r.as_fd()).map_err(ExecSetupError::Root)?;
            }
            one.fork(libc::CLONE_PARENT, |_| grandchild())
                .map_err(ExecSetupError::Fork)
        })();
        match r {
            Ok(pid) => {
                let _ = child.send(&Msg::Pid(pid));
                0
            }
            Err(e) => {
                let _ = child.send(&Msg::Error(RemoteError::new(&e)));
                1
            }
        }
    };
    let first = moat_sys::process::OneThread::check()
        .and_then(|one| one.fork(0, intermediate))
        .map_err(io_err("fork"))?;
    drop(child);
    drop(console);
    let reap = |p: i32| {
        let _ = waitpid(Pid::from_raw(p), None);
    };
    drop(join);
    parent.send(&Msg::Go)?;
    let pid = match parent.recv() {
        Ok(Msg::Pid(p)) => p,
        Ok(Msg::Error(e)) => {
            reap(first);
            return Err(SyncError::Child(e).into());
        }
        Ok(got) => {
            return Err(SyncError::Unexpected {
                got,
                expected: "pid",
            }
            .into())
        }
        Err(e) => {
            reap(first);
            return Err(e.into());
        }
    };
    reap(first);
    loop {
        match parent.recv_with_fd() {
            Err(SyncError::Eof) => break,
            Err(e) => return Err(e.into()),
            Ok((Msg::Fd(FdKind::Seccomp), Some(fd))) => {
                if let Some(path) = seccomp.and_then(|s| s.listener_path().as_ref()) {
                    let meta = seccomp
                        .and_then(|s| s.listener_metadata().clone())
                        .unwrap_or_default();
                    let oci = crate::lifecycle::oci_state(st, moat_core::ContainerStatus::Running);
                    moat_jail::seccomp::send_to_listener(path, &meta, &oci, pid, fd.as_fd())?;
                }
            }
            Ok((Msg::Error(e), _)) => {
                reap(pid);
                return Err(SyncError::Child(e).into());
            }
            Ok((got, _)) => {
                return Err(SyncError::Unexpected {
                    got,
                    expected: "exec",
                }
                .into())
            }
        }
    }
    if let Some(p) = &opts.pid_file {
        write_pid_file(p, pid)?;
    }
    if opts.detach {
        return Ok(0);
    }
    if let Some(sock) = local_console {
        let master = moat_jail::console::recv_master(sock.as_fd())
            .map_err(|e| ContainerError::Invalid(moat_core::error_chain(&e)))?;
        return Ok(moat_jail::console::proxy(master, pid));
    }
    Ok(wait_forwarding_signals(pid))
}
