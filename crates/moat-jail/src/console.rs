//! The container's terminal: a pty allocated inside the container (from its
//! own devpts instance) whose master goes to the caller's `--console-socket`.
use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd};

use nix::fcntl::OFlag;
use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use oci_spec::runtime::Box;

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
    #[error("cannot set the pty's window size")]
    Size(#[source] std::io::Error),
}

fn pty(step: &'static str) -> impl FnOnce(nix::Error) -> ConsoleError {
    move |source| ConsoleError::Pty { step, source }
}

/// Allocates a pty, sends its master over `socket`, and makes the slave this
/// process's stdio and controlling terminal (the caller is a session leader).
pub fn setup_pty(socket: BorrowedFd, size: Option<Box>) -> Result<(), ConsoleError> {
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
    // The size is set before the workload can ask for it (runtime-spec
    // `process.consoleSize`); a runtime holding the master may change it.
    if let Some(b) = size {
        let ws = rustix::termios::Winsize {
            ws_row: u16::try_from(b.height()).unwrap_or(u16::MAX),
            ws_col: u16::try_from(b.width()).unwrap_or(u16::MAX),
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        rustix::termios::tcsetwinsize(&master, ws).map_err(|e| ConsoleError::Size(e.into()))?;
    }
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

/// Receives a pty master sent over a console socket (SCM_RIGHTS).
pub fn recv_master(socket: BorrowedFd) -> Result<std::os::fd::OwnedFd, ConsoleError> {
    let mut buf = [0u8; 4096];
    match moat_sys::fd::recv_with_fd(socket, &mut buf) {
        Ok((_, Some(fd))) => Ok(fd),
        Ok((_, None)) => Err(ConsoleError::Send(nix::Error::EBADMSG)),
        Err(e) => Err(ConsoleError::Send(nix::Error::from_raw(
            e.raw_os_error().unwrap_or(libc::EIO),
        ))),
    }
}

/// `moat run` with a terminal and no console socket: moat itself is the
/// terminal's other end. Copies stdin to the pty and the pty to stdout (the
/// caller's terminal in raw mode, with its window size followed), forwards
/// terminating signals to `pid`, and returns its exit status (128+N for a
/// signal) once it has exited and its output is drained.
pub fn proxy(master: std::os::fd::OwnedFd, pid: i32) -> i32 {
    proxy_until(master, pid, None, &|| {}).0
}

/// [`proxy`], and at `deadline` (if any), or on a second SIGINT/SIGTERM,
/// `kill_all` is called (it kills the container); the proxy goes on until
/// the process has exited. Returns the status and whether the deadline
/// passed.
pub fn proxy_until(
    master: std::os::fd::OwnedFd,
    pid: i32,
    deadline: Option<std::time::Instant>,
    kill_all: &dyn Fn(),
) -> (i32, bool) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use nix::sys::signal::{kill, pthread_sigmask, SigSet, SigmaskHow, Signal};
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    use std::io::{Read, Write};
    let stdin = std::io::stdin();
    let tty = rustix::termios::isatty(&stdin);
    let saved = tty
        .then(|| rustix::termios::tcgetattr(&stdin).ok())
        .flatten();
    if let Some(t) = &saved {
        let mut raw = t.clone();
        raw.make_raw();
        let _ = rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &raw);
        resize(&master);
    }
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    for s in crate::supervise::FORWARDED {
        set.add(s);
    }
    let mut old = SigSet::empty();
    let _ = pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), Some(&mut old));
    let sigfd =
        nix::sys::signalfd::SignalFd::with_flags(&set, nix::sys::signalfd::SfdFlags::SFD_CLOEXEC)
            .ok();
    let mut master_file = std::fs::File::from(master);
    let mut stdin_open = true;
    let mut master_open = true;
    let mut buf = [0u8; 16384];
    let target = nix::unistd::Pid::from_raw(pid);
    let mut timed_out = false;
    let mut interrupts = 0;
    let code = 'outer: loop {
        match waitpid(target, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, c)) => break c,
            Ok(WaitStatus::Signaled(_, s, _)) => break 128 + s as i32,
            Err(nix::Error::ECHILD) => break 255,
            _ => {}
        }
        let mut fds = Vec::with_capacity(3);
        if let Some(sfd) = &sigfd {
            fds.push(PollFd::new(sfd.as_fd(), PollFlags::POLLIN));
        }
        if master_open {
            fds.push(PollFd::new(master_file.as_fd(), PollFlags::POLLIN));
        }
        if stdin_open {
            fds.push(PollFd::new(stdin.as_fd(), PollFlags::POLLIN));
        }
        let wait = match deadline {
            Some(d) if !timed_out => {
                let left = d.saturating_duration_since(std::time::Instant::now());
                PollTimeout::try_from(left.as_millis().min(60_000) as i32 + 1)
                    .unwrap_or(PollTimeout::NONE)
            }
            _ => PollTimeout::NONE,
        };
        match poll(&mut fds, wait) {
            Ok(_) | Err(nix::Error::EINTR) => {}
            Err(_) => break 'outer 255,
        }
        if deadline.is_some_and(|d| !timed_out && std::time::Instant::now() >= d) {
            timed_out = true;
            kill_all();
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        let mut i = 0;
        if let Some(sfd) = &sigfd {
            if ready[i] {
                if let Ok(Some(info)) = sfd.read_signal() {
                    match Signal::try_from(info.ssi_signo as i32) {
                        Ok(Signal::SIGCHLD) => {}
                        Ok(Signal::SIGWINCH) => resize(master_file.as_fd()),
                        // As without a terminal (`wait_supervised`): the
                        // container's PID 1 ignores what it has no handler
                        // for, so the second interrupt kills everything.
                        Ok(s @ (Signal::SIGINT | Signal::SIGTERM)) => {
                            interrupts += 1;
                            if interrupts >= 2 {
                                kill_all();
                            } else {
                                let _ = kill(target, s);
                            }
                        }
                        Ok(s) => {
                            let _ = kill(target, s);
                        }
                        Err(_) => {}
                    }
                }
            }
            i += 1;
        }
        if master_open {
            if ready[i] {
                match master_file.read(&mut buf) {
                    Ok(0) | Err(_) => master_open = false,
                    Ok(n) => {
                        let mut out = std::io::stdout().lock();
                        let _ = out.write_all(&buf[..n]).and_then(|_| out.flush());
                    }
                }
            }
            i += 1;
        }
        if stdin_open && ready[i] {
            match std::io::stdin().lock().read(&mut buf) {
                Ok(0) | Err(_) => stdin_open = false,
                Ok(n) => {
                    if master_file.write_all(&buf[..n]).is_err() {
                        stdin_open = false;
                    }
                }
            }
        }
    };
    // Drain what the process wrote before it exited.
    if master_open {
        let _ = rustix::fs::fcntl_setfl(&master_file, rustix::fs::OFlags::NONBLOCK);
        let mut out = std::io::stdout().lock();
        while let Ok(n) = master_file.read(&mut buf) {
            if n == 0 || out.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = out.flush();
    }
    if let Some(t) = &saved {
        let _ = rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, t);
    }
    let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
    (code, timed_out)
}

/// Gives the pty our terminal's window size.
fn resize(master: impl AsFd) {
    if let Ok(ws) = rustix::termios::tcgetwinsize(std::io::stdin()) {
        let _ = rustix::termios::tcsetwinsize(master, ws);
    }
}

use std::os::fd::AsFd;
