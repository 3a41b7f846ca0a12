//! Per-controller (v1) hierarchies, including co-mounted ones such as
//! "cpu,cpuacct", and the v2 hierarchy of a hybrid host (joined too; used for
//! hugetlb limits when that controller only exists there).
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use oci_spec::runtime::LinuxResources;
use serde::{Deserialize, Serialize};

use super::layout::{self, CgroupMount, CgroupPath};
use super::translate::{self, Setting};
use super::{devices, read, stats, write, CgroupError, Stats};

/// The container's cgroup in one v1 hierarchy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hierarchy {
    /// "cpu", "cpuacct"; "name=systemd" for named hierarchies.
    pub controllers: Vec<String>,
    pub mount: PathBuf,
    pub path: PathBuf,
}

/// The v2 side of a hybrid host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unified {
    pub mount: PathBuf,
    pub path: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manager {
    hierarchies: Vec<Hierarchy>,
    unified: Option<Unified>,
    pub(crate) rootless: bool,
}

impl Manager {
    pub(crate) fn place(
        mounts: &[CgroupMount],
        unified: Option<&CgroupMount>,
        cg: &CgroupPath,
        own: &BTreeMap<String, String>,
        rootless: bool,
    ) -> Result<Self, CgroupError> {
        let mut hierarchies = Vec::new();
        for m in mounts {
            let key = layout::controller_key(m.controllers.iter().map(String::as_str));
            let path = layout::place(
                cg,
                &m.mount_point,
                &m.root,
                own.get(&key).map(String::as_str),
            );
            hierarchies.push(Hierarchy {
                controllers: m.controllers.clone(),
                mount: super::utf8(m.mount_point.clone())?,
                path: super::utf8(path)?,
            });
        }
        let unified = match unified {
            Some(u) => Some(Unified {
                mount: super::utf8(u.mount_point.clone())?,
                path: super::utf8(layout::place(
                    cg,
                    &u.mount_point,
                    &u.root,
                    own.get("").map(String::as_str),
                ))?,
            }),
            None => None,
        };
        Ok(Self {
            hierarchies,
            unified,
            rootless,
        })
    }

    /// The container's directory in the hierarchy holding `controller`.
    pub fn dir(&self, controller: &str) -> Option<&Path> {
        self.hierarchies
            .iter()
            .find(|h| h.controllers.iter().any(|c| c == controller))
            .map(|h| h.path.as_path())
    }

    /// Whether the hierarchy of `controller` has `file` (every cgroup of a
    /// hierarchy has the same files as its root).
    pub(crate) fn has_file(&self, controller: &str, file: &str) -> bool {
        self.hierarchies
            .iter()
            .find(|h| h.controllers.iter().any(|c| c == controller))
            .is_some_and(|h| h.mount.join(file).exists())
    }

    /// Whether hugetlb limits go to the hybrid v2 hierarchy.
    fn hugetlb_in_v2(&self) -> Result<bool, CgroupError> {
        if self.dir("hugetlb").is_some() {
            return Ok(false);
        }
        let Some(u) = &self.unified else {
            return Ok(false);
        };
        let ctrls = super::read_opt(&u.mount.join("cgroup.controllers"))?.unwrap_or_default();
        Ok(ctrls.split_whitespace().any(|c| c == "hugetlb"))
    }

    fn plan(
        &self,
        resources: Option<&LinuxResources>,
    ) -> Result<(Vec<Setting>, bool), CgroupError> {
        let hugetlb_v2 = self.hugetlb_in_v2()?;
        let plan = match resources {
            Some(r) => translate::plan_v1(r, hugetlb_v2)?,
            None => Vec::new(),
        };
        let wants_devices = resources.is_some_and(|r| r.devices().is_some()) && !self.rootless;
        let missing = plan
            .iter()
            .map(|s| (s.controller.as_str(), s.file.as_str()))
            .chain(wants_devices.then_some(("devices", "devices.allow")))
            .find(|(c, _)| !(self.dir(c).is_some() || (*c == "hugetlb" && hugetlb_v2)));
        if let Some((controller, file)) = missing {
            return Err(self.missing(controller, file));
        }
        Ok((plan, hugetlb_v2))
    }

    /// `controller` has no hierarchy; the error names where they are mounted.
    fn missing(&self, controller: &str, file: &str) -> CgroupError {
        let base = self
            .hierarchies
            .first()
            .and_then(|h| h.mount.parent())
            .unwrap_or(Path::new("/sys/fs/cgroup"));
        CgroupError::ControllerMissing {
            controller: controller.into(),
            file: file.into(),
            path: base.into(),
        }
    }

    fn needed(plan: &[Setting]) -> BTreeSet<&str> {
        plan.iter().map(|s| s.controller.as_str()).collect()
    }

    pub fn create(&self, resources: Option<&LinuxResources>) -> Result<(), CgroupError> {
        let (plan, hugetlb_v2) = self.plan(resources)?;
        let needed = Self::needed(&plan);
        let mut created = 0;
        let mut denied = None;
        for h in &self.hierarchies {
            let is_needed = h.controllers.iter().any(|c| needed.contains(c.as_str()));
            match self.mkdir(h) {
                Ok(()) => created += 1,
                // Rootless: hierarchies nobody delegated are skipped unless a
                // limit needs them (add_pid skips them too).
                Err(CgroupError::Mkdir { path, source })
                    if self.rootless && !is_needed && super::is_permission(&source) =>
                {
                    denied.get_or_insert((path, source));
                }
                Err(e) => return Err(e),
            }
        }
        let wants_hugetlb = plan.iter().any(|s| s.controller == "hugetlb");
        if let Some(u) = &self.unified {
            // The hybrid v2 tree is joined only when a hugetlb limit needs it:
            // nothing else lives there, and joining a v2 cgroup costs an RCU
            // grace period (the threadgroup lock).
            if hugetlb_v2 && wants_hugetlb {
                let needed: BTreeSet<String> = if hugetlb_v2 {
                    ["hugetlb".to_owned()].into()
                } else {
                    BTreeSet::new()
                };
                super::v2::make_path(&u.mount, &u.path, &needed, false, None)?;
                if hugetlb_v2 {
                    let v2_plan: Vec<Setting> = plan
                        .iter()
                        .filter(|s| s.controller == "hugetlb")
                        .cloned()
                        .collect();
                    super::v2::check_controllers(&u.path, &v2_plan)?;
                }
            }
        }
        if created == 0 {
            if let Some((path, source)) = denied {
                return Err(CgroupError::NoDelegation { path, source });
            }
        }
        self.apply(&plan, hugetlb_v2, resources)
    }

    /// mkdir the container's cgroup in `h`; in cpuset, give each new level
    /// its parent's cpus and mems (an empty cpuset refuses tasks).
    fn mkdir(&self, h: &Hierarchy) -> Result<(), CgroupError> {
        let is_cpuset = h.controllers.iter().any(|c| c == "cpuset");
        if !is_cpuset {
            return std::fs::create_dir_all(&h.path).map_err(|source| CgroupError::Mkdir {
                path: h.path.clone(),
                source,
            });
        }
        let rel = h
            .path
            .strip_prefix(&h.mount)
            .map_err(|_| CgroupError::InvalidPath {
                path: h.path.clone(),
                reason: "is outside the cgroup mount",
            })?;
        let mut parent = h.mount.clone();
        for comp in rel.components() {
            let dir = parent.join(comp);
            match std::fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(source) => return Err(CgroupError::Mkdir { path: dir, source }),
            }
            for file in ["cpuset.cpus", "cpuset.mems"] {
                if read(&dir.join(file))?.trim().is_empty() {
                    let from_parent = read(&parent.join(file))?;
                    write(&dir.join(file), from_parent.trim())?;
                }
            }
            parent = dir;
        }
        Ok(())
    }

    pub fn update(&self, resources: &LinuxResources) -> Result<(), CgroupError> {
        let (plan, hugetlb_v2) = self.plan(Some(resources))?;
        self.apply(&plan, hugetlb_v2, Some(resources))
    }

    fn apply(
        &self,
        plan: &[Setting],
        hugetlb_v2: bool,
        resources: Option<&LinuxResources>,
    ) -> Result<(), CgroupError> {
        let mem_dir = self.dir("memory");
        let current_limit = match mem_dir {
            Some(d) if plan.iter().any(|s| s.file == "memory.memsw.limit_in_bytes") => {
                super::read_opt(&d.join("memory.limit_in_bytes"))?
                    .and_then(|s| s.trim().parse::<u64>().ok())
            }
            _ => None,
        };
        for s in order_memory(plan, current_limit) {
            let dir = match (s.controller.as_str(), &self.unified) {
                ("hugetlb", Some(u)) if hugetlb_v2 => u.path.as_path(),
                (c, _) => self.dir(c).ok_or_else(|| self.missing(c, &s.file))?,
            };
            super::apply_setting(dir, s)?;
        }
        if let Some(rules) = resources.and_then(|r| r.devices().as_ref()) {
            if !self.rootless {
                self.set_devices(&devices::parse_rules(rules)?)?;
            }
        }
        Ok(())
    }

    fn set_devices(&self, rules: &[devices::DevRule]) -> Result<(), CgroupError> {
        let Some(dir) = self.dir("devices") else {
            return Err(self.missing("devices", "devices.allow"));
        };
        write(&dir.join("devices.deny"), "a")?;
        for (allow, line) in devices::v1_lines(rules) {
            write(
                &dir.join(if allow {
                    "devices.allow"
                } else {
                    "devices.deny"
                }),
                &line,
            )?;
        }
        Ok(())
    }

    /// Every directory of the container's cgroup: v1 hierarchies, then the
    /// hybrid v2 one.
    fn all_dirs(&self) -> Vec<&Path> {
        let mut v: Vec<&Path> = self.hierarchies.iter().map(|h| h.path.as_path()).collect();
        if let Some(u) = &self.unified {
            v.push(&u.path);
        }
        v
    }

    /// `tasks` of every hierarchy the container has a cgroup in, and
    /// `cgroup.procs` of the hybrid v2 tree when one was made there.
    pub(crate) fn join_targets(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = self
            .hierarchies
            .iter()
            .filter(|h| !self.rootless || h.path.exists())
            .map(|h| h.path.join("tasks"))
            .collect();
        if let Some(u) = self.unified.as_ref().filter(|u| u.path.exists()) {
            v.push(u.path.join("cgroup.procs"));
        }
        v
    }

    pub fn add_pid(&self, pid: i32) -> Result<(), CgroupError> {
        for dir in self.all_dirs() {
            // Rootless skips what create could not make, and the hybrid v2
            // tree is only made for hugetlb limits; anything that exists
            // (and so may carry limits) must take the pid.
            if (self.rootless || self.unified.as_ref().is_some_and(|u| u.path == dir))
                && !dir.exists()
            {
                continue;
            }
            write(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    fn freezer(&self) -> Result<&Path, CgroupError> {
        self.dir("freezer")
            .ok_or_else(|| self.missing("freezer", "freezer.state"))
    }

    pub fn freeze(&self) -> Result<(), CgroupError> {
        let state = self.freezer()?.join("freezer.state");
        let frozen = super::wait_until(|| {
            // Writing again nudges tasks that were forking when first asked.
            write(&state, "FROZEN")?;
            Ok(read(&state)?.trim() == "FROZEN")
        })?;
        if !frozen {
            write(&state, "THAWED")?;
            return Err(CgroupError::FreezeTimeout { path: state });
        }
        Ok(())
    }

    pub fn thaw(&self) -> Result<(), CgroupError> {
        write(&self.freezer()?.join("freezer.state"), "THAWED")
    }

    pub fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        let dir = ["pids", "freezer", "memory"]
            .iter()
            .find_map(|c| self.dir(c))
            .or_else(|| self.hierarchies.first().map(|h| h.path.as_path()));
        match dir {
            Some(d) => super::procs_recursive(d),
            None => Ok(Vec::new()),
        }
    }

    pub fn stats(&self) -> Result<Stats, CgroupError> {
        let hugetlb = match (self.dir("hugetlb"), &self.unified) {
            (Some(d), _) => Some((d, false)),
            (None, Some(u)) if self.hugetlb_in_v2()? => Some((u.path.as_path(), true)),
            _ => None,
        };
        stats::collect_v1(&stats::V1Dirs {
            cpu: self.dir("cpu"),
            cpuacct: self.dir("cpuacct"),
            memory: self.dir("memory"),
            pids: self.dir("pids"),
            blkio: self.dir("blkio"),
            hugetlb,
        })
    }

    pub fn destroy(&self) -> Result<(), CgroupError> {
        let dirs = self.all_dirs();
        // Frozen v1 tasks do not die until thawed.
        let thaw = || match self.dir("freezer") {
            Some(d) if d.join("freezer.state").exists() => {
                write(&d.join("freezer.state"), "THAWED")
            }
            _ => Ok(()),
        };
        super::kill_all(&dirs, &thaw)?;
        for d in dirs {
            super::remove_tree(d)?;
        }
        Ok(())
    }

    pub fn mount_sources(&self) -> Vec<(String, PathBuf)> {
        self.hierarchies
            .iter()
            .filter_map(|h| Some((h.mount.file_name()?.to_str()?.to_owned(), h.path.clone())))
            .collect()
    }
}

/// memory.limit_in_bytes must stay <= memory.memsw.limit_in_bytes at every
/// step: when the new memory+swap total is above the current memory limit
/// (or unlimited), raise memsw first; otherwise lower the memory limit first.
pub(crate) fn order_memory(plan: &[Setting], current_limit: Option<u64>) -> Vec<&Setting> {
    let mut out: Vec<&Setting> = plan.iter().collect();
    let pos = |f: &str| out.iter().position(|s| s.file == f);
    if let (Some(l), Some(sw)) = (
        pos("memory.limit_in_bytes"),
        pos("memory.memsw.limit_in_bytes"),
    ) {
        let swap: i64 = out[sw].value.parse().unwrap_or(-1);
        let swap_first =
            swap < 0 || current_limit.is_some_and(|c| i64::try_from(c).map_or(true, |c| c < swap));
        if swap_first && sw > l {
            let s = out.remove(sw);
            out.insert(l, s);
        }
    }
    out
}
