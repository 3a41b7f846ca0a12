//! A Kubernetes pod in one microVM. The pod's sandbox (pause) container
//! boots the VM, with one disk more than its own: the **pod disk**, a
//! sparse file the guest reads and the host appends to. Each other
//! container of the pod (containerd's CRI annotations name its sandbox)
//! then **joins** that guest instead of booting one: `create` images its
//! directories as any microVM container's, appends the images to the pod
//! disk, and forks a host process that stands for it (its PID is the
//! container's; it serves the container's control socket: `start`,
//! `kill`); `start` has it send a [`Request::Join`] to the pod's VMM
//! process, whose agent mounts the images through loop devices over their
//! regions and runs the container with the guest's container tier in the
//! namespaces of the pod's guest container: the pod's containers share
//! one kernel, one `localhost`, the pod's address. A container that cannot
//! join (read-write volumes, host hooks, a terminal without a console
//! socket) gets a VM of its own, as before, with a warning.
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use moat_core::runtime::{CreateRequest, Launched, RuntimeError};
use moat_core::state::{ContainerStatus, State};
use moat_core::tier::Tier;
use serde::{Deserialize, Serialize};

use crate::control::{self, Reply, Request};
use crate::guestspec::{self, Plan};
use crate::{disk, proto, MicrovmError, MicrovmPart, MicrovmTier};

/// The pod disk's file in the sandbox container's state directory.
pub const POD_DISK: &str = "pod.disk";
/// Its size as the guest sees it (sparse on the host: only the appended
/// images take space).
pub const POD_DISK_BYTES: u64 = 1 << 40;
/// Where the first image goes; images start on this alignment, apart by
/// at least this much (the guest's read-ahead never reaches the next).
const ALIGN: u64 = 1 << 20;
/// The guest memory of a pod's VM without a memory limit of its own
/// (its containers' limits apply in the guest).
pub const POD_MEMORY_MIB: u64 = 1024;

/// A container that joined its pod's guest, as its state records it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Joined {
    /// The pod's sandbox container (the VM's).
    pub pod: String,
    /// That container's control socket.
    pub pod_control: PathBuf,
    /// The pod disk, and this container's regions of it.
    pub pod_disk: PathBuf,
    pub regions: Vec<(u64, u64)>,
    /// Its read-write volumes' directory in the pod's share, if it has
    /// any ([`share_volumes`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share: Option<PathBuf>,
}

/// Makes the pod disk in `dir`: sparse, its header the magic and the next
/// free offset. Returns it opened read-only, for the VMM.
pub fn make_disk(dir: &Path) -> Result<(PathBuf, File), MicrovmError> {
    let path = dir.join(POD_DISK);
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(MicrovmError::io(format!("create {}", path.display())))?;
    f.set_len(POD_DISK_BYTES)
        .map_err(MicrovmError::io("size the pod disk"))?;
    let mut head = proto::POD_DISK_MAGIC.to_vec();
    head.extend_from_slice(&ALIGN.to_le_bytes());
    f.write_all(&head)
        .map_err(MicrovmError::io("write the pod disk's header"))?;
    let ro = File::open(&path).map_err(MicrovmError::io(format!("open {}", path.display())))?;
    Ok((path, ro))
}

/// Appends `image` to the pod disk at `disk` (under an exclusive lock:
/// two containers of a pod may be created at once), copying only its
/// data (an image is sparse). Returns its region: offset and size.
pub fn append(disk: &Path, image: &Path) -> Result<(u64, u64), MicrovmError> {
    let mut d = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(disk)
        .map_err(MicrovmError::io(format!("open {}", disk.display())))?;
    rustix::fs::flock(&d, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| MicrovmError::io("lock the pod disk")(e.into()))?;
    let mut head = [0u8; 16];
    d.read_exact(&mut head)
        .map_err(MicrovmError::io("read the pod disk's header"))?;
    if &head[..8] != proto::POD_DISK_MAGIC {
        return Err(MicrovmError::Invalid(format!(
            "{} is not a pod disk",
            disk.display()
        )));
    }
    let offset = u64::from_le_bytes(head[8..16].try_into().unwrap_or_default());
    let src = File::open(image).map_err(MicrovmError::io(format!("open {}", image.display())))?;
    let size = src
        .metadata()
        .map_err(MicrovmError::io(format!("stat {}", image.display())))?
        .len();
    let next = (offset + size).div_ceil(ALIGN) * ALIGN + ALIGN;
    if next > POD_DISK_BYTES {
        return Err(MicrovmError::Invalid(format!(
            "the pod's disk is full: {} GiB of images",
            POD_DISK_BYTES >> 30
        )));
    }
    copy_data(&src, &d, size, offset)?;
    d.seek(SeekFrom::Start(8))
        .and_then(|_| d.write_all(&next.to_le_bytes()))
        .map_err(MicrovmError::io("write the pod disk's header"))?;
    Ok((offset, size))
}

/// Copies the data extents of `src` (its first `size` bytes) into `dst`
/// at `at` (holes stay holes).
fn copy_data(src: &File, dst: &File, size: u64, at: u64) -> Result<(), MicrovmError> {
    use rustix::fs::SeekFrom as S;
    let io = |e: rustix::io::Errno| MicrovmError::io("copy an image into the pod disk")(e.into());
    let mut pos = 0u64;
    while pos < size {
        let start = match rustix::fs::seek(src, S::Data(pos)) {
            Ok(p) => p,
            // No data past `pos`.
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(io(e)),
        };
        let end = rustix::fs::seek(src, S::Hole(start)).map_err(io)?.min(size);
        let mut from = start;
        while from < end {
            let mut off_in = from;
            let mut off_out = at + from;
            let n = rustix::fs::copy_file_range(
                src,
                Some(&mut off_in),
                dst,
                Some(&mut off_out),
                (end - from) as usize,
            )
            .map_err(io)?;
            if n == 0 {
                return Err(MicrovmError::Invalid("an image ended while copied".into()));
            }
            from += n as u64;
        }
        pos = end;
    }
    Ok(())
}

/// Gives the regions' space back (the guest never reads them again:
/// offsets are not reused).
pub fn release(disk: &Path, regions: &[(u64, u64)]) {
    let Ok(d) = std::fs::OpenOptions::new().write(true).open(disk) else {
        return;
    };
    for (offset, size) in regions {
        let _ = rustix::fs::fallocate(
            &d,
            rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
            *offset,
            *size,
        );
    }
}

/// The pod annotation (containerd passes it to the sandbox's config when
/// its runtime lists it in `pod_annotations`) that, as `none`, boots the
/// pod's VM without a share: it may then start from a snapshot, and a
/// container of the pod with a read-write volume gets a VM of its own.
pub const SHARE_ANNOTATION: &str = "dev.moat.pod.volumes";

/// Whether the pod's sandbox config `spec` gets a share ([`make_share`]).
pub fn wants_share(spec: &serde_json::Value) -> bool {
    spec["annotations"][SHARE_ANNOTATION].as_str() != Some("none")
}

/// The host directory of pod `pod`'s share, beside the state (never in a
/// container's state directory, which is removed recursively: the share
/// holds bind mounts of the pod's volumes).
pub fn share_dir(root: &Path, pod: &str) -> PathBuf {
    root.join(".pod-share").join(pod)
}

/// Makes the pod's share at `dir`: a mount of its own, shared, so that
/// what a joining container binds into it later (its volumes,
/// [`share_volumes`]) reaches the mount namespaces of the share's
/// virtiofsd, where the copies are slaves (`crate::volumes`).
pub fn make_share(dir: &Path) -> Result<(), MicrovmError> {
    use nix::mount::{mount, MsFlags};
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if let Some(parent) = dir.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(MicrovmError::io(format!("create {}", parent.display())))?;
    }
    std::fs::create_dir(dir).map_err(MicrovmError::io(format!("create {}", dir.display())))?;
    // virtiofsd (the pod's volume block's root, not the host's) looks up
    // the volumes through it; its parent keeps the host's users out.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
        .map_err(MicrovmError::io(format!("chmod {}", dir.display())))?;
    let made = mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND, None::<&str>).and_then(|()| {
        mount(
            None::<&str>,
            dir,
            None::<&str>,
            MsFlags::MS_SHARED,
            None::<&str>,
        )
    });
    if let Err(e) = made {
        remove_share(dir);
        return Err(MicrovmError::Invalid(format!(
            "cannot make the pod's share {}: {e}",
            dir.display()
        )));
    }
    Ok(())
}

/// Removes the shares under `root/.pod-share` whose pod has no state
/// (`alive` says which do): what a runtime killed in the middle of a
/// pod's `create` or `delete` left, whose bind mounts would keep the
/// pod's volumes busy on the node (a persistent volume's device could not
/// be unmounted). Each through [`remove_share`]: unmounts, then `rmdir`.
pub fn sweep_shares(root: &Path, alive: impl Fn(&str) -> bool) {
    let Ok(rd) = std::fs::read_dir(root.join(".pod-share")) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !alive(&name) {
            tracing::warn!("microvm: removing the share of pod {name}, which has no state");
            remove_share(&e.path());
        }
    }
}

/// Bind-mounts a joining container's read-write volumes into the pod's
/// `share`: each `(source, place)` of [`guestspec::volumes_in_pod_share`]
/// (`place` under `name`) at `share/place`. Returns the container's
/// directory there (`share/<name>`); on a failure nothing is left.
pub fn share_volumes(
    share: &Path,
    name: &str,
    vols: &[(PathBuf, String)],
) -> Result<PathBuf, MicrovmError> {
    use nix::mount::{mount, MsFlags};
    let name = share.join(name);
    std::fs::create_dir(&name).map_err(MicrovmError::io(format!("create {}", name.display())))?;
    for (source, place) in vols {
        let at = share.join(place);
        let bound = std::fs::create_dir(&at)
            .map_err(MicrovmError::io(format!("create {}", at.display())))
            .and_then(|()| {
                mount(
                    Some(source.as_path()),
                    &at,
                    None::<&str>,
                    MsFlags::MS_BIND | MsFlags::MS_REC,
                    None::<&str>,
                )
                .map_err(|e| {
                    MicrovmError::Invalid(format!(
                        "cannot share the volume {} with the pod's VM: {e}",
                        source.display()
                    ))
                })
            });
        if let Err(e) = bound {
            remove_share(&name);
            return Err(e);
        }
    }
    Ok(name)
}

/// The mount points at or under `dir`, deepest first (as mountinfo
/// names them: octal escapes undone).
pub(crate) fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let mut points: Vec<PathBuf> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    points.dedup();
    points
}

/// A mountinfo field with its `\NNN` octal escapes (space, tab, newline,
/// backslash) undone.
pub(crate) fn unescape_mountinfo(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let code = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok());
        match code {
            Some(c) => {
                out.push(c);
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unmounts everything at or under `dir` (a pod's share, or a joined
/// container's part of it) and removes its directories, which are empty
/// then: only ever `rmdir`, never a recursive removal, so a volume still
/// mounted there (an unmount that failed) keeps its files; a warning says
/// what is left.
pub fn remove_share(dir: &Path) {
    for p in mounts_under(dir) {
        let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
    }
    fn rmdirs(d: &Path) {
        if let Ok(rd) = std::fs::read_dir(d) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    rmdirs(&e.path());
                }
            }
        }
        let _ = std::fs::remove_dir(d);
    }
    if mounts_under(dir).is_empty() {
        rmdirs(dir);
    }
    if dir.exists() {
        tracing::warn!(
            "microvm: {} is left: a volume is still mounted there, or a file was made in it",
            dir.display()
        );
    }
    if let Some(parent) = dir.parent().filter(|p| p.ends_with(".pod-share")) {
        // The last pod's leaves no empty directory.
        let _ = std::fs::remove_dir(parent);
    }
}

/// The namespace types a pod's container joins by path (the sandbox's):
/// in the guest, they become the guest container's.
fn joined_namespaces(spec: &oci_spec::runtime::Spec) -> Vec<String> {
    use oci_spec::runtime::LinuxNamespaceType as T;
    spec.linux()
        .as_ref()
        .and_then(|l| l.namespaces().clone())
        .unwrap_or_default()
        .iter()
        .filter(|n| n.path().is_some())
        .filter_map(|n| match n.typ() {
            T::Network => Some("network"),
            T::Ipc => Some("ipc"),
            T::Uts => Some("uts"),
            T::Pid => Some("pid"),
            _ => None,
        })
        .map(str::to_string)
        .collect()
}

impl MicrovmTier {
    /// The pod whose guest this container joins: containerd's CRI
    /// annotations name its sandbox, a microVM of this root that runs
    /// with a pod disk. `None` (a VM of its own) for any other container,
    /// and, with a warning, for one that cannot join.
    pub(crate) fn pod_to_join(
        &self,
        req: &CreateRequest,
        plan: &Plan,
        launch: bool,
    ) -> Option<Pod> {
        use moat_core::tier::{CRI_CONTAINER_TYPE, CRI_SANDBOX_ID};
        let ann = req.config.spec.annotations().as_ref()?;
        if ann.get(CRI_CONTAINER_TYPE).map(String::as_str) != Some("container") {
            return None;
        }
        let sandbox = ann.get(CRI_SANDBOX_ID)?;
        if sandbox == req.id || launch {
            return None;
        }
        let st = self.sd.load(sandbox).ok()?;
        if st.tier != Tier::Microvm || !Self::alive(&st) || st.status != ContainerStatus::Running {
            return None;
        }
        let part = self.part(&st).ok()?;
        let disk = part.pod_disk.clone()?;
        let terminal = plan.config["process"]["terminal"].as_bool() == Some(true);
        let volumes = plan
            .volumes
            .iter()
            .any(|v| !guestspec::is_empty_dir(&v.source));
        let why = if terminal && req.console_socket.is_none() {
            Some("it has a terminal and no console socket")
        } else if volumes && part.pod_share.is_none() {
            Some("it has read-write volumes other than emptyDirs, and its pod's VM has no share for them (the pod's annotation dev.moat.pod.volumes is \"none\", a rootless runtime made it, or the host has no virtiofsd)")
        } else if volumes && !self.same_owners(req, &st) {
            Some("it has read-write volumes, and its user namespace's ID maps are not its pod's (the share's files are owned as the pod's)")
        } else if crate::create::has_host_hooks(&req.config.spec) {
            Some("it has hooks to run on the host")
        } else if !crate::agent::pod_id_ok(req.id) {
            Some("its ID cannot name it in the guest")
        } else {
            None
        };
        if let Some(why) = why {
            tracing::warn!(
                "microvm: container {} does not join its pod's microVM ({why}): it gets a VM of its own, which shares the pod's network but not its localhost",
                req.id
            );
            return None;
        }
        Some(Pod {
            share: part.pod_share.clone(),
            state: st,
            disk,
            control: part.socket_dir.join(crate::SOCKET),
        })
    }

    /// Whether container `req` has the same user namespace and ID maps as
    /// its pod's sandbox `pod`: the guest IDs its volumes' files are
    /// written with then become the same host IDs through the pod's share
    /// (`crate::volumes::id_maps`) as through a virtiofsd of its own.
    fn same_owners(&self, req: &CreateRequest, pod: &State) -> bool {
        let ids = |spec: &serde_json::Value| {
            let l = &spec["linux"];
            let userns = l["namespaces"]
                .as_array()
                .is_some_and(|ns| ns.iter().any(|n| n["type"] == "user"));
            (
                userns,
                l["uidMappings"].as_array().cloned().unwrap_or_default(),
                l["gidMappings"].as_array().cloned().unwrap_or_default(),
            )
        };
        let Ok(ours) = serde_json::to_value(&req.config.spec) else {
            return false;
        };
        std::fs::read(self.sd.container_dir(&pod.id).join(crate::CONFIG))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_some_and(|theirs| ids(&theirs) == ids(&ours))
    }

    /// `create` for a pod's container that joins its pod's guest (see the
    /// module's documentation): its images appended to the pod disk, its
    /// cgroup on the host (the config's limits: the guest applies them
    /// too), and the host process that stands for it.
    pub(crate) fn join_pod(
        &self,
        req: &CreateRequest,
        Pod {
            state: pod,
            disk: pod_disk,
            control: pod_control,
            share,
        }: Pod,
        mut plan: Plan,
    ) -> Result<Launched, RuntimeError> {
        let dir_in_guest = proto::pod_dir(req.id);
        let pod_volumes = guestspec::empty_dirs_in_guest(&mut plan);
        // Its other read-write volumes, through the pod's share, under a
        // name of this create's own: a container made again with the same
        // ID never meets what the guest cached of its last one.
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let share_name = format!("{}.{stamp:x}", req.id);
        let shared = guestspec::volumes_in_pod_share(&mut plan, &share_name);
        guestspec::relocate(&mut plan, &dir_in_guest);
        let lock = self.sd.create(req.id)?;
        let dir = lock.dir().to_owned();
        let mut undo = crate::create::Undo::new(self, req.id);
        undo.pod_regions = Some((pod_disk.clone(), Vec::new()));
        let share = match (&share, shared.is_empty()) {
            (_, true) => None,
            (Some(s), false) => Some(share_volumes(s, &share_name, &shared)?),
            (None, false) => {
                return Err(MicrovmError::Invalid("the pod's VM has no share".into()).into())
            }
        };
        undo.pod_share = share.clone();
        let mut regions = Vec::new();
        let mut st = crate::create::initial_state(req, &dir);
        self.sd.save(&st)?;
        let spec_json = serde_json::to_value(&req.config.spec)
            .map_err(|e| RuntimeError::Invalid(format!("config: {e}")))?;
        std::fs::write(
            dir.join(crate::CONFIG),
            serde_json::to_vec(&spec_json).unwrap_or_default(),
        )
        .map_err(MicrovmError::io("save the config"))?;
        // Its directories, imaged as for a VM of its own, then appended.
        let cache = self.cache_dir();
        disk::ensure_dir(&cache)?;
        let mut images: Vec<(PathBuf, String, bool)> = Vec::new();
        for (i, need) in plan.disks.iter().enumerate() {
            let (img, own) = if self.cacheable(&need.source) {
                (disk::cached(&cache, &need.source)?, false)
            } else {
                // From the content cache (kept there), or this container's.
                let p = dir.join(format!("disk-{i}.ext4"));
                let img = crate::create::own_image(&cache, &need.source, &p)?;
                let own = img.path == p;
                (img, own)
            };
            images.push((img.path, need.mount.clone(), own));
        }
        if !plan.group.is_empty() {
            let cached = plan.group.iter().all(|s| self.cacheable(s));
            let img = disk::group(
                &plan.group,
                cached.then_some(cache.as_path()),
                &dir.join("group.ext4"),
            )?;
            images.push((img.path, format!("{dir_in_guest}/group"), !cached));
        }
        let mut disks = Vec::new();
        for (path, mount, own) in &images {
            let (offset, size) = append(&pod_disk, path)?;
            regions.push((offset, size));
            undo.pod_regions = Some((pod_disk.clone(), regions.clone()));
            disks.push(proto::PodRegion {
                offset,
                size,
                mount: mount.clone(),
            });
            if *own {
                // Its bytes are in the pod disk now.
                let _ = std::fs::remove_file(path);
            }
        }
        let mut files = Vec::new();
        for f in &plan.files {
            files.push(crate::create::read_small(&f.source, &f.guest)?);
        }
        let request = proto::JoinRequest {
            id: req.id.to_string(),
            config: plan.config.clone(),
            disks,
            files,
            overlay_root: plan.disks.first().map(|d| d.mount.clone()),
            pod_namespaces: joined_namespaces(&req.config.spec),
            seccomp: crate::create::host_compiled_seccomp(&plan.config, self.sd.root()),
            pod_volumes,
            namespace_of: self.namespaces_of_joined(&req.config.spec, &pod.id),
        };
        crate::create::refuse_oversized("the container's config and the files it binds", &request)?;
        let rootless = !rustix::process::geteuid().is_root();
        let cgroup = self.join_cgroup(req, &spec_json, rootless)?;
        undo.cgroup = cgroup.clone();
        let socket_dir = self.socket_dir(req.id);
        let listener = crate::create::listen(&socket_dir)?;
        undo.socket_dir = Some(socket_dir.clone());
        let limit = spec_json["linux"]["resources"]["memory"]["limit"]
            .as_i64()
            .filter(|l| *l > 0)
            .map(|l| l as u64);
        let meminfo = File::open("/proc/meminfo").ok();
        let events = dir.join(crate::EVENTS);
        // A terminal: a raw host pty whose master goes to the console
        // socket and whose slave is the stand-in's terminal (its window
        // size changes reach the guest's pty).
        let pty = match (
            req.console_socket,
            spec_json["process"]["terminal"].as_bool(),
        ) {
            (Some(_), Some(true)) => Some(crate::create::host_pty()?),
            _ => None,
        };
        let (master, tty) = pty.map(|p| (p.master, p.slave)).unzip();
        let pid = stand_in(StandIn {
            listener,
            pod_control: pod_control.clone(),
            request,
            oom_limit: cgroup.as_ref().and(limit),
            meminfo,
            events,
            tty,
        })?;
        undo.pid = Some(pid);
        if let Some(cg) = &cgroup {
            cg.add_pid(pid).map_err(MicrovmError::from)?;
        }
        st.pid = pid;
        st.pid_start_time = moat_jail::procfs::pid_start_time(pid).unwrap_or(0);
        st.status = ContainerStatus::Created;
        let pod_part = self.part(&pod).unwrap_or_default();
        st.tier_state = serde_json::to_value(MicrovmPart {
            cgroup: cgroup
                .as_ref()
                .map_or(serde_json::Value::Null, |c| c.to_saved()),
            socket_dir,
            backend: pod_part.backend,
            joined: Some(Joined {
                pod: pod.id.clone(),
                pod_control,
                pod_disk,
                regions,
                share,
            }),
            ..MicrovmPart::default()
        })
        .map_err(|e| RuntimeError::Invalid(e.to_string()))?;
        self.sd.save(&st)?;
        if let Some(p) = req.pid_file {
            crate::create::write_pid_file(p, pid)?;
        }
        if let (Some(m), Some(sock)) = (master, req.console_socket) {
            crate::create::send_console(sock, m)?;
        }
        undo.armed = false;
        drop(lock);
        Ok(Launched {
            pid,
            terminal: None,
        })
    }

    /// The namespaces the config joins by a path of another container of
    /// pod `pod` that joined its VM (`/proc/PID/ns/TYPE` of its stand-in,
    /// as containerd writes a `kubectl debug --target` container's PID
    /// namespace): type → that container's ID.
    fn namespaces_of_joined(
        &self,
        spec: &oci_spec::runtime::Spec,
        pod: &str,
    ) -> std::collections::BTreeMap<String, String> {
        use oci_spec::runtime::LinuxNamespaceType as T;
        let mut out = std::collections::BTreeMap::new();
        let namespaces = spec
            .linux()
            .as_ref()
            .and_then(|l| l.namespaces().clone())
            .unwrap_or_default();
        for n in namespaces {
            let ty = match n.typ() {
                T::Network => "network",
                T::Ipc => "ipc",
                T::Uts => "uts",
                T::Pid => "pid",
                _ => continue,
            };
            let pid = n.path().as_ref().and_then(|p| {
                let rest = p.strip_prefix("/proc").ok()?;
                let mut parts = rest.components();
                parts.next()?.as_os_str().to_str()?.parse::<i32>().ok()
            });
            let Some(pid) = pid else { continue };
            let owner = self.sd.list().unwrap_or_default().into_iter().find(|id| {
                self.sd.load(id).ok().is_some_and(|st| {
                    st.pid == pid
                        && Self::alive(&st)
                        && self
                            .part(&st)
                            .ok()
                            .and_then(|p| p.joined)
                            .is_some_and(|j| j.pod == pod)
                })
            });
            if let Some(id) = owner {
                out.insert(ty.to_string(), id);
            }
        }
        out
    }

    /// The host cgroup of a joined container: the config's path and
    /// limits (what the engines read and watch: its memory limit is where
    /// an OOM kill in the guest is echoed); its one process is the
    /// stand-in.
    fn join_cgroup(
        &self,
        req: &CreateRequest,
        spec: &serde_json::Value,
        rootless: bool,
    ) -> Result<Option<moat_jail::cgroup::CgroupManager>, RuntimeError> {
        let cg = self.config_cgroup(req, spec, rootless)?;
        let resources = req
            .config
            .spec
            .linux()
            .as_ref()
            .and_then(|l| l.resources().clone());
        match cg.create(resources.as_ref()) {
            Ok(()) => Ok(Some(cg)),
            Err(moat_jail::cgroup::CgroupError::NoDelegation { path, .. }) if rootless => {
                tracing::warn!(
                    "no delegated cgroup ({}): the container's stand-in runs without one",
                    path.display()
                );
                Ok(None)
            }
            Err(e) => {
                let _ = cg.destroy();
                Err(MicrovmError::from(e).into())
            }
        }
    }

    /// Where a container's exec goes: its own VMM process, or, for a
    /// container that joined its pod's guest, the pod's (naming it).
    pub(crate) fn exec_target(
        &self,
        st: &State,
    ) -> Result<(PathBuf, Option<String>), RuntimeError> {
        let part = self.part(st)?;
        Ok(match part.joined {
            Some(j) => (j.pod_control, Some(st.id.clone())),
            None => (part.socket_dir.join(crate::SOCKET), None),
        })
    }
}

/// The pod a container joins ([`MicrovmTier::pod_to_join`]).
pub(crate) struct Pod {
    /// The sandbox container's state.
    state: State,
    disk: PathBuf,
    /// Its control socket.
    control: PathBuf,
    /// Its VM's share, if it has one.
    share: Option<PathBuf>,
}

/// What the stand-in needs.
struct StandIn {
    /// The container's control socket (`start`, `kill` connect to it).
    listener: OwnedFd,
    pod_control: PathBuf,
    request: proto::JoinRequest,
    /// The container's memory limit on the host, to echo an OOM kill in
    /// the guest to ([`crate::vmm::echo_oom`]).
    oom_limit: Option<u64>,
    meminfo: Option<File>,
    /// Where the container's end is recorded (`events`).
    events: PathBuf,
    /// The container's terminal (a host pty's slave), if it has one.
    tty: Option<OwnedFd>,
}

/// Forks the host process that stands for a joined container: its PID is
/// the container's. It keeps `create`'s stdio (the engine's) for the
/// container's, serves the container's control socket — `start` sends
/// the join to the pod's VMM process with that stdio; a signal asked for
/// (or one it gets) goes to the container in the guest — and exits with
/// the container's status, after echoing an OOM kill to its cgroup.
fn stand_in(mut s: StandIn) -> Result<i32, RuntimeError> {
    let fork = MicrovmError::io("fork the process that stands for the container");
    let one = moat_sys::process::OneThread::check().map_err(fork)?;
    let _blocked = crate::ops::BlockedForFork::new(true)?;
    let pid = one
        .fork(0, |one| {
            let mut keep = vec![s.listener.as_raw_fd()];
            keep.extend(s.meminfo.as_ref().map(|f| f.as_raw_fd()));
            keep.extend(s.tty.as_ref().map(|f| f.as_raw_fd()));
            // The state lock and whatever else `create` held.
            if moat_sys::fd::close_all_except(&keep).is_err() {
                return 255;
            }
            if let Some(t) = s.tty.take() {
                if crate::create::become_terminal(t).is_err() {
                    return 255;
                }
            }
            let code = serve(&mut s);
            let exit = proto::Exit {
                code: code.0,
                oom_kills: code.1,
                pids_limit_hits: 0,
            };
            let _ = std::fs::write(&s.events, serde_json::to_vec(&exit).unwrap_or_default());
            if code.1 > 0 {
                if let Some(limit) = s.oom_limit {
                    crate::vmm::echo_oom(&one, limit, s.meminfo.as_ref());
                }
            }
            code.0
        })
        .map_err(MicrovmError::io(
            "fork the process that stands for the container",
        ))?;
    Ok(pid)
}

/// The stand-in's life: (exit status, OOM kills in the guest).
fn serve(s: &mut StandIn) -> (i32, u64) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use nix::sys::signal::{SigSet, Signal};
    use nix::sys::signalfd::{SfdFlags, SignalFd};
    let mut mask = SigSet::empty();
    for sig in moat_jail::supervise::FORWARDED {
        mask.add(sig);
    }
    if mask.thread_block().is_err() {
        return (255, 0);
    }
    let Ok(sfd) = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
    else {
        return (255, 0);
    };
    // The join's connection to the pod's VMM process, once started.
    let mut joined: Option<OwnedFd> = None;
    loop {
        let mut fds = vec![
            PollFd::new(s.listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(sfd.as_fd(), PollFlags::POLLIN),
        ];
        if let Some(j) = &joined {
            fds.push(PollFd::new(j.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::Error::EINTR) => {}
            Err(_) => return (255, 0),
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        if ready[1] {
            while let Ok(Some(info)) = sfd.read_signal() {
                let signal = info.ssi_signo as i32;
                if signal == Signal::SIGWINCH as i32 {
                    if let Some(j) = &joined {
                        resize(j.as_fd());
                    }
                    continue;
                }
                match &joined {
                    Some(j) => {
                        let _ = control::send(j.as_fd(), &Request::Signal { signal });
                    }
                    // Nothing runs yet: the signal ends the container.
                    None => return (128 + signal, 0),
                }
            }
        }
        if ready.get(2) == Some(&true) {
            if let Some(j) = &joined {
                return match control::recv::<Reply>(j.as_fd()) {
                    Ok(Reply::Exit { code, oom_kills }) => (code, oom_kills),
                    // The pod's VM ended, and the container with it.
                    _ => (137, 0),
                };
            }
        }
        if ready[0] {
            let Ok(raw) = nix::sys::socket::accept4(
                s.listener.as_raw_fd(),
                nix::sys::socket::SockFlag::SOCK_CLOEXEC,
            ) else {
                continue;
            };
            let Ok(client) = moat_sys::process::dup_raw_fd(raw) else {
                let _ = nix::unistd::close(raw);
                continue;
            };
            let _ = nix::unistd::close(raw);
            let Ok(req) = control::recv::<Request>(client.as_fd()) else {
                continue;
            };
            let reply = match req {
                Request::Start if joined.is_none() => match start(s) {
                    Ok(sock) => {
                        // The terminal may have been resized meanwhile.
                        resize(sock.as_fd());
                        joined = Some(sock);
                        Reply::Ok
                    }
                    Err(r) => {
                        let _ = control::send(client.as_fd(), &r);
                        return (255, 0);
                    }
                },
                Request::Start => Reply::Error {
                    message: "the container is not in the created state".into(),
                    exec_status: None,
                },
                Request::Signal { signal } => match &joined {
                    Some(j) => {
                        let _ = control::send(j.as_fd(), &Request::Signal { signal });
                        Reply::Ok
                    }
                    None => {
                        let _ = control::send(client.as_fd(), &Reply::Ok);
                        return (128 + signal, 0);
                    }
                },
                // New limits: the guest's part (the host's is the
                // runtime's, on this process's cgroup), into the join
                // before it is sent, to the container in the guest after.
                Request::Update { resources, .. } => match &joined {
                    None => {
                        moat_core::spec::merge_json(
                            &mut s.request.config["linux"]["resources"],
                            &resources,
                        );
                        Reply::Ok
                    }
                    Some(_) => forward(
                        s,
                        Request::Update {
                            resources,
                            container: Some(s.request.id.clone()),
                        },
                    ),
                },
                Request::Freeze { on, .. } => match &joined {
                    Some(_) => forward(
                        s,
                        Request::Freeze {
                            on,
                            container: Some(s.request.id.clone()),
                        },
                    ),
                    None => Reply::Error {
                        message: "the container is not running".into(),
                        exec_status: None,
                    },
                },
                Request::Exec { .. } | Request::Join { .. } | Request::Resize { .. } => {
                    Reply::Error {
                        message: "not for a pod's container's own socket".into(),
                        exec_status: None,
                    }
                }
            };
            let _ = control::send(client.as_fd(), &reply);
        }
    }
}

/// Passes `req` (new limits, a freeze) for the joined container in the
/// guest on to the pod's VMM process; its answer.
fn forward(s: &StandIn, req: Request) -> Reply {
    match control::call(&s.pod_control, &req, &[]) {
        Ok((_, reply)) => reply,
        Err(e) => Reply::Error {
            message: format!("the pod's microVM: {}", moat_core::error_chain(&e)),
            exec_status: None,
        },
    }
}

/// Passes this process's terminal's size on to the container's, when its
/// stdin is one.
fn resize(joined: std::os::fd::BorrowedFd) {
    if let Ok(ws) = rustix::termios::tcgetwinsize(std::io::stdin()) {
        if ws.ws_row > 0 && ws.ws_col > 0 {
            let req = Request::Resize {
                rows: ws.ws_row,
                cols: ws.ws_col,
            };
            let _ = control::send(joined, &req);
        }
    }
}

/// Sends the join, with this process's stdio, to the pod's VMM process:
/// its connection once the container runs, else the error reply.
fn start(s: &StandIn) -> Result<OwnedFd, Reply> {
    let failed = |message: String| Reply::Error {
        message,
        exec_status: None,
    };
    let (i, o, e) = (std::io::stdin(), std::io::stdout(), std::io::stderr());
    let stdio = [i.as_fd(), o.as_fd(), e.as_fd()];
    let (sock, reply) = control::call(
        &s.pod_control,
        &Request::Join {
            request: s.request.clone(),
        },
        &stdio,
    )
    .map_err(|e| failed(format!("the pod's microVM: {}", moat_core::error_chain(&e))))?;
    match reply {
        Reply::Ok => Ok(sock),
        Reply::Error { .. } => Err(reply),
        Reply::Exit { .. } => Err(failed("the container ended before it started".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileExt, MetadataExt};

    /// A sparse image: `data` at 0 and at 3 MiB, a hole between.
    fn sparse_image(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
        let p = dir.join(name);
        let f = File::create(&p).unwrap();
        f.set_len(4 << 20).unwrap();
        f.write_all_at(data, 0).unwrap();
        f.write_all_at(data, 3 << 20).unwrap();
        p
    }

    #[test]
    fn images_are_appended_apart_with_their_holes_and_given_back() {
        let d = tempfile::tempdir().unwrap();
        let (path, ro) = make_disk(d.path()).unwrap();
        let mut head = [0u8; 8];
        ro.read_exact_at(&mut head, 0).unwrap();
        assert_eq!(&head, proto::POD_DISK_MAGIC);
        assert_eq!(ro.metadata().unwrap().len(), POD_DISK_BYTES);
        let a = sparse_image(d.path(), "a", b"first image");
        let b = sparse_image(d.path(), "b", b"second");
        let (oa, sa) = append(&path, &a).unwrap();
        let (ob, sb) = append(&path, &b).unwrap();
        assert_eq!((oa, sa, sb), (ALIGN, 4 << 20, 4 << 20));
        // Aligned, and a read ahead past the first never reaches the second.
        assert!(ob % ALIGN == 0 && ob >= oa + sa + ALIGN, "{ob}");
        let read = |at: u64, n: usize| {
            let mut buf = vec![0u8; n];
            ro.read_exact_at(&mut buf, at).unwrap();
            buf
        };
        assert_eq!(read(oa, 11), b"first image");
        assert_eq!(read(oa + (3 << 20), 11), b"first image");
        assert_eq!(read(ob, 6), b"second");
        assert_eq!(read(ob + (3 << 20), 6), b"second");
        // Only the data was written: the holes stayed holes.
        let used = std::fs::metadata(&path).unwrap().blocks() * 512;
        assert!(used < (1 << 20), "{used} bytes allocated");
        release(&path, &[(oa, sa)]);
        assert_eq!(read(oa, 11), vec![0u8; 11]);
        assert_eq!(read(ob, 6), b"second");
        // Not a pod disk: refused.
        assert!(append(&a, &b).is_err());
    }

    #[test]
    fn a_pod_containers_shared_namespaces_are_the_ones_it_joins() {
        let spec: oci_spec::runtime::Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "linux": {"namespaces": [
                {"type": "pid"},
                {"type": "mount"},
                {"type": "network", "path": "/var/run/netns/cni-1"},
                {"type": "ipc", "path": "/proc/7/ns/ipc"},
                {"type": "uts", "path": "/proc/7/ns/uts"},
            ]}
        }))
        .unwrap();
        assert_eq!(joined_namespaces(&spec), ["network", "ipc", "uts"]);
    }
}
