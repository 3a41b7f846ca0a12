//! The `sandbox` tier: the container tier, every layer of it, plus a
//! supervisor outside the container that decides every sensitive syscall of
//! the workload and carries out every path syscall itself, inside the
//! container's root (a filesystem proxy). docs/design.md ("The sandbox
//! tier") describes the processes, SECURITY.md what it adds.
//!
//! How it builds on the container tier: it rewrites the config (its own
//! seccomp profile whose path syscalls are `SCMP_ACT_NOTIFY`, listening on
//! a socket it owns; a Landlock execute list from its policy), starts the
//! supervisor on that socket, and lets [`ContainerTier`] create the
//! container, which hands the notify fd to the listener at exec.
#![forbid(unsafe_code)]

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use moat_container::ContainerTier;
use moat_core::landlock::{LandlockPolicy, LANDLOCK_ANNOTATION};
use moat_core::runtime::{
    Config, CreateRequest, Current, ExecOptions, Launched, Lifecycle, RuntimeError, Unavailable,
};
use moat_core::state::{State, StateDir};
use moat_core::stats::{LimitEvents, Stats};
use moat_core::Tier;
use oci_spec::runtime::{LinuxResources, Process, Spec};
use serde::{Deserialize, Serialize};

pub mod learn;
pub mod policy;
pub mod profile;
pub mod supervisor;

pub use policy::{Policy, PolicyError, POLICY_ANNOTATION};

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("cannot {step}")]
    Io {
        step: String,
        #[source]
        source: std::io::Error,
    },
    #[error("config has no linux section")]
    NoLinux,
    #[error("cannot serialise the sandboxed config")]
    Json(#[from] serde_json::Error),
    #[error("the sandbox {who} (PID {pid}) did not join the container's cgroup")]
    Join {
        who: &'static str,
        pid: i32,
        #[source]
        source: supervisor::JoinError,
    },
}

fn io(step: impl Into<String>) -> impl FnOnce(std::io::Error) -> SandboxError {
    let step = step.into();
    move |source| SandboxError::Io { step, source }
}

impl From<SandboxError> for RuntimeError {
    fn from(e: SandboxError) -> RuntimeError {
        match e {
            SandboxError::Policy(p) => RuntimeError::Invalid(p.to_string()),
            e => RuntimeError::Tier(Box::new(e)),
        }
    }
}

/// Whether this host can run the sandbox tier: seccomp user notification
/// with ADDFD's atomic send and synchronous wake-ups (Linux 6.6), and
/// Landlock.
pub fn check_host() -> Result<(), Unavailable> {
    let unavailable = |reason: String, fix: &str| Unavailable {
        tier: Tier::Sandbox,
        built: true,
        reason,
        fix: Some(fix.into()),
    };
    if !rustix::process::geteuid().is_root() {
        // Refused up front: run rootless, its supervisor's guard could not
        // confine itself (dropping from the bounding set takes
        // CAP_SETPCAP) nor the supervisor open the container's root.
        return Err(unavailable(
            "it needs root for now (its supervisor's jail)".into(),
            "run as root, or use --isolation container or microvm",
        ));
    }
    moat_sys::notify::check_sizes().map_err(|e| {
        unavailable(
            format!("seccomp user notification is missing ({e})"),
            "use a kernel with CONFIG_SECCOMP_FILTER (Linux 6.6 or later)",
        )
    })?;
    // The same facts `moat info` prints.
    let seccomp = moat_jail::host::Seccomp::read();
    if !seccomp.user_notification || !seccomp.addfd {
        return Err(unavailable(
            "seccomp user notification with ADDFD is missing".into(),
            "use Linux 5.9 or later with CONFIG_SECCOMP_FILTER, or --isolation container",
        ));
    }
    if !seccomp.sync_wake_up {
        let release = moat_jail::host::Kernel::read().release;
        return Err(unavailable(
            format!("kernel {release} lacks seccomp's synchronous wake-up (Linux 6.6)"),
            "use Linux 6.6 or later, or --isolation container",
        ));
    }
    match moat_jail::host::landlock_abi() {
        Some(v) if v >= 1 => Ok(()),
        _ => Err(unavailable(
            "Landlock is not enabled".into(),
            "boot with lsm=...,landlock, or use --isolation container",
        )),
    }
}

/// The sandbox tier's part of the state: the container tier's (its
/// cgroup), and the supervisor.
#[derive(Debug, Default, Serialize, Deserialize)]
struct SandboxPart {
    #[serde(default)]
    cgroup: serde_json::Value,
    #[serde(default)]
    supervisor: Option<SupervisorRecord>,
    /// The rest of the container tier's part (its network stack, …), kept
    /// as it is.
    #[serde(flatten)]
    container: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SupervisorRecord {
    pid: i32,
    /// Field 22 of /proc/PID/stat: tells it from a process that reused the PID.
    start_time: u64,
    /// The directory of its listener socket.
    dir: PathBuf,
    /// Its guard (the parent that kills the container when the supervisor
    /// ends), with its start time; absent in states written before it.
    #[serde(default)]
    guard: Option<(i32, u64)>,
}

/// The sandbox tier, bound to a state root.
#[derive(Debug, Clone)]
pub struct SandboxTier {
    inner: ContainerTier,
    /// Learning mode (`moat policy learn`): nothing is refused by the
    /// policy, and the policy the workload needed is written to this file.
    /// Only the CLI sets it: no config or annotation can make the runtime
    /// write a file of its choosing.
    learn: Option<PathBuf>,
}

/// How long `delete` of a learning sandbox waits for its supervisor to
/// write the learned policy.
const LEARN_WRITE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Longest unix socket path.
const MAX_SOCKET_PATH: usize = 107;

impl SandboxTier {
    pub fn new(root: impl Into<PathBuf>, systemd_cgroup: bool) -> SandboxTier {
        SandboxTier {
            inner: ContainerTier::new(root, systemd_cgroup),
            learn: None,
        }
    }

    /// This tier in learning mode: containers it creates run with the
    /// policy not enforced (every path syscall is still brokered, and
    /// execute is allowed everywhere), and when one is deleted the policy
    /// its workload needed is written to `out` (docs/sandbox.md).
    pub fn learning(mut self, out: PathBuf) -> SandboxTier {
        self.learn = Some(out);
        self
    }

    fn sd(&self) -> &StateDir {
        &self.inner.sd
    }

    /// The directory for the listener of container `id`: under the state
    /// root, or under /run (or the temporary directory) when that path
    /// would not fit in a socket address.
    fn socket_dir(&self, id: &str) -> PathBuf {
        let dir = self.sd().root().join(".sandbox").join(id);
        if dir.join("supervisor.sock").as_os_str().len() <= MAX_SOCKET_PATH {
            return dir;
        }
        use sha2::Digest;
        let key = sha2::Sha256::digest(dir.as_os_str().as_encoded_bytes());
        let name: String = key.iter().take(8).map(|b| format!("{b:02x}")).collect();
        let base = if rustix::process::geteuid().is_root() {
            PathBuf::from("/run/moat-sandbox")
        } else {
            std::env::temp_dir().join(format!(
                "moat-sandbox-{}",
                rustix::process::geteuid().as_raw()
            ))
        };
        base.join(name)
    }

    /// Creates the socket directory (root-only) and binds the listener.
    fn listen(&self, id: &str) -> Result<(PathBuf, UnixListener), SandboxError> {
        let dir = self.socket_dir(id);
        if dir.exists() && !self.sd().container_dir(id).exists() {
            // Left by a runtime killed before it recorded the container.
            std::fs::remove_dir_all(&dir).map_err(io(format!("remove stale {}", dir.display())))?;
        }
        if let Some(parent) = dir.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(io(format!("create {}", parent.display())))?;
        }
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(io(format!("create {}", dir.display())))?;
        let sock = dir.join("supervisor.sock");
        let l = UnixListener::bind(&sock).map_err(io(format!("listen on {}", sock.display())))?;
        Ok((dir, l))
    }

    /// The config as the sandbox runs it, and the policy and learning output.
    fn sandboxed(&self, config: &Config, sock: &Path) -> Result<(Config, Policy), SandboxError> {
        let mut spec = config.spec.clone();
        let annotations = spec.annotations().clone().unwrap_or_default();
        let policy = match annotations.get(POLICY_ANNOTATION) {
            Some(v) => Policy::from_annotation(v)?,
            None => Policy::default(),
        };
        let mut linux = spec.linux().clone().ok_or(SandboxError::NoLinux)?;
        linux.set_seccomp(Some(profile::profile(sock)));
        spec.set_linux(Some(linux));
        let mut landlock = LandlockPolicy::from_spec(&spec)
            .map_err(|e| SandboxError::Io {
                step: "read the Landlock annotation".into(),
                source: std::io::Error::other(e.to_string()),
            })?
            .unwrap_or_else(|| LandlockPolicy::derive(&spec));
        landlock.execute = Some(if self.learn.is_some() {
            vec![PathBuf::from("/")]
        } else {
            policy.exec_paths()
        });
        let mut annotations = annotations;
        annotations.insert(LANDLOCK_ANNOTATION.into(), landlock.to_annotation());
        spec.set_annotations(Some(annotations));
        Ok((config.rewritten(spec)?, policy))
    }

    /// Everything `create` and `launch` share: the rewritten config, the
    /// supervisor, then the container tier's create; the supervisor is
    /// recorded in the state.
    fn create_with<T>(
        &self,
        req: &CreateRequest,
        create: impl FnOnce(&CreateRequest) -> Result<T, RuntimeError>,
    ) -> Result<T, RuntimeError> {
        let (dir, listener) = self.listen(req.id)?;
        let undo_dir = |dir: &Path| {
            let _ = std::fs::remove_dir_all(dir);
        };
        let sock = dir.join("supervisor.sock");
        let prepared = self
            .sandboxed(req.config, &sock)
            .and_then(|(config, policy)| {
                let learn = match &self.learn {
                    Some(path) => Some(
                        std::fs::File::create(path)
                            .map(std::os::fd::OwnedFd::from)
                            .map_err(io(format!("create {}", path.display())))?,
                    ),
                    None => None,
                };
                let view = sandbox_view(&config.spec, &policy);
                let opts = supervisor::Options {
                    policy,
                    workload_bounding: bounding_bits(&config.spec),
                    learn,
                    keep_stderr: req.die_with_runtime,
                    view,
                };
                let spawned = supervisor::spawn(listener, opts)
                    .map_err(io("start the sandbox supervisor"))?;
                moat_core::steps::mark("sandbox-supervisor");
                Ok((config, spawned))
            });
        let (config, spawned) = match prepared {
            Ok(p) => p,
            Err(e) => {
                undo_dir(&dir);
                return Err(e.into());
            }
        };
        let inner_req = CreateRequest {
            config: &config,
            ..*req
        };
        let created = create(&inner_req);
        let out = match created {
            Ok(out) => out,
            Err(e) => {
                // The supervisor sees EOF and exits.
                drop(spawned);
                undo_dir(&dir);
                return Err(e);
            }
        };
        let record = SupervisorRecord {
            pid: spawned.pid,
            start_time: moat_jail::procfs::pid_start_time(spawned.pid).unwrap_or(0),
            dir,
            guard: Some((
                spawned.guard,
                moat_jail::procfs::pid_start_time(spawned.guard).unwrap_or(0),
            )),
        };
        let container_pid = self.record(req.id, record, &spawned)?;
        // A supervisor that already ended cannot be told: the workload of a
        // launch ran and exited, or the supervisor failed, and then its
        // guard kills the container process it is told about here.
        let _ = spawned.go(container_pid);
        Ok(out)
    }

    /// Marks the state as the sandbox's, with its supervisor, and puts the
    /// supervisor and its guard in the container's cgroup (their memory and
    /// CPU count against the sandbox's limits; `delete` removes them with
    /// the cgroup).
    fn record(
        &self,
        id: &str,
        sup: SupervisorRecord,
        spawned: &supervisor::Spawned,
    ) -> Result<i32, RuntimeError> {
        let lock = self.sd().lock(id)?;
        let mut st = self.sd().load(id)?;
        let mut part: SandboxPart = st.tier_part(&lock.dir().join(moat_core::state::STATE_FILE))?;
        if !part.cgroup.is_null() {
            join_cgroup(&part.cgroup, &sup, spawned)?;
            moat_core::steps::mark("sandbox-cgroup-join");
        }
        part.supervisor = Some(sup);
        st.tier = Tier::Sandbox;
        st.tier_state = serde_json::to_value(&part).map_err(|e| RuntimeError::Tier(Box::new(e)))?;
        self.sd().save(&st)?;
        Ok(st.pid)
    }

    fn part(&self, st: &State) -> Result<SandboxPart, RuntimeError> {
        Ok(st.tier_part(
            &self
                .sd()
                .container_dir(&st.id)
                .join(moat_core::state::STATE_FILE),
        )?)
    }

    /// The supervisor's and its guard's PIDs, those still running.
    fn supervisor_pids(&self, id: &str) -> Vec<i32> {
        let Some(sup) = self
            .sd()
            .load(id)
            .ok()
            .and_then(|st| self.part(&st).ok())
            .and_then(|p| p.supervisor)
        else {
            return Vec::new();
        };
        sup.processes()
            .into_iter()
            .filter(|(pid, start)| alive(*pid, *start))
            .map(|(pid, _)| pid)
            .collect()
    }
}

impl SandboxTier {
    /// Ends what is left of a learning sandbox's workload, then waits
    /// (bounded) for its supervisor, which writes the learned policy once
    /// no process of the sandbox is left and exits.
    fn let_learning_finish(&self, id: &str, sup: &SupervisorRecord) {
        if let Err(e) = self.kill(id, libc::SIGKILL, true) {
            tracing::debug!("sandbox: ending the learning workload: {e}");
        }
        let deadline = std::time::Instant::now() + LEARN_WRITE_WAIT;
        while alive(sup.pid, sup.start_time) {
            if std::time::Instant::now() >= deadline {
                tracing::warn!("sandbox: the supervisor did not finish writing the learned policy");
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}

impl SupervisorRecord {
    /// (PID, start time) of the supervisor and of its guard.
    fn processes(&self) -> Vec<(i32, u64)> {
        let mut v = vec![(self.pid, self.start_time)];
        v.extend(self.guard);
        v
    }
}

/// Moves the supervisor and its guard into the container's cgroup
/// (`saved`): each moves itself, through files the runtime opens
/// ([`supervisor::Spawned::join_cgroup`]). A process that already ended
/// (the workload of a launch ran and exited before this, and the
/// supervisor with it; its guard ends with the supervisor) has nothing
/// left to limit; one still running that did not join is an error.
fn join_cgroup(
    saved: &serde_json::Value,
    sup: &SupervisorRecord,
    spawned: &supervisor::Spawned,
) -> Result<(), RuntimeError> {
    let tier = |e: moat_jail::cgroup::CgroupError| RuntimeError::Tier(Box::new(e));
    let cg = moat_jail::cgroup::CgroupManager::from_saved(saved).map_err(tier)?;
    let files = cg.join_files().map_err(tier)?;
    let fds: Vec<_> = files.fds().collect();
    let [by_sup, by_guard] = spawned.join_cgroup(&fds, supervisor::JOIN_WAIT);
    let guard = sup.guard.unwrap_or((spawned.guard, 0));
    for ((pid, start), who, res) in [
        ((sup.pid, sup.start_time), "supervisor", by_sup),
        (guard, "guard", by_guard),
    ] {
        if let Err(source) = res {
            if !ends_soon(pid, start) {
                return Err(SandboxError::Join { who, pid, source }.into());
            }
        }
    }
    Ok(())
}

/// How long a process whose channel closed may take to end.
const END_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Whether process `pid` ends within [`END_WAIT`] (it closed its channel
/// on its way out, and is not yet gone).
fn ends_soon(pid: i32, start_time: u64) -> bool {
    let deadline = std::time::Instant::now() + END_WAIT;
    while alive(pid, start_time) {
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    true
}

fn alive(pid: i32, start_time: u64) -> bool {
    moat_jail::procfs::proc_stat(pid)
        .is_some_and(|(start, state)| start == start_time && state != 'Z' && state != 'X')
}

/// What the workload is shown of its machine: the config's hostname,
/// network, CPU and memory limits, and the policy's kernel identity.
fn sandbox_view(spec: &Spec, policy: &Policy) -> supervisor::view::SandboxView {
    use oci_spec::runtime::LinuxNamespaceType;
    use supervisor::view::{cpuset_count, Network, SandboxView};
    let linux = spec.linux().as_ref();
    let netns = linux
        .and_then(|l| l.namespaces().as_ref())
        .and_then(|ns| ns.iter().find(|n| n.typ() == LinuxNamespaceType::Network));
    let annotations = spec.annotations().clone().unwrap_or_default();
    let network = match netns {
        // The host's network, or a namespace an engine prepared.
        None => Network::Given,
        Some(n) if n.path().is_some() => Network::Given,
        Some(_) => {
            if annotations.contains_key(moat_core::net::EGRESS_ANNOTATION)
                || annotations.contains_key(moat_core::net::PUBLISH_ANNOTATION)
            {
                Network::Stack
            } else {
                Network::Loopback
            }
        }
    };
    let res = linux.and_then(|l| l.resources().as_ref());
    let cpu = res.and_then(|r| r.cpu().as_ref());
    let cpus = cpu.and_then(|c| match (c.quota(), c.period()) {
        (Some(q), Some(p)) if q > 0 && p > 0 => Some(q as f64 / p as f64),
        (Some(q), None) if q > 0 => Some(q as f64 / 100_000.0),
        _ => None,
    });
    let cpuset = cpu.and_then(|c| c.cpus().as_deref()).and_then(cpuset_count);
    let memory = res
        .and_then(|r| r.memory().as_ref())
        .and_then(|m| m.limit())
        .filter(|l| *l > 0)
        .map(|l| l as u64);
    SandboxView {
        hostname: spec.hostname().clone().unwrap_or_default(),
        network,
        cpus,
        cpuset,
        memory,
        release: policy.kernel.release.clone(),
        version: policy.kernel.version.clone(),
    }
}

/// The bounding set of the workload process, as bits.
fn bounding_bits(spec: &Spec) -> u64 {
    let caps = spec
        .process()
        .as_ref()
        .and_then(|p| p.capabilities().as_ref())
        .and_then(|c| c.bounding().clone())
        .unwrap_or_default();
    caps.iter()
        .filter_map(|c| moat_jail::caps::parse_cap(&c.to_string()).ok())
        .fold(0u64, |acc, c| acc | (1u64 << c.index()))
}

use std::os::unix::fs::DirBuilderExt;

impl Lifecycle for SandboxTier {
    fn tier(&self) -> Tier {
        Tier::Sandbox
    }

    fn create(&self, req: &CreateRequest) -> Result<(), RuntimeError> {
        self.create_with(req, |r| self.inner.create(r))
    }

    fn launch(&self, req: &CreateRequest) -> Result<Launched, RuntimeError> {
        self.create_with(req, |r| self.inner.launch(r))
    }

    fn start(&self, id: &str) -> Result<(), RuntimeError> {
        Lifecycle::start(&self.inner, id)
    }

    fn state(&self, id: &str) -> Result<Current, RuntimeError> {
        self.inner.state(id)
    }

    fn kill(&self, id: &str, signal: i32, all: bool) -> Result<(), RuntimeError> {
        if !all {
            return Lifecycle::kill(&self.inner, id, signal, false);
        }
        // Every process of the container but the supervisor and its guard,
        // which end with them.
        let sup = self.supervisor_pids(id);
        let current = self.inner.state(id)?;
        if current.status == moat_core::ContainerStatus::Stopped {
            return Lifecycle::kill(&self.inner, id, signal, true);
        }
        let sig = nix::sys::signal::Signal::try_from(signal)
            .map_err(|_| RuntimeError::Invalid(format!("unknown signal {signal}")))?;
        for p in self.ps(id)? {
            if sup.contains(&p) {
                continue;
            }
            match nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), sig) {
                Ok(()) | Err(nix::Error::ESRCH) => {}
                Err(e) => {
                    return Err(RuntimeError::Tier(Box::new(std::io::Error::from(e))));
                }
            }
        }
        Ok(())
    }

    fn delete(&self, id: &str, force: bool) -> Result<(), RuntimeError> {
        let st = self.sd().load(id).ok();
        let sup = st
            .as_ref()
            .and_then(|st| self.part(st).ok())
            .and_then(|p| p.supervisor);
        if let (Some(sup), Some(_)) = (&sup, &self.learn) {
            self.let_learning_finish(id, sup);
        }
        Lifecycle::delete(&self.inner, id, force)?;
        if let Some(sup) = sup {
            for (pid, start) in sup.processes() {
                if alive(pid, start) {
                    // Not in a cgroup (rootless without delegation): by PID.
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            let _ = std::fs::remove_dir_all(&sup.dir);
        } else {
            let _ = std::fs::remove_dir_all(self.socket_dir(id));
        }
        Ok(())
    }

    fn exec(&self, id: &str, process: &Process, opts: &ExecOptions) -> Result<i32, RuntimeError> {
        Lifecycle::exec(&self.inner, id, process, opts)
    }

    fn ps(&self, id: &str) -> Result<Vec<i32>, RuntimeError> {
        let sup = self.supervisor_pids(id);
        Ok(self
            .inner
            .ps(id)?
            .into_iter()
            .filter(|p| !sup.contains(p))
            .collect())
    }

    fn pause(&self, id: &str) -> Result<(), RuntimeError> {
        Lifecycle::pause(&self.inner, id)
    }

    fn resume(&self, id: &str) -> Result<(), RuntimeError> {
        Lifecycle::resume(&self.inner, id)
    }

    fn update(&self, id: &str, resources: &LinuxResources) -> Result<(), RuntimeError> {
        Lifecycle::update(&self.inner, id, resources)
    }

    fn stats(&self, id: &str) -> Result<Stats, RuntimeError> {
        Lifecycle::stats(&self.inner, id)
    }

    fn events(&self, id: &str) -> Result<LimitEvents, RuntimeError> {
        self.inner.events(id)
    }

    fn config(&self, id: &str) -> Result<Spec, RuntimeError> {
        self.inner.config(id)
    }

    fn features(&self) -> serde_json::Value {
        self.inner.features()
    }
}
