//! Socket addresses: `connect`, `bind`, `sendto` with an address,
//! `sendmsg` and `sendmmsg` are decided on the address and carried out by
//! the supervisor on the workload's own socket (a duplicate of its
//! descriptor from `pidfd_getfd`), with the address, data and control
//! messages it copied out of the workload's memory: the kernel uses
//! exactly what was decided, whatever a racing thread writes meanwhile, and
//! whatever the descriptor number names by then.
//!
//! - `AF_UNIX` paths are resolved by the broker in the container's root
//!   under the policy (`w` on the socket's path, as the kernel asks write
//!   permission to connect): a connect or send goes to
//!   `/proc/self/fd/N` of the `O_PATH` descriptor the broker opened, so the
//!   kernel resolves no path of the workload's. A bind creates the name in
//!   the directory the broker checked; the kernel resolves the workload's
//!   own string (so `getsockname` returns it), which names that directory
//!   because nothing in the sandbox can change a name meanwhile: every
//!   syscall that creates, removes or renames a name is brokered by this
//!   same single-threaded supervisor, and none runs until the bind is done.
//!   Abstract names live in the socket's network namespace: allowed in the
//!   sandbox's own, refused (`ECONNREFUSED`/`EACCES`) when that namespace is
//!   the host's.
//! - `AF_INET`/`AF_INET6`: decided by the sandbox's network
//!   ([`Network`]): with only `lo`, a destination that is not loopback is
//!   refused with `ENETUNREACH` (the kernel would find no route either);
//!   with moat's user-space stack or a network given to the sandbox, any
//!   address goes to the socket, and the stack's egress allow-list (or that
//!   network) decides.
//! - Everything else (netlink, packet if the policy lets such sockets be
//!   created) is carried out as asked.
//!
//! The supervisor acts with the caller's real, effective and fs IDs,
//! groups and capabilities ([`Broker::switch_to`]): a unix peer sees the
//! caller's credentials (`SO_PEERCRED`, `SCM_CREDENTIALS`), not the
//! supervisor's; its PID, though, is the supervisor's, which the workload's
//! PID namespace cannot name (0). Descriptors passed with `SCM_RIGHTS` are
//! the caller's, duplicated into the supervisor first.
//!
//! Nothing here blocks the supervisor: sends run with `MSG_DONTWAIT`, a
//! connect on a non-blocking duplicate; when the caller's socket blocks
//! and the call would wait, it is [`Deferred`] and answered once the
//! socket is ready (the serve loop polls it).
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use moat_sys::notify::{self, Notif};
use moat_sys::sock;
use rustix::fs::{Mode, OFlags};
use rustix::thread::{CapabilitySet, CapabilitySets};

use super::super::decode::{
    self, inet_destination, sockaddr_un, Iovec, MsgHdr, SockAddr, UnixAddr, Use,
};
use super::super::target::{self, Creds};
use super::super::view::Network;
use super::{errno, Broker, Reply, R};
use crate::policy::Want;

/// Most bytes one brokered datagram carries (a stream send sends at most
/// this much, a short count as the kernel may return).
const SEND_MAX: usize = 256 * 1024;
/// Most messages of one `sendmmsg` (`UIO_MAXIOV`, as the kernel caps it).
const MMSG_MAX: usize = 1024;
/// Most calls deferred at once (each holds up to three descriptors of the
/// supervisor's 1024); past it a blocking call fails with EAGAIN.
const PENDING_MAX: usize = 128;
const MSGHDR: usize = decode::MSGHDR_LEN;
const MMSGHDR: usize = decode::MMSGHDR_LEN;

/// A socket call that would block the caller: answered once its socket is
/// ready ([`Broker::progress`]).
pub struct Deferred {
    sock: OwnedFd,
    /// The notify fd the call came on (a duplicate).
    notify: Option<OwnedFd>,
    id: u64,
    tid: u32,
    creds: Creds,
    op: Op,
}

impl Deferred {
    /// The socket to poll, and whether to wait for it to be writable (else
    /// the call is tried again on the serve loop's timer).
    pub fn poll_on(&self) -> (&OwnedFd, bool) {
        (&self.sock, !matches!(self.op, Op::Connect { .. }))
    }
}

enum Op {
    /// A connect in progress: done when the socket is writable.
    Connecting,
    /// A unix connect the listener could not take yet (backlog full).
    Connect { addr: Addr },
    /// Sends that found no room; `mmsg` is the `sendmmsg` vector.
    Send {
        msgs: Vec<Msg>,
        mmsg: Option<u64>,
        caller_nosignal: bool,
    },
}

/// An address to hand the kernel, with what keeps it valid.
struct Addr {
    bytes: Vec<u8>,
    /// The `O_PATH` descriptor `/proc/self/fd/N` in `bytes` names.
    _target: Option<OwnedFd>,
}

impl Addr {
    fn plain(bytes: Vec<u8>) -> Addr {
        Addr {
            bytes,
            _target: None,
        }
    }
}

/// One message to send, copied out of the caller.
struct Msg {
    name: Addr,
    data: Vec<u8>,
    control: Vec<u8>,
    /// Descriptors the control messages pass (the caller's, duplicated).
    _fds: Vec<OwnedFd>,
    flags: i32,
}

impl Broker {
    /// connect, bind, sendto, sendmsg, sendmmsg.
    pub(super) fn net(&mut self, n: &Notif, valid: &dyn Fn() -> bool) -> R<Reply> {
        let a = n.args;
        let c = self.caller(n)?;
        let sock = match self.caller_fd(n, &c, a[0] as i32) {
            Ok(fd) => fd,
            // A process the runtime started, before its exec: its report
            // on the setup channel goes as it is.
            Err(e) if self.runtime_before_exec(n.pid, e) => return Ok(Reply::Continue),
            Err(libc::ENOENT) => return Err(libc::EBADF),
            Err(e) => return Err(e),
        };
        let family = match rustix::net::sockopt::socket_domain(&sock) {
            Ok(f) => i32::from(f.as_raw()),
            Err(rustix::io::Errno::NOTSOCK) => return Err(libc::ENOTSOCK),
            Err(e) => return Err(errno(e)),
        };
        let stream = rustix::net::sockopt::socket_type(&sock)
            .map(|t| t == rustix::net::SocketType::STREAM)
            .map_err(errno)?;
        match i64::from(n.nr) {
            libc::SYS_connect => {
                let raw = self.sockaddr_arg(n, a[1], a[2])?;
                let addr = self.address(n, &c, family, raw, Use::Connect, valid)?;
                self.connect_now(n, c, sock, family, addr)
            }
            libc::SYS_bind => {
                let raw = self.sockaddr_arg(n, a[1], a[2])?;
                self.bind(n, &c, &sock, family, raw, valid)
            }
            libc::SYS_sendto => {
                let flags = a[3] as i32;
                let buf = Iovec {
                    base: a[1],
                    len: usize::try_from(a[2]).map_err(|_| libc::EINVAL)?,
                };
                let data = self.data_arg(n, &[buf], stream)?;
                let raw = self.sockaddr_arg(n, a[4], a[5])?;
                let name = self.address(n, &c, family, raw, Use::Send, valid)?;
                let msg = Msg {
                    name,
                    data,
                    control: Vec::new(),
                    _fds: Vec::new(),
                    flags,
                };
                self.send_now(n, c, sock, vec![msg], None)
            }
            libc::SYS_sendmsg => {
                let msg = self.msg_arg(n, &c, family, stream, a[1], a[2] as i32, valid)?;
                self.send_now(n, c, sock, vec![msg], None)
            }
            _ => {
                // sendmmsg(fd, msgvec, vlen, flags)
                let count = usize::try_from(a[2]).unwrap_or(MMSG_MAX).min(MMSG_MAX);
                let mut msgs = Vec::with_capacity(count);
                for i in 0..count {
                    let at = a[1].checked_add((i * MMSGHDR) as u64).ok_or(libc::EFAULT)?;
                    msgs.push(self.msg_arg(n, &c, family, stream, at, a[3] as i32, valid)?);
                }
                if msgs.is_empty() {
                    return Ok(Reply::Val(0));
                }
                self.send_now(n, c, sock, msgs, Some(a[1]))
            }
        }
    }

    fn sockaddr_arg(&self, n: &Notif, ptr: u64, len: u64) -> R<Vec<u8>> {
        if ptr == 0 || len == 0 {
            return Ok(Vec::new());
        }
        let len = usize::try_from(len).map_err(|_| libc::EINVAL)?;
        if len > sock::SOCKADDR_MAX {
            return Err(libc::EINVAL);
        }
        self.need_ptrace()?;
        self.read(n, ptr, len)
    }

    /// The bytes of `bufs`, joined; at most [`SEND_MAX`] (a stream send is
    /// cut there, a datagram refused).
    fn data_arg(&self, n: &Notif, bufs: &[Iovec], stream: bool) -> R<Vec<u8>> {
        self.need_ptrace()?;
        let mut out = Vec::new();
        for buf in bufs {
            let room = SEND_MAX - out.len();
            if buf.len > room && !stream {
                return Err(libc::EMSGSIZE);
            }
            let take = buf.len.min(room);
            if take > 0 {
                out.extend_from_slice(&self.read(n, buf.base, take)?);
            }
            if out.len() == SEND_MAX {
                break;
            }
        }
        Ok(out)
    }

    /// A `struct msghdr` at `ptr` and what it points to ([`decode`] checks
    /// its lengths).
    #[allow(clippy::too_many_arguments)]
    fn msg_arg(
        &mut self,
        n: &Notif,
        c: &Creds,
        family: i32,
        stream: bool,
        ptr: u64,
        flags: i32,
        valid: &dyn Fn() -> bool,
    ) -> R<Msg> {
        self.need_ptrace()?;
        let h = MsgHdr::decode(&self.read(n, ptr, MSGHDR)?)?;
        let bufs = if h.iov_len == 0 {
            Vec::new()
        } else {
            decode::iovecs(&self.read(n, h.iov, h.iov_len * decode::IOVEC_LEN)?)?
        };
        let data = self.data_arg(n, &bufs, stream)?;
        let mut control = if h.control == 0 || h.control_len == 0 {
            Vec::new()
        } else {
            self.read(n, h.control, h.control_len)?
        };
        let fds = self.pass_fds(c, &mut control)?;
        let raw = self.sockaddr_arg(n, h.name, h.name_len as u64)?;
        let name = self.address(n, c, family, raw, Use::Send, valid)?;
        Ok(Msg {
            name,
            data,
            control,
            _fds: fds,
            flags,
        })
    }

    /// Rewrites the descriptors of `SCM_RIGHTS` messages in `control` (the
    /// caller's numbers) as duplicates the supervisor holds.
    fn pass_fds(&self, c: &Creds, control: &mut [u8]) -> R<Vec<OwnedFd>> {
        let mut fds = Vec::new();
        for slot in decode::scm_rights(control)? {
            let num = decode::fd_at(control, slot);
            let fd =
                self.process_fd(c, num)
                    .map_err(|e| if e == libc::ENOENT { libc::EBADF } else { e })?;
            control[slot..slot + 4].copy_from_slice(&fd.as_raw_fd().to_ne_bytes());
            fds.push(fd);
        }
        Ok(fds)
    }

    /// Decides `raw` (an address for a socket of `family`) and returns what
    /// to hand the kernel.
    fn address(
        &mut self,
        n: &Notif,
        c: &Creds,
        family: i32,
        raw: Vec<u8>,
        what: Use,
        valid: &dyn Fn() -> bool,
    ) -> R<Addr> {
        if raw.is_empty() {
            return Ok(Addr::plain(raw));
        }
        match family {
            libc::AF_UNIX => self.unix_address(n, c, raw, what, valid),
            libc::AF_INET | libc::AF_INET6 => {
                let dest = inet_destination(family, what, &SockAddr::decode(&raw)?);
                if what != Use::Bind
                    && self.view.cfg.network == Network::Loopback
                    && !dest.is_loopback()
                    && self.learned.is_none()
                {
                    if self.log.allow() {
                        tracing::warn!(
                            "sandbox: denied {} to {dest} for pid {}: the sandbox's network is lo only",
                            super::syscall_name(n.nr),
                            n.pid
                        );
                    }
                    return Err(libc::ENETUNREACH);
                }
                Ok(Addr::plain(raw))
            }
            _ => Ok(Addr::plain(raw)),
        }
    }

    fn unix_address(
        &mut self,
        n: &Notif,
        c: &Creds,
        raw: Vec<u8>,
        what: Use,
        valid: &dyn Fn() -> bool,
    ) -> R<Addr> {
        let path = match SockAddr::decode(&raw)? {
            SockAddr::Unix(UnixAddr::Path { path, .. }) => path.to_vec(),
            SockAddr::Unix(UnixAddr::Abstract(_)) => return self.abstract_address(n, raw, what),
            // Not AF_UNIX (AF_UNSPEC: a disconnect), or unnamed (autobind):
            // the kernel resolves nothing.
            _ => return Ok(Addr::plain(raw)),
        };
        let abs = self.absolute(n, c, libc::AT_FDCWD as u64, &path)?;
        if !valid() {
            return Err(libc::ESRCH);
        }
        // Found first (a socket that is not there is ENOENT, as from the
        // kernel, without a denial), then decided for `w` on the path and
        // on what it resolved to.
        self.act_as(c, false)?;
        let r = self.lookup(n, &abs, false, Want::LOOKUP).and_then(|fd| {
            let st = rustix::fs::fstat(&fd).map_err(errno)?;
            if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::Socket {
                return Err(libc::ECONNREFUSED);
            }
            self.decide(n, &abs, Want::WRITE)?;
            let canon = self.path_of(fd.as_fd())?;
            self.decide(n, &canon, Want::WRITE)?;
            Ok(fd)
        });
        self.restore()?;
        let fd = r?;
        let via = format!("self/fd/{}", fd.as_raw_fd());
        Ok(Addr {
            bytes: sockaddr_un(via.as_bytes())?,
            _target: Some(fd),
        })
    }

    /// An abstract name: in the socket's network namespace, the host's
    /// when the sandbox shares it (refused then).
    fn abstract_address(&mut self, n: &Notif, raw: Vec<u8>, what: Use) -> R<Addr> {
        if self.view.host_netns && self.learned.is_none() {
            if self.log.allow() {
                tracing::warn!(
                    "sandbox: denied {} to an abstract unix socket for pid {}: the sandbox shares the host's network namespace",
                    super::syscall_name(n.nr),
                    n.pid
                );
            }
            return Err(if what == Use::Bind {
                libc::EACCES
            } else {
                libc::ECONNREFUSED
            });
        }
        Ok(Addr::plain(raw))
    }

    fn bind(
        &mut self,
        n: &Notif,
        c: &Creds,
        sock: &OwnedFd,
        family: i32,
        raw: Vec<u8>,
        valid: &dyn Fn() -> bool,
    ) -> R<Reply> {
        let path = match SockAddr::decode(&raw)? {
            SockAddr::Unix(UnixAddr::Path { path, .. }) if family == libc::AF_UNIX => path.to_vec(),
            _ => Vec::new(),
        };
        if path.is_empty() {
            let addr = self.address(n, c, family, raw, Use::Bind, valid)?;
            let c = c.clone();
            self.as_caller(&c, sock, |_| {
                sock::bind_raw(sock.as_fd(), &addr.bytes).map_err(io_errno)
            })?;
            return Ok(Reply::Val(0));
        }
        // A name in a directory: the parent checked (`w`) like any name the
        // workload creates.
        self.fresh_creds(n)?;
        let c = self.caller(n)?;
        let abs = self.absolute(n, &c, libc::AT_FDCWD as u64, &path)?;
        // A relative name is bound from the caller's working directory.
        let cwd = if path.first() != Some(&b'/') {
            let link = format!("{}/cwd", n.pid);
            Some(
                rustix::fs::openat(
                    &self.proc,
                    link.as_str(),
                    OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(errno)?,
            )
        } else {
            None
        };
        // The string the kernel resolves: the caller's own (`getsockname`
        // returns it), unless it names /proc/self, which means the caller.
        let bind_addr = if cwd.is_some() || abs == path {
            raw.clone()
        } else {
            sockaddr_un(&abs)?
        };
        if !valid() {
            return Err(libc::ESRCH);
        }
        self.act_as(&c, false)?;
        let checked = self.parent(n, &abs, Want::WRITE);
        self.restore()?;
        let (dir, name) = checked?;
        let proc_dir = self
            .proc
            .try_clone()
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
        self.as_caller(&c, sock, |_| {
            if let Some(cwd) = &cwd {
                rustix::process::fchdir(cwd).map_err(errno)?;
            }
            let r = sock::bind_raw(sock.as_fd(), &bind_addr).map_err(io_errno);
            if cwd.is_some() {
                rustix::process::fchdir(&proc_dir).map_err(errno)?;
            }
            r
        })?;
        // What was bound is the name checked (see the module's comment).
        let made = rustix::fs::statat(
            &dir,
            super::bytes_path(&name),
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        );
        if !made.is_ok_and(|st| {
            rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Socket
        }) {
            tracing::warn!(
                "sandbox: bind of {} for pid {} did not create the checked name",
                String::from_utf8_lossy(&abs),
                n.pid
            );
        }
        Ok(Reply::Val(0))
    }

    fn connect_now(
        &mut self,
        n: &Notif,
        c: Creds,
        sock: OwnedFd,
        family: i32,
        addr: Addr,
    ) -> R<Reply> {
        let blocking = !rustix::fs::fcntl_getfl(&sock)
            .map_err(errno)?
            .contains(OFlags::NONBLOCK);
        match self.try_connect(&c, &sock, &addr.bytes, blocking) {
            Ok(()) => Ok(Reply::Val(0)),
            Err(libc::EINPROGRESS | libc::EALREADY) if blocking => {
                self.deferred(n, c, sock, Op::Connecting)
            }
            Err(libc::EAGAIN) if blocking && family == libc::AF_UNIX => {
                self.deferred(n, c, sock, Op::Connect { addr })
            }
            Err(e) => Err(e),
        }
    }

    /// connect(2) as the caller, on a socket made non-blocking for the call
    /// when it blocks (its flags are the caller's open file's: restored).
    fn try_connect(&mut self, c: &Creds, sock: &OwnedFd, addr: &[u8], blocking: bool) -> R<()> {
        let fl = rustix::fs::fcntl_getfl(sock).map_err(errno)?;
        if blocking {
            rustix::fs::fcntl_setfl(sock, fl | OFlags::NONBLOCK).map_err(errno)?;
        }
        let r = self.as_caller(c, sock, |_| {
            sock::connect_raw(sock.as_fd(), addr).map_err(io_errno)
        });
        if blocking {
            rustix::fs::fcntl_setfl(sock, fl).map_err(errno)?;
        }
        r
    }

    fn send_now(
        &mut self,
        n: &Notif,
        c: Creds,
        sock: OwnedFd,
        msgs: Vec<Msg>,
        mmsg: Option<u64>,
    ) -> R<Reply> {
        let nonblock = rustix::fs::fcntl_getfl(&sock)
            .map_err(errno)?
            .contains(OFlags::NONBLOCK);
        let flags = msgs.first().map(|m| m.flags).unwrap_or(0);
        let blocking = !nonblock && flags & libc::MSG_DONTWAIT == 0;
        let caller_nosignal = flags & libc::MSG_NOSIGNAL != 0;
        match self.try_send(n.pid, &c, &sock, &msgs, mmsg, caller_nosignal)? {
            Some(r) => Ok(r),
            None if blocking => self.deferred(
                n,
                c,
                sock,
                Op::Send {
                    msgs,
                    mmsg,
                    caller_nosignal,
                },
            ),
            None => Err(libc::EAGAIN),
        }
    }

    /// Sends `msgs`; `None` when the first would block.
    fn try_send(
        &mut self,
        tid: u32,
        c: &Creds,
        sock: &OwnedFd,
        msgs: &[Msg],
        mmsg: Option<u64>,
        caller_nosignal: bool,
    ) -> R<Option<Reply>> {
        let mut sent = 0usize;
        let mut last: Option<R<usize>> = None;
        for (i, m) in msgs.iter().enumerate() {
            let r = self.as_caller(c, sock, |_| {
                sock::sendmsg_raw(
                    sock.as_fd(),
                    &m.name.bytes,
                    &[&m.data],
                    &m.control,
                    m.flags | libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
                .map_err(io_errno)
            });
            match r {
                Ok(len) => {
                    if let Some(vec) = mmsg {
                        let at = vec + (i * MMSGHDR + MSGHDR) as u64;
                        target::write_mem(tid, at, &(len as u32).to_ne_bytes())?;
                    }
                    sent += 1;
                    last = Some(Ok(len));
                }
                Err(e) => {
                    if e == libc::EPIPE && !caller_nosignal {
                        // As the kernel does for the sender.
                        signal_thread(tid, libc::SIGPIPE);
                    }
                    if sent == 0 {
                        if e == libc::EAGAIN {
                            return Ok(None);
                        }
                        return Ok(Some(Reply::Err(e)));
                    }
                    break;
                }
            }
        }
        Ok(Some(match (mmsg, last) {
            (Some(_), _) => Reply::Val(sent as i64),
            (None, Some(Ok(len))) => Reply::Val(len as i64),
            _ => Reply::Val(0),
        }))
    }

    fn deferred(&mut self, n: &Notif, c: Creds, sock: OwnedFd, op: Op) -> R<Reply> {
        if self.pending.len() >= PENDING_MAX {
            return Err(libc::EAGAIN);
        }
        Ok(Reply::Defer(Box::new(Deferred {
            sock,
            notify: None,
            id: n.id,
            tid: n.pid,
            creds: c,
            op,
        })))
    }

    /// Takes a deferred call (its notification came on `notify`).
    pub fn defer(&mut self, notify: std::os::fd::BorrowedFd<'_>, mut d: Deferred) {
        match notify.try_clone_to_owned() {
            Ok(fd) => {
                d.notify = Some(fd);
                self.pending.push(d);
            }
            Err(_) => {
                let _ = notify::send(notify, d.id, 0, libc::EAGAIN, 0);
            }
        }
    }

    /// The deferred calls, to poll.
    pub fn pending(&self) -> &[Deferred] {
        &self.pending
    }

    /// Tries the deferred calls again: those whose socket is `ready` (by
    /// index), and those the timer retries; answers the finished ones and
    /// drops those whose caller went away.
    pub fn progress(&mut self, ready: &[bool]) {
        let all = std::mem::take(&mut self.pending);
        for (i, mut d) in all.into_iter().enumerate() {
            let Some(nfd) = d.notify.take() else {
                continue;
            };
            if !notify::id_valid(nfd.as_fd(), d.id) {
                continue;
            }
            let (_, wait_out) = d.poll_on();
            if wait_out && !ready.get(i).copied().unwrap_or(false) {
                d.notify = Some(nfd);
                self.pending.push(d);
                continue;
            }
            let c = d.creds.clone();
            let done: R<Option<Reply>> = match &d.op {
                Op::Connecting => match rustix::net::sockopt::socket_error(&d.sock) {
                    Ok(Ok(())) => Ok(Some(Reply::Val(0))),
                    Ok(Err(e)) => Ok(Some(Reply::Err(errno(e)))),
                    Err(e) => Ok(Some(Reply::Err(errno(e)))),
                },
                Op::Connect { addr } => {
                    let bytes = addr.bytes.clone();
                    match self.try_connect(&c, &d.sock, &bytes, true) {
                        Ok(()) => Ok(Some(Reply::Val(0))),
                        Err(libc::EAGAIN) => Ok(None),
                        Err(libc::EINPROGRESS) => {
                            d.op = Op::Connecting;
                            Ok(None)
                        }
                        Err(e) => Ok(Some(Reply::Err(e))),
                    }
                }
                Op::Send {
                    msgs,
                    mmsg,
                    caller_nosignal,
                } => {
                    let (mmsg, nosig) = (*mmsg, *caller_nosignal);
                    let sock = d.sock.try_clone().map_err(|_| libc::EMFILE);
                    match sock {
                        Ok(s) => self.try_send(d.tid, &c, &s, msgs, mmsg, nosig),
                        Err(e) => Err(e),
                    }
                }
            };
            let reply = match done {
                Ok(Some(r)) => r,
                Ok(None) => {
                    d.notify = Some(nfd);
                    self.pending.push(d);
                    continue;
                }
                Err(e) => Reply::Err(e),
            };
            let sent = match reply {
                Reply::Val(v) => notify::send(nfd.as_fd(), d.id, v, 0, 0),
                Reply::Err(e) => notify::send(nfd.as_fd(), d.id, 0, e, 0),
                _ => notify::send(nfd.as_fd(), d.id, 0, libc::EIO, 0),
            };
            if let Err(e) = sent {
                if e.raw_os_error() != Some(libc::ENOENT) {
                    tracing::warn!("sandbox supervisor: cannot answer a deferred call: {e}");
                }
            }
        }
    }

    /// Runs `op` on `sock` with the caller's real and effective IDs (for a
    /// unix socket: its peer sees them), fs IDs, groups, umask and
    /// capabilities, then becomes the supervisor again (the saved
    /// IDs stay 0 for that). Fails closed: an identity that cannot be
    /// taken refuses the call; one that cannot be left ends the
    /// supervisor's work with EPERM on every later call.
    fn as_caller<T>(
        &mut self,
        c: &Creds,
        sock: &OwnedFd,
        op: impl FnOnce(&mut Self) -> R<T>,
    ) -> R<T> {
        use rustix::process::{Gid, Uid};
        let unix = rustix::net::sockopt::socket_domain(sock)
            .is_ok_and(|f| f == rustix::net::AddressFamily::UNIX);
        if !unix || (c.ruid == 0 && c.euid == 0 && c.rgid == 0 && c.egid == 0) {
            // Only a unix peer sees the sender's real and effective IDs;
            // for other sockets, or a caller with the supervisor's own
            // (the container's root), the fs identity, groups, umask and
            // capabilities are what matter, and `act_as` takes them
            // (cached).
            self.act_as(c, false)?;
            let r = op(self);
            self.restore()?;
            return r;
        }
        self.restore()?;
        self.identity = None;
        let groups: Vec<Gid> = c.groups.iter().map(|g| Gid::from_raw(*g)).collect();
        rustix::thread::set_thread_groups(&groups).map_err(|_| libc::EPERM)?;
        let taken = rustix::thread::set_thread_res_gid(
            Gid::from_raw(c.rgid),
            Gid::from_raw(c.egid),
            Gid::ROOT,
        )
        .and_then(|()| {
            rustix::thread::set_thread_res_uid(
                Uid::from_raw(c.ruid),
                Uid::from_raw(c.euid),
                Uid::ROOT,
            )
        });
        let r = match taken {
            Ok(()) => {
                nix::unistd::setfsgid(nix::unistd::Gid::from_raw(c.fsgid));
                nix::unistd::setfsuid(nix::unistd::Uid::from_raw(c.fsuid));
                let uid_now = nix::unistd::setfsuid(nix::unistd::Uid::from_raw(u32::MAX));
                let gid_now = nix::unistd::setfsgid(nix::unistd::Gid::from_raw(u32::MAX));
                let caps = CapabilitySet::from_bits_retain(c.cap_eff) & self.permitted;
                if uid_now.as_raw() != c.fsuid || gid_now.as_raw() != c.fsgid {
                    Err(libc::EPERM)
                } else {
                    rustix::thread::set_capabilities(
                        None,
                        CapabilitySets {
                            effective: caps,
                            permitted: self.permitted,
                            inheritable: CapabilitySet::empty(),
                        },
                    )
                    .map_err(|_| libc::EPERM)
                    .and_then(|()| {
                        if self.umask != c.umask {
                            rustix::process::umask(Mode::from_raw_mode(c.umask & 0o777));
                            self.umask = c.umask;
                        }
                        op(self)
                    })
                }
            }
            Err(_) => Err(libc::EPERM),
        };
        // Back: the saved IDs are 0, so these need no capability; the
        // effective set comes back as the permitted set, then the base.
        rustix::thread::set_thread_res_uid(Uid::ROOT, Uid::ROOT, Uid::ROOT)
            .map_err(|_| libc::EPERM)?;
        rustix::thread::set_thread_res_gid(Gid::ROOT, Gid::ROOT, Gid::ROOT)
            .map_err(|_| libc::EPERM)?;
        self.effective = CapabilitySet::all();
        self.restore()?;
        r
    }
}

fn io_errno(e: std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// Sends `sig` to thread `tid` (best effort: the thread may be gone).
fn signal_thread(tid: u32, sig: i32) {
    const PIDFD_THREAD: u32 = libc::O_EXCL as u32;
    let Some(pid) = i32::try_from(tid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return;
    };
    let Ok(fd) = rustix::process::pidfd_open(
        pid,
        rustix::process::PidfdFlags::from_bits_retain(PIDFD_THREAD),
    ) else {
        return;
    };
    if let Some(s) = rustix::process::Signal::from_named_raw(sig) {
        let _ = rustix::process::pidfd_send_signal(&fd, s);
    }
}
