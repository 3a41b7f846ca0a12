//! Snapshots of a running VM: [`crate::vm::SnapshotHandle::save`] pauses
//! the vCPUs, writes the guest's memory and every piece of state KVM and
//! the devices hold into one file, and lets the VM run on;
//! [`crate::Vm::restore`] builds a VM from the same configuration whose
//! memory is that file mapped copy-on-write (pages are read in as the
//! guest touches them) and whose vCPUs, interrupt controllers, timers and
//! devices carry on where the saved ones were.
//!
//! The file: guest RAM first, each region at its offset in a
//! concatenation of the regions (page-aligned, so it maps directly; pages
//! that were all zeros are holes), then the state as JSON, then a trailer
//! (the JSON's length, little-endian u64, and [`MAGIC`]).
//!
//! What a snapshot holds, per vCPU: general and special registers, the
//! FPU/SSE/AVX state (XSAVE) and XCR0, the local APIC, every MSR KVM lists
//! as saveable, the multiprocessor state, pending events and the debug
//! registers. Per VM: both PICs, the I/O APIC, the PIT and the KVM clock.
//! Devices: COM1's registers and every virtio-mmio transport with its
//! queues. Not held: bytes a host socket had queued for the guest and not
//! yet delivered (the agent console's, the network card's: a restored VM
//! gets new sockets), and the i8042's registers (Linux only ever sends it
//! the reset command after boot).
//!
//! A snapshot restores only into a VM of the same configuration (vCPUs,
//! memory, the device list by kind and order); the caller keys its cache
//! by the kernel, initramfs and command line too (the guest's memory holds
//! them), and by the host (CPUID and MSRs are the host's KVM's).

use std::fs::File;
use std::os::unix::fs::FileExt;

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vm_superio::serial::SerialState;

use crate::memory::GuestMem;
use crate::VmmError;

/// The trailer's magic (the format's version is in it).
pub const MAGIC: &[u8; 8] = b"MOATVM01";
/// The state's size limit when reading (a confused or hostile file cannot
/// make the VMM allocate more).
const MAX_STATE: u64 = 16 << 20;
const PAGE: usize = 4096;

fn kvm_io(e: kvm_ioctls::Error) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.errno())
}

/// One vCPU's state.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    regs: kvm_regs,
    sregs: kvm_sregs,
    xsave: kvm_xsave,
    xcrs: kvm_xcrs,
    lapic: kvm_lapic_state,
    msrs: Vec<kvm_msr_entry>,
    mp_state: kvm_mp_state,
    events: kvm_vcpu_events,
    debugregs: kvm_debugregs,
}

/// The VM's in-kernel devices.
#[derive(Serialize, Deserialize)]
pub struct KvmVmState {
    pic_master: kvm_irqchip,
    pic_slave: kvm_irqchip,
    ioapic: kvm_irqchip,
    pit: kvm_pit_state2,
    clock: kvm_clock_data,
}

/// The serde shape of COM1's registers (vm-superio's `SerialState`, which
/// has no serde of its own).
#[derive(Serialize, Deserialize)]
#[serde(remote = "SerialState")]
struct SerialRegs {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

/// One virtqueue (virtio-queue's `QueueState`, which has no serde).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRegs {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

/// One virtio-mmio transport: its registers and queues.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    /// The device's id: a restore checks the device in this slot is of the same kind.
    pub device_id: u32,
    pub queues: Vec<QueueRegs>,
    pub queue_sel: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub status: u32,
    pub interrupt_status: u32,
}

/// Everything but memory.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    /// Guest RAM in MiB (the file's memory part is its regions).
    pub mem_mib: u64,
    /// The guest's command line as it got it.
    pub cmdline: String,
    pub vcpus: Vec<VcpuState>,
    pub kvm: KvmVmState,
    /// COM1's registers.
    #[serde(with = "SerialRegs")]
    pub serial: SerialState,
    pub transports: Vec<TransportState>,
}

/// The MSRs KVM can save and restore for this host, for [`save_vcpu`].
pub fn saveable_msrs(kvm: &Kvm) -> Result<Vec<u32>, VmmError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(|e| VmmError::snapshot("list the MSRs", kvm_io(e)))?;
    Ok(list.as_slice().to_vec())
}

/// Reads the MSRs in `indices` that this vCPU answers for; one KVM refuses
/// (the list names some a given CPU model lacks) is left out.
fn get_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, VmmError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest: &[u32] = indices;
    while !rest.is_empty() {
        let chunk: Vec<kvm_msr_entry> = rest
            .iter()
            .take(kvm_bindings::KVM_MAX_MSR_ENTRIES)
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&chunk)
            .map_err(|_| VmmError::snapshot("list MSRs", std::io::Error::other("too many")))?;
        let n = fd
            .get_msrs(&mut msrs)
            .map_err(|e| VmmError::snapshot("read MSRs", kvm_io(e)))?;
        out.extend_from_slice(&msrs.as_slice()[..n]);
        // Entry `n` was refused: skip it.
        let skip = if n < chunk.len() { n + 1 } else { n };
        rest = &rest[skip..];
    }
    Ok(out)
}

/// Reads vCPU state. The vCPU must be out of `KVM_RUN` with any exit it
/// took completed (`KVM_RUN` re-entered with `immediate_exit`).
pub fn save_vcpu(fd: &VcpuFd, msrs: &[u32]) -> Result<VcpuState, VmmError> {
    let e = |step: &'static str| move |e: kvm_ioctls::Error| VmmError::snapshot(step, kvm_io(e));
    Ok(VcpuState {
        mp_state: fd.get_mp_state().map_err(e("read MP state"))?,
        regs: fd.get_regs().map_err(e("read registers"))?,
        sregs: fd.get_sregs().map_err(e("read special registers"))?,
        xsave: fd.get_xsave().map_err(e("read XSAVE state"))?,
        xcrs: fd.get_xcrs().map_err(e("read XCRs"))?,
        debugregs: fd.get_debug_regs().map_err(e("read debug registers"))?,
        lapic: fd.get_lapic().map_err(e("read the local APIC"))?,
        msrs: get_msrs(fd, msrs)?,
        events: fd.get_vcpu_events().map_err(e("read pending events"))?,
    })
}

/// Writes vCPU state into a vCPU created for this VM (CPUID set).
pub fn restore_vcpu(fd: &VcpuFd, s: &VcpuState) -> Result<(), VmmError> {
    let e = |step: &'static str| move |e: kvm_ioctls::Error| VmmError::snapshot(step, kvm_io(e));
    fd.set_mp_state(s.mp_state).map_err(e("set MP state"))?;
    fd.set_regs(&s.regs).map_err(e("set registers"))?;
    fd.set_sregs(&s.sregs).map_err(e("set special registers"))?;
    crate::kvm_xsave::set(fd, &s.xsave).map_err(e("set XSAVE state"))?;
    fd.set_xcrs(&s.xcrs).map_err(e("set XCRs"))?;
    fd.set_debug_regs(&s.debugregs)
        .map_err(e("set debug registers"))?;
    // The APIC before the MSRs: the TSC deadline MSR needs the APIC's mode.
    fd.set_lapic(&s.lapic).map_err(e("set the local APIC"))?;
    let msrs = Msrs::from_entries(&s.msrs)
        .map_err(|_| VmmError::snapshot("set MSRs", std::io::Error::other("too many")))?;
    let n = fd.set_msrs(&msrs).map_err(e("set MSRs"))?;
    if n != s.msrs.len() {
        let index = s.msrs.get(n).map_or(0, |m| m.index);
        return Err(VmmError::snapshot(
            format!("set MSRs: KVM refused MSR {index:#x}"),
            std::io::Error::from_raw_os_error(libc::EINVAL),
        ));
    }
    fd.set_vcpu_events(&s.events)
        .map_err(e("set pending events"))?;
    Ok(())
}

fn irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, VmmError> {
    let mut c = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut c)
        .map_err(|e| VmmError::snapshot("read an interrupt controller", kvm_io(e)))?;
    Ok(c)
}

/// Reads the VM's in-kernel devices (vCPUs paused).
pub fn save_kvm_vm(vm: &VmFd) -> Result<KvmVmState, VmmError> {
    let mut clock = vm
        .get_clock()
        .map_err(|e| VmmError::snapshot("read the KVM clock", kvm_io(e)))?;
    // Restored as the value it had: the guest's clock goes on from where it
    // was saved (moat's agent sets the wall clock on each run), not from
    // the host's time (KVM_CLOCK_REALTIME) or TSC.
    clock.flags = 0;
    Ok(KvmVmState {
        pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm
            .get_pit2()
            .map_err(|e| VmmError::snapshot("read the PIT", kvm_io(e)))?,
        clock,
    })
}

/// Writes the VM's in-kernel devices (created, vCPUs not yet restored).
pub fn restore_kvm_vm(vm: &VmFd, s: &KvmVmState) -> Result<(), VmmError> {
    let e = |step: &'static str| move |e: kvm_ioctls::Error| VmmError::snapshot(step, kvm_io(e));
    vm.set_pit2(&s.pit).map_err(e("set the PIT"))?;
    vm.set_clock(&s.clock).map_err(e("set the KVM clock"))?;
    for c in [&s.pic_master, &s.pic_slave, &s.ioapic] {
        vm.set_irqchip(c)
            .map_err(e("set an interrupt controller"))?;
    }
    Ok(())
}

/// The offset of each RAM region in the file: the regions one after the other.
fn region_offsets(mem: &GuestMem) -> Vec<(u64, u64)> {
    let mut at = 0u64;
    mem.iter()
        .map(|r| {
            let o = (at, r.len());
            at += r.len();
            o
        })
        .collect()
}

/// Writes guest memory then `state` to `out` (from its start; the file is
/// truncated to what it holds). Pages of zeros are left as holes.
pub fn write(out: &File, mem: &GuestMem, state: &VmState) -> Result<(), VmmError> {
    let io = |step: &'static str| move |e: std::io::Error| VmmError::snapshot(step, e);
    out.set_len(0).map_err(io("truncate the snapshot file"))?;
    let mut end = 0u64;
    let mut page = vec![0u8; PAGE * 64];
    for (region, (offset, len)) in mem.iter().zip(region_offsets(mem)) {
        let slice = region
            .get_slice(vm_memory::MemoryRegionAddress(0), len as usize)
            .map_err(|e| VmmError::snapshot("map guest memory", std::io::Error::other(e)))?;
        for (from, to) in
            crate::memory::data_ranges(region).map_err(io("find guest memory's data"))?
        {
            let (mut at, to) = (from as usize, to as usize);
            while at < to {
                let n = page.len().min(to - at);
                let chunk = slice.subslice(at, n).map_err(|e| {
                    VmmError::snapshot("read guest memory", std::io::Error::other(e))
                })?;
                chunk.copy_to(&mut page[..n]);
                write_nonzero(out, &page[..n], offset + at as u64)
                    .map_err(io("write guest memory"))?;
                at += n;
            }
        }
        end = offset + len;
    }
    let json = serde_json::to_vec(state)
        .map_err(|e| VmmError::snapshot("encode the VM state", std::io::Error::other(e)))?;
    let mut tail = json;
    tail.extend_from_slice(&(tail.len() as u64).to_le_bytes());
    tail.extend_from_slice(MAGIC);
    out.write_all_at(&tail, end)
        .map_err(io("write the VM state"))?;
    out.sync_data().map_err(io("sync the snapshot"))?;
    Ok(())
}

/// Writes the pages of `buf` that are not all zeros at `at` in `out`, each
/// run of them in one write (the zero pages stay holes).
fn write_nonzero(out: &File, buf: &[u8], at: u64) -> std::io::Result<()> {
    let zero = |p: usize| is_zero(&buf[p..(p + PAGE).min(buf.len())]);
    let mut p = 0;
    while p < buf.len() {
        if zero(p) {
            p += PAGE;
            continue;
        }
        let mut end = p + PAGE;
        while end < buf.len() && !zero(end) {
            end += PAGE;
        }
        let end = end.min(buf.len());
        out.write_all_at(&buf[p..end], at + p as u64)?;
        p = end;
    }
    Ok(())
}

/// Whether `b` (a whole number of 16-byte words: pages) is all zeros.
fn is_zero(b: &[u8]) -> bool {
    b.chunks(16).all(|c| match <[u8; 16]>::try_from(c) {
        Ok(w) => u128::from_ne_bytes(w) == 0,
        Err(_) => c.iter().all(|&x| x == 0),
    })
}

/// Reads the state part of a snapshot file (its memory is mapped by
/// [`crate::memory::restore`]); checks it was saved with `mem_mib` MiB.
pub fn read_state(file: &File, mem_mib: u64) -> Result<VmState, VmmError> {
    let bad =
        |why: &str| VmmError::snapshot("read the snapshot", std::io::Error::other(why.to_string()));
    let size = file
        .metadata()
        .map_err(|e| VmmError::snapshot("read the snapshot", e))?
        .len();
    let ram: u64 = crate::memory::ram_ranges(mem_mib)
        .iter()
        .map(|(_, len)| *len as u64)
        .sum();
    if size < ram + 16 {
        return Err(bad(
            "too short for this VM's memory (a VM of another size?)",
        ));
    }
    let mut trailer = [0u8; 16];
    file.read_exact_at(&mut trailer, size - 16)
        .map_err(|e| VmmError::snapshot("read the snapshot", e))?;
    if &trailer[8..] != MAGIC {
        return Err(bad("not a moat-vmm snapshot (or another version)"));
    }
    let len = u64::from_le_bytes(trailer[..8].try_into().unwrap_or_default());
    if len > MAX_STATE || ram + len + 16 != size {
        return Err(bad("its state does not fit this VM's memory size"));
    }
    let mut json = vec![0u8; len as usize];
    file.read_exact_at(&mut json, ram)
        .map_err(|e| VmmError::snapshot("read the snapshot", e))?;
    let state: VmState = serde_json::from_slice(&json)
        .map_err(|e| VmmError::snapshot("decode the VM state", std::io::Error::other(e)))?;
    if state.mem_mib != mem_mib {
        return Err(bad("saved with another memory size"));
    }
    Ok(state)
}

/// Checks `state` fits a VM of `vcpus` vCPUs and these devices.
pub fn check_fits(state: &VmState, vcpus: u8, device_ids: &[u32]) -> Result<(), VmmError> {
    let saved: Vec<u32> = state.transports.iter().map(|t| t.device_id).collect();
    let why = if state.vcpus.len() != usize::from(vcpus) {
        format!("saved with {} vCPUs, not {vcpus}", state.vcpus.len())
    } else if saved != device_ids {
        format!("saved with virtio devices {saved:?}, not {device_ids:?}")
    } else {
        return Ok(());
    };
    Err(VmmError::snapshot(
        "match the snapshot to this VM",
        std::io::Error::other(why),
    ))
}

/// The `ioctl` requests a snapshot's save issues, for seccomp filters:
/// on each vCPU's thread, and on the VM's main thread.
pub mod requests {
    #![allow(non_snake_case, clippy::missing_docs_in_private_items)]
    use kvm_bindings::{
        kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msrs,
        kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, KVMIO,
    };
    use vmm_sys_util::{ioctl_ior_nr, ioctl_iowr_nr};

    ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
    ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
    ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
    ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
    ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
    ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
    ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
    ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
    ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
    ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_irqchip);
    ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_pit_state2);
    ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_clock_data);

    /// A vCPU thread reading its own state.
    pub fn vcpu() -> [u64; 9] {
        [
            KVM_GET_REGS(),
            KVM_GET_SREGS(),
            KVM_GET_MSRS(),
            KVM_GET_LAPIC(),
            KVM_GET_MP_STATE(),
            KVM_GET_VCPU_EVENTS(),
            KVM_GET_DEBUGREGS(),
            KVM_GET_XSAVE(),
            KVM_GET_XCRS(),
        ]
    }

    /// The main thread reading the VM's in-kernel devices.
    pub fn vm() -> [u64; 3] {
        [KVM_GET_IRQCHIP(), KVM_GET_PIT2(), KVM_GET_CLOCK()]
    }
}
