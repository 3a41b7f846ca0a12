//! Namespaces: which to create, which to join, and in what order.
use std::fs::File;
use std::os::fd::AsFd;
use std::path::PathBuf;

use nix::sched::{setns, unshare, CloneFlags};
use oci_spec::runtime::{LinuxNamespace, LinuxNamespaceType};

#[derive(Debug, thiserror::Error)]
pub enum NsError {
    #[error("cannot open namespace {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot join {kind} namespace {path}")]
    Join {
        kind: &'static str,
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cannot create {0} namespace(s)")]
    Unshare(String, #[source] nix::Error),
    #[error("cannot set time namespace offsets")]
    TimeOffsets(#[source] std::io::Error),
}

pub fn flag(t: LinuxNamespaceType) -> CloneFlags {
    match t {
        LinuxNamespaceType::User => CloneFlags::CLONE_NEWUSER,
        LinuxNamespaceType::Pid => CloneFlags::CLONE_NEWPID,
        LinuxNamespaceType::Network => CloneFlags::CLONE_NEWNET,
        LinuxNamespaceType::Ipc => CloneFlags::CLONE_NEWIPC,
        LinuxNamespaceType::Uts => CloneFlags::CLONE_NEWUTS,
        LinuxNamespaceType::Mount => CloneFlags::CLONE_NEWNS,
        LinuxNamespaceType::Cgroup => CloneFlags::CLONE_NEWCGROUP,
        LinuxNamespaceType::Time => CloneFlags::from_bits_retain(libc::CLONE_NEWTIME),
    }
}

pub fn name(t: LinuxNamespaceType) -> &'static str {
    match t {
        LinuxNamespaceType::User => "user",
        LinuxNamespaceType::Pid => "pid",
        LinuxNamespaceType::Network => "net",
        LinuxNamespaceType::Ipc => "ipc",
        LinuxNamespaceType::Uts => "uts",
        LinuxNamespaceType::Mount => "mnt",
        LinuxNamespaceType::Cgroup => "cgroup",
        LinuxNamespaceType::Time => "time",
    }
}

/// The namespace plan of a container, from `linux.namespaces`.
#[derive(Debug, Clone)]
pub struct NsPlan {
    /// Namespaces to create.
    pub new: CloneFlags,
    /// Namespaces to join, user first.
    pub join: Vec<(LinuxNamespaceType, PathBuf)>,
}

impl NsPlan {
    pub fn from_spec(namespaces: &[LinuxNamespace]) -> NsPlan {
        let mut plan = NsPlan {
            new: CloneFlags::empty(),
            join: Vec::new(),
        };
        for ns in namespaces {
            match ns.path() {
                Some(p) if !p.as_os_str().is_empty() => plan.join.push((ns.typ(), p.clone())),
                _ => plan.new |= flag(ns.typ()),
            }
        }
        plan.join
            .sort_by_key(|(t, _)| *t != LinuxNamespaceType::User);
        plan
    }

    pub fn new_user(&self) -> bool {
        self.new.contains(CloneFlags::CLONE_NEWUSER)
    }

    pub fn has_user(&self) -> bool {
        self.new_user()
            || self
                .join
                .iter()
                .any(|(t, _)| *t == LinuxNamespaceType::User)
    }

    pub fn new_pid(&self) -> bool {
        self.new.contains(CloneFlags::CLONE_NEWPID)
    }

    pub fn joins_pid(&self) -> bool {
        self.join.iter().any(|(t, _)| *t == LinuxNamespaceType::Pid)
    }

    /// Flags that can be passed to clone() directly: everything new when nothing
    /// is joined, minus cgroup (must follow the cgroup move) and time (offsets
    /// must be written before any process enters).
    pub fn clone_flags(&self) -> Option<CloneFlags> {
        if !self.join.is_empty() {
            return None;
        }
        Some(
            self.new
                - CloneFlags::CLONE_NEWCGROUP
                - CloneFlags::from_bits_retain(libc::CLONE_NEWTIME),
        )
    }
}

/// Opens every namespace to join (before any of them is joined, so paths
/// resolve in the runtime's mount namespace).
pub fn open_joins(plan: &NsPlan) -> Result<Vec<(LinuxNamespaceType, File)>, NsError> {
    plan.join
        .iter()
        .map(|(t, p)| {
            File::open(p)
                .map(|f| (*t, f))
                .map_err(|source| NsError::Open {
                    path: p.clone(),
                    source,
                })
        })
        .collect()
}

/// Joins the opened namespaces of the given kind(s).
pub fn join(
    files: &[(LinuxNamespaceType, File)],
    plan: &NsPlan,
    pick: impl Fn(LinuxNamespaceType) -> bool,
) -> Result<(), NsError> {
    for ((t, f), (_, path)) in files.iter().zip(&plan.join) {
        if pick(*t) {
            setns(f.as_fd(), flag(*t)).map_err(|source| NsError::Join {
                kind: name(*t),
                path: path.clone(),
                source,
            })?;
        }
    }
    Ok(())
}

pub fn unshare_flags(flags: CloneFlags) -> Result<(), NsError> {
    if flags.is_empty() {
        return Ok(());
    }
    unshare(flags).map_err(|e| NsError::Unshare(format!("{flags:?}"), e))
}

/// Creates a time namespace with the given offsets and moves this process into it.
pub fn enter_new_time_ns(offsets: &[(String, i64, u32)]) -> Result<(), NsError> {
    unshare_flags(CloneFlags::from_bits_retain(libc::CLONE_NEWTIME))?;
    if !offsets.is_empty() {
        let mut text = String::new();
        for (clock, secs, nanos) in offsets {
            text.push_str(&format!("{clock} {secs} {nanos}\n"));
        }
        std::fs::write("/proc/self/timens_offsets", text).map_err(NsError::TimeOffsets)?;
    }
    let f = File::open("/proc/self/ns/time_for_children").map_err(|source| NsError::Open {
        path: "/proc/self/ns/time_for_children".into(),
        source,
    })?;
    setns(f.as_fd(), CloneFlags::from_bits_retain(libc::CLONE_NEWTIME)).map_err(|source| {
        NsError::Join {
            kind: "time",
            path: "/proc/self/ns/time_for_children".into(),
            source,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::LinuxNamespaceBuilder;

    #[test]
    fn plan_splits_new_and_joined_user_first() {
        let nss = vec![
            LinuxNamespaceBuilder::default()
                .typ(LinuxNamespaceType::Network)
                .path("/proc/1/ns/net")
                .build()
                .unwrap(),
            LinuxNamespaceBuilder::default()
                .typ(LinuxNamespaceType::Pid)
                .build()
                .unwrap(),
            LinuxNamespaceBuilder::default()
                .typ(LinuxNamespaceType::User)
                .path("/proc/1/ns/user")
                .build()
                .unwrap(),
        ];
        let plan = NsPlan::from_spec(&nss);
        assert_eq!(plan.new, CloneFlags::CLONE_NEWPID);
        assert_eq!(plan.join[0].0, LinuxNamespaceType::User);
        assert!(plan.clone_flags().is_none());
        assert!(plan.has_user() && !plan.new_user());
    }

    #[test]
    fn clone_flags_leave_cgroup_and_time_for_later() {
        let nss: Vec<_> = [
            LinuxNamespaceType::User,
            LinuxNamespaceType::Cgroup,
            LinuxNamespaceType::Time,
            LinuxNamespaceType::Mount,
        ]
        .into_iter()
        .map(|t| LinuxNamespaceBuilder::default().typ(t).build().unwrap())
        .collect();
        let plan = NsPlan::from_spec(&nss);
        assert_eq!(
            plan.clone_flags().unwrap(),
            CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS
        );
    }
}
