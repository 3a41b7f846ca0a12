//! `moat spec`: a default config.json, like `runc spec`.
use serde_json::{json, Value};

const DEFAULT_CAPS: &[&str] = &["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"];

pub const MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/proc/scsi",
    "/sys/devices/virtual/powercap",
];

pub const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// The default bundle config: busybox-friendly, like `runc spec`.
pub fn default_spec(rootless: bool) -> Value {
    let mut spec = json!({
        "ociVersion": "1.2.0",
        "process": {
            "terminal": true,
            "user": {"uid": 0, "gid": 0},
            "args": ["sh"],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {
                "bounding": DEFAULT_CAPS, "effective": DEFAULT_CAPS, "permitted": DEFAULT_CAPS,
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": true},
        "hostname": "moat",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}
        ],
        "linux": {
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "cgroup"}],
            "maskedPaths": MASKED_PATHS,
            "readonlyPaths": READONLY_PATHS
        }
    });
    if rootless {
        to_rootless(&mut spec);
    }
    spec
}

/// Adjusts a default spec for an unprivileged user: a user namespace that
/// maps the caller to root, no devpts gid, /sys bound from the host, no
/// network namespace of its own (nothing could configure it) and no cgroup
/// resources (usually not delegated).
fn to_rootless(spec: &mut Value) {
    let uid = rustix::process::geteuid().as_raw();
    let gid = rustix::process::getegid().as_raw();
    let linux = &mut spec["linux"];
    linux["uidMappings"] = json!([{"containerID": 0, "hostID": uid, "size": 1}]);
    linux["gidMappings"] = json!([{"containerID": 0, "hostID": gid, "size": 1}]);
    if let Some(ns) = linux["namespaces"].as_array_mut() {
        ns.retain(|n| n["type"] != "network" && n["type"] != "cgroup");
        ns.push(json!({"type": "user"}));
    }
    if let Some(obj) = linux.as_object_mut() {
        obj.remove("resources");
    }
    if let Some(mounts) = spec["mounts"].as_array_mut() {
        for m in mounts.iter_mut() {
            if m["destination"] == "/dev/pts" {
                if let Some(o) = m["options"].as_array_mut() {
                    o.retain(|x| x != "gid=5");
                }
            }
            if m["destination"] == "/sys" {
                *m = json!({"destination": "/sys", "type": "none", "source": "/sys", "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]});
            }
        }
        mounts.retain(|m| m["destination"] != "/sys/fs/cgroup");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_spec_is_a_valid_moat_spec() {
        for rootless in [false, true] {
            let text = default_spec(rootless).to_string();
            let spec =
                moat_core::spec::parse_reader(text.as_bytes(), std::path::Path::new("config.json"))
                    .unwrap();
            moat_core::spec::validate(&spec).unwrap();
        }
    }

    #[test]
    fn rootless_spec_maps_caller() {
        let s = default_spec(true);
        assert_eq!(
            s["linux"]["uidMappings"][0]["hostID"],
            rustix::process::geteuid().as_raw()
        );
        assert!(s["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["type"] == "user"));
    }
}
