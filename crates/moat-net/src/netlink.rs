//! rtnetlink requests, built by hand (as `moat-jail::net` does for `lo`):
//! bring a link up with an MTU, add an address, add a default route, create
//! a veth pair. Each request waits for the kernel's acknowledgement. The
//! message builders are pure and unit-tested; [`Netlink`] sends them on a
//! socket of the calling thread's network namespace.
use std::net::IpAddr;
use std::os::fd::OwnedFd;

use rustix::net::netlink::SocketAddrNetlink;
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType};

const RTM_NEWLINK: u16 = 16;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const IFF_UP: u32 = 0x1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFLA_LINKINFO: u16 = 18;
const IFLA_NET_NS_FD: u16 = 28;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_FLAGS: u16 = 8;
const IFA_F_NODAD: u32 = 0x02;
const RTA_GATEWAY: u16 = 5;
const RTA_OIF: u16 = 4;
const NLA_F_NESTED: u16 = 0x8000;

/// One failed rtnetlink step.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open an rtnetlink socket")]
    Socket(#[source] rustix::io::Errno),
    #[error("cannot send the request to {step}")]
    Send {
        step: String,
        #[source]
        source: rustix::io::Errno,
    },
    #[error("cannot read the reply to {step}")]
    Recv {
        step: String,
        #[source]
        source: rustix::io::Errno,
    },
    #[error("{step}: malformed netlink reply")]
    Reply { step: String },
    #[error("{step}")]
    Kernel {
        step: String,
        #[source]
        source: rustix::io::Errno,
    },
    #[error("no network interface named {name:?}")]
    NoSuchLink {
        name: String,
        #[source]
        source: rustix::io::Errno,
    },
}

/// A netlink message under construction: header, fixed part, attributes.
struct Msg {
    buf: Vec<u8>,
    nests: Vec<usize>,
}

impl Msg {
    fn new(ty: u16, flags: u16, seq: u32) -> Msg {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set in finish
        buf.extend_from_slice(&ty.to_ne_bytes());
        buf.extend_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // pid
        Msg {
            buf,
            nests: Vec::new(),
        }
    }

    fn bytes(&mut self, b: &[u8]) -> &mut Msg {
        self.buf.extend_from_slice(b);
        self
    }

    /// `struct ifinfomsg`.
    fn ifinfo(&mut self, index: i32, flags: u32, change: u32) -> &mut Msg {
        self.bytes(&[0, 0]) // family AF_UNSPEC, pad
            .bytes(&0u16.to_ne_bytes()) // type
            .bytes(&index.to_ne_bytes())
            .bytes(&flags.to_ne_bytes())
            .bytes(&change.to_ne_bytes())
    }

    fn align(&mut self) {
        while self.buf.len() & 3 != 0 {
            self.buf.push(0);
        }
    }

    fn attr(&mut self, ty: u16, data: &[u8]) -> &mut Msg {
        self.align();
        let len = u16::try_from(4 + data.len()).unwrap_or(u16::MAX);
        self.bytes(&len.to_ne_bytes())
            .bytes(&ty.to_ne_bytes())
            .bytes(data);
        self.align();
        self
    }

    fn begin(&mut self, ty: u16) -> &mut Msg {
        self.align();
        self.nests.push(self.buf.len());
        self.bytes(&[0, 0])
            .bytes(&(ty | NLA_F_NESTED).to_ne_bytes())
    }

    fn end(&mut self) -> &mut Msg {
        self.align();
        if let Some(start) = self.nests.pop() {
            let len = u16::try_from(self.buf.len() - start).unwrap_or(u16::MAX);
            self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        }
        self
    }

    fn finish(&mut self) -> Vec<u8> {
        self.align();
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        std::mem::take(&mut self.buf)
    }
}

fn family(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => AF_INET,
        IpAddr::V6(_) => AF_INET6,
    }
}

fn octets(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// RTM_NEWLINK: interface `index` up, with `mtu` if given.
pub fn link_up_request(index: u32, mtu: Option<u32>, seq: u32) -> Vec<u8> {
    let mut m = Msg::new(RTM_NEWLINK, 0, seq);
    m.ifinfo(index as i32, IFF_UP, IFF_UP);
    if let Some(mtu) = mtu {
        m.attr(IFLA_MTU, &mtu.to_ne_bytes());
    }
    m.finish()
}

/// RTM_NEWADDR: `ip/prefix` on interface `index`, without duplicate
/// address detection (the link has two ends and we own both).
pub fn add_addr_request(index: u32, ip: IpAddr, prefix: u8, seq: u32) -> Vec<u8> {
    let mut m = Msg::new(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, seq);
    // struct ifaddrmsg: family, prefixlen, flags, scope, index.
    m.bytes(&[family(ip), prefix, IFA_F_NODAD as u8, 0])
        .bytes(&index.to_ne_bytes());
    let a = octets(ip);
    m.attr(IFA_LOCAL, &a)
        .attr(IFA_ADDRESS, &a)
        .attr(IFA_FLAGS, &IFA_F_NODAD.to_ne_bytes());
    m.finish()
}

/// RTM_NEWROUTE: the default route via `gateway` out of interface `index`.
pub fn default_route_request(index: u32, gateway: IpAddr, seq: u32) -> Vec<u8> {
    let mut m = Msg::new(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, seq);
    // struct rtmsg: family, dst_len, src_len, tos, table (main), protocol
    // (static), scope (universe), type (unicast), flags.
    m.bytes(&[family(gateway), 0, 0, 0, 254, 4, 0, 1])
        .bytes(&0u32.to_ne_bytes());
    m.attr(RTA_GATEWAY, &octets(gateway))
        .attr(RTA_OIF, &index.to_ne_bytes());
    m.finish()
}

/// RTM_NEWLINK: a veth pair `name` here and `peer` in the network namespace
/// of `peer_netns` (an fd number valid in the sending process).
pub fn add_veth_request(name: &str, peer: &str, peer_netns: i32, seq: u32) -> Vec<u8> {
    let mut m = Msg::new(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, seq);
    m.ifinfo(0, 0, 0);
    m.attr(IFLA_IFNAME, &nul_terminated(name));
    m.begin(IFLA_LINKINFO).attr(IFLA_INFO_KIND, b"veth");
    m.begin(IFLA_INFO_DATA).begin(VETH_INFO_PEER);
    m.ifinfo(0, 0, 0)
        .attr(IFLA_IFNAME, &nul_terminated(peer))
        .attr(IFLA_NET_NS_FD, &peer_netns.to_ne_bytes());
    m.end().end().end();
    m.finish()
}

/// RTM_NEWLINK: interface `index` into the network namespace of `netns`
/// (an fd number valid in the sending process).
pub fn move_link_request(index: u32, netns: i32, seq: u32) -> Vec<u8> {
    let mut m = Msg::new(RTM_NEWLINK, 0, seq);
    m.ifinfo(index as i32, 0, 0);
    m.attr(IFLA_NET_NS_FD, &netns.to_ne_bytes());
    m.finish()
}

fn nul_terminated(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// The errno of an NLMSG_ERROR acknowledgement (0 for success).
pub fn parse_ack(reply: &[u8]) -> Option<i32> {
    let head = reply.get(..20)?;
    let ty = u16::from_ne_bytes([head[4], head[5]]);
    if ty != NLMSG_ERROR {
        return None;
    }
    let err = i32::from_ne_bytes([head[16], head[17], head[18], head[19]]);
    Some(-err)
}

/// An rtnetlink socket in the calling thread's network namespace.
pub struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

impl Netlink {
    pub fn open() -> Result<Netlink, NetlinkError> {
        let fd = rustix::net::socket_with(
            AddressFamily::NETLINK,
            SocketType::RAW,
            SocketFlags::CLOEXEC,
            None, // protocol 0: NETLINK_ROUTE
        )
        .map_err(NetlinkError::Socket)?;
        Ok(Netlink { fd, seq: 0 })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq += 1;
        self.seq
    }

    /// Sends one request and waits for its acknowledgement.
    fn request(&mut self, msg: &[u8], step: impl Fn() -> String) -> Result<(), NetlinkError> {
        let kernel = SocketAddrNetlink::new(0, 0);
        rustix::net::sendto(&self.fd, msg, SendFlags::empty(), &kernel).map_err(|source| {
            NetlinkError::Send {
                step: step(),
                source,
            }
        })?;
        let mut buf = [0u8; 1024];
        let (n, _) =
            rustix::net::recv(&self.fd, &mut buf, RecvFlags::empty()).map_err(|source| {
                NetlinkError::Recv {
                    step: step(),
                    source,
                }
            })?;
        match parse_ack(&buf[..n]) {
            Some(0) => Ok(()),
            Some(e) => Err(NetlinkError::Kernel {
                step: step(),
                source: rustix::io::Errno::from_raw_os_error(e),
            }),
            None => Err(NetlinkError::Reply { step: step() }),
        }
    }

    /// The index of interface `name`.
    pub fn index(&self, name: &str) -> Result<u32, NetlinkError> {
        let probe = rustix::net::socket_with(
            AddressFamily::INET6,
            SocketType::DGRAM,
            SocketFlags::CLOEXEC,
            None,
        )
        .or_else(|_| {
            rustix::net::socket_with(
                AddressFamily::INET,
                SocketType::DGRAM,
                SocketFlags::CLOEXEC,
                None,
            )
        })
        .map_err(NetlinkError::Socket)?;
        rustix::net::netdevice::name_to_index(&probe, name).map_err(|source| {
            NetlinkError::NoSuchLink {
                name: name.into(),
                source,
            }
        })
    }

    pub fn set_up(&mut self, index: u32, mtu: Option<u32>) -> Result<(), NetlinkError> {
        let seq = self.next_seq();
        let msg = link_up_request(index, mtu, seq);
        self.request(&msg, || format!("bringing up interface {index}"))
    }

    pub fn add_addr(&mut self, index: u32, ip: IpAddr, prefix: u8) -> Result<(), NetlinkError> {
        let seq = self.next_seq();
        let msg = add_addr_request(index, ip, prefix, seq);
        self.request(&msg, || {
            format!("adding {ip}/{prefix} to interface {index}")
        })
    }

    pub fn add_default_route(&mut self, index: u32, gateway: IpAddr) -> Result<(), NetlinkError> {
        let seq = self.next_seq();
        let msg = default_route_request(index, gateway, seq);
        self.request(&msg, || format!("adding a default route via {gateway}"))
    }

    /// Moves interface `index` into the namespace `netns`.
    pub fn move_link(
        &mut self,
        index: u32,
        netns: std::os::fd::BorrowedFd<'_>,
    ) -> Result<(), NetlinkError> {
        use std::os::fd::AsRawFd;
        let seq = self.next_seq();
        let msg = move_link_request(index, netns.as_raw_fd(), seq);
        self.request(&msg, || {
            format!("moving interface {index} to another network namespace")
        })
    }

    /// A veth pair: `name` here, `peer` in the namespace `peer_netns`.
    pub fn add_veth(
        &mut self,
        name: &str,
        peer: &str,
        peer_netns: std::os::fd::BorrowedFd<'_>,
    ) -> Result<(), NetlinkError> {
        use std::os::fd::AsRawFd;
        let seq = self.next_seq();
        let msg = add_veth_request(name, peer, peer_netns.as_raw_fd(), seq);
        self.request(&msg, || format!("creating veth pair {name}/{peer}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(m: &[u8], at: usize) -> u16 {
        u16::from_ne_bytes([m[at], m[at + 1]])
    }

    fn u32_at(m: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes(m[at..at + 4].try_into().unwrap())
    }

    #[test]
    fn link_up_layout() {
        let m = link_up_request(3, Some(65520), 9);
        assert_eq!(u32_at(&m, 0) as usize, m.len());
        assert_eq!(u16_at(&m, 4), RTM_NEWLINK);
        assert_eq!(u32_at(&m, 8), 9);
        assert_eq!(u32_at(&m, 20), 3);
        assert_eq!(u32_at(&m, 24), IFF_UP);
        // IFLA_MTU attribute right after the 16-byte ifinfomsg.
        assert_eq!(u16_at(&m, 32), 8);
        assert_eq!(u16_at(&m, 34), IFLA_MTU);
        assert_eq!(u32_at(&m, 36), 65520);
    }

    #[test]
    fn address_and_route_layout() {
        let m = add_addr_request(4, "fd00::1".parse().unwrap(), 64, 1);
        assert_eq!(u32_at(&m, 0) as usize, m.len());
        assert_eq!(&m[16..20], &[AF_INET6, 64, IFA_F_NODAD as u8, 0]);
        assert_eq!(u32_at(&m, 20), 4);
        assert_eq!(u16_at(&m, 24), 20); // IFA_LOCAL with 16 bytes
        assert_eq!(u16_at(&m, 26), IFA_LOCAL);
        let r = default_route_request(4, "10.0.2.2".parse().unwrap(), 2);
        assert_eq!(u32_at(&r, 0) as usize, r.len());
        assert_eq!(r[16], AF_INET);
        assert_eq!(u16_at(&r, 28), 8);
        assert_eq!(u16_at(&r, 30), RTA_GATEWAY);
        assert_eq!(&r[32..36], &[10, 0, 2, 2]);
    }

    #[test]
    fn move_link_layout() {
        let m = move_link_request(2, 7, 5);
        assert_eq!(u32_at(&m, 0) as usize, m.len());
        assert_eq!(u16_at(&m, 4), RTM_NEWLINK);
        assert_eq!(u32_at(&m, 20), 2);
        // No flags changed; IFLA_NET_NS_FD with the descriptor.
        assert_eq!(u32_at(&m, 24), 0);
        assert_eq!(u32_at(&m, 28), 0);
        assert_eq!(u16_at(&m, 32), 8);
        assert_eq!(u16_at(&m, 34), IFLA_NET_NS_FD);
        assert_eq!(u32_at(&m, 36), 7);
        assert_eq!(m.len(), 40);
    }

    #[test]
    fn veth_nesting_lengths_add_up() {
        let m = add_veth_request("a0", "b0", 5, 1);
        assert_eq!(u32_at(&m, 0) as usize, m.len());
        // IFLA_IFNAME "a0\0" padded to 8, then IFLA_LINKINFO to the end.
        let linkinfo = 32 + 8;
        assert_eq!(u16_at(&m, linkinfo + 2), IFLA_LINKINFO | NLA_F_NESTED);
        assert_eq!(linkinfo + u16_at(&m, linkinfo) as usize, m.len());
    }

    #[test]
    fn acks() {
        let mut r = [0u8; 36];
        r[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        assert_eq!(parse_ack(&r), Some(0));
        r[16..20].copy_from_slice(&(-17i32).to_ne_bytes());
        assert_eq!(parse_ack(&r), Some(17));
        assert_eq!(parse_ack(&r[..10]), None);
    }
}
