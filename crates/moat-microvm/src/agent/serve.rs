//! The agent's loop: frames from the host, output from the processes it
//! runs, and SIGCHLD (as PID 1 it reaps every orphan of the guest).
use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::{boot, pod, AgentError, GUEST_ID, GUEST_MOAT, GUEST_STATE_ROOT};
use crate::proto::{self, Decoder, Frame, Kind};

/// How long a process's output may stay open after it exited (a
/// background child holding the pipe) before its exit is reported anyway.
const DRAIN_GRACE: Duration = Duration::from_secs(2);
/// How long a forwarded connection's connect may take in the guest (to
/// one of the container's own addresses: answered at once, or refused).
const FORWARD_CONNECT: Duration = Duration::from_secs(5);
/// How long a SIGKILL for a process whose PID was not written yet spares
/// its runtime ([`Agent::deliver_pending`]).
const PENDING_GRACE: Duration = Duration::from_secs(5);
/// How long a joined container's `Started` waits for it to run.
const JOIN_START: Duration = Duration::from_secs(60);
/// How far the guest reads ahead on its disks, in KiB ([`set_read_ahead`]).
const READ_AHEAD_KIB: u32 = 1024;

struct Proc {
    pid: i32,
    /// Written without blocking (the agent must go on relaying the
    /// process's output while it does not read): what it has not taken
    /// yet waits in `pending`.
    stdin: Option<File>,
    pending: VecDeque<u8>,
    /// The host closed the process's stdin: closed here once `pending`
    /// is written.
    stdin_eof: bool,
    /// Stdin bytes written to the process (or dropped: its stdin is gone)
    /// and not yet credited back to the host. The host sends at most
    /// [`proto::STDIN_WINDOW`] uncredited bytes, so `pending` stays under
    /// that and the channel is always read.
    taken: u64,
    stdout: Option<File>,
    stderr: Option<File>,
    /// The pty master, for window sizes.
    tty: Option<OwnedFd>,
    status: Option<i32>,
    exited_at: Option<Instant>,
    main: bool,
    /// The container's runtime writes the limit events it read from the
    /// container's cgroup here before it exits ([`read_limits`]); none
    /// for an exec.
    limits: Option<File>,
    /// The container's runtime writes a byte here once the container is
    /// created and its process started (or closes it failing first): the
    /// run's `Started` waits for it, so an `exec` right after `start`
    /// finds the container.
    ready: Option<File>,
    /// A forwarded connection ([`Kind::Forward`]), not a process: `stdin`
    /// and `stdout` are its socket's two directions, `pid` is 0.
    socket: bool,
    /// A connection's bytes the host will still take (it credits them
    /// back as its end takes them): its socket is read only while some
    /// are left.
    out_credit: usize,
    /// A pod's container that joined this guest ([`Kind::Join`]): its ID
    /// in the guest (its runtime is the guest's `moat run --keep`).
    joined: Option<String>,
    /// Signals for an exec's (or a joined container's) process that came
    /// before its runtime wrote its PID: delivered once it has; since when.
    pending_signals: Vec<Signal>,
    pending_since: Option<Instant>,
}

impl Proc {
    /// A process with no stdio yet, not exited.
    fn new(pid: i32, main: bool) -> Proc {
        Proc {
            pid,
            stdin: None,
            pending: VecDeque::new(),
            stdin_eof: false,
            taken: 0,
            stdout: None,
            stderr: None,
            tty: None,
            status: None,
            exited_at: None,
            main,
            limits: None,
            ready: None,
            socket: false,
            out_credit: 0,
            joined: None,
            pending_signals: Vec::new(),
            pending_since: None,
        }
    }

    /// Done, for a connection: both directions ended.
    fn socket_done(&self) -> bool {
        self.socket && self.stdout.is_none() && self.stdin.is_none()
    }

    /// Writes what the process's stdin takes now of `pending`; closes it
    /// once all is written after the host's end of file, or when the
    /// process closed its end.
    fn write_stdin(&mut self) {
        let Some(f) = &mut self.stdin else {
            self.drop_pending();
            return;
        };
        while !self.pending.is_empty() {
            let (head, _) = self.pending.as_slices();
            match f.write(head) {
                Ok(n) => {
                    self.pending.drain(..n);
                    self.taken += n as u64;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.stdin = None;
                    self.drop_pending();
                    return;
                }
            }
        }
        if self.stdin_eof {
            if let (true, Some(f)) = (self.socket, &self.stdin) {
                // The host's end of file, passed on (the socket stays
                // open for reading).
                let _ = rustix::net::shutdown(f, rustix::net::Shutdown::Write);
            }
            self.stdin = None;
        }
    }

    /// Drops the stdin nobody will read, crediting it (the host goes on
    /// relaying, and the agent dropping, as a closed pipe's reader would
    /// make a writer stop: here the writer is the host's, which does not
    /// know).
    fn drop_pending(&mut self) {
        self.taken += self.pending.len() as u64;
        self.pending.clear();
    }

    /// The credit to send the host now, if any ([`proto::credit_due`]).
    fn credit_due(&mut self) -> Option<u64> {
        let due = proto::credit_due(self.taken, self.pending.is_empty());
        due.then(|| std::mem::take(&mut self.taken))
    }
}

/// `f` with O_NONBLOCK set (on its open file: a pty master's other
/// descriptors share it).
fn nonblocking(f: File) -> Result<File, AgentError> {
    let flags = rustix::fs::fcntl_getfl(&f).map_err(|e| AgentError::Io {
        step: "read a descriptor's flags".into(),
        source: e.into(),
    })?;
    rustix::fs::fcntl_setfl(&f, flags | rustix::fs::OFlags::NONBLOCK).map_err(|e| {
        AgentError::Io {
            step: "make a descriptor non-blocking".into(),
            source: e.into(),
        }
    })?;
    Ok(f)
}

pub struct Agent {
    chan: File,
    dec: Decoder,
    procs: BTreeMap<u32, Proc>,
    sigfd: SignalFd,
    prepared: bool,
    /// The run's writable layer is a disk (`RunRequest::scratch`, at
    /// [`RUN_RW`]): a pod's joined containers put theirs there too.
    rw_on_disk: bool,
    /// That disk outlives the VM (`RunRequest::keep_layer`): synced before
    /// the container's exit is reported.
    keep_layer: bool,
    /// Mirror the root's changes in that layer since this time (the
    /// host's `RunRequest::mirror_since`) to the host before the exit is
    /// reported; and the root's path.
    mirror: Option<(i64, String)>,
    /// Not at the exit (`RunRequest::mirror_at_pause_only`).
    mirror_at_exit: bool,
    /// The disks (and the writable root: lower layer, root) mounted
    /// before the snapshot was saved (`Prime`).
    primed: Option<Primed>,
    /// The container's own process ended: an exec has nothing to run in.
    main_done: bool,
    /// The container created before the snapshot was saved, waiting for
    /// its run's process ([`Held`]).
    held: Option<Held>,
    /// The run's channel, and whether it took the held container, while
    /// its `Started` waits for the runtime ([`Proc::ready`]).
    start_pending: Option<(u32, bool)>,
    /// Signals for the container's process and updates that came while it
    /// was being started: applied, in order, once it has.
    deferred: Vec<Deferred>,
    /// The pod's disk, once a container joined ([`pod::find_disk`]).
    pod_disk: Option<File>,
    /// Joined containers being started: channel → when their `Started`
    /// goes regardless ([`Agent::check_joins`]). The loop serves the
    /// others meanwhile.
    joins_starting: BTreeMap<u32, Instant>,
    /// Execs being started: channel → when their `Started` goes
    /// regardless ([`Agent::check_execs`]). One whose runtime ends before
    /// its process ran gets an `Error` instead ([`Agent::report_exits`]).
    execs_starting: BTreeMap<u32, Instant>,
    /// Evicts page cache nothing touched for a while, once the container
    /// runs (`RunRequest::reclaim_interval_ms`).
    reclaim: Option<super::reclaim::Reclaimer>,
}

/// What waits for the container's process to have started.
enum Deferred {
    /// A signal for it, on its channel.
    Signal(u32, i32),
    /// An update, on the update's channel.
    Update(u32, proto::UpdateRequest),
}

/// A container created ahead of its run (`Prime` with a warm-up): its
/// runtime, a fork of the agent, waits in
/// [`ContainerTier::launch_held`](moat_container::ContainerTier::launch_held)
/// for the run's arguments, environment and working directory; everything
/// else of the container (namespaces, cgroup, root, mounts, the seccomp
/// program) is done and in the snapshot. A run whose config differs in
/// anything else cancels it and creates its container as usual.
struct Held {
    /// The runtime's PID.
    pid: i32,
    /// Where the run's process goes (JSON, then closed); closed empty, it
    /// cancels.
    go: File,
    /// The container's stdin, stdout and stderr (our ends).
    stdio: [File; 3],
    /// Its limit events, once it ended (as [`Proc::limits`]).
    limits: File,
    /// A byte once the run's process started (as [`Proc::ready`]).
    started: File,
    /// The config it was created with.
    config: serde_json::Value,
}

fn io(step: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
    let step = step.into();
    move |source| AgentError::Io { step, source }
}

fn sys(step: impl Into<String>) -> impl FnOnce(nix::Error) -> AgentError {
    let step = step.into();
    move |source| AgentError::Sys { step, source }
}

impl Agent {
    pub fn new(chan: OwnedFd) -> Result<Agent, AgentError> {
        let mut mask = SigSet::empty();
        mask.add(Signal::SIGCHLD);
        mask.thread_block().map_err(|e| AgentError::Sys {
            step: "block SIGCHLD".into(),
            source: e,
        })?;
        let sigfd = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
            .map_err(|e| AgentError::Sys {
                step: "create a signalfd".into(),
                source: e,
            })?;
        Ok(Agent {
            chan: File::from(chan),
            dec: Decoder::for_requests(),
            procs: BTreeMap::new(),
            sigfd,
            prepared: false,
            rw_on_disk: false,
            keep_layer: false,
            mirror: None,
            mirror_at_exit: true,
            primed: None,
            main_done: false,
            held: None,
            start_pending: None,
            deferred: Vec::new(),
            pod_disk: None,
            joins_starting: BTreeMap::new(),
            execs_starting: BTreeMap::new(),
            reclaim: None,
        })
    }

    fn send(&mut self, frame: &[u8]) -> Result<(), AgentError> {
        self.chan.write_all(frame).map_err(io("write to the host"))
    }

    fn send_json<T: serde::Serialize>(
        &mut self,
        kind: Kind,
        chan: u32,
        msg: &T,
    ) -> Result<(), AgentError> {
        self.send(&proto::encode_json(kind, chan, msg))
    }

    /// Sends the mirror of what the container changed in its kept layer
    /// ([`Kind::Mirror`] frames): the host applies it to the container's
    /// root directory once the VM is gone. A failure is said on the
    /// console; the stream then lacks its end, and the host applies what
    /// came and asks for the same changes again next time.
    fn send_mirror(&mut self) {
        // Kept: a `pause` mirrors too, and the exit then sends again
        // what changed since the run began (the host's record moves on
        // only with what it applied).
        let Some((since, root)) = self.mirror.clone() else {
            return;
        };
        let upper = format!("{RUN_RW}/upper");
        // The walk buffers the records itself; large files' contents are
        // spliced (`MirrorFrames::send_file`).
        let mut out = MirrorFrames::new(&mut self.chan);
        let sent =
            crate::mirror::write_changes(Path::new(&upper), Path::new(&root), since, &mut out);
        match sent {
            Ok(w) => super::trace(&format!(
                "root mirrored: {} entries, {} bytes, {} skipped",
                w.entries, w.bytes, w.skipped
            )),
            Err(e) => eprintln!("moat-agent: cannot mirror the root's changes to the host: {e}"),
        }
    }

    pub fn serve(mut self) -> Result<(), AgentError> {
        let hello = hello();
        super::trace("hello");
        self.send_json(Kind::Hello, 0, &hello)?;
        let mut buf = vec![0u8; proto::MAX_DATA];
        loop {
            // Which fds are polled, in order: the channel, the signalfd, then
            // each process's stdout and stderr.
            let mut order: Vec<(u32, u8)> = Vec::new();
            let mut fds = vec![
                PollFd::new(self.chan.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.sigfd.as_fd(), PollFlags::POLLIN),
            ];
            for (id, p) in &self.procs {
                if let (Some(f), false) = (&p.stdin, p.pending.is_empty()) {
                    fds.push(PollFd::new(f.as_fd(), PollFlags::POLLOUT));
                    order.push((*id, 0));
                }
                if let (Some(f), true) = (&p.stdout, !p.socket || p.out_credit > 0) {
                    fds.push(PollFd::new(f.as_fd(), PollFlags::POLLIN));
                    order.push((*id, 1));
                }
                if let Some(f) = &p.stderr {
                    fds.push(PollFd::new(f.as_fd(), PollFlags::POLLIN));
                    order.push((*id, 2));
                }
                if let Some(f) = &p.ready {
                    fds.push(PollFd::new(f.as_fd(), PollFlags::POLLIN));
                    order.push((*id, 3));
                }
            }
            let timeout = if self.procs.values().any(|p| !p.pending_signals.is_empty())
                || !self.joins_starting.is_empty()
                || !self.execs_starting.is_empty()
            {
                Some(10u16)
            } else if self.procs.values().any(|p| p.status.is_some()) {
                Some(200)
            } else {
                None
            };
            // Woken for the reclaimer's next tick too.
            let due = self
                .reclaim
                .as_ref()
                .map(|r| u16::try_from(r.due_in().as_millis()).unwrap_or(u16::MAX));
            let timeout = PollTimeout::from(match (timeout, due) {
                (Some(t), Some(d)) => Some(t.min(d)),
                (t, d) => t.or(d),
            });
            match poll(&mut fds, timeout) {
                Ok(_) | Err(nix::Error::EINTR) => {}
                Err(e) => {
                    return Err(AgentError::Sys {
                        step: "poll".into(),
                        source: e,
                    })
                }
            }
            let ready: Vec<bool> = fds
                .iter()
                .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
                .collect();
            drop(fds);
            if ready[0] {
                let n = self.chan.read(&mut buf).map_err(io("read from the host"))?;
                if n == 0 {
                    return Ok(());
                }
                self.dec.push(&buf[..n]);
                while let Some(frame) = self.dec.next_frame()? {
                    if frame.kind == Kind::Shutdown {
                        return Ok(());
                    }
                    if frame.kind == Kind::Ping {
                        self.send_json(Kind::Hello, 0, &hello)?;
                        continue;
                    }
                    if frame.kind == Kind::Prime {
                        match frame
                            .json()
                            .map_err(AgentError::from)
                            .and_then(|r| self.prime(r))
                        {
                            Ok(()) => self.send_json(Kind::Hello, 0, &hello)?,
                            Err(e) => {
                                let msg = proto::ErrorMsg {
                                    message: moat_core::error_chain(&e),
                                    exec_status: None,
                                };
                                self.send_json(Kind::Error, 0, &msg)?
                            }
                        }
                        continue;
                    }
                    self.handle(frame)?;
                }
            }
            if ready[1] {
                while let Ok(Some(_)) = self.sigfd.read_signal() {}
                self.reap();
            }
            for (i, (id, which)) in order.into_iter().enumerate() {
                if ready[2 + i] && which == 3 {
                    // A byte (started) or the end (the runtime failed
                    // first; its exit follows, after this `Started`).
                    if let Some(p) = self.procs.get_mut(&id) {
                        p.ready = None;
                    }
                    self.started()?;
                } else if ready[2 + i] && which == 0 {
                    if let Some(p) = self.procs.get_mut(&id) {
                        p.write_stdin();
                    }
                    self.credit(id)?;
                } else if ready[2 + i] {
                    self.relay_output(id, which, &mut buf)?;
                }
            }
            self.deliver_pending();
            self.check_joins()?;
            self.check_execs()?;
            self.report_exits()?;
            if let Some(r) = &mut self.reclaim {
                if !r.tick_if_due() {
                    self.reclaim = None;
                }
            }
        }
    }

    /// Sends each starting joined container's `Started` once it runs (an
    /// exec right after `start` must find it), its runtime has ended (its
    /// `Exit` follows), or [`JOIN_START`] has passed.
    fn check_joins(&mut self) -> Result<(), AgentError> {
        if self.joins_starting.is_empty() {
            return Ok(());
        }
        self.reap();
        let tier = moat_container::ContainerTier::new(GUEST_STATE_ROOT, false);
        let now = Instant::now();
        let due: Vec<u32> = self
            .joins_starting
            .iter()
            .filter(|(chan, end)| {
                let p = self.procs.get(chan);
                let ended = p.is_none_or(|p| p.status.is_some());
                let runs = p.and_then(|p| p.joined.as_deref()).is_some_and(|id| {
                    moat_core::runtime::Lifecycle::state(&tier, id).is_ok_and(|c| {
                        !matches!(
                            c.status,
                            moat_core::state::ContainerStatus::Creating
                                | moat_core::state::ContainerStatus::Created
                        )
                    })
                });
                ended || runs || now >= **end
            })
            .map(|(chan, _)| *chan)
            .collect();
        for chan in due {
            self.joins_starting.remove(&chan);
            self.answer(chan, Ok(false))?;
        }
        Ok(())
    }

    /// Sends each starting exec's `Started` once its process runs: the
    /// guest's `moat exec` writes the PID file after the program was
    /// executed (as runc's, before it waits). Or after [`JOIN_START`].
    fn check_execs(&mut self) -> Result<(), AgentError> {
        if self.execs_starting.is_empty() {
            return Ok(());
        }
        let now = Instant::now();
        let due: Vec<u32> = self
            .execs_starting
            .iter()
            .filter(|(chan, end)| exec_pid(**chan).is_some() || now >= **end)
            .map(|(chan, _)| *chan)
            .collect();
        for chan in due {
            self.execs_starting.remove(&chan);
            self.answer(chan, Ok(false))?;
        }
        Ok(())
    }

    fn handle(&mut self, f: Frame) -> Result<(), AgentError> {
        match f.kind {
            Kind::Run => {
                let req: proto::RunRequest = f.json()?;
                match self.run(f.chan, &req) {
                    // `Started` once the runtime says so.
                    Ok(held) => {
                        self.start_pending = Some((f.chan, held));
                        Ok(())
                    }
                    r => self.answer(f.chan, r),
                }
            }
            // `Started` once its process runs ([`Agent::check_execs`]).
            Kind::Exec => {
                let req: proto::ExecRequest = f.json()?;
                match self.exec(f.chan, &req) {
                    Ok(()) => {
                        self.execs_starting
                            .insert(f.chan, Instant::now() + JOIN_START);
                        Ok(())
                    }
                    Err(e) => self.answer(f.chan, Err(e)),
                }
            }
            // `Started` once it runs ([`Agent::check_joins`]).
            Kind::Join => {
                let req: proto::JoinRequest = f.json()?;
                match self.join(f.chan, req) {
                    Ok(()) => {
                        self.joins_starting
                            .insert(f.chan, Instant::now() + JOIN_START);
                        Ok(())
                    }
                    Err(e) => self.answer(f.chan, Err(e)),
                }
            }
            Kind::Forward => {
                let req: proto::ForwardRequest = f.json()?;
                let r = self.forward(f.chan, req.addr).map(|()| false);
                self.answer(f.chan, r)
            }
            // The host took this many more of a connection's bytes.
            Kind::Credit => {
                let m: proto::CreditMsg = f.json()?;
                if let Some(p) = self.procs.get_mut(&f.chan).filter(|p| p.socket) {
                    let bytes = usize::try_from(m.bytes).unwrap_or(usize::MAX);
                    p.out_credit = p.out_credit.saturating_add(bytes).min(proto::STDIN_WINDOW);
                }
                Ok(())
            }
            Kind::Stdin => {
                if let Some(p) = self.procs.get_mut(&f.chan) {
                    if f.payload.is_empty() {
                        p.stdin_eof = true;
                    } else {
                        p.pending.extend(&f.payload);
                    }
                    p.write_stdin();
                }
                self.credit(f.chan)
            }
            Kind::Signal => {
                let m: proto::SignalMsg = f.json()?;
                if self.start_pending.is_some() && self.procs.get(&f.chan).is_some_and(|p| p.main) {
                    self.deferred.push(Deferred::Signal(f.chan, m.signal));
                } else {
                    self.signal(f.chan, m.signal);
                }
                Ok(())
            }
            Kind::Closed => {
                // Dropping the read end: the process's next write to it
                // fails (SIGPIPE, EPIPE), as it would on the host's pipe. A
                // terminal's output is its pty, which stays.
                let m: proto::ClosedMsg = f.json()?;
                if let Some(p) = self.procs.get_mut(&f.chan) {
                    if p.socket {
                        // The host's connection is gone: drop both ways.
                        p.stdout = None;
                        p.stdin = None;
                        p.drop_pending();
                    } else if p.tty.is_none() {
                        match m.stream {
                            1 => p.stdout = None,
                            2 => p.stderr = None,
                            _ => {}
                        }
                    }
                }
                Ok(())
            }
            Kind::Resize => {
                let m: proto::Resize = f.json()?;
                if let Some(p) = self.procs.get(&f.chan) {
                    if let Some(t) = &p.tty {
                        set_size(t, m.rows, m.cols);
                        let _ = nix::sys::signal::kill(Pid::from_raw(p.pid), Signal::SIGWINCH);
                    }
                }
                Ok(())
            }
            Kind::Update => {
                let req: proto::UpdateRequest = f.json()?;
                if self.start_pending.is_some() {
                    self.deferred.push(Deferred::Update(f.chan, req));
                    return Ok(());
                }
                self.apply_update(f.chan, &req)
            }
            // Kinds only the guest sends: ignored.
            _ => Ok(()),
        }
    }

    /// Tells the host how much more stdin process `id` may be sent, when
    /// enough was taken.
    fn credit(&mut self, id: u32) -> Result<(), AgentError> {
        match self.procs.get_mut(&id).and_then(Proc::credit_due) {
            Some(bytes) => self.send_json(Kind::Credit, id, &proto::CreditMsg { bytes }),
            None => Ok(()),
        }
    }

    /// `Started` (saying whether the held container started) or `Error`.
    fn answer(&mut self, chan: u32, r: Result<bool, AgentError>) -> Result<(), AgentError> {
        match r {
            Ok(held) => self.send_json(Kind::Started, chan, &proto::Started { held }),
            Err(e) => {
                let msg = proto::ErrorMsg {
                    message: moat_core::error_chain(&e),
                    exec_status: None,
                };
                self.send_json(Kind::Error, chan, &msg)
            }
        }
    }

    /// Sends the run's deferred `Started`, once.
    fn started(&mut self) -> Result<(), AgentError> {
        let Some((chan, held)) = self.start_pending.take() else {
            return Ok(());
        };
        super::trace("container started");
        self.answer(chan, Ok(held))?;
        for d in std::mem::take(&mut self.deferred) {
            match d {
                Deferred::Signal(chan, sig) => self.signal(chan, sig),
                Deferred::Update(chan, req) => self.apply_update(chan, &req)?,
            }
        }
        Ok(())
    }

    /// Applies an update and answers it on its channel.
    fn apply_update(&mut self, chan: u32, req: &proto::UpdateRequest) -> Result<(), AgentError> {
        let done = self.update(req);
        if done.is_ok() && req.mirror && req.freeze == Some(true) && req.container.is_none() {
            // Frozen: what it wrote so far, on the layer and to the host.
            sync_layer();
            self.send_mirror();
        }
        match done {
            Ok(()) => self.send_json(Kind::Updated, chan, &serde_json::json!({})),
            Err(e) => self.answer(chan, Err(e)),
        }
    }

    /// Prepares the container's root and files, then starts its process;
    /// whether that was the held container's.
    fn run(&mut self, chan: u32, req: &proto::RunRequest) -> Result<bool, AgentError> {
        if self.prepared {
            return Err(AgentError::Request("the container already runs".into()));
        }
        self.prepared = true;
        refresh(req)?;
        let mut config = req.config.clone();
        if let Some(net) = &req.net {
            super::net::setup(net)?;
            super::net::apply(&mut config, net);
        }
        let root = config["root"]["path"]
            .as_str()
            .ok_or_else(|| AgentError::Request("config has no root.path".into()))?
            .to_string();
        let overlay = req.overlay_root.clone().map(|lower| (lower, root.clone()));
        super::trace("run request");
        match &self.primed {
            None => {
                boot::load_modules(boot::LATE_MODULES)?;
                super::trace("late modules");
                let scratch = mount_disks(&req.disks, req.scratch.as_deref())?;
                if let Some((lower, root)) = &overlay {
                    // Its upper layer on the container's own disk, or in
                    // guest memory.
                    let upper = match &scratch {
                        Some(dev) => Upper::Disk(dev),
                        None => Upper::Memory,
                    };
                    mount_overlay_over(lower, root, RUN_RW, upper)?;
                    self.rw_on_disk = scratch.is_some();
                    self.keep_layer = req.keep_layer && scratch.is_some();
                    self.mirror = req
                        .mirror_since
                        .filter(|_| self.keep_layer)
                        .map(|since| (since, root.clone()));
                    self.mirror_at_exit = !req.mirror_at_pause_only;
                }
                super::trace("disks mounted");
                mount_volumes(&req.volumes, &config)?;
            }
            // The snapshot's identity holds the disks: a mismatch is a bug,
            // and the container must not see another run's files.
            Some((disks, primed_overlay))
                if *disks != req.disks || *primed_overlay != overlay || req.scratch.is_some() =>
            {
                return Err(AgentError::Request(
                    "the snapshot's disks are not this run's".into(),
                ))
            }
            // The volumes (hot-added) mounted over the empty shared
            // mounts `prime` made at their sources: a held container's
            // binds are their slaves, and see them.
            Some(_) => mount_volumes(&req.volumes, &config)?,
        }
        if overlay.is_some() {
            own_root(&root, &config)?;
        }
        self.reclaim = super::reclaim::Reclaimer::new(req.reclaim_interval_ms);
        if let Some(held) = self.held.take() {
            match held_process(&held.config, &config) {
                Ok(o) => {
                    write_files(&req.files, FILES)?;
                    self.start_held(chan, held, &o)?;
                    return Ok(true);
                }
                Err(why) => {
                    super::trace(&format!("held container not used: {why}"));
                    cancel_held(held);
                }
            }
        }
        write_files(&req.files, FILES)?;
        write_bundle(BUNDLE, &config)?;
        seed_seccomp(&config, req.seccomp.as_ref());
        let terminal = config["process"]["terminal"].as_bool().unwrap_or(false);
        self.spawn(chan, How::Run, terminal, (req.rows, req.cols), true)?;
        super::trace("container runtime forked");
        Ok(false)
    }

    /// Mounts a run's disks before the snapshot is saved (see
    /// [`proto::PrimeRequest`]): once, and before any run.
    fn prime(&mut self, req: proto::PrimeRequest) -> Result<(), AgentError> {
        if self.prepared || self.primed.is_some() {
            return Err(AgentError::Request("the guest is already prepared".into()));
        }
        boot::load_modules(boot::LATE_MODULES)?;
        mount_disks(&req.disks, None)?;
        if let Some((lower, root)) = &req.overlay {
            mount_overlay(lower, root, RUN_RW)?;
        }
        self.primed = Some((req.disks, req.overlay));
        if let Some(w) = &req.warm {
            placeholders(&w.config)?;
            // Only a cost saved: a container that cannot be held is warmed
            // up (created and deleted), and a warm-up that fails changes
            // nothing else.
            // The root's top is the container's root's before it is
            // created (as for a run's): it makes the mount points the
            // root's image lacks (a run's volumes').
            let owned = match self.primed.as_ref().and_then(|p| p.1.as_ref()) {
                Some((_, root)) => own_root(root, &w.config),
                None => Ok(()),
            };
            match owned
                .and_then(|()| volume_placeholders(&w.config))
                .and_then(|()| hold(w))
            {
                Ok(h) => self.held = Some(h),
                Err(e) => {
                    eprintln!("moat-agent: held container: {}", moat_core::error_chain(&e));
                    if let Err(e) = warm_up(w) {
                        eprintln!("moat-agent: warm-up: {}", moat_core::error_chain(&e));
                    }
                }
            }
        }
        Ok(())
    }

    /// Starts the held container with the run's process `o`: its runtime
    /// becomes the run's main process, its stdio ours.
    fn start_held(
        &mut self,
        chan: u32,
        held: Held,
        o: &moat_jail::sync::ProcessOverride,
    ) -> Result<(), AgentError> {
        let Held {
            pid,
            mut go,
            stdio: [stdin, stdout, stderr],
            limits,
            started,
            ..
        } = held;
        let body = serde_json::to_vec(o).unwrap_or_default();
        go.write_all(&body)
            .map_err(io("hand the run's process to the held container"))?;
        drop(go);
        let mut p = Proc::new(pid, true);
        p.stdin = Some(nonblocking(stdin)?);
        p.stdout = Some(stdout);
        p.stderr = Some(stderr);
        p.limits = Some(limits);
        p.ready = Some(started);
        self.procs.insert(chan, p);
        super::trace("held container started");
        Ok(())
    }

    /// Applies new limits to the container's cgroup (the guest's
    /// container tier's `update`).
    fn update(&self, req: &proto::UpdateRequest) -> Result<(), AgentError> {
        if !self.prepared || self.main_done {
            return Err(AgentError::Request("the container is not running".into()));
        }
        if let Some(on) = req.freeze {
            // A joined container's `pause`, `resume`; the guest's own only
            // to mirror its writes (it is frozen whole, on the host, too).
            if req.container.is_none() && self.mirror.is_none() {
                return Err(AgentError::Request(
                    "the guest's own container is paused on the host".into(),
                ));
            }
            let id = self.guest_container(req.container.as_deref())?;
            let tier = moat_container::ContainerTier::new(GUEST_STATE_ROOT, false);
            let done = if on {
                moat_core::runtime::Lifecycle::pause(&tier, id)
            } else {
                moat_core::runtime::Lifecycle::resume(&tier, id)
            };
            return done.map_err(|e| AgentError::Request(moat_core::error_chain(&e)));
        }
        let resources: oci_spec::runtime::LinuxResources =
            serde_json::from_value(req.resources.clone())
                .map_err(|e| AgentError::Request(format!("the new resources: {e}")))?;
        let id = self.guest_container(req.container.as_deref())?;
        let tier = moat_container::ContainerTier::new(GUEST_STATE_ROOT, false);
        moat_core::runtime::Lifecycle::update(&tier, id, &resources)
            .map_err(|e| AgentError::Request(moat_core::error_chain(&e)))
    }

    /// The guest's ID of `container`, a joined container running here;
    /// `None` names the guest's own.
    fn guest_container<'a>(&self, container: Option<&'a str>) -> Result<&'a str, AgentError> {
        match container {
            None => Ok(GUEST_ID),
            Some(c) if self.procs.values().any(|p| p.joined.as_deref() == Some(c)) => Ok(c),
            Some(c) => Err(AgentError::Request(format!(
                "no container {c} runs in this guest"
            ))),
        }
    }

    fn exec(&mut self, chan: u32, req: &proto::ExecRequest) -> Result<(), AgentError> {
        if !self.prepared || self.main_done {
            return Err(AgentError::Request("the container is not running".into()));
        }
        if chan == 0 || self.procs.contains_key(&chan) {
            return Err(AgentError::Request(format!("channel {chan} is in use")));
        }
        let id = self.guest_container(req.container.as_deref())?;
        let file = exec_file(chan, "json");
        let body = serde_json::to_vec(&req.process).unwrap_or_default();
        std::fs::write(&file, body).map_err(io(format!("write {file}")))?;
        let terminal = req.process["terminal"].as_bool().unwrap_or(false);
        let pid_file = exec_file(chan, "pid");
        let log = exec_file(chan, "log");
        let args = [
            "--root",
            GUEST_STATE_ROOT,
            "--log",
            log.as_str(),
            "--log-format",
            "json",
            "exec",
            "--process",
            file.as_str(),
            "--pid-file",
            pid_file.as_str(),
            id,
        ];
        self.spawn(
            chan,
            How::Exec(&args),
            terminal,
            (req.rows, req.cols),
            false,
        )
    }

    /// Runs a pod's container that joins this guest ([`Kind::Join`]): its
    /// disks (regions of the pod's disk), writable root and files under
    /// its own directory, in the namespaces the pod shares with the
    /// guest's own container, through the guest's `moat run --keep` (as an
    /// exec's `moat exec`: its status is the container's, signals pass on).
    fn join(&mut self, chan: u32, req: proto::JoinRequest) -> Result<(), AgentError> {
        if !self.prepared || self.main_done || self.start_pending.is_some() {
            return Err(AgentError::Request(
                "the pod's container is not running".into(),
            ));
        }
        if chan == 0 || self.procs.contains_key(&chan) {
            return Err(AgentError::Request(format!("channel {chan} is in use")));
        }
        let id = req.id.clone();
        if !pod::valid_id(&id) {
            return Err(AgentError::Request(format!("bad container ID {id:?}")));
        }
        let dir = proto::pod_dir(&id);
        if Path::new(&dir).exists() {
            return Err(AgentError::Request(format!(
                "container {id} already runs here"
            )));
        }
        let mut config = req.config;
        let root = config["root"]["path"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let inside = |p: &str| pod::under(p, &dir);
        if !inside(&root)
            || !req.disks.iter().all(|d| inside(&d.mount))
            || !req.files.iter().all(|f| inside(&f.path))
            || !req.overlay_root.as_deref().is_none_or(inside)
            || !req
                .pod_volumes
                .iter()
                .all(|v| pod::under(v, crate::guestspec::POD_VOLUMES))
        {
            return Err(AgentError::Request(format!(
                "container {id}'s paths are not all under {dir}"
            )));
        }
        let tier = moat_container::ContainerTier::new(GUEST_STATE_ROOT, false);
        let main = running_pid(&tier, GUEST_ID)
            .ok_or_else(|| AgentError::Request("the pod's container is not running".into()))?;
        if self.pod_disk.is_none() {
            boot::load_modules(pod::POD_MODULES)?;
            self.pod_disk = Some(pod::find_disk()?);
        }
        let prepared = (|| {
            for v in &req.pod_volumes {
                pod::make_volume(v)?;
            }
            if let Some(disk) = &self.pod_disk {
                pod::mount_regions(disk, &req.disks)?;
            }
            if let Some(lower) = &req.overlay_root {
                // On the pod's disk when its VM has one, else in memory.
                if self.rw_on_disk {
                    mount_overlay_over(lower, &root, &pod::joined_rw(&id), Upper::Dir)?;
                } else {
                    mount_overlay(lower, &root, &format!("{dir}/rw"))?;
                }
                own_root(&root, &config)?;
            }
            write_files(&req.files, &dir)?;
            // A namespace of another joined container (`kubectl debug
            // --target`), else the guest's own container's.
            let mut of = std::collections::BTreeMap::new();
            for (t, c) in &req.namespace_of {
                self.guest_container(Some(c))?;
                let pid = running_pid(&tier, c)
                    .ok_or_else(|| AgentError::Request(format!("container {c} is not running")))?;
                of.insert(t.clone(), pid);
            }
            pod::share_namespaces(&mut config, &req.pod_namespaces, |t| {
                of.get(t).copied().unwrap_or(main)
            });
            write_bundle(&format!("{dir}/bundle"), &config)?;
            seed_seccomp(&config, req.seccomp.as_ref());
            Ok::<(), AgentError>(())
        })();
        if let Err(e) = prepared {
            pod::clean_up(&dir);
            return Err(e);
        }
        let pid_file = exec_file(chan, "pid");
        let bundle = format!("{dir}/bundle");
        let args = [
            "--root",
            GUEST_STATE_ROOT,
            "run",
            "--keep",
            "--pid-file",
            pid_file.as_str(),
            "-b",
            bundle.as_str(),
            id.as_str(),
        ];
        let terminal = config["process"]["terminal"].as_bool().unwrap_or(false);
        let size = &config["process"]["consoleSize"];
        let size = (
            size["height"].as_u64().unwrap_or(0).min(u16::MAX.into()) as u16,
            size["width"].as_u64().unwrap_or(0).min(u16::MAX.into()) as u16,
        );
        if let Err(e) = self.spawn(chan, How::Exec(&args), terminal, size, false) {
            pod::clean_up(&dir);
            return Err(e);
        }
        if let Some(p) = self.procs.get_mut(&chan) {
            p.joined = Some(id);
        }
        Ok(())
    }

    /// Connects to `addr` inside the container's network namespace, for a
    /// connection made to the pod's `localhost` on the host
    /// ([`Kind::Forward`]), and relays it on channel `chan`.
    fn forward(&mut self, chan: u32, addr: std::net::SocketAddr) -> Result<(), AgentError> {
        if !self.prepared || self.main_done || self.start_pending.is_some() {
            return Err(AgentError::Request("the container is not running".into()));
        }
        if chan == 0 || self.procs.contains_key(&chan) {
            return Err(AgentError::Request(format!("channel {chan} is in use")));
        }
        let tier = moat_container::ContainerTier::new(GUEST_STATE_ROOT, false);
        let pid = running_pid(&tier, GUEST_ID)
            .ok_or_else(|| AgentError::Request("the container is not running".into()))?;
        let ns = File::open(format!("/proc/{pid}/ns/net"))
            .map_err(io("open the container's network namespace"))?;
        let stream = moat_net::in_netns(ns.as_fd(), || {
            std::net::TcpStream::connect_timeout(&addr, FORWARD_CONNECT)
        })
        .map_err(|e| AgentError::Request(format!("enter the container's network namespace: {e}")))?
        .map_err(io(format!("connect to {addr} in the container")))?;
        let sock = OwnedFd::from(stream);
        let mut p = Proc::new(0, false);
        p.socket = true;
        p.out_credit = proto::STDIN_WINDOW;
        p.stdin = Some(nonblocking(File::from(
            sock.try_clone().map_err(io("duplicate the connection"))?,
        ))?);
        p.stdout = Some(File::from(sock));
        self.procs.insert(chan, p);
        Ok(())
    }

    /// Runs the guest's moat with `args` (`How::Exec`), or the container
    /// itself in a fork of the agent (`How::Run`), its stdio pipes (or a
    /// pty) ours.
    fn spawn(
        &mut self,
        chan: u32,
        how: How<'_>,
        terminal: bool,
        size: (u16, u16),
        main: bool,
    ) -> Result<(), AgentError> {
        let mut p = Proc::new(0, main);
        // The child's stdin, stdout and stderr.
        let child: [OwnedFd; 3] = if terminal {
            let pty = nix::pty::openpty(None, None).map_err(|e| AgentError::Sys {
                step: "open a pty".into(),
                source: e,
            })?;
            set_size(&pty.master, size.0, size.1);
            let dup = |fd: &OwnedFd| fd.try_clone().map_err(io("duplicate the pty"));
            p.stdin = Some(nonblocking(File::from(dup(&pty.master)?))?);
            p.stdout = Some(File::from(dup(&pty.master)?));
            p.tty = Some(pty.master);
            [dup(&pty.slave)?, dup(&pty.slave)?, pty.slave]
        } else {
            let (in_r, in_w) = pipe()?;
            let (out_r, out_w) = pipe()?;
            let (err_r, err_w) = pipe()?;
            p.stdin = Some(nonblocking(File::from(in_w))?);
            p.stdout = Some(File::from(out_r));
            p.stderr = Some(File::from(err_r));
            [in_r, out_w, err_w]
        };
        p.pid = match how {
            How::Exec(args) => exec_moat(args, child)?,
            How::Run => match one_thread() {
                Some(one) => {
                    let (limits_r, limits_w) = pipe()?;
                    let (ready_r, ready_w) = pipe()?;
                    p.limits = Some(File::from(limits_r));
                    p.ready = Some(File::from(ready_r));
                    one.fork(0, |_| run_container(child, limits_w, ready_w))
                        // The child's ends are the child's (dropped here, in
                        // the agent, by the closure).
                        .map_err(io("fork the container's runtime"))?
                }
                // Not single-threaded (cannot happen: the agent's threads
                // are scoped): the guest's moat does it.
                None => exec_moat(
                    &[
                        "--root",
                        GUEST_STATE_ROOT,
                        "run",
                        "--keep",
                        "-b",
                        BUNDLE,
                        GUEST_ID,
                    ],
                    child,
                )?,
            },
        };
        self.procs.insert(chan, p);
        Ok(())
    }

    fn signal(&mut self, chan: u32, sig: i32) {
        let Ok(s) = Signal::try_from(sig) else { return };
        let Some(p) = self.procs.get(&chan).filter(|p| !p.socket) else {
            return;
        };
        if p.main {
            // The container's process itself (the guest's container tier
            // knows its PID), not the `moat run` that waits for it.
            let tier = moat_container::ContainerTier::new(GUEST_STATE_ROOT, false);
            let _ = moat_core::runtime::Lifecycle::kill(&tier, GUEST_ID, sig, false);
        } else {
            // The process itself (its PID, as the guest's runtime wrote
            // it), not the runtime: one just started may not yet pass
            // signals on (a SIGTERM killed the guest's `moat exec` and the
            // process lived on), and SIGKILL ends the runtime without a
            // word to the process. Before the PID is written the process
            // does not run yet: the signal waits for it.
            // A SIGKILL waits too, for the runtime not to die before it
            // wrote the PID of a process it made (which then lived on).
            let runtime = p.pid;
            match exec_pid(chan) {
                Some(pid) => {
                    let _ = nix::sys::signal::kill(Pid::from_raw(pid), s);
                    if s == Signal::SIGKILL {
                        let _ = nix::sys::signal::kill(Pid::from_raw(runtime), s);
                    }
                }
                None => {
                    if let Some(p) = self.procs.get_mut(&chan) {
                        p.pending_signals.push(s);
                        p.pending_since.get_or_insert_with(Instant::now);
                    }
                }
            }
        }
    }

    /// Delivers the signals that waited for their process's PID
    /// ([`Proc::pending_signals`]), or drops them once the runtime ended.
    fn deliver_pending(&mut self) {
        for (chan, p) in self.procs.iter_mut() {
            if p.pending_signals.is_empty() {
                continue;
            }
            let kill_runtime = |p: &Proc| {
                if p.pending_signals.contains(&Signal::SIGKILL) {
                    let _ = nix::sys::signal::kill(Pid::from_raw(p.pid), Signal::SIGKILL);
                }
            };
            if let Some(pid) = exec_pid(*chan) {
                kill_runtime(p);
                for s in p.pending_signals.drain(..) {
                    let _ = nix::sys::signal::kill(Pid::from_raw(pid), s);
                }
            } else if p.status.is_some() {
                // Its runtime ended without a process.
                p.pending_signals.clear();
            } else if p.pending_since.is_some_and(|t| t.elapsed() > PENDING_GRACE) {
                // A runtime that never gets there is killed all the same.
                kill_runtime(p);
            }
        }
    }

    /// Reaps every exited child; records the status of our processes.
    fn reap(&mut self) {
        loop {
            match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, c)) => self.exited(pid.as_raw(), c),
                Ok(WaitStatus::Signaled(pid, s, _)) => self.exited(pid.as_raw(), 128 + s as i32),
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }

    fn exited(&mut self, pid: i32, code: i32) {
        for p in self.procs.values_mut() {
            if p.pid == pid && p.status.is_none() {
                p.status = Some(code);
                p.exited_at = Some(Instant::now());
                // No one writes to a process that is gone.
                p.stdin = None;
                p.drop_pending();
            }
        }
    }

    fn relay_output(&mut self, id: u32, which: u8, buf: &mut [u8]) -> Result<(), AgentError> {
        let Some(p) = self.procs.get_mut(&id) else {
            return Ok(());
        };
        let src = if which == 1 {
            &mut p.stdout
        } else {
            &mut p.stderr
        };
        let Some(f) = src else { return Ok(()) };
        // A connection's bytes, as many as the host will take.
        let room = if p.socket {
            p.out_credit.min(buf.len())
        } else {
            buf.len()
        };
        // EOF, or EIO from a pty master once the slave is closed: done.
        // (A pty master's stdin side is non-blocking, and so its reads.)
        let n = match f.read(&mut buf[..room]) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
            r => r.unwrap_or(0),
        };
        if n == 0 {
            *src = None;
            if p.socket {
                // The connection's end of file, passed on.
                return self.send(&proto::encode(Kind::Stdout, id, &[]));
            }
            return Ok(());
        }
        if p.socket {
            p.out_credit -= n;
        }
        let kind = if which == 1 {
            Kind::Stdout
        } else {
            Kind::Stderr
        };
        let frame = proto::encode(kind, id, &buf[..n]);
        self.send(&frame)
    }

    /// Reports processes that exited and whose output is drained (or whose
    /// grace period is over).
    fn report_exits(&mut self) -> Result<(), AgentError> {
        let done: Vec<u32> = self
            .procs
            .iter()
            // A joined container's `Exit` follows its `Started`.
            .filter(|(id, _)| !self.joins_starting.contains_key(id))
            .filter(|(_, p)| {
                p.socket_done()
                    || (p.status.is_some()
                        && ((p.stdout.is_none() && p.stderr.is_none())
                            || p.exited_at.is_some_and(|t| t.elapsed() > DRAIN_GRACE)))
            })
            .map(|(id, _)| *id)
            .collect();
        for id in done {
            let Some(p) = self.procs.remove(&id) else {
                continue;
            };
            let mut exit = proto::Exit {
                code: p.status.unwrap_or(255),
                ..proto::Exit::default()
            };
            let tier = moat_container::ContainerTier::new(GUEST_STATE_ROOT, false);
            // A starting exec whose runtime ended: if its process never
            // ran (no PID file), the exec failed — an error, as the
            // container tier's `exec` and runc's fail, not an exit status
            // of the program (Docker's `exec -w /nowhere` said 1, not "OCI
            // runtime exec failed"); else its `Started` before its `Exit`.
            let mut failed_start = None;
            if self.execs_starting.remove(&id).is_some() {
                if exec_pid(id).is_none() {
                    failed_start = Some(last_error(&exec_file(id, "log")).unwrap_or_else(|| {
                        format!("the exec's runtime exited with {}", exit.code)
                    }));
                } else {
                    self.answer(id, Ok(false))?;
                }
            }
            if !p.main && !p.socket {
                for ext in ["json", "pid", "log"] {
                    let _ = std::fs::remove_file(exec_file(id, ext));
                }
            }
            if let Some(message) = failed_start {
                // 126, as Docker reports any exec that could not start
                // (the guest's `moat exec` exits 1 for all).
                let msg = proto::ErrorMsg {
                    message,
                    exec_status: Some(126),
                };
                self.send_json(Kind::Error, id, &msg)?;
                continue;
            }
            if p.main {
                super::trace("workload exited");
                self.main_done = true;
                if self.keep_layer {
                    // The host ends the VM on the report below: what the
                    // container wrote reaches the kept layer's file first
                    // (under runc it is in the host's page cache already),
                    // before the mirror, which an engine's stop timeout
                    // may cut short.
                    sync_layer();
                    super::trace("layer synced");
                    // Then what changed goes to the host's copy of the
                    // root (under runc the engine sees the writes there),
                    // unless the engine removes that copy next.
                    if self.mirror_at_exit {
                        self.send_mirror();
                    }
                }
                // From the runtime, which had the cgroup at hand (loading
                // the container's state for it here took ~12 ms under
                // TCG); from the state when the runtime did not say.
                let events = p
                    .limits
                    .and_then(read_limits)
                    .or_else(|| moat_core::runtime::Lifecycle::events(&tier, GUEST_ID).ok());
                if let Some(ev) = events {
                    exit.oom_kills = ev.oom_kills;
                    exit.pids_limit_hits = ev.pids_limit_hits;
                }
            }
            if let Some(c) = &p.joined {
                if let Ok(ev) = moat_core::runtime::Lifecycle::events(&tier, c) {
                    exit.oom_kills = ev.oom_kills;
                    exit.pids_limit_hits = ev.pids_limit_hits;
                }
                let _ = moat_core::runtime::Lifecycle::delete(&tier, c, true);
                pod::clean_up(&proto::pod_dir(c));
            }
            if p.main {
                self.started()?;
            }
            self.send_json(Kind::Exit, id, &exit)?;
            if p.main {
                // After the report: the host ends the VM when the main
                // process has exited, so this is not on its path.
                super::trace_disks();
                let _ = moat_core::runtime::Lifecycle::delete(&tier, GUEST_ID, true);
            }
        }
        Ok(())
    }
}

/// The PID of guest container `id`'s process, as the guest's container
/// tier recorded it.
fn running_pid(tier: &moat_container::ContainerTier, id: &str) -> Option<i32> {
    moat_core::runtime::Lifecycle::state(tier, id)
        .ok()
        .map(|c| c.state.pid)
        .filter(|pid| *pid > 0)
}

/// The PID of channel `chan`'s process, once its runtime wrote it.
fn exec_pid(chan: u32) -> Option<i32> {
    std::fs::read_to_string(exec_file(chan, "pid"))
        .ok()
        .and_then(|t| t.trim().parse::<i32>().ok())
        .filter(|pid| *pid > 1)
}

/// The message of the last error in a runtime's JSON log (`--log-format
/// json`), if any.
fn last_error(log: &str) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["level"] == "error")
        .and_then(|v| v["msg"].as_str().map(str::to_owned))
}

/// The guest file of exec channel `chan` with extension `ext`: its
/// process (`json`), its PID (`pid`, written by the guest's `moat exec`
/// once the program runs), its runtime's log (`log`).
fn exec_file(chan: u32, ext: &str) -> String {
    format!("/run/vm/exec-{chan}.{ext}")
}

/// Starts the guest's moat with `args` and `stdio`; its PID (it is reaped
/// by `reap`, waitpid on every child).
fn exec_moat(args: &[&str], stdio: [OwnedFd; 3]) -> Result<i32, AgentError> {
    let [i, o, e] = stdio;
    let child = Command::new(GUEST_MOAT)
        .args(args)
        .env_clear()
        .env("PATH", GUEST_PATH)
        // Its errors to its `--log` only: its stderr is the process's,
        // and the agent reports a failed start itself.
        .env(super::LOG_ONLY_ENV, "1")
        .stdin(Stdio::from(i))
        .stdout(Stdio::from(o))
        .stderr(Stdio::from(e))
        .spawn()
        .map_err(io(format!("start {GUEST_MOAT}")))?;
    Ok(child.id() as i32)
}

/// Proof that the agent runs on one thread, waiting up to 200 ms for a
/// thread that was joined to be gone: the network setup runs on scoped
/// threads, and a joined thread is still counted until the kernel has
/// released it.
fn one_thread() -> Option<moat_sys::process::OneThread> {
    let end = Instant::now() + Duration::from_millis(200);
    loop {
        match moat_sys::process::OneThread::check() {
            Ok(one) => return Some(one),
            Err(_) if Instant::now() < end => std::thread::sleep(Duration::from_millis(1)),
            Err(_) => return None,
        }
    }
}

/// How a process of the container starts.
enum How<'a> {
    /// The guest's moat with these arguments (`moat exec`).
    Exec(&'a [&'a str]),
    /// The container itself, in a fork of the agent ([`run_container`]).
    Run,
}

/// `PATH` for the guest's moat.
const GUEST_PATH: &str = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin";
/// The container's bundle in the guest.
const BUNDLE: &str = "/run/vm/bundle";

/// In a fork of the agent: what `moat run --keep -b BUNDLE w0` does
/// (create and start the container under the guest's container tier, with
/// this process as its parent, and wait for it, relaying a terminal), with
/// `stdio` as this process's stdin, stdout and stderr. Returns the
/// container's status, or, with the error on stderr, 127, 126 or 125 as the
/// container tier's `moat run` exits.
///
/// A fork rather than an exec of the guest's moat: under emulation,
/// executing the 10 MB binary again, its start-up and its argument parsing
/// cost ~100 ms, and the fork runs the code the agent already ran from the
/// same pages. The binary the fork runs is the agent's, which the kernel
/// keeps unwritable while the agent executes it.
fn run_container(stdio: [OwnedFd; 3], limits: OwnedFd, ready: OwnedFd) -> i32 {
    use rustix::fd::AsRawFd;
    child_setup(stdio, &[limits.as_raw_fd(), ready.as_raw_fd()]).map_or(1, |()| {
        run_and_wait(|| Ok(None), File::from(limits), File::from(ready))
    })
}

/// In a fork of the agent: `stdio` as this process's stdin, stdout and
/// stderr, every other descriptor but `keep` closed (the agent's channel,
/// its signalfd and the other ends of these pipes are not this
/// process's), the default signal mask, the guest's `PATH`, and step
/// records timed from here.
fn child_setup(stdio: [OwnedFd; 3], keep: &[i32]) -> Result<(), ()> {
    let [i, o, e] = stdio;
    let stdio_ok = rustix::stdio::dup2_stdin(&i)
        .and_then(|()| rustix::stdio::dup2_stdout(&o))
        .and_then(|()| rustix::stdio::dup2_stderr(&e));
    drop((i, o, e));
    let open: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    for fd in open.into_iter().filter(|fd| *fd > 2 && !keep.contains(fd)) {
        let _ = nix::unistd::close(fd);
    }
    if stdio_ok.is_err() || unblock_signals().is_err() {
        return Err(());
    }
    std::env::set_var("PATH", GUEST_PATH);
    moat_core::steps::begin_at(Instant::now());
    Ok(())
}

/// Launches the bundle's container (its start held by `hold`, see
/// [`moat_container::ContainerTier::launch_held`]) and waits for it;
/// its status, or (the error on stderr) 127, 126 or 125, as `moat run` exits.
fn run_and_wait(
    hold: impl FnOnce() -> Result<Option<moat_jail::sync::ProcessOverride>, String>,
    limits: File,
    ready: File,
) -> i32 {
    match launch_and_wait(hold, limits, ready) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("moat: {}", moat_core::error_chain(&e));
            // As the container tier's `moat run` exits.
            i32::from(e.exit_status())
        }
    }
}

/// In a fork of the agent: the default signal mask back (the agent blocks
/// SIGCHLD for its signalfd; the container's runtime waits with none
/// blocked).
fn unblock_signals() -> nix::Result<()> {
    nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&SigSet::empty()),
        None,
    )
}

/// A create request for container `id` of the guest: no pid file, console
/// socket or preserved descriptors, as `moat run -b BUNDLE` makes it.
fn guest_request<'a>(
    id: &'a str,
    config: &'a moat_core::runtime::Config,
) -> moat_core::runtime::CreateRequest<'a> {
    moat_core::runtime::CreateRequest {
        id,
        config,
        pid_file: None,
        console_socket: None,
        no_pivot: false,
        no_new_keyring: false,
        preserve_fds: 0,
        die_with_runtime: false,
    }
}

/// Once the container's process ended, writes the limit events of its
/// cgroup to `limits` (JSON), for the agent's `Exit`.
fn launch_and_wait(
    hold: impl FnOnce() -> Result<Option<moat_jail::sync::ProcessOverride>, String>,
    mut limits: File,
    mut ready: File,
) -> Result<i32, moat_core::runtime::RuntimeError> {
    use moat_core::runtime::{Config, Lifecycle, RuntimeError};
    let config = Config::from_bundle(Path::new(BUNDLE))
        .map_err(|e| RuntimeError::Invalid(moat_core::error_chain(&e)))?;
    moat_core::steps::mark("guest-config");
    let tier = moat_container::ContainerTier::new(GUEST_STATE_ROOT, false);
    let (launched, cgroup) = tier.launch_held(&guest_request(GUEST_ID, &config), hold)?;
    // The container runs: the agent may say so (unread, the agent gone,
    // is no loss).
    let _ = ready.write_all(b"1");
    drop(ready);
    let kill_all = || {
        let _ = Lifecycle::kill(&tier, GUEST_ID, Signal::SIGKILL as i32, true);
    };
    let code = match launched.terminal {
        Some(m) => moat_jail::console::proxy(m, launched.pid),
        None => moat_jail::supervise::wait_supervised(launched.pid, None, &kill_all).0,
    };
    moat_core::steps::mark("guest-workload");
    let events = cgroup.map(|c| c.limit_events()).unwrap_or_default();
    // Unread (the agent gone) is no loss: the agent then reports none.
    let _ = limits.write_all(&serde_json::to_vec(&events).unwrap_or_default());
    Ok(code)
}

/// The limit events the container's runtime wrote before it exited (see
/// [`launch_and_wait`]); `None` when it wrote none (it failed first).
/// The runtime has been reaped, so this does not wait: whatever it wrote
/// is in the pipe, and a pipe still held open elsewhere reads as none.
fn read_limits(f: File) -> Option<moat_core::stats::LimitEvents> {
    let f = nonblocking(f).ok()?;
    let mut body = Vec::new();
    let _ = (&f).take(4096).read_to_end(&mut body);
    serde_json::from_slice(&body).ok()
}

fn set_size(tty: &OwnedFd, rows: u16, cols: u16) {
    if rows == 0 || cols == 0 {
        return;
    }
    let ws = rustix::termios::Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let _ = rustix::termios::tcsetwinsize(tty, ws);
}

/// Mounts each read-write volume's virtio-fs share (its device is probed
/// when the module loads), without device nodes: the host directory's
/// would not be the guest's devices.
fn mount_volumes(
    volumes: &[proto::GuestVolume],
    config: &serde_json::Value,
) -> Result<(), AgentError> {
    use nix::mount::{mount, MsFlags};
    if volumes.is_empty() {
        return Ok(());
    }
    boot::load_modules(boot::FS_MODULES)?;
    // moat's own VMM fills slots that were placeholders at the boot (QEMU
    // hot-adds cards on the share ports instead).
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if !boot::has_share_port(&cmdline) {
        let probed = boot::probe_unbound_virtio_slots();
        super::trace(&format!("{probed} virtio-mmio slots probed again"));
    }
    for v in volumes {
        std::fs::create_dir_all(&v.mount).map_err(io(format!("create {}", v.mount)))?;
        // The device appears as the module probes it, or as a hot-added
        // one (a pod's share on its port) is probed: a mount before that
        // finds no such tag (EINVAL from virtio-fs; ENOENT); bounded.
        // With what every bind of it asks (a held container's bind is a
        // slave of this mount: its own remount came before).
        let flags = MsFlags::MS_NODEV | volume_flags(config, &v.mount).0;
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            match mount(
                Some(v.tag.as_str()),
                v.mount.as_str(),
                Some("virtiofs"),
                flags,
                None::<&str>,
            ) {
                Ok(()) => break,
                Err(nix::Error::ENOENT | nix::Error::EINVAL) if Instant::now() < end => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => {
                    return Err(AgentError::Sys {
                        step: format!("mount the volume {} on {}", v.tag, v.mount),
                        source: e,
                    })
                }
            }
        }
    }
    super::trace("volumes mounted");
    Ok(())
}

/// The guest's disks with these filesystem UUIDs, waiting up to 20 s for
/// them to appear (the driver probes them as it loads): UUID → device.
fn find_disks(uuids: &[&str]) -> BTreeMap<String, std::path::PathBuf> {
    let end = Instant::now() + Duration::from_secs(20);
    let mut found: BTreeMap<String, std::path::PathBuf> = BTreeMap::new();
    while found.len() < uuids.len() && Instant::now() < end {
        if let Ok(rd) = std::fs::read_dir("/dev") {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with("vd") && name.len() == 3 {
                    if let Some(u) = boot::ext4_uuid(&e.path()) {
                        found.insert(u, e.path());
                    }
                }
            }
        }
        if uuids.iter().all(|u| found.contains_key(*u)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    found
}

/// Mounts each disk, found by its filesystem UUID, read-only; finds the
/// disk of the writable layer (`scratch`, its UUID) in the same pass.
fn mount_disks(
    disks: &[proto::GuestDisk],
    scratch: Option<&str>,
) -> Result<Option<std::path::PathBuf>, AgentError> {
    let uuids: Vec<&str> = disks
        .iter()
        .map(|d| d.uuid.as_str())
        .chain(scratch)
        .collect();
    let mut found = find_disks(&uuids);
    let scratch = match scratch {
        Some(u) => Some(
            found
                .remove(u)
                .ok_or_else(|| AgentError::Request(format!("no disk with UUID {u}")))?,
        ),
        None => None,
    };
    for d in disks {
        let dev = found
            .get(&d.uuid)
            .ok_or_else(|| AgentError::Request(format!("no disk with UUID {}", d.uuid)))?;
        std::fs::create_dir_all(&d.mount).map_err(io(format!("create {}", d.mount)))?;
        set_read_ahead(dev);
        mount_image(dev, &d.mount)?;
    }
    Ok(scratch)
}

/// Mounts the ext4 image on block device `dev` read-only at `at` (no
/// journal replay: the image is never written).
pub(super) fn mount_image(dev: &Path, at: &str) -> Result<(), AgentError> {
    use nix::mount::{mount, MsFlags};
    mount(
        Some(dev),
        at,
        Some("ext4"),
        MsFlags::MS_RDONLY | MsFlags::MS_NODEV,
        Some("noload"),
    )
    .map_err(|e| AgentError::Sys {
        step: format!("mount {} on {at}", dev.display()),
        source: e,
    })
}

/// Reads ahead [`READ_AHEAD_KIB`] on a disk: each read is a round trip
/// through the VMM, so fewer, larger ones start a program sooner (a cold
/// `true`: 89 reads in ~50 ms of disk time with the kernel's 128 KiB, 80 in
/// ~35 ms with 1 MiB). Only time is at stake: a disk keeps the kernel's
/// default when this fails.
fn set_read_ahead(dev: &Path) {
    let Some(name) = dev.file_name().and_then(|n| n.to_str()) else {
        return;
    };
    let knob = format!("/sys/block/{name}/queue/read_ahead_kb");
    if let Err(e) = std::fs::write(&knob, READ_AHEAD_KIB.to_string()) {
        super::trace(&format!("{knob} not set: {e}"));
    }
}

/// A writable root: `lower` under an overlay whose upper layer is guest
/// memory.
/// What a primed guest has mounted: its disks, and its writable root
/// (lower layer, root).
type Primed = (Vec<proto::GuestDisk>, Option<(String, String)>);

/// The writable root's upper layer (a tmpfs).
pub(super) const RUN_RW: &str = "/run/vm/rw";
/// Where the warm-up container's files are (gone after it).
const WARM: &str = "/run/vm/warm";

/// Creates and deletes a container of `w`'s config in a fork (as
/// [`run_container`] would, without starting it), on a writable root of
/// its own, then removes that root: the guest's caches are warm and
/// nothing of the container is left.
fn warm_up(w: &proto::WarmUp) -> Result<(), AgentError> {
    use nix::mount::{umount2, MntFlags};
    let root = format!("{WARM}/root");
    let rw = format!("{WARM}/rw");
    let bundle = format!("{WARM}/bundle");
    let mut config = w.config.clone();
    config["root"]["path"] = serde_json::json!(root);
    if let Some(lower) = &w.overlay_root {
        mount_overlay(lower, &root, &rw)?;
    }
    std::fs::create_dir_all(&bundle).map_err(io(format!("create {bundle}")))?;
    std::fs::write(
        format!("{bundle}/config.json"),
        serde_json::to_vec(&config).unwrap_or_default(),
    )
    .map_err(io("write the warm-up's config.json"))?;
    let one = one_thread()
        .ok_or_else(|| AgentError::Request("the agent is not single-threaded".into()))?;
    let pid = one
        .fork(0, |_| {
            if unblock_signals().is_err() {
                return 1;
            }
            use moat_core::runtime::{Config, Lifecycle};
            let tier = moat_container::ContainerTier::new(GUEST_STATE_ROOT, false);
            let r = Config::from_bundle(Path::new(&bundle))
                .map_err(|e| moat_core::error_chain(&e))
                .and_then(|config| {
                    tier.create(&guest_request(WARM_ID, &config))
                        .map_err(|e| moat_core::error_chain(&e))
                });
            let deleted = tier.delete(WARM_ID, true);
            match (r, deleted) {
                (Ok(()), Ok(())) => 0,
                (Err(e), _) => {
                    eprintln!("moat-agent: warm-up container: {e}");
                    1
                }
                (Ok(()), Err(e)) => {
                    eprintln!(
                        "moat-agent: warm-up container: {}",
                        moat_core::error_chain(&e)
                    );
                    1
                }
            }
        })
        .map_err(io("fork the warm-up"))?;
    let status = waitpid(Pid::from_raw(pid), None);
    let _ = umount2(root.as_str(), MntFlags::MNT_DETACH);
    let _ = umount2(rw.as_str(), MntFlags::MNT_DETACH);
    let _ = std::fs::remove_dir_all(WARM);
    match status {
        Ok(WaitStatus::Exited(_, 0)) => Ok(()),
        other => Err(AgentError::Request(format!(
            "the warm-up ended with {other:?}"
        ))),
    }
}

/// The warm-up container's ID.
const WARM_ID: &str = "warm-up";

/// Creates an empty file for each of `config`'s mounts of a per-run file
/// (`/run/vm/files/N`) that does not exist yet: a held container binds
/// them before the run writes their contents (in place: the bind shows
/// the same inode).
fn placeholders(config: &serde_json::Value) -> Result<(), AgentError> {
    let Some(mounts) = config["mounts"].as_array() else {
        return Ok(());
    };
    for m in mounts {
        let Some(src) = m["source"].as_str() else {
            continue;
        };
        let Some(p) = per_run_file(src) else {
            continue;
        };
        if p.exists() {
            continue;
        }
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(io(format!("create {}", parent.display())))?;
        }
        File::create(p).map_err(io(format!("create {src}")))?;
    }
    Ok(())
}

/// The `nosuid` and `noexec` that every bind of the volume mounted at
/// `source` in `config` asks for (none when no bind names it), and whether
/// its binds all ask the same.
fn volume_flags(config: &serde_json::Value, source: &str) -> (nix::mount::MsFlags, bool) {
    use nix::mount::MsFlags;
    let asked = config["mounts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["source"].as_str() == Some(source))
        .map(|m| {
            let has = |o: &str| {
                m["options"]
                    .as_array()
                    .is_some_and(|x| x.iter().any(|x| x == o))
            };
            let mut f = MsFlags::empty();
            f.set(MsFlags::MS_NOSUID, has("nosuid"));
            f.set(MsFlags::MS_NOEXEC, has("noexec"));
            f
        })
        .collect::<Vec<_>>();
    // None bound there (a pod's share, whose containers bind directories
    // in it): nothing asked.
    let all = match asked.split_first() {
        Some((first, rest)) => rest.iter().fold(*first, |a, f| a & *f),
        None => MsFlags::empty(),
    };
    (all, asked.iter().all(|f| *f == all))
}

/// Makes an empty shared tmpfs at each read-write volume's
/// source in `config` (`guestspec::volume_mount`), before a container is
/// held: the volume, not there before the run (on QEMU it is hot-added
/// after the restore), is mounted over it then, and the held container's
/// bind — a slave of it (`rslave`, which the guest's config gives every
/// volume) — shows it before the run's process starts.
fn volume_placeholders(config: &serde_json::Value) -> Result<(), AgentError> {
    use nix::mount::{mount, MsFlags};
    let Some(mounts) = config["mounts"].as_array() else {
        return Ok(());
    };
    let mut made = std::collections::BTreeSet::new();
    for m in mounts {
        let Some(src) = m["source"].as_str() else {
            continue;
        };
        // Once per volume (it may be bound at several places).
        if !crate::guestspec::is_volume_mount(src) || !made.insert(src) {
            continue;
        }
        // The held container sees the volume as mounted, with its flags:
        // binds asking different ones could not all be right.
        let (asked, agreed) = volume_flags(config, src);
        if !agreed {
            return Err(AgentError::Request(format!(
                "the binds of the volume at {src} ask for different flags"
            )));
        }
        std::fs::create_dir_all(src).map_err(io(format!("create {src}")))?;
        // The volume's own flags (a bind's remount could not drop more:
        // they are locked for the container's user namespace); empty, and
        // the guest root's (unmapped there, so unwritable to the
        // container).
        let flags = MsFlags::MS_NODEV | asked;
        mount(
            Some("tmpfs"),
            src,
            Some("tmpfs"),
            flags,
            Some("size=4k,mode=0755"),
        )
        .map_err(sys(format!("mount a placeholder on {src}")))?;
        mount(
            None::<&str>,
            src,
            None::<&str>,
            MsFlags::MS_SHARED,
            None::<&str>,
        )
        .map_err(sys(format!("share the placeholder on {src}")))?;
    }
    Ok(())
}

/// The run's process for a container held with `held` when the run's
/// `config` is the same in everything else; else why not.
fn held_process(
    held: &serde_json::Value,
    config: &serde_json::Value,
) -> Result<moat_jail::sync::ProcessOverride, String> {
    let strip = |c: &serde_json::Value| {
        let mut c = c.clone();
        if let Some(p) = c.get_mut("process").and_then(|p| p.as_object_mut()) {
            for k in ["args", "env", "cwd"] {
                p.remove(k);
            }
        }
        proto::moat_annotations_only(&mut c);
        c
    };
    let (h, c) = (strip(held), strip(config));
    if h != c {
        // Which part, for the trace.
        let keys = |v: &serde_json::Value| -> Vec<String> {
            v.as_object()
                .map(|o| o.keys().cloned().collect())
                .unwrap_or_default()
        };
        let mut differ: Vec<String> = keys(&h);
        differ.extend(keys(&c));
        differ.sort();
        differ.dedup();
        differ.retain(|k| h.get(k) != c.get(k));
        return Err(format!("the run's config differs in {}", differ.join(", ")));
    }
    let o: moat_jail::sync::ProcessOverride = serde_json::from_value(config["process"].clone())
        .map_err(|e| format!("the run's process: {e}"))?;
    if o.args.is_empty() || !o.fits() {
        return Err("the run's process cannot be handed over".into());
    }
    Ok(o)
}

/// A close-on-exec pipe: (read end, write end).
fn pipe() -> Result<(OwnedFd, OwnedFd), AgentError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| AgentError::Sys {
        step: "create a pipe".into(),
        source: e,
    })
}

/// Keeps the host's compile of the config's seccomp filter where the
/// guest's runtime looks for it first (its cache under the guest's state
/// root). Only time is at stake: without it, the runtime compiles the
/// filter itself.
fn seed_seccomp(config: &serde_json::Value, program: Option<&proto::SeccompProgram>) {
    let (Some(profile), Some(p)) = (config["linux"].get("seccomp"), program) else {
        return;
    };
    let Ok(profile) = serde_json::from_value::<oci_spec::runtime::LinuxSeccomp>(profile.clone())
    else {
        return;
    };
    let kept = moat_jail::seccomp::Program::from_parts(p.instructions.clone(), p.flags)
        .and_then(|p| moat_jail::seccomp::seed(&profile, &p, Path::new(GUEST_STATE_ROOT)));
    if let Err(e) = kept {
        super::trace(&format!("host's seccomp program not kept: {e}"));
    }
}

/// Writes `config` as the guest's bundle's config.json.
fn write_bundle(bundle: &str, config: &serde_json::Value) -> Result<(), AgentError> {
    let bundle = Path::new(bundle);
    std::fs::create_dir_all(bundle).map_err(io("create the bundle"))?;
    let cfg = serde_json::to_vec(config).unwrap_or_default();
    std::fs::write(bundle.join("config.json"), cfg).map_err(io("write config.json"))
}

/// Creates the container of `w` and holds its start ([`Held`]): returns
/// once it is created (or failed).
fn hold(w: &proto::WarmUp) -> Result<Held, AgentError> {
    write_bundle(BUNDLE, &w.config)?;
    let (in_r, in_w) = pipe()?;
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let (go_r, go_w) = pipe()?;
    let (ready_r, ready_w) = pipe()?;
    let (limits_r, limits_w) = pipe()?;
    let one = one_thread()
        .ok_or_else(|| AgentError::Request("the agent is not single-threaded".into()))?;
    let pid = one
        .fork(0, |_| {
            held_container([in_r, out_w, err_w], go_r, ready_w, limits_w)
        })
        .map_err(io("fork the held container's runtime"))?;
    // The child's ends are the child's.
    let mut ready = File::from(ready_r);
    let mut byte = [0u8; 1];
    match ready.read(&mut byte) {
        Ok(1) => Ok(Held {
            pid,
            go: File::from(go_w),
            stdio: [File::from(in_w), File::from(out_r), File::from(err_r)],
            limits: File::from(limits_r),
            // The same pipe: its second byte says the process started.
            started: ready,
            config: w.config.clone(),
        }),
        _ => {
            let status = waitpid(Pid::from_raw(pid), None);
            let mut err = String::new();
            let _ = File::from(err_r).read_to_string(&mut err);
            Err(AgentError::Request(format!(
                "its runtime ended with {status:?}: {}",
                err.trim()
            )))
        }
    }
}

/// Cancels a held container: its runtime deletes it and exits.
fn cancel_held(held: Held) {
    let Held { pid, go, stdio, .. } = held;
    drop(go);
    let _ = waitpid(Pid::from_raw(pid), None);
    drop(stdio);
}

/// In a fork of the agent: [`run_container`], but the container is
/// created first and its start waits for the run's process on `go`;
/// `ready` gets one byte once the container is created, another once its
/// process started.
fn held_container(stdio: [OwnedFd; 3], go: OwnedFd, ready: OwnedFd, limits: OwnedFd) -> i32 {
    use rustix::fd::AsRawFd;
    // Kept open by `child_setup`, which closes every other descriptor
    // (the agent's own are above the standard streams, which stay).
    let keep = [go.as_raw_fd(), ready.as_raw_fd(), limits.as_raw_fd()];
    child_setup(stdio, &keep).map_or(1, |()| {
        let ready = File::from(ready);
        let mut created = ready.try_clone().ok();
        let mut go = File::from(go);
        run_and_wait(
            move || {
                if let Some(mut r) = created.take() {
                    let _ = r.write_all(&[1]);
                }
                let mut body = Vec::new();
                go.read_to_end(&mut body)
                    .map_err(|e| format!("read the run's process: {e}"))?;
                if body.is_empty() {
                    return Err("the held container was not used".into());
                }
                serde_json::from_slice(&body)
                    .map(Some)
                    .map_err(|e| format!("the run's process: {e}"))
            },
            File::from(limits),
            ready,
        )
    })
}

/// The guest's IDs of the container's root (its user and group 0) by the
/// config's mappings; None when it maps no 0 (no user namespace).
fn container_root(config: &serde_json::Value) -> Option<(u32, u32)> {
    let id = |key: &str| {
        config["linux"][key].as_array()?.iter().find_map(|m| {
            let (c, h, n) = (
                m["containerID"].as_u64()?,
                m["hostID"].as_u64()?,
                m["size"].as_u64()?,
            );
            (c == 0 && n > 0).then(|| u32::try_from(h).ok()).flatten()
        })
    };
    Some((id("uidMappings")?, id("gidMappings")?))
}

/// Gives a writable root's top directory to the container's root, as the
/// container tier's own copy of a root is: the overlay's top is its upper
/// layer's, which the agent made as the guest's root, unmapped in the
/// container's user namespace (`/` showed as `nobody` and even the
/// container's root could not create a file in it).
fn own_root(root: &str, config: &serde_json::Value) -> Result<(), AgentError> {
    let Some((uid, gid)) = container_root(config) else {
        return Ok(());
    };
    std::os::unix::fs::chown(root, Some(uid), Some(gid))
        .map_err(io(format!("give {root} to the container's root")))
}

/// A writable root at `root`: an overlay of `lower` whose upper layer is
/// a tmpfs at `rw` (guest memory).
fn mount_overlay(lower: &str, root: &str, rw: &str) -> Result<(), AgentError> {
    mount_overlay_over(lower, root, rw, Upper::Memory)
}

/// Where an overlay's upper layer (and work directory) live, at `rw`.
enum Upper<'a> {
    /// A new tmpfs: guest memory.
    Memory,
    /// The ext4 disk at this device (the container's writable layer,
    /// `proto::RunRequest::scratch`), mounted read-write.
    /// `noinit_itable`: the host made the image sparse, its inode tables
    /// read as zeros, and the kernel's background zeroing would only
    /// write them out (and take the vCPU). `discard`: blocks the guest
    /// frees go back to the host (the VMM punches them out of the file).
    Disk(&'a Path),
    /// A directory made on what is mounted there already (a pod's joined
    /// container's, on the pod's disk).
    Dir,
}

/// [`mount_overlay`] with the upper layer where `upper` says.
fn mount_overlay_over(lower: &str, root: &str, rw: &str, upper: Upper) -> Result<(), AgentError> {
    use nix::mount::{mount, MsFlags};
    std::fs::create_dir_all(rw).map_err(io(format!("create {rw}")))?;
    let mounted = match upper {
        Upper::Disk(dev) => mount(
            Some(dev),
            rw,
            Some("ext4"),
            MsFlags::MS_NODEV,
            Some("noinit_itable,discard"),
        ),
        Upper::Memory => mount(
            Some("tmpfs"),
            rw,
            Some("tmpfs"),
            MsFlags::MS_NODEV,
            Some("mode=0755"),
        ),
        Upper::Dir => Ok(()),
    };
    mounted.map_err(|e| AgentError::Sys {
        step: "mount the root's upper layer".into(),
        source: e,
    })?;
    for d in ["upper", "work"] {
        std::fs::create_dir_all(format!("{rw}/{d}")).map_err(io(format!("create {rw}/{d}")))?;
    }
    std::fs::create_dir_all(root).map_err(io(format!("create {root}")))?;
    let data = format!("lowerdir={lower},upperdir={rw}/upper,workdir={rw}/work");
    mount(
        Some("overlay"),
        root,
        Some("overlay"),
        MsFlags::MS_NODEV,
        Some(data.as_str()),
    )
    .map_err(|e| AgentError::Sys {
        step: format!("mount the writable root on {root}"),
        source: e,
    })
}

/// The payload of one [`Kind::Mirror`] frame, at most.
const MIRROR_CHUNK: usize = 256 * 1024;

/// Bytes of the mirror stream, as [`Kind::Mirror`] frames on the agent's
/// channel (blocking: the host always reads it).
struct MirrorFrames<'a> {
    chan: &'a mut File,
    /// The pipe a file's pages are spliced through (read end, write end),
    /// made at the first large file.
    pipe: Option<(OwnedFd, OwnedFd)>,
    /// False once a splice was refused: the rest of this mirror is copied.
    splice: bool,
}

impl<'a> MirrorFrames<'a> {
    fn new(chan: &'a mut File) -> MirrorFrames<'a> {
        MirrorFrames {
            chan,
            pipe: None,
            splice: true,
        }
    }

    /// Up to `want` bytes of `file` spliced into the pipe, then framed onto
    /// the channel: the header once the pipe holds them (so it says what
    /// follows), the pages moved on by the kernel (a virtio serial port
    /// takes them without a copy; under TCG each copy in the guest costs
    /// ~0.25 s per 200 MB). `Ok(None)` where `file` cannot be spliced.
    fn splice_chunk(&mut self, file: &File, want: usize) -> std::io::Result<Option<usize>> {
        use rustix::pipe::{splice, SpliceFlags};
        if self.pipe.is_none() {
            let Ok((r, w)) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC) else {
                return Ok(None);
            };
            // Else the default 64 KiB: smaller frames.
            if rustix::pipe::fcntl_setpipe_size(&w, MIRROR_CHUNK).is_err() {
                super::trace("mirror: a pipe of the default size");
            }
            self.pipe = Some((r, w));
        }
        let Some((r, w)) = &self.pipe else {
            return Ok(None);
        };
        let n = match splice(file, None, w, None, want, SpliceFlags::empty()) {
            Ok(n) => n,
            Err(rustix::io::Errno::INVAL) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            return Ok(Some(0));
        }
        self.chan.write_all(&proto::header(Kind::Mirror, 0, n))?;
        let mut left = n;
        while left > 0 {
            match splice(r, None, &*self.chan, None, left, SpliceFlags::empty())? {
                0 => return Err(std::io::ErrorKind::WriteZero.into()),
                m => left -= m,
            }
        }
        Ok(Some(n))
    }
}

impl std::io::Write for MirrorFrames<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len().min(MIRROR_CHUNK);
        self.chan
            .write_all(&proto::encode(Kind::Mirror, 0, &buf[..n]))?;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl crate::mirror::Sink for MirrorFrames<'_> {
    fn send_file(&mut self, file: &File, len: u64) -> std::io::Result<u64> {
        let mut sent = 0u64;
        while sent < len && self.splice {
            let want = (len - sent).min(MIRROR_CHUNK as u64) as usize;
            match self.splice_chunk(file, want)? {
                Some(0) => return Ok(sent), // the file ended first
                Some(n) => sent += n as u64,
                None => self.splice = false,
            }
        }
        // Copied (nothing is in the pipe: a refused splice moved nothing).
        let rest = std::io::copy(&mut Read::take(file, len - sent), self)?;
        Ok(sent + rest)
    }
}

/// Writes back the writable layer's disk at [`RUN_RW`] (`syncfs`: its
/// data, its journal, and a flush of the disk's cache, which the VMM
/// passes on to the host file). A failure is said on the console; the
/// exit is still reported.
fn sync_layer() {
    let synced = std::fs::File::open(RUN_RW)
        .map_err(|e| e.to_string())
        .and_then(|d| rustix::fs::syncfs(&d).map_err(|e| e.to_string()));
    if let Err(e) = synced {
        eprintln!("moat-agent: cannot sync the writable layer: {e}");
    }
}

/// Where the per-run files live in the guest.
const FILES: &str = "/run/vm/files";

/// `path` if it names a per-run file: absolute, under [`FILES`], with no
/// `..` in it.
fn per_run_file(path: &str) -> Option<&Path> {
    pod::under(path, FILES).then_some(Path::new(path))
}

/// Writes the run's files, each of which must be under `base`.
fn write_files(files: &[proto::GuestFile], base: &str) -> Result<(), AgentError> {
    use std::os::unix::fs::PermissionsExt;
    for f in files {
        if !pod::under(&f.path, base) {
            return Err(AgentError::Request(format!(
                "file {} is outside {base}",
                f.path
            )));
        }
        let p = Path::new(&f.path);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(io(format!("create {}", parent.display())))?;
        }
        std::fs::write(p, &f.data).map_err(io(format!("write {}", f.path)))?;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(f.mode & 0o777))
            .map_err(io(format!("chmod {}", f.path)))?;
    }
    Ok(())
}

fn hello() -> proto::Hello {
    proto::Hello {
        version: proto::VERSION,
        kernel: moat_jail::host::Kernel::read().release,
    }
}

/// Before anything of the container runs: mixes the host's fresh bytes
/// into the kernel's pool and forces its generator to reseed from it, and
/// sets the wall clock to the host's. A guest restored from a snapshot
/// would otherwise carry on with the snapshot's generator state (two
/// restored runs would draw the same "random" bytes, boot IDs, stack
/// canaries and ASLR offsets of new processes) and the snapshot's time.
fn refresh(req: &proto::RunRequest) -> Result<(), AgentError> {
    if !req.entropy.is_empty() {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/urandom")
            .map_err(io("open /dev/urandom"))?;
        f.write_all(&req.entropy)
            .map_err(io("mix the host's entropy in"))?;
        moat_sys::random::reseed_crng(f.as_fd()).map_err(io("reseed the guest's generator"))?;
    }
    if req.clock_ns > 0 {
        let ts = nix::sys::time::TimeSpec::new(
            (req.clock_ns / 1_000_000_000) as i64,
            (req.clock_ns % 1_000_000_000) as i64,
        );
        nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts).map_err(|e| {
            AgentError::Sys {
                step: "set the clock".into(),
                source: e,
            }
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The payloads of the Mirror frames in `chan`, and the largest.
    fn deframe(chan: &mut File) -> (Vec<u8>, usize) {
        use std::io::Seek;
        chan.rewind().unwrap();
        let mut bytes = Vec::new();
        chan.read_to_end(&mut bytes).unwrap();
        let mut d = proto::Decoder::new();
        d.push(&bytes);
        let (mut out, mut largest) = (Vec::new(), 0);
        while let Some(f) = d.next_frame().unwrap() {
            assert_eq!((f.kind, f.chan), (Kind::Mirror, 0));
            largest = largest.max(f.payload.len());
            out.extend_from_slice(&f.payload);
        }
        (out, largest)
    }

    #[test]
    fn a_large_files_content_is_spliced_into_whole_frames() {
        let dir = tempfile::tempdir().unwrap();
        let content: Vec<u8> = (0..(MIRROR_CHUNK * 3 + 12345) as u32)
            .map(|i| (i * 31 % 253) as u8)
            .collect();
        let src = dir.path().join("src");
        std::fs::write(&src, &content).unwrap();
        let mut chan = tempfile::tempfile().unwrap();
        let mut out = MirrorFrames::new(&mut chan);
        out.write_all(b"before").unwrap();
        let f = File::open(&src).unwrap();
        let sent = crate::mirror::Sink::send_file(&mut out, &f, content.len() as u64).unwrap();
        assert_eq!(sent, content.len() as u64);
        assert!(out.splice, "spliced, not copied");
        out.write_all(b"after").unwrap();
        let (got, largest) = deframe(&mut chan);
        assert_eq!(got, [&b"before"[..], &content, b"after"].concat());
        assert!(largest <= MIRROR_CHUNK, "{largest}");
        // A file shorter than said: what it had, in whole frames.
        let mut chan = tempfile::tempfile().unwrap();
        let mut out = MirrorFrames::new(&mut chan);
        let f = File::open(&src).unwrap();
        let sent = crate::mirror::Sink::send_file(&mut out, &f, content.len() as u64 + 99);
        assert_eq!(sent.unwrap(), content.len() as u64);
        assert_eq!(deframe(&mut chan).0, content);
    }

    /// Through a raw terminal, as moat's own VMM's console port is the
    /// agent's channel (`/dev/hvc0`): the bytes arrive as sent.
    #[test]
    fn a_large_files_content_is_spliced_whole_onto_a_raw_terminal() {
        let pty = nix::pty::openpty(None, None).unwrap();
        let mut t = rustix::termios::tcgetattr(&pty.slave).unwrap();
        t.make_raw();
        rustix::termios::tcsetattr(&pty.slave, rustix::termios::OptionalActions::Now, &t).unwrap();
        let mut master = File::from(pty.master);
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            // EIO once the other end is closed.
            while let Ok(n @ 1..) = master.read(&mut buf) {
                got.extend_from_slice(&buf[..n]);
            }
            got
        });
        let content: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 256) as u8).collect();
        let src = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(src.path(), &content).unwrap();
        let mut chan = File::from(pty.slave);
        let mut out = MirrorFrames::new(&mut chan);
        let f = File::open(src.path()).unwrap();
        let sent = crate::mirror::Sink::send_file(&mut out, &f, content.len() as u64).unwrap();
        assert_eq!(sent, content.len() as u64);
        assert!(out.splice, "spliced, not copied");
        drop(chan);
        let bytes = reader.join().unwrap();
        let mut d = proto::Decoder::new();
        d.push(&bytes);
        let mut got = Vec::new();
        while let Some(f) = d.next_frame().unwrap() {
            got.extend_from_slice(&f.payload);
        }
        assert_eq!(got.len(), content.len());
        assert!(got == content, "the bytes changed on the way");
    }

    #[test]
    fn a_mirror_through_the_frames_is_the_stream_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("d")).unwrap();
        let big: Vec<u8> = (0..700_000u32).map(|i| (i % 241) as u8).collect();
        std::fs::write(root.join("d/big"), &big).unwrap();
        std::fs::write(root.join("small"), b"small").unwrap();
        let mut plain = Vec::new();
        crate::mirror::write_changes(root, root, 0, &mut plain).unwrap();
        let mut chan = tempfile::tempfile().unwrap();
        let mut out = MirrorFrames::new(&mut chan);
        crate::mirror::write_changes(root, root, 0, &mut out).unwrap();
        assert!(out.pipe.is_some() && out.splice, "the big file spliced");
        let framed = deframe(&mut chan).0;
        // The streams differ only in the start time of their walks.
        let head = b"moat-mirror-1".len() + 8;
        assert_eq!(framed.len(), plain.len());
        assert_eq!(framed[head..], plain[head..]);
    }

    #[test]
    fn a_volumes_flags_are_what_every_bind_of_it_asks() {
        use nix::mount::MsFlags;
        let config = |opts: &[&[&str]]| {
            serde_json::json!({"mounts": opts.iter().map(|o| serde_json::json!({
                "destination": "/d", "type": "bind", "source": "/run/vm/fs/0", "options": o,
            })).chain([serde_json::json!({
                "destination": "/e", "type": "bind", "source": "/run/vm/fs/1", "options": ["noexec"],
            })]).collect::<Vec<_>>()})
        };
        let v0 = "/run/vm/fs/0";
        assert_eq!(
            volume_flags(&config(&[&["rbind", "nosuid", "nodev", "rslave"]]), v0),
            (MsFlags::MS_NOSUID, true)
        );
        assert_eq!(
            volume_flags(&config(&[&["nosuid", "noexec"], &["noexec", "nosuid"]]), v0),
            (MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC, true)
        );
        // Two binds asking different flags: what both ask, and no agreement
        // (no held container).
        assert_eq!(
            volume_flags(&config(&[&["nosuid", "noexec"], &["nosuid"]]), v0),
            (MsFlags::MS_NOSUID, false)
        );
        assert_eq!(
            volume_flags(&config(&[&["rw"]]), "/run/vm/fs/1"),
            (MsFlags::MS_NOEXEC, true)
        );
        // A volume no bind names (a pod's share): no flag.
        assert_eq!(
            volume_flags(&config(&[&["noexec"]]), "/run/vm/pod-share"),
            (MsFlags::empty(), true)
        );
    }

    #[test]
    fn stdin_is_credited_as_a_real_pipe_takes_it() {
        // A real pipe, non-blocking as the agent makes it, 64 KiB deep.
        let (r, w) = nix::unistd::pipe().unwrap();
        let mut p = Proc::new(1, false);
        p.stdin = Some(nonblocking(File::from(w)).unwrap());
        // A small write the pipe takes at once is credited at once.
        p.pending.extend(b"hello");
        p.write_stdin();
        assert_eq!(p.credit_due(), Some(5));
        assert_eq!(p.credit_due(), None, "nothing twice");
        // A window's worth: the pipe takes what it holds, the rest waits,
        // and what it took is credited in batches, not byte by byte.
        p.pending.extend(vec![b'y'; proto::STDIN_WINDOW]);
        p.write_stdin();
        let took = (proto::STDIN_WINDOW - p.pending.len()) as u64;
        assert!(took > 0 && !p.pending.is_empty(), "{took}");
        assert_eq!(
            p.credit_due(),
            (took >= proto::CREDIT_BATCH).then_some(took)
        );
        // The reader goes away: what waits is dropped and credited, so the
        // host goes on.
        let left = p.pending.len() as u64;
        let before = p.taken;
        drop(r);
        p.write_stdin();
        assert!(p.stdin.is_none() && p.pending.is_empty());
        assert_eq!(p.credit_due(), Some(before + left));
    }

    #[test]
    fn per_run_files_stay_under_their_directory() {
        assert!(per_run_file("/run/vm/files/0").is_some());
        assert!(per_run_file("/run/vm/files/3/hosts").is_some());
        for bad in [
            "/run/vm/files",
            "/run/vm/files/../../etc/passwd",
            "/run/vm/files/0/../../x",
            "run/vm/files/0",
            "/run/vm/filesx/0",
            "/etc/hosts",
        ] {
            assert!(per_run_file(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn a_held_container_serves_only_runs_of_its_config() {
        let held = serde_json::json!({
            "process": {"args": ["true"], "env": ["PATH=/bin"], "cwd": "/", "terminal": false},
            "annotations": {"dev.moat.landlock": "auto"},
            "mounts": [{"destination": "/etc/hosts", "source": "/run/vm/files/0"}]
        });
        let mut run = held.clone();
        run["process"]["args"] = serde_json::json!(["sh", "-c", "echo hi"]);
        run["process"]["env"] = serde_json::json!(["WHO=me"]);
        run["process"]["cwd"] = serde_json::json!("/tmp");
        run["annotations"]["io.engine.name"] = serde_json::json!("c1");
        let o = held_process(&held, &run).unwrap();
        assert_eq!(o.args, ["sh", "-c", "echo hi"]);
        assert_eq!(o.env, ["WHO=me"]);
        assert_eq!(o.cwd, "/tmp");
        let mut tty = run.clone();
        tty["process"]["terminal"] = serde_json::json!(true);
        assert!(held_process(&held, &tty).unwrap_err().contains("process"));
        let mut policy = run.clone();
        policy["annotations"]["dev.moat.landlock"] = serde_json::json!("{}");
        assert!(held_process(&held, &policy)
            .unwrap_err()
            .contains("annotations"));
        let mut odd = run;
        odd["process"]["args"] = serde_json::json!(["sh", 1]);
        assert!(held_process(&held, &odd).is_err());
    }
}
