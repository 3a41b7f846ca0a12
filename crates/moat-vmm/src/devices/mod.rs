//! Legacy devices on port I/O: the COM1 serial console and the i8042 (used
//! only for its reset line). Both are vm-superio models.

pub mod i8042;
pub mod serial;

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

/// An interrupt line: an eventfd registered with KVM as an irqfd for a GSI,
/// so a write raises the line (edge) in the in-kernel interrupt controller.
#[derive(Debug)]
pub struct IrqLine(EventFd);

impl IrqLine {
    /// Wraps an eventfd already registered as an irqfd.
    pub fn new(fd: EventFd) -> Self {
        IrqLine(fd)
    }

    /// The eventfd (for a device whose back-end signals it directly).
    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }
}

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
