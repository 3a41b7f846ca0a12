//! The setup channel between the runtime and a container process it forks: a
//! `SOCK_SEQPACKET` socketpair carrying small tagged messages, errors as text
//! (so the child's failure reaches the user with its whole cause chain), and
//! file descriptors (the pty master, the seccomp notify fd).
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use std::path::Path;

use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
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
    #[error("unexpected setup message {got:?} (expected {expected})")]
    Unexpected { got: Msg, expected: &'static str },
    #[error("{0}")]
    Child(String),
    /// The workload's program could not be executed; `status` is the
    /// shell's convention (127 not found, 126 not executable).
    #[error("{chain}")]
    ExecFailed { status: u8, chain: String },
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
    /// Parent -> child: start the user process.
    Start,
    /// Child -> parent: a file descriptor follows (pty master or seccomp notify fd).
    Fd(FdKind),
    /// Either way: setup failed, with the full error chain.
    Error(String),
    /// Child -> parent: the exec of the program failed (shell status, chain).
    ExecFailed(u8, String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdKind {
    Seccomp,
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
            Msg::Start => vec![b'S'],
            Msg::Fd(FdKind::Seccomp) => vec![b'F', b's'],
            Msg::Error(e) => {
                let mut v = vec![b'E'];
                v.extend_from_slice(e.as_bytes());
                v
            }
            Msg::ExecFailed(status, e) => {
                let mut v = vec![b'X', *status];
                v.extend_from_slice(e.as_bytes());
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
            b'S' => Msg::Start,
            b'F' if rest == b"s" => Msg::Fd(FdKind::Seccomp),
            b'E' => Msg::Error(String::from_utf8_lossy(rest).into_owned()),
            b'X' => {
                let (&status, text) = rest.split_first()?;
                Msg::ExecFailed(status, String::from_utf8_lossy(text).into_owned())
            }
            _ => return None,
        })
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
        let mut buf = vec![0u8; 8192];
        let mut cmsg = nix::cmsg_space!([RawFd; 1]);
        loop {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let r = recvmsg::<()>(
                self.fd.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            );
            let r = match r {
                Ok(r) => r,
                Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(SyncError::Recv(e)),
            };
            let n = r.bytes;
            let mut fd = None;
            if let Ok(cmsgs) = r.cmsgs() {
                for c in cmsgs {
                    if let ControlMessageOwned::ScmRights(fds) = c {
                        for f in fds {
                            let owned = own_fd(f);
                            if fd.is_none() {
                                fd = Some(owned);
                            }
                        }
                    }
                }
            }
            if n == 0 {
                return Err(SyncError::Eof);
            }
            let msg = Msg::decode(&buf[..n]).ok_or(SyncError::Unexpected {
                got: Msg::Error("garbage".into()),
                expected: "a message",
            })?;
            return Ok((msg, fd));
        }
    }

    pub fn recv(&self) -> Result<Msg, SyncError> {
        Ok(self.recv_with_fd()?.0)
    }

    /// Receives and requires `want`; an `Error` from the other side becomes `SyncError::Child`.
    pub fn expect(&self, want: Msg, name: &'static str) -> Result<(), SyncError> {
        match self.recv()? {
            m if m == want => Ok(()),
            Msg::Error(e) => Err(SyncError::Child(e)),
            Msg::ExecFailed(status, chain) => Err(SyncError::ExecFailed { status, chain }),
            got => Err(SyncError::Unexpected {
                got,
                expected: name,
            }),
        }
    }
}

fn own_fd(fd: RawFd) -> OwnedFd {
    moat_sys::fd::own(fd)
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
            Msg::Error("mount proc on /proc: EPERM".into()),
            Msg::ExecFailed(127, "executable \"x\" not found".into()),
        ] {
            a.send(&m).unwrap();
            assert_eq!(b.recv().unwrap(), m);
        }
        drop(a);
        assert!(matches!(b.recv().unwrap_err(), SyncError::Eof));
    }

    #[test]
    fn child_error_surfaces() {
        let (a, b) = pair().unwrap();
        a.send(&Msg::Error("boom".into())).unwrap();
        assert_eq!(b.expect(Msg::Go, "go").unwrap_err().to_string(), "boom");
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
