//! The container's terminal: a pty allocated inside the container (from its
//! own devpts instance) whose master goes to the caller's `--console-socket`.
use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd};

use nix::fcntl::OFlag;
use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("cannot {step}")]
    Pty {
        step: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("cannot open pty slave {path}")]
    Slave {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot send the pty master to the console socket")]
    Send(#[source] nix::Error),
    #[error("cannot make the pty the controlling terminal")]
    Ctty(#[source] std::io::Error),
}

fn pty(step: &'static str) -> impl FnOnce(nix::Error) -> ConsoleError {
    move |source| ConsoleError::Pty { step, source }
}

/// Allocates a pty, sends its master over `socket`, and makes the slave this
/// process's stdio and controlling terminal (the caller is a session leader).
pub fn setup_pty(socket: BorrowedFd) -> Result<(), ConsoleError> {
    let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)
        .map_err(pty("open /dev/ptmx"))?;
    grantpt(&master).map_err(pty("grant the pty"))?;
    unlockpt(&master).map_err(pty("unlock the pty"))?;
    let name = ptsname_r(&master).map_err(pty("name the pty"))?;
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(&name)
        .map_err(|source| ConsoleError::Slave {
            path: name.clone(),
            source,
        })?;
    let fds = [master.as_raw_fd()];
    let iov = [IoSlice::new(name.as_bytes())];
    sendmsg::<()>(
        socket.as_raw_fd(),
        &iov,
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .map_err(ConsoleError::Send)?;
    drop(master);
    nix::unistd::dup2_stdin(&slave).map_err(pty("dup the pty to stdin"))?;
    nix::unistd::dup2_stdout(&slave).map_err(pty("dup the pty to stdout"))?;
    nix::unistd::dup2_stderr(&slave).map_err(pty("dup the pty to stderr"))?;
    rustix::process::ioctl_tiocsctty(std::io::stdin()).map_err(|e| ConsoleError::Ctty(e.into()))?;
    Ok(())
}

use std::os::unix::fs::OpenOptionsExt;
