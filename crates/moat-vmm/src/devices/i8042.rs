//! The i8042 keyboard controller, kept only for its CPU reset command
//! (0xfe to port 0x64): Linux's `reboot=k` path, and how the guest ends the VM.

use std::sync::Arc;

use vm_superio::{I8042Device, Trigger};

use crate::vm::ExitState;
use crate::ExitReason;

/// Raised by the controller's reset command: asks every vCPU to stop.
pub struct ResetTrigger(pub Arc<ExitState>);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.set(ExitReason::Reset);
        Ok(())
    }
}

/// The controller at ports 0x60 (data) and 0x64 (command).
pub struct I8042(I8042Device<ResetTrigger>);

impl I8042 {
    /// A controller whose reset stops the VM through `exit`.
    pub fn new(exit: Arc<ExitState>) -> Self {
        I8042(I8042Device::new(ResetTrigger(exit)))
    }

    /// A guest `in`; `offset` is 0 for 0x60, 4 for 0x64.
    pub fn read(&mut self, offset: u8) -> u8 {
        self.0.read(offset)
    }

    /// A guest `out`; `offset` is 0 for 0x60, 4 for 0x64.
    pub fn write(&mut self, offset: u8, value: u8) {
        // The trigger cannot fail (Infallible).
        let _ = self.0.write(offset, value);
    }
}
