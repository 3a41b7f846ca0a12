//! The container's init process: everything between clone() and exec, as a
//! checklist of named steps in the order the runtime-spec describes.
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::sched::CloneFlags;
use nix::unistd::{Gid, Uid};
use oci_spec::runtime::{LinuxNamespaceType, Spec};

use crate::hooks;
use crate::process::{self, Finalize};
use moat_core::steps::Recorder;
use moat_jail::console;
use moat_jail::landlock;
use moat_jail::ns::{self, NsPlan};
use moat_jail::rootfs::{self, RootfsConfig};
use moat_jail::sync::{Channel, Msg, ProcessOverride, RemoteError, SyncError};
use moat_sys::process::OneThread;

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(transparent)]
    Sync(#[from] SyncError),
    #[error("namespaces")]
    Ns(#[from] ns::NsError),
    #[error("rootfs")]
    Rootfs(#[from] rootfs::RootfsError),
    #[error("cgroup")]
    Cgroup(#[from] moat_jail::cgroup::CgroupError),
    #[error(transparent)]
    Hook(#[from] hooks::HookError),
    #[error("terminal")]
    Console(#[from] console::ConsoleError),
    #[error("cannot {step}")]
    Sys {
        step: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("cannot wait for start")]
    Accept(#[source] std::io::Error),
    #[error(transparent)]
    Process(#[from] process::ProcessError),
    #[error("network")]
    Net(#[from] moat_jail::net::NetError),
    #[error(transparent)]
    Landlock(#[from] landlock::LandlockError),
    #[error("network device")]
    NetDevice(#[from] moat_net::TapError),
    #[error("the runtime exited during setup")]
    RuntimeGone,
}

fn sys(step: &'static str) -> impl FnOnce(nix::Error) -> InitError {
    move |source| InitError::Sys { step, source }
}

/// How the init learns that it may run the user's program.
pub enum StartSignal {
    /// `moat run`: the runtime sends `Start` on the setup channel.
    Channel,
    /// `moat create`: `moat start` connects to this socket in the state dir.
    Listener(OwnedFd),
}

/// Everything the init needs, prepared by the runtime before the fork.
pub struct InitContext<'a> {
    pub id: &'a str,
    pub spec: &'a Spec,
    pub rootfs: &'a Path,
    pub bundle: &'a Path,
    pub plan: &'a NsPlan,
    /// Opened before the fork, in the runtime's mount namespace.
    pub join_files: &'a [(LinuxNamespaceType, std::fs::File)],
    pub cgroup_mounts: &'a [(String, PathBuf)],
    pub no_pivot: bool,
    pub no_new_keyring: bool,
    pub preserve_fds: u32,
    pub console_socket: Option<OwnedFd>,
    pub start: StartSignal,
    /// Files to move ourselves into the container's cgroup with.
    pub cgroup_join: Option<&'a moat_jail::cgroup::JoinFiles>,
    /// The state-dir lock of the runtime, to close first thing.
    pub lock_fd: std::os::fd::RawFd,
    /// The runtime's end of the setup channel, inherited by the fork: closed
    /// first thing, so that the runtime's death is an end of file here.
    pub runtime_end: std::os::fd::RawFd,
    /// Whether the runtime must be told to run prestart/createRuntime hooks.
    pub has_runtime_hooks: bool,
    /// moat's Landlock policy for the workload, if the spec has one.
    pub landlock: Option<&'a moat_core::landlock::LandlockPolicy>,
    /// SIGKILL to the workload when the runtime dies.
    pub die_with_runtime: bool,
    /// Make the TAP device of moat's user-space network and hand it over.
    pub net_device: bool,
    /// The spec's seccomp filter, compiled by the runtime (None: compile here).
    pub seccomp_program: Option<&'a moat_jail::seccomp::Program>,
    /// Record the steps' durations and send them to the runtime (`--debug`).
    pub steps: bool,
}

/// Entry point of the slow path's intermediate process: join and create the
/// namespaces, fork the real init as our sibling, report its PID, exit.
pub fn intermediate(ctx: &InitContext, chan: &Channel, one: OneThread) -> i32 {
    match intermediate_steps(ctx, chan, &one) {
        Ok(()) => 0,
        Err(e) => {
            let _ = chan.send(&Msg::Error(RemoteError::new(&e)));
            1
        }
    }
}

fn intermediate_steps(ctx: &InitContext, chan: &Channel, one: &OneThread) -> Result<(), InitError> {
    tie_to_runtime(chan)?;
    release_runtime_fds(ctx);
    chan.expect(Msg::Go, "go")?;
    join_cgroup(ctx)?;
    ns::join(ctx.join_files, ctx.plan, |t| t == LinuxNamespaceType::User)?;
    // The other namespaces to join before a new user namespace: setns
    // needs CAP_SYS_ADMIN over the namespace's owner, which a process in a
    // user namespace it just made never has over an existing one (the
    // microvm guest's container joins the network namespace that holds
    // eth0 this way; runc orders its joins the same).
    ns::join(ctx.join_files, ctx.plan, |t| t != LinuxNamespaceType::User)?;
    if ctx.plan.new_user() {
        ns::unshare_flags(CloneFlags::CLONE_NEWUSER)?;
        chan.send(&Msg::MapIds)?;
        chan.expect(Msg::Go, "go")?;
    }
    crate::lifecycle::protect_runtime_process()
        .map_err(sys("make the container process non-dumpable"))?;
    let rest = ctx.plan.new
        - CloneFlags::CLONE_NEWUSER
        - CloneFlags::CLONE_NEWCGROUP
        - CloneFlags::from_bits_retain(libc::CLONE_NEWTIME);
    ns::unshare_flags(rest)?;
    let pid = one
        .fork(libc::CLONE_PARENT, |_| container_init(ctx, chan))
        .map_err(|e| InitError::Sys {
            step: "fork the container process",
            source: nix::Error::from_raw(e.raw_os_error().unwrap_or(0)),
        })?;
    chan.send(&Msg::Pid(pid))?;
    Ok(())
}

/// Entry point of the container's init process. Returns an exit code only on failure.
pub fn container_init(ctx: &InitContext, chan: &Channel) -> i32 {
    let err = match init_steps(ctx, chan) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    let _ = chan.send(&Msg::Error(RemoteError::new(&err)));
    1
}

enum Never {}

fn init_steps(ctx: &InitContext, chan: &Channel) -> Result<Never, InitError> {
    let mut rec = Recorder::new(ctx.steps);
    // Until the runtime has recorded us (`Ready` below), we die with it.
    tie_to_runtime(chan)?;
    release_runtime_fds(ctx);
    // The runtime records our PID before it says go.
    chan.expect(Msg::Go, "go")?;
    rec.step("wait-go");
    // Before the cgroup, whose device rules refuse /dev/net/tun.
    let tun = ctx.net_device.then(moat_net::open_tun).transpose()?;
    join_cgroup(ctx)?;
    rec.step("cgroup-join");
    crate::lifecycle::protect_runtime_process()
        .map_err(sys("make the container process non-dumpable"))?;
    let rcfg = RootfsConfig {
        spec: ctx.spec,
        rootfs: ctx.rootfs,
        bundle: ctx.bundle,
        cgroup_mounts: ctx.cgroup_mounts,
        no_pivot: ctx.no_pivot,
        in_user_ns: ctx.plan.has_user(),
        own_mount_ns: own_mount_ns(ctx.plan),
    };
    // With the runtime's credentials still (the container's host IDs need
    // not be able to reach the rootfs or a volume).
    let host = rootfs::HostPaths::open(ctx.spec, ctx.rootfs, ctx.bundle)?;
    rec.step("open-host-paths");
    become_root_in_user_ns(ctx)?;
    // The ID change cleared the parent-death signal.
    tie_to_runtime(chan)?;
    enter_late_namespaces(ctx)?;
    join_session_keyring(ctx)?;
    rec.step("identity-keyring");
    let root = rootfs::prepare(&rcfg, &host)?;
    drop(host);
    rec.step("mounts");
    make_net_device(tun, chan)?;
    if ctx.has_runtime_hooks {
        chan.send(&Msg::RuntimeHooks)?;
        chan.expect(Msg::Go, "go")?;
    }
    run_container_hooks(ctx, chan, "createContainer")?;
    if !rcfg.own_mount_ns {
        // The container's root will have no /proc (nothing is mounted).
        apply_sysctls(ctx.spec)?;
    }
    rec.step("net-device-hooks");
    rootfs::pivot(&rcfg, &root)?;
    drop(root);
    rec.step("pivot-root");
    set_identity(ctx.spec)?;
    bring_up_loopback(ctx)?;
    if rcfg.own_mount_ns {
        // Before `finish`, which makes /proc/sys read-only.
        apply_sysctls(ctx.spec)?;
    }
    rec.step("hostname-loopback-sysctls");
    rootfs::finish(&rcfg)?;
    rec.step("masked-readonly-paths");
    nix::unistd::setsid().map_err(sys("create a session"))?;
    if let Some(sock) = &ctx.console_socket {
        let size = ctx.spec.process().as_ref().and_then(|p| p.console_size());
        console::setup_pty(sock.as_fd(), size)?;
    }
    // With the root and the standard streams final: a policy path missing
    // from the container fails `create`.
    let mut ruleset = ctx.landlock.map(landlock::prepare).transpose()?;
    if let (StartSignal::Listener(_), Some(p)) = (&ctx.start, ctx.spec.process()) {
        // As runc and crun do: a program that is not there fails `create`
        // (Podman reads the status, 127, from `create`'s error; a failed
        // `start` it makes 126).
        process::check_program(p)?;
    }
    rec.step("session-console-landlock");
    if rec.active() {
        chan.send(&Msg::Steps(rec.take()))?;
    }
    chan.send(&Msg::Created)?;
    detach_from_runtime(ctx, chan)?;
    let (reply, replaced) = wait_for_start(ctx, chan)?;
    let reply = reply.as_ref().unwrap_or(chan);
    if replaced.is_some() && ruleset.is_some() {
        // Held before its run (the microvm tier's primed snapshot), the
        // container bound its read-write volumes' empty placeholders: the
        // volumes are mounted over them since, and Landlock ignores a
        // covered mount point's rules. The ruleset is made again on the
        // mounts the process will see.
        ruleset = ctx.landlock.map(landlock::prepare).transpose()?;
    }
    run_container_hooks(ctx, reply, "startContainer")?;
    let linux = ctx.spec.linux().as_ref();
    let configured = ctx
        .spec
        .process()
        .as_ref()
        .expect("validated: process is present");
    let process = match replaced {
        Some(o) => {
            let mut p = configured.clone();
            p.set_args(Some(o.args))
                .set_env(Some(o.env))
                .set_cwd(o.cwd.into());
            std::borrow::Cow::Owned(p)
        }
        None => std::borrow::Cow::Borrowed(configured),
    };
    let fin = Finalize {
        process: &process,
        seccomp: linux.and_then(|l| l.seccomp().as_ref()),
        landlock: ruleset.as_ref(),
        die_with_runtime: ctx.die_with_runtime,
        seccomp_program: ctx.seccomp_program,
        preserve_fds: ctx.preserve_fds,
        notify_channel: Some(reply),
        in_user_ns: ctx.plan.has_user(),
        steps: ctx.steps,
    };
    let err = process::finalize_and_exec(&fin);
    // Report on the channel the starter listens to.
    let _ = reply.send(&err.report());
    Err(err.into())
}

/// Whether the container has a mount namespace of its own (new or joined);
/// without one it shares the runtime's.
fn own_mount_ns(plan: &NsPlan) -> bool {
    plan.new.contains(CloneFlags::CLONE_NEWNS)
        || plan
            .join
            .iter()
            .any(|(t, _)| *t == LinuxNamespaceType::Mount)
}

fn join_cgroup(ctx: &InitContext) -> Result<(), InitError> {
    if let Some(j) = ctx.cgroup_join {
        j.join_self()?;
    }
    Ok(())
}

fn release_runtime_fds(ctx: &InitContext) {
    // EBADF (already closed by the intermediate, whose fork this is) is
    // harmless.
    let _ = nix::unistd::close(ctx.lock_fd);
    let _ = nix::unistd::close(ctx.runtime_end);
}

/// SIGKILL when the runtime dies (the parent-death signal; after
/// `CLONE_PARENT` the runtime is the parent of the init too), then a check
/// that it has not died already: a runtime killed before the signal was set
/// has closed its end of the channel. A container process whose runtime
/// died before recording it would otherwise live on in no state, possibly
/// in no cgroup, blocked for ever.
fn tie_to_runtime(chan: &Channel) -> Result<(), InitError> {
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .map_err(sys("set the parent-death signal"))?;
    if chan.peer_closed() {
        return Err(InitError::RuntimeGone);
    }
    Ok(())
}

/// Once the runtime has saved the created container (it says `Go`): a
/// container that outlives its runtime (`create`, `run --detach`) stops
/// dying with it; one that does not (`moat run`) keeps the signal. Then
/// `Ready` lets the runtime exit.
fn detach_from_runtime(ctx: &InitContext, chan: &Channel) -> Result<(), InitError> {
    chan.expect(Msg::Go, "go")?;
    if ctx.die_with_runtime {
        tie_to_runtime(chan)?;
    } else {
        nix::sys::prctl::set_pdeathsig(None).map_err(sys("clear the parent-death signal"))?;
    }
    chan.send(&Msg::Ready)?;
    Ok(())
}

fn become_root_in_user_ns(ctx: &InitContext) -> Result<(), InitError> {
    if !ctx.plan.has_user() {
        return Ok(());
    }
    nix::unistd::setresgid(Gid::from_raw(0), Gid::from_raw(0), Gid::from_raw(0))
        .map_err(sys("become gid 0 in the user namespace (is 0 mapped?)"))?;
    nix::unistd::setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0))
        .map_err(sys("become uid 0 in the user namespace (is 0 mapped?)"))?;
    Ok(())
}

/// cgroup (after the cgroup move, so its root is the container's cgroup) and
/// time (offsets must be set before any process enters).
fn enter_late_namespaces(ctx: &InitContext) -> Result<(), InitError> {
    if ctx.plan.new.contains(CloneFlags::CLONE_NEWCGROUP) {
        ns::unshare_flags(CloneFlags::CLONE_NEWCGROUP)?;
    }
    if ctx
        .plan
        .new
        .contains(CloneFlags::from_bits_retain(libc::CLONE_NEWTIME))
    {
        let mut offsets = Vec::new();
        if let Some(t) = ctx
            .spec
            .linux()
            .as_ref()
            .and_then(|l| l.time_offsets().as_ref())
        {
            for (clock, off) in t {
                let clock = match clock.as_str() {
                    "monotonic" | "boottime" => clock.clone(),
                    other => other.trim_start_matches("CLOCK_").to_ascii_lowercase(),
                };
                offsets.push((clock, off.secs().unwrap_or(0), off.nanosecs().unwrap_or(0)));
            }
        }
        ns::enter_new_time_ns(&offsets)?;
    }
    Ok(())
}

fn join_session_keyring(ctx: &InitContext) -> Result<(), InitError> {
    if ctx.no_new_keyring {
        return Ok(());
    }
    // In a user namespace the keyring syscalls may be filtered; runc ignores
    // ENOSYS/EPERM there too, since the keyring is a convenience, not a boundary.
    match moat_sys::process::join_session_keyring() {
        Ok(()) => Ok(()),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOSYS) | Some(libc::EPERM) | Some(libc::EACCES)
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(InitError::Sys {
            step: "join a new session keyring",
            source: nix::Error::from_raw(e.raw_os_error().unwrap_or(0)),
        }),
    }
}

fn run_container_hooks(
    ctx: &InitContext,
    _chan: &Channel,
    stage: &'static str,
) -> Result<(), InitError> {
    let Some(h) = ctx.spec.hooks().as_ref() else {
        return Ok(());
    };
    let list = match stage {
        "createContainer" => h.create_container(),
        _ => h.start_container(),
    };
    let Some(list) = list.as_deref().filter(|l| !l.is_empty()) else {
        return Ok(());
    };
    // The ID the runtime's caller knows, where moat runs this container
    // for another runtime (the microvm tier's guest).
    let id = ctx
        .spec
        .annotations()
        .as_ref()
        .and_then(|a| a.get(moat_core::tier::STATE_ID_ANNOTATION))
        .map_or(ctx.id, String::as_str);
    let state = serde_json::json!({
        "ociVersion": ctx.spec.version(),
        "id": id,
        "status": if stage == "createContainer" { "creating" } else { "created" },
        "pid": std::process::id(),
        "bundle": ctx.bundle,
    });
    hooks::run(stage, list, state.to_string().as_bytes())?;
    Ok(())
}

fn set_identity(spec: &Spec) -> Result<(), InitError> {
    if let Some(h) = spec.hostname().as_deref().filter(|h| !h.is_empty()) {
        nix::unistd::sethostname(h).map_err(sys("set hostname"))?;
    }
    if let Some(d) = spec.domainname().as_deref().filter(|h| !h.is_empty()) {
        rustix::system::setdomainname(d.as_bytes()).map_err(|e| InitError::Sys {
            step: "set domainname",
            source: nix::Error::from_raw(e.raw_os_error()),
        })?;
    }
    Ok(())
}

/// A network namespace of our own starts with `lo` down; bring it up (an
/// existing namespace joined by path is left as its owner set it).
/// moat's user-space network: the TAP device, made here (in the container's
/// network namespace, with CAP_NET_ADMIN over it, while the host's
/// /dev/net/tun is still in reach) and handed to the runtime, whose stack
/// process serves its other end. The container keeps no descriptor of it.
fn make_net_device(tun: Option<OwnedFd>, chan: &Channel) -> Result<(), InitError> {
    let Some(tun) = tun else {
        return Ok(());
    };
    let tap =
        moat_net::create_tap_on(tun, crate::network::DEVICE, &moat_net::NetConfig::default())?;
    use std::os::fd::AsRawFd;
    chan.send_with_fd(
        &Msg::Fd(moat_jail::sync::FdKind::Tap),
        Some(tap.fd.as_raw_fd()),
    )?;
    Ok(())
}

fn bring_up_loopback(ctx: &InitContext) -> Result<(), InitError> {
    if ctx.plan.new.contains(CloneFlags::CLONE_NEWNET) {
        moat_jail::net::bring_up_loopback()?;
    }
    Ok(())
}

fn apply_sysctls(spec: &Spec) -> Result<(), InitError> {
    if let Some(s) = spec.linux().as_ref().and_then(|l| l.sysctl().as_ref()) {
        for (k, v) in s {
            rootfs::write_sysctl(k, v)?;
        }
    }
    Ok(())
}

/// Blocks until the runtime says start: the channel it came on when that is not the setup
/// channel, and the process's replacement arguments, environment and
/// working directory if the starter sent them (only on the setup channel:
/// the runtime that created the container, [`Msg::StartWith`]).
fn wait_for_start(
    ctx: &InitContext,
    chan: &Channel,
) -> Result<(Option<Channel>, Option<ProcessOverride>), InitError> {
    match &ctx.start {
        StartSignal::Channel => match chan.recv()? {
            Msg::Start => Ok((None, None)),
            Msg::StartWith(o) => Ok((None, Some(o))),
            Msg::Error(e) => Err(SyncError::Child(e).into()),
            got => Err(SyncError::Unexpected {
                got,
                expected: "start",
            }
            .into()),
        },
        StartSignal::Listener(l) => {
            let guard = TerminationSignals::catch()?;
            loop {
                guard.wait_readable(l)?;
                let conn = Channel::accept(l).map_err(InitError::Accept)?;
                if let Ok(Msg::Start) = conn.recv() {
                    guard.release()?;
                    return Ok((Some(conn), None));
                }
            }
        }
    }
}

/// While a created container waits for `start`, its init is PID 1 of its
/// namespace with no signal handlers, so the kernel would drop SIGTERM and
/// friends sent from outside and `kill ID TERM` would do nothing (runc's
/// init, a Go program, dies of them). Blocked signals are queued even for a
/// namespace init, so block them, watch a signalfd, and exit as if killed.
struct TerminationSignals {
    fd: nix::sys::signalfd::SignalFd,
    old: nix::sys::signal::SigSet,
}

const TERMINATING: [nix::sys::signal::Signal; 6] = {
    use nix::sys::signal::Signal::*;
    [SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2]
};

impl TerminationSignals {
    fn catch() -> Result<TerminationSignals, InitError> {
        use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow};
        let mut set = SigSet::empty();
        for s in TERMINATING {
            set.add(s);
        }
        let mut old = SigSet::empty();
        pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), Some(&mut old))
            .map_err(sys("block signals"))?;
        let fd = nix::sys::signalfd::SignalFd::with_flags(
            &set,
            nix::sys::signalfd::SfdFlags::SFD_CLOEXEC,
        )
        .map_err(sys("watch signals"))?;
        Ok(TerminationSignals { fd, old })
    }

    /// Waits until `l` can accept; exits the process on a terminating signal.
    fn wait_readable(&self, l: &OwnedFd) -> Result<(), InitError> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        loop {
            let mut fds = [
                PollFd::new(l.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.fd.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(sys("wait for start")(e)),
                Ok(_) => {}
            }
            if fds[1].any().unwrap_or(false) {
                if let Ok(Some(info)) = self.fd.read_signal() {
                    moat_sys::process::exit_now(128 + info.ssi_signo as i32);
                }
            }
            if fds[0].any().unwrap_or(false) {
                return Ok(());
            }
        }
    }

    /// Restores the signal mask (execve would otherwise keep it blocked).
    fn release(self) -> Result<(), InitError> {
        nix::sys::signal::pthread_sigmask(
            nix::sys::signal::SigmaskHow::SIG_SETMASK,
            Some(&self.old),
            None,
        )
        .map_err(sys("restore the signal mask"))
    }
}
