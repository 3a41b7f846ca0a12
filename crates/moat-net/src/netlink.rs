//! rtnetlink requests, built by hand (as `moat-jail::net` does for `lo`):
//! bring a link up with an MTU, set its MAC, add an address or a route,
//! create a veth pair, list links, addresses and routes, and hand an
//! interface to a TAP device with tc (an ingress qdisc on each, and a u32
//! filter whose mirred action redirects every frame to the other). Each
//! request waits for the kernel's acknowledgement; each dump for its
//! NLMSG_DONE. The message builders and reply parsers are pure and
//! unit-tested; [`Netlink`] sends them on a socket of the calling thread's
//! network namespace.
use std::net::IpAddr;
use std::os::fd::OwnedFd;

use rustix::net::netlink::SocketAddrNetlink;
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType};

const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_GETADDR: u16 = 22;
const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const RTM_NEWQDISC: u16 = 36;
const RTM_DELQDISC: u16 = 37;
const RTM_NEWTFILTER: u16 = 44;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_DUMP: u16 = 0x300;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const IFF_UP: u32 = 0x1;
const IFF_LOOPBACK: u32 = 0x8;
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFLA_LINKINFO: u16 = 18;
const IFLA_NET_NS_FD: u16 = 28;
const IFLA_EXT_MASK: u16 = 29;
const RTEXT_FILTER_SKIP_STATS: u32 = 1 << 3;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_BROADCAST: u16 = 4;
const IFA_FLAGS: u16 = 8;
const IFA_F_NODAD: u32 = 0x02;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_TABLE: u16 = 15;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_STATIC: u8 = 4;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RT_SCOPE_LINK: u8 = 253;
const RTN_UNICAST: u8 = 1;
const RTNH_F_ONLINK: u32 = 4;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TC_H_INGRESS: u32 = 0xFFFF_FFF1;
const INGRESS_HANDLE: u32 = 0xFFFF_0000;
const ETH_P_ALL: u16 = 0x0003;
const TCA_U32_SEL: u16 = 5;
const TCA_U32_ACT: u16 = 7;
const TC_U32_TERMINAL: u8 = 1;
const TCA_ACT_KIND: u16 = 1;
const TCA_ACT_OPTIONS: u16 = 2;
const TCA_MIRRED_PARMS: u16 = 2;
const TCA_U32_CLASSID: u16 = 1;
const TC_ACT_PIPE: u32 = 3;
const TC_ACT_STOLEN: u32 = 4;
const TCA_EGRESS_REDIR: u32 = 1;
const TCA_EGRESS_MIRROR: u32 = 2;
/// EtherTypes a filter can be limited to.
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86DD;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;
/// Room for one datagram of a dump reply.
const DUMP_BUF: usize = 64 << 10;

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

impl NetlinkError {
    /// The kernel's errno, where it refused the request (EEXIST, ENOENT,
    /// ...); `None` for every other failure.
    pub fn errno(&self) -> Option<rustix::io::Errno> {
        match self {
            NetlinkError::Kernel { source, .. } => Some(*source),
            _ => None,
        }
    }
}

/// One interface of the calling thread's network namespace (RTM_GETLINK
/// dump).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub index: u32,
    pub name: String,
    /// IFLA_INFO_KIND, e.g. "veth", "tun"; `None` for lo and the like.
    pub kind: Option<String>,
    /// IFLA_ADDRESS, when it is 6 bytes.
    pub mac: Option<[u8; 6]>,
    pub mtu: u32,
    /// IFF_UP.
    pub up: bool,
    /// IFF_LOOPBACK.
    pub loopback: bool,
}

/// One address (RTM_GETADDR dump, IPv4 and IPv6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddrInfo {
    pub index: u32,
    /// IFA_LOCAL if present, else IFA_ADDRESS (they differ only on
    /// point-to-point links, where IFA_ADDRESS is the peer's).
    pub ip: IpAddr,
    pub prefix: u8,
    /// Scope universe (not link, host, ...).
    pub universe: bool,
}

/// One route of the main table (RTM_GETROUTE dump, IPv4 and IPv6,
/// unicast only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteInfo {
    /// `None` for a multipath route.
    pub oif: Option<u32>,
    /// `None`: a default route.
    pub dst: Option<(IpAddr, u8)>,
    pub gateway: Option<IpAddr>,
    /// rtm_protocol: 2 made by the kernel (a prefix route), 4 static, ...
    pub protocol: u8,
    /// Scope link. The kernel reports IPv6 routes as scope universe always.
    pub link_scope: bool,
    /// RTNH_F_ONLINK: the gateway is on the link whatever the prefixes.
    pub onlink: bool,
}

/// A netlink message under construction: header, fixed part, attributes.
struct Msg {
    buf: Vec<u8>,
    nests: Vec<usize>,
}

impl Msg {
    /// A request the kernel acknowledges.
    fn new(ty: u16, flags: u16, seq: u32) -> Msg {
        Msg::with_flags(ty, flags | NLM_F_REQUEST | NLM_F_ACK, seq)
    }

    /// A dump request: a multi-part reply ended by NLMSG_DONE, no ack.
    fn dump(ty: u16, seq: u32) -> Msg {
        Msg::with_flags(ty, NLM_F_REQUEST | NLM_F_DUMP, seq)
    }

    fn with_flags(ty: u16, flags: u16, seq: u32) -> Msg {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set in finish
        buf.extend_from_slice(&ty.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
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

    /// `struct tcmsg`.
    fn tcmsg(&mut self, index: u32, handle: u32, parent: u32, info: u32) -> &mut Msg {
        self.bytes(&[0, 0, 0, 0]) // family AF_UNSPEC, pads
            .bytes(&index.to_ne_bytes())
            .bytes(&handle.to_ne_bytes())
            .bytes(&parent.to_ne_bytes())
            .bytes(&info.to_ne_bytes())
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
/// address detection (the link has two ends and we own both). An IPv4
/// address of a subnet with one gets the subnet's broadcast address, as
/// `ip addr add … brd +`, Docker and the CNI plugins give theirs: the
/// kernel routes the subnet's broadcast either way, but a program that
/// asks the interface for its broadcast address (`getifaddrs`,
/// `SIOCGIFBRDADDR`: service discovery, Samba's nmbd) found none.
pub fn add_addr_request(index: u32, ip: IpAddr, prefix: u8, seq: u32) -> Vec<u8> {
    let mut m = Msg::new(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, seq);
    // struct ifaddrmsg: family, prefixlen, flags, scope, index.
    m.bytes(&[family(ip), prefix, IFA_F_NODAD as u8, 0])
        .bytes(&index.to_ne_bytes());
    let a = octets(ip);
    m.attr(IFA_LOCAL, &a).attr(IFA_ADDRESS, &a);
    if let Some(b) = broadcast_of(ip, prefix) {
        m.attr(IFA_BROADCAST, &b.octets());
    }
    m.attr(IFA_FLAGS, &IFA_F_NODAD.to_ne_bytes());
    m.finish()
}

/// The broadcast address of `ip`'s subnet: IPv4 with at least two host
/// bits (a /31 or /32 has none).
fn broadcast_of(ip: IpAddr, prefix: u8) -> Option<std::net::Ipv4Addr> {
    match ip {
        IpAddr::V4(v4) if (1..=30).contains(&prefix) => {
            Some((u32::from(v4) | (u32::MAX >> prefix)).into())
        }
        _ => None,
    }
}

/// RTM_NEWROUTE: the default route via `gateway` out of interface `index`.
pub fn default_route_request(index: u32, gateway: IpAddr, seq: u32) -> Vec<u8> {
    add_route_request(index, None, Some(gateway), false, seq)
}

/// RTM_NEWROUTE, main table, static: to `dst` (`None`: default) out of
/// interface `index`, via `gateway` (`None`: on the link, scope link),
/// RTNH_F_ONLINK if `onlink`. IPv4 when neither address is given.
pub fn add_route_request(
    index: u32,
    dst: Option<(IpAddr, u8)>,
    gateway: Option<IpAddr>,
    onlink: bool,
    seq: u32,
) -> Vec<u8> {
    let mut m = Msg::new(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, seq);
    let fam = dst.map(|(ip, _)| ip).or(gateway).map_or(AF_INET, family);
    let dst_len = dst.map_or(0, |(_, len)| len);
    let scope = match gateway {
        Some(_) => RT_SCOPE_UNIVERSE,
        None => RT_SCOPE_LINK,
    };
    let flags = if onlink { RTNH_F_ONLINK } else { 0 };
    // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope,
    // type, flags.
    m.bytes(&[fam, dst_len, 0, 0, RT_TABLE_MAIN, RTPROT_STATIC, scope])
        .bytes(&[RTN_UNICAST])
        .bytes(&flags.to_ne_bytes());
    if let Some((ip, _)) = dst {
        m.attr(RTA_DST, &octets(ip));
    }
    if let Some(gateway) = gateway {
        m.attr(RTA_GATEWAY, &octets(gateway));
    }
    m.attr(RTA_OIF, &index.to_ne_bytes());
    m.finish()
}

/// RTM_NEWLINK: interface `index`'s hardware address.
pub fn set_mac_request(index: u32, mac: [u8; 6], seq: u32) -> Vec<u8> {
    let mut m = Msg::new(RTM_NEWLINK, 0, seq);
    m.ifinfo(index as i32, 0, 0);
    m.attr(IFLA_ADDRESS, &mac);
    m.finish()
}

/// RTM_NEWLINK: interface `index`'s name (it must be down).
pub fn set_name_request(index: u32, name: &str, seq: u32) -> Vec<u8> {
    let mut m = Msg::new(RTM_NEWLINK, 0, seq);
    m.ifinfo(index as i32, 0, 0);
    m.attr(IFLA_IFNAME, &nul_terminated(name));
    m.finish()
}

/// RTM_NEWQDISC: the ingress qdisc (handle ffff:) on interface `index`;
/// EEXIST if it has one.
pub fn add_ingress_qdisc_request(index: u32, seq: u32) -> Vec<u8> {
    let mut m = Msg::new(RTM_NEWQDISC, NLM_F_CREATE | NLM_F_EXCL, seq);
    m.tcmsg(index, INGRESS_HANDLE, TC_H_INGRESS, 0);
    m.attr(TCA_KIND, b"ingress\0");
    m.finish()
}

/// RTM_DELQDISC: interface `index`'s ingress qdisc, and its filters.
pub fn del_ingress_qdisc_request(index: u32, seq: u32) -> Vec<u8> {
    let mut m = Msg::new(RTM_DELQDISC, 0, seq);
    m.tcmsg(index, INGRESS_HANDLE, TC_H_INGRESS, 0);
    m.attr(TCA_KIND, b"ingress\0");
    m.finish()
}

/// RTM_NEWTFILTER on `from`'s ingress qdisc: u32 with one key matching
/// 0/0 at offset 0 (every frame), protocol ETH_P_ALL, priority chosen by
/// the kernel; its action mirred redirects the frame out of `to`. As
/// `tc filter add dev A parent ffff: protocol all u32 match u8 0 0 action
/// mirred egress redirect dev B`.
pub fn redirect_ingress_request(from: u32, to: u32, seq: u32) -> Vec<u8> {
    ingress_filter_request(
        from,
        &IngressFilter {
            priority: 0,
            protocol: ETH_P_ALL,
            keys: vec![U32Key::ANY],
            action: FilterAction::Redirect(to),
        },
        seq,
    )
}

/// One key of a u32 filter: the 32-bit big-endian word at byte `off` of
/// the network header (the IP header; for ARP its header), masked with
/// `mask`, equals `value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct U32Key {
    pub mask: u32,
    pub value: u32,
    pub off: i32,
}

impl U32Key {
    /// Every frame (`match u32 0 0 at 0`).
    pub const ANY: U32Key = U32Key {
        mask: 0,
        value: 0,
        off: 0,
    };
}

/// What an ingress filter does with a frame its keys all match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterAction {
    /// Out of this interface instead (mirred egress redirect, stolen).
    Redirect(u32),
    /// A copy out of this interface, the frame itself on to the local
    /// stack (mirred egress mirror, pipe).
    Mirror(u32),
    /// On to the local stack, and no lower-priority filter sees it (a
    /// terminal match with a class, `flowid ffff:1`, and no action: needs
    /// no action module).
    Pass,
}

/// A u32 filter on an interface's ingress qdisc. Filters are tried in
/// priority order (lowest first; 0: the kernel's choice, below those
/// there); the first whose keys all match decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngressFilter {
    pub priority: u16,
    /// The frames' EtherType ([`ETH_P_IP`], …; ETH_P_ALL for all).
    pub protocol: u16,
    pub keys: Vec<U32Key>,
    pub action: FilterAction,
}

/// RTM_NEWTFILTER adding `f` to interface `dev`'s ingress qdisc, as `tc
/// filter add dev DEV parent ffff: prio P protocol PROTO u32 match … at
/// OFF … (action mirred egress redirect|mirror dev B | flowid ffff:1)`.
pub fn ingress_filter_request(dev: u32, f: &IngressFilter, seq: u32) -> Vec<u8> {
    let mut m = Msg::new(RTM_NEWTFILTER, NLM_F_CREATE | NLM_F_EXCL, seq);
    // info: priority << 16 | protocol in network byte order.
    m.tcmsg(
        dev,
        0,
        INGRESS_HANDLE,
        (u32::from(f.priority) << 16) | u32::from(f.protocol.to_be()),
    );
    m.attr(TCA_KIND, b"u32\0");
    m.begin(TCA_OPTIONS);
    if f.action == FilterAction::Pass {
        m.attr(TCA_U32_CLASSID, &(INGRESS_HANDLE | 1).to_ne_bytes());
    }
    // struct tc_u32_sel: flags, offshift, nkeys, pad, offmask, off, offoff,
    // hoff, hmask (16 bytes); then each struct tc_u32_key: mask and value
    // (big-endian), off, offmask.
    let mut sel = vec![0u8; 16];
    sel[0] = TC_U32_TERMINAL;
    sel[2] = u8::try_from(f.keys.len()).unwrap_or(u8::MAX);
    for k in &f.keys {
        sel.extend(k.mask.to_be_bytes());
        sel.extend((k.value & k.mask).to_be_bytes());
        sel.extend(k.off.to_ne_bytes());
        sel.extend(0i32.to_ne_bytes());
    }
    m.attr(TCA_U32_SEL, &sel);
    let (eaction, to, verdict) = match f.action {
        FilterAction::Redirect(to) => (TCA_EGRESS_REDIR, to, TC_ACT_STOLEN),
        FilterAction::Mirror(to) => (TCA_EGRESS_MIRROR, to, TC_ACT_PIPE),
        FilterAction::Pass => {
            m.end();
            return m.finish();
        }
    };
    m.begin(TCA_U32_ACT).begin(1); // the first action
    m.attr(TCA_ACT_KIND, b"mirred\0").begin(TCA_ACT_OPTIONS);
    // struct tc_mirred: tc_gen (index, capab, action, refcnt, bindcnt),
    // eaction, ifindex.
    let parms: Vec<u8> = [0, 0, verdict, 0, 0, eaction, to]
        .iter()
        .flat_map(|v: &u32| v.to_ne_bytes())
        .collect();
    m.attr(TCA_MIRRED_PARMS, &parms);
    m.end().end().end().end();
    m.finish()
}

/// The ports a network namespace's own stack keeps on an interface taken
/// over by a TAP (a microVM's guest): its ephemeral range meanwhile, one
/// mask (`0xf000`) in a filter's key; a Linux guest's default ephemeral
/// range (32768–60999) stays below.
pub const KEPT_PORTS: (u16, u16) = (0xF000, 0xFFFF);

/// The filters ahead of the redirection of an interface taken over by
/// the TAP `tap_index`, by priority: ARP, and IPv6 neighbour solicitations and advertisements,
/// copied to the TAP and passed on to the namespace; TCP and UDP over IPv4
/// (without options) and IPv6 (without extension headers) to a port in
/// [`KEPT_PORTS`], the namespace's alone. Offsets are into the network
/// header.
pub fn shared_filters(tap_index: u32) -> Vec<IngressFilter> {
    let kept = U32Key {
        mask: u32::from(KEPT_PORTS.0),
        value: u32::from(KEPT_PORTS.0),
        off: 0,
    };
    let v4 = |proto: u32| {
        vec![
            // version 4, header length 5 words
            U32Key {
                mask: 0xff00_0000,
                value: 0x4500_0000,
                off: 0,
            },
            U32Key {
                mask: 0x00ff_0000,
                value: proto << 16,
                off: 8,
            },
            // the destination port, after the 20 bytes
            U32Key { off: 20, ..kept },
        ]
    };
    let v6 = |next: u32, rest: U32Key| {
        vec![
            U32Key {
                mask: 0x0000_ff00,
                value: next << 8,
                off: 4,
            },
            rest,
        ]
    };
    let neighbour = |icmp_type: u32| U32Key {
        mask: 0xff00_0000,
        value: icmp_type << 24,
        off: 40,
    };
    let filter = |priority, protocol, keys, action| IngressFilter {
        priority,
        protocol,
        keys,
        action,
    };
    let copy = FilterAction::Mirror(tap_index);
    vec![
        filter(1, ETH_P_ARP, vec![U32Key::ANY], copy),
        filter(2, ETH_P_IPV6, v6(58, neighbour(135)), copy),
        filter(3, ETH_P_IPV6, v6(58, neighbour(136)), copy),
        filter(4, ETH_P_IP, v4(6), FilterAction::Pass),
        filter(5, ETH_P_IP, v4(17), FilterAction::Pass),
        filter(
            6,
            ETH_P_IPV6,
            v6(6, U32Key { off: 40, ..kept }),
            FilterAction::Pass,
        ),
        filter(
            7,
            ETH_P_IPV6,
            v6(17, U32Key { off: 40, ..kept }),
            FilterAction::Pass,
        ),
    ]
}

/// RTM_GETLINK dump, without statistics.
pub fn links_request(seq: u32) -> Vec<u8> {
    let mut m = Msg::dump(RTM_GETLINK, seq);
    m.ifinfo(0, 0, 0);
    m.attr(IFLA_EXT_MASK, &RTEXT_FILTER_SKIP_STATS.to_ne_bytes());
    m.finish()
}

/// RTM_GETADDR dump, every family.
pub fn addresses_request(seq: u32) -> Vec<u8> {
    let mut m = Msg::dump(RTM_GETADDR, seq);
    m.bytes(&[0; 8]); // struct ifaddrmsg
    m.finish()
}

/// RTM_GETROUTE dump, every family and table.
pub fn routes_request(seq: u32) -> Vec<u8> {
    let mut m = Msg::dump(RTM_GETROUTE, seq);
    m.bytes(&[0; 12]); // struct rtmsg
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
    err.checked_neg()
}

/// The sequence number of the message at the start of `m`.
fn header_seq(m: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(m.get(8..12)?.try_into().ok()?))
}

/// Why a reply is refused.
#[derive(Debug, PartialEq, Eq)]
enum ReplyError {
    /// Lengths that do not add up, a fixed part cut short, a field missing.
    Malformed,
    /// The kernel's NLMSG_ERROR (or a failed NLMSG_DONE): the errno.
    Kernel(i32),
}

impl ReplyError {
    fn with_step(self, step: String) -> NetlinkError {
        match self {
            ReplyError::Malformed => NetlinkError::Reply { step },
            ReplyError::Kernel(e) => NetlinkError::Kernel {
                step,
                source: rustix::io::Errno::from_raw_os_error(e),
            },
        }
    }
}

/// A negative errno from a reply; one outside 1..=4095 is no errno.
fn kernel_error(e: i32) -> ReplyError {
    match e.checked_neg() {
        Some(e @ 1..=4095) => ReplyError::Kernel(e),
        _ => ReplyError::Malformed,
    }
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn i32_at(b: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The attributes of `buf` as (type without flags, payload), up to the
/// first whose length does not fit.
struct Attrs<'a>(&'a [u8]);

impl<'a> Iterator for Attrs<'a> {
    type Item = (u16, &'a [u8]);

    fn next(&mut self) -> Option<(u16, &'a [u8])> {
        let rest = self.0;
        let len = usize::from(u16::from_ne_bytes([*rest.first()?, *rest.get(1)?]));
        let ty = u16::from_ne_bytes([*rest.get(2)?, *rest.get(3)?]) & NLA_TYPE_MASK;
        if len < 4 || len > rest.len() {
            self.0 = &[];
            return None;
        }
        self.0 = rest.get((len + 3) & !3..).unwrap_or(&[]);
        Some((ty, &rest[4..len]))
    }
}

fn ip_of(family: u8, b: &[u8]) -> Option<IpAddr> {
    match family {
        AF_INET => <[u8; 4]>::try_from(b).ok().map(IpAddr::from),
        AF_INET6 => <[u8; 16]>::try_from(b).ok().map(IpAddr::from),
        _ => None,
    }
}

/// A string attribute, up to its NUL.
fn string_of(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// An RTM_NEWLINK of a dump (the payload after the netlink header).
fn parse_link(p: &[u8]) -> Result<Option<LinkInfo>, ReplyError> {
    // struct ifinfomsg: family, pad, type, index, flags, change.
    let index = u32_at(p, 4).ok_or(ReplyError::Malformed)?;
    let flags = u32_at(p, 8).ok_or(ReplyError::Malformed)?;
    let (mut name, mut kind, mut mac, mut mtu) = (None, None, None, 0);
    for (ty, data) in Attrs(p.get(16..).ok_or(ReplyError::Malformed)?) {
        match ty {
            IFLA_IFNAME => name = Some(string_of(data)),
            IFLA_ADDRESS => mac = <[u8; 6]>::try_from(data).ok(),
            IFLA_MTU => mtu = u32_at(data, 0).unwrap_or(0),
            IFLA_LINKINFO => {
                kind = Attrs(data)
                    .find(|&(t, _)| t == IFLA_INFO_KIND)
                    .map(|(_, k)| string_of(k));
            }
            _ => {}
        }
    }
    Ok(Some(LinkInfo {
        index,
        name: name.ok_or(ReplyError::Malformed)?,
        kind,
        mac,
        mtu,
        up: flags & IFF_UP != 0,
        loopback: flags & IFF_LOOPBACK != 0,
    }))
}

/// An RTM_NEWADDR of a dump; `None` for a family other than IPv4 and IPv6.
fn parse_addr(p: &[u8]) -> Result<Option<AddrInfo>, ReplyError> {
    // struct ifaddrmsg: family, prefixlen, flags, scope, index.
    let index = u32_at(p, 4).ok_or(ReplyError::Malformed)?;
    let (family, prefix, scope) = (p[0], p[1], p[3]);
    if family != AF_INET && family != AF_INET6 {
        return Ok(None);
    }
    let (mut local, mut address) = (None, None);
    for (ty, data) in Attrs(&p[8..]) {
        match ty {
            IFA_LOCAL => local = ip_of(family, data),
            IFA_ADDRESS => address = ip_of(family, data),
            _ => {}
        }
    }
    Ok(Some(AddrInfo {
        index,
        ip: local.or(address).ok_or(ReplyError::Malformed)?,
        prefix,
        universe: scope == RT_SCOPE_UNIVERSE,
    }))
}

/// An RTM_NEWROUTE of a dump; `None` unless an IPv4 or IPv6 unicast route
/// of the main table.
fn parse_route(p: &[u8]) -> Result<Option<RouteInfo>, ReplyError> {
    // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope,
    // type, flags.
    let flags = u32_at(p, 8).ok_or(ReplyError::Malformed)?;
    let (family, dst_len, protocol, scope, ty) = (p[0], p[1], p[5], p[6], p[7]);
    if (family != AF_INET && family != AF_INET6) || ty != RTN_UNICAST {
        return Ok(None);
    }
    let (mut table, mut dst, mut gateway, mut oif) = (u32::from(p[4]), None, None, None);
    for (ty, data) in Attrs(&p[12..]) {
        match ty {
            RTA_TABLE => table = u32_at(data, 0).unwrap_or(table),
            RTA_DST => dst = ip_of(family, data),
            RTA_GATEWAY => gateway = ip_of(family, data),
            RTA_OIF => oif = u32_at(data, 0),
            _ => {}
        }
    }
    if table != u32::from(RT_TABLE_MAIN) {
        return Ok(None);
    }
    let dst = match dst_len {
        0 => None,
        len => Some((dst.ok_or(ReplyError::Malformed)?, len)),
    };
    Ok(Some(RouteInfo {
        oif,
        dst,
        gateway,
        protocol,
        link_scope: scope == RT_SCOPE_LINK,
        onlink: flags & RTNH_F_ONLINK != 0,
    }))
}

/// One datagram of the reply to dump `seq`: the messages of type `ty`
/// that `parse` keeps go to `out`. `Ok(true)` once NLMSG_DONE is seen;
/// messages of another sequence number (an abandoned request's) are
/// skipped.
fn dump_part<T>(
    buf: &[u8],
    seq: u32,
    ty: u16,
    parse: impl Fn(&[u8]) -> Result<Option<T>, ReplyError>,
    out: &mut Vec<T>,
) -> Result<bool, ReplyError> {
    let mut rest = buf;
    while !rest.is_empty() {
        let len = u32_at(rest, 0).ok_or(ReplyError::Malformed)? as usize;
        if len < 16 || len > rest.len() {
            return Err(ReplyError::Malformed);
        }
        let (msg, next) = (&rest[..len], rest.get((len + 3) & !3..).unwrap_or(&[]));
        rest = next;
        if header_seq(msg) != Some(seq) {
            continue;
        }
        let body = &msg[16..];
        match u16::from_ne_bytes([msg[4], msg[5]]) {
            NLMSG_DONE => {
                return match i32_at(body, 0) {
                    Some(e) if e < 0 => Err(kernel_error(e)),
                    _ => Ok(true),
                }
            }
            NLMSG_ERROR => match i32_at(body, 0).ok_or(ReplyError::Malformed)? {
                0 => {}
                e => return Err(kernel_error(e)),
            },
            t if t == ty => out.extend(parse(body)?),
            _ => {}
        }
    }
    Ok(false)
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

    fn send(&self, msg: &[u8], step: &impl Fn() -> String) -> Result<(), NetlinkError> {
        let kernel = SocketAddrNetlink::new(0, 0);
        rustix::net::sendto(&self.fd, msg, SendFlags::empty(), &kernel).map_err(|source| {
            NetlinkError::Send {
                step: step(),
                source,
            }
        })?;
        Ok(())
    }

    /// One datagram into `buf`: its length, or how long it was if longer.
    fn recv(&self, buf: &mut [u8], step: &impl Fn() -> String) -> Result<usize, NetlinkError> {
        let (_, len) = rustix::net::recv(&self.fd, buf, RecvFlags::TRUNC).map_err(|source| {
            NetlinkError::Recv {
                step: step(),
                source,
            }
        })?;
        Ok(len)
    }

    /// Sends one request and waits for its acknowledgement, past anything
    /// left of an earlier request (another sequence number).
    fn request(&mut self, msg: &[u8], step: impl Fn() -> String) -> Result<(), NetlinkError> {
        self.send(msg, &step)?;
        let mut buf = [0u8; 1024];
        loop {
            let n = self.recv(&mut buf, &step)?.min(buf.len());
            match header_seq(&buf[..n]) {
                Some(seq) if Some(seq) != header_seq(msg) => continue,
                _ => {}
            }
            return match parse_ack(&buf[..n]) {
                Some(0) => Ok(()),
                Some(e) => Err(kernel_error(-e).with_step(step())),
                None => Err(NetlinkError::Reply { step: step() }),
            };
        }
    }

    /// Sends dump request `msg` and gathers the messages of type `ty` that
    /// `parse` keeps, up to NLMSG_DONE.
    fn dump<T>(
        &mut self,
        msg: &[u8],
        ty: u16,
        parse: impl Fn(&[u8]) -> Result<Option<T>, ReplyError>,
        step: impl Fn() -> String,
    ) -> Result<Vec<T>, NetlinkError> {
        let seq = header_seq(msg).unwrap_or(0);
        self.send(msg, &step)?;
        let mut buf = vec![0u8; DUMP_BUF];
        let mut out = Vec::new();
        loop {
            let n = self.recv(&mut buf, &step)?;
            if n > buf.len() {
                return Err(NetlinkError::Reply { step: step() });
            }
            match dump_part(&buf[..n], seq, ty, &parse, &mut out) {
                Ok(true) => return Ok(out),
                Ok(false) => {}
                Err(e) => return Err(e.with_step(step())),
            }
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

    /// Every interface.
    pub fn links(&mut self) -> Result<Vec<LinkInfo>, NetlinkError> {
        let seq = self.next_seq();
        let msg = links_request(seq);
        self.dump(&msg, RTM_NEWLINK, parse_link, || {
            "listing interfaces".into()
        })
    }

    /// Every IPv4 and IPv6 address.
    pub fn addresses(&mut self) -> Result<Vec<AddrInfo>, NetlinkError> {
        let seq = self.next_seq();
        let msg = addresses_request(seq);
        self.dump(&msg, RTM_NEWADDR, parse_addr, || "listing addresses".into())
    }

    /// The unicast routes of the main table, IPv4 and IPv6.
    pub fn routes(&mut self) -> Result<Vec<RouteInfo>, NetlinkError> {
        let seq = self.next_seq();
        let msg = routes_request(seq);
        self.dump(&msg, RTM_NEWROUTE, parse_route, || "listing routes".into())
    }

    /// A route on interface `index`: to `dst` (`None`: default), via
    /// `gateway` (`None`: on the link, scope link); `onlink` sets
    /// RTNH_F_ONLINK (a gateway outside every prefix of the link, as
    /// Calico's 169.254.1.1).
    pub fn add_route(
        &mut self,
        index: u32,
        dst: Option<(IpAddr, u8)>,
        gateway: Option<IpAddr>,
        onlink: bool,
    ) -> Result<(), NetlinkError> {
        let seq = self.next_seq();
        let msg = add_route_request(index, dst, gateway, onlink, seq);
        self.request(&msg, || {
            let to = dst.map_or("default".into(), |(ip, len)| format!("{ip}/{len}"));
            match gateway {
                Some(gw) => format!("adding a route to {to} via {gw} on interface {index}"),
                None => format!("adding a route to {to} on interface {index}"),
            }
        })
    }

    /// Sets interface `index`'s hardware address.
    pub fn set_mac(&mut self, index: u32, mac: [u8; 6]) -> Result<(), NetlinkError> {
        let seq = self.next_seq();
        let msg = set_mac_request(index, mac, seq);
        self.request(&msg, || format!("setting the MAC of interface {index}"))
    }

    /// Renames interface `index` (down) to `name`.
    pub fn set_name(&mut self, index: u32, name: &str) -> Result<(), NetlinkError> {
        let seq = self.next_seq();
        let msg = set_name_request(index, name, seq);
        self.request(&msg, || format!("renaming interface {index} to {name}"))
    }

    /// Adds the ingress qdisc to interface `index`; the kernel's EEXIST if
    /// it has one (see [`NetlinkError::errno`]).
    pub fn add_ingress_qdisc(&mut self, index: u32) -> Result<(), NetlinkError> {
        let seq = self.next_seq();
        let msg = add_ingress_qdisc_request(index, seq);
        self.request(&msg, || {
            format!("adding the ingress qdisc to interface {index}")
        })
    }

    /// Removes interface `index`'s ingress qdisc and with it its filters.
    /// Where there is none the kernel answers ENOENT, or EINVAL if there
    /// was one before (an empty ingress queue stays, handle 0).
    pub fn del_ingress_qdisc(&mut self, index: u32) -> Result<(), NetlinkError> {
        let seq = self.next_seq();
        let msg = del_ingress_qdisc_request(index, seq);
        self.request(&msg, || {
            format!("removing the ingress qdisc of interface {index}")
        })
    }

    /// Redirects every frame that arrives on `from` (which needs its
    /// ingress qdisc) out of `to`.
    pub fn redirect_ingress(&mut self, from: u32, to: u32) -> Result<(), NetlinkError> {
        let seq = self.next_seq();
        let msg = redirect_ingress_request(from, to, seq);
        self.request(&msg, || {
            format!("redirecting what arrives on interface {from} to interface {to}")
        })
    }

    /// Adds `f` to the ingress qdisc of `dev` (which needs one).
    pub fn add_ingress_filter(&mut self, dev: u32, f: &IngressFilter) -> Result<(), NetlinkError> {
        let seq = self.next_seq();
        let msg = ingress_filter_request(dev, f, seq);
        self.request(&msg, || {
            format!(
                "adding a filter (priority {}) to what arrives on interface {dev}",
                f.priority
            )
        })
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
        // IPv4: the subnet's broadcast address after the address's two.
        let m = add_addr_request(4, "172.17.0.2".parse().unwrap(), 16, 1);
        assert_eq!((u16_at(&m, 40), u16_at(&m, 42)), (8, IFA_BROADCAST));
        assert_eq!(&m[44..48], &[172, 17, 255, 255]);
        let bc = |ip: &str, p| broadcast_of(ip.parse().unwrap(), p).map(|b| b.to_string());
        assert_eq!(bc("10.0.2.15", 24).as_deref(), Some("10.0.2.255"));
        assert_eq!(bc("10.1.2.1", 30).as_deref(), Some("10.1.2.3"));
        assert_eq!(bc("10.1.2.4", 31), None);
        assert_eq!(bc("10.1.2.4", 32), None);
        assert_eq!(bc("fd00::1", 64), None);
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

    #[test]
    fn route_layout() {
        let r = add_route_request(
            6,
            Some(("10.99.0.0".parse().unwrap(), 16)),
            Some("169.254.1.1".parse().unwrap()),
            true,
            3,
        );
        assert_eq!(u32_at(&r, 0) as usize, r.len());
        assert_eq!(u16_at(&r, 4), RTM_NEWROUTE);
        assert_eq!(
            u16_at(&r, 6),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
        );
        // rtmsg: IPv4, /16, main table, static, scope universe, unicast.
        assert_eq!(&r[16..24], &[AF_INET, 16, 0, 0, 254, 4, 0, 1]);
        assert_eq!(u32_at(&r, 24), RTNH_F_ONLINK);
        assert_eq!((u16_at(&r, 28), u16_at(&r, 30)), (8, RTA_DST));
        assert_eq!(&r[32..36], &[10, 99, 0, 0]);
        assert_eq!((u16_at(&r, 36), u16_at(&r, 38)), (8, RTA_GATEWAY));
        assert_eq!(&r[40..44], &[169, 254, 1, 1]);
        assert_eq!((u16_at(&r, 44), u16_at(&r, 46)), (8, RTA_OIF));
        assert_eq!(u32_at(&r, 48), 6);
        assert_eq!(r.len(), 52);

        // On the link: scope link, no gateway, no flags.
        let l = add_route_request(2, Some(("fd00::".parse().unwrap(), 64)), None, false, 1);
        assert_eq!(&l[16..24], &[AF_INET6, 64, 0, 0, 254, 4, RT_SCOPE_LINK, 1]);
        assert_eq!(u32_at(&l, 24), 0);
        assert_eq!((u16_at(&l, 28), u16_at(&l, 30)), (20, RTA_DST));
        assert_eq!((u16_at(&l, 48), u16_at(&l, 50)), (8, RTA_OIF));
        assert_eq!(l.len(), 56);

        // The default route is the same request without a destination.
        let gw: IpAddr = "fd00::1".parse().unwrap();
        assert_eq!(
            default_route_request(4, gw, 8),
            add_route_request(4, None, Some(gw), false, 8)
        );
        let d = add_route_request(4, None, None, false, 8);
        assert_eq!(&d[16..18], &[AF_INET, 0]);
    }

    #[test]
    fn set_mac_layout() {
        let m = set_mac_request(5, [2, 0, 0, 0, 0, 9], 4);
        assert_eq!(u32_at(&m, 0) as usize, m.len());
        assert_eq!(u16_at(&m, 4), RTM_NEWLINK);
        assert_eq!(u16_at(&m, 6), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(u32_at(&m, 20), 5);
        assert_eq!((u32_at(&m, 24), u32_at(&m, 28)), (0, 0));
        assert_eq!((u16_at(&m, 32), u16_at(&m, 34)), (10, IFLA_ADDRESS));
        assert_eq!(&m[36..42], &[2, 0, 0, 0, 0, 9]);
        assert_eq!(m.len(), 44);
    }

    #[test]
    fn set_name_layout() {
        let m = set_name_request(5, "net1", 4);
        assert_eq!(u32_at(&m, 0) as usize, m.len());
        assert_eq!(u16_at(&m, 4), RTM_NEWLINK);
        assert_eq!(u32_at(&m, 20), 5);
        assert_eq!((u16_at(&m, 32), u16_at(&m, 34)), (9, IFLA_IFNAME));
        assert_eq!(&m[36..41], b"net1\0");
        assert_eq!(m.len(), 44);
    }

    #[test]
    fn ingress_qdisc_layout() {
        // What `tc qdisc add dev X ingress` sends (iproute2 6.1), X = 3.
        let a = add_ingress_qdisc_request(3, 7);
        assert_eq!(u32_at(&a, 0) as usize, a.len());
        assert_eq!(a.len(), 48);
        assert_eq!(u16_at(&a, 4), RTM_NEWQDISC);
        assert_eq!(
            u16_at(&a, 6),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
        );
        assert_eq!(&a[16..20], &[0, 0, 0, 0]);
        assert_eq!(u32_at(&a, 20), 3);
        assert_eq!(u32_at(&a, 24), 0xFFFF_0000); // handle ffff:
        assert_eq!(u32_at(&a, 28), 0xFFFF_FFF1); // parent TC_H_INGRESS
        assert_eq!(u32_at(&a, 32), 0);
        assert_eq!((u16_at(&a, 36), u16_at(&a, 38)), (12, TCA_KIND));
        assert_eq!(&a[40..48], b"ingress\0");
        // Removing it: the same tcmsg and kind, no create flags.
        let d = del_ingress_qdisc_request(3, 8);
        assert_eq!(u16_at(&d, 4), RTM_DELQDISC);
        assert_eq!(u16_at(&d, 6), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(&d[16..], &a[16..]);
    }

    /// The one attribute of type `ty` in `buf`.
    fn only(buf: &[u8], ty: u16) -> &[u8] {
        let found: Vec<_> = Attrs(buf).filter(|&(t, _)| t == ty).collect();
        assert_eq!(found.len(), 1, "attribute {ty}");
        found[0].1
    }

    #[test]
    fn keyed_filter_layout() {
        // As `tc filter add dev 3 parent ffff: prio 4 protocol ip u32 match
        // ip protocol 6 0xff match ip dport 0xf000 0xf000 flowid ffff:1`.
        let f = IngressFilter {
            priority: 4,
            protocol: ETH_P_IP,
            keys: vec![
                U32Key {
                    mask: 0x00ff_0000,
                    value: 0x0006_0000,
                    off: 8,
                },
                U32Key {
                    mask: 0x0000_f000,
                    value: 0x0000_f000,
                    off: 20,
                },
            ],
            action: FilterAction::Pass,
        };
        let m = ingress_filter_request(3, &f, 5);
        assert_eq!(u32_at(&m, 0) as usize, m.len());
        assert_eq!(u32_at(&m, 32) >> 16, 4);
        assert_eq!(u16::from_be(u32_at(&m, 32) as u16), ETH_P_IP);
        let options = only(&m[36..], TCA_OPTIONS);
        assert_eq!(
            only(options, TCA_U32_CLASSID),
            &0xFFFF_0001u32.to_ne_bytes()
        );
        let sel = only(options, TCA_U32_SEL);
        assert_eq!(sel.len(), 16 + 2 * 16);
        assert_eq!(&sel[..4], &[1, 0, 2, 0]); // terminal, two keys
        assert_eq!(&sel[16..24], &[0, 0xff, 0, 0, 0, 6, 0, 0]);
        assert_eq!(&sel[24..28], &8i32.to_ne_bytes());
        assert_eq!(&sel[32..40], &[0, 0, 0xf0, 0, 0, 0, 0xf0, 0]);
        assert_eq!(&sel[40..44], &20i32.to_ne_bytes());
        assert!(Attrs(options).all(|(t, _)| t != TCA_U32_ACT), "no action");

        // A mirror: the copy out of 9, the frame piped on.
        let f = IngressFilter {
            priority: 1,
            protocol: ETH_P_ARP,
            keys: vec![U32Key::ANY],
            action: FilterAction::Mirror(9),
        };
        let m = ingress_filter_request(3, &f, 6);
        let options = only(&m[36..], TCA_OPTIONS);
        assert!(Attrs(options).all(|(t, _)| t != TCA_U32_CLASSID));
        let action = only(only(options, TCA_U32_ACT), 1);
        let parms = only(only(action, TCA_ACT_OPTIONS), TCA_MIRRED_PARMS);
        let want: Vec<u8> = [0u32, 0, 3, 0, 0, 2, 9]
            .iter()
            .flat_map(|v| v.to_ne_bytes())
            .collect();
        assert_eq!(parms, &want[..]); // pipe, egress mirror, to 9
    }

    #[test]
    fn redirect_layout() {
        let m = redirect_ingress_request(3, 9, 2);
        assert_eq!(u32_at(&m, 0) as usize, m.len());
        assert_eq!(u16_at(&m, 4), RTM_NEWTFILTER);
        assert_eq!(
            u16_at(&m, 6),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
        );
        // tcmsg: on 3, no handle, parent ffff:, priority 0 (the kernel's
        // choice), protocol ETH_P_ALL in network order.
        assert_eq!(u32_at(&m, 20), 3);
        assert_eq!(u32_at(&m, 24), 0);
        assert_eq!(u32_at(&m, 28), 0xFFFF_0000);
        assert_eq!(u32_at(&m, 32) >> 16, 0);
        assert_eq!(&m[34..36], &[0, 0]);
        assert_eq!(u16::from_be(u32_at(&m, 32) as u16), ETH_P_ALL);
        #[cfg(target_endian = "little")]
        assert_eq!(u32_at(&m, 32), 768); // as strace shows tc's tcm_info

        let attrs = &m[36..];
        assert_eq!(only(attrs, TCA_KIND), b"u32\0");
        let options = only(attrs, TCA_OPTIONS);
        // tc_u32_sel (terminal, one key) and the key matching 0/0 at 0,
        // byte for byte what tc sends.
        let mut sel = vec![1, 0, 1, 0];
        sel.resize(32, 0);
        assert_eq!(only(options, TCA_U32_SEL), &sel[..]);
        let action = only(only(options, TCA_U32_ACT), 1);
        assert_eq!(only(action, TCA_ACT_KIND), b"mirred\0");
        let parms = only(only(action, TCA_ACT_OPTIONS), TCA_MIRRED_PARMS);
        let want: Vec<u8> = [0u32, 0, 4, 0, 0, 1, 9]
            .iter()
            .flat_map(|v| v.to_ne_bytes())
            .collect();
        assert_eq!(parms, &want[..]); // stolen, egress redirect, to 9
                                      // Each nest's length covers exactly its attributes.
        assert_eq!(36 + 8 + 4 + options.len(), m.len());
    }

    #[test]
    fn dump_requests() {
        for (m, ty, len) in [
            (links_request(1), RTM_GETLINK, 40),
            (addresses_request(1), RTM_GETADDR, 24),
            (routes_request(1), RTM_GETROUTE, 28),
        ] {
            assert_eq!(u32_at(&m, 0) as usize, m.len());
            assert_eq!(m.len(), len);
            assert_eq!(u16_at(&m, 4), ty);
            assert_eq!(u16_at(&m, 6), NLM_F_REQUEST | NLM_F_DUMP);
            assert_eq!(u32_at(&m, 8), 1);
        }
        let l = links_request(1);
        assert_eq!((u16_at(&l, 32), u16_at(&l, 34)), (8, IFLA_EXT_MASK));
        assert_eq!(u32_at(&l, 36), RTEXT_FILTER_SKIP_STATS);
    }

    const NLM_F_MULTI: u16 = 0x2;

    /// A reply message, as the kernel writes one into a dump.
    fn reply(ty: u16, seq: u32, build: impl FnOnce(&mut Msg)) -> Vec<u8> {
        let mut m = Msg::with_flags(ty, NLM_F_MULTI, seq);
        build(&mut m);
        m.finish()
    }

    fn done(seq: u32, err: i32) -> Vec<u8> {
        reply(NLMSG_DONE, seq, |m| {
            m.bytes(&err.to_ne_bytes());
        })
    }

    fn body(m: &[u8]) -> &[u8] {
        &m[16..]
    }

    fn veth_link(seq: u32) -> Vec<u8> {
        reply(RTM_NEWLINK, seq, |m| {
            m.ifinfo(7, IFF_UP | 0x1000, 0)
                .attr(IFLA_IFNAME, b"eth0\0")
                .attr(IFLA_MTU, &1450u32.to_ne_bytes())
                .attr(IFLA_ADDRESS, &[2, 0, 0, 0, 0, 7]);
            m.begin(IFLA_LINKINFO).attr(IFLA_INFO_KIND, b"veth");
            m.begin(IFLA_INFO_DATA).end().end();
        })
    }

    #[test]
    fn links_parse() {
        assert_eq!(
            parse_link(body(&veth_link(1))),
            Ok(Some(LinkInfo {
                index: 7,
                name: "eth0".into(),
                kind: Some("veth".into()),
                mac: Some([2, 0, 0, 0, 0, 7]),
                mtu: 1450,
                up: true,
                loopback: false,
            }))
        );
        let lo = reply(RTM_NEWLINK, 1, |m| {
            m.ifinfo(1, IFF_LOOPBACK, 0)
                .attr(IFLA_IFNAME, b"lo\0")
                .attr(IFLA_MTU, &65536u32.to_ne_bytes())
                .attr(IFLA_ADDRESS, &[0; 6]);
        });
        let lo = parse_link(body(&lo)).unwrap().unwrap();
        assert_eq!((lo.kind, lo.up, lo.loopback), (None, false, true));
        assert_eq!((lo.mac, lo.mtu), (Some([0; 6]), 65536));
        // A 20-byte hardware address is no MAC; no MTU reads as 0.
        let ib = reply(RTM_NEWLINK, 1, |m| {
            m.ifinfo(4, 0, 0)
                .attr(IFLA_ADDRESS, &[1; 20])
                .attr(IFLA_IFNAME, b"ib0\0");
        });
        let ib = parse_link(body(&ib)).unwrap().unwrap();
        assert_eq!((ib.name.as_str(), ib.mac, ib.mtu), ("ib0", None, 0));
        // No name, or a fixed part cut short: malformed.
        let anon = reply(RTM_NEWLINK, 1, |m| {
            m.ifinfo(4, 0, 0).attr(IFLA_MTU, &1500u32.to_ne_bytes());
        });
        assert_eq!(parse_link(body(&anon)), Err(ReplyError::Malformed));
        assert_eq!(parse_link(&[0; 10]), Err(ReplyError::Malformed));
        // An attribute longer than what is left ends the attributes.
        let mut cut = veth_link(1);
        let len = u16_at(&cut, 44);
        assert_eq!(u16_at(&cut, 46), IFLA_MTU);
        cut[44..46].copy_from_slice(&(len + 200).to_ne_bytes());
        let link = parse_link(body(&cut)).unwrap().unwrap();
        assert_eq!((link.name.as_str(), link.mtu, link.kind), ("eth0", 0, None));
        // A zero length too, instead of looping.
        cut[44..46].copy_from_slice(&0u16.to_ne_bytes());
        assert_eq!(parse_link(body(&cut)).unwrap().unwrap().mtu, 0);
    }

    fn addr(family: u8, prefix: u8, scope: u8, attrs: &[(u16, &[u8])]) -> Vec<u8> {
        reply(RTM_NEWADDR, 1, |m| {
            m.bytes(&[family, prefix, 0, scope])
                .bytes(&9u32.to_ne_bytes());
            for (ty, data) in attrs {
                m.attr(*ty, data);
            }
        })
    }

    #[test]
    fn addresses_parse() {
        // Point-to-point: IFA_LOCAL is ours, IFA_ADDRESS the peer's.
        let ptp = addr(
            AF_INET,
            32,
            0,
            &[(IFA_ADDRESS, &[10, 0, 0, 1]), (IFA_LOCAL, &[10, 0, 0, 2])],
        );
        assert_eq!(
            parse_addr(body(&ptp)),
            Ok(Some(AddrInfo {
                index: 9,
                ip: "10.0.0.2".parse().unwrap(),
                prefix: 32,
                universe: true,
            }))
        );
        let ll: IpAddr = "fe80::1".parse().unwrap();
        let v6 = addr(AF_INET6, 64, RT_SCOPE_LINK, &[(IFA_ADDRESS, &octets(ll))]);
        let v6 = parse_addr(body(&v6)).unwrap().unwrap();
        assert_eq!((v6.ip, v6.prefix, v6.universe), (ll, 64, false));
        // Another family: skipped.
        let other = addr(17, 0, 0, &[(IFA_ADDRESS, &[1; 6])]);
        assert_eq!(parse_addr(body(&other)), Ok(None));
        // An address of the wrong size, or none: malformed.
        let bad = addr(AF_INET, 24, 0, &[(IFA_ADDRESS, &[10, 0, 0])]);
        assert_eq!(parse_addr(body(&bad)), Err(ReplyError::Malformed));
        assert_eq!(parse_addr(&[AF_INET, 24, 0]), Err(ReplyError::Malformed));
    }

    fn route(head: [u8; 8], flags: u32, attrs: &[(u16, &[u8])]) -> Vec<u8> {
        reply(RTM_NEWROUTE, 1, |m| {
            m.bytes(&head).bytes(&flags.to_ne_bytes());
            for (ty, data) in attrs {
                m.attr(*ty, data);
            }
        })
    }

    #[test]
    fn routes_parse() {
        let main = 254u32.to_ne_bytes();
        let oif = 3u32.to_ne_bytes();
        // The kernel's prefix route.
        let prefix = route(
            [AF_INET, 24, 0, 0, 254, 2, RT_SCOPE_LINK, 1],
            0,
            &[
                (RTA_TABLE, &main),
                (RTA_DST, &[10, 1, 0, 0]),
                (RTA_OIF, &oif),
            ],
        );
        assert_eq!(
            parse_route(body(&prefix)),
            Ok(Some(RouteInfo {
                oif: Some(3),
                dst: Some(("10.1.0.0".parse().unwrap(), 24)),
                gateway: None,
                protocol: 2,
                link_scope: true,
                onlink: false,
            }))
        );
        // A default route via an on-link gateway.
        let default = route(
            [AF_INET, 0, 0, 0, 254, 4, 0, 1],
            RTNH_F_ONLINK | 0x10, // and RTNH_F_LINKDOWN
            &[(RTA_GATEWAY, &[169, 254, 1, 1]), (RTA_OIF, &oif)],
        );
        assert_eq!(
            parse_route(body(&default)),
            Ok(Some(RouteInfo {
                oif: Some(3),
                dst: None,
                gateway: Some("169.254.1.1".parse().unwrap()),
                protocol: 4,
                link_scope: false,
                onlink: true,
            }))
        );
        let gw: IpAddr = "fd00::1".parse().unwrap();
        let v6 = route(
            [AF_INET6, 0, 0, 0, 254, 3, 0, 1],
            0,
            &[(RTA_TABLE, &main), (RTA_GATEWAY, &octets(gw))],
        );
        let v6 = parse_route(body(&v6)).unwrap().unwrap();
        assert_eq!((v6.gateway, v6.oif, v6.dst), (Some(gw), None, None));
        // Not kept: the local table (rtm_table, or RTA_TABLE past 255),
        // a local route, another family.
        let local = route(
            [AF_INET, 32, 0, 0, 255, 2, 254, 2],
            0,
            &[(RTA_DST, &[10, 1, 0, 2])],
        );
        assert_eq!(parse_route(body(&local)), Ok(None));
        let big_table = route(
            [AF_INET, 0, 0, 0, 252, 4, 0, 1],
            0,
            &[(RTA_TABLE, &1000u32.to_ne_bytes())],
        );
        assert_eq!(parse_route(body(&big_table)), Ok(None));
        let unicast_local_table = route([AF_INET, 0, 0, 0, 255, 4, 0, 1], 0, &[]);
        assert_eq!(parse_route(body(&unicast_local_table)), Ok(None));
        let ipmr = route([128, 0, 0, 0, 254, 4, 0, 1], 0, &[]);
        assert_eq!(parse_route(body(&ipmr)), Ok(None));
        // A prefix without its destination, a fixed part cut short.
        let nodst = route([AF_INET, 24, 0, 0, 254, 2, 253, 1], 0, &[]);
        assert_eq!(parse_route(body(&nodst)), Err(ReplyError::Malformed));
        assert_eq!(parse_route(&[AF_INET; 11]), Err(ReplyError::Malformed));
    }

    #[test]
    fn dump_parts() {
        let lo = reply(RTM_NEWLINK, 5, |m| {
            m.ifinfo(1, IFF_LOOPBACK, 0).attr(IFLA_IFNAME, b"lo\0");
        });
        let mut out = Vec::new();
        // Two links in one datagram, then NLMSG_DONE in the next.
        let part = [lo.clone(), veth_link(5)].concat();
        assert_eq!(
            dump_part(&part, 5, RTM_NEWLINK, parse_link, &mut out),
            Ok(false)
        );
        assert_eq!(
            dump_part(&done(5, 0), 5, RTM_NEWLINK, parse_link, &mut out),
            Ok(true)
        );
        let names: Vec<_> = out.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["lo", "eth0"]);
        // Another sequence number's messages, and other types, are skipped.
        let mut out = Vec::new();
        let noop = reply(1, 5, |_| {});
        let stale = [veth_link(4), done(4, 0), noop, lo.clone(), done(5, 0)].concat();
        assert_eq!(
            dump_part(&stale, 5, RTM_NEWLINK, parse_link, &mut out),
            Ok(true)
        );
        assert_eq!(out.len(), 1);
        assert_eq!(
            dump_part(&[], 5, RTM_NEWLINK, parse_link, &mut out),
            Ok(false)
        );
        // The kernel's errors, in NLMSG_ERROR or NLMSG_DONE.
        let error = |e: i32| {
            reply(NLMSG_ERROR, 5, |m| {
                m.bytes(&e.to_ne_bytes()).bytes(&[0; 16]);
            })
        };
        let mut out = Vec::new();
        for (part, want) in [
            (error(-1), Err(ReplyError::Kernel(1))),
            (error(0), Ok(false)),
            (error(i32::MIN), Err(ReplyError::Malformed)),
            (error(-5000), Err(ReplyError::Malformed)),
            (error(3), Err(ReplyError::Malformed)),
            (done(5, -4), Err(ReplyError::Kernel(4))),
            (reply(NLMSG_ERROR, 5, |_| {}), Err(ReplyError::Malformed)),
            (reply(NLMSG_DONE, 5, |_| {}), Ok(true)),
        ] {
            assert_eq!(dump_part(&part, 5, RTM_NEWLINK, parse_link, &mut out), want);
        }
        // A message whose length runs past the datagram, or under a header.
        let whole = [lo.clone(), veth_link(5), done(5, 0)].concat();
        let cut = &whole[..whole.len() - 3];
        assert_eq!(
            dump_part(cut, 5, RTM_NEWLINK, parse_link, &mut out),
            Err(ReplyError::Malformed)
        );
        let mut short = lo.clone();
        short[0..4].copy_from_slice(&8u32.to_ne_bytes());
        assert_eq!(
            dump_part(&short, 5, RTM_NEWLINK, parse_link, &mut out),
            Err(ReplyError::Malformed)
        );
    }

    /// Every cut and many corruptions of real-shaped replies: an answer,
    /// never a panic.
    #[test]
    fn garbage_never_panics() {
        let gw = "fd00::1".parse::<IpAddr>().unwrap();
        let parts = [
            [veth_link(5), done(5, 0)].concat(),
            [
                addr(AF_INET6, 64, 0, &[(IFA_ADDRESS, &octets(gw))]),
                done(5, 0),
            ]
            .concat(),
            route(
                [AF_INET6, 64, 0, 0, 254, 2, 0, 1],
                0,
                &[(RTA_DST, &octets(gw)), (RTA_GATEWAY, &octets(gw))],
            ),
        ];
        let mut seed = 0x2545_f491u32;
        for part in &parts {
            for ty in [RTM_NEWLINK, RTM_NEWADDR, RTM_NEWROUTE] {
                let run = |b: &[u8]| {
                    let mut out = Vec::new();
                    match ty {
                        RTM_NEWLINK => drop(dump_part(b, 5, ty, parse_link, &mut out)),
                        RTM_NEWADDR => drop(dump_part(b, 5, ty, parse_addr, &mut Vec::new())),
                        _ => drop(dump_part(b, 5, ty, parse_route, &mut Vec::new())),
                    }
                    let _ = (parse_link(b), parse_addr(b), parse_route(b), parse_ack(b));
                };
                for k in 0..=part.len() {
                    run(&part[..k]);
                    run(&part[k..]);
                }
                for _ in 0..2000 {
                    let mut b = part.clone();
                    for _ in 0..3 {
                        seed ^= seed << 13;
                        seed ^= seed >> 17;
                        seed ^= seed << 5;
                        let at = seed as usize % b.len();
                        b[at] = (seed >> 24) as u8;
                    }
                    run(&b);
                }
            }
        }
    }

    #[test]
    fn kernel_errno() {
        let refused = NetlinkError::Kernel {
            step: "x".into(),
            source: rustix::io::Errno::EXIST,
        };
        assert_eq!(refused.errno(), Some(rustix::io::Errno::EXIST));
        assert_eq!(NetlinkError::Reply { step: "x".into() }.errno(), None);
        assert_eq!(
            parse_ack(&{
                let mut r = [0u8; 20];
                r[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
                r[16..20].copy_from_slice(&i32::MIN.to_ne_bytes());
                r
            }),
            None
        );
    }
}
