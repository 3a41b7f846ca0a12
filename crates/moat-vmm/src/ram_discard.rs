//! Gives pages of guest RAM back to the host: the one `madvise(2)` on
//! guest memory, for virtio-balloon's free page reports
//! ([`crate::virtio::balloon`]).
#![allow(unsafe_code)]

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestMem;

/// The host's page size on x86-64: reports are trimmed to whole pages.
pub const PAGE: u64 = 4096;

/// Gives the whole pages of guest RAM in `[addr, addr + len)` back to the
/// host: a private mapping's (anonymous RAM, or a snapshot's file mapped
/// copy-on-write) with `MADV_DONTNEED` (the guest then reads zeros, or the
/// snapshot's page), a shared memfd's with `MADV_REMOVE` (its pages are
/// freed from the file, which a vhost-user back-end maps too). Returns the
/// bytes given back: 0 for a range with no whole page, or that is not
/// wholly in one region of guest RAM.
pub fn discard(mem: &GuestMem, addr: GuestAddress, len: u64) -> std::io::Result<u64> {
    let Some(region) = mem.find_region(addr) else {
        return Ok(0);
    };
    let offset = addr.0 - region.start_addr().0;
    let Some(end) = offset.checked_add(len).filter(|e| *e <= region.len()) else {
        return Ok(0);
    };
    // Whole pages only: the start rounded up, the end down (a region
    // starts on a page boundary).
    let start = offset.div_ceil(PAGE) * PAGE;
    let end = end / PAGE * PAGE;
    if end <= start {
        return Ok(0);
    }
    let advice = if region.flags() & libc::MAP_SHARED != 0 {
        libc::MADV_REMOVE
    } else {
        libc::MADV_DONTNEED
    };
    let ptr = region.as_ptr().wrapping_add(start as usize);
    // SAFETY: `[ptr, ptr + end - start)` lies within the region's mapping
    // (checked against its length above), which the region owns and keeps
    // mapped while it is borrowed here. The advice only replaces the
    // range's pages (with zero pages, the snapshot file's, or a hole in the
    // memfd): no Rust reference points into guest memory (the VMM reads and
    // writes it through vm-memory's volatile accessors only, and the guest
    // may change any of it at any time anyway), so nothing observes a
    // change it did not expect.
    let rc = unsafe { libc::madvise(ptr.cast(), (end - start) as usize, advice) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(end - start)
}
