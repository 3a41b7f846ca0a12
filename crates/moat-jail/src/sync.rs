//! The setup channel between the runtime and a process it forks (a
//! container's init, exec's intermediate, a supervisor, a jailer): a
//! `SOCK_SEQPACKET` socketpair carrying small tagged messages, typed errors
//! ([`RemoteError`]: the child's whole cause chain with each errno, so the
//! user sees what failed and why), and file descriptors (the pty master,
//! the seccomp notify fd).
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

use std::path::Path;

use nix::sys::socket::{
    sendmsg, socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType,
};
use rustix::net::{
    accept_with, bind, connect, socket_with, AddressFamily as RxAf, SocketAddrUnix,
    SocketFlags as RxFlags, SocketType as RxType,
};

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("cannot create setup channel")]
    Create(#[source] nix::Error),
    #[error("setup channel send failed")]
    Send(#[source] nix::Error),
    #[error("setup channel receive failed")]
    Recv(#[source] nix::Error),
    #[error("container process exited during setup")]
    Eof,
    #[error("garbled setup message")]
    Garbled,
    #[error("unexpected setup message {got:?} (expected {expected})")]
    Unexpected { got: Msg, expected: &'static str },
    /// The other side failed and said why.
    #[error(transparent)]
    Child(RemoteError),
}

/// Bounds of a [`RemoteError`] on the wire: it must fit one message of the
/// channel, whatever the failing child put in it (paths from the config,
/// a hook's output).
const MAX_MESSAGE: usize = 512;
const MAX_DEPTH: usize = 8;
/// The receive buffer: one message, an encoded [`RemoteError`] included.
const RECV_BUF: usize = 8192;

/// An error from a forked process, sent over the setup channel: one level
/// of its cause chain (outermost first), with the errno when that level was
/// an OS error. Its `source()` is the next level, so the parent prints and
/// inspects the chain as if it were its own.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RemoteError {
    pub message: String,
    pub errno: Option<i32>,
    /// Set when the workload's program could not be executed: what a shell
    /// would exit with (127 not found, 126 not executable).
    pub exec_status: Option<u8>,
    pub cause: Option<Box<RemoteError>>,
}

impl std::fmt::Display for RemoteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for RemoteError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause.as_deref().map(|c| c as _)
    }
}

impl RemoteError {
    /// `e` and its causes, bounded in length and depth.
    pub fn new(e: &(dyn std::error::Error + 'static)) -> RemoteError {
        let mut levels = Vec::new();
        let mut cur = Some(e);
        while let Some(c) = cur {
            if levels.len() == MAX_DEPTH {
                break;
            }
            levels.push((bounded(c.to_string()), errno_of(c)));
            cur = c.source();
        }
        let mut out: Option<Box<RemoteError>> = None;
        for (message, errno) in levels.into_iter().rev() {
            out = Some(Box::new(RemoteError {
                message,
                errno,
                exec_status: None,
                cause: out,
            }));
        }
        out.map(|b| *b).unwrap_or_else(|| RemoteError {
            message: String::new(),
            errno: None,
            exec_status: None,
            cause: None,
        })
    }

    /// The exec of the workload's program failed with `e`.
    pub fn exec(status: u8, e: &(dyn std::error::Error + 'static)) -> RemoteError {
        RemoteError {
            exec_status: Some(status),
            ..RemoteError::new(e)
        }
    }

    /// One level: the whole chain's text in printable ASCII, bounded.
    fn flattened(&self) -> RemoteError {
        let text: String = moat_core::error_chain(self)
            .chars()
            .map(|c| {
                if c.is_ascii_graphic() || c == ' ' {
                    c
                } else {
                    '?'
                }
            })
            .collect();
        RemoteError {
            message: bounded(text),
            errno: self.errno(),
            exec_status: self.exec_status,
            cause: None,
        }
    }

    /// The errno of the deepest level that has one.
    pub fn errno(&self) -> Option<i32> {
        let deeper = self.cause.as_ref().and_then(|c| c.errno());
        deeper.or(self.errno)
    }
}

fn bounded(mut s: String) -> String {
    if s.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str("...");
    }
    s
}

fn errno_of(e: &(dyn std::error::Error + 'static)) -> Option<i32> {
    if let Some(io) = e.downcast_ref::<std::io::Error>() {
        return io.raw_os_error();
    }
    if let Some(n) = e.downcast_ref::<nix::Error>() {
        return Some(*n as i32);
    }
    e.downcast_ref::<rustix::io::Errno>()
        .map(|r| r.raw_os_error())
}

/// Messages on the setup channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    /// Parent -> child: cgroup joined and ID maps written; go on.
    Go,
    /// Child (intermediate) -> parent: the container process's PID.
    Pid(i32),
    /// Child -> parent: write my uid/gid maps now.
    MapIds,
    /// Child -> parent: mounts done; run prestart/createRuntime hooks.
    RuntimeHooks,
    /// Child -> parent: the container is created and waits for start.
    Created,
    /// Child -> parent, after the parent recorded the created container
    /// (and said `Go`): the parent-death signal is as it stays until start
    /// (kept for a runtime that supervises the container, cleared
    /// otherwise); the parent may exit.
    Ready,
    /// Parent -> child: start the user process.
    Start,
    /// Parent -> child: start the user process with these arguments,
    /// environment and working directory instead of the config's (a
    /// container created ahead of its workload: the microvm tier's
    /// prepared guest). At most [`MAX_OVERRIDE`] bytes encoded.
    StartWith(ProcessOverride),
    /// Child -> parent: a file descriptor follows (pty master or seccomp notify fd).
    Fd(FdKind),
    /// Either way: setup failed (or the exec of the program did), typed.
    Error(RemoteError),
    /// Child -> parent, under `--debug` only: the init's steps so far and
    /// their durations in µs (`moat_core::steps`).
    Steps(Vec<(String, u64)>),
    /// Parent -> child, with one descriptor: a cgroup file the parent
    /// opened (a v1 `tasks` or a `cgroup.procs`); the child writes "0" to
    /// it, moving itself. One per file, back to back, `last` on the final
    /// one; the child answers once, after that one: `Joined`, or `Error`
    /// with the first failure.
    Join { last: bool },
    /// Child -> parent: every file of the `Join`s is joined.
    Joined,
}

/// What [`Msg::StartWith`] replaces in the config's process.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcessOverride {
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    pub cwd: String,
}

/// The largest encoded [`Msg::StartWith`] a channel carries (one message
/// fits in the receive buffer).
pub const MAX_OVERRIDE: usize = RECV_BUF - 1;

impl ProcessOverride {
    /// Whether it fits in one [`Msg::StartWith`].
    pub fn fits(&self) -> bool {
        serde_json::to_vec(self).is_ok_and(|v| v.len() < MAX_OVERRIDE)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdKind {
    Seccomp,
    /// The TAP device of moat's user-space network, made by the init.
    Tap,
}

/// One end of the setup channel.
#[derive(Debug)]
pub struct Channel {
    fd: OwnedFd,
}

/// A seqpacket socket listening at `path`, reachable only by root (mode 0600).
pub fn listen(path: &Path) -> std::io::Result<OwnedFd> {
    let fd = socket_with(RxAf::UNIX, RxType::SEQPACKET, RxFlags::CLOEXEC, None)?;
    bind(&fd, &SocketAddrUnix::new(path)?)?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    rustix::net::listen(&fd, 4)?;
    Ok(fd)
}

/// Creates a connected pair (both ends close-on-exec).
pub fn pair() -> Result<(Channel, Channel), SyncError> {
    let (a, b) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(SyncError::Create)?;
    Ok((Channel { fd: a }, Channel { fd: b }))
}

impl Msg {
    fn encode(&self) -> Vec<u8> {
        match self {
            Msg::Go => vec![b'G'],
            Msg::Pid(p) => {
                let mut v = vec![b'P'];
                v.extend_from_slice(&p.to_le_bytes());
                v
            }
            Msg::MapIds => vec![b'M'],
            Msg::RuntimeHooks => vec![b'H'],
            Msg::Created => vec![b'C'],
            Msg::Ready => vec![b'R'],
            Msg::Start => vec![b'S'],
            Msg::StartWith(o) => {
                let mut v = vec![b'O'];
                v.extend_from_slice(&serde_json::to_vec(o).unwrap_or_default());
                v
            }
            Msg::Fd(FdKind::Seccomp) => vec![b'F', b's'],
            Msg::Fd(FdKind::Tap) => vec![b'F', b't'],
            Msg::Join { last } => vec![b'J', u8::from(*last)],
            Msg::Joined => vec![b'j'],
            Msg::Steps(steps) => {
                let mut v = vec![b'T'];
                let n = steps.len().min(moat_core::steps::MAX_REMOTE_STEPS);
                v.extend_from_slice(&serde_json::to_vec(&steps[..n]).unwrap_or_default());
                v
            }
            Msg::Error(e) => {
                let mut v = vec![b'E'];
                // Plain data: serialization cannot fail. Escapes can still
                // make it too long for one message: then the outer level
                // alone, in plain ASCII.
                let mut json = serde_json::to_vec(e).unwrap_or_default();
                if json.len() >= RECV_BUF - 1 {
                    json = serde_json::to_vec(&e.flattened()).unwrap_or_default();
                }
                v.extend_from_slice(&json);
                v
            }
        }
    }

    fn decode(b: &[u8]) -> Option<Msg> {
        let (&tag, rest) = b.split_first()?;
        Some(match tag {
            b'G' => Msg::Go,
            b'P' => Msg::Pid(i32::from_le_bytes(rest.try_into().ok()?)),
            b'M' => Msg::MapIds,
            b'H' => Msg::RuntimeHooks,
            b'C' => Msg::Created,
            b'R' => Msg::Ready,
            b'S' => Msg::Start,
            b'O' => Msg::StartWith(serde_json::from_slice(rest).ok()?),
            b'F' if rest == b"s" => Msg::Fd(FdKind::Seccomp),
            b'F' if rest == b"t" => Msg::Fd(FdKind::Tap),
            b'J' if rest == [0] || rest == [1] => Msg::Join { last: rest == [1] },
            b'j' if rest.is_empty() => Msg::Joined,
            b'E' => Msg::Error(serde_json::from_slice(rest).ok()?),
            b'T' => Msg::Steps(serde_json::from_slice(rest).ok()?),
            _ => return None,
        })
    }
}

impl std::os::fd::AsFd for Channel {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Channel {
    pub fn from_fd(fd: OwnedFd) -> Channel {
        Channel { fd }
    }

    /// Connects to a `listen()`ing seqpacket socket at `path`.
    pub fn connect(path: &Path) -> std::io::Result<Channel> {
        let fd = socket_with(RxAf::UNIX, RxType::SEQPACKET, RxFlags::CLOEXEC, None)?;
        connect(&fd, &SocketAddrUnix::new(path)?)?;
        Ok(Channel { fd })
    }

    /// Accepts one connection on a listener made by [`listen`].
    pub fn accept(listener: &OwnedFd) -> std::io::Result<Channel> {
        loop {
            match accept_with(listener, RxFlags::CLOEXEC) {
                Ok(fd) => return Ok(Channel { fd }),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Whether every holder of the other end has closed it (the peer
    /// process died or exited), without waiting: a socketpair end reports
    /// `POLLHUP` then, queued messages or not.
    pub fn peer_closed(&self) -> bool {
        // A poll that fails cannot tell: treat the peer as gone (the
        // caller then stops, failing closed).
        moat_sys::fd::hung_up(self.fd.as_raw_fd()).unwrap_or(true)
    }

    pub fn send(&self, msg: &Msg) -> Result<(), SyncError> {
        self.send_with_fd(msg, None)
    }

    pub fn send_with_fd(&self, msg: &Msg, fd: Option<RawFd>) -> Result<(), SyncError> {
        let data = msg.encode();
        let iov = [IoSlice::new(&data)];
        let fds;
        let cmsgs: &[ControlMessage] = match fd {
            Some(f) => {
                fds = [f];
                &[ControlMessage::ScmRights(&fds)]
            }
            None => &[],
        };
        loop {
            match sendmsg::<()>(
                self.fd.as_raw_fd(),
                &iov,
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(_) => return Ok(()),
                Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(SyncError::Send(e)),
            }
        }
    }

    /// Receives one message (and any fd that came with it).
    pub fn recv_with_fd(&self) -> Result<(Msg, Option<OwnedFd>), SyncError> {
        let mut buf = vec![0u8; RECV_BUF];
        let (n, fd) = moat_sys::fd::recv_with_fd(self.fd.as_fd(), &mut buf).map_err(|e| {
            SyncError::Recv(nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
        })?;
        if n == 0 {
            return Err(SyncError::Eof);
        }
        let msg = Msg::decode(&buf[..n]).ok_or(SyncError::Garbled)?;
        Ok((msg, fd))
    }

    pub fn recv(&self) -> Result<Msg, SyncError> {
        Ok(self.recv_with_fd()?.0)
    }

    /// Receives and requires `want`; an `Error` from the other side becomes `SyncError::Child`.
    pub fn expect(&self, want: Msg, name: &'static str) -> Result<(), SyncError> {
        match self.recv()? {
            m if m == want => Ok(()),
            Msg::Error(e) => Err(SyncError::Child(e)),
            got => Err(SyncError::Unexpected {
                got,
                expected: name,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let (a, b) = pair().unwrap();
        for m in [
            Msg::Go,
            Msg::Pid(4242),
            Msg::Created,
            Msg::Join { last: false },
            Msg::Join { last: true },
            Msg::Joined,
            Msg::Start,
            Msg::StartWith(ProcessOverride {
                args: vec!["sh".into(), "-c".into(), "echo ü".into()],
                env: vec!["PATH=/bin".into()],
                cwd: "/work".into(),
            }),
            Msg::Error(RemoteError::new(&std::io::Error::from_raw_os_error(
                libc::EPERM,
            ))),
            Msg::Error(RemoteError::exec(
                127,
                &std::io::Error::from_raw_os_error(libc::ENOENT),
            )),
        ] {
            a.send(&m).unwrap();
            assert_eq!(b.recv().unwrap(), m);
        }
        assert!(!b.peer_closed());
        a.send(&Msg::Ready).unwrap();
        drop(a);
        assert!(b.peer_closed(), "a closed peer with a message queued");
        assert_eq!(b.recv().unwrap(), Msg::Ready);
        assert!(matches!(b.recv().unwrap_err(), SyncError::Eof));
    }

    #[test]
    fn an_override_fits_or_says_it_does_not() {
        let mut o = ProcessOverride {
            args: vec!["true".into()],
            env: vec![],
            cwd: "/".into(),
        };
        assert!(o.fits());
        o.env.push("X=".to_string() + &"y".repeat(MAX_OVERRIDE));
        assert!(!o.fits());
    }

    #[derive(Debug, thiserror::Error)]
    #[error("mount proc on /proc")]
    struct MountProc(#[source] nix::Error);

    #[test]
    fn child_error_surfaces_typed() {
        let (a, b) = pair().unwrap();
        a.send(&Msg::Error(RemoteError::new(&MountProc(nix::Error::EPERM))))
            .unwrap();
        let err = b.expect(Msg::Go, "go").unwrap_err();
        assert_eq!(
            moat_core::error_chain(&err),
            format!("mount proc on /proc: {}", nix::Error::EPERM)
        );
        let SyncError::Child(remote) = err else {
            panic!("not a child error: {err:?}")
        };
        assert_eq!(remote.errno(), Some(libc::EPERM));
        assert_eq!(remote.exec_status, None);
    }

    #[test]
    fn a_huge_error_still_fits_one_message() {
        let (a, b) = pair().unwrap();
        let long = std::io::Error::other("x".repeat(1 << 20));
        a.send(&Msg::Error(RemoteError::exec(126, &long))).unwrap();
        let Msg::Error(got) = b.recv().unwrap() else {
            panic!("not an error")
        };
        assert!(got.message.len() <= MAX_MESSAGE + 3);
        assert_eq!(got.exec_status, Some(126));
        // Control characters escape to six bytes each in JSON.
        let nasty = std::io::Error::other("\u{1}".repeat(1 << 16));
        let deep = RemoteError {
            cause: Some(Box::new(RemoteError::new(&nasty))),
            ..RemoteError::new(&nasty)
        };
        a.send(&Msg::Error(deep)).unwrap();
        assert!(matches!(b.recv().unwrap(), Msg::Error(_)));
    }

    #[test]
    fn passes_an_fd() {
        let (a, b) = pair().unwrap();
        let f = std::fs::File::open("/proc/self/status").unwrap();
        a.send_with_fd(&Msg::Fd(FdKind::Seccomp), Some(f.as_raw_fd()))
            .unwrap();
        let (m, fd) = b.recv_with_fd().unwrap();
        assert_eq!(m, Msg::Fd(FdKind::Seccomp));
        assert!(fd.is_some());
    }
}
