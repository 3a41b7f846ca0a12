//! virtio-net: the guest's `eth0`, its frames carried over a connected host
//! stream socket, each after a 4-byte big-endian length — what QEMU's
//! `-netdev stream` speaks and moat's user-space stack (`moat-net`)
//! serves, so the same stack process sits behind either backend. One queue
//! pair, no control queue, no offloads: the device offers
//! `VIRTIO_NET_F_MAC` and `VIRTIO_NET_F_MTU` and nothing else, so every
//! frame is whole and every header zero.
//!
//! Frames from the host wait in a bounded queue ([`RX_FRAMES`]) until the
//! guest posts receive buffers; a frame longer than the buffer the guest
//! posted is dropped (counted), as a NIC drops what it cannot place. What
//! the guest transmits is written to the socket at once (the guest waits
//! on a slow host, as with the console).

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex};

use virtio_queue::{Queue, QueueT};

use super::chain::{self, Chain};
use super::{read_config_bytes, DeviceError, VirtioDevice, QUEUE_SIZE, VIRTIO_F_VERSION_1};
use crate::memory::GuestMem;

/// virtio device id of a network card.
pub const DEVICE_ID_NET: u32 = 1;
/// The device reports the MTU the host's stack uses.
pub const VIRTIO_NET_F_MTU: u64 = 1 << 3;
/// The device has a fixed MAC address (its config space).
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// `struct virtio_net_hdr_v1` before every frame (VERSION_1): flags,
/// gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers.
pub const NET_HDR: usize = 12;
/// The largest frame either way (the most a 16-bit MTU allows).
pub const MAX_FRAME: usize = 65535;
/// Frames from the host kept for the guest before the host is made to wait.
pub const RX_FRAMES: usize = 256;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;

/// Host-to-guest frames waiting for receive buffers, shared with the I/O
/// thread.
#[derive(Debug, Default)]
pub struct FrameQueue {
    state: Mutex<FrameState>,
    space: Condvar,
}

#[derive(Debug, Default)]
struct FrameState {
    frames: VecDeque<Vec<u8>>,
    closed: bool,
}

impl FrameQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, FrameState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a frame (the I/O thread waits for room before it reads, so
    /// the queue holds at most [`RX_FRAMES`] and what one read completed).
    pub fn push(&self, frame: &[u8]) {
        self.lock().frames.push_back(frame.to_vec());
    }

    /// Blocks until there is room (true) or the queue is closed (false).
    pub fn wait_for_space(&self) -> bool {
        let mut s = self.lock();
        loop {
            if s.closed {
                return false;
            }
            if s.frames.len() < RX_FRAMES {
                return true;
            }
            s = self.space.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Wakes and stops the I/O thread.
    pub fn close(&self) {
        self.lock().closed = true;
        self.space.notify_all();
    }

    /// Frames waiting.
    pub fn len(&self) -> usize {
        self.lock().frames.len()
    }

    /// Whether no frame waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn pop(&self) -> Option<Vec<u8>> {
        let f = self.lock().frames.pop_front();
        self.space.notify_all();
        f
    }

    fn unpop(&self, frame: Vec<u8>) {
        self.lock().frames.push_front(frame);
    }
}

/// The network device.
#[derive(Debug)]
pub struct Net {
    tx: Option<UnixStream>,
    rx: Arc<FrameQueue>,
    mac: [u8; 6],
    mtu: u16,
    /// Requests refused as malformed (for tests and metrics).
    pub refused: u64,
    /// Frames from the host dropped: the guest's buffer was too small.
    pub dropped: u64,
}

impl Net {
    /// A device with address `mac` and MTU `mtu` whose frames go to
    /// `socket`; returns the device, its receive queue and a clone of the
    /// socket for the I/O thread that fills it ([`pump`]).
    pub fn new(
        socket: UnixStream,
        mac: [u8; 6],
        mtu: u16,
    ) -> Result<(Self, Arc<FrameQueue>, UnixStream), DeviceError> {
        let reader = socket.try_clone().map_err(DeviceError::CloneSocket)?;
        let (mut net, rx) = Net::detached(mac, mtu);
        net.tx = Some(socket);
        Ok((net, rx, reader))
    }

    /// A device with no host side (for tests): transmitted frames are dropped.
    pub fn detached(mac: [u8; 6], mtu: u16) -> (Self, Arc<FrameQueue>) {
        let rx = Arc::new(FrameQueue::default());
        (
            Net {
                tx: None,
                rx: rx.clone(),
                mac,
                mtu,
                refused: 0,
                dropped: 0,
            },
            rx,
        )
    }

    fn transmit(&mut self, chain: &Chain, mem: &GuestMem) {
        let data = match chain.read_all(mem) {
            Ok(d) if chain.writable.is_empty() && d.len() > NET_HDR => d,
            _ => {
                self.refused += 1;
                return;
            }
        };
        let frame = &data[NET_HDR..];
        let mut out = Vec::with_capacity(4 + frame.len());
        out.extend_from_slice(&(frame.len() as u32).to_be_bytes());
        out.extend_from_slice(frame);
        if let Some(tx) = self.tx.as_mut() {
            // A host side that went away loses the frames, as a cable pulled.
            if tx.write_all(&out).is_err() {
                self.tx = None;
            }
        }
    }

    fn receive(&mut self, queue: &mut Queue, mem: &GuestMem) -> bool {
        let mut used = false;
        while let Some(frame) = self.rx.pop() {
            let Some(raw) = queue.pop_descriptor_chain(mem) else {
                self.rx.unpop(frame);
                break;
            };
            let head = raw.head_index();
            let need = (NET_HDR + frame.len()) as u64;
            let len = match chain::parse(raw, mem, usize::from(QUEUE_SIZE), u64::from(u32::MAX)) {
                Ok(c) if c.readable.is_empty() && c.writable_len() >= need => {
                    let mut buf = vec![0u8; NET_HDR];
                    // num_buffers (little-endian u16 at 10): the frame is
                    // in this one chain.
                    buf[10] = 1;
                    buf.extend_from_slice(&frame);
                    match c.write_all(mem, &buf) {
                        Ok(n) => n as u32,
                        Err(_) => {
                            self.refused += 1;
                            0
                        }
                    }
                }
                Ok(c) if c.readable.is_empty() => {
                    self.dropped += 1;
                    0
                }
                _ => {
                    self.refused += 1;
                    0
                }
            };
            used |= queue.add_used(mem, head, len).is_ok();
        }
        used
    }
}

impl VirtioDevice for Net {
    fn device_id(&self) -> u32 {
        DEVICE_ID_NET
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_MTU
    }
    fn queue_count(&self) -> usize {
        2
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // mac, status (no VIRTIO_NET_F_STATUS: unused), max_virtqueue_pairs
        // (1), mtu.
        let mut cfg = [0u8; 12];
        cfg[..6].copy_from_slice(&self.mac);
        cfg[8..10].copy_from_slice(&1u16.to_le_bytes());
        cfg[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        read_config_bytes(&cfg, offset, data);
    }
    fn process(&mut self, index: usize, queue: &mut Queue, mem: &GuestMem) -> bool {
        match index {
            RX_QUEUE => self.receive(queue, mem),
            TX_QUEUE => {
                let max = (NET_HDR + MAX_FRAME) as u64;
                let (used, malformed) =
                    chain::drain_transmits(queue, mem, max, |c| self.transmit(c, mem));
                self.refused += malformed;
                used
            }
            _ => false,
        }
    }
}

/// The I/O thread's loop: reads length-prefixed frames from `socket` into
/// `rx` (a length over [`MAX_FRAME`] is skipped, never buffered: the
/// stack's own decoder), then calls `deliver` (which runs the device's
/// receive queue). Ends at EOF, on a socket error, or when `rx` is closed.
pub fn pump(mut socket: UnixStream, rx: &FrameQueue, mut deliver: impl FnMut()) {
    let mut dec = moat_net::stream::Decoder::new(MAX_FRAME);
    loop {
        if !rx.wait_for_space() {
            return;
        }
        match socket.read(dec.space()) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Ok(0) | Err(_) => return,
            Ok(n) => {
                dec.filled(n, |f| rx.push(f));
                deliver();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::chain::tests::Driver;
    use vm_memory::{Bytes, GuestAddress};

    const F_WRITE: u16 = 2;

    #[test]
    fn config_space_says_mac_one_pair_and_mtu() {
        let (net, _) = Net::detached([2, 1, 2, 3, 4, 5], 1400);
        let mut cfg = [0u8; 12];
        net.read_config(0, &mut cfg);
        assert_eq!(&cfg[..6], &[2, 1, 2, 3, 4, 5]);
        assert_eq!(u16::from_le_bytes([cfg[8], cfg[9]]), 1);
        assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), 1400);
        assert_eq!(
            net.features(),
            VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_MTU
        );
    }

    #[test]
    fn a_frame_goes_to_a_buffer_that_holds_it_and_is_dropped_from_one_too_small() {
        let (mut net, rx) = Net::detached([2, 0, 0, 0, 0, 1], 1500);
        rx.push(&[0xaa; 100]);
        rx.push(&[0xbb; 100]);
        let mut d = Driver::new();
        // Too small for header and frame: the first frame is dropped and
        // the buffer comes back empty.
        d.desc(0, 0x10000, 50, F_WRITE, 0);
        d.offer(0);
        assert!(net.process(RX_QUEUE, &mut d.queue, &d.mem));
        assert_eq!((d.used(0).1, net.dropped), (0, 1));
        // Big enough: the second frame, after a zero header saying one
        // buffer.
        d.desc(1, 0x20000, 2048, F_WRITE, 0);
        d.offer(1);
        assert!(net.process(RX_QUEUE, &mut d.queue, &d.mem));
        assert_eq!(d.used(1).1 as usize, NET_HDR + 100);
        let mut got = vec![0u8; NET_HDR + 100];
        d.mem.read_slice(&mut got, GuestAddress(0x20000)).unwrap();
        assert_eq!(&got[..NET_HDR], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        assert!(got[NET_HDR..].iter().all(|&b| b == 0xbb));
        assert!(rx.is_empty());
        // No buffer: a frame waits for the next one.
        rx.push(&[0xcc; 10]);
        assert!(!net.process(RX_QUEUE, &mut d.queue, &d.mem));
        assert_eq!(rx.len(), 1);
    }

    #[test]
    fn a_transmit_without_a_whole_header_is_refused() {
        let (host, guest) = UnixStream::pair().unwrap();
        let (mut net, _rx, reader) = Net::new(guest, [2, 0, 0, 0, 0, 1], 1500).unwrap();
        drop(reader);
        let mut d = Driver::new();
        d.mem
            .write_slice(&[0u8; 40], GuestAddress(0x10000))
            .unwrap();
        d.desc(0, 0x10000, NET_HDR as u32, 0, 0);
        d.offer(0);
        d.desc(1, 0x10000, 40, 0, 0);
        d.offer(1);
        assert!(net.process(TX_QUEUE, &mut d.queue, &d.mem));
        assert_eq!(net.refused, 1, "a header alone is no frame");
        drop(net);
        let mut got = Vec::new();
        (&host).read_to_end(&mut got).unwrap();
        let mut want = 28u32.to_be_bytes().to_vec();
        want.extend([0u8; 28]);
        assert_eq!(got, want, "the one whole frame, after its length");
    }
}
