//! The VMM's only `unsafe` code: telling KVM which host memory backs a guest
//! memory slot. Everything else goes through safe rust-vmm APIs.
#![allow(unsafe_code)]

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryRegion, GuestRegionMmap};

/// Registers `region` as KVM memory slot `slot`.
pub fn register(
    vm: &VmFd,
    slot: u32,
    region: &GuestRegionMmap<()>,
) -> Result<(), kvm_ioctls::Error> {
    let kvm_region = kvm_userspace_memory_region {
        slot,
        guest_phys_addr: region.start_addr().0,
        memory_size: region.len(),
        userspace_addr: region.as_ptr() as u64,
        flags: 0,
    };
    // SAFETY: `region` is a live private mapping (anonymous, or of a
    // snapshot file, copy-on-write) of exactly `region.len()`
    // bytes owned by vm-memory (an `Arc<MmapRegion>`), so the host range is
    // valid. The VMM keeps a clone of the `GuestMemoryMmap` holding this
    // region in `Vm` until after the `VmFd` is dropped (field order in
    // `Vm`, and vCPU threads are joined before `Vm::run` returns), so the
    // mapping outlives KVM's use of it. Slots come from distinct,
    // non-overlapping regions of one `GuestMemoryMmap` (vm-memory refuses
    // overlapping ranges), numbered 0..n, so no slot overlaps another.
    unsafe { vm.set_user_memory_region(kvm_region) }
}
