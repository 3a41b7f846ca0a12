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
