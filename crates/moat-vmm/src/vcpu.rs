//! One vCPU: its setup (CPUID, MSRs, FPU, LAPIC, and for the ones that start
//! running, registers for the 64-bit entry) and its thread's run loop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use kvm_bindings::{kvm_mp_state, CpuId, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};

use crate::bus::Bus;
use crate::snapshot::{self, VcpuState};
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

/// Where the vCPUs stop for a snapshot: the VM's main thread asks
/// ([`PauseGate::request`]), each vCPU completes the exit it was in,
/// saves its state and parks ([`PauseGate::park`]) until the main thread
/// has written the snapshot and releases them.
#[derive(Default)]
pub struct PauseGate {
    requested: AtomicBool,
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Default)]
struct GateState {
    /// Each vCPU's saved state once it has parked.
    saved: Vec<Option<Result<VcpuState, VmmError>>>,
    generation: u64,
}

impl PauseGate {
    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks `vcpus` vCPUs to park.
    pub fn request(&self, vcpus: usize) {
        let mut g = self.lock();
        g.saved = (0..vcpus).map(|_| None).collect();
        self.requested.store(true, Ordering::SeqCst);
    }

    /// Whether a pause is asked for.
    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// Every vCPU's state once all have parked (`None` before).
    pub fn take_if_parked(&self) -> Option<Vec<Result<VcpuState, VmmError>>> {
        let mut g = self.lock();
        if g.saved.iter().all(Option::is_some) {
            Some(g.saved.iter_mut().filter_map(Option::take).collect())
        } else {
            None
        }
    }

    /// Lets the vCPUs run on.
    pub fn release(&self) {
        let mut g = self.lock();
        self.requested.store(false, Ordering::SeqCst);
        g.saved.clear();
        g.generation += 1;
        self.changed.notify_all();
    }

    /// vCPU `index` parks with its state until released.
    fn park(&self, index: u8, saved: Result<VcpuState, VmmError>) {
        let mut g = self.lock();
        let generation = g.generation;
        if let Some(slot) = g.saved.get_mut(usize::from(index)) {
            *slot = Some(saved);
        }
        while self.requested.load(Ordering::SeqCst) && g.generation == generation {
            g = self.changed.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Handles one exit of vCPU `index`.
fn handle(index: u8, exit_kind: VcpuExit<'_>, bus: &Bus, exit: &ExitState) -> Result<(), VmmError> {
    match exit_kind {
        VcpuExit::IoOut(port, data) => bus.pio_write(port, data),
        VcpuExit::IoIn(port, data) => bus.pio_read(port, data),
        VcpuExit::MmioRead(addr, data) => bus.mmio_read(addr, data),
        VcpuExit::MmioWrite(addr, data) => bus.mmio_write(addr, data),
        VcpuExit::Shutdown => exit.set(ExitReason::TripleFault),
        VcpuExit::SystemEvent(kind, _) => exit.set(match kind {
            kvm_bindings::KVM_SYSTEM_EVENT_RESET => ExitReason::Reset,
            _ => ExitReason::PowerOff,
        }),
        VcpuExit::Hlt => exit.set(ExitReason::Halted),
        VcpuExit::Intr => {}
        other => {
            return Err(VmmError::GuestFault {
                index,
                what: format!("unexpected exit {other:?}"),
            })
        }
    }
    Ok(())
}

/// Completes the exit the vCPU took last (KVM finishes an I/O instruction
/// only when `KVM_RUN` is entered again: entered with `immediate_exit`, it
/// finishes it and returns at once), then reads its state.
fn complete_and_save(
    index: u8,
    fd: &mut VcpuFd,
    bus: &Bus,
    exit: &ExitState,
    msrs: &[u32],
) -> Result<VcpuState, VmmError> {
    fd.set_kvm_immediate_exit(1);
    let mut done = false;
    // A string I/O instruction may take several exits to complete.
    for _ in 0..64 {
        match fd.run() {
            Ok(e) => handle(index, e, bus, exit)?,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                done = true;
                break;
            }
            Err(source) => {
                fd.set_kvm_immediate_exit(0);
                return Err(VmmError::VcpuRun { index, source });
            }
        }
    }
    fd.set_kvm_immediate_exit(0);
    if !done {
        return Err(VmmError::GuestFault {
            index,
            what: "its last exit did not complete for the snapshot".into(),
        });
    }
    snapshot::save_vcpu(fd, msrs)
}

/// What a vCPU thread shares with the VM.
pub struct Shared {
    pub bus: Arc<Bus>,
    pub exit: Arc<ExitState>,
    pub gate: Arc<PauseGate>,
    /// The MSRs a snapshot saves.
    pub msrs: Arc<[u32]>,
}

/// Runs vCPU `index` until the VM stops; returns an error only for a failure
/// of this vCPU (which then stops the VM).
pub fn run(index: u8, mut fd: VcpuFd, shared: Shared) -> Result<(), VmmError> {
    let Shared {
        bus,
        exit,
        gate,
        msrs,
    } = shared;
    while !exit.is_set() {
        if gate.requested() {
            let saved = complete_and_save(index, &mut fd, &bus, &exit, &msrs);
            gate.park(index, saved);
            continue;
        }
        match fd.run() {
            Ok(e) => handle(index, e, &bus, &exit)?,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(source) => return Err(VmmError::VcpuRun { index, source }),
        }
    }
    Ok(())
}
