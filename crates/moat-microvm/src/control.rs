//! The control socket: how `moat start`, `kill`, `exec` (and the runtime
//! that forked it) talk to a container's VMM process. A `SOCK_SEQPACKET`
//! unix socket in a root-only directory; one JSON message per packet, and
//! descriptors (an exec's stdio) one per packet as `SCM_RIGHTS`.
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use nix::sys::socket::{
    connect, sendmsg, socket, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr,
};
use serde::{Deserialize, Serialize};

/// Largest control message sent as one packet; a longer one goes in a
/// memfd passed with a [`LARGE`] packet (a unix socket's packet must fit
/// its send buffer, ~208 KiB by default: an exec whose environment was
/// larger failed with EMSGSIZE).
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Largest control message in all (an exec's process: its environment may
/// be what `execve` takes, 2 MiB with the default 8 MiB stack).
pub const MAX_LARGE: usize = crate::proto::MAX_REQUEST;
/// The body of the packet that carries a large message's memfd.
const LARGE: &[u8] = b"\0large";

/// A request to the VMM process.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    /// Run the container's process (OCI `start`).
    Start,
    /// Signal the container's process (in the guest).
    Signal { signal: i32 },
    /// Run a process; three descriptors follow (stdin, stdout, stderr).
    Exec {
        request: crate::proto::ExecRequest,
        detach: bool,
    },
    /// New limits for the container's cgroup in the guest (an OCI
    /// `linux.resources` object): applied there while it runs, or merged
    /// into the run's config before it starts.
    Update {
        resources: serde_json::Value,
        /// A container that joined this pod's guest (sent by its
        /// stand-in); `None` is the VMM's own.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        container: Option<String>,
    },
    /// Run a pod's container in this guest (the VMM process's is the
    /// pod's own): relayed as an exec's process, three descriptors
    /// following; sent by the host process that stands for it
    /// (`crate::pod`).
    Join { request: crate::proto::JoinRequest },
    /// The terminal's new size, for a joined container's process (its
    /// stand-in's terminal was resized).
    Resize { rows: u16, cols: u16 },
    /// Freeze (`on`) or thaw a joined container in the guest: its `pause`
    /// and `resume`. To the stand-in without `container`, which passes
    /// it on to the pod's VMM process naming itself.
    Freeze {
        on: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        container: Option<String>,
    },
}

/// The VMM process's answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Reply {
    /// Done (for exec: the process started).
    Ok,
    /// An exec'd process (or a joined container) ended with this status,
    /// after this many OOM kills in its cgroup in the guest.
    Exit {
        code: i32,
        #[serde(default, skip_serializing_if = "is_zero")]
        oom_kills: u64,
    },
    Error {
        message: String,
        exec_status: Option<u8>,
    },
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The setup channel's messages from the VMM process to the runtime that
/// forked it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Setup {
    /// The guest's agent answered (and, when asked to start at once, the
    /// container's process runs); how the guest started.
    Ready {
        start: StartKind,
        /// The container's process started in a container the snapshot
        /// held created (the guest agent's `Held`); only when asked to
        /// start at once.
        #[serde(default)]
        held: bool,
    },
    Failed {
        message: String,
        exec_status: Option<u8>,
    },
}

/// The setup channel's one message from the runtime to the VMM process:
/// it may boot (it is in its cgroup, the hooks ran).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Go {
    /// The guest's network, when the engine's hooks gave the VMM process's
    /// namespace an interface (`VmmPlan::own_tap`).
    #[serde(default)]
    pub net: Option<crate::proto::GuestNet>,
}

/// How a guest started, for the runtime to keep its snapshot cache right.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StartKind {
    /// Restored from the cached snapshot.
    Restored,
    /// Booted cold, and the booted guest was saved as the snapshot.
    Saved,
    /// Booted cold; why no snapshot was used or saved, and whether a
    /// snapshot that was offered failed to restore (the runtime removes it).
    Cold { why: String, restore_failed: bool },
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot connect to {path}")]
    Connect {
        path: String,
        #[source]
        source: nix::Error,
    },
    #[error("control socket")]
    Io(#[source] std::io::Error),
    #[error("bad control message: {0}")]
    Bad(String),
    #[error("the VMM process closed its control socket")]
    Closed,
}

/// Sends one message: one packet, or one memfd (see [`MAX_MESSAGE`]).
pub fn send<T: Serialize>(sock: BorrowedFd, msg: &T) -> Result<(), ControlError> {
    let body = serde_json::to_vec(msg).map_err(|e| ControlError::Bad(e.to_string()))?;
    if body.len() > MAX_MESSAGE {
        return send_large(sock, &body);
    }
    nix::sys::socket::send(sock.as_raw_fd(), &body, MsgFlags::MSG_NOSIGNAL)
        .map_err(|e| ControlError::Io(e.into()))?;
    Ok(())
}

/// Sends `body` in a memfd, read from its start by [`recv`].
fn send_large(sock: BorrowedFd, body: &[u8]) -> Result<(), ControlError> {
    use std::io::{Seek, Write};
    if body.len() > MAX_LARGE {
        return Err(ControlError::Bad(format!(
            "a request of {} MiB, over the {} MiB a microVM's VMM process takes",
            body.len() >> 20,
            MAX_LARGE >> 20
        )));
    }
    let io = |e: std::io::Error| ControlError::Io(e);
    let fd = rustix::fs::memfd_create("moat-control", rustix::fs::MemfdFlags::CLOEXEC)
        .map_err(|e| io(e.into()))?;
    let mut f = std::fs::File::from(fd);
    f.write_all(body).map_err(io)?;
    f.rewind().map_err(io)?;
    let fds = [f.as_raw_fd()];
    sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(LARGE)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(|e| io(e.into()))?;
    Ok(())
}

/// Sends one descriptor (with a one-byte body).
pub fn send_fd(sock: BorrowedFd, fd: BorrowedFd) -> Result<(), ControlError> {
    let fds = [fd.as_raw_fd()];
    sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(b"f")],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(|e| ControlError::Io(e.into()))?;
    Ok(())
}

/// Receives one message (blocking). EOF is [`ControlError::Closed`].
pub fn recv<T: serde::de::DeserializeOwned>(sock: BorrowedFd) -> Result<T, ControlError> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let (n, fd) = moat_sys::fd::recv_with_fd(sock, &mut buf).map_err(ControlError::Io)?;
    if n == 0 {
        return Err(ControlError::Closed);
    }
    let body = match fd {
        Some(fd) if &buf[..n] == LARGE => {
            use std::io::Read;
            let mut body = Vec::new();
            std::fs::File::from(fd)
                .take(MAX_LARGE as u64 + 1)
                .read_to_end(&mut body)
                .map_err(ControlError::Io)?;
            if body.len() > MAX_LARGE {
                return Err(ControlError::Bad("a message over the limit".into()));
            }
            body
        }
        Some(_) => return Err(ControlError::Bad("an unexpected descriptor".into())),
        None => buf[..n].to_vec(),
    };
    serde_json::from_slice(&body).map_err(|e| ControlError::Bad(e.to_string()))
}

/// Receives one descriptor.
pub fn recv_fd(sock: BorrowedFd) -> Result<OwnedFd, ControlError> {
    let mut buf = [0u8; 8];
    match moat_sys::fd::recv_with_fd(sock, &mut buf).map_err(ControlError::Io)? {
        (_, Some(fd)) => Ok(fd),
        (0, None) => Err(ControlError::Closed),
        _ => Err(ControlError::Bad("a descriptor was expected".into())),
    }
}

/// Connects to a VMM process's control socket.
pub fn connect_to(path: &Path) -> Result<OwnedFd, ControlError> {
    let err = |source| ControlError::Connect {
        path: path.display().to_string(),
        source,
    };
    let s = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(err)?;
    let addr = UnixAddr::new(path).map_err(err)?;
    connect(s.as_raw_fd(), &addr).map_err(err)?;
    Ok(s)
}

/// Sends `req` and waits for the first reply.
pub fn call(
    path: &Path,
    req: &Request,
    fds: &[BorrowedFd],
) -> Result<(OwnedFd, Reply), ControlError> {
    let s = connect_to(path)?;
    send(s.as_fd(), req)?;
    for fd in fds {
        send_fd(s.as_fd(), *fd)?;
    }
    let r = recv(s.as_fd())?;
    Ok((s, r))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (OwnedFd, OwnedFd) {
        nix::sys::socket::socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap()
    }

    #[test]
    fn messages_and_descriptors_cross_a_seqpacket_pair() {
        let (a, b) = pair();
        send(a.as_fd(), &Request::Signal { signal: 15 }).unwrap();
        let f = std::fs::File::open("/dev/null").unwrap();
        send_fd(a.as_fd(), f.as_fd()).unwrap();
        assert_eq!(
            recv::<Request>(b.as_fd()).unwrap(),
            Request::Signal { signal: 15 }
        );
        let fd = recv_fd(b.as_fd()).unwrap();
        assert!(fd.as_raw_fd() >= 0);
        send(
            b.as_fd(),
            &Reply::Exit {
                code: 3,
                oom_kills: 1,
            },
        )
        .unwrap();
        assert_eq!(
            recv::<Reply>(a.as_fd()).unwrap(),
            Reply::Exit {
                code: 3,
                oom_kills: 1
            }
        );
        drop(b);
        assert!(matches!(
            recv::<Reply>(a.as_fd()),
            Err(ControlError::Closed)
        ));
        // A message over a packet's size travels in a memfd, whole.
        let (a, b) = pair();
        let big = Request::Update {
            resources: serde_json::json!({"pad": "x".repeat(3 << 20)}),
            container: None,
        };
        send(a.as_fd(), &big).unwrap();
        assert_eq!(recv::<Request>(b.as_fd()).unwrap(), big);
        let huge = Request::Update {
            resources: serde_json::json!({"pad": "x".repeat(MAX_LARGE)}),
            container: None,
        };
        assert!(matches!(send(a.as_fd(), &huge), Err(ControlError::Bad(_))));
        // JSON shapes are stable: `moat` talks to VMM processes it started
        // before an upgrade.
        let j = serde_json::to_string(&Request::Start).unwrap();
        assert_eq!(j, r#"{"op":"start"}"#);
        let j = serde_json::to_string(&Reply::Exit {
            code: 0,
            oom_kills: 0,
        })
        .unwrap();
        assert_eq!(j, r#"{"exit":{"code":0}}"#);
    }
}
