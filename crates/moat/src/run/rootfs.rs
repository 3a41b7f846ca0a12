//! The embedded default root: an empty directory that becomes the
//! container's `/`, holding only mount points, the merged-/usr symlinks and a
//! synthesized /etc/passwd and /etc/group. Everything else comes from
//! read-only bind mounts of the host's own files (listed by [`host_mounts`])
//! and from size-limited tmpfs mounts (in `defaults`).
use std::fs;
use std::os::unix::fs::{symlink, DirBuilderExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// Top-level host directories shared read-only (those that exist).
pub const HOST_DIRS: &[&str] = &["usr", "bin", "sbin", "lib", "lib64", "lib32"];

/// Host /etc entries programs need: the dynamic linker's cache, name
/// resolution, TLS roots, Debian's alternatives (targets of /usr/bin links).
pub const HOST_ETC: &[&str] = &[
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "hosts",
    "resolv.conf",
    "nsswitch.conf",
    "host.conf",
    "localtime",
    "ssl",
    "ca-certificates",
    "alternatives",
];

/// Directories created empty in the root, to mount on.
pub const MOUNT_POINTS: &[&str] = &["proc", "dev", "sys", "tmp", "home/user", "etc"];

/// A parsed `-v SRC:DST[:ro]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    pub source: PathBuf,
    pub destination: PathBuf,
    pub readonly: bool,
}

impl Volume {
    pub fn parse(s: &str) -> Result<Volume> {
        let parts: Vec<&str> = s.split(':').collect();
        let (src, dst, ro) = match parts.as_slice() {
            [src, dst] => (*src, *dst, false),
            [src, dst, "ro"] => (*src, *dst, true),
            [src, dst, "rw"] => (*src, *dst, false),
            _ => bail!("--volume {s:?}: expected SRC:DST[:ro|rw]"),
        };
        if !dst.starts_with('/') {
            bail!("--volume {s:?}: DST must be an absolute path");
        }
        if Path::new(dst)
            .components()
            .any(|c| c == std::path::Component::ParentDir)
        {
            bail!("--volume {s:?}: DST must not contain `..`");
        }
        let source = fs::canonicalize(src)
            .with_context(|| format!("--volume {s:?}: source {src:?} does not exist"))?;
        Ok(Volume {
            source,
            destination: PathBuf::from(dst),
            readonly: ro,
        })
    }

    pub fn mount(&self) -> Value {
        let mut opts = vec!["rbind", "nosuid", "nodev"];
        opts.push(if self.readonly { "ro" } else { "rw" });
        json!({"destination": self.destination, "type": "bind", "source": self.source, "options": opts})
    }
}

/// Read-only bind mounts of the host's files that exist here, and the
/// top-level symlinks (merged /usr) to recreate in the root.
pub fn host_mounts(host: &Path) -> (Vec<Value>, Vec<(String, PathBuf)>) {
    let ro = |src: PathBuf, dst: String| {
        json!({"destination": dst, "type": "bind", "source": src,
               "options": ["rbind", "ro", "nosuid", "nodev"]})
    };
    let mut mounts = Vec::new();
    let mut links = Vec::new();
    for d in HOST_DIRS {
        let p = host.join(d);
        match fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                if let Ok(target) = fs::read_link(&p) {
                    links.push((d.to_string(), target));
                }
            }
            Ok(m) if m.is_dir() => mounts.push(ro(p, format!("/{d}"))),
            _ => {}
        }
    }
    for e in HOST_ETC {
        let p = host.join("etc").join(e);
        // The source must resolve (resolv.conf is often a symlink into /run).
        if fs::metadata(&p).is_ok() {
            mounts.push(ro(p, format!("/etc/{e}")));
        }
    }
    (mounts, links)
}

/// /etc/passwd and /etc/group for root, `nobody` and the container user.
pub fn passwd_group(uid: u32, gid: u32) -> (String, String) {
    let mut passwd = String::from("root:x:0:0:root:/:/bin/sh\n");
    let mut group = String::from("root:x:0:\n");
    if uid != 0 && uid != 65534 {
        passwd.push_str(&format!("user:x:{uid}:{gid}:user:/home/user:/bin/sh\n"));
    }
    passwd.push_str("nobody:x:65534:65534:nobody:/home/user:/bin/sh\n");
    if gid != 0 && gid != 65534 {
        group.push_str(&format!("user:x:{gid}:\n"));
    }
    group.push_str("nogroup:x:65534:\n");
    (passwd, group)
}

/// Creates the root directory `root` with its mount points: the default
/// ones, one for each mount in `mounts` outside a tmpfs the runtime mounts
/// itself, the merged-/usr `links`, and the synthesized account files.
pub fn build(
    root: &Path,
    mounts: &[Value],
    links: &[(String, PathBuf)],
    uid: u32,
    gid: u32,
) -> Result<()> {
    let mkdir = |p: &Path| {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(p)
            .with_context(|| format!("cannot create {}", p.display()))
    };
    mkdir(root)?;
    for d in MOUNT_POINTS {
        mkdir(&root.join(d))?;
    }
    for (name, target) in links {
        symlink(target, root.join(name))
            .with_context(|| format!("cannot create symlink /{name}"))?;
    }
    for m in mounts {
        let Some(dst) = m["destination"].as_str() else {
            continue;
        };
        if m["type"] != "bind" || under_tmpfs(dst) {
            continue;
        }
        let rel = root.join(dst.trim_start_matches('/'));
        if rel.exists() {
            continue;
        }
        let src_is_dir = m["source"]
            .as_str()
            .and_then(|s| fs::metadata(s).ok())
            .is_some_and(|md| md.is_dir());
        if src_is_dir {
            mkdir(&rel)?;
        } else {
            if let Some(parent) = rel.parent() {
                mkdir(parent)?;
            }
            fs::write(&rel, b"").with_context(|| format!("cannot create {}", rel.display()))?;
        }
    }
    let (passwd, group) = passwd_group(uid, gid);
    for (name, text) in [("passwd", passwd), ("group", group)] {
        let p = root.join("etc").join(name);
        fs::write(&p, text).with_context(|| format!("cannot write {}", p.display()))?;
    }
    Ok(())
}

/// Destinations inside a tmpfs mounted by the runtime: it creates their
/// mount points itself, in memory the container owns.
fn under_tmpfs(dst: &str) -> bool {
    ["/tmp", "/home/user", "/dev"]
        .iter()
        .any(|t| dst == *t || dst.starts_with(&format!("{t}/")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volumes_parse() {
        let v = Volume::parse("/tmp:/data:ro").unwrap();
        assert!(v.readonly);
        assert_eq!(v.destination, PathBuf::from("/data"));
        assert!(!Volume::parse("/tmp:/data").unwrap().readonly);
        assert!(Volume::parse("/tmp:data").is_err());
        assert!(Volume::parse("/tmp:/a/../b").is_err());
        assert!(Volume::parse("/tmp:/d:xx").is_err());
        assert!(Volume::parse("/does/not/exist:/d").is_err());
    }

    #[test]
    fn merged_usr_hosts_get_symlinks_not_binds() {
        let tmp = tempfile::tempdir().unwrap();
        let h = tmp.path();
        fs::create_dir_all(h.join("usr/bin")).unwrap();
        fs::create_dir_all(h.join("lib64")).unwrap();
        fs::create_dir_all(h.join("etc/ssl")).unwrap();
        fs::write(h.join("etc/hosts"), "").unwrap();
        symlink("usr/bin", h.join("bin")).unwrap();
        symlink("/nonexistent", h.join("etc/resolv.conf")).unwrap();
        let (mounts, links) = host_mounts(h);
        let dsts: Vec<&str> = mounts
            .iter()
            .map(|m| m["destination"].as_str().unwrap())
            .collect();
        assert_eq!(dsts, vec!["/usr", "/lib64", "/etc/hosts", "/etc/ssl"]);
        assert!(mounts
            .iter()
            .all(|m| m["options"].as_array().unwrap().contains(&json!("ro"))));
        assert_eq!(links, vec![("bin".to_string(), PathBuf::from("usr/bin"))]);

        let root = h.join("root");
        build(&root, &mounts, &links, 65534, 65534).unwrap();
        assert!(root.join("usr").is_dir());
        assert!(root.join("etc/hosts").is_file());
        assert!(root.join("etc/ssl").is_dir());
        assert_eq!(
            fs::read_link(root.join("bin")).unwrap(),
            Path::new("usr/bin")
        );
        let passwd = fs::read_to_string(root.join("etc/passwd")).unwrap();
        assert!(passwd.contains("nobody:x:65534:65534"));
        assert!(!passwd.contains("user:x:"));
    }

    #[test]
    fn other_users_get_an_account() {
        let (p, g) = passwd_group(1000, 1001);
        assert!(p.contains("user:x:1000:1001:"));
        assert!(g.contains("user:x:1001:"));
    }
}
