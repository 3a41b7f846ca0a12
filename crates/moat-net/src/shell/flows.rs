//! The shell's side of each flow: host sockets for TCP and UDP, published
//! ports, name resolution threads.
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::event::PollFlags;
use rustix::io::Errno;
use rustix::net::{AddressFamily, RecvFlags, SendFlags, Shutdown, SocketFlags, SocketType};

use super::{HostTcp, Listener, Shell, RESOLVER_STACK};
use crate::stack::{FlowId, Request};

fn family(addr: &SocketAddr) -> AddressFamily {
    match addr {
        SocketAddr::V4(_) => AddressFamily::INET,
        SocketAddr::V6(_) => AddressFamily::INET6,
    }
}

/// A non-blocking socket connecting (or connected, for UDP) to `dst`.
fn connect(dst: SocketAddr, ty: SocketType) -> Result<OwnedFd, Errno> {
    let fd = rustix::net::socket_with(
        family(&dst),
        ty,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?;
    match rustix::net::connect(&fd, &dst) {
        Ok(()) | Err(Errno::INPROGRESS) => Ok(fd),
        Err(e) => Err(e),
    }
}

impl Shell {
    pub(super) fn requests(&mut self, now: Instant) {
        while let Some(r) = self.stack.next_request() {
            match r {
                Request::TcpConnect { flow, dst } => self.tcp_connect(now, flow, dst),
                Request::TcpShutdown { flow } => {
                    if let Some(h) = self.tcp.get(&flow) {
                        let _ = rustix::net::shutdown(&h.fd, Shutdown::Write);
                    }
                }
                Request::TcpClose { flow, reset } => {
                    if let Some(h) = self.tcp.remove(&flow) {
                        if reset {
                            // Closing with a zero linger sends RST, as the
                            // workload's side was reset.
                            let _ = rustix::net::sockopt::set_socket_linger(
                                &h.fd,
                                Some(Duration::ZERO),
                            );
                        }
                    }
                }
                Request::UdpSend { flow, dst, payload } => self.udp_send(flow, dst, &payload),
                Request::UdpClose { flow } => {
                    self.udp.remove(&flow);
                    if let Some(key) = self.udp_in.remove(&flow) {
                        self.udp_peers.remove(&key);
                    }
                }
                Request::Resolve { query, name } => self.resolve(query, name),
            }
        }
        // A connect that failed at once, or a flow closed meanwhile, may have
        // queued more requests: they are served on the next round.
    }

    fn tcp_connect(&mut self, now: Instant, flow: FlowId, dst: SocketAddr) {
        match connect(dst, SocketType::STREAM) {
            Ok(fd) => {
                let _ = rustix::net::sockopt::set_tcp_nodelay(&fd, true);
                self.tcp.insert(
                    flow,
                    HostTcp {
                        fd,
                        connecting: Some(now + self.connect_timeout),
                        eof: false,
                    },
                );
            }
            Err(_) => self.stack.tcp_connect_failed(now, flow),
        }
    }

    pub(super) fn check_deadlines(&mut self, now: Instant) {
        let late: Vec<FlowId> = self
            .tcp
            .iter()
            .filter(|(_, h)| h.connecting.is_some_and(|d| d <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            self.tcp.remove(&id);
            self.stack.tcp_connect_failed(now, id);
        }
    }

    pub(super) fn tcp_ready(&mut self, now: Instant, id: FlowId, ev: PollFlags) {
        let Some(h) = self.tcp.get_mut(&id) else {
            return;
        };
        if h.connecting.is_some() {
            match rustix::net::sockopt::socket_error(&h.fd) {
                Ok(Ok(())) if !ev.contains(PollFlags::HUP) => {
                    h.connecting = None;
                    self.stack.tcp_connected(now, id);
                }
                _ => {
                    self.tcp.remove(&id);
                    self.stack.tcp_connect_failed(now, id);
                }
            }
            return;
        }
        if ev.intersects(PollFlags::OUT | PollFlags::ERR | PollFlags::HUP) {
            self.pump_to_host(now, id);
        }
        if ev.intersects(PollFlags::IN | PollFlags::ERR | PollFlags::HUP) {
            self.pump_from_host(now, id);
        }
    }

    /// Host → workload: read into the flow's send buffer while it has room.
    fn pump_from_host(&mut self, now: Instant, id: FlowId) {
        loop {
            let Some(h) = self.tcp.get(&id) else { return };
            if h.eof || self.stack.tcp_send_capacity(id) == 0 {
                return;
            }
            let fd = &h.fd;
            let r = self
                .stack
                .tcp_send_with(id, |buf| match rustix::io::read(fd, buf) {
                    Ok(n) => (n, Ok(n)),
                    Err(e) => (0, Err(e)),
                });
            match r {
                Some(Ok(0)) => {
                    self.stack.tcp_host_eof(id);
                    if let Some(h) = self.tcp.get_mut(&id) {
                        h.eof = true;
                    }
                    return;
                }
                Some(Ok(_)) => {}
                Some(Err(Errno::AGAIN)) | Some(Err(Errno::INTR)) | None => return,
                Some(Err(_)) => {
                    self.tcp.remove(&id);
                    self.stack.tcp_abort(now, id);
                    return;
                }
            }
        }
    }

    /// Workload → host: write what the workload sent while the socket takes it.
    fn pump_to_host(&mut self, now: Instant, id: FlowId) {
        loop {
            let Some(h) = self.tcp.get(&id) else { return };
            if self.stack.tcp_recv_queue(id) == 0 {
                return;
            }
            let fd = &h.fd;
            let r = self.stack.tcp_recv_with(id, |buf| {
                match rustix::net::send(fd, buf, SendFlags::NOSIGNAL) {
                    Ok(n) => (n, Ok(n)),
                    Err(e) => (0, Err(e)),
                }
            });
            match r {
                Some(Ok(n)) if n > 0 => {}
                Some(Err(Errno::AGAIN)) | Some(Err(Errno::INTR)) | Some(Ok(_)) | None => return,
                Some(Err(_)) => {
                    self.tcp.remove(&id);
                    self.stack.tcp_abort(now, id);
                    return;
                }
            }
        }
    }

    fn udp_send(&mut self, flow: FlowId, dst: SocketAddr, payload: &[u8]) {
        if let Some(&(i, peer)) = self.udp_in.get(&flow) {
            // The workload's answer on a published port: from the port the
            // peer wrote to, back to the peer.
            if let Some((Listener::Udp(l), _)) = self.listeners.get(i) {
                let _ = l.send_to(payload, peer);
            }
            return;
        }
        let fd = match self.udp.entry(flow) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => match connect(dst, SocketType::DGRAM) {
                Ok(fd) => e.insert(fd),
                Err(_) => return,
            },
        };
        // A datagram the host cannot send now is lost, as UDP allows.
        let _ = rustix::net::send(&*fd, payload, SendFlags::NOSIGNAL);
    }

    pub(super) fn udp_ready(&mut self, now: Instant, id: FlowId) {
        for _ in 0..64 {
            let Some(fd) = self.udp.get(&id) else { return };
            match rustix::net::recv(fd, &mut self.frame, RecvFlags::empty()) {
                Ok((n, _)) => {
                    let n = n.min(self.frame.len());
                    let payload = self.frame[..n].to_vec();
                    self.stack.udp_received(now, id, &payload);
                }
                // ICMP errors from the host's network end up here; the
                // workload's flow simply hears nothing.
                Err(_) => return,
            }
        }
    }

    /// A published port is readable: a connection to accept (TCP) or
    /// datagrams to pass on (UDP).
    pub(super) fn listener_ready(&mut self, now: Instant, i: usize) {
        match self.listeners.get(i) {
            Some((Listener::Tcp(_), _)) => self.accept(now, i),
            Some((Listener::Udp(_), _)) => self.udp_inbound(now, i),
            None => {}
        }
    }

    /// Datagrams from host peers to a published UDP port: each peer gets a
    /// flow of its own (its answers go back to that peer).
    fn udp_inbound(&mut self, now: Instant, i: usize) {
        for _ in 0..64 {
            let Some((Listener::Udp(l), p)) = self.listeners.get(i) else {
                return;
            };
            let (port, v6) = (p.port, p.host.is_ipv6());
            let (n, peer) = match l.recv_from(&mut self.frame) {
                Ok(r) => r,
                Err(_) => return,
            };
            let id = match self.udp_peers.get(&(i, peer)) {
                Some(&id) => id,
                None => match self.stack.udp_open_inbound(now, port, v6) {
                    Some(id) => {
                        self.udp_peers.insert((i, peer), id);
                        self.udp_in.insert(id, (i, peer));
                        id
                    }
                    // At the flow limit, or the workload not heard from
                    // yet: the datagram is lost, as UDP allows.
                    None => continue,
                },
            };
            let payload = self.frame[..n.min(self.frame.len())].to_vec();
            self.stack.udp_received(now, id, &payload);
        }
    }

    fn accept(&mut self, now: Instant, i: usize) {
        for _ in 0..64 {
            let Some((Listener::Tcp(l), p)) = self.listeners.get(i) else {
                return;
            };
            let port = p.port;
            let v6 = p.host.is_ipv6();
            let stream = match l.accept() {
                Ok((s, _)) => s,
                Err(_) => return,
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let _ = stream.set_nodelay(true);
            // An inbound flow reaches the workload over IPv4 unless the
            // host side listens on IPv6.
            match self.stack.tcp_open_inbound(port, v6) {
                Some(id) => {
                    self.tcp.insert(
                        id,
                        HostTcp {
                            fd: OwnedFd::from(stream),
                            connecting: None,
                            eof: false,
                        },
                    );
                }
                None => {
                    tracing::warn!(
                        port,
                        "published port: flow limit reached, connection dropped"
                    );
                }
            }
        }
        let _ = now;
    }

    fn resolve(&mut self, query: u64, name: String) {
        self.resolving.retain(|t| !t.is_finished());
        let resolver = Arc::clone(&self.resolver);
        let tx = self.results_tx.clone();
        let wake = Arc::clone(&self.wake_w);
        let spawned = std::thread::Builder::new()
            .name("moat-net-dns".into())
            // getaddrinfo needs far less; at most `max_dns_pending` of
            // these run at once, inside the stack's memory limit.
            .stack_size(RESOLVER_STACK)
            .spawn(move || {
                let r = resolver.resolve(&name);
                let _ = tx.send((query, r));
                let _ = rustix::io::write(&*wake, &[1]);
            });
        match spawned {
            Ok(t) => self.resolving.push(t),
            Err(_) => {
                let now = Instant::now();
                self.stack
                    .resolved(now, query, Err(crate::stack::ResolveError::Failed));
            }
        }
    }

    pub(super) fn resolved(&mut self, now: Instant) {
        let mut drain = [0u8; 64];
        while matches!(rustix::io::read(&self.wake_r, &mut drain), Ok(n) if n > 0) {}
        while let Ok((query, result)) = self.results.try_recv() {
            self.stack.resolved(now, query, result);
        }
    }
}
