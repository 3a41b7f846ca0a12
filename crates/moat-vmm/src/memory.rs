//! Guest RAM: anonymous private mappings made by vm-memory, laid around the
//! MMIO gap, and registered with KVM (the one `unsafe` call, in
//! `kvm_memory.rs`); or, for a VM with a vhost-user device (virtio-fs,
//! [`crate::virtio::fs`]), one memfd mapped shared, which the device's
//! back-end process maps too.

use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::layout::{MMIO_GAP_END, MMIO_GAP_START};
use crate::VmmError;

/// Guest memory as every part of the VMM sees it.
pub type GuestMem = GuestMemoryMmap<()>;

/// The RAM ranges for `mem_mib` MiB: below the MMIO gap, and the rest above 4 GiB.
pub fn ram_ranges(mem_mib: u64) -> Vec<(GuestAddress, usize)> {
    let size = mem_mib << 20;
    let low = size.min(MMIO_GAP_START);
    let mut ranges = vec![(GuestAddress(0), low as usize)];
    if size > low {
        ranges.push((GuestAddress(MMIO_GAP_END), (size - low) as usize));
    }
    ranges
}

/// Allocates guest RAM and hands each region to KVM as a memory slot.
pub fn create(vm: &VmFd, mem_mib: u64) -> Result<GuestMem, VmmError> {
    let mem = GuestMemoryMmap::from_ranges(&ram_ranges(mem_mib)).map_err(|source| {
        VmmError::GuestMemory {
            mib: mem_mib,
            source,
        }
    })?;
    register(vm, mem)
}

/// Guest RAM as [`create`] lays it, backed by one memfd mapped shared
/// (each region at its offset, one after the other from 0), so that a
/// vhost-user back-end handed the file can map it: each region then
/// knows its file and offset (`vhost::VhostUserMemoryRegionInfo::from_guest_region`).
pub fn create_shared(vm: &VmFd, mem_mib: u64) -> Result<GuestMem, VmmError> {
    let err = |source: std::io::Error| VmmError::SharedMemory {
        mib: mem_mib,
        source,
    };
    let file = ram_memfd(mem_mib).map_err(err)?;
    map_file(&file, mem_mib, libc::MAP_SHARED)
        .map_err(err)
        .and_then(|m| register(vm, m))
}

/// Guest RAM of `mem_mib` MiB on one memfd mapped shared, as
/// [`create_shared`] lays it, without a VM; and the memfd.
#[cfg(test)]
pub(crate) fn shared_for_tests(mem_mib: u64) -> (GuestMem, std::fs::File) {
    let file = ram_memfd(mem_mib).unwrap();
    let mem = map_file(&file, mem_mib, libc::MAP_SHARED).unwrap();
    (mem, file)
}

/// An empty memfd of `mem_mib` MiB for guest RAM.
fn ram_memfd(mem_mib: u64) -> std::io::Result<std::fs::File> {
    let fd = rustix::fs::memfd_create("moat-guest-ram", rustix::fs::MemfdFlags::CLOEXEC)?;
    let file = std::fs::File::from(fd);
    file.set_len(mem_mib << 20)?;
    Ok(file)
}

/// Maps `file`'s `mem_mib` MiB as guest RAM, the regions of [`ram_ranges`]
/// one after the other from offset 0, with `flags` (`MAP_SHARED` or
/// `MAP_PRIVATE`, and more).
fn map_file(file: &std::fs::File, mem_mib: u64, flags: i32) -> std::io::Result<GuestMem> {
    use vm_memory::mmap::MmapRegionBuilder;
    use vm_memory::{FileOffset, GuestRegionMmap};
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (addr, len) in ram_ranges(mem_mib) {
        let region = MmapRegionBuilder::<()>::new(len)
            .with_file_offset(FileOffset::new(file.try_clone()?, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(flags)
            .build()
            .map_err(std::io::Error::other)?;
        let region = GuestRegionMmap::new(region, addr)
            .ok_or_else(|| std::io::Error::other("a region past the address space"))?;
        regions.push(region);
        offset += len as u64;
    }
    GuestMemoryMmap::from_regions(regions).map_err(std::io::Error::other)
}

/// Guest RAM for `mem_mib` MiB mapped copy-on-write from a snapshot file
/// ([`crate::snapshot`]: the regions one after the other from offset 0),
/// each region handed to KVM as a memory slot. The guest's writes stay in
/// this process; the file is only read, page by page as the guest touches it.
pub fn restore(vm: &VmFd, mem_mib: u64, file: &std::fs::File) -> Result<GuestMem, VmmError> {
    let mem = map_file(file, mem_mib, libc::MAP_PRIVATE | libc::MAP_NORESERVE)
        .map_err(|e| VmmError::snapshot("map guest memory from the snapshot", e))?;
    register(vm, mem)
}

/// Guest RAM as [`create_shared`] makes it (one memfd mapped shared, for
/// a VM with vhost-user back-ends), filled with a copy of the snapshot
/// file's memory: the file's data only (its holes are pages that were all
/// zeros, as the memfd's are), read once now, where [`restore`] maps the
/// file and lets the guest's touches read it. The back-ends map the memfd,
/// so the guest's memory cannot be a private mapping of the file.
pub fn restore_shared(vm: &VmFd, mem_mib: u64, file: &std::fs::File) -> Result<GuestMem, VmmError> {
    use std::os::unix::fs::FileExt;
    let err = |e: std::io::Error| VmmError::snapshot("copy guest memory from the snapshot", e);
    let ram = ram_memfd(mem_mib).map_err(err)?;
    // Written through the file, not the mapping: a page fault per page
    // costs more than the copy (and a fault zeroes the page first).
    let mut buf = vec![0u8; 1 << 20];
    for (mut at, stop) in data_extents(file, 0, mem_mib << 20).map_err(err)? {
        while at < stop {
            let n = ((stop - at) as usize).min(buf.len());
            file.read_exact_at(&mut buf[..n], at).map_err(err)?;
            ram.write_all_at(&buf[..n], at).map_err(err)?;
            at += n as u64;
        }
    }
    let mem = map_file(&ram, mem_mib, libc::MAP_SHARED).map_err(err)?;
    register(vm, mem)
}

/// The extents of `file` between offsets `start` and `end` that may hold
/// data (`SEEK_DATA`, `SEEK_HOLE`), as offsets into the file: all of it
/// where the file system cannot tell (`EINVAL`).
pub(crate) fn data_extents(
    file: &std::fs::File,
    start: u64,
    end: u64,
) -> std::io::Result<Vec<(u64, u64)>> {
    use rustix::fs::{seek, SeekFrom};
    let mut extents = Vec::new();
    let mut at = start;
    while at < end {
        let data = match seek(file, SeekFrom::Data(at)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => break,
            Err(rustix::io::Errno::INVAL) => {
                extents.push((at, end));
                break;
            }
            Err(e) => return Err(e.into()),
        };
        if data >= end {
            break;
        }
        let hole = seek(file, SeekFrom::Hole(data))?.min(end);
        extents.push((data, hole));
        at = hole;
    }
    Ok(extents)
}

/// The ranges of `region` (offsets into it) that may hold data: all of
/// it, unless it maps a file shared (a memfd: [`create_shared`]), whose
/// holes are pages never written. Reading such a hole would fill it (a
/// page of shmem per page read, charged to the VM's cgroup): a save reads
/// only the data.
pub fn data_ranges(region: &vm_memory::GuestRegionMmap) -> std::io::Result<Vec<(u64, u64)>> {
    let len = region.len();
    let file = match region.file_offset() {
        Some(f) if region.flags() & libc::MAP_SHARED != 0 => f,
        _ => return Ok(vec![(0, len)]),
    };
    let base = file.start();
    Ok(data_extents(file.file(), base, base + len)?
        .into_iter()
        .map(|(from, to)| (from - base, to - base))
        .collect())
}

/// Hands each region of `mem` to KVM as a memory slot.
fn register(vm: &VmFd, mem: GuestMem) -> Result<GuestMem, VmmError> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        crate::kvm_memory::register(vm, slot, region)
            .map_err(|source| VmmError::RegisterMemory { slot, source })?;
    }
    Ok(mem)
}

/// The end (exclusive) of the highest RAM region.
pub fn ram_end(mem: &GuestMem) -> u64 {
    mem.iter()
        .map(|r| r.start_addr().0 + r.len())
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_skip_the_mmio_gap() {
        assert_eq!(ram_ranges(64), vec![(GuestAddress(0), 64 << 20)]);
        let big = ram_ranges(4096);
        assert_eq!(big[0], (GuestAddress(0), MMIO_GAP_START as usize));
        assert_eq!(big[1].0, GuestAddress(MMIO_GAP_END));
        assert_eq!(big[0].1 + big[1].1, 4096 << 20);
    }
}
