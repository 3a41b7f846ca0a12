//! The VMM's second `unsafe` call: writing a vCPU's XSAVE area back from a
//! snapshot (kvm-ioctls marks `KVM_SET_XSAVE` unsafe because with
//! dynamically enabled XSTATE features the kernel would read past the
//! 4 KiB structure).
#![allow(unsafe_code)]

use kvm_bindings::kvm_xsave;
use kvm_ioctls::VcpuFd;

/// `KVM_SET_XSAVE` with a 4 KiB `kvm_xsave`.
pub fn set(fd: &VcpuFd, xsave: &kvm_xsave) -> Result<(), kvm_ioctls::Error> {
    // SAFETY: the kernel reads more than the 4096 bytes of `kvm_xsave` only
    // when the VMM process has enabled a dynamic XSTATE feature for its
    // guests (AMX, through `arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM)`); moat's
    // VMM never does (its seccomp filters do not even allow `arch_prctl`
    // once the VM is built), so the guest's XSAVE area fits the struct and
    // the kernel reads only `*xsave`, which lives for the call.
    unsafe { fd.set_xsave(xsave) }
}
