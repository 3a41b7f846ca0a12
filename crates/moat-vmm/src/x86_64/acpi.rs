//! ACPI tables: how a Linux guest built without the MP table parser and
//! without `virtio_mmio.device=` command-line devices (Debian's cloud kernel
//! is both) learns the vCPUs, the I/O APIC and the virtio-mmio devices.
//!
//! A hardware-reduced ACPI platform (no PM registers, no SCI, no FACS), as
//! a microVM needs: RSDP → XSDT → FADT (→ DSDT) and MADT. The DSDT
//! describes each virtio-mmio window as an `LNRO0005` device (the ACPI id
//! Linux's `virtio_mmio` driver matches) with its memory window and its
//! edge-triggered interrupt, plus COM1. The i8042 is left out (and the
//! FADT says there is none): it answers only its reset command, and Linux's
//! driver, finding one, waits half a second for a command byte that never
//! comes; the reset needs no driver (`reboot=k` writes the port itself, and
//! the FADT's reset register names the same port). The tables are built with rust-vmm's `acpi_tables` and sit in the
//! BIOS area (`ACPI_ADDR`), where Linux looks for the RSDP; the zero page
//! points at it as well.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use vm_memory::{Bytes, GuestAddress};
use zerocopy::IntoBytes;

use crate::layout::{
    ACPI_ADDR, ACPI_END, I8042_COMMAND_PORT, IOAPIC_ADDR, LAPIC_ADDR, MMIO_DEVICE_SIZE, SERIAL_IRQ,
    SERIAL_PORT,
};
use crate::memory::GuestMem;
use crate::VmmError;

const OEM_ID: [u8; 6] = *b"MOAT  ";
const OEM_REVISION: u32 = 1;
/// MADT flag: the platform also has dual 8259s (KVM's irqchip has them).
const MADT_PCAT_COMPAT: u32 = 1;
/// MADT structure 4: a local APIC's NMI input.
const MADT_LOCAL_APIC_NMI: u8 = 4;
/// In a local APIC NMI structure, "every processor".
const ALL_PROCESSORS: u8 = 0xff;
/// FADT IA-PC boot architecture flag: no VGA.
const IAPC_BOOT_ARCH_NO_VGA: u16 = 1 << 2;
/// FADT IA-PC boot architecture flag: the CMOS RTC is absent (the VMM has none).
const IAPC_BOOT_ARCH_NO_CMOS_RTC: u16 = 1 << 5;
/// What the reset register takes: the i8042's "pulse reset line" command.
const I8042_RESET: u8 = 0xfe;
/// Tables start on this alignment.
const TABLE_ALIGN: usize = 16;

/// One virtio-mmio device as the guest is told about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDevice {
    /// Base of its window (`MMIO_DEVICE_SIZE` long).
    pub base: u64,
    /// Its interrupt line (a GSI: an I/O APIC pin).
    pub gsi: u32,
}

/// The tables as laid out from `ACPI_ADDR`, and where each one starts.
pub struct Tables {
    /// Everything from `ACPI_ADDR` on, RSDP first.
    pub bytes: Vec<u8>,
    /// Guest address of each table by signature (RSDP, XSDT, FACP, APIC, DSDT).
    pub at: Vec<([u8; 4], u64)>,
}

impl Tables {
    /// The guest address of the table with this signature.
    pub fn addr(&self, sig: &[u8; 4]) -> Option<u64> {
        self.at.iter().find(|(s, _)| s == sig).map(|(_, a)| *a)
    }
}

/// Appends `table` to `out` at the next aligned offset; returns its guest address.
fn place(out: &mut Vec<u8>, table: &[u8]) -> u64 {
    out.resize(out.len().next_multiple_of(TABLE_ALIGN), 0);
    let addr = ACPI_ADDR + out.len() as u64;
    out.extend_from_slice(table);
    addr
}

fn aml_bytes(a: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    a.to_aml_bytes(&mut v);
    v
}

/// One device's AML: `Device (name) { Name (..., ...) ... }`.
fn device(name: &str, names: &[aml::Name]) -> Vec<u8> {
    let children: Vec<&dyn Aml> = names.iter().map(|n| n as &dyn Aml).collect();
    aml_bytes(&aml::Device::new(name.into(), children))
}

/// The DSDT's AML: `\_SB` holding the virtio-mmio devices and COM1.
fn dsdt_body(devices: &[MmioDevice]) -> Result<Vec<u8>, VmmError> {
    let mut sb = Vec::new();
    for (i, d) in devices.iter().enumerate() {
        let base = u32::try_from(d.base)
            .map_err(|_| VmmError::Acpi(format!("virtio-mmio window {:#x} above 4 GiB", d.base)))?;
        let name = format!("V{i:03X}");
        if name.len() != 4 {
            return Err(VmmError::Acpi(format!(
                "too many virtio-mmio devices ({})",
                devices.len()
            )));
        }
        let window = aml::Memory32Fixed::new(true, base, MMIO_DEVICE_SIZE as u32);
        let irq = aml::Interrupt::new(true, true, false, false, d.gsi);
        sb.push(device(
            &name,
            &[
                aml::Name::new("_HID".into(), &"LNRO0005"),
                aml::Name::new("_UID".into(), &(i as u32)),
                // DMA is cache-coherent (there is no other kind in a VM).
                aml::Name::new("_CCA".into(), &aml::ONE),
                aml::Name::new(
                    "_CRS".into(),
                    &aml::ResourceTemplate::new(vec![&window, &irq]),
                ),
            ],
        ));
    }
    let io = aml::IO::new(SERIAL_PORT, SERIAL_PORT, 1, 8);
    let irq = aml::Interrupt::new(true, true, false, false, SERIAL_IRQ);
    sb.push(device(
        "COM1",
        &[
            aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            aml::Name::new("_UID".into(), &aml::ZERO),
            aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&io, &irq])),
        ],
    ));
    let children: Vec<RawAml> = sb.into_iter().map(RawAml).collect();
    let refs: Vec<&dyn Aml> = children.iter().map(|c| c as &dyn Aml).collect();
    Ok(aml_bytes(&aml::Scope::new("\\_SB_".into(), refs)))
}

/// AML already serialised.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

fn madt(vcpus: u8) -> Sdt {
    // Header (36 bytes), the local APIC address, the flags.
    let mut madt = Sdt::new(*b"APIC", 44, 5, OEM_ID, *b"MOATMADT", OEM_REVISION);
    madt.write_u32(36, LAPIC_ADDR);
    madt.write_u32(40, MADT_PCAT_COMPAT);
    for id in 0..vcpus {
        madt.append_slice(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled).as_bytes());
    }
    // The I/O APIC's id follows the vCPUs' (as in the MP table).
    madt.append_slice(IoApic::new(vcpus, IOAPIC_ADDR, 0).as_bytes());
    // LINT1 of every local APIC is the NMI input (flags 0: the bus's
    // default polarity and trigger).
    let nmi_lint = 1u8;
    madt.append_slice(&[MADT_LOCAL_APIC_NMI, 6, ALL_PROCESSORS, 0, 0, nmi_lint]);
    madt
}

fn fadt(dsdt: u64) -> Vec<u8> {
    let mut f = FADTBuilder::new(OEM_ID, *b"MOATFACP", OEM_REVISION)
        .dsdt_64(dsdt)
        .flag(Flags::HwReducedAcpi)
        // The power and sleep buttons are not fixed-feature hardware.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup);
    f.iapc_boot_arch = (IAPC_BOOT_ARCH_NO_VGA | IAPC_BOOT_ARCH_NO_CMOS_RTC).into();
    // Reset (`reboot=a`) is the i8042's reset pulse, as `reboot=k` does.
    f.reset_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(I8042_COMMAND_PORT),
    );
    f.reset_value = I8042_RESET;
    aml_bytes(&f.finalize())
}

/// Builds the tables for `vcpus` vCPUs and these virtio-mmio devices.
pub fn build(vcpus: u8, devices: &[MmioDevice]) -> Result<Tables, VmmError> {
    let mut out = Vec::new();
    let mut at = Vec::new();
    // The RSDP first (it must be 16-byte aligned in the scanned area); its
    // XSDT address is patched in once the XSDT's place is known.
    let rsdp_len = Rsdp::len();
    out.resize(rsdp_len, 0);
    at.push((*b"RSDP", ACPI_ADDR));

    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"MOATDSDT", OEM_REVISION);
    dsdt.append_slice(&dsdt_body(devices)?);
    let dsdt_addr = place(&mut out, dsdt.as_slice());
    at.push((*b"DSDT", dsdt_addr));

    let fadt_addr = place(&mut out, &fadt(dsdt_addr));
    at.push((*b"FACP", fadt_addr));

    let madt_addr = place(&mut out, madt(vcpus).as_slice());
    at.push((*b"APIC", madt_addr));

    let mut xsdt = XSDT::new(OEM_ID, *b"MOATXSDT", OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt_addr = place(&mut out, &aml_bytes(&xsdt));
    at.push((*b"XSDT", xsdt_addr));

    out[..rsdp_len].copy_from_slice(Rsdp::new(OEM_ID, xsdt_addr).as_bytes());
    if ACPI_ADDR + out.len() as u64 > ACPI_END {
        return Err(VmmError::Acpi(format!(
            "the tables ({} bytes) do not fit below {ACPI_END:#x}",
            out.len()
        )));
    }
    Ok(Tables { bytes: out, at })
}

/// Writes the tables into guest memory; returns the RSDP's address.
pub fn write(mem: &GuestMem, vcpus: u8, devices: &[MmioDevice]) -> Result<u64, VmmError> {
    let tables = build(vcpus, devices)?;
    mem.write_slice(&tables.bytes, GuestAddress(ACPI_ADDR))
        .map_err(|e| VmmError::WriteBootData("ACPI tables", e))?;
    Ok(ACPI_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn table(t: &Tables, sig: &[u8; 4]) -> Vec<u8> {
        let off = (t.addr(sig).unwrap() - ACPI_ADDR) as usize;
        let len = u32::from_le_bytes(t.bytes[off + 4..off + 8].try_into().unwrap()) as usize;
        t.bytes[off..off + len].to_vec()
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    fn devices(n: u32) -> Vec<MmioDevice> {
        (0..n)
            .map(|i| MmioDevice {
                base: crate::layout::MMIO_GAP_START + u64::from(i) * MMIO_DEVICE_SIZE,
                gsi: crate::layout::VIRTIO_IRQ_BASE + i,
            })
            .collect()
    }

    #[test]
    fn every_table_is_reachable_from_the_rsdp_and_sums_to_zero() {
        let t = build(3, &devices(4)).unwrap();
        let rsdp = &t.bytes[..Rsdp::len()];
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP checksum (ACPI 1.0 part)");
        assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
        assert_eq!(rsdp[15], 2, "RSDP revision 2 (has an XSDT)");
        let xsdt_addr = u64_at(rsdp, 24);
        assert_eq!(Some(xsdt_addr), t.addr(b"XSDT"));
        let xsdt = table(&t, b"XSDT");
        assert_eq!(sum(&xsdt), 0);
        let entries: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|o| u64_at(&xsdt, o))
            .collect();
        assert_eq!(
            entries,
            vec![t.addr(b"FACP").unwrap(), t.addr(b"APIC").unwrap()]
        );
        let fadt = table(&t, b"FACP");
        assert_eq!(&fadt[..4], b"FACP");
        assert_eq!(sum(&fadt), 0);
        // X_DSDT (offset 140) names the DSDT; DSDT (offset 40) is left 0.
        assert_eq!(u64_at(&fadt, 140), t.addr(b"DSDT").unwrap());
        assert_eq!(u32_at(&fadt, 40), 0);
        assert_ne!(u32_at(&fadt, 112) & Flags::HwReducedAcpi as u32, 0);
        let dsdt = table(&t, b"DSDT");
        assert_eq!(sum(&dsdt), 0);
        let madt = table(&t, b"APIC");
        assert_eq!(sum(&madt), 0);
        assert!(ACPI_ADDR + t.bytes.len() as u64 <= ACPI_END);
    }

    #[test]
    fn the_madt_lists_each_vcpu_and_the_io_apic() {
        let t = build(5, &[]).unwrap();
        let madt = table(&t, b"APIC");
        assert_eq!(u32_at(&madt, 36), LAPIC_ADDR);
        let mut lapics = Vec::new();
        let mut ioapics = Vec::new();
        let mut off = 44;
        while off < madt.len() {
            let (kind, len) = (madt[off], madt[off + 1] as usize);
            match kind {
                0 => lapics.push((madt[off + 2], madt[off + 3], u32_at(&madt, off + 4))),
                1 => ioapics.push((
                    madt[off + 2],
                    u32_at(&madt, off + 4),
                    u32_at(&madt, off + 8),
                )),
                _ => {}
            }
            off += len;
        }
        assert_eq!(off, madt.len(), "structures end where the table does");
        assert_eq!(lapics, (0..5).map(|i| (i, i, 1)).collect::<Vec<_>>());
        assert_eq!(ioapics, vec![(5, IOAPIC_ADDR, 0)]);
    }

    #[test]
    fn each_virtio_device_is_described() {
        let t = build(1, &devices(12)).unwrap();
        let dsdt = table(&t, b"DSDT");
        let hits = dsdt.windows(8).filter(|w| w == b"LNRO0005").count();
        assert_eq!(hits, 12);
        for name in ["V000", "V00B", "COM1"] {
            assert!(
                dsdt.windows(4).any(|w| w == name.as_bytes()),
                "{name} missing"
            );
        }
        assert!(!dsdt.windows(4).any(|w| w == b"PS2_"), "no i8042 node");
    }

    #[test]
    fn a_window_above_4g_is_refused() {
        let d = [MmioDevice {
            base: 1 << 32,
            gsi: 5,
        }];
        let e = build(1, &d).err().expect("refused");
        assert!(e.to_string().contains("above 4 GiB"), "{e}");
    }
}
