//! COM1: a 16550A (vm-superio) whose output goes to a host file descriptor.
//! Guest input is not wired: the agent channel is the virtio console.

use std::fs::File;
use std::io::{self, Write};

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};

/// Where serial output goes.
#[derive(Debug)]
pub enum SerialOut {
    /// A host file descriptor (a pipe, a file, a terminal).
    File(File),
    /// Nowhere.
    Sink,
}

impl Write for SerialOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            SerialOut::File(f) => f.write(buf),
            SerialOut::Sink => Ok(buf.len()),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            SerialOut::File(f) => f.flush(),
            SerialOut::Sink => Ok(()),
        }
    }
}

/// The 8 registers of the UART at its base port.
pub struct SerialDevice<T: Trigger> {
    uart: Serial<T, NoEvents, SerialOut>,
}

impl<T: Trigger> SerialDevice<T> {
    /// A UART raising `irq` and writing to `out`.
    pub fn new(irq: T, out: SerialOut) -> Self {
        SerialDevice {
            uart: Serial::new(irq, out),
        }
    }

    /// A UART with the registers of a saved one.
    pub fn restore(irq: T, out: SerialOut, state: &SerialState) -> Result<Self, String> {
        let uart = Serial::from_state(state, irq, NoEvents, out)
            .map_err(|_| "COM1's saved receive FIFO is over-full".to_string())?;
        Ok(SerialDevice { uart })
    }

    /// The registers, for a snapshot.
    pub fn state(&self) -> SerialState {
        self.uart.state()
    }

    /// A guest `in` from base + `offset`.
    pub fn read(&mut self, offset: u8) -> u8 {
        self.uart.read(offset)
    }

    /// A guest `out` to base + `offset`. A failing host writer loses the byte:
    /// the guest cannot be told, and must not be able to stop the VMM by it.
    pub fn write(&mut self, offset: u8, value: u8) {
        let _ = self.uart.write(offset, value);
    }
}
