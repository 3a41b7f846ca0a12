//! Network through moat's user-space stack, opt-in for the container tier
//! (and so for every tier built on it). A config that carries
//! `dev.moat.net.egress` and/or `dev.moat.net.publish` (what `moat run --net
//! egress=… -p …` writes) gets, in its own network namespace, one TAP device
//! whose other end is `moat_net::serve` in a **stack process**. The
//! container's init makes the device (in its network namespace, where it has
//! CAP_NET_ADMIN, before it pivots) and hands it to the runtime over the
//! setup channel; the runtime forks the stack process, outside the
//! container's namespaces, with it. The stack confines itself
//! (`moat_jail::confine`: the container's host root ID or nobody, no
//! capabilities, no_new_privs, Landlock read-only on what name resolution
//! reads, a seccomp allow-list) before it serves a single frame. It ends
//! when the container's init does (a pidfd), and `delete` kills it in any
//! case. Its refusals go to the runtime's stderr for `moat run`, else to
//! `net.log` in the container's state directory.
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use moat_jail::confine::Confinement;
use moat_jail::sync::{self, Msg, RemoteError};
use moat_net::{NetConfig, Policy, Publish, ServeConfig};
use oci_spec::runtime::Spec;

pub use moat_core::net::{EGRESS_ANNOTATION, PUBLISH_ANNOTATION};
/// The device's name in the container.
pub const DEVICE: &str = "eth0";

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{EGRESS_ANNOTATION}")]
    Rule(#[from] moat_net::RuleError),
    #[error("{PUBLISH_ANNOTATION}")]
    Publish(#[from] moat_net::publish::PublishError),
    #[error("{0}")]
    Unsupported(String),
    #[error("cannot {what}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the network stack")]
    Child(#[source] moat_jail::sync::SyncError),
}

/// What a config asks of the network.
#[derive(Debug, Clone)]
pub struct NetRequest {
    pub policy: Policy,
    pub publish: Vec<Publish>,
    /// The network namespace the stack serves from (its host sockets and
    /// published ports there), when not the runtime's: a Kubernetes pod's,
    /// for a microVM whose config joins it (the guest cannot).
    pub netns: Option<std::path::PathBuf>,
    /// Addresses of that namespace the workload may reach nonetheless
    /// (the stack refuses the others, as the host's own): a pod's, which
    /// another guest of the pod holds, as a pod's containers reach it.
    pub reachable_own: Vec<std::net::IpAddr>,
}

impl NetRequest {
    /// The request the config's annotations make, if any; it needs a new
    /// network namespace (the device goes there).
    pub fn from_spec(spec: &Spec, new_netns: bool) -> Result<Option<NetRequest>, NetError> {
        let a = spec.annotations().as_ref();
        let egress = a.and_then(|a| a.get(EGRESS_ANNOTATION));
        let publish = a.and_then(|a| a.get(PUBLISH_ANNOTATION));
        if egress.is_none() && publish.is_none() {
            return Ok(None);
        }
        if !new_netns {
            return Err(NetError::Unsupported(format!(
                "{EGRESS_ANNOTATION}/{PUBLISH_ANNOTATION} need the container to get a new network namespace"
            )));
        }
        let policy = match egress.map(|e| e.trim()) {
            None | Some("") => Policy::deny_all(),
            Some(rules) => Policy::parse(rules)?,
        };
        let publish = publish
            .map(|p| p.split(',').map(str::trim).filter(|s| !s.is_empty()))
            .into_iter()
            .flatten()
            .map(|s| s.parse::<Publish>())
            .collect::<Result<Vec<_>, _>>()?;
        for p in &publish {
            if p.host.port() < 1024 {
                return Err(NetError::Unsupported(format!(
                    "publishing on host port {} (below 1024) is not supported: the stack has no capability",
                    p.host.port()
                )));
            }
        }
        Ok(Some(NetRequest {
            policy,
            publish,
            netns: None,
            reachable_own: Vec::new(),
        }))
    }
}

/// The resolv.conf a container with the stack's network mounts: the
/// gateway answers for the names the policy allows.
pub fn resolv_conf() -> String {
    NetConfig::default().resolv_conf()
}

/// Syscalls the stack process makes once confined, and why.
const STACK_SYSCALLS: &[&str] = &[
    // Frames and flows: the TAP fd, host sockets, the wake-up pipe.
    "read",
    "write",
    "readv",
    "writev",
    "close",
    "socket",
    "connect",
    "bind",
    "listen",
    "accept",
    "accept4",
    "getsockname",
    "getpeername",
    "getsockopt",
    "setsockopt",
    "shutdown",
    "sendto",
    "recvfrom",
    "sendmsg",
    "recvmsg",
    "sendmmsg",
    "recvmmsg",
    "pipe2",
    "fcntl",
    "ioctl",
    "poll",
    "ppoll",
    // Name resolution (getaddrinfo): /etc/hosts, resolv.conf, nsswitch.
    "openat",
    "newfstatat",
    "fstat",
    "statx",
    "lseek",
    "uname",
    "access",
    "faccessat",
    "faccessat2",
    "readlink",
    // The Rust runtime: memory, threads (the resolver's), signals, time.
    "mmap",
    "munmap",
    "mprotect",
    "mremap",
    "madvise",
    "brk",
    "futex",
    // Threads only: `confine` refuses namespace flags to clone and answers
    // clone3 with ENOSYS (the C library then uses clone).
    "clone",
    "clone3",
    "set_robust_list",
    "rseq",
    "gettid",
    "getpid",
    "exit",
    "exit_group",
    "rt_sigaction",
    "rt_sigprocmask",
    "rt_sigreturn",
    "sigaltstack",
    "sched_yield",
    "sched_getaffinity",
    "clock_gettime",
    "clock_nanosleep",
    "nanosleep",
    "getrandom",
    "prlimit64",
    "tgkill",
];

/// What the stack process may hold, whatever the workload does: its data
/// (heap, thread stacks) within the core's bound for the default
/// [`moat_net::Limits`] plus what the runtime it was forked from already
/// holds, resolver threads and the C library; descriptors for every flow
/// the limits allow. Past either, an allocation or a socket fails (the
/// stack refuses the flow, or ends and the workload loses its network),
/// never the host.
fn stack_limits(req: &NetRequest) -> [(rustix::process::Resource, u64); 2] {
    let limits = moat_net::Limits::default();
    let data = limits.memory_bound(&NetConfig::default())
        + limits.max_dns_pending * moat_net::shell::RESOLVER_STACK
        + STACK_OVERHEAD;
    let fds = limits.max_fds(req.publish.len());
    [
        (rustix::process::Resource::Data, data as u64),
        (rustix::process::Resource::Nofile, fds as u64),
    ]
}

/// Data the stack process holds besides its buffers: the runtime's own
/// heap at the fork, the C library, smoltcp's per-socket state.
const STACK_OVERHEAD: usize = 64 * 1024 * 1024;

/// Paths name resolution reads (the rest of the filesystem is refused).
fn resolver_paths() -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = ["/etc", "/usr/lib", "/lib", "/lib64"]
        .iter()
        .map(PathBuf::from)
        .filter(|p| p.exists())
        .collect();
    // resolv.conf is often a symlink out of /etc (systemd-resolved's
    // /run/systemd/resolve/stub-resolv.conf): the directory it lives in.
    let real = std::fs::canonicalize("/etc/resolv.conf").ok();
    if let Some(dir) = real.as_deref().and_then(Path::parent) {
        if !paths.iter().any(|p| dir.starts_with(p)) {
            paths.push(dir.to_path_buf());
        }
    }
    paths
}

/// The stack process of a running container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StackProcess {
    pub pid: i32,
    pub start_time: u64,
}

impl StackProcess {
    /// SIGKILLs it if it still runs (and is still the same process).
    pub fn kill(&self) {
        if moat_jail::procfs::pid_start_time(self.pid) == Some(self.start_time) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// The host user the stack becomes: the container's host root when it has
/// a user namespace (the stack serves that container and nothing else),
/// else nobody; a rootless runtime's own user (the only one it can be).
fn stack_identity(spec: &Spec) -> (u32, u32) {
    if !rustix::process::geteuid().is_root() {
        return (
            rustix::process::geteuid().as_raw(),
            rustix::process::getegid().as_raw(),
        );
    }
    let linux = spec.linux().as_ref();
    let host_of = |maps: Option<&Vec<oci_spec::runtime::LinuxIdMapping>>| {
        maps.and_then(|m| m.iter().find(|m| m.container_id() == 0))
            .map(|m| m.host_id())
    };
    let uid = host_of(linux.and_then(|l| l.uid_mappings().as_ref()));
    let gid = host_of(linux.and_then(|l| l.gid_mappings().as_ref()));
    (uid.unwrap_or(65534), gid.unwrap_or(65534))
}

/// Starts the stack process on `tap` (the device the init of `init` made in
/// the container); returns once the stack is confined and serving. `log`:
/// where its messages go (None: the runtime's stderr).
pub fn start(
    tap: OwnedFd,
    init: i32,
    req: &NetRequest,
    spec: &Spec,
    log: Option<&Path>,
) -> Result<StackProcess, NetError> {
    start_link(moat_net::Link::Tap(tap), init, req, spec, log)
}

/// [`start`] on either kind of link: the microvm tier gives the stack a
/// stream socket whose peer is the VMM's network device, and `init` is
/// the VMM process (the stack ends when it does).
pub fn start_link(
    link: moat_net::Link,
    init: i32,
    req: &NetRequest,
    spec: &Spec,
    log: Option<&Path>,
) -> Result<StackProcess, NetError> {
    let io = |what| move |source| NetError::Io { what, source };
    let pid = rustix::process::Pid::from_raw(init).ok_or(NetError::Io {
        what: "name the container's init",
        source: std::io::Error::from_raw_os_error(libc::ESRCH),
    })?;
    let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
        .map_err(|e| io("open a pidfd of the container's init")(e.into()))?;
    let log = log
        .map(|p| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map(OwnedFd::from)
        })
        .transpose()
        .map_err(io("open the network log"))?;
    let netns = req
        .netns
        .as_ref()
        .map(|p| std::fs::File::open(p).map(OwnedFd::from))
        .transpose()
        .map_err(io("open the network namespace the stack serves from"))?;
    let (parent, child) = sync::pair().map_err(NetError::Child)?;
    let (uid, gid) = stack_identity(spec);
    let one = moat_sys::process::OneThread::check().map_err(io("fork the network stack"))?;
    let stack_pid = one
        .fork(0, |_| {
            stack_main(link, (pidfd, netns), log, &child, req, (uid, gid))
        })
        .map_err(io("fork the network stack"))?;
    drop(child);
    let ready = parent.expect(Msg::Go, "the network stack ready");
    let start_time = moat_jail::procfs::pid_start_time(stack_pid).unwrap_or(0);
    let proc = StackProcess {
        pid: stack_pid,
        start_time,
    };
    if let Err(e) = ready {
        proc.kill();
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(stack_pid), None);
        return Err(NetError::Child(e));
    }
    Ok(proc)
}

/// Why the stack process could not start serving.
#[derive(Debug, thiserror::Error)]
enum StackError {
    #[error("cannot start a session")]
    Setsid(#[source] nix::Error),
    #[error("cannot redirect the standard streams")]
    Streams(#[source] std::io::Error),
    #[error("cannot confine the network stack")]
    Confine(#[from] moat_jail::confine::ConfineError),
    #[error("cannot join the network namespace it serves from")]
    Netns(#[source] nix::Error),
    #[error("cannot set up the stack's control")]
    Serve(#[from] moat_net::ServeError),
}

fn stack_main(
    link: moat_net::Link,
    (pidfd, netns): (OwnedFd, Option<OwnedFd>),
    log: Option<OwnedFd>,
    chan: &sync::Channel,
    req: &NetRequest,
    (uid, gid): (u32, u32),
) -> i32 {
    let link_fd = match &link {
        moat_net::Link::Tap(fd) | moat_net::Link::Stream(fd) => fd.as_raw_fd(),
    };
    let ready = (|| -> Result<_, StackError> {
        if let Some(ns) = netns {
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(StackError::Netns)?;
        }
        nix::unistd::setsid().map_err(StackError::Setsid)?;
        quiet_streams(log.as_ref()).map_err(StackError::Streams)?;
        Confinement {
            uid,
            gid,
            keep_fds: &[link_fd, pidfd.as_raw_fd(), chan.raw()],
            read: &resolver_paths(),
            syscalls: STACK_SYSCALLS,
            limits: &stack_limits(req),
        }
        .apply()?;
        Ok(moat_net::control()?)
    })();
    let (control, stop) = match ready {
        Ok(r) => r,
        Err(e) => {
            let _ = chan.send(&Msg::Error(RemoteError::new(&e)));
            return 1;
        }
    };
    if chan.send(&Msg::Go).is_err() {
        return 1;
    }
    let mut cfg = ServeConfig::new(req.policy.clone());
    cfg.publish = req.publish.clone();
    cfg.exit_with = Some(pidfd);
    if !req.reachable_own.is_empty() {
        match moat_net::host_addresses() {
            Ok(own) => {
                cfg.host_addrs = Some(
                    own.into_iter()
                        .filter(|a| !req.reachable_own.contains(a))
                        .collect(),
                )
            }
            Err(e) => {
                tracing::warn!("network stack: cannot list the namespace's addresses: {e}");
                return 1;
            }
        }
    }
    let ended = moat_net::serve_link(link, cfg, Arc::new(moat_net::SystemResolver), control);
    drop(stop);
    match ended {
        Ok(_) => 0,
        Err(e) => {
            tracing::warn!("network stack: {}", moat_core::error_chain(&e));
            1
        }
    }
}

/// stdin and stdout from /dev/null (a caller's pipe must see EOF when the
/// runtime exits); stderr to `log` when given.
fn quiet_streams(log: Option<&OwnedFd>) -> std::io::Result<()> {
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    rustix::stdio::dup2_stdin(&null)?;
    rustix::stdio::dup2_stdout(&null)?;
    if let Some(l) = log {
        rustix::stdio::dup2_stderr(l)?;
    }
    Ok(())
}
