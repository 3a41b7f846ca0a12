//! The addresses of the workload's network and the stack's bounds.
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

/// The workload's side of the network. The defaults are slirp's IPv4
/// addresses (10.0.2.0/24, gateway .2, the workload .100) and a fixed ULA
/// prefix spelling "moat" (fd00:6d6f:6174::/64, gateway ::2, workload ::100).
/// The gateway is the stack itself: it answers ARP/NDP, ICMP echo and DNS
/// (port 53) on its addresses and nothing else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub gateway_v4: Ipv4Addr,
    pub workload_v4: Ipv4Addr,
    pub prefix_v4: u8,
    pub gateway_v6: Ipv6Addr,
    pub workload_v6: Ipv6Addr,
    pub prefix_v6: u8,
    /// The stack's Ethernet address (locally administered).
    pub gateway_mac: [u8; 6],
    /// The IP MTU of the link (the TAP device gets the same). 65520 like
    /// slirp4netns and pasta: fewer, larger frames through the stack.
    pub mtu: usize,
}

impl Default for NetConfig {
    fn default() -> NetConfig {
        NetConfig {
            gateway_v4: Ipv4Addr::new(10, 0, 2, 2),
            workload_v4: Ipv4Addr::new(10, 0, 2, 100),
            prefix_v4: 24,
            gateway_v6: Ipv6Addr::new(0xfd00, 0x6d6f, 0x6174, 0, 0, 0, 0, 2),
            workload_v6: Ipv6Addr::new(0xfd00, 0x6d6f, 0x6174, 0, 0, 0, 0, 0x100),
            prefix_v6: 64,
            gateway_mac: [0x02, 0x6d, 0x6f, 0x61, 0x74, 0x02],
            mtu: 65520,
        }
    }
}

impl NetConfig {
    /// The largest Ethernet frame on the link.
    pub fn max_frame(&self) -> usize {
        self.mtu + 14
    }

    /// The resolv.conf the workload should see: the gateway answers DNS.
    pub fn resolv_conf(&self) -> String {
        format!(
            "# written by moat: the gateway answers only for allowed names\nnameserver {}\nnameserver {}\n",
            self.gateway_v4, self.gateway_v6
        )
    }
}

/// Bounds on what one stack may hold. Every buffer the workload can fill is
/// counted against these; at a bound, new flows are refused (TCP reset,
/// ICMP unreachable for UDP) and extra frames or datagrams are dropped and
/// counted, never queued without limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Open or connecting TCP flows, both directions.
    pub max_tcp_flows: usize,
    /// UDP flows (one per workload endpoint and destination).
    pub max_udp_flows: usize,
    /// Bytes of each TCP flow's receive and of its send buffer.
    pub tcp_buffer: usize,
    /// Bytes of all flows' buffers together: a flow reserves two
    /// `tcp_buffer`s when it opens and is refused when they do not fit.
    pub max_buffered: usize,
    /// Bytes of outgoing UDP datagrams waiting for the IO shell.
    pub max_udp_queued: usize,
    /// Frames waiting to be written to the TAP device.
    pub max_tx_frames: usize,
    /// Bytes of frames queued each way between the TAP device and smoltcp
    /// (the queue towards the TAP may pass it by one frame).
    pub max_link_bytes: usize,
    /// DNS queries waiting for the host's resolver.
    pub max_dns_pending: usize,
    /// A UDP flow with no datagram either way for this long is closed.
    pub udp_idle: Duration,
    /// How long a name resolution answer is reused.
    pub dns_cache: Duration,
    /// Addresses remembered from DNS answers for name rules.
    pub learned_addrs: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_tcp_flows: 256,
            max_udp_flows: 256,
            tcp_buffer: 128 * 1024,
            max_buffered: 64 * 1024 * 1024,
            max_udp_queued: 1024 * 1024,
            max_tx_frames: 512,
            max_link_bytes: 8 * 1024 * 1024,
            max_dns_pending: 64,
            udp_idle: Duration::from_secs(60),
            dns_cache: Duration::from_secs(10),
            learned_addrs: 4096,
        }
    }
}

/// Frames the core keeps for reuse (see `Stack::recycle`).
pub(crate) const FREE_FRAMES: usize = 64;
/// The most bytes of one SYN the core holds while the host connects.
pub(crate) const MAX_SYN_FRAME: usize = 2048;

impl Limits {
    /// The most bytes the core's own buffers can hold on `net`'s link
    /// within these limits: flow buffers, both frame queues (the one
    /// towards the TAP passing its bound by one frame), recycled frame
    /// buffers, queued datagrams and held SYNs. The IO shell adds one frame
    /// buffer; the process that runs it sets its memory limit above this.
    pub fn memory_bound(&self, net: &NetConfig) -> usize {
        let frame = net.max_frame();
        self.max_buffered
            + 2 * self.max_link_bytes.max(frame)
            + frame
            + FREE_FRAMES * frame
            + self.max_udp_queued
            + self.max_tcp_flows * MAX_SYN_FRAME
    }

    /// Descriptors the IO shell may hold at once: one host socket per flow,
    /// plus listeners of published ports and its own few.
    pub fn max_fds(&self, published: usize) -> usize {
        self.max_tcp_flows + self.max_udp_flows + published + 32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memory_bound_adds_up_the_buffers() {
        let l = Limits::default();
        let net = NetConfig::default();
        let bound = l.memory_bound(&net);
        assert!(bound > l.max_buffered + 2 * l.max_link_bytes);
        // About 86 MiB with the defaults, as the README says.
        assert!((85 << 20..87 << 20).contains(&bound), "{bound}");
        assert_eq!(l.max_fds(0), 544);
    }
}
