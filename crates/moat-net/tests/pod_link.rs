//! A pod's interface handed to a TAP device, as a Kata-style runtime does
//! it, for real, as root: "pod" (the pod's network namespace, its `eth0`
//! one end of a veth pair) and "outside" (the other end, `host0`), both
//! fresh namespaces that vanish with their fds. Threads enter them with
//! setns; nothing on the machine's own network. Waits are on real events
//! (a frame, a datagram); timeouts are only guards against a hang.
#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use moat_net::netlink::{self, AddrInfo, Netlink, RouteInfo};
use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::io::Errno;

mod common;
use common::Netns;

const GUARD: Duration = Duration::from_secs(20);
/// The microVM's MAC: not eth0's, so a frame to it can only be ours.
const VM_MAC: [u8; 6] = [0x02, 0x6d, 0x6f, 0x61, 0x74, 0x02];
const POD: [u8; 4] = [10, 77, 0, 2];
const OUTSIDE: [u8; 4] = [10, 77, 0, 1];

fn skip() -> bool {
    moat_core::testing::needs_root("moat-net pod_link tests")
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// "pod" with eth0 (10.77.0.2/24, fd00:77::2/64, MTU 1400, default routes
/// via the outside) and "outside" with host0 (10.77.0.1/24, fd00:77::1/64).
struct Pair {
    pod: Netns,
    outside: Netns,
    eth0: u32,
}

fn pair() -> Pair {
    let pod = Netns::new();
    let outside = Netns::new();
    let eth0 = pod.run(|| {
        let mut nl = Netlink::open().unwrap();
        nl.add_veth("eth0", "host0", outside.0.as_fd()).unwrap();
        let eth0 = nl.index("eth0").unwrap();
        nl.add_addr(eth0, ip("10.77.0.2"), 24).unwrap();
        nl.add_addr(eth0, ip("fd00:77::2"), 64).unwrap();
        nl.set_up(eth0, Some(1400)).unwrap();
        nl.add_default_route(eth0, ip("10.77.0.1")).unwrap();
        nl.add_default_route(eth0, ip("fd00:77::1")).unwrap();
        eth0
    });
    outside.run(|| {
        let mut nl = Netlink::open().unwrap();
        let host0 = nl.index("host0").unwrap();
        nl.add_addr(host0, ip("10.77.0.1"), 24).unwrap();
        nl.add_addr(host0, ip("fd00:77::1"), 64).unwrap();
        nl.set_up(host0, Some(1400)).unwrap();
    });
    Pair { pod, outside, eth0 }
}

#[test]
fn links_addresses_and_routes_of_a_pod_interface() {
    if skip() {
        return;
    }
    let Pair { pod, outside, eth0 } = pair();
    let host0_mac = outside.run(|| {
        let mut nl = Netlink::open().unwrap();
        let links = nl.links().unwrap();
        let host0 = links.iter().find(|l| l.name == "host0").expect("host0");
        host0.mac.expect("host0's MAC")
    });
    pod.run(|| {
        let mut nl = Netlink::open().unwrap();

        let links = nl.links().unwrap();
        let lo = links.iter().find(|l| l.name == "lo").expect("lo");
        assert_eq!((lo.index, lo.kind.as_deref(), lo.mtu), (1, None, 65536));
        assert!(lo.loopback && !lo.up, "{lo:?}");
        let e = links.iter().find(|l| l.name == "eth0").expect("eth0");
        assert_eq!(e.index, eth0);
        assert_eq!(e.kind.as_deref(), Some("veth"));
        assert_eq!(e.mtu, 1400);
        assert!(e.up && !e.loopback, "{e:?}");
        let mac = e.mac.expect("eth0's MAC");
        assert_ne!(mac, [0; 6]);
        assert_ne!(mac, host0_mac);

        let addrs = nl.addresses().unwrap();
        for want in [
            AddrInfo {
                index: eth0,
                ip: ip("10.77.0.2"),
                prefix: 24,
                universe: true,
            },
            AddrInfo {
                index: eth0,
                ip: ip("fd00:77::2"),
                prefix: 64,
                universe: true,
            },
        ] {
            assert!(addrs.contains(&want), "{want:?} not in {addrs:?}");
        }
        // lo is down: no 127.0.0.1. A link-local address, once the
        // kernel has made it, is not universe.
        assert!(addrs.iter().all(|a| a.index != 1), "{addrs:?}");
        for a in &addrs {
            if let IpAddr::V6(v6) = a.ip {
                if v6.segments()[0] == 0xfe80 {
                    assert!(!a.universe, "{a:?}");
                }
            }
        }

        let routes = nl.routes().unwrap();
        for want in [
            // The kernel's prefix routes (protocol 2).
            RouteInfo {
                oif: Some(eth0),
                dst: Some((ip("10.77.0.0"), 24)),
                gateway: None,
                protocol: 2,
                link_scope: true,
                onlink: false,
            },
            RouteInfo {
                oif: Some(eth0),
                dst: Some((ip("fd00:77::"), 64)),
                gateway: None,
                protocol: 2,
                link_scope: false,
                onlink: false,
            },
            // add_default_route's (static).
            RouteInfo {
                oif: Some(eth0),
                dst: None,
                gateway: Some(ip("10.77.0.1")),
                protocol: 4,
                link_scope: false,
                onlink: false,
            },
            RouteInfo {
                oif: Some(eth0),
                dst: None,
                gateway: Some(ip("fd00:77::1")),
                protocol: 4,
                link_scope: false,
                onlink: false,
            },
        ] {
            assert!(routes.contains(&want), "{want:?} not in {routes:?}");
        }
        // Not the local table's (10.77.0.2 itself, the broadcast address).
        for local in ["10.77.0.2", "10.77.0.255", "fd00:77::2"] {
            assert!(
                routes
                    .iter()
                    .all(|r| r.dst.is_none_or(|(d, _)| d != ip(local))),
                "{routes:?}"
            );
        }

        // A gateway outside every prefix: refused, unless on-link.
        let dst = Some((ip("10.99.0.0"), 16));
        let calico = Some(ip("169.254.1.1"));
        let err = nl.add_route(eth0, dst, calico, false).unwrap_err();
        assert_eq!(err.errno(), Some(Errno::NETUNREACH), "{err}");
        nl.add_route(eth0, dst, calico, true).unwrap();
        nl.add_route(eth0, Some((ip("10.66.0.0"), 16)), None, false)
            .unwrap();
        let err = nl.add_route(eth0, dst, calico, true).unwrap_err();
        assert_eq!(err.errno(), Some(Errno::EXIST), "{err}");
        let routes = nl.routes().unwrap();
        for want in [
            RouteInfo {
                oif: Some(eth0),
                dst,
                gateway: calico,
                protocol: 4,
                link_scope: false,
                onlink: true,
            },
            RouteInfo {
                oif: Some(eth0),
                dst: Some((ip("10.66.0.0"), 16)),
                gateway: None,
                protocol: 4,
                link_scope: true,
                onlink: false,
            },
        ] {
            assert!(routes.contains(&want), "{want:?} not in {routes:?}");
        }

        nl.set_mac(eth0, VM_MAC).unwrap();
        let links = nl.links().unwrap();
        let e = links.iter().find(|l| l.index == eth0).unwrap();
        assert_eq!(e.mac, Some(VM_MAC));
    });
}

#[test]
fn ingress_qdisc_is_exclusive_and_removable() {
    if skip() {
        return;
    }
    let Pair { pod, eth0, .. } = pair();
    pod.run(|| {
        let mut nl = Netlink::open().unwrap();
        // No qdisc yet: no filter, nothing to remove.
        let err = nl.redirect_ingress(eth0, 1).unwrap_err();
        assert_eq!(err.errno(), Some(Errno::INVAL), "{err}");
        let err = nl.del_ingress_qdisc(eth0).unwrap_err();
        assert_eq!(err.errno(), Some(Errno::NOENT), "{err}");

        nl.add_ingress_qdisc(eth0).unwrap();
        let err = nl.add_ingress_qdisc(eth0).unwrap_err();
        assert_eq!(err.errno(), Some(Errno::EXIST), "{err}");
        nl.redirect_ingress(eth0, 1).unwrap();
        let err = nl.redirect_ingress(eth0, 4242).unwrap_err();
        assert_eq!(err.errno(), Some(Errno::NODEV), "{err}");

        nl.del_ingress_qdisc(eth0).unwrap();
        // Gone again, but the kernel's answer differs: the interface keeps
        // an empty ingress queue, whose handle is not ffff:.
        let err = nl.del_ingress_qdisc(eth0).unwrap_err();
        assert_eq!(err.errno(), Some(Errno::INVAL), "{err}");
        nl.add_ingress_qdisc(eth0).unwrap();
        nl.redirect_ingress(eth0, 1).unwrap();
        // Nothing left behind in the socket: the next request is answered.
        assert!(nl.links().unwrap().iter().any(|l| l.index == eth0));
    });
}

#[test]
fn pod_interface_and_tap_redirect_both_ways() {
    if skip() {
        return;
    }
    let Pair { pod, outside, eth0 } = pair();
    let (tap, tap_index) = pod.run(|| {
        let mut nl = Netlink::open().unwrap();
        let (tun, tap) = tap0_redirected(&mut nl, eth0);
        let links = nl.links().unwrap();
        let t = links.iter().find(|l| l.index == tap).unwrap();
        assert_eq!(t.kind.as_deref(), Some("tun"));
        (tun, tap)
    });
    assert_ne!(tap_index, eth0);

    // outside -> pod: host0 asks for the pod's MAC first; the request
    // comes out of the TAP (the pod's own stack never sees it).
    let sock = outside.run(|| {
        let s = UdpSocket::bind(sa(OUTSIDE, 6000)).unwrap();
        s.set_read_timeout(Some(GUARD)).unwrap();
        s.send_to(b"to the vm", sa(POD, 5000)).unwrap();
        s
    });
    let arp = next_frame(tap.as_fd(), |f| {
        f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 1] && f[38..42] == POD
    });
    assert_eq!(&arp[0..6], &[0xff; 6]);
    assert_eq!(&arp[28..32], &OUTSIDE);
    let host0_mac: [u8; 6] = arp[6..12].try_into().unwrap();
    assert_eq!(&arp[22..28], &host0_mac);

    // pod -> outside: the VM's answer, written into the TAP, reaches host0,
    // which then sends the datagram it held, to the VM's MAC.
    write_frame(tap.as_fd(), &arp_reply(host0_mac));
    let udp = next_frame(tap.as_fd(), |f| {
        f.len() >= 42 && f[12..14] == [0x08, 0x00] && f[23] == 17 && f[30..34] == POD
    });
    assert_eq!(&udp[0..6], &VM_MAC);
    assert_eq!(&udp[6..12], &host0_mac);
    assert_eq!(&udp[26..30], &OUTSIDE);
    assert_eq!(&udp[34..38], &[0x17, 0x70, 0x13, 0x88]); // 6000 -> 5000
    assert_eq!(&udp[42..], b"to the vm");

    // pod -> outside: a datagram from the VM, checksummed, is delivered.
    write_frame(
        tap.as_fd(),
        &udp_frame(host0_mac, 5000, 6000, b"from the vm"),
    );
    let mut buf = [0u8; 64];
    let (n, from) = sock.recv_from(&mut buf).expect("the VM's datagram");
    assert_eq!(&buf[..n], b"from the vm");
    assert_eq!(from, sa(POD, 5000));
}

/// With the shared filters ahead of the redirection, the pod's own stack
/// keeps its share of eth0: datagrams to a port in `KEPT_PORTS` reach its
/// socket (over IPv4 and IPv6: ARP and neighbour discovery reach it too,
/// and a copy of each the TAP), any other port the TAP alone.
#[test]
fn the_namespace_keeps_its_ports_beside_the_tap() {
    if skip() {
        return;
    }
    let Pair { pod, outside, eth0 } = pair();
    let kept = netlink::KEPT_PORTS.0 + 60; // 61500
    let (tap, own, own6, other) = pod.run(|| {
        let mut nl = Netlink::open().unwrap();
        let (tun, tap) = tap0_redirected(&mut nl, eth0);
        for f in netlink::shared_filters(tap) {
            nl.add_ingress_filter(eth0, &f).unwrap();
        }
        let bind = |a: SocketAddr| {
            let s = UdpSocket::bind(a).unwrap();
            s.set_read_timeout(Some(GUARD)).unwrap();
            s
        };
        (
            tun,
            bind(sa(POD, kept)),
            bind(SocketAddr::new(ip("fd00:77::2"), kept)),
            bind(sa(POD, 5000)),
        )
    });
    let mut buf = [0u8; 64];
    // IPv4: the outside's ARP request reaches both (the TAP gets a copy;
    // the pod's stack answers), then the datagram reaches the pod's socket.
    outside.run(|| {
        let s = UdpSocket::bind(sa(OUTSIDE, 6000)).unwrap();
        s.send_to(b"kept", sa(POD, kept)).unwrap();
    });
    let arp = next_frame(tap.as_fd(), |f| {
        f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 1] && f[38..42] == POD
    });
    assert_eq!(&arp[28..32], &OUTSIDE);
    let (n, from) = own.recv_from(&mut buf).expect("the kept port's datagram");
    assert_eq!((&buf[..n], from), (&b"kept"[..], sa(OUTSIDE, 6000)));
    // IPv6, through neighbour discovery the same way.
    outside.run(|| {
        let s = UdpSocket::bind(SocketAddr::new(ip("fd00:77::1"), 6001)).unwrap();
        s.send_to(b"kept6", SocketAddr::new(ip("fd00:77::2"), kept))
            .unwrap();
    });
    let (n, from) = own6
        .recv_from(&mut buf)
        .expect("the kept port's datagram (IPv6)");
    assert_eq!(
        (&buf[..n], from),
        (&b"kept6"[..], SocketAddr::new(ip("fd00:77::1"), 6001))
    );
    // Any other port: the TAP's alone.
    outside.run(|| {
        let s = UdpSocket::bind(sa(OUTSIDE, 6002)).unwrap();
        s.send_to(b"to the vm", sa(POD, 5000)).unwrap();
    });
    let udp = next_frame(tap.as_fd(), |f| {
        f.len() >= 42 && f[12..14] == [0x08, 0x00] && f[23] == 17 && f[36..38] == [0x13, 0x88]
    });
    assert_eq!(&udp[42..], b"to the vm");
    other.set_nonblocking(true).unwrap();
    assert_eq!(
        other.recv_from(&mut buf).unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock,
        "the pod's own socket on a port the guest has"
    );
}

/// An IPv4 address moat adds gets its subnet's broadcast address, which
/// a program finds with `getifaddrs` (it found none), and a datagram to it
/// from the outside reaches the pod.
#[test]
fn a_subnet_broadcast_is_named_and_received() {
    if skip() {
        return;
    }
    let Pair { pod, outside, .. } = pair();
    let named = pod.run(|| {
        nix::ifaddrs::getifaddrs()
            .unwrap()
            .filter(|a| a.interface_name == "eth0")
            .filter_map(|a| a.broadcast?.as_sockaddr_in().map(|s| s.ip()))
            .collect::<Vec<_>>()
    });
    assert_eq!(named, vec![std::net::Ipv4Addr::new(10, 77, 0, 255)]);
    let rx = pod.run(|| {
        let s = UdpSocket::bind(sa([0, 0, 0, 0], 5300)).unwrap();
        s.set_read_timeout(Some(GUARD)).unwrap();
        s
    });
    outside.run(|| {
        let s = UdpSocket::bind(sa(OUTSIDE, 5301)).unwrap();
        s.set_broadcast(true).unwrap();
        s.send_to(b"to all", sa([10, 77, 0, 255], 5300)).unwrap();
    });
    let mut buf = [0u8; 16];
    let (n, from) = rx.recv_from(&mut buf).expect("the subnet's broadcast");
    assert_eq!((&buf[..n], from), (&b"to all"[..], sa(OUTSIDE, 5301)));
}

/// `tap0` (up, MTU 1400) in the calling thread's namespace, and `eth0`
/// and it redirected to each other: its descriptor and index.
fn tap0_redirected(nl: &mut Netlink, eth0: u32) -> (std::os::fd::OwnedFd, u32) {
    let tun = moat_net::open_tun().unwrap();
    let flags = (libc::IFF_TAP | libc::IFF_NO_PI) as i16;
    let name = moat_sys::tun::tun_set_iff(tun.as_fd(), "tap0", flags).unwrap();
    let tap = nl.index(&name).unwrap();
    nl.set_up(tap, Some(1400)).unwrap();
    nl.add_ingress_qdisc(eth0).unwrap();
    nl.add_ingress_qdisc(tap).unwrap();
    nl.redirect_ingress(eth0, tap).unwrap();
    nl.redirect_ingress(tap, eth0).unwrap();
    (tun, tap)
}

fn sa(a: [u8; 4], port: u16) -> SocketAddr {
    SocketAddr::from((a, port))
}

/// The next frame out of the TAP that `want` accepts; others (IPv6
/// neighbour discovery, MLD) are passed over.
fn next_frame(tap: BorrowedFd<'_>, want: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let deadline = Instant::now() + GUARD;
    let mut seen = 0;
    let mut buf = vec![0u8; 2048];
    loop {
        match rustix::io::read(tap, &mut buf) {
            Ok(n) if want(&buf[..n]) => return buf[..n].to_vec(),
            Ok(_) => seen += 1,
            Err(Errno::AGAIN) => {
                let left = deadline.saturating_duration_since(Instant::now());
                assert!(!left.is_zero(), "no such frame ({seen} others)");
                let t = Timespec::try_from(left).unwrap();
                let mut fds = [PollFd::new(&tap, PollFlags::IN)];
                rustix::event::poll(&mut fds, Some(&t)).unwrap();
            }
            Err(e) => panic!("reading the TAP: {e}"),
        }
    }
}

fn write_frame(tap: BorrowedFd<'_>, frame: &[u8]) {
    assert_eq!(rustix::io::write(tap, frame).unwrap(), frame.len());
}

/// ARP: the pod's address is at the VM's MAC, to `dst`.
fn arp_reply(dst: [u8; 6]) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&VM_MAC);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 2]);
    f.extend_from_slice(&VM_MAC);
    f.extend_from_slice(&POD);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&OUTSIDE);
    f
}

/// A UDP datagram from the pod's address to the outside's, in Ethernet.
fn udp_frame(dst: [u8; 6], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let udp_len = 8 + payload.len() as u16;
    let mut ipv4 = vec![0x45, 0];
    ipv4.extend_from_slice(&(20 + udp_len).to_be_bytes());
    ipv4.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    ipv4.extend_from_slice(&POD);
    ipv4.extend_from_slice(&OUTSIDE);
    let sum = checksum(&ipv4);
    ipv4[10..12].copy_from_slice(&sum.to_be_bytes());

    let mut udp = Vec::new();
    udp.extend_from_slice(&sport.to_be_bytes());
    udp.extend_from_slice(&dport.to_be_bytes());
    udp.extend_from_slice(&udp_len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let mut pseudo = [&POD[..], &OUTSIDE, &[0, 17], &udp_len.to_be_bytes()].concat();
    pseudo.extend_from_slice(&udp);
    let sum = match checksum(&pseudo) {
        0 => 0xffff,
        s => s,
    };
    udp[6..8].copy_from_slice(&sum.to_be_bytes());

    let mut f = dst.to_vec();
    f.extend_from_slice(&VM_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&ipv4);
    f.extend_from_slice(&udp);
    f
}

/// The Internet checksum.
fn checksum(b: &[u8]) -> u16 {
    let mut sum: u32 = b
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
