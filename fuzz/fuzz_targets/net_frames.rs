//! Arbitrary Ethernet frames from a hostile workload into moat-net's core,
//! with the shell's answers faked: must never panic, and queues stay
//! bounded. The input is split into frames at 0xffff 0xffff markers; the
//! same bytes also go through the DNS and egress-rule parsers.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use moat_net::{Egress, Limits, NetConfig, Policy, Request, Stack};

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let policy = Policy::parse("0.0.0.0/0,::/0,*.test").expect("fixed policy");
    let egress = Egress::new(policy, [], 64);
    let limits = Limits {
        max_tcp_flows: 8,
        tcp_buffer: 4096,
        ..Limits::default()
    };
    let Ok(mut stack) = Stack::new(NetConfig::default(), egress, limits, now, 1) else {
        return;
    };
    let mut t = now;
    for frame in data.split(|&b| b == 0xff).filter(|f| !f.is_empty()) {
        stack.receive_frame(t, frame);
        stack.poll(t);
        while let Some(r) = stack.next_request() {
            match r {
                Request::TcpConnect { flow, .. } => {
                    if frame.len() % 2 == 0 {
                        stack.tcp_connected(t, flow)
                    } else {
                        stack.tcp_connect_failed(t, flow)
                    }
                }
                Request::Resolve { query, .. } => stack.resolved(
                    t,
                    query,
                    Ok(vec!["192.0.2.1".parse().expect("fixed address")]),
                ),
                Request::UdpSend { flow, payload, .. } => stack.udp_received(t, flow, &payload),
                _ => {}
            }
        }
        while let Some(f) = stack.pop_frame() {
            stack.recycle(f);
        }
        t += Duration::from_millis(100);
    }
    let _ = moat_net::dns::parse_query(data);
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = Policy::parse(s);
        let _ = s.parse::<moat_net::Publish>();
    }
});
