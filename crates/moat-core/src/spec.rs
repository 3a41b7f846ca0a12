//! Loading and validating an OCI runtime-spec `config.json`.
//!
//! The file is parsed once, strictly: a field moat does not know is refused
//! with its JSON path rather than silently ignored, since an ignored field in a
//! security configuration is a silently dropped protection.
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
    #[error("invalid {path}: unknown field `{field}`")]
    UnknownField { path: PathBuf, field: String },
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

/// Parse `path` as an OCI runtime spec, refusing unknown fields.
pub fn parse_file(path: &Path) -> Result<Spec, SpecError> {
    let file = File::open(path).map_err(|source| SpecError::Open {
        path: path.to_owned(),
        source,
    })?;
    parse_reader(BufReader::new(file), path)
}

/// Parse a spec from a reader; `path` only names it in errors.
pub fn parse_reader<R: std::io::Read>(reader: R, path: &Path) -> Result<Spec, SpecError> {
    let mut de = serde_json::Deserializer::from_reader(reader);
    let mut unknown: Option<String> = None;
    let spec: Spec = serde_ignored::deserialize(&mut de, |p| {
        // serde_ignored writes `?` for each Option layer; drop those segments.
        let p = p
            .to_string()
            .replace("?.", "")
            .trim_end_matches(".?")
            .to_owned();
        // Annotations are free-form by definition; everything else must be known.
        if unknown.is_none() && !p.starts_with("annotations") {
            unknown = Some(p);
        }
    })
    .map_err(|e| SpecError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    de.end().map_err(|e| SpecError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    if let Some(field) = unknown {
        return Err(SpecError::UnknownField {
            path: path.to_owned(),
            field,
        });
    }
    Ok(spec)
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
    let spec = parse_file(&bundle.join("config.json"))?;
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

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn refuses_unknown_field_with_its_path() {
        let err = parse(&spec_json(r#","bogus":1"#)).unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
        let err = parse(r#"{"ociVersion":"1.0.0","process":{"args":["a"],"cwd":"/","user":{"uid":0,"gid":0},"nope":true}}"#).unwrap_err();
        assert!(err.to_string().contains("process.nope"), "{err}");
    }

    #[test]
    fn annotations_are_free_form() {
        parse(&spec_json(r#","annotations":{"x":"y"}"#)).unwrap();
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
