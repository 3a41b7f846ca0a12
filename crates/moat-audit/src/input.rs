//! Input detection and parsing: each input becomes one [`Workload`] per
//! container, the settings the rules judge, each with where it is (or where
//! it should be set) in the input.
use serde_json::Value;

use super::AuditError;

/// How the input was written, which decides how locations are spelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Syntax {
    Json,
    Yaml,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Oci,
    Docker,
    Kubernetes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

/// A location in the input: rendered as a JSON pointer for JSON input and a
/// YAML path (`spec.containers[0].image`, prefixed with the document number
/// for multi-document files) for YAML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loc {
    syntax: Syntax,
    doc: Option<usize>,
    segs: Vec<Seg>,
}

impl Loc {
    pub fn root(syntax: Syntax, doc: Option<usize>) -> Self {
        Self {
            syntax,
            doc,
            segs: Vec::new(),
        }
    }

    pub fn k(&self, key: &str) -> Self {
        let mut l = self.clone();
        for part in key.split('.') {
            l.segs.push(Seg::Key(part.to_string()));
        }
        l
    }

    /// A key that may itself contain dots (annotation names).
    pub fn raw_key(&self, key: &str) -> Self {
        let mut l = self.clone();
        l.segs.push(Seg::Key(key.to_string()));
        l
    }

    pub fn i(&self, i: usize) -> Self {
        let mut l = self.clone();
        l.segs.push(Seg::Index(i));
        l
    }

    pub fn render(&self) -> String {
        match self.syntax {
            Syntax::Json => {
                let mut s = String::new();
                for seg in &self.segs {
                    s.push('/');
                    match seg {
                        Seg::Key(k) => s.push_str(&k.replace('~', "~0").replace('/', "~1")),
                        Seg::Index(i) => s.push_str(&i.to_string()),
                    }
                }
                if s.is_empty() {
                    "/".into()
                } else {
                    s
                }
            }
            Syntax::Yaml => {
                let mut s = String::new();
                for seg in &self.segs {
                    match seg {
                        Seg::Key(k) if k.contains(['.', '/', ' ']) => {
                            s.push_str(&format!("[\"{k}\"]"))
                        }
                        Seg::Key(k) => {
                            if !s.is_empty() {
                                s.push('.');
                            }
                            s.push_str(k);
                        }
                        Seg::Index(i) => s.push_str(&format!("[{i}]")),
                    }
                }
                match self.doc {
                    Some(d) => format!("doc {d}: {s}"),
                    None => s,
                }
            }
        }
    }
}

/// A host path mounted into the container.
#[derive(Debug, Clone)]
pub struct HostMount {
    pub source: String,
    pub dest: String,
    pub readonly: bool,
    /// Propagation as written (shared, rshared, Bidirectional).
    pub propagation: Option<(String, Loc)>,
    pub loc: Loc,
}

#[derive(Debug, Clone)]
pub struct Port {
    pub host_port: u16,
    pub host_ip: String,
    pub loc: Loc,
}

/// A setting that should be present: `Some(loc)` when it is missing or
/// wrong, with the location to fix.
pub type Gap = Option<Loc>;

/// What the rules judge about one container.
#[derive(Debug, Clone)]
pub struct Workload {
    pub source: Source,
    pub subject: String,
    pub base: Loc,
    pub privileged: Gap,
    /// Capabilities the process can hold, with where each comes from.
    pub caps: Vec<(String, Loc)>,
    /// Capabilities explicitly added beyond the runtime's defaults.
    pub caps_added: Vec<(String, Loc)>,
    /// Where to drop ALL when not dropped (Docker, Kubernetes).
    pub drop_all: Gap,
    /// Host namespaces shared: (namespace, where).
    pub host_ns: Vec<(&'static str, Loc)>,
    /// No user namespace.
    pub no_userns: Gap,
    /// Runs as root (uid 0 or not enforced non-root): (detail, where).
    pub root_user: Option<(String, Loc)>,
    /// Kubernetes runAsUser at or below 10000.
    pub low_uid: Option<(u64, Loc)>,
    pub seccomp_unconfined: Gap,
    pub seccomp_missing: Gap,
    /// No moat Landlock policy (OCI config only).
    pub landlock_missing: Gap,
    pub apparmor_unconfined: Gap,
    pub selinux_custom: Option<(String, Loc)>,
    pub no_new_privs: Gap,
    pub readonly_root: Gap,
    pub memory_limit: Gap,
    pub cpu_limit: Gap,
    pub pids_limit: Gap,
    pub mounts: Vec<HostMount>,
    pub root_propagation: Option<(String, Loc)>,
    pub devices: Vec<(String, Loc)>,
    pub device_allow_all: Gap,
    /// /proc masking turned off or /proc/sys writable: (detail, where).
    pub unmasked: Vec<(String, Loc)>,
    pub ports: Vec<Port>,
    pub sysctls: Vec<(String, Loc)>,
    pub sa_token: Gap,
    pub image: Option<(String, Loc)>,
    pub restart: Option<(String, Loc)>,
    pub healthcheck: Gap,
    pub host_process: Gap,
    pub volume_types: Vec<(String, Loc)>,
    /// config.json properties moat does not know: (path, where, under a
    /// security-relevant object).
    pub unknown: Vec<(String, Loc, bool)>,
}

impl Workload {
    fn new(source: Source, subject: String, base: Loc) -> Self {
        Self {
            source,
            subject,
            base,
            privileged: None,
            caps: Vec::new(),
            caps_added: Vec::new(),
            drop_all: None,
            host_ns: Vec::new(),
            no_userns: None,
            root_user: None,
            low_uid: None,
            seccomp_unconfined: None,
            seccomp_missing: None,
            landlock_missing: None,
            apparmor_unconfined: None,
            selinux_custom: None,
            no_new_privs: None,
            readonly_root: None,
            memory_limit: None,
            cpu_limit: None,
            pids_limit: None,
            mounts: Vec::new(),
            root_propagation: None,
            devices: Vec::new(),
            device_allow_all: None,
            unmasked: Vec::new(),
            ports: Vec::new(),
            sysctls: Vec::new(),
            sa_token: None,
            image: None,
            restart: None,
            healthcheck: None,
            host_process: None,
            volume_types: Vec::new(),
            unknown: Vec::new(),
        }
    }
}

/// Docker's (and containerd's) 14 default capabilities.
pub const DEFAULT_CAPS: [&str; 14] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// `CAP_SYS_ADMIN`, `sys_admin`, `SYS_ADMIN` → `SYS_ADMIN`.
pub fn cap_name(s: &str) -> String {
    let u = s.trim().to_ascii_uppercase();
    u.strip_prefix("CAP_").map(str::to_string).unwrap_or(u)
}

/// Detects the input kind and parses it.
pub fn parse(text: &str, name: &str) -> Result<Vec<Workload>, AuditError> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        if let Ok(v) = serde_json::from_str::<Value>(text) {
            return from_json(&v, name);
        }
    }
    let mut docs = Vec::new();
    for d in serde_yaml_ng::Deserializer::from_str(text) {
        let v =
            <Value as serde::Deserialize>::deserialize(d).map_err(|source| AuditError::Yaml {
                path: name.to_string(),
                source,
            })?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    if docs.is_empty() {
        return Err(AuditError::Unrecognised(name.to_string()));
    }
    let multi = docs.len() > 1;
    let mut out = Vec::new();
    for (i, d) in docs.iter().enumerate() {
        let base = Loc::root(Syntax::Yaml, multi.then_some(i));
        if is_k8s(d) {
            out.extend(k8s::objects(d, &base));
        } else if is_oci(d) {
            out.push(oci::workload(d, base, name));
        } else {
            return Err(AuditError::Unrecognised(name.to_string()));
        }
    }
    Ok(out)
}

fn is_k8s(v: &Value) -> bool {
    v.get("kind").is_some_and(Value::is_string) && v.get("apiVersion").is_some()
}

fn is_oci(v: &Value) -> bool {
    v.get("ociVersion").is_some() || (v.get("process").is_some() && v.get("root").is_some())
}

fn is_docker(v: &Value) -> bool {
    v.get("HostConfig").is_some() && v.get("Config").is_some()
}

fn from_json(v: &Value, name: &str) -> Result<Vec<Workload>, AuditError> {
    let root = Loc::root(Syntax::Json, None);
    match v {
        Value::Array(items) if !items.is_empty() && items.iter().all(is_docker) => Ok(items
            .iter()
            .enumerate()
            .map(|(i, c)| docker::workload(c, root.i(i)))
            .collect()),
        v if is_docker(v) => Ok(vec![docker::workload(v, root)]),
        v if is_k8s(v) => Ok(k8s::objects(v, &root)),
        v if is_oci(v) => Ok(vec![oci::workload(v, root, name)]),
        _ => Err(AuditError::Unrecognised(name.to_string())),
    }
}

fn s<'a>(v: &'a Value, ptr: &str) -> Option<&'a str> {
    v.pointer(ptr).and_then(Value::as_str)
}

fn b(v: &Value, ptr: &str) -> Option<bool> {
    v.pointer(ptr).and_then(Value::as_bool)
}

fn arr<'a>(v: &'a Value, ptr: &str) -> &'a [Value] {
    v.pointer(ptr)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// Mount sources that give the host away (docker-bench's CIS 5.6 list, plus
/// the runtimes' state directories).
pub const SENSITIVE: [&str; 16] = [
    "/",
    "/boot",
    "/dev",
    "/etc",
    "/lib",
    "/proc",
    "/sys",
    "/usr",
    "/root",
    "/run",
    "/var/run",
    "/var/lib/docker",
    "/var/lib/containerd",
    "/var/lib/kubelet",
    "/lib64",
    "/sbin",
];

/// Sysctls the Pod Security Standards baseline allows.
pub const SAFE_SYSCTLS: [&str; 10] = [
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
];

mod oci {
    use super::*;

    /// Objects where an unknown (misspelt) property drops a protection.
    const SECURITY_OBJECTS: [&str; 5] = ["process", "linux", "root", "mounts", "hooks"];

    fn unknown(v: &Value, base: &Loc) -> Vec<(String, Loc, bool)> {
        use moat_core::spec::Step;
        // Not a valid spec at all: the runtime refuses it; nothing to add.
        let Ok(paths) = moat_core::spec::unknown_properties(v) else {
            return Vec::new();
        };
        paths
            .into_iter()
            .map(|p| {
                let loc = p.0.iter().fold(base.clone(), |l, s| match s {
                    Step::Key(k) => l.raw_key(k),
                    Step::Index(i) => l.i(*i),
                });
                let security = p.top().is_some_and(|t| SECURITY_OBJECTS.contains(&t));
                (p.to_string(), loc, security)
            })
            .collect()
    }

    pub fn workload(v: &Value, base: Loc, name: &str) -> Workload {
        let mut w = Workload::new(Source::Oci, name.to_string(), base.clone());
        w.unknown = unknown(v, &base);
        // Capabilities: every set, first place each appears.
        for set in [
            "bounding",
            "effective",
            "permitted",
            "inheritable",
            "ambient",
        ] {
            for (i, c) in arr(v, &format!("/process/capabilities/{set}"))
                .iter()
                .enumerate()
            {
                if let Some(c) = c.as_str() {
                    let n = cap_name(c);
                    if !w.caps.iter().any(|(x, _)| *x == n) {
                        let l = base.k("process").k("capabilities").k(set).i(i);
                        if !DEFAULT_CAPS.contains(&n.as_str()) {
                            w.caps_added.push((n.clone(), l.clone()));
                        }
                        w.caps.push((n, l));
                    }
                }
            }
        }
        let ns_loc = base.k("linux").k("namespaces");
        let types: Vec<&str> = arr(v, "/linux/namespaces")
            .iter()
            .filter_map(|n| n.get("type").and_then(Value::as_str))
            .collect();
        for (t, name) in [
            ("network", "network"),
            ("pid", "pid"),
            ("ipc", "ipc"),
            ("uts", "uts"),
            ("mount", "mount"),
            ("cgroup", "cgroup"),
        ] {
            if !types.contains(&t) {
                w.host_ns.push((name, ns_loc.clone()));
            }
        }
        if !types.contains(&"user") {
            w.no_userns = Some(ns_loc.clone());
        }
        let uid = v
            .pointer("/process/user/uid")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        if uid == 0 {
            w.root_user = Some((
                "process.user.uid is 0".into(),
                base.k("process").k("user").k("uid"),
            ));
        }
        let landlock = v
            .get("annotations")
            .and_then(|a| a.get(moat_core::landlock::LANDLOCK_ANNOTATION));
        if landlock.is_none() {
            w.landlock_missing = Some(base.k("annotations"));
        }
        match v.pointer("/linux/seccomp") {
            None | Some(Value::Null) => w.seccomp_missing = Some(base.k("linux").k("seccomp")),
            Some(sc) => {
                let allow_all = sc.get("defaultAction").and_then(Value::as_str)
                    == Some("SCMP_ACT_ALLOW")
                    && sc
                        .get("syscalls")
                        .and_then(Value::as_array)
                        .is_none_or(Vec::is_empty);
                if allow_all {
                    w.seccomp_unconfined = Some(base.k("linux").k("seccomp").k("defaultAction"));
                }
            }
        }
        if s(v, "/process/apparmorProfile") == Some("unconfined") {
            w.apparmor_unconfined = Some(base.k("process").k("apparmorProfile"));
        }
        if let Some(l) = s(v, "/process/selinuxLabel")
            .filter(|l| l.contains("spc_t") || l.contains("unconfined_t"))
        {
            w.selinux_custom = Some((l.to_string(), base.k("process").k("selinuxLabel")));
        }
        if b(v, "/process/noNewPrivileges") != Some(true) {
            w.no_new_privs = Some(base.k("process").k("noNewPrivileges"));
        }
        if b(v, "/root/readonly") != Some(true) {
            w.readonly_root = Some(base.k("root").k("readonly"));
        }
        let res = base.k("linux").k("resources");
        if v.pointer("/linux/resources/memory/limit")
            .and_then(Value::as_i64)
            .is_none_or(|l| l <= 0)
        {
            w.memory_limit = Some(res.k("memory").k("limit"));
        }
        let quota = v
            .pointer("/linux/resources/cpu/quota")
            .and_then(Value::as_i64)
            .is_some_and(|q| q > 0);
        let shares = v
            .pointer("/linux/resources/cpu/shares")
            .and_then(Value::as_u64)
            .is_some_and(|s| s > 0 && s != 1024);
        if !quota && !shares {
            w.cpu_limit = Some(res.k("cpu").k("quota"));
        }
        if v.pointer("/linux/resources/pids/limit")
            .and_then(Value::as_i64)
            .is_none_or(|l| l <= 0)
        {
            w.pids_limit = Some(res.k("pids").k("limit"));
        }
        for (i, m) in arr(v, "/mounts").iter().enumerate() {
            let opts: Vec<&str> = m
                .get("options")
                .and_then(Value::as_array)
                .map(|o| o.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let bind = m.get("type").and_then(Value::as_str) == Some("bind")
                || opts.iter().any(|o| *o == "bind" || *o == "rbind");
            if !bind {
                continue;
            }
            let l = base.k("mounts").i(i);
            let prop = opts
                .iter()
                .position(|o| *o == "shared" || *o == "rshared")
                .map(|j| (opts[j].to_string(), l.k("options").i(j)));
            w.mounts.push(HostMount {
                source: m
                    .get("source")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                dest: m
                    .get("destination")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                readonly: opts.contains(&"ro"),
                propagation: prop,
                loc: l,
            });
        }
        if let Some(p) = s(v, "/linux/rootfsPropagation").filter(|p| p.contains("shared")) {
            w.root_propagation = Some((p.to_string(), base.k("linux").k("rootfsPropagation")));
        }
        const STD_DEV: [&str; 7] = [
            "/dev/null",
            "/dev/zero",
            "/dev/full",
            "/dev/random",
            "/dev/urandom",
            "/dev/tty",
            "/dev/ptmx",
        ];
        for (i, d) in arr(v, "/linux/devices").iter().enumerate() {
            let p = d.get("path").and_then(Value::as_str).unwrap_or("");
            if !STD_DEV.contains(&p) {
                w.devices
                    .push((p.to_string(), base.k("linux").k("devices").i(i)));
            }
        }
        for (i, d) in arr(v, "/linux/resources/devices").iter().enumerate() {
            let allow = d.get("allow").and_then(Value::as_bool) == Some(true);
            let any_type = d
                .get("type")
                .and_then(Value::as_str)
                .is_none_or(|t| t == "a");
            if allow && any_type && d.get("major").is_none() && d.get("minor").is_none() {
                w.device_allow_all = Some(res.k("devices").i(i));
            }
        }
        let masked: Vec<&str> = arr(v, "/linux/maskedPaths")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        if !masked.contains(&"/proc/kcore") {
            w.unmasked.push((
                "linux.maskedPaths does not mask /proc/kcore (nor, likely, the other kernel paths)"
                    .into(),
                base.k("linux").k("maskedPaths"),
            ));
        }
        let ro: Vec<&str> = arr(v, "/linux/readonlyPaths")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        if !ro.contains(&"/proc/sys") {
            w.unmasked.push((
                "linux.readonlyPaths does not make /proc/sys read-only".into(),
                base.k("linux").k("readonlyPaths"),
            ));
        }
        if let Some(m) = v.pointer("/linux/sysctl").and_then(Value::as_object) {
            for k in m.keys() {
                if !SAFE_SYSCTLS.contains(&k.as_str()) {
                    w.sysctls
                        .push((k.clone(), base.k("linux").k("sysctl").raw_key(k)));
                }
            }
        }
        w
    }
}

mod docker {
    use super::*;

    pub fn workload(v: &Value, base: Loc) -> Workload {
        let name = s(v, "/Name")
            .unwrap_or("")
            .trim_start_matches('/')
            .to_string();
        let subject = if name.is_empty() {
            s(v, "/Id")
                .unwrap_or("container")
                .chars()
                .take(12)
                .collect()
        } else {
            name
        };
        let mut w = Workload::new(Source::Docker, subject, base.clone());
        let hc = base.k("HostConfig");
        if b(v, "/HostConfig/Privileged") == Some(true) {
            w.privileged = Some(hc.k("Privileged"));
        }
        let drops: Vec<String> = arr(v, "/HostConfig/CapDrop")
            .iter()
            .filter_map(Value::as_str)
            .map(cap_name)
            .collect();
        let drop_all = drops.iter().any(|d| d == "ALL");
        if !drop_all {
            w.drop_all = Some(hc.k("CapDrop"));
            for c in DEFAULT_CAPS {
                if !drops.iter().any(|d| d == c) {
                    w.caps.push((c.to_string(), hc.k("CapDrop")));
                }
            }
        }
        for (i, c) in arr(v, "/HostConfig/CapAdd").iter().enumerate() {
            if let Some(c) = c.as_str() {
                let n = cap_name(c);
                let l = hc.k("CapAdd").i(i);
                if !DEFAULT_CAPS.contains(&n.as_str()) {
                    w.caps_added.push((n.clone(), l.clone()));
                }
                w.caps.retain(|(x, _)| *x != n);
                w.caps.push((n, l));
            }
        }
        for (field, ns) in [
            ("NetworkMode", "network"),
            ("PidMode", "pid"),
            ("IpcMode", "ipc"),
            ("UTSMode", "uts"),
            ("CgroupnsMode", "cgroup"),
        ] {
            if s(v, &format!("/HostConfig/{field}")) == Some("host") {
                w.host_ns.push((ns, hc.k(field)));
            }
        }
        if s(v, "/HostConfig/UsernsMode").is_none_or(|m| m.is_empty() || m == "host") {
            w.no_userns = Some(hc.k("UsernsMode"));
        }
        let user = s(v, "/Config/User").unwrap_or("");
        let uid = user.split(':').next().unwrap_or("");
        if uid.is_empty() || uid == "root" || uid == "0" {
            w.root_user = Some((
                format!("Config.User is {user:?}"),
                base.k("Config").k("User"),
            ));
        }
        let opts: Vec<(usize, String)> = arr(v, "/HostConfig/SecurityOpt")
            .iter()
            .enumerate()
            .filter_map(|(i, o)| o.as_str().map(|s| (i, s.replace(':', "="))))
            .collect();
        let opt = |p: &str| {
            opts.iter()
                .find(|(_, o)| o.starts_with(p))
                .map(|(i, _)| hc.k("SecurityOpt").i(*i))
        };
        if let Some(l) = opt("seccomp=unconfined") {
            w.seccomp_unconfined = Some(l);
        }
        if let Some(l) = opt("apparmor=unconfined") {
            w.apparmor_unconfined = Some(l);
        } else if s(v, "/AppArmorProfile") == Some("unconfined") {
            w.apparmor_unconfined = Some(base.k("AppArmorProfile"));
        }
        if let Some(l) = opt("label=disable") {
            w.selinux_custom = Some(("label=disable".into(), l));
        }
        let nnp = opts
            .iter()
            .any(|(_, o)| o == "no-new-privileges" || o == "no-new-privileges=true");
        if !nnp {
            w.no_new_privs = Some(hc.k("SecurityOpt"));
        }
        if let Some(l) = opt("systempaths=unconfined") {
            w.unmasked.push((
                "systempaths=unconfined: /proc and /sys are not masked".into(),
                l,
            ));
        }
        if b(v, "/HostConfig/ReadonlyRootfs") != Some(true) {
            w.readonly_root = Some(hc.k("ReadonlyRootfs"));
        }
        let num = |p: &str| v.pointer(p).and_then(Value::as_i64).unwrap_or(0);
        if num("/HostConfig/Memory") <= 0 {
            w.memory_limit = Some(hc.k("Memory"));
        }
        let shares = num("/HostConfig/CpuShares");
        if num("/HostConfig/NanoCpus") <= 0
            && num("/HostConfig/CpuQuota") <= 0
            && (shares == 0 || shares == 1024)
        {
            w.cpu_limit = Some(hc.k("NanoCpus"));
        }
        if num("/HostConfig/PidsLimit") <= 0 {
            w.pids_limit = Some(hc.k("PidsLimit"));
        }
        for (i, m) in arr(v, "/Mounts").iter().enumerate() {
            if m.get("Type").and_then(Value::as_str) != Some("bind") {
                continue;
            }
            let l = base.k("Mounts").i(i);
            let prop = m
                .get("Propagation")
                .and_then(Value::as_str)
                .filter(|p| p.contains("shared"))
                .map(|p| (p.to_string(), l.k("Propagation")));
            w.mounts.push(HostMount {
                source: m
                    .get("Source")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                dest: m
                    .get("Destination")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                readonly: m.get("RW").and_then(Value::as_bool) == Some(false),
                propagation: prop,
                loc: l,
            });
        }
        for (i, d) in arr(v, "/HostConfig/Devices").iter().enumerate() {
            let p = d.get("PathOnHost").and_then(Value::as_str).unwrap_or("");
            w.devices.push((p.to_string(), hc.k("Devices").i(i)));
        }
        for (i, r) in arr(v, "/HostConfig/DeviceCgroupRules").iter().enumerate() {
            if r.as_str()
                .is_some_and(|r| r.starts_with("a ") || r.starts_with("a\t"))
            {
                w.device_allow_all = Some(hc.k("DeviceCgroupRules").i(i));
            }
        }
        if let Some(pb) = v
            .pointer("/HostConfig/PortBindings")
            .and_then(Value::as_object)
        {
            for (port, binds) in pb {
                for (j, bnd) in binds
                    .as_array()
                    .map_or(&[][..], Vec::as_slice)
                    .iter()
                    .enumerate()
                {
                    let hp = bnd
                        .get("HostPort")
                        .and_then(Value::as_str)
                        .and_then(|p| p.parse().ok())
                        .unwrap_or(0);
                    w.ports.push(Port {
                        host_port: hp,
                        host_ip: bnd
                            .get("HostIp")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string(),
                        loc: hc.k("PortBindings").raw_key(port).i(j),
                    });
                }
            }
        }
        if let Some(m) = v.pointer("/HostConfig/Sysctls").and_then(Value::as_object) {
            for k in m.keys() {
                if !SAFE_SYSCTLS.contains(&k.as_str()) {
                    w.sysctls.push((k.clone(), hc.k("Sysctls").raw_key(k)));
                }
            }
        }
        if let Some(img) = s(v, "/Config/Image") {
            w.image = Some((img.to_string(), base.k("Config").k("Image")));
        }
        let policy = s(v, "/HostConfig/RestartPolicy/Name").unwrap_or("");
        let retries = num("/HostConfig/RestartPolicy/MaximumRetryCount");
        if policy == "always"
            || policy == "unless-stopped"
            || (policy == "on-failure" && !(1..=5).contains(&retries))
        {
            w.restart = Some((
                format!("{policy} (MaximumRetryCount {retries})"),
                hc.k("RestartPolicy"),
            ));
        }
        if v.pointer("/Config/Healthcheck").is_none_or(Value::is_null) {
            w.healthcheck = Some(base.k("Config").k("Healthcheck"));
        }
        w
    }
}

pub mod k8s {
    use super::*;

    /// The pod spec of a workload object and its location.
    fn pod_spec<'a>(v: &'a Value, base: &Loc) -> Option<(&'a Value, Loc)> {
        let kind = v.get("kind")?.as_str()?;
        let (ptr, loc) = match kind {
            "Pod" => ("/spec", base.k("spec")),
            "Deployment"
            | "StatefulSet"
            | "DaemonSet"
            | "ReplicaSet"
            | "ReplicationController"
            | "Job"
            | "PodTemplate" => ("/spec/template/spec", base.k("spec.template.spec")),
            "CronJob" => (
                "/spec/jobTemplate/spec/template/spec",
                base.k("spec.jobTemplate.spec.template.spec"),
            ),
            _ => return None,
        };
        Some((v.pointer(ptr)?, loc))
    }

    /// Workloads of one Kubernetes object (a List's items included).
    pub fn objects(v: &Value, base: &Loc) -> Vec<Workload> {
        if v.get("kind").and_then(Value::as_str) == Some("List") {
            return arr(v, "/items")
                .iter()
                .enumerate()
                .flat_map(|(i, it)| objects(it, &base.k("items").i(i)))
                .collect();
        }
        let Some((spec, sl)) = pod_spec(v, base) else {
            return Vec::new();
        };
        let kind = v.get("kind").and_then(Value::as_str).unwrap_or("");
        let name = s(v, "/metadata/name").unwrap_or("");
        let annotations = v.pointer(if kind == "Pod" {
            "/metadata/annotations"
        } else {
            "/spec/template/metadata/annotations"
        });
        let mut out = Vec::new();
        let mut first = true;
        for list in ["initContainers", "containers", "ephemeralContainers"] {
            for (i, c) in arr(spec, &format!("/{list}")).iter().enumerate() {
                let cl = sl.k(list).i(i);
                let cname = c.get("name").and_then(Value::as_str).unwrap_or("");
                let mut w = Workload::new(
                    Source::Kubernetes,
                    format!("{kind}/{name} container {cname}"),
                    cl.clone(),
                );
                container(&mut w, c, &cl, spec, &sl, annotations, cname);
                if first {
                    pod_level(&mut w, spec, &sl);
                    first = false;
                }
                out.push(w);
            }
        }
        out
    }

    fn pod_level(w: &mut Workload, spec: &Value, sl: &Loc) {
        for (field, ns) in [
            ("hostNetwork", "network"),
            ("hostPID", "pid"),
            ("hostIPC", "ipc"),
        ] {
            if b(spec, &format!("/{field}")) == Some(true) {
                w.host_ns.push((ns, sl.k(field)));
            }
        }
        if b(spec, "/hostUsers") != Some(false) {
            w.no_userns = Some(sl.k("hostUsers"));
        }
        if b(spec, "/automountServiceAccountToken") != Some(false) {
            w.sa_token = Some(sl.k("automountServiceAccountToken"));
        }
        for (i, sc) in arr(spec, "/securityContext/sysctls").iter().enumerate() {
            let n = sc.get("name").and_then(Value::as_str).unwrap_or("");
            if !SAFE_SYSCTLS.contains(&n) {
                w.sysctls.push((
                    n.to_string(),
                    sl.k("securityContext.sysctls").i(i).k("name"),
                ));
            }
        }
        const RESTRICTED_VOLUMES: [&str; 8] = [
            "configMap",
            "csi",
            "downwardAPI",
            "emptyDir",
            "ephemeral",
            "persistentVolumeClaim",
            "projected",
            "secret",
        ];
        for (i, vol) in arr(spec, "/volumes").iter().enumerate() {
            let Some(obj) = vol.as_object() else { continue };
            for k in obj.keys().filter(|k| *k != "name") {
                if !RESTRICTED_VOLUMES.contains(&k.as_str()) {
                    w.volume_types.push((k.clone(), sl.k("volumes").i(i).k(k)));
                }
            }
        }
    }

    /// Container field, else pod-level securityContext field.
    fn sc<'a>(c: &'a Value, spec: &'a Value, field: &str) -> Option<(&'a Value, bool)> {
        c.pointer(&format!("/securityContext/{field}"))
            .map(|v| (v, true))
            .or_else(|| {
                spec.pointer(&format!("/securityContext/{field}"))
                    .map(|v| (v, false))
            })
    }

    #[allow(clippy::too_many_arguments)]
    fn container(
        w: &mut Workload,
        c: &Value,
        cl: &Loc,
        spec: &Value,
        sl: &Loc,
        ann: Option<&Value>,
        cname: &str,
    ) {
        let csc = cl.k("securityContext");
        let at = |own: bool, field: &str| {
            if own {
                csc.k(field)
            } else {
                sl.k("securityContext").k(field)
            }
        };
        if b(c, "/securityContext/privileged") == Some(true) {
            w.privileged = Some(csc.k("privileged"));
        }
        if b(c, "/securityContext/windowsOptions/hostProcess") == Some(true)
            || b(spec, "/securityContext/windowsOptions/hostProcess") == Some(true)
        {
            w.host_process = Some(csc.k("windowsOptions.hostProcess"));
        }
        let drops: Vec<String> = arr(c, "/securityContext/capabilities/drop")
            .iter()
            .filter_map(Value::as_str)
            .map(cap_name)
            .collect();
        if !drops.iter().any(|d| d == "ALL") {
            w.drop_all = Some(csc.k("capabilities.drop"));
            for d in DEFAULT_CAPS {
                if !drops.iter().any(|x| x == d) {
                    w.caps.push((d.to_string(), csc.k("capabilities.drop")));
                }
            }
        }
        for (i, a) in arr(c, "/securityContext/capabilities/add")
            .iter()
            .enumerate()
        {
            if let Some(a) = a.as_str() {
                let n = cap_name(a);
                let l = csc.k("capabilities.add").i(i);
                if n != "NET_BIND_SERVICE" {
                    w.caps_added.push((n.clone(), l.clone()));
                }
                w.caps.retain(|(x, _)| *x != n);
                w.caps.push((n, l));
            }
        }
        match sc(c, spec, "runAsUser") {
            Some((u, own)) if u.as_u64() == Some(0) => {
                w.root_user = Some(("runAsUser is 0".into(), at(own, "runAsUser")))
            }
            Some((u, own)) => {
                if let Some(n) = u.as_u64().filter(|n| *n <= 10000) {
                    w.low_uid = Some((n, at(own, "runAsUser")));
                }
                if sc(c, spec, "runAsNonRoot").is_none_or(|(v, _)| v.as_bool() != Some(true))
                    && u.as_u64().is_none()
                {
                    w.root_user = Some(("runAsNonRoot is not true".into(), csc.k("runAsNonRoot")));
                }
            }
            None => {
                if sc(c, spec, "runAsNonRoot").is_none_or(|(v, _)| v.as_bool() != Some(true)) {
                    w.root_user = Some((
                        "neither runAsNonRoot: true nor a non-zero runAsUser".into(),
                        csc.k("runAsNonRoot"),
                    ));
                }
            }
        }
        match sc(c, spec, "seccompProfile/type") {
            Some((t, own)) if t.as_str() == Some("Unconfined") => {
                w.seccomp_unconfined = Some(at(own, "seccompProfile.type"))
            }
            Some(_) => {}
            None => w.seccomp_missing = Some(csc.k("seccompProfile.type")),
        }
        let aa_key = format!("container.apparmor.security.beta.kubernetes.io/{cname}");
        let aa_ann = ann.and_then(|a| a.get(&aa_key)).and_then(Value::as_str);
        match sc(c, spec, "appArmorProfile/type") {
            Some((t, own)) if t.as_str() == Some("Unconfined") => {
                w.apparmor_unconfined = Some(at(own, "appArmorProfile.type"))
            }
            _ if aa_ann == Some("unconfined") => {
                w.apparmor_unconfined = Some(
                    Loc::root(Syntax::Yaml, None)
                        .k("metadata.annotations")
                        .raw_key(&aa_key),
                )
            }
            _ => {}
        }
        if let Some((o, own)) = sc(c, spec, "seLinuxOptions") {
            let ty = o.get("type").and_then(Value::as_str).unwrap_or("");
            let allowed = [
                "",
                "container_t",
                "container_init_t",
                "container_kvm_t",
                "container_engine_t",
            ];
            if !allowed.contains(&ty) || o.get("user").is_some() || o.get("role").is_some() {
                w.selinux_custom = Some((format!("seLinuxOptions {o}"), at(own, "seLinuxOptions")));
            }
        }
        if b(c, "/securityContext/allowPrivilegeEscalation") != Some(false) {
            w.no_new_privs = Some(csc.k("allowPrivilegeEscalation"));
        }
        if b(c, "/securityContext/readOnlyRootFilesystem") != Some(true) {
            w.readonly_root = Some(csc.k("readOnlyRootFilesystem"));
        }
        if s(c, "/securityContext/procMount") == Some("Unmasked") {
            w.unmasked
                .push(("procMount: Unmasked".into(), csc.k("procMount")));
        }
        if c.pointer("/resources/limits/memory").is_none() {
            w.memory_limit = Some(cl.k("resources.limits.memory"));
        }
        if c.pointer("/resources/limits/cpu").is_none() {
            w.cpu_limit = Some(cl.k("resources.limits.cpu"));
        }
        // Pod pids limits are set per node (kubelet podPidsLimit), not in the manifest.
        for (i, p) in arr(c, "/ports").iter().enumerate() {
            if let Some(hp) = p.get("hostPort").and_then(Value::as_u64).filter(|p| *p > 0) {
                w.ports.push(Port {
                    host_port: u16::try_from(hp).unwrap_or(u16::MAX),
                    host_ip: p
                        .get("hostIP")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                    loc: cl.k("ports").i(i).k("hostPort"),
                });
            }
        }
        // hostPath volumes this container mounts.
        for (i, m) in arr(c, "/volumeMounts").iter().enumerate() {
            let vname = m.get("name").and_then(Value::as_str).unwrap_or("");
            let vols = arr(spec, "/volumes");
            let Some((vi, vol)) = vols
                .iter()
                .enumerate()
                .find(|(_, v)| v.get("name").and_then(Value::as_str) == Some(vname))
            else {
                continue;
            };
            let Some(path) = vol.pointer("/hostPath/path").and_then(Value::as_str) else {
                continue;
            };
            let ml = cl.k("volumeMounts").i(i);
            let prop = m
                .get("mountPropagation")
                .and_then(Value::as_str)
                .filter(|p| *p == "Bidirectional")
                .map(|p| (p.to_string(), ml.k("mountPropagation")));
            w.mounts.push(HostMount {
                source: path.to_string(),
                dest: m
                    .get("mountPath")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                readonly: m.get("readOnly").and_then(Value::as_bool) == Some(true),
                propagation: prop,
                loc: sl.k("volumes").i(vi).k("hostPath.path"),
            });
        }
        if let Some(img) = c.get("image").and_then(Value::as_str) {
            w.image = Some((img.to_string(), cl.k("image")));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_render_per_syntax() {
        let j = Loc::root(Syntax::Json, None)
            .k("process.capabilities")
            .k("bounding")
            .i(2);
        assert_eq!(j.render(), "/process/capabilities/bounding/2");
        let y = Loc::root(Syntax::Yaml, Some(1))
            .k("spec.containers")
            .i(0)
            .k("securityContext.privileged");
        assert_eq!(
            y.render(),
            "doc 1: spec.containers[0].securityContext.privileged"
        );
        let a = Loc::root(Syntax::Json, None)
            .k("HostConfig")
            .raw_key("80/tcp");
        assert_eq!(a.render(), "/HostConfig/80~1tcp");
    }

    #[test]
    fn detects_inputs() {
        assert_eq!(
            parse(r#"{"ociVersion":"1.0.2","process":{},"root":{}}"#, "x").unwrap()[0].source,
            Source::Oci
        );
        assert_eq!(
            parse(r#"[{"Name":"/a","Config":{},"HostConfig":{}}]"#, "x").unwrap()[0].source,
            Source::Docker
        );
        let y = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers:\n  - name: a\n    image: x\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec:\n  template:\n    spec:\n      containers:\n      - name: b\n        image: y\n";
        let w = parse(y, "x").unwrap();
        assert_eq!(w.len(), 2);
        assert_eq!(w[1].subject, "Deployment/d container b");
        assert!(parse("just: text\n", "x").is_err());
        assert!(parse("{not json", "x").is_err());
        assert!(parse("", "x").is_err());
    }

    #[test]
    fn cap_names_normalise() {
        assert_eq!(cap_name("CAP_SYS_ADMIN"), "SYS_ADMIN");
        assert_eq!(cap_name("net_raw"), "NET_RAW");
    }
}
