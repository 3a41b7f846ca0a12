//! A network namespace's interface handed to the guest: when a container
//! joins a namespace by path (a Kubernetes pod's, Podman's) and asks
//! nothing of moat's stack, the guest takes over that namespace's
//! interface — its hardware address, addresses, MTU and routes — so the
//! pod's address is the guest's, and Services, port forwards and the
//! CNI's policies reach the workload as they would a container.
//!
//! How (the "tcfilter" model Kata made common): a TAP device is made in
//! the namespace beside the interface, and each one's ingress is
//! redirected to the other's egress (tc: an `ingress` qdisc, a `u32`
//! filter matching every frame, a `mirred` egress redirect). Frames then
//! pass between the pod's wire and the VMM untouched; the namespace's own
//! stack no longer sees them, but for its share (below). The VMM holds the
//! TAP's only descriptor, so the TAP goes when the VMM does; `delete`
//! removes the interface's ingress qdisc (and with it the redirection).
//!
//! The namespace's own stack keeps a share of the interface, for the
//! other containers of the pod: its ephemeral ports are moved to
//! [`KEPT_PORTS`](moat_net::netlink::KEPT_PORTS) (61440–65535, which a
//! Linux guest's default range, 32768–60999, never uses), TCP and UDP
//! arriving for those ports pass to it instead of the guest, and ARP and
//! IPv6 neighbour solicitations and advertisements go to both (the guest
//! answers with the interface's own MAC, as the namespace does). So a
//! second microVM of the pod, given moat's stack, which serves from the
//! pod's namespace, reaches out from the pod's address too.
//!
//! One guest per namespace: an interface can be taken over once. [`take`]
//! says when another guest holds it ([`PodNetError::Taken`]); the runtime
//! then gives that container moat's stack from the namespace instead.
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use moat_net::netlink::{
    shared_filters, AddrInfo, LinkInfo, Netlink, NetlinkError, RouteInfo, KEPT_PORTS,
};
use serde::{Deserialize, Serialize};

use crate::proto::{GuestAddr, GuestInterface, GuestNet, GuestRoute};

/// The TAP devices' name prefix (a name's owner is a microVM of moat's).
pub const TAP_PREFIX: &str = "mvm";

/// What `delete` needs to undo a take-over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodLinkRecord {
    /// The namespace, as the config named it.
    pub netns: PathBuf,
    /// The interface the guest took over.
    pub interface: String,
    /// The TAP device beside it.
    pub tap: String,
    /// The namespace's ephemeral port range before the take-over
    /// (`ip_local_port_range`), given back with the interface.
    #[serde(default)]
    pub port_range: Option<String>,
    /// The namespace's other interfaces taken over too, each with its
    /// TAP: (interface, TAP).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub more: Vec<(String, String)>,
}

impl PodLinkRecord {
    /// Every interface taken over: the first, then the others.
    fn interfaces(&self) -> impl Iterator<Item = &String> {
        std::iter::once(&self.interface).chain(self.more.iter().map(|(i, _)| i))
    }
}

/// The namespace's ephemeral ports, read and written from a thread in it
/// (procfs gives the opener's namespace's).
const PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";

/// A taken-over interface: the TAP's descriptor (the VMM's to hold), the
/// record, and eth0's configuration for the guest.
#[derive(Debug)]
pub struct PodLink {
    pub tap: OwnedFd,
    pub record: PodLinkRecord,
    pub guest: GuestNet,
    /// The namespace's `localhost` (and own addresses), passed to the
    /// guest ([`crate::portfwd`]); `None` where the kernel could not steer
    /// them (said once, on stderr).
    pub forward: Option<crate::portfwd::LocalForward>,
    /// The TAPs beside the namespace's other interfaces
    /// ([`GuestNet::extra`], in order).
    pub more_taps: Vec<OwnedFd>,
}

/// Why an interface could not be taken over.
#[derive(Debug, thiserror::Error)]
pub enum PodNetError {
    #[error("cannot open the network namespace {}", .path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot enter the network namespace {}", .path.display())]
    Enter {
        path: PathBuf,
        #[source]
        source: rustix::io::Errno,
    },
    #[error("{step}")]
    Netlink {
        step: String,
        #[source]
        source: NetlinkError,
    },
    #[error("cannot create the TAP device {name}")]
    Tap {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "interface {interface} of {} is already another microVM's (one guest per \
         network namespace)",
        .netns.display()
    )]
    Taken {
        interface: String,
        netns: PathBuf,
        /// The interface's addresses (the pod's, the other guest's).
        addresses: Vec<std::net::IpAddr>,
    },
    #[error(
        "interface {interface} of {} already has an ingress qdisc (tc), which \
         handing it to the guest would replace",
        .netns.display()
    )]
    Qdisc { interface: String, netns: PathBuf },
    #[error("the thread that enters the network namespace failed")]
    Thread,
    #[error("cannot move the ephemeral ports of {} ({PORT_RANGE})", .netns.display())]
    Ports {
        netns: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn nl(step: impl Into<String>) -> impl FnOnce(NetlinkError) -> PodNetError {
    let step = step.into();
    move |source| PodNetError::Netlink { step, source }
}

/// Whether `path` names the calling process's own network namespace
/// (whose interfaces are the host's: never taken over).
pub use moat_net::is_own_netns;

/// The TAP device's name for container `id` (at most 15 bytes).
pub fn tap_name(id: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    id.hash(&mut h);
    format!("{TAP_PREFIX}{:08x}", h.finish() as u32)
}

/// Runs `f` on a thread that entered the network namespace at `path`.
fn in_netns<T: Send>(
    path: &Path,
    f: impl FnOnce() -> Result<T, PodNetError> + Send,
) -> Result<T, PodNetError> {
    let ns = std::fs::File::open(path).map_err(|source| PodNetError::Open {
        path: path.to_owned(),
        source,
    })?;
    moat_net::in_netns(ns.as_fd(), f).map_err(|e| match e {
        moat_net::InNetnsError::Enter(source) => PodNetError::Enter {
            path: path.to_owned(),
            source,
        },
        _ => PodNetError::Thread,
    })?
}

/// A namespace's interfaces, addresses and routes.
type Survey = (Vec<LinkInfo>, Vec<AddrInfo>, Vec<RouteInfo>);

/// The calling thread's namespace's interfaces, addresses and routes.
fn survey(n: &mut Netlink) -> Result<Survey, PodNetError> {
    Ok((
        n.links().map_err(nl("list the interfaces"))?,
        n.addresses().map_err(nl("list the addresses"))?,
        n.routes().map_err(nl("list the routes"))?,
    ))
}

/// The interface to take over among `links`: up, with a hardware address
/// and an address of global scope, not a TAP (another VMM's); of several,
/// the one with a default route, else the first. `None`: nothing to take
/// (only `lo`, or nothing configured yet).
fn choose<'a>(
    links: &'a [LinkInfo],
    addrs: &[AddrInfo],
    routes: &[RouteInfo],
) -> Option<&'a LinkInfo> {
    let usable: Vec<&LinkInfo> = links.iter().filter(|l| usable(l, addrs)).collect();
    usable
        .iter()
        .find(|l| {
            routes
                .iter()
                .any(|r| r.oif == Some(l.index) && r.dst.is_none())
        })
        .or(usable.first())
        .copied()
}

/// Whether `l` can be taken over: up, with a hardware address and an
/// address of global scope, not a TAP (another VMM's) nor `lo`.
fn usable(l: &LinkInfo, addrs: &[AddrInfo]) -> bool {
    !l.loopback
        && l.up
        && l.mac.is_some()
        && l.kind.as_deref() != Some("tun")
        && addrs.iter().any(|a| a.index == l.index && a.universe)
}

/// The interfaces of `links` to take over beside `first` (a CNI
/// meta-plugin's `net1`…): [`usable`], in index order, at most
/// [`proto::MAX_EXTRA_INTERFACES`].
fn others<'a>(links: &'a [LinkInfo], addrs: &[AddrInfo], first: &LinkInfo) -> Vec<&'a LinkInfo> {
    links
        .iter()
        .filter(|l| l.index != first.index && usable(l, addrs))
        .take(crate::proto::MAX_EXTRA_INTERFACES)
        .collect()
}

/// One more interface's configuration in the guest, from `link`'s (as
/// [`guest_net`]'s, but for a default route: the first interface's is the
/// guest's).
fn guest_interface(link: &LinkInfo, addrs: &[AddrInfo], routes: &[RouteInfo]) -> GuestInterface {
    let net = guest_net(link, addrs, routes);
    GuestInterface {
        name: link.name.clone(),
        mac: link.mac.unwrap_or_default(),
        addresses: net.addresses,
        mtu: net.mtu,
        routes: net.routes.into_iter().filter(|r| r.dst.is_some()).collect(),
    }
}

/// eth0's configuration in the guest from `link`'s: its hardware address,
/// global addresses, MTU, and the routes through it that the kernel did
/// not make itself (those come back with the addresses), on-link ones
/// first.
fn guest_net(link: &LinkInfo, addrs: &[AddrInfo], routes: &[RouteInfo]) -> GuestNet {
    const RTPROT_KERNEL: u8 = 2;
    let mut routes: Vec<GuestRoute> = routes
        .iter()
        .filter(|r| r.oif == Some(link.index) && r.protocol != RTPROT_KERNEL)
        .map(|r| GuestRoute {
            dst: r.dst,
            gateway: r.gateway,
            onlink: r.onlink,
        })
        .collect();
    routes.sort_by_key(|r| r.gateway.is_some());
    GuestNet {
        mac: link.mac,
        addresses: addrs
            .iter()
            .filter(|a| a.index == link.index && a.universe)
            .map(|a| GuestAddr {
                ip: a.ip,
                prefix: a.prefix,
            })
            .collect(),
        mtu: link.mtu,
        routes,
        resolv_conf: None,
        extra: Vec::new(),
    }
}

/// Takes over the interface of the network namespace at `netns` for
/// container `id`'s guest (its TAP: [`make_tap`]); `Ok(None)` when it has
/// none to take.
pub fn take(netns: &Path, id: &str) -> Result<Option<PodLink>, PodNetError> {
    let tap = tap_name(id);
    in_netns(netns, || {
        let mut n = Netlink::open().map_err(nl("open rtnetlink"))?;
        let (links, addrs, routes) = survey(&mut n)?;
        let Some(link) = choose(&links, &addrs, &routes) else {
            return Ok(None);
        };
        if links
            .iter()
            .any(|l| l.kind.as_deref() == Some("tun") && l.name.starts_with(TAP_PREFIX))
        {
            return Err(PodNetError::Taken {
                interface: link.name.clone(),
                netns: netns.to_owned(),
                addresses: guest_net(link, &addrs, &routes)
                    .addresses
                    .iter()
                    .map(|a| a.ip)
                    .collect(),
            });
        }
        let mut guest = guest_net(link, &addrs, &routes);
        let fd = make_tap(&tap).map_err(|source| PodNetError::Tap {
            name: tap.clone(),
            source,
        })?;
        let tap_index = n.index(&tap).map_err(nl(format!("find {tap}")))?;
        n.set_up(tap_index, Some(link.mtu))
            .map_err(nl(format!("bring up {tap}")))?;
        let port_range = redirect(&mut n, link, (&tap, tap_index), netns)?;
        let mut record = PodLinkRecord {
            netns: netns.to_owned(),
            interface: link.name.clone(),
            tap: tap.clone(),
            port_range: Some(port_range),
            more: Vec::new(),
        };
        // The namespace's other interfaces, each on a TAP of its own; a
        // failure gives back what was taken.
        let mut more_taps = Vec::new();
        for (k, other) in others(&links, &addrs, link).into_iter().enumerate() {
            let name = tap_name(&format!("{id}/{}", k + 1));
            let taken = (|| {
                let fd = make_tap(&name).map_err(|source| PodNetError::Tap {
                    name: name.clone(),
                    source,
                })?;
                let index = n.index(&name).map_err(nl(format!("find {name}")))?;
                n.set_up(index, Some(other.mtu))
                    .map_err(nl(format!("bring up {name}")))?;
                redirect(&mut n, other, (&name, index), netns)?;
                Ok(fd)
            })();
            match taken {
                Ok(fd) => {
                    more_taps.push(fd);
                    record.more.push((other.name.clone(), name));
                    guest.extra.push(guest_interface(other, &addrs, &routes));
                }
                Err(e) => {
                    give_back(&mut n, &record);
                    return Err(e);
                }
            }
        }
        // Not a security measure: a kernel without sk_lookup runs the pod
        // without port forwards, and says so.
        let own: Vec<std::net::IpAddr> = guest
            .addresses
            .iter()
            .chain(guest.extra.iter().flat_map(|x| &x.addresses))
            .map(|a| a.ip)
            .collect();
        let forward = crate::portfwd::steer(&own)
            .inspect_err(|e| {
                tracing::warn!(
                    "microvm: port forwards will not reach the guest (cannot steer the namespace's localhost: {e})"
                )
            })
            .ok();
        Ok(Some(PodLink {
            tap: fd,
            record,
            guest,
            forward,
            more_taps,
        }))
    })
}

/// Redirects `link` and the TAP `tap` (name, index) to each other: an
/// ingress qdisc on each, each one's frames to the other's egress, but
/// what the namespace keeps ([`shared_filters`], its ephemeral ports moved
/// to [`KEPT_PORTS`]). Returns the namespace's port range before. An
/// ingress qdisc already on `link` is refused, not replaced; a failure
/// after `link`'s qdisc removes it and puts the range back.
fn redirect(
    n: &mut Netlink,
    link: &LinkInfo,
    (tap, tap_index): (&str, u32),
    netns: &Path,
) -> Result<String, PodNetError> {
    let ports = |e| PodNetError::Ports {
        netns: netns.to_owned(),
        source: e,
    };
    let before = std::fs::read_to_string(PORT_RANGE).map_err(ports)?;
    if let Err(e) = n.add_ingress_qdisc(link.index) {
        return Err(if e.errno() == Some(rustix::io::Errno::EXIST) {
            PodNetError::Qdisc {
                interface: link.name.clone(),
                netns: netns.to_owned(),
            }
        } else {
            nl(format!("add an ingress qdisc to {}", link.name))(e)
        });
    }
    let both = (|| {
        n.add_ingress_qdisc(tap_index)
            .map_err(nl(format!("add an ingress qdisc to {tap}")))?;
        n.redirect_ingress(link.index, tap_index)
            .map_err(nl(format!("redirect {} to {tap}", link.name)))?;
        n.redirect_ingress(tap_index, link.index)
            .map_err(nl(format!("redirect {tap} to {}", link.name)))?;
        // After the redirection (priority 0: the kernel gives it 49152),
        // ahead of it (1…).
        for f in shared_filters(tap_index) {
            n.add_ingress_filter(link.index, &f).map_err(nl(format!(
                "keep {}'s share of {} (filter {})",
                netns.display(),
                link.name,
                f.priority
            )))?;
        }
        std::fs::write(PORT_RANGE, format!("{} {}", KEPT_PORTS.0, KEPT_PORTS.1)).map_err(ports)
    })();
    if let Err(e) = both {
        // The interface is given back; the TAP goes with its descriptor.
        let _ = n.del_ingress_qdisc(link.index);
        let _ = std::fs::write(PORT_RANGE, &before);
        return Err(e);
    }
    Ok(before.trim().to_owned())
}

/// Makes the TAP device `name` in the calling thread's network namespace
/// (blocking, close-on-exec; moat's own VMM makes it non-blocking, QEMU
/// too), each frame after a virtio-net header (`IFF_VNET_HDR`): both
/// backends pass it through to the guest's device, which then offers
/// checksum and segmentation offloads, and set the TAP's offloads to the
/// ones the guest accepted. For the VMM process in a namespace of its
/// own, before its jail: see [`take_into`].
pub fn make_tap(name: &str) -> std::io::Result<OwnedFd> {
    let fd = rustix::fs::open(
        "/dev/net/tun",
        rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    let flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
    moat_sys::tun::tun_set_iff(fd.as_fd(), name, flags as i16)?;
    Ok(fd)
}

/// After the engine's hooks configured the namespace the VMM process is in
/// (Docker's libnetwork moves the container's interface into the
/// namespace of the container's process, which here is the VMM's, from a
/// prestart hook): hands that interface to the TAP `tap` the VMM process
/// made there ([`make_tap`]) and returns eth0's configuration for the
/// guest; `None` when the hooks left no interface. Nothing to undo later:
/// the namespace ends with the VMM.
pub fn take_into(netns: &Path, tap: &str) -> Result<Option<GuestNet>, PodNetError> {
    in_netns(netns, || {
        let mut n = Netlink::open().map_err(nl("open rtnetlink"))?;
        let (links, addrs, routes) = survey(&mut n)?;
        let Some(link) = choose(&links, &addrs, &routes) else {
            return Ok(None);
        };
        let tap_index = n.index(tap).map_err(nl(format!("find {tap}")))?;
        n.set_up(tap_index, Some(link.mtu))
            .map_err(nl(format!("bring up {tap}")))?;
        // The namespace ends with the VMM process: its range stays.
        redirect(&mut n, link, (tap, tap_index), netns)?;
        Ok(Some(guest_net(link, &addrs, &routes)))
    })
}

/// Gives the interface back to its namespace: removes its ingress qdisc
/// (the redirection with it). Nothing to do when the namespace, the
/// interface or the qdisc is already gone.
pub fn release(rec: &PodLinkRecord) -> Result<(), PodNetError> {
    if !rec.netns.exists() {
        return Ok(());
    }
    in_netns(&rec.netns, || {
        let mut n = Netlink::open().map_err(nl("open rtnetlink"))?;
        if let Some(range) = &rec.port_range {
            std::fs::write(PORT_RANGE, range).map_err(|source| PodNetError::Ports {
                netns: rec.netns.clone(),
                source,
            })?;
        }
        for name in rec.interfaces() {
            let Ok(index) = n.index(name) else {
                continue;
            };
            match n.del_ingress_qdisc(index) {
                Ok(()) => {}
                Err(e)
                    if matches!(
                        e.errno(),
                        Some(rustix::io::Errno::NOENT | rustix::io::Errno::INVAL)
                    ) => {}
                Err(e) => return Err(nl(format!("remove {name}'s ingress qdisc"))(e)),
            }
        }
        Ok(())
    })
}

/// Undoes a take-over that failed partway, from a thread in its namespace:
/// each interface's ingress qdisc removed, the port range put back (the
/// TAPs go with their descriptors).
fn give_back(n: &mut Netlink, rec: &PodLinkRecord) {
    for name in rec.interfaces() {
        if let Ok(index) = n.index(name) {
            let _ = n.del_ingress_qdisc(index);
        }
    }
    if let Some(range) = &rec.port_range {
        let _ = std::fs::write(PORT_RANGE, range);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn link(index: u32, name: &str, kind: Option<&str>) -> LinkInfo {
        LinkInfo {
            index,
            name: name.into(),
            kind: kind.map(Into::into),
            mac: Some([2, 0, 0, 0, 0, index as u8]),
            mtu: 1450,
            up: true,
            loopback: name == "lo",
        }
    }

    fn addr(index: u32, ip: &str, prefix: u8, universe: bool) -> AddrInfo {
        AddrInfo {
            index,
            ip: ip.parse().unwrap(),
            prefix,
            universe,
        }
    }

    fn route(oif: u32, dst: Option<(&str, u8)>, gw: Option<&str>, protocol: u8) -> RouteInfo {
        RouteInfo {
            oif: Some(oif),
            dst: dst.map(|(d, p)| (d.parse::<IpAddr>().unwrap(), p)),
            gateway: gw.map(|g| g.parse().unwrap()),
            protocol,
            link_scope: gw.is_none(),
            onlink: false,
        }
    }

    #[test]
    fn the_interface_with_the_default_route_is_taken_and_lo_and_taps_never() {
        let links = [
            link(1, "lo", None),
            link(2, "net1", Some("veth")),
            link(3, "eth0", Some("veth")),
            link(4, "mvm00000001", Some("tun")),
        ];
        let addrs = [
            addr(1, "127.0.0.1", 8, false),
            addr(2, "10.1.0.5", 24, true),
            addr(3, "10.244.1.7", 24, true),
            addr(3, "fe80::1", 64, false),
            addr(4, "10.9.9.9", 24, true),
        ];
        let routes = [
            route(3, None, Some("10.244.1.1"), 3),
            route(3, Some(("10.244.1.0", 24)), None, 2),
            route(3, Some(("10.96.0.0", 12)), Some("10.244.1.1"), 3),
            route(3, Some(("10.244.0.0", 16)), None, 3),
        ];
        let l = choose(&links, &addrs, &routes).unwrap();
        assert_eq!(l.name, "eth0");
        let g = guest_net(l, &addrs, &routes);
        assert_eq!(g.mac, Some([2, 0, 0, 0, 0, 3]));
        assert_eq!(g.mtu, 1450);
        assert_eq!(
            g.addresses,
            vec![GuestAddr {
                ip: "10.244.1.7".parse().unwrap(),
                prefix: 24
            }]
        );
        // The kernel's prefix route comes back with the address; the
        // on-link route goes before those through the gateway.
        assert_eq!(g.routes.len(), 3);
        assert_eq!(g.routes[0].dst, Some(("10.244.0.0".parse().unwrap(), 16)));
        assert!(g.routes[0].gateway.is_none());
        assert!(g.routes[1..].iter().all(|r| r.gateway.is_some()));
        assert_eq!(g.resolv_conf, None);
        // Without a default route, the first usable one; with only lo and
        // an interface without a global address, none.
        assert_eq!(choose(&links, &addrs, &[]).unwrap().name, "net1");
        assert!(choose(&links[..1], &addrs, &routes).is_none());
        assert!(choose(&links, &[addr(3, "fe80::1", 64, false)], &routes).is_none());
    }

    #[test]
    fn the_other_usable_interfaces_are_taken_too_without_a_default_route() {
        let links = [
            link(1, "lo", None),
            link(2, "eth0", Some("veth")),
            link(3, "net1", Some("macvlan")),
            link(4, "mvm00000001", Some("tun")),
            link(5, "net2", Some("veth")),
        ];
        let addrs = [
            addr(2, "10.244.1.7", 24, true),
            addr(3, "192.168.5.9", 24, true),
            addr(4, "10.9.9.9", 24, true),
            // No global address: not taken.
            addr(5, "fe80::5", 64, false),
        ];
        let routes = [
            route(2, None, Some("10.244.1.1"), 3),
            route(3, None, Some("192.168.5.1"), 3),
            route(3, Some(("192.168.5.0", 24)), None, 2),
            route(3, Some(("172.16.0.0", 12)), Some("192.168.5.1"), 3),
        ];
        let first = choose(&links, &addrs, &routes).unwrap();
        assert_eq!(first.name, "eth0");
        let more = others(&links, &addrs, first);
        assert_eq!(
            more.iter().map(|l| l.name.as_str()).collect::<Vec<_>>(),
            ["net1"]
        );
        let x = guest_interface(more[0], &addrs, &routes);
        assert_eq!((x.name.as_str(), x.mac), ("net1", [2, 0, 0, 0, 0, 3]));
        assert_eq!(
            x.addresses,
            vec![GuestAddr {
                ip: "192.168.5.9".parse().unwrap(),
                prefix: 24
            }]
        );
        // Its own routes, but the default route stays the first's.
        assert_eq!(x.routes.len(), 1);
        assert_eq!(x.routes[0].dst, Some(("172.16.0.0".parse().unwrap(), 12)));
    }

    #[test]
    fn tap_names_fit_and_differ() {
        let a = tap_name("pod-a");
        assert!(a.starts_with(TAP_PREFIX) && a.len() <= 15, "{a}");
        assert_ne!(a, tap_name("pod-b"));
        assert_eq!(a, tap_name("pod-a"));
    }
}
