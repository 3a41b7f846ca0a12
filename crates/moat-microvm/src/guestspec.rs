//! The container's config.json as the guest runs it, derived from the one
//! the host was given (pure: no I/O beyond reading the bind sources'
//! kinds and the small files the guest gets a copy of).
//!
//! - The root becomes `/run/vm/root`: an overlay in the guest whose lower
//!   layer is the root's image (disk 0) and whose upper layer is guest
//!   memory, so mount points can be made and the container tier then makes
//!   the root read-only as `root.readonly` says.
//! - Each read-only directory bind mount becomes a disk; a read-write one
//!   (a volume whose writes must reach the host) becomes a virtio-fs share
//!   served by virtiofsd on the host ([`crate::volumes`]), except a
//!   read-write `/dev/shm` (engines bind a host tmpfs there), which becomes
//!   a guest tmpfs. Each file bind mount (an engine's /etc/hosts,
//!   resolv.conf, …) of at most [`MAX_FILE`] bytes is copied into the
//!   guest; a larger one joins the group disk, read-only. Device binds of `/dev/*`
//!   stay: the guest has its own.
//! - Hooks, joined namespaces' paths and the cgroup path belong to the
//!   host; they are dropped from the guest's config (the runtime runs the
//!   prestart, createRuntime, poststart and poststop hooks on the host),
//!   but for startContainer hooks, which the runtime-spec runs in the
//!   container's namespaces with a path resolved in the container's root:
//!   the guest's container tier runs them there, before the process.
//!   createContainer hooks, whose path resolves in the runtime's namespace
//!   (the host's) but which run in the container's (the guest's), are not
//!   run: a warning.
//!   Annotations that pick a tier or a network stack are removed, so the
//!   guest's moat runs the container tier.
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

/// Where the guest mounts disk `i`.
pub fn disk_mount(i: usize) -> String {
    format!("/run/vm/disk/{i}")
}
/// The container's root in the guest.
pub const GUEST_ROOT: &str = "/run/vm/root";
/// Largest file copied into the guest for a file bind mount.
pub const MAX_FILE: u64 = 1 << 20;
/// Most disks one container may have: QEMU's microvm offers eight
/// virtio-mmio slots, and the agent channel and the entropy device take two.
/// A read-write volume's share takes none: it is hot-added on a PCIe port
/// (QEMU) or fills a virtio-fs slot (moat's own VMM), as many of either
/// ([`Probe::volume_ports`]).
pub const MAX_DISKS: usize = 6;

/// Makes a volume's bind a slave of the guest's mount at its source,
/// whatever propagation the config asked for (engines ask `rprivate`): a
/// container held before the snapshot (its volume not there yet) binds
/// the empty shared mount the agent made at the source, and sees the
/// volume once the agent mounts it there (design.md, *Primed
/// snapshots*). Nothing else is ever mounted under a volume's source.
fn slave_propagation(m: &mut Value) {
    const PROPAGATION: &[&str] = &[
        "shared",
        "rshared",
        "slave",
        "rslave",
        "private",
        "rprivate",
        "unbindable",
        "runbindable",
    ];
    let mut options: Vec<Value> = m["options"]
        .as_array()
        .map(|o| {
            o.iter()
                .filter(|x| !x.as_str().is_some_and(|x| PROPAGATION.contains(&x)))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    options.push(json!("rslave"));
    m["options"] = Value::Array(options);
}

/// Where the guest mounts read-write volume `i` (a virtio-fs share).
pub fn volume_mount(i: usize) -> String {
    format!("{VOLUME_DIR}/{i}")
}

const VOLUME_DIR: &str = "/run/vm/fs";

/// Whether `path` is where the guest mounts a read-write volume
/// ([`volume_mount`]).
pub fn is_volume_mount(path: &str) -> bool {
    path.strip_prefix(VOLUME_DIR)
        .and_then(|r| r.strip_prefix('/'))
        .is_some_and(|i| i.parse::<usize>().is_ok())
}

/// The virtio-fs tag of read-write volume `i`.
pub fn volume_tag(i: usize) -> String {
    format!("moatfs{i}")
}

/// A host directory the guest mounts read-write through virtio-fs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeNeed {
    pub source: PathBuf,
    pub mount: String,
    pub tag: String,
}

/// A directory to image, and where the guest mounts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskNeed {
    pub source: PathBuf,
    pub mount: String,
}

/// Where the guest mounts the group disk: the small directories, each at
/// `GROUP_MOUNT/<k>`, share one image (QEMU's microvm has eight virtio
/// slots, the agent channel and the entropy device take two).
pub const GROUP_MOUNT: &str = "/run/vm/group";

/// A host file whose contents the guest gets at `guest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileNeed {
    pub source: PathBuf,
    pub guest: String,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub config: Value,
    /// Disk 0 is the root; then directories with a disk of their own.
    pub disks: Vec<DiskNeed>,
    /// Directories that share the group disk, in order (`<k>` is the
    /// index).
    pub group: Vec<PathBuf>,
    pub files: Vec<FileNeed>,
    /// Read-write directories, shared through virtio-fs.
    pub volumes: Vec<VolumeNeed>,
    pub warnings: Vec<String>,
}

/// Annotations the guest's moat must not see.
const HOST_ONLY_ANNOTATIONS: &[&str] = &[
    moat_core::tier::TIER_ANNOTATION,
    moat_core::tier::SANDBOX_POLICY_ANNOTATION,
    moat_core::net::EGRESS_ANNOTATION,
    moat_core::net::PUBLISH_ANNOTATION,
    "dev.moat.run.owner",
    "dev.moat.sandbox.learn",
];

/// What a bind source is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    Dir,
    /// A regular file of at most [`MAX_FILE`] bytes (copied into the guest).
    File,
    /// A larger regular file (imaged with the group disk).
    LargeFile,
    Device,
    Other,
}

pub fn source_kind(p: &Path) -> SourceKind {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::metadata(p) {
        Ok(m) if m.is_dir() => SourceKind::Dir,
        Ok(m) if m.is_file() && m.len() > MAX_FILE => SourceKind::LargeFile,
        Ok(m) if m.is_file() => SourceKind::File,
        Ok(m) if m.file_type().is_char_device() => SourceKind::Device,
        _ => SourceKind::Other,
    }
}

fn is_bind(m: &Value) -> bool {
    m["type"] == "bind"
        || m["options"]
            .as_array()
            .is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"))
}

fn read_only(m: &Value) -> bool {
    m["options"]
        .as_array()
        .is_some_and(|o| o.iter().any(|x| x == "ro"))
}

/// What to ask of the host while planning: what a bind source is, and
/// whether a directory gets a disk of its own (large, shared ones: the
/// host's /usr) or joins the group disk.
pub struct Probe<'a> {
    pub kind: &'a dyn Fn(&Path) -> SourceKind,
    pub own_disk: &'a dyn Fn(&Path) -> bool,
    /// Whether a read-only file bind's source joins the group disk (a host
    /// file the embedded default shows: the same for every container, so
    /// its cached image carries it) rather than being copied into every
    /// `Run` request.
    pub shared_file: &'a dyn Fn(&Path) -> bool,
    /// Read-write volumes are not disk slots but cards on this many PCIe
    /// ports (QEMU: `VmmPlan::share_port`) or virtio-fs slots (moat's own
    /// VMM: `VmmPlan::fs_slots`).
    pub volume_ports: usize,
}

/// The guest's config for `spec` (a config.json) whose root is `rootfs`.
pub fn plan(spec: &Value, rootfs: &Path, probe: &Probe) -> Result<Plan, String> {
    let mut config = spec.clone();
    let mut plan = Plan {
        config: Value::Null,
        disks: vec![DiskNeed {
            source: rootfs.to_owned(),
            mount: disk_mount(0),
        }],
        group: Vec::new(),
        files: Vec::new(),
        volumes: Vec::new(),
        warnings: Vec::new(),
    };
    config["root"]["path"] = json!(GUEST_ROOT);
    let mounts = config["mounts"].as_array().cloned().unwrap_or_default();
    let mut out = Vec::with_capacity(mounts.len());
    for mut m in mounts {
        if is_bind(&m) {
            translate_bind(&mut m, &mut plan, probe)?;
        }
        out.push(m);
    }
    config["mounts"] = Value::Array(out);
    let disks = plan.disks.len() + usize::from(!plan.group.is_empty());
    if disks > MAX_DISKS {
        return Err(format!(
            "{disks} disks to share with the guest; the microvm tier takes at most {MAX_DISKS}"
        ));
    }
    if plan.volumes.len() > probe.volume_ports {
        return Err(format!(
            "{} read-write volumes; the microvm tier takes at most {}",
            plan.volumes.len(),
            probe.volume_ports
        ));
    }
    if let Some(hooks) = config.get("hooks").filter(|h| !h.is_null()) {
        if hooks["createContainer"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
        {
            plan.warnings.push(
                "the microvm tier does not run createContainer hooks: their paths are the host's, and they would run in the container's namespaces, which are the guest's".into(),
            );
        }
        let start = hooks["startContainer"]
            .as_array()
            .filter(|a| !a.is_empty())
            .cloned();
        match start {
            Some(start) => config["hooks"] = json!({ "startContainer": start }),
            None => {
                config.as_object_mut().map(|o| o.remove("hooks"));
            }
        }
    }
    if let Some(linux) = config.get_mut("linux").and_then(Value::as_object_mut) {
        linux.remove("cgroupsPath");
        if let Some(ns) = linux.get_mut("namespaces").and_then(Value::as_array_mut) {
            for n in ns.iter_mut() {
                if let Some(o) = n.as_object_mut() {
                    let ty = o
                        .get("type")
                        .and_then(Value::as_str)
                        .unwrap_or("?")
                        .to_owned();
                    // A network namespace to join is met on the host: its
                    // interface handed to the guest, or moat's stack
                    // serving from it (create.rs).
                    if o.remove("path").is_some() && ty != "network" {
                        plan.warnings.push(format!(
                            "the {ty} namespace to join is on the host: the guest makes its own"
                        ));
                    }
                }
            }
        }
        if linux
            .get("seccomp")
            .and_then(|s| s.get("listenerPath"))
            .is_some_and(|p| !p.is_null())
        {
            return Err("a seccomp listener (listenerPath) cannot reach into a microVM".into());
        }
    }
    if let Some(a) = config.get_mut("annotations").and_then(Value::as_object_mut) {
        for k in HOST_ONLY_ANNOTATIONS {
            a.remove(*k);
        }
    }
    plan.config = config;
    Ok(plan)
}

/// Every POSIX resource limit, by its OCI name (the guest's agent raises
/// each one's hard limit: `agent::boot::raise_hard_limits`).
pub(crate) const RLIMITS: [(&str, rustix::process::Resource); 16] = {
    use rustix::process::Resource as R;
    [
        ("RLIMIT_AS", R::As),
        ("RLIMIT_CORE", R::Core),
        ("RLIMIT_CPU", R::Cpu),
        ("RLIMIT_DATA", R::Data),
        ("RLIMIT_FSIZE", R::Fsize),
        ("RLIMIT_LOCKS", R::Locks),
        ("RLIMIT_MEMLOCK", R::Memlock),
        ("RLIMIT_MSGQUEUE", R::Msgqueue),
        ("RLIMIT_NICE", R::Nice),
        ("RLIMIT_NOFILE", R::Nofile),
        ("RLIMIT_NPROC", R::Nproc),
        ("RLIMIT_RSS", R::Rss),
        ("RLIMIT_RTPRIO", R::Rtprio),
        ("RLIMIT_RTTIME", R::Rttime),
        ("RLIMIT_SIGPENDING", R::Sigpending),
        ("RLIMIT_STACK", R::Stack),
    ]
};

/// The guest kernel's ceiling on open files (`fs.nr_open`, its default),
/// which a hard limit on them cannot pass.
const GUEST_NR_OPEN: u64 = 1 << 20;

/// The calling process's resource limits, by OCI name (`u64::MAX` for
/// unlimited, as OCI spells it), open files at most the guest's ceiling.
pub fn host_rlimits() -> Vec<(&'static str, u64, u64)> {
    RLIMITS
        .iter()
        .map(|&(name, res)| {
            let l = rustix::process::getrlimit(res);
            let (mut soft, mut hard) =
                (l.current.unwrap_or(u64::MAX), l.maximum.unwrap_or(u64::MAX));
            if res == rustix::process::Resource::Nofile {
                (soft, hard) = (soft.min(GUEST_NR_OPEN), hard.min(GUEST_NR_OPEN));
            }
            (name, soft, hard)
        })
        .collect()
}

/// Gives an OCI `process` every resource limit it does not set, from
/// `own` (the host runtime's, [`host_rlimits`]). Under runc and the
/// container tier, a process inherits the limits its config leaves out
/// from the runtime (the engine's: Docker's containers get containerd's
/// open-file limit); in a guest they would be the guest kernel's defaults
/// (1024 open files, a process limit derived from the guest's memory),
/// which programs that check their limits at start refuse.
pub fn inherit_rlimits(process: &mut Value, own: &[(&'static str, u64, u64)]) {
    let Some(p) = process.as_object_mut() else {
        return;
    };
    let list = p.entry("rlimits").or_insert_with(|| json!([]));
    if !list.is_array() {
        *list = json!([]);
    }
    let Some(list) = list.as_array_mut() else {
        return;
    };
    let named: Vec<String> = list
        .iter()
        .filter_map(|r| r["type"].as_str().map(str::to_owned))
        .collect();
    for &(name, soft, hard) in own {
        if !named.iter().any(|n| n == name) {
            list.push(json!({ "type": name, "soft": soft, "hard": hard }));
        }
    }
}

/// Where a pod's VM keeps its emptyDir volumes ([`empty_dirs_in_guest`]).
pub const POD_VOLUMES: &str = "/run/vm/pod-volumes";

/// Where a pod's VM mounts the pod's share: the one virtio-fs device
/// through which its joined containers' read-write volumes (hostPath,
/// persistent volumes) reach the host ([`volumes_in_pod_share`]).
pub const POD_SHARE: &str = "/run/vm/pod-share";

/// Whether `source` is a Kubernetes emptyDir volume as the kubelet makes
/// them: `…/pods/<uid>/volumes/kubernetes.io~empty-dir/<name>`.
pub fn is_empty_dir(source: &Path) -> bool {
    let parts: Vec<_> = source.components().collect();
    matches!(
        parts.as_slice(),
        [.., a, b, _name] if a.as_os_str() == "volumes" && b.as_os_str() == "kubernetes.io~empty-dir"
    )
}

/// Takes a pod's container's emptyDir volumes out of `plan.volumes` and
/// binds them from directories of the pod's guest instead (as Kata does by
/// default): shared by every container of the pod that names the same
/// volume, kept across the container's restarts, gone with the pod's VM;
/// their writes stay in the guest's memory, as a joined container's root's
/// do. Returns those directories (the agent makes them).
pub fn empty_dirs_in_guest(plan: &mut Plan) -> Vec<String> {
    use sha2::Digest;
    let mut dirs = Vec::new();
    let (empty, kept): (Vec<VolumeNeed>, Vec<VolumeNeed>) = std::mem::take(&mut plan.volumes)
        .into_iter()
        .partition(|v| is_empty_dir(&v.source));
    plan.volumes = kept;
    for v in empty {
        let key = sha2::Sha256::digest(v.source.as_os_str().as_encoded_bytes());
        let key: String = key.iter().take(12).map(|b| format!("{b:02x}")).collect();
        let dir = format!("{POD_VOLUMES}/{key}");
        if let Some(list) = plan.config["mounts"].as_array_mut() {
            for m in list.iter_mut().filter(|m| m["source"] == v.mount.as_str()) {
                m["source"] = json!(dir);
            }
        }
        dirs.push(dir);
    }
    dirs
}

/// Binds a joining container's read-write volumes from the pod's share
/// instead of virtio-fs devices of their own (the running guest cannot
/// gain one): volume `i` becomes `POD_SHARE/<name>/<i>`, where the host
/// bind-mounts its directory into the share (`crate::pod::share_volumes`).
/// Takes the volumes out of `plan`; returns each one's host directory and
/// its place under the share (`<name>/<i>`).
pub fn volumes_in_pod_share(plan: &mut Plan, name: &str) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    for (i, v) in std::mem::take(&mut plan.volumes).into_iter().enumerate() {
        let place = format!("{name}/{i}");
        let guest = format!("{POD_SHARE}/{place}");
        if let Some(list) = plan.config["mounts"].as_array_mut() {
            for m in list.iter_mut().filter(|m| m["source"] == v.mount.as_str()) {
                m["source"] = json!(guest);
            }
        }
        out.push((v.source, place));
    }
    out
}

/// Moves every guest path of `plan` (its root, its binds' sources, its
/// disks' mount points, its files) from under `/run/vm` to under `dir`:
/// a pod's container joining its pod's guest ([`crate::proto::pod_dir`])
/// has its own.
pub fn relocate(plan: &mut Plan, dir: &str) {
    let moved = |p: &str| {
        if Path::new(p).starts_with(POD_VOLUMES) || Path::new(p).starts_with(POD_SHARE) {
            return None;
        }
        p.strip_prefix("/run/vm/")
            .map(|rest| format!("{dir}/{rest}"))
    };
    if let Some(p) = plan.config["root"]["path"].as_str().and_then(moved) {
        plan.config["root"]["path"] = json!(p);
    }
    if let Some(list) = plan.config["mounts"].as_array_mut() {
        for m in list.iter_mut().filter(|m| is_bind(m)) {
            if let Some(p) = m["source"].as_str().and_then(moved) {
                m["source"] = json!(p);
            }
        }
    }
    for d in &mut plan.disks {
        if let Some(p) = moved(&d.mount) {
            d.mount = p;
        }
    }
    for f in &mut plan.files {
        if let Some(p) = moved(&f.guest) {
            f.guest = p;
        }
    }
}

/// Where `source` is in the group disk (added to it if new).
fn group_place(plan: &mut Plan, source: &Path) -> String {
    let k = match plan.group.iter().position(|d| d == source) {
        Some(k) => k,
        None => {
            plan.group.push(source.to_owned());
            plan.group.len() - 1
        }
    };
    format!("{GROUP_MOUNT}/{k}")
}

fn translate_bind(m: &mut Value, plan: &mut Plan, probe: &Probe) -> Result<(), String> {
    let dest = m["destination"].as_str().unwrap_or_default().to_string();
    let source = PathBuf::from(m["source"].as_str().unwrap_or_default());
    // The host kernel's own file systems (a rootless spec binds /sys, as it
    // may not mount one): the guest's kernel has its own, mounted with the
    // bind's restrictions; a part of the host's cannot be shared.
    for (root, kind) in [("/sys", "sysfs"), ("/proc", "proc")] {
        if source == Path::new(root) {
            let mut options = vec![json!("nosuid"), json!("noexec"), json!("nodev")];
            if read_only(m) {
                options.push(json!("ro"));
            }
            *m = json!({"destination": dest, "type": kind, "source": kind, "options": options});
            return Ok(());
        }
        if source.starts_with(root) {
            return Err(format!(
                "bind mount source {} (for {dest}) is the host kernel's: the guest's kernel has its own {root}",
                source.display()
            ));
        }
    }
    match (probe.kind)(&source) {
        SourceKind::Dir if dest == "/dev/shm" && !read_only(m) => {
            // An engine's private shm: the guest's own tmpfs serves.
            *m = json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                        "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]});
        }
        SourceKind::Dir if !read_only(m) => {
            let at = match plan.volumes.iter().find(|v| v.source == source) {
                Some(v) => v.mount.clone(),
                None => {
                    let i = plan.volumes.len();
                    plan.volumes.push(VolumeNeed {
                        source: source.clone(),
                        mount: volume_mount(i),
                        tag: volume_tag(i),
                    });
                    volume_mount(i)
                }
            };
            m["source"] = json!(at);
            slave_propagation(m);
        }
        SourceKind::Dir => {
            let at = if (probe.own_disk)(&source) {
                match plan.disks.iter().position(|d| d.source == source) {
                    Some(i) => plan.disks[i].mount.clone(),
                    None => {
                        let mount = disk_mount(plan.disks.len());
                        plan.disks.push(DiskNeed {
                            source: source.clone(),
                            mount: mount.clone(),
                        });
                        mount
                    }
                }
            } else {
                group_place(plan, &source)
            };
            m["source"] = json!(at);
        }
        SourceKind::LargeFile => {
            // Too large to copy with the `Run` request: imaged with the
            // group disk, so read-only in the guest (a copy's writes would
            // not reach the host either).
            if !read_only(m) {
                plan.warnings.push(format!(
                    "{} (for {dest}) is over {} MiB: the guest gets it read-only",
                    source.display(),
                    MAX_FILE >> 20
                ));
                let mut opts: Vec<Value> = m["options"].as_array().cloned().unwrap_or_default();
                opts.retain(|o| o != "rw");
                opts.push(json!("ro"));
                m["options"] = Value::Array(opts);
            }
            m["source"] = json!(group_place(plan, &source));
        }
        SourceKind::File if read_only(m) && (probe.shared_file)(&source) => {
            m["source"] = json!(group_place(plan, &source));
        }
        SourceKind::File => {
            let guest = format!("/run/vm/files/{}", plan.files.len());
            plan.files.push(FileNeed {
                source: source.clone(),
                guest: guest.clone(),
            });
            m["source"] = json!(guest);
        }
        SourceKind::Device if source.starts_with("/dev") => {}
        _ => {
            return Err(format!(
                "bind mount source {} (for {dest}) is neither a directory nor a file the microvm tier can share",
                source.display()
            ))
        }
    }
    Ok(())
}

/// Guest RAM in MiB for the config: its memory limit plus what the guest
/// kernel and agent need (a fixed part and one that grows with the guest),
/// or [`DEFAULT_MEMORY_MIB`] without a limit. The container must reach its
/// own limit, and its cgroup's OOM killer act, before the guest as a whole
/// runs short: short of memory, a guest reclaims and refaults its page
/// cache for a long time under TCG before its global OOM killer acts.
pub fn guest_memory_mib(spec: &Value) -> u64 {
    match spec["linux"]["resources"]["memory"]["limit"].as_i64() {
        Some(l) if l > 0 => {
            let limit = (l as u64) >> 20;
            limit + GUEST_OVERHEAD_MIB + limit / GUEST_OVERHEAD_SHARE
        }
        _ => DEFAULT_MEMORY_MIB,
    }
    .clamp(MIN_MEMORY_MIB, MAX_MEMORY_MIB)
}

/// vCPUs for the config: its CPU quota rounded up, 1 without one, at most
/// [`MAX_VCPUS`] and at most `host_cpus` (the CPUs the runtime may run
/// on): a vCPU more than the host has gains the guest nothing (the VMM's
/// cgroup quota bounds its time anyway) and costs its boot a vCPU to
/// bring up and keep in step — under TCG on this 2-CPU machine a guest
/// given 16 did not answer within 90 s.
pub fn guest_vcpus(spec: &Value, host_cpus: usize) -> u8 {
    let cpu = &spec["linux"]["resources"]["cpu"];
    let most = (host_cpus as u64).clamp(1, u64::from(MAX_VCPUS));
    match (cpu["quota"].as_i64(), cpu["period"].as_u64()) {
        (Some(q), Some(p)) if q > 0 && p > 0 => (q as u64).div_ceil(p).clamp(1, most) as u8,
        _ => 1,
    }
}

/// The most vCPUs a guest gets.
pub const MAX_VCPUS: u8 = 16;

/// What the guest kernel, the agent and the guest's moat take beyond the
/// container's own limit, plus a margin: with 96 MiB more than its limit,
/// a guest had 0.94 x its RAM - 116 MiB available to the container (`free`
/// in guests of 352, 1120 and 4192 MiB): 936 MiB for a 1 GiB limit, so the
/// guest ran short before the container reached its limit.
pub const GUEST_OVERHEAD_MIB: u64 = 160;
/// The part that grows with the guest (its memory map, the page
/// allocator's reserves): the limit divided by this, 7%.
pub const GUEST_OVERHEAD_SHARE: u64 = 14;
pub const DEFAULT_MEMORY_MIB: u64 = 512;
pub const MIN_MEMORY_MIB: u64 = 128;
pub const MAX_MEMORY_MIB: u64 = 64 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(p: &Path) -> SourceKind {
        match p.to_str().unwrap() {
            s if s.starts_with("/dir") => SourceKind::Dir,
            s if s.starts_with("/file/large") => SourceKind::LargeFile,
            s if s.starts_with("/file") => SourceKind::File,
            "/dev/null" => SourceKind::Device,
            _ => SourceKind::Other,
        }
    }

    fn own(p: &Path) -> bool {
        // A string prefix: /dir/usr, /dir/usr0, /dir/usr1, ... (Path's
        // starts_with compares whole components).
        p.to_str().is_some_and(|s| s.starts_with("/dir/usr"))
    }

    fn shared(p: &Path) -> bool {
        p.to_str().is_some_and(|s| s.starts_with("/file/shared"))
    }

    const PROBE: Probe = Probe {
        kind: &kinds,
        own_disk: &own,
        shared_file: &shared,
        volume_ports: 8,
    };

    fn spec(mounts: Value) -> Value {
        json!({
            "ociVersion": "1.2.0",
            "root": {"path": "/host/rootfs", "readonly": true},
            "process": {"args": ["sh"], "cwd": "/"},
            "mounts": mounts,
            "hooks": {"prestart": [{"path": "/bin/true"}], "createContainer": [{"path": "/bin/true"}], "startContainer": [{"path": "/bin/true"}]},
            "annotations": {"dev.moat.isolation": "microvm", "keep": "yes"},
            "linux": {"cgroupsPath": "/x", "namespaces": [{"type": "network", "path": "/run/netns/a"}, {"type": "ipc", "path": "/run/ipc/a"}, {"type": "pid"}]}
        })
    }

    #[test]
    fn limits_the_config_leaves_out_are_the_runtimes() {
        let own = [
            ("RLIMIT_NOFILE", 3333, 4444),
            ("RLIMIT_NPROC", u64::MAX, u64::MAX),
            ("RLIMIT_CORE", 0, 0),
        ];
        let mut p = json!({ "args": ["true"],
            "rlimits": [{ "type": "RLIMIT_NOFILE", "soft": 10, "hard": 20 }] });
        inherit_rlimits(&mut p, &own);
        assert_eq!(
            p["rlimits"],
            json!([
                { "type": "RLIMIT_NOFILE", "soft": 10, "hard": 20 },
                { "type": "RLIMIT_NPROC", "soft": u64::MAX, "hard": u64::MAX },
                { "type": "RLIMIT_CORE", "soft": 0, "hard": 0 },
            ]),
            "the config's own kept, the others added"
        );
        let mut p = json!({ "args": ["true"] });
        inherit_rlimits(&mut p, &own);
        assert_eq!(p["rlimits"].as_array().map(Vec::len), Some(3));
        // Ours are every limit there is, open files within the guest's
        // ceiling, soft never above hard.
        let host = host_rlimits();
        assert_eq!(host.len(), 16);
        assert!(host.iter().all(|&(_, s, h)| s <= h));
        let nofile = host.iter().find(|r| r.0 == "RLIMIT_NOFILE").unwrap();
        assert!(nofile.2 <= GUEST_NR_OPEN);
        // Each name parses as an OCI limit.
        let mut p = json!({ "args": ["true"], "cwd": "/", "user": { "uid": 0, "gid": 0 } });
        inherit_rlimits(&mut p, &host);
        let parsed: oci_spec::runtime::Process = serde_json::from_value(p).unwrap();
        assert_eq!(parsed.rlimits().as_ref().map(Vec::len), Some(16));
    }

    #[test]
    fn binds_become_disks_and_files() {
        let s = spec(json!([
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/usr", "type": "bind", "source": "/dir/usr", "options": ["rbind", "ro"]},
            {"destination": "/opt/usr", "type": "bind", "source": "/dir/usr", "options": ["rbind", "ro"]},
            {"destination": "/etc/certs", "type": "bind", "source": "/dir/certs", "options": ["rbind", "ro"]},
            {"destination": "/etc/hosts", "type": "bind", "source": "/file/hosts", "options": ["rbind", "rw"]},
            {"destination": "/dev/shm", "type": "bind", "source": "/dir/shm", "options": ["rbind", "rw"]},
            {"destination": "/dev/null2", "type": "bind", "source": "/dev/null", "options": ["bind"]},
            {"destination": "/etc/services", "type": "bind", "source": "/file/shared/services", "options": ["rbind", "ro"]},
            {"destination": "/etc/rw", "type": "bind", "source": "/file/shared/rw", "options": ["rbind", "rw"]}
        ]));
        let p = plan(&s, Path::new("/host/rootfs"), &PROBE).unwrap();
        assert_eq!(p.config["root"]["path"], GUEST_ROOT);
        assert_eq!(p.disks.len(), 2, "the root and /dir/usr once");
        assert_eq!(p.disks[0].source, PathBuf::from("/host/rootfs"));
        assert_eq!(
            p.group,
            vec![
                PathBuf::from("/dir/certs"),
                PathBuf::from("/file/shared/services")
            ]
        );
        let m = p.config["mounts"].as_array().unwrap();
        assert_eq!(m[1]["source"], disk_mount(1));
        assert_eq!(m[2]["source"], disk_mount(1));
        assert_eq!(m[3]["source"], format!("{GROUP_MOUNT}/0"));
        assert_eq!(m[4]["source"], "/run/vm/files/0");
        assert_eq!(p.files[0].source, PathBuf::from("/file/hosts"));
        assert_eq!(m[5]["type"], "tmpfs");
        assert_eq!(m[6]["source"], "/dev/null");
        // A shared host file joins the group disk; a writable one is copied.
        assert_eq!(m[7]["source"], format!("{GROUP_MOUNT}/1"));
        assert_eq!(m[8]["source"], "/run/vm/files/1");
        assert_eq!(p.files.len(), 2);
        // The runtime runs prestart on the host; startContainer runs in
        // the guest's container, alone of the hooks; createContainer is
        // not run; an IPC namespace to join is not the guest's (a network
        // one is met on the host: no warning).
        assert_eq!(
            p.config["hooks"],
            json!({"startContainer": [{"path": "/bin/true"}]})
        );
        assert_eq!(p.warnings.len(), 2, "{:?}", p.warnings);
        assert!(p.warnings.iter().any(|w| w.contains("the ipc namespace")));
        assert!(p
            .warnings
            .iter()
            .any(|w| w.contains("createContainer hooks")));
        assert!(p.config["linux"].get("cgroupsPath").is_none());
        assert!(p.config["linux"]["namespaces"][0].get("path").is_none());
        assert!(p.config["annotations"].get("dev.moat.isolation").is_none());
        assert_eq!(p.config["annotations"]["keep"], "yes");
    }

    /// A file over what a `Run` request carries joins the group disk,
    /// read-only (a warning when the bind was read-write); the real probe
    /// tells it by its size.
    #[test]
    fn a_large_file_is_imaged_read_only() {
        let s = spec(json!([
            {"destination": "/opt/tool", "type": "bind", "source": "/file/large/tool", "options": ["rbind", "ro"]},
            {"destination": "/data/db", "type": "bind", "source": "/file/large/db", "options": ["rbind", "rw"]},
            {"destination": "/etc/hosts", "type": "bind", "source": "/file/hosts", "options": ["rbind", "rw"]}
        ]));
        let p = plan(&s, Path::new("/host/rootfs"), &PROBE).unwrap();
        assert_eq!(
            p.group,
            vec![
                PathBuf::from("/file/large/tool"),
                PathBuf::from("/file/large/db")
            ]
        );
        let m = p.config["mounts"].as_array().unwrap();
        assert_eq!(m[0]["source"], format!("{GROUP_MOUNT}/0"));
        assert_eq!(m[1]["source"], format!("{GROUP_MOUNT}/1"));
        assert_eq!(m[1]["options"], json!(["rbind", "ro"]));
        assert_eq!(p.files.len(), 1);
        let large: Vec<_> = p
            .warnings
            .iter()
            .filter(|w| w.contains("over 1 MiB"))
            .collect();
        assert_eq!(large.len(), 1, "{:?}", p.warnings);
        assert!(large[0].contains("/file/large/db"), "{large:?}");
        let dir = tempfile::tempdir().unwrap();
        let (small, big) = (dir.path().join("small"), dir.path().join("big"));
        std::fs::write(&small, vec![0u8; MAX_FILE as usize]).unwrap();
        std::fs::write(&big, vec![0u8; MAX_FILE as usize + 1]).unwrap();
        assert_eq!(source_kind(&small), SourceKind::File);
        assert_eq!(source_kind(&big), SourceKind::LargeFile);
    }

    /// A rootless spec binds the host's /sys (it may not mount one): the
    /// guest mounts its own kernel's, as restricted; a part of the host's
    /// sysfs or procfs is refused, not imaged.
    #[test]
    fn the_host_kernels_file_systems_become_the_guests_own() {
        let s = spec(json!([
            {"destination": "/sys", "type": "none", "source": "/sys", "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/p", "type": "bind", "source": "/proc", "options": ["rbind"]}
        ]));
        let p = plan(&s, Path::new("/r"), &PROBE).unwrap();
        assert_eq!((p.disks.len(), p.group.len(), p.files.len()), (1, 0, 0));
        let m = p.config["mounts"].as_array().unwrap();
        assert_eq!(
            m[0],
            json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]})
        );
        assert_eq!(
            m[1],
            json!({"destination": "/p", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]})
        );
        for part in ["/sys/fs/cgroup", "/proc/sys"] {
            let s = spec(
                json!([{"destination": "/x", "type": "bind", "source": part, "options": ["rbind", "ro"]}]),
            );
            let e = plan(&s, Path::new("/r"), &PROBE).unwrap_err();
            assert!(e.contains("host kernel's") && !e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn read_write_directories_become_virtio_fs_shares() {
        let rw = spec(json!([
            {"destination": "/data", "type": "bind", "source": "/dir/data", "options": ["rbind", "rprivate", "rw"]},
            {"destination": "/again", "type": "bind", "source": "/dir/data", "options": ["rbind"]},
            {"destination": "/other", "type": "bind", "source": "/dir/other", "options": ["rbind", "rw"]}
        ]));
        let p = plan(&rw, Path::new("/r"), &PROBE).unwrap();
        assert_eq!(p.disks.len(), 1, "the root only");
        assert_eq!(
            p.volumes,
            vec![
                VolumeNeed {
                    source: "/dir/data".into(),
                    mount: volume_mount(0),
                    tag: volume_tag(0)
                },
                VolumeNeed {
                    source: "/dir/other".into(),
                    mount: volume_mount(1),
                    tag: volume_tag(1)
                }
            ]
        );
        let m = p.config["mounts"].as_array().unwrap();
        assert_eq!(m[0]["source"], volume_mount(0));
        assert!(is_volume_mount(&volume_mount(3)));
        for not in [
            "/run/vm/fs",
            "/run/vm/fs/",
            "/run/vm/fsx/1",
            "/run/vm/fs/1/a",
        ] {
            assert!(!is_volume_mount(not), "{not}");
        }
        // A slave of the guest's mount there, whatever the config asked.
        for v in &m[..3] {
            let o: Vec<&str> = v["options"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_str().unwrap())
                .collect();
            assert_eq!(o.last(), Some(&"rslave"), "{o:?}");
            assert!(!o.contains(&"rprivate"), "{o:?}");
        }
        assert_eq!(m[1]["source"], volume_mount(0));
        assert_eq!(m[2]["source"], volume_mount(1));
        // Shares count against the ports or slots alone, not the disks'.
        let volumes = |n: usize| -> Value {
            json!((0..n)
                .map(|i| json!({"destination": format!("/d{i}"), "type": "bind", "source": format!("/dir/v{i}"), "options": ["rw"]}))
                .collect::<Vec<_>>())
        };
        let p = plan(&spec(volumes(8)), Path::new("/r"), &PROBE).unwrap();
        assert_eq!((p.disks.len(), p.volumes.len()), (1, 8));
        let e = plan(&spec(volumes(9)), Path::new("/r"), &PROBE).unwrap_err();
        assert!(
            e.contains("9 read-write volumes") && e.contains("at most 8") && !e.contains('\n'),
            "{e}"
        );
    }

    #[test]
    fn what_cannot_be_shared_is_refused() {
        let sock = spec(
            json!([{"destination": "/s", "type": "bind", "source": "/sock", "options": ["bind"]}]),
        );
        assert!(plan(&sock, Path::new("/r"), &PROBE).is_err());
        let many: Vec<Value> = (0..MAX_DISKS)
            .map(|i| json!({"destination": format!("/d{i}"), "type": "bind", "source": format!("/dir/usr{i}"), "options": ["ro"]}))
            .collect();
        assert!(plan(&spec(json!(many)), Path::new("/r"), &PROBE).is_err());
        // Small directories share one disk, however many.
        let small: Vec<Value> = (0..20)
            .map(|i| json!({"destination": format!("/d{i}"), "type": "bind", "source": format!("/dir/s{i}"), "options": ["ro"]}))
            .collect();
        let p = plan(&spec(json!(small)), Path::new("/r"), &PROBE).unwrap();
        assert_eq!((p.disks.len(), p.group.len()), (1, 20));
        let mut listener = spec(json!([]));
        listener["linux"]["seccomp"] =
            json!({"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/s"});
        assert!(plan(&listener, Path::new("/r"), &PROBE).is_err());
    }

    #[test]
    fn sizes_follow_the_limits() {
        assert_eq!(guest_memory_mib(&json!({})), DEFAULT_MEMORY_MIB);
        let m = json!({"linux": {"resources": {"memory": {"limit": 256i64 << 20}}}});
        assert_eq!(guest_memory_mib(&m), 256 + GUEST_OVERHEAD_MIB + 256 / 14);
        let gib = json!({"linux": {"resources": {"memory": {"limit": 1i64 << 30}}}});
        assert_eq!(guest_memory_mib(&gib), 1257);
        let tiny = json!({"linux": {"resources": {"memory": {"limit": 4i64 << 20}}}});
        assert_eq!(guest_memory_mib(&tiny), 4 + GUEST_OVERHEAD_MIB);
        assert_eq!(guest_vcpus(&json!({}), 8), 1);
        let c = json!({"linux": {"resources": {"cpu": {"quota": 150000, "period": 100000}}}});
        assert_eq!(guest_vcpus(&c, 8), 2);
        // Never more than the host's CPUs, nor than MAX_VCPUS.
        let many = json!({"linux": {"resources": {"cpu": {"quota": 6400000, "period": 100000}}}});
        assert_eq!(guest_vcpus(&many, 2), 2);
        assert_eq!(guest_vcpus(&many, 128), MAX_VCPUS);
        assert_eq!(guest_vcpus(&c, 1), 1);
        assert_eq!(guest_vcpus(&c, 0), 1);
    }

    #[test]
    fn a_joined_containers_guest_paths_move_under_its_directory() {
        let spec = json!({
            "root": {"path": "rootfs"},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/hosts", "type": "bind", "source": "/x/hosts", "options": ["rbind", "ro"]},
                {"destination": "/data", "type": "bind", "source": "/x/data", "options": ["rbind", "ro"]},
            ]
        });
        let probe = Probe {
            kind: &|p: &Path| {
                if p.ends_with("hosts") {
                    SourceKind::File
                } else {
                    SourceKind::Dir
                }
            },
            own_disk: &|_| false,
            shared_file: &|_| false,
            volume_ports: 8,
        };
        let mut plan = plan(&spec, Path::new("/x/rootfs"), &probe).unwrap();
        relocate(&mut plan, "/run/vm/pod/c1");
        let m = &plan.config["mounts"];
        assert_eq!(plan.config["root"]["path"], "/run/vm/pod/c1/root");
        assert_eq!(m[0]["source"], "proc");
        assert_eq!(m[1]["source"], "/run/vm/pod/c1/files/0");
        assert_eq!(m[2]["source"], "/run/vm/pod/c1/group/0");
        assert_eq!(plan.disks[0].mount, "/run/vm/pod/c1/disk/0");
        assert_eq!(plan.files[0].guest, "/run/vm/pod/c1/files/0");
    }

    #[test]
    fn a_pods_empty_dirs_stay_in_its_guest() {
        let ed = "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~empty-dir/cache";
        assert!(is_empty_dir(Path::new(ed)));
        for other in [
            "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~empty-dir",
            "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~host-path/x",
            "/srv/data",
        ] {
            assert!(!is_empty_dir(Path::new(other)), "{other}");
        }
        let spec = json!({
            "root": {"path": "rootfs"},
            "mounts": [
                {"destination": "/cache", "type": "bind", "source": ed, "options": ["rbind", "rw"]},
                {"destination": "/data", "type": "bind", "source": "/srv/data", "options": ["rbind", "rw"]},
            ]
        });
        let probe = Probe {
            kind: &|_: &Path| SourceKind::Dir,
            own_disk: &|_| false,
            shared_file: &|_| false,
            volume_ports: 8,
        };
        let mut plan = plan(&spec, Path::new("/x/rootfs"), &probe).unwrap();
        assert_eq!(plan.volumes.len(), 2);
        let dirs = empty_dirs_in_guest(&mut plan);
        relocate(&mut plan, "/run/vm/pod/c1");
        assert_eq!(dirs.len(), 1);
        assert!(dirs[0].starts_with(&format!("{POD_VOLUMES}/")), "{dirs:?}");
        let m = &plan.config["mounts"];
        // The emptyDir from the guest's directory, kept where it is; the
        // other volume stays one.
        assert_eq!(m[0]["source"], dirs[0].as_str());
        assert_eq!(m[1]["source"], "/run/vm/pod/c1/fs/1");
        assert_eq!(plan.volumes.len(), 1);
        assert_eq!(plan.volumes[0].source, Path::new("/srv/data"));
        // The same volume in another container of the pod: the same
        // directory.
        let mut again = super::plan(&spec, Path::new("/y/rootfs"), &probe).unwrap();
        assert_eq!(empty_dirs_in_guest(&mut again), dirs);
        // In a pod's VM with a share, the other volume comes from it.
        let mut plan = super::plan(&spec, Path::new("/x/rootfs"), &probe).unwrap();
        empty_dirs_in_guest(&mut plan);
        let shared = volumes_in_pod_share(&mut plan, "c1.7f");
        relocate(&mut plan, "/run/vm/pod/c1");
        assert_eq!(
            shared,
            vec![(PathBuf::from("/srv/data"), "c1.7f/0".to_string())]
        );
        assert!(plan.volumes.is_empty());
        assert_eq!(
            plan.config["mounts"][1]["source"],
            format!("{POD_SHARE}/c1.7f/0")
        );
    }
}
