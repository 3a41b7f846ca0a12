//! The sans-IO core: the workload's Ethernet link on one side, *requests* to
//! and *events* from the IO shell on the other. No OS call happens here.
//!
//! - Frames from the TAP go in through [`Stack::receive_frame`]; frames for
//!   the TAP come out of [`Stack::pop_frame`].
//! - TCP: a SYN to a destination the policy allows becomes
//!   [`Request::TcpConnect`]; the SYN is held until the shell answers
//!   [`Stack::tcp_connected`] (then smoltcp completes the handshake with the
//!   workload) or [`Stack::tcp_connect_failed`] (then the workload gets a
//!   reset, i.e. "connection refused"). A refused destination gets the reset
//!   at once. Bytes move with [`Stack::tcp_recv_with`] and
//!   [`Stack::tcp_send_with`], straight between smoltcp's buffers and the
//!   host socket.
//! - UDP never enters smoltcp: each datagram to an allowed destination
//!   becomes [`Request::UdpSend`]; answers come back through
//!   [`Stack::udp_received`]. A refused one gets ICMP "administratively
//!   prohibited".
//! - DNS to the gateway's port 53 is answered here for allowed names, after
//!   [`Request::Resolve`] and [`Stack::resolved`]; other names get NXDOMAIN.
//! - ICMP echo to the gateway is answered; to any other address the
//!   workload gets ICMP "administratively prohibited" (never a fake reply).
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, IpListenEndpoint};

use crate::config::{Limits, NetConfig, FREE_FRAMES, MAX_SYN_FRAME};
use crate::dns::{self, Query, Rcode};
use crate::frame::{self, Frame, Kind, Unreachable};
use crate::policy::{canonical, Egress};
use crate::ratelimit::RateLimit;

/// One flow (TCP connection or UDP pair), never reused in a stack's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowId(pub u64);

impl std::fmt::Display for FlowId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "flow {}", self.0)
    }
}

/// What the core asks of the IO shell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Open a TCP connection to `dst` for `flow`; answer with
    /// [`Stack::tcp_connected`] or [`Stack::tcp_connect_failed`].
    TcpConnect { flow: FlowId, dst: SocketAddr },
    /// The workload will send no more on `flow`: shut the host socket's
    /// write side.
    TcpShutdown { flow: FlowId },
    /// `flow` is over: drop the host socket (with a reset if `reset`).
    TcpClose { flow: FlowId, reset: bool },
    /// Send `payload` to `dst` from the host socket of `flow` (open it on
    /// first use, connected to `dst`).
    UdpSend {
        flow: FlowId,
        dst: SocketAddr,
        payload: Vec<u8>,
    },
    /// `flow` was idle too long: drop its host socket.
    UdpClose { flow: FlowId },
    /// Resolve `name` on the host; answer with [`Stack::resolved`].
    Resolve { query: u64, name: String },
}

/// Why a name did not resolve on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolveError {
    /// The name does not exist (NXDOMAIN for the workload).
    NotFound,
    /// The resolver failed (SERVFAIL for the workload).
    Failed,
}

/// Counters, for tests, logs and `moat` to report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub frames_in: u64,
    pub frames_out: u64,
    /// Frames with a wrong length, checksum or field.
    pub dropped_malformed: u64,
    /// Frames for another Ethernet or IP host on the link.
    pub dropped_not_for_us: u64,
    pub dropped_fragments: u64,
    /// Protocols and messages the stack does not carry.
    pub dropped_unsupported: u64,
    /// Frames dropped because a queue was at its bound.
    pub dropped_queue_full: u64,
    pub tcp_opened: u64,
    pub tcp_refused_policy: u64,
    pub tcp_refused_limit: u64,
    pub tcp_connect_failed: u64,
    pub udp_refused_policy: u64,
    pub udp_refused_limit: u64,
    pub dns_answered: u64,
    pub dns_refused: u64,
    pub icmp_refused: u64,
}

/// The interface could not be built from the configuration.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error("gateway address {0} does not fit the interface")]
    Address(IpAddr),
    #[error("default route via {0} does not fit the interface")]
    Route(IpAddr),
    #[error("MTU {0} is outside 1280..=65521")]
    Mtu(usize),
}

/// The link, as smoltcp sees it: two queues of frames, each bounded in
/// frames and in bytes.
struct Link {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
    free: Vec<Vec<u8>>,
    /// Bytes of the frames in `rx` and in `tx`.
    rx_bytes: usize,
    tx_bytes: usize,
    max_tx: usize,
    max_bytes: usize,
    max_frame: usize,
    dropped: u64,
}

impl Link {
    fn push_tx(&mut self, frame: Vec<u8>) -> bool {
        if self.tx.len() >= self.max_tx || self.tx_bytes + frame.len() > self.max_bytes {
            self.dropped += 1;
            return false;
        }
        self.tx_bytes += frame.len();
        self.tx.push_back(frame);
        true
    }

    /// Queues a frame for smoltcp; false (and nothing kept) at a bound.
    fn push_rx(&mut self, frame: &[u8]) -> bool {
        if self.rx.len() >= MAX_RX_FRAMES || self.rx_bytes + frame.len() > self.max_bytes {
            return false;
        }
        self.rx_bytes += frame.len();
        self.rx.push_back(frame.to_vec());
        true
    }

    /// Room for one more outgoing frame (which may pass the byte bound by
    /// at most one frame).
    fn tx_room(&self) -> bool {
        self.tx.len() < self.max_tx && self.tx_bytes < self.max_bytes
    }

    fn tx_token(&mut self) -> TxToken<'_> {
        TxToken {
            tx: &mut self.tx,
            free: &mut self.free,
            dropped: &mut self.dropped,
            bytes: &mut self.tx_bytes,
            max_tx: self.max_tx,
            max_bytes: self.max_bytes,
        }
    }
}

struct RxToken(Vec<u8>);

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

struct TxToken<'a> {
    tx: &'a mut VecDeque<Vec<u8>>,
    free: &'a mut Vec<Vec<u8>>,
    dropped: &'a mut u64,
    bytes: &'a mut usize,
    max_tx: usize,
    max_bytes: usize,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = self.free.pop().unwrap_or_default();
        buf.clear();
        buf.resize(len, 0);
        let r = f(&mut buf);
        // A reply made while receiving may find the queue full: drop it
        // (TCP retransmits) rather than grow the queue.
        if self.tx.len() < self.max_tx && *self.bytes < self.max_bytes {
            *self.bytes += buf.len();
            self.tx.push_back(buf);
        } else {
            *self.dropped += 1;
            if self.free.len() < FREE_FRAMES {
                self.free.push(buf);
            }
        }
        r
    }
}

impl phy::Device for Link {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _: smoltcp::time::Instant) -> Option<(RxToken, TxToken<'_>)> {
        let frame = self.rx.pop_front()?;
        self.rx_bytes = self.rx_bytes.saturating_sub(frame.len());
        Some((RxToken(frame), self.tx_token()))
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<TxToken<'_>> {
        if self.tx_room() {
            Some(self.tx_token())
        } else {
            None
        }
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.max_frame;
        caps
    }
}

enum TcpState {
    /// The SYN, held until the host connection is made.
    Connecting {
        syn: Vec<u8>,
    },
    Open {
        handle: SocketHandle,
    },
}

struct TcpFlow {
    /// (workload endpoint, the other endpoint as the workload sees it).
    key: (SocketAddr, SocketAddr),
    state: TcpState,
    /// The workload sent FIN and all its bytes were taken.
    fin_in: bool,
    host_eof: bool,
    /// The shell aborted it (the host connection broke).
    aborted: bool,
}

struct UdpFlow {
    key: (SocketAddr, SocketAddr),
    mac: EthernetAddress,
    last: Instant,
}

struct DnsWaiter {
    query: Query,
    client: SocketAddr,
    server: SocketAddr,
    mac: EthernetAddress,
}

#[derive(Default)]
struct DnsState {
    by_name: HashMap<String, u64>,
    pending: HashMap<u64, (String, Vec<DnsWaiter>)>,
    waiting: usize,
    cache: HashMap<String, (Instant, Result<Vec<IpAddr>, ResolveError>)>,
    next: u64,
}

/// Frames waiting for smoltcp before the shell calls [`Stack::poll`].
pub(crate) const MAX_RX_FRAMES: usize = 1024;
/// What a queued datagram costs besides its payload (so empty datagrams
/// cannot queue without bound).
const UDP_REQUEST_COST: usize = 64;
/// Names in the DNS cache before it is swept.
const DNS_CACHE_NAMES: usize = 1024;
/// TTL of the stack's DNS answers.
const DNS_TTL: u32 = 30;
/// A connection whose peer (the workload) acknowledges nothing for this long
/// is aborted.
const TCP_TIMEOUT: Duration = Duration::from_secs(120);

/// The user-space network of one sandbox.
pub struct Stack {
    cfg: NetConfig,
    limits: Limits,
    mac: EthernetAddress,
    epoch: Instant,
    iface: Interface,
    sockets: SocketSet<'static>,
    link: Link,
    egress: Egress,
    tcp: HashMap<FlowId, TcpFlow>,
    tcp_keys: HashMap<(SocketAddr, SocketAddr), FlowId>,
    udp: HashMap<FlowId, UdpFlow>,
    udp_keys: HashMap<(SocketAddr, SocketAddr), FlowId>,
    dns: DnsState,
    requests: VecDeque<Request>,
    udp_queued: usize,
    reserved: usize,
    next_flow: u64,
    next_port: u16,
    /// The workload's Ethernet address, from the last frame it sent (for
    /// datagrams to a published UDP port before it wrote to that flow).
    workload_mac: Option<EthernetAddress>,
    stats: Stats,
    refusals: RateLimit,
}

impl Stack {
    /// A stack for `cfg`, deciding with `egress` within `limits`. `seed`
    /// seeds TCP initial sequence numbers: give it random bits.
    pub fn new(
        cfg: NetConfig,
        egress: Egress,
        limits: Limits,
        now: Instant,
        seed: u64,
    ) -> Result<Stack, StackError> {
        if !(1280..=65521).contains(&cfg.mtu) {
            return Err(StackError::Mtu(cfg.mtu));
        }
        let mac = EthernetAddress(cfg.gateway_mac);
        let mut link = Link {
            rx: VecDeque::new(),
            tx: VecDeque::new(),
            free: Vec::new(),
            rx_bytes: 0,
            tx_bytes: 0,
            max_tx: limits.max_tx_frames.max(1),
            max_bytes: limits.max_link_bytes.max(cfg.max_frame()),
            max_frame: cfg.max_frame(),
            dropped: 0,
        };
        let mut config = Config::new(HardwareAddress::Ethernet(mac));
        config.random_seed = seed;
        let mut iface = Interface::new(config, &mut link, smoltcp::time::Instant::ZERO);
        let mut pushed = Ok(());
        iface.update_ip_addrs(|addrs| {
            for (ip, len) in [
                (IpAddr::V4(cfg.gateway_v4), cfg.prefix_v4),
                (IpAddr::V6(cfg.gateway_v6), cfg.prefix_v6),
            ] {
                if pushed.is_ok() && addrs.push(IpCidr::new(ip.into(), len)).is_err() {
                    pushed = Err(StackError::Address(ip));
                }
            }
        });
        pushed?;
        // Routes through our own addresses make smoltcp accept packets for
        // any destination (AnyIP): that is how it terminates every flow.
        iface
            .routes_mut()
            .add_default_ipv4_route(cfg.gateway_v4)
            .map_err(|_| StackError::Route(cfg.gateway_v4.into()))?;
        iface
            .routes_mut()
            .add_default_ipv6_route(cfg.gateway_v6)
            .map_err(|_| StackError::Route(cfg.gateway_v6.into()))?;
        iface.set_any_ip(true);
        Ok(Stack {
            cfg,
            limits,
            mac,
            epoch: now,
            iface,
            sockets: SocketSet::new(Vec::new()),
            link,
            egress,
            tcp: HashMap::new(),
            tcp_keys: HashMap::new(),
            udp: HashMap::new(),
            udp_keys: HashMap::new(),
            dns: DnsState::default(),
            requests: VecDeque::new(),
            udp_queued: 0,
            reserved: 0,
            next_flow: 1,
            next_port: 49152,
            workload_mac: None,
            stats: Stats::default(),
            refusals: RateLimit::new(10, 20),
        })
    }

    pub fn config(&self) -> &NetConfig {
        &self.cfg
    }

    pub fn stats(&self) -> Stats {
        let mut s = self.stats;
        s.dropped_queue_full += self.link.dropped;
        s
    }

    /// TCP flows open or connecting.
    pub fn tcp_flows(&self) -> usize {
        self.tcp.len()
    }

    pub fn udp_flows(&self) -> usize {
        self.udp.len()
    }

    /// Bytes of flow buffers reserved now.
    pub fn buffered_reserved(&self) -> usize {
        self.reserved
    }

    fn smol_now(&self, now: Instant) -> smoltcp::time::Instant {
        let us = now.saturating_duration_since(self.epoch).as_micros();
        smoltcp::time::Instant::from_micros(i64::try_from(us).unwrap_or(i64::MAX))
    }

    fn is_gateway(&self, ip: IpAddr) -> bool {
        ip == IpAddr::V4(self.cfg.gateway_v4) || ip == IpAddr::V6(self.cfg.gateway_v6)
    }

    fn gateway_for(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(_) => self.cfg.gateway_v4.into(),
            IpAddr::V6(_) => self.cfg.gateway_v6.into(),
        }
    }

    fn new_flow(&mut self) -> FlowId {
        let id = FlowId(self.next_flow);
        self.next_flow += 1;
        id
    }

    /// One frame the workload wrote. Never panics, whatever the bytes.
    pub fn receive_frame(&mut self, now: Instant, frame: &[u8]) {
        self.stats.frames_in += 1;
        let parsed = match frame::classify(frame, self.mac) {
            Ok(f) => f,
            Err(why) => {
                let counter = match why {
                    frame::Drop::Malformed => &mut self.stats.dropped_malformed,
                    frame::Drop::NotForUs => &mut self.stats.dropped_not_for_us,
                    frame::Drop::Fragment => &mut self.stats.dropped_fragments,
                    frame::Drop::Unsupported => &mut self.stats.dropped_unsupported,
                };
                *counter += 1;
                return;
            }
        };
        self.workload_mac = Some(parsed.src_mac);
        let to_gateway = parsed.ip.is_some_and(|ip| self.is_gateway(ip.dst()));
        match parsed.kind {
            Kind::Arp { target } if target == self.cfg.gateway_v4 => self.pass(frame),
            Kind::Arp { .. } => self.stats.dropped_not_for_us += 1,
            Kind::Ndp => self.pass(frame),
            Kind::EchoRequest | Kind::IcmpOther if to_gateway => self.pass(frame),
            Kind::EchoRequest => {
                self.stats.icmp_refused += 1;
                if parsed.ip.is_some_and(|ip| !ip.dst().is_multicast()) {
                    self.unreachable(&parsed, Unreachable::Prohibited);
                }
            }
            Kind::IcmpOther | Kind::OtherIp => self.stats.dropped_unsupported += 1,
            Kind::Tcp {
                src,
                dst,
                syn,
                ack,
                rst,
            } => self.tcp_segment(now, frame, src, dst, syn && !ack, rst),
            Kind::Udp { src, dst, payload } => self.udp_datagram(now, &parsed, src, dst, payload),
        }
    }

    /// Queues a frame for smoltcp.
    fn pass(&mut self, frame: &[u8]) {
        if !self.link.push_rx(frame) {
            self.stats.dropped_queue_full += 1;
        }
    }

    fn unreachable(&mut self, f: &Frame<'_>, why: Unreachable) {
        let Some(ip) = f.ip else { return };
        let gw = self.gateway_for(ip.dst());
        if let Some(out) = frame::unreachable_frame(self.mac, f.src_mac, gw, &ip, f.ip_payload, why)
        {
            self.link.push_tx(out);
        }
    }

    fn log_refusal(
        &mut self,
        now: Instant,
        proto: &str,
        dst: SocketAddr,
        why: &dyn std::fmt::Display,
    ) {
        if let Some(held) = self.refusals.allow(now) {
            tracing::warn!(proto, %dst, held_back = held, "egress {why}");
        }
    }

    fn tcp_segment(
        &mut self,
        now: Instant,
        frame: &[u8],
        src: SocketAddr,
        dst: SocketAddr,
        syn_only: bool,
        rst: bool,
    ) {
        if let Some(&id) = self.tcp_keys.get(&(src, dst)) {
            let connecting = self
                .tcp
                .get(&id)
                .is_some_and(|f| matches!(f.state, TcpState::Connecting { .. }));
            if !connecting {
                self.pass(frame);
            } else if rst {
                // The workload gave up before the host answered.
                self.drop_tcp(id);
                self.requests.push_back(Request::TcpClose {
                    flow: id,
                    reset: true,
                });
            }
            // Else a retransmitted SYN: the first one is held already.
            return;
        }
        if !syn_only || self.is_gateway(dst.ip()) {
            // smoltcp answers: a reset, or the segment of an inbound flow.
            self.pass(frame);
            return;
        }
        let decision = self.egress.decide(dst);
        if !decision.allowed() {
            self.stats.tcp_refused_policy += 1;
            self.log_refusal(now, "tcp", dst, &decision);
            self.pass(frame); // no listener: smoltcp resets it
            return;
        }
        let need = 2 * self.limits.tcp_buffer;
        if self.tcp.len() >= self.limits.max_tcp_flows
            || self.reserved + need > self.limits.max_buffered
            || frame.len() > MAX_SYN_FRAME
        {
            self.stats.tcp_refused_limit += 1;
            self.log_refusal(now, "tcp", dst, &"refused: flow limit reached");
            self.pass(frame);
            return;
        }
        let id = self.new_flow();
        self.reserved += need;
        self.tcp.insert(
            id,
            TcpFlow {
                key: (src, dst),
                state: TcpState::Connecting {
                    syn: frame.to_vec(),
                },
                fin_in: false,
                host_eof: false,
                aborted: false,
            },
        );
        self.tcp_keys.insert((src, dst), id);
        let host_dst = SocketAddr::new(canonical(dst.ip()), dst.port());
        self.requests.push_back(Request::TcpConnect {
            flow: id,
            dst: host_dst,
        });
    }

    /// Forgets a TCP flow and its socket.
    fn drop_tcp(&mut self, id: FlowId) {
        if let Some(flow) = self.tcp.remove(&id) {
            self.tcp_keys.remove(&flow.key);
            self.reserved = self.reserved.saturating_sub(2 * self.limits.tcp_buffer);
            if let TcpState::Open { handle } = flow.state {
                self.sockets.remove(handle);
            }
        }
    }

    fn tcp_socket(&self) -> tcp::Socket<'static> {
        let n = self.limits.tcp_buffer;
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0u8; n]),
            tcp::SocketBuffer::new(vec![0u8; n]),
        );
        s.set_nagle_enabled(false);
        s.set_timeout(Some(TCP_TIMEOUT.into()));
        s
    }

    /// The host connection of `flow` is made: let the workload's handshake
    /// complete.
    pub fn tcp_connected(&mut self, now: Instant, id: FlowId) {
        let Some(flow) = self.tcp.get(&id) else {
            return;
        };
        if !matches!(flow.state, TcpState::Connecting { .. }) {
            return;
        }
        let local = flow.key.1;
        // Let smoltcp take every frame queued before this one, so the new
        // listener sees only this flow's SYN.
        self.poll_iface(now);
        let mut socket = self.tcp_socket();
        let endpoint = IpListenEndpoint {
            addr: Some(local.ip().into()),
            port: local.port(),
        };
        if socket.listen(endpoint).is_err() {
            self.tcp_connect_failed(now, id);
            return;
        }
        let handle = self.sockets.add(socket);
        let Some(flow) = self.tcp.get_mut(&id) else {
            return;
        };
        let old = std::mem::replace(&mut flow.state, TcpState::Open { handle });
        if let TcpState::Connecting { syn } = old {
            self.pass(&syn);
        }
        self.stats.tcp_opened += 1;
        self.poll_iface(now);
    }

    /// The host connection of `flow` failed: the workload gets a reset.
    pub fn tcp_connect_failed(&mut self, now: Instant, id: FlowId) {
        let Some(flow) = self.tcp.get_mut(&id) else {
            return;
        };
        let TcpState::Connecting { syn } = &mut flow.state else {
            return;
        };
        let syn = std::mem::take(syn);
        self.stats.tcp_connect_failed += 1;
        self.drop_tcp(id);
        self.pass(&syn);
        self.poll_iface(now);
    }

    fn open_socket(&self, id: FlowId) -> Option<SocketHandle> {
        match self.tcp.get(&id)?.state {
            TcpState::Open { handle } => Some(handle),
            TcpState::Connecting { .. } => None,
        }
    }

    /// Bytes `flow` can take from the host now (0 when it cannot send).
    pub fn tcp_send_capacity(&self, id: FlowId) -> usize {
        self.open_socket(id).map_or(0, |h| {
            let s = self.sockets.get::<tcp::Socket>(h);
            if s.may_send() {
                s.send_capacity() - s.send_queue()
            } else {
                0
            }
        })
    }

    /// Bytes the workload sent on `flow` that the host has not taken.
    pub fn tcp_recv_queue(&self, id: FlowId) -> usize {
        self.open_socket(id)
            .map_or(0, |h| self.sockets.get::<tcp::Socket>(h).recv_queue())
    }

    /// Lets `f` write bytes for the workload into `flow`'s send buffer
    /// (a contiguous free part of it); `f` returns how many it wrote.
    pub fn tcp_send_with<R>(
        &mut self,
        id: FlowId,
        f: impl FnOnce(&mut [u8]) -> (usize, R),
    ) -> Option<R> {
        let h = self.open_socket(id)?;
        self.sockets.get_mut::<tcp::Socket>(h).send(f).ok()
    }

    /// Lets `f` take bytes the workload sent on `flow` (a contiguous part
    /// of the receive buffer); `f` returns how many it took.
    pub fn tcp_recv_with<R>(
        &mut self,
        id: FlowId,
        f: impl FnOnce(&[u8]) -> (usize, R),
    ) -> Option<R> {
        let h = self.open_socket(id)?;
        self.sockets
            .get_mut::<tcp::Socket>(h)
            .recv(|buf| f(buf))
            .ok()
    }

    /// The host closed its side of `flow`: FIN to the workload after the
    /// bytes already buffered.
    pub fn tcp_host_eof(&mut self, id: FlowId) {
        let Some(h) = self.open_socket(id) else {
            return;
        };
        self.sockets.get_mut::<tcp::Socket>(h).close();
        if let Some(f) = self.tcp.get_mut(&id) {
            f.host_eof = true;
        }
    }

    /// The host connection of `flow` broke: reset the workload's.
    pub fn tcp_abort(&mut self, now: Instant, id: FlowId) {
        match self.open_socket(id) {
            Some(h) => {
                self.sockets.get_mut::<tcp::Socket>(h).abort();
                if let Some(f) = self.tcp.get_mut(&id) {
                    f.aborted = true;
                }
            }
            None => self.tcp_connect_failed(now, id),
        }
    }

    /// A connection from outside to the workload's `port` (a published
    /// port): smoltcp connects from the gateway. `None` at a limit.
    pub fn tcp_open_inbound(&mut self, port: u16, v6: bool) -> Option<FlowId> {
        let need = 2 * self.limits.tcp_buffer;
        if self.tcp.len() >= self.limits.max_tcp_flows
            || self.reserved + need > self.limits.max_buffered
        {
            self.stats.tcp_refused_limit += 1;
            return None;
        }
        let (gw, workload) = self.gateway_and_workload(v6);
        let remote = SocketAddr::new(workload, port);
        let local = self.free_port(remote, gw)?;
        let mut socket = self.tcp_socket();
        socket
            .connect(
                self.iface.context(),
                (remote.ip(), remote.port()),
                (local.ip(), local.port()),
            )
            .ok()?;
        let handle = self.sockets.add(socket);
        let id = self.new_flow();
        self.reserved += need;
        self.tcp.insert(
            id,
            TcpFlow {
                key: (remote, local),
                state: TcpState::Open { handle },
                fin_in: false,
                host_eof: false,
                aborted: false,
            },
        );
        self.tcp_keys.insert((remote, local), id);
        self.stats.tcp_opened += 1;
        Some(id)
    }

    /// The gateway's and the workload's addresses in the family asked for.
    fn gateway_and_workload(&self, v6: bool) -> (IpAddr, IpAddr) {
        if v6 {
            (self.cfg.gateway_v6.into(), self.cfg.workload_v6.into())
        } else {
            (self.cfg.gateway_v4.into(), self.cfg.workload_v4.into())
        }
    }

    fn free_port(&mut self, remote: SocketAddr, gw: IpAddr) -> Option<SocketAddr> {
        for _ in 0..16384 {
            let port = self.next_port;
            self.next_port = if port == u16::MAX { 49152 } else { port + 1 };
            let local = SocketAddr::new(gw, port);
            if !self.tcp_keys.contains_key(&(remote, local))
                && !self.udp_keys.contains_key(&(remote, local))
            {
                return Some(local);
            }
        }
        None
    }

    fn udp_datagram(
        &mut self,
        now: Instant,
        f: &Frame<'_>,
        src: SocketAddr,
        dst: SocketAddr,
        payload: &[u8],
    ) {
        let inbound = self.udp_keys.get(&(src, dst)).copied();
        if self.is_gateway(dst.ip()) && inbound.is_none() {
            if dst.port() == 53 {
                self.dns_query(now, f.src_mac, src, dst, payload);
            } else {
                self.unreachable(f, Unreachable::Port);
            }
            return;
        }
        let multicast = match dst.ip() {
            IpAddr::V4(v4) => v4.is_multicast() || v4.is_broadcast(),
            IpAddr::V6(v6) => v6.is_multicast(),
        };
        if multicast {
            // mDNS, SSDP and the like: nothing to refuse loudly.
            self.stats.dropped_unsupported += 1;
            return;
        }
        let id = match inbound {
            Some(id) => id,
            None => match self.new_udp_flow(now, f, src, dst) {
                Some(id) => id,
                None => return,
            },
        };
        if let Some(flow) = self.udp.get_mut(&id) {
            flow.last = now;
        }
        let cost = payload.len() + UDP_REQUEST_COST;
        if self.udp_queued + cost > self.limits.max_udp_queued {
            self.stats.dropped_queue_full += 1;
            return;
        }
        self.udp_queued += cost;
        self.requests.push_back(Request::UdpSend {
            flow: id,
            dst: SocketAddr::new(canonical(dst.ip()), dst.port()),
            payload: payload.to_vec(),
        });
    }

    fn new_udp_flow(
        &mut self,
        now: Instant,
        f: &Frame<'_>,
        src: SocketAddr,
        dst: SocketAddr,
    ) -> Option<FlowId> {
        let decision = self.egress.decide(dst);
        if !decision.allowed() {
            self.stats.udp_refused_policy += 1;
            self.log_refusal(now, "udp", dst, &decision);
            self.unreachable(f, Unreachable::Prohibited);
            return None;
        }
        if self.udp.len() >= self.limits.max_udp_flows {
            self.expire_udp(now);
        }
        if self.udp.len() >= self.limits.max_udp_flows {
            self.stats.udp_refused_limit += 1;
            self.log_refusal(now, "udp", dst, &"refused: flow limit reached");
            self.unreachable(f, Unreachable::Prohibited);
            return None;
        }
        let id = self.new_flow();
        self.udp.insert(
            id,
            UdpFlow {
                key: (src, dst),
                mac: f.src_mac,
                last: now,
            },
        );
        self.udp_keys.insert((src, dst), id);
        Some(id)
    }

    /// A datagram from outside for the workload's UDP `port` (a published
    /// port): a new UDP flow from a gateway port of its own to that port,
    /// whose answers come back as [`Request::UdpSend`] and datagrams go in
    /// with [`Stack::udp_received`]. `None` at the flow limit, or before
    /// the workload sent its first frame (its Ethernet address is unknown).
    pub fn udp_open_inbound(&mut self, now: Instant, port: u16, v6: bool) -> Option<FlowId> {
        let Some(mac) = self.workload_mac else {
            self.stats.dropped_unsupported += 1;
            return None;
        };
        if self.udp.len() >= self.limits.max_udp_flows {
            self.expire_udp(now);
        }
        if self.udp.len() >= self.limits.max_udp_flows {
            self.stats.udp_refused_limit += 1;
            return None;
        }
        let (gw, workload) = self.gateway_and_workload(v6);
        let remote = SocketAddr::new(workload, port);
        let local = self.free_port(remote, gw)?;
        let id = self.new_flow();
        self.udp.insert(
            id,
            UdpFlow {
                key: (remote, local),
                mac,
                last: now,
            },
        );
        self.udp_keys.insert((remote, local), id);
        Some(id)
    }

    /// A datagram for the workload arrived on `flow`'s host socket.
    pub fn udp_received(&mut self, now: Instant, id: FlowId, payload: &[u8]) {
        let Some(flow) = self.udp.get_mut(&id) else {
            return;
        };
        flow.last = now;
        let (workload, remote) = flow.key;
        match frame::udp_frame(self.mac, flow.mac, remote, workload, payload, self.cfg.mtu) {
            Some(out) => {
                self.link.push_tx(out);
            }
            None => self.stats.dropped_unsupported += 1,
        }
    }

    fn expire_udp(&mut self, now: Instant) {
        let idle = self.limits.udp_idle;
        let old: Vec<FlowId> = self
            .udp
            .iter()
            .filter(|(_, f)| now.saturating_duration_since(f.last) >= idle)
            .map(|(id, _)| *id)
            .collect();
        for id in old {
            if let Some(f) = self.udp.remove(&id) {
                self.udp_keys.remove(&f.key);
                self.requests.push_back(Request::UdpClose { flow: id });
            }
        }
    }

    fn dns_query(
        &mut self,
        now: Instant,
        mac: EthernetAddress,
        client: SocketAddr,
        server: SocketAddr,
        msg: &[u8],
    ) {
        let query = match dns::parse_query(msg) {
            Ok(q) => q,
            Err(dns::ParseError::Header) => {
                self.stats.dropped_malformed += 1;
                return;
            }
            Err(dns::ParseError::Malformed { id, flags_hi }) => {
                let a = dns::error_answer(id, flags_hi, Rcode::FormErr);
                return self.send_dns(mac, server, client, &a);
            }
            Err(dns::ParseError::Opcode { id, flags_hi }) => {
                let a = dns::error_answer(id, flags_hi, Rcode::NotImp);
                return self.send_dns(mac, server, client, &a);
            }
        };
        let waiter = DnsWaiter {
            query,
            client,
            server,
            mac,
        };
        let allowed = waiter
            .query
            .name
            .as_deref()
            .filter(|n| self.egress.policy().rule_for_name(n).is_some())
            .map(str::to_owned);
        let Some(name) = allowed else {
            self.stats.dns_refused += 1;
            if let Some(held) = self.refusals.allow(now) {
                let name = waiter.query.name.as_deref().unwrap_or("(not a host name)");
                tracing::warn!(
                    proto = "dns",
                    name,
                    held_back = held,
                    "egress refused: no rule allows the name"
                );
            }
            return self.answer(&waiter, &Err(ResolveError::NotFound));
        };
        if !waiter.query.asks_address() {
            return self.answer(&waiter, &Ok(Vec::new()));
        }
        if let Some((at, result)) = self.dns.cache.get(&name) {
            if now.saturating_duration_since(*at) < self.limits.dns_cache {
                let result = result.clone();
                return self.answer(&waiter, &result);
            }
        }
        if self.dns.waiting >= self.limits.max_dns_pending {
            return self.answer(&waiter, &Err(ResolveError::Failed));
        }
        self.dns.waiting += 1;
        if let Some(q) = self.dns.by_name.get(&name) {
            if let Some((_, waiters)) = self.dns.pending.get_mut(q) {
                waiters.push(waiter);
                return;
            }
        }
        let q = self.dns.next;
        self.dns.next += 1;
        self.dns.by_name.insert(name.clone(), q);
        self.dns.pending.insert(q, (name.clone(), vec![waiter]));
        self.requests.push_back(Request::Resolve { query: q, name });
    }

    /// The host's answer for [`Request::Resolve`] `query`.
    pub fn resolved(
        &mut self,
        now: Instant,
        query: u64,
        result: Result<Vec<IpAddr>, ResolveError>,
    ) {
        let Some((name, waiters)) = self.dns.pending.remove(&query) else {
            return;
        };
        self.dns.by_name.remove(&name);
        self.dns.waiting = self.dns.waiting.saturating_sub(waiters.len());
        let result = result.map(|addrs| {
            let mut out: Vec<IpAddr> = Vec::new();
            for ip in addrs.into_iter().map(canonical) {
                if self.egress.answerable(ip) && !out.contains(&ip) {
                    out.push(ip);
                }
            }
            out
        });
        if let Ok(addrs) = &result {
            for ip in addrs {
                self.egress.learned_mut().insert(*ip, &name);
            }
        }
        if self.dns.cache.len() >= DNS_CACHE_NAMES {
            let ttl = self.limits.dns_cache;
            self.dns
                .cache
                .retain(|_, (at, _)| now.saturating_duration_since(*at) < ttl);
            if self.dns.cache.len() >= DNS_CACHE_NAMES {
                self.dns.cache.clear();
            }
        }
        self.dns.cache.insert(name, (now, result.clone()));
        for w in waiters {
            self.answer(&w, &result);
        }
    }

    fn answer(&mut self, w: &DnsWaiter, result: &Result<Vec<IpAddr>, ResolveError>) {
        let msg = match result {
            Ok(addrs) => w.query.answer(Rcode::NoError, addrs, DNS_TTL),
            Err(ResolveError::NotFound) => w.query.answer(Rcode::NxDomain, &[], 0),
            Err(ResolveError::Failed) => w.query.answer(Rcode::ServFail, &[], 0),
        };
        self.stats.dns_answered += 1;
        self.send_dns(w.mac, w.server, w.client, &msg);
    }

    fn send_dns(
        &mut self,
        mac: EthernetAddress,
        server: SocketAddr,
        client: SocketAddr,
        msg: &[u8],
    ) {
        if let Some(out) = frame::udp_frame(self.mac, mac, server, client, msg, self.cfg.mtu) {
            self.link.push_tx(out);
        }
    }

    fn poll_iface(&mut self, now: Instant) {
        let t = self.smol_now(now);
        self.iface.poll(t, &mut self.link, &mut self.sockets);
    }

    /// Runs smoltcp (frames in, timers, frames out), then turns what
    /// changed into requests. Call after a batch of frames and after moving
    /// bytes.
    pub fn poll(&mut self, now: Instant) {
        self.poll_iface(now);
        self.sweep();
        if !self.udp.is_empty() {
            self.expire_udp(now);
        }
    }

    /// Asks for shutdowns and closes of TCP flows whose state moved on.
    fn sweep(&mut self) {
        let mut done = Vec::new();
        for (id, flow) in self.tcp.iter_mut() {
            let TcpState::Open { handle } = flow.state else {
                continue;
            };
            let s = self.sockets.get::<tcp::Socket>(handle);
            use tcp::State::*;
            let state = s.state();
            // FIN from the workload: in these states, or Closed after our
            // own FIN was acknowledged (LastAck -> Closed).
            let fin = match state {
                CloseWait | LastAck | Closing | TimeWait => true,
                Closed => flow.host_eof && !flow.aborted,
                _ => false,
            };
            if !flow.fin_in && fin && !s.may_recv() {
                flow.fin_in = true;
                self.requests.push_back(Request::TcpShutdown { flow: *id });
            }
            // Done once the workload's last bytes were taken by the host
            // (a reset clears them; a host abort drops them).
            if matches!(state, Closed | TimeWait) && (s.recv_queue() == 0 || flow.aborted) {
                done.push((*id, !(flow.fin_in && flow.host_eof)));
            }
        }
        for (id, reset) in done {
            self.drop_tcp(id);
            self.requests
                .push_back(Request::TcpClose { flow: id, reset });
        }
    }

    /// How long the shell may wait before calling [`Stack::poll`] again
    /// with no frame or event (`None`: until one comes).
    pub fn poll_delay(&mut self, now: Instant) -> Option<Duration> {
        let t = self.smol_now(now);
        let smol = self
            .iface
            .poll_delay(t, &self.sockets)
            .map(|d| Duration::from_micros(d.total_micros()));
        let udp = self
            .udp
            .values()
            .map(|f| (f.last + self.limits.udp_idle).saturating_duration_since(now))
            .min();
        match (smol, udp) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The next request for the shell.
    pub fn next_request(&mut self) -> Option<Request> {
        let r = self.requests.pop_front()?;
        if let Request::UdpSend { payload, .. } = &r {
            self.udp_queued = self
                .udp_queued
                .saturating_sub(payload.len() + UDP_REQUEST_COST);
        }
        Some(r)
    }

    /// The next frame for the workload.
    pub fn pop_frame(&mut self) -> Option<Vec<u8>> {
        let f = self.link.tx.pop_front()?;
        self.link.tx_bytes = self.link.tx_bytes.saturating_sub(f.len());
        self.stats.frames_out += 1;
        Some(f)
    }

    /// Gives back a frame's buffer from [`Stack::pop_frame`] for reuse.
    pub fn recycle(&mut self, buf: Vec<u8>) {
        if self.link.free.len() < FREE_FRAMES {
            self.link.free.push(buf);
        }
    }
}

#[cfg(test)]
#[path = "stack_tests.rs"]
mod tests;
