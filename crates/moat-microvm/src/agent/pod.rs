//! A Kubernetes pod's other containers in this guest ([`proto::Kind::Join`]):
//! each one's directories are ext4 images the host appended to the pod's
//! disk, mounted here through loop devices over their regions, and its
//! files and root live under [`proto::pod_dir`].
use std::fs::File;
use std::io::Read;
use std::path::{Component, Path};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::AgentError;
use crate::proto;

/// Modules a pod's guest loads when the first container joins it.
pub const POD_MODULES: &[&str] = &["loop"];

fn io(step: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
    let step = step.into();
    move |source| AgentError::Io { step, source }
}

/// Whether `id` may name a joined container in the guest (and a directory
/// under `/run/vm/pod`): an OCI ID as moat takes them, never `.` or `..`.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 1024
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+'))
        && id != super::GUEST_ID
}

/// Whether `path` is absolute, plain (no `..`) and under `dir`.
pub fn under(path: &str, dir: &str) -> bool {
    let p = Path::new(path);
    p.components()
        .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
        && p.starts_with(dir)
        && p != Path::new(dir)
}

/// The pod's disk: the virtio disk that starts with
/// [`proto::POD_DISK_MAGIC`] (waiting a little for the devices to appear).
pub fn find_disk() -> Result<File, AgentError> {
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(rd) = std::fs::read_dir("/dev") {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !(name.starts_with("vd") && name.len() == 3) {
                    continue;
                }
                let Ok(mut f) = File::open(e.path()) else {
                    continue;
                };
                let mut head = [0u8; 8];
                if f.read_exact(&mut head).is_ok() && &head == proto::POD_DISK_MAGIC {
                    return Ok(f);
                }
            }
        }
        if Instant::now() >= end {
            return Err(AgentError::Request(
                "this guest has no pod disk: it is not a pod's microVM".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Mounts each region of the pod's `disk` read-only at its mount point.
/// First drops the disk's cached pages: the host appended these images
/// after the guest may have read past the previous one's end (the loop
/// devices read the disk directly, so this is the only cache there is).
pub fn mount_regions(disk: &File, regions: &[proto::PodRegion]) -> Result<(), AgentError> {
    moat_sys::loopdev::flush_buffers(disk).map_err(io("drop the pod disk's cached pages"))?;
    for r in regions {
        let (_dev, path) = moat_sys::loopdev::attach_region(disk, r.offset, r.size).map_err(io(
            format!("attach a loop device at {} of the pod disk", r.offset),
        ))?;
        std::fs::create_dir_all(&r.mount).map_err(io(format!("create {}", r.mount)))?;
        // The loop device detaches itself once this mount is gone.
        super::serve::mount_image(&path, &r.mount)?;
    }
    Ok(())
}

/// Makes a pod's emptyDir volume in the guest, if new: world-writable, as
/// the kubelet makes them.
pub fn make_volume(dir: &str) -> Result<(), AgentError> {
    use std::os::unix::fs::PermissionsExt;
    if Path::new(dir).is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(io(format!("create {dir}")))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777))
        .map_err(io(format!("chmod {dir}")))
}

/// Points the namespaces `types` of `config` at those of the process
/// `pid` (the guest's own container): the joined container shares the
/// pod's network (its `localhost`), IPC and UTS namespaces there as it
/// would on the host.
pub fn share_namespaces(config: &mut Value, types: &[String], pid: impl Fn(&str) -> i32) {
    let file = |t: &str| match t {
        "network" => Some("net"),
        "ipc" => Some("ipc"),
        "uts" => Some("uts"),
        "pid" => Some("pid"),
        "cgroup" => Some("cgroup"),
        _ => None,
    };
    let Some(list) = config["linux"]["namespaces"].as_array_mut() else {
        return;
    };
    for t in types {
        let Some(f) = file(t) else { continue };
        let path = format!("/proc/{}/ns/{f}", pid(t));
        match list.iter_mut().find(|n| n["type"] == t.as_str()) {
            Some(n) => n["path"] = Value::String(path),
            None => list.push(serde_json::json!({"type": t, "path": path})),
        }
    }
}

/// Unmounts what a joined container had under `dir` (deepest first) and
/// removes the directory: its loop devices detach themselves.
pub fn clean_up(dir: &str) {
    for p in crate::pod::mounts_under(Path::new(dir)) {
        let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
    }
    let _ = std::fs::remove_dir_all(dir);
    // Its writable layer, when on the pod's disk (after its root's
    // overlay is gone).
    if let Some(id) = Path::new(dir).file_name().and_then(|n| n.to_str()) {
        let _ = std::fs::remove_dir_all(joined_rw(id));
    }
}

/// Where a joined container's writable layer (upper and work
/// directories) lives when the pod's VM has a disk for writable layers
/// (the run's `scratch`, mounted at the pod container's upper layer's
/// place): beside the pause container's `upper`, never in it.
pub fn joined_rw(id: &str) -> String {
    format!("{}/joined/{id}", super::serve::RUN_RW)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_joined_containers_paths_stay_in_its_directory() {
        assert!(valid_id("4f2a9c-app_1.x"));
        for bad in ["", ".", "..", "a/b", "w0", ".hidden", "a b"] {
            assert!(!valid_id(bad), "{bad:?}");
        }
        let dir = proto::pod_dir("c1");
        assert!(under(&format!("{dir}/files/0"), &dir));
        for bad in [
            dir.clone(),
            format!("{dir}/../c2/files/0"),
            "/run/vm/pod/c10/files/0".to_string(),
            "relative".to_string(),
        ] {
            assert!(!under(&bad, &dir), "{bad}");
        }
    }

    #[test]
    fn shared_namespaces_point_at_the_guests_container() {
        let mut c = serde_json::json!({"linux": {"namespaces": [
            {"type": "network"}, {"type": "mount"}, {"type": "pid"}
        ]}});
        share_namespaces(
            &mut c,
            &["network".into(), "ipc".into(), "mount".into()],
            |t| if t == "ipc" { 43 } else { 42 },
        );
        let ns = c["linux"]["namespaces"].as_array().unwrap();
        assert_eq!(ns[0]["path"], "/proc/42/ns/net");
        // A mount namespace is never shared; the PID one was not asked.
        assert!(ns[1].get("path").is_none());
        assert!(ns[2].get("path").is_none());
        assert_eq!(
            ns[3],
            serde_json::json!({"type": "ipc", "path": "/proc/43/ns/ipc"})
        );
    }
}
