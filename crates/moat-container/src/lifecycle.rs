//! The `container` tier's lifecycle: create, launch, start, state, kill,
//! delete, pause, resume, exec, behind the [`Lifecycle`] seam. Each command
//! is a checklist of named steps.
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use moat_core::runtime::{
    Config, ConfigSource, CreateRequest, Current, ExecOptions, Launched, Lifecycle, RuntimeError,
};
use moat_core::state::{ContainerLock, ContainerStatus, State, StateDir, StateError};
use moat_core::stats::{LimitEvents, Stats};
use moat_core::steps;
use moat_core::{SpecError, Tier};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::waitpid;
use nix::unistd::Pid;
use oci_spec::runtime::{LinuxResources, Process, Spec};

use crate::hooks::{self, HookError};
use crate::init::{self, InitContext, StartSignal};
use crate::network::NetRequest;
use moat_jail::cgroup::{CgroupError, CgroupManager};
use moat_jail::ns::{self, NsPlan};
use moat_jail::procfs::{pid_start_time, proc_stat};
use moat_jail::sync::{self, Channel, FdKind, Msg, ProcessOverride, SyncError};
use moat_jail::{idmap, seccomp};

pub const START_SOCKET: &str = "start.sock";
pub const CONFIG_COPY: &str = "config.json";

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("cgroup")]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Sync(#[from] SyncError),
    #[error("terminal")]
    Console(#[from] moat_jail::console::ConsoleError),
    #[error("network")]
    Net(#[from] crate::network::NetError),
    #[error(transparent)]
    Hook(#[from] HookError),
    #[error("namespaces")]
    Ns(#[from] ns::NsError),
    #[error("user namespace ID maps")]
    IdMap(#[from] idmap::IdMapError),
    #[error("seccomp listener")]
    Seccomp(#[from] seccomp::SeccompError),
    #[error("seccomp")]
    SeccompProgram(#[source] seccomp::SeccompError),
    #[error("process attributes")]
    Attr(#[from] moat_jail::attrs::AttrError),
    #[error("{0}")]
    Invalid(String),
    #[error("container {id} is {status}, {why}")]
    WrongStatus {
        id: String,
        status: &'static str,
        why: &'static str,
    },
    #[error("cannot {step}")]
    Io {
        step: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot {step}")]
    Sys {
        step: String,
        #[source]
        source: nix::Error,
    },
}

fn io_err(step: impl Into<String>) -> impl FnOnce(std::io::Error) -> ContainerError {
    let step = step.into();
    move |source| ContainerError::Io { step, source }
}

fn sys_err(step: impl Into<String>) -> impl FnOnce(nix::Error) -> ContainerError {
    let step = step.into();
    move |source| ContainerError::Sys { step, source }
}

/// The container tier's part of the state: its cgroup, as the cgroup
/// manager saved it (null: rootless without a delegated cgroup).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct ContainerPart {
    cgroup: serde_json::Value,
    /// The user-space network stack's process, when the config asked for it.
    #[serde(default)]
    net_stack: Option<crate::network::StackProcess>,
}

impl ContainerPart {
    fn of(st: &State, dir: &Path) -> Result<ContainerPart, StateError> {
        st.tier_part(&dir.join(moat_core::state::STATE_FILE))
    }

    fn store(self, st: &mut State) {
        // Plain data: serialization cannot fail.
        st.tier_state = serde_json::to_value(self).unwrap_or_default();
    }
}

/// The container tier, bound to a state root.
#[derive(Debug, Clone)]
pub struct ContainerTier {
    pub sd: StateDir,
    pub systemd_cgroup: bool,
}

/// A created container, still connected to its init when created by `run`.
pub struct Created {
    pub pid: i32,
    pub state: State,
    chan: Channel,
    /// Our end of the console socket when moat itself holds the terminal.
    console: Option<OwnedFd>,
    /// Its cgroup (none for a rootless container without a delegated one).
    cgroup: Option<CgroupManager>,
    _lock: ContainerLock,
}

fn rootless() -> bool {
    !rustix::process::geteuid().is_root()
}

impl ContainerTier {
    pub fn new(root: impl Into<PathBuf>, systemd_cgroup: bool) -> ContainerTier {
        ContainerTier {
            sd: StateDir::new(root),
            systemd_cgroup,
        }
    }

    // ----- create -----

    /// Creates the container. With `listen`, its init waits for `moat start`
    /// on a socket in the state dir; without, for `Start` on the returned channel.
    fn create_container(
        &self,
        req: &CreateRequest,
        listen: bool,
    ) -> Result<Created, ContainerError> {
        let lock = match self.sd.create(req.id) {
            Err(StateError::Exists(_)) if self.sd.abandoned(req.id) => {
                // Left by a create that was killed: removed like `delete
                // --force` would, then the ID is free.
                tracing::warn!(
                    "removing container {}, left by a create that was killed",
                    req.id
                );
                self.delete(req.id, true)?;
                self.sd.create(req.id)?
            }
            r => r?,
        };
        steps::mark("state-dir-lock");
        let mut cleanup = Cleanup {
            rt: self,
            id: req.id,
            pid: 0,
            cgroup: None,
            net_stack: None,
            armed: true,
        };
        let r = self.create_steps(req, listen, &lock, &mut cleanup);
        match r {
            Ok((pid, state, chan, console)) => {
                cleanup.armed = false;
                Ok(Created {
                    pid,
                    state,
                    chan,
                    console,
                    cgroup: cleanup.cgroup.take(),
                    _lock: lock,
                })
            }
            Err(e) => {
                drop(cleanup);
                Err(e)
            }
        }
    }

    fn create_steps(
        &self,
        req: &CreateRequest,
        listen: bool,
        lock: &ContainerLock,
        cleanup: &mut Cleanup,
    ) -> Result<(i32, State, Channel, Option<OwnedFd>), ContainerError> {
        let (spec, rootfs) = (&req.config.spec, &req.config.rootfs);
        let bundle = match &req.config.source {
            ConfigSource::Bundle(dir) | ConfigSource::Rewritten { bundle: dir, .. } => dir.clone(),
            ConfigSource::Memory(_) => lock.dir().to_owned(),
        };
        let linux = spec
            .linux()
            .as_ref()
            .ok_or_else(|| ContainerError::Invalid("config has no linux section".into()))?;
        // Without a mount namespace the container shares ours (the spec's
        // "inherited"): the init then mounts nothing (init.rs).
        let plan = NsPlan::from_spec(linux.namespaces().as_deref().unwrap_or(&[]));
        // A Kubernetes pod's pause container holds the pod's network
        // namespace: the network annotations a pod passes to its containers
        // are for its microVMs' stacks (which serve from that namespace),
        // not for it.
        let pod_sandbox = moat_core::tier::is_pod_sandbox(spec.annotations().as_ref(), req.id);
        let net = if pod_sandbox {
            None
        } else {
            NetRequest::from_spec(
                spec,
                plan.new.contains(nix::sched::CloneFlags::CLONE_NEWNET),
            )?
        };
        // With the stack's network, /etc/resolv.conf names its DNS.
        let with_resolv;
        let spec = match &net {
            Some(_) => {
                with_resolv = mount_resolv_conf(spec, lock.dir())?;
                &with_resolv
            }
            None => spec,
        };
        let mut state = initial_state(req.id, spec, &bundle, rootfs);
        let cg = self.cgroup_for(linux.cgroups_path().as_deref(), req.id)?;
        ContainerPart {
            cgroup: cg.to_saved(),
            net_stack: None,
        }
        .store(&mut state);
        self.sd.save(&state)?;
        steps::mark("state-save-creating");
        let resources = with_default_devices(linux);
        let created = cg.create(Some(&resources));
        cleanup.cgroup = Some(cg);
        match created {
            Ok(()) => {}
            Err(CgroupError::NoDelegation { path, .. }) => {
                // Only returned for a rootless runtime that asked for no limit.
                tracing::warn!(
                    "no delegated cgroup ({}): running without cgroup limits",
                    path.display()
                );
                cleanup.cgroup = None;
                ContainerPart::default().store(&mut state);
                self.sd.save(&state)?;
            }
            Err(e) => return Err(e.into()),
        }
        let cg = cleanup.cgroup.as_ref();
        steps::mark("cgroup-create");
        save_config_copy(lock.dir(), req.config)?;
        steps::mark("config-copy");

        let join_files = ns::open_joins(&plan)?;
        let (parent, child) = sync::pair()?;
        let start = if listen {
            let sock = SocketPath::new(lock.dir(), START_SOCKET)?;
            StartSignal::Listener(
                sync::listen(sock.path()).map_err(io_err("listen on the start socket"))?,
            )
        } else {
            StartSignal::Channel
        };
        let (console_socket, console_local) = connect_console(spec, req.console_socket, listen)?;
        let hooks = spec.hooks().as_ref();
        let has_runtime_hooks = hooks.is_some_and(|h| {
            h.prestart().as_ref().is_some_and(|l| !l.is_empty())
                || h.create_runtime().as_ref().is_some_and(|l| !l.is_empty())
        });
        // Compiled here (or taken from the cache) rather than in the
        // container process: that costs one syscall there.
        steps::mark("channel-sockets");
        let seccomp_program = match linux.seccomp() {
            Some(s) => {
                seccomp::prepare(s, Some(self.sd.root())).map_err(ContainerError::SeccompProgram)?
            }
            None => None,
        };
        steps::mark("seccomp-prepare");
        let cgroup_mounts = cg.map(CgroupManager::mount_sources).unwrap_or_default();
        let cgroup_join = cg.map(CgroupManager::join_files).transpose()?;
        let landlock = moat_core::landlock::LandlockPolicy::from_spec(spec)?;
        let ctx = InitContext {
            id: req.id,
            spec,
            rootfs,
            bundle: &bundle,
            plan: &plan,
            join_files: &join_files,
            cgroup_mounts: &cgroup_mounts,
            no_pivot: req.no_pivot,
            no_new_keyring: req.no_new_keyring,
            preserve_fds: req.preserve_fds,
            console_socket,
            start,
            has_runtime_hooks,
            lock_fd: lock.raw_fd(),
            runtime_end: parent.raw(),
            cgroup_join: cgroup_join.as_ref(),
            landlock: landlock.as_ref(),
            die_with_runtime: req.die_with_runtime,
            net_device: net.is_some(),
            seccomp_program: seccomp_program.as_ref(),
            steps: steps::active(),
        };
        steps::mark("init-context");
        let fast = plan.clone_flags();
        let first = moat_sys::process::OneThread::check()
            .and_then(|one| match fast {
                Some(flags) => one.fork(flags.bits(), |_| init::container_init(&ctx, &child)),
                None => one.fork(0, |one| init::intermediate(&ctx, &child, one)),
            })
            .map_err(io_err("fork the container process"))?;
        drop(ctx);
        drop(child);
        steps::mark("clone");
        cleanup.pid = first;
        // The container process is recorded before it may leave its first
        // wait: `delete --force` finds it whenever this runtime dies (and
        // until `Ready` it dies with this runtime anyway).
        let pid = if fast.is_some() {
            self.record_pid(&mut state, first)?;
            if plan.new_user() {
                write_maps(first, spec)?;
            }
            first
        } else {
            let pid = self.drive_intermediate(first, &parent, spec)?;
            cleanup.pid = pid;
            self.record_pid(&mut state, pid)?;
            pid
        };
        set_oom_score_adj_from_outside(spec.process().as_ref(), pid)?;
        parent.send(&Msg::Go)?;
        steps::mark("record-pid-id-maps");

        let mut tap = None;
        loop {
            match parent.recv_with_fd()? {
                (Msg::Fd(FdKind::Tap), Some(fd)) if net.is_some() && tap.is_none() => {
                    tap = Some(fd);
                }
                (Msg::RuntimeHooks, _) => {
                    run_creation_hooks(hooks, &state)?;
                    parent.send(&Msg::Go)?;
                }
                (Msg::Steps(s), _) => {
                    steps::mark("init");
                    steps::log_remote(&s);
                }
                (Msg::Created, _) => break,
                (Msg::Error(e), _) => return Err(SyncError::Child(e).into()),
                (got, _) => {
                    return Err(SyncError::Unexpected {
                        got,
                        expected: "created",
                    }
                    .into())
                }
            }
        }
        if let (Some(net), Some(tap)) = (&net, tap) {
            // The runtime's stderr for `moat run`; a file for the engines,
            // whose pipes must see EOF when the runtime exits.
            let log = lock.dir().join("net.log");
            let log = (!req.die_with_runtime).then_some(log.as_path());
            let stack = crate::network::start(tap, pid, net, spec, log)?;
            cleanup.net_stack = Some(stack);
            let mut part = ContainerPart::of(&state, lock.dir())?;
            part.net_stack = Some(stack);
            part.store(&mut state);
        }
        steps::mark("init-created");
        state.status = ContainerStatus::Created;
        self.sd.save(&state)?;
        steps::mark("state-save-created");
        // Recorded: the init may now outlive us (unless it must die with us).
        parent.send(&Msg::Go)?;
        parent.expect(Msg::Ready, "ready")?;
        steps::mark("init-ready");
        if let Some(p) = req.pid_file {
            write_pid_file(p, pid)?;
        }
        Ok((pid, state, parent, console_local))
    }

    /// The cgroup of container `id` whose config names `cgroups_path`.
    /// Without one, the cgroup is named after the ID and, under any root
    /// but the default, the root too ([`default_cgroup_name`]).
    fn cgroup_for(
        &self,
        cgroups_path: Option<&Path>,
        id: &str,
    ) -> Result<CgroupManager, ContainerError> {
        let name = default_cgroup_name(self.sd.root(), id);
        Ok(CgroupManager::new(
            cgroups_path,
            &name,
            self.systemd_cgroup,
            rootless(),
        )?)
    }

    fn record_pid(&self, state: &mut State, pid: i32) -> Result<(), ContainerError> {
        state.pid = pid;
        state.pid_start_time = pid_start_time(pid).unwrap_or(0);
        Ok(self.sd.save(state)?)
    }

    /// Slow path: the intermediate joins/creates namespaces and forks the
    /// init; returns the init's PID (the caller records it, then says go).
    fn drive_intermediate(
        &self,
        first: i32,
        parent: &Channel,
        spec: &Spec,
    ) -> Result<i32, ContainerError> {
        parent.send(&Msg::Go)?;
        let pid = loop {
            match parent.recv()? {
                Msg::MapIds => {
                    write_maps(first, spec)?;
                    parent.send(&Msg::Go)?;
                }
                Msg::Pid(p) => break p,
                Msg::Error(e) => return Err(SyncError::Child(e).into()),
                got => {
                    return Err(SyncError::Unexpected {
                        got,
                        expected: "pid",
                    }
                    .into())
                }
            }
        };
        let _ = waitpid(Pid::from_raw(first), None);
        Ok(pid)
    }

    // ----- start -----

    /// `moat start`: tell a created container's init to run its program.
    pub fn start(&self, id: &str) -> Result<(), ContainerError> {
        let lock = self.sd.lock(id)?;
        let mut st = self.sd.load(id)?;
        let status = live_status(&st, lock.dir());
        steps::mark("state-lock-load");
        if status != ContainerStatus::Created {
            return Err(ContainerError::WrongStatus {
                id: id.into(),
                status: status.as_str(),
                why: "cannot start it (only a created container can be started)",
            });
        }
        let sock = lock.dir().join(START_SOCKET);
        let conn = Channel::connect(SocketPath::new(lock.dir(), START_SOCKET)?.path())
            .map_err(io_err("connect to the container's start socket"))?;
        conn.send(&Msg::Start)?;
        let r = self.await_exec(&conn, &st);
        let _ = std::fs::remove_file(&sock);
        r?;
        st.status = ContainerStatus::Running;
        self.sd.save(&st)?;
        steps::mark("state-save-running");
        run_poststart(&st);
        Ok(())
    }

    /// Waits until the init execs (EOF) or reports an error; forwards a
    /// seccomp notify fd to the spec's listener on the way.
    fn await_exec(&self, conn: &Channel, st: &State) -> Result<(), ContainerError> {
        loop {
            match conn.recv_with_fd() {
                Err(SyncError::Eof) => {
                    steps::mark("seccomp-load-and-exec");
                    return Ok(());
                }
                Ok((Msg::Steps(s), _)) => {
                    steps::mark("start");
                    steps::log_remote(&s);
                }
                Err(e) => return Err(e.into()),
                Ok((Msg::Fd(FdKind::Seccomp), Some(fd))) => self.send_notify_fd(st, &fd)?,
                Ok((Msg::Error(e), _)) => return Err(SyncError::Child(e).into()),
                Ok((got, _)) => {
                    return Err(SyncError::Unexpected {
                        got,
                        expected: "exec",
                    }
                    .into())
                }
            }
        }
    }

    fn send_notify_fd(&self, st: &State, fd: &OwnedFd) -> Result<(), ContainerError> {
        let spec = self.saved_config(&st.id)?;
        let sec = spec.linux().as_ref().and_then(|l| l.seccomp().as_ref());
        let Some(path) = sec.and_then(|s| s.listener_path().as_ref()) else {
            return Err(ContainerError::Invalid(
                "seccomp filter has notify rules but no listenerPath".into(),
            ));
        };
        let meta = sec
            .and_then(|s| s.listener_metadata().clone())
            .unwrap_or_default();
        let oci = oci_state(st, ContainerStatus::Creating);
        use std::os::fd::AsFd;
        seccomp::send_to_listener(path, &meta, &oci, st.pid, fd.as_fd())?;
        Ok(())
    }

    // ----- launch -----

    /// `create` + `start` over the setup channel (no start socket): the
    /// container process stays this process's child; with a terminal and
    /// no console socket, the pty master comes back to the caller.
    fn launch_container(&self, req: &CreateRequest) -> Result<Launched, ContainerError> {
        self.launch_held(req, || Ok(None))
            .map(|(launched, _)| launched)
    }

    /// `launch`, with the start held until `hold` returns: the container
    /// is created (namespaces, cgroup, root, mounts, the seccomp program)
    /// and its process waits; it then starts with the replacement
    /// arguments, environment and working directory `hold` may give
    /// (everything else is the config's). The microvm tier's guest creates
    /// its container this way before its snapshot is saved. An `Err` from
    /// `hold` (its message) deletes the container. With the process comes
    /// its cgroup, for the limit events once the process ended (read
    /// without loading the container's state again).
    pub fn launch_held(
        &self,
        req: &CreateRequest,
        hold: impl FnOnce() -> Result<Option<ProcessOverride>, String>,
    ) -> Result<(Launched, Option<CgroupManager>), ContainerError> {
        let Created {
            pid,
            mut state,
            chan,
            console,
            cgroup,
            _lock,
        } = self.create_container(req, false)?;
        let started = console
            .map(|sock| moat_jail::console::recv_master(sock.as_fd()))
            .transpose()
            .map_err(ContainerError::from)
            .and_then(|master| {
                let start = match hold().map_err(ContainerError::Invalid)? {
                    Some(o) if !o.fits() => {
                        return Err(ContainerError::Invalid(
                            "the process's arguments and environment are too long to hand over"
                                .into(),
                        ))
                    }
                    Some(o) => Msg::StartWith(o),
                    None => Msg::Start,
                };
                chan.send(&start)?;
                self.await_exec(&chan, &state)?;
                Ok(master)
            });
        let terminal = match started {
            Ok(m) => m,
            Err(e) => {
                drop(_lock);
                let _ = self.delete(req.id, true);
                return Err(e);
            }
        };
        state.status = ContainerStatus::Running;
        self.sd.save(&state)?;
        steps::mark("state-save-running");
        run_poststart(&state);
        Ok((Launched { pid, terminal }, cgroup))
    }

    // ----- queries -----

    pub fn load(&self, id: &str) -> Result<(State, ContainerStatus), ContainerError> {
        let st = self.sd.load(id)?;
        let status = live_status(&st, &self.sd.container_dir(id));
        Ok((st, status))
    }

    /// The container's cgroup; `None` for a rootless container without a
    /// delegated one.
    fn cgroup(&self, st: &State) -> Result<Option<CgroupManager>, ContainerError> {
        let part = ContainerPart::of(st, &self.sd.container_dir(&st.id))?;
        if part.cgroup.is_null() {
            return Ok(None);
        }
        Ok(Some(CgroupManager::from_saved(&part.cgroup)?))
    }

    fn cgroup_of(&self, st: &State) -> Result<CgroupManager, ContainerError> {
        self.cgroup(st)?.ok_or_else(|| {
            ContainerError::Invalid(format!(
                "container {} has no cgroup (rootless, without a delegated cgroup)",
                st.id
            ))
        })
    }

    pub fn pids(&self, id: &str) -> Result<Vec<i32>, ContainerError> {
        let (st, _) = self.load(id)?;
        Ok(self.cgroup_of(&st)?.pids()?)
    }

    /// Usage so far; also after the container process exited, until
    /// `delete` removes the cgroup.
    pub fn stats(&self, id: &str) -> Result<Stats, ContainerError> {
        let (st, _) = self.load(id)?;
        Ok(self.cgroup_of(&st)?.stats()?)
    }

    /// OOM kills and refused forks so far; nothing without a cgroup.
    pub fn limit_events(&self, id: &str) -> Result<LimitEvents, ContainerError> {
        let (st, _) = self.load(id)?;
        Ok(self
            .cgroup(&st)?
            .map(|cg| cg.limit_events())
            .unwrap_or_default())
    }

    pub fn update(&self, id: &str, resources: &LinuxResources) -> Result<(), ContainerError> {
        let _lock = self.sd.lock(id)?;
        let (st, status) = self.load(id)?;
        if status == ContainerStatus::Stopped {
            return Err(ContainerError::WrongStatus {
                id: id.into(),
                status: status.as_str(),
                why: "cannot update it",
            });
        }
        self.cgroup_of(&st)?.update(resources)?;
        moat_core::spec::record_update(&self.sd.container_dir(id).join(CONFIG_COPY), resources)
            .map_err(io_err("record the new limits in the saved config.json"))
    }

    // ----- signals, pause -----

    pub fn kill(&self, id: &str, sig: Signal, all: bool) -> Result<(), ContainerError> {
        let _lock = self.sd.lock(id)?;
        let (st, status) = self.load(id)?;
        if status == ContainerStatus::Stopped {
            return Err(ContainerError::WrongStatus {
                id: id.into(),
                status: status.as_str(),
                why: "cannot signal it (container not running)",
            });
        }
        if all {
            let Some(cg) = self.cgroup(&st)? else {
                return self.kill_all_without_cgroup(&st, sig);
            };
            for p in cg.pids()? {
                // A process that exited meanwhile is fine; anything else is not.
                match kill(Pid::from_raw(p), sig) {
                    Ok(()) | Err(nix::Error::ESRCH) => {}
                    Err(e) => return Err(sys_err(format!("send {sig} to pid {p}"))(e)),
                }
            }
            return Ok(());
        }
        kill(Pid::from_raw(st.pid), sig).map_err(sys_err(format!("send {sig} to pid {}", st.pid)))
    }

    /// `kill --all` of a container without a cgroup (rootless, nothing
    /// delegated): SIGKILL to the init of a PID namespace of its own kills
    /// every process in it, which is all a cgroup would list. Anything else
    /// cannot reach every process: refused rather than half done.
    fn kill_all_without_cgroup(&self, st: &State, sig: Signal) -> Result<(), ContainerError> {
        let own_pid_ns = self.saved_config(&st.id).is_ok_and(|spec| {
            spec.linux()
                .as_ref()
                .and_then(|l| l.namespaces().as_ref())
                .is_some_and(|ns| {
                    ns.iter().any(|n| {
                        n.typ() == oci_spec::runtime::LinuxNamespaceType::Pid && n.path().is_none()
                    })
                })
        });
        if sig != Signal::SIGKILL || !own_pid_ns {
            return Err(ContainerError::Invalid(format!(
                "container {} has no cgroup (rootless, without a delegated cgroup): kill --all can only SIGKILL a container with a PID namespace of its own",
                st.id
            )));
        }
        match kill(Pid::from_raw(st.pid), sig) {
            Ok(()) | Err(nix::Error::ESRCH) => Ok(()),
            Err(e) => Err(sys_err(format!("send {sig} to pid {}", st.pid))(e)),
        }
    }

    pub fn pause(&self, id: &str) -> Result<(), ContainerError> {
        let _lock = self.sd.lock(id)?;
        let (mut st, status) = self.load(id)?;
        if status != ContainerStatus::Running && status != ContainerStatus::Created {
            return Err(ContainerError::WrongStatus {
                id: id.into(),
                status: status.as_str(),
                why: "cannot pause it",
            });
        }
        self.cgroup_of(&st)?.freeze()?;
        st.status = ContainerStatus::Paused;
        self.sd.save(&st)?;
        Ok(())
    }

    pub fn resume(&self, id: &str) -> Result<(), ContainerError> {
        let _lock = self.sd.lock(id)?;
        let (mut st, status) = self.load(id)?;
        if status != ContainerStatus::Paused {
            return Err(ContainerError::WrongStatus {
                id: id.into(),
                status: status.as_str(),
                why: "cannot resume it (not paused)",
            });
        }
        self.cgroup_of(&st)?.thaw()?;
        st.status = ContainerStatus::Running;
        self.sd.save(&st)?;
        Ok(())
    }

    // ----- delete -----

    /// Deletes a stopped (or, with `force`, any) container: kills what is
    /// left, removes its cgroup, runs poststop hooks, removes its state.
    pub fn delete(&self, id: &str, force: bool) -> Result<(), ContainerError> {
        let lock = self.sd.lock(id)?;
        let st = match self.sd.load(id) {
            Ok(st) => st,
            // A runtime killed before it saved any state, or a state file
            // that cannot be read (corrupt, a directory…).
            Err(e) if force => {
                let r = self.delete_without_state(id, &e);
                drop(lock);
                return r;
            }
            Err(e) => return Err(e.into()),
        };
        let status = live_status(&st, lock.dir());
        if matches!(status, ContainerStatus::Running | ContainerStatus::Paused) && !force {
            return Err(ContainerError::WrongStatus {
                id: id.into(),
                status: status.as_str(),
                why: "cannot delete it (stop it first or use --force)",
            });
        }
        let cg = self.cgroup(&st).ok().flatten();
        if status == ContainerStatus::Paused {
            if let Some(cg) = &cg {
                cg.thaw()?;
            }
        }
        if status != ContainerStatus::Stopped && st.pid > 0 {
            // With a cgroup, destroy() below kills every member anyway; without
            // one (rootless, nothing delegated) this kill is all there is, so
            // its failure must stop the delete rather than orphan the process.
            match kill(Pid::from_raw(st.pid), Signal::SIGKILL) {
                Ok(()) | Err(nix::Error::ESRCH) => {}
                Err(_) if cg.is_some() => {}
                Err(e) => return Err(sys_err(format!("kill pid {}", st.pid))(e)),
            }
        }
        if let Ok(ContainerPart {
            net_stack: Some(stack),
            ..
        }) = ContainerPart::of(&st, lock.dir())
        {
            stack.kill();
        }
        if let Some(cg) = &cg {
            cg.destroy()?;
        }
        run_poststop(&st);
        self.sd.remove(id)?;
        drop(lock);
        Ok(())
    }

    /// `delete --force` of a container whose state cannot be read (`why`):
    /// its cgroup is found from the saved config's `cgroupsPath`, else from
    /// the ID and root as `create` names it, and everything in it is killed
    /// before the cgroup and the state directory are removed.
    fn delete_without_state(&self, id: &str, why: &StateError) -> Result<(), ContainerError> {
        if !matches!(why, StateError::NotFound(_)) {
            tracing::warn!(
                "{}: removing what the container's ID names",
                moat_core::error_chain(why)
            );
        }
        let config = self.saved_config(id).ok();
        let path = config
            .as_ref()
            .and_then(|c| c.linux().as_ref())
            .and_then(|l| l.cgroups_path().clone());
        // Without a cgroup (rootless, nothing delegated) the container
        // process died with its runtime or when its state was abandoned.
        if let Ok(cg) = self.cgroup_for(path.as_deref(), id) {
            cg.destroy()?;
        }
        Ok(self.sd.remove(id)?)
    }

    /// The config.json saved at create time.
    pub fn saved_config(&self, id: &str) -> Result<Spec, ContainerError> {
        Ok(moat_core::spec::parse_file(
            &self.sd.container_dir(id).join(CONFIG_COPY),
        )?)
    }

    // ----- exec -----

    /// `moat exec`: runs `process` in the running container `id`. Returns the
    /// exit status, or 0 at once with `detach`.
    pub fn exec(
        &self,
        id: &str,
        process: &Process,
        opts: &ExecOptions,
    ) -> Result<i32, ContainerError> {
        let (st, status) = self.load(id)?;
        if !matches!(status, ContainerStatus::Running | ContainerStatus::Created) {
            return Err(ContainerError::WrongStatus {
                id: id.into(),
                status: status.as_str(),
                why: "cannot exec in it",
            });
        }
        let spec = self.saved_config(id)?;
        let cg = self.cgroup(&st)?;
        crate::exec::exec(&st, &spec, process, opts, cg.as_ref())
    }
}

impl From<ContainerError> for RuntimeError {
    fn from(e: ContainerError) -> RuntimeError {
        match e {
            ContainerError::State(e) => RuntimeError::State(e),
            ContainerError::Spec(e) => RuntimeError::Spec(e),
            ContainerError::Invalid(m) => RuntimeError::Invalid(m),
            ContainerError::WrongStatus { id, status, why } => {
                RuntimeError::WrongStatus { id, status, why }
            }
            ContainerError::Sync(SyncError::Child(r)) if r.exec_status.is_some() => {
                RuntimeError::ExecFailed {
                    status: r.exec_status.unwrap_or(127),
                    message: moat_core::error_chain(&r),
                }
            }
            e => RuntimeError::Tier(Box::new(e)),
        }
    }
}

/// The seam: each OCI command, in the container tier.
impl Lifecycle for ContainerTier {
    fn tier(&self) -> Tier {
        Tier::Container
    }

    fn create(&self, req: &CreateRequest) -> Result<(), RuntimeError> {
        self.create_container(req, true)?;
        Ok(())
    }

    fn launch(&self, req: &CreateRequest) -> Result<Launched, RuntimeError> {
        Ok(self.launch_container(req)?)
    }

    fn start(&self, id: &str) -> Result<(), RuntimeError> {
        Ok(ContainerTier::start(self, id)?)
    }

    fn state(&self, id: &str) -> Result<Current, RuntimeError> {
        let (state, status) = self.load(id)?;
        Ok(Current { state, status })
    }

    fn kill(&self, id: &str, signal: i32, all: bool) -> Result<(), RuntimeError> {
        let sig = Signal::try_from(signal)
            .map_err(|_| RuntimeError::Invalid(format!("unknown signal {signal}")))?;
        Ok(ContainerTier::kill(self, id, sig, all)?)
    }

    fn delete(&self, id: &str, force: bool) -> Result<(), RuntimeError> {
        Ok(ContainerTier::delete(self, id, force)?)
    }

    fn exec(&self, id: &str, process: &Process, opts: &ExecOptions) -> Result<i32, RuntimeError> {
        Ok(ContainerTier::exec(self, id, process, opts)?)
    }

    fn ps(&self, id: &str) -> Result<Vec<i32>, RuntimeError> {
        Ok(self.pids(id)?)
    }

    fn pause(&self, id: &str) -> Result<(), RuntimeError> {
        Ok(ContainerTier::pause(self, id)?)
    }

    fn resume(&self, id: &str) -> Result<(), RuntimeError> {
        Ok(ContainerTier::resume(self, id)?)
    }

    fn update(&self, id: &str, resources: &LinuxResources) -> Result<(), RuntimeError> {
        Ok(ContainerTier::update(self, id, resources)?)
    }

    fn stats(&self, id: &str) -> Result<Stats, RuntimeError> {
        Ok(ContainerTier::stats(self, id)?)
    }

    fn events(&self, id: &str) -> Result<LimitEvents, RuntimeError> {
        Ok(self.limit_events(id)?)
    }

    fn config(&self, id: &str) -> Result<Spec, RuntimeError> {
        Ok(self.saved_config(id)?)
    }

    fn features(&self) -> serde_json::Value {
        crate::features::document()
    }
}

/// Undoes a failed create: kill the process, remove the cgroup and state.
struct Cleanup<'a> {
    rt: &'a ContainerTier,
    id: &'a str,
    pid: i32,
    cgroup: Option<CgroupManager>,
    net_stack: Option<crate::network::StackProcess>,
    armed: bool,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if self.pid > 0 {
            let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
            let _ = waitpid(Pid::from_raw(self.pid), None);
        }
        if let Some(stack) = &self.net_stack {
            stack.kill();
        }
        if let Some(cg) = &self.cgroup {
            let _ = cg.destroy();
        }
        let _ = self.rt.sd.remove(self.id);
    }
}

/// Makes this process (and the children it forks, until they exec the
/// workload) non-dumpable: a process in the container cannot open its
/// /proc/PID/exe (the runtime binary, CVE-2019-5736), mem, or fds, nor
/// ptrace it. execve of the workload resets the flag. Called by container-side
/// processes once the runtime has written their ID maps (an unprivileged
/// runtime cannot open a non-dumpable child's /proc files) and before they
/// share a namespace with anything else.
pub(crate) fn protect_runtime_process() -> Result<(), nix::Error> {
    nix::sys::prctl::set_dumpable(false)?;
    match nix::sys::prctl::get_dumpable() {
        Ok(false) => Ok(()),
        _ => Err(nix::Error::EPERM),
    }
}

/// Sets the process's `oomScoreAdj` on the container process `pid` from
/// the runtime, before the process goes on. Lowering it needs
/// CAP_SYS_RESOURCE in the host's user namespace, which a process in a user
/// namespace of its own never has (the kubelet gives every pod's sandbox
/// -998 and a Guaranteed pod's containers -997). Written by a root runtime,
/// the value becomes the process's floor, so its own write of the same
/// value later (with the other process attributes) succeeds. A rootless
/// runtime cannot lower it either: that write reports it.
pub(crate) fn set_oom_score_adj_from_outside(
    process: Option<&oci_spec::runtime::Process>,
    pid: i32,
) -> Result<(), ContainerError> {
    match process.and_then(|p| p.oom_score_adj()) {
        Some(adj) if !rootless() => Ok(moat_jail::attrs::set_oom_score_adj(Some(pid), adj)?),
        _ => Ok(()),
    }
}

/// A container's cgroup name when its config has no `cgroupsPath`: its ID
/// under the default state root (runc's `/<id>`), else `<id>@<hash>`, the
/// hash naming the state root, so that one ID under two roots never shares a
/// cgroup (deleting one would kill the other). `@` is not allowed in an ID,
/// so no container of the default root has such a name.
pub fn default_cgroup_name(root: &Path, id: &str) -> String {
    let root = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_owned());
    if root == Path::new(moat_core::state::DEFAULT_ROOT) {
        return id.to_owned();
    }
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(root.as_os_str().as_encoded_bytes());
    let hex: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
    format!("{id}@{hex}")
}

fn initial_state(id: &str, spec: &Spec, bundle: &Path, rootfs: &Path) -> State {
    let hooks = spec.hooks().as_ref();
    State {
        format: moat_core::state::STATE_FORMAT,
        oci_version: spec.version().clone(),
        id: id.to_owned(),
        status: ContainerStatus::Creating,
        pid: 0,
        pid_start_time: 0,
        bundle: bundle.to_owned(),
        rootfs: rootfs.to_owned(),
        created: moat_core::time::rfc3339_now(),
        owner: String::new(),
        annotations: spec.annotations().clone().unwrap_or_default(),
        tier: Tier::Container,
        tier_state: serde_json::Value::Null,
        poststop_hooks: hooks.and_then(|h| h.poststop().clone()).unwrap_or_default(),
        poststart_hooks: hooks
            .and_then(|h| h.poststart().clone())
            .unwrap_or_default(),
    }
}

/// The spec's resources with the device rules every container needs appended
/// (null, zero, full, random, urandom, tty, console, ptmx, the pty slaves,
/// and mknod of any node), as runc does: a spec that denies all devices
/// still gets a working /dev.
fn with_default_devices(linux: &oci_spec::runtime::Linux) -> LinuxResources {
    use oci_spec::runtime::{LinuxDeviceCgroup, LinuxDeviceType};
    let mut res = linux.resources().clone().unwrap_or_default();
    let mut rules = res.devices().clone().unwrap_or_default();
    let rule = |typ: LinuxDeviceType, major: i64, minor: Option<i64>| {
        let mut r = LinuxDeviceCgroup::default();
        r.set_allow(true)
            .set_typ(Some(typ))
            .set_major(Some(major))
            .set_minor(minor)
            .set_access(Some("rwm".into()));
        r
    };
    for (major, minor) in [
        (1, Some(3)),
        (1, Some(5)),
        (1, Some(7)),
        (1, Some(8)),
        (1, Some(9)),
        (5, Some(0)),
        (5, Some(1)),
        (5, Some(2)),
        (136, None),
    ] {
        rules.push(rule(LinuxDeviceType::C, major, minor));
    }
    // mknod of any node (so linux.devices can be created); opening one
    // still needs an explicit rule in the spec.
    for typ in [LinuxDeviceType::C, LinuxDeviceType::B] {
        let mut r = LinuxDeviceCgroup::default();
        r.set_allow(true)
            .set_typ(Some(typ))
            .set_access(Some("m".into()));
        rules.push(r);
    }
    res.set_devices(Some(rules));
    res
}

/// `spec` with a read-only bind of a resolv.conf (written in the state
/// directory `dir`) that names the user-space stack's DNS.
fn mount_resolv_conf(spec: &Spec, dir: &Path) -> Result<Spec, ContainerError> {
    let path = dir.join("resolv.conf");
    std::fs::write(&path, crate::network::resolv_conf())
        .map_err(io_err("write the container's resolv.conf"))?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .map_err(io_err("write the container's resolv.conf"))?;
    let mut m = oci_spec::runtime::Mount::default();
    m.set_destination(PathBuf::from("/etc/resolv.conf"))
        .set_typ(Some("bind".into()))
        .set_source(Some(path))
        .set_options(Some(vec![
            "rbind".into(),
            "ro".into(),
            "nosuid".into(),
            "nodev".into(),
            "noexec".into(),
        ]));
    let mut spec = spec.clone();
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    mounts.push(m);
    spec.set_mounts(Some(mounts));
    Ok(spec)
}

/// Keeps config.json in the state directory (for `exec`, `state` and the
/// seccomp listener): the bytes given in memory, else the bundle's file.
fn save_config_copy(dir: &Path, config: &Config) -> Result<(), ContainerError> {
    let saved = match &config.source {
        ConfigSource::Memory(bytes) | ConfigSource::Rewritten { bytes, .. } => {
            std::fs::write(dir.join(CONFIG_COPY), bytes)
        }
        ConfigSource::Bundle(bundle) => {
            std::fs::copy(bundle.join("config.json"), dir.join(CONFIG_COPY)).map(drop)
        }
    };
    saved.map_err(io_err("save a copy of config.json"))
}

/// The console socket for the container process, and our end of it when
/// moat itself will hold the terminal (`run` with a terminal and no
/// `--console-socket`).
fn connect_console(
    spec: &Spec,
    console_socket: Option<&Path>,
    listen: bool,
) -> Result<(Option<OwnedFd>, Option<OwnedFd>), ContainerError> {
    let terminal = spec
        .process()
        .as_ref()
        .and_then(|p| p.terminal())
        .unwrap_or(false);
    match (console_socket, terminal) {
        (Some(path), true) => {
            let s = std::os::unix::net::UnixStream::connect(path).map_err(io_err(format!(
                "connect to console socket {}",
                path.display()
            )))?;
            Ok((Some(OwnedFd::from(s)), None))
        }
        (None, true) if !listen => {
            let (ours, theirs) = std::os::unix::net::UnixStream::pair()
                .map_err(io_err("create a console socket pair"))?;
            Ok((Some(OwnedFd::from(theirs)), Some(OwnedFd::from(ours))))
        }
        (None, true) => Err(ContainerError::Invalid(
            "process.terminal is true but no --console-socket was given".into(),
        )),
        (Some(_), false) => Err(ContainerError::Invalid(
            "--console-socket given but process.terminal is false".into(),
        )),
        (None, false) => Ok((None, None)),
    }
}

/// A path to `name` in `dir` that fits in a unix socket address (107 bytes):
/// under a long `--root` (dockerd's exec-root and containerd's state dir
/// with 64-character ids) the plain path does not, so it goes through an
/// fd of the directory, `/proc/self/fd/N/name`.
struct SocketPath {
    _dir: Option<std::fs::File>,
    path: PathBuf,
}

const MAX_SOCKET_PATH: usize = 107;

impl SocketPath {
    fn new(dir: &Path, name: &str) -> Result<SocketPath, ContainerError> {
        let path = dir.join(name);
        if path.as_os_str().len() <= MAX_SOCKET_PATH {
            return Ok(SocketPath { _dir: None, path });
        }
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        let d = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(dir)
            .map_err(io_err(format!("open state directory {}", dir.display())))?;
        let path = PathBuf::from(format!("/proc/self/fd/{}/{name}", d.as_raw_fd()));
        Ok(SocketPath {
            _dir: Some(d),
            path,
        })
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

fn write_maps(pid: i32, spec: &Spec) -> Result<(), ContainerError> {
    let linux = spec.linux().as_ref();
    let uid = linux
        .and_then(|l| l.uid_mappings().as_deref())
        .unwrap_or(&[]);
    let gid = linux
        .and_then(|l| l.gid_mappings().as_deref())
        .unwrap_or(&[]);
    idmap::write_maps(pid, uid, gid)?;
    Ok(())
}

pub fn write_pid_file(path: &Path, pid: i32) -> Result<(), ContainerError> {
    let tmp = path.with_extension("moat-tmp");
    std::fs::write(&tmp, pid.to_string())
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(io_err(format!("write pid file {}", path.display())))
}

/// The status as it is now, not as last saved.
pub fn live_status(st: &State, dir: &Path) -> ContainerStatus {
    let alive = st.pid > 0
        && matches!(proc_stat(st.pid),
            Some((start, state)) if start == st.pid_start_time && state != 'Z' && state != 'X');
    if st.status == ContainerStatus::Creating {
        // A container process recorded during create that is gone died
        // with a runtime killed mid-create.
        return if st.pid > 0 && !alive {
            ContainerStatus::Stopped
        } else {
            ContainerStatus::Creating
        };
    }
    if !alive {
        return ContainerStatus::Stopped;
    }
    if dir.join(START_SOCKET).exists() {
        return ContainerStatus::Created;
    }
    if st.status == ContainerStatus::Paused {
        return ContainerStatus::Paused;
    }
    ContainerStatus::Running
}

pub fn oci_state(st: &State, status: ContainerStatus) -> oci_spec::runtime::State {
    let mut s = oci_spec::runtime::State::default();
    s.set_version(st.oci_version.clone());
    s.set_id(st.id.clone());
    s.set_status(match status {
        ContainerStatus::Creating => oci_spec::runtime::ContainerState::Creating,
        ContainerStatus::Created => oci_spec::runtime::ContainerState::Created,
        ContainerStatus::Running => oci_spec::runtime::ContainerState::Running,
        ContainerStatus::Paused => oci_spec::runtime::ContainerState::Running,
        ContainerStatus::Stopped => oci_spec::runtime::ContainerState::Stopped,
    });
    s.set_pid(if st.pid > 0 { Some(st.pid) } else { None });
    s.set_bundle(st.bundle.clone());
    s.set_annotations(Some(st.annotations.clone()));
    s
}

fn oci_state_json(st: &State, status: ContainerStatus) -> Vec<u8> {
    serde_json::to_vec(&oci_state(st, status)).unwrap_or_default()
}

/// The runtime's hooks of a container being created (`prestart`, then
/// `createRuntime`), in the runtime's namespaces, with its state on their
/// stdin; the first failure is the error. Every tier runs them so.
pub fn run_creation_hooks(
    hooks: Option<&oci_spec::runtime::Hooks>,
    st: &State,
) -> Result<(), HookError> {
    let Some(h) = hooks else {
        return Ok(());
    };
    let json = oci_state_json(st, ContainerStatus::Creating);
    hooks::run("prestart", h.prestart().as_deref().unwrap_or(&[]), &json)?;
    hooks::run(
        "createRuntime",
        h.create_runtime().as_deref().unwrap_or(&[]),
        &json,
    )
}

/// The poststart hooks of a container just started (a failure is a
/// warning, as the runtime-spec says).
pub fn run_poststart(st: &State) {
    if !st.poststart_hooks.is_empty() {
        let json = oci_state_json(st, ContainerStatus::Running);
        hooks::run_warning("poststart", &st.poststart_hooks, &json);
    }
}

/// The poststop hooks of a container being deleted (a failure is a
/// warning).
pub fn run_poststop(st: &State) {
    if !st.poststop_hooks.is_empty() {
        let json = oci_state_json(st, ContainerStatus::Stopped);
        hooks::run_warning("poststop", &st.poststop_hooks, &json);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_names_differ_per_root() {
        assert_eq!(
            default_cgroup_name(Path::new(moat_core::state::DEFAULT_ROOT), "x"),
            "x"
        );
        let a = default_cgroup_name(Path::new("/tmp/moat-a"), "x");
        let b = default_cgroup_name(Path::new("/tmp/moat-b"), "x");
        assert_ne!(a, b);
        assert!(a.starts_with("x@") && a.len() == "x@".len() + 8, "{a}");
        assert!(moat_core::state::validate_id(&a).is_err());
    }

    #[test]
    fn socket_path_fits_under_a_long_state_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let long = tmp.path().join("x".repeat(64)).join("y".repeat(64));
        std::fs::create_dir_all(&long).unwrap();
        let short = SocketPath::new(tmp.path(), START_SOCKET).unwrap();
        assert_eq!(short.path(), tmp.path().join(START_SOCKET));
        let sp = SocketPath::new(&long, START_SOCKET).unwrap();
        assert!(sp.path().as_os_str().len() <= MAX_SOCKET_PATH);
        let listener = sync::listen(sp.path()).unwrap();
        assert!(long.join(START_SOCKET).exists());
        let _conn = Channel::connect(SocketPath::new(&long, START_SOCKET).unwrap().path()).unwrap();
        let _accepted = Channel::accept(&listener).unwrap();
    }
}
