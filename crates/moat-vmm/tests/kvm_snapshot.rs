//! Snapshots on this host's KVM, with the `snap` payloads: a guest saved
//! while it spins is restored into new VMs that carry on in that loop with
//! its registers (general and SSE), memory and stack, on one vCPU and on
//! several (each vCPU its own), and a snapshot is refused by a VM it does
//! not fit and when it is damaged. With the `fs_late` payload: a virtio-fs
//! slot saved as a placeholder is filled by a restore (or shown in a
//! running VM), and the guest's FUSE requests reach a real virtiofsd.

#[path = "common/payload_vm.rs"]
#[allow(dead_code)]
mod payload_vm;
#[path = "common/virtiofsd.rs"]
mod virtiofsd;

use std::io::{Read, Seek, Write};
use std::os::unix::fs::FileExt;

use moat_vmm::{ExitReason, Kernel, Vm, VmConfig};
use payload_vm::{kvm_available, run_vm};
use vm_memory::{Bytes, GuestAddress};

const SNAP: &[u8] = include_bytes!("payloads/snap.bin");
const SNAP_SMP: &[u8] = include_bytes!("payloads/snap_smp.bin");
/// The byte the payload spins on.
const GO: GuestAddress = GuestAddress(0x30_0000);
const DONE: &str = "done r13=1122334455667788 mem=cafef00d12345678 \
                    xmm=fedcba98765432100123456789abcdef stack=5eed spun=1\n";

fn config(vcpus: u8, mib: u64) -> VmConfig {
    config_of(SNAP, vcpus, mib)
}

fn config_of(payload: &[u8], vcpus: u8, mib: u64) -> VmConfig {
    VmConfig::new(Kernel::Payload(payload.to_vec()), vcpus, mib)
}

/// Boots the `snap` payload, saves it once it spins, lets it finish;
/// returns the snapshot.
fn saved_snapshot() -> std::fs::File {
    saved_snapshot_of(config(1, 16), DONE)
}

/// Boots `c`, saves it once it said "ready", lets it finish (checking its
/// output ends with `done`); returns the snapshot.
fn saved_snapshot_of(mut c: VmConfig, done: &str) -> std::fs::File {
    let (mut serial_r, serial_w) = std::io::pipe().unwrap();
    c.serial_out = Some(std::fs::File::from(std::os::fd::OwnedFd::from(serial_w)));
    let vm = Vm::new(c).unwrap();
    let (snap, mem) = (vm.snapshot_handle(), vm.memory().clone());
    let running = std::thread::spawn(move || run_vm(vm));
    let mut out = payload_vm::read_until(&mut serial_r, b"ready\n");
    let file = tempfile::tempfile().unwrap();
    snap.save(&file).unwrap();
    // The saved VM runs on after its snapshot.
    mem.write_obj(1u8, GO).unwrap();
    assert_eq!(running.join().unwrap(), ExitReason::Reset);
    // A VM that has ended saves nothing (an error, not a wait).
    let e = snap.save(&tempfile::tempfile().unwrap()).unwrap_err();
    assert!(moat_core::error_chain(&e).contains("stopped"), "{e}");
    serial_r.read_to_end(&mut out).unwrap();
    assert_eq!(String::from_utf8_lossy(&out), format!("ready\n{done}"));
    file
}

/// Restores `snapshot` into a VM of `c`, lets it leave its loop; returns
/// its exit and serial output.
fn restore_and_run(mut c: VmConfig, snapshot: &std::fs::File) -> (ExitReason, String) {
    let mut out = tempfile::tempfile().unwrap();
    c.serial_out = Some(out.try_clone().unwrap());
    let vm = Vm::restore(c, snapshot).unwrap();
    // Still spinning as saved: the flag is as it was then.
    assert_eq!(vm.memory().read_obj::<u8>(GO).unwrap(), 0);
    vm.memory().write_obj(1u8, GO).unwrap();
    let reason = run_vm(vm);
    let mut s = String::new();
    out.rewind().unwrap();
    out.read_to_string(&mut s).unwrap();
    (reason, s)
}

#[test]
fn a_restored_guest_carries_on_where_it_was_saved() {
    if !kvm_available() {
        return;
    }
    let snapshot = saved_snapshot();
    // Twice from one file: a restore writes nothing back to it.
    for _ in 0..2 {
        let (reason, out) = restore_and_run(config(1, 16), &snapshot);
        assert_eq!(reason, ExitReason::Reset);
        // No "ready": it did not start over.
        assert_eq!(out, DONE);
    }
    // Zero pages are holes: the file holds less than the guest's 16 MiB.
    let meta = snapshot.metadata().unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(meta.blocks() * 512 < meta.len() / 2, "{meta:?}");
}

#[test]
fn every_vcpu_of_a_restored_guest_carries_on() {
    if !kvm_available() {
        return;
    }
    for vcpus in [2u8, 4] {
        let done: String = (0..vcpus)
            .map(|i| format!("cpu{i} r13=11223344556677{i:02x} spun=1\n"))
            .collect();
        let snapshot = saved_snapshot_of(config_of(SNAP_SMP, vcpus, 16), &done);
        let (reason, out) = restore_and_run(config_of(SNAP_SMP, vcpus, 16), &snapshot);
        assert_eq!(reason, ExitReason::Reset, "{vcpus} vCPUs");
        assert_eq!(out, done, "{vcpus} vCPUs");
    }
}

#[test]
fn a_snapshot_is_refused_by_a_vm_it_does_not_fit_or_when_damaged() {
    if !kvm_available() {
        return;
    }
    let snapshot = saved_snapshot();
    let refused = |c: VmConfig, f: &std::fs::File| match Vm::restore(c, f) {
        Ok(_) => panic!("restored"),
        Err(e) => moat_core::error_chain(&e),
    };
    let e = refused(config(2, 16), &snapshot);
    assert!(e.contains("saved with 1 vCPUs, not 2"), "{e}");
    let e = refused(config(1, 32), &snapshot);
    assert!(e.contains("memory"), "{e}");
    let mut with_rng = config(1, 16);
    with_rng.rng = true;
    let e = refused(with_rng, &snapshot);
    assert!(e.contains("virtio devices [], not [4]"), "{e}");
    // Damaged: the trailer's magic, the state's JSON, a truncated file.
    let len = snapshot.metadata().unwrap().len();
    let copy = |edit: &dyn Fn(&std::fs::File)| {
        let mut f = tempfile::tempfile().unwrap();
        let mut src = snapshot.try_clone().unwrap();
        src.rewind().unwrap();
        std::io::copy(&mut src, &mut f).unwrap();
        f.flush().unwrap();
        edit(&f);
        f
    };
    let bad_magic = copy(&|f| f.write_all_at(b"X", len - 1).unwrap());
    let e = refused(config(1, 16), &bad_magic);
    assert!(e.contains("not a moat-vmm snapshot"), "{e}");
    let bad_json = copy(&|f| f.write_all_at(b"}", 16 << 20).unwrap());
    let e = refused(config(1, 16), &bad_json);
    assert!(e.contains("decode the VM state"), "{e}");
    let short = copy(&|f| f.set_len(len - 100).unwrap());
    let e = refused(config(1, 16), &short);
    assert!(e.contains("snapshot"), "{e}");
}

const FS_LATE: &[u8] = include_bytes!("payloads/fs_late.bin");
/// The byte `fs_late` spins on.
const FS_GO: GuestAddress = GuestAddress(0x38_0000);
/// What `fs_late` prints before it spins: the slot is a placeholder.
const PLACEHOLDER: &str = "slot=00000000 ready\n";
/// What it prints once the slot is virtio-fs (26) and virtiofsd served
/// its FUSE_INIT and FUSE_MKDIR (fs.S).
const SERVED: &str = "then=0000001a fs init=00000000 major=07 mkdir=00000000 len=90\n";

/// `fs_late` with one virtio-fs slot, filled by `fs` (or a placeholder).
fn fs_config(fs: Option<&std::os::unix::net::UnixStream>) -> VmConfig {
    let mut c = config_of(FS_LATE, 1, 16);
    c.fs_slots = 1;
    c.fs.extend(fs.map(|s| moat_vmm::FsConfig {
        tag: "payload".into(),
        socket: s.try_clone().unwrap(),
    }));
    c
}

/// A guest saved with an empty virtio-fs slot (a placeholder: device ID
/// 0, which it reads and the saved VM keeps to its end) is restored with
/// the slot filled: it reads the device there, and virtiofsd serves its
/// requests from the restored memory (a copy in a shared memfd, since the
/// back-end maps it). More devices than slots are refused.
#[test]
fn a_restore_fills_a_placeholder_slot_with_a_served_virtio_fs_device() {
    if !kvm_available() {
        return;
    }
    let (mut serial_r, serial_w) = std::io::pipe().unwrap();
    let mut c = fs_config(None);
    c.serial_out = Some(std::fs::File::from(std::os::fd::OwnedFd::from(serial_w)));
    let vm = Vm::new(c).unwrap();
    let (snap, mem) = (vm.snapshot_handle(), vm.memory().clone());
    let running = std::thread::spawn(move || run_vm(vm));
    let mut out = payload_vm::read_until(&mut serial_r, PLACEHOLDER.as_bytes());
    let snapshot = tempfile::tempfile().unwrap();
    snap.save(&snapshot).unwrap();
    mem.write_obj(1u8, FS_GO).unwrap();
    assert_eq!(running.join().unwrap(), ExitReason::Reset);
    serial_r.read_to_end(&mut out).unwrap();
    // Still a placeholder: the client's start fails at the device ID.
    assert_eq!(
        String::from_utf8_lossy(&out),
        format!("{PLACEHOLDER}then=00000000 fs fail d\n")
    );

    // Kept whole: its temporary directory goes with it.
    let served = virtiofsd::served();
    let (share, be) = (&served.share, &served.backend);
    let mut two = fs_config(Some(&be.socket));
    two.fs.push(moat_vmm::FsConfig {
        tag: "more".into(),
        socket: be.socket.try_clone().unwrap(),
    });
    let e = match Vm::restore(two, &snapshot) {
        Ok(_) => panic!("two devices restored into one slot"),
        Err(e) => moat_core::error_chain(&e),
    };
    assert!(e.contains("2 virtio-fs devices for 1 slots"), "{e}");
    let mut c = fs_config(Some(&be.socket));
    let mut log = tempfile::tempfile().unwrap();
    c.serial_out = Some(log.try_clone().unwrap());
    let vm = Vm::restore(c, &snapshot).unwrap();
    assert_eq!(vm.memory().read_obj::<u8>(FS_GO).unwrap(), 0);
    // The restored VM is not saved: the back-end's state is not its own.
    let snap = vm.snapshot_handle();
    vm.memory().write_obj(1u8, FS_GO).unwrap();
    let running = std::thread::spawn(move || run_vm(vm));
    assert_eq!(running.join().unwrap(), ExitReason::Reset);
    let mut s = String::new();
    log.rewind().unwrap();
    log.read_to_string(&mut s).unwrap();
    assert_eq!(s, SERVED);
    assert!(share.join("payload-dir").is_dir());
    drop(snap);
}

/// A running guest's hidden virtio-fs device ([`VmConfig::fs_later`]) is a
/// placeholder until shown: the VM saves while it is one (the snapshot a
/// later restore fills), refuses to save once it is shown, and the guest
/// then finds the device and is served.
#[test]
fn a_hidden_virtio_fs_device_is_shown_in_a_running_vm_after_its_save() {
    if !kvm_available() {
        return;
    }
    // Kept whole: its temporary directory goes with it.
    let served = virtiofsd::served();
    let (share, be) = (&served.share, &served.backend);
    let (mut serial_r, serial_w) = std::io::pipe().unwrap();
    // 256 MiB of RAM (a memfd, which virtiofsd maps), of which the guest
    // touches a few pages.
    let mut c = fs_config(Some(&be.socket));
    c.mem_mib = 256;
    c.fs_later = true;
    c.serial_out = Some(std::fs::File::from(std::os::fd::OwnedFd::from(serial_w)));
    let vm = Vm::new(c).unwrap();
    let (snap, fs, mem) = (vm.snapshot_handle(), vm.fs_handle(), vm.memory().clone());
    let ram_bytes = || {
        use std::os::unix::fs::MetadataExt;
        use vm_memory::GuestMemoryBackend;
        let region = mem.iter().next().unwrap();
        let file = region.file_offset().expect("a memfd").file();
        file.metadata().unwrap().blocks() * 512
    };
    let running = std::thread::spawn(move || run_vm(vm));
    let mut out = payload_vm::read_until(&mut serial_r, PLACEHOLDER.as_bytes());
    let snapshot = tempfile::tempfile().unwrap();
    snap.save(&snapshot).unwrap();
    // The save read the memfd's data, not its holes: reading a hole of
    // shmem fills it (the whole RAM, charged to the VM's cgroup).
    assert!(
        ram_bytes() < 16 << 20,
        "the save filled the guest's shared RAM: {} bytes",
        ram_bytes()
    );
    assert_eq!(fs.show().unwrap(), 1);
    assert_eq!(fs.show().unwrap(), 0, "shown twice");
    let e = snap.save(&tempfile::tempfile().unwrap()).unwrap_err();
    assert!(
        moat_core::error_chain(&e).contains("a VM with a virtio-fs device is not saved"),
        "{e}"
    );
    mem.write_obj(1u8, FS_GO).unwrap();
    assert_eq!(running.join().unwrap(), ExitReason::Reset);
    serial_r.read_to_end(&mut out).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out),
        format!("{PLACEHOLDER}{SERVED}")
    );
    assert!(share.join("payload-dir").is_dir());
    // What it saved holds the slot as a placeholder: a VM without the
    // device restores it.
    let (reason, s) = {
        let mut c = fs_config(None);
        c.mem_mib = 256;
        let mut log = tempfile::tempfile().unwrap();
        c.serial_out = Some(log.try_clone().unwrap());
        let vm = Vm::restore(c, &snapshot).unwrap();
        vm.memory().write_obj(1u8, FS_GO).unwrap();
        let reason = run_vm(vm);
        let mut s = String::new();
        log.rewind().unwrap();
        log.read_to_string(&mut s).unwrap();
        (reason, s)
    };
    assert_eq!(reason, ExitReason::Reset);
    assert_eq!(s, "then=00000000 fs fail d\n");
}
