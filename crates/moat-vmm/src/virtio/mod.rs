//! virtio over MMIO: the transport ([`mmio`]), chain validation ([`chain`]),
//! and the devices a moat guest needs: entropy ([`rng`]), the free page
//! reporting balloon that gives the memory it frees back ([`balloon`]), the root
//! filesystem ([`block`]), the agent channel ([`console`]), when the
//! container asks for the network, `eth0` ([`net`]), and for each
//! read-write volume a virtio-fs share its virtiofsd serves ([`fs`]).

pub mod balloon;
pub mod block;
pub mod chain;
pub mod console;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod rng;

use std::path::PathBuf;

use thiserror::Error;
use virtio_queue::Queue;

use crate::memory::GuestMem;

/// VIRTIO_F_VERSION_1: the modern (non-legacy) interface; the only one offered.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Every queue's maximum size.
pub const QUEUE_SIZE: u16 = 256;

/// Device ids (virtio spec 5).
pub const DEVICE_ID_BLOCK: u32 = 2;
/// Console.
pub const DEVICE_ID_CONSOLE: u32 = 3;
/// Entropy source.
pub const DEVICE_ID_RNG: u32 = 4;
/// Memory balloon.
pub const DEVICE_ID_BALLOON: u32 = 5;

/// Why a device could not be set up.
#[derive(Debug, Error)]
pub enum DeviceError {
    /// The block image could not be opened.
    #[error("open image {}", path.display())]
    OpenImage {
        /// The image.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The agent socket could not be cloned for the I/O thread.
    #[error("clone agent socket")]
    CloneSocket(#[source] std::io::Error),
    /// A vhost-user request to the device's back-end failed.
    #[error("vhost-user: {step}")]
    VhostUser {
        /// The request.
        step: &'static str,
        /// Cause.
        #[source]
        source: vhost::Error,
    },
    /// An eventfd could not be made.
    #[error("create an eventfd")]
    Eventfd(#[source] std::io::Error),
    /// A TAP device's descriptor could not be made non-blocking.
    #[error("make the TAP descriptor non-blocking")]
    Tap(#[source] std::io::Error),
    /// A virtio-fs device could not be set up.
    #[error("virtio-fs: {0}")]
    Fs(String),
}

/// A virtio device model, independent of the transport. Devices are sans-IO
/// towards the guest: they see guest memory only through [`chain::Chain`]s.
pub trait VirtioDevice: Send {
    /// The virtio device id.
    fn device_id(&self) -> u32;
    /// Feature bits offered (always including [`VIRTIO_F_VERSION_1`]).
    fn features(&self) -> u64;
    /// Number of virtqueues.
    fn queue_count(&self) -> usize;
    /// Reads `data.len()` bytes of configuration space at `offset`; bytes past
    /// the end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Consumes available buffers of queue `index`; returns whether any were
    /// put in the used ring (so the driver must be interrupted).
    fn process(&mut self, index: usize, queue: &mut Queue, mem: &GuestMem) -> bool;
    /// The driver set DRIVER_OK with `features` (or a snapshot restored
    /// a device its driver had started): a device served elsewhere
    /// (vhost-user) hands over its queues here, a TAP takes the offloads
    /// the driver accepted. An error marks the device as needing a reset
    /// (fails the restore).
    fn activate(&mut self, queues: &[Queue], mem: &GuestMem, features: u64) -> Result<(), String> {
        let _ = (queues, mem, features);
        Ok(())
    }
    /// Whether the device raises its interrupt itself, outside the
    /// transport (a vhost-user back-end signalling the irqfd): the
    /// transport then reports a used buffer whenever asked.
    fn interrupts_itself(&self) -> bool {
        false
    }
    /// Back to the state before the driver found it.
    fn reset(&mut self) {}
}

/// Copies the slice of `config` at `offset` into `data` (zeros past the end).
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - start);
    data[..n].copy_from_slice(&config[start..start + n]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_are_bounded() {
        let cfg = [1u8, 2, 3, 4];
        let mut d = [9u8; 4];
        read_config_bytes(&cfg, 2, &mut d);
        assert_eq!(d, [3, 4, 0, 0]);
        read_config_bytes(&cfg, u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
    }
}
