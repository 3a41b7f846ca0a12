//! virtio-net: the guest's `eth0`. Its frames are carried either over a
//! connected host stream socket, each after a 4-byte big-endian length —
//! what QEMU's `-netdev stream` speaks and moat's user-space stack
//! (`moat-net`) serves, so the same stack process sits behind either
//! backend — or through a TAP device (`IFF_TAP | IFF_NO_PI`), one frame
//! per `read` and per `write` (a pod's interface redirected to it). One
//! queue pair, no control queue. The device offers `VIRTIO_NET_F_MAC` and
//! `VIRTIO_NET_F_MTU`; on a stream, or a TAP without a virtio-net header,
//! nothing else: every frame is whole and every header zero.
//!
//! On a TAP opened with a virtio-net header (`IFF_VNET_HDR`, as moat's
//! runtime opens every TAP it gives a guest) the header passes through
//! both ways, and the device offers checksum offload and TCP segmentation
//! both ways ([`OFFLOADS`]): the guest sends and receives segments of up
//! to 64 KiB with their checksums left to whoever delivers them, and the
//! host's kernel splits, merges and checks them (as for a TAP under QEMU
//! or Firecracker). The TAP's own offloads (`TUNSETOFFLOAD`: what it may
//! hand the device) are set to what the driver accepted when it starts
//! the device, and cleared when it resets it.
//!
//! On every back end the device offers mergeable receive buffers
//! (`VIRTIO_NET_F_MRG_RXBUF`): a driver that takes them posts page-sized
//! buffers and a frame fills as many as it needs, the header's
//! `num_buffers` saying how many, all of them shown in the used ring at
//! once. Without them a driver that takes segmentation, or a 64 KiB MTU,
//! posts a 64 KiB chain per frame (Linux's "big packets": 19 descriptors
//! each, so 13 of them fill a 256-entry ring).
//!
//! Frames from the host wait in a bounded queue ([`RX_FRAMES`]) until the
//! guest posts receive buffers; a frame longer than the buffer the guest
//! posted is dropped (counted), as a NIC drops what it cannot place. What
//! the guest transmits is written to the host side at once: to a socket
//! whole (the guest waits on a slow host, as with the console); to a TAP,
//! which is non-blocking, in one `write` or not at all (dropped, counted,
//! as a NIC whose queue is full; a header the TAP refuses drops its
//! frame too).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex};

use rustix::event::{PollFd, PollFlags};
use rustix::io::Errno;
use virtio_queue::{Queue, QueueT};

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MRG_RXBUF,
};
use vm_memory::{Bytes, GuestAddress};

use super::chain::{self, Chain};
use super::{read_config_bytes, DeviceError, VirtioDevice, QUEUE_SIZE, VIRTIO_F_VERSION_1};
use crate::memory::GuestMem;

/// virtio device id of a network card.
pub const DEVICE_ID_NET: u32 = 1;
/// The device reports the MTU the host's stack uses.
pub const VIRTIO_NET_F_MTU: u64 = 1 << 3;
/// The device has a fixed MAC address (its config space).
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// A frame may span several receive buffers, the header's `num_buffers`
/// saying how many (offered on every back end).
pub const MRG_RXBUF: u64 = 1 << VIRTIO_NET_F_MRG_RXBUF;
/// `struct virtio_net_hdr_v1` before every frame (VERSION_1): flags,
/// gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers.
pub const NET_HDR: usize = 12;
/// The largest frame either way (the most a 16-bit MTU allows).
pub const MAX_FRAME: usize = 65535;
/// The largest frame either way on a TAP with offloads: a segmentation
/// offload's largest IP packet (64 KiB) after an Ethernet header with a
/// VLAN tag.
pub const MAX_GSO_FRAME: usize = 65536 + 18;
/// What the device offers on a TAP with a virtio-net header: checksums
/// left to the other side, both ways (`CSUM`: the guest's; `GUEST_CSUM`:
/// the host's), and TCP segments of up to 64 KiB over IPv4 and IPv6, with
/// ECN, both ways (`HOST_*`: the guest sends them; `GUEST_*`: it takes
/// them).
pub const OFFLOADS: u64 = bit(VIRTIO_NET_F_CSUM)
    | bit(VIRTIO_NET_F_GUEST_CSUM)
    | bit(VIRTIO_NET_F_GUEST_TSO4)
    | bit(VIRTIO_NET_F_GUEST_TSO6)
    | bit(VIRTIO_NET_F_GUEST_ECN)
    | bit(VIRTIO_NET_F_HOST_TSO4)
    | bit(VIRTIO_NET_F_HOST_TSO6)
    | bit(VIRTIO_NET_F_HOST_ECN);
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

/// Where the guest's transmits go.
#[derive(Debug)]
enum Tx {
    Stream(UnixStream),
    Tap(Arc<File>),
}

/// The TAP's offload flags (`TUN_F_*`) for a driver that accepted
/// `features`: what the guest takes from the device.
pub fn tap_offloads(features: u64) -> u32 {
    let has = |f: u32| features & bit(f) != 0;
    let mut flags = 0;
    if has(VIRTIO_NET_F_GUEST_CSUM) {
        flags |= libc::TUN_F_CSUM;
        if has(VIRTIO_NET_F_GUEST_TSO4) {
            flags |= libc::TUN_F_TSO4;
        }
        if has(VIRTIO_NET_F_GUEST_TSO6) {
            flags |= libc::TUN_F_TSO6;
        }
        if flags & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0 && has(VIRTIO_NET_F_GUEST_ECN) {
            flags |= libc::TUN_F_TSO_ECN;
        }
    }
    flags
}

const fn bit(feature: u32) -> u64 {
    1 << feature
}

/// The network device.
#[derive(Debug)]
pub struct Net {
    tx: Option<Tx>,
    rx: Arc<FrameQueue>,
    mac: [u8; 6],
    mtu: u16,
    /// The TAP, when its frames carry a virtio-net header: the header
    /// passes through and [`OFFLOADS`] are offered.
    vnet: Option<Arc<File>>,
    /// The driver took [`MRG_RXBUF`]: a frame fills as many receive
    /// buffers as it needs.
    merge: bool,
    /// Requests refused as malformed (for tests and metrics).
    pub refused: u64,
    /// Frames from the host dropped: the guest's buffer was too small.
    pub dropped: u64,
    /// Frames from the guest a TAP device did not take (its queue full,
    /// the link down, a header it refused): dropped.
    pub tx_dropped: u64,
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
        net.tx = Some(Tx::Stream(socket));
        Ok((net, rx, reader))
    }

    /// A device with address `mac` and MTU `mtu` whose frames go to the
    /// TAP device `tap`, made non-blocking here (see
    /// [`crate::NetBackend::Tap`]); with `vnet_hdr` (the TAP was made with
    /// `IFF_VNET_HDR`) its header is set to [`NET_HDR`] bytes and its
    /// offloads cleared until a driver takes them. Returns the device, its
    /// receive queue and the TAP's reader for the I/O thread that fills it
    /// ([`pump_tap`]).
    pub fn with_tap(
        tap: File,
        mac: [u8; 6],
        mtu: u16,
        vnet_hdr: bool,
    ) -> Result<(Self, Arc<FrameQueue>, TapReader), DeviceError> {
        let flags = rustix::fs::fcntl_getfl(&tap).map_err(|e| DeviceError::Tap(e.into()))?;
        rustix::fs::fcntl_setfl(&tap, flags | rustix::fs::OFlags::NONBLOCK)
            .map_err(|e| DeviceError::Tap(e.into()))?;
        if vnet_hdr {
            moat_sys::tun::set_vnet_hdr_size(tap.as_fd(), NET_HDR).map_err(DeviceError::Tap)?;
            moat_sys::tun::set_offload(tap.as_fd(), 0).map_err(DeviceError::Tap)?;
        }
        let stop = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )
        .map_err(|e| DeviceError::Eventfd(e.into()))?;
        let tap = Arc::new(tap);
        let (mut net, rx) = Net::detached(mac, mtu);
        net.tx = Some(Tx::Tap(tap.clone()));
        net.vnet = vnet_hdr.then(|| tap.clone());
        let reader = TapReader {
            tap,
            stop: Arc::new(stop),
            max: if vnet_hdr {
                NET_HDR + MAX_GSO_FRAME
            } else {
                MAX_FRAME
            },
        };
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
                vnet: None,
                merge: false,
                refused: 0,
                dropped: 0,
                tx_dropped: 0,
            },
            rx,
        )
    }

    /// The largest transmit, header included.
    fn max_transmit(&self) -> usize {
        NET_HDR
            + if self.vnet.is_some() {
                MAX_GSO_FRAME
            } else {
                MAX_FRAME
            }
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
        match self.tx.as_mut() {
            Some(Tx::Stream(tx)) => {
                let mut out = Vec::with_capacity(4 + frame.len());
                out.extend_from_slice(&(frame.len() as u32).to_be_bytes());
                out.extend_from_slice(frame);
                // A host side that went away loses the frames, as a cable
                // pulled.
                if tx.write_all(&out).is_err() {
                    self.tx = None;
                }
            }
            // The header goes with the frame: the TAP reads it (and
            // refuses one it cannot honour).
            Some(Tx::Tap(tap)) if self.vnet.is_some() && !write_tap(tap, &data) => {
                self.tx_dropped += 1
            }
            Some(Tx::Tap(tap)) if self.vnet.is_none() && !write_tap(tap, frame) => {
                self.tx_dropped += 1
            }
            Some(Tx::Tap(_)) | None => {}
        }
    }

    /// `frame` as the guest gets it: after the TAP's header where it has
    /// one, else after a zero header; `num_buffers` (little-endian u16 at
    /// 10; the TAP leaves it unwritten) says `buffers`.
    fn with_header(&self, frame: Vec<u8>, buffers: u16) -> Vec<u8> {
        let mut buf = if self.vnet.is_some() {
            frame
        } else {
            let mut b = vec![0u8; NET_HDR];
            b.extend_from_slice(&frame);
            b
        };
        buf[10..NET_HDR].copy_from_slice(&buffers.to_le_bytes());
        buf
    }

    fn receive(&mut self, queue: &mut Queue, mem: &GuestMem) -> bool {
        if self.merge {
            return self.receive_merged(queue, mem);
        }
        let mut used = false;
        while let Some(frame) = self.rx.pop() {
            if self.vnet.is_some() && frame.len() <= NET_HDR {
                // A header and no frame: nothing to place.
                self.dropped += 1;
                continue;
            }
            let Some(raw) = queue.pop_descriptor_chain(mem) else {
                self.rx.unpop(frame);
                break;
            };
            let head = raw.head_index();
            // The frame is in this one chain.
            let buf = self.with_header(frame, 1);
            let len = match chain::parse(raw, mem, usize::from(QUEUE_SIZE), u64::from(u32::MAX)) {
                Ok(c) if c.readable.is_empty() && c.writable_len() >= buf.len() as u64 => {
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

    /// [`Net::receive`] with mergeable buffers: each frame fills as many
    /// chains as it needs, in order, the first's header saying how many,
    /// and all of them reach the used ring together. When the guest has
    /// not posted room enough, the chains taken go back to the available
    /// ring and the frame waits (unless the guest's whole ring holds too
    /// little for it: dropped, the buffers kept). A malformed chain among them is handed
    /// back empty (refused); if one was, and the room falls short, the
    /// frame is dropped and the chains taken handed back empty too (a
    /// driver that posts malformed buffers loses frames, never the
    /// device's place in its rings).
    fn receive_merged(&mut self, queue: &mut Queue, mem: &GuestMem) -> bool {
        let mut used = false;
        while let Some(frame) = self.rx.pop() {
            if self.vnet.is_some() && frame.len() <= NET_HDR {
                self.dropped += 1;
                continue;
            }
            let need = (frame.len() + if self.vnet.is_some() { 0 } else { NET_HDR }) as u64;
            let start = queue.next_avail();
            let mut chains: Vec<Chain> = Vec::new();
            let mut room = 0u64;
            let mut malformed = false;
            while room < need {
                let Some(raw) = queue.pop_descriptor_chain(mem) else {
                    break;
                };
                let head = raw.head_index();
                match chain::parse(raw, mem, usize::from(QUEUE_SIZE), u64::from(u32::MAX)) {
                    Ok(c) if c.readable.is_empty() && c.writable_len() > 0 => {
                        room += c.writable_len();
                        chains.push(c);
                    }
                    _ => {
                        self.refused += 1;
                        malformed = true;
                        used |= queue.add_used(mem, head, 0).is_ok();
                    }
                }
            }
            if room < need && !malformed {
                queue.set_next_avail(start);
                if chains.len() >= usize::from(queue.size()) {
                    // The whole ring is too small for it: it never fits.
                    self.dropped += 1;
                    continue;
                }
                self.rx.unpop(frame);
                break;
            }
            let group: Vec<(u16, u32)> = if room < need {
                self.dropped += 1;
                chains.iter().map(|c| (c.head, 0)).collect()
            } else {
                // At most QUEUE_SIZE chains: num_buffers fits.
                let buf = self.with_header(frame, chains.len() as u16);
                let mut at = 0usize;
                let mut group = Vec::with_capacity(chains.len());
                for c in &chains {
                    let n = (buf.len() - at).min(c.writable_len() as usize);
                    let written = match c.write_all(mem, &buf[at..at + n]) {
                        Ok(w) => w as u32,
                        Err(_) => {
                            self.refused += 1;
                            0
                        }
                    };
                    at += n;
                    group.push((c.head, written));
                }
                group
            };
            used |= add_used_together(queue, mem, &group);
        }
        used
    }
}

/// Puts `group` in the used ring as one: every element is written before
/// the index that shows them (a driver that finds a merged frame's first
/// buffer without the rest drops it, and would take the rest for frames
/// of their own). virtio-queue's `add_used` shows each as it adds it.
fn add_used_together(queue: &mut Queue, mem: &GuestMem, group: &[(u16, u32)]) -> bool {
    if group.is_empty() {
        return false;
    }
    let ring = queue.used_ring();
    let size = queue.size();
    let mut next = queue.next_used();
    for &(head, len) in group {
        // The ring: flags and idx (2 bytes each), then 8-byte elements
        // of id (u32) and len (u32), little-endian.
        let Some(at) = ring.checked_add(4 + u64::from(next % size) * 8) else {
            return false;
        };
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        if mem.write_slice(&elem, GuestAddress(at)).is_err() {
            return false;
        }
        next = next.wrapping_add(1);
    }
    let Some(idx) = ring.checked_add(2) else {
        return false;
    };
    if mem
        .store(
            next.to_le(),
            GuestAddress(idx),
            std::sync::atomic::Ordering::Release,
        )
        .is_err()
    {
        return false;
    }
    queue.set_next_used(next);
    true
}

impl VirtioDevice for Net {
    fn device_id(&self) -> u32 {
        DEVICE_ID_NET
    }
    fn features(&self) -> u64 {
        let base = VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_MTU | MRG_RXBUF;
        if self.vnet.is_some() {
            base | OFFLOADS
        } else {
            base
        }
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
                let max = self.max_transmit() as u64;
                let (used, malformed) =
                    chain::drain_transmits(queue, mem, max, |c| self.transmit(c, mem));
                self.refused += malformed;
                used
            }
            _ => false,
        }
    }
    /// The TAP hands the device what the driver accepted: segments and
    /// frames with checksums left to do only if it said it takes them.
    fn activate(
        &mut self,
        _queues: &[Queue],
        _mem: &GuestMem,
        features: u64,
    ) -> Result<(), String> {
        self.merge = features & MRG_RXBUF != 0;
        match &self.vnet {
            Some(tap) => moat_sys::tun::set_offload(tap.as_fd(), tap_offloads(features))
                .map_err(|e| format!("set the TAP's offloads: {e}")),
            None => Ok(()),
        }
    }
    /// A driver gone (or starting over) takes nothing: the TAP goes back
    /// to whole frames with their checksums done.
    fn reset(&mut self) {
        self.merge = false;
        if let Some(tap) = &self.vnet {
            if let Err(e) = moat_sys::tun::set_offload(tap.as_fd(), 0) {
                // The VMM's stderr is the guest's console log. Frames the
                // TAP still offloads are ones a new driver may not take;
                // it accepts them again once it starts the device.
                eprintln!("moat-vmm: clear the TAP's offloads on reset: {e}");
            }
        }
    }
}

/// Writes `frame` to a TAP in one `write`; false if it was dropped: EAGAIN
/// (the descriptor is non-blocking: the TAP cannot take it now) or any
/// other error (the link down, too short a frame, the device gone). The
/// TAP stays: a later frame may go.
fn write_tap(tap: &File, frame: &[u8]) -> bool {
    loop {
        match rustix::io::write(tap, frame) {
            Err(Errno::INTR) => continue,
            r => return r == Ok(frame.len()),
        }
    }
}

/// The I/O thread's end of a TAP device ([`pump_tap`]): the descriptor,
/// and the eventfd that ends its wait ([`TapReader::stopper`]).
#[derive(Debug)]
pub struct TapReader {
    tap: Arc<File>,
    stop: Arc<OwnedFd>,
    /// The longest read kept: a frame, after its header where the TAP
    /// has one.
    max: usize,
}

impl TapReader {
    /// What stops [`pump_tap`] (with [`FrameQueue::close`]).
    pub fn stopper(&self) -> TapStop {
        TapStop(self.stop.clone())
    }

    /// Waits until the TAP may have a frame (true), or for the stop or the
    /// device's end (false).
    fn wait(&self) -> bool {
        loop {
            let mut fds = [
                PollFd::new(&*self.tap, PollFlags::IN),
                PollFd::new(&*self.stop, PollFlags::IN),
            ];
            match rustix::event::poll(&mut fds, None) {
                Err(Errno::INTR) => continue,
                Err(_) => return false,
                // POLLERR: the TAP was detached or its device is going.
                Ok(_) => {
                    return fds[1].revents().is_empty()
                        && !fds[0]
                            .revents()
                            .intersects(PollFlags::ERR | PollFlags::HUP | PollFlags::NVAL)
                }
            }
        }
    }
}

/// Ends a [`pump_tap`]'s wait, for good.
#[derive(Debug, Clone)]
pub struct TapStop(Arc<OwnedFd>);

impl TapStop {
    /// Makes the eventfd readable (it is never read: every later wait
    /// ends at once too).
    pub fn stop(&self) {
        let _ = rustix::io::write(&*self.0, &1u64.to_ne_bytes());
    }
}

/// The I/O thread's loop for a TAP device: reads one frame per `read` into
/// `rx` (a frame over [`MAX_FRAME`], or on a TAP with a header over the
/// header and [`MAX_GSO_FRAME`], is dropped, never buffered), then calls
/// `deliver` (which runs the device's receive queue). When no frame waits
/// it sleeps in `ppoll` on the TAP and the stop ([`TapReader::stopper`]).
/// Ends at the stop, when `rx` is closed, or when the device is gone.
pub fn pump_tap(reader: TapReader, rx: &FrameQueue, mut deliver: impl FnMut()) {
    // One byte more than a frame may be: a read that fills it (or says it
    // would have) was of a longer one.
    let max = reader.max;
    let mut buf = vec![0u8; max + 1];
    loop {
        if !rx.wait_for_space() {
            return;
        }
        match rustix::io::read(&*reader.tap, &mut buf[..]) {
            // A TAP never reads empty: an end of file, from something else.
            Ok(0) => return,
            Ok(n) if n > max => {}
            Ok(n) => {
                rx.push(&buf[..n]);
                deliver();
            }
            Err(Errno::INTR) => {}
            Err(Errno::AGAIN) => {
                if !reader.wait() {
                    return;
                }
            }
            Err(_) => return,
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

/// A TAP device in a network namespace of its own (shared with the
/// integration tests).
#[cfg(test)]
#[path = "../../tests/common/tap.rs"]
mod test_tap;

#[cfg(test)]
mod tests {
    use super::test_tap as tap;
    use super::*;
    use crate::virtio::chain::tests::{Driver, SIZE};
    use std::net::Ipv4Addr;
    use std::os::unix::net::UnixDatagram;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};
    use vm_memory::{Bytes, GuestAddress};

    const F_WRITE: u16 = 2;
    /// A bound against a hang; not a timing assertion.
    const GUARD: Duration = Duration::from_secs(30);
    /// Where each receive buffer is (one at a time, room for any frame).
    const RX_BUF: u64 = 0x10000;
    const MAC: [u8; 6] = [0x02, 0x6d, 0x6f, 0x61, 0x74, 0x07];

    /// The TAP pump on a thread of its own, its `deliver` a wake-up for
    /// the test; the receiver of those, the stop, and a receiver that
    /// hears when the pump has returned.
    fn start_pump(
        reader: TapReader,
        rx: &Arc<FrameQueue>,
    ) -> (mpsc::Receiver<()>, TapStop, mpsc::Receiver<()>) {
        let (woke, wait) = mpsc::channel();
        let (ended, end) = mpsc::channel();
        let stop = reader.stopper();
        let rx = rx.clone();
        std::thread::spawn(move || {
            pump_tap(reader, &rx, || {
                let _ = woke.send(());
            });
            let _ = ended.send(());
        });
        (wait, stop, end)
    }

    /// Transmits `frame` as the guest does: one readable buffer, the zero
    /// header and then the frame.
    fn transmit(net: &mut Net, frame: &[u8]) {
        let mut d = Driver::new();
        let mut req = vec![0u8; NET_HDR];
        req.extend_from_slice(frame);
        d.mem.write_slice(&req, GuestAddress(0x10000)).unwrap();
        d.desc(0, 0x10000, req.len() as u32, 0, 0);
        d.offer(0);
        assert!(net.process(TX_QUEUE, &mut d.queue, &d.mem));
    }

    /// The next frame from the host, as the guest finds it: waits for the
    /// pump to queue one, posts one buffer, runs the receive queue; the
    /// header must be zero (one buffer).
    fn receive(
        net: &mut Net,
        d: &mut Driver,
        rx: &FrameQueue,
        woke: &mpsc::Receiver<()>,
    ) -> Vec<u8> {
        let (header, frame) = receive_with_header(net, d, rx, woke);
        assert_eq!(header, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        frame
    }

    /// The next frame from the host and the virtio-net header before it.
    fn receive_with_header(
        net: &mut Net,
        d: &mut Driver,
        rx: &FrameQueue,
        woke: &mpsc::Receiver<()>,
    ) -> ([u8; NET_HDR], Vec<u8>) {
        let deadline = Instant::now() + GUARD;
        while rx.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            woke.recv_timeout(left).expect("no frame from the host");
        }
        let slot = d.used_idx() % SIZE;
        d.desc(slot, RX_BUF, (NET_HDR + MAX_FRAME) as u32, F_WRITE, 0);
        d.offer(slot);
        assert!(net.process(RX_QUEUE, &mut d.queue, &d.mem));
        let mut got = vec![0u8; d.used(slot).1 as usize];
        d.mem.read_slice(&mut got, GuestAddress(RX_BUF)).unwrap();
        let frame = got.split_off(NET_HDR);
        (got.try_into().unwrap(), frame)
    }

    /// The next IPv4 frame from the host, with its header (the kernel's
    /// ARP probes of the guest's address, whenever its timers send them,
    /// are passed over).
    fn receive_ipv4(
        net: &mut Net,
        d: &mut Driver,
        rx: &FrameQueue,
        woke: &mpsc::Receiver<()>,
    ) -> ([u8; NET_HDR], Vec<u8>) {
        loop {
            let (header, frame) = receive_with_header(net, d, rx, woke);
            if frame[12..14] == [0x08, 0x00] {
                return (header, frame);
            }
            assert_eq!(
                frame[12..14],
                [0x08, 0x06],
                "only ARP besides: {frame:02x?}"
            );
        }
    }

    /// Transmits `frame` after `header`, as a guest with offloads does.
    fn transmit_with_header(net: &mut Net, header: [u8; NET_HDR], frame: &[u8]) {
        let mut d = Driver::new();
        let mut req = header.to_vec();
        req.extend_from_slice(frame);
        d.mem.write_slice(&req, GuestAddress(0x10000)).unwrap();
        d.desc(0, 0x10000, req.len() as u32, 0, 0);
        d.offer(0);
        assert!(net.process(TX_QUEUE, &mut d.queue, &d.mem));
    }

    /// The ones' complement sum of `data` as 16-bit big-endian words,
    /// folded (not inverted), from `start`.
    fn ones_sum(start: u32, data: &[u8]) -> u16 {
        let mut sum = start;
        for w in data.chunks(2) {
            sum += u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum as u16
    }

    /// An Ethernet frame from the guest carrying a UDP datagram
    /// `from`:5555 → `to`:`port` with `payload`; its checksum field holds
    /// only the pseudo-header's sum (what a guest leaves for the device
    /// to finish: VIRTIO_NET_HDR_F_NEEDS_CSUM). Returns the frame and the
    /// datagram's real checksum.
    fn udp_frame(
        to_mac: [u8; 6],
        from: [u8; 4],
        to: [u8; 4],
        port: u16,
        payload: &[u8],
    ) -> (Vec<u8>, u16) {
        let udp_len = (8 + payload.len()) as u16;
        let mut f = to_mac.to_vec();
        f.extend(MAC);
        f.extend([0x08, 0x00]);
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
        ip[2..4].copy_from_slice(&(20 + udp_len).to_be_bytes());
        ip.extend(from);
        ip.extend(to);
        let ip_sum = !ones_sum(0, &ip);
        ip[10..12].copy_from_slice(&ip_sum.to_be_bytes());
        f.extend(&ip);
        let mut pseudo = from.to_vec();
        pseudo.extend(to);
        pseudo.extend([0, 17]);
        pseudo.extend(udp_len.to_be_bytes());
        let partial = ones_sum(0, &pseudo);
        let mut udp = 5555u16.to_be_bytes().to_vec();
        udp.extend(port.to_be_bytes());
        udp.extend(udp_len.to_be_bytes());
        udp.extend(partial.to_be_bytes());
        udp.extend(payload);
        let mut zeroed = udp.clone();
        zeroed[6..8].fill(0);
        let full = !ones_sum(u32::from(partial), &zeroed);
        f.extend(udp);
        (f, full)
    }

    #[test]
    fn a_tap_with_a_header_offloads_what_the_driver_accepted() {
        let (tap, udp) = tap::quiet_tap(Ipv4Addr::new(10, 99, 1, 1), 1500, true);
        let (mut net, rx, reader) = Net::with_tap(tap, MAC, 1500, true).unwrap();
        assert_eq!(net.features() & OFFLOADS, OFFLOADS);
        let (woke, stop, ended) = start_pump(reader, &rx);
        let mut rxq = Driver::new();
        // The guest's ARP request goes after its (zero) header; the
        // kernel's reply comes after the TAP's (zero, one buffer).
        transmit(&mut net, &arp_request(MAC, [10, 99, 1, 2], [10, 99, 1, 1]));
        let reply = receive(&mut net, &mut rxq, &rx, &woke);
        assert_eq!(&reply[12..14], &[0x08, 0x06]);
        let tap_mac: [u8; 6] = reply[6..12].try_into().unwrap();
        let to_guest = (Ipv4Addr::new(10, 99, 1, 2), 9);
        let header_flags = |h: &[u8; NET_HDR]| h[0];
        let udp_sum = |f: &[u8]| u16::from_be_bytes([f[14 + 20 + 6], f[14 + 20 + 7]]);

        // No driver has accepted offloads: the kernel finishes the
        // checksum, and the header says nothing is left to do.
        udp.send_to(b"before", to_guest).unwrap();
        let (h, f) = receive_ipv4(&mut net, &mut rxq, &rx, &woke);
        assert_eq!((header_flags(&h), &f[14 + 28..]), (0, &b"before"[..]));
        assert_ne!(udp_sum(&f), 0);

        // A driver that takes checksums left to do (and segments): the
        // datagram comes with its checksum unfinished, NEEDS_CSUM, and
        // where to finish it (the UDP header at 34, its checksum 6 in).
        net.activate(&[], &rxq.mem, VIRTIO_F_VERSION_1 | OFFLOADS)
            .unwrap();
        udp.send_to(b"offloaded", to_guest).unwrap();
        let (h, f) = receive_ipv4(&mut net, &mut rxq, &rx, &woke);
        assert_eq!(&f[14 + 28..], b"offloaded");
        assert_eq!(header_flags(&h), 1, "NEEDS_CSUM: {h:?}");
        assert_eq!(u16::from_le_bytes([h[6], h[7]]), 34, "csum_start");
        assert_eq!(u16::from_le_bytes([h[8], h[9]]), 6, "csum_offset");
        assert_eq!(u16::from_le_bytes([h[10], h[11]]), 1, "num_buffers");

        // Reset: the TAP goes back to finished checksums.
        net.reset();
        udp.send_to(b"after", to_guest).unwrap();
        let (h, f) = receive_ipv4(&mut net, &mut rxq, &rx, &woke);
        assert_eq!((header_flags(&h), &f[14 + 28..]), (0, &b"after"[..]));

        // The guest's own: a datagram whose checksum holds only the
        // pseudo-header's sum is dropped by the host's stack when its
        // header leaves nothing to do, and delivered when it says
        // NEEDS_CSUM (checksum at 34 + 6). The socket's first datagram is
        // the second sent.
        let port = udp.local_addr().unwrap().port();
        let (bare, full) = udp_frame(tap_mac, [10, 99, 1, 2], [10, 99, 1, 1], port, b"unfinished");
        assert_ne!(
            udp_sum(&bare),
            full,
            "the pseudo-header's sum is no checksum"
        );
        transmit(&mut net, &bare);
        let (frame, _) = udp_frame(tap_mac, [10, 99, 1, 2], [10, 99, 1, 1], port, b"left to do");
        let mut header = [0u8; NET_HDR];
        header[0] = 1;
        header[6..8].copy_from_slice(&34u16.to_le_bytes());
        header[8..10].copy_from_slice(&6u16.to_le_bytes());
        transmit_with_header(&mut net, header, &frame);
        assert_eq!((net.refused, net.tx_dropped), (0, 0));
        udp.set_read_timeout(Some(GUARD)).unwrap();
        let mut got = [0u8; 64];
        let (n, from) = udp.recv_from(&mut got).unwrap();
        assert_eq!(&got[..n], b"left to do");
        assert_eq!(from, "10.99.1.2:5555".parse().unwrap());

        stop.stop();
        ended.recv_timeout(GUARD).expect("the pump did not stop");
    }

    #[test]
    fn the_taps_offloads_follow_the_drivers_features() {
        use libc::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN};
        assert_eq!(tap_offloads(VIRTIO_F_VERSION_1), 0);
        assert_eq!(
            tap_offloads(VIRTIO_F_VERSION_1 | OFFLOADS),
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
        );
        // Segments need the checksum left to do; ECN needs segments.
        let tso = bit(VIRTIO_NET_F_GUEST_TSO4) | bit(VIRTIO_NET_F_GUEST_ECN);
        assert_eq!(tap_offloads(tso), 0);
        assert_eq!(
            tap_offloads(tso | bit(VIRTIO_NET_F_GUEST_CSUM)),
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO_ECN
        );
        assert_eq!(
            tap_offloads(bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_ECN)),
            TUN_F_CSUM
        );
        // What the guest sends (HOST_*) is no offload of the TAP's.
        assert_eq!(
            tap_offloads(bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_HOST_TSO4)),
            0
        );
    }

    /// ARP "who has `want`, tell `from`" from `mac`, broadcast.
    fn arp_request(mac: [u8; 6], from: [u8; 4], want: [u8; 4]) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend(mac);
        f.extend([0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        f.extend(mac);
        f.extend(from);
        f.extend([0; 6]);
        f.extend(want);
        f
    }

    #[test]
    fn a_real_tap_answers_the_guests_arp_and_carries_the_largest_frame_whole() {
        // The TAP's IP MTU as large as a TAP allows (65535 less the
        // Ethernet header): its largest frame is MAX_FRAME bytes.
        let ip_mtu = MAX_FRAME - 14;
        let (tap, udp) = tap::quiet_tap(Ipv4Addr::new(10, 99, 0, 1), ip_mtu, false);
        let (mut net, rx, reader) = Net::with_tap(tap, MAC, 1500, false).unwrap();
        let (woke, stop, ended) = start_pump(reader, &rx);
        let mut rxq = Driver::new();

        transmit(&mut net, &arp_request(MAC, [10, 99, 0, 2], [10, 99, 0, 1]));
        assert_eq!((net.refused, net.tx_dropped), (0, 0));
        let reply = receive(&mut net, &mut rxq, &rx, &woke);
        assert_eq!(reply.len(), 42, "{reply:02x?}");
        assert_eq!(&reply[..6], &MAC, "to the card");
        assert_eq!(&reply[12..14], &[0x08, 0x06], "ARP");
        assert_eq!(&reply[14..20], &[0, 1, 0x08, 0, 6, 4]);
        assert_eq!(&reply[20..22], &[0, 2], "a reply");
        assert_eq!(&reply[22..28], &reply[6..12], "from the TAP's address");
        assert_eq!(&reply[28..32], &[10, 99, 0, 1], "10.99.0.1 is at");
        assert_eq!(&reply[32..38], &MAC, "told to the card");
        assert_eq!(&reply[38..42], &[10, 99, 0, 2]);

        // The kernel knows 10.99.0.2 from the request: the largest
        // datagram it sends unfragmented comes as one MAX_FRAME-byte frame.
        let payload: Vec<u8> = (0..ip_mtu - 28).map(|i| (i % 251) as u8).collect();
        udp.send_to(&payload, (Ipv4Addr::new(10, 99, 0, 2), 9))
            .unwrap();
        let frame = receive(&mut net, &mut rxq, &rx, &woke);
        assert_eq!(frame.len(), MAX_FRAME);
        assert_eq!(&frame[..6], &MAC);
        assert_eq!(&frame[12..14], &[0x08, 0x00], "IPv4");
        assert_eq!(&frame[14 + 12..14 + 20], &[10, 99, 0, 1, 10, 99, 0, 2]);
        assert!(frame[14 + 28..] == payload[..], "the datagram, whole");
        assert_eq!(net.dropped, 0);

        // The pump, waiting on the quiet TAP, ends at the stop alone.
        stop.stop();
        ended.recv_timeout(GUARD).expect("the pump did not stop");
    }

    #[test]
    fn the_tap_pump_drops_a_frame_over_max_frame_and_transmits_are_single_writes() {
        // A datagram socket reads as a TAP does, one frame per read; and
        // the device takes it blocking and leaves it non-blocking.
        let (host, end) = UnixDatagram::pair().unwrap();
        let probe = end.try_clone().unwrap();
        assert!(!rustix::fs::fcntl_getfl(&probe)
            .unwrap()
            .contains(rustix::fs::OFlags::NONBLOCK));
        let (mut net, rx, reader) =
            Net::with_tap(File::from(OwnedFd::from(end)), MAC, 1500, false).unwrap();
        assert!(rustix::fs::fcntl_getfl(&probe)
            .unwrap()
            .contains(rustix::fs::OFlags::NONBLOCK));
        host.send(&vec![0xee; MAX_FRAME + 1]).unwrap();
        host.send(&[0x5a; 60]).unwrap();
        let (woke, stop, ended) = start_pump(reader, &rx);
        let mut rxq = Driver::new();
        assert_eq!(receive(&mut net, &mut rxq, &rx, &woke), vec![0x5a; 60]);
        assert!(rx.is_empty(), "the long one was dropped, not queued");

        transmit(&mut net, &[0x11; 60]);
        let mut got = [0u8; 128];
        assert_eq!(
            host.recv(&mut got).unwrap(),
            60,
            "the frame alone, no header or length"
        );
        assert_eq!(got[..60], [0x11; 60]);

        stop.stop();
        ended.recv_timeout(GUARD).expect("the pump did not stop");
        // A write refused (no one at the other end) drops that frame only.
        drop(host);
        transmit(&mut net, &[0x22; 60]);
        transmit(&mut net, &[0x33; 60]);
        assert_eq!((net.tx_dropped, net.refused), (2, 0));
    }

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
            VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_MTU | MRG_RXBUF
        );
    }

    /// A device whose driver took mergeable buffers.
    fn merging() -> (Net, Arc<FrameQueue>, Driver) {
        let (mut net, rx) = Net::detached([2, 0, 0, 0, 0, 1], 1500);
        let d = Driver::new();
        net.activate(&[], &d.mem, VIRTIO_F_VERSION_1 | MRG_RXBUF)
            .unwrap();
        (net, rx, d)
    }

    #[test]
    fn a_frame_spans_the_buffers_it_needs_and_they_are_used_together() {
        let (mut net, rx, mut d) = merging();
        let frame: Vec<u8> = (0..3000u32).map(|i| (i % 253) as u8).collect();
        rx.push(&frame);
        rx.push(&[0x77; 100]);
        // Two buffers of 1200 bytes: not room enough for the 3012 bytes
        // of header and frame. Nothing is used, the frame waits, and the
        // buffers are the device's to take again.
        for i in 0..2u16 {
            d.desc(i, 0x10000 + 0x1000 * u64::from(i), 1200, F_WRITE, 0);
            d.offer(i);
        }
        assert!(!net.process(RX_QUEUE, &mut d.queue, &d.mem));
        assert_eq!((d.used_idx(), rx.len(), net.dropped), (0, 2, 0));
        // A third and a fourth: the frame takes the first three, in
        // order, all shown at once; the header's num_buffers says three.
        for i in 2..4u16 {
            d.desc(i, 0x10000 + 0x1000 * u64::from(i), 1200, F_WRITE, 0);
            d.offer(i);
        }
        assert!(net.process(RX_QUEUE, &mut d.queue, &d.mem));
        assert_eq!(
            d.used_idx(),
            4,
            "the frame's three and the next frame's one"
        );
        assert_eq!(
            [d.used(0), d.used(1), d.used(2)],
            [(0, 1200), (1, 1200), (2, 612)]
        );
        let mut got = Vec::new();
        for (i, len) in [(0u64, 1200usize), (1, 1200), (2, 612)] {
            let mut part = vec![0u8; len];
            d.mem
                .read_slice(&mut part, GuestAddress(0x10000 + 0x1000 * i))
                .unwrap();
            got.extend(part);
        }
        assert_eq!(&got[..NET_HDR], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0]);
        assert!(got[NET_HDR..] == frame[..], "the frame, whole and in order");
        // The small frame fits the fourth alone: one buffer.
        assert_eq!(d.used(3), (3, (NET_HDR + 100) as u32));
        let mut head = [0u8; NET_HDR];
        d.mem.read_slice(&mut head, GuestAddress(0x13000)).unwrap();
        assert_eq!(u16::from_le_bytes([head[10], head[11]]), 1);
        assert!(rx.is_empty());
        assert_eq!((net.refused, net.dropped), (0, 0));
    }

    #[test]
    fn a_frame_larger_than_the_whole_ring_is_dropped_and_the_buffers_kept() {
        let (mut net, rx, mut d) = merging();
        rx.push(&[0x11; 20_000]);
        rx.push(&[0x22; 100]);
        // Every entry of the ring posted, 1 KiB each: 16 KiB in all.
        for i in 0..SIZE {
            d.desc(i, 0x10000 + 0x400 * u64::from(i), 1024, F_WRITE, 0);
            d.offer(i);
        }
        assert!(net.process(RX_QUEUE, &mut d.queue, &d.mem));
        assert_eq!(net.dropped, 1);
        // The small frame took the first buffer; the rest wait.
        assert_eq!((d.used_idx(), d.used(0)), (1, (0, (NET_HDR + 100) as u32)));
        assert!(rx.is_empty());
    }

    #[test]
    fn a_malformed_buffer_among_a_frames_is_handed_back_empty() {
        let (mut net, rx, mut d) = merging();
        rx.push(&[0x55; 2000]);
        // One good buffer, one the device may only read (malformed for
        // receiving), then not room enough: the malformed one comes back
        // empty at once, and with room short after it the frame is
        // dropped and the good one handed back empty too.
        d.desc(0, 0x10000, 1500, F_WRITE, 0);
        d.offer(0);
        d.desc(1, 0x11000, 1500, 0, 0);
        d.offer(1);
        assert!(net.process(RX_QUEUE, &mut d.queue, &d.mem));
        assert_eq!(d.used_idx(), 2);
        assert_eq!([d.used(0), d.used(1)], [(1, 0), (0, 0)]);
        assert_eq!((net.refused, net.dropped), (1, 1));
        assert!(rx.is_empty());
        // A driver that starts over without mergeable buffers: one chain
        // per frame again.
        net.reset();
        net.activate(&[], &d.mem, VIRTIO_F_VERSION_1).unwrap();
        rx.push(&[0x66; 2000]);
        d.desc(2, 0x12000, 1500, F_WRITE, 0);
        d.offer(2);
        assert!(net.process(RX_QUEUE, &mut d.queue, &d.mem));
        assert_eq!(d.used(2), (2, 0), "too small for the frame alone: dropped");
        assert_eq!(net.dropped, 2);
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
