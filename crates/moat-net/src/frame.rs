//! Frames: what one Ethernet frame from the workload is (checked parsing with
//! smoltcp's wire module: lengths and checksums verified, nothing trusted),
//! and the few frames the stack writes itself (UDP datagrams from the
//! outside, ICMP destination unreachable).
use std::net::{IpAddr, SocketAddr};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr,
    Icmpv4DstUnreachable, Icmpv4Message, Icmpv4Packet, Icmpv4Repr, Icmpv6DstUnreachable,
    Icmpv6Message, Icmpv6Packet, Icmpv6Repr, IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr,
    Ipv6Packet, Ipv6Repr, TcpPacket, TcpRepr, UdpPacket, UdpRepr,
};

pub(crate) const ETH_HEADER: usize = 14;
const IPV4_HEADER: usize = 20;
const IPV6_HEADER: usize = 40;
const UDP_HEADER: usize = 8;

/// The IP header of a frame, kept to quote it in an ICMP error.
#[derive(Debug, Clone, Copy)]
pub(crate) enum IpHeader {
    V4(Ipv4Repr),
    V6(Ipv6Repr),
}

impl IpHeader {
    pub(crate) fn dst(&self) -> IpAddr {
        match self {
            IpHeader::V4(r) => IpAddr::V4(r.dst_addr),
            IpHeader::V6(r) => IpAddr::V6(r.dst_addr),
        }
    }
}

/// What a frame carries, as far as the stack cares.
#[derive(Debug)]
pub(crate) enum Kind<'a> {
    /// ARP, asking about `target`.
    Arp { target: std::net::Ipv4Addr },
    Tcp {
        src: SocketAddr,
        dst: SocketAddr,
        syn: bool,
        ack: bool,
        rst: bool,
    },
    Udp {
        src: SocketAddr,
        dst: SocketAddr,
        payload: &'a [u8],
    },
    /// An ICMP or ICMPv6 echo request.
    EchoRequest,
    /// ICMPv6 neighbour discovery or MLD: for smoltcp.
    Ndp,
    /// Any other ICMP message.
    IcmpOther,
    /// Another IP protocol, or IPv6 extension headers we do not follow.
    OtherIp,
}

/// One checked frame.
#[derive(Debug)]
pub(crate) struct Frame<'a> {
    pub src_mac: EthernetAddress,
    pub ip: Option<IpHeader>,
    pub ip_payload: &'a [u8],
    pub kind: Kind<'a>,
}

/// Why a frame was dropped before the stack looked at it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Drop {
    /// A length, a checksum or a field is wrong.
    Malformed,
    /// Addressed to another Ethernet address.
    NotForUs,
    /// An IPv4 fragment (the workload's MTU is the link's; it never needs to).
    Fragment,
    /// An EtherType we do not speak.
    Unsupported,
}

fn caps() -> ChecksumCapabilities {
    ChecksumCapabilities::default()
}

/// Parses one frame from the workload.
pub(crate) fn classify(frame: &[u8], our_mac: EthernetAddress) -> Result<Frame<'_>, Drop> {
    let eth = EthernetFrame::new_checked(frame).map_err(|_| Drop::Malformed)?;
    let dst = eth.dst_addr();
    if dst != our_mac && !dst.is_broadcast() && !dst.is_multicast() {
        return Err(Drop::NotForUs);
    }
    let src_mac = eth.src_addr();
    if !src_mac.is_unicast() {
        return Err(Drop::Malformed);
    }
    let payload = &frame[ETH_HEADER..];
    match eth.ethertype() {
        EthernetProtocol::Arp => {
            let pkt = ArpPacket::new_checked(payload).map_err(|_| Drop::Malformed)?;
            match ArpRepr::parse(&pkt).map_err(|_| Drop::Malformed)? {
                ArpRepr::EthernetIpv4 {
                    target_protocol_addr,
                    ..
                } => Ok(Frame {
                    src_mac,
                    ip: None,
                    ip_payload: &[],
                    kind: Kind::Arp {
                        target: target_protocol_addr,
                    },
                }),
                _ => Err(Drop::Unsupported),
            }
        }
        EthernetProtocol::Ipv4 => ipv4(src_mac, payload),
        EthernetProtocol::Ipv6 => ipv6(src_mac, payload),
        _ => Err(Drop::Unsupported),
    }
}

fn ipv4(src_mac: EthernetAddress, packet: &[u8]) -> Result<Frame<'_>, Drop> {
    let pkt = Ipv4Packet::new_checked(packet).map_err(|_| Drop::Malformed)?;
    if pkt.more_frags() || pkt.frag_offset() != 0 {
        return Err(Drop::Fragment);
    }
    let repr = Ipv4Repr::parse(&pkt, &caps()).map_err(|_| Drop::Malformed)?;
    let start = usize::from(pkt.header_len());
    let end = usize::from(pkt.total_len());
    let payload = packet.get(start..end).ok_or(Drop::Malformed)?;
    let kind = transport(
        IpAddr::V4(repr.src_addr),
        IpAddr::V4(repr.dst_addr),
        repr.next_header,
        payload,
    )?;
    Ok(Frame {
        src_mac,
        ip: Some(IpHeader::V4(repr)),
        ip_payload: payload,
        kind,
    })
}

fn ipv6(src_mac: EthernetAddress, packet: &[u8]) -> Result<Frame<'_>, Drop> {
    let pkt = Ipv6Packet::new_checked(packet).map_err(|_| Drop::Malformed)?;
    let repr = Ipv6Repr::parse(&pkt).map_err(|_| Drop::Malformed)?;
    let payload = packet
        .get(IPV6_HEADER..IPV6_HEADER + usize::from(pkt.payload_len()))
        .ok_or(Drop::Malformed)?;
    let kind = if repr.next_header == IpProtocol::HopByHop {
        // MLD reports travel behind a hop-by-hop header; only multicast
        // destinations are worth smoltcp's look.
        if repr.dst_addr.is_multicast() {
            Kind::Ndp
        } else {
            Kind::OtherIp
        }
    } else {
        transport(
            IpAddr::V6(repr.src_addr),
            IpAddr::V6(repr.dst_addr),
            repr.next_header,
            payload,
        )?
    };
    Ok(Frame {
        src_mac,
        ip: Some(IpHeader::V6(repr)),
        ip_payload: payload,
        kind,
    })
}

fn transport<'a>(
    src: IpAddr,
    dst: IpAddr,
    proto: IpProtocol,
    payload: &'a [u8],
) -> Result<Kind<'a>, Drop> {
    let (s, d) = (IpAddress::from(src), IpAddress::from(dst));
    match proto {
        IpProtocol::Tcp => {
            let pkt = TcpPacket::new_checked(payload).map_err(|_| Drop::Malformed)?;
            let repr = TcpRepr::parse(&pkt, &s, &d, &caps()).map_err(|_| Drop::Malformed)?;
            Ok(Kind::Tcp {
                src: SocketAddr::new(src, repr.src_port),
                dst: SocketAddr::new(dst, repr.dst_port),
                syn: pkt.syn(),
                ack: pkt.ack(),
                rst: pkt.rst(),
            })
        }
        IpProtocol::Udp => {
            let pkt = UdpPacket::new_checked(payload).map_err(|_| Drop::Malformed)?;
            let repr = UdpRepr::parse(&pkt, &s, &d, &caps()).map_err(|_| Drop::Malformed)?;
            if repr.src_port == 0 || repr.dst_port == 0 {
                return Err(Drop::Malformed);
            }
            let len = usize::from(pkt.len());
            Ok(Kind::Udp {
                src: SocketAddr::new(src, repr.src_port),
                dst: SocketAddr::new(dst, repr.dst_port),
                payload: payload.get(UDP_HEADER..len).ok_or(Drop::Malformed)?,
            })
        }
        IpProtocol::Icmp => {
            let pkt = Icmpv4Packet::new_checked(payload).map_err(|_| Drop::Malformed)?;
            if !pkt.verify_checksum() {
                return Err(Drop::Malformed);
            }
            Ok(match pkt.msg_type() {
                Icmpv4Message::EchoRequest => Kind::EchoRequest,
                _ => Kind::IcmpOther,
            })
        }
        IpProtocol::Icmpv6 => {
            let pkt = Icmpv6Packet::new_checked(payload).map_err(|_| Drop::Malformed)?;
            if !pkt.verify_checksum(&s.into_v6(), &d.into_v6()) {
                return Err(Drop::Malformed);
            }
            Ok(match pkt.msg_type() {
                Icmpv6Message::EchoRequest => Kind::EchoRequest,
                Icmpv6Message::RouterSolicit
                | Icmpv6Message::RouterAdvert
                | Icmpv6Message::NeighborSolicit
                | Icmpv6Message::NeighborAdvert
                | Icmpv6Message::Redirect
                | Icmpv6Message::MldQuery
                | Icmpv6Message::MldReport => Kind::Ndp,
                _ => Kind::IcmpOther,
            })
        }
        _ => Ok(Kind::OtherIp),
    }
}

trait IntoV6 {
    fn into_v6(self) -> smoltcp::wire::Ipv6Address;
}

impl IntoV6 for IpAddress {
    fn into_v6(self) -> smoltcp::wire::Ipv6Address {
        match self {
            IpAddress::Ipv6(a) => a,
            IpAddress::Ipv4(a) => a.to_ipv6_mapped(),
        }
    }
}

fn ethernet(buf: &mut [u8], src: EthernetAddress, dst: EthernetAddress, v6: bool) {
    let repr = EthernetRepr {
        src_addr: src,
        dst_addr: dst,
        ethertype: if v6 {
            EthernetProtocol::Ipv6
        } else {
            EthernetProtocol::Ipv4
        },
    };
    repr.emit(&mut EthernetFrame::new_unchecked(buf));
}

/// A UDP datagram from `src` to `dst` on the link, or `None` when the
/// families differ or it would not fit in `mtu`.
pub(crate) fn udp_frame(
    our_mac: EthernetAddress,
    to_mac: EthernetAddress,
    src: SocketAddr,
    dst: SocketAddr,
    payload: &[u8],
    mtu: usize,
) -> Option<Vec<u8>> {
    let udp_len = UDP_HEADER + payload.len();
    let udp = UdpRepr {
        src_port: src.port(),
        dst_port: dst.port(),
    };
    let (ip_len, v6) = match (src.ip(), dst.ip()) {
        (IpAddr::V4(_), IpAddr::V4(_)) => (IPV4_HEADER, false),
        (IpAddr::V6(_), IpAddr::V6(_)) => (IPV6_HEADER, true),
        _ => return None,
    };
    if ip_len + udp_len > mtu.min(usize::from(u16::MAX)) {
        return None;
    }
    let mut buf = vec![0u8; ETH_HEADER + ip_len + udp_len];
    ethernet(&mut buf, our_mac, to_mac, v6);
    let ip_buf = &mut buf[ETH_HEADER..];
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let repr = Ipv4Repr {
                src_addr: s,
                dst_addr: d,
                next_header: IpProtocol::Udp,
                payload_len: udp_len,
                hop_limit: 64,
            };
            repr.emit(&mut Ipv4Packet::new_unchecked(&mut *ip_buf), &caps());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let repr = Ipv6Repr {
                src_addr: s,
                dst_addr: d,
                next_header: IpProtocol::Udp,
                payload_len: udp_len,
                hop_limit: 64,
            };
            repr.emit(&mut Ipv6Packet::new_unchecked(&mut *ip_buf));
        }
        _ => return None,
    }
    udp.emit(
        &mut UdpPacket::new_unchecked(&mut ip_buf[ip_len..]),
        &IpAddress::from(src.ip()),
        &IpAddress::from(dst.ip()),
        payload.len(),
        |b| b.copy_from_slice(payload),
        &caps(),
    );
    Some(buf)
}

/// Which ICMP destination-unreachable to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unreachable {
    /// Administratively prohibited: the policy refused the destination.
    Prohibited,
    /// Nothing listens on that port of the gateway.
    Port,
}

/// An ICMP destination unreachable from `gateway` about the packet `ip`
/// (quoting the first 8 bytes of its payload) to the workload.
pub(crate) fn unreachable_frame(
    our_mac: EthernetAddress,
    to_mac: EthernetAddress,
    gateway: IpAddr,
    ip: &IpHeader,
    ip_payload: &[u8],
    why: Unreachable,
) -> Option<Vec<u8>> {
    let data = &ip_payload[..ip_payload.len().min(8)];
    match (ip, gateway) {
        (IpHeader::V4(orig), IpAddr::V4(gw)) => {
            let icmp = Icmpv4Repr::DstUnreachable {
                reason: match why {
                    Unreachable::Prohibited => Icmpv4DstUnreachable::CommProhibited,
                    Unreachable::Port => Icmpv4DstUnreachable::PortUnreachable,
                },
                header: *orig,
                data,
            };
            let repr = Ipv4Repr {
                src_addr: gw,
                dst_addr: orig.src_addr,
                next_header: IpProtocol::Icmp,
                payload_len: icmp.buffer_len(),
                hop_limit: 64,
            };
            let mut buf = vec![0u8; ETH_HEADER + IPV4_HEADER + icmp.buffer_len()];
            ethernet(&mut buf, our_mac, to_mac, false);
            let ip_buf = &mut buf[ETH_HEADER..];
            repr.emit(&mut Ipv4Packet::new_unchecked(&mut *ip_buf), &caps());
            icmp.emit(
                &mut Icmpv4Packet::new_unchecked(&mut ip_buf[IPV4_HEADER..]),
                &caps(),
            );
            Some(buf)
        }
        (IpHeader::V6(orig), IpAddr::V6(gw)) => {
            let icmp = Icmpv6Repr::DstUnreachable {
                reason: match why {
                    Unreachable::Prohibited => Icmpv6DstUnreachable::AdminProhibit,
                    Unreachable::Port => Icmpv6DstUnreachable::PortUnreachable,
                },
                header: *orig,
                data,
            };
            let repr = Ipv6Repr {
                src_addr: gw,
                dst_addr: orig.src_addr,
                next_header: IpProtocol::Icmpv6,
                payload_len: icmp.buffer_len(),
                hop_limit: 64,
            };
            let mut buf = vec![0u8; ETH_HEADER + IPV6_HEADER + icmp.buffer_len()];
            ethernet(&mut buf, our_mac, to_mac, true);
            let ip_buf = &mut buf[ETH_HEADER..];
            repr.emit(&mut Ipv6Packet::new_unchecked(&mut *ip_buf));
            icmp.emit(
                &gw,
                &orig.src_addr,
                &mut Icmpv6Packet::new_unchecked(&mut ip_buf[IPV6_HEADER..]),
                &caps(),
            );
            Some(buf)
        }
        _ => None,
    }
}
