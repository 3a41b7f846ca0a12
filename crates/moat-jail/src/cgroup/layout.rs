//! Where the cgroup hierarchies are (from mountinfo), where this process sits
//! in them (from /proc/self/cgroup), and where the container's cgroup goes.
//! Pure parsing and path logic; the managers do the I/O.
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use super::CgroupError;

/// One cgroup or cgroup2 mount from mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CgroupMount {
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// The cgroup the mount shows as its root (field 4 of mountinfo).
    pub root: String,
    /// v1: controllers from the super options (`cpu`, `cpuacct`, `name=systemd`).
    /// Empty for cgroup2.
    pub controllers: Vec<String>,
    pub v2: bool,
}

/// The host's layout, as far as the managers care.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Layout {
    /// Only cgroup2 (or cgroup2 with no v1 controller hierarchies).
    Unified(CgroupMount),
    /// v1 hierarchies, plus the cgroup2 mount of a hybrid host.
    Legacy {
        hierarchies: Vec<CgroupMount>,
        unified: Option<CgroupMount>,
    },
}

/// The cgroup v1 controllers the kernel knows (the one list moat keeps).
pub const V1_CONTROLLERS: &[&str] = &[
    "cpu",
    "cpuacct",
    "cpuset",
    "memory",
    "devices",
    "freezer",
    "blkio",
    "pids",
    "hugetlb",
    "net_cls",
    "net_prio",
    "perf_event",
    "rdma",
    "misc",
];

use crate::mountinfo::unescape;

/// The cgroup and cgroup2 mounts in a mountinfo text, first mount of each
/// v1 hierarchy only (bind mounts of the same hierarchy repeat it).
pub(crate) fn parse_mountinfo(text: &str) -> Vec<CgroupMount> {
    let mut out: Vec<CgroupMount> = Vec::new();
    for line in text.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let pre: Vec<&str> = pre.split(' ').collect();
        let post: Vec<&str> = post.split(' ').collect();
        if pre.len() < 5 || post.len() < 3 {
            continue;
        }
        let (fstype, super_opts) = (post[0], post[2]);
        let v2 = match fstype {
            "cgroup2" => true,
            "cgroup" => false,
            _ => continue,
        };
        let controllers: Vec<String> = if v2 {
            Vec::new()
        } else {
            super_opts
                .split(',')
                .filter(|o| V1_CONTROLLERS.contains(o) || o.starts_with("name="))
                .map(str::to_owned)
                .collect()
        };
        if !v2 && controllers.is_empty() {
            continue;
        }
        let m = CgroupMount {
            mount_point: PathBuf::from(unescape(pre[4])),
            root: unescape(pre[3]),
            controllers,
            v2,
        };
        let dup = out
            .iter()
            .any(|o| o.v2 == m.v2 && (o.v2 || o.controllers == m.controllers));
        if !dup {
            out.push(m);
        }
    }
    out
}

/// Chooses the layout: any v1 controller hierarchy makes it legacy (v1 or
/// hybrid); otherwise the cgroup2 mount, preferring /sys/fs/cgroup.
pub(crate) fn detect(mounts: Vec<CgroupMount>) -> Result<Layout, CgroupError> {
    let (v2, v1): (Vec<_>, Vec<_>) = mounts.into_iter().partition(|m| m.v2);
    let pick_v2 = |v2: Vec<CgroupMount>| {
        let preferred = v2
            .iter()
            .position(|m| m.mount_point == Path::new("/sys/fs/cgroup"));
        let mut v2 = v2;
        match preferred {
            Some(i) => Some(v2.swap_remove(i)),
            None => v2.into_iter().next(),
        }
    };
    let has_real_v1 = v1
        .iter()
        .any(|m| m.controllers.iter().any(|c| !c.starts_with("name=")));
    if has_real_v1 {
        return Ok(Layout::Legacy {
            hierarchies: v1,
            unified: pick_v2(v2),
        });
    }
    pick_v2(v2)
        .map(Layout::Unified)
        .ok_or(CgroupError::NoCgroupMounts)
}

/// Where the cgroup `own` (a path from /proc/self/cgroup) appears under a
/// hierarchy mounted at `mount` whose root is `mount_root`.
pub(crate) fn place_own(mount: &Path, mount_root: &str, own: &str) -> PathBuf {
    let rel = own
        .strip_prefix(mount_root)
        .unwrap_or(own)
        .trim_start_matches('/');
    mount.join(rel)
}

/// /proc/self/cgroup: hierarchy controllers (sorted, comma-joined; "" for
/// cgroup2) to this process's cgroup path.
pub(crate) fn parse_proc_cgroup(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        out.insert(
            controller_key(ctrls.split(',').filter(|c| !c.is_empty())),
            path.to_owned(),
        );
    }
    out
}

/// A hierarchy's key in `parse_proc_cgroup`'s map.
pub(crate) fn controller_key<'a>(ctrls: impl Iterator<Item = &'a str>) -> String {
    let mut v: Vec<&str> = ctrls.collect();
    v.sort_unstable();
    v.join(",")
}

/// The container's cgroup, before it is placed in a hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CgroupPath {
    /// Under each hierarchy's root.
    Absolute(PathBuf),
    /// Under this process's own cgroup in each hierarchy.
    Relative(PathBuf),
}

/// Resolves `cgroupsPath`. None => "/<id>" like runc, except for a
/// rootless runtime: "<id>" under its own cgroup, the only place a user
/// can have been delegated (systemd's `Delegate=`); "/<id>" under the
/// hierarchy root never is. With `systemd`, "slice:prefix:name" becomes the
/// path systemd would give the scope.
pub(crate) fn resolve(
    cgroups_path: Option<&Path>,
    id: &str,
    systemd: bool,
    systemd_running: bool,
    rootless: bool,
) -> Result<CgroupPath, CgroupError> {
    if systemd {
        if !systemd_running {
            return Err(CgroupError::SystemdNotRunning);
        }
        let raw = cgroups_path
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|| format!(":moat:{id}"));
        return Ok(CgroupPath::Absolute(checked(systemd_path(&raw)?)?));
    }
    match cgroups_path {
        None => {
            if id.is_empty() || id.contains('/') {
                return Err(CgroupError::InvalidPath {
                    path: PathBuf::from(id),
                    reason: "container id is not a name",
                });
            }
            if rootless {
                return Ok(CgroupPath::Relative(checked(PathBuf::from(id))?));
            }
            Ok(CgroupPath::Absolute(checked(PathBuf::from("/").join(id))?))
        }
        Some(p) if p.is_absolute() => Ok(CgroupPath::Absolute(checked(p.to_path_buf())?)),
        Some(p) => Ok(CgroupPath::Relative(checked(p.to_path_buf())?)),
    }
}

/// Refuses "..", non-UTF-8, and a path naming the hierarchy root itself
/// (whose processes `destroy` would kill).
fn checked(p: PathBuf) -> Result<PathBuf, CgroupError> {
    let bad = |reason| CgroupError::InvalidPath {
        path: p.clone(),
        reason,
    };
    if p.to_str().is_none() {
        return Err(bad("not UTF-8"));
    }
    let mut normal = 0;
    for c in p.components() {
        match c {
            Component::ParentDir => return Err(bad("contains \"..\"")),
            Component::Normal(_) => normal += 1,
            _ => {}
        }
    }
    if normal == 0 {
        return Err(bad("names the root cgroup"));
    }
    Ok(p)
}

/// "slice:prefix:name" to the scope's cgroupfs path, e.g.
/// "system.slice:docker:abc" => "/system.slice/docker-abc.scope" and
/// "a-b.slice:p:n" => "/a.slice/a-b.slice/p-n.scope".
pub(crate) fn systemd_path(raw: &str) -> Result<PathBuf, CgroupError> {
    let bad = || CgroupError::BadSystemdPath(raw.to_owned());
    let parts: Vec<&str> = raw.split(':').collect();
    let [slice, prefix, name] = parts[..] else {
        return Err(bad());
    };
    if name.is_empty() || [slice, prefix, name].iter().any(|s| s.contains('/')) {
        return Err(bad());
    }
    let slice = if slice.is_empty() {
        "system.slice"
    } else {
        slice
    };
    let mut path = expand_slice(slice).ok_or_else(bad)?;
    if name.ends_with(".slice") {
        path.push(name);
    } else if prefix.is_empty() {
        path.push(format!("{name}.scope"));
    } else {
        path.push(format!("{prefix}-{name}.scope"));
    }
    Ok(path)
}

fn expand_slice(slice: &str) -> Option<PathBuf> {
    let base = slice.strip_suffix(".slice")?;
    let mut path = PathBuf::from("/");
    if base == "-" {
        return Some(path);
    }
    if base.is_empty() || base.starts_with('-') || base.ends_with('-') || base.contains("--") {
        return None;
    }
    let mut acc = String::new();
    for part in base.split('-') {
        if !acc.is_empty() {
            acc.push('-');
        }
        acc.push_str(part);
        path.push(format!("{acc}.slice"));
    }
    Some(path)
}

/// Where the container's cgroup is in one hierarchy mounted at `mount` with
/// root `mount_root`, given this process's own cgroup `own` in it.
pub(crate) fn place(cg: &CgroupPath, mount: &Path, mount_root: &str, own: Option<&str>) -> PathBuf {
    let strip = |p: &Path| {
        p.strip_prefix("/")
            .map(Path::to_path_buf)
            .unwrap_or_else(|_| p.to_path_buf())
    };
    match cg {
        CgroupPath::Absolute(p) => mount.join(strip(p)),
        CgroupPath::Relative(p) => {
            let own = own.unwrap_or("/");
            let own_rel = Path::new(own)
                .strip_prefix(mount_root)
                .unwrap_or(Path::new(own));
            mount.join(strip(own_rel)).join(p)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:5 - cgroup cgroup rw,cpu,cpuacct
33 31 0:30 / /sys/fs/cgroup/net_cls,net_prio rw,relatime - cgroup cgroup rw,net_cls,net_prio
35 31 0:32 /docker/x /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:32 /docker/x /mnt/mem\\040again rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
";

    #[test]
    fn parses_co_mounted_and_hybrid() {
        let m = parse_mountinfo(HYBRID);
        assert_eq!(m.len(), 5, "{m:?}");
        assert_eq!(m[0].controllers, ["cpu", "cpuacct"]);
        assert_eq!(m[1].controllers, ["net_cls", "net_prio"]);
        assert_eq!(m[2].root, "/docker/x");
        assert_eq!(m[3].controllers, ["name=systemd"]);
        assert!(m[4].v2);
        match detect(m).unwrap() {
            Layout::Legacy {
                hierarchies,
                unified,
            } => {
                assert_eq!(hierarchies.len(), 4);
                assert_eq!(
                    unified.unwrap().mount_point,
                    Path::new("/sys/fs/cgroup/unified")
                );
            }
            l => panic!("{l:?}"),
        }
    }

    #[test]
    fn unescapes_mount_points() {
        assert_eq!(unescape("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape("/mnt/a\\04"), "/mnt/a\\04");
    }

    #[test]
    fn detects_unified() {
        let m = parse_mountinfo("30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n");
        assert!(
            matches!(detect(m).unwrap(), Layout::Unified(u) if u.mount_point == Path::new("/sys/fs/cgroup"))
        );
        assert!(matches!(
            detect(Vec::new()),
            Err(CgroupError::NoCgroupMounts)
        ));
    }

    #[test]
    fn proc_cgroup_keys_are_sorted_controller_sets() {
        let m = parse_proc_cgroup("4:memory:/a/b\n2:cpuacct,cpu:/c\n0::/d\n1:name=systemd:/e\n");
        assert_eq!(m["memory"], "/a/b");
        assert_eq!(m["cpu,cpuacct"], "/c");
        assert_eq!(m[""], "/d");
        assert_eq!(m["name=systemd"], "/e");
    }

    #[test]
    fn default_path_is_slash_id() {
        assert_eq!(
            resolve(None, "abc", false, false, false).unwrap(),
            CgroupPath::Absolute("/abc".into())
        );
        assert!(resolve(None, "a/b", false, false, false).is_err());
        // Rootless: under the runtime's own cgroup, where delegation puts it.
        assert_eq!(
            resolve(None, "abc", false, false, true).unwrap(),
            CgroupPath::Relative("abc".into())
        );
        assert_eq!(
            resolve(Some(Path::new("/x")), "abc", false, false, true).unwrap(),
            CgroupPath::Absolute("/x".into())
        );
    }

    #[test]
    fn absolute_and_relative() {
        let a = resolve(Some(Path::new("/x/y")), "id", false, false, false).unwrap();
        assert_eq!(
            place(&a, Path::new("/sys/fs/cgroup/memory"), "/", Some("/own")),
            Path::new("/sys/fs/cgroup/memory/x/y")
        );
        let r = resolve(Some(Path::new("x/y")), "id", false, false, false).unwrap();
        assert_eq!(r, CgroupPath::Relative("x/y".into()));
        assert_eq!(
            place(&r, Path::new("/cg/memory"), "/", Some("/own/c")),
            Path::new("/cg/memory/own/c/x/y")
        );
        // A mount whose root is the process's own cgroup (as inside a container).
        assert_eq!(
            place(&r, Path::new("/cg/memory"), "/own", Some("/own/c")),
            Path::new("/cg/memory/c/x/y")
        );
    }

    #[test]
    fn refuses_dotdot_and_root() {
        for p in ["/a/../b", "../x", "a/..", "/", "/."] {
            assert!(
                matches!(
                    resolve(Some(Path::new(p)), "id", false, false, false),
                    Err(CgroupError::InvalidPath { .. })
                ),
                "{p}"
            );
        }
    }

    #[test]
    fn systemd_paths() {
        assert!(matches!(
            resolve(None, "id", true, false, false),
            Err(CgroupError::SystemdNotRunning)
        ));
        assert_eq!(
            systemd_path("system.slice:docker:abc").unwrap(),
            Path::new("/system.slice/docker-abc.scope")
        );
        assert_eq!(
            systemd_path("a-b.slice:p:n").unwrap(),
            Path::new("/a.slice/a-b.slice/p-n.scope")
        );
        assert_eq!(
            systemd_path(":p:n").unwrap(),
            Path::new("/system.slice/p-n.scope")
        );
        assert_eq!(
            systemd_path("-.slice::n.slice").unwrap(),
            Path::new("/n.slice")
        );
        for bad in [
            "a:b",
            "x:p:n",
            "a.slice:p:",
            "a--b.slice:p:n",
            "a.slice:p:../n",
        ] {
            assert!(systemd_path(bad).is_err(), "{bad}");
        }
    }
}
