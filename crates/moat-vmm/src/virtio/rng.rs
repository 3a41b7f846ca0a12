//! virtio-rng: fills each device-writable buffer with bytes from the host's
//! `getrandom(2)`, at most [`MAX_PER_REQUEST`] per request.

use virtio_queue::{Queue, QueueT};

use super::chain::{self, Chain};
use super::{read_config_bytes, VirtioDevice, DEVICE_ID_RNG, QUEUE_SIZE, VIRTIO_F_VERSION_1};
use crate::memory::GuestMem;

/// Bytes of entropy handed out for one request.
pub const MAX_PER_REQUEST: usize = 64 * 1024;

/// The entropy device.
#[derive(Debug, Default)]
pub struct Rng {
    /// Requests refused as malformed (for tests and metrics).
    pub refused: u64,
}

impl Rng {
    fn serve(&self, chain: &Chain, mem: &GuestMem) -> u32 {
        let n = (chain.writable_len() as usize).min(MAX_PER_REQUEST);
        let mut bytes = vec![0u8; n];
        // getrandom(2) itself, never a file: the getrandom crate falls
        // back to opening /dev/urandom in a static binary (it finds the
        // libc function by dlsym), which the vCPU thread's filter refuses.
        let mut filled = 0;
        while filled < n {
            match rustix::rand::getrandom(
                &mut bytes[filled..],
                rustix::rand::GetRandomFlags::empty(),
            ) {
                Ok(k) => filled += k,
                Err(rustix::io::Errno::INTR) => {}
                Err(_) => return 0,
            }
        }
        chain.write_all(mem, &bytes).unwrap_or(0) as u32
    }
}

impl VirtioDevice for Rng {
    fn device_id(&self) -> u32 {
        DEVICE_ID_RNG
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn queue_count(&self) -> usize {
        1
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&[], offset, data);
    }
    fn process(&mut self, _index: usize, queue: &mut Queue, mem: &GuestMem) -> bool {
        let mut used = false;
        while let Some(raw) = queue.pop_descriptor_chain(mem) {
            let head = raw.head_index();
            // The writable total may exceed what we hand out; the bound only
            // keeps the walk itself small.
            let len = match chain::parse(raw, mem, usize::from(QUEUE_SIZE), u64::from(u32::MAX)) {
                Ok(c) => self.serve(&c, mem),
                Err(_) => {
                    self.refused += 1;
                    0
                }
            };
            used |= queue.add_used(mem, head, len).is_ok();
        }
        used
    }
}
