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
}

impl Manager {
    pub(crate) fn place(
        m: &CgroupMount,
        cg: &CgroupPath,
        own: &BTreeMap<String, String>,
        rootless: bool,
    ) -> Result<Self, CgroupError> {
        let path = layout::place(cg, &m.mount_point, &m.root, own.get("").map(String::as_str));
        Ok(Self {
            mount: super::utf8(m.mount_point.clone())?,
            path: super::utf8(path)?,
            rootless,
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
        if let Err(e) = make_path(&self.mount, &self.path, &needed, true) {
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
        self.apply(&translate::plan_v2(resources)?, Some(resources))
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
pub(crate) fn make_path(
    mount: &Path,
    path: &Path,
    needed: &BTreeSet<String>,
    enable_all: bool,
) -> Result<(), CgroupError> {
    let rel = path
        .strip_prefix(mount)
        .map_err(|_| CgroupError::InvalidPath {
            path: path.into(),
            reason: "is outside the cgroup mount",
        })?;
    let mut parent = mount.to_path_buf();
    for comp in rel.components() {
        enable_in(&parent, needed, enable_all)?;
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

fn enable_in(dir: &Path, needed: &BTreeSet<String>, enable_all: bool) -> Result<(), CgroupError> {
    let available = controllers(dir)?;
    let file = dir.join("cgroup.subtree_control");
    let enabled: BTreeSet<String> = read_opt(&file)?
        .map(|t| t.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    for c in &available {
        let want = needed.contains(c);
        if enabled.contains(c) || !(want || enable_all) {
            continue;
        }
        // One controller per write, so one refusal does not block the rest.
        match write(&file, &format!("+{c}")) {
            Ok(()) => {}
            Err(e) if want => return Err(e),
            Err(_) => {} // not requested: the container just lacks it
        }
    }
    Ok(())
}
