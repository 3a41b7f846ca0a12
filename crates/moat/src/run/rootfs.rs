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

pub use moat_core::embedded::HOST_DIRS;

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
    for e in moat_core::embedded::host_etc_entries(&host.join("etc")) {
        let p = host.join("etc").join(&e);
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

/// One thing the embedded default root holds, relative to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// An empty directory (a mount point, or a parent of one).
    Dir(PathBuf),
    /// An empty file, to bind a host file on.
    File(PathBuf),
    /// A symlink (merged /usr: `bin -> usr/bin`).
    Link(PathBuf, PathBuf),
    /// A file with this content (the synthesized /etc/passwd, /etc/group).
    Text(PathBuf, String),
}

/// What the root holds, in creation order: the default mount points, the
/// merged-/usr `links`, one mount point for each mount in `mounts` outside a
/// tmpfs the runtime mounts itself (a directory when its source is one, else
/// a file), and the synthesized account files. Only reads the host.
pub fn layout(mounts: &[Value], links: &[(String, PathBuf)], uid: u32, gid: u32) -> Vec<Entry> {
    let mut out: Vec<Entry> = MOUNT_POINTS
        .iter()
        .map(|d| Entry::Dir(PathBuf::from(d)))
        .collect();
    for (name, target) in links {
        out.push(Entry::Link(PathBuf::from(name), target.clone()));
    }
    for m in mounts {
        let Some(dst) = m["destination"].as_str() else {
            continue;
        };
        if m["type"] != "bind" || under_tmpfs(dst) {
            continue;
        }
        let rel = PathBuf::from(dst.trim_start_matches('/'));
        if out.iter().any(|e| e.covers(&rel)) {
            continue;
        }
        let src_is_dir = m["source"]
            .as_str()
            .and_then(|s| fs::metadata(s).ok())
            .is_some_and(|md| md.is_dir());
        out.push(if src_is_dir {
            Entry::Dir(rel)
        } else {
            Entry::File(rel)
        });
    }
    // Where the tiers bind the user-space stack's resolv.conf when the
    // workload has its network: a host without one of its own must not
    // leave the root without the mount point (a read-only root, the
    // microvm tier's disk image above all, cannot grow one later).
    let resolv = PathBuf::from("etc/resolv.conf");
    if !out.iter().any(|e| e.covers(&resolv)) {
        out.push(Entry::File(resolv));
    }
    let (passwd, group) = passwd_group(uid, gid);
    out.push(Entry::Text("etc/passwd".into(), passwd));
    out.push(Entry::Text("etc/group".into(), group));
    out
}

impl Entry {
    fn path(&self) -> &Path {
        match self {
            Entry::Dir(p) | Entry::File(p) | Entry::Link(p, _) | Entry::Text(p, _) => p,
        }
    }

    /// Whether creating this entry makes `rel` exist (it is the entry, or a
    /// directory created on the way to it).
    fn covers(&self, rel: &Path) -> bool {
        let p = self.path();
        p == rel || (matches!(self, Entry::Dir(_)) && p.starts_with(rel))
    }

    /// A line that tells this entry apart from any other (the cache key).
    fn describe(&self) -> String {
        match self {
            Entry::Dir(p) => format!("d {}", p.display()),
            Entry::File(p) => format!("f {}", p.display()),
            Entry::Link(p, t) => format!("l {} {}", p.display(), t.display()),
            Entry::Text(p, text) => format!("t {} {text:?}", p.display()),
        }
    }
}

/// Creates the directory `root` holding `layout`.
pub fn build(root: &Path, layout: &[Entry]) -> Result<()> {
    let mkdir = |p: &Path| {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(p)
            .with_context(|| format!("cannot create {}", p.display()))
    };
    mkdir(root)?;
    for e in layout {
        let p = root.join(e.path());
        if let Entry::Dir(_) = e {
            mkdir(&p)?;
            continue;
        }
        if let Some(parent) = p.parent().filter(|d| *d != root) {
            mkdir(parent)?;
        }
        match e {
            Entry::Dir(_) => {}
            Entry::File(_) => {
                fs::write(&p, b"").with_context(|| format!("cannot create {}", p.display()))?
            }
            Entry::Link(_, target) => symlink(target, &p)
                .with_context(|| format!("cannot create symlink {}", p.display()))?,
            Entry::Text(_, text) => {
                fs::write(&p, text).with_context(|| format!("cannot write {}", p.display()))?
            }
        }
    }
    Ok(())
}

/// Gives the root `root` built by [`build`] (the directory and everything
/// in it, symlinks themselves) to host ID `owner`: the container's root
/// (container ID 0 maps to it) may then write in it, as `--read-write`
/// promises. Only for a root of this run's own, never the shared cache.
pub fn give_to(root: &Path, layout: &[Entry], owner: u32) -> Result<()> {
    let chown = |p: &Path| {
        std::os::unix::fs::lchown(p, Some(owner), Some(owner))
            .with_context(|| format!("cannot give {} to the container", p.display()))
    };
    chown(root)?;
    for e in layout {
        // Each entry, and the directories created on the way to it.
        let mut p = root.join(e.path());
        loop {
            if fs::symlink_metadata(&p).is_ok() {
                chown(&p)?;
            }
            match p.parent() {
                Some(parent) if parent != root && parent.starts_with(root) => {
                    p = parent.to_path_buf()
                }
                _ => break,
            }
        }
    }
    Ok(())
}

/// Entries the root cache keeps; older ones (other `-u` users, an older host
/// layout) are removed when a new one is made.
const CACHE_KEEP: usize = 8;

/// A root holding `layout`, shared by every read-only container that needs
/// the same one: `<state root>/.cache/rootfs/<sha256 of the layout>`, built
/// once and reused (creating and removing ~30 inodes per run cost ~5 ms on
/// ext4). Safe to share because the container mounts it read-only and only
/// ever sees it from its own user namespace, where its files belong to an
/// unmapped user; an entry not owned by us, or writable by others, is
/// refused ([`moat_jail::cache`]).
pub fn cached(state_root: &Path, layout: &[Entry]) -> Result<PathBuf> {
    let dir = moat_jail::cache::dir(state_root, "rootfs")
        .map_err(|e| anyhow::anyhow!(moat_core::error_chain(&e)))?;
    let lines: Vec<String> = layout.iter().map(Entry::describe).collect();
    let entry = dir.join(moat_jail::cache::key(&[
        b"moat-rootfs-v1",
        lines.join("\n").as_bytes(),
    ]));
    match fs::symlink_metadata(&entry) {
        Ok(md) if md.is_dir() && moat_jail::cache::trusted(&md) => return Ok(entry),
        Ok(_) => bail!(
            "refusing the cached root {}: not a directory of ours, or writable by others",
            entry.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot inspect {}", entry.display())),
    }
    let tmp = moat_jail::cache::temp_name(&dir);
    if let Err(e) = build(&tmp, layout) {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if moat_jail::cache::publish(&tmp, &entry)
        .map_err(|e| anyhow::anyhow!(moat_core::error_chain(&e)))?
    {
        moat_jail::cache::trim(&dir, CACHE_KEEP);
    }
    Ok(entry)
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
        fs::create_dir_all(h.join("etc/ssl/certs")).unwrap();
        fs::create_dir_all(h.join("etc/ssl/private")).unwrap();
        fs::create_dir_all(h.join("etc/java-21-openjdk")).unwrap();
        fs::write(h.join("etc/hosts"), "").unwrap();
        symlink("usr/bin", h.join("bin")).unwrap();
        symlink("/nonexistent", h.join("etc/resolv.conf")).unwrap();
        let (mounts, links) = host_mounts(h);
        let dsts: Vec<&str> = mounts
            .iter()
            .map(|m| m["destination"].as_str().unwrap())
            .collect();
        assert_eq!(
            dsts,
            vec![
                "/usr",
                "/lib64",
                "/etc/hosts",
                "/etc/ssl/certs",
                "/etc/java-21-openjdk"
            ]
        );
        assert!(mounts
            .iter()
            .all(|m| m["options"].as_array().unwrap().contains(&json!("ro"))));
        assert_eq!(links, vec![("bin".to_string(), PathBuf::from("usr/bin"))]);

        let root = h.join("root");
        build(&root, &layout(&mounts, &links, 65534, 65534)).unwrap();
        assert!(root.join("usr").is_dir());
        assert!(root.join("etc/hosts").is_file());
        assert!(root.join("etc/ssl/certs").is_dir());
        assert!(!root.join("etc/ssl/private").exists());
        // The host's resolv.conf dangles (not bound), but its mount point
        // is there for the stack's.
        assert!(fs::symlink_metadata(root.join("etc/resolv.conf"))
            .unwrap()
            .is_file());
        assert_eq!(
            fs::read_link(root.join("bin")).unwrap(),
            Path::new("usr/bin")
        );
        let passwd = fs::read_to_string(root.join("etc/passwd")).unwrap();
        assert!(passwd.contains("nobody:x:65534:65534"));
        assert!(!passwd.contains("user:x:"));
    }

    #[test]
    fn the_cached_root_is_built_once_per_layout() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path();
        let links = vec![("bin".to_string(), PathBuf::from("usr/bin"))];
        let a = cached(state, &layout(&[], &links, 65534, 65534)).unwrap();
        assert!(a.join("etc/passwd").is_file());
        assert_eq!(fs::read_link(a.join("bin")).unwrap(), Path::new("usr/bin"));
        // A marker survives: the second run reuses the entry, not a rebuild.
        fs::write(a.join("marker"), "").unwrap();
        let again = cached(state, &layout(&[], &links, 65534, 65534)).unwrap();
        assert_eq!(again, a);
        assert!(again.join("marker").exists());
        // Another user's accounts make another root.
        let b = cached(state, &layout(&[], &links, 1000, 1000)).unwrap();
        assert_ne!(a, b);
        assert!(fs::read_to_string(b.join("etc/passwd"))
            .unwrap()
            .contains("user:x:1000:1000:"));
        // An entry others can write is refused, not used.
        fs::set_permissions(&a, fs::Permissions::from_mode(0o777)).unwrap();
        assert!(cached(state, &layout(&[], &links, 65534, 65534)).is_err());
        // No build leftovers.
        let dir = state.join(".cache/rootfs");
        assert!(fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().starts_with(".tmp")));
    }

    #[test]
    fn other_users_get_an_account() {
        let (p, g) = passwd_group(1000, 1001);
        assert!(p.contains("user:x:1000:1001:"));
        assert!(g.contains("user:x:1001:"));
    }
}
