//! Network namespace setup: a new network namespace starts with `lo` down,
//! so even 127.0.0.1 is unreachable; the init brings it up with one
//! rtnetlink RTM_NEWLINK request (no ioctl, no unsafe).
use nix::sys::socket::{
    recv, sendto, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
};

/// The kernel gives the loopback device index 1 in every network namespace.
pub const LOOPBACK_IFINDEX: i32 = 1;

const RTM_NEWLINK: u16 = 16;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;
const IFF_UP: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot open an rtnetlink socket")]
    Socket(#[source] nix::Error),
    #[error("cannot send the request to bring lo up")]
    Send(#[source] nix::Error),
    #[error("cannot read the reply to bring lo up")]
    Recv(#[source] nix::Error),
    #[error("bringing lo up: malformed netlink reply")]
    Reply,
    #[error("bringing lo up")]
    Kernel(#[source] nix::Error),
}

/// The RTM_NEWLINK message that sets IFF_UP on interface `index`.
pub fn link_up_request(index: i32, seq: u32) -> [u8; 32] {
    let mut m = [0u8; 32];
    m[0..4].copy_from_slice(&32u32.to_ne_bytes()); // nlmsg_len
    m[4..6].copy_from_slice(&RTM_NEWLINK.to_ne_bytes());
    m[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    m[8..12].copy_from_slice(&seq.to_ne_bytes());
    // nlmsg_pid 0; ifinfomsg: family AF_UNSPEC, pad, type 0.
    m[20..24].copy_from_slice(&index.to_ne_bytes());
    m[24..28].copy_from_slice(&IFF_UP.to_ne_bytes()); // ifi_flags
    m[28..32].copy_from_slice(&IFF_UP.to_ne_bytes()); // ifi_change
    m
}

/// The errno of an NLMSG_ERROR acknowledgement (0 for success).
pub fn parse_ack(reply: &[u8]) -> Option<i32> {
    if reply.len() < 20 {
        return None;
    }
    let ty = u16::from_ne_bytes([reply[4], reply[5]]);
    if ty != NLMSG_ERROR {
        return None;
    }
    let err = i32::from_ne_bytes([reply[16], reply[17], reply[18], reply[19]]);
    Some(-err)
}

/// Brings `lo` up in the current network namespace.
pub fn bring_up_loopback() -> Result<(), NetError> {
    let sock = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )
    .map_err(NetError::Socket)?;
    use std::os::fd::AsRawFd;
    let req = link_up_request(LOOPBACK_IFINDEX, 1);
    let kernel = NetlinkAddr::new(0, 0);
    sendto(sock.as_raw_fd(), &req, &kernel, MsgFlags::empty()).map_err(NetError::Send)?;
    let mut buf = [0u8; 512];
    let n = recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty()).map_err(NetError::Recv)?;
    match parse_ack(&buf[..n]) {
        Some(0) => Ok(()),
        Some(e) => Err(NetError::Kernel(nix::Error::from_raw(e))),
        None => Err(NetError::Reply),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layout() {
        let m = link_up_request(1, 7);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 32);
        assert_eq!(u16::from_ne_bytes(m[4..6].try_into().unwrap()), 16);
        assert_eq!(i32::from_ne_bytes(m[20..24].try_into().unwrap()), 1);
        assert_eq!(u32::from_ne_bytes(m[24..28].try_into().unwrap()), 1);
    }

    #[test]
    fn acks() {
        let mut r = [0u8; 36];
        r[4..6].copy_from_slice(&2u16.to_ne_bytes());
        assert_eq!(parse_ack(&r), Some(0));
        r[16..20].copy_from_slice(&(-1i32).to_ne_bytes());
        assert_eq!(parse_ack(&r), Some(1));
        assert_eq!(parse_ack(&r[..10]), None);
    }

    #[test]
    fn lo_comes_up_in_a_new_netns() {
        if moat_core::testing::needs_root("lo_comes_up_in_a_new_netns") {
            return;
        }
        let code = moat_sys::process::run_in_child(libc::CLONE_NEWNET, || {
            // With lo down, 127.0.0.1 is unreachable.
            let send = || {
                std::net::UdpSocket::bind("0.0.0.0:0")
                    .and_then(|s| s.send_to(b"x", "127.0.0.1:9"))
                    .is_ok()
            };
            if send() {
                return 2;
            }
            if let Err(e) = bring_up_loopback() {
                eprintln!("{}", moat_core::error_chain(&e));
                return 1;
            }
            if send() {
                0
            } else {
                3
            }
        });
        assert_eq!(code.unwrap(), 0);
    }
}
