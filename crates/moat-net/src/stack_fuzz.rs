//! Seeded fuzzing in the normal test suite: frames a real session produced
//! (captured from the simulated workload), mutated many thousand times, go
//! into the parsers the core runs before smoltcp (`frame::classify`,
//! `dns::parse_query`) and into a whole stack whose shell answers are
//! faked. Nothing may panic, and after every frame every queue, flow table
//! and byte count stays within its limit. Deterministic: a fixed seed, so
//! a failure names the iteration that reproduces it. (`cargo fuzz run
//! net_frames` explores further, coverage-guided, outside the suite.)
use smoltcp::wire::{IpAddress, TcpPacket, UdpPacket};

use super::*;

/// xorshift64*: small, seeded, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

/// A session's frames from the workload: ARP and NDP, TCP over v4 and v6
/// (handshake, data, FIN), DNS queries, UDP, ICMP echo to the gateway and
/// elsewhere.
fn corpus() -> Vec<Vec<u8>> {
    let mut s = sim("192.0.2.1:80,192.0.2.1:9999,[2001:db8::1]:443,*.test");
    for (dst, port) in [("192.0.2.1:80", 40000), ("[2001:db8::1]:443", 40001)] {
        let _ = s.take_requests();
        // Past smoltcp's one neighbour query a second.
        s.now += Duration::from_secs(2);
        let h = s.connect(dst, port);
        let (flow, _) = s.connect_request();
        s.stack.tcp_connected(s.now, flow);
        s.step();
        s.sock(h).send_slice(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        s.step();
        let _ = s.host_recv(flow);
        s.host_send(flow, b"HTTP/1.0 200 OK\r\n\r\nhello");
        s.stack.poll(s.now);
        s.step();
        s.sock(h).close();
        s.step();
    }
    for (id, name, qtype) in [
        (1, "www.test", dns::TYPE_A),
        (2, "www.test", dns::TYPE_AAAA),
        (3, "example.com", dns::TYPE_A),
    ] {
        let q = dns::build_query(id, name, qtype);
        s.inject(&udp_from_workload("10.0.2.100:5353", "10.0.2.2:53", &q));
        s.inject(&udp_from_workload(
            "[fd00:6d6f:6174::100]:5353",
            "[fd00:6d6f:6174::2]:53",
            &q,
        ));
    }
    s.inject(&udp_from_workload(
        "10.0.2.100:7000",
        "192.0.2.1:9999",
        b"datagram",
    ));
    s.inject(&echo_v4(NetConfig::default().gateway_v4));
    s.inject(&echo_v4(Ipv4Addr::new(192, 0, 2, 1)));
    s.inject(&echo_v6(NetConfig::default().gateway_v6));
    s.inject(&echo_v6("2001:db8::1".parse().unwrap()));
    let frames = std::mem::take(&mut s.sent);
    assert!(frames.len() > 20, "a short session: {}", frames.len());
    frames
}

/// Recomputes the IPv4 header and TCP/UDP/ICMP checksums, so a mutation
/// gets past the checksum checks into what reads the fields behind them.
fn fix_checksums(f: &mut [u8]) {
    let Ok(mut eth) = EthernetFrame::new_checked(&mut f[..]) else {
        return;
    };
    match eth.ethertype() {
        EthernetProtocol::Ipv4 => {
            let Ok(mut ip) = Ipv4Packet::new_checked(eth.payload_mut()) else {
                return;
            };
            ip.fill_checksum();
            let (src, dst) = (ip.src_addr(), ip.dst_addr());
            let proto = ip.next_header();
            fix_l4(proto, src.into(), dst.into(), ip.payload_mut());
        }
        EthernetProtocol::Ipv6 => {
            let Ok(mut ip) = Ipv6Packet::new_checked(eth.payload_mut()) else {
                return;
            };
            let (src, dst) = (ip.src_addr(), ip.dst_addr());
            let proto = ip.next_header();
            fix_l4(proto, src.into(), dst.into(), ip.payload_mut());
        }
        _ => {}
    }
}

fn fix_l4(proto: IpProtocol, src: IpAddress, dst: IpAddress, payload: &mut [u8]) {
    match (proto, src, dst) {
        (IpProtocol::Tcp, ..) => {
            if let Ok(mut p) = TcpPacket::new_checked(payload) {
                p.fill_checksum(&src, &dst);
            }
        }
        (IpProtocol::Udp, ..) => {
            if let Ok(mut p) = UdpPacket::new_checked(payload) {
                p.fill_checksum(&src, &dst);
            }
        }
        (IpProtocol::Icmp, ..) => {
            if let Ok(mut p) = Icmpv4Packet::new_checked(payload) {
                p.fill_checksum();
            }
        }
        (IpProtocol::Icmpv6, IpAddress::Ipv6(s), IpAddress::Ipv6(d)) => {
            if let Ok(mut p) = Icmpv6Packet::new_checked(payload) {
                p.fill_checksum(&s, &d);
            }
        }
        _ => {}
    }
}

/// One to four mutations of a corpus frame (or of two spliced): bit flips,
/// interesting bytes and 16-bit values, truncation, growth, deletion;
/// checksums fixed afterwards half the time.
fn mutate(rng: &mut Rng, corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut f = corpus[rng.below(corpus.len())].clone();
    for _ in 0..1 + rng.below(4) {
        let len = f.len();
        match rng.below(8) {
            0 if len > 0 => {
                let i = rng.below(len);
                f[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                f[i] = [0, 1, 0x7f, 0x80, 0xff, rng.byte()][rng.below(6)];
            }
            2 if len > 1 => {
                let i = rng.below(len - 1);
                let v: u16 = [
                    0,
                    1,
                    0xffff,
                    0x8000,
                    len as u16,
                    (len as u16).wrapping_sub(14),
                ][rng.below(6)];
                f[i..i + 2].copy_from_slice(&v.to_be_bytes());
            }
            3 => f.truncate(rng.below(len + 1)),
            4 => {
                let n = rng.below(64);
                f.extend((0..n).map(|_| rng.byte()));
            }
            5 if len > 0 => {
                let i = rng.below(len);
                let n = rng.below(len - i + 1);
                f.drain(i..i + n);
            }
            6 => {
                // Splice: this frame's head, another's tail.
                let other = &corpus[rng.below(corpus.len())];
                let cut = rng.below(len.min(other.len()) + 1);
                f.truncate(cut);
                f.extend_from_slice(&other[cut.min(other.len())..]);
            }
            _ => {
                let n = rng.below(200);
                f = (0..n).map(|_| rng.byte()).collect();
            }
        }
    }
    if rng.below(2) == 0 {
        fix_checksums(&mut f);
    }
    f
}

#[test]
fn fuzz_frame_and_dns_parsers() {
    let corpus = corpus();
    let mut rng = Rng(0x6d6f_6174_6e65_7431);
    let our_mac = gw_mac();
    let mut parsed = 0;
    for i in 0..50_000 {
        let f = mutate(&mut rng, &corpus);
        if let Ok(frame) = frame::classify(&f, our_mac) {
            parsed += 1;
            assert!(frame.ip_payload.len() <= f.len(), "iteration {i}");
            if let Kind::Udp { payload, .. } = frame.kind {
                assert!(payload.len() <= f.len(), "iteration {i}");
                if let Ok(q) = dns::parse_query(payload) {
                    let answer = q.answer(Rcode::NoError, &["192.0.2.1".parse().unwrap()], 30);
                    assert!(answer.len() <= 512, "iteration {i}: {}", answer.len());
                    assert!(dns::parse_answer(&answer).is_some(), "iteration {i}");
                }
            }
        }
        // The DNS parser on its own, at any offset of the bytes.
        let _ = dns::parse_query(&f[f.len().min(42)..]);
    }
    eprintln!("{parsed} of 50000 mutated frames parsed");
    // Many mutations keep a frame valid enough to parse.
    assert!(parsed > 5_000, "only {parsed} mutated frames parsed");
}

#[test]
fn fuzz_the_whole_stack_with_mutated_frames() {
    let corpus = corpus();
    let limits = Limits {
        max_tcp_flows: 8,
        max_udp_flows: 8,
        tcp_buffer: 4096,
        max_buffered: 6 * 2 * 4096,
        max_udp_queued: 8192,
        max_tx_frames: 64,
        max_link_bytes: 128 * 1024,
        max_dns_pending: 4,
        learned_addrs: 16,
        ..Limits::default()
    };
    let mut s = sim_with("192.0.2.0/24,2001:db8::/32,*.test", limits.clone());
    let max_frame = NetConfig::default().max_frame();
    let mut rng = Rng(0x7374_6163_6b21_0001);
    let mut open: Vec<FlowId> = Vec::new();
    for i in 0..30_000 {
        let f = mutate(&mut rng, &corpus);
        s.stack.receive_frame(s.now, &f);
        if rng.below(4) > 0 {
            s.stack.poll(s.now);
        }
        // The shell's side, faked: answers in a random order and mood.
        while let Some(r) = s.stack.next_request() {
            match r {
                Request::TcpConnect { flow, .. } => {
                    if rng.below(3) > 0 {
                        s.stack.tcp_connected(s.now, flow);
                        open.push(flow);
                    } else {
                        s.stack.tcp_connect_failed(s.now, flow);
                    }
                }
                Request::Resolve { query, .. } => {
                    let r = match rng.below(3) {
                        0 => Err(ResolveError::NotFound),
                        1 => Ok(vec!["192.0.2.7".parse().unwrap(), "::1".parse().unwrap()]),
                        _ => Ok(vec!["2001:db8::7".parse().unwrap()]),
                    };
                    s.stack.resolved(s.now, query, r);
                }
                Request::UdpSend { flow, payload, .. } => {
                    s.stack.udp_received(s.now, flow, &payload)
                }
                Request::TcpClose { flow, .. } => open.retain(|f| *f != flow),
                Request::TcpShutdown { .. } | Request::UdpClose { .. } => {}
            }
        }
        if let Some(&flow) = open.get(rng.below(open.len().max(1))) {
            match rng.below(6) {
                0 => {
                    s.host_send(flow, &[b'x'; 3000]);
                }
                1 => {
                    let _ = s.host_recv(flow);
                }
                2 => s.stack.tcp_host_eof(flow),
                3 => s.stack.tcp_abort(s.now, flow),
                _ => {}
            }
        }
        if rng.below(50) == 0 {
            let _ = s.stack.udp_open_inbound(s.now, 53, rng.below(2) == 0);
            let _ = s.stack.tcp_open_inbound(80, rng.below(2) == 0);
        }
        // The TAP is sometimes slow to take frames.
        if rng.below(3) > 0 {
            while let Some(f) = s.stack.pop_frame() {
                s.stack.recycle(f);
            }
        }
        s.now += Duration::from_millis(rng.below(2000) as u64);
        check_bounds(&s.stack, &limits, max_frame, i);
    }
    let st = s.stack.stats();
    eprintln!("after 30000 mutated frames: {st:?}");
    assert!(st.frames_in == 30_000, "{st:?}");
    assert!(
        st.tcp_opened > 0 && st.dns_answered > 0 && st.dropped_malformed > 0,
        "the mutations reached deep enough: {st:?}"
    );
    // The stack still serves a well-formed flow afterwards.
    while s.stack.pop_frame().is_some() {}
    s.stack.poll(s.now);
    while s.stack.next_request().is_some() {}
    s.link.rx.clear();
    let h = s.connect("192.0.2.1:80", 41000);
    let (flow, _) = s.connect_request();
    s.stack.tcp_connected(s.now, flow);
    s.step();
    assert_eq!(s.sock(h).state(), tcp::State::Established);
}

/// Every bounded thing within its bound, after iteration `i`.
fn check_bounds(stack: &Stack, l: &Limits, max_frame: usize, i: usize) {
    let at = |what: &str| format!("iteration {i}: {what}");
    assert!(stack.tcp.len() <= l.max_tcp_flows, "{}", at("tcp flows"));
    assert_eq!(stack.tcp.len(), stack.tcp_keys.len(), "{}", at("tcp keys"));
    assert!(stack.udp.len() <= l.max_udp_flows, "{}", at("udp flows"));
    assert_eq!(stack.udp.len(), stack.udp_keys.len(), "{}", at("udp keys"));
    assert!(stack.reserved <= l.max_buffered, "{}", at("reserved"));
    assert!(
        stack.sockets.iter().count() <= l.max_tcp_flows,
        "{}",
        at("smoltcp sockets")
    );
    assert!(
        stack.link.rx_bytes <= l.max_link_bytes,
        "{}",
        at("rx bytes")
    );
    assert!(stack.link.rx.len() <= MAX_RX_FRAMES, "{}", at("rx frames"));
    assert!(
        stack.link.tx_bytes <= l.max_link_bytes + max_frame,
        "{}",
        at("tx bytes")
    );
    assert!(
        stack.link.tx.len() <= l.max_tx_frames,
        "{}",
        at("tx frames")
    );
    assert!(
        stack.link.free.len() <= FREE_FRAMES,
        "{}",
        at("free frames")
    );
    assert!(stack.udp_queued <= l.max_udp_queued, "{}", at("udp queued"));
    assert!(
        stack.dns.waiting <= l.max_dns_pending,
        "{}",
        at("dns waiting")
    );
    assert!(
        stack.dns.pending.len() <= l.max_dns_pending,
        "{}",
        at("dns pending")
    );
    assert!(
        stack.dns.cache.len() <= DNS_CACHE_NAMES,
        "{}",
        at("dns cache")
    );
    // Requests are drained every round; what one frame can queue is small.
    assert!(stack.requests.len() <= 64, "{}", at("requests"));
}
