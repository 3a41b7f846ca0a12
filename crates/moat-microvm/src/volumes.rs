//! Read-write directory volumes: each is a virtio-fs share of the guest,
//! served on the host by virtiofsd (QEMU's `/usr/lib/qemu/virtiofsd`, or
//! the `virtiofsd` package's `/usr/libexec/virtiofsd`), so the guest's
//! writes reach the host directory as a container's do.
//!
//! Processes: `moat create` forks the **volume server** (one per container,
//! whatever the number of volumes), which
//! 1. makes a mount namespace of its own where each volume's directory
//!    (opened by the runtime, with its credentials) is bind-mounted at
//!    `/run/moat-fs/<i>` on a fresh tmpfs;
//! 2. per volume, forks a child into a new user namespace whose map it
//!    writes ([`id_maps`]): the guest's IDs become the container's host IDs,
//!    never host root; the child becomes root there, clears its groups,
//!    sets no_new_privs and the parent-death signal, and execs virtiofsd
//!    on a listening socket whose one connection is the VMM's device (made
//!    by [`links`] before anything else could connect). virtiofsd then
//!    confines itself as it does everywhere (its own mount, PID and network
//!    namespaces, `pivot_root` into the volume, a seccomp filter, a minimal
//!    capability set), within that user namespace;
//! 3. drops to the volumes' own host user with no capabilities and waits
//!    for the VMM process to end, then kills its process group (itself and
//!    every virtiofsd: QEMU 7.2's does not always exit when its VMM
//!    disconnects).
//!
//! The guest's kernel sends each request with the caller's guest IDs;
//! virtiofsd takes them as its file-system IDs, which its user namespace
//! maps to the host's. Host files of IDs outside the map appear to the
//! guest as the overflow ID (nobody) and are accessed with their "other"
//! bits, as in the container tier.
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::guestspec::VolumeNeed;
use crate::MicrovmError;

/// Overrides where virtiofsd is found.
pub const ENV_VIRTIOFSD: &str = "MOAT_VIRTIOFSD";
/// Where distributions install virtiofsd: the Rust one's package, then
/// QEMU's own (Debian 12's QEMU 7.2 ships the C one there).
const VIRTIOFSD_PATHS: &[&str] = &["/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd"];
/// Where the volume server mounts the volumes, in its own mount namespace.
const SHARE_DIR: &str = "/run/moat-fs";
/// How many of the container's IDs a guest range without a user namespace
/// covers (the container tier's block).
const BLOCK: u32 = 65536;

/// The virtiofsd binary, or why there is none.
pub fn virtiofsd() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os(ENV_VIRTIOFSD) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("{ENV_VIRTIOFSD}={} is not a file", p.display()))
        };
    }
    VIRTIOFSD_PATHS
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or_else(|| {
            format!(
                "read-write volumes need virtiofsd ({}; Debian: package qemu-system-common or virtiofsd)",
                VIRTIOFSD_PATHS.join(" or ")
            )
        })
}

/// One line of an ID map: `count` IDs from `inside` (the guest's, as
/// virtiofsd sees them) to `outside` (the host's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub inside: u32,
    pub outside: u32,
    pub count: u32,
}

/// The volume server's user namespace maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdMaps {
    pub uid: Vec<Range>,
    pub gid: Vec<Range>,
}

impl IdMaps {
    /// The host user and group virtiofsd's own root (ID 0 inside) is: both
    /// maps always hold one ([`with_root`]).
    pub fn own(&self) -> (u32, u32) {
        let out = |m: &[Range]| {
            m.iter()
                .find(|r| r.inside == 0)
                .map_or(u32::MAX, |r| r.outside)
        };
        (out(&self.uid), out(&self.gid))
    }
}

/// `m` as the maps [`moat_jail::idmap::write_maps`] writes.
fn oci_map(m: &[Range]) -> Result<Vec<oci_spec::runtime::LinuxIdMapping>, MicrovmError> {
    m.iter()
        .map(|r| {
            oci_spec::runtime::LinuxIdMappingBuilder::default()
                .container_id(r.inside)
                .host_id(r.outside)
                .size(r.count)
                .build()
                .map_err(|e| MicrovmError::Invalid(format!("virtiofsd's ID map: {e}")))
        })
        .collect()
}

/// The config's `key` ranges (`uidMappings`, `gidMappings`) as (first host
/// ID, count): the guest's IDs of the container; None when it has none.
fn config_ranges(linux: &Value, key: &str) -> Result<Option<Vec<(u32, u32)>>, String> {
    let Some(maps) = linux[key].as_array().filter(|m| !m.is_empty()) else {
        return Ok(None);
    };
    maps.iter()
        .map(|m| {
            let h = m["hostID"].as_u64().and_then(|v| u32::try_from(v).ok());
            let n = m["size"].as_u64().and_then(|v| u32::try_from(v).ok());
            h.zip(n)
                .ok_or_else(|| format!("the config's {key} has a malformed range"))
        })
        .collect::<Result<_, _>>()
        .map(Some)
}

/// `out` with virtiofsd's own root (inside 0) as `outside`, unless the
/// guest's 0 is mapped already.
fn with_root(mut out: Vec<Range>, outside: u32) -> Vec<Range> {
    if !out.iter().any(|r| r.inside == 0) {
        out.push(Range {
            inside: 0,
            outside,
            count: 1,
        });
    }
    out
}

/// Which host IDs the guest's IDs are on the volumes, for a container
/// `spec` whose volumes have the host ID block starting at `block` (moat's
/// allocator's, the volumes' own: not the VMM's).
///
/// In the guest the container's IDs are its config's `hostID`s (the guest
/// runs the same config). A range above the first 65536 IDs (a block of
/// moat's allocator, `/etc/subuid` ranges) stays itself on the host, as in
/// the container tier. Without a user namespace, or a range within the
/// first 65536 IDs (root and the host's system users), the guest's IDs
/// move into `block` (ID `k` becomes `block + k`): a guest's root is never
/// the host's. virtiofsd's own root is the guest's 0 when mapped, else
/// `block`.
pub fn id_maps(spec: &Value, block: u32) -> Result<IdMaps, String> {
    let linux = &spec["linux"];
    let userns = linux["namespaces"]
        .as_array()
        .is_some_and(|ns| ns.iter().any(|n| n["type"] == "user"));
    let kind = |key: &str, what: &str| -> Result<Vec<Range>, String> {
        let guest = match config_ranges(linux, key)? {
            Some(r) if userns => r,
            _ => vec![(0, BLOCK)],
        };
        let mut out = Vec::with_capacity(guest.len() + 1);
        for (h, n) in guest {
            let end = u64::from(h) + u64::from(n);
            let outside = if end <= u64::from(BLOCK) {
                block
                    .checked_add(h)
                    .ok_or_else(|| format!("the {what} block {block} overflows"))?
            } else if h >= BLOCK {
                h
            } else {
                return Err(format!(
                    "the container's {what} range {h}-{} spans the host's first {BLOCK} IDs and others: a read-write volume cannot place its owners",
                    end - 1
                ));
            };
            out.push(Range {
                inside: h,
                outside,
                count: n,
            });
        }
        Ok(with_root(out, block))
    };
    Ok(IdMaps {
        uid: kind("uidMappings", "user")?,
        gid: kind("gidMappings", "group")?,
    })
}

/// [`id_maps`] for a rootless runtime, which has no ID block to give and
/// maps through newuidmap/newgidmap: the config's ranges (the user's
/// subordinate IDs, as `moat run` gives them) stay themselves, as in the
/// container tier, and virtiofsd's own root is the user itself. A config
/// that maps the user's own ID (no subordinate IDs) is refused: virtiofsd
/// would need a second ID for its root.
pub fn id_maps_rootless(spec: &Value, uid: u32, gid: u32) -> Result<IdMaps, String> {
    let linux = &spec["linux"];
    let kind = |key: &str, own: u32| -> Result<Vec<Range>, String> {
        let guest = config_ranges(linux, key)?.ok_or_else(|| {
            format!("a rootless config without {key} cannot share a read-write volume")
        })?;
        let mut out = Vec::with_capacity(guest.len() + 1);
        for (h, n) in guest {
            if (u64::from(h)..u64::from(h) + u64::from(n)).contains(&u64::from(own)) {
                return Err(
                    "read-write volumes in the microvm tier rootless need subordinate IDs (/etc/subuid, /etc/subgid): the container's IDs must not be the user's own".into(),
                );
            }
            out.push(Range {
                inside: h,
                outside: h,
                count: n,
            });
        }
        Ok(with_root(out, own))
    };
    Ok(IdMaps {
        uid: kind("uidMappings", uid)?,
        gid: kind("gidMappings", gid)?,
    })
}

/// A volume's link: the listening socket virtiofsd serves, and the VMM's
/// end, already connected to it.
pub struct Link {
    pub listener: OwnedFd,
    pub vmm_end: OwnedFd,
}

/// One [`Link`] per volume. Each socket is bound in `dir` (the runtime's
/// private socket directory: no one else can connect there) only until the
/// VMM's end has connected, then unlinked: virtiofsd accepts exactly that
/// connection.
pub fn links(dir: &Path, n: usize) -> Result<Vec<Link>, MicrovmError> {
    use nix::sys::socket::{
        bind, connect, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
    };
    (0..n)
        .map(|i| {
            let path = dir.join(format!("fs{i}"));
            let addr = UnixAddr::new(&path).map_err(MicrovmError::sys("name a volume socket"))?;
            let stream = || {
                socket(
                    AddressFamily::Unix,
                    SockType::Stream,
                    SockFlag::SOCK_CLOEXEC,
                    None,
                )
                .map_err(MicrovmError::sys("create a volume socket"))
            };
            let listener = stream()?;
            let _ = std::fs::remove_file(&path);
            bind(listener.as_raw_fd(), &addr).map_err(MicrovmError::sys("bind a volume socket"))?;
            let bound = (|| {
                listen(&listener, Backlog::new(1).unwrap_or(Backlog::MAXCONN))
                    .map_err(MicrovmError::sys("listen on a volume socket"))?;
                let vmm_end = stream()?;
                connect(vmm_end.as_raw_fd(), &addr)
                    .map_err(MicrovmError::sys("connect a volume socket"))?;
                Ok::<_, MicrovmError>(vmm_end)
            })();
            let _ = std::fs::remove_file(&path);
            Ok(Link {
                listener,
                vmm_end: bound?,
            })
        })
        .collect()
}

/// The volume server of a container (the leader of its process group:
/// virtiofsd runs in it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeServer {
    pub pid: i32,
    pub start_time: u64,
}

impl VolumeServer {
    /// SIGKILLs the server's process group (it and every virtiofsd) if the
    /// server is still the same process, and waits (bounded) until no
    /// process of the group is left: the volumes' ID block must not be
    /// released while a process runs with its IDs.
    pub fn kill(&self) {
        self.kill_within(std::time::Duration::from_secs(5));
    }

    /// Waits (bounded) for the server to end by itself, as it does once
    /// the VMM process is gone, after writing what virtiofsd still had to
    /// say to the volume log; then [`VolumeServer::kill`]s what is left.
    pub fn settle(&self) {
        let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::time::Instant::now() < end {
            match nix::sys::wait::waitpid(
                nix::unistd::Pid::from_raw(self.pid),
                Some(nix::sys::wait::WaitPidFlag::WNOHANG),
            ) {
                Ok(nix::sys::wait::WaitStatus::StillAlive) => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                _ => break,
            }
        }
        self.kill_within(std::time::Duration::from_secs(5));
    }

    fn kill_within(&self, limit: std::time::Duration) {
        if moat_jail::procfs::pid_start_time(self.pid) != Some(self.start_time) {
            return;
        }
        let group = nix::unistd::Pid::from_raw(-self.pid);
        let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
        let end = std::time::Instant::now() + limit;
        while std::time::Instant::now() < end {
            let _ = nix::sys::wait::waitpid(
                nix::unistd::Pid::from_raw(self.pid),
                Some(nix::sys::wait::WaitPidFlag::WNOHANG),
            );
            if !group_alive(self.pid) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

/// Whether a process of group `pgid` still runs (zombies do not count:
/// once killed, the server's children wait for their reaper, which may be
/// a slow PID 1, and hold nothing but their PID).
fn group_alive(pgid: i32) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.flatten().any(|e| {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            return false;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return false;
        };
        // After the comm's closing parenthesis: state, ppid, pgrp.
        let mut f = stat
            .rsplit_once(')')
            .map_or("", |(_, r)| r)
            .split_whitespace();
        let state = f.next().unwrap_or("Z");
        f.nth(1).and_then(|g| g.parse::<i32>().ok()) == Some(pgid) && state != "Z"
    })
}

/// What [`start`] needs.
pub struct Start<'a> {
    pub volumes: &'a [VolumeNeed],
    /// Each volume's listening socket ([`Link::listener`]), in order.
    pub listeners: Vec<OwnedFd>,
    pub maps: &'a IdMaps,
    /// The VMM process: the server ends with it.
    pub vmm: i32,
    /// Where the server and virtiofsd write their messages.
    pub log: &'a Path,
    pub virtiofsd: &'a Path,
    /// The VMM's cgroup: the server and virtiofsd join it (the guest's
    /// volumes are the container's I/O).
    pub cgroup: Option<&'a moat_jail::cgroup::CgroupManager>,
    /// An unprivileged runtime: no mount namespace (virtiofsd opens the
    /// volumes as the user), maps through newuidmap, no user switch.
    pub rootless: bool,
    /// A pod's share is among the volumes: the server's mount namespace
    /// is the host's slave rather than private, so that what is mounted
    /// into the share later reaches virtiofsd (`crate::pod::make_share`).
    pub receive_mounts: bool,
}

/// Starts the volume server; returns once every virtiofsd runs.
pub fn start(s: Start) -> Result<VolumeServer, MicrovmError> {
    use std::os::unix::fs::OpenOptionsExt;
    let sources = s.volumes.iter().map(|v| v.source.clone()).collect();
    let log: OwnedFd = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(s.log)
        .map_err(MicrovmError::io("open the volume log"))?
        .into();
    let vmm = rustix::process::Pid::from_raw(s.vmm)
        .ok_or_else(|| MicrovmError::Invalid("no VMM process".into()))?;
    let vmm = rustix::process::pidfd_open(vmm, rustix::process::PidfdFlags::empty())
        .map_err(|e| MicrovmError::io("open a pidfd of the VMM process")(e.into()))?;
    let cstr =
        |s: String| CString::new(s).map_err(|_| MicrovmError::Invalid("a NUL in a path".into()));
    let binary = cstr(s.virtiofsd.to_string_lossy().into_owned())?;
    let argv = s
        .listeners
        .iter()
        .enumerate()
        .map(|(i, l)| {
            [
                "virtiofsd".to_string(),
                format!("--fd={}", l.as_raw_fd()),
                "-o".into(),
                if s.rootless {
                    format!("source={}", s.volumes[i].source.display())
                } else {
                    format!("source={SHARE_DIR}/{i}")
                },
                // virtiofsd would raise its open-file limit to a million,
                // which a runtime without CAP_SYS_RESOURCE cannot.
                "--rlimit-nofile=0".into(),
            ]
            .into_iter()
            .map(cstr)
            .collect::<Result<Vec<_>, _>>()
        })
        .collect::<Result<Vec<_>, _>>()?;
    let (parent, child) = moat_jail::sync::pair().map_err(|e| {
        MicrovmError::Invalid(format!(
            "the volume server's channel: {}",
            moat_core::error_chain(&e)
        ))
    })?;
    let one = moat_sys::process::OneThread::check()
        .map_err(MicrovmError::io("check the runtime is single-threaded"))?;
    let server = Server {
        sources,
        listeners: s.listeners,
        uid_map: oci_map(&s.maps.uid)?,
        gid_map: oci_map(&s.maps.gid)?,
        own: s.maps.own(),
        vmm,
        log,
        binary,
        argv,
        rootless: s.rootless,
        receive_mounts: s.receive_mounts,
    };
    let pid = one
        .fork(0, |child_one| server.main(&child, child_one))
        .map_err(MicrovmError::io("fork the volume server"))?;
    drop(child);
    let start_time = moat_jail::procfs::pid_start_time(pid).unwrap_or(0);
    let proc = VolumeServer { pid, start_time };
    let ready = (|| {
        if let Some(cg) = s.cgroup {
            cg.add_pid(pid)?;
        }
        parent
            .send(&moat_jail::sync::Msg::Go)
            .and_then(|()| parent.expect(moat_jail::sync::Msg::Go, "the volume server ready"))
            .map_err(|e| {
                MicrovmError::Invalid(format!("the volume server: {}", moat_core::error_chain(&e)))
            })
    })();
    if let Err(e) = ready {
        proc.kill();
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
        return Err(e);
    }
    Ok(proc)
}

/// The server's part, in its own process.
struct Server {
    sources: Vec<PathBuf>,
    listeners: Vec<OwnedFd>,
    uid_map: Vec<oci_spec::runtime::LinuxIdMapping>,
    gid_map: Vec<oci_spec::runtime::LinuxIdMapping>,
    /// The host user and group of virtiofsd's root ([`IdMaps::own`]).
    own: (u32, u32),
    vmm: OwnedFd,
    log: OwnedFd,
    binary: CString,
    argv: Vec<Vec<CString>>,
    rootless: bool,
    receive_mounts: bool,
}

#[derive(Debug, thiserror::Error)]
enum ServerError {
    #[error("cannot {0}")]
    Sys(&'static str, #[source] nix::Error),
    #[error("cannot {0}")]
    Io(&'static str, #[source] std::io::Error),
    #[error("cannot write virtiofsd's ID maps")]
    Maps(#[source] moat_jail::idmap::IdMapError),
    #[error("cannot open the volume {0}")]
    Open(PathBuf, #[source] std::io::Error),
    #[error("virtiofsd for volume {0} did not start: {1}")]
    Exec(usize, nix::Error),
}

impl Server {
    fn main(mut self, chan: &moat_jail::sync::Channel, one: moat_sys::process::OneThread) -> i32 {
        let report = |e: &ServerError| {
            let _ = chan.send(&moat_jail::sync::Msg::Error(
                moat_jail::sync::RemoteError::new(e),
            ));
            1
        };
        // Nothing of the runtime's but what it serves with: the
        // container's state lock, above all, must not outlive `create`.
        let mut keep = vec![chan.raw(), self.vmm.as_raw_fd(), self.log.as_raw_fd()];
        keep.extend(self.listeners.iter().map(|l| l.as_raw_fd()));
        if moat_sys::fd::close_all_except(&keep).is_err() {
            return 1;
        }
        if let Err(e) = chan.expect(moat_jail::sync::Msg::Go, "go") {
            eprintln!("moat volume server: {}", moat_core::error_chain(&e));
            return 1;
        }
        // virtiofsd's messages come through a pipe, so that the log stays
        // bounded whatever the guest makes it say.
        let (msg_r, msg_w) = match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
            Ok(p) => p,
            Err(e) => return report(&ServerError::Sys("pipe", e)),
        };
        let children = match self.prepare().and_then(|()| self.spawn_all(&one, &msg_w)) {
            Ok(c) => c,
            Err(e) => return report(&e),
        };
        drop(msg_w);
        // virtiofsd holds the listeners now: a VMM whose virtiofsd ends
        // then sees its connection reset instead of waiting on a socket
        // nobody will serve.
        self.listeners.clear();
        if let Err(e) = self.drop_privileges() {
            kill_group();
            return report(&e);
        }
        if chan.send(&moat_jail::sync::Msg::Go).is_err() {
            kill_group();
            return 1;
        }
        self.watch(children, msg_r)
    }

    /// Its session and streams; the mount namespace with the volumes.
    fn prepare(&self) -> Result<(), ServerError> {
        use nix::mount::{mount, MsFlags};
        nix::unistd::setsid().map_err(|e| ServerError::Sys("start a session", e))?;
        let null = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .map_err(|e| ServerError::Io("open /dev/null", e))?;
        let streams = || -> rustix::io::Result<()> {
            rustix::stdio::dup2_stdin(&null)?;
            rustix::stdio::dup2_stdout(&null)?;
            rustix::stdio::dup2_stderr(&self.log)
        };
        streams().map_err(|e| ServerError::Io("redirect the streams", e.into()))?;
        if self.rootless {
            // The user opens its own volumes: virtiofsd gets their paths.
            return Ok(());
        }
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
            .map_err(|e| ServerError::Sys("make a mount namespace", e))?;
        // Nothing mounted here reaches the host; a slave still receives
        // what the host mounts (a pod's share's volumes).
        if self.receive_mounts {
            crate::disk::make_mounts_slaves()
                .map_err(|e| ServerError::Sys("make the mounts slaves", e))?;
        } else {
            crate::disk::make_mounts_private()
                .map_err(|e| ServerError::Sys("make the mounts private", e))?;
        }
        // Opened here, in this mount namespace (a bind's source must be in
        // the caller's), and before the tmpfs hides what is under /run.
        let sources = self
            .sources
            .iter()
            .map(|p| {
                use std::os::unix::fs::OpenOptionsExt;
                std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
                    .open(p)
                    .map(OwnedFd::from)
                    .map_err(|e| ServerError::Open(p.clone(), e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        mount(
            Some("tmpfs"),
            "/run",
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some("mode=0755,size=64k"),
        )
        .map_err(|e| ServerError::Sys("mount the volumes' tmpfs", e))?;
        for (i, src) in sources.iter().enumerate() {
            let at = format!("{SHARE_DIR}/{i}");
            std::fs::create_dir_all(&at).map_err(|e| ServerError::Io("make a mount point", e))?;
            mount(
                Some(format!("/proc/self/fd/{}", src.as_raw_fd()).as_str()),
                at.as_str(),
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(|e| ServerError::Sys("bind a volume", e))?;
        }
        Ok(())
    }

    /// Starts one virtiofsd per volume; returns their PIDs. On a failure
    /// those started already are left to the runtime, which kills the
    /// server's whole group.
    fn spawn_all(
        &self,
        one: &moat_sys::process::OneThread,
        messages: &OwnedFd,
    ) -> Result<Vec<i32>, ServerError> {
        self.listeners
            .iter()
            .enumerate()
            .map(|(i, listener)| self.spawn(one, i, listener, messages))
            .collect()
    }

    fn spawn(
        &self,
        one: &moat_sys::process::OneThread,
        i: usize,
        listener: &OwnedFd,
        messages: &OwnedFd,
    ) -> Result<i32, ServerError> {
        let cloexec = nix::fcntl::OFlag::O_CLOEXEC;
        let (go_r, go_w) = nix::unistd::pipe2(cloexec).map_err(|e| ServerError::Sys("pipe", e))?;
        let (err_r, err_w) =
            nix::unistd::pipe2(cloexec).map_err(|e| ServerError::Sys("pipe", e))?;
        let argv = &self.argv[i];
        // The child closes the parent's ends (a read of `go` must see EOF
        // if the server dies); the parent keeps them.
        let go_w = std::cell::Cell::new(Some(go_w));
        let err_r = std::cell::Cell::new(Some(err_r));
        let pid = one
            .fork(libc::CLONE_NEWUSER, |_| {
                drop(go_w.take());
                drop(err_r.take());
                let e = match rustix::stdio::dup2_stderr(messages) {
                    Ok(()) => child_exec(&go_r, listener.as_fd(), &self.binary, argv),
                    Err(e) => nix::Error::from_raw(e.raw_os_error()),
                };
                let _ = nix::unistd::write(&err_w, &(e as i32).to_ne_bytes());
                127
            })
            .map_err(|e| ServerError::Io("fork virtiofsd", e))?;
        drop(go_r);
        drop(err_w);
        let (Some(go_w), Some(err_r)) = (go_w.take(), err_r.take()) else {
            return Err(ServerError::Sys("keep the pipes", nix::Error::EBADF));
        };
        // As root directly; rootless through newuidmap/newgidmap (the
        // user's own ID and its subordinate ranges).
        if let Err(e) = moat_jail::idmap::write_maps(pid, &self.uid_map, &self.gid_map) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            return Err(ServerError::Maps(e));
        }
        nix::unistd::write(&go_w, b"g").map_err(|e| ServerError::Sys("start virtiofsd", e))?;
        drop(go_w);
        // EOF: the exec succeeded (the pipe was close-on-exec); else errno.
        let mut buf = [0u8; 4];
        match nix::unistd::read(&err_r, &mut buf) {
            Ok(4) => Err(ServerError::Exec(
                i,
                nix::Error::from_raw(i32::from_ne_bytes(buf)),
            )),
            _ => Ok(pid),
        }
    }

    /// The server keeps nothing of the runtime's privileges: it becomes
    /// the volumes' own host user (virtiofsd's, so it can still end them),
    /// with no capabilities, no_new_privs and not dumpable.
    fn drop_privileges(&self) -> Result<(), ServerError> {
        let (uid, gid) = self.own;
        let gid = nix::unistd::Gid::from_raw(gid);
        let uid = nix::unistd::Uid::from_raw(uid);
        // Rootless, the server is the user already, with nothing to drop.
        if !self.rootless {
            nix::unistd::setgroups(&[]).map_err(|e| ServerError::Sys("clear the groups", e))?;
            nix::unistd::setresgid(gid, gid, gid)
                .map_err(|e| ServerError::Sys("set the group", e))?;
            nix::unistd::setresuid(uid, uid, uid)
                .map_err(|e| ServerError::Sys("set the user", e))?;
        }
        if caps::read(None, caps::CapSet::Permitted).map_or(true, |c| !c.is_empty()) {
            return Err(ServerError::Sys("drop every capability", nix::Error::EPERM));
        }
        moat_jail::attrs::set_no_new_privs()
            .map_err(|_| ServerError::Sys("set no_new_privs", nix::Error::EPERM))?;
        nix::sys::prctl::set_dumpable(false).map_err(|e| ServerError::Sys("set not dumpable", e))
    }

    /// Waits for the VMM process to end (reaping any virtiofsd that ends
    /// first), then ends the group.
    fn watch(self, mut children: Vec<i32>, messages: OwnedFd) -> i32 {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::io::Write;
        let mut messages = Some(messages);
        let mut logged = 0usize;
        // Copies what is waiting on the pipe to the log (the first
        // MAX_LOG bytes of it all); false once the pipe is done.
        let mut relay = |m: &OwnedFd| {
            let mut buf = [0u8; 4096];
            match nix::unistd::read(m, &mut buf) {
                Ok(0) | Err(_) => false,
                Ok(n) => {
                    let keep = n.min(MAX_LOG.saturating_sub(logged));
                    let mut err = std::io::stderr();
                    let _ = err.write_all(&buf[..keep]);
                    if logged < MAX_LOG && logged + n >= MAX_LOG {
                        let _ = err.write_all(
                            b"\nmoat volume server: virtiofsd's further messages are dropped\n",
                        );
                    }
                    logged = logged.saturating_add(n);
                    true
                }
            }
        };
        loop {
            let mut fds = vec![PollFd::new(self.vmm.as_fd(), PollFlags::POLLIN)];
            if let Some(m) = &messages {
                fds.push(PollFd::new(m.as_fd(), PollFlags::POLLIN));
            }
            match poll(&mut fds, PollTimeout::from(1000u16)) {
                Ok(_) if fds[0].any().unwrap_or(true) => break,
                Ok(_) | Err(nix::Error::EINTR) => {}
                Err(_) => break,
            }
            let ready = fds.get(1).is_some_and(|f| f.any().unwrap_or(false));
            drop(fds);
            if let (true, Some(m)) = (ready, &messages) {
                if !relay(m) {
                    messages = None;
                }
            }
            children.retain(|&p| {
                match nix::sys::wait::waitpid(
                    nix::unistd::Pid::from_raw(p),
                    Some(nix::sys::wait::WaitPidFlag::WNOHANG),
                ) {
                    Ok(nix::sys::wait::WaitStatus::StillAlive) => true,
                    Ok(st) => {
                        eprintln!("moat volume server: virtiofsd ended early: {st:?}");
                        false
                    }
                    Err(_) => false,
                }
            });
        }
        // The VMM is gone: what virtiofsd wrote before is logged first
        // (a failed run names its last word).
        while let Some(m) = &messages {
            let mut fds = [PollFd::new(m.as_fd(), PollFlags::POLLIN)];
            let ready = matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0);
            if !ready || !relay(m) {
                messages = None;
            }
        }
        kill_group();
        0
    }
}

/// The most of virtiofsd's messages the volume log keeps.
const MAX_LOG: usize = 64 << 10;

/// SIGKILLs the calling process's group (the server, every virtiofsd, and
/// the processes virtiofsd forked into its own PID namespace).
fn kill_group() {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(0),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// In the child: waits until its maps are written, becomes root of its
/// user namespace with no supplementary groups, and execs virtiofsd with
/// the listener inherited. Returns the errno of what failed.
fn child_exec(
    go: &OwnedFd,
    listener: std::os::fd::BorrowedFd,
    binary: &CString,
    argv: &[CString],
) -> nix::Error {
    let mut b = [0u8; 1];
    match nix::unistd::read(go, &mut b) {
        Ok(1) => {}
        Ok(_) => return nix::Error::EPIPE,
        Err(e) => return e,
    }
    let root = (nix::unistd::Uid::from_raw(0), nix::unistd::Gid::from_raw(0));
    let steps = || -> Result<(), nix::Error> {
        nix::unistd::setgroups(&[])?;
        nix::unistd::setresgid(root.1, root.1, root.1)?;
        nix::unistd::setresuid(root.0, root.0, root.0)?;
        moat_jail::attrs::set_no_new_privs().map_err(|_| nix::Error::EPERM)?;
        // After the user switch, which would clear it.
        nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
        moat_sys::fd::set_cloexec(listener.as_raw_fd(), false).map_err(|_| nix::Error::EBADF)?;
        Ok(())
    };
    if let Err(e) = steps() {
        return e;
    }
    match nix::unistd::execv(binary, argv) {
        Err(e) => e,
        Ok(never) => match never {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn r(inside: u32, outside: u32, count: u32) -> Range {
        Range {
            inside,
            outside,
            count,
        }
    }

    #[test]
    fn a_guest_without_a_user_namespace_gets_the_vmms_block_never_root() {
        let m = id_maps(
            &json!({"linux": {"namespaces": [{"type": "pid"}]}}),
            3_000_000_000,
        )
        .unwrap();
        assert_eq!(m.uid, vec![r(0, 3_000_000_000, 65536)]);
        assert_eq!(m.gid, vec![r(0, 3_000_000_000, 65536)]);
        assert_eq!(m.own(), (3_000_000_000, 3_000_000_000));
    }

    #[test]
    fn a_containers_own_host_ids_stay_themselves() {
        // moat run's config: the container's IDs are a block of the
        // allocator, which the guest uses as they are.
        let spec = json!({"linux": {
            "namespaces": [{"type": "user"}],
            "uidMappings": [{"containerID": 0, "hostID": 2_000_000_000u32, "size": 65536}],
            "gidMappings": [{"containerID": 0, "hostID": 2_000_000_000u32, "size": 65536}]
        }});
        let m = id_maps(&spec, 2_000_065_536).unwrap();
        assert_eq!(
            m.uid,
            vec![
                r(2_000_000_000, 2_000_000_000, 65536),
                r(0, 2_000_065_536, 1)
            ]
        );
        assert_eq!(m.own(), (2_000_065_536, 2_000_065_536));
        // One mapping into the host's system IDs moves into the block.
        let low = json!({"linux": {
            "namespaces": [{"type": "user"}],
            "uidMappings": [{"containerID": 0, "hostID": 1000, "size": 1}],
            "gidMappings": [{"containerID": 0, "hostID": 1000, "size": 1}]
        }});
        let m = id_maps(&low, 2_000_065_536).unwrap();
        assert_eq!(
            m.uid,
            vec![r(1000, 2_000_066_536, 1), r(0, 2_000_065_536, 1)]
        );
    }

    #[test]
    fn rootless_the_subordinate_ids_stay_and_virtiofsd_is_the_user() {
        let spec = json!({"linux": {
            "namespaces": [{"type": "user"}],
            "uidMappings": [{"containerID": 0, "hostID": 100000, "size": 65536}],
            "gidMappings": [{"containerID": 0, "hostID": 100000, "size": 65536}]
        }});
        let m = id_maps_rootless(&spec, 1001, 1002).unwrap();
        assert_eq!(m.uid, vec![r(100000, 100000, 65536), r(0, 1001, 1)]);
        assert_eq!(m.gid, vec![r(100000, 100000, 65536), r(0, 1002, 1)]);
        // Without subordinate IDs the container is the user itself.
        let one = json!({"linux": {
            "namespaces": [{"type": "user"}],
            "uidMappings": [{"containerID": 0, "hostID": 1001, "size": 1}],
            "gidMappings": [{"containerID": 0, "hostID": 1002, "size": 1}]
        }});
        let e = id_maps_rootless(&one, 1001, 1002).unwrap_err();
        assert!(e.contains("subordinate IDs") && !e.contains('\n'), "{e}");
    }

    #[test]
    fn a_range_across_the_system_ids_is_refused_in_one_line() {
        let spec = json!({"linux": {
            "namespaces": [{"type": "user"}],
            "uidMappings": [{"containerID": 0, "hostID": 60000, "size": 65536}],
            "gidMappings": []
        }});
        let e = id_maps(&spec, 2_000_065_536).unwrap_err();
        assert!(e.contains("60000") && !e.contains('\n'), "{e}");
    }
}
