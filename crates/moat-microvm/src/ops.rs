//! `start`, `kill`, `delete` and `exec` on an existing microVM container.
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use moat_core::runtime::{ExecOptions, RuntimeError};
use moat_core::state::ContainerStatus;
use oci_spec::runtime::Process;

use crate::control::{self, Reply, Request};
use crate::{proto, wrong, MicrovmError, MicrovmTier};

fn reply_error(message: String, exec_status: Option<u8>) -> RuntimeError {
    match exec_status {
        Some(status) => RuntimeError::ExecFailed { status, message },
        None => MicrovmError::Vmm(message).into(),
    }
}

impl MicrovmTier {
    pub(crate) fn start_vm(&self, id: &str) -> Result<(), RuntimeError> {
        let _lock = self.sd.lock(id)?;
        let c = self.current(id)?;
        if c.status != ContainerStatus::Created {
            return Err(wrong(id, c.status, "it must be created to start"));
        }
        let path = self.control_path(&c.state)?;
        let (_sock, reply) =
            control::call(&path, &Request::Start, &[]).map_err(MicrovmError::from)?;
        match reply {
            Reply::Ok => {
                let mut st = c.state;
                st.status = ContainerStatus::Running;
                self.sd.save(&st)?;
                moat_container::lifecycle::run_poststart(&st);
                Ok(())
            }
            Reply::Error {
                message,
                exec_status,
            } => Err(reply_error(message, exec_status)),
            Reply::Exit { .. } => Err(MicrovmError::Vmm("unexpected reply to start".into()).into()),
        }
    }

    pub(crate) fn kill_vm(&self, id: &str, signal: i32, all: bool) -> Result<(), RuntimeError> {
        let c = self.current(id)?;
        let sig = nix::sys::signal::Signal::try_from(signal)
            .map_err(|_| RuntimeError::Invalid(format!("unknown signal {signal}")))?;
        if c.status == ContainerStatus::Stopped || c.status == ContainerStatus::Creating {
            if all {
                return Ok(());
            }
            return Err(wrong(id, c.status, "it must be running to be signalled"));
        }
        if all || c.status == ContainerStatus::Paused {
            // Every process of the container: the VMM process (its PID
            // namespace, QEMU included, ends with it on SIGKILL; other
            // signals it forwards to the workload).
            return signal_pid(c.state.pid, sig);
        }
        let path = self.control_path(&c.state)?;
        match control::call(&path, &Request::Signal { signal }, &[]) {
            Ok((_, Reply::Ok)) => Ok(()),
            Ok((_, Reply::Error { message, .. })) => Err(MicrovmError::Vmm(message).into()),
            Ok(_) => Ok(()),
            // The VMM process ended between the status check and now.
            Err(_) if !Self::alive(&c.state) => Err(wrong(
                id,
                ContainerStatus::Stopped,
                "it must be running to be signalled",
            )),
            Err(e) => Err(MicrovmError::from(e).into()),
        }
    }

    pub(crate) fn delete_vm(&self, id: &str, force: bool) -> Result<(), RuntimeError> {
        let lock = self.sd.lock(id)?;
        let c = self.current(id)?;
        let alive = Self::alive(&c.state);
        if alive && !force && c.status != ContainerStatus::Created {
            return Err(wrong(id, c.status, "stop it or use --force"));
        }
        if alive {
            signal_pid(c.state.pid, nix::sys::signal::Signal::SIGKILL)?;
            wait_gone(&c.state);
        }
        let part = self.part(&c.state).unwrap_or_default();
        if let Some(rec) = &part.pod_link {
            // The VMM (the TAP's holder) is gone: the interface goes back
            // to its namespace. Kept for a retry unless forced.
            if let Err(e) = crate::podnet::release(rec) {
                if !force {
                    return Err(MicrovmError::from(e).into());
                }
                tracing::warn!("microvm: {}", moat_core::error_chain(&e));
            }
        }
        if let Some(j) = &part.joined {
            // Its stand-in is gone, and with it the container in the pod's
            // guest (the VMM process kills a process whose host end hung
            // up): the pod disk's space for its images goes back.
            crate::pod::release(&j.pod_disk, &j.regions);
            if let Some(share) = &j.share {
                crate::pod::remove_share(share);
            }
        }
        if let Some(stack) = &part.net_stack {
            // It ends with the VMM process; this is for one that did not.
            stack.kill();
        }
        if let Some(v) = &part.volumes {
            // It ends its group once the VMM process has ended; this is
            // for one that could not, and waits until none is left.
            v.kill();
        }
        if let Some(share) = &part.pod_share {
            // Its virtiofsd is gone with the volume server; what joined
            // containers left bound there (none, normally) goes too.
            crate::pod::remove_share(share);
        }
        if !part.cgroup.is_null() {
            if let Ok(cg) = moat_jail::cgroup::CgroupManager::from_saved(&part.cgroup) {
                // Whatever is left in it (nothing, normally) goes too.
                if let Ok(pids) = cg.pids() {
                    for p in pids {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(p),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
                let end = Instant::now() + Duration::from_secs(5);
                loop {
                    match cg.destroy() {
                        Ok(()) => break,
                        Err(e) if Instant::now() > end => return Err(MicrovmError::from(e).into()),
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            }
        }
        let sock_dir = if part.socket_dir.as_os_str().is_empty() {
            self.socket_dir(id)
        } else {
            part.socket_dir
        };
        let _ = std::fs::remove_dir_all(&sock_dir);
        if let Some(parent) = sock_dir.parent() {
            // The last container's leaves no empty directory behind.
            let _ = std::fs::remove_dir(parent);
        }
        if let Some(m) = &part.mirror {
            // The VMM is gone: what its guest mirrored goes to the root
            // while the engine still has it mounted.
            let cache = self.cache_dir();
            crate::layer::settle_at_delete(
                &cache.join(crate::layer::DIR),
                &cache,
                &m.layer,
                &m.rootfs,
            );
        }
        moat_container::lifecycle::run_poststop(&c.state);
        if let Some(slot) = &part.vmm_slot {
            release_slot(slot);
        }
        if let Some(slot) = &part.volume_slot {
            release_slot(slot);
        }
        self.sd.remove(id)?;
        drop(lock);
        Ok(())
    }

    pub(crate) fn exec_vm(
        &self,
        id: &str,
        process: &Process,
        opts: &ExecOptions,
    ) -> Result<i32, RuntimeError> {
        let c = self.current(id)?;
        if c.status != ContainerStatus::Running {
            return Err(wrong(id, c.status, "it must be running to exec"));
        }
        if opts.preserve_fds > 0 {
            return Err(RuntimeError::Invalid(
                "exec --preserve-fds: descriptors cannot be passed into a microVM".into(),
            ));
        }
        let terminal = process.terminal().unwrap_or(false);
        if opts.detach && terminal && opts.console_socket.is_none() {
            return Err(RuntimeError::Invalid(
                "a detached process with a terminal needs --console-socket".into(),
            ));
        }
        let (path, container) = self.exec_target(&c.state)?;
        let (rows, cols) = process
            .console_size()
            .as_ref()
            .map_or((0, 0), |b| (b.height() as u16, b.width() as u16));
        let mut process_json =
            serde_json::to_value(process).map_err(|e| RuntimeError::Invalid(e.to_string()))?;
        // As `create`: the limits the process leaves out are ours.
        crate::guestspec::inherit_rlimits(&mut process_json, &crate::guestspec::host_rlimits());
        let request = proto::ExecRequest {
            process: process_json,
            rows,
            cols,
            container,
        };
        crate::create::refuse_oversized("the process's arguments and environment", &request)?;
        // The process's stdio: a pty whose master goes to the console
        // socket, or our own descriptors.
        let mut pty_master = None;
        let stdio: Vec<OwnedFd> = if terminal && opts.console_socket.is_some() {
            let p = crate::create::host_pty()?;
            let s = p.slave;
            let v = vec![
                s.try_clone()
                    .map_err(MicrovmError::io("duplicate the pty"))?,
                s.try_clone()
                    .map_err(MicrovmError::io("duplicate the pty"))?,
                s,
            ];
            pty_master = Some(p.master);
            v
        } else {
            let dup = |fd: std::os::fd::BorrowedFd| {
                fd.try_clone_to_owned()
                    .map_err(MicrovmError::io("duplicate stdio"))
            };
            vec![
                dup(std::io::stdin().as_fd())?,
                dup(std::io::stdout().as_fd())?,
                dup(std::io::stderr().as_fd())?,
            ]
        };
        let fds: Vec<_> = stdio.iter().map(|f| f.as_fd()).collect();
        // Held from before the request: the agent answers once the process
        // runs, and the process may already have written (its output comes
        // straight through) when a signal for it arrives; pending, it is
        // forwarded once we wait (the agent keeps it until the PID is
        // known). Unblocked, it went to this process's own disposition.
        forwarded_mask()
            .thread_block()
            .map_err(|e| MicrovmError::io("block the forwarded signals")(e.into()))?;
        let raw = RawMode::enter(terminal && opts.console_socket.is_none());
        let (sock, reply) = control::call(
            &path,
            &Request::Exec {
                request,
                detach: opts.detach,
            },
            &fds,
        )
        .map_err(MicrovmError::from)?;
        drop(stdio);
        match reply {
            Reply::Ok => {}
            Reply::Error {
                message,
                exec_status,
            } => return Err(reply_error(message, exec_status)),
            Reply::Exit { code, .. } => return Ok(code),
        }
        if let (Some(m), Some(sockp)) = (pty_master, &opts.console_socket) {
            crate::create::send_console(sockp, m)?;
        }
        if opts.detach {
            // The process runs in the guest. A host process stands for it:
            // it waits for the process's end on the control connection and
            // exits with its status, so that whoever waits for the PID in
            // the pid file sees the exec end (containerd's shim runs every
            // exec detached and reaps that PID as the exec's). The VMM's
            // PID would stand for the container instead, and an exec
            // would never end (a CRI ExecSync hung until its timeout).
            let pid = stand_in(sock)?;
            if let Some(p) = &opts.pid_file {
                std::fs::write(p, pid.to_string())
                    .map_err(MicrovmError::io(format!("write {}", p.display())))?;
            }
            return Ok(0);
        }
        if let Some(p) = &opts.pid_file {
            // Attached: this runtime process ends with the exec's status,
            // but the PID that stands for the guest process is the VMM's.
            std::fs::write(p, c.state.pid.to_string())
                .map_err(MicrovmError::io(format!("write {}", p.display())))?;
        }
        let code = match wait_forwarding(sock.as_fd()) {
            Ok(Reply::Exit { code, .. }) => code,
            Ok(Reply::Error {
                message,
                exec_status,
            }) => return Err(reply_error(message, exec_status)),
            Ok(Reply::Ok) => 255,
            Err(control::ControlError::Closed) => 255,
            Err(e) => return Err(MicrovmError::from(e).into()),
        };
        drop(raw);
        Ok(code)
    }
}

/// Forks the host process that stands for a detached exec (see
/// [`MicrovmTier::exec_vm`]): it holds the control connection `sock` and
/// exits with the guest process's exit status (255 if the connection ends
/// without one). Its parent returns its PID.
fn stand_in(sock: OwnedFd) -> Result<i32, RuntimeError> {
    let fork = MicrovmError::io("fork the process that stands for the exec");
    let one = moat_sys::process::OneThread::check().map_err(fork)?;
    let blocked = BlockedForFork::new(false)?;
    let pid = one
        .fork(0, |_| {
            // None of `moat exec`'s stdio: its caller may read our output
            // to its end (containerd's shim does, before it takes a
            // terminal's console from the socket), and the stand-in lives
            // as long as the exec. Kept, they held the shim until the exec
            // ended, and an exec with a terminal waited for input that the
            // shim could not yet relay: `docker exec -it` and `kubectl exec
            // -it` hung, and the shim's other calls behind them.
            if stdio_to_null().is_err() {
                return 255;
            }
            match wait_forwarding(sock.as_fd()) {
                Ok(Reply::Exit { code, .. }) => code,
                _ => 255,
            }
        })
        .map_err(MicrovmError::io(
            "fork the process that stands for the exec",
        ))?;
    drop(blocked);
    drop(sock);
    Ok(pid)
}

/// The signals a stand-in passes on, blocked in this thread until
/// dropped: a stand-in forked meanwhile starts with them blocked, so one
/// sent at once waits for its signalfd instead of killing it (its end
/// then killed the guest process, which, before its runtime had written
/// its PID, lived on).
pub(crate) struct BlockedForFork(nix::sys::signal::SigSet);

impl BlockedForFork {
    pub(crate) fn new(with_winch: bool) -> Result<BlockedForFork, RuntimeError> {
        use nix::sys::signal::{SigSet, SigmaskHow, Signal};
        let mut mask = SigSet::empty();
        for s in moat_jail::supervise::FORWARDED {
            if with_winch || s != Signal::SIGWINCH {
                mask.add(s);
            }
        }
        let old = mask
            .thread_swap_mask(SigmaskHow::SIG_BLOCK)
            .map_err(MicrovmError::sys("block the signals a stand-in passes on"))?;
        Ok(BlockedForFork(old))
    }
}

impl Drop for BlockedForFork {
    fn drop(&mut self) {
        let _ = self.0.thread_set_mask();
    }
}

/// The signals an exec's host process passes on to the guest process
/// (not SIGWINCH: a terminal's size goes its own way).
fn forwarded_mask() -> nix::sys::signal::SigSet {
    use nix::sys::signal::{SigSet, Signal};
    let mut mask = SigSet::empty();
    for s in moat_jail::supervise::FORWARDED {
        if s != Signal::SIGWINCH {
            mask.add(s);
        }
    }
    mask
}

/// Waits for the guest process's end on its exec connection `sock`,
/// passing on the signals a runtime forwards as they arrive (a terminal's
/// size changes aside): an attached `moat exec` and the stand-in of a
/// detached one stand for the guest process, and a SIGTERM meant for it
/// used to end them instead, the guest process living on.
fn wait_forwarding(sock: std::os::fd::BorrowedFd) -> Result<Reply, control::ControlError> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use nix::sys::signalfd::{SfdFlags, SignalFd};
    let mask = forwarded_mask();
    let sys = |e: nix::Error| control::ControlError::Io(e.into());
    mask.thread_block().map_err(sys)?;
    let sfd =
        SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK).map_err(sys)?;
    loop {
        let mut fds = [
            PollFd::new(sock, PollFlags::POLLIN),
            PollFd::new(sfd.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::Error::EINTR) => {}
            Err(e) => return Err(sys(e)),
        }
        let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
        let (from_guest, signalled) = (ready(&fds[0]), ready(&fds[1]));
        if signalled {
            while let Ok(Some(info)) = sfd.read_signal() {
                // A connection already gone is seen below.
                let signal = info.ssi_signo as i32;
                let _ = control::send(sock, &Request::Signal { signal });
            }
        }
        if from_guest {
            return control::recv::<Reply>(sock);
        }
    }
}

/// Points this process's stdin, stdout and stderr at /dev/null.
fn stdio_to_null() -> nix::Result<()> {
    let null = nix::fcntl::open(
        "/dev/null",
        nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    nix::unistd::dup2_stdin(&null)?;
    nix::unistd::dup2_stdout(&null)?;
    nix::unistd::dup2_stderr(&null)
}

/// Releases a host ID block (the VMM's, the volumes') once nothing runs with its IDs: its allocation
/// file, if it still records the owner it was made for.
pub(crate) fn release_slot((slot, owner): &(u32, String)) {
    let path = moat_jail::idalloc::allocator_dir().join(format!("slot-{slot}"));
    if std::fs::read_to_string(&path).is_ok_and(|t| t.trim() == owner.trim()) {
        let _ = std::fs::remove_file(&path);
    }
}

fn signal_pid(pid: i32, sig: nix::sys::signal::Signal) -> Result<(), RuntimeError> {
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig) {
        Ok(()) | Err(nix::Error::ESRCH) => Ok(()),
        Err(e) => Err(MicrovmError::sys("signal the VMM process")(e).into()),
    }
}

/// Waits (bounded) for a killed VMM process to be gone; reaps it if it is
/// our child.
fn wait_gone(st: &moat_core::state::State) {
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end && MicrovmTier::alive(st) {
        let _ = nix::sys::wait::waitpid(
            nix::unistd::Pid::from_raw(st.pid),
            Some(nix::sys::wait::WaitPidFlag::WNOHANG),
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Our terminal in raw mode while an exec with a terminal uses it.
struct RawMode(Option<rustix::termios::Termios>);

impl RawMode {
    fn enter(want: bool) -> RawMode {
        let stdin = std::io::stdin();
        if !want || !rustix::termios::isatty(&stdin) {
            return RawMode(None);
        }
        let saved = rustix::termios::tcgetattr(&stdin).ok();
        if let Some(t) = &saved {
            let mut raw = t.clone();
            raw.make_raw();
            let _ = rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &raw);
        }
        RawMode(saved)
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            let _ = rustix::termios::tcsetattr(
                std::io::stdin(),
                rustix::termios::OptionalActions::Now,
                t,
            );
        }
    }
}
