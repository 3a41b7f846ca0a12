//! A hostile virtio driver against moat-vmm's devices: the fuzz input is the
//! guest memory holding the rings and buffers, plus a stream of MMIO register
//! reads, writes and queue notifications. Nothing may panic, hang, or touch
//! memory outside the guest's.
use moat_vmm::memory::GuestMem;
use moat_vmm::virtio::balloon::Balloon;
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

/// A well-behaved driver's setup, so the fuzzer starts at the queues: it
/// takes VERSION_1 and, with `all`, every feature of the low word the
/// device offers (a network card's mergeable buffers, …).
fn setup<D: VirtioDevice>(t: &mut MmioTransport<D, NoIrq>, queues: u32, all: bool) {
    w(t, 0x70, 3);
    if all {
        w(t, 0x14, 0);
        let mut offered = [0u8; 4];
        t.read(0x10, &mut offered);
        w(t, 0x24, 0);
        w(t, 0x20, u32::from_le_bytes(offered));
    }
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

fn drive<D: VirtioDevice>(device: D, queues: u32, mem: GuestMem, ops: &[u8], all: bool) {
    let mut t = MmioTransport::new(device, NoIrq, mem);
    setup(&mut t, queues, all);
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
    // Layout: device selector (bits 0-1 the device, bit 4 the balloon
    // instead), op count, ops (7 bytes each), then the guest
    // memory from 0x1000 on (queue q's rings at 0x1000 + q * 0x400: table,
    // available ring at +0x100, used ring at +0x200).
    let [which, n, rest @ ..] = data else {
        return;
    };
    let (ops, image) = rest.split_at(rest.len().min(7 * usize::from(*n)));
    // What fits in the guest's 1 MiB above 0x1000.
    let image = &image[..image.len().min((1 << 20) - 0x1000)];
    let which = *which;
    // Bit 3 of the selector: the driver takes every feature offered.
    let all = which & 8 != 0;
    let mem: GuestMem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    mem.write_slice(image, GuestAddress(0x1000)).unwrap();
    // Bit 4: the balloon (its reports give guest pages back to the host).
    if which & 0x10 != 0 {
        return drive(Balloon::default(), 3, mem, ops, all);
    }
    match which % 4 {
        0 => drive(Rng::default(), 1, mem, ops, all),
        1 => {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("disk");
            std::fs::write(&path, vec![0u8; 64 * 1024]).unwrap();
            let blk = Block::open(&path, which & 4 != 0, "fuzz").unwrap();
            drive(blk, 1, mem, ops, all);
        }
        2 => {
            let (console, rx) = Console::detached();
            rx.push(b"host bytes for the guest");
            drive(console, 2, mem, ops, all);
        }
        _ => {
            let (net, rx) = Net::detached([2, 0, 0, 0, 0, 1], 1500);
            rx.push(&[0xab; 60]);
            rx.push(&[0xcd; 1514]);
            // Over one page: with mergeable buffers, spread over several.
            rx.push(&[0xef; 5000]);
            drive(net, 2, mem, ops, all);
        }
    }
}

/// A snapshot's state part (its JSON) from a hostile or damaged file:
/// read as `Vm::restore` reads it (after 16 MiB of guest memory, a hole),
/// checked against a VM of one vCPU with an entropy device and a console,
/// and every saved transport and COM1's registers taken by real devices,
/// which a driver then pokes. Nothing may panic or touch memory outside
/// the guest's.
pub fn snapshot_state(data: &[u8]) {
    use std::os::unix::fs::FileExt;
    const MIB: u64 = 16;
    let Ok(file) = tempfile::tempfile() else {
        return;
    };
    let ram = MIB << 20;
    let mut tail = data.to_vec();
    tail.extend_from_slice(&(data.len() as u64).to_le_bytes());
    tail.extend_from_slice(moat_vmm::snapshot::MAGIC);
    if file.set_len(ram).is_err() || file.write_all_at(&tail, ram).is_err() {
        return;
    }
    let Ok(state) = moat_vmm::snapshot::read_state(&file, MIB) else {
        // The transports alone (a small JSON that mutations keep valid
        // more often than a whole state's).
        if let Ok(transports) =
            serde_json::from_slice::<Vec<moat_vmm::snapshot::TransportState>>(data)
        {
            crate::reached();
            take_transports(&transports);
        }
        return;
    };
    crate::reached();
    let _ = moat_vmm::snapshot::check_fits(&state, 1, &[4, 3]);
    let _ = moat_vmm::devices::serial::SerialDevice::restore(
        NoIrq,
        moat_vmm::devices::serial::SerialOut::Sink,
        &state.serial,
    )
    .map(|mut s| {
        for off in 0..8 {
            let _ = s.read(off);
        }
    });
    take_transports(&state.transports);
}

/// Saved transports taken by an entropy device and a console, which a
/// driver then pokes.
fn take_transports(transports: &[moat_vmm::snapshot::TransportState]) {
    let Ok(mem) = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]) else {
        return;
    };
    for saved in transports.iter().take(8) {
        let mut rng = MmioTransport::new(Rng::default(), NoIrq, mem.clone());
        if rng.set_state(saved).is_ok() {
            assert_eq!(
                &rng.state(),
                saved,
                "a transport's state did not round-trip"
            );
            rng.process_queue(0);
            w(&mut rng, 0x50, 0);
        }
        let Ok((a, _b)) = std::os::unix::net::UnixStream::pair() else {
            return;
        };
        let Ok((console, _rx, _reader)) = Console::new(a) else {
            return;
        };
        let mut c = MmioTransport::new(console, NoIrq, mem.clone());
        if c.set_state(saved).is_ok() {
            c.process_queue(0);
            c.process_queue(1);
        }
    }
}
