//! Registers, GDT and identity page tables for entering 64-bit code directly
//! (the Linux boot protocol's 64-bit entry: long mode, paging on, the kernel
//! and zero page identity-mapped, RSI = zero page).

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{
    BOOT_STACK_TOP, GDT_ADDR, IDT_ADDR, PDPT_ADDR, PD_ADDR, PML4_ADDR, ZERO_PAGE_ADDR,
};
use crate::memory::GuestMem;
use crate::VmmError;

const X86_CR0_PE: u64 = 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// Page-table entry: present, writable.
const PTE_PRESENT_RW: u64 = 0x3;
/// Page-directory entry for a 2 MiB page: present, writable, page size.
const PDE_2M: u64 = 0x83;

/// Boot GDT: null, 64-bit code, data, TSS.
const GDT: [u64; 4] = [
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x008f_8b00_0000_ffff,
];
const CODE_SELECTOR: u16 = 0x08;
const DATA_SELECTOR: u16 = 0x10;
const TSS_SELECTOR: u16 = 0x18;

/// Writes the GDT, an empty IDT and identity page tables for the low 4 GiB.
pub fn write_boot_tables(mem: &GuestMem) -> Result<(), VmmError> {
    let w = |what, r: Result<(), vm_memory::GuestMemoryError>| {
        r.map_err(|e| VmmError::WriteBootData(what, e))
    };
    for (i, entry) in GDT.iter().enumerate() {
        w(
            "GDT",
            mem.write_obj(*entry, GuestAddress(GDT_ADDR + 8 * i as u64)),
        )?;
    }
    w("IDT", mem.write_obj(0u64, GuestAddress(IDT_ADDR)))?;
    w(
        "page tables",
        mem.write_obj(PDPT_ADDR | PTE_PRESENT_RW, GuestAddress(PML4_ADDR)),
    )?;
    for dir in 0..4u64 {
        let pd = PD_ADDR + dir * 0x1000;
        w(
            "page tables",
            mem.write_obj(pd | PTE_PRESENT_RW, GuestAddress(PDPT_ADDR + dir * 8)),
        )?;
        for i in 0..512u64 {
            let phys = ((dir << 9) + i) << 21;
            w(
                "page tables",
                mem.write_obj(phys | PDE_2M, GuestAddress(pd + i * 8)),
            )?;
        }
    }
    Ok(())
}

fn segment(selector: u16, type_: u8, l: u8, db: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s: u8::from(selector != TSS_SELECTOR),
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Long mode with paging, flat segments from the boot GDT.
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = segment(CODE_SELECTOR, 0xb, 1, 0);
    let data = segment(DATA_SELECTOR, 0x3, 0, 1);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(TSS_SELECTOR, 0xb, 0, 0);
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = X86_CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// General registers for entering at `entry`.
pub fn entry_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_TOP,
        rbp: BOOT_STACK_TOP,
        rsi: ZERO_PAGE_ADDR,
        ..Default::default()
    }
}

/// The x87 and SSE state after reset.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let b = &lapic.regs[offset..offset + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
        lapic.regs[offset + i] = byte as _;
    }
}

fn delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// LINT0 delivers the 8259's ExtINT, LINT1 NMIs: how the legacy interrupt
/// lines reach the vCPU before the guest programs its APIC.
pub fn legacy_lint(mut lapic: kvm_lapic_state) -> kvm_lapic_state {
    let lvt0 = lapic_reg(&lapic, APIC_LVT0);
    set_lapic_reg(&mut lapic, APIC_LVT0, delivery_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(&lapic, APIC_LVT1);
    set_lapic_reg(&mut lapic, APIC_LVT1, delivery_mode(lvt1, APIC_MODE_NMI));
    lapic
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn identity_map_covers_4g() {
        let mem: GuestMem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4, PDPT_ADDR | PTE_PRESENT_RW);
        let last_pde: u64 = mem
            .read_obj(GuestAddress(PD_ADDR + 3 * 0x1000 + 511 * 8))
            .unwrap();
        assert_eq!(last_pde, (0xffe0_0000) | PDE_2M);
    }

    #[test]
    fn lint_modes() {
        let l = legacy_lint(kvm_lapic_state::default());
        assert_eq!((lapic_reg(&l, APIC_LVT0) >> 8) & 7, APIC_MODE_EXTINT);
        assert_eq!((lapic_reg(&l, APIC_LVT1) >> 8) & 7, APIC_MODE_NMI);
    }
}
