//! The unified (v2) hierarchy: one directory, controllers enabled top-down
//! through `cgroup.subtree_control`, devices through an eBPF program.
use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use moat_sys::bpf;
use oci_spec::runtime::LinuxResources;
use serde::{Deserialize, Serialize};

use super::layout::{self, CgroupMount, CgroupPath};
use super::translate::{self, Setting};
use super::{devices, read, read_opt, stats, write, CgroupError, Stats};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manager {
    /// Where the cgroup2 filesystem is mounted.
    mount: PathBuf,
    /// The container's cgroup directory.
    path: PathBuf,
    pub(crate) rootless: bool,
    /// The runtime's own cgroup when it was placed (a rootless container's
    /// parent, see [`make_path`]); absent from states saved before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    own: Option<PathBuf>,
}

/// The leaf a rootless runtime moves itself into, out of its own cgroup,
/// so that cgroup can enable controllers for its containers' cgroups.
/// Container IDs never start with a dot, so it is never a container's.
pub const RUNTIME_LEAF: &str = ".moat";

impl Manager {
    pub(crate) fn place(
        m: &CgroupMount,
        cg: &CgroupPath,
        own: &BTreeMap<String, String>,
        rootless: bool,
    ) -> Result<Self, CgroupError> {
        let own = own.get("").map(String::as_str);
        let path = layout::place(cg, &m.mount_point, &m.root, own);
        Ok(Self {
            mount: super::utf8(m.mount_point.clone())?,
            path: super::utf8(path)?,
            rootless,
            own: own
                .map(|o| super::utf8(layout::place_own(&m.mount_point, &m.root, o)))
                .transpose()?,
        })
    }

    /// The container's cgroup directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn create(&self, resources: Option<&LinuxResources>) -> Result<(), CgroupError> {
        let plan = match resources {
            Some(r) => translate::plan_v2(r)?,
            None => Vec::new(),
        };
        let needed = needed_controllers(&plan);
        // A rootless runtime may leave its own cgroup for a leaf to enable
        // controllers there (the only place it was delegated).
        let own = self.own.as_deref().filter(|_| self.rootless);
        if let Err(e) = make_path(&self.mount, &self.path, &needed, true, own) {
            return Err(match e {
                CgroupError::Mkdir { path, source }
                    if self.rootless && plan.is_empty() && super::is_permission(&source) =>
                {
                    CgroupError::NoDelegation { path, source }
                }
                e => e,
            });
        }
        self.apply(&plan, resources)
    }

    pub fn update(&self, resources: &LinuxResources) -> Result<(), CgroupError> {
        let resources = self.with_current_memory_limit(resources)?;
        self.apply(&translate::plan_v2(&resources)?, Some(&resources))
    }

    /// OCI's `memory.swap` is memory+swap; v2 takes the swap alone. Given
    /// without a memory limit (`update --memory-swap`), it counts from the
    /// current `memory.max`, as on v1 where the kernel keeps the total.
    fn with_current_memory_limit(
        &self,
        resources: &LinuxResources,
    ) -> Result<LinuxResources, CgroupError> {
        let mut r = resources.clone();
        let Some(mut m) = *r.memory() else {
            return Ok(r);
        };
        if m.swap().is_some_and(|s| s > 0) && m.limit().is_none_or(|l| l == 0) {
            let current =
                read_opt(&self.path.join("memory.max"))?.and_then(|t| t.trim().parse::<i64>().ok());
            if let Some(limit) = current {
                m.set_limit(Some(limit));
                r.set_memory(Some(m));
            }
        }
        Ok(r)
    }

    fn apply(
        &self,
        plan: &[Setting],
        resources: Option<&LinuxResources>,
    ) -> Result<(), CgroupError> {
        check_controllers(&self.path, plan)?;
        for s in plan {
            super::apply_setting(&self.path, s)?;
        }
        if let Some(rules) = resources.and_then(|r| r.devices().as_ref()) {
            if !self.rootless {
                self.set_devices(&devices::parse_rules(rules)?)?;
            }
        }
        Ok(())
    }

    /// Attaches the filter for `rules`, then detaches the programs that were
    /// there before, so the cgroup is never without a filter.
    fn set_devices(&self, rules: &[devices::DevRule]) -> Result<(), CgroupError> {
        let prog = bpf::prog_load_cgroup_device(&devices::bpf_program(rules))
            .map_err(CgroupError::BpfLoad)?;
        let attach_err = |source| CgroupError::BpfAttach {
            path: self.path.clone(),
            source,
        };
        let dir = rustix::fs::open(
            &self.path,
            rustix::fs::OFlags::DIRECTORY
                | rustix::fs::OFlags::RDONLY
                | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(|e| CgroupError::Open {
            path: self.path.clone(),
            source: e.into(),
        })?;
        let old = bpf::prog_query(dir.as_fd(), bpf::BPF_CGROUP_DEVICE).map_err(attach_err)?;
        bpf::prog_attach(
            dir.as_fd(),
            prog.as_fd(),
            bpf::BPF_CGROUP_DEVICE,
            bpf::BPF_F_ALLOW_MULTI,
        )
        .map_err(attach_err)?;
        for id in old {
            let old_prog = match bpf::prog_get_fd_by_id(id) {
                Ok(fd) => fd,
                // Detached by someone else in the meantime.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                Err(e) => return Err(attach_err(e)),
            };
            bpf::prog_detach(dir.as_fd(), old_prog.as_fd(), bpf::BPF_CGROUP_DEVICE)
                .map_err(attach_err)?;
        }
        Ok(())
    }

    pub(crate) fn join_targets(&self) -> Vec<PathBuf> {
        vec![self.path.join("cgroup.procs")]
    }

    pub fn add_pid(&self, pid: i32) -> Result<(), CgroupError> {
        write(&self.path.join("cgroup.procs"), &pid.to_string())
    }

    pub fn freeze(&self) -> Result<(), CgroupError> {
        self.set_frozen(true)
    }

    pub fn thaw(&self) -> Result<(), CgroupError> {
        self.set_frozen(false)
    }

    fn set_frozen(&self, frozen: bool) -> Result<(), CgroupError> {
        write(
            &self.path.join("cgroup.freeze"),
            if frozen { "1" } else { "0" },
        )?;
        let want = if frozen { 1 } else { 0 };
        let events = self.path.join("cgroup.events");
        let reached = super::wait_until(|| {
            Ok(stats::flat_keyed(&read(&events)?).get("frozen").copied() == Some(want))
        })?;
        if !reached {
            return Err(CgroupError::FreezeTimeout {
                path: self.path.clone(),
            });
        }
        Ok(())
    }

    pub fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        super::procs_recursive(&self.path)
    }

    pub fn stats(&self) -> Result<Stats, CgroupError> {
        stats::collect_v2(&self.path)
    }

    pub fn destroy(&self) -> Result<(), CgroupError> {
        let kill = self.path.join("cgroup.kill");
        if kill.exists() {
            // Kills the whole subtree, frozen tasks included; the loop below
            // still checks that everything left.
            write(&kill, "1")?;
        }
        super::kill_all(&[&self.path], &|| Ok(()))?;
        super::remove_tree(&self.path)
    }

    pub fn mount_sources(&self) -> Vec<(String, PathBuf)> {
        vec![(String::new(), self.path.clone())]
    }
}

pub(crate) fn needed_controllers(plan: &[Setting]) -> BTreeSet<String> {
    plan.iter()
        .filter(|s| !s.controller.is_empty())
        .map(|s| s.controller.clone())
        .collect()
}

fn controllers(dir: &Path) -> Result<BTreeSet<String>, CgroupError> {
    Ok(read_opt(&dir.join("cgroup.controllers"))?
        .map(|t| t.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default())
}

/// Every planned setting's controller must be enabled in `dir`.
pub(crate) fn check_controllers(dir: &Path, plan: &[Setting]) -> Result<(), CgroupError> {
    let have = controllers(dir)?;
    match plan
        .iter()
        .find(|s| !s.controller.is_empty() && !have.contains(&s.controller))
    {
        Some(s) => Err(CgroupError::ControllerMissing {
            controller: s.controller.clone(),
            file: s.file.clone(),
            path: dir.into(),
        }),
        None => Ok(()),
    }
}

/// Creates `path` below `mount` one level at a time, first enabling
/// controllers in each parent's `cgroup.subtree_control`: all it offers when
/// `enable_all` (failures tolerated), and `needed` ones (failures fatal).
///
/// cgroup v2 enables domain controllers (memory, io) only in a cgroup
/// without processes, the root excepted; threaded ones (cpu, pids) it
/// enables anyway, but that makes the cgroup a thread root whose domain
/// children refuse every process. So nothing is enabled in a non-root
/// cgroup that has processes: a needed controller is then an error, others
/// are done without. The exception is `runtime_cgroup`, this process's own:
/// when a controller is needed there, the process first moves itself into
/// its leaf [`RUNTIME_LEAF`] (as nsjail does), since a runtime started
/// alone in its delegated cgroup (`systemd-run --user --scope -p
/// Delegate=yes`) is what blocks it.
pub(crate) fn make_path(
    mount: &Path,
    path: &Path,
    needed: &BTreeSet<String>,
    enable_all: bool,
    runtime_cgroup: Option<&Path>,
) -> Result<(), CgroupError> {
    let rel = path
        .strip_prefix(mount)
        .map_err(|_| CgroupError::InvalidPath {
            path: path.into(),
            reason: "is outside the cgroup mount",
        })?;
    let mut parent = mount.to_path_buf();
    for comp in rel.components() {
        let is_runtime_cgroup = runtime_cgroup == Some(parent.as_path());
        enable_in(&parent, needed, enable_all, is_runtime_cgroup)?;
        let dir = parent.join(comp);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(source) => return Err(CgroupError::Mkdir { path: dir, source }),
        }
        parent = dir;
    }
    Ok(())
}

/// Whether `dir` is a non-root cgroup with processes of its own (the root
/// cgroup has no `cgroup.type`; a cgroup namespace's root does).
fn has_processes(dir: &Path) -> Result<bool, CgroupError> {
    if !dir.join("cgroup.type").exists() {
        return Ok(false);
    }
    Ok(read_opt(&dir.join("cgroup.procs"))?.is_some_and(|t| !t.trim().is_empty()))
}

/// Moves this process (all its threads) into `dir`'s [`RUNTIME_LEAF`].
fn leave_for_leaf(dir: &Path) -> Result<(), CgroupError> {
    let leaf = dir.join(RUNTIME_LEAF);
    match std::fs::create_dir(&leaf) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(source) => return Err(CgroupError::Mkdir { path: leaf, source }),
    }
    tracing::debug!("moving moat into {} to enable controllers", leaf.display());
    write(&leaf.join("cgroup.procs"), "0")
}

fn enable_in(
    dir: &Path,
    needed: &BTreeSet<String>,
    enable_all: bool,
    is_runtime_cgroup: bool,
) -> Result<(), CgroupError> {
    let available = controllers(dir)?;
    let file = dir.join("cgroup.subtree_control");
    let enabled: BTreeSet<String> = read_opt(&file)?
        .map(|t| t.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    let todo: Vec<&String> = available
        .iter()
        .filter(|c| !enabled.contains(*c) && (enable_all || needed.contains(*c)))
        .collect();
    if !todo.is_empty() && has_processes(dir)? {
        let Some(c) = todo.iter().find(|c| needed.contains(**c)) else {
            // Only optional ones: the container does without them.
            return Ok(());
        };
        if is_runtime_cgroup {
            leave_for_leaf(dir)?;
        }
        if has_processes(dir)? {
            return Err(CgroupError::Populated {
                path: dir.into(),
                controller: (*c).clone(),
            });
        }
    }
    for c in todo {
        // One controller per write, so one refusal does not block the rest.
        match write(&file, &format!("+{c}")) {
            Ok(()) => {}
            Err(e) if needed.contains(c) => return Err(e),
            Err(_) => {} // not requested: the container just lacks it
        }
    }
    Ok(())
}
