//! A runtime process waiting for the child it started (the container's
//! process, a VMM, a supervisor): signals forwarded, a deadline, and a second
//! interrupt that kills everything.
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

/// Waits for `pid` (our child) while forwarding the usual terminating
/// signals to it; returns its exit status, 128+N for a signal.
pub fn wait_forwarding_signals(pid: i32) -> i32 {
    wait_supervised(pid, None, &|| {}).0
}

/// The signals `moat run` forwards to the workload ([`wait_supervised`],
/// and the pty proxy).
pub const FORWARDED: [Signal; 7] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
];

/// Blocks the forwarded signals in the calling thread, so that one arriving
/// before [`wait_supervised`] stays pending for it instead of killing the
/// runtime, after setting every disposition to its default: a signal
/// ignored by moat's caller (a shell's background job ignores SIGINT) would
/// be discarded, never forwarded. (Processes this one forks inherit the
/// mask; the container's process clears it before its exec.)
pub fn block_forwarded_signals() -> std::io::Result<()> {
    moat_sys::process::default_signal_dispositions()?;
    let mut set = nix::sys::signal::SigSet::empty();
    for s in FORWARDED {
        set.add(s);
    }
    nix::sys::signal::pthread_sigmask(nix::sys::signal::SigmaskHow::SIG_BLOCK, Some(&set), None)
        .map_err(std::io::Error::from)
}

/// [`wait_forwarding_signals`] plus an optional deadline in seconds, at which
/// `kill_all` runs (it should SIGKILL the whole container), and the same on a
/// second SIGINT/SIGTERM: the container's PID 1 ignores signals it has no
/// handler for, so forwarding alone may never end it. Returns the exit status
/// and whether the deadline fired.
pub fn wait_supervised(pid: i32, timeout: Option<u32>, kill_all: &dyn Fn()) -> (i32, bool) {
    use nix::sys::signal::{SigSet, SigmaskHow};
    let mut set = SigSet::empty();
    for s in FORWARDED {
        set.add(s);
    }
    set.add(Signal::SIGCHLD);
    set.add(Signal::SIGALRM);
    let mut old = SigSet::empty();
    let _ = nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), Some(&mut old));
    if let Some(t) = timeout {
        nix::unistd::alarm::set(t.max(1));
    }
    let target = Pid::from_raw(pid);
    let mut timed_out = false;
    let mut interrupts = 0;
    let code = loop {
        match waitpid(target, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, c)) => break c,
            Ok(WaitStatus::Signaled(_, s, _)) => break 128 + s as i32,
            Ok(_) => {}
            Err(nix::Error::ECHILD) => break 255,
            Err(_) => {}
        }
        match set.wait() {
            Ok(Signal::SIGCHLD) => {}
            Ok(Signal::SIGALRM) if timeout.is_some() => {
                timed_out = true;
                kill_all();
            }
            Ok(s) => {
                if matches!(s, Signal::SIGINT | Signal::SIGTERM) {
                    interrupts += 1;
                }
                if interrupts >= 2 {
                    kill_all();
                } else {
                    let _ = kill(target, s);
                }
            }
            Err(_) => {}
        }
    };
    if timeout.is_some() {
        nix::unistd::alarm::cancel();
    }
    let _ = nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
    (code, timed_out)
}
