//! The guest physical address map, in one place.
//!
//! ```text
//! 0x0000_0500  GDT (4 entries)           0x0000_0520  IDT (empty)
//! 0x0000_7000  zero page (boot_params)   0x0000_8ff0  boot stack top
//! 0x0000_9000  PML4, PDPT at 0xa000, four page directories at 0xb000..0xf000
//!              (identity map of the low 4 GiB with 2 MiB pages)
//! 0x0002_0000  kernel command line (COMMAND_LINE_MAX bytes)
//! 0x0009_fc00  top of low RAM (EBDA and ROM area above it are not RAM):
//!              the MP table at 0x9fc00, the ACPI tables from 0xe0000
//! 0x0010_0000  high RAM: bzImage / payloads load here; vmlinux at its ELF addresses
//! 0xd000_0000  MMIO gap: virtio-mmio devices, MMIO_DEVICE_SIZE each, up to 4 GiB
//! 0x1_0000_0000 RAM above the gap when mem > 0xd000_0000
//! ```
//!
//! Legacy port I/O: COM1 at 0x3f8 (IRQ 4), i8042 at 0x60/0x64.

/// Boot GDT.
pub const GDT_ADDR: u64 = 0x500;
/// Boot IDT (limit 7: no handlers; the kernel installs its own).
pub const IDT_ADDR: u64 = 0x520;
/// Linux zero page.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
/// Page-table root.
pub const PML4_ADDR: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPT_ADDR: u64 = 0xa000;
/// First of four page directories.
pub const PD_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Largest command line accepted (Linux x86 COMMAND_LINE_SIZE is 2048).
pub const COMMAND_LINE_MAX: usize = 2048;
/// End of the RAM below the EBDA.
pub const LOW_RAM_END: u64 = 0x9_fc00;
/// The ACPI tables, RSDP first (in the BIOS area Linux scans for it).
pub const ACPI_ADDR: u64 = 0xe_0000;
/// End of the ACPI tables' area (reserved in the RAM map).
pub const ACPI_END: u64 = 0x10_0000;
/// The local APICs' MMIO window.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// The I/O APIC's MMIO window.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Start of high RAM (1 MiB).
pub const HIGH_RAM_START: u64 = 0x10_0000;
/// Where raw payloads are loaded and entered.
pub const PAYLOAD_ADDR: u64 = HIGH_RAM_START;
/// Start of the 32-bit MMIO gap.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// End of the 32-bit MMIO gap (4 GiB).
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// One virtio-mmio device's window.
pub const MMIO_DEVICE_SIZE: u64 = 0x1000;
/// KVM's TSS (three pages, inside the MMIO gap, never RAM).
pub const KVM_TSS_ADDR: usize = 0xfffb_d000;
/// KVM's identity map page (one page, below the TSS).
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// COM1 base port and IRQ.
pub const SERIAL_PORT: u16 = 0x3f8;
/// COM1's IRQ line.
pub const SERIAL_IRQ: u32 = 4;
/// i8042 data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// i8042 command port.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// The first IRQ given to virtio-mmio devices; one per device, upwards.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// The last interrupt line a device may use: the I/O APIC's last pin
/// (KVM's has 24; lines 16–23 reach it alone, not the 8259 pair, which
/// the guest's ACPI-driven kernel does not use for them).
pub const VIRTIO_IRQ_LAST: u32 = 23;

/// Guest memory may not be smaller than this (page tables, zero page, a payload).
pub const MIN_MEM_MIB: u64 = 2;
/// Nor larger than this (keeps every guest address computation far from overflow).
pub const MAX_MEM_MIB: u64 = 1 << 20;
/// The most vCPUs a guest gets (one page directory of APIC ids is plenty for a microVM).
pub const MAX_VCPUS: u8 = 64;
