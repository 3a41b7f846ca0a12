//! Putting the guest's first code in memory: a Linux kernel (vmlinux or
//! bzImage) with its initramfs, command line and zero page, or a raw payload.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::layout::{
    ACPI_ADDR, ACPI_END, CMDLINE_ADDR, COMMAND_LINE_MAX, HIGH_RAM_START, LOW_RAM_END, PAYLOAD_ADDR,
    ZERO_PAGE_ADDR,
};
use crate::memory::{ram_end, GuestMem};
use crate::VmmError;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x100_0000;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
/// Boot protocol 2.12 is the first with a 64-bit entry (XLF_KERNEL_64).
const BOOT_PROTOCOL_64BIT_ENTRY: u16 = 0x020c;
const XLF_KERNEL_64: u16 = 1;
/// `startup_64` is 0x200 bytes into the protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Default `initrd_addr_max` for kernels that leave it 0.
const INITRD_ADDR_MAX_DEFAULT: u64 = 0x37ff_ffff;
const PAGE: u64 = 0x1000;

/// Where the boot vCPU starts.
#[derive(Debug, Clone, Copy)]
pub struct Entry(pub u64);

fn is_elf(file: &mut File) -> std::io::Result<bool> {
    let mut magic = [0u8; 4];
    file.seek(SeekFrom::Start(0))?;
    let n = file.read(&mut magic)?;
    file.seek(SeekFrom::Start(0))?;
    Ok(n == 4 && magic == *b"\x7fELF")
}

fn open(path: &Path) -> Result<File, VmmError> {
    File::open(path).map_err(|source| VmmError::Open {
        path: path.to_owned(),
        source,
    })
}

/// Loads a vmlinux or bzImage; returns the 64-bit entry and the setup header
/// to start the zero page from.
pub fn load_kernel(mem: &GuestMem, path: &Path) -> Result<(Entry, setup_header, u64), VmmError> {
    let mut file = open(path)?;
    let load_err = |source| VmmError::LoadKernel {
        path: path.to_owned(),
        source,
    };
    let elf = is_elf(&mut file).map_err(|source| VmmError::Open {
        path: path.to_owned(),
        source,
    })?;
    if elf {
        let r = Elf::load(mem, None, &mut file, Some(GuestAddress(HIGH_RAM_START)))
            .map_err(load_err)?;
        let hdr = setup_header {
            boot_flag: KERNEL_BOOT_FLAG_MAGIC,
            header: KERNEL_HDR_MAGIC,
            kernel_alignment: KERNEL_MIN_ALIGNMENT,
            ..Default::default()
        };
        return Ok((Entry(r.kernel_load.0), hdr, r.kernel_end));
    }
    let r = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIGH_RAM_START)))
        .map_err(load_err)?;
    let hdr = r.setup_header.unwrap_or_default();
    if hdr.version < BOOT_PROTOCOL_64BIT_ENTRY || hdr.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(load_err(linux_loader::loader::Error::Bzimage(
            linux_loader::loader::bzimage::Error::InvalidBzImage,
        )));
    }
    Ok((
        Entry(r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET),
        hdr,
        r.kernel_end,
    ))
}

/// Copies the initramfs as high as the kernel allows, above `kernel_end`;
/// returns its address and size.
pub fn load_initrd(
    mem: &GuestMem,
    path: &Path,
    kernel_end: u64,
    initrd_addr_max: u64,
) -> Result<(u64, u64), VmmError> {
    let mut file = open(path)?;
    let size = file
        .metadata()
        .map_err(|source| VmmError::Open {
            path: path.to_owned(),
            source,
        })?
        .len();
    let too_large = || VmmError::InitrdTooLarge {
        path: path.to_owned(),
        size,
    };
    // The first region is the one below 4 GiB; the kernel wants its initrd there.
    let low_end = mem.iter().next().map(|r| r.len()).ok_or_else(too_large)?;
    let limit = low_end.min(initrd_addr_max.saturating_add(1));
    let addr = limit.checked_sub(size).ok_or_else(too_large)? & !(PAGE - 1);
    if addr < kernel_end || size > usize::MAX as u64 {
        return Err(too_large());
    }
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|source| VmmError::LoadInitrd {
            path: path.to_owned(),
            source,
        })?;
    Ok((addr, size))
}

/// Copies a raw payload to [`PAYLOAD_ADDR`].
pub fn load_payload(mem: &GuestMem, code: &[u8]) -> Result<Entry, VmmError> {
    let end = PAYLOAD_ADDR.checked_add(code.len() as u64);
    if end.is_none_or(|end| end > ram_end(mem)) {
        return Err(VmmError::PayloadTooLarge { size: code.len() });
    }
    mem.write_slice(code, GuestAddress(PAYLOAD_ADDR))
        .map_err(|e| VmmError::WriteBootData("payload", e))?;
    Ok(Entry(PAYLOAD_ADDR))
}

/// What the built-in VMM adds to a Linux command line, unless the user set
/// the option: reset through the i8042 (the VMM's way out), and an i8042
/// probe that expects only the reset line (no mouse, no multiplexer).
pub fn linux_additions(user: &str) -> Vec<String> {
    // Only the kernel's part counts: what follows ` -- ` is the init's.
    let user = user.split(" -- ").next().unwrap_or(user);
    let mut add = Vec::new();
    if !user.split_whitespace().any(|w| w.starts_with("reboot=")) {
        add.push("reboot=k".to_string());
    }
    for opt in ["i8042.noaux", "i8042.nomux", "i8042.dumbkbd"] {
        if !user.split_whitespace().any(|w| w == opt) {
            add.push(opt.to_string());
        }
    }
    add
}

/// Builds the command line the kernel sees: the user's kernel parameters,
/// the VMM's additions, then what the user put after ` -- ` (the init's
/// arguments, which the kernel does not read: additions there would be
/// lost to it and handed to the init).
pub fn cmdline(user: &str, additions: &[String]) -> Result<Cmdline, VmmError> {
    let user = user.trim();
    let (kernel, init) = match user.find(" -- ") {
        Some(i) => (user[..i].trim(), Some(user[i + 4..].trim())),
        None if user == "--" => ("", Some("")),
        None => match user.strip_prefix("-- ") {
            Some(rest) => ("", Some(rest.trim())),
            None => (user, None),
        },
    };
    let mut c = Cmdline::new(COMMAND_LINE_MAX).map_err(VmmError::Cmdline)?;
    if !kernel.is_empty() {
        c.insert_str(kernel).map_err(VmmError::Cmdline)?;
    }
    for a in additions {
        c.insert_str(a).map_err(VmmError::Cmdline)?;
    }
    if let Some(init) = init {
        c.insert_str("--").map_err(VmmError::Cmdline)?;
        if !init.is_empty() {
            c.insert_str(init).map_err(VmmError::Cmdline)?;
        }
    }
    Ok(c)
}

/// The RAM map the guest is told about: low RAM, the ACPI tables' area
/// (reserved, so that the kernel keeps it), high RAM.
pub fn e820_map(mem: &GuestMem) -> Vec<boot_e820_entry> {
    let mut map = vec![
        boot_e820_entry {
            addr: 0,
            size: LOW_RAM_END,
            r#type: E820_RAM,
        },
        boot_e820_entry {
            addr: ACPI_ADDR,
            size: ACPI_END - ACPI_ADDR,
            r#type: E820_RESERVED,
        },
    ];
    for region in mem.iter() {
        let start = region.start_addr().0.max(HIGH_RAM_START);
        let end = region.start_addr().0 + region.len();
        if end > start {
            map.push(boot_e820_entry {
                addr: start,
                size: end - start,
                r#type: E820_RAM,
            });
        }
    }
    map
}

/// What goes in the zero page besides the RAM map.
pub struct ZeroPage {
    /// The kernel's setup header (or a default one for ELF kernels and payloads).
    pub hdr: setup_header,
    /// Command line length without the NUL.
    pub cmdline_len: usize,
    /// Initramfs address and size.
    pub initrd: Option<(u64, u64)>,
    /// Where the ACPI RSDP is, if the VM has ACPI tables.
    pub rsdp: Option<u64>,
}

/// Writes the command line and the zero page.
pub fn write_zero_page(mem: &GuestMem, cmdline: &Cmdline, zp: ZeroPage) -> Result<(), VmmError> {
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), cmdline).map_err(VmmError::LoadCmdline)?;
    let mut params = boot_params {
        hdr: zp.hdr,
        ..Default::default()
    };
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = zp.cmdline_len as u32;
    if let Some((addr, size)) = zp.initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = zp.rsdp.unwrap_or(0);
    let map = e820_map(mem);
    params.e820_entries = map.len() as u8;
    params.e820_table[..map.len()].copy_from_slice(&map);
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_ADDR)),
        mem,
    )
    .map_err(VmmError::ZeroPage)
}

/// The highest address the kernel accepts for its initramfs.
pub fn initrd_addr_max(hdr: &setup_header) -> u64 {
    match hdr.initrd_addr_max {
        0 => INITRD_ADDR_MAX_DEFAULT,
        max => u64::from(max),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::ram_ranges;
    use vm_memory::GuestMemoryMmap;

    fn mem(mib: u64) -> GuestMem {
        GuestMemoryMmap::from_ranges(&ram_ranges(mib)).unwrap()
    }

    #[test]
    fn e820_skips_the_bios_hole() {
        let m = e820_map(&mem(64));
        assert_eq!(m.len(), 3);
        assert_eq!(
            (m[0].addr, m[0].size, m[0].r#type),
            (0, LOW_RAM_END, E820_RAM)
        );
        assert_eq!(
            (m[1].addr, m[1].size, m[1].r#type),
            (ACPI_ADDR, ACPI_END - ACPI_ADDR, E820_RESERVED)
        );
        assert_eq!(
            (m[2].addr, m[2].size),
            (HIGH_RAM_START, (64 << 20) - HIGH_RAM_START)
        );
    }

    #[test]
    fn additions_go_before_the_inits_arguments() {
        let add = vec!["reboot=k".to_string()];
        let text = |c: Cmdline| c.as_cstring().unwrap().to_string_lossy().into_owned();
        assert_eq!(
            text(cmdline("console=ttyS0 rdinit=/moat -- microvm-agent debug", &add).unwrap()),
            "console=ttyS0 rdinit=/moat reboot=k -- microvm-agent debug"
        );
        assert_eq!(
            text(cmdline("console=ttyS0", &add).unwrap()),
            "console=ttyS0 reboot=k"
        );
        assert_eq!(text(cmdline("-- x", &add).unwrap()), "reboot=k -- x");
        assert_eq!(text(cmdline("", &add).unwrap()), "reboot=k");
    }

    #[test]
    fn additions_respect_the_user() {
        assert_eq!(
            linux_additions("console=ttyS0"),
            ["reboot=k", "i8042.noaux", "i8042.nomux", "i8042.dumbkbd"]
        );
        assert_eq!(
            linux_additions("reboot=t i8042.noaux i8042.nomux i8042.dumbkbd"),
            Vec::<String>::new()
        );
        let c = cmdline("console=ttyS0", &linux_additions("console=ttyS0")).unwrap();
        assert_eq!(
            c.as_cstring().unwrap().to_str().unwrap(),
            "console=ttyS0 reboot=k i8042.noaux i8042.nomux i8042.dumbkbd"
        );
    }

    #[test]
    fn payload_must_fit() {
        let m = mem(2);
        assert!(load_payload(&m, &[0x90; 16]).is_ok());
        assert!(matches!(
            load_payload(&m, &vec![0x90; 2 << 20]),
            Err(VmmError::PayloadTooLarge { .. })
        ));
    }

    #[test]
    fn garbage_kernel_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, b"\x7fELF not really").unwrap();
        assert!(matches!(
            load_kernel(&mem(16), &p),
            Err(VmmError::LoadKernel { .. })
        ));
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        assert!(matches!(
            load_kernel(&mem(16), &p),
            Err(VmmError::LoadKernel { .. })
        ));
        std::fs::write(&p, b"").unwrap();
        assert!(load_kernel(&mem(16), &p).is_err());
    }

    #[test]
    fn initrd_too_large_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("initrd");
        std::fs::write(&p, vec![1u8; 3 << 20]).unwrap();
        assert!(matches!(
            load_initrd(&mem(2), &p, HIGH_RAM_START, INITRD_ADDR_MAX_DEFAULT),
            Err(VmmError::InitrdTooLarge { .. })
        ));
        let (addr, size) = load_initrd(&mem(16), &p, 2 << 20, INITRD_ADDR_MAX_DEFAULT).unwrap();
        assert_eq!(size, 3 << 20);
        assert_eq!(addr % PAGE, 0);
        assert!(addr + size <= 16 << 20);
    }
}
