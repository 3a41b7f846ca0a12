//! A hostile virtio driver against moat-vmm's devices: the fuzz input is the
//! guest memory holding the rings and buffers, plus a stream of MMIO register
//! reads, writes and queue notifications. Nothing may panic, hang, or touch
//! memory outside the guest's.
use moat_vmm::memory::GuestMem;
use moat_vmm::virtio::block::Block;
use moat_vmm::virtio::console::Console;
use moat_vmm::virtio::mmio::MmioTransport;
use moat_vmm::virtio::net::Net;
use moat_vmm::virtio::rng::Rng;
use moat_vmm::virtio::VirtioDevice;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

struct NoIrq;
impl vm_superio::Trigger for NoIrq {
    type E = ();
    fn trigger(&self) -> Result<(), ()> {
        Ok(())
    }
}

fn w<D: VirtioDevice>(t: &mut MmioTransport<D, NoIrq>, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

/// A well-behaved driver's setup, so the fuzzer starts at the queues.
fn setup<D: VirtioDevice>(t: &mut MmioTransport<D, NoIrq>, queues: u32) {
    w(t, 0x70, 3);
    w(t, 0x24, 1);
    w(t, 0x20, 1);
    w(t, 0x70, 0xb);
    for q in 0..queues {
        let base = 0x1000 + q * 0x400;
        w(t, 0x30, q);
        w(t, 0x38, 16);
        w(t, 0x80, base);
        w(t, 0x90, base + 0x100);
        w(t, 0xa0, base + 0x200);
        w(t, 0x44, 1);
    }
    w(t, 0x70, 0xf);
}

fn drive<D: VirtioDevice>(device: D, queues: u32, mem: GuestMem, ops: &[u8]) {
    let mut t = MmioTransport::new(device, NoIrq, mem);
    setup(&mut t, queues);
    // Counted: inputs that drive the device beyond the fixed setup.
    if ops.len() >= 7 {
        crate::reached();
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
    }
}

/// See [`crate::targets::virtio_queue`].
pub fn run(data: &[u8]) {
    // Layout: device selector, op count, ops (7 bytes each), then the guest
    // memory from 0x1000 on (queue q's rings at 0x1000 + q * 0x400: table,
    // available ring at +0x100, used ring at +0x200).
    let [which, n, rest @ ..] = data else {
        return;
    };
    let (ops, image) = rest.split_at(rest.len().min(7 * usize::from(*n)));
    // What fits in the guest's 1 MiB above 0x1000.
    let image = &image[..image.len().min((1 << 20) - 0x1000)];
    let which = *which;
    let mem: GuestMem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    mem.write_slice(image, GuestAddress(0x1000)).unwrap();
    match which % 4 {
        0 => drive(Rng::default(), 1, mem, ops),
        1 => {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("disk");
            std::fs::write(&path, vec![0u8; 64 * 1024]).unwrap();
            let blk = Block::open(&path, which & 4 != 0, "fuzz").unwrap();
            drive(blk, 1, mem, ops);
        }
        2 => {
            let (console, rx) = Console::detached();
            rx.push(b"host bytes for the guest");
            drive(console, 2, mem, ops);
        }
        _ => {
            let (net, rx) = Net::detached([2, 0, 0, 0, 0, 1], 1500);
            rx.push(&[0xab; 60]);
            rx.push(&[0xcd; 1514]);
            drive(net, 2, mem, ops);
        }
    }
}
