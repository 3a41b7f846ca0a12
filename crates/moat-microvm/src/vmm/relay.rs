//! The VMM process's loop, single-threaded over `poll`: frames from the
//! agent, control clients (start, signal, exec), its own stdin (the
//! container's), the exec sessions' stdin, the guest console, and signals
//! (SIGCHLD from QEMU; the terminating ones, forwarded to the workload;
//! SIGWINCH, a new terminal size).
use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::Instant;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use super::boot::{push_tail, tail_text, Booted};
use super::{VmmError, VmmPlan};
use crate::control::{self, Reply, Request, Setup, StartKind};
use crate::proto::{self, Decoder, Frame, Kind};

/// `credit` plus what the agent granted, never past the window (a guest
/// granting more than it was sent gains nothing).
fn add_credit(credit: usize, granted: u64) -> usize {
    let granted = usize::try_from(granted).unwrap_or(usize::MAX);
    credit.saturating_add(granted).min(proto::STDIN_WINDOW)
}

/// How many bytes may wait for the agent channel before the relay stops
/// reading the stdin it relays (its sources then wait, as a pipe's writer
/// does).
const OUT_HIGH: usize = 4 * proto::MAX_DATA;

/// The most one read of the agent channel takes.
const AGENT_READ: usize = 256 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The agent said hello; not yet acted on.
    Booting,
    /// The agent answered; waiting for `start`.
    Created,
    /// `Run` sent; waiting for `Started`.
    Starting,
    Running,
}

struct ExecSession {
    client: OwnedFd,
    stdin: Option<File>,
    /// Stdin bytes the agent will still take ([`proto::STDIN_WINDOW`]).
    credit: usize,
    stdout: File,
    stderr: File,
    /// The client (`moat exec`, or the host process standing for a
    /// detached one) closed its connection: the process was killed.
    hung_up: bool,
    /// The output streams whose host end took no more (its reader is
    /// gone): see [`write_output`].
    outputs_closed: u8,
    started: bool,
}

/// A connection made to the pod's `localhost` on the host, relayed to
/// the guest on a channel of its own ([`Kind::Forward`]).
struct Forward {
    /// Non-blocking.
    conn: File,
    /// Bytes the agent will still take (as [`ExecSession::credit`]).
    credit: usize,
    /// Still reading the host's end (no end of file or error yet).
    reading: bool,
    /// The guest's bytes the connection has not taken yet: at most a
    /// window, since the agent reads its socket only under the credit
    /// [`Relay`] sends back as these are written.
    pending: VecDeque<u8>,
    /// Written and not yet credited back to the agent.
    owed: usize,
    /// The guest's end of file came: passed on once `pending` is written.
    guest_eof: bool,
    /// The agent is done with it (`Exit` or `Error`): dropped once
    /// `pending` is written.
    ended: bool,
}

pub struct Relay {
    plan: VmmPlan,
    setup: Option<OwnedFd>,
    listener: OwnedFd,
    vm: super::VmChild,
    agent: File,
    /// Bytes for the agent not yet taken by the channel: written as it
    /// takes them, so the relay never blocks on the guest and always reads
    /// what the guest sends (the guest's writes wait for that).
    out: VecDeque<u8>,
    dec: Decoder,
    /// What one read of the agent channel takes: a bulk transfer (the
    /// mirror's 256 KiB frames) in few reads.
    agent_buf: Vec<u8>,
    console: Option<File>,
    console_tail: VecDeque<u8>,
    sigfd: Option<SignalFd>,
    phase: Phase,
    /// Who asked for `start` (answered on Started/Error).
    starter: Option<OwnedFd>,
    stdin_open: bool,
    /// The container process's [`ExecSession::outputs_closed`].
    outputs_closed: u8,
    /// The container process's stdin credit (as [`ExecSession::credit`]).
    stdin_credit: usize,
    execs: BTreeMap<u32, ExecSession>,
    /// Updates sent to the guest, by channel: who waits for the answer.
    updates: BTreeMap<u32, OwnedFd>,
    /// Listeners of the pod's `localhost` ([`crate::portfwd`]).
    forward_listeners: Vec<OwnedFd>,
    forwards: BTreeMap<u32, Forward>,
    next_chan: u32,
    /// When the relay took over (for the console's debug timings).
    since: Instant,
    /// How the guest started (told to the runtime with `Ready`).
    how: StartKind,
    /// The guest reported an OOM kill in the container (with its end).
    oom_killed: bool,
    /// Mirror bytes the guest sent ([`MIRROR_MAX`]).
    mirrored: u64,
}

/// The most mirror bytes a guest may send: what its layer can hold, and
/// room for the stream's records. Past it the guest is lying, and the
/// host's disk is not its to fill.
const MIRROR_MAX: u64 = crate::disk::SCRATCH_BYTES + (1 << 30);

fn forwarded() -> SigSet {
    let mut set = SigSet::empty();
    for s in moat_jail::supervise::FORWARDED {
        set.add(s);
    }
    set.add(Signal::SIGCHLD);
    set.add(Signal::SIGPIPE);
    set
}

impl Relay {
    pub fn new(
        mut plan: VmmPlan,
        setup: OwnedFd,
        listener: OwnedFd,
        booted: Booted,
        how: StartKind,
    ) -> Relay {
        let set = forwarded();
        let _ = set.thread_block();
        let sigfd = SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK).ok();
        let forward_listeners = plan
            .forward
            .as_mut()
            .map(|f| std::mem::take(&mut f.listeners))
            .unwrap_or_default();
        Relay {
            plan,
            setup: Some(setup),
            listener,
            vm: booted.vm,
            agent: booted.agent,
            out: VecDeque::new(),
            dec: Decoder::new(),
            agent_buf: vec![0u8; AGENT_READ],
            console: Some(booted.console),
            console_tail: booted.console_tail,
            sigfd,
            phase: Phase::Booting,
            starter: None,
            stdin_open: true,
            outputs_closed: 0,
            stdin_credit: proto::STDIN_WINDOW,
            execs: BTreeMap::new(),
            updates: BTreeMap::new(),
            forward_listeners,
            forwards: BTreeMap::new(),
            next_chan: 1,
            since: Instant::now(),
            how,
            oom_killed: false,
            mirrored: 0,
        }
    }

    fn console_text(&self) -> String {
        tail_text(&self.console_tail)
    }

    /// Reports a failure to whoever waits (the runtime, a starter), stops
    /// the VM, and returns the status to exit with.
    fn fail(&mut self, e: &VmmError, status: i32) -> i32 {
        let message = moat_core::error_chain(e);
        if let Some(s) = self.setup.take() {
            let _ = control::send(
                s.as_fd(),
                &Setup::Failed {
                    message: message.clone(),
                    exec_status: None,
                },
            );
        } else if let Some(c) = self.starter.take() {
            let _ = control::send(
                c.as_fd(),
                &Reply::Error {
                    message: message.clone(),
                    exec_status: None,
                },
            );
        } else {
            eprintln!("moat: microvm: {message}");
        }
        self.stop_vm();
        status
    }

    fn stop_vm(&mut self) {
        self.vm.kill();
        self.vm.wait();
    }

    /// Queues `bytes` for the agent and writes what the channel takes now.
    fn send(&mut self, bytes: &[u8]) -> Result<(), VmmError> {
        self.out.extend(bytes);
        self.flush()
    }

    /// Writes queued bytes until the channel takes no more (never blocks).
    fn flush(&mut self) -> Result<(), VmmError> {
        use nix::sys::socket::{send, MsgFlags};
        while !self.out.is_empty() {
            let (head, _) = self.out.as_slices();
            match send(
                self.agent.as_raw_fd(),
                head,
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            ) {
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(nix::Error::EAGAIN) => break,
                Err(nix::Error::EINTR) => {}
                Err(e) => {
                    return Err(VmmError::Io {
                        step: "write to the guest".into(),
                        source: e.into(),
                    })
                }
            }
        }
        Ok(())
    }

    /// The agent said hello: run the container's process at once
    /// (`launch`), or tell the runtime the container is created.
    fn hello(&mut self) -> Result<(), VmmError> {
        if self.plan.autostart {
            return self.send_run();
        }
        self.phase = Phase::Created;
        if let Some(s) = self.setup.take() {
            let ready = Setup::Ready {
                start: self.how.clone(),
                held: false,
            };
            let _ = control::send(s.as_fd(), &ready);
        }
        Ok(())
    }

    fn send_run(&mut self) -> Result<(), VmmError> {
        // Fresh entropy and the time, now: the guest may be a restored
        // snapshot's, with the snapshot's generator state and clock.
        // (The jail holds /dev/urandom.)
        let mut entropy = vec![0u8; 64];
        File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut entropy))
            .map_err(|e| VmmError::Io {
                step: "draw entropy for the guest".into(),
                source: e,
            })?;
        self.plan.run.entropy = entropy;
        self.plan.run.clock_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let frame = proto::encode_json(Kind::Run, 0, &self.plan.run);
        self.phase = Phase::Starting;
        self.send(&frame)
    }

    pub fn run(mut self, one: &moat_sys::process::OneThread) -> i32 {
        let code = match self.hello().and_then(|()| self.serve()) {
            Ok(code) => code,
            Err(e) => self.fail(&e, 255),
        };
        if let (true, Some(limit)) = (self.oom_killed, self.plan.cgroup_memory) {
            echo_oom(one, limit, self.plan.meminfo.as_ref());
        }
        code
    }

    fn serve(&mut self) -> Result<i32, VmmError> {
        let mut buf = vec![0u8; proto::MAX_DATA];
        loop {
            let mut slots: Vec<Slot> = Vec::new();
            let mut fds: Vec<PollFd> = Vec::new();
            macro_rules! add {
                ($fd:expr, $s:expr) => {{
                    fds.push(PollFd::new($fd, PollFlags::POLLIN));
                    slots.push($s);
                }};
            }
            add!(self.agent.as_fd(), Slot::Agent);
            if !self.out.is_empty() {
                fds.push(PollFd::new(self.agent.as_fd(), PollFlags::POLLOUT));
                slots.push(Slot::AgentWritable);
            }
            // Input for the guest waits while the channel is behind, and
            // each process's while the agent holds a window of it unread.
            let take_input = self.out.len() < OUT_HIGH;
            add!(self.listener.as_fd(), Slot::Listener);
            if let Some(s) = &self.sigfd {
                add!(s.as_fd(), Slot::Signal);
            }
            if let Some(c) = &self.console {
                add!(c.as_fd(), Slot::Console);
            }
            let stdin = std::io::stdin();
            if self.phase == Phase::Running
                && self.stdin_open
                && take_input
                && self.stdin_credit > 0
            {
                add!(stdin.as_fd(), Slot::Stdin);
            }
            for (ch, x) in &self.execs {
                if let (Some(i), true) = (&x.stdin, take_input && x.credit > 0) {
                    add!(i.as_fd(), Slot::ExecStdin(*ch));
                }
                if x.started && !x.hung_up {
                    add!(x.client.as_fd(), Slot::ExecClient(*ch));
                }
            }
            for (i, l) in self.forward_listeners.iter().enumerate() {
                add!(l.as_fd(), Slot::ForwardListener(i));
            }
            for (ch, f) in &self.forwards {
                if f.reading && take_input && f.credit > 0 {
                    add!(f.conn.as_fd(), Slot::ForwardIn(*ch));
                }
                if !f.pending.is_empty() {
                    fds.push(PollFd::new(f.conn.as_fd(), PollFlags::POLLOUT));
                    slots.push(Slot::ForwardOut(*ch));
                }
            }
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) | Err(nix::Error::EINTR) => {}
                Err(e) => {
                    return Err(VmmError::Sys {
                        step: "poll".into(),
                        source: e,
                    })
                }
            }
            let ready: Vec<Slot> = fds
                .iter()
                .zip(&slots)
                .filter(|(f, _)| f.revents().is_some_and(|r| !r.is_empty()))
                .map(|(_, s)| *s)
                .collect();
            drop(fds);
            for slot in ready {
                if let Some(code) = self.on_ready(slot, &mut buf)? {
                    return Ok(code);
                }
            }
        }
    }

    fn on_ready(&mut self, slot: Slot, buf: &mut [u8]) -> Result<Option<i32>, VmmError> {
        match slot {
            Slot::AgentWritable => self.flush()?,
            Slot::Agent => {
                let n = self.agent.read(&mut self.agent_buf).unwrap_or(0);
                if n == 0 {
                    return self.vm_gone();
                }
                self.dec.push(&self.agent_buf[..n]);
                while let Some(f) = self.dec.next_frame()? {
                    if let Some(code) = self.on_frame(f)? {
                        return Ok(Some(code));
                    }
                }
            }
            Slot::Listener => self.accept()?,
            Slot::Signal => {
                let sigs: Vec<i32> = {
                    let mut v = Vec::new();
                    if let Some(s) = &self.sigfd {
                        while let Ok(Some(i)) = s.read_signal() {
                            v.push(i.ssi_signo as i32);
                        }
                    }
                    v
                };
                for s in sigs {
                    if let Some(code) = self.on_signal(s)? {
                        return Ok(Some(code));
                    }
                }
            }
            Slot::Console => {
                let n = self
                    .console
                    .as_mut()
                    .map_or(0, |c| c.read(buf).unwrap_or(0));
                if n == 0 {
                    self.console = None;
                } else {
                    if self.plan.console {
                        let _ = std::io::stderr().write_all(&buf[..n]);
                    }
                    push_tail(&mut self.console_tail, &buf[..n]);
                }
            }
            Slot::Stdin => {
                let room = self.stdin_credit.min(buf.len());
                let n = nix::unistd::read(std::io::stdin().as_fd(), &mut buf[..room]).unwrap_or(0);
                if n == 0 {
                    self.stdin_open = false;
                }
                self.stdin_credit -= n;
                let frame = proto::encode(Kind::Stdin, 0, &buf[..n]);
                self.send(&frame)?;
            }
            Slot::ExecStdin(ch) => {
                let Some(x) = self.execs.get_mut(&ch) else {
                    return Ok(None);
                };
                let room = x.credit.min(buf.len());
                let n = match x.stdin.as_mut() {
                    Some(f) => f.read(&mut buf[..room]).unwrap_or(0),
                    None => return Ok(None),
                };
                x.credit -= n;
                if n == 0 {
                    x.stdin = None;
                }
                let frame = proto::encode(Kind::Stdin, ch, &buf[..n]);
                self.send(&frame)?;
            }
            Slot::ForwardListener(i) => self.accept_forward(i)?,
            Slot::ForwardIn(ch) => self.forward_in(ch, buf)?,
            Slot::ForwardOut(ch) => self.forward_out(ch)?,
            Slot::ExecClient(ch) => {
                let Some(x) = self.execs.get_mut(&ch) else {
                    return Ok(None);
                };
                // A signal the client forwards to the process (`moat exec`
                // or the stand-in of a detached one got it); or the client
                // went away: the process gets SIGKILL, as a killed runc
                // exec's would (containerd's shim kills an exec by its PID,
                // here the stand-in's).
                let signal = match control::recv::<Request>(x.client.as_fd()) {
                    Ok(Request::Signal { signal }) => signal,
                    Ok(Request::Resize { rows, cols }) => {
                        let msg = proto::Resize { rows, cols };
                        return self
                            .send(&proto::encode_json(Kind::Resize, ch, &msg))
                            .map(|()| None);
                    }
                    // Nothing else is asked on an exec's connection.
                    Ok(_) => return Ok(None),
                    Err(_) => {
                        x.hung_up = true;
                        9
                    }
                };
                let frame = proto::encode_json(Kind::Signal, ch, &proto::SignalMsg { signal });
                self.send(&frame)?;
            }
        }
        Ok(None)
    }

    /// Tells the agent that channel `ch`'s `stream` has no reader on the
    /// host any more.
    fn close_output(&mut self, ch: u32, stream: Stream) -> Result<(), VmmError> {
        let msg = proto::ClosedMsg {
            stream: stream as u8,
        };
        self.send(&proto::encode_json(Kind::Closed, ch, &msg))
    }

    /// The agent channel closed: the VM is gone.
    fn vm_gone(&mut self) -> Result<Option<i32>, VmmError> {
        self.vm.wait();
        if self.phase == Phase::Booting {
            // Drain what the console still holds.
            if let Some(c) = self.console.as_mut() {
                let mut rest = Vec::new();
                let _ = c.read_to_end(&mut rest);
                self.console_tail.extend(rest);
            }
            return Err(VmmError::VmEnded {
                console: self.console_text(),
            });
        }
        Err(VmmError::Io {
            step: "reach the guest".into(),
            source: std::io::Error::other("the VM ended"),
        })
    }

    fn on_frame(&mut self, f: Frame) -> Result<Option<i32>, VmmError> {
        if self.plan.console && matches!(f.kind, Kind::Hello | Kind::Started | Kind::Exit) {
            eprintln!(
                "moat: microvm: {:?} after {} ms",
                f.kind,
                self.since.elapsed().as_millis()
            );
        }
        match (f.kind, f.chan) {
            // The first hello was taken before the relay started.
            (Kind::Hello, _) => {}
            (Kind::Started, 0) => {
                let held = f.json::<proto::Started>().is_ok_and(|s| s.held);
                self.phase = Phase::Running;
                if let Some(s) = self.setup.take() {
                    let ready = Setup::Ready {
                        start: self.how.clone(),
                        held,
                    };
                    let _ = control::send(s.as_fd(), &ready);
                }
                if let Some(c) = self.starter.take() {
                    let _ = control::send(c.as_fd(), &Reply::Ok);
                }
                if self.plan.terminal {
                    self.resize();
                }
            }
            (Kind::Error, 0) => {
                let e: proto::ErrorMsg = f.json()?;
                let failed = Setup::Failed {
                    message: e.message.clone(),
                    exec_status: e.exec_status,
                };
                if let Some(s) = self.setup.take() {
                    let _ = control::send(s.as_fd(), &failed);
                } else if let Some(c) = self.starter.take() {
                    let _ = control::send(
                        c.as_fd(),
                        &Reply::Error {
                            message: e.message,
                            exec_status: e.exec_status,
                        },
                    );
                }
                self.shutdown(&proto::Exit {
                    code: 255,
                    ..Default::default()
                });
                return Ok(Some(255));
            }
            (Kind::Stdout, 0) | (Kind::Stderr, 0) => {
                let stream = Stream::of(f.kind);
                let (out, err) = (std::io::stdout(), std::io::stderr());
                let to = match stream {
                    Stream::Out => out.as_fd(),
                    Stream::Err => err.as_fd(),
                };
                if !write_output(&mut self.outputs_closed, stream, to, &f.payload) {
                    self.close_output(0, stream)?;
                }
            }
            (Kind::Mirror, 0) => self.mirror_bytes(&f.payload),
            (Kind::Exit, 0) => {
                let e: proto::Exit = f.json()?;
                self.shutdown(&e);
                return Ok(Some(e.code));
            }
            (Kind::Stdout, ch) if self.forwards.contains_key(&ch) => {
                self.forward_data(ch, &f.payload)?;
            }
            (Kind::Credit, ch) if self.forwards.contains_key(&ch) => {
                let c: proto::CreditMsg = f.json()?;
                if let Some(x) = self.forwards.get_mut(&ch) {
                    x.credit = add_credit(x.credit, c.bytes);
                }
            }
            (Kind::Exit, ch) | (Kind::Error, ch) if self.forwards.contains_key(&ch) => {
                if let Some(x) = self.forwards.get_mut(&ch) {
                    x.ended = true;
                }
                self.forward_out(ch)?;
            }
            (Kind::Stdout, ch) | (Kind::Stderr, ch) => {
                if let Some(x) = self.execs.get_mut(&ch) {
                    let stream = Stream::of(f.kind);
                    let to = match stream {
                        Stream::Out => x.stdout.as_fd(),
                        Stream::Err => x.stderr.as_fd(),
                    };
                    if !write_output(&mut x.outputs_closed, stream, to, &f.payload) {
                        self.close_output(ch, stream)?;
                    }
                }
            }
            // The guest grants what it likes: at worst it holds more of its
            // own process's stdin in its own memory.
            (Kind::Credit, 0) => {
                let c: proto::CreditMsg = f.json()?;
                self.stdin_credit = add_credit(self.stdin_credit, c.bytes);
            }
            (Kind::Credit, ch) => {
                let c: proto::CreditMsg = f.json()?;
                if let Some(x) = self.execs.get_mut(&ch) {
                    x.credit = add_credit(x.credit, c.bytes);
                }
            }
            (Kind::Started, ch) => {
                if let Some(x) = self.execs.get_mut(&ch) {
                    x.started = true;
                    let _ = control::send(x.client.as_fd(), &Reply::Ok);
                }
            }
            (Kind::Updated, ch) => {
                if let Some(c) = self.updates.remove(&ch) {
                    let _ = control::send(c.as_fd(), &Reply::Ok);
                }
            }
            (Kind::Error, ch) if self.updates.contains_key(&ch) => {
                let e: proto::ErrorMsg = f.json()?;
                if let Some(c) = self.updates.remove(&ch) {
                    let _ = control::send(
                        c.as_fd(),
                        &Reply::Error {
                            message: e.message,
                            exec_status: None,
                        },
                    );
                }
            }
            (Kind::Error, ch) => {
                let e: proto::ErrorMsg = f.json()?;
                if let Some(x) = self.execs.remove(&ch) {
                    let _ = control::send(
                        x.client.as_fd(),
                        &Reply::Error {
                            message: e.message,
                            exec_status: e.exec_status,
                        },
                    );
                }
            }
            (Kind::Exit, ch) => {
                let e: proto::Exit = f.json()?;
                if let Some(x) = self.execs.remove(&ch) {
                    let reply = Reply::Exit {
                        code: e.code,
                        oom_kills: e.oom_kills,
                    };
                    let _ = control::send(x.client.as_fd(), &reply);
                }
            }
            // Kinds only the host sends: a confused guest, ignored.
            _ => {}
        }
        Ok(None)
    }

    /// Appends the guest's mirror bytes to the layer's stream file. The
    /// guest writes what it likes there, as it does in its layer: the host
    /// checks all of it when it applies it (`crate::mirror::apply`). A
    /// write that fails drops the rest (the stream then lacks its end, and
    /// the host asks for the same changes again next time).
    fn mirror_bytes(&mut self, bytes: &[u8]) {
        let Some(f) = self.plan.mirror.as_mut() else {
            return;
        };
        self.mirrored += bytes.len() as u64;
        let written = if self.mirrored > MIRROR_MAX {
            Err(std::io::Error::other("more than the layer can hold"))
        } else {
            f.write_all(bytes)
        };
        if let Err(e) = written {
            eprintln!("moat: microvm: cannot keep the root's mirror: {e}");
            self.plan.mirror = None;
        }
    }

    /// Records the end and stops the VM. Nothing in the guest outlives the
    /// workload: its disks are read-only and its writable layer is the
    /// guest's memory, and the agent sent `Exit` only after the output was
    /// drained. So QEMU is killed at once rather than asked to power off
    /// (a guest's shutdown under TCG took 100-200 ms).
    fn shutdown(&mut self, e: &proto::Exit) {
        self.oom_killed = e.oom_kills > 0;
        let _ = self
            .plan
            .events
            .write_all(&serde_json::to_vec(e).unwrap_or_default());
        let _ = self.plan.events.flush();
        self.stop_vm();
    }

    fn on_signal(&mut self, sig: i32) -> Result<Option<i32>, VmmError> {
        match Signal::try_from(sig) {
            Ok(Signal::SIGCHLD) => {
                // The agent channel reports the VM's end too (EOF); that
                // path says why.
                self.vm.reap_if_ended();
            }
            Ok(Signal::SIGPIPE) => {}
            Ok(Signal::SIGWINCH) => self.resize(),
            Ok(s) => {
                if self.phase == Phase::Running || self.phase == Phase::Starting {
                    let frame =
                        proto::encode_json(Kind::Signal, 0, &proto::SignalMsg { signal: s as i32 });
                    self.send(&frame)?;
                } else {
                    // Nothing runs yet: the signal ends the container.
                    self.stop_vm();
                    return Ok(Some(128 + sig));
                }
            }
            Err(_) => {}
        }
        Ok(None)
    }

    fn resize(&mut self) {
        if !self.plan.terminal {
            return;
        }
        if let Ok(ws) = rustix::termios::tcgetwinsize(std::io::stdin()) {
            let frame = proto::encode_json(
                Kind::Resize,
                0,
                &proto::Resize {
                    rows: ws.ws_row,
                    cols: ws.ws_col,
                },
            );
            let _ = self.send(&frame);
        }
    }

    fn accept(&mut self) -> Result<(), VmmError> {
        let Some(client) = accept_one(self.listener.as_fd(), false, "take a control client")?
        else {
            return Ok(());
        };
        let req: Request = match control::recv(client.as_fd()) {
            Ok(r) => r,
            Err(_) => return Ok(()),
        };
        match req {
            Request::Start => {
                if self.phase != Phase::Created {
                    let _ = control::send(
                        client.as_fd(),
                        &Reply::Error {
                            message: "the container is not in the created state".into(),
                            exec_status: None,
                        },
                    );
                    return Ok(());
                }
                self.starter = Some(client);
                self.send_run()?;
            }
            Request::Signal { signal } => {
                let frame = proto::encode_json(Kind::Signal, 0, &proto::SignalMsg { signal });
                let _ = control::send(client.as_fd(), &Reply::Ok);
                if self.phase == Phase::Running || self.phase == Phase::Starting {
                    self.send(&frame)?;
                } else if signal == 9 || signal == 15 {
                    self.stop_vm();
                    std::process::exit(128 + signal);
                }
            }
            // Attached or detached, the client holds the connection until
            // the process ends (a detached exec's stand-in does).
            Request::Exec { request, .. } => {
                let frame = |ch| proto::encode_json(Kind::Exec, ch, &request);
                self.start_exec(client, frame)?
            }
            // A pod's container: relayed as an exec's process is.
            Request::Join { request } => {
                let frame = |ch| proto::encode_json(Kind::Join, ch, &request);
                self.start_exec(client, frame)?
            }
            Request::Update {
                resources,
                container,
            } => self.update(client, resources, container, None)?,
            // A joined container's: its cgroup in the guest. The VM's own
            // freezes on the host (its cgroup); in the guest too only when
            // its writes are mirrored (the agent mirrors them once frozen).
            Request::Freeze { on, container } => {
                self.update(client, serde_json::Value::Null, container, Some(on))?
            }
            // Only on a joined container's connection.
            Request::Resize { .. } => {}
        }
        Ok(())
    }

    /// A connection to the pod's `localhost` (listener `i`): relayed to
    /// where it was made to, in the guest, once the workload runs
    /// (before, or after, it is closed at once: nothing there listens).
    fn accept_forward(&mut self, i: usize) -> Result<(), VmmError> {
        let Some(l) = self.forward_listeners.get(i) else {
            return Ok(());
        };
        let Some(conn) = accept_one(l.as_fd(), true, "take a forwarded connection")? else {
            return Ok(());
        };
        if self.phase != Phase::Running {
            return Ok(());
        }
        let Ok(addr) = crate::portfwd::destination(conn.as_fd()) else {
            return Ok(());
        };
        let ch = self.next_chan;
        self.next_chan += 1;
        self.forwards.insert(
            ch,
            Forward {
                conn: File::from(conn),
                credit: proto::STDIN_WINDOW,
                reading: true,
                pending: VecDeque::new(),
                owed: 0,
                guest_eof: false,
                ended: false,
            },
        );
        let frame = proto::encode_json(Kind::Forward, ch, &proto::ForwardRequest { addr });
        self.send(&frame)
    }

    /// What the host's end of connection `ch` sent, to the guest (an
    /// empty frame: its end of file; an error drops the connection).
    fn forward_in(&mut self, ch: u32, buf: &mut [u8]) -> Result<(), VmmError> {
        let Some(x) = self.forwards.get_mut(&ch) else {
            return Ok(());
        };
        let room = x.credit.min(buf.len());
        let n = match x.conn.read(&mut buf[..room]) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return Ok(()),
            Err(_) => return self.drop_forward(ch),
        };
        x.credit -= n;
        if n == 0 {
            x.reading = false;
        }
        let frame = proto::encode(Kind::Stdin, ch, &buf[..n]);
        self.send(&frame)
    }

    /// The guest's bytes of connection `ch` (empty: its end of file).
    /// An agent that sends more than it was credited is cut off: nothing
    /// it sends makes the host hold more than a window per connection.
    fn forward_data(&mut self, ch: u32, data: &[u8]) -> Result<(), VmmError> {
        let Some(x) = self.forwards.get_mut(&ch) else {
            return Ok(());
        };
        if data.is_empty() {
            x.guest_eof = true;
        } else if x.pending.len() + data.len() > proto::STDIN_WINDOW {
            return self.drop_forward(ch);
        } else {
            x.pending.extend(data);
        }
        self.forward_out(ch)
    }

    /// Writes what connection `ch` takes now of the guest's bytes and
    /// credits them back; passes the guest's end of file on once all is
    /// written, and lets the connection go once the agent is done too.
    fn forward_out(&mut self, ch: u32) -> Result<(), VmmError> {
        let Some(x) = self.forwards.get_mut(&ch) else {
            return Ok(());
        };
        while !x.pending.is_empty() {
            let (head, _) = x.pending.as_slices();
            match x.conn.write(head) {
                Ok(n) => {
                    x.pending.drain(..n);
                    x.owed += n;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return self.drop_forward(ch),
            }
        }
        let credit = proto::credit_due(x.owed as u64, x.pending.is_empty())
            .then(|| std::mem::take(&mut x.owed));
        let done = x.pending.is_empty();
        if done && x.guest_eof {
            let _ = rustix::net::shutdown(&x.conn, rustix::net::Shutdown::Write);
        }
        if done && x.ended {
            self.forwards.remove(&ch);
        } else if let Some(bytes) = credit {
            let msg = proto::CreditMsg {
                bytes: bytes as u64,
            };
            return self.send(&proto::encode_json(Kind::Credit, ch, &msg));
        }
        Ok(())
    }

    /// Drops connection `ch` (its host end failed, or the guest sent more
    /// than it may); the agent drops its end ([`Kind::Closed`]).
    fn drop_forward(&mut self, ch: u32) -> Result<(), VmmError> {
        if self.forwards.remove(&ch).is_some() {
            self.close_output(ch, Stream::Out)?;
        }
        Ok(())
    }

    /// New limits for the container in the guest: merged into the run's
    /// config before it starts (the guest creates the container then),
    /// sent to the agent while it runs.
    fn update(
        &mut self,
        client: OwnedFd,
        resources: serde_json::Value,
        container: Option<String>,
        freeze: Option<bool>,
    ) -> Result<(), VmmError> {
        match self.phase {
            Phase::Created if container.is_none() => {
                merge_json(&mut self.plan.run.config["linux"]["resources"], &resources);
                let _ = control::send(client.as_fd(), &Reply::Ok);
                Ok(())
            }
            Phase::Starting | Phase::Running => {
                let ch = self.next_chan;
                self.next_chan += 1;
                self.updates.insert(ch, client);
                let mirror = container.is_none() && freeze == Some(true);
                let frame = proto::encode_json(
                    Kind::Update,
                    ch,
                    &proto::UpdateRequest {
                        resources,
                        container,
                        freeze,
                        mirror,
                    },
                );
                self.send(&frame)
            }
            _ => {
                let _ = control::send(
                    client.as_fd(),
                    &Reply::Error {
                        message: "the container is not running".into(),
                        exec_status: None,
                    },
                );
                Ok(())
            }
        }
    }

    /// Takes an exec's (or a joined container's) stdio from `client` and
    /// sends its request, `frame` on the channel it gets.
    fn start_exec(
        &mut self,
        client: OwnedFd,
        frame: impl FnOnce(u32) -> Vec<u8>,
    ) -> Result<(), VmmError> {
        let fds: Result<Vec<OwnedFd>, _> =
            (0..3).map(|_| control::recv_fd(client.as_fd())).collect();
        let Ok(mut fds) = fds else {
            return Ok(());
        };
        if self.phase != Phase::Running {
            let _ = control::send(
                client.as_fd(),
                &Reply::Error {
                    message: "the container is not running".into(),
                    exec_status: None,
                },
            );
            return Ok(());
        }
        let (Some(stderr), Some(stdout), Some(stdin)) = (fds.pop(), fds.pop(), fds.pop()) else {
            return Ok(());
        };
        let (stderr, stdout, stdin) = (
            File::from(stderr),
            File::from(stdout),
            Some(File::from(stdin)),
        );
        let ch = self.next_chan;
        self.next_chan += 1;
        self.execs.insert(
            ch,
            ExecSession {
                client,
                stdin,
                credit: proto::STDIN_WINDOW,
                stdout,
                stderr,
                hung_up: false,
                outputs_closed: 0,
                started: false,
            },
        );
        self.send(&frame(ch))
    }
}

/// A connection from `listener` (non-blocking if asked), or `None` when
/// none waits (or it went before it was taken).
fn accept_one(
    listener: BorrowedFd,
    nonblocking: bool,
    step: &str,
) -> Result<Option<OwnedFd>, VmmError> {
    use nix::sys::socket::{accept4, SockFlag};
    let mut flags = SockFlag::SOCK_CLOEXEC;
    if nonblocking {
        flags |= SockFlag::SOCK_NONBLOCK;
    }
    let Ok(raw) = accept4(listener.as_raw_fd(), flags) else {
        return Ok(None);
    };
    let conn = moat_sys::process::dup_raw_fd(raw).map_err(|e| VmmError::Io {
        step: step.into(),
        source: e,
    })?;
    let _ = nix::unistd::close(raw);
    Ok(Some(conn))
}

/// Makes the VMM's cgroup see an OOM kill, as the guest's container did:
/// engines learn of one from the container's cgroup on the host (Docker's
/// `OOMKilled`, Kubernetes' `OOMKilled` reason: containerd's shim watches
/// its `memory.oom_control` or `memory.events`), which the guest's never
/// reach. Once the VM is gone, a child of this process touches memory up
/// to a little past the cgroup's `limit`, and the host's kernel OOM-kills
/// it there (the largest process left; this one holds a few MiB). Where
/// the cgroup kills as a group (`memory.oom.group`), this process goes
/// too, with SIGKILL: as a runc container's processes all do. Bounded:
/// a child that was not killed (no limit after all) stops past it. Never
/// at the host's expense: only when the host has that much available
/// (`meminfo`, the host's `/proc/meminfo`) and a margin (QEMU's memory is
/// freed by then); else the engines are not told, as before.
pub fn echo_oom(one: &moat_sys::process::OneThread, limit: u64, meminfo: Option<&File>) {
    const STEP: usize = 1 << 20;
    const MARGIN: u64 = 512 << 20;
    let most = usize::try_from(limit)
        .unwrap_or(usize::MAX)
        .saturating_add(64 * STEP);
    let available = meminfo.and_then(mem_available);
    if available.is_none_or(|a| a < (most as u64).saturating_add(MARGIN)) {
        return;
    }
    let child = one.fork(0, |_| {
        let mut held: Vec<Vec<u8>> = Vec::new();
        let mut total = 0usize;
        while total < most {
            // Non-zero, so that every page is written (and charged).
            held.push(vec![1u8; STEP]);
            total += STEP;
        }
        std::hint::black_box(&held);
        0
    });
    if let Ok(pid) = child {
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
    }
}

/// `MemAvailable` of the `/proc/meminfo` open as `f`, in bytes.
fn mem_available(f: &File) -> Option<u64> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 8192];
    let n = f.read_at(&mut buf, 0).ok()?;
    parse_mem_available(&String::from_utf8_lossy(&buf[..n]))
}

/// `MemAvailable: N kB`'s N, in bytes.
fn parse_mem_available(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

use moat_core::spec::merge_json;

/// A process's output stream, as [`proto::ClosedMsg`] numbers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Out = 1,
    Err = 2,
}

impl Stream {
    /// The stream a `Stdout` or `Stderr` frame carries.
    fn of(kind: Kind) -> Stream {
        if kind == Kind::Stdout {
            Stream::Out
        } else {
            Stream::Err
        }
    }
}

/// Writes a process's output to its host end `to`, unless that end took
/// no more before (`closed`: a bit per [`Stream`]); false when it has just
/// refused, and the agent is to be told ([`Kind::Closed`]).
fn write_output(closed: &mut u8, stream: Stream, to: BorrowedFd, data: &[u8]) -> bool {
    let bit = 1u8 << stream as u8;
    if *closed & bit != 0 || write_all(to, data) {
        return true;
    }
    *closed |= bit;
    false
}

/// Writes all of `data`; false when the descriptor takes no more (a pipe
/// whose reader is gone: `EPIPE`, or any other error).
fn write_all(fd: BorrowedFd, mut data: &[u8]) -> bool {
    while !data.is_empty() {
        match nix::unistd::write(fd, data) {
            Ok(0) => return false,
            Ok(n) => data = &data[n..],
            Err(nix::Error::EINTR) | Err(nix::Error::EAGAIN) => {}
            Err(_) => return false,
        }
    }
    true
}

#[derive(Debug, Clone, Copy)]
enum Slot {
    Agent,
    /// The agent channel takes bytes again (polled while some wait).
    AgentWritable,
    Listener,
    Signal,
    Console,
    Stdin,
    ExecStdin(u32),
    ExecClient(u32),
    ForwardListener(usize),
    /// A forwarded connection has bytes for the guest.
    ForwardIn(u32),
    /// It takes the guest's bytes again.
    ForwardOut(u32),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_update_merges_into_the_configs_resources() {
        let mut r =
            serde_json::json!({"memory": {"limit": 100, "swap": 200}, "pids": {"limit": 5}});
        merge_json(
            &mut r,
            &serde_json::json!({"memory": {"limit": 50, "reservation": null}, "cpu": {"shares": 2}}),
        );
        assert_eq!(
            r,
            serde_json::json!({"memory": {"limit": 50, "swap": 200}, "pids": {"limit": 5}, "cpu": {"shares": 2}})
        );
    }

    #[test]
    fn mem_available_is_read_from_meminfo() {
        let text = "MemTotal:       24683756 kB\nMemFree:        22568760 kB\nMemAvailable:   23881628 kB\nBuffers:  1 kB\n";
        assert_eq!(parse_mem_available(text), Some(23881628 * 1024));
        assert_eq!(parse_mem_available("MemFree: 5 kB\n"), None);
        // The real one, as the VMM process reads it.
        let f = File::open("/proc/meminfo").unwrap();
        assert!(mem_available(&f).is_some_and(|b| b > 0));
    }

    #[test]
    fn credit_never_passes_the_window() {
        assert_eq!(add_credit(0, 100), 100);
        assert_eq!(add_credit(proto::STDIN_WINDOW - 1, 1), proto::STDIN_WINDOW);
        // A guest granting more than it was sent gains nothing.
        assert_eq!(add_credit(10, u64::MAX), proto::STDIN_WINDOW);
    }
}
