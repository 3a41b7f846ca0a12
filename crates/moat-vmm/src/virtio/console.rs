//! virtio-console with one port (no multiport feature): the guest agent's
//! channel, `/dev/hvc0` in the guest. Bytes the guest transmits go to a
//! connected host socket; bytes from the socket wait in a bounded buffer
//! until the guest posts receive buffers.
//!
//! Why a console port rather than vsock: it needs nothing on the host (no
//! vhost-vsock module, no AF_VSOCK, which moat's own seccomp profile refuses)
//! and one guest module (`virtio_console`), which also drives the port
//! moat-microvm's QEMU backend gives the agent (a named `virtserialport`
//! rather than QEMU's `virtconsole`, which drops what the guest writes
//! when its host side is slow; this device holds the guest back instead:
//! its transmit waits on the socket). One stream is all the agent needs;
//! it multiplexes its own messages.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex};

use virtio_queue::{Queue, QueueT};

use super::chain::{self, Chain};
use super::{
    read_config_bytes, DeviceError, VirtioDevice, DEVICE_ID_CONSOLE, QUEUE_SIZE, VIRTIO_F_VERSION_1,
};
use crate::memory::GuestMem;

/// Bytes from the host kept for the guest before the host is made to wait.
pub const RX_BUFFER: usize = 64 * 1024;
/// Bytes taken from the guest in one transmit request.
pub const MAX_TX_REQUEST: u64 = 64 * 1024;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;

/// Host-to-guest bytes waiting for receive buffers, shared with the I/O thread.
#[derive(Debug, Default)]
pub struct RxBuffer {
    state: Mutex<RxState>,
    space: Condvar,
}

#[derive(Debug, Default)]
struct RxState {
    bytes: VecDeque<u8>,
    closed: bool,
}

impl RxBuffer {
    /// Appends up to the free space; returns how many bytes were taken.
    pub fn push(&self, data: &[u8]) -> usize {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let n = data.len().min(RX_BUFFER - s.bytes.len());
        s.bytes.extend(&data[..n]);
        n
    }

    /// Blocks until there is space (returns the free bytes) or the buffer is closed (0).
    pub fn wait_for_space(&self) -> usize {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if s.closed {
                return 0;
            }
            if s.bytes.len() < RX_BUFFER {
                return RX_BUFFER - s.bytes.len();
            }
            s = self.space.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Wakes and stops the I/O thread.
    pub fn close(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        self.space.notify_all();
    }

    fn is_empty(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .bytes
            .is_empty()
    }

    fn take(&self, max: usize) -> Vec<u8> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let n = max.min(s.bytes.len());
        let out: Vec<u8> = s.bytes.drain(..n).collect();
        self.space.notify_all();
        out
    }

    fn untake(&self, data: &[u8]) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        for b in data.iter().rev() {
            s.bytes.push_front(*b);
        }
    }
}

/// The console device.
#[derive(Debug)]
pub struct Console {
    tx: Option<UnixStream>,
    rx: Arc<RxBuffer>,
    /// Requests refused as malformed (for tests and metrics).
    pub refused: u64,
}

impl Console {
    /// A console whose transmit side writes to `socket`; returns the device,
    /// the receive buffer and a clone of the socket for the I/O thread that
    /// fills it.
    pub fn new(socket: UnixStream) -> Result<(Self, Arc<RxBuffer>, UnixStream), DeviceError> {
        let reader = socket.try_clone().map_err(DeviceError::CloneSocket)?;
        let rx = Arc::new(RxBuffer::default());
        Ok((
            Console {
                tx: Some(socket),
                rx: rx.clone(),
                refused: 0,
            },
            rx,
            reader,
        ))
    }

    /// A console with no host side (for tests): transmitted bytes are dropped.
    pub fn detached() -> (Self, Arc<RxBuffer>) {
        let rx = Arc::new(RxBuffer::default());
        (
            Console {
                tx: None,
                rx: rx.clone(),
                refused: 0,
            },
            rx,
        )
    }

    fn transmit(&mut self, chain: &Chain, mem: &GuestMem) {
        let Ok(data) = chain.read_all(mem) else {
            self.refused += 1;
            return;
        };
        if let Some(tx) = self.tx.as_mut() {
            // A host side that went away loses the bytes; the guest sees EOF
            // on its reads once the I/O thread stops.
            if tx.write_all(&data).is_err() {
                self.tx = None;
            }
        }
    }

    fn receive(&mut self, queue: &mut Queue, mem: &GuestMem) -> bool {
        let mut used = false;
        while !self.rx.is_empty() {
            let Some(raw) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = raw.head_index();
            let len = match chain::parse(raw, mem, usize::from(QUEUE_SIZE), u64::from(u32::MAX)) {
                Ok(c) if c.readable.is_empty() => {
                    let want = (c.writable_len() as usize).min(RX_BUFFER);
                    let data = self.rx.take(want);
                    match c.write_all(mem, &data) {
                        Ok(n) => n as u32,
                        Err(_) => {
                            self.rx.untake(&data);
                            0
                        }
                    }
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

impl VirtioDevice for Console {
    fn device_id(&self) -> u32 {
        DEVICE_ID_CONSOLE
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn queue_count(&self) -> usize {
        2
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // cols, rows, max_nr_ports, emerg_wr: none of their features offered.
        read_config_bytes(&[0u8; 12], offset, data);
    }
    fn process(&mut self, index: usize, queue: &mut Queue, mem: &GuestMem) -> bool {
        match index {
            RX_QUEUE => self.receive(queue, mem),
            TX_QUEUE => {
                let (used, malformed) =
                    chain::drain_transmits(queue, mem, MAX_TX_REQUEST, |c| self.transmit(c, mem));
                self.refused += malformed;
                used
            }
            _ => false,
        }
    }
}

/// The I/O thread's loop: moves bytes from `socket` into `rx`, then calls
/// `deliver` (which runs the device's receive queue). Ends at EOF, on a
/// socket error, or when `rx` is closed.
pub fn pump(mut socket: UnixStream, rx: &RxBuffer, mut deliver: impl FnMut()) {
    let mut buf = vec![0u8; 4096];
    loop {
        let space = rx.wait_for_space();
        if space == 0 {
            return;
        }
        let want = space.min(buf.len());
        match socket.read(&mut buf[..want]) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Ok(0) | Err(_) => return,
            Ok(n) => {
                rx.push(&buf[..n]);
                deliver();
            }
        }
    }
}
