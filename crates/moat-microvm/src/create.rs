//! `create` and `launch`, as a checklist: everything the VMM process needs
//! is prepared and opened here, by the runtime, before the fork; a failure
//! at any step undoes the steps before it.
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use moat_core::runtime::{ConfigSource, CreateRequest, Launched, RuntimeError};
use moat_core::state::{ContainerStatus, State};
use moat_core::Tier;
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

use crate::guestspec::{self, Plan};
use crate::jail::JailPlan;
use crate::vmm::{self, Backend, VmmPlan};
use crate::{
    assets, control, disk, proto, snapshot, HostChoice, MicrovmError, MicrovmPart, MicrovmTier,
};

/// QEMU's own memory beyond the guest's (its code, TCG's translation
/// cache, I/O buffers), added to the VMM's cgroup limit.
pub const VMM_OVERHEAD_TCG_MIB: u64 = 192;
pub const VMM_OVERHEAD_KVM_MIB: u64 = 96;
/// Processes and threads the VMM's cgroup allows (QEMU's threads).
pub const VMM_PIDS: i64 = 512;
/// How long a guest may take to boot before `create` gives up: TCG boots
/// take seconds, and a loaded host more.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
/// How long `create` waits for the VMM process to say it is ready.
const SETUP_TIMEOUT: Duration = Duration::from_secs(120);

/// Whether `source` is one of the host's paths the embedded default shows:
/// its system directories (/usr, /lib, …) and the /etc entries it shows
/// (/etc/ssl/certs, /etc/terminfo, /etc/ld.so.cache, …). Their images are
/// the same for every container, so they are cached rather than built (or
/// copied into the guest) per run.
fn shown_host_path(source: &Path) -> bool {
    let host_dirs = moat_core::embedded::HOST_DIRS
        .iter()
        .any(|d| source == Path::new("/").join(d));
    let etc = source
        .strip_prefix("/etc")
        .ok()
        .and_then(Path::to_str)
        .is_some_and(|rel| !rel.is_empty() && moat_core::embedded::shown_etc(rel));
    host_dirs || etc
}

/// Host files the embedded default shows that change while the host runs
/// (a DHCP client, a container engine or a test rewrites them): they are
/// copied into every run rather than carried in the cached group image,
/// whose every rebuild would also mean a new primed snapshot.
const VOLATILE_ETC: &[&str] = &["/etc/hosts", "/etc/resolv.conf"];

/// The container's writable layer in its state directory
/// ([`disk::scratch`]).
const SCRATCH: &str = "scratch.ext4";

/// What a failed create must undo.
pub(crate) struct Undo<'a> {
    pub tier: &'a MicrovmTier,
    pub id: &'a str,
    pub pid: Option<i32>,
    pub cgroup: Option<moat_jail::cgroup::CgroupManager>,
    pub socket_dir: Option<PathBuf>,
    slot: Option<(u32, String)>,
    volume_slot: Option<(u32, String)>,
    net_stack: Option<moat_container::network::StackProcess>,
    volumes: Option<crate::volumes::VolumeServer>,
    pod_link: Option<crate::podnet::PodLinkRecord>,
    /// A joined container's regions of its pod's disk (`crate::pod`).
    pub pod_regions: Option<(PathBuf, Vec<(u64, u64)>)>,
    /// A pod's share, or a joined container's part of it.
    pub pod_share: Option<PathBuf>,
    /// A kept writable layer this `create` made (`crate::layer`).
    pub kept_layer: Option<PathBuf>,
    pub armed: bool,
}

impl<'a> Undo<'a> {
    /// Nothing to undo yet but the state of container `id`.
    pub fn new(tier: &'a MicrovmTier, id: &'a str) -> Undo<'a> {
        Undo {
            tier,
            id,
            pid: None,
            cgroup: None,
            socket_dir: None,
            slot: None,
            volume_slot: None,
            net_stack: None,
            volumes: None,
            pod_link: None,
            pod_regions: None,
            pod_share: None,
            kept_layer: None,
            armed: true,
        }
    }
}

impl Drop for Undo<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Some(pid) = self.pid {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
        }
        if let Some(stack) = &self.net_stack {
            stack.kill();
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(stack.pid), None);
        }
        if let Some(v) = &self.volumes {
            v.kill();
        }
        if let Some(rec) = &self.pod_link {
            let _ = crate::podnet::release(rec);
        }
        if let Some(cg) = &self.cgroup {
            let _ = cg.destroy();
        }
        if let Some(d) = &self.socket_dir {
            let _ = std::fs::remove_dir_all(d);
            // As `delete` does: the last container's leaves no empty
            // directory behind.
            if let Some(parent) = d.parent() {
                let _ = std::fs::remove_dir(parent);
            }
        }
        if let Some(slot) = &self.slot {
            crate::ops::release_slot(slot);
        }
        if let Some(slot) = &self.volume_slot {
            crate::ops::release_slot(slot);
        }
        if let Some((disk, regions)) = &self.pod_regions {
            crate::pod::release(disk, regions);
        }
        if let Some(share) = &self.pod_share {
            // The VMM and the volume server are gone: nothing holds it.
            crate::pod::remove_share(share);
        }
        if let Some(img) = &self.kept_layer {
            // Made for this container, which never ran: nothing in it.
            crate::layer::remove(img);
        }
        // The jail's mount point, per-container images, the state.
        let _ = self.tier.sd.remove(self.id);
    }
}

impl MicrovmTier {
    pub(crate) fn create_vm(
        &self,
        req: &CreateRequest,
        launch: bool,
    ) -> Result<Launched, RuntimeError> {
        let host = crate::check_host()?;
        moat_core::steps::mark("microvm-host");
        let spec_json = serde_json::to_value(&req.config.spec)
            .map_err(|e| RuntimeError::Invalid(format!("config: {e}")))?;
        refuse_unsupported(&spec_json)?;
        let reclaim_interval_ms = reclaim_interval_ms(req.config.spec.annotations().as_ref())?;
        let joined = joined_netns(&req.config.spec).map(|p| self.network_meant(p));
        let mut net = net_request(&req.config.spec, joined.clone())?;
        let own_disk = |p: &Path| own_disk(p);
        let shared_file =
            |p: &Path| shown_host_path(p) && !VOLATILE_ETC.iter().any(|v| p == Path::new(v));
        // Read-write volumes are not disk slots: cards on the share ports
        // on QEMU (`VmmPlan::share_port`), virtio-fs slots on moat's own
        // VMM (`VmmPlan::fs_slots`), as many of either.
        let on_qemu = matches!(host.backend, Backend::Qemu { .. });
        let volume_room = if on_qemu {
            vmm::qemu::SHARE_PORTS
        } else {
            vmm::FS_SLOTS
        };
        let probe = guestspec::Probe {
            kind: &guestspec::source_kind,
            own_disk: &own_disk,
            shared_file: &shared_file,
            volume_ports: volume_room,
        };
        let mut plan = guestspec::plan(&spec_json, &req.config.rootfs, &probe)
            .map_err(RuntimeError::Invalid)?;
        guestspec::inherit_rlimits(&mut plan.config["process"], &guestspec::host_rlimits());
        // startContainer hooks run in the guest, whose container is `w0`:
        // their state carries this container's ID. (Only then: a config
        // of its own per container would never match the held container
        // of a primed snapshot.)
        if plan.config["hooks"]["startContainer"].is_array() {
            plan.config["annotations"][moat_core::tier::STATE_ID_ANNOTATION] =
                serde_json::json!(req.id);
        }
        // A Kubernetes pod's container joins its pod's VM where it can.
        if let Some(pod) = self.pod_to_join(req, &plan, launch) {
            // Its namespaces to join are the pod's, which it joins there.
            plan.warnings
                .retain(|w| !w.contains("namespace to join is on the host"));
            for w in &plan.warnings {
                tracing::warn!("microvm: {w}");
            }
            return self.join_pod(req, pod, plan);
        }
        for w in &plan.warnings {
            tracing::warn!("microvm: {w}");
        }
        let rootless = !rustix::process::geteuid().is_root();
        // A pod's sandbox: its VM is the pod's, with the disk the pod's
        // other containers' images are appended to, the memory they share
        // (unless it has a limit of its own) and, unless the pod says
        // otherwise, the share their read-write volumes are bound into
        // (one more virtio-fs volume of the guest's: `crate::pod`).
        let pod_sandbox =
            moat_core::tier::is_pod_sandbox(req.config.spec.annotations().as_ref(), req.id);
        // The pod's disk takes a slot, and its share another (moat's own
        // VMM) or a port (QEMU).
        let disks_used = plan.disks.len() + usize::from(!plan.group.is_empty());
        let room = disks_used < guestspec::MAX_DISKS && plan.volumes.len() < volume_room;
        let wanted = pod_sandbox && !rootless && crate::pod::wants_share(&spec_json) && room;
        // Without virtiofsd the pod still runs, its containers with
        // read-write volumes in VMs of their own (as a pod annotated
        // `none`).
        let share = match wanted.then(crate::volumes::virtiofsd) {
            Some(Ok(_)) => Some(crate::pod::share_dir(self.sd.root(), req.id)),
            Some(Err(why)) => {
                tracing::warn!(
                    "microvm: the pod's VM gets no share for its containers' read-write volumes ({why}): such a container gets a VM of its own"
                );
                None
            }
            None => None,
        };
        if let Some(share) = &share {
            plan.volumes.push(guestspec::VolumeNeed {
                source: share.clone(),
                mount: guestspec::POD_SHARE.into(),
                tag: guestspec::volume_tag(plan.volumes.len()),
            });
        }
        let virtiofsd = if plan.volumes.is_empty() {
            None
        } else {
            Some(crate::volumes::virtiofsd().map_err(RuntimeError::Invalid)?)
        };
        moat_core::steps::mark("microvm-plan");
        let lock = self.sd.create(req.id)?;
        let mut undo = Undo::new(self, req.id);
        let dir = lock.dir().to_owned();
        let mut st = initial_state(req, &dir);
        self.sd.save(&st)?;
        if let Some(share) = &share {
            // (This pod's state exists already: never swept.)
            crate::pod::sweep_shares(self.sd.root(), |id| self.sd.container_dir(id).exists());
            crate::pod::make_share(share)?;
            undo.pod_share = Some(share.clone());
        }
        std::fs::write(
            dir.join(crate::CONFIG),
            serde_json::to_vec(&spec_json).unwrap_or_default(),
        )
        .map_err(MicrovmError::io("save the config"))?;
        // A namespace the config joins, when the stack is not asked for:
        // the guest takes over its interface (a pod's address becomes the
        // guest's). Never the runtime's own namespace (the host's).
        // When another guest holds that interface (a pod's second
        // container), moat's stack instead, serving from the namespace.
        let mut shares_namespace = false;
        let pod_link = match (&net, joined) {
            (None, Some(ns)) if !crate::podnet::is_own_netns(&ns) => {
                match crate::podnet::take(&ns, req.id) {
                    Err(crate::podnet::PodNetError::Taken {
                        interface,
                        addresses,
                        ..
                    }) => {
                        net = Some(pod_share(&ns, &interface, addresses));
                        shares_namespace = true;
                        None
                    }
                    taken => taken.map_err(MicrovmError::from)?,
                }
            }
            _ => None,
        };
        undo.pod_link = pod_link.as_ref().map(|p| p.record.clone());
        moat_core::steps::mark("microvm-pod-link");
        // Otherwise, with hooks to run (Docker's libnetwork sets the
        // container's interface up from a prestart hook, in the namespace
        // of the container's process: the VMM process's), a TAP in the VMM
        // process's namespace for whatever interface they put there.
        let own_tap =
            (net.is_none() && pod_link.is_none() && !rootless && has_host_hooks(&req.config.spec))
                .then(|| crate::podnet::tap_name(req.id));
        // The guest's network device, as its snapshot must match it: on a
        // TAP (the interface taken or to be taken), with offloads.
        let net_device = if pod_link.is_some() || own_tap.is_some() {
            Some(snapshot::NetDevice::Offloads)
        } else {
            net.is_some().then_some(snapshot::NetDevice::Frames)
        };
        // A root whose writes an engine keeps gets a kept layer
        // (`crate::layer`): what its last VM mirrored is applied to the
        // root first (if its `delete` could not), and the root's image is
        // then the one that layer lies over, while the root is what the two
        // stand for.
        let layers = self.cache_dir().join(crate::layer::DIR);
        // Kept layers whose directory is gone go first, whatever this
        // container's root.
        crate::layer::sweep(&layers);
        let writable_root = !plan.config["root"]["readonly"].as_bool().unwrap_or(false);
        let layer_dir = if writable_root
            && !pod_sandbox
            && !req.config.rootfs.starts_with(self.sd.root())
            && !self.cacheable(&req.config.rootfs)
        {
            kept_layer_dir(&req.config.rootfs)?
        } else {
            None
        };
        let settled = layer_dir.as_ref().map_or_else(Default::default, |d| {
            crate::layer::settle(&layers, &self.cache_dir(), d, &req.config.rootfs, true)
        });
        let mut guest = self.prepare_guest(&host, &plan, &dir, settled.base.as_ref())?;
        let pod_disk = if pod_sandbox && guest.disk_files.len() < guestspec::MAX_DISKS {
            let (path, f) = crate::pod::make_disk(&dir)?;
            guest.disk_files.push(f);
            guest.shared = false;
            if spec_json["linux"]["resources"]["memory"]["limit"]
                .as_i64()
                .is_none_or(|l| l <= 0)
            {
                let pod_limit = self
                    .config_cgroup(req, &spec_json, rootless)
                    .ok()
                    .and_then(|c| c.parent_memory_limit());
                guest.mem_mib = pod_memory_mib(&host, pod_limit);
            }
            Some(path)
        } else {
            if pod_sandbox {
                tracing::warn!(
                    "microvm: the pod's sandbox has no disk slot left for its containers: each gets a VM of its own"
                );
            }
            None
        };
        // The container's writable layer on a disk of its own, when its
        // root is writable and its disks are its own (an engine's bundle,
        // a `--read-write` root): a primed snapshot, for shared disks,
        // holds its overlay in guest memory, mounted before the save. A
        // pod's sandbox gets one for the writable layers of the containers
        // that join its VM (the pause process writes nothing).
        let wants_layer = (writable_root || pod_disk.is_some()) && !guest.shared;
        let mut keep_layer = false;
        let mut mirror = None;
        let scratch = if wants_layer && guest.disk_files.len() < guestspec::MAX_DISKS {
            // Kept from one VM to the next when the root's writes are the
            // engine's to keep (`crate::layer`): not a pod's, not a root
            // moat made for one run.
            let kept = match (&layer_dir, &guest.root_image) {
                (Some(d), Some(lower)) if pod_disk.is_none() => {
                    // Waited for already when `settle` found it held.
                    let wait = if settled.busy {
                        std::time::Duration::ZERO
                    } else {
                        crate::layer::BUSY_WAIT
                    };
                    // A new layer's record: its directory's digest, which
                    // is the root's when that is the root itself.
                    let cache = self.cache_dir();
                    let plain = req.config.rootfs.canonicalize().is_ok_and(|r| r == *d);
                    // (None for a plain root not hashed: imaged per
                    // container, its layer never has a base to keep.)
                    let tree = || match (plain, &lower.digest) {
                        (true, x) => x.as_ref().map(|x| disk::hex(x)),
                        (false, _) => crate::tree_cache::digest(&cache, d)
                            .ok()
                            .map(|x| disk::hex(&x)),
                    };
                    let lower = crate::layer::Lower {
                        uuid: &lower.uuid,
                        tree: &tree,
                        on_base: lower.on_base,
                    };
                    kept_layer(&layers, d, lower, wait)?
                }
                _ => None,
            };
            match kept {
                Some(k) => {
                    keep_layer = true;
                    if k.made {
                        undo.kept_layer = Some(k.path.clone());
                    }
                    mirror = Some((mirror_file(&k.stream)?, k.since_ns, k.path.clone()));
                    Some((k.file, k.uuid))
                }
                None => Some(disk::scratch(&dir.join(SCRATCH), false)?),
            }
        } else {
            if wants_layer {
                tracing::warn!(
                    "microvm: no disk slot left for the root's writable layer: its writes stay in the guest's memory (at most half its RAM)"
                );
            }
            None
        };
        moat_core::steps::mark("microvm-guest-files");
        let terminal = spec_json["process"]["terminal"].as_bool().unwrap_or(false);
        let (rows, cols) = console_size(&spec_json);
        let cgroup = self.vmm_cgroup(req, &spec_json, &host, guest.mem_mib, rootless)?;
        undo.cgroup = cgroup.clone();
        moat_core::steps::mark("microvm-cgroup");
        let socket_dir = self.socket_dir(req.id);
        let listener = listen(&socket_dir)?;
        undo.socket_dir = Some(socket_dir.clone());
        // The VMM's host user: as root, a block of moat's ID allocator, the
        // VMM's alone; rootless, the user itself (no other host ID is an
        // unprivileged user's to take), in a user namespace of the VMM's own.
        let alloc = if rootless {
            None
        } else {
            Some(allocate_block()?)
        };
        let (uid, gid) = match &alloc {
            Some(a) => (a.host_start, a.host_start),
            None => (
                rustix::process::geteuid().as_raw(),
                rustix::process::getegid().as_raw(),
            ),
        };
        // The volumes' host IDs: a block of their own (the guest's IDs
        // become the container's host IDs there, never root), apart from
        // the VMM's.
        let volume_alloc = match &virtiofsd {
            Some(_) if !rootless => Some(allocate_block()?),
            _ => None,
        };
        let volume_maps = match (&virtiofsd, &volume_alloc) {
            (Some(_), Some(a)) => Some(crate::volumes::id_maps(&spec_json, a.host_start)),
            // Rootless: the user's own subordinate IDs, no block.
            (Some(_), None) => Some(crate::volumes::id_maps_rootless(&spec_json, uid, gid)),
            _ => None,
        }
        .transpose()
        .map_err(RuntimeError::Invalid)?;
        moat_core::steps::mark("microvm-host-ids");
        let slot = alloc
            .as_ref()
            .map(|a| (a.slot, moat_jail::idalloc::Owner::current().record()));
        let volume_slot = volume_alloc
            .as_ref()
            .map(|a| (a.slot, moat_jail::idalloc::Owner::current().record()));
        let jail_root = dir.join("jail");
        std::fs::create_dir(&jail_root)
            .map_err(MicrovmError::io("create the jail's mount point"))?;
        let events = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dir.join(crate::EVENTS))
            .map_err(MicrovmError::io("create the events record"))?;
        // The jail's root: what the VMM reads (QEMU also its binary,
        // libraries and firmware), /dev/null, /dev/urandom, and /dev/kvm
        // with its group under KVM; the process filter: QEMU's list, or moat's own VMM's.
        let mut files = match &host.backend {
            Backend::Qemu { binary, .. } => vmm::qemu::host_files_cached(&self.cache_dir(), binary)
                .map_err(MicrovmError::Invalid)?,
            Backend::Builtin => Vec::new(),
        };
        files.push(guest.kernel.clone());
        files.push(guest.initrd.clone());
        // /dev/urandom: the relay's entropy for the guest (and QEMU's).
        let mut devices = vec![PathBuf::from("/dev/null"), PathBuf::from("/dev/urandom")];
        let mut groups = Vec::new();
        let kvm = match &host.backend {
            Backend::Qemu { accel, .. } => *accel == moat_vmm::qemu::Accel::Kvm,
            Backend::Builtin => true,
        };
        if kvm {
            devices.push(PathBuf::from(crate::builtin::KVM));
        }
        // Rootless, the VMM keeps the user's groups (its own user namespace
        // cannot change them): among them the one that opens /dev/kvm.
        if kvm && !rootless {
            use std::os::unix::fs::MetadataExt;
            let m = std::fs::metadata(crate::builtin::KVM)
                .map_err(MicrovmError::io(format!("stat {}", crate::builtin::KVM)))?;
            groups.push(m.gid());
        }
        let process_filter = match &host.backend {
            Backend::Qemu { .. } => {
                crate::seccomp::allow_list(&crate::seccomp::names(crate::seccomp::VMM))
            }
            Backend::Builtin => crate::seccomp::builtin_process_profile(),
        }
        .map_err(|e| MicrovmError::Invalid(format!("the VMM's seccomp profile: {e}")))?;
        let run = proto::RunRequest {
            config: plan.config.clone(),
            disks: guest.guest_disks.clone(),
            files: guest.files.clone(),
            overlay_root: Some(guestspec::disk_mount(0)),
            rows,
            cols,
            // Filled by the VMM process right before it sends the request.
            entropy: Vec::new(),
            clock_ns: 0,
            net: match (&net, &pod_link) {
                // Sharing a pod's namespace: the container's own
                // resolv.conf (the pod's DNS, reached through the stack).
                (Some(_), _) if shares_namespace => Some(proto::GuestNet {
                    resolv_conf: None,
                    extra: Vec::new(),
                    ..proto::GuestNet::of(&moat_net::NetConfig::default())
                }),
                (Some(_), _) => Some(proto::GuestNet::of(&moat_net::NetConfig::default())),
                (None, Some(p)) => Some(p.guest.clone()),
                (None, None) => None,
            },
            seccomp: host_compiled_seccomp(&plan.config, self.sd.root()),
            volumes: plan
                .volumes
                .iter()
                .map(|v| proto::GuestVolume {
                    tag: v.tag.clone(),
                    mount: v.mount.clone(),
                })
                .collect(),
            scratch: scratch.as_ref().map(|(_, uuid)| uuid.clone()),
            keep_layer,
            mirror_since: mirror.as_ref().map(|(_, since, _)| *since),
            mirror_at_pause_only: removed_at_exit(req.config.spec.annotations().as_ref()),
            reclaim_interval_ms,
        };
        // The layer's mirror, which `delete` applies to the root.
        let (mirror_stream, mirror_part) = match mirror {
            Some((f, _, layer)) => (
                Some(f),
                Some(crate::MirrorPart {
                    layer,
                    rootfs: req.config.rootfs.clone(),
                }),
            ),
            None => (None, None),
        };
        refuse_oversized("the container's config and the files it binds", &run)?;
        // With the console on, the kernel's messages carry times, the
        // agent traces its steps on the console, and the run's container
        // runtime (a fork of the agent) logs its step records to the
        // workload's stderr.
        let cmdline = if std::env::var_os("MOAT_MICROVM_CONSOLE").is_some() {
            format!(
                "{} debug",
                host.backend.cmdline().replace(" quiet", " printk.time=1")
            )
        } else {
            host.backend.cmdline()
        };
        // Read-write volumes on QEMU (a pod's share among them) and a
        // pod's more network interfaces (Multus): each is hot-added on a
        // PCIe port of its own once the guest is up
        // (`VmmPlan::share_port`), so that the guest before them is saved
        // and restored (QEMU saves no guest with a vhost-user device; a
        // snapshot's guest has one network device), and so that volumes
        // take no disk slot (the plan allowed as many as there are ports).
        // Its kernel takes the ports' hotplug interrupts only with the
        // word. The more interfaces only where they fit on the ports after
        // the volumes' (else devices from the start: not saved).
        let more_interfaces = pod_link.as_ref().map_or(0, |p| p.more_taps.len());
        let hot_net = on_qemu
            && more_interfaces > 0
            && plan.volumes.len() + more_interfaces <= vmm::qemu::SHARE_PORTS;
        let share_port = (on_qemu && !plan.volumes.is_empty()) || hot_net;
        let cmdline = if share_port {
            with_kernel_word(&cmdline, crate::agent::boot::SHARE_PORT_WORD)
        } else {
            cmdline
        };
        // A guest saved or restored gets all the disk slots (unused ones
        // hold the spare image), so one snapshot fits every container of a
        // configuration.
        let disk_slots = guestspec::MAX_DISKS;
        // A networked guest has one device more: its snapshots are keyed
        // apart (and apart again when the device has offloads,
        // `snapshot::NetDevice`). Its frame stream stays clean if a restore fails over to a
        // cold boot: until `Run` loads virtio_net, QEMU neither reads nor
        // writes the guest's frames (docs/design.md).
        // The VMM whose snapshot format it is: QEMU (its binary keys the
        // snapshot), or moat's own (this binary, which the initramfs's name
        // already digests).
        let (vmm_binary, accel) = match &host.backend {
            Backend::Builtin => (None, "moat-vmm"),
            Backend::Qemu { binary, accel } => (
                Some(binary.as_path()),
                match accel {
                    moat_vmm::qemu::Accel::Kvm => "kvm",
                    moat_vmm::qemu::Accel::Tcg => "tcg",
                },
            ),
        };
        // Volumes never keep a guest from its snapshot: they are hot-added
        // on QEMU's share ports, or fill the virtio-fs slots every guest of
        // moat's own VMM saves (`VmmPlan::fs_slots`), after the restore or
        // the save (the plan allowed no more than either has).
        let offer = if more_interfaces > 0 && !hot_net {
            // A snapshot's guest has the one network device (moat's own
            // VMM, past the ports).
            snapshot::Offer::None {
                why: "a guest with more than one network interface is not saved in snapshots"
                    .into(),
            }
        } else {
            snapshot::offer(
                &self.cache_dir(),
                &snapshot::Identity {
                    vmm: vmm_binary,
                    kernel: &guest.kernel,
                    initrd: &guest.initrd,
                    cmdline: &cmdline,
                    mem_mib: guest.mem_mib,
                    vcpus: guest.vcpus,
                    disk_slots,
                    accel,
                    net: net_device,
                    share_port,
                    // Primed with the run's container held even with
                    // volumes: they are mounted where its binds see them
                    // once hot-added or shown (design.md, *Primed
                    // snapshots*).
                    disks: guest
                        .shared
                        .then_some((&guest.guest_disks[..], &guest.images[..])),
                },
            )
        };
        let prime = guest.shared && matches!(offer, snapshot::Offer::Save { .. });
        let snapshot_plan = match &offer {
            snapshot::Offer::None { why } => vmm::SnapshotPlan::Off(why.clone()),
            snapshot::Offer::Restore { file, .. } => vmm::SnapshotPlan::Restore(
                file.try_clone()
                    .map_err(MicrovmError::io("duplicate the snapshot"))?,
            ),
            snapshot::Offer::Save { file, .. } => vmm::SnapshotPlan::Save(
                file.try_clone()
                    .map_err(MicrovmError::io("duplicate the snapshot"))?,
            ),
        };
        let (net_stack_end, net_vmm_end) = net_link(net.is_some())?.unzip();
        let (net_vmm_end, forward, more_net) = match (net_vmm_end, pod_link) {
            (Some(end), _) => (Some(vmm::GuestLink::Stream(end)), None, Vec::new()),
            (None, Some(p)) => (Some(vmm::GuestLink::Tap(p.tap)), p.forward, p.more_taps),
            (None, None) => (None, None, Vec::new()),
        };
        let (volume_listeners, volume_vmm_ends): (Vec<_>, Vec<_>) =
            crate::volumes::links(&socket_dir, plan.volumes.len())?
                .into_iter()
                .map(|l| (l.listener, l.vmm_end))
                .unzip();
        let mut vplan = VmmPlan {
            backend: host.backend.clone(),
            kernel: guest.kernel.clone(),
            initrd: guest.initrd.clone(),
            cmdline,
            vcpus: guest.vcpus,
            mem_mib: guest.mem_mib,
            disks: guest.disk_files,
            scratch: scratch.map(|(f, _)| f),
            mirror: mirror_stream,
            spare: guest.spare,
            // Without a snapshot to fit, the guest gets its own disks
            // only: each spare is a device the guest's kernel probes
            // (~7 ms under TCG, its partition table read among it).
            disk_slots: match &offer {
                snapshot::Offer::None { .. } => 0,
                _ => disk_slots,
            },
            run,
            autostart: launch,
            terminal,
            jail: JailPlan {
                root: jail_root,
                files,
                devices,
                uid,
                gid,
                groups,
                rootless,
                keep_fds: Vec::new(),
                // Set once the setup channel exists (below).
                runtime: None,
                seccomp: process_filter,
                // The guest's RAM, a file QEMU's snapshot leaves out.
                ram_mib: share_port.then_some(guest.mem_mib),
            },
            events,
            boot_timeout: BOOT_TIMEOUT,
            console: std::env::var_os("MOAT_MICROVM_CONSOLE").is_some(),
            snapshot: snapshot_plan,
            prime,
            net: net_vmm_end,
            more_net,
            own_tap: own_tap.clone(),
            volumes: volume_vmm_ends,
            share_port,
            fs_slots: match &offer {
                snapshot::Offer::None { .. } => 0,
                _ if on_qemu => 0,
                _ => vmm::FS_SLOTS,
            },
            hot_net,
            forward,
            cgroup_memory: cgroup
                .as_ref()
                .map(|_| vmm_memory_limit(&host, guest.mem_mib)),
            meminfo: None,
        };
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(MicrovmError::sys("create the setup channel"))?;
        let pty = if terminal { Some(host_pty()?) } else { None };
        if let (Some(p), (r, c)) = (&pty, (rows, cols)) {
            if r > 0 && c > 0 {
                let _ = rustix::termios::tcsetwinsize(
                    &p.master,
                    rustix::termios::Winsize {
                        ws_row: r,
                        ws_col: c,
                        ws_xpixel: 0,
                        ws_ypixel: 0,
                    },
                );
            }
        }
        let slave = pty
            .as_ref()
            .map(|p| p.slave.try_clone())
            .transpose()
            .map_err(MicrovmError::io("duplicate the pty"))?;
        let die = req.die_with_runtime;
        if die {
            vplan.jail.runtime = Some(std::os::fd::AsRawFd::as_raw_fd(&theirs));
        }
        let pid = match spawn_vmm(vplan, theirs, listener, slave, die) {
            Ok(p) => p,
            Err(e) => {
                snapshot::settle(offer, None);
                return Err(e);
            }
        };
        undo.pid = Some(pid);
        moat_core::steps::mark("microvm-vmm-spawn");
        // The blocks stay allocated, released by `delete` (or the undo,
        // after it killed what runs with their IDs): the VMM runs as the
        // first ID of its own until it ends, virtiofsd with the volumes'.
        std::mem::forget(alloc);
        undo.slot = slot.clone();
        std::mem::forget(volume_alloc);
        undo.volume_slot = volume_slot.clone();
        if let Some(cg) = &cgroup {
            cg.add_pid(pid).map_err(MicrovmError::from)?;
        }
        let net_stack = match (&net, net_stack_end) {
            (Some(n), Some(end)) => {
                let stack = start_stack(n, end, pid, req, &dir)?;
                undo.net_stack = Some(stack);
                Some(stack)
            }
            _ => None,
        };
        let volume_server = match (&virtiofsd, &volume_maps) {
            (Some(binary), Some(maps)) => {
                let server = crate::volumes::start(crate::volumes::Start {
                    volumes: &plan.volumes,
                    listeners: volume_listeners,
                    maps,
                    vmm: pid,
                    log: &dir.join("volumes.log"),
                    virtiofsd: binary,
                    cgroup: cgroup.as_ref(),
                    rootless,
                    receive_mounts: share.is_some(),
                })?;
                undo.volumes = Some(server);
                Some(server)
            }
            _ => None,
        };
        st.pid = pid;
        st.pid_start_time = moat_jail::procfs::pid_start_time(pid).unwrap_or(0);
        st.tier = Tier::Microvm;
        st.tier_state = serde_json::to_value(MicrovmPart {
            cgroup: cgroup
                .as_ref()
                .map_or(serde_json::Value::Null, |c| c.to_saved()),
            socket_dir,
            vmm_uid: uid,
            vmm_slot: slot,
            volume_slot,
            backend: host.why.clone(),
            net_stack,
            volumes: volume_server,
            pod_link: undo.pod_link.clone(),
            pod_disk,
            pod_share: share,
            joined: None,
            mirror: mirror_part,
            guest_frozen: false,
        })
        .map_err(|e| RuntimeError::Invalid(e.to_string()))?;
        self.sd.save(&st)?;
        // The runtime's hooks, on the host where the runtime-spec runs
        // them, with the VMM process as the container's: its namespaces
        // exist, the guest has not booted. A failure fails `create`.
        moat_container::lifecycle::run_creation_hooks(req.config.spec.hooks().as_ref(), &st)
            .map_err(MicrovmError::from)?;
        // The interface the hooks gave the VMM process's namespace, if any.
        let hook_net = match &own_tap {
            Some(tap) => crate::podnet::take_into(Path::new(&format!("/proc/{pid}/ns/net")), tap)
                .map_err(MicrovmError::from)?,
            None => None,
        };
        // Go: the VMM process is in its cgroup (with the guest's network).
        crate::control::send(ours.as_fd(), &crate::control::Go { net: hook_net })
            .map_err(MicrovmError::from)?;
        let volumes_log = dir.join("volumes.log");
        let mut virtiofsd_said = || {
            // The VMM process is done; once the volume server has logged
            // virtiofsd's last words and ended, they are read.
            let v = undo.volumes.as_ref()?;
            if let Some(pid) = undo.pid.take() {
                let pid = nix::unistd::Pid::from_raw(pid);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                let _ = nix::sys::wait::waitpid(pid, None);
            }
            v.settle();
            last_word(&volumes_log)
        };
        let ready = wait_ready(&ours, &mut virtiofsd_said);
        moat_core::steps::mark("microvm-guest-up");
        snapshot::settle(offer, ready.as_ref().ok());
        ready?;
        st.status = if launch {
            ContainerStatus::Running
        } else {
            ContainerStatus::Created
        };
        self.sd.save(&st)?;
        if let Some(p) = req.pid_file {
            write_pid_file(p, pid)?;
        }
        let mut terminal_master = None;
        if let Some(p) = pty {
            match req.console_socket {
                Some(sock) => send_console(sock, p.master)?,
                None => terminal_master = Some(p.master),
            }
        }
        undo.armed = false;
        drop(lock);
        if launch {
            moat_container::lifecycle::run_poststart(&st);
        }
        let _ = st;
        Ok(Launched {
            pid,
            terminal: terminal_master,
        })
    }

    /// The guest's boot files and disks.
    fn prepare_guest(
        &self,
        host: &HostChoice,
        plan: &Plan,
        dir: &Path,
        root_base: Option<&crate::tree_cache::Base>,
    ) -> Result<Guest, RuntimeError> {
        let cache = self.cache_dir();
        disk::ensure_dir(&cache)?;
        let kernel = assets::boot_image(&cache, &host.kernel)?;
        let initrd = assets::initramfs(&cache, &host.kernel)?;
        moat_core::steps::mark("microvm-boot-files");
        let mut guest_disks = Vec::new();
        let mut disk_files = Vec::new();
        let mut images = Vec::new();
        let mut shared = true;
        let mut root_image = None;
        for (i, need) in plan.disks.iter().enumerate() {
            let cacheable = self.cacheable(&need.source);
            shared &= cacheable;
            let img = if cacheable {
                disk::cached(&cache, &need.source)?
            } else {
                let (img, root) = own_image_over(
                    &cache,
                    &need.source,
                    &dir.join(format!("disk-{i}.ext4")),
                    root_base.filter(|_| i == 0),
                )?;
                if i == 0 {
                    root_image = Some(root);
                }
                img
            };
            let f = File::open(&img.path)
                .map_err(MicrovmError::io(format!("open {}", img.path.display())))?;
            disk_files.push(f);
            images.push(img.path);
            guest_disks.push(proto::GuestDisk {
                uuid: img.uuid,
                mount: need.mount.clone(),
            });
        }
        moat_core::steps::mark("microvm-disks");
        if !plan.group.is_empty() {
            let cached = plan.group.iter().all(|s| self.cacheable(s));
            shared &= cached;
            let img = disk::group(
                &plan.group,
                cached.then_some(cache.as_path()),
                &dir.join("group.ext4"),
            )?;
            let f = File::open(&img.path)
                .map_err(MicrovmError::io(format!("open {}", img.path.display())))?;
            disk_files.push(f);
            images.push(img.path);
            guest_disks.push(proto::GuestDisk {
                uuid: img.uuid,
                mount: guestspec::GROUP_MOUNT.into(),
            });
        }
        moat_core::steps::mark("microvm-group");
        let mut files = Vec::new();
        for f in &plan.files {
            files.push(read_small(&f.source, &f.guest)?);
        }
        let spare = spare_image(&cache)?;
        let mem_mib = guestspec::guest_memory_mib(&plan.config);
        let host_cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let vcpus = guestspec::guest_vcpus(&plan.config, host_cpus);
        Ok(Guest {
            kernel,
            initrd,
            root_image,
            guest_disks,
            disk_files,
            images,
            shared,
            files,
            spare,
            mem_mib,
            vcpus,
        })
    }

    /// Whether an image of `source` may be shared through the cache: moat's
    /// shared trees under the state root and the host's paths the embedded
    /// default shows.
    pub(crate) fn cacheable(&self, source: &Path) -> bool {
        // moat's shared trees: its prebuilt roots (`.cache/rootfs`) and the
        // image store (`.images`). Not a run's own directories (`.run/…`,
        // a `--read-write` root's copy): their images would pile up in the
        // cache, one per run.
        let root = self.sd.root();
        if source.starts_with(root.join(".cache")) || source.starts_with(root.join(".images")) {
            return true;
        }
        shown_host_path(source)
    }

    /// The VMM's cgroup: the container's, with the memory limit raised to
    /// the guest's RAM plus what the VMM needs, and a pids limit for its
    /// threads (the container's own limits hold in the guest). Rootless
    /// without a delegated cgroup, none, with a warning, when the config
    /// asked for no limit (as the container tier does: the guest's RAM is
    /// still its size); with a limit asked for, that is an error rather
    /// than a dropped limit.
    fn vmm_cgroup(
        &self,
        req: &CreateRequest,
        spec: &serde_json::Value,
        host: &HostChoice,
        mem_mib: u64,
        rootless: bool,
    ) -> Result<Option<moat_jail::cgroup::CgroupManager>, RuntimeError> {
        let cg = self.config_cgroup(req, spec, rootless)?;
        if rootless && !asks_limits(&spec["linux"]["resources"]) {
            match cg.create(None) {
                Ok(()) => {}
                Err(moat_jail::cgroup::CgroupError::NoDelegation { path, .. }) => {
                    tracing::warn!(
                        "no delegated cgroup ({}): the VMM runs without cgroup limits",
                        path.display()
                    );
                    return Ok(None);
                }
                Err(e) => return Err(MicrovmError::from(e).into()),
            }
        }
        let limit = vmm_memory_limit(host, mem_mib) as i64;
        let mut res = serde_json::json!({
            "memory": {"limit": limit, "swap": limit},
            "pids": {"limit": VMM_PIDS},
        });
        if let Some(cpu) = spec["linux"]["resources"].get("cpu") {
            res["cpu"] = cpu.clone();
        }
        let resources: oci_spec::runtime::LinuxResources =
            serde_json::from_value(res).map_err(|e| RuntimeError::Invalid(e.to_string()))?;
        if let Err(e) = cg.create(Some(&resources)) {
            let _ = cg.destroy();
            return Err(MicrovmError::from(e).into());
        }
        Ok(Some(cg))
    }
}

impl MicrovmTier {
    /// The cgroup the config names (`cgroupsPath`, or one of the
    /// container's ID), not yet made.
    pub(crate) fn config_cgroup(
        &self,
        req: &CreateRequest,
        spec: &serde_json::Value,
        rootless: bool,
    ) -> Result<moat_jail::cgroup::CgroupManager, RuntimeError> {
        let path = spec["linux"]["cgroupsPath"].as_str().map(PathBuf::from);
        Ok(moat_jail::cgroup::CgroupManager::new(
            path.as_deref(),
            req.id,
            self.systemd_cgroup,
            rootless,
        )
        .map_err(MicrovmError::from)?)
    }
}

/// The guest memory of a pod's VM whose pause container has no limit of
/// its own: what the pod's cgroup (`pod_limit`, bytes: the kubelet's sum
/// of its containers' limits and the RuntimeClass's overhead) leaves once
/// the VMM's own memory is counted, so the VMM never outgrows the pod's
/// cgroup; [`crate::pod::POD_MEMORY_MIB`] for a pod without a limit.
fn pod_memory_mib(host: &HostChoice, pod_limit: Option<u64>) -> u64 {
    match pod_limit {
        Some(l) => ((l >> 20).saturating_sub(vmm_memory_limit(host, 0) >> 20))
            .clamp(guestspec::MIN_MEMORY_MIB, guestspec::MAX_MEMORY_MIB),
        None => crate::pod::POD_MEMORY_MIB,
    }
}

/// The VMM's cgroup memory limit (bytes): the guest's RAM and the VMM's
/// own memory ([`VMM_OVERHEAD_TCG_MIB`], [`VMM_OVERHEAD_KVM_MIB`]).
fn vmm_memory_limit(host: &HostChoice, mem_mib: u64) -> u64 {
    let overhead = match &host.backend {
        Backend::Qemu {
            accel: moat_vmm::qemu::Accel::Tcg,
            ..
        } => VMM_OVERHEAD_TCG_MIB,
        _ => VMM_OVERHEAD_KVM_MIB,
    };
    (mem_mib + overhead) << 20
}

struct Guest {
    /// What QEMU boots (assets::boot_image).
    kernel: PathBuf,
    initrd: PathBuf,
    /// How the root's image was found, when it is not a shared one.
    root_image: Option<RootImage>,
    guest_disks: Vec<proto::GuestDisk>,
    disk_files: Vec<File>,
    /// The disks' image files, in order.
    images: Vec<PathBuf>,
    /// Every disk is a shared cached image: a snapshot may hold them
    /// mounted (snapshot::Identity::disks).
    shared: bool,
    files: Vec<proto::GuestFile>,
    spare: File,
    mem_mib: u64,
    vcpus: u8,
}

/// How [`own_image_over`] found an image of a root.
#[derive(Debug)]
struct RootImage {
    uuid: String,
    /// The root's digest, when it was hashed (as root, by content).
    digest: Option<[u8; 32]>,
    /// The image is the one the root's kept layer lies over.
    on_base: bool,
}

/// A host ID block of moat's allocator, owned by this runtime until
/// `delete` releases it.
fn allocate_block() -> Result<moat_jail::idalloc::IdAllocation, MicrovmError> {
    Ok(moat_jail::idalloc::IdAllocator::new(
        moat_jail::idalloc::allocator_dir(),
        moat_jail::idalloc::IdPool::from_env()?,
    )
    .allocate(
        moat_jail::idalloc::Owner::current(),
        &moat_jail::idalloc::host_reserved()?,
    )?)
}

/// Whether a config's `linux.resources` sets a memory, CPU or pids limit.
fn asks_limits(res: &serde_json::Value) -> bool {
    let set = |v: &serde_json::Value| !v.is_null();
    set(&res["memory"]["limit"])
        || set(&res["cpu"]["quota"])
        || set(&res["cpu"]["shares"])
        || set(&res["cpu"]["cpus"])
        || set(&res["pids"]["limit"])
}

/// Whether a bind source gets a disk of its own: the host's system
/// directories (large, cached once, shared by every container).
fn own_disk(source: &Path) -> bool {
    moat_core::embedded::HOST_DIRS
        .iter()
        .any(|d| source == Path::new("/").join(d))
}

/// Whether the config has hooks the runtime runs on the host while the
/// VMM process stands for the container (`prestart`, `createRuntime`).
pub(crate) fn has_host_hooks(spec: &oci_spec::runtime::Spec) -> bool {
    spec.hooks().as_ref().is_some_and(|h| {
        h.prestart().as_ref().is_some_and(|v| !v.is_empty())
            || h.create_runtime().as_ref().is_some_and(|v| !v.is_empty())
    })
}

/// The network namespace the config joins by path.
fn joined_netns(spec: &oci_spec::runtime::Spec) -> Option<PathBuf> {
    spec.linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .and_then(|ns| {
            ns.iter()
                .find(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::Network)
                .and_then(|n| n.path().clone())
        })
}

/// What the config asks of the network (`dev.moat.net.egress`,
/// `dev.moat.net.publish`), parsed as the container tier does. The guest
/// always gets network namespaces of its own, so no host one is needed.
fn net_request(
    spec: &oci_spec::runtime::Spec,
    joined: Option<PathBuf>,
) -> Result<Option<moat_container::network::NetRequest>, RuntimeError> {
    let mut req = moat_container::network::NetRequest::from_spec(spec, true)
        .map_err(|e| RuntimeError::Invalid(moat_core::error_chain(&e)))?;
    // A network namespace the config joins (a Kubernetes pod's): the
    // guest cannot, so the stack serves from it — its connections leave
    // from the pod's addresses, its published ports listen there.
    if let Some(r) = &mut req {
        r.netns = joined;
    }
    Ok(req)
}

/// `cmdline` with `word` among the kernel's own words (before the `--`
/// that ends them, after which come init's).
fn with_kernel_word(cmdline: &str, word: &str) -> String {
    match cmdline.split_once(" -- ") {
        Some((kernel, init)) => format!("{kernel} {word} -- {init}"),
        None => format!("{cmdline} {word}"),
    }
}

/// moat's stack for a guest whose config joins the namespace `ns`, whose
/// interface (`interface`) another guest took over (a pod's second
/// container, asking nothing of the stack): serving from `ns`, its
/// connections leave from the pod's addresses and their replies reach it
/// (the namespace keeps its share: [`crate::podnet`]); any destination,
/// as the first guest's on the pod's wire (the pod's network policies
/// apply to both alike), the pod's own address (`pod`: the other guest's
/// servers) among them; no published port. Nothing on the pod's wire
/// reaches this guest: the pod's address is the other's.
fn pod_share(
    ns: &Path,
    interface: &str,
    pod: Vec<std::net::IpAddr>,
) -> moat_container::network::NetRequest {
    tracing::warn!(
        "microvm: interface {interface} of {} is another microVM's; this one reaches \
         out from it through moat's stack, and nothing on the pod's network reaches it",
        ns.display()
    );
    moat_container::network::NetRequest {
        policy: moat_net::Policy::allow_all(),
        publish: Vec::new(),
        netns: Some(ns.to_owned()),
        // The first guest's servers, on the pod's address (what the
        // namespace's own connections to it are steered to:
        // `crate::portfwd`).
        reachable_own: pod,
    }
}

/// The guest's link when it has a network: a stream socketpair, the
/// stack's end and QEMU's (which carries each frame after its 4-byte
/// big-endian length).
fn net_link(networked: bool) -> Result<Option<(OwnedFd, OwnedFd)>, RuntimeError> {
    if !networked {
        return Ok(None);
    }
    let pair = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(MicrovmError::sys("create the network link"))?;
    Ok(Some(pair))
}

/// Starts the user-space stack on `link` (its end of the VMM's network
/// device), jailed as the container tier's, ending with the VMM process
/// `vmm`. Its refusals go to the runtime's stderr for `moat run`, else to
/// `net.log` in the state directory `dir`.
fn start_stack(
    net: &moat_container::network::NetRequest,
    link: OwnedFd,
    vmm: i32,
    req: &CreateRequest,
    dir: &Path,
) -> Result<moat_container::network::StackProcess, RuntimeError> {
    let log = dir.join("net.log");
    let log = (!req.die_with_runtime).then_some(log.as_path());
    let stack = moat_container::network::start_link(
        moat_net::Link::Stream(link),
        vmm,
        net,
        &req.config.spec,
        log,
    )
    .map_err(MicrovmError::from)?;
    Ok(stack)
}

/// What the tier cannot do yet, refused before anything is made.
fn refuse_unsupported(spec: &serde_json::Value) -> Result<(), RuntimeError> {
    let a = &spec["annotations"];
    let networked = a.get(moat_core::net::EGRESS_ANNOTATION).is_some()
        || a.get(moat_core::net::PUBLISH_ANNOTATION).is_some();
    if !networked
        && spec["linux"]["namespaces"]
            .as_array()
            .is_some_and(|ns| !ns.iter().any(|n| n["type"] == "network"))
    {
        tracing::warn!("microvm: the guest has no network devices; the container gets a network namespace with only lo");
    }
    Ok(())
}

pub(crate) fn initial_state(req: &CreateRequest, dir: &Path) -> State {
    let spec = &req.config.spec;
    let bundle = match &req.config.source {
        ConfigSource::Bundle(b) | ConfigSource::Rewritten { bundle: b, .. } => b.clone(),
        ConfigSource::Memory(_) => dir.to_owned(),
    };
    State {
        format: moat_core::state::STATE_FORMAT,
        oci_version: spec.version().clone(),
        id: req.id.to_owned(),
        status: ContainerStatus::Creating,
        pid: 0,
        pid_start_time: 0,
        bundle,
        rootfs: req.config.rootfs.clone(),
        created: moat_core::time::rfc3339_now(),
        owner: String::new(),
        annotations: spec.annotations().clone().unwrap_or_default(),
        tier: Tier::Microvm,
        tier_state: serde_json::Value::Null,
        // Run on the host, as the runtime-spec places them: in the
        // runtime's namespaces (`start`, `delete`).
        poststop_hooks: spec
            .hooks()
            .as_ref()
            .and_then(|h| h.poststop().clone())
            .unwrap_or_default(),
        poststart_hooks: spec
            .hooks()
            .as_ref()
            .and_then(|h| h.poststart().clone())
            .unwrap_or_default(),
    }
}

fn console_size(spec: &serde_json::Value) -> (u16, u16) {
    let b = &spec["process"]["consoleSize"];
    (
        b["height"].as_u64().unwrap_or(0).min(u16::MAX.into()) as u16,
        b["width"].as_u64().unwrap_or(0).min(u16::MAX.into()) as u16,
    )
}

/// Binds the control socket in a fresh root-only directory.
pub(crate) fn listen(dir: &Path) -> Result<OwnedFd, RuntimeError> {
    use nix::sys::socket::{bind, listen as listen_on, socket, Backlog, UnixAddr};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::DirBuilderExt;
    if dir.exists() {
        // Left by a runtime killed before it recorded the container.
        std::fs::remove_dir_all(dir)
            .map_err(MicrovmError::io(format!("remove stale {}", dir.display())))?;
    }
    if let Some(parent) = dir.parent() {
        disk::ensure_dir(parent)?;
        // A shared directory's (a rootless run's under /tmp) must be ours.
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(parent)
            .map_err(MicrovmError::io(format!("stat {}", parent.display())))?;
        if !m.is_dir() || m.uid() != rustix::process::geteuid().as_raw() || m.mode() & 0o022 != 0 {
            return Err(MicrovmError::Invalid(format!(
                "{} is not a directory of this user's that only it may write",
                parent.display()
            ))
            .into());
        }
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(MicrovmError::io(format!("create {}", dir.display())))?;
    let path = dir.join(crate::SOCKET);
    let s = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(MicrovmError::sys("create the control socket"))?;
    let addr = UnixAddr::new(&path).map_err(MicrovmError::sys("name the control socket"))?;
    bind(s.as_raw_fd(), &addr).map_err(MicrovmError::sys(format!("bind {}", path.display())))?;
    listen_on(&s, Backlog::new(16).unwrap_or(Backlog::MAXCONN))
        .map_err(MicrovmError::sys("listen on the control socket"))?;
    Ok(s)
}

/// Forks the VMM process into its own namespaces.
fn spawn_vmm(
    plan: VmmPlan,
    setup: OwnedFd,
    listener: OwnedFd,
    tty: Option<OwnedFd>,
    die_with_runtime: bool,
) -> Result<i32, RuntimeError> {
    let one = moat_sys::process::OneThread::check()
        .map_err(MicrovmError::io("check the runtime is single-threaded"))?;
    // Rootless, a user namespace of its own first (the others are then
    // its), where the user is mapped as itself: the jail's mounts need its
    // capabilities there, and the jail drops them.
    let (rootless, uid, gid) = (plan.jail.rootless, plan.jail.uid, plan.jail.gid);
    let userns = if rootless { libc::CLONE_NEWUSER } else { 0 };
    let flags = userns
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWNET;
    let mut plan = Some(plan);
    let mut setup = Some(setup);
    let mut listener = Some(listener);
    let mut tty = tty;
    let pid = one
        .fork(flags, move |child_one| {
            if rootless && moat_jail::idmap::map_self(uid, gid, (uid, gid)).is_err() {
                return 255;
            }
            if die_with_runtime
                && nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).is_err()
            {
                return 255;
            }
            if let Some(t) = tty.take() {
                if become_terminal(t).is_err() {
                    return 255;
                }
            }
            match (plan.take(), setup.take(), listener.take()) {
                (Some(p), Some(s), Some(l)) => vmm::main(p, s, l, child_one),
                _ => 255,
            }
        })
        .map_err(MicrovmError::io("start the VMM process"))?;
    Ok(pid)
}

/// Refuses a request to the guest's agent over [`proto::MAX_REQUEST`]
/// (`what` it carries), which the agent would not take.
pub(crate) fn refuse_oversized<T: serde::Serialize>(
    what: &str,
    req: &T,
) -> Result<(), RuntimeError> {
    let size = serde_json::to_vec(req).map_or(0, |b| b.len());
    if size > proto::MAX_REQUEST {
        return Err(RuntimeError::Invalid(format!(
            "{what} come to {:.1} MiB, over the {} MiB a microVM's guest takes in one request",
            size as f64 / f64::from(1 << 20),
            proto::MAX_REQUEST >> 20
        )));
    }
    Ok(())
}

/// A pty for a guest process's terminal on the host. Its slave is the
/// host end of the guest's own pty (the VMM process's stdio, or an exec's),
/// so it is raw: the guest's line discipline echoes, edits lines, ends
/// them with `\r\n` and turns ^C into SIGINT for the guest's foreground
/// process group; a second, cooked one here would echo every line twice,
/// hold input until a newline, add a `\r` to every line ending and turn
/// ^C into a signal for the VMM process.
pub(crate) fn host_pty() -> Result<nix::pty::OpenptyResult, MicrovmError> {
    let p = nix::pty::openpty(None, None).map_err(MicrovmError::sys("open a pty"))?;
    let mut t = rustix::termios::tcgetattr(&p.slave)
        .map_err(|e| MicrovmError::io("read the pty's modes")(e.into()))?;
    t.make_raw();
    rustix::termios::tcsetattr(&p.slave, rustix::termios::OptionalActions::Now, &t)
        .map_err(|e| MicrovmError::io("make the pty raw")(e.into()))?;
    Ok(p)
}

/// Makes `tty` (a pty slave) this process's stdio and controlling
/// terminal.
pub(crate) fn become_terminal(tty: OwnedFd) -> Result<(), nix::Error> {
    nix::unistd::setsid()?;
    nix::unistd::dup2_stdin(&tty)?;
    nix::unistd::dup2_stdout(&tty)?;
    nix::unistd::dup2_stderr(&tty)?;
    rustix::process::ioctl_tiocsctty(std::io::stdin())
        .map_err(|e| nix::Error::from_raw(e.raw_os_error()))
}

/// The last line virtiofsd wrote to the volume log at `path` (the
/// volume server's own notes skipped), at most 200 characters of it,
/// control characters dropped.
fn last_word(path: &Path) -> Option<String> {
    let text = std::fs::read(path).ok()?;
    let text = String::from_utf8_lossy(&text);
    let line = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty() && !l.starts_with("moat volume server:"))?;
    Some(line.chars().filter(|c| !c.is_control()).take(200).collect())
}

/// Waits for the VMM process's verdict on the setup channel. A failure
/// names what `virtiofsd_said` gives (a run with read-write volumes:
/// virtiofsd's last word, if any; the guest only sees its mount fail).
fn wait_ready(
    sock: &OwnedFd,
    virtiofsd_said: &mut dyn FnMut() -> Option<String>,
) -> Result<control::StartKind, RuntimeError> {
    let mut failed = |message: String| -> RuntimeError {
        MicrovmError::Vmm(match virtiofsd_said() {
            Some(line) => format!("{message} (virtiofsd: {line})"),
            None => message,
        })
        .into()
    };
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(sock.as_fd(), PollFlags::POLLIN)];
    let ms = SETUP_TIMEOUT.as_millis() as i32;
    match poll(
        &mut fds,
        PollTimeout::try_from(ms).unwrap_or(PollTimeout::NONE),
    ) {
        Ok(0) => {
            return Err(MicrovmError::Vmm(format!(
                "the VMM process did not answer within {} s",
                SETUP_TIMEOUT.as_secs()
            ))
            .into())
        }
        Ok(_) => {}
        Err(e) => return Err(MicrovmError::sys("wait for the VMM process")(e).into()),
    }
    // A VMM process that fails before it read the go byte closes with
    // that byte unread, and the kernel then reports a reset ahead of the
    // message it had queued: the message is still there to read.
    let got = match control::recv::<control::Setup>(sock.as_fd()) {
        Err(control::ControlError::Io(e)) if e.raw_os_error() == Some(libc::ECONNRESET) => {
            control::recv::<control::Setup>(sock.as_fd())
        }
        r => r,
    };
    match got {
        Ok(control::Setup::Ready { start, held }) => {
            if held {
                tracing::debug!(
                    "microvm: the container was created before the snapshot; its process started now"
                );
            }
            Ok(start)
        }
        Ok(control::Setup::Failed {
            message,
            exec_status: Some(status),
        }) => Err(RuntimeError::ExecFailed { status, message }),
        Ok(control::Setup::Failed { message, .. }) => Err(failed(message)),
        Err(control::ControlError::Closed) => {
            Err(failed("the VMM process ended during set-up".into()))
        }
        Err(e) => Err(MicrovmError::from(e).into()),
    }
}

/// The guest config's seccomp filter compiled here (or taken from this
/// host's cache), for the agent to hand to the guest's runtime. `None`
/// without a filter, or when it does not compile here: the guest then
/// compiles it itself, and reports its own error.
pub(crate) fn host_compiled_seccomp(
    config: &serde_json::Value,
    state_root: &Path,
) -> Option<proto::SeccompProgram> {
    let profile = config.get("linux")?.get("seccomp")?;
    let profile: oci_spec::runtime::LinuxSeccomp = serde_json::from_value(profile.clone()).ok()?;
    let program = moat_jail::seccomp::prepare(&profile, Some(state_root)).ok()??;
    Some(proto::SeccompProgram {
        instructions: program.instructions().to_vec(),
        flags: program.flags(),
    })
}

pub(crate) fn write_pid_file(path: &Path, pid: i32) -> Result<(), RuntimeError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, pid.to_string())
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(MicrovmError::io(format!("write {}", path.display())))?;
    Ok(())
}

/// Sends the pty master to the engine's console socket.
pub(crate) fn send_console(path: &Path, master: OwnedFd) -> Result<(), RuntimeError> {
    use std::os::fd::AsRawFd;
    let s = std::os::unix::net::UnixStream::connect(path).map_err(MicrovmError::io(format!(
        "connect to the console socket {}",
        path.display()
    )))?;
    let fds = [master.as_raw_fd()];
    nix::sys::socket::sendmsg::<()>(
        s.as_raw_fd(),
        &[std::io::IoSlice::new(b"/dev/pts/0")],
        &[nix::sys::socket::ControlMessage::ScmRights(&fds)],
        nix::sys::socket::MsgFlags::empty(),
        None,
    )
    .map_err(MicrovmError::sys("send the terminal to the console socket"))?;
    Ok(())
}

/// A bind-mounted file's contents, for the guest.
pub(crate) fn read_small(source: &Path, guest: &str) -> Result<proto::GuestFile, RuntimeError> {
    use std::os::unix::fs::PermissionsExt;
    let md = std::fs::metadata(source)
        .map_err(MicrovmError::io(format!("stat {}", source.display())))?;
    if md.len() > guestspec::MAX_FILE {
        return Err(RuntimeError::Invalid(format!(
            "{} is {} bytes: a file shared with a microVM may hold at most {}",
            source.display(),
            md.len(),
            guestspec::MAX_FILE
        )));
    }
    let data =
        std::fs::read(source).map_err(MicrovmError::io(format!("read {}", source.display())))?;
    Ok(proto::GuestFile {
        path: guest.to_owned(),
        data,
        mode: md.permissions().mode() & 0o777,
    })
}

/// A small empty image for unused disk slots.
fn spare_image(cache: &Path) -> Result<File, RuntimeError> {
    let p = cache.join("spare.img");
    if !p.is_file() {
        let tmp = cache.join(format!(".spare.{}.tmp", std::process::id()));
        let f =
            File::create(&tmp).map_err(MicrovmError::io(format!("create {}", tmp.display())))?;
        f.set_len(64 << 10)
            .map_err(MicrovmError::io("size the spare image"))?;
        std::fs::rename(&tmp, &p).map_err(MicrovmError::io(format!("rename {}", p.display())))?;
    }
    Ok(File::open(&p).map_err(MicrovmError::io(format!("open {}", p.display())))?)
}

/// The host directory whose writes a kept layer of the root `rootfs`
/// stands for (`crate::layer::writable_dir`): None when the root has no
/// directory of its own that outlives its mounts.
fn kept_layer_dir(rootfs: &Path) -> Result<Option<PathBuf>, RuntimeError> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(MicrovmError::io("read /proc/self/mountinfo"))?;
    Ok(crate::layer::writable_dir(rootfs, &mountinfo))
}

/// The kept layer of the writable directory `dir`, locked for this VM
/// (over the root's image `lower`); None when another VM holds it.
fn kept_layer(
    store: &Path,
    dir: &Path,
    lower: crate::layer::Lower<'_>,
    wait: std::time::Duration,
) -> Result<Option<crate::layer::Kept>, RuntimeError> {
    match crate::layer::open(store, dir, wait, lower)? {
        crate::layer::Opened::Kept(k) => {
            tracing::debug!(
                "microvm: writable layer kept at {} ({} of {})",
                k.path.display(),
                if k.made { "new" } else { "found" },
                dir.display()
            );
            Ok(Some(k))
        }
        crate::layer::Opened::Busy => {
            tracing::warn!(
                "microvm: another VM holds the writable layer of {}: this container's writes last only this VM",
                dir.display()
            );
            Ok(None)
        }
    }
}

/// How often the agent evicts the guest's old page cache (seconds; `0`:
/// never): its pages then go back to the host.
pub const RECLAIM_INTERVAL_ANNOTATION: &str = "dev.moat.microvm.reclaim-interval";
/// Without the annotation: a minute.
pub const RECLAIM_INTERVAL_DEFAULT_S: u64 = 60;

/// The container's [`RECLAIM_INTERVAL_ANNOTATION`] in milliseconds.
fn reclaim_interval_ms(
    annotations: Option<&std::collections::HashMap<String, String>>,
) -> Result<u64, RuntimeError> {
    let Some(v) = annotations.and_then(|a| a.get(RECLAIM_INTERVAL_ANNOTATION)) else {
        return Ok(RECLAIM_INTERVAL_DEFAULT_S * 1000);
    };
    match v.trim().parse::<u64>() {
        Ok(s) if s <= 86_400 => Ok(s * 1000),
        _ => Err(RuntimeError::Invalid(format!(
            "annotation {RECLAIM_INTERVAL_ANNOTATION}={v:?}: want whole seconds from 0 (never) to 86400"
        ))),
    }
}

/// Podman's annotation of a `--rm` container: its root is removed once it
/// ends.
const PODMAN_AUTOREMOVE: &str = "io.podman.annotations.autoremove";

/// Whether the engine removes the container's root when the container
/// ends (Podman says so; Docker tells the runtime nothing of `--rm`).
fn removed_at_exit(annotations: Option<&std::collections::HashMap<String, String>>) -> bool {
    annotations
        .and_then(|a| a.get(PODMAN_AUTOREMOVE))
        .is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

/// A kept layer's mirror stream file, emptied, for the VMM to append the
/// guest's bytes to (what was in it was applied, or is asked for again:
/// `crate::layer::settle`). Appending: a `pause` empties it while the VMM
/// holds it (`crate::layer::settle_held`).
fn mirror_file(path: &Path) -> Result<File, MicrovmError> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .map_err(MicrovmError::io(format!("open {}", path.display())))?;
    f.set_len(0)
        .map_err(MicrovmError::io(format!("empty {}", path.display())))?;
    Ok(f)
}

/// The image of a tree moat does not manage (an engine's rootfs, a
/// read-only volume): from the content cache (`tree_cache`: the trees of
/// one engine image's containers share one), or made for this container
/// alone, rootless (the user may not read every file: such files are
/// empty in a per-container image) and where the tree cannot be hashed
/// whole or changed while it was imaged.
pub(crate) fn own_image(
    cache: &Path,
    source: &Path,
    dest: &Path,
) -> Result<disk::DiskImage, MicrovmError> {
    Ok(own_image_over(cache, source, dest, None)?.0)
}

/// [`own_image`] of a root whose kept layer lies over `base`
/// (`tree_cache::image_over`), and how it was found.
fn own_image_over(
    cache: &Path,
    source: &Path,
    dest: &Path,
    base: Option<&crate::tree_cache::Base>,
) -> Result<(disk::DiskImage, RootImage), MicrovmError> {
    if rustix::process::geteuid().is_root() {
        match crate::tree_cache::image_over(cache, source, base) {
            Ok(Some(i)) => {
                let root = RootImage {
                    uuid: i.image.uuid.clone(),
                    digest: Some(i.digest),
                    on_base: i.on_base,
                };
                return Ok((i.image, root));
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(
                "microvm: {} not imaged by content ({}): imaged for this container alone",
                source.display(),
                moat_core::error_chain(&e)
            ),
        }
    }
    let img = disk::per_container(source, dest)?;
    let root = RootImage {
        uuid: img.uuid.clone(),
        digest: None,
        on_base: false,
    };
    Ok((img, root))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_podman_rm_containers_root_goes_at_its_exit() {
        let a = |v: &str| {
            std::collections::HashMap::from([(PODMAN_AUTOREMOVE.to_string(), v.to_string())])
        };
        assert!(removed_at_exit(Some(&a("TRUE"))));
        assert!(removed_at_exit(Some(&a("true"))));
        assert!(!removed_at_exit(Some(&a("FALSE"))));
        assert!(!removed_at_exit(Some(&std::collections::HashMap::new())));
        assert!(!removed_at_exit(None));
    }

    #[test]
    fn a_kernel_word_goes_before_inits_own() {
        let c = crate::vmm::qemu::cmdline(moat_vmm::qemu::Accel::Kvm);
        let w = with_kernel_word(&c, crate::agent::boot::SHARE_PORT_WORD);
        assert!(crate::agent::boot::has_share_port(&w), "{w}");
        assert!(!crate::agent::boot::has_share_port(&c), "{c}");
        // The agent's own words still follow the `--`.
        assert_eq!(
            w.rsplit_once(" -- ").unwrap().1,
            c.rsplit_once(" -- ").unwrap().1
        );
        // A word after `--` is init's, not the kernel's.
        assert!(!crate::agent::boot::has_share_port(&format!(
            "quiet -- {}",
            crate::agent::boot::SHARE_PORT_WORD
        )));
        assert_eq!(with_kernel_word("quiet", "a=b"), "quiet a=b");
    }

    #[test]
    fn a_pods_vm_fits_its_pods_cgroup() {
        let host = |backend| HostChoice {
            backend,
            kernel: crate::assets::GuestKernel {
                image: PathBuf::new(),
                release: String::new(),
                modules: PathBuf::new(),
            },
            why: String::new(),
        };
        let tcg = host(Backend::Qemu {
            binary: PathBuf::from("qemu"),
            accel: moat_vmm::qemu::Accel::Tcg,
        });
        let kvm = host(Backend::Builtin);
        // The VM and its VMM together never outgrow the pod's cgroup.
        let gib = 1u64 << 30;
        assert_eq!(pod_memory_mib(&tcg, Some(gib)), 1024 - VMM_OVERHEAD_TCG_MIB);
        assert_eq!(pod_memory_mib(&kvm, Some(gib)), 1024 - VMM_OVERHEAD_KVM_MIB);
        for l in [gib, 3 * gib, 300 << 20] {
            let vm = vmm_memory_limit(&kvm, pod_memory_mib(&kvm, Some(l)));
            assert!(vm <= l.max(vmm_memory_limit(&kvm, guestspec::MIN_MEMORY_MIB)));
        }
        // A tiny pod still gets a bootable guest; an unlimited one the
        // default.
        assert_eq!(
            pod_memory_mib(&tcg, Some(64 << 20)),
            guestspec::MIN_MEMORY_MIB
        );
        assert_eq!(pod_memory_mib(&tcg, None), crate::pod::POD_MEMORY_MIB);
    }

    #[test]
    fn only_moats_shared_trees_are_cached_not_a_runs_own() {
        let d = tempfile::tempdir().unwrap();
        let tier = MicrovmTier::new(d.path(), false);
        assert!(tier.cacheable(&d.path().join(".cache/rootfs/abc")));
        assert!(tier.cacheable(&d.path().join(".images/x/rootfs")));
        assert!(tier.cacheable(Path::new("/usr")));
        assert!(!tier.cacheable(&d.path().join(".run/run-1-2/rootfs")));
        assert!(!tier.cacheable(&d.path().join("w0/rootfs")));
    }

    #[test]
    fn the_host_paths_the_embedded_default_shows_are_cached() {
        for shown in [
            "/usr",
            "/lib64",
            "/etc/ssl/certs",
            "/etc/terminfo",
            "/etc/alternatives",
            "/etc/java-17-openjdk",
            "/etc/ld.so.cache",
            "/etc/services",
        ] {
            assert!(shown_host_path(Path::new(shown)), "{shown}");
        }
        for other in [
            "/etc",
            "/etc/ssl/private",
            "/etc/ssh",
            "/etc/shadow",
            "/etc/passwd",
            "/etc/../root",
            "/home/user",
            "/usr/local",
            "/tmp/etc/terminfo",
        ] {
            assert!(!shown_host_path(Path::new(other)), "{other}");
        }
    }
}
