//! Where a vCPU's port I/O and MMIO exits go: COM1, the i8042, and the
//! virtio-mmio windows. Anything else reads as all ones and ignores writes,
//! as an empty bus does.

use std::sync::{Arc, Mutex};

use crate::devices::i8042::I8042;
use crate::devices::serial::SerialDevice;
use crate::devices::IrqLine;
use crate::layout::{I8042_COMMAND_PORT, I8042_DATA_PORT, MMIO_DEVICE_SIZE, SERIAL_PORT};

/// A device in an MMIO window.
pub trait MmioDevice: Send {
    /// A guest read at `offset` into the window.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A guest write at `offset` into the window.
    fn write(&mut self, offset: u64, data: &[u8]);
    /// The transport's state, for a snapshot.
    fn state(&self) -> crate::snapshot::TransportState;
    /// Takes a saved transport's state (refused if it does not fit).
    fn set_state(&mut self, s: &crate::snapshot::TransportState) -> Result<(), String>;
}

impl<D: crate::virtio::VirtioDevice, T: vm_superio::Trigger + Send> MmioDevice
    for crate::virtio::mmio::MmioTransport<D, T>
{
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        crate::virtio::mmio::MmioTransport::read(self, offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        crate::virtio::mmio::MmioTransport::write(self, offset, data);
    }
    fn state(&self) -> crate::snapshot::TransportState {
        crate::virtio::mmio::MmioTransport::state(self)
    }
    fn set_state(&mut self, s: &crate::snapshot::TransportState) -> Result<(), String> {
        crate::virtio::mmio::MmioTransport::set_state(self, s)
    }
}

/// One virtio-mmio window.
pub struct MmioSlot {
    /// Base guest physical address.
    pub base: u64,
    /// The device.
    pub device: Arc<Mutex<dyn MmioDevice>>,
}

/// All devices the vCPUs can reach.
pub struct Bus {
    serial: Mutex<SerialDevice<IrqLine>>,
    i8042: Mutex<I8042>,
    mmio: Vec<MmioSlot>,
}

pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic in one vCPU thread is a VMM bug that ends the VM anyway; the
    // device state is still the best there is.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Bus {
    /// The bus of one VM.
    pub fn new(serial: SerialDevice<IrqLine>, i8042: I8042, mmio: Vec<MmioSlot>) -> Self {
        Bus {
            serial: Mutex::new(serial),
            i8042: Mutex::new(i8042),
            mmio,
        }
    }

    /// A guest `in`.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        data.fill(0xff);
        if data.len() != 1 {
            return;
        }
        match port {
            p if (SERIAL_PORT..SERIAL_PORT + 8).contains(&p) => {
                data[0] = lock(&self.serial).read((p - SERIAL_PORT) as u8);
            }
            I8042_DATA_PORT | I8042_COMMAND_PORT => {
                data[0] = lock(&self.i8042).read((port - I8042_DATA_PORT) as u8);
            }
            _ => {}
        }
    }

    /// A guest `out`.
    pub fn pio_write(&self, port: u16, data: &[u8]) {
        if data.len() != 1 {
            return;
        }
        match port {
            p if (SERIAL_PORT..SERIAL_PORT + 8).contains(&p) => {
                lock(&self.serial).write((p - SERIAL_PORT) as u8, data[0]);
            }
            I8042_DATA_PORT | I8042_COMMAND_PORT => {
                lock(&self.i8042).write((port - I8042_DATA_PORT) as u8, data[0]);
            }
            _ => {}
        }
    }

    /// Runs `f` with COM1's registers and every transport's state while
    /// holding every device (the vCPUs paused): an I/O thread that has
    /// input for the guest waits, so neither guest memory nor a queue
    /// moves while a snapshot is written.
    pub fn with_state<R>(
        &self,
        f: impl FnOnce(vm_superio::serial::SerialState, Vec<crate::snapshot::TransportState>) -> R,
    ) -> R {
        let serial = lock(&self.serial);
        let devices: Vec<_> = self.mmio.iter().map(|s| lock(&s.device)).collect();
        let transports = devices.iter().map(|d| d.state()).collect();
        f(serial.state(), transports)
    }

    fn mmio_slot(&self, addr: u64) -> Option<(&MmioSlot, u64)> {
        self.mmio
            .iter()
            .find(|s| addr >= s.base && addr - s.base < MMIO_DEVICE_SIZE)
            .map(|s| (s, addr - s.base))
    }

    /// A guest load from an address that is not RAM.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match self.mmio_slot(addr) {
            Some((slot, offset)) => lock(&slot.device).read(offset, data),
            None => data.fill(0xff),
        }
    }

    /// A guest store to an address that is not RAM.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Some((slot, offset)) = self.mmio_slot(addr) {
            lock(&slot.device).write(offset, data);
        }
    }
}
