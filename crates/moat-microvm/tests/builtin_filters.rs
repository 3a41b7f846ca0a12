//! moat's own VMM under its per-thread seccomp filters
//! (`seccomp::builtin_thread_hook`): the payload guests of moat-vmm's own
//! tests (`moat-vmm/tests/payloads`) still run every device with each
//! thread confined to its role, and a confined thread is refused what its
//! role does not need. Needs /dev/kvm (skips, saying why, without it), and
//! root for virtiofsd.
#[path = "../../moat-vmm/tests/common/payload_vm.rs"]
mod payload_vm;
#[path = "../../moat-vmm/tests/common/tap.rs"]
mod tap;
#[path = "../../moat-vmm/tests/common/virtiofsd.rs"]
mod virtiofsd;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use moat_microvm::seccomp::builtin_thread_hook;
use moat_vmm::{BlockConfig, ExitReason, FsConfig, Kernel, NetConfig, ThreadRole, VmConfig};
use payload_vm::kvm_available;

macro_rules! payload {
    ($name:literal) => {
        Kernel::Payload(
            include_bytes!(concat!("../../moat-vmm/tests/payloads/", $name, ".bin")).to_vec(),
        )
    };
}

/// Runs `config` with every VMM thread under its filter (the thread that
/// runs the VM included); the exit and COM1.
fn run_confined(mut config: VmConfig) -> (ExitReason, String) {
    config.thread_hook = Some(builtin_thread_hook());
    payload_vm::run(config)
}

#[test]
fn every_device_works_with_each_thread_confined_to_its_role() {
    if !kvm_available() {
        return;
    }
    // Serial and reset, on four vCPUs.
    let (reason, out) = run_confined(VmConfig::new(payload!("smp"), 4, 16));
    assert_eq!(reason, ExitReason::Reset);
    assert_eq!(out.trim_end().len(), 4, "{out:?}");
    // virtio-rng.
    let mut c = VmConfig::new(payload!("rng"), 1, 16);
    c.rng = true;
    assert_eq!(
        run_confined(c).1,
        "rng len=20 nonzero=1 loop=00 outside=00\n"
    );
    // virtio-balloon: a free page report's pages given back (the vCPU's
    // madvise).
    let mut c = VmConfig::new(payload!("balloon"), 1, 16);
    c.balloon = true;
    assert_eq!(
        run_confined(c).1,
        "balloon used=00 zero=1 kept=1 outside=00\n"
    );
    // virtio-blk: read, write, flush, out of range.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    let mut image = vec![0u8; 8 * 512];
    image[512..528].copy_from_slice(b"MOAT-BLOCK-SECT1");
    std::fs::write(&path, image).unwrap();
    let mut c = VmConfig::new(payload!("blk"), 1, 16);
    c.block.push(BlockConfig {
        path: path.clone(),
        read_only: false,
        file: None,
    });
    assert_eq!(
        run_confined(c).1,
        "blk read=0 MOAT-BLOCK-SECT1 write=0 past=1\n"
    );
    assert_eq!(
        &std::fs::read(&path).unwrap()[1024..1040],
        b"written by guest"
    );
    // The agent console, both ways (its I/O thread confined too).
    let (mut host, guest) = UnixStream::pair().unwrap();
    let mut c = VmConfig::new(payload!("console"), 1, 16);
    c.agent = Some(guest);
    host.write_all(b"ping").unwrap();
    assert_eq!(run_confined(c).1, "console done\n");
    let mut got = String::new();
    host.read_to_string(&mut got).unwrap();
    assert_eq!(got, "guest got: ping");
    // The network card against moat's stack.
    let (guest, stack) = payload_vm::stack_link();
    let mut c = VmConfig::new(payload!("arp"), 1, 16);
    c.net = Some(NetConfig {
        backend: moat_vmm::NetBackend::Stream(guest),
        mac: [0x02, 0x6d, 0x6f, 0x61, 0x74, 0x64],
        mtu: 65520,
    });
    assert_eq!(run_confined(c).1, "arp reply from the gateway\n");
    assert!(stack.join().unwrap().is_ok());
    // The network card against a TAP with a virtio-net header (a pod's
    // interface handed to the guest, as the tier makes it): the host
    // kernel answers; its reader waits in ppoll; the vCPU that starts the
    // card sets the TAP's offloads.
    let (tap, _udp) = tap::quiet_tap(std::net::Ipv4Addr::new(10, 0, 2, 2), 1500, true);
    let mut c = VmConfig::new(payload!("arp"), 1, 16);
    c.net = Some(NetConfig {
        backend: moat_vmm::NetBackend::Tap {
            file: tap,
            vnet_hdr: true,
        },
        mac: [0x02, 0x6d, 0x6f, 0x61, 0x74, 0x64],
        mtu: 1500,
    });
    assert_eq!(run_confined(c).1, "arp reply from the gateway\n");
    // virtio-fs: the vCPU that starts the device speaks vhost-user to a
    // real virtiofsd (root: its sandbox), which serves the queues.
    assert!(
        rustix::process::geteuid().is_root(),
        "needs root: virtiofsd sets up its sandbox"
    );
    let share = dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    let be = virtiofsd::backend(&share, &dir.path().join("fs.sock"));
    let mut c = VmConfig::new(payload!("fs"), 1, 16);
    c.fs.push(FsConfig {
        tag: "payload".into(),
        socket: be.socket.try_clone().unwrap(),
    });
    assert_eq!(
        run_confined(c).1,
        "fs init=00000000 major=07 mkdir=00000000 len=90\n"
    );
    assert!(share.join("payload-dir").is_dir());
}

#[test]
fn a_snapshot_is_saved_and_restored_with_each_thread_confined() {
    if !kvm_available() {
        return;
    }
    use vm_memory::{Bytes, GuestAddress};
    const GO: GuestAddress = GuestAddress(0x30_0000);
    const DONE: &str = "done r13=1122334455667788 mem=cafef00d12345678 \
                        xmm=fedcba98765432100123456789abcdef stack=5eed spun=1\n";
    let (mut serial_r, serial_w) = std::io::pipe().unwrap();
    let mut c = VmConfig::new(payload!("snap"), 1, 16);
    c.serial_out = Some(std::fs::File::from(std::os::fd::OwnedFd::from(serial_w)));
    c.thread_hook = Some(builtin_thread_hook());
    let vm = moat_vmm::Vm::new(c).unwrap();
    let (snap, mem) = (vm.snapshot_handle(), vm.memory().clone());
    let running = std::thread::spawn(move || vm.run().unwrap());
    let mut out = payload_vm::read_until(&mut serial_r, b"ready\n");
    let file = tempfile::tempfile().unwrap();
    // Asked for from a thread confined as the tier's control thread is;
    // written by the VM's confined main thread and vCPU.
    let f = file.try_clone().unwrap();
    std::thread::spawn(move || {
        (builtin_thread_hook().0)(ThreadRole::Control).unwrap();
        snap.save(&f)
    })
    .join()
    .unwrap()
    .unwrap();
    mem.write_obj(1u8, GO).unwrap();
    assert_eq!(running.join().unwrap(), ExitReason::Reset);
    serial_r.read_to_end(&mut out).unwrap();
    assert_eq!(String::from_utf8_lossy(&out), format!("ready\n{DONE}"));
    // Restored (as the tier does, before the threads start) and run confined.
    let mut serial = tempfile::tempfile().unwrap();
    let mut c = VmConfig::new(payload!("snap"), 1, 16);
    c.serial_out = Some(serial.try_clone().unwrap());
    c.thread_hook = Some(builtin_thread_hook());
    let vm = moat_vmm::Vm::restore(c, &file).unwrap();
    vm.memory().write_obj(1u8, GO).unwrap();
    assert_eq!(
        std::thread::spawn(move || vm.run().unwrap())
            .join()
            .unwrap(),
        ExitReason::Reset
    );
    let mut s = String::new();
    use std::io::Seek;
    serial.rewind().unwrap();
    serial.read_to_string(&mut s).unwrap();
    assert_eq!(s, DONE);
}

#[test]
fn a_confined_thread_is_refused_what_its_role_does_not_need() {
    for role in [
        ThreadRole::Vcpu,
        ThreadRole::AgentIo,
        ThreadRole::NetIo,
        ThreadRole::Main,
        ThreadRole::Control,
    ] {
        let r = std::thread::spawn(move || {
            (builtin_thread_hook().0)(role).unwrap();
            let open = std::fs::File::open("/etc/hostname").map(drop);
            let socket = UnixStream::pair().map(drop);
            let spawn = std::process::Command::new("/bin/true").status().map(drop);
            (open, socket, spawn)
        })
        .join()
        .unwrap();
        for (what, res) in [("open", r.0), ("socketpair", r.1), ("spawn", r.2)] {
            let e = res.expect_err(what);
            assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{role:?} {what}: {e}");
        }
    }
}

/// A run's read-write volume on moat's own VMM with no snapshot yet, as
/// the tier does it, every thread confined: the device hidden in its slot
/// while the guest is saved (the main thread reads only the shared RAM's
/// data, `lseek` to find it), then shown from a thread confined as the
/// control thread is; the guest finds it and virtiofsd serves it (the
/// `fs_late` payload). Root for virtiofsd.
#[test]
fn a_volume_is_shown_after_the_save_with_each_thread_confined() {
    if !kvm_available() {
        return;
    }
    use vm_memory::{Bytes, GuestAddress};
    const GO: GuestAddress = GuestAddress(0x38_0000);
    // Kept whole: its temporary directory goes with it.
    let served = virtiofsd::served();
    let (share, be) = (&served.share, &served.backend);
    let (mut serial_r, serial_w) = std::io::pipe().unwrap();
    let mut c = VmConfig::new(payload!("fs_late"), 1, 64);
    c.fs.push(FsConfig {
        tag: "payload".into(),
        socket: be.socket.try_clone().unwrap(),
    });
    c.fs_slots = 2;
    c.fs_later = true;
    c.serial_out = Some(std::fs::File::from(std::os::fd::OwnedFd::from(serial_w)));
    c.thread_hook = Some(builtin_thread_hook());
    let vm = moat_vmm::Vm::new(c).unwrap();
    let (snap, fs, mem) = (vm.snapshot_handle(), vm.fs_handle(), vm.memory().clone());
    let running = std::thread::spawn(move || vm.run().unwrap());
    let mut out = payload_vm::read_until(&mut serial_r, b"slot=00000000 ready\n");
    let file = tempfile::tempfile().unwrap();
    let f = file.try_clone().unwrap();
    let shown = std::thread::spawn(move || {
        (builtin_thread_hook().0)(ThreadRole::Control).unwrap();
        snap.save(&f).map_err(|e| moat_core::error_chain(&e))?;
        fs.show().map_err(|e| moat_core::error_chain(&e))
    })
    .join()
    .unwrap();
    assert_eq!(shown, Ok(1));
    mem.write_obj(1u8, GO).unwrap();
    assert_eq!(running.join().unwrap(), ExitReason::Reset);
    serial_r.read_to_end(&mut out).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out),
        "slot=00000000 ready\nthen=0000001a fs init=00000000 major=07 mkdir=00000000 len=90\n"
    );
    assert!(share.join("payload-dir").is_dir());
    assert!(
        file.metadata().unwrap().len() > 64 << 20,
        "no snapshot written"
    );
}
