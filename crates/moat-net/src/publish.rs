//! Published ports: `-p [HOSTADDR:]HOSTPORT:PORT[/udp]`. The host address
//! defaults to 127.0.0.1 (publishing on every interface must be asked for,
//! as `-p 0.0.0.0:8080:80`).
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

/// One published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Publish {
    /// Where the host listens.
    pub host: SocketAddr,
    /// The workload's port it forwards to.
    pub port: u16,
    pub proto: Proto,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error("published port {spec:?}: expected [HOSTADDR:]HOSTPORT:PORT[/udp]")]
    Form { spec: String },
    #[error("published port {spec:?}: {port:?} is not a port from 1 to 65535")]
    Port { spec: String, port: String },
    #[error("published port {spec:?}: {addr:?} is not an IP address (write IPv6 as [ADDR])")]
    Address { spec: String, addr: String },
    #[error("published port {spec:?}: protocol {proto:?} is not tcp or udp")]
    Proto { spec: String, proto: String },
}

impl FromStr for Publish {
    type Err = PublishError;

    fn from_str(spec: &str) -> Result<Publish, PublishError> {
        let form = || PublishError::Form { spec: spec.into() };
        let (ports, proto) = match spec.rsplit_once('/') {
            Some((p, "udp")) => (p, Proto::Udp),
            Some((p, "tcp")) => (p, Proto::Tcp),
            Some((_, other)) => {
                return Err(PublishError::Proto {
                    spec: spec.into(),
                    proto: other.into(),
                })
            }
            None => (spec, Proto::Tcp),
        };
        let (front, port) = ports.rsplit_once(':').ok_or_else(form)?;
        let (addr, host_port) = match front.rsplit_once(':') {
            Some((addr, hp)) => (Some(addr), hp),
            None => (None, front),
        };
        let ip = match addr {
            None => IpAddr::V4(Ipv4Addr::LOCALHOST),
            Some(a) => {
                let bare = a
                    .strip_prefix('[')
                    .and_then(|a| a.strip_suffix(']'))
                    .unwrap_or(a);
                if bare.contains(':') && bare.len() == a.len() {
                    return Err(PublishError::Address {
                        spec: spec.into(),
                        addr: a.into(),
                    });
                }
                bare.parse().map_err(|_| PublishError::Address {
                    spec: spec.into(),
                    addr: a.into(),
                })?
            }
        };
        let port_of = |p: &str| match p.parse::<u16>() {
            Ok(n) if n != 0 && p.bytes().all(|b| b.is_ascii_digit()) => Ok(n),
            _ => Err(PublishError::Port {
                spec: spec.into(),
                port: p.into(),
            }),
        };
        Ok(Publish {
            host: SocketAddr::new(ip, port_of(host_port)?),
            port: port_of(port)?,
            proto,
        })
    }
}

impl fmt::Display for Publish {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)?;
        if self.proto == Proto::Udp {
            f.write_str("/udp")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Publish {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn forms() {
        assert_eq!(p("8080:80").host, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(p("8080:80").port, 80);
        assert_eq!(p("0.0.0.0:53:53/udp").proto, Proto::Udp);
        assert_eq!(p("[::1]:8443:443").host, "[::1]:8443".parse().unwrap());
        assert_eq!(p("1.2.3.4:1:2/tcp").to_string(), "1.2.3.4:1:2");
        assert_eq!(p("53:53/udp").to_string(), "127.0.0.1:53:53/udp");
    }

    #[test]
    fn errors() {
        let e = |s: &str| s.parse::<Publish>().unwrap_err().to_string();
        assert!(e("80").contains("expected"));
        assert!(e("0:80").contains("\"0\" is not a port"));
        assert!(e("8080:http").contains("\"http\""));
        assert!(e("8080:70000").contains("\"70000\""));
        assert!(e("x:8080:80").contains("\"x\" is not an IP"));
        assert!(e("::1:8080:80").contains("is not an IP"));
        assert!(e("8080:80/sctp").contains("\"sctp\""));
        assert!(e("").contains("expected"));
    }
}
