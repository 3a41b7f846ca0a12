//! A pod's `localhost`, passed to its guest: `kubectl port-forward` (and
//! `crictl port-forward`) reach a pod through containerd, which connects
//! to `localhost:PORT` from inside the pod's network namespace. When a
//! microVM took that namespace's interface over ([`crate::podnet`]), the
//! namespace's loopback is its own, not the guest's: nothing listens there.
//!
//! So the runtime steers those connections to the VMM: a listening socket
//! on the namespace's loopback (one for IPv4, one for IPv6 where the
//! namespace has `::1`) and a `BPF_PROG_TYPE_SK_LOOKUP` program attached to
//! the namespace that hands every new TCP connection arriving on `lo` for
//! 127.0.0.1, `::1` or one of the pod's own addresses, whatever its port,
//! to that socket. The accepted connection keeps the address and port it
//! was made to (its local address), which the VMM asks the agent to
//! connect to inside the container's namespace in the guest, and then
//! relays both ways ([`crate::proto::Kind::Forward`]).
//!
//! Only connections made inside the namespace arrive on `lo`: the pod's
//! wire (its veth) is the guest's, and what of it the namespace keeps (its
//! ephemeral ports, for a second microVM of the pod) arrives on the veth
//! and is never steered. The pod's own addresses make a second microVM of
//! the pod, given moat's stack from this namespace, reach the first
//! guest's servers on the pod's IP (before, its connection was refused:
//! nothing listened in the namespace). The VMM holds the link and the
//! sockets: they go with it.
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use moat_sys::bpf::{self, BpfInsn};

const IPPROTO_TCP: i32 = 6;
const AF_INET: i32 = 2;
const AF_INET6: i32 = 10;
/// `SK_PASS`: the lookup goes on (to the socket assigned, if any).
const SK_PASS: i32 = 1;
const FN_MAP_LOOKUP_ELEM: i32 = 1;
const FN_SK_RELEASE: i32 = 86;
const FN_SK_ASSIGN: i32 = 124;

/// Offsets in `struct bpf_sk_lookup` (`<linux/bpf.h>`).
mod ctx {
    pub const FAMILY: i16 = 8;
    pub const PROTOCOL: i16 = 12;
    pub const REMOTE_IP4: i16 = 16;
    pub const REMOTE_IP6: i16 = 20;
    pub const LOCAL_IP4: i16 = 40;
    pub const LOCAL_IP6: i16 = 44;
}

/// Where the steered connections wait, and what steers them; both stay
/// in force while these descriptors are open (the VMM process holds them).
#[derive(Debug)]
pub struct LocalForward {
    /// The listening sockets: IPv4's, then IPv6's where there is one.
    pub listeners: Vec<OwnedFd>,
    /// The program's link to the namespace.
    pub link: OwnedFd,
}

/// Steers new TCP connections made inside the calling thread's network
/// namespace to its loopback addresses or to `own` (the pod's addresses),
/// any port, to listening sockets of its own (see the module's text).
pub fn steer(own: &[IpAddr]) -> io::Result<LocalForward> {
    let v4 = listen(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
    // A namespace without IPv6 (or without ::1) forwards IPv4 only.
    let v6 = listen(SocketAddr::from((Ipv6Addr::LOCALHOST, 0))).ok();
    let map = bpf::map_create(bpf::BPF_MAP_TYPE_SOCKMAP, 4, 8, 2)?;
    for (key, sock) in [(0u32, Some(&v4)), (1, v6.as_ref())] {
        if let Some(s) = sock {
            let fd =
                u64::try_from(s.as_raw_fd()).map_err(|_| io::Error::other("bad descriptor"))?;
            bpf::map_update(map.as_fd(), &key.to_ne_bytes(), &fd.to_ne_bytes())?;
        }
    }
    let mut v4_addrs = vec![Ipv4Addr::LOCALHOST];
    let mut v6_addrs = vec![Ipv6Addr::LOCALHOST];
    for ip in own {
        match ip {
            IpAddr::V4(a) if !v4_addrs.contains(a) => v4_addrs.push(*a),
            IpAddr::V6(a) if !v6_addrs.contains(a) => v6_addrs.push(*a),
            _ => {}
        }
    }
    let insns = program(map.as_fd(), &v4_addrs, &v6_addrs);
    let prog = bpf::prog_load(bpf::BPF_PROG_TYPE_SK_LOOKUP, bpf::BPF_SK_LOOKUP, &insns)
        .map_err(|e| io::Error::new(e.error.kind(), e.to_string()))?;
    let netns = std::fs::File::open("/proc/thread-self/ns/net")?;
    let link = bpf::link_create(prog.as_fd(), netns.as_fd(), bpf::BPF_SK_LOOKUP)?;
    let mut listeners = vec![v4];
    listeners.extend(v6);
    Ok(LocalForward { listeners, link })
}

/// A listening TCP socket on `addr` (IPv6: that family only), close-on-exec
/// and non-blocking (the VMM's loop accepts when it polls ready).
fn listen(addr: SocketAddr) -> io::Result<OwnedFd> {
    use rustix::net::{bind, listen, socket_with, sockopt, AddressFamily, SocketFlags, SocketType};
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::INET,
        SocketAddr::V6(_) => AddressFamily::INET6,
    };
    let s = socket_with(
        family,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )?;
    if addr.is_ipv6() {
        sockopt::set_ipv6_v6only(&s, true)?;
    }
    bind(&s, &addr)?;
    listen(&s, 128)?;
    Ok(s)
}

/// An instruction list with jumps to labels, resolved by [`Asm::finish`].
struct Asm {
    insns: Vec<BpfInsn>,
    /// (instruction index, label) of each jump to patch.
    jumps: Vec<(usize, Label)>,
    labels: [Option<usize>; 5],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Label {
    Pass = 0,
    V4 = 1,
    Hit = 2,
    Next = 3,
    /// The destination is one of the set; the source is checked next.
    Local = 4,
}

impl Asm {
    fn op(&mut self, i: BpfInsn) {
        self.insns.push(i);
    }
    fn jump(&mut self, i: BpfInsn, to: Label) {
        self.jumps.push((self.insns.len(), to));
        self.insns.push(i);
    }
    fn here(&mut self, l: Label) {
        self.labels[l as usize] = Some(self.insns.len());
    }
    /// Resolves the jumps to each label as it stood when they were made
    /// (`Next` is set again for each address).
    fn resolve(&mut self, l: Label) {
        let Some(at) = self.labels[l as usize] else {
            return;
        };
        self.jumps.retain(|(i, to)| {
            if *to as usize != l as usize {
                return true;
            }
            self.insns[*i].off = (at as isize - *i as isize - 1) as i16;
            false
        });
    }
}

/// `w{dst}` loaded from the context at `off` (a u32 field).
fn load(dst: u8, off: i16) -> BpfInsn {
    BpfInsn::new(0x61, dst, 6, off, 0)
}
/// 32-bit compares (the fields are u32; a 64-bit compare would extend a
/// high-bit immediate's sign).
fn jne32(reg: u8, imm: i32) -> BpfInsn {
    BpfInsn::new(0x56, reg, 0, 0, imm)
}
fn jeq32(reg: u8, imm: i32) -> BpfInsn {
    BpfInsn::new(0x16, reg, 0, 0, imm)
}
fn ja() -> BpfInsn {
    BpfInsn::new(0x05, 0, 0, 0, 0)
}
fn mov(dst: u8, src: u8) -> BpfInsn {
    BpfInsn::new(0xbf, dst, src, 0, 0)
}
fn mov_imm(dst: u8, imm: i32) -> BpfInsn {
    BpfInsn::new(0xb7, dst, 0, 0, imm)
}
fn call(helper: i32) -> BpfInsn {
    BpfInsn::new(0x85, 0, 0, 0, helper)
}
/// A u32 in network order (as the context holds it), read as the
/// little-endian machine reads it.
fn wire(bytes: [u8; 4]) -> i32 {
    i32::from_ne_bytes(bytes)
}

/// Jumps to `to` when the `words` registers from r2 on (an address as
/// the context holds it) hold one of `set`; falls through otherwise.
fn member(a: &mut Asm, set: &[Vec<i32>], to: Label) {
    for addr in set {
        if addr.len() == 1 {
            a.jump(jeq32(2, addr[0]), to);
            continue;
        }
        for (i, w) in addr.iter().enumerate() {
            a.jump(jne32(2 + i as u8, *w), Label::Next);
        }
        a.jump(ja(), to);
        a.here(Label::Next);
        a.resolve(Label::Next);
    }
}

/// The program: for TCP made to one of `v4` or `v6` from one of them (a
/// connection made inside the namespace), the socket of the family's key
/// (0, 1) in `map`; for anything else, the usual lookup.
///
/// The arriving interface cannot tell such connections apart: one made to
/// the pod's address inside the namespace arrives, as the kernel reports
/// it, on the interface that holds the address — as the wire's does. Its
/// source can: the kernel drops what arrives from outside with a source
/// of the namespace's own (IPv4's martian check) or a loopback one, and a
/// forged IPv6 one could not finish its handshake (the reply goes to the
/// namespace itself).
fn program(map: std::os::fd::BorrowedFd<'_>, v4: &[Ipv4Addr], v6: &[Ipv6Addr]) -> Vec<BpfInsn> {
    let mut a = Asm {
        insns: Vec::new(),
        jumps: Vec::new(),
        labels: [None; 5],
    };
    let v4: Vec<Vec<i32>> = v4.iter().map(|x| vec![wire(x.octets())]).collect();
    let v6: Vec<Vec<i32>> = v6
        .iter()
        .map(|x| {
            x.octets()
                .chunks(4)
                .map(|w| wire([w[0], w[1], w[2], w[3]]))
                .collect()
        })
        .collect();
    a.op(mov(6, 1));
    a.op(load(2, ctx::PROTOCOL));
    a.jump(jne32(2, IPPROTO_TCP), Label::Pass);
    a.op(load(2, ctx::FAMILY));
    a.op(mov_imm(7, 0));
    a.jump(jeq32(2, AF_INET), Label::V4);
    a.jump(jne32(2, AF_INET6), Label::Pass);
    a.op(mov_imm(7, 1));
    // IPv6 (four words), then IPv4 (one): the destination one of the
    // set, then the source.
    for (words, local, remote, set) in [
        (4u8, ctx::LOCAL_IP6, ctx::REMOTE_IP6, &v6),
        (1, ctx::LOCAL_IP4, ctx::REMOTE_IP4, &v4),
    ] {
        if words == 1 {
            a.here(Label::V4);
        }
        for (base, next) in [(local, Label::Local), (remote, Label::Hit)] {
            for i in 0..words {
                a.op(load(2 + i, base + 4 * i16::from(i)));
            }
            member(&mut a, set, next);
            a.jump(ja(), Label::Pass);
            if next == Label::Local {
                a.here(Label::Local);
                a.resolve(Label::Local);
            }
        }
    }
    a.here(Label::Hit);
    // The key (r7) on the stack; r0 = map[key], a socket with a reference.
    a.op(BpfInsn::new(0x63, 10, 7, -4, 0));
    a.op(mov(2, 10));
    a.op(BpfInsn::new(0x07, 2, 0, 0, -4));
    for i in BpfInsn::ld_map_fd(1, map) {
        a.op(i);
    }
    a.op(call(FN_MAP_LOOKUP_ELEM));
    a.jump(BpfInsn::new(0x15, 0, 0, 0, 0), Label::Pass);
    a.op(mov(7, 0));
    a.op(mov(1, 6));
    a.op(mov(2, 7));
    a.op(mov_imm(3, 0));
    a.op(call(FN_SK_ASSIGN));
    a.op(mov(1, 7));
    a.op(call(FN_SK_RELEASE));
    a.here(Label::Pass);
    a.op(mov_imm(0, SK_PASS));
    a.op(BpfInsn::new(0x95, 0, 0, 0, 0));
    for l in [Label::Pass, Label::V4, Label::Hit] {
        a.resolve(l);
    }
    debug_assert!(a.jumps.is_empty());
    a.insns
}

/// Where an accepted connection was made to (with sk_lookup, the
/// address and port its maker asked for).
pub fn destination(conn: std::os::fd::BorrowedFd<'_>) -> io::Result<SocketAddr> {
    let addr = rustix::net::getsockname(conn)?;
    SocketAddr::try_from(addr).map_err(|_| io::Error::other("not an IP socket"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream;

    /// In a network namespace of the test's own (a thread's, with `lo`
    /// up and 10.77.0.9 on a veth standing for the pod's address, its
    /// peer 10.77.0.10 in a second namespace standing for the pod's wire),
    /// new connections made inside it to 127.0.0.1, `::1` or that address
    /// reach the listener whatever their port, keeping it; others, and any
    /// from the wire, are looked up as before.
    #[test]
    fn connections_made_inside_the_namespace_to_its_own_addresses_reach_the_listener() {
        if moat_core::testing::needs_root(
            "connections_made_inside_the_namespace_to_its_own_addresses_reach_the_listener",
        ) {
            return;
        }
        let pod: IpAddr = "10.77.0.9".parse().unwrap();
        // The wire's side: a thread in a namespace of its own, which
        // configures its end of the veth when told (`None`), then connects
        // where it is told and says how that went.
        let (ns_tx, ns_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<Option<SocketAddr>>();
        let (res_tx, res_rx) = std::sync::mpsc::channel();
        let wire = std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("the wire's namespace");
            ns_tx
                .send(std::fs::File::open("/proc/thread-self/ns/net").unwrap())
                .unwrap();
            for to in go_rx {
                let r = match to {
                    None => {
                        let mut n = moat_net::netlink::Netlink::open().expect("rtnetlink");
                        let i = n.index("pod1").expect("the veth's end");
                        n.set_up(i, None).unwrap();
                        n.add_addr(i, "10.77.0.10".parse().unwrap(), 24).unwrap();
                        Ok(())
                    }
                    Some(to) => TcpStream::connect_timeout(&to, std::time::Duration::from_secs(5))
                        .map(drop)
                        .map_err(|e| e.kind()),
                };
                res_tx.send(r).unwrap();
            }
        });
        let from_wire = move |to: Option<SocketAddr>| {
            go_tx.send(to).unwrap();
            res_rx.recv().unwrap()
        };
        let wire_ns = ns_rx.recv().unwrap();
        std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("a network namespace of this thread's own");
            let mut n = moat_net::netlink::Netlink::open().expect("rtnetlink");
            n.set_up(1, None).expect("lo up");
            n.add_veth("pod0", "pod1", wire_ns.as_fd())
                .expect("a veth pair");
            let pod0 = n.index("pod0").unwrap();
            n.set_up(pod0, None).expect("veth up");
            n.add_addr(pod0, pod, 24).expect("the pod's address");
            let fwd = steer(&[pod]).expect("steer");
            assert!(!fwd.listeners.is_empty());
            let listener = std::net::TcpListener::from(fwd.listeners[0].try_clone().unwrap());
            listener.set_nonblocking(false).unwrap();
            for (to, port) in [("127.0.0.1", 8080u16), ("127.0.0.1", 5), ("10.77.0.9", 443)] {
                let mut c = TcpStream::connect((to, port)).expect("steered connect");
                let (mut s, _) = listener.accept().expect("accept");
                let dest = destination(s.as_fd()).unwrap();
                assert_eq!(dest, SocketAddr::new(to.parse().unwrap(), port));
                c.write_all(b"ping").unwrap();
                let mut b = [0u8; 4];
                s.read_exact(&mut b).unwrap();
                assert_eq!(&b, b"ping");
            }
            // Not one of its addresses: the usual lookup (nothing listens).
            let e = TcpStream::connect(("127.0.0.2", 8080)).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
            if fwd.listeners.len() > 1 {
                let _c = TcpStream::connect(("::1", 9090)).expect("steered ::1");
                let l6 = std::net::TcpListener::from(fwd.listeners[1].try_clone().unwrap());
                l6.set_nonblocking(false).unwrap();
                let (s, _) = l6.accept().unwrap();
                assert_eq!(
                    destination(s.as_fd()).unwrap(),
                    "[::1]:9090".parse().unwrap()
                );
            }
            // From the wire, to the pod's address: never steered. A real
            // server there is reached (the wire works); a port nothing
            // listens on is refused, not handed to the listener.
            from_wire(None).unwrap();
            let real = std::net::TcpListener::bind((pod, 7000)).unwrap();
            assert_eq!(from_wire(Some("10.77.0.9:7000".parse().unwrap())), Ok(()));
            drop(real);
            assert_eq!(
                from_wire(Some("10.77.0.9:8080".parse().unwrap())),
                Err(io::ErrorKind::ConnectionRefused)
            );
            listener.set_nonblocking(true).unwrap();
            assert!(listener.accept().is_err(), "nothing from the wire waits");
            // The link closed, the namespace's lookups are its own again.
            drop(fwd);
            let e = TcpStream::connect(("127.0.0.1", 8080)).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
        })
        .join()
        .expect("the test's thread");
        wire.join().expect("the wire's thread");
    }
}
