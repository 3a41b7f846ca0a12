//! The Intel MultiProcessor table (MP spec 1.4): how a Linux guest without
//! ACPI learns how many vCPUs there are and where the I/O APIC is. The
//! floating pointer sits at the start of the EBDA (0x9fc00), which Linux scans.

use vm_memory::{Bytes, GuestAddress};

use crate::layout::{IOAPIC_ADDR, LAPIC_ADDR};
use crate::memory::GuestMem;
use crate::VmmError;

/// Where the floating pointer goes; the configuration table follows it.
pub const MPTABLE_ADDR: u64 = 0x9_fc00;
const IOAPIC_PINS: u8 = 24;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const SPEC_REV: u8 = 4;
const CPU_ENABLED: u8 = 1;
const CPU_BOOT: u8 = 2;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const ISA_BUS: u8 = 0;
const FLOATING_LEN: usize = 16;
const HEADER_LEN: usize = 44;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

fn entries(vcpus: u8) -> (Vec<u8>, u16) {
    let ioapic_id = vcpus;
    let mut e = Vec::new();
    let mut count = 0u16;
    for id in 0..vcpus {
        e.extend_from_slice(&[ENTRY_PROCESSOR, id, APIC_VERSION]);
        e.push(CPU_ENABLED | if id == 0 { CPU_BOOT } else { 0 });
        e.extend_from_slice(&0x600u32.to_le_bytes()); // signature: family 6
        e.extend_from_slice(&0x201u32.to_le_bytes()); // features: FPU, APIC
        e.extend_from_slice(&[0; 8]);
        count += 1;
    }
    e.extend_from_slice(&[ENTRY_BUS, ISA_BUS]);
    e.extend_from_slice(b"ISA   ");
    e.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    e.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 2;
    for pin in 0..IOAPIC_PINS {
        e.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            ISA_BUS,
            pin,
            ioapic_id,
            pin,
        ]);
        count += 1;
    }
    e.extend_from_slice(&[
        ENTRY_LOCAL_INTERRUPT,
        INT_TYPE_EXTINT,
        0,
        0,
        ISA_BUS,
        0,
        0xff,
        0,
    ]);
    e.extend_from_slice(&[
        ENTRY_LOCAL_INTERRUPT,
        INT_TYPE_NMI,
        0,
        0,
        ISA_BUS,
        0,
        0xff,
        1,
    ]);
    count += 2;
    (e, count)
}

/// The floating pointer and configuration table for `vcpus` processors.
pub fn build(vcpus: u8) -> Vec<u8> {
    let (body, count) = entries(vcpus);
    let table_addr = MPTABLE_ADDR as u32 + FLOATING_LEN as u32;
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&((HEADER_LEN + body.len()) as u16).to_le_bytes());
    header.extend_from_slice(&[SPEC_REV, 0]);
    header.extend_from_slice(b"MOAT    ");
    header.extend_from_slice(b"MICROVM     ");
    header.extend_from_slice(&[0; 6]); // OEM table pointer and size
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    header.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    let mut table = header;
    table.extend_from_slice(&body);
    table[7] = checksum(&table);

    let mut floating = Vec::with_capacity(FLOATING_LEN);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&table_addr.to_le_bytes());
    floating.extend_from_slice(&[1, SPEC_REV, 0, 0, 0, 0, 0, 0]);
    floating[10] = checksum(&floating);
    floating.extend_from_slice(&table);
    floating
}

/// Writes the MP table into guest memory.
pub fn write(mem: &GuestMem, vcpus: u8) -> Result<(), VmmError> {
    mem.write_slice(&build(vcpus), GuestAddress(MPTABLE_ADDR))
        .map_err(|e| VmmError::WriteBootData("MP table", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_counts() {
        let t = build(4);
        let sum = |b: &[u8]| b.iter().fold(0u8, |a, x| a.wrapping_add(*x));
        assert_eq!(&t[..4], b"_MP_");
        assert_eq!(sum(&t[..FLOATING_LEN]), 0);
        let table = &t[FLOATING_LEN..];
        assert_eq!(&table[..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(sum(table), 0);
        let count = u16::from_le_bytes([table[34], table[35]]);
        assert_eq!(count, 4 + 2 + 24 + 2);
        assert_eq!(len, HEADER_LEN + 4 * 20 + 8 + 8 + 24 * 8 + 2 * 8);
    }
}
