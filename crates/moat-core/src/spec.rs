//! Loading and validating an OCI runtime-spec `config.json`.
//!
//! The runtime-spec says a runtime MUST NOT fail on a property it does not
//! know, and moat does not; but an ignored property in a security
//! configuration is a silently dropped protection (a misspelt `seccomp` or
//! `readonly`), so each one is a warning naming its JSON path when a
//! container is created ([`warn_unknown`]), and `moat audit` reports those
//! under the security-relevant objects ([`unknown_properties`]).
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

pub use oci_spec::runtime::Spec;
use oci_spec::runtime::{LinuxIdMapping, LinuxNamespaceType};

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config: {0}")]
    Invalid(String),
    #[error("cannot open bundle {path}")]
    Bundle {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("rootfs {path} is not a directory")]
    Rootfs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One step of a JSON path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Key(String),
    Index(usize),
}

/// Where a property is in config.json: `process.capabilities.bounding`,
/// `mounts[2].readonly`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonPath(pub Vec<Step>);

impl std::fmt::Display for JsonPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, s) in self.0.iter().enumerate() {
            match s {
                Step::Key(k) if i == 0 => write!(f, "{k}")?,
                Step::Key(k) => write!(f, ".{k}")?,
                Step::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

impl JsonPath {
    fn of(p: &serde_ignored::Path) -> JsonPath {
        let mut steps = Vec::new();
        fn walk(p: &serde_ignored::Path, out: &mut Vec<Step>) {
            use serde_ignored::Path as P;
            match p {
                P::Root => {}
                P::Seq { parent, index } => {
                    walk(parent, out);
                    out.push(Step::Index(*index));
                }
                P::Map { parent, key } => {
                    walk(parent, out);
                    out.push(Step::Key(key.clone()));
                }
                P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => {
                    walk(parent, out)
                }
            }
        }
        walk(p, &mut steps);
        JsonPath(steps)
    }

    /// The top-level property this path is under.
    pub fn top(&self) -> Option<&str> {
        match self.0.first() {
            Some(Step::Key(k)) => Some(k),
            _ => None,
        }
    }
}

/// A parsed config and the properties in it that moat does not know
/// (annotations, free-form by definition, excluded).
#[derive(Debug)]
pub struct Parsed {
    pub spec: Spec,
    pub unknown: Vec<JsonPath>,
}

fn deserialize<'de, D>(de: D) -> Result<Parsed, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let mut unknown = Vec::new();
    let spec: Spec = serde_ignored::deserialize(de, |p| {
        let path = JsonPath::of(&p);
        if path.top() != Some("annotations") {
            unknown.push(path);
        }
    })?;
    Ok(Parsed { spec, unknown })
}

/// Parses a spec from a reader; `path` only names it in errors. Unknown
/// properties are listed, not refused.
pub fn parse(reader: impl std::io::Read, path: &Path) -> Result<Parsed, SpecError> {
    let mut de = serde_json::Deserializer::from_reader(reader);
    let parse_err = |e: serde_json::Error| SpecError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    };
    let parsed = deserialize(&mut de).map_err(parse_err)?;
    de.end().map_err(parse_err)?;
    Ok(parsed)
}

/// The properties of a config.json (as JSON) that moat does not know; an
/// error when it is not a valid spec at all.
pub fn unknown_properties(v: &serde_json::Value) -> Result<Vec<JsonPath>, String> {
    deserialize(v.clone())
        .map(|p| p.unknown)
        .map_err(|e| e.to_string())
}

/// One warning (stderr, and the `--log` file) per unknown property.
pub fn warn_unknown(path: &Path, unknown: &[JsonPath]) {
    for p in unknown {
        tracing::warn!(
            "{}: unknown property {p} ignored (a misspelt setting has no effect)",
            path.display()
        );
    }
}

/// Parse `path` as an OCI runtime spec; unknown properties are ignored.
pub fn parse_file(path: &Path) -> Result<Spec, SpecError> {
    let file = File::open(path).map_err(|source| SpecError::Open {
        path: path.to_owned(),
        source,
    })?;
    parse_reader(BufReader::new(file), path)
}

/// Parse a spec from a reader; `path` only names it in errors. Unknown
/// properties are ignored (quietly: for configs moat wrote or already
/// warned about).
pub fn parse_reader<R: std::io::Read>(reader: R, path: &Path) -> Result<Spec, SpecError> {
    parse(reader, path).map(|p| p.spec)
}

/// Parses a config given to create a container: warns for each unknown
/// property and for what moat does differently ([`warnings`]).
pub fn parse_for_create(reader: impl std::io::Read, path: &Path) -> Result<Spec, SpecError> {
    let parsed = parse(reader, path)?;
    warn_unknown(path, &parsed.unknown);
    for w in warnings(&parsed.spec) {
        tracing::warn!("{w}");
    }
    Ok(parsed.spec)
}

/// What a valid config asks for that moat honours in a weaker or different
/// way than one might expect, as warnings (`moat audit` rates these too).
pub fn warnings(spec: &Spec) -> Vec<String> {
    let mut out = Vec::new();
    let namespaces = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_deref())
        .unwrap_or(&[]);
    if spec.linux().is_some()
        && !namespaces
            .iter()
            .any(|n| n.typ() == LinuxNamespaceType::Mount)
    {
        out.push(
            "linux.namespaces has no mount namespace: the container shares the runtime's (the host's) mounts; \
             its mounts, devices, masked and read-only paths, read-only root and rootfsPropagation are not set up \
             (they would change the host's mounts), only its root directory is changed (chroot)"
                .to_string(),
        );
    }
    out
}

/// Fails unless `rootfs` is a directory.
pub fn check_rootfs(rootfs: &Path) -> Result<(), SpecError> {
    let err = |source| SpecError::Rootfs {
        path: rootfs.to_owned(),
        source,
    };
    match std::fs::metadata(rootfs) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(err(std::io::Error::from_raw_os_error(libc::ENOTDIR))),
        Err(source) => Err(err(source)),
    }
}

/// Load `<bundle>/config.json`, validate it, and return it with the rootfs
/// resolved to an absolute path.
pub fn load_bundle(bundle: &Path) -> Result<(Spec, PathBuf), SpecError> {
    let path = bundle.join("config.json");
    let file = File::open(&path).map_err(|source| SpecError::Open {
        path: path.clone(),
        source,
    })?;
    let spec = parse_for_create(BufReader::new(file), &path)?;
    validate(&spec)?;
    let root = spec
        .root()
        .as_ref()
        .ok_or_else(|| SpecError::Invalid("root is missing".into()))?;
    let rootfs = if root.path().is_absolute() {
        root.path().clone()
    } else {
        bundle.join(root.path())
    };
    check_rootfs(&rootfs)?;
    Ok((spec, rootfs))
}

fn invalid(msg: impl Into<String>) -> SpecError {
    SpecError::Invalid(msg.into())
}

/// Structural checks the schema alone does not make.
pub fn validate(spec: &Spec) -> Result<(), SpecError> {
    let v = spec.version();
    if !v.starts_with("1.") {
        return Err(invalid(format!(
            "unsupported ociVersion {v:?} (moat supports 1.x)"
        )));
    }
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| invalid("process is missing"))?;
    match process.args() {
        Some(args) if !args.is_empty() && !args[0].is_empty() => {}
        _ => return Err(invalid("process.args must not be empty")),
    }
    if !process.cwd().is_absolute() {
        return Err(invalid(format!(
            "process.cwd {:?} must be absolute",
            process.cwd()
        )));
    }
    if let Some(env) = process.env() {
        if let Some(bad) = env.iter().find(|e| !e.contains('=')) {
            return Err(invalid(format!(
                "process.env entry {bad:?} is not KEY=VALUE"
            )));
        }
    }
    if process
        .apparmor_profile()
        .as_deref()
        .is_some_and(|p| !p.is_empty())
        && !apparmor_enabled()
    {
        return Err(invalid(
            "process.apparmorProfile is set but AppArmor is not enabled on this host",
        ));
    }
    if process
        .selinux_label()
        .as_deref()
        .is_some_and(|p| !p.is_empty())
        && !selinux_enabled()
    {
        return Err(invalid(
            "process.selinuxLabel is set but SELinux is not enabled on this host",
        ));
    }
    if let Some(linux) = spec.linux() {
        let namespaces = linux.namespaces().as_deref().unwrap_or(&[]);
        let mut seen = Vec::new();
        for ns in namespaces {
            if seen.contains(&ns.typ()) {
                return Err(invalid(format!("namespace {:?} is listed twice", ns.typ())));
            }
            seen.push(ns.typ());
        }
        let has = |t: LinuxNamespaceType| seen.contains(&t);
        let maps = linux.uid_mappings().as_deref().unwrap_or(&[]).len()
            + linux.gid_mappings().as_deref().unwrap_or(&[]).len();
        if maps > 0 && !has(LinuxNamespaceType::User) {
            return Err(invalid("uidMappings/gidMappings need a user namespace"));
        }
        let joins_user = namespaces
            .iter()
            .any(|n| n.typ() == LinuxNamespaceType::User && n.path().is_some());
        if has(LinuxNamespaceType::User) && !joins_user {
            check_mappings(
                "uidMappings",
                linux.uid_mappings().as_deref().unwrap_or(&[]),
            )?;
            check_mappings(
                "gidMappings",
                linux.gid_mappings().as_deref().unwrap_or(&[]),
            )?;
        }
        if spec.hostname().as_deref().is_some_and(|h| !h.is_empty())
            && !has(LinuxNamespaceType::Uts)
        {
            return Err(invalid("hostname needs a new uts namespace"));
        }
        if spec.domainname().as_deref().is_some_and(|h| !h.is_empty())
            && !has(LinuxNamespaceType::Uts)
        {
            return Err(invalid("domainname needs a new uts namespace"));
        }
        if linux.time_offsets().is_some() && !has(LinuxNamespaceType::Time) {
            return Err(invalid("timeOffsets need a time namespace"));
        }
        if let Some(sysctl) = linux.sysctl() {
            for key in sysctl.keys() {
                check_sysctl(key, &has)?;
            }
        }
    }
    crate::landlock::LandlockPolicy::from_spec(spec)?;
    Ok(())
}

/// Checks one list of ID mappings: non-empty, non-zero sizes, no overflow, no
/// overlap inside the container or on the host.
pub fn check_mappings(what: &str, maps: &[LinuxIdMapping]) -> Result<(), SpecError> {
    if maps.is_empty() {
        return Err(invalid(format!("a new user namespace needs {what}")));
    }
    if maps.len() > 340 {
        return Err(invalid(format!("{what}: at most 340 ranges are allowed")));
    }
    for (i, m) in maps.iter().enumerate() {
        if m.size() == 0 {
            return Err(invalid(format!("{what}[{i}]: size is 0")));
        }
        let end_c = u64::from(m.container_id()) + u64::from(m.size());
        let end_h = u64::from(m.host_id()) + u64::from(m.size());
        if end_c > u64::from(u32::MAX) || end_h > u64::from(u32::MAX) {
            return Err(invalid(format!("{what}[{i}]: range overflows 32 bits")));
        }
        for (j, o) in maps.iter().enumerate().skip(i + 1) {
            let overlap = |a: u32, b: u32| {
                let (a, b, n, k) = (
                    u64::from(a),
                    u64::from(b),
                    u64::from(m.size()),
                    u64::from(o.size()),
                );
                a < b + k && b < a + n
            };
            if overlap(m.container_id(), o.container_id()) {
                return Err(invalid(format!(
                    "{what}[{i}] and [{j}] overlap inside the container"
                )));
            }
            if overlap(m.host_id(), o.host_id()) {
                return Err(invalid(format!(
                    "{what}[{i}] and [{j}] overlap on the host"
                )));
            }
        }
    }
    Ok(())
}

/// Only namespaced sysctls are allowed, and only with their namespace.
fn check_sysctl(key: &str, has: &dyn Fn(LinuxNamespaceType) -> bool) -> Result<(), SpecError> {
    if key.is_empty() || key.contains("..") || key.starts_with('/') || key.contains('\0') {
        return Err(invalid(format!("sysctl {key:?} is not a valid name")));
    }
    let ipc = [
        "kernel.msgmax",
        "kernel.msgmnb",
        "kernel.msgmni",
        "kernel.sem",
        "kernel.shmall",
        "kernel.shmmax",
        "kernel.shmmni",
        "kernel.shm_rmid_forced",
    ];
    let needs = if ipc.contains(&key) || key.starts_with("fs.mqueue.") {
        LinuxNamespaceType::Ipc
    } else if key.starts_with("net.") {
        LinuxNamespaceType::Network
    } else if key == "kernel.hostname" || key == "kernel.domainname" {
        LinuxNamespaceType::Uts
    } else {
        return Err(invalid(format!(
            "sysctl {key:?} is not namespaced and would change the host"
        )));
    };
    if !has(needs) {
        return Err(invalid(format!(
            "sysctl {key:?} needs a new {needs:?} namespace"
        )));
    }
    Ok(())
}

fn apparmor_enabled() -> bool {
    std::fs::read_to_string("/sys/module/apparmor/parameters/enabled")
        .is_ok_and(|s| s.trim() == "Y")
}

fn selinux_enabled() -> bool {
    Path::new("/sys/fs/selinux/enforce").exists()
}

/// Merges `patch` into `target` as an update does: objects key by key,
/// any other value replacing what was there; nulls change nothing.
pub fn merge_json(target: &mut serde_json::Value, patch: &serde_json::Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(t), Some(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    continue;
                }
                let slot = t.entry(k.clone()).or_insert(serde_json::Value::Null);
                if slot.is_object() && v.is_object() {
                    merge_json(slot, v);
                } else {
                    *slot = v.clone();
                }
            }
        }
        _ if !patch.is_null() => *target = patch.clone(),
        _ => {}
    }
}

/// Records an `update`'s `resources` in the saved `config.json` at `path`
/// (its `linux.resources`, merged as [`merge_json`] does), as runc keeps
/// the limits in effect in its state: what reads the saved config later
/// (`moat run`'s report of a limit hit) sees the new limits. The file is
/// rewritten whole through a rename, its other properties kept as they
/// were, known to moat or not.
pub fn record_update(
    path: &Path,
    resources: &oci_spec::runtime::LinuxResources,
) -> std::io::Result<()> {
    let data = std::fs::read(path)?;
    let mode = std::fs::metadata(path)?.permissions();
    let mut config: serde_json::Value =
        serde_json::from_slice(&data).map_err(std::io::Error::other)?;
    let patch = serde_json::json!({
        "linux": {
            "resources": serde_json::to_value(resources).map_err(std::io::Error::other)?,
        }
    });
    merge_json(&mut config, &patch);
    let tmp = path.with_extension("json.update");
    std::fs::write(
        &tmp,
        serde_json::to_vec(&config).map_err(std::io::Error::other)?,
    )?;
    std::fs::set_permissions(&tmp, mode)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_update_is_recorded_over_the_saved_limits_and_nothing_else() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(
            &path,
            r#"{"ociVersion":"1.2.0","x-unknown":{"kept":1},
                "linux":{"resources":{"memory":{"limit":268435456,"reservation":1048576},
                                      "cpu":{"shares":512}}}}"#,
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let update: oci_spec::runtime::LinuxResources =
            serde_json::from_str(r#"{"memory":{"limit":33554432},"pids":{"limit":64}}"#).unwrap();
        record_update(&path, &update).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let r = &v["linux"]["resources"];
        assert_eq!(r["memory"]["limit"], 33554432);
        assert_eq!(r["memory"]["reservation"], 1048576, "{v}");
        assert_eq!(r["cpu"]["shares"], 512, "{v}");
        assert_eq!(r["pids"]["limit"], 64, "{v}");
        assert_eq!(v["x-unknown"]["kept"], 1, "{v}");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    fn spec_json(extra: &str) -> String {
        format!(
            r#"{{"ociVersion":"1.0.2","process":{{"args":["sh"],"cwd":"/","user":{{"uid":0,"gid":0}}}},
            "root":{{"path":"rootfs"}},"linux":{{"namespaces":[{{"type":"pid"}},{{"type":"mount"}}]}}{extra}}}"#
        )
    }

    fn parse(s: &str) -> Result<Spec, SpecError> {
        parse_reader(s.as_bytes(), Path::new("config.json"))
    }

    #[test]
    fn accepts_minimal_spec() {
        let spec = parse(&spec_json("")).unwrap();
        validate(&spec).unwrap();
    }

    fn unknown(s: &str) -> Vec<String> {
        super::parse(s.as_bytes(), Path::new("config.json"))
            .unwrap()
            .unknown
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn lists_unknown_properties_with_their_paths() {
        assert_eq!(unknown(&spec_json(r#","bogus":1"#)), ["bogus"]);
        let s = r#"{"ociVersion":"1.0.0","process":{"args":["a"],"cwd":"/","user":{"uid":0,"gid":0},"nope":true},
            "root":{"path":"r","readOnly":true},
            "mounts":[{"destination":"/a","type":"tmpfs"},{"destination":"/b","optoins":["ro"]}],
            "linux":{"seccompp":{"defaultAction":"SCMP_ACT_ERRNO"}}}"#;
        assert_eq!(
            unknown(s),
            [
                "process.nope",
                "root.readOnly",
                "mounts[1].optoins",
                "linux.seccompp"
            ]
        );
        // Still a valid spec, parsed as if they were absent.
        let spec = parse(s).unwrap();
        assert!(spec.linux().as_ref().unwrap().seccomp().is_none());
        let v: serde_json::Value = serde_json::from_str(s).unwrap();
        assert_eq!(unknown_properties(&v).unwrap().len(), 4);
    }

    #[test]
    fn annotations_are_free_form() {
        assert!(unknown(&spec_json(r#","annotations":{"x":"y"}"#)).is_empty());
    }

    #[test]
    fn no_mount_namespace_is_a_warning() {
        let s = parse(&spec_json("").replace(r#",{"type":"mount"}"#, "")).unwrap();
        validate(&s).unwrap();
        let w = warnings(&s);
        assert!(w.len() == 1 && w[0].contains("no mount namespace"), "{w:?}");
        assert!(warnings(&parse(&spec_json("")).unwrap()).is_empty());
    }

    #[test]
    fn refuses_malformed_json() {
        assert!(matches!(parse("{").unwrap_err(), SpecError::Parse { .. }));
        assert!(matches!(
            parse(&format!("{} x", spec_json(""))).unwrap_err(),
            SpecError::Parse { .. }
        ));
    }

    #[test]
    fn refuses_empty_args_and_relative_cwd() {
        let s = parse(
            r#"{"ociVersion":"1.0.0","process":{"args":[],"cwd":"/","user":{"uid":0,"gid":0}}}"#,
        )
        .unwrap();
        assert!(validate(&s).unwrap_err().to_string().contains("args"));
        let s = parse(
            r#"{"ociVersion":"1.0.0","process":{"args":["a"],"cwd":"x","user":{"uid":0,"gid":0}}}"#,
        )
        .unwrap();
        assert!(validate(&s).unwrap_err().to_string().contains("cwd"));
    }

    #[test]
    fn refuses_hostname_without_uts_and_host_sysctl() {
        let s = parse(&spec_json(r#","hostname":"x""#)).unwrap();
        assert!(validate(&s).unwrap_err().to_string().contains("uts"));
        let s = parse(&spec_json("").replace(
            r#"{"type":"mount"}]"#,
            r#"{"type":"mount"}],"sysctl":{"kernel.panic":"1"}"#,
        ))
        .unwrap();
        assert!(validate(&s)
            .unwrap_err()
            .to_string()
            .contains("not namespaced"));
    }

    #[test]
    fn mapping_arithmetic() {
        let m = |c: u32, h: u32, s: u32| {
            oci_spec::runtime::LinuxIdMappingBuilder::default()
                .container_id(c)
                .host_id(h)
                .size(s)
                .build()
                .unwrap()
        };
        check_mappings("uid", &[m(0, 100000, 65536)]).unwrap();
        assert!(check_mappings("uid", &[]).is_err());
        assert!(check_mappings("uid", &[m(0, 1, 0)]).is_err());
        assert!(check_mappings("uid", &[m(0, u32::MAX - 1, 10)]).is_err());
        assert!(check_mappings("uid", &[m(0, 1000, 10), m(5, 5000, 10)])
            .unwrap_err()
            .to_string()
            .contains("inside"));
        assert!(check_mappings("uid", &[m(0, 1000, 10), m(10, 1005, 10)])
            .unwrap_err()
            .to_string()
            .contains("host"));
        check_mappings("uid", &[m(0, 1000, 10), m(10, 1010, 10)]).unwrap();
    }
}
