//! The supervisor: one process per sandbox, started by the runtime before
//! the container (double fork: it belongs to no runtime command), that
//! receives the workload's seccomp notify fd on its listener socket and
//! decides every notification until the container is gone.
//!
//! Its life:
//! 1. wait for the container process's PID from the runtime (EOF: the
//!    create failed, exit);
//! 2. wait for the notify fd on the listener, or for the container process
//!    to end (then exit);
//! 3. with the first fd: open the container's root and host /proc, confine
//!    itself ([`jail`]), and serve; later fds (from `moat exec`) join;
//! 4. exit once every notify fd is closed and the container process has
//!    ended.
//!
//! In any of these steps the runtime may send it, and its guard, the
//! container's cgroup files ([`Spawned::join_cgroup`]): each moves itself
//! into the container's cgroup through them.
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use moat_jail::sync::{self, Channel, Msg, RemoteError};
use moat_sys::notify;
use rustix::event::{PollFd, PollFlags};
use rustix::fs::{Mode, OFlags};

use crate::policy::Policy;

pub mod broker;
pub mod colocate;
pub mod decode;
pub mod guard;
pub mod jail;
pub mod target;
pub mod view;

use broker::{Broker, Reply};

/// What the supervisor is given at its start.
pub struct Options {
    pub policy: Policy,
    /// The workload process's capability bounding set (bits).
    pub workload_bounding: u64,
    /// Learning mode: the policy is not enforced; what was used is written
    /// to this stream when the sandbox ends.
    pub learn: Option<OwnedFd>,
    /// Keep stderr (for denial logs) rather than /dev/null.
    pub keep_stderr: bool,
    /// What the workload is shown of its machine.
    pub view: view::SandboxView,
}

/// A supervisor started for a sandbox being created, and its guard.
pub struct Spawned {
    pub pid: i32,
    /// The guard ([`guard`]): the supervisor's parent, which kills the
    /// container when the supervisor ends.
    pub guard: i32,
    control: Channel,
    guard_control: Channel,
}

impl Spawned {
    /// Tells the supervisor and its guard which process is the
    /// container's: the supervisor serves that container and ends with
    /// it; the guard kills it if the supervisor ends first. An error means
    /// the supervisor is gone.
    pub fn go(&self, container_pid: i32) -> Result<(), sync::SyncError> {
        let to_guard = self.guard_control.send(&Msg::Pid(container_pid));
        self.control.send(&Msg::Pid(container_pid))?;
        to_guard
    }

    /// Moves the supervisor and its guard into the container's cgroup:
    /// sends each of them every file of `files`
    /// ([`moat_jail::cgroup::JoinFiles::fds`], opened by the runtime, so
    /// the kernel checks the runtime's credentials), one per message; each
    /// writes "0" to every file, which moves the writing thread (both are
    /// single-threaded) without the global lock that a write of another
    /// process's PID takes on cgroup v1, and answers once. Waits at most
    /// `wait` for both answers. Returns (the supervisor's result, the
    /// guard's).
    pub fn join_cgroup(
        &self,
        files: &[BorrowedFd<'_>],
        wait: Duration,
    ) -> [Result<(), JoinError>; 2] {
        let chans = [&self.control, &self.guard_control];
        // Both are asked before either answer is awaited.
        let sent = chans.map(|ch| send_joins(ch, files));
        let deadline = Instant::now() + wait;
        let mut out = [Ok(()), Ok(())];
        for ((ch, sent), out) in chans.into_iter().zip(sent).zip(&mut out) {
            *out = match sent {
                Ok(true) => joined_by(ch, deadline, wait),
                Ok(false) => Ok(()),
                Err(e) => Err(e.into()),
            };
        }
        out
    }
}

/// Sends every file of `files` on `ch`, one [`Msg::Join`] each; whether
/// an answer is to come (none for no file).
fn send_joins(ch: &Channel, files: &[BorrowedFd<'_>]) -> Result<bool, sync::SyncError> {
    for (n, fd) in files.iter().enumerate() {
        let last = n + 1 == files.len();
        ch.send_with_fd(&Msg::Join { last }, Some(fd.as_raw_fd()))?;
    }
    Ok(!files.is_empty())
}

/// The answer to the joins sent on `ch`, awaited until `deadline` (`wait`
/// after they were sent).
fn joined_by(ch: &Channel, deadline: Instant, wait: Duration) -> Result<(), JoinError> {
    loop {
        let rest = deadline.saturating_duration_since(Instant::now());
        if rest.is_zero() {
            return Err(JoinError::Timeout(wait));
        }
        let timeout = rustix::event::Timespec {
            tv_sec: rest.as_secs() as i64,
            tv_nsec: i64::from(rest.subsec_nanos()),
        };
        let mut pfd = [PollFd::new(ch, PollFlags::IN)];
        match rustix::event::poll(&mut pfd, Some(&timeout)) {
            Ok(0) | Err(rustix::io::Errno::INTR) => continue,
            Ok(_) => break,
            Err(e) => return Err(JoinError::Poll(e.into())),
        }
    }
    match ch.recv()? {
        Msg::Joined => Ok(()),
        Msg::Error(e) => Err(sync::SyncError::Child(e).into()),
        got => Err(sync::SyncError::Unexpected {
            got,
            expected: "Joined",
        }
        .into()),
    }
}

/// How long the runtime waits for the supervisor and the guard to join
/// the container's cgroup.
pub const JOIN_WAIT: Duration = Duration::from_secs(5);

/// Why the supervisor or its guard did not join the container's cgroup.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    Channel(#[from] sync::SyncError),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot wait for its answer")]
    Poll(#[source] std::io::Error),
}

#[derive(Debug, thiserror::Error)]
#[error("cannot join the container's cgroup")]
struct JoinFailed(#[source] std::io::Error);

/// Answers the runtime's [`Msg::Join`]s (the supervisor's and the
/// guard's), the first of which brought `fd` and `last`: writes "0" to
/// each cgroup file, moving the calling thread (its process's only one),
/// and says once, after the last, whether that worked. The rest come back
/// to back, so the receives do not wait. An error means the runtime is
/// gone (or out of step).
fn answer_join(ch: &Channel, fd: Option<OwnedFd>, last: bool) -> Result<(), sync::SyncError> {
    let (mut fd, mut last) = (fd, last);
    let mut failed = None;
    loop {
        if failed.is_none() {
            failed = join_through(fd.take()).err();
        }
        if last {
            break;
        }
        match ch.recv_with_fd()? {
            (Msg::Join { last: l }, f) => (fd, last) = (f, l),
            (got, _) => {
                return Err(sync::SyncError::Unexpected {
                    got,
                    expected: "Join",
                })
            }
        }
    }
    match failed {
        None => ch.send(&Msg::Joined),
        Some(e) => ch.send(&Msg::Error(RemoteError::new(&JoinFailed(e)))),
    }
}

/// One "0" to a cgroup file.
fn join_through(fd: Option<OwnedFd>) -> std::io::Result<()> {
    let fd = fd.ok_or_else(|| std::io::Error::other("no cgroup file came with the request"))?;
    match rustix::io::write(&fd, b"0")? {
        1 => Ok(()),
        _ => Err(std::io::ErrorKind::WriteZero.into()),
    }
}

/// Forks the guard and, from it, the supervisor (the caller must be
/// single-threaded), listening on `listener`. Returns once both run, with
/// their PIDs. Triple fork: the middle process exits at once, so the guard
/// is an orphan (reparented to the nearest subreaper, like a created
/// container) and the supervisor is the guard's child.
pub fn spawn(listener: UnixListener, opts: Options) -> std::io::Result<Spawned> {
    let pair = || {
        rustix::net::socketpair(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::SEQPACKET,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
    };
    let (parent, child) = pair()?;
    let (guard_parent, guard_child) = pair()?;
    // The children close their copies of the runtime's ends (a fork
    // inherits them under the same numbers), so that they see EOF when the
    // runtime gives up: a create that fails leaves neither behind.
    let runtime_ends = (parent.as_raw_fd(), guard_parent.as_raw_fd());
    let (parent, child) = (Channel::from_fd(parent), Channel::from_fd(child));
    let guard_parent = Channel::from_fd(guard_parent);
    let one = moat_sys::process::OneThread::check()?;
    let mid = one.fork(0, move |one| {
        if nix::unistd::close(runtime_ends.0).is_err()
            || nix::unistd::close(runtime_ends.1).is_err()
        {
            return 1;
        }
        match one.fork(0, move |one| {
            guard_main(one, listener, child, guard_child, opts)
        }) {
            Ok(_) => 0,
            Err(_) => 1,
        }
    })?;
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(mid), None);
    let started = || std::io::Error::other("the sandbox supervisor did not start");
    let (guard, pid) = match (guard_parent.recv(), guard_parent.recv()) {
        (Ok(Msg::Pid(g)), Ok(Msg::Pid(s))) => (g, s),
        _ => return Err(started()),
    };
    Ok(Spawned {
        pid,
        guard,
        control: parent,
        guard_control: guard_parent,
    })
}

/// The guard process: detaches, forks the supervisor, reports both PIDs
/// to the runtime, then guards.
fn guard_main(
    one: moat_sys::process::OneThread,
    listener: UnixListener,
    control: Channel,
    guard_control: OwnedFd,
    opts: Options,
) -> i32 {
    if let Err(e) = detach(opts.keep_stderr) {
        tracing::error!("sandbox guard: {e}");
        return 1;
    }
    let guard_control = Channel::from_fd(guard_control);
    let guards_own = guard_control.raw();
    let sup = one.fork(0, move |_| {
        // The guard's channel is the guard's alone.
        if nix::unistd::close(guards_own).is_err() {
            return 1;
        }
        run(listener, &control, opts)
    });
    let sup = match sup {
        Ok(pid) => pid,
        Err(_) => return 1,
    };
    let me = rustix::process::getpid().as_raw_nonzero().get();
    // If the runtime gave up meanwhile, the supervisor sees EOF on its own
    // channel and ends, and so does the guard.
    let _ = guard_control
        .send(&Msg::Pid(me))
        .and_then(|()| guard_control.send(&Msg::Pid(sup)));
    guard::run(sup, guard_control)
}

/// The supervisor process's body; its exit status.
fn run(listener: UnixListener, control: &Channel, opts: Options) -> i32 {
    match serve(listener, control, opts) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!("sandbox supervisor: {}", moat_core::error_chain(&*e));
            1
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn ctx<E: std::fmt::Display>(step: &'static str) -> impl FnOnce(E) -> BoxError {
    move |e| format!("cannot {step}: {e}").into()
}

/// A session of its own (the terminal's signals are not for it), stdio on
/// /dev/null (stderr kept for logs when asked), not dumpable.
fn detach(keep_stderr: bool) -> Result<(), BoxError> {
    rustix::process::setsid()?;
    let null = rustix::fs::open("/dev/null", OFlags::RDWR | OFlags::CLOEXEC, Mode::empty())?;
    rustix::stdio::dup2_stdin(&null)?;
    rustix::stdio::dup2_stdout(&null)?;
    if !keep_stderr {
        rustix::stdio::dup2_stderr(&null)?;
    }
    // Its own /proc files stay root's: nothing in the container may read
    // or trace it (it is outside the container's PID namespace anyway).
    nix::sys::prctl::set_dumpable(false)?;
    Ok(())
}

fn serve(listener: UnixListener, control: &Channel, opts: Options) -> Result<(), BoxError> {
    // Not a process group leader (the guard is): a session of its own.
    detach(opts.keep_stderr)?;
    let Some((first, init)) = wait_first(&listener, control)? else {
        return Ok(());
    };
    let pid = rustix::process::Pid::from_raw(init).ok_or("bad container PID")?;
    let init_fd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
        .map_err(ctx("open a pidfd of the container process"))?;
    let root = rustix::fs::open(
        format!("/proc/{init}/root").as_str(),
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(ctx("open the container's root"))?;
    let proc = rustix::fs::open(
        "/proc",
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(ctx("open /proc"))?;
    let userns = other_userns(init)?;
    // Before the chroot: the cgroup filesystem and namespaces are the host's.
    let cgroup = broker::CgroupFiles::of(init);
    let host_netns = same_ns(init, "net");
    let init_mem = rustix::fs::open(
        format!("/proc/{init}/mem").as_str(),
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(ctx("open the container process's memory"))?;
    notify::set_sync_wakeup(first.as_fd())
        .map_err(ctx("set SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP"))?;
    let permitted = jail::confine(
        userns.as_ref().map(|f| f.as_fd()),
        root.as_fd(),
        proc.as_fd(),
        opts.workload_bounding,
    )
    .map_err(|e| {
        format!(
            "cannot confine the supervisor: {}",
            moat_core::error_chain(&e)
        )
    })?;
    jail::load_filter().map_err(ctx("load the supervisor's seccomp filter"))?;
    let mut broker = Broker::new(
        root,
        proc,
        opts.policy,
        permitted,
        opts.learn.is_some(),
        Some((init as u32, init_mem)),
    );
    broker.set_view(broker::ViewState::new(opts.view, host_netns, cgroup));
    let mut fds = vec![first];
    let mut init_alive = Some(init_fd);
    serve_loop(&listener, control, &mut fds, &mut init_alive, &mut broker);
    if let (Some(out), Some(learned)) = (opts.learn, broker.learned.take()) {
        let policy = learned.policy();
        let mut f = std::fs::File::from(out);
        std::io::Write::write_all(&mut f, policy.to_json().as_bytes())?;
    }
    Ok(())
}

/// The container's user namespace, if it is not ours.
fn other_userns(init: i32) -> Result<Option<OwnedFd>, BoxError> {
    let theirs = rustix::fs::open(
        format!("/proc/{init}/ns/user").as_str(),
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let ours = rustix::fs::stat("/proc/self/ns/user")?;
    let t = rustix::fs::fstat(&theirs)?;
    Ok(((t.st_ino, t.st_dev) != (ours.st_ino, ours.st_dev)).then_some(theirs))
}

/// Whether the container process's namespace `kind` is the supervisor's
/// own (that is, moat's: the host's, unless moat runs in a container).
fn same_ns(init: i32, kind: &str) -> bool {
    let theirs = rustix::fs::stat(format!("/proc/{init}/ns/{kind}").as_str());
    let ours = rustix::fs::stat(format!("/proc/self/ns/{kind}").as_str());
    match (theirs, ours) {
        (Ok(t), Ok(o)) => (t.st_ino, t.st_dev) == (o.st_ino, o.st_dev),
        // Unknown: taken as shared, which refuses more.
        _ => true,
    }
}

/// Waits for the first notify fd and the container process's PID that
/// comes with it; joins the container's cgroup when the runtime asks
/// meanwhile. `None` when the runtime gave up first (EOF on the control
/// channel before it named the container process), or that process ended.
fn wait_first(
    listener: &UnixListener,
    control: &Channel,
) -> Result<Option<(OwnedFd, i32)>, BoxError> {
    let mut init: Option<OwnedFd> = None;
    loop {
        let mut pfd = vec![PollFd::new(listener, PollFlags::IN)];
        match &init {
            None => pfd.push(PollFd::new(control, PollFlags::IN)),
            Some(f) => pfd.push(PollFd::new(f, PollFlags::IN)),
        }
        match rustix::event::poll(&mut pfd, None) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
        let (ready, other) = (!pfd[0].revents().is_empty(), !pfd[1].revents().is_empty());
        drop(pfd);
        if ready {
            if let Some(got) = accept_fd(listener, None) {
                return Ok(Some(got));
            }
        }
        if other {
            if init.is_some() {
                return Ok(None);
            }
            match control.recv_with_fd() {
                Ok((Msg::Pid(p), _)) => {
                    let pid = rustix::process::Pid::from_raw(p).ok_or("bad container PID")?;
                    init = Some(rustix::process::pidfd_open(
                        pid,
                        rustix::process::PidfdFlags::empty(),
                    )?);
                }
                Ok((Msg::Join { last }, fd)) => {
                    if answer_join(control, fd, last).is_err() {
                        return Ok(None);
                    }
                }
                _ => return Ok(None),
            }
        }
    }
}

/// One connection on the listener: the runtime's container process state
/// (its `pid`) with the notify fd. Anything else is dropped. `proc` is the
/// host's /proc once the supervisor is jailed (its root is then the
/// container's, whose /proc the workload controls).
fn accept_fd(listener: &UnixListener, proc: Option<BorrowedFd<'_>>) -> Option<(OwnedFd, i32)> {
    let (conn, _) = listener.accept().ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut buf = vec![0u8; 16 * 1024];
    let (n, fd) = moat_sys::fd::recv_with_fd(conn.as_fd(), &mut buf).ok()?;
    let fd = fd?;
    buf.truncate(n);
    let _ = (&conn).take(64 * 1024).read_to_end(&mut buf);
    drop(conn);
    let state: serde_json::Value = serde_json::from_slice(&buf).ok()?;
    let pid = i32::try_from(state.get("pid")?.as_i64()?).ok()?;
    (is_notify_fd(fd.as_fd(), proc) && pid > 0).then_some((fd, pid))
}

fn is_notify_fd(fd: BorrowedFd<'_>, proc: Option<BorrowedFd<'_>>) -> bool {
    let link = match proc {
        Some(proc) => rustix::fs::readlinkat(
            proc,
            format!("self/fd/{}", fd.as_raw_fd()).as_str(),
            Vec::new(),
        ),
        None => rustix::fs::readlink(
            format!("/proc/self/fd/{}", fd.as_raw_fd()).as_str(),
            Vec::new(),
        ),
    };
    link.map(|l| l.as_bytes() == b"anon_inode:seccomp notify")
        .unwrap_or(false)
}

/// One message from the runtime while serving: a cgroup join (answered),
/// or the container process's PID from [`Spawned::go`] (known already,
/// from the first notify fd). False once the runtime is gone.
fn control_message(control: &Channel) -> bool {
    match control.recv_with_fd() {
        Ok((Msg::Join { last }, fd)) => answer_join(control, fd, last).is_ok(),
        Ok(_) => true,
        Err(_) => false,
    }
}

fn serve_loop(
    listener: &UnixListener,
    control: &Channel,
    fds: &mut Vec<OwnedFd>,
    init: &mut Option<OwnedFd>,
    broker: &mut Broker,
) {
    // Polled until the runtime closes its end (which does not end serving).
    let mut control = Some(control);
    loop {
        if fds.is_empty() && init.is_none() {
            return;
        }
        let mut pfd: Vec<PollFd> = Vec::with_capacity(fds.len() + 3);
        pfd.push(PollFd::new(listener, PollFlags::IN));
        let init_ix = init.as_ref().map(|f| {
            pfd.push(PollFd::new(f, PollFlags::IN));
            pfd.len() - 1
        });
        let control_ix = control.map(|c| {
            pfd.push(PollFd::new(c, PollFlags::IN));
            pfd.len() - 1
        });
        let first_notify = pfd.len();
        for f in fds.iter() {
            pfd.push(PollFd::new(f, PollFlags::IN));
        }
        // Deferred socket calls: their sockets, and a timer for those no
        // event wakes and for callers that went away.
        let first_pending = pfd.len();
        for d in broker.pending() {
            let (sock, wait_out) = d.poll_on();
            let flags = if wait_out {
                PollFlags::OUT
            } else {
                PollFlags::empty()
            };
            pfd.push(PollFd::new(sock, flags));
        }
        let retry = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 20_000_000,
        };
        let timeout = (pfd.len() > first_pending).then_some(&retry);
        match rustix::event::poll(&mut pfd, timeout) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => {
                tracing::error!("sandbox supervisor: poll: {e}");
                return;
            }
        }
        let listener_ready = !pfd[0].revents().is_empty();
        let init_done = init_ix.is_some_and(|i| !pfd[i].revents().is_empty());
        let from_runtime = control_ix.is_some_and(|i| !pfd[i].revents().is_empty());
        let events: Vec<PollFlags> = pfd[first_notify..first_pending]
            .iter()
            .map(|p| p.revents())
            .collect();
        let ready: Vec<bool> = pfd[first_pending..]
            .iter()
            .map(|p| !p.revents().is_empty())
            .collect();
        drop(pfd);
        if !ready.is_empty() {
            broker.progress(&ready);
        }
        let mut dead = Vec::new();
        for (i, ev) in events.iter().enumerate() {
            if ev.contains(PollFlags::IN) {
                if !handle_one(fds[i].as_fd(), broker) {
                    dead.push(i);
                }
            } else if !ev.is_empty() {
                // HUP: no process uses this filter any more.
                dead.push(i);
            }
        }
        for i in dead.into_iter().rev() {
            fds.remove(i);
        }
        if init_done {
            *init = None;
        }
        if from_runtime && !control.is_some_and(control_message) {
            control = None;
        }
        if listener_ready {
            if let Some((fd, pid)) = accept_fd(listener, Some(broker.proc())) {
                if notify::set_sync_wakeup(fd.as_fd()).is_ok() {
                    fds.push(fd);
                    broker.runtime_process(pid as u32);
                }
            }
        }
    }
}

/// Receives and answers one notification; false when the fd is finished.
fn handle_one(fd: BorrowedFd<'_>, broker: &mut Broker) -> bool {
    let n = match notify::recv(fd) {
        Ok(n) => n,
        // The caller was killed before we received it.
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return true,
        Err(_) => return false,
    };
    let valid = || notify::id_valid(fd, n.id);
    let sent = match broker.handle(&n, &valid) {
        Reply::Val(v) => notify::send(fd, n.id, v, 0, 0),
        Reply::Err(e) => notify::send(fd, n.id, 0, e, 0),
        Reply::Continue => notify::send(fd, n.id, 0, 0, notify::FLAG_CONTINUE),
        Reply::Fd { fd: file, cloexec } => {
            // The caller thread and the supervisor on one CPU for the
            // hand-over ([`colocate`]), restored right after it.
            let pinned = broker.colocate(n.pid);
            let added = notify::addfd_send(fd, n.id, file.as_fd(), cloexec);
            drop(pinned);
            match added {
                Ok(_) => Ok(()),
                // The descriptor could not be installed; the caller still
                // waits and must get an answer: EBADF is its RLIMIT_NOFILE
                // (an open would fail with EMFILE).
                Err(e) if e.raw_os_error() != Some(libc::ENOENT) => {
                    let errno = match e.raw_os_error() {
                        Some(libc::EBADF) => libc::EMFILE,
                        Some(v) => v,
                        None => libc::EIO,
                    };
                    notify::send(fd, n.id, 0, errno, 0)
                }
                Err(e) => Err(e),
            }
        }
        Reply::Defer(d) => {
            broker.defer(fd, *d);
            Ok(())
        }
    };
    match sent {
        // ENOENT: the caller is gone (killed, or its syscall interrupted).
        Ok(()) => true,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
        Err(e) => {
            tracing::warn!("sandbox supervisor: cannot answer a notification: {e}");
            // Never leave the caller waiting: an answer without a value.
            let _ = notify::send(fd, n.id, 0, libc::EIO, 0);
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a stand-in for the supervisor or the guard does with a join
    /// request (the channel, the fd and `last` that came first); false: it
    /// ends, closing its channel.
    type Peer = fn(&Channel, Option<OwnedFd>, bool) -> bool;

    /// A `Spawned` whose supervisor and guard are threads doing `peer`
    /// with each request on the other ends of its channels.
    fn spawned(peer: Peer) -> (Spawned, Vec<std::thread::JoinHandle<()>>) {
        let (control, sup) = sync::pair().unwrap();
        let (guard_control, guard) = sync::pair().unwrap();
        let peers = [sup, guard].map(|ch| {
            std::thread::spawn(move || {
                while let Ok((Msg::Join { last }, fd)) = ch.recv_with_fd() {
                    if !peer(&ch, fd, last) {
                        return;
                    }
                }
            })
        });
        let s = Spawned {
            pid: 1,
            guard: 1,
            control,
            guard_control,
        };
        (s, peers.into())
    }

    fn join(s: Spawned, peers: Vec<std::thread::JoinHandle<()>>) {
        drop(s);
        for p in peers {
            p.join().unwrap();
        }
    }

    /// Three descriptors of /dev/null, opened as `how` says.
    fn files(how: &std::fs::OpenOptions) -> Vec<OwnedFd> {
        (0..3)
            .map(|_| how.open("/dev/null").unwrap().into())
            .collect()
    }

    fn borrowed(fds: &[OwnedFd]) -> Vec<BorrowedFd<'_>> {
        fds.iter().map(|f| f.as_fd()).collect()
    }

    #[test]
    fn each_file_is_written_and_answered() {
        let (s, peers) = spawned(|ch, fd, last| answer_join(ch, fd, last).is_ok());
        let fds = files(std::fs::OpenOptions::new().write(true));
        let [a, b] = s.join_cgroup(&borrowed(&fds), JOIN_WAIT);
        assert!(a.is_ok() && b.is_ok(), "{a:?} {b:?}");
        join(s, peers);
    }

    #[test]
    fn the_first_failure_comes_back_typed_and_the_channel_stays_in_step() {
        let (s, peers) = spawned(|ch, fd, last| answer_join(ch, fd, last).is_ok());
        // The middle one read-only: its write fails with EBADF.
        let mut fds = files(std::fs::OpenOptions::new().write(true));
        fds[1] = std::fs::File::open("/dev/null").unwrap().into();
        for r in s.join_cgroup(&borrowed(&fds), JOIN_WAIT) {
            let Err(JoinError::Channel(sync::SyncError::Child(e))) = r else {
                panic!("{r:?}")
            };
            assert_eq!(e.message, "cannot join the container's cgroup");
            assert_eq!(e.errno(), Some(libc::EBADF));
        }
        // Every request of that round was taken: the next is answered alone.
        let fds = files(std::fs::OpenOptions::new().write(true));
        let [a, b] = s.join_cgroup(&borrowed(&fds), JOIN_WAIT);
        assert!(a.is_ok() && b.is_ok(), "{a:?} {b:?}");
        join(s, peers);
    }

    #[test]
    fn silence_times_out() {
        let (s, peers) = spawned(|_, _, _| true);
        let fds = files(std::fs::OpenOptions::new().write(true));
        let wait = Duration::from_millis(50);
        for r in s.join_cgroup(&borrowed(&fds), wait) {
            assert!(
                matches!(r, Err(JoinError::Timeout(w)) if w == wait),
                "{r:?}"
            );
        }
        join(s, peers);
    }

    #[test]
    fn a_peer_that_ends_without_answering_fails() {
        let (s, peers) = spawned(|_, _, _| false);
        let fds = files(std::fs::OpenOptions::new().write(true));
        for r in s.join_cgroup(&borrowed(&fds), JOIN_WAIT) {
            assert!(matches!(r, Err(JoinError::Channel(_))), "{r:?}");
        }
        join(s, peers);
    }
}
