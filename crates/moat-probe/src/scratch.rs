//! The one directory the probe creates anything in (the device nodes of the
//! mknod checks): `moat-probe-<pid>` in the first writable place, made when
//! the probe starts and removed with everything in it when it ends. A probe
//! that is killed cannot remove its own: the next probe removes every such
//! directory whose process is gone (and that belongs to the user running
//! it). Checks in forked children, which a time limit may kill, create
//! nothing.
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

const PREFIX: &str = "moat-probe-";

/// Where the directory may go, in order; `$HOME` and the working directory
/// after the usual scratch places.
fn bases() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = ["/tmp", "/dev/shm", "/run", "/var/tmp"]
        .iter()
        .map(PathBuf::from)
        .collect();
    v.extend(std::env::var_os("HOME").map(PathBuf::from));
    v.extend(std::env::current_dir().ok());
    v.push(PathBuf::from("/"));
    v
}

/// The probe's scratch directory (None: nowhere writable), removed on drop.
#[derive(Debug)]
pub struct Scratch(Option<PathBuf>);

impl Scratch {
    pub fn create() -> Scratch {
        let bases = bases();
        for b in &bases {
            sweep(b);
        }
        let name = format!("{PREFIX}{}", std::process::id());
        let dir = bases
            .iter()
            .map(|b| b.join(&name))
            .find(|d| std::fs::DirBuilder::new().mode(0o700).create(d).is_ok());
        Scratch(dir)
    }

    pub fn path(&self) -> Option<&Path> {
        self.0.as_deref()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(d) = &self.0 {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Removes the scratch directories in `base` of probes that are gone.
fn sweep(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    let me = rustix::process::geteuid().as_raw();
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let ours = e
            .path()
            .symlink_metadata()
            .is_ok_and(|m| m.is_dir() && m.uid() == me);
        if ours && pid != std::process::id() && !alive(pid) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_and_removed_with_its_contents() {
        let s = Scratch::create();
        let Some(d) = s.path().map(Path::to_path_buf) else {
            return;
        };
        std::fs::write(d.join("x"), "").unwrap();
        drop(s);
        assert!(!d.exists());
    }

    #[test]
    fn sweeps_only_dead_probes_directories() {
        let t = tempfile::tempdir().unwrap();
        let pid_max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let dead = t.path().join(format!("{PREFIX}{}", pid_max + 1));
        let live = t.path().join(format!("{PREFIX}1"));
        let other = t.path().join("moat-probe-x");
        for d in [&dead, &live, &other] {
            std::fs::create_dir(d).unwrap();
        }
        std::fs::write(dead.join("null"), "").unwrap();
        sweep(t.path());
        assert!(!dead.exists());
        assert!(live.exists() && other.exists());
    }
}
