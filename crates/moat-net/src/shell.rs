//! The IO shell: one thread that drives a [`Stack`] from the TAP device and
//! the host's sockets with `poll(2)`, plus short-lived threads for name
//! resolution (getaddrinfo blocks).
//!
//! Who owns what: the shell owns the TAP fd, every host socket it opened
//! for a flow, the listeners of published ports and a wake-up pipe. All are
//! closed when [`serve`] returns: when the TAP device goes away (the
//! workload's network namespace died), or when [`StopHandle::stop`] is
//! called. Bytes move between smoltcp's buffers and host sockets without
//! another buffer in between: the shell reads from a host socket only as
//! much as the flow's send buffer can take, and writes to it only what the
//! workload sent, so a side that does not read slows the other down
//! instead of filling memory.
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, TcpListener, ToSocketAddrs, UdpSocket};
use std::os::fd::OwnedFd;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use rustix::io::Errno;

use crate::config::{Limits, NetConfig};
use crate::policy::{Egress, Policy};
use crate::publish::{Proto, Publish};
use crate::stack::{FlowId, ResolveError, Stack, StackError, Stats};
use crate::stream;

/// Resolves names on the host side. Injected so tests can fake it; called
/// on a thread of its own, so it may block.
pub trait Resolver: Send + Sync + 'static {
    fn resolve(&self, name: &str) -> Result<Vec<IpAddr>, ResolveError>;
}

/// The host's resolver (getaddrinfo, so /etc/hosts and resolv.conf of the
/// namespace the stack runs in).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn resolve(&self, name: &str) -> Result<Vec<IpAddr>, ResolveError> {
        match (name, 0u16).to_socket_addrs() {
            Ok(addrs) => Ok(addrs.map(|a| a.ip()).collect()),
            // getaddrinfo's codes do not come through std: a name that does
            // not resolve is reported as not found.
            Err(_) => Err(ResolveError::NotFound),
        }
    }
}

/// What [`serve`] needs besides the TAP device.
pub struct ServeConfig {
    pub net: NetConfig,
    pub limits: Limits,
    pub policy: Policy,
    pub publish: Vec<Publish>,
    /// A host connection not made within this is refused to the workload.
    pub connect_timeout: Duration,
    /// Addresses the workload may never reach (the host's own); `None`:
    /// the addresses of the interfaces where `serve` runs.
    pub host_addrs: Option<Vec<IpAddr>>,
    /// A pidfd of the workload's first process: `serve` returns when it
    /// exits. (The TAP fd keeps the workload's network namespace alive, so
    /// the device never goes away by itself while `serve` holds it.)
    pub exit_with: Option<OwnedFd>,
}

impl ServeConfig {
    pub fn new(policy: Policy) -> ServeConfig {
        ServeConfig {
            net: NetConfig::default(),
            limits: Limits::default(),
            policy,
            publish: Vec::new(),
            connect_timeout: Duration::from_secs(15),
            host_addrs: None,
            exit_with: None,
        }
    }
}

/// One failed step of [`serve`].
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("building the network stack")]
    Stack(#[source] StackError),
    #[error("cannot list the host's addresses")]
    HostAddrs(#[source] nix::Error),
    #[error("cannot listen on {addr} for a published port")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot make the wake-up pipe")]
    Pipe(#[source] Errno),
    #[error("waiting for the TAP device and the sockets")]
    Poll(#[source] Errno),
    #[error("cannot read from the TAP device")]
    ReadTap(#[source] Errno),
    #[error("cannot read from the frame stream")]
    ReadStream(#[source] Errno),
    #[error("cannot write to the frame stream")]
    WriteStream(#[source] Errno),
    #[error("cannot read random bytes for TCP sequence numbers")]
    Random(#[source] Errno),
}

/// Why [`serve`] returned without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The TAP device went away (its namespace or the workload died), or
    /// the peer of a frame stream closed it.
    TapGone,
    /// [`StopHandle::stop`] was called or the handle dropped.
    Stopped,
    /// The process of [`ServeConfig::exit_with`] exited.
    WorkloadExited,
}

/// What the serving thread last reported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub stats: Stats,
    pub tcp_flows: usize,
    pub udp_flows: usize,
    /// Host sockets open for flows (not counting listeners).
    pub host_sockets: usize,
    /// Host peers of published UDP ports with a flow open.
    pub udp_inbound: usize,
}

/// The other end of a serving stack: stops it, reads its counters.
pub struct StopHandle {
    wake: Option<OwnedFd>,
    snapshot: Arc<Mutex<Snapshot>>,
}

impl StopHandle {
    /// Asks `serve` to return (it closes everything it owns first).
    pub fn stop(&mut self) {
        self.wake.take();
    }

    pub fn snapshot(&self) -> Snapshot {
        self.snapshot.lock().map(|s| *s).unwrap_or_default()
    }
}

/// What `serve` watches to know it must stop.
pub struct Control {
    stop: OwnedFd,
    snapshot: Arc<Mutex<Snapshot>>,
}

/// A pair: give [`Control`] to [`serve`], keep the [`StopHandle`].
pub fn control() -> Result<(Control, StopHandle), ServeError> {
    let (r, w) =
        rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(ServeError::Pipe)?;
    let snapshot = Arc::new(Mutex::new(Snapshot::default()));
    Ok((
        Control {
            stop: r,
            snapshot: snapshot.clone(),
        },
        StopHandle {
            wake: Some(w),
            snapshot,
        },
    ))
}

/// The addresses of this network namespace's interfaces.
pub fn host_addresses() -> Result<Vec<IpAddr>, nix::Error> {
    let mut out = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs()? {
        let Some(addr) = ifa.address else { continue };
        if let Some(v4) = addr.as_sockaddr_in() {
            out.push(IpAddr::V4(v4.ip()));
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            out.push(IpAddr::V6(v6.ip()));
        }
    }
    Ok(out)
}

struct HostTcp {
    fd: OwnedFd,
    /// Set while connecting: the deadline.
    connecting: Option<Instant>,
    /// The host sent FIN (or the flow can take no more).
    eof: bool,
}

/// Where the host side of a published port listens.
enum Listener {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

impl std::os::fd::AsFd for Listener {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Listener::Tcp(l) => l.as_fd(),
            Listener::Udp(u) => u.as_fd(),
        }
    }
}

/// Stack size of a resolver thread (at most `Limits::max_dns_pending` run
/// at once).
pub const RESOLVER_STACK: usize = 512 * 1024;

/// Frames read from the TAP per round, before smoltcp runs.
const TAP_BATCH: usize = 64;

/// The workload's end of the link: a TAP device, or a stream socket
/// carrying length-prefixed frames ([`crate::stream`]; a VMM's network
/// device, e.g. QEMU's `-netdev stream`).
pub enum Link {
    Tap(OwnedFd),
    Stream(OwnedFd),
}

/// A stream link's framing state.
struct StreamIo {
    decoder: stream::Decoder,
    encoder: stream::Encoder,
}

struct Shell {
    stack: Stack,
    tap: OwnedFd,
    /// Set when the link is a stream, not a TAP device.
    stream: Option<StreamIo>,
    control: Control,
    wake_r: OwnedFd,
    wake_w: Arc<OwnedFd>,
    resolver: Arc<dyn Resolver>,
    results: mpsc::Receiver<(u64, Result<Vec<IpAddr>, ResolveError>)>,
    results_tx: mpsc::Sender<(u64, Result<Vec<IpAddr>, ResolveError>)>,
    resolving: Vec<JoinHandle<()>>,
    listeners: Vec<(Listener, Publish)>,
    tcp: HashMap<FlowId, HostTcp>,
    udp: HashMap<FlowId, OwnedFd>,
    /// Flows of published UDP ports: the listener and the host peer.
    udp_in: HashMap<FlowId, (usize, SocketAddr)>,
    udp_peers: HashMap<(usize, SocketAddr), FlowId>,
    connect_timeout: Duration,
    exit_with: Option<OwnedFd>,
    frame: Vec<u8>,
}

/// What one entry of the poll set is for.
#[derive(Clone, Copy)]
enum Slot {
    Tap,
    Stop,
    Exit,
    Wake,
    Listener(usize),
    Tcp(FlowId),
    Udp(FlowId),
}

/// Runs the network of one workload until its TAP device goes away or
/// `control`'s handle stops it. `tap` is the TAP device's fd (from
/// [`crate::tap::create_tap`], or passed from the process that made it).
pub fn serve(
    tap: OwnedFd,
    cfg: ServeConfig,
    resolver: Arc<dyn Resolver>,
    control: Control,
) -> Result<Ended, ServeError> {
    serve_link(Link::Tap(tap), cfg, resolver, control)
}

/// [`serve`] over either kind of [`Link`]; a stream link ends like a
/// removed TAP device when its peer closes it.
pub fn serve_link(
    link: Link,
    cfg: ServeConfig,
    resolver: Arc<dyn Resolver>,
    control: Control,
) -> Result<Ended, ServeError> {
    let host_addrs = match cfg.host_addrs {
        Some(a) => a,
        None => host_addresses().map_err(ServeError::HostAddrs)?,
    };
    let listeners = listen_published(&cfg.publish)?;
    let mut seed = [0u8; 8];
    rustix::rand::getrandom(&mut seed, rustix::rand::GetRandomFlags::empty())
        .map_err(ServeError::Random)?;
    let egress = Egress::new(cfg.policy, host_addrs, cfg.limits.learned_addrs);
    let max_frame = cfg.net.max_frame();
    let stack = Stack::new(
        cfg.net,
        egress,
        cfg.limits,
        Instant::now(),
        u64::from_ne_bytes(seed),
    )
    .map_err(ServeError::Stack)?;
    let (tap, stream) = match link {
        Link::Tap(fd) => (fd, None),
        Link::Stream(fd) => (
            fd,
            Some(StreamIo {
                decoder: stream::Decoder::new(max_frame),
                encoder: stream::Encoder::new(),
            }),
        ),
    };
    rustix::io::ioctl_fionbio(&tap, true).map_err(ServeError::ReadTap)?;
    let (wake_r, wake_w) = rustix::pipe::pipe_with(
        rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK,
    )
    .map_err(ServeError::Pipe)?;
    let (results_tx, results) = mpsc::channel();
    let mut shell = Shell {
        stack,
        tap,
        stream,
        control,
        wake_r,
        wake_w: Arc::new(wake_w),
        resolver,
        results,
        results_tx,
        resolving: Vec::new(),
        listeners,
        tcp: HashMap::new(),
        udp: HashMap::new(),
        udp_in: HashMap::new(),
        udp_peers: HashMap::new(),
        connect_timeout: cfg.connect_timeout,
        exit_with: cfg.exit_with,
        frame: vec![0u8; max_frame],
    };
    let ended = shell.run();
    shell.finish();
    ended
}

fn listen_published(publish: &[Publish]) -> Result<Vec<(Listener, Publish)>, ServeError> {
    let mut out = Vec::new();
    for p in publish {
        let err = |source| ServeError::Listen {
            addr: p.host,
            source,
        };
        let l = match p.proto {
            Proto::Tcp => TcpListener::bind(p.host)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .map(Listener::Tcp),
            Proto::Udp => UdpSocket::bind(p.host)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .map(Listener::Udp),
        }
        .map_err(err)?;
        out.push((l, *p));
    }
    Ok(out)
}

impl Shell {
    fn run(&mut self) -> Result<Ended, ServeError> {
        loop {
            let now = Instant::now();
            let timeout = self.timeout(now).map(|d| rustix::fs::Timespec {
                tv_sec: d.as_secs() as i64,
                tv_nsec: i64::from(d.subsec_nanos()),
            });
            let (mut fds, slots) = self.poll_set();
            match rustix::event::poll(&mut fds, timeout.as_ref()) {
                Ok(_) | Err(Errno::INTR) => {}
                Err(e) => return Err(ServeError::Poll(e)),
            }
            let ready: Vec<(Slot, PollFlags)> = fds
                .iter()
                .zip(slots)
                .filter(|(f, _)| !f.revents().is_empty())
                .map(|(f, s)| (s, f.revents()))
                .collect();
            drop(fds);
            let now = Instant::now();
            for (slot, ev) in ready {
                if let Some(ended) = self.ready(now, slot, ev)? {
                    return Ok(ended);
                }
            }
            self.check_deadlines(now);
            self.stack.poll(now);
            self.requests(now);
            self.write_frames();
            self.report();
        }
    }

    fn poll_set(&self) -> (Vec<PollFd<'_>>, Vec<Slot>) {
        let mut fds = Vec::with_capacity(3 + self.tcp.len() + self.udp.len());
        let mut slots = Vec::with_capacity(fds.capacity());
        let mut link = PollFlags::IN;
        if self.stream.as_ref().is_some_and(|s| s.encoder.busy()) {
            link |= PollFlags::OUT;
        }
        fds.push(PollFd::new(&self.tap, link));
        slots.push(Slot::Tap);
        fds.push(PollFd::new(&self.control.stop, PollFlags::IN));
        slots.push(Slot::Stop);
        fds.push(PollFd::new(&self.wake_r, PollFlags::IN));
        slots.push(Slot::Wake);
        if let Some(pidfd) = &self.exit_with {
            fds.push(PollFd::new(pidfd, PollFlags::IN));
            slots.push(Slot::Exit);
        }
        for (i, (l, _)) in self.listeners.iter().enumerate() {
            fds.push(PollFd::new(l, PollFlags::IN));
            slots.push(Slot::Listener(i));
        }
        for (id, h) in &self.tcp {
            let mut ev = PollFlags::empty();
            if h.connecting.is_some() {
                ev |= PollFlags::OUT;
            } else {
                if !h.eof && self.stack.tcp_send_capacity(*id) > 0 {
                    ev |= PollFlags::IN;
                }
                if self.stack.tcp_recv_queue(*id) > 0 {
                    ev |= PollFlags::OUT;
                }
            }
            fds.push(PollFd::new(&h.fd, ev));
            slots.push(Slot::Tcp(*id));
        }
        for (id, fd) in &self.udp {
            fds.push(PollFd::new(fd, PollFlags::IN));
            slots.push(Slot::Udp(*id));
        }
        (fds, slots)
    }

    fn timeout(&mut self, now: Instant) -> Option<Duration> {
        let connect = self
            .tcp
            .values()
            .filter_map(|h| h.connecting)
            .map(|d| d.saturating_duration_since(now))
            .min();
        match (self.stack.poll_delay(now), connect) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn ready(
        &mut self,
        now: Instant,
        slot: Slot,
        ev: PollFlags,
    ) -> Result<Option<Ended>, ServeError> {
        match slot {
            Slot::Tap if self.stream.is_some() => {
                // OUT: the held part of a frame can go; `write_frames`
                // sends it after this round.
                if ev.intersects(PollFlags::IN | PollFlags::HUP | PollFlags::ERR) {
                    return self.read_stream(now);
                }
            }
            Slot::Tap => return self.read_tap(now),
            Slot::Stop => return Ok(Some(Ended::Stopped)),
            Slot::Exit => return Ok(Some(Ended::WorkloadExited)),
            Slot::Wake => self.resolved(now),
            Slot::Listener(i) => self.listener_ready(now, i),
            Slot::Tcp(id) => self.tcp_ready(now, id, ev),
            Slot::Udp(id) => self.udp_ready(now, id),
        }
        Ok(None)
    }

    /// Reads a batch of frames into the stack; `TapGone` when the device
    /// was deleted under us.
    fn read_tap(&mut self, now: Instant) -> Result<Option<Ended>, ServeError> {
        for _ in 0..TAP_BATCH {
            match rustix::io::read(&self.tap, &mut self.frame) {
                Ok(0) => return Ok(Some(Ended::TapGone)),
                Ok(n) => self.stack.receive_frame(now, &self.frame[..n]),
                Err(Errno::AGAIN) | Err(Errno::INTR) => break,
                // The device was unregistered (its namespace is gone).
                Err(Errno::BADFD) | Err(Errno::IO) | Err(Errno::NODEV) => {
                    return Ok(Some(Ended::TapGone))
                }
                Err(e) => return Err(ServeError::ReadTap(e)),
            }
        }
        Ok(None)
    }

    /// Reads what the stream holds (up to a batch of reads) and passes
    /// each complete frame to the stack; `TapGone` at the peer's EOF.
    fn read_stream(&mut self, now: Instant) -> Result<Option<Ended>, ServeError> {
        let Some(s) = self.stream.as_mut() else {
            return Ok(None);
        };
        for _ in 0..TAP_BATCH {
            match rustix::io::read(&self.tap, s.decoder.space()) {
                Ok(0) => return Ok(Some(Ended::TapGone)),
                Ok(n) => {
                    let stack = &mut self.stack;
                    s.decoder.filled(n, |f| stack.receive_frame(now, f));
                }
                Err(Errno::AGAIN) | Err(Errno::INTR) => break,
                Err(Errno::CONNRESET) | Err(Errno::PIPE) => return Ok(Some(Ended::TapGone)),
                Err(e) => return Err(ServeError::ReadStream(e)),
            }
        }
        Ok(None)
    }

    /// Frames to the stream while the socket takes them; a frame it took
    /// only part of is held and the rest wait in the stack's queue.
    fn write_stream(&mut self) -> Result<(), ServeError> {
        let Some(s) = self.stream.as_mut() else {
            return Ok(());
        };
        let tap = &self.tap;
        let write = |bufs: &[&[u8]]| -> std::io::Result<usize> {
            let io: Vec<std::io::IoSlice<'_>> =
                bufs.iter().map(|b| std::io::IoSlice::new(b)).collect();
            match rustix::io::writev(tap, &io) {
                Ok(n) => Ok(n),
                Err(Errno::AGAIN) | Err(Errno::INTR) => Ok(0),
                Err(e) => Err(e.into()),
            }
        };
        let werr = |e: std::io::Error| {
            ServeError::WriteStream(Errno::from_io_error(&e).unwrap_or(Errno::IO))
        };
        if !s.encoder.flush(|rest| write(&[rest])).map_err(werr)? {
            return Ok(());
        }
        while let Some(f) = self.stack.pop_frame() {
            let sent = s.encoder.send(&f, |h, b| write(&[h, b])).map_err(werr);
            self.stack.recycle(f);
            if sent? == stream::Sent::Held {
                break;
            }
        }
        Ok(())
    }

    fn write_frames(&mut self) {
        if self.stream.is_some() {
            // A peer that closed the stream is seen by the next read.
            let _ = self.write_stream();
            return;
        }
        while let Some(f) = self.stack.pop_frame() {
            // A TAP write does not block; a frame the kernel refuses is lost
            // like any frame on a link (TCP retransmits).
            let _ = rustix::io::write(&self.tap, &f);
            self.stack.recycle(f);
        }
    }

    fn report(&self) {
        if let Ok(mut s) = self.control.snapshot.lock() {
            *s = Snapshot {
                stats: self.stack.stats(),
                tcp_flows: self.stack.tcp_flows(),
                udp_flows: self.stack.udp_flows(),
                host_sockets: self.tcp.len() + self.udp.len(),
                udp_inbound: self.udp_in.len(),
            };
        }
    }

    /// Drops every host socket and waits for resolver threads.
    fn finish(&mut self) {
        self.tcp.clear();
        self.udp.clear();
        self.udp_in.clear();
        self.udp_peers.clear();
        self.listeners.clear();
        self.report();
        for t in self.resolving.drain(..) {
            let _ = t.join();
        }
    }
}

mod flows;
