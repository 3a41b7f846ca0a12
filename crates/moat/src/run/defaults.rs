//! The hardened defaults of `moat run` (and `moat spec --hardened`), as a
//! config.json document: every setting here holds with no flags.
use moat_core::landlock::LANDLOCK_ANNOTATION;
use serde_json::{json, Value};

use super::seccomp_profile;
use crate::specgen::{MASKED_PATHS, READONLY_PATHS};

pub const DEFAULT_MEMORY: i64 = 1 << 30;
pub const DEFAULT_CPUS: f64 = 1.0;
pub const DEFAULT_PIDS: i64 = 1024;
pub const BLKIO_WEIGHT: u16 = 500;
pub const CPU_PERIOD: u64 = 100_000;
pub const NOFILE: u64 = 1024;
pub const NPROC: u64 = 1024;
pub const STACK: u64 = 8 << 20;
pub const TMPFS_SIZE: &str = "size=64m";
/// The user the workload runs as: `nobody`.
pub const DEFAULT_USER: (u32, u32) = (65534, 65534);
pub const HOME: &str = "/home/user";
pub const PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// IDs mapped into each container's user namespace.
pub const MAP_SIZE: u32 = 65536;

/// What the flags may change; [`Settings::default`] is the no-flag case.
#[derive(Debug, Clone)]
pub struct Settings {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub hostname: String,
    pub read_write: bool,
    pub net_host: bool,
    /// `--net ns:PATH`: join that network namespace (the microvm tier
    /// hands its interface to the guest).
    pub net_ns: Option<std::path::PathBuf>,
    /// `--net egress=RULES`: the user-space stack with these egress rules
    /// (empty: none allowed).
    pub egress: Option<String>,
    /// `-p` specs, published through the user-space stack.
    pub publish: Vec<String>,
    pub memory: i64,
    pub cpus: f64,
    pub pids: i64,
    pub cap_add: Vec<String>,
    /// First host ID of the container's range (maps container ID 0).
    pub host_id: u32,
    /// Host hard limits (NOFILE, NPROC) the rlimits must stay within.
    pub hard_nofile: u64,
    pub hard_nproc: u64,
    /// Whether the blkio controller offers a weight here.
    pub blkio_weight: bool,
    /// Give the process a terminal (moat proxies it to its own stdio).
    pub tty: bool,
    /// Rootless: the ID maps to use instead of `host_id`'s block.
    pub id_maps: Option<(Value, Value)>,
    /// Rootless without a delegated cgroup: no cgroup limits (rlimits stay).
    pub no_cgroup_limits: bool,
    /// `--annotation`s, added to the config's.
    pub annotations: Vec<(String, String)>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            args: vec!["sh".into()],
            env: Vec::new(),
            cwd: HOME.into(),
            uid: DEFAULT_USER.0,
            gid: DEFAULT_USER.1,
            hostname: "moat".into(),
            read_write: false,
            net_host: false,
            net_ns: None,
            egress: None,
            publish: Vec::new(),
            memory: DEFAULT_MEMORY,
            cpus: DEFAULT_CPUS,
            pids: DEFAULT_PIDS,
            cap_add: Vec::new(),
            host_id: moat_jail::idalloc::DEFAULT_POOL.base,
            hard_nofile: u64::MAX,
            hard_nproc: u64::MAX,
            blkio_weight: false,
            tty: false,
            id_maps: None,
            no_cgroup_limits: false,
            annotations: Vec::new(),
        }
    }
}

/// The host's hard limit for `res` (unlimited when unknown).
pub fn host_hard_limit(res: rustix::process::Resource) -> u64 {
    rustix::process::getrlimit(res).maximum.unwrap_or(u64::MAX)
}

/// Whether this host's blkio cgroup takes a weight (v1 CFQ/BFQ, or v2
/// io.weight). On cgroup v2 the root cgroup has no `io.weight` (its
/// children do, when iocost is built in): the root's iocost file
/// `io.cost.qos` says so there; a mount that is not the root (a cgroup
/// namespace) shows `io.weight` itself.
pub fn blkio_weight_supported() -> bool {
    [
        "/sys/fs/cgroup/blkio/blkio.weight",
        "/sys/fs/cgroup/blkio/blkio.bfq.weight",
        "/sys/fs/cgroup/io.weight",
        "/sys/fs/cgroup/io.cost.qos",
    ]
    .iter()
    .any(|p| std::path::Path::new(p).exists())
}

/// The environment: PATH, HOME, then `-e` entries (later ones win).
pub fn environment(extra: &[String]) -> Vec<String> {
    let mut env = vec![PATH.to_string(), format!("HOME={HOME}")];
    for e in extra {
        let key = e.split('=').next().unwrap_or("");
        env.retain(|x| x.split('=').next() != Some(key));
        env.push(e.clone());
    }
    env
}

fn caps(s: &Settings) -> Value {
    let add: Vec<String> = s
        .cap_add
        .iter()
        .map(|c| {
            let up = c.to_ascii_uppercase();
            if up.starts_with("CAP_") {
                up
            } else {
                format!("CAP_{up}")
            }
        })
        .collect();
    // Added capabilities go in every set, ambient included, so that they
    // survive the exec of a non-root user's program.
    json!({"bounding": add, "effective": add, "permitted": add, "inheritable": add, "ambient": add})
}

fn rlimits(s: &Settings) -> Value {
    let r = |t: &str, v: u64| json!({"type": t, "soft": v, "hard": v});
    json!([
        r("RLIMIT_NOFILE", NOFILE.min(s.hard_nofile)),
        r("RLIMIT_NPROC", NPROC.min(s.hard_nproc)),
        r("RLIMIT_STACK", STACK),
        r("RLIMIT_CORE", 0),
    ])
}

/// cgroup limits: memory without extra swap, CPU quota, pids, blkio weight.
pub fn resources(s: &Settings) -> Value {
    let quota = (s.cpus * CPU_PERIOD as f64).round() as i64;
    let mut r = json!({
        "devices": [{"allow": false, "access": "rwm"}],
        "memory": {"limit": s.memory, "swap": s.memory},
        "cpu": {"period": CPU_PERIOD, "quota": quota},
        "pids": {"limit": s.pids},
    });
    if s.blkio_weight {
        r["blockIO"] = json!({"weight": BLKIO_WEIGHT});
    }
    r
}

/// Mounts every container gets: /proc, a minimal /dev, /sys and its own
/// cgroups read-only, and
/// size-limited tmpfs on /tmp and $HOME.
pub fn base_mounts(s: &Settings) -> Vec<Value> {
    let sys = if s.net_host || s.net_ns.is_some() {
        // sysfs can only be mounted by the owner of the network namespace.
        json!({"destination": "/sys", "type": "bind", "source": "/sys", "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]})
    } else {
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]})
    };
    vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", TMPFS_SIZE]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
        sys,
        // The container's own cgroups, read-only, so it can see its limits.
        json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}),
        json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777", TMPFS_SIZE]}),
        json!({"destination": HOME, "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=700", TMPFS_SIZE, format!("uid={}", s.uid), format!("gid={}", s.gid)]}),
    ]
}

/// The whole config.json: `extra_mounts` (host binds, volumes) follow the base mounts.
pub fn spec(s: &Settings, extra_mounts: Vec<Value>) -> Value {
    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "mount"}),
        json!({"type": "cgroup"}),
        json!({"type": "user"}),
    ];
    match &s.net_ns {
        Some(path) => namespaces.push(json!({"type": "network", "path": path})),
        None if !s.net_host => namespaces.push(json!({"type": "network"})),
        None => {}
    }
    let mut mounts = base_mounts(s);
    mounts.extend(extra_mounts);
    let map = json!([{"containerID": 0, "hostID": s.host_id, "size": MAP_SIZE}]);
    let (uid_map, gid_map) = s.id_maps.clone().unwrap_or((map.clone(), map));
    let resources = if s.no_cgroup_limits {
        json!({})
    } else {
        resources(s)
    };
    json!({
        "ociVersion": "1.2.0",
        "process": {
            "terminal": s.tty,
            "user": {"uid": s.uid, "gid": s.gid},
            "args": s.args,
            "env": environment(&s.env),
            "cwd": s.cwd,
            "capabilities": caps(s),
            "rlimits": rlimits(s),
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": !s.read_write},
        // Landlock rules derived from the root and mounts: read/exec on `/`,
        // write only on writable mounts (moat_core::landlock).
        "annotations": {LANDLOCK_ANNOTATION: "auto"},
        "hostname": s.hostname,
        "mounts": mounts,
        "linux": {
            "uidMappings": uid_map,
            "gidMappings": gid_map,
            "namespaces": namespaces,
            "resources": resources,
            "maskedPaths": masked_paths(),
            "readonlyPaths": READONLY_PATHS,
            "seccomp": serde_json::to_value(seccomp_profile::profile()).unwrap_or(Value::Null),
        }
    })
}

/// `moat spec`'s masked paths plus /proc/interrupts: per-CPU interrupt
/// counts of the whole host, a known side channel (keystroke timing).
pub fn masked_paths() -> Vec<&'static str> {
    let mut v = MASKED_PATHS.to_vec();
    v.push("/proc/interrupts");
    v
}

/// `moat spec --hardened`: the same defaults for a bundle with its own
/// `rootfs` (no host binds), mapped to the first block of the ID pool.
pub fn hardened_spec() -> Value {
    let s = Settings {
        hard_nofile: host_hard_limit(rustix::process::Resource::Nofile),
        hard_nproc: host_hard_limit(rustix::process::Resource::Nproc),
        blkio_weight: blkio_weight_supported(),
        cwd: "/".into(),
        ..Settings::default()
    };
    let mut v = spec(&s, Vec::new());
    // A bundle's own rootfs belongs to host root, so the container's root
    // cannot create /home/user in it: no $HOME tmpfs, HOME is /tmp (as for
    // images). The rootfs needs /proc, /dev, /sys and /tmp (docs/run.md).
    if let Some(m) = v["mounts"].as_array_mut() {
        m.retain(|m| m["destination"] != HOME);
    }
    if let Some(env) = v["process"]["env"].as_array_mut() {
        for e in env.iter_mut() {
            if e.as_str().is_some_and(|e| e.starts_with("HOME=")) {
                *e = json!("HOME=/tmp");
            }
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: &Value) -> oci_spec::runtime::Spec {
        let text = v.to_string();
        let spec =
            moat_core::spec::parse_reader(text.as_bytes(), std::path::Path::new("config.json"))
                .unwrap();
        moat_core::spec::validate(&spec).unwrap();
        spec
    }

    #[test]
    fn defaults_are_hardened() {
        let s = Settings::default();
        let spec = parse(&spec(&s, Vec::new()));
        let p = spec.process().as_ref().unwrap();
        assert_eq!(p.user().uid(), 65534);
        assert_eq!(p.no_new_privileges(), Some(true));
        let c = p.capabilities().as_ref().unwrap();
        for set in [
            c.bounding(),
            c.effective(),
            c.permitted(),
            c.inheritable(),
            c.ambient(),
        ] {
            assert!(set.as_ref().unwrap().is_empty());
        }
        assert_eq!(spec.root().as_ref().unwrap().readonly(), Some(true));
        let linux = spec.linux().as_ref().unwrap();
        let ns: Vec<String> = linux
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .map(|n| format!("{:?}", n.typ()))
            .collect();
        assert_eq!(ns.len(), 7, "{ns:?}");
        let r = linux.resources().as_ref().unwrap();
        let m = r.memory().unwrap();
        assert_eq!(m.limit(), Some(1 << 30));
        assert_eq!(m.swap(), Some(1 << 30));
        assert_eq!(r.cpu().as_ref().unwrap().quota(), Some(100_000));
        assert_eq!(r.pids().unwrap().limit(), 1024);
        assert!(linux.seccomp().is_some());
        let uid_map = &linux.uid_mappings().as_ref().unwrap()[0];
        assert_eq!(uid_map.size(), 65536);
        let rl = p.rlimits().as_ref().unwrap();
        assert_eq!(rl.len(), 4);
    }

    #[test]
    fn rlimits_stay_within_host_hard_limits() {
        let s = Settings {
            hard_nofile: 512,
            hard_nproc: 100,
            ..Settings::default()
        };
        let v = spec(&s, Vec::new());
        assert_eq!(v["process"]["rlimits"][0]["hard"], 512);
        assert_eq!(v["process"]["rlimits"][1]["soft"], 100);
    }

    #[test]
    fn flags_change_only_their_setting() {
        let s = Settings {
            net_host: true,
            cpus: 0.5,
            cap_add: vec!["net_raw".into()],
            ..Settings::default()
        };
        let v = spec(&s, Vec::new());
        parse(&v);
        assert!(!v["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["type"] == "network"));
        assert_eq!(v["linux"]["resources"]["cpu"]["quota"], 50_000);
        assert_eq!(v["process"]["capabilities"]["ambient"][0], "CAP_NET_RAW");
    }

    #[test]
    fn env_overrides_by_key() {
        let env = environment(&["HOME=/x".into(), "A=1".into()]);
        assert_eq!(env, vec![PATH.to_string(), "HOME=/x".into(), "A=1".into()]);
    }

    #[test]
    fn hardened_spec_is_valid() {
        let v = hardened_spec();
        parse(&v);
        assert_eq!(v["root"]["path"], "rootfs");
    }
}
