//! virtio-blk over a raw image file: read, write (unless read-only), flush
//! and get-id. Requests are served synchronously on the notifying vCPU's
//! thread. Every sector range is checked against the image size, every
//! length against [`MAX_REQUEST_BYTES`].

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
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
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
            T_IN | T_OUT => {
                self.refused += 1;
                Outcome::status(S_IOERR)
            }
            _ => Outcome::status(S_UNSUPP),
        }
    }

    fn config(&self) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[..8].copy_from_slice(&self.sectors.to_le_bytes());
        // size_max (unused, not offered) then seg_max.
        c[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
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
        let ro = if self.read_only { VIRTIO_BLK_F_RO } else { 0 };
        VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_SEG_MAX | ro
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
