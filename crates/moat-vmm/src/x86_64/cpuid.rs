//! CPUID: what KVM supports on this host, passed through, then filtered per
//! vCPU so each sees its own APIC id, the vCPU count, and the hypervisor bit.

use kvm_bindings::CpuId;

/// Leaf 1 ECX bit 31: "running under a hypervisor".
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 ECX bit 3: MONITOR/MWAIT, which a guest must not use to idle a host core.
const LEAF1_ECX_MONITOR: u32 = 1 << 3;
/// Leaf 1 EDX bit 28: HTT, "EBX[23:16] is valid".
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Leaf 6: thermal and power management, meaningless in a guest.
const LEAF_THERMAL: u32 = 6;

/// Applies the per-vCPU filter to a copy of the host's supported CPUID.
pub fn filter(cpuid: &mut CpuId, vcpu_index: u8, vcpu_count: u8) {
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                // EBX[31:24] initial APIC id, EBX[23:16] logical processors,
                // EBX[15:8] CLFLUSH line size in 8-byte units (kept).
                entry.ebx = (entry.ebx & 0x0000_ffff)
                    | (u32::from(vcpu_index) << 24)
                    | (u32::from(vcpu_count) << 16);
                entry.ecx = (entry.ecx | LEAF1_ECX_HYPERVISOR) & !LEAF1_ECX_MONITOR;
                if vcpu_count > 1 {
                    entry.edx |= LEAF1_EDX_HTT;
                }
            }
            LEAF_THERMAL => {
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            // Extended topology: EDX is the x2APIC id of this vCPU.
            0xb | 0x1f => entry.edx = u32::from(vcpu_index),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn apic_id_and_count_are_set() {
        let host = [
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xff00_0800,
                ecx: LEAF1_ECX_MONITOR,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                edx: 7,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 6,
                eax: 5,
                ..Default::default()
            },
        ];
        let mut c = CpuId::from_entries(&host).unwrap();
        filter(&mut c, 3, 4);
        let e = c.as_slice();
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_eq!(e[0].ebx & 0xffff, 0x0800);
        assert_ne!(e[0].ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_eq!(e[0].ecx & LEAF1_ECX_MONITOR, 0);
        assert_eq!(e[1].edx, 3);
        assert_eq!(e[2].eax, 0);
    }
}
