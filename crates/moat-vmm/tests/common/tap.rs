//! A TAP device in a network namespace of its own, for the network card's
//! tests: shared by `kvm_payloads.rs` and the device's unit tests
//! (`src/virtio/net.rs`, which includes this file by path). Needs root.
#![allow(dead_code)]
use std::fs::File;
use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::OwnedFd;

/// A fresh network namespace holding only `tap0` (`IFF_TAP | IFF_NO_PI`,
/// made as moat's runtime makes one: `moat_net::create_tap_on`; with
/// `vnet_hdr`, `IFF_VNET_HDR` too, as the microvm tier makes the TAP
/// beside a pod's interface, and the addresses and routes set the same
/// way) with `addr`/24, IP MTU `mtu`, up, and then IPv6 off, so that the
/// kernel sends nothing on it unasked (what it queued before is read off).
/// Returns the TAP (non-blocking) and a UDP socket bound to `addr` in that
/// namespace, which lasts as long as either.
pub fn quiet_tap(addr: Ipv4Addr, mtu: usize, vnet_hdr: bool) -> (File, UdpSocket) {
    let (tap, udp, _) = quiet_tap_ns(addr, mtu, vnet_hdr);
    (tap, udp)
}

/// [`quiet_tap`], and the namespace too (`/proc/thread-self/ns/net`
/// opened there), for sockets of the test's own in it.
pub fn quiet_tap_ns(addr: Ipv4Addr, mtu: usize, vnet_hdr: bool) -> (File, UdpSocket, OwnedFd) {
    assert!(
        rustix::process::geteuid().is_root(),
        "needs root: a network namespace and a TAP device"
    );
    std::thread::spawn(move || {
        // Only this thread's network namespace changes. (The call is
        // deprecated for the flag that unshares the descriptor table,
        // which is not used here.)
        #[allow(deprecated)]
        let unshared = rustix::thread::unshare(rustix::thread::UnshareFlags::NEWNET);
        unshared.expect("unshare(CLONE_NEWNET)");
        let [a, b, c, _] = addr.octets();
        let cfg = moat_net::NetConfig {
            workload_v4: addr,
            prefix_v4: 24,
            gateway_v4: Ipv4Addr::new(a, b, c, 254),
            mtu,
            ..moat_net::NetConfig::default()
        };
        let tun = moat_net::open_tun().expect("open /dev/net/tun");
        let tap = if vnet_hdr {
            // moat_net makes its TAPs without the header: made here, then
            // given the address and brought up as moat_net does it.
            let flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
            moat_sys::tun::tun_set_iff(std::os::fd::AsFd::as_fd(&tun), "tap0", flags as i16)
                .expect("create tap0 with a virtio-net header");
            let mut nl = moat_net::netlink::Netlink::open().expect("open rtnetlink");
            let index = nl.index("tap0").expect("find tap0");
            nl.add_addr(index, std::net::IpAddr::V4(addr), 24)
                .expect("address tap0");
            nl.set_up(index, u32::try_from(mtu).ok())
                .expect("bring tap0 up");
            File::from(tun)
        } else {
            let tap = moat_net::create_tap_on(tun, "tap0", &cfg).expect("create tap0");
            File::from(tap.fd)
        };
        // This thread's namespace's sysctl.
        std::fs::write("/proc/sys/net/ipv6/conf/tap0/disable_ipv6", "1")
            .expect("turn IPv6 off on tap0");
        let mut buf = vec![0u8; 1 << 17];
        loop {
            match rustix::io::read(&tap, &mut buf[..]) {
                Ok(_) => {}
                Err(rustix::io::Errno::AGAIN) => break,
                Err(e) => panic!("read tap0: {e}"),
            }
        }
        let udp = UdpSocket::bind((addr, 0)).expect("bind a UDP socket in the namespace");
        let ns = rustix::fs::open(
            "/proc/thread-self/ns/net",
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .expect("open the namespace");
        (tap, udp, ns)
    })
    .join()
    .expect("the namespace's thread panicked")
}
