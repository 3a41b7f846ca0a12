//! The guest's network, when the container asked for the host's
//! user-space stack or joins a namespace whose interface the guest takes
//! over (a pod's): the virtio-net device (eth0) whose other end is that
//! stack or the VMM's TAP device beside the pod's interface, moved into a network namespace of its own that the container
//! joins, so the agent's namespace (where the guest's moat runs) keeps
//! only `lo`. The steps, in order: load the driver, wait for eth0 (and
//! each more device) by its hardware address, make the namespace (kept
//! by a bind mount at [`NETNS`]), move them into it (eth0 named so),
//! bring up `lo` and eth0 with the addresses and routes the host sent,
//! mount a sysfs from inside it (at [`SYSFS`]: sysfs shows the network
//! devices of the namespace that mounts it, and the container's user
//! namespace, which does not own this one, may not mount its own), write
//! the resolv.conf naming the stack's DNS (a pod's interface keeps the
//! container's own).
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use nix::mount::{mount, MsFlags};
use nix::sched::CloneFlags;
use serde_json::{json, Value};

use super::{boot, AgentError};
use crate::proto::GuestNet;

/// The driver and what it needs, in dependency order (modules.dep of the
/// cloud kernel: virtio_net needs net_failover, which needs failover).
pub const NET_MODULES: &[&str] = &["failover", "net_failover", "virtio_net"];
/// The device's name in the guest.
pub const DEVICE: &str = "eth0";
/// The container's network namespace (an nsfs bind mount).
pub const NETNS: &str = "/run/vm/netns";
/// The resolv.conf the container gets.
pub const RESOLV_CONF: &str = "/run/vm/resolv.conf";
/// A sysfs mounted in the container's network namespace, bound at the
/// container's /sys.
pub const SYSFS: &str = "/run/vm/sys";

fn io(step: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
    let step = step.into();
    move |source| AgentError::Io { step, source }
}

fn sys(step: impl Into<String>) -> impl FnOnce(nix::Error) -> AgentError {
    let step = step.into();
    move |source| AgentError::Sys { step, source }
}

fn netlink(step: &str) -> impl FnOnce(moat_net::netlink::NetlinkError) -> AgentError + '_ {
    move |e| AgentError::Request(format!("{step}: {}", moat_core::error_chain(&e)))
}

/// Sets up the container's network namespace with eth0 as `net` says.
pub fn setup(net: &GuestNet) -> Result<(), AgentError> {
    boot::load_modules(NET_MODULES)?;
    // Every device first, each found by the hardware address the VMM gave
    // it (eth0's, and each more one's: a pod's other interfaces): their
    // names follow the order they appeared in, and a device hot-added
    // after the snapshot's restore (`VmmPlan::share_port`) that appeared
    // once eth0 had left for the container's namespace took its name.
    let mut nl = moat_net::netlink::Netlink::open().map_err(netlink("open rtnetlink"))?;
    let mut devices = vec![device_by_mac(&mut nl, crate::vmm::qemu::GUEST_MAC_BYTES)?];
    for k in 0..net.extra.len() {
        devices.push(device_by_mac(&mut nl, crate::proto::extra_device_mac(k))?);
    }
    let ns = new_netns()?;
    for index in devices {
        nl.move_link(index, ns.as_fd()).map_err(netlink(
            "move a network device to the container's namespace",
        ))?;
    }
    in_netns(&ns, || configure(net))?;
    std::fs::create_dir_all(SYSFS).map_err(io(format!("create {SYSFS}")))?;
    in_netns(&ns, || {
        let flags =
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY;
        mount(Some("sysfs"), SYSFS, Some("sysfs"), flags, None::<&str>)
            .map_err(sys(format!("mount sysfs on {SYSFS}")))
    })?;
    match &net.resolv_conf {
        Some(conf) => std::fs::write(RESOLV_CONF, conf).map_err(io(format!("write {RESOLV_CONF}"))),
        None => Ok(()),
    }
}

/// A new network namespace, kept alive by a bind mount at [`NETNS`]; made
/// on a thread so the agent's own namespace never changes.
fn new_netns() -> Result<OwnedFd, AgentError> {
    std::fs::create_dir_all("/run/vm").map_err(io("create /run/vm"))?;
    std::fs::File::create(NETNS).map_err(io(format!("create {NETNS}")))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET)
                .map_err(sys("make the container's network namespace"))?;
            mount(
                Some("/proc/thread-self/ns/net"),
                NETNS,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(sys(format!("bind the network namespace at {NETNS}")))
        })
        .join()
        .map_err(|_| AgentError::Request("the namespace thread panicked".into()))?
    })?;
    std::fs::File::open(NETNS)
        .map(OwnedFd::from)
        .map_err(io(format!("open {NETNS}")))
}

/// Runs `f` on a thread that entered `ns`.
fn in_netns(
    ns: &OwnedFd,
    f: impl FnOnce() -> Result<(), AgentError> + Send,
) -> Result<(), AgentError> {
    moat_net::in_netns(ns.as_fd(), f).map_err(|e| {
        AgentError::Request(format!(
            "the container's network namespace: {}",
            moat_core::error_chain(&e)
        ))
    })?
}

/// The index of the network device whose hardware address is `mac`
/// (waiting a little: the devices appear as the driver probes them).
fn device_by_mac(nl: &mut moat_net::netlink::Netlink, mac: [u8; 6]) -> Result<u32, AgentError> {
    let end = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let links = nl.links().map_err(netlink("list the network devices"))?;
        if let Some(l) = links.iter().find(|l| l.mac == Some(mac)) {
            return Ok(l.index);
        }
        if std::time::Instant::now() >= end {
            return Err(AgentError::Request(format!(
                "no network device with the address {} appeared",
                crate::proto::mac_text(mac)
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `lo` up; eth0's hardware address, addresses, MTU and routes, then each
/// more interface's, renamed as the pod's (the calling thread's
/// namespace).
fn configure(net: &GuestNet) -> Result<(), AgentError> {
    let mut nl = moat_net::netlink::Netlink::open().map_err(netlink("open rtnetlink"))?;
    let lo = nl.index("lo").map_err(netlink("find lo"))?;
    nl.set_up(lo, None).map_err(netlink("bring up lo"))?;
    let eth = device_by_mac(&mut nl, crate::vmm::qemu::GUEST_MAC_BYTES)?;
    // The more devices apart first (a pod's name may be one the guest's
    // kernel gave another device, eth0 among them), then eth0 named so,
    // then each its own.
    let mut devices = Vec::with_capacity(net.extra.len());
    for k in 0..net.extra.len() {
        let index = device_by_mac(&mut nl, crate::proto::extra_device_mac(k))?;
        nl.set_name(index, &format!("mvx{k}"))
            .map_err(netlink("rename a network device"))?;
        devices.push(index);
    }
    nl.set_name(eth, DEVICE)
        .map_err(netlink("name the network device eth0"))?;
    configure_link(&mut nl, eth, net.mac, &net.addresses, net.mtu, &net.routes)?;
    for (x, index) in net.extra.iter().zip(devices) {
        nl.set_name(index, &x.name)
            .map_err(netlink("name a network device as the pod's interface"))?;
        configure_link(&mut nl, index, Some(x.mac), &x.addresses, x.mtu, &x.routes)?;
    }
    Ok(())
}

/// Interface `index`'s hardware address (when given), addresses, MTU
/// (bringing it up) and routes.
fn configure_link(
    nl: &mut moat_net::netlink::Netlink,
    index: u32,
    mac: Option<[u8; 6]>,
    addresses: &[crate::proto::GuestAddr],
    mtu: u32,
    routes: &[crate::proto::GuestRoute],
) -> Result<(), AgentError> {
    if let Some(mac) = mac {
        nl.set_mac(index, mac)
            .map_err(netlink("set an interface's hardware address"))?;
    }
    for a in addresses {
        nl.add_addr(index, a.ip, a.prefix)
            .map_err(netlink("address an interface"))?;
    }
    nl.set_up(index, Some(mtu))
        .map_err(netlink("bring up an interface"))?;
    for r in routes {
        nl.add_route(index, r.dst, r.gateway, r.onlink)
            .map_err(netlink("add a route"))?;
    }
    Ok(())
}

/// The container's config with the network set up here: it joins
/// [`NETNS`] (instead of making a namespace with only `lo`), gets
/// [`RESOLV_CONF`] read-only at /etc/resolv.conf when `net` names one
/// (replacing any other mount there), and a bind of [`SYSFS`] for each
/// sysfs mount.
pub fn apply(config: &mut Value, net: &GuestNet) {
    let linux = &mut config["linux"];
    if !linux.is_object() {
        *linux = json!({});
    }
    let ns = &mut linux["namespaces"];
    if !ns.is_array() {
        *ns = json!([]);
    }
    if let Some(list) = ns.as_array_mut() {
        list.retain(|n| n["type"] != "network");
        list.push(json!({"type": "network", "path": NETNS}));
    }
    let mounts = &mut config["mounts"];
    if !mounts.is_array() {
        *mounts = json!([]);
    }
    if let Some(list) = mounts.as_array_mut() {
        let resolv = net.resolv_conf.is_some();
        if resolv {
            list.retain(|m| m["destination"] != "/etc/resolv.conf");
        }
        for m in list.iter_mut().filter(|m| m["type"] == "sysfs") {
            let mut opts: Vec<Value> = m["options"].as_array().cloned().unwrap_or_default();
            opts.retain(|o| o != "rbind");
            opts.push(json!("bind"));
            m["type"] = json!("bind");
            m["source"] = json!(SYSFS);
            m["options"] = Value::Array(opts);
        }
        if resolv {
            list.push(json!({
                "destination": "/etc/resolv.conf",
                "type": "bind",
                "source": RESOLV_CONF,
                "options": ["rbind", "ro", "nosuid", "nodev", "noexec"],
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_joins_the_namespace_and_gets_the_resolv_conf() {
        let mut c = json!({
            "linux": {"namespaces": [{"type": "pid"}, {"type": "network"}]},
            "mounts": [{"destination": "/etc/resolv.conf", "type": "bind", "source": "/run/vm/files/0"},
                       {"destination": "/proc", "type": "proc"},
                       {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["ro", "nosuid"]}]
        });
        let stack = GuestNet::of(&moat_net::NetConfig::default());
        apply(&mut c, &stack);
        let ns = c["linux"]["namespaces"].as_array().unwrap();
        assert_eq!(ns.len(), 2);
        assert!(ns.contains(&json!({"type": "network", "path": NETNS})));
        let m = c["mounts"].as_array().unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(
            m[1],
            json!({"destination": "/sys", "type": "bind", "source": SYSFS, "options": ["ro", "nosuid", "bind"]})
        );
        assert!(m
            .iter()
            .any(|m| m["destination"] == "/etc/resolv.conf" && m["source"] == RESOLV_CONF));
        let mut bare = json!({});
        apply(&mut bare, &stack);
        assert_eq!(bare["linux"]["namespaces"][0]["path"], NETNS);
    }

    #[test]
    fn a_pods_interface_keeps_the_containers_resolv_conf() {
        let pods =
            json!({"destination": "/etc/resolv.conf", "type": "bind", "source": "/run/vm/files/0"});
        let mut c = json!({"mounts": [pods.clone()]});
        let pod = GuestNet {
            resolv_conf: None,
            extra: Vec::new(),
            ..GuestNet::of(&moat_net::NetConfig::default())
        };
        apply(&mut c, &pod);
        assert_eq!(c["mounts"], json!([pods]));
        assert_eq!(c["linux"]["namespaces"][0]["path"], NETNS);
    }
}
