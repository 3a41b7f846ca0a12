//! `serve_link` over a stream socket, as the microvm tier runs it (QEMU's
//! `-netdev stream` at the other end): frames in and out with their
//! 4-byte big-endian length, an oversized length skipped without ending
//! the link, and the peer's close ending `serve`. No root needed.
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use moat_net::{Ended, Link, Policy, ServeConfig, SystemResolver};

const WORKLOAD_MAC: [u8; 6] = [0x02, 0x6d, 0x6f, 0x61, 0x74, 0x64];

/// An ARP request from the workload (10.0.2.100) for the gateway (10.0.2.2).
fn arp_request() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&WORKLOAD_MAC);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&WORKLOAD_MAC);
    f.extend_from_slice(&[10, 0, 2, 100]);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&[10, 0, 2, 2]);
    f
}

fn framed(frame: &[u8]) -> Vec<u8> {
    let mut v = (frame.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(frame);
    v
}

/// Reads one length-prefixed frame.
fn read_frame(s: &mut UnixStream) -> Vec<u8> {
    let mut head = [0u8; 4];
    s.read_exact(&mut head).expect("a frame's length");
    let mut f = vec![0u8; u32::from_be_bytes(head) as usize];
    s.read_exact(&mut f).expect("the frame");
    f
}

/// The gateway's ARP reply to the workload, with the gateway's address.
fn assert_arp_reply(f: &[u8]) {
    assert!(f.len() >= 42, "{f:?}");
    assert_eq!(&f[0..6], &WORKLOAD_MAC, "to the workload");
    assert_eq!(&f[12..14], &[0x08, 0x06], "ARP");
    assert_eq!(&f[20..22], &[0, 2], "a reply");
    assert_eq!(&f[28..32], &[10, 0, 2, 2], "from the gateway");
}

#[test]
fn frames_cross_a_stream_link_and_a_bad_length_does_not_end_it() {
    let (mut ours, theirs) = UnixStream::pair().unwrap();
    ours.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let (control, _stop) = moat_net::control().unwrap();
    let mut cfg = ServeConfig::new(Policy::deny_all());
    cfg.host_addrs = Some(Vec::new());
    let serving = std::thread::spawn(move || {
        moat_net::serve_link(
            Link::Stream(OwnedFd::from(theirs)),
            cfg,
            Arc::new(SystemResolver),
            control,
        )
    });
    // One frame written a byte at a time: reassembled.
    for b in framed(&arp_request()) {
        ours.write_all(&[b]).unwrap();
    }
    assert_arp_reply(&read_frame(&mut ours));
    // A length far past the MTU, its bytes, an empty frame, then a good
    // frame: skipped, dropped, answered.
    let mut junk = (1u32 << 20).to_be_bytes().to_vec();
    junk.extend(std::iter::repeat_n(0xa5u8, 1 << 20));
    junk.extend_from_slice(&0u32.to_be_bytes());
    junk.extend_from_slice(&framed(&arp_request()));
    ours.write_all(&junk).unwrap();
    assert_arp_reply(&read_frame(&mut ours));
    // The peer closes: serve returns, as for a removed TAP.
    drop(ours);
    let ended = serving.join().unwrap().unwrap();
    assert_eq!(ended, Ended::TapGone);
}
