//! Descriptor chains, validated before a device touches them.
//!
//! virtio-queue walks a chain (its TTL stops loops at the queue size); this
//! module adds the rest of what a hostile driver can get wrong: every buffer
//! must lie wholly in guest RAM, the chain must end where the driver said
//! (not at an unreadable or out-of-table `next`), device-readable buffers come
//! before device-writable ones, and both the descriptor count and the total
//! length are bounded. Data then moves only through vm-memory's `Bytes`
//! (volatile) accessors.

use std::ops::Deref;

use thiserror::Error;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::memory::GuestMem;

/// One guest buffer, known to lie in guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffer {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// A chain that passed validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// Head index, to hand back in the used ring.
    pub head: u16,
    /// Device-readable buffers, in order.
    pub readable: Vec<Buffer>,
    /// Device-writable buffers, in order.
    pub writable: Vec<Buffer>,
}

/// Why a chain was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ChainError {
    /// More descriptors than the queue holds (a loop, or an indirect table too big).
    #[error("descriptor chain {head} has more than {max} descriptors")]
    TooManyDescriptors {
        /// Head index.
        head: u16,
        /// The bound.
        max: usize,
    },
    /// The buffers add up to more than the device accepts in one request.
    #[error("descriptor chain {head} is longer than {max} bytes")]
    TooLong {
        /// Head index.
        head: u16,
        /// The bound.
        max: u64,
    },
    /// A buffer reaches outside guest RAM.
    #[error("descriptor chain {head}: buffer {addr:#x}+{len} is outside guest memory")]
    OutOfRange {
        /// Head index.
        head: u16,
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// A readable buffer follows a writable one.
    #[error("descriptor chain {head}: readable buffer after a writable one")]
    ReadableAfterWritable {
        /// Head index.
        head: u16,
    },
    /// The chain's `next` pointed outside the table or at unreadable memory.
    #[error("descriptor chain {head} is broken (bad next index, loop or unreadable table)")]
    Broken {
        /// Head index.
        head: u16,
    },
}

/// Validates `chain`, taking at most `max_descriptors` and `max_bytes`.
pub fn parse<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMem,
    max_descriptors: usize,
    max_bytes: u64,
) -> Result<Chain, ChainError>
where
    M: Deref,
    M::Target: vm_memory::GuestMemory,
{
    let head = chain.head_index();
    let mut out = Chain {
        head,
        readable: Vec::new(),
        writable: Vec::new(),
    };
    let mut total: u64 = 0;
    let mut count = 0usize;
    let mut last_has_next = false;
    for desc in chain {
        count += 1;
        if count > max_descriptors {
            return Err(ChainError::TooManyDescriptors {
                head,
                max: max_descriptors,
            });
        }
        total += u64::from(desc.len());
        if total > max_bytes {
            return Err(ChainError::TooLong {
                head,
                max: max_bytes,
            });
        }
        let buf = Buffer {
            addr: desc.addr(),
            len: desc.len(),
        };
        if !GuestMemoryBackend::check_range(mem, buf.addr, buf.len as usize) {
            return Err(ChainError::OutOfRange {
                head,
                addr: buf.addr.0,
                len: buf.len,
            });
        }
        if desc.is_write_only() {
            out.writable.push(buf);
        } else if out.writable.is_empty() {
            out.readable.push(buf);
        } else {
            return Err(ChainError::ReadableAfterWritable { head });
        }
        last_has_next = desc.has_next();
    }
    if count == 0 || last_has_next {
        return Err(ChainError::Broken { head });
    }
    Ok(out)
}

/// Takes every chain the driver made available on a transmit queue: each
/// one that parses (at most `max_bytes`) goes to `send`, and every one
/// comes back used with length 0. Returns whether any came back (the
/// driver must be interrupted) and how many were malformed.
pub fn drain_transmits(
    queue: &mut virtio_queue::Queue,
    mem: &GuestMem,
    max_bytes: u64,
    mut send: impl FnMut(&Chain),
) -> (bool, u64) {
    use virtio_queue::QueueT;
    let (mut used, mut malformed) = (false, 0);
    while let Some(raw) = queue.pop_descriptor_chain(mem) {
        let head = raw.head_index();
        match parse(raw, mem, usize::from(super::QUEUE_SIZE), max_bytes) {
            Ok(c) => send(&c),
            Err(_) => malformed += 1,
        }
        used |= queue.add_used(mem, head, 0).is_ok();
    }
    (used, malformed)
}

impl Chain {
    /// Total length of the writable buffers.
    pub fn writable_len(&self) -> u64 {
        self.writable.iter().map(|b| u64::from(b.len)).sum()
    }

    /// Total length of the readable buffers.
    pub fn readable_len(&self) -> u64 {
        self.readable.iter().map(|b| u64::from(b.len)).sum()
    }

    /// Copies the readable buffers into one vector (the chain's total is
    /// already bounded by [`parse`]).
    pub fn read_all(&self, mem: &GuestMem) -> Result<Vec<u8>, vm_memory::GuestMemoryError> {
        let mut data = vec![0u8; self.readable_len() as usize];
        let mut at = 0usize;
        for b in &self.readable {
            let end = at + b.len as usize;
            mem.read_slice(&mut data[at..end], b.addr)?;
            at = end;
        }
        Ok(data)
    }

    /// Fills the writable buffers from `data`, in order; returns the bytes written.
    pub fn write_all(
        &self,
        mem: &GuestMem,
        data: &[u8],
    ) -> Result<usize, vm_memory::GuestMemoryError> {
        let mut at = 0usize;
        for b in &self.writable {
            if at == data.len() {
                break;
            }
            let n = (b.len as usize).min(data.len() - at);
            mem.write_slice(&data[at..at + n], b.addr)?;
            at += n;
        }
        Ok(at)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::GuestMemoryMmap;

    pub const DESC: u64 = 0x1000;
    pub const AVAIL: u64 = 0x2000;
    pub const USED: u64 = 0x3000;
    pub const SIZE: u16 = 16;
    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const F_INDIRECT: u16 = 4;

    /// A driver's view of one split queue in 1 MiB of guest memory.
    pub struct Driver {
        pub mem: GuestMem,
        pub queue: Queue,
        next_avail: u16,
    }

    impl Driver {
        pub fn new() -> Self {
            Self::with_memory(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap())
        }

        /// The queue's rings in the first pages of `mem`.
        pub fn with_memory(mem: GuestMem) -> Self {
            let mut queue = Queue::new(SIZE).unwrap();
            queue.set_desc_table_address(Some(DESC as u32), Some(0));
            queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
            queue.set_used_ring_address(Some(USED as u32), Some(0));
            queue.set_ready(true);
            Driver {
                mem,
                queue,
                next_avail: 0,
            }
        }

        pub fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let at = GuestAddress(DESC + 16 * u64::from(i));
            self.mem.write_obj(addr, at).unwrap();
            self.mem.write_obj(len, at.unchecked_add(8)).unwrap();
            self.mem.write_obj(flags, at.unchecked_add(12)).unwrap();
            self.mem.write_obj(next, at.unchecked_add(14)).unwrap();
        }

        pub fn offer(&mut self, head: u16) {
            let slot = AVAIL + 4 + 2 * u64::from(self.next_avail % SIZE);
            self.mem.write_obj(head, GuestAddress(slot)).unwrap();
            self.next_avail = self.next_avail.wrapping_add(1);
            self.mem
                .write_obj(self.next_avail, GuestAddress(AVAIL + 2))
                .unwrap();
        }

        pub fn parse_next(&mut self, max_bytes: u64) -> Option<Result<Chain, ChainError>> {
            let c = self.queue.pop_descriptor_chain(&self.mem)?;
            Some(parse(c, &self.mem, usize::from(SIZE), max_bytes))
        }

        pub fn used(&self, i: u16) -> (u32, u32) {
            let at = USED + 4 + 8 * u64::from(i);
            (
                self.mem.read_obj(GuestAddress(at)).unwrap(),
                self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
            )
        }

        pub fn used_idx(&self) -> u16 {
            self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
        }
    }

    use vm_memory::Address;

    #[test]
    fn a_good_chain_parses() {
        let mut d = Driver::new();
        d.desc(0, 0x10000, 16, F_NEXT, 1);
        d.desc(1, 0x11000, 512, F_NEXT | F_WRITE, 2);
        d.desc(2, 0x12000, 1, F_WRITE, 0);
        d.offer(0);
        let c = d.parse_next(1 << 20).unwrap().unwrap();
        assert_eq!(c.readable.len(), 1);
        assert_eq!(c.writable.len(), 2);
        assert_eq!(c.writable_len(), 513);
    }

    #[test]
    fn a_self_loop_is_refused() {
        let mut d = Driver::new();
        d.desc(3, 0x10000, 8, F_NEXT, 3);
        d.offer(3);
        assert!(matches!(
            d.parse_next(1 << 20),
            Some(Err(ChainError::Broken { head: 3 }))
        ));
    }

    #[test]
    fn a_longer_loop_is_refused() {
        let mut d = Driver::new();
        d.desc(0, 0x10000, 8, F_NEXT, 1);
        d.desc(1, 0x10000, 8, F_NEXT, 2);
        d.desc(2, 0x10000, 8, F_NEXT, 0);
        d.offer(0);
        assert!(matches!(d.parse_next(1 << 20), Some(Err(_))));
    }

    #[test]
    fn next_outside_the_table_is_refused() {
        let mut d = Driver::new();
        d.desc(0, 0x10000, 8, F_NEXT, SIZE + 5);
        d.offer(0);
        assert_eq!(
            d.parse_next(1 << 20),
            Some(Err(ChainError::Broken { head: 0 }))
        );
    }

    #[test]
    fn buffers_outside_ram_are_refused() {
        for (addr, len) in [
            (0xf_ffff, 2u32),           // straddles the end of RAM
            (1 << 20, 1),               // just past it
            (u64::MAX - 4, 16),         // wraps around
            (0x10_0000_0000, u32::MAX), // far away, huge
        ] {
            let mut d = Driver::new();
            d.desc(0, addr, len, F_WRITE, 0);
            d.offer(0);
            assert!(
                matches!(
                    d.parse_next(u64::MAX),
                    Some(Err(ChainError::OutOfRange { .. }))
                ),
                "{addr:#x}+{len}"
            );
        }
    }

    #[test]
    fn oversized_lengths_are_refused() {
        let mut d = Driver::new();
        d.desc(0, 0x10000, 0x8000, F_NEXT, 1);
        d.desc(1, 0x18000, 0x8000, 0, 0);
        d.offer(0);
        assert_eq!(
            d.parse_next(0xffff),
            Some(Err(ChainError::TooLong {
                head: 0,
                max: 0xffff
            }))
        );
    }

    #[test]
    fn readable_after_writable_is_refused() {
        let mut d = Driver::new();
        d.desc(0, 0x10000, 8, F_NEXT | F_WRITE, 1);
        d.desc(1, 0x11000, 8, 0, 0);
        d.offer(0);
        assert_eq!(
            d.parse_next(1 << 20),
            Some(Err(ChainError::ReadableAfterWritable { head: 0 }))
        );
    }

    #[test]
    fn a_huge_indirect_table_is_bounded() {
        // An indirect descriptor (never offered) pointing at a table of
        // 4096 entries that all chain onward: refused, not walked to the end.
        let mut d = Driver::new();
        for i in 0..4096u64 {
            let at = GuestAddress(0x20000 + 16 * i);
            d.mem.write_obj(0x10000u64, at).unwrap();
            d.mem.write_obj(8u32, at.unchecked_add(8)).unwrap();
            d.mem.write_obj(F_NEXT, at.unchecked_add(12)).unwrap();
            d.mem
                .write_obj((i + 1) as u16, at.unchecked_add(14))
                .unwrap();
        }
        d.desc(0, 0x20000, 4096 * 16, F_INDIRECT, 0);
        d.offer(0);
        assert!(matches!(
            d.parse_next(u64::MAX),
            Some(Err(ChainError::TooManyDescriptors { .. }))
        ));
    }

    #[test]
    fn an_avail_index_too_far_ahead_yields_nothing() {
        let mut d = Driver::new();
        d.desc(0, 0x10000, 8, 0, 0);
        d.mem.write_obj(SIZE + 1, GuestAddress(AVAIL + 2)).unwrap();
        assert!(d.parse_next(1 << 20).is_none());
    }

    #[test]
    fn an_out_of_range_head_is_refused() {
        let mut d = Driver::new();
        d.offer(SIZE + 100);
        assert_eq!(
            d.parse_next(1 << 20),
            Some(Err(ChainError::Broken { head: SIZE + 100 }))
        );
    }
}
