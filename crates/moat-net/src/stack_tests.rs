//! The core against a simulated workload: a second smoltcp interface with
//! the workload's addresses, frames shuttled between the two in memory,
//! time advanced by hand. Deterministic; no OS call.
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, HardwareAddress, Icmpv4Message,
    Icmpv4Packet, Icmpv4Repr, Icmpv6Message, Icmpv6Packet, Icmpv6Repr, IpCidr, IpProtocol,
    Ipv4Packet, Ipv4Repr, Ipv6Packet, Ipv6Repr,
};

use super::*;
use crate::dns;
use crate::policy::Policy;

const WL_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x64];

struct Sim {
    stack: Stack,
    iface: Interface,
    sockets: SocketSet<'static>,
    link: Link,
    now: Instant,
    requests: Vec<Request>,
    /// Frames the stack sent that the simulated workload was shown.
    seen: Vec<Vec<u8>>,
    /// Frames the simulated workload sent (a corpus for the fuzz tests).
    sent: Vec<Vec<u8>>,
}

fn sim_with(policy: &str, limits: Limits) -> Sim {
    let cfg = NetConfig::default();
    let now = Instant::now();
    let policy = match policy {
        "" => Policy::deny_all(),
        p => Policy::parse(p).unwrap(),
    };
    let egress = Egress::new(policy, [], 64);
    let stack = Stack::new(cfg.clone(), egress, limits, now, 7).unwrap();
    let mut link = Link {
        rx: VecDeque::new(),
        tx: VecDeque::new(),
        free: Vec::new(),
        rx_bytes: 0,
        tx_bytes: 0,
        max_tx: 4096,
        max_bytes: usize::MAX / 2,
        max_frame: cfg.max_frame(),
        dropped: 0,
    };
    let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(WL_MAC)));
    config.random_seed = 99;
    let mut iface = Interface::new(config, &mut link, smoltcp::time::Instant::ZERO);
    iface.update_ip_addrs(|a| {
        a.push(IpCidr::new(IpAddr::V4(cfg.workload_v4).into(), 24))
            .unwrap();
        a.push(IpCidr::new(IpAddr::V6(cfg.workload_v6).into(), 64))
            .unwrap();
    });
    iface
        .routes_mut()
        .add_default_ipv4_route(cfg.gateway_v4)
        .unwrap();
    iface
        .routes_mut()
        .add_default_ipv6_route(cfg.gateway_v6)
        .unwrap();
    Sim {
        stack,
        iface,
        sockets: SocketSet::new(Vec::new()),
        link,
        now,
        requests: Vec::new(),
        seen: Vec::new(),
        sent: Vec::new(),
    }
}

fn sim(policy: &str) -> Sim {
    sim_with(policy, Limits::default())
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

impl Sim {
    fn smol_now(&self) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_micros(
            self.now.duration_since(self.stack.epoch).as_micros() as i64
        )
    }

    /// Moves frames both ways until both sides are quiet.
    fn step(&mut self) {
        for _ in 0..10_000 {
            let t = self.smol_now();
            self.iface.poll(t, &mut self.link, &mut self.sockets);
            let mut moved = false;
            while let Some(f) = self.link.tx.pop_front() {
                self.stack.receive_frame(self.now, &f);
                self.sent.push(f);
                moved = true;
            }
            self.stack.poll(self.now);
            while let Some(f) = self.stack.pop_frame() {
                self.seen.push(f.clone());
                self.link.rx.push_back(f);
                moved = true;
            }
            while let Some(r) = self.stack.next_request() {
                self.requests.push(r);
            }
            if !moved {
                return;
            }
        }
        panic!("the simulated link never went quiet");
    }

    /// Advances the clock (for retransmissions and timers).
    fn advance(&mut self, d: Duration) {
        self.now += d;
        self.step();
    }

    fn connect(&mut self, dst: &str, local_port: u16) -> SocketHandle {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 65536]),
            tcp::SocketBuffer::new(vec![0; 65536]),
        );
        let dst = sa(dst);
        s.connect(self.iface.context(), (dst.ip(), dst.port()), local_port)
            .unwrap();
        let h = self.sockets.add(s);
        self.step();
        h
    }

    fn sock(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(h)
    }

    fn take_requests(&mut self) -> Vec<Request> {
        std::mem::take(&mut self.requests)
    }

    fn connect_request(&mut self) -> (FlowId, SocketAddr) {
        let reqs = self.take_requests();
        match reqs.as_slice() {
            [Request::TcpConnect { flow, dst }] => (*flow, *dst),
            other => panic!("expected one TcpConnect, got {other:?}"),
        }
    }

    /// Sends a raw frame from the workload.
    fn inject(&mut self, frame: &[u8]) {
        self.sent.push(frame.to_vec());
        self.stack.receive_frame(self.now, frame);
        self.stack.poll(self.now);
        while let Some(f) = self.stack.pop_frame() {
            self.seen.push(f.clone());
            self.link.rx.push_back(f);
        }
        while let Some(r) = self.stack.next_request() {
            self.requests.push(r);
        }
    }

    fn host_recv(&mut self, flow: FlowId) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(n) = self.stack.tcp_recv_with(flow, |b| {
            out.extend_from_slice(b);
            (b.len(), b.len())
        }) {
            if n == 0 {
                break;
            }
        }
        out
    }

    fn host_send(&mut self, flow: FlowId, data: &[u8]) -> usize {
        self.stack
            .tcp_send_with(flow, |b| {
                let n = b.len().min(data.len());
                b[..n].copy_from_slice(&data[..n]);
                (n, n)
            })
            .unwrap_or(0)
    }
}

fn workload_mac() -> EthernetAddress {
    EthernetAddress(WL_MAC)
}

fn gw_mac() -> EthernetAddress {
    EthernetAddress(NetConfig::default().gateway_mac)
}

/// A UDP frame from the workload.
fn udp_from_workload(src: &str, dst: &str, payload: &[u8]) -> Vec<u8> {
    frame::udp_frame(workload_mac(), gw_mac(), sa(src), sa(dst), payload, 65520).unwrap()
}

/// The UDP payloads the stack sent to the workload, with their source.
fn udp_to_workload(frames: &[Vec<u8>]) -> Vec<(SocketAddr, Vec<u8>)> {
    let mut out = Vec::new();
    for f in frames {
        let Ok(parsed) = frame::classify(f, workload_mac()) else {
            continue;
        };
        if let Kind::Udp { src, payload, .. } = parsed.kind {
            out.push((src, payload.to_vec()));
        }
    }
    out
}

fn echo_v4(dst: Ipv4Addr) -> Vec<u8> {
    let icmp = Icmpv4Repr::EchoRequest {
        ident: 1,
        seq_no: 1,
        data: b"ping",
    };
    let ip = Ipv4Repr {
        src_addr: NetConfig::default().workload_v4,
        dst_addr: dst,
        next_header: IpProtocol::Icmp,
        payload_len: icmp.buffer_len(),
        hop_limit: 64,
    };
    let mut buf = vec![0u8; 14 + 20 + icmp.buffer_len()];
    EthernetRepr {
        src_addr: workload_mac(),
        dst_addr: gw_mac(),
        ethertype: EthernetProtocol::Ipv4,
    }
    .emit(&mut EthernetFrame::new_unchecked(&mut buf));
    ip.emit(&mut Ipv4Packet::new_unchecked(&mut buf[14..]), &caps());
    icmp.emit(&mut Icmpv4Packet::new_unchecked(&mut buf[34..]), &caps());
    buf
}

fn echo_v6(dst: std::net::Ipv6Addr) -> Vec<u8> {
    let src = NetConfig::default().workload_v6;
    let icmp = Icmpv6Repr::EchoRequest {
        ident: 1,
        seq_no: 1,
        data: b"ping",
    };
    let ip = Ipv6Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: IpProtocol::Icmpv6,
        payload_len: icmp.buffer_len(),
        hop_limit: 64,
    };
    let mut buf = vec![0u8; 14 + 40 + icmp.buffer_len()];
    EthernetRepr {
        src_addr: workload_mac(),
        dst_addr: gw_mac(),
        ethertype: EthernetProtocol::Ipv6,
    }
    .emit(&mut EthernetFrame::new_unchecked(&mut buf));
    ip.emit(&mut Ipv6Packet::new_unchecked(&mut buf[14..]));
    icmp.emit(
        &src,
        &dst,
        &mut Icmpv6Packet::new_unchecked(&mut buf[54..]),
        &caps(),
    );
    buf
}

fn caps() -> smoltcp::phy::ChecksumCapabilities {
    smoltcp::phy::ChecksumCapabilities::default()
}

/// The ICMP message types the stack sent (v4 or v6, as numbers).
fn icmp_types(frames: &[Vec<u8>]) -> Vec<(u8, u8)> {
    let mut out = Vec::new();
    for f in frames {
        let eth = EthernetFrame::new_checked(f.as_slice()).unwrap();
        match eth.ethertype() {
            EthernetProtocol::Ipv4 => {
                let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
                if ip.next_header() == IpProtocol::Icmp {
                    let p = Icmpv4Packet::new_checked(ip.payload()).unwrap();
                    assert!(p.verify_checksum());
                    out.push((u8::from(p.msg_type()), p.msg_code()));
                }
            }
            EthernetProtocol::Ipv6 => {
                let ip = Ipv6Packet::new_checked(eth.payload()).unwrap();
                if ip.next_header() == IpProtocol::Icmpv6 {
                    let p = Icmpv6Packet::new_checked(ip.payload()).unwrap();
                    let t = p.msg_type();
                    if t != Icmpv6Message::NeighborSolicit && t != Icmpv6Message::NeighborAdvert {
                        out.push((u8::from(t), p.msg_code()));
                    }
                }
            }
            _ => {}
        }
    }
    out
}

#[test]
fn allowed_tcp_flow_carries_bytes_both_ways_and_closes() {
    let mut s = sim("192.0.2.1:80");
    let h = s.connect("192.0.2.1:80", 40000);
    // The SYN is held until the host connects.
    assert_eq!(s.sock(h).state(), tcp::State::SynSent);
    let (flow, dst) = s.connect_request();
    assert_eq!(dst, sa("192.0.2.1:80"));
    s.stack.tcp_connected(s.now, flow);
    s.step();
    assert_eq!(s.sock(h).state(), tcp::State::Established);

    s.sock(h).send_slice(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    s.step();
    assert_eq!(s.host_recv(flow), b"GET / HTTP/1.0\r\n\r\n");
    assert_eq!(s.host_send(flow, b"HTTP/1.0 200 OK\r\n\r\nhi"), 21);
    s.step();
    let mut got = [0u8; 64];
    let n = s.sock(h).recv_slice(&mut got).unwrap();
    assert_eq!(&got[..n], b"HTTP/1.0 200 OK\r\n\r\nhi");

    // The workload closes its side: the host socket is shut for writing.
    s.sock(h).close();
    s.step();
    assert_eq!(s.take_requests(), vec![Request::TcpShutdown { flow }]);
    // The host closes too: FIN to the workload, the flow is gone.
    s.stack.tcp_host_eof(flow);
    s.step();
    assert_eq!(
        s.take_requests(),
        vec![Request::TcpClose { flow, reset: false }]
    );
    assert_eq!(s.stack.tcp_flows(), 0);
    assert_eq!(s.stack.buffered_reserved(), 0);
    assert!(matches!(
        s.sock(h).state(),
        tcp::State::TimeWait | tcp::State::Closed
    ));
}

#[test]
fn refused_destination_gets_a_reset_at_once() {
    let mut s = sim("192.0.2.1:80");
    for dst in [
        "192.0.2.1:81",
        "192.0.2.2:80",
        "127.0.0.1:80",
        "10.0.2.2:80",
    ] {
        let h = s.connect(dst, 40001);
        assert_eq!(s.sock(h).state(), tcp::State::Closed, "{dst}");
        assert!(s.take_requests().is_empty(), "{dst}");
        s.sockets.remove(h);
    }
    assert_eq!(s.stack.stats().tcp_refused_policy, 3);
    assert_eq!(s.stack.tcp_flows(), 0);
}

#[test]
fn host_refusal_resets_the_workload() {
    let mut s = sim("192.0.2.0/24");
    let h = s.connect("192.0.2.5:443", 40002);
    let (flow, _) = s.connect_request();
    // A retransmitted SYN while the host connects asks nothing more.
    s.advance(Duration::from_secs(3));
    assert!(s.take_requests().is_empty());
    s.stack.tcp_connect_failed(s.now, flow);
    s.step();
    assert_eq!(s.sock(h).state(), tcp::State::Closed);
    assert_eq!(s.stack.tcp_flows(), 0);
    assert_eq!(s.stack.stats().tcp_connect_failed, 1);
}

#[test]
fn host_reset_resets_the_workload() {
    let mut s = sim("192.0.2.0/24");
    let h = s.connect("192.0.2.5:443", 40003);
    let (flow, _) = s.connect_request();
    s.stack.tcp_connected(s.now, flow);
    s.step();
    assert_eq!(s.sock(h).state(), tcp::State::Established);
    s.stack.tcp_abort(s.now, flow);
    s.step();
    assert_eq!(s.sock(h).state(), tcp::State::Closed);
    assert_eq!(
        s.take_requests(),
        vec![Request::TcpClose { flow, reset: true }]
    );
    assert_eq!(s.stack.tcp_flows(), 0);
}

#[test]
fn workload_reset_closes_the_flow() {
    let mut s = sim("192.0.2.0/24");
    let h = s.connect("192.0.2.5:443", 40004);
    let (flow, _) = s.connect_request();
    s.stack.tcp_connected(s.now, flow);
    s.step();
    s.sock(h).abort();
    s.step();
    assert_eq!(
        s.take_requests(),
        vec![Request::TcpClose { flow, reset: true }]
    );
    // A workload that gives up while the host connects.
    let h2 = s.connect("192.0.2.6:443", 40005);
    let (flow2, _) = s.connect_request();
    s.sock(h2).abort();
    s.step();
    assert_eq!(
        s.take_requests(),
        vec![Request::TcpClose {
            flow: flow2,
            reset: true
        }]
    );
    assert_eq!(s.stack.tcp_flows(), 0);
}

#[test]
fn ipv6_tcp_flows() {
    let mut s = sim("[2001:db8::1]:80");
    let h = s.connect("[2001:db8::1]:80", 40006);
    let (flow, dst) = s.connect_request();
    assert_eq!(dst, sa("[2001:db8::1]:80"));
    s.stack.tcp_connected(s.now, flow);
    s.step();
    assert_eq!(s.sock(h).state(), tcp::State::Established);
    s.sock(h).send_slice(b"six").unwrap();
    s.step();
    assert_eq!(s.host_recv(flow), b"six");
    let h2 = s.connect("[2001:db8::2]:80", 40007);
    assert_eq!(s.sock(h2).state(), tcp::State::Closed);
}

#[test]
fn many_flows_to_one_destination_stay_apart() {
    let mut s = sim("192.0.2.1:80");
    let mut pairs = Vec::new();
    for i in 0..20u16 {
        let h = s.connect("192.0.2.1:80", 41000 + i);
        let (flow, _) = s.connect_request();
        pairs.push((h, flow));
    }
    // Answer in reverse order: each SYN must reach its own flow.
    for (_, flow) in pairs.iter().rev() {
        s.stack.tcp_connected(s.now, *flow);
    }
    s.step();
    for (i, (h, _)) in pairs.iter().enumerate() {
        assert_eq!(s.sock(*h).state(), tcp::State::Established);
        s.sock(*h)
            .send_slice(format!("flow{i}").as_bytes())
            .unwrap();
    }
    s.step();
    for (i, (_, flow)) in pairs.iter().enumerate() {
        assert_eq!(s.host_recv(*flow), format!("flow{i}").as_bytes());
    }
}

#[test]
fn flow_limit_refuses_extra_flows() {
    let limits = Limits {
        max_tcp_flows: 2,
        ..Limits::default()
    };
    let mut s = sim_with("192.0.2.0/24", limits);
    let _a = s.connect("192.0.2.1:80", 42000);
    let _b = s.connect("192.0.2.1:80", 42001);
    assert_eq!(s.take_requests().len(), 2);
    let c = s.connect("192.0.2.1:80", 42002);
    assert_eq!(s.sock(c).state(), tcp::State::Closed);
    assert!(s.take_requests().is_empty());
    assert_eq!(s.stack.stats().tcp_refused_limit, 1);
    // The buffer budget bounds flows too.
    let limits = Limits {
        tcp_buffer: 1024,
        max_buffered: 4096,
        ..Limits::default()
    };
    let mut s = sim_with("192.0.2.0/24", limits);
    let _a = s.connect("192.0.2.1:80", 42000);
    let _b = s.connect("192.0.2.1:80", 42001);
    let c = s.connect("192.0.2.1:80", 42002);
    assert_eq!(s.sock(c).state(), tcp::State::Closed);
    assert_eq!(s.stack.buffered_reserved(), 4096);
}

#[test]
fn a_workload_that_never_reads_fills_only_its_buffer() {
    let limits = Limits {
        tcp_buffer: 8192,
        ..Limits::default()
    };
    let mut s = sim_with("192.0.2.1:80", limits);
    let h = s.connect("192.0.2.1:80", 42100);
    let (flow, _) = s.connect_request();
    s.stack.tcp_connected(s.now, flow);
    s.step();
    // The workload never reads: the host can write at most its window
    // plus the stack's send buffer, then capacity is 0.
    let chunk = vec![7u8; 4096];
    let mut total = 0;
    for _ in 0..100 {
        total += s.host_send(flow, &chunk);
        s.step();
    }
    assert_eq!(s.stack.tcp_send_capacity(flow), 0);
    assert!(total <= 65536 + 8192, "{total}");
    assert!(s.sock(h).recv_queue() <= 65536);
}

#[test]
fn inbound_connection_to_a_published_port() {
    let mut s = sim("");
    let mut l = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; 4096]),
        tcp::SocketBuffer::new(vec![0; 4096]),
    );
    l.listen(8080).unwrap();
    let h = s.sockets.add(l);
    let flow = s.stack.tcp_open_inbound(8080, false).unwrap();
    s.step();
    assert_eq!(s.sock(h).state(), tcp::State::Established);
    assert_eq!(
        s.sock(h).remote_endpoint().map(|e| e.addr),
        Some(IpAddr::V4(NetConfig::default().gateway_v4).into())
    );
    s.host_send(flow, b"in");
    s.step();
    let mut b = [0u8; 8];
    assert_eq!(s.sock(h).recv_slice(&mut b).unwrap(), 2);
    s.sock(h).send_slice(b"out").unwrap();
    s.step();
    assert_eq!(s.host_recv(flow), b"out");
    // Nothing listens on 9090: the workload resets, the flow closes (over
    // IPv6; smoltcp asks for one neighbour per second at most).
    let flow = s.stack.tcp_open_inbound(9090, true).unwrap();
    s.advance(Duration::from_secs(1));
    s.advance(Duration::from_secs(1));
    assert!(s
        .take_requests()
        .contains(&Request::TcpClose { flow, reset: true }));
}

#[test]
fn icmp_echo_to_the_gateway_is_answered_and_to_others_refused() {
    let mut s = sim("0.0.0.0/0");
    let cfg = NetConfig::default();
    // The gateway answers (the first request only makes it resolve the
    // workload's address, as a real ping's first one may).
    s.inject(&echo_v4(cfg.gateway_v4));
    s.step();
    s.inject(&echo_v4(cfg.gateway_v4));
    assert!(icmp_types(&s.seen).contains(&(u8::from(Icmpv4Message::EchoReply), 0)));
    s.seen.clear();
    // Anyone else: "communication administratively prohibited", never a
    // reply, whatever the policy.
    s.inject(&echo_v4(Ipv4Addr::new(192, 0, 2, 1)));
    assert_eq!(
        icmp_types(&s.seen),
        vec![(u8::from(Icmpv4Message::DstUnreachable), 13)]
    );
    s.seen.clear();
    // smoltcp asks for one neighbour per second at most.
    s.now += Duration::from_secs(1);
    s.inject(&echo_v6(cfg.gateway_v6));
    s.step();
    s.inject(&echo_v6(cfg.gateway_v6));
    assert!(icmp_types(&s.seen).contains(&(u8::from(Icmpv6Message::EchoReply), 0)));
    s.seen.clear();
    s.inject(&echo_v6("2001:db8::1".parse().unwrap()));
    assert_eq!(
        icmp_types(&s.seen),
        vec![(u8::from(Icmpv6Message::DstUnreachable), 1)]
    );
    assert_eq!(s.stack.stats().icmp_refused, 2);
}

#[test]
fn dns_answers_only_allowed_names_and_they_become_reachable() {
    let mut s = sim("*.allowed.test:443");
    let q = dns::build_query(1, "www.allowed.test", dns::TYPE_A);
    s.inject(&udp_from_workload("10.0.2.100:5353", "10.0.2.2:53", &q));
    let reqs = s.take_requests();
    let [Request::Resolve { query, name }] = reqs.as_slice() else {
        panic!("{reqs:?}")
    };
    assert_eq!(name, "www.allowed.test");
    // The same name asked for AAAA meanwhile waits for the same resolution.
    let q6 = dns::build_query(2, "WWW.allowed.test", dns::TYPE_AAAA);
    s.inject(&udp_from_workload(
        "[fd00:6d6f:6174::100]:5353",
        "[fd00:6d6f:6174::2]:53",
        &q6,
    ));
    assert!(s.take_requests().is_empty());
    s.stack.resolved(
        s.now,
        *query,
        Ok(vec![
            "192.0.2.10".parse().unwrap(),
            "2001:db8::10".parse().unwrap(),
            "127.0.0.1".parse().unwrap(),
        ]),
    );
    while let Some(f) = s.stack.pop_frame() {
        s.seen.push(f);
    }
    let answers = udp_to_workload(&s.seen);
    assert_eq!(answers.len(), 2);
    let (src, a) = &answers[0];
    assert_eq!(*src, sa("10.0.2.2:53"));
    let (rcode, addrs) = dns::parse_answer(a).unwrap();
    assert_eq!(rcode, dns::Rcode::NoError);
    // Loopback is never handed out.
    assert_eq!(addrs, vec!["192.0.2.10".parse::<IpAddr>().unwrap()]);
    let (src6, a6) = &answers[1];
    assert_eq!(*src6, sa("[fd00:6d6f:6174::2]:53"));
    assert_eq!(
        dns::parse_answer(a6).unwrap().1,
        vec!["2001:db8::10".parse::<IpAddr>().unwrap()]
    );
    // The resolved address is now reachable on the rule's port only.
    s.step();
    let _h = s.connect("192.0.2.10:443", 43000);
    assert!(matches!(
        s.take_requests().as_slice(),
        [Request::TcpConnect { .. }]
    ));
    let h = s.connect("192.0.2.10:80", 43001);
    assert_eq!(s.sock(h).state(), tcp::State::Closed);

    // Other names: NXDOMAIN, and nothing asked of the host.
    s.seen.clear();
    let q = dns::build_query(3, "evil.test", dns::TYPE_A);
    s.inject(&udp_from_workload("10.0.2.100:5353", "10.0.2.2:53", &q));
    assert!(s.take_requests().is_empty());
    let answers = udp_to_workload(&s.seen);
    assert_eq!(
        dns::parse_answer(&answers[0].1).unwrap().0,
        dns::Rcode::NxDomain
    );
    assert_eq!(s.stack.stats().dns_refused, 1);
}

#[test]
fn dns_failures_and_limits() {
    let limits = Limits {
        max_dns_pending: 1,
        ..Limits::default()
    };
    let mut s = sim_with("*.test", limits);
    let q = dns::build_query(1, "a.test", dns::TYPE_A);
    s.inject(&udp_from_workload("10.0.2.100:1000", "10.0.2.2:53", &q));
    let q = dns::build_query(2, "b.test", dns::TYPE_A);
    s.inject(&udp_from_workload("10.0.2.100:1001", "10.0.2.2:53", &q));
    // Over the bound: SERVFAIL at once.
    let answers = udp_to_workload(&s.seen);
    assert_eq!(
        dns::parse_answer(&answers[0].1).unwrap().0,
        dns::Rcode::ServFail
    );
    let reqs = s.take_requests();
    let [Request::Resolve { query, .. }] = reqs.as_slice() else {
        panic!("{reqs:?}")
    };
    s.stack.resolved(s.now, *query, Err(ResolveError::NotFound));
    while let Some(f) = s.stack.pop_frame() {
        s.seen.push(f);
    }
    let answers = udp_to_workload(&s.seen);
    assert_eq!(
        dns::parse_answer(&answers[1].1).unwrap().0,
        dns::Rcode::NxDomain
    );
    // A stale or unknown answer is ignored.
    s.stack.resolved(s.now, 12345, Ok(vec![]));
    // Other query types for allowed names: an empty NOERROR.
    s.seen.clear();
    let q = dns::build_query(4, "a.test", 16);
    s.inject(&udp_from_workload("10.0.2.100:1002", "10.0.2.2:53", &q));
    let answers = udp_to_workload(&s.seen);
    assert_eq!(
        dns::parse_answer(&answers[0].1).unwrap(),
        (dns::Rcode::NoError, vec![])
    );
    // Garbage to port 53: FORMERR or nothing, never a panic.
    let mut bad = dns::build_query(5, "a.test", dns::TYPE_A);
    bad[5] = 3;
    s.inject(&udp_from_workload("10.0.2.100:1003", "10.0.2.2:53", &bad));
    s.inject(&udp_from_workload(
        "10.0.2.100:1003",
        "10.0.2.2:53",
        &[1, 2, 3],
    ));
}

#[test]
fn udp_to_allowed_destinations_and_back() {
    let mut s = sim("192.0.2.1:9999");
    s.inject(&udp_from_workload(
        "10.0.2.100:7000",
        "192.0.2.1:9999",
        b"ping",
    ));
    let reqs = s.take_requests();
    let [Request::UdpSend { flow, dst, payload }] = reqs.as_slice() else {
        panic!("{reqs:?}")
    };
    assert_eq!(
        (*dst, payload.as_slice()),
        (sa("192.0.2.1:9999"), &b"ping"[..])
    );
    let flow = *flow;
    // The same pair reuses the flow.
    s.inject(&udp_from_workload(
        "10.0.2.100:7000",
        "192.0.2.1:9999",
        b"again",
    ));
    assert!(matches!(
        s.take_requests().as_slice(),
        [Request::UdpSend { flow: f, .. }] if *f == flow
    ));
    s.stack.udp_received(s.now, flow, b"pong");
    while let Some(f) = s.stack.pop_frame() {
        s.seen.push(f);
    }
    assert_eq!(
        udp_to_workload(&s.seen),
        vec![(sa("192.0.2.1:9999"), b"pong".to_vec())]
    );
    // Refused: ICMP prohibited, nothing for the host.
    s.seen.clear();
    s.inject(&udp_from_workload(
        "10.0.2.100:7000",
        "192.0.2.1:9998",
        b"x",
    ));
    assert!(s.take_requests().is_empty());
    assert_eq!(
        icmp_types(&s.seen),
        vec![(u8::from(Icmpv4Message::DstUnreachable), 13)]
    );
    // The gateway's other ports: port unreachable.
    s.seen.clear();
    s.inject(&udp_from_workload("10.0.2.100:7000", "10.0.2.2:123", b"x"));
    assert_eq!(
        icmp_types(&s.seen),
        vec![(u8::from(Icmpv4Message::DstUnreachable), 3)]
    );
    // Idle flows expire.
    s.now += Limits::default().udp_idle;
    s.stack.poll(s.now);
    assert_eq!(s.stack.next_request(), Some(Request::UdpClose { flow }));
    assert_eq!(s.stack.udp_flows(), 0);
}

#[test]
fn udp_queue_is_bounded() {
    let limits = Limits {
        max_udp_queued: 1000,
        ..Limits::default()
    };
    let mut s = sim_with("192.0.2.1", limits);
    let big = vec![0u8; 400];
    for _ in 0..10 {
        s.stack.receive_frame(
            s.now,
            &udp_from_workload("10.0.2.100:7000", "192.0.2.1:9", &big),
        );
    }
    let mut queued = 0;
    while let Some(r) = s.stack.next_request() {
        if let Request::UdpSend { payload, .. } = r {
            queued += payload.len();
        }
    }
    assert_eq!(queued, 800);
    assert_eq!(s.stack.stats().dropped_queue_full, 8);
}

/// A deterministic generator for hostile bytes.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u8 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u8
    }
}

#[test]
fn garbage_frames_are_dropped_and_counted() {
    let mut s = sim("0.0.0.0/0,::/0");
    let mut rng = Lcg(1);
    for len in 0..600 {
        let f: Vec<u8> = (0..len % 200).map(|_| rng.next()).collect();
        s.stack.receive_frame(s.now, &f);
    }
    s.stack.poll(s.now);
    let st = s.stack.stats();
    assert_eq!(st.frames_in, 600);
    assert!(st.dropped_malformed + st.dropped_not_for_us + st.dropped_unsupported >= 590);
    // Every single-byte change of real frames: parsed or dropped, never a
    // panic, and the stack still works afterwards.
    let syn = {
        let mut t = sim("192.0.2.1:80");
        let _ = t.connect("192.0.2.1:80", 44000);
        t.link.rx.clear();
        // Re-create the SYN the workload sent: it is the stack's held frame.
        match t.stack.tcp.values().next().map(|f| &f.state) {
            Some(TcpState::Connecting { syn }) => syn.clone(),
            _ => panic!("no held SYN"),
        }
    };
    let q = dns::build_query(1, "x.test", dns::TYPE_A);
    let frames = [
        syn,
        udp_from_workload("10.0.2.100:5353", "10.0.2.2:53", &q),
        echo_v4(Ipv4Addr::new(192, 0, 2, 1)),
        echo_v6("2001:db8::1".parse().unwrap()),
    ];
    for f in &frames {
        for i in 0..f.len() {
            for v in [0u8, 0xff, f[i] ^ 1] {
                let mut g = f.clone();
                g[i] = v;
                s.stack.receive_frame(s.now, &g);
                s.stack.receive_frame(s.now, &g[..i]);
            }
        }
        s.stack.poll(s.now);
        while s.stack.pop_frame().is_some() {}
        while s.stack.next_request().is_some() {}
    }
    let h = s.connect("192.0.2.77:80", 44001);
    assert_eq!(s.sock(h).state(), tcp::State::SynSent);
}

#[test]
fn tx_queue_is_bounded() {
    let limits = Limits {
        max_tx_frames: 4,
        ..Limits::default()
    };
    let mut s = sim_with("", limits);
    for _ in 0..100 {
        s.stack
            .receive_frame(s.now, &echo_v4(Ipv4Addr::new(192, 0, 2, 1)));
    }
    let mut n = 0;
    while s.stack.pop_frame().is_some() {
        n += 1;
    }
    assert_eq!(n, 4);
    assert_eq!(s.stack.stats().dropped_queue_full, 96);
}

#[test]
fn bytes_sent_before_the_workload_closes_are_not_lost() {
    let mut s = sim("192.0.2.1:80");
    let h = s.connect("192.0.2.1:80", 45000);
    let (flow, _) = s.connect_request();
    s.stack.tcp_connected(s.now, flow);
    s.step();
    // The host closes first; the workload then sends and closes before
    // the host took its bytes.
    s.stack.tcp_host_eof(flow);
    s.step();
    s.sock(h).send_slice(b"last words").unwrap();
    s.sock(h).close();
    s.step();
    assert!(s.take_requests().is_empty(), "closed with bytes pending");
    assert_eq!(s.stack.tcp_flows(), 1);
    assert_eq!(s.host_recv(flow), b"last words");
    s.stack.poll(s.now);
    while let Some(r) = s.stack.next_request() {
        s.requests.push(r);
    }
    assert_eq!(
        s.take_requests(),
        vec![
            Request::TcpShutdown { flow },
            Request::TcpClose { flow, reset: false }
        ]
    );
    assert_eq!(s.stack.tcp_flows(), 0);
}

#[test]
fn link_queues_are_bounded_in_bytes() {
    // The bound never goes below one largest frame (65534 bytes here).
    let limits = Limits {
        max_link_bytes: 1,
        ..Limits::default()
    };
    let max = NetConfig::default().max_frame();
    let mut s = sim_with("192.0.2.1:9", limits);
    // Frames for smoltcp (echo requests to the gateway, padded to 20000
    // bytes): three fit before it runs.
    let mut big = echo_v4(NetConfig::default().gateway_v4);
    big.resize(20_000, 0);
    for _ in 0..100 {
        s.stack.receive_frame(s.now, &big);
        assert!(s.stack.link.rx_bytes <= max);
    }
    assert_eq!(s.stack.stats().dropped_queue_full, 97);
    s.stack.poll(s.now);
    assert_eq!(s.stack.link.rx_bytes, 0);
    while s.stack.pop_frame().is_some() {}
    // Datagrams from the host for the workload: the queue towards the TAP
    // stops within one frame of its bound.
    s.inject(&udp_from_workload("10.0.2.100:7000", "192.0.2.1:9", b"hi"));
    let flow = match s.take_requests().as_slice() {
        [Request::UdpSend { flow, .. }] => *flow,
        other => panic!("{other:?}"),
    };
    let before = s.stack.stats().dropped_queue_full;
    for _ in 0..100 {
        s.stack.udp_received(s.now, flow, &[7u8; 30_000]);
        assert!(s.stack.link.tx_bytes <= 2 * max);
    }
    let mut out = 0;
    while let Some(f) = s.stack.pop_frame() {
        out += f.len();
    }
    assert!(out <= 2 * max, "{out} bytes queued");
    assert_eq!(s.stack.link.tx_bytes, 0);
    assert!(s.stack.stats().dropped_queue_full >= before + 97);
}

#[test]
fn a_published_udp_port_gets_a_flow_per_host_peer() {
    let mut s = sim("");
    // Before the workload sent a frame its address is unknown: dropped.
    assert_eq!(s.stack.udp_open_inbound(s.now, 5353, false), None);
    s.inject(&echo_v4(NetConfig::default().gateway_v4));
    let a = s.stack.udp_open_inbound(s.now, 5353, false).unwrap();
    let b = s.stack.udp_open_inbound(s.now, 5353, false).unwrap();
    assert_ne!(a, b);
    s.seen.clear();
    s.stack.udp_received(s.now, a, b"hello");
    while let Some(f) = s.stack.pop_frame() {
        s.seen.push(f);
    }
    let got = udp_to_workload(&s.seen);
    assert_eq!(got.len(), 1);
    let (from, payload) = &got[0];
    assert_eq!(from.ip(), IpAddr::V4(NetConfig::default().gateway_v4));
    assert_eq!(payload, b"hello");
    // The workload's answer to that gateway port goes to flow a, whatever
    // the egress policy (here: nothing allowed).
    let to = format!("{from}");
    s.inject(&udp_from_workload("10.0.2.100:5353", &to, b"answer"));
    let reqs = s.take_requests();
    assert!(
        matches!(reqs.as_slice(), [Request::UdpSend { flow, payload, .. }] if *flow == a && payload == b"answer"),
        "{reqs:?}"
    );
    // Another gateway port with no flow: port unreachable, as before.
    s.seen.clear();
    s.inject(&udp_from_workload("10.0.2.100:5353", "10.0.2.2:9", b"x"));
    assert!(s.take_requests().is_empty());
    assert_eq!(
        icmp_types(&s.seen),
        vec![(u8::from(Icmpv4Message::DstUnreachable), 3)]
    );
    // The flow limit holds for inbound flows too.
    let limits = Limits {
        max_udp_flows: 2,
        ..Limits::default()
    };
    let mut s = sim_with("", limits);
    s.inject(&echo_v4(NetConfig::default().gateway_v4));
    assert!(s.stack.udp_open_inbound(s.now, 53, true).is_some());
    assert!(s.stack.udp_open_inbound(s.now, 53, true).is_some());
    assert_eq!(s.stack.udp_open_inbound(s.now, 53, true), None);
    // Idle ones expire and make room.
    s.now += Limits::default().udp_idle;
    assert!(s.stack.udp_open_inbound(s.now, 53, true).is_some());
}

#[path = "stack_fuzz.rs"]
mod fuzz;
