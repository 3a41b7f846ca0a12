//! The workload's end of the link: a TAP device created inside the
//! workload's network namespace, given the workload's addresses and
//! default routes via the gateway, and handed back as an fd for the stack
//! (which runs outside that namespace).
use std::net::IpAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{Mode, OFlags};
use rustix::thread::LinkNameSpaceType;

use crate::config::NetConfig;
use crate::netlink::{Netlink, NetlinkError};

/// One failed step of making the TAP device.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("cannot enter the workload's network namespace")]
    EnterNetns(#[source] rustix::io::Errno),
    #[error("cannot open /dev/net/tun")]
    OpenTun(#[source] rustix::io::Errno),
    #[error("cannot create TAP device {name:?}")]
    Create {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("configuring TAP device {name:?}")]
    Configure {
        name: String,
        #[source]
        source: NetlinkError,
    },
    #[error("cannot start the thread that enters the network namespace")]
    Thread(#[source] std::io::Error),
    #[error("the thread that creates the TAP device panicked")]
    ThreadPanicked,
}

/// The TAP device's fd (non-blocking, close-on-exec) and its name.
#[derive(Debug)]
pub struct Tap {
    pub fd: OwnedFd,
    pub name: String,
}

/// Creates TAP device `name` in the network namespace `netns` (an fd of
/// `/proc/PID/ns/net`), with `cfg`'s workload addresses, MTU and default
/// routes via the gateway, and brings it up. Runs on a short-lived thread
/// that enters the namespace, so the caller's namespace never changes.
/// The device lives as long as the returned fd.
pub fn create_tap(netns: BorrowedFd<'_>, name: &str, cfg: &NetConfig) -> Result<Tap, TapError> {
    in_netns(netns, || create_here(name, cfg)).map_err(|e| match e {
        InNetnsError::Enter(e) => TapError::EnterNetns(e),
        InNetnsError::Thread(e) => TapError::Thread(e),
        InNetnsError::Panicked => TapError::ThreadPanicked,
    })?
}

/// Why [`in_netns`] could not run its closure.
#[derive(Debug, thiserror::Error)]
pub enum InNetnsError {
    #[error("cannot enter the network namespace")]
    Enter(#[source] rustix::io::Errno),
    #[error("cannot start the thread that enters the network namespace")]
    Thread(#[source] std::io::Error),
    #[error("the thread that enters the network namespace panicked")]
    Panicked,
}

/// Whether `path` names the calling thread's own network namespace (for
/// a runtime: the host's).
pub fn is_own_netns(path: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (
        std::fs::metadata(path),
        std::fs::metadata("/proc/thread-self/ns/net"),
    ) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Runs `f` on a short-lived thread that entered the network namespace
/// `netns` (an fd of it), so the caller's namespace never changes.
pub fn in_netns<T: Send>(
    netns: BorrowedFd<'_>,
    f: impl FnOnce() -> T + Send,
) -> Result<T, InNetnsError> {
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("moat-netns".into())
            .spawn_scoped(s, || {
                rustix::thread::move_into_link_name_space(netns, Some(LinkNameSpaceType::Network))
                    .map_err(InNetnsError::Enter)?;
                Ok(f())
            })
            .map_err(InNetnsError::Thread)?
            .join()
            .map_err(|_| InNetnsError::Panicked)?
    })
}

/// Opens /dev/net/tun (non-blocking, close-on-exec), for
/// [`create_tap_on`]: a container's init opens it before it joins the
/// container's cgroup, whose device rules would refuse the open.
pub fn open_tun() -> Result<OwnedFd, TapError> {
    rustix::fs::open(
        "/dev/net/tun",
        OFlags::RDWR | OFlags::CLOEXEC | OFlags::NONBLOCK,
        Mode::empty(),
    )
    .map_err(TapError::OpenTun)
}

/// Makes `tun` (from [`open_tun`]) the device `name` in the calling
/// thread's own network namespace (a process already inside the
/// workload's namespaces, with CAP_NET_ADMIN there: a container's init
/// before it drops it), configured by `cfg`. Starts no thread.
pub fn create_tap_on(tun: OwnedFd, name: &str, cfg: &NetConfig) -> Result<Tap, TapError> {
    attach(tun, name, cfg)
}

/// The steps, in the calling thread's network namespace.
fn create_here(name: &str, cfg: &NetConfig) -> Result<Tap, TapError> {
    attach(open_tun()?, name, cfg)
}

fn attach(fd: OwnedFd, name: &str, cfg: &NetConfig) -> Result<Tap, TapError> {
    let flags = (libc::IFF_TAP | libc::IFF_NO_PI) as i16;
    let name =
        moat_sys::tun::tun_set_iff(fd.as_fd(), name, flags).map_err(|source| TapError::Create {
            name: name.into(),
            source,
        })?;
    configure(&name, cfg).map_err(|source| TapError::Configure {
        name: name.clone(),
        source,
    })?;
    Ok(Tap { fd, name })
}

fn configure(name: &str, cfg: &NetConfig) -> Result<(), NetlinkError> {
    let mut nl = Netlink::open()?;
    let index = nl.index(name)?;
    nl.add_addr(index, IpAddr::V4(cfg.workload_v4), cfg.prefix_v4)?;
    nl.add_addr(index, IpAddr::V6(cfg.workload_v6), cfg.prefix_v6)?;
    nl.set_up(index, u32::try_from(cfg.mtu).ok())?;
    nl.add_default_route(index, IpAddr::V4(cfg.gateway_v4))?;
    nl.add_default_route(index, IpAddr::V6(cfg.gateway_v6))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_callers_own_namespace_is_recognised() {
        assert!(is_own_netns(std::path::Path::new("/proc/self/ns/net")));
        assert!(!is_own_netns(std::path::Path::new("/proc/self/ns/mnt")));
        assert!(!is_own_netns(std::path::Path::new("/nonexistent")));
    }
}
