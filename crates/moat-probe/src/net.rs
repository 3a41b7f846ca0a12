//! Network: interfaces, socket families attackers use, network
//! administration, container runtime sockets and host abstract sockets.
use std::os::unix::net::UnixStream;

use nix::sys::socket::{self, AddressFamily, SockFlag, SockProtocol, SockType};

use super::{check, judge_errno, nix_errno, Check, Outcome};

const NET: &str = "no unneeded network: a fresh network namespace with loopback only unless asked (PRODUCT; CIS 5.10)";
const SOCK: &str = "least privilege: no raw/packet sockets, no AF_ALG/AF_VSOCK (Docker seccomp; CAP_NET_RAW dropped)";
const RUNTIME_SOCK: &str =
    "container runtime socket never reachable (CIS 5.32; kubesec DockerSock; Trivy KSV-0006)";

/// Interface names, from /sys/class/net or /proc/net/dev.
pub fn interfaces() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/sys/class/net")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if v.is_empty() {
        v = parse_proc_net_dev(&std::fs::read_to_string("/proc/net/dev").unwrap_or_default());
    }
    v.sort();
    v
}

pub fn parse_proc_net_dev(text: &str) -> Vec<String> {
    text.lines()
        .skip(2)
        .filter_map(|l| l.split_once(':'))
        .map(|(n, _)| n.trim().to_string())
        .collect()
}

fn try_socket(
    id: &'static str,
    fam: AddressFamily,
    ty: SockType,
    proto: Option<SockProtocol>,
    what: &str,
) -> Check {
    let e = nix_errno(socket::socket(fam, ty, SockFlag::SOCK_CLOEXEC, proto));
    let (r, d) = match e {
        libc::EAFNOSUPPORT | libc::EPROTONOSUPPORT | libc::ESOCKTNOSUPPORT => (
            Outcome::Blocked,
            format!("not supported here ({})", super::errno_name(e)),
        ),
        e => judge_errno(e, &[]),
    };
    check(id, r, format!("{what}: {d}"), SOCK)
}

pub fn checks() -> Vec<Check> {
    let mut out = Vec::new();
    let ifs = interfaces();
    out.push(if ifs.iter().all(|i| i == "lo") {
        check(
            "net.interfaces",
            Outcome::Blocked,
            format!("loopback only ({})", ifs.join(",")),
            NET,
        )
    } else {
        check(
            "net.interfaces",
            Outcome::Allowed,
            format!("interfaces: {}", ifs.join(",")),
            NET,
        )
    });
    out.push(try_socket(
        "net.raw-socket",
        AddressFamily::Inet,
        SockType::Raw,
        Some(SockProtocol::Icmp),
        "AF_INET SOCK_RAW",
    ));
    out.push(try_socket(
        "net.packet-socket",
        AddressFamily::Packet,
        SockType::Raw,
        None,
        "AF_PACKET",
    ));
    out.push(try_socket(
        "net.af-alg",
        AddressFamily::Alg,
        SockType::SeqPacket,
        None,
        "AF_ALG",
    ));
    out.push(try_socket(
        "net.af-vsock",
        AddressFamily::Vsock,
        SockType::Stream,
        None,
        "AF_VSOCK",
    ));
    out.push(so_mark());
    out.push(runtime_sockets());
    out.push(abstract_sockets());
    out
}

/// SO_MARK on a socket of our own needs CAP_NET_ADMIN (or CAP_NET_RAW on
/// newer kernels) in the network namespace's user namespace; setting it on a
/// throwaway socket changes nothing else.
fn so_mark() -> Check {
    const P: &str = "no CAP_NET_ADMIN: the network cannot be reconfigured (Trivy KSV-0022)";
    let fd = match socket::socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    ) {
        Ok(fd) => fd,
        Err(e) => {
            return check(
                "net.admin",
                Outcome::NotApplicable,
                format!("no UDP socket: {e}"),
                P,
            )
        }
    };
    let (r, d) = judge_errno(
        nix_errno(socket::setsockopt(&fd, socket::sockopt::Mark, &0)),
        &[],
    );
    check(
        "net.admin",
        r,
        format!("SO_MARK on a throwaway socket: {d}"),
        P,
    )
}

const RUNTIME_SOCKETS: [&str; 8] = [
    "/var/run/docker.sock",
    "/run/docker.sock",
    "/run/containerd/containerd.sock",
    "/var/run/crio/crio.sock",
    "/run/podman/podman.sock",
    "/var/run/cri-dockerd.sock",
    "/run/buildkit/buildkitd.sock",
    "/var/run/dockershim.sock",
];

/// Connects (and disconnects, sending nothing) to each runtime socket present.
fn runtime_sockets() -> Check {
    let mut present = Vec::new();
    for p in RUNTIME_SOCKETS {
        if std::path::Path::new(p).exists() {
            if UnixStream::connect(p).is_ok() {
                return check(
                    "escape.runtime-socket",
                    Outcome::Allowed,
                    format!("{p} accepts connections"),
                    RUNTIME_SOCK,
                );
            }
            present.push(p);
        }
    }
    if present.is_empty() {
        check(
            "escape.runtime-socket",
            Outcome::Blocked,
            "no container runtime socket present",
            RUNTIME_SOCK,
        )
    } else {
        check(
            "escape.runtime-socket",
            Outcome::Blocked,
            format!("present but refusing: {}", present.join(", ")),
            RUNTIME_SOCK,
        )
    }
}

/// Abstract UNIX sockets are scoped by network namespace: any visible ones
/// belong to processes sharing this namespace (CVE-2020-15257, the
/// containerd-shim API).
fn abstract_sockets() -> Check {
    const P: &str =
        "host abstract UNIX sockets not reachable (CVE-2020-15257; separate network namespace)";
    let text = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
    let names = parse_abstract(&text);
    if names.is_empty() {
        check(
            "net.abstract-unix",
            Outcome::Blocked,
            "no abstract UNIX sockets visible",
            P,
        )
    } else {
        let shown: Vec<&str> = names.iter().take(5).map(String::as_str).collect();
        check(
            "net.abstract-unix",
            Outcome::Allowed,
            format!(
                "{} abstract sockets visible: {}",
                names.len(),
                shown.join(" ")
            ),
            P,
        )
    }
}

pub fn parse_abstract(text: &str) -> Vec<String> {
    let mut v: Vec<String> = text
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(7))
        .filter(|p| p.starts_with('@'))
        .map(str::to_string)
        .collect();
    v.sort();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_net_dev_and_unix() {
        let dev = "Inter-|   Receive\n face |bytes\n    lo: 0 0\n  eth0: 1 2\n";
        assert_eq!(parse_proc_net_dev(dev), vec!["lo", "eth0"]);
        let unix = "Num       RefCount Protocol Flags    Type St Inode Path\n\
                    0000: 00000002 00000000 00010000 0001 01 1234 @/containerd-shim/abc.sock\n\
                    0000: 00000002 00000000 00010000 0001 01 1235 /run/x.sock\n\
                    0000: 00000002 00000000 00010000 0001 01 1236\n";
        assert_eq!(parse_abstract(unix), vec!["@/containerd-shim/abc.sock"]);
    }
}
