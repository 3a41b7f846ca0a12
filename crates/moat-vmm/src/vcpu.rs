//! One vCPU: its setup (CPUID, MSRs, FPU, LAPIC, and for the ones that start
//! running, registers for the 64-bit entry) and its thread's run loop.

use std::sync::Arc;

use kvm_bindings::{kvm_mp_state, CpuId, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};

use crate::bus::Bus;
use crate::vm::ExitState;
use crate::x86_64::{cpuid, msr, regs};
use crate::{ExitReason, VmmError};

/// Creates vCPU `index` and gives it everything but its entry registers.
pub fn create(vm: &VmFd, index: u8, count: u8, host_cpuid: &CpuId) -> Result<VcpuFd, VmmError> {
    let fd = vm
        .create_vcpu(u64::from(index))
        .map_err(|source| VmmError::CreateVcpu { index, source })?;
    let step = |step| {
        move |source| VmmError::VcpuSetup {
            index,
            step,
            source,
        }
    };
    let mut c = host_cpuid.clone();
    cpuid::filter(&mut c, index, count);
    fd.set_cpuid2(&c).map_err(step("set CPUID"))?;
    let msrs = msr::boot_msrs().map_err(|_| VmmError::VcpuSetup {
        index,
        step: "build MSR list",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    let written = fd.set_msrs(&msrs).map_err(step("set MSRs"))?;
    if written != msrs.as_slice().len() {
        return Err(VmmError::VcpuSetup {
            index,
            step: "set MSRs (some refused)",
            source: kvm_ioctls::Error::new(libc::EINVAL),
        });
    }
    fd.set_fpu(&regs::boot_fpu()).map_err(step("set FPU"))?;
    let lapic = fd.get_lapic().map_err(step("get LAPIC"))?;
    fd.set_lapic(&regs::legacy_lint(lapic))
        .map_err(step("set LAPIC"))?;
    Ok(fd)
}

/// Makes vCPU `index` start at `entry` in long mode (instead of waiting for
/// the boot vCPU's INIT/SIPI).
pub fn set_entry(fd: &VcpuFd, index: u8, entry: u64) -> Result<(), VmmError> {
    let step = |step| {
        move |source| VmmError::VcpuSetup {
            index,
            step,
            source,
        }
    };
    let sregs = fd.get_sregs().map_err(step("get sregs"))?;
    fd.set_sregs(&regs::long_mode_sregs(sregs))
        .map_err(step("set sregs"))?;
    fd.set_regs(&regs::entry_regs(entry))
        .map_err(step("set regs"))?;
    fd.set_mp_state(kvm_mp_state {
        mp_state: KVM_MP_STATE_RUNNABLE,
    })
    .map_err(step("set MP state"))?;
    Ok(())
}

/// Runs vCPU `index` until the VM stops; returns an error only for a failure
/// of this vCPU (which then stops the VM).
pub fn run(index: u8, mut fd: VcpuFd, bus: Arc<Bus>, exit: Arc<ExitState>) -> Result<(), VmmError> {
    while !exit.is_set() {
        match fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => bus.pio_write(port, data),
            Ok(VcpuExit::IoIn(port, data)) => bus.pio_read(port, data),
            Ok(VcpuExit::MmioRead(addr, data)) => bus.mmio_read(addr, data),
            Ok(VcpuExit::MmioWrite(addr, data)) => bus.mmio_write(addr, data),
            Ok(VcpuExit::Shutdown) => exit.set(ExitReason::TripleFault),
            Ok(VcpuExit::SystemEvent(kind, _)) => exit.set(match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => ExitReason::Reset,
                _ => ExitReason::PowerOff,
            }),
            Ok(VcpuExit::Hlt) => exit.set(ExitReason::Halted),
            Ok(VcpuExit::Intr) => {}
            Ok(other) => {
                return Err(VmmError::GuestFault {
                    index,
                    what: format!("unexpected exit {other:?}"),
                })
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(source) => return Err(VmmError::VcpuRun { index, source }),
        }
    }
    Ok(())
}
