//! Snapshots on this host's KVM, with the `snap` payloads: a guest saved
//! while it spins is restored into new VMs that carry on in that loop with
//! its registers (general and SSE), memory and stack, on one vCPU and on
//! several (each vCPU its own), and a snapshot is refused by a VM it does
//! not fit and when it is damaged.

#[path = "common/payload_vm.rs"]
#[allow(dead_code)]
mod payload_vm;

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
