//! moat's Landlock policy: which paths of the container may be read, written
//! or used as device/process files, carried in the `dev.moat.landlock`
//! annotation (the runtime spec has no Landlock field). The container tier
//! turns it into a Landlock ruleset right before the workload's exec
//! (`moat_jail::landlock`).
//!
//! The annotation's value is either `auto`, the policy derived from the
//! spec's own root and mounts ([`LandlockPolicy::derive`]), or a JSON object
//! `{"read": [..], "write": [..], "files": [..]}` of absolute container paths:
//! - `read`: read files, list directories, execute;
//! - `write`: everything but creating device nodes (create, remove, rename,
//!   write, truncate; for writable mounts);
//! - `files`: read, write and truncate existing files, list directories,
//!   ioctl on devices, nothing created or removed (for `/dev`, `/proc`).
//!
//! Everything not beneath one of these paths is denied; the rules are an
//! extra layer under mount flags, DAC and seccomp, never a loosening.
use std::path::{Component, Path, PathBuf};

use oci_spec::runtime::Spec;
use serde::{Deserialize, Serialize};

use crate::spec::SpecError;

/// The annotation that carries the policy.
pub const LANDLOCK_ANNOTATION: &str = "dev.moat.landlock";

/// Paths of the container, by the access granted beneath them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LandlockPolicy {
    #[serde(default)]
    pub read: Vec<PathBuf>,
    #[serde(default)]
    pub write: Vec<PathBuf>,
    #[serde(default)]
    pub files: Vec<PathBuf>,
    /// When present, execute is granted beneath these paths only (not with
    /// `read` or `write`); a path the container lacks is skipped. The
    /// sandbox tier derives it from its policy, so that what its
    /// supervisor decided about an exec holds in the kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execute: Option<Vec<PathBuf>>,
}

impl LandlockPolicy {
    /// The policy the spec asks for, if any; an invalid annotation is an
    /// error (never silently no policy).
    pub fn from_spec(spec: &Spec) -> Result<Option<LandlockPolicy>, SpecError> {
        let Some(value) = spec
            .annotations()
            .as_ref()
            .and_then(|a| a.get(LANDLOCK_ANNOTATION))
        else {
            return Ok(None);
        };
        let policy = if value.trim() == "auto" {
            LandlockPolicy::derive(spec)
        } else {
            serde_json::from_str::<LandlockPolicy>(value).map_err(|e| {
                SpecError::Invalid(format!(
                    "annotation {LANDLOCK_ANNOTATION}: expected \"auto\" or \
                     {{\"read\":[..],\"write\":[..],\"files\":[..]}}: {e}"
                ))
            })?
        };
        policy.check()?;
        Ok(Some(policy))
    }

    /// Read and execute on the root; `write` on the root when it is not
    /// read-only and on every mount without `ro` (tmpfs, binds, mqueue…);
    /// `files` on `/dev` and on proc, devpts, sysfs and cgroup mounts without
    /// `ro`. Read-only mounts get nothing beyond the root's read.
    pub fn derive(spec: &Spec) -> LandlockPolicy {
        let mut p = LandlockPolicy {
            read: vec![PathBuf::from("/")],
            ..LandlockPolicy::default()
        };
        if spec.root().as_ref().and_then(|r| r.readonly()) != Some(true) {
            p.write.push(PathBuf::from("/"));
        }
        for m in spec.mounts().as_deref().unwrap_or(&[]) {
            let dst = m.destination();
            let ro = m
                .options()
                .as_deref()
                .unwrap_or(&[])
                .iter()
                .any(|o| o == "ro" || o == "rro");
            let typ = m.typ().as_deref().unwrap_or("");
            let kernel_files = matches!(typ, "proc" | "devpts" | "sysfs" | "cgroup" | "cgroup2");
            if dst == Path::new("/dev") || (kernel_files && !ro) {
                p.files.push(dst.clone());
            } else if !ro {
                p.write.push(dst.clone());
            }
        }
        p
    }

    fn check(&self) -> Result<(), SpecError> {
        let execute = self.execute.as_deref().unwrap_or(&[]);
        for path in self
            .read
            .iter()
            .chain(&self.write)
            .chain(&self.files)
            .chain(execute)
        {
            let ok = path.is_absolute() && !path.components().any(|c| c == Component::ParentDir);
            if !ok {
                return Err(SpecError::Invalid(format!(
                    "annotation {LANDLOCK_ANNOTATION}: {path:?} must be an absolute path without `..`"
                )));
            }
        }
        Ok(())
    }

    /// The JSON form, for the annotation.
    pub fn to_annotation(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(extra: &str) -> Spec {
        let text = format!(
            r#"{{"ociVersion":"1.2.0","root":{{"path":"rootfs","readonly":true}},
              "process":{{"args":["sh"],"cwd":"/","user":{{"uid":0,"gid":0}}}},
              "mounts":[
                {{"destination":"/proc","type":"proc","source":"proc"}},
                {{"destination":"/dev","type":"tmpfs","source":"tmpfs"}},
                {{"destination":"/dev/pts","type":"devpts","source":"devpts"}},
                {{"destination":"/dev/shm","type":"tmpfs","source":"shm"}},
                {{"destination":"/sys","type":"sysfs","source":"sysfs","options":["ro"]}},
                {{"destination":"/usr","type":"bind","source":"/usr","options":["rbind","ro"]}},
                {{"destination":"/data","type":"bind","source":"/srv","options":["rbind","rw"]}},
                {{"destination":"/tmp","type":"tmpfs","source":"tmpfs"}}
              ]{extra}}}"#
        );
        crate::spec::parse_reader(text.as_bytes(), Path::new("config.json")).unwrap()
    }

    fn paths(v: &[&str]) -> Vec<PathBuf> {
        v.iter().map(PathBuf::from).collect()
    }

    #[test]
    fn derived_from_root_and_mounts() {
        let p = LandlockPolicy::derive(&spec(""));
        assert_eq!(p.read, paths(&["/"]));
        assert_eq!(p.write, paths(&["/dev/shm", "/data", "/tmp"]));
        assert_eq!(p.files, paths(&["/proc", "/dev", "/dev/pts"]));
    }

    #[test]
    fn writable_root_is_written() {
        let s = spec("").to_owned();
        let mut root = s.root().clone().unwrap();
        root.set_readonly(Some(false));
        let mut s = s;
        s.set_root(Some(root));
        assert_eq!(LandlockPolicy::derive(&s).write[0], PathBuf::from("/"));
    }

    #[test]
    fn annotation_forms() {
        assert_eq!(LandlockPolicy::from_spec(&spec("")).unwrap(), None);
        let auto = spec(r#","annotations":{"dev.moat.landlock":"auto"}"#);
        assert_eq!(
            LandlockPolicy::from_spec(&auto).unwrap(),
            Some(LandlockPolicy::derive(&auto))
        );
        let json = spec(
            r#","annotations":{"dev.moat.landlock":"{\"read\":[\"/\"],\"write\":[\"/tmp\"]}"}"#,
        );
        let p = LandlockPolicy::from_spec(&json).unwrap().unwrap();
        assert_eq!(p.write, paths(&["/tmp"]));
        assert!(p.files.is_empty());
        assert_eq!(
            serde_json::from_str::<LandlockPolicy>(&p.to_annotation()).unwrap(),
            p
        );
    }

    #[test]
    fn execute_list_round_trips() {
        let json = spec(
            r#","annotations":{"dev.moat.landlock":"{\"read\":[\"/\"],\"execute\":[\"/usr\"]}"}"#,
        );
        let p = LandlockPolicy::from_spec(&json).unwrap().unwrap();
        assert_eq!(p.execute, Some(paths(&["/usr"])));
        assert!(!LandlockPolicy::derive(&json)
            .to_annotation()
            .contains("execute"));
    }

    #[test]
    fn bad_annotations_are_refused() {
        for bad in [
            r#""yes""#,
            r#""{\"read\":[\"usr\"]}""#,
            r#""{\"write\":[\"/tmp/../etc\"]}""#,
            r#""{\"exec\":[\"/\"]}""#,
        ] {
            let s = spec(&format!(r#","annotations":{{"dev.moat.landlock":{bad}}}"#));
            let e = LandlockPolicy::from_spec(&s).unwrap_err().to_string();
            assert!(e.contains(LANDLOCK_ANNOTATION), "{bad}: {e}");
        }
    }
}
