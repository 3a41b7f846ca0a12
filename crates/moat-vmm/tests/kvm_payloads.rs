//! The built-in VMM on this host's KVM, with tiny hand-assembled guests
//! (`payloads/*.S`, assembled to the committed `*.bin` by `payloads/build.sh`).
//! Each test skips, saying why, where /dev/kvm cannot be opened.

#[path = "common/payload_vm.rs"]
mod payload_vm;
#[path = "common/tap.rs"]
mod tap;
#[path = "common/virtiofsd.rs"]
mod virtiofsd;

use std::io::Read;

use moat_vmm::{ExitReason, Kernel, VmConfig};
use payload_vm::{kvm_available, run};

fn payload(bytes: &[u8]) -> Kernel {
    Kernel::Payload(bytes.to_vec())
}

#[test]
fn hello_on_serial_then_i8042_reset() {
    if !kvm_available() {
        return;
    }
    let (reason, out) = run(VmConfig::new(
        payload(include_bytes!("payloads/hello.bin")),
        1,
        16,
    ));
    assert_eq!(out, "hello from the guest\n");
    assert_eq!(reason, ExitReason::Reset);
}

#[test]
fn every_vcpu_runs_with_its_own_apic_id() {
    if !kvm_available() {
        return;
    }
    for vcpus in [1u8, 4] {
        let (reason, out) = run(VmConfig::new(
            payload(include_bytes!("payloads/smp.bin")),
            vcpus,
            16,
        ));
        assert_eq!(reason, ExitReason::Reset, "{vcpus} vCPUs");
        let line = out.strip_suffix('\n').expect("vCPU 0 ends the line");
        let mut ids: Vec<char> = line.chars().collect();
        ids.sort();
        let want: Vec<char> = (0..vcpus).map(|i| (b'0' + i) as char).collect();
        assert_eq!(ids, want, "{vcpus} vCPUs wrote {out:?}");
    }
}

#[test]
fn guest_memory_size_is_honoured() {
    if !kvm_available() {
        return;
    }
    for mib in [16u64, 100] {
        let (reason, out) = run(VmConfig::new(
            payload(include_bytes!("payloads/mem.bin")),
            1,
            mib,
        ));
        assert_eq!(reason, ExitReason::Reset);
        // The byte past the end of RAM is not memory: the bus reads all ones.
        assert_eq!(out, format!("end={:016x} rw=ok past=ff\n", mib << 20));
    }
}

#[test]
fn virtio_rng_serves_a_driver_and_survives_hostile_chains() {
    if !kvm_available() {
        return;
    }
    let mut config = VmConfig::new(payload(include_bytes!("payloads/rng.bin")), 1, 16);
    config.rng = true;
    let (reason, out) = run(config);
    assert_eq!(reason, ExitReason::Reset);
    // 32 random bytes; the looping chain and the one outside RAM come back
    // used with length 0 (the VMM neither hangs nor touches host memory).
    assert_eq!(out, "rng len=20 nonzero=1 loop=00 outside=00\n");
}

#[test]
fn virtio_balloon_gives_reported_pages_back_and_ignores_reports_outside_ram() {
    if !kvm_available() {
        return;
    }
    let mut config = VmConfig::new(payload(include_bytes!("payloads/balloon.bin")), 1, 16);
    config.balloon = true;
    let (reason, out) = run(config);
    assert_eq!(reason, ExitReason::Reset);
    // The reported 2 MiB block the guest had filled reads zeros (its pages
    // went back to the host: nothing else writes there), the page after it
    // kept its bytes, and the report outside RAM came back used, touching
    // nothing.
    assert_eq!(out, "balloon used=00 zero=1 kept=1 outside=00\n");
}

/// A FUSE client in the guest on a virtio-fs device whose queues a real
/// virtiofsd serves from the VM's shared memory: its notifications reach
/// virtiofsd through KVM (the ioeventfd), and the directory it makes is
/// on the host. Needs root (virtiofsd's sandbox).
#[test]
fn virtio_fs_is_served_by_virtiofsd_from_guest_memory() {
    if !kvm_available() {
        return;
    }
    // Kept whole: its temporary directory goes with it.
    let served = virtiofsd::served();
    let (share, be) = (&served.share, &served.backend);
    let mut config = VmConfig::new(payload(include_bytes!("payloads/fs.bin")), 1, 16);
    config.fs.push(moat_vmm::FsConfig {
        tag: "payload".into(),
        socket: be.socket.try_clone().unwrap(),
    });
    let (reason, out) = run(config);
    assert_eq!(reason, ExitReason::Reset);
    // FUSE_INIT and FUSE_MKDIR succeed (error 0), FUSE 7, and the
    // MKDIR's answer is a header and a fuse_entry_out (16 + 128 bytes).
    assert_eq!(out, "fs init=00000000 major=07 mkdir=00000000 len=90\n");
    assert!(share.join("payload-dir").is_dir());
}

fn disk(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("disk.img");
    let mut image = vec![0u8; 8 * 512];
    image[512..528].copy_from_slice(b"MOAT-BLOCK-SECT1");
    std::fs::write(&path, image).unwrap();
    path
}

#[test]
fn virtio_block_reads_writes_and_refuses_out_of_range() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path());
    let mut config = VmConfig::new(payload(include_bytes!("payloads/blk.bin")), 1, 16);
    config.block.push(moat_vmm::BlockConfig {
        path: path.clone(),
        read_only: false,
        file: None,
    });
    let (reason, out) = run(config);
    assert_eq!(reason, ExitReason::Reset);
    assert_eq!(out, "blk read=0 MOAT-BLOCK-SECT1 write=0 past=1\n");
    let image = std::fs::read(&path).unwrap();
    assert_eq!(&image[1024..1040], b"written by guest");
}

#[test]
fn read_only_block_device_refuses_writes() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path());
    let before = std::fs::read(&path).unwrap();
    let mut config = VmConfig::new(payload(include_bytes!("payloads/blk.bin")), 1, 16);
    config.block.push(moat_vmm::BlockConfig {
        path: path.clone(),
        read_only: true,
        file: None,
    });
    let (reason, out) = run(config);
    assert_eq!(reason, ExitReason::Reset);
    assert_eq!(out, "blk read=0 MOAT-BLOCK-SECT1 write=1 past=1\n");
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[test]
fn agent_console_carries_bytes_both_ways() {
    if !kvm_available() {
        return;
    }
    use std::io::Write;
    let (mut host, guest_side) = std::os::unix::net::UnixStream::pair().unwrap();
    let mut config = VmConfig::new(payload(include_bytes!("payloads/console.bin")), 1, 16);
    config.agent = Some(guest_side);
    host.write_all(b"ping").unwrap();
    let (reason, out) = run(config);
    assert_eq!(reason, ExitReason::Reset);
    assert_eq!(out, "console done\n");
    // The VMM shuts its side at exit, so this read ends.
    let mut got = String::new();
    host.read_to_string(&mut got).unwrap();
    assert_eq!(got, "guest got: ping");
}

#[test]
fn virtio_net_carries_frames_both_ways_in_the_stacks_framing() {
    if !kvm_available() {
        return;
    }
    use std::io::Write;
    let (mut host, guest_side) = std::os::unix::net::UnixStream::pair().unwrap();
    let mut config = VmConfig::new(payload(include_bytes!("payloads/net.bin")), 1, 16);
    config.net = Some(moat_vmm::NetConfig {
        backend: moat_vmm::NetBackend::Stream(guest_side),
        mac: [0x02, 0x6d, 0x6f, 0x61, 0x74, 0x01],
        mtu: 1500,
    });
    // What moat's stack writes: an oversized length the device's reader
    // skips, then one Ethernet frame, each after its big-endian length.
    let frame: Vec<u8> = (0..60u8).collect();
    let mut stream = Vec::new();
    stream.extend_from_slice(&70_000u32.to_be_bytes());
    stream.extend(std::iter::repeat_n(0xee, 70_000));
    stream.extend_from_slice(&(frame.len() as u32).to_be_bytes());
    stream.extend_from_slice(&frame);
    let writer = {
        let mut host = host.try_clone().unwrap();
        std::thread::spawn(move || host.write_all(&stream).unwrap())
    };
    let (reason, out) = run(config);
    writer.join().unwrap();
    assert_eq!(reason, ExitReason::Reset);
    assert_eq!(out, "net done\n");
    // The guest's one frame, in the same framing: its virtio header is
    // gone; it echoes the header it was given (zero, one buffer) and the
    // frame.
    let mut got = Vec::new();
    host.read_to_end(&mut got).unwrap();
    let len = u32::from_be_bytes(got[..4].try_into().unwrap()) as usize;
    assert_eq!(len, got.len() - 4, "one whole frame");
    let body = &got[4..];
    assert_eq!(&body[..11], b"guest got: ");
    assert_eq!(&body[11..23], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
    assert_eq!(&body[23..], &frame[..]);
}

/// The built-in VMM's network card on a TAP device with a virtio-net
/// header, as a pod's interface is handed to a guest: the guest's ARP
/// request for 10.0.2.2 (after its header, which the TAP reads) is
/// answered by the host's kernel, which holds that address on the TAP
/// (the reply after the TAP's header). The VM's end stops the TAP's I/O
/// thread, which waits on the quiet TAP (else `run` would not return).
#[test]
fn virtio_net_on_a_tap_is_answered_by_the_host_kernel() {
    if !kvm_available() {
        return;
    }
    let (tap, _udp) = tap::quiet_tap(std::net::Ipv4Addr::new(10, 0, 2, 2), 1500, true);
    let mut config = VmConfig::new(payload(include_bytes!("payloads/arp.bin")), 1, 16);
    config.net = Some(moat_vmm::NetConfig {
        backend: moat_vmm::NetBackend::Tap {
            file: tap,
            vnet_hdr: true,
        },
        mac: [0x02, 0x6d, 0x6f, 0x61, 0x74, 0x64],
        mtu: 1500,
    });
    let (reason, out) = run(config);
    assert_eq!(reason, ExitReason::Reset);
    assert_eq!(out, "arp reply from the gateway\n");
}

/// The built-in VMM's network card with moat's user-space stack behind it,
/// as the microvm tier runs the stack for QEMU: a guest's ARP request for
/// the gateway is answered by the stack, through the device both ways.
#[test]
fn virtio_net_reaches_moats_user_space_stack() {
    if !kvm_available() {
        return;
    }
    let (guest_side, stack) = payload_vm::stack_link();
    let mut config = VmConfig::new(payload(include_bytes!("payloads/arp.bin")), 1, 16);
    config.net = Some(moat_vmm::NetConfig {
        backend: moat_vmm::NetBackend::Stream(guest_side),
        mac: [0x02, 0x6d, 0x6f, 0x61, 0x74, 0x64],
        mtu: 65520,
    });
    let (reason, out) = run(config);
    assert_eq!(reason, ExitReason::Reset);
    assert_eq!(out, "arp reply from the gateway\n");
    // The VM's end closed with it: the stack ends as for a removed device.
    assert_eq!(stack.join().unwrap().unwrap(), moat_net::Ended::TapGone);
}
