//! virtio-blk over a raw image file: read, write, discard (the last two
//! unless read-only), flush and get-id. Requests are served synchronously
//! on the notifying vCPU's thread. Every sector range is checked against
//! the image size, every length against [`MAX_REQUEST_BYTES`]; a discard
//! punches a hole in the file (`FALLOC_FL_PUNCH_HOLE`), so a sparse image
//! gives the host back what the guest freed.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::path::Path;

use virtio_queue::{Queue, QueueT};
use vm_memory::Bytes;

use super::chain::{self, Buffer, Chain};
use super::{
    read_config_bytes, DeviceError, VirtioDevice, DEVICE_ID_BLOCK, QUEUE_SIZE, VIRTIO_F_VERSION_1,
};
use crate::memory::GuestMem;

/// Sector size of the virtio-blk protocol.
pub const SECTOR: u64 = 512;
/// Largest data transfer in one request.
pub const MAX_REQUEST_BYTES: u64 = 16 << 20;
const HEADER_LEN: u32 = 16;
const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
/// The most sectors one discard names (1 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// Ranges per discard request.
const MAX_DISCARD_SEG: u32 = 1;
/// Discards start and end on 4 KiB (in sectors), the host's page and
/// ext4's block.
const DISCARD_ALIGNMENT: u32 = 8;
/// `struct virtio_blk_discard_write_zeroes`: sector, sector count, flags.
const DISCARD_SEGMENT_LEN: u64 = 16;
/// Request status: success.
pub const S_OK: u8 = 0;
/// Request status: I/O error (also: out of range, read-only, malformed).
pub const S_IOERR: u8 = 1;
/// Request status: unsupported request type.
pub const S_UNSUPP: u8 = 2;
const ID_LEN: usize = 20;

/// The block device.
#[derive(Debug)]
pub struct Block {
    file: File,
    read_only: bool,
    sectors: u64,
    id: Vec<u8>,
    /// Requests refused as malformed (for tests and metrics).
    pub refused: u64,
}

/// One request's outcome: status byte and bytes written into guest buffers.
struct Outcome {
    status: u8,
    written: u32,
}

impl Outcome {
    fn status(status: u8) -> Self {
        Outcome { status, written: 0 }
    }
}

impl Block {
    /// Opens the image at `path`.
    pub fn open(path: &Path, read_only: bool, id: &str) -> Result<Self, DeviceError> {
        let err = |source| DeviceError::OpenImage {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(err)?;
        Self::from_file(file, path, read_only, id)
    }

    /// A device over an image the caller opened; `path` names it in errors.
    pub fn from_file(
        file: File,
        path: &Path,
        read_only: bool,
        id: &str,
    ) -> Result<Self, DeviceError> {
        let err = |source| DeviceError::OpenImage {
            path: path.to_owned(),
            source,
        };
        let size = file.metadata().map_err(err)?.len();
        Ok(Block {
            file,
            read_only,
            sectors: size / SECTOR,
            id: id.bytes().take(ID_LEN).collect(),
            refused: 0,
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    fn in_range(&self, sector: u64, len: u64) -> bool {
        len.is_multiple_of(SECTOR)
            && sector
                .checked_add(len / SECTOR)
                .is_some_and(|end| end <= self.sectors)
    }

    fn transfer(
        &mut self,
        bufs: &[Buffer],
        sector: u64,
        mem: &GuestMem,
        to_guest: bool,
    ) -> Outcome {
        let len: u64 = bufs.iter().map(|b| u64::from(b.len)).sum();
        if !self.in_range(sector, len) || (!to_guest && self.read_only) {
            return Outcome::status(S_IOERR);
        }
        if self.file.seek(SeekFrom::Start(sector * SECTOR)).is_err() {
            return Outcome::status(S_IOERR);
        }
        for b in bufs {
            let r = if to_guest {
                mem.read_exact_volatile_from(b.addr, &mut self.file, b.len as usize)
            } else {
                mem.write_all_volatile_to(b.addr, &mut self.file, b.len as usize)
            };
            if r.is_err() {
                return Outcome::status(S_IOERR);
            }
        }
        Outcome {
            status: S_OK,
            written: if to_guest { len as u32 } else { 0 },
        }
    }

    fn get_id(&self, bufs: &[Buffer], mem: &GuestMem) -> Outcome {
        let mut id = [0u8; ID_LEN];
        id[..self.id.len()].copy_from_slice(&self.id);
        let c = Chain {
            head: 0,
            readable: Vec::new(),
            writable: bufs.to_vec(),
        };
        match c.write_all(mem, &id) {
            Ok(n) => Outcome {
                status: S_OK,
                written: n as u32,
            },
            Err(_) => Outcome::status(S_IOERR),
        }
    }

    /// Serves one validated chain; returns the used length, or `None` if the
    /// chain has no place for a status byte.
    fn serve(&mut self, chain: &Chain, mem: &GuestMem) -> Option<u32> {
        let (status_buf, data_in) = chain.writable.split_last()?;
        if status_buf.len == 0 {
            return None;
        }
        let status_addr = status_buf.addr.unchecked_add_len(status_buf.len - 1);
        let outcome = match chain.readable.split_first() {
            Some((hdr, data_out)) if hdr.len == HEADER_LEN => {
                let mut raw = [0u8; HEADER_LEN as usize];
                match mem.read_slice(&mut raw, hdr.addr) {
                    Ok(()) => {
                        let kind = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
                        let mut s = [0u8; 8];
                        s.copy_from_slice(&raw[8..16]);
                        let sector = u64::from_le_bytes(s);
                        self.request(kind, sector, data_out, data_in, mem)
                    }
                    Err(_) => Outcome::status(S_IOERR),
                }
            }
            _ => {
                self.refused += 1;
                Outcome::status(S_IOERR)
            }
        };
        mem.write_obj(outcome.status, status_addr).ok()?;
        Some(outcome.written + 1)
    }

    fn request(
        &mut self,
        kind: u32,
        sector: u64,
        data_out: &[Buffer],
        data_in: &[Buffer],
        mem: &GuestMem,
    ) -> Outcome {
        match kind {
            T_IN if data_out.is_empty() => self.transfer(data_in, sector, mem, true),
            T_OUT if data_in.is_empty() => self.transfer(data_out, sector, mem, false),
            T_FLUSH => {
                if self.read_only || self.file.sync_data().is_ok() {
                    Outcome::status(S_OK)
                } else {
                    Outcome::status(S_IOERR)
                }
            }
            T_GET_ID => self.get_id(data_in, mem),
            T_DISCARD if !self.read_only && data_in.is_empty() => self.discard(data_out, mem),
            T_IN | T_OUT => {
                self.refused += 1;
                Outcome::status(S_IOERR)
            }
            _ => Outcome::status(S_UNSUPP),
        }
    }

    /// A discard: its one range (`MAX_DISCARD_SEG`) punched out of the
    /// file. A range past the image, a count over [`MAX_DISCARD_SECTORS`],
    /// more ranges than offered or a short segment: an I/O error; flags
    /// (the unmap hint is for write-zeroes alone): unsupported.
    fn discard(&mut self, bufs: &[Buffer], mem: &GuestMem) -> Outcome {
        let c = Chain {
            head: 0,
            readable: bufs.to_vec(),
            writable: Vec::new(),
        };
        let len = c.readable_len();
        if len == 0
            || !len.is_multiple_of(DISCARD_SEGMENT_LEN)
            || len / DISCARD_SEGMENT_LEN > u64::from(MAX_DISCARD_SEG)
        {
            self.refused += 1;
            return Outcome::status(S_IOERR);
        }
        let Ok(raw) = c.read_all(mem) else {
            return Outcome::status(S_IOERR);
        };
        for seg in raw.chunks_exact(DISCARD_SEGMENT_LEN as usize) {
            let mut s = [0u8; 8];
            s.copy_from_slice(&seg[..8]);
            let sector = u64::from_le_bytes(s);
            let count = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
            let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
            if flags != 0 {
                return Outcome::status(S_UNSUPP);
            }
            let bytes = u64::from(count) * SECTOR;
            if count > MAX_DISCARD_SECTORS || !self.in_range(sector, bytes) {
                self.refused += 1;
                return Outcome::status(S_IOERR);
            }
            let punched = rustix::fs::fallocate(
                &self.file,
                rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
                sector * SECTOR,
                bytes,
            );
            if punched.is_err() {
                return Outcome::status(S_IOERR);
            }
        }
        Outcome::status(S_OK)
    }

    /// `struct virtio_blk_config` up to the discard fields: capacity,
    /// size_max (not offered), seg_max, geometry, blk_size and topology
    /// (none), writeback, num_queues (not offered), then, offered with
    /// `VIRTIO_BLK_F_DISCARD`, max_discard_sectors, max_discard_seg and
    /// discard_sector_alignment.
    fn config(&self) -> [u8; 48] {
        let mut c = [0u8; 48];
        c[..8].copy_from_slice(&self.sectors.to_le_bytes());
        c[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        if !self.read_only {
            c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
            c[40..44].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
            c[44..48].copy_from_slice(&DISCARD_ALIGNMENT.to_le_bytes());
        }
        c
    }
}

/// `GuestAddress + u32` that cannot overflow: the buffer was range-checked.
trait AddLen {
    fn unchecked_add_len(self, len: u32) -> Self;
}

impl AddLen for vm_memory::GuestAddress {
    fn unchecked_add_len(self, len: u32) -> Self {
        vm_memory::GuestAddress(self.0.saturating_add(u64::from(len)))
    }
}

impl VirtioDevice for Block {
    fn device_id(&self) -> u32 {
        DEVICE_ID_BLOCK
    }
    fn features(&self) -> u64 {
        let writes = if self.read_only {
            VIRTIO_BLK_F_RO
        } else {
            VIRTIO_BLK_F_DISCARD
        };
        VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_SEG_MAX | writes
    }
    fn queue_count(&self) -> usize {
        1
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }
    fn process(&mut self, _index: usize, queue: &mut Queue, mem: &GuestMem) -> bool {
        let mut used = false;
        while let Some(raw) = queue.pop_descriptor_chain(mem) {
            let head = raw.head_index();
            let max = MAX_REQUEST_BYTES + u64::from(HEADER_LEN) + 1;
            let len = match chain::parse(raw, mem, usize::from(QUEUE_SIZE), max) {
                Ok(c) => self.serve(&c, mem),
                Err(_) => None,
            };
            let len = len.unwrap_or_else(|| {
                self.refused += 1;
                0
            });
            used |= queue.add_used(mem, head, len).is_ok();
        }
        used
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::chain::tests::Driver;
    use vm_memory::GuestAddress;

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;

    fn image(sectors: usize) -> (tempfile::TempDir, Block) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, vec![7u8; sectors * 512]).unwrap();
        let b = Block::open(&p, false, "an-id-much-longer-than-twenty-bytes").unwrap();
        (dir, b)
    }

    fn header(d: &Driver, kind: u32, sector: u64) {
        d.mem.write_obj(kind, GuestAddress(0x10000)).unwrap();
        d.mem.write_obj(sector, GuestAddress(0x10008)).unwrap();
    }

    fn status(d: &Driver) -> u8 {
        d.mem.read_obj(GuestAddress(0x12000)).unwrap()
    }

    /// Header, one data buffer of `len` (writable for reads), status.
    fn request(d: &mut Driver, blk: &mut Block, kind: u32, sector: u64, len: u32) -> (u8, u32) {
        header(d, kind, sector);
        d.mem.write_obj(0xffu8, GuestAddress(0x12000)).unwrap();
        let data_flags = if kind == T_OUT {
            F_NEXT
        } else {
            F_NEXT | F_WRITE
        };
        d.desc(0, 0x10000, 16, F_NEXT, 1);
        d.desc(1, 0x20000, len, data_flags, 2);
        d.desc(2, 0x12000, 1, F_WRITE, 0);
        d.offer(0);
        assert!(blk.process(0, &mut d.queue, &d.mem));
        let idx = d.used_idx().wrapping_sub(1);
        (status(d), d.used(idx % 16).1)
    }

    #[test]
    fn reads_and_range_checks() {
        let (_dir, mut blk) = image(8);
        let mut d = Driver::new();
        assert_eq!(request(&mut d, &mut blk, T_IN, 7, 512), (S_OK, 513));
        let b: u8 = d.mem.read_obj(GuestAddress(0x20000)).unwrap();
        assert_eq!(b, 7);
        assert_eq!(request(&mut d, &mut blk, T_IN, 8, 512).0, S_IOERR);
        assert_eq!(request(&mut d, &mut blk, T_IN, 7, 1024).0, S_IOERR);
        assert_eq!(request(&mut d, &mut blk, T_IN, u64::MAX, 512).0, S_IOERR);
        assert_eq!(request(&mut d, &mut blk, T_IN, 0, 100).0, S_IOERR);
        assert_eq!(
            request(&mut d, &mut blk, T_OUT, u64::MAX / 512, 512).0,
            S_IOERR
        );
        assert_eq!(request(&mut d, &mut blk, 99, 0, 512).0, S_UNSUPP);
    }

    /// A discard request of one segment's bytes `seg`; its status.
    fn discard(d: &mut Driver, blk: &mut Block, seg: &[u8]) -> u8 {
        header(d, T_DISCARD, 0);
        d.mem.write_slice(seg, GuestAddress(0x20000)).unwrap();
        d.mem.write_obj(0xffu8, GuestAddress(0x12000)).unwrap();
        d.desc(0, 0x10000, 16, F_NEXT, 1);
        d.desc(1, 0x20000, seg.len() as u32, F_NEXT, 2);
        d.desc(2, 0x12000, 1, F_WRITE, 0);
        d.offer(0);
        assert!(blk.process(0, &mut d.queue, &d.mem));
        status(d)
    }

    fn segment(sector: u64, count: u32, flags: u32) -> Vec<u8> {
        let mut v = sector.to_le_bytes().to_vec();
        v.extend(count.to_le_bytes());
        v.extend(flags.to_le_bytes());
        v
    }

    #[test]
    fn a_discard_punches_its_range_out_of_the_image() {
        use std::os::unix::fs::MetadataExt;
        let (dir, mut blk) = image(64);
        let taken = || std::fs::metadata(dir.path().join("img")).unwrap().blocks();
        let before = taken();
        assert!(blk.features() & VIRTIO_BLK_F_DISCARD != 0);
        let mut cfg = [0u8; 12];
        blk.read_config(36, &mut cfg);
        assert_eq!(cfg[..4], MAX_DISCARD_SECTORS.to_le_bytes());
        assert_eq!(cfg[4..8], 1u32.to_le_bytes());
        assert_eq!(cfg[8..12], 8u32.to_le_bytes());
        let mut d = Driver::new();
        assert_eq!(discard(&mut d, &mut blk, &segment(8, 16, 0)), S_OK);
        assert_eq!(taken(), before - 16, "8 KiB given back to the host");
        assert_eq!(request(&mut d, &mut blk, T_IN, 8, 512).0, S_OK);
        let b: u8 = d.mem.read_obj(GuestAddress(0x20000)).unwrap();
        assert_eq!(b, 0, "a discarded sector reads as zeros");
        assert_eq!(request(&mut d, &mut blk, T_IN, 7, 512).0, S_OK);
        let b: u8 = d.mem.read_obj(GuestAddress(0x20000)).unwrap();
        assert_eq!(b, 7, "the sector before it is kept");
        // Past the image, over the largest count, two segments, flags.
        assert_eq!(discard(&mut d, &mut blk, &segment(60, 8, 0)), S_IOERR);
        let over = segment(0, MAX_DISCARD_SECTORS + 1, 0);
        assert_eq!(discard(&mut d, &mut blk, &over), S_IOERR);
        let two = [segment(0, 8, 0), segment(16, 8, 0)].concat();
        assert_eq!(discard(&mut d, &mut blk, &two), S_IOERR);
        assert_eq!(discard(&mut d, &mut blk, &segment(0, 8, 0)[..12]), S_IOERR);
        assert_eq!(discard(&mut d, &mut blk, &segment(0, 8, 1)), S_UNSUPP);
        assert_eq!(taken(), before - 16, "nothing more punched");
        // A read-only image offers none and refuses one.
        let p = dir.path().join("img");
        let mut ro = Block::open(&p, true, "ro").unwrap();
        assert_eq!(ro.features() & VIRTIO_BLK_F_DISCARD, 0);
        let mut cfg = [0xffu8; 12];
        ro.read_config(36, &mut cfg);
        assert_eq!(cfg, [0u8; 12]);
        assert_eq!(discard(&mut d, &mut ro, &segment(0, 8, 0)), S_UNSUPP);
        assert_eq!(request(&mut d, &mut ro, T_IN, 0, 512).0, S_OK);
        let b: u8 = d.mem.read_obj(GuestAddress(0x20000)).unwrap();
        assert_eq!(b, 7);
    }

    #[test]
    fn get_id_is_truncated_to_twenty_bytes() {
        let (_dir, mut blk) = image(1);
        let mut d = Driver::new();
        assert_eq!(request(&mut d, &mut blk, T_GET_ID, 0, 512), (S_OK, 21));
        let mut id = [0u8; 20];
        d.mem.read_slice(&mut id, GuestAddress(0x20000)).unwrap();
        assert_eq!(&id, b"an-id-much-longer-th");
    }

    #[test]
    fn malformed_requests_get_an_error_or_nothing() {
        let (_dir, mut blk) = image(8);
        let mut d = Driver::new();
        // Header too short.
        d.desc(0, 0x10000, 8, F_NEXT, 1);
        d.desc(1, 0x12000, 1, F_WRITE, 0);
        d.offer(0);
        blk.process(0, &mut d.queue, &d.mem);
        assert_eq!(status(&d), S_IOERR);
        // No writable descriptor for the status: used with length 0.
        d.desc(0, 0x10000, 16, 0, 0);
        d.offer(0);
        blk.process(0, &mut d.queue, &d.mem);
        assert_eq!(d.used(1), (0, 0));
        // A zero-length status descriptor.
        d.desc(0, 0x10000, 16, F_NEXT, 1);
        d.desc(1, 0x12000, 0, F_WRITE, 0);
        d.offer(0);
        blk.process(0, &mut d.queue, &d.mem);
        assert_eq!(d.used(2), (0, 0));
        assert_eq!(blk.refused, 3);
    }
}
