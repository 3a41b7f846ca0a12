//! A bounded fuzz of the virtio devices, in the normal test suite: the
//! same hostile driver as `fuzz/fuzz_targets/virtio_queue.rs` (which
//! `cargo fuzz` runs open-ended), fed by a seeded generator so every run
//! tries the same inputs. Half the cases start from well-formed descriptor
//! chains with a few fields corrupted (so the devices' request parsing is
//! reached, not only the ring checks), half are random bytes.
//!
//! What must hold for every input: nothing panics or hangs, and the device
//! never claims (in the used ring) to have written more bytes than the
//! guest's descriptor table offered as writable.
use moat_vmm::memory::GuestMem;
use moat_vmm::virtio::balloon::Balloon;
use moat_vmm::virtio::block::Block;
use moat_vmm::virtio::console::Console;
use moat_vmm::virtio::mmio::MmioTransport;
use moat_vmm::virtio::net::Net;
use moat_vmm::virtio::rng::Rng;
use moat_vmm::virtio::VirtioDevice;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Cases per device.
const CASES: usize = 1500;
const QUEUE_SIZE: u16 = 16;

struct NoIrq;
impl vm_superio::Trigger for NoIrq {
    type E = ();
    fn trigger(&self) -> Result<(), ()> {
        Ok(())
    }
}

/// xorshift64*: deterministic, no dependency.
struct Gen(u64);
impl Gen {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn w<D: VirtioDevice>(t: &mut MmioTransport<D, NoIrq>, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

fn queue_base(q: u32) -> u64 {
    0x1000 + u64::from(q) * 0x400
}

/// A well-behaved driver's setup, so the cases start at the queues.
fn setup<D: VirtioDevice>(t: &mut MmioTransport<D, NoIrq>, queues: u32) {
    w(t, 0x70, 3);
    w(t, 0x24, 1);
    w(t, 0x20, 1);
    w(t, 0x70, 0xb);
    for q in 0..queues {
        let base = queue_base(q) as u32;
        w(t, 0x30, q);
        w(t, 0x38, u32::from(QUEUE_SIZE));
        w(t, 0x80, base);
        w(t, 0x90, base + 0x100);
        w(t, 0xa0, base + 0x200);
        w(t, 0x44, 1);
    }
    w(t, 0x70, 0xf);
}

/// Writes a chain table for queue `q`: `n` descriptors chained in order,
/// buffers in the data area, the last few device-writable, all offered.
fn well_formed(g: &mut Gen, mem: &GuestMem, q: u32) {
    let base = queue_base(q);
    let n = 1 + g.below(4) as u16;
    for i in 0..n {
        let addr = 0x10000 + u64::from(q) * 0x8000 + u64::from(i) * 0x1000;
        let len = [16u32, 512, 1, 4096, 0][g.below(5) as usize];
        let mut flags = 0u16;
        if i + 1 < n {
            flags |= 1; // NEXT
        }
        if i > 0 && g.below(2) == 1 {
            flags |= 2; // WRITE
        }
        let d = base + u64::from(i) * 16;
        mem.write_obj(addr, GuestAddress(d)).unwrap();
        mem.write_obj(len, GuestAddress(d + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
        mem.write_obj(i + 1, GuestAddress(d + 14)).unwrap();
        // A request header the block device parses: type, reserved, sector.
        let kind = [0u32, 1, 4, 8, 0xdead][g.below(5) as usize];
        mem.write_obj(kind, GuestAddress(addr)).unwrap();
        mem.write_obj(g.below(1 << 20), GuestAddress(addr + 8))
            .unwrap();
    }
    // Available ring: flags, idx, ring[0] = head 0.
    mem.write_obj(0u16, GuestAddress(base + 0x100)).unwrap();
    mem.write_obj(1u16, GuestAddress(base + 0x102)).unwrap();
    mem.write_obj(0u16, GuestAddress(base + 0x104)).unwrap();
    // A few corruptions anywhere in the rings.
    for _ in 0..g.below(4) {
        let at = base + g.below(0x300);
        mem.write_obj(g.next() as u8, GuestAddress(at)).unwrap();
    }
}

/// The most bytes the table of queue `q` offers as device-writable.
fn writable_offered(mem: &GuestMem, q: u32) -> u64 {
    (0..u64::from(QUEUE_SIZE))
        .map(|i| {
            let d = queue_base(q) + i * 16;
            let len: u32 = mem.read_obj(GuestAddress(d + 8)).unwrap();
            let flags: u16 = mem.read_obj(GuestAddress(d + 12)).unwrap();
            if flags & 2 != 0 {
                u64::from(len)
            } else {
                0
            }
        })
        .sum()
}

fn check_used(mem: &GuestMem, q: u32, case: usize) {
    let used = queue_base(q) + 0x200;
    let idx: u16 = mem.read_obj(GuestAddress(used + 2)).unwrap();
    let offered = writable_offered(mem, q);
    for i in 0..u64::from(idx.min(QUEUE_SIZE)) {
        let len: u32 = mem.read_obj(GuestAddress(used + 4 + i * 8 + 4)).unwrap();
        assert!(
            u64::from(len) <= offered,
            "case {case}: queue {q} used entry {i} claims {len} bytes written, {offered} offered"
        );
    }
}

fn drive<D: VirtioDevice>(device: D, queues: u32, mem: GuestMem, ops: &[u8], case: usize) {
    let mut t = MmioTransport::new(device, NoIrq, mem.clone());
    setup(&mut t, queues);
    for q in 0..queues {
        w(&mut t, 0x50, q);
    }
    for op in ops.chunks_exact(7) {
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]]) & 0x1ff);
        let value = u32::from_le_bytes([op[3], op[4], op[5], op[6]]);
        match op[0] % 4 {
            0 => w(&mut t, offset, value),
            1 => {
                let mut b = [0u8; 8];
                let len = 1 + (op[3] as usize % 8);
                t.read(offset, &mut b[..len]);
            }
            _ => w(&mut t, 0x50, value % (queues + 1)),
        }
    }
    for q in 0..queues {
        w(&mut t, 0x50, q);
        check_used(&mem, q, case);
    }
}

fn case_memory(g: &mut Gen, queues: u32) -> GuestMem {
    let mem: GuestMem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    if g.below(2) == 0 {
        for q in 0..queues {
            well_formed(g, &mem, q);
        }
    } else {
        let image = g.bytes(0x400 * queues as usize);
        mem.write_slice(&image, GuestAddress(0x1000)).unwrap();
    }
    // The used rings start zeroed, as a driver leaves them: whatever is in
    // them afterwards, the device wrote.
    for q in 0..queues {
        let used = queue_base(q) + 0x200;
        mem.write_slice(&[0u8; 4 + 8 * QUEUE_SIZE as usize + 2], GuestAddress(used))
            .unwrap();
    }
    mem
}

fn ops(g: &mut Gen) -> Vec<u8> {
    let n = g.below(24) as usize;
    g.bytes(7 * n)
}

#[test]
fn rng_survives_hostile_drivers() {
    let mut g = Gen(0x9e37_79b9_7f4a_7c15);
    for case in 0..CASES {
        let mem = case_memory(&mut g, 1);
        let ops = ops(&mut g);
        drive(Rng::default(), 1, mem, &ops, case);
    }
}

#[test]
fn balloon_survives_hostile_drivers() {
    let mut g = Gen(0x5851_f42d_4c95_7f2d);
    for case in 0..CASES {
        let mem = case_memory(&mut g, 3);
        let ops = ops(&mut g);
        drive(Balloon::default(), 3, mem, &ops, case);
    }
}

#[test]
fn block_survives_hostile_drivers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk");
    std::fs::write(&path, vec![0u8; 64 * 1024]).unwrap();
    let mut g = Gen(0xd1b5_4a32_d192_ed03);
    for case in 0..CASES {
        let mem = case_memory(&mut g, 1);
        let ops = ops(&mut g);
        let read_only = case % 2 == 0;
        let blk = Block::open(&path, read_only, "fuzz").unwrap();
        drive(blk, 1, mem, &ops, case);
    }
    // A read-only disk stayed as it was; a writable one holds only what
    // fits in it.
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 64 * 1024);
}

#[test]
fn console_survives_hostile_drivers() {
    let mut g = Gen(0x94d0_49bb_1331_11eb);
    for case in 0..CASES {
        let mem = case_memory(&mut g, 2);
        let ops = ops(&mut g);
        let (console, rx) = Console::detached();
        rx.push(b"host bytes for the guest");
        drive(console, 2, mem, &ops, case);
    }
}

#[test]
fn net_survives_hostile_drivers() {
    let mut g = Gen(0x2f1c_77a0_5eed_4e70);
    for case in 0..CASES {
        let mem = case_memory(&mut g, 2);
        let ops = ops(&mut g);
        let (net, rx) = Net::detached([2, 0, 0, 0, 0, 1], 1500);
        rx.push(&[0xab; 60]);
        rx.push(&[0xcd; 1514]);
        drive(net, 2, mem, &ops, case);
    }
}
