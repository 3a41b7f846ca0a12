//! The stack for real, as root: three network namespaces this test makes
//! (and that vanish with its fds, even when a test fails):
//!
//! - "internet": servers on 192.0.2.1, 192.0.2.2 and 2001:db8::1 (on lo),
//!   reached over a veth from
//! - "outer": where the stack runs and opens its host sockets (its own
//!   addresses 198.51.100.1 and 2001:db8:1::1 are the "host's"), and
//! - "workload": only the TAP device, 10.0.2.100 and fd00:6d6f:6174::100.
//!
//! Threads enter a namespace with setns; no `ip netns`, nothing on the
//! machine's own network. Waits are on real events (a reply, an EOF);
//! socket timeouts are only guards against a hang, never asserted.
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use moat_net::dns::{self, Rcode};
use moat_net::netlink::Netlink;
use moat_net::shell::{control, serve, Ended, Resolver, ServeConfig, StopHandle};
use moat_net::{create_tap, NetConfig, Policy, ResolveError};
use sha2::{Digest, Sha256};

mod common;
use common::Netns;

const GUARD: Duration = Duration::from_secs(60);
const ECHO: u16 = 7007;
const HTTP: u16 = 8080;
const BIG: u16 = 9000;
const STREAM: u16 = 9100;
const POLICY: &str = "192.0.2.1:7007,192.0.2.1:8080,192.0.2.1:9000,192.0.2.1:9100,\
                      192.0.2.1:9,[2001:db8::1]:7007,*.allowed.test:7007,198.51.100.0/24";
const BIG_LEN: usize = 64 << 20;

fn skip() -> bool {
    moat_core::testing::needs_root("moat-net netns tests")
        || !std::path::Path::new("/dev/net/tun").exists()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Wires "outer" to "internet" and gives "internet" its server addresses.
fn wire(outer: &Netns, internet: &Netns) {
    outer.run(|| {
        let mut nl = Netlink::open().unwrap();
        nl.add_veth("o0", "i0", internet.0.as_fd()).unwrap();
        let o0 = nl.index("o0").unwrap();
        nl.set_up(1, None).unwrap();
        nl.add_addr(o0, ip("198.51.100.1"), 24).unwrap();
        nl.add_addr(o0, ip("2001:db8:1::1"), 64).unwrap();
        nl.set_up(o0, None).unwrap();
        nl.add_default_route(o0, ip("198.51.100.2")).unwrap();
        nl.add_default_route(o0, ip("2001:db8:1::2")).unwrap();
    });
    internet.run(|| {
        let mut nl = Netlink::open().unwrap();
        nl.set_up(1, None).unwrap();
        for (a, len) in [("192.0.2.1", 32), ("192.0.2.2", 32), ("2001:db8::1", 128)] {
            nl.add_addr(1, ip(a), len).unwrap();
        }
        let i0 = nl.index("i0").unwrap();
        nl.add_addr(i0, ip("198.51.100.2"), 24).unwrap();
        nl.add_addr(i0, ip("2001:db8:1::2"), 64).unwrap();
        nl.set_up(i0, None).unwrap();
    });
}

/// The bytes the BIG server sends: deterministic, not all the same.
fn big_payload() -> Vec<u8> {
    (0..BIG_LEN)
        .map(|i| (i % 251) as u8 ^ (i >> 16) as u8)
        .collect()
}

/// Echo, HTTP, a 64 MiB download and an endless stream, on every address of
/// "internet". Bound before this returns, so clients never race them.
fn start_servers(internet: &Netns) -> mpsc::Receiver<&'static str> {
    let (events, rx) = mpsc::channel();
    let listeners = internet.run(|| {
        let l = |port| TcpListener::bind(SocketAddr::new(ip("::"), port)).unwrap();
        (l(ECHO), l(HTTP), l(BIG), l(STREAM))
    });
    let serve =
        |l: TcpListener, f: fn(TcpStream, mpsc::Sender<&'static str>), ev: mpsc::Sender<_>| {
            std::thread::spawn(move || {
                for s in l.incoming().flatten() {
                    let ev = ev.clone();
                    std::thread::spawn(move || f(s, ev));
                }
            });
        };
    serve(listeners.0, echo, events.clone());
    serve(listeners.1, http, events.clone());
    serve(listeners.2, big, events.clone());
    serve(listeners.3, stream, events);
    rx
}

fn echo(mut s: TcpStream, _: mpsc::Sender<&'static str>) {
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

fn http(mut s: TcpStream, _: mpsc::Sender<&'static str>) {
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    let body = format!(
        "hello from the test internet; you asked {}",
        String::from_utf8_lossy(&req).lines().next().unwrap_or("")
    );
    let _ = write!(
        s,
        "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
}

fn big(mut s: TcpStream, _: mpsc::Sender<&'static str>) {
    let _ = s.write_all(&big_payload());
}

/// Answers an HTTP request with a body that never ends; reports when the
/// peer goes away.
fn stream(mut s: TcpStream, ev: mpsc::Sender<&'static str>) {
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    if s.write_all(b"HTTP/1.0 200 OK\r\n\r\n").is_err() {
        return;
    }
    let chunk = vec![0x5a; 65536];
    let mut sent = 0usize;
    loop {
        if s.write_all(&chunk).is_err() {
            let _ = ev.send("stream peer gone");
            return;
        }
        sent += chunk.len();
        if sent == 4 << 20 {
            let _ = ev.send("stream 4 MiB sent");
        }
    }
}

struct FakeResolver;

impl Resolver for FakeResolver {
    fn resolve(&self, name: &str) -> Result<Vec<IpAddr>, ResolveError> {
        match name {
            "www.allowed.test" => Ok(vec![ip("192.0.2.2"), ip("2001:db8::1")]),
            "evil.test" => Ok(vec![ip("192.0.2.1")]),
            _ => Err(ResolveError::NotFound),
        }
    }
}

/// The whole setup; stops the stack and drops the namespaces when dropped.
struct Net {
    workload: Netns,
    outer: Netns,
    _internet: Netns,
    events: mpsc::Receiver<&'static str>,
    stop: StopHandle,
    serve: Option<JoinHandle<Ended>>,
}

/// Namespaces, servers and the TAP device, before the stack runs.
struct Setup {
    workload: Netns,
    outer: Netns,
    internet: Netns,
    events: mpsc::Receiver<&'static str>,
    tap: moat_net::Tap,
}

impl Setup {
    fn new() -> Setup {
        let (internet, outer, workload) = (Netns::new(), Netns::new(), Netns::new());
        wire(&outer, &internet);
        let events = start_servers(&internet);
        let tap = create_tap(workload.0.as_fd(), "tap0", &NetConfig::default()).unwrap();
        assert_eq!(tap.name, "tap0");
        Setup {
            workload,
            outer,
            internet,
            events,
            tap,
        }
    }

    /// Runs the stack in "outer".
    fn start(self, publish: &[&str], exit_with: Option<OwnedFd>) -> Net {
        let mut cfg = ServeConfig::new(Policy::parse(POLICY).unwrap());
        cfg.publish = publish.iter().map(|p| p.parse().unwrap()).collect();
        cfg.exit_with = exit_with;
        let (ctl, stop) = control().unwrap();
        let tap = self.tap.fd;
        let serve = self
            .outer
            .spawn(move || serve(tap, cfg, Arc::new(FakeResolver), ctl).expect("serve failed"));
        Net {
            workload: self.workload,
            outer: self.outer,
            _internet: self.internet,
            events: self.events,
            stop,
            serve: Some(serve),
        }
    }
}

impl Net {
    fn new(publish: &[&str]) -> Net {
        Setup::new().start(publish, None)
    }

    fn finish(&mut self) -> Ended {
        self.stop.stop();
        self.serve.take().unwrap().join().expect("serve thread")
    }

    /// A DNS query from the workload to the gateway.
    fn dns(&self, name: &str, qtype: u16) -> (Rcode, Vec<IpAddr>) {
        let name = name.to_owned();
        self.workload.run(move || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.set_read_timeout(Some(GUARD)).unwrap();
            s.send_to(&dns::build_query(77, &name, qtype), "10.0.2.2:53")
                .unwrap();
            let mut buf = [0u8; 512];
            let n = s.recv(&mut buf).expect("no DNS answer");
            dns::parse_answer(&buf[..n]).expect("bad DNS answer")
        })
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(t) = self.serve.take() {
            let _ = t.join();
        }
    }
}

/// Returns once a TCP socket of this thread's network namespace listens on
/// `port` (/proc/thread-self/net: the namespace of the calling thread, not
/// of the process's first thread).
fn wait_listening(port: u16) {
    let deadline = std::time::Instant::now() + GUARD;
    let local = format!(":{port:04X}");
    loop {
        let tcp = std::fs::read_to_string("/proc/thread-self/net/tcp").unwrap();
        let listening = tcp.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(&local) && f[3] == "0A"
        });
        if listening {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "nothing listens on port {port}"
        );
        std::thread::yield_now();
    }
}

fn connect(dst: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&dst, GUARD)?;
    s.set_read_timeout(Some(GUARD))?;
    s.set_write_timeout(Some(GUARD))?;
    Ok(s)
}

fn echo_once(dst: SocketAddr, msg: &[u8]) -> Vec<u8> {
    let mut s = connect(dst).unwrap_or_else(|e| panic!("connect {dst}: {e}"));
    s.write_all(msg).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    out
}

#[test]
fn allowed_destinations_by_address_port_and_name() {
    if skip() {
        return;
    }
    let mut net = Net::new(&[]);
    let v4 = net
        .workload
        .run(|| echo_once(sa("192.0.2.1:7007"), b"over ipv4"));
    assert_eq!(v4, b"over ipv4");
    let v6 = net
        .workload
        .run(|| echo_once(sa("[2001:db8::1]:7007"), b"over ipv6"));
    assert_eq!(v6, b"over ipv6");
    // By name: the gateway answers for an allowed name, and the address it
    // gave becomes reachable on the rule's port.
    let (rcode, addrs) = net.dns("www.allowed.test", dns::TYPE_A);
    assert_eq!(
        (rcode, addrs.clone()),
        (Rcode::NoError, vec![ip("192.0.2.2")])
    );
    let by_name = net
        .workload
        .run(|| echo_once(sa("192.0.2.2:7007"), b"by name"));
    assert_eq!(by_name, b"by name");
    let (rcode, addrs) = net.dns("www.allowed.test", dns::TYPE_AAAA);
    assert_eq!((rcode, addrs), (Rcode::NoError, vec![ip("2001:db8::1")]));
    assert_eq!(net.finish(), Ended::Stopped);
}

#[test]
fn http_through_the_stack_with_curl() {
    if skip() {
        return;
    }
    if std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_err()
    {
        moat_core::testing::skip("http_through_the_stack_with_curl", "no curl");
        return;
    }
    let net = Net::new(&[]);
    let out = net.workload.run(|| {
        std::process::Command::new("curl")
            .args(["-sS", "--max-time", "60", "http://192.0.2.1:8080/moat"])
            .output()
            .unwrap()
    });
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from the test internet; you asked GET /moat HTTP/1.1"
    );
}

#[test]
fn refused_destinations_fail_fast() {
    if skip() {
        return;
    }
    let net = Net::new(&[]);
    for dst in [
        "192.0.2.1:7008",     // port not allowed
        "192.0.2.3:7007",     // address not allowed
        "[2001:db8::2]:7007", // same, IPv6
        "198.51.100.1:7007",  // the host's own address, though a rule covers it
        "192.0.2.1:9",        // allowed, but the host refuses
        "10.0.2.2:80",        // the gateway serves no TCP
    ] {
        let err = net
            .workload
            .run(|| connect(sa(dst)).map(|_| ()).unwrap_err());
        assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{dst}: {err}");
    }
    // A name the policy does not allow: NXDOMAIN, though it would resolve.
    assert_eq!(net.dns("evil.test", dns::TYPE_A), (Rcode::NxDomain, vec![]));
    assert_eq!(
        net.dns("unknown.allowed.test", dns::TYPE_A),
        (Rcode::NxDomain, vec![])
    );
    // UDP to a refused destination: ICMP "administratively prohibited",
    // which Linux reports to a connected UDP socket as EHOSTUNREACH.
    let err = net.workload.run(|| {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(GUARD)).unwrap();
        s.connect("192.0.2.1:5353").unwrap();
        s.send(b"x").unwrap();
        s.recv(&mut [0u8; 16]).unwrap_err()
    });
    assert_eq!(err.kind(), ErrorKind::HostUnreachable, "{err}");
}

#[test]
fn large_transfer_arrives_intact() {
    if skip() {
        return;
    }
    let mut net = Net::new(&[]);
    let expected = Sha256::digest(big_payload());
    let (len, got) = net.workload.run(|| {
        let mut s = connect(sa("192.0.2.1:9000")).unwrap();
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut len = 0;
        loop {
            match s.read(&mut buf).unwrap() {
                0 => break,
                n => {
                    h.update(&buf[..n]);
                    len += n;
                }
            }
        }
        (len, h.finalize())
    });
    assert_eq!(len, BIG_LEN);
    assert_eq!(got, expected);
    // And the other way: 16 MiB up through the echo server and back.
    let up: Vec<u8> = (0..16u32 << 20).map(|i| (i * 7 % 253) as u8).collect();
    let expected = Sha256::digest(&up);
    let back = net.workload.run(move || {
        let mut s = connect(sa("192.0.2.1:7007")).unwrap();
        let mut r = s.try_clone().unwrap();
        let reader = std::thread::spawn(move || {
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                match r.read(&mut buf).unwrap() {
                    0 => return h.finalize(),
                    n => h.update(&buf[..n]),
                }
            }
        });
        s.write_all(&up).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        reader.join().unwrap()
    });
    assert_eq!(back, expected);
    assert_eq!(net.finish(), Ended::Stopped);
}

#[test]
fn two_hundred_concurrent_flows() {
    if skip() {
        return;
    }
    let net = Net::new(&[]);
    net.workload.run(|| {
        let mut conns: Vec<TcpStream> = (0..200)
            .map(|i| connect(sa("192.0.2.1:7007")).unwrap_or_else(|e| panic!("flow {i}: {e}")))
            .collect();
        for (i, c) in conns.iter_mut().enumerate() {
            c.write_all(format!("flow {i:03}").as_bytes()).unwrap();
        }
        for (i, c) in conns.iter_mut().enumerate() {
            let mut b = [0u8; 8];
            c.read_exact(&mut b).unwrap();
            assert_eq!(&b, format!("flow {i:03}").as_bytes());
        }
    });
    // Two DNS round trips: the stack has finished a loop since.
    net.dns("x.allowed.test", dns::TYPE_A);
    net.dns("x.allowed.test", dns::TYPE_A);
    assert!(net.stop.snapshot().stats.tcp_opened >= 200);
}

#[test]
fn published_port_is_reached_from_the_host() {
    if skip() {
        return;
    }
    let net = Net::new(&["127.0.0.1:18000:8000"]);
    let listener = net
        .workload
        .run(|| TcpListener::bind("0.0.0.0:8000").unwrap());
    let server = std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().unwrap();
        s.set_read_timeout(Some(GUARD)).unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        s.write_all(b"pong:").unwrap();
        s.write_all(&buf).unwrap();
        peer
    });
    let reply = net.outer.run(|| {
        // The stack binds its published ports as it starts, in its own
        // thread: wait for the listener, not for a time.
        wait_listening(18000);
        let mut s = connect(sa("127.0.0.1:18000")).unwrap();
        s.write_all(b"hello").unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        out
    });
    assert_eq!(reply, b"pong:hello");
    // The workload sees the connection come from the gateway.
    assert_eq!(server.join().unwrap().ip(), ip("10.0.2.2"));
}

#[test]
fn killing_the_workload_mid_transfer_leaves_nothing_behind() {
    if skip() {
        return;
    }
    if std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_err()
    {
        moat_core::testing::skip("killing_the_workload_mid_transfer", "no curl");
        return;
    }
    // The workload: curl downloading an endless stream; the stack ends
    // when it exits (pidfd).
    let setup = Setup::new();
    let mut child = setup.workload.run(|| {
        std::process::Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "http://192.0.2.1:9100/"])
            .spawn()
            .unwrap()
    });
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).unwrap();
    let mut net = setup.start(&[], Some(pidfd));
    // Wait until the transfer is under way, then kill the workload.
    assert_eq!(net.events.recv_timeout(GUARD).unwrap(), "stream 4 MiB sent");
    child.kill().unwrap();
    child.wait().unwrap();
    // The stack notices the exit and closes everything: the server's
    // connection breaks, serve returns (its thread is gone) and no TCP
    // socket is left in the namespace the stack ran in.
    assert_eq!(net.events.recv_timeout(GUARD).unwrap(), "stream peer gone");
    let ended = net.serve.take().unwrap().join().expect("serve thread");
    assert_eq!(ended, Ended::WorkloadExited);
    let live = net.outer.run(live_tcp_sockets);
    assert!(live.is_empty(), "sockets left: {live:?}");
}

/// TCP sockets of the calling thread's namespace, TIME_WAIT aside (those
/// belong to the kernel, not to a process).
fn live_tcp_sockets() -> Vec<String> {
    let mut out = Vec::new();
    for f in ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"] {
        let text = std::fs::read_to_string(f).unwrap();
        for line in text.lines().skip(1) {
            let state = line.split_whitespace().nth(3).unwrap_or("");
            if state != "06" {
                out.push(line.trim().to_owned());
            }
        }
    }
    out
}

#[test]
fn published_udp_port_answers_each_host_peer() {
    if skip() {
        return;
    }
    let net = Net::new(&["127.0.0.1:18001:8001/udp", "[::1]:18002:8001/udp"]);
    // One dual-stack socket in the workload answers every datagram.
    let sock = net.workload.run(|| UdpSocket::bind("[::]:8001").unwrap());
    let server = std::thread::spawn(move || {
        sock.set_read_timeout(Some(GUARD)).unwrap();
        let mut peers = Vec::new();
        let mut buf = [0u8; 64];
        while let Ok((n, peer)) = sock.recv_from(&mut buf) {
            let mut reply = b"pong:".to_vec();
            reply.extend_from_slice(&buf[..n]);
            sock.send_to(&reply, peer).unwrap();
            let from = match peer.ip() {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
                v4 => v4,
            };
            if !peers.contains(&from) {
                peers.push(from);
            }
            if buf[..n].starts_with(b"last") {
                break;
            }
        }
        peers
    });
    // Each sender retries until it hears back (the stack learns the
    // workload's Ethernet address from its first frames).
    let ask = |bind: &'static str, to: &'static str, msg: &'static [u8]| {
        net.outer.run(move || {
            let s = UdpSocket::bind(bind).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let mut buf = [0u8; 64];
            for _ in 0..60 {
                s.send_to(msg, to).unwrap();
                if let Ok(n) = s.recv(&mut buf) {
                    return buf[..n].to_vec();
                }
            }
            panic!("no answer from {to}");
        })
    };
    assert_eq!(ask("127.0.0.1:0", "127.0.0.1:18001", b"one"), b"pong:one");
    assert_eq!(ask("127.0.0.1:0", "127.0.0.1:18001", b"two"), b"pong:two");
    assert_eq!(ask("[::1]:0", "[::1]:18002", b"last"), b"pong:last");
    // The workload saw them come from the gateway, over v4 and over v6.
    let mut peers = server.join().unwrap();
    peers.sort();
    assert_eq!(
        peers,
        vec![ip("10.0.2.2"), ip("fd00:6d6f:6174::2")],
        "the workload sees the gateway"
    );
}
