//! Measures the built-in VMM and the QEMU backend (not a test: numbers only).
//!
//! ```text
//! cargo run -p moat-vmm --release --example bench [runs]
//! ```
//!
//! 1. process start -> first guest instruction: the time from spawning a
//!    process that builds and runs a 1-vCPU, 128 MiB VM to the first byte the
//!    guest's first instruction writes to COM1 (read from a pipe);
//! 2. VMM RSS with that tiny guest running (VmRSS of the process, guest pages
//!    it touched included);
//! 3. snapshots, with the `snap` test payload in a 1-vCPU, 128 MiB VM:
//!    saving it once it spins (pause, write, resume), and building a VM
//!    from the snapshot and running it to the payload's first output
//!    (`Vm::restore` -> COM1), against building and booting one to its
//!    first output (`Vm::new` -> COM1), in this process;
//! 4. QEMU backend, TCG where KVM is not usable: spawn -> the first line
//!    from the cloud kernel's /init on the serial console;
//! 5. a restored guest's memory when a read-write volume's virtiofsd must
//!    map it: `memory::restore_shared` (a copy of the snapshot file's data
//!    into a memfd) against `memory::restore` (the file mapped
//!    copy-on-write, nothing read until the guest touches it), for the
//!    tier's default guest (1257 MiB) with 160 MiB of data in 4 MiB runs
//!    every 8 MiB, as a booted guest's snapshot has (~100–170 MiB here).
//!
//! Medians of `runs` (default 20) for 1 to 3 and 5, of 5 for 4.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use moat_vmm::cpio::CpioWriter;
use moat_vmm::qemu::{detect_accel, QemuVm, QEMU_BINARY};
use moat_vmm::{Kernel, Vm, VmConfig};

/// `out %al, %dx` to COM1 with al = 'x' as the very first instructions,
/// then halt with interrupts off.
const FIRST_OUT: [u8; 9] = [
    0x66, 0xba, 0xf8, 0x03, // mov $0x3f8, %dx
    0xb0, b'x', // mov $'x', %al
    0xee, // out %al, %dx
    0xfa, // cli
    0xf4, // hlt
];

fn child() {
    let mut config = VmConfig::new(Kernel::Payload(FIRST_OUT.to_vec()), 1, 128);
    use std::os::fd::AsFd;
    let out = std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .expect("dup stdout");
    config.serial_out = Some(std::fs::File::from(out));
    let vm = Vm::new(config).expect("build VM");
    let _ = vm.run();
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn builtin(runs: usize) {
    let exe = std::env::current_exe().unwrap();
    let mut starts = Vec::new();
    let mut rss = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let mut c = Command::new(&exe)
            .arg("child")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut b = [0u8; 1];
        c.stdout.as_mut().unwrap().read_exact(&mut b).unwrap();
        starts.push(t.elapsed());
        rss.push(rss_kib(c.id()).unwrap_or(0));
        c.kill().unwrap();
        c.wait().unwrap();
    }
    rss.sort();
    println!(
        "built-in VMM: process start -> first guest instruction: median {:.2} ms (n={runs}, min {:.2}, max {:.2})",
        median(starts.clone()).as_secs_f64() * 1e3,
        starts.iter().min().unwrap().as_secs_f64() * 1e3,
        starts.iter().max().unwrap().as_secs_f64() * 1e3,
    );
    println!(
        "built-in VMM: RSS with a 1-vCPU 128 MiB tiny guest: median {} KiB (n={runs}, min {}, max {})",
        rss[rss.len() / 2],
        rss[0],
        rss[rss.len() - 1]
    );
}

const SNAP: &[u8] = include_bytes!("../tests/payloads/snap.bin");
/// The byte the `snap` payload spins on.
const GO: u64 = 0x30_0000;

/// Runs `vm` on a thread; returns once its COM1 output (to a pipe) has
/// given `until`, the time that took from `t`, and the VM's thread.
fn first_output(build: impl FnOnce(std::fs::File) -> Vm, until: &[u8]) -> (Duration, Running) {
    let (mut rd, wr) = std::io::pipe().unwrap();
    let t = Instant::now();
    let vm = build(std::fs::File::from(std::os::fd::OwnedFd::from(wr)));
    let (snapshot, memory) = (vm.snapshot_handle(), vm.memory().clone());
    let thread = std::thread::spawn(move || vm.run());
    read_until(&mut rd, until);
    let running = Running {
        snapshot,
        memory,
        thread,
        rd,
    };
    (t.elapsed(), running)
}

/// Reads COM1 until it has given `end`.
fn read_until(rd: &mut std::io::PipeReader, end: &[u8]) {
    let mut seen = Vec::new();
    let mut b = [0u8; 1];
    while !seen.ends_with(end) {
        assert_eq!(rd.read(&mut b).unwrap(), 1, "COM1 closed: {seen:?}");
        seen.push(b[0]);
    }
}

/// A running VM of [`first_output`]'s.
struct Running {
    snapshot: moat_vmm::SnapshotHandle,
    memory: moat_vmm::memory::GuestMem,
    thread: std::thread::JoinHandle<Result<moat_vmm::ExitReason, moat_vmm::VmmError>>,
    rd: std::io::PipeReader,
}

impl Running {
    /// Lets the payload leave its loop, and waits for the VM's end.
    fn finish(mut self) {
        use vm_memory::Bytes;
        self.memory
            .write_obj(1u8, vm_memory::GuestAddress(GO))
            .unwrap();
        let _ = self.rd.read_to_end(&mut Vec::new());
        self.thread.join().unwrap().unwrap();
    }
}

fn snapshots(runs: usize) {
    let config = |out| {
        let mut c = VmConfig::new(Kernel::Payload(SNAP.to_vec()), 1, 128);
        c.serial_out = Some(out);
        c
    };
    let file = tempfile::tempfile().unwrap();
    let (mut cold, mut saves, mut restored) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let (t, vm) = first_output(|out| Vm::new(config(out)).unwrap(), b"r");
        cold.push(t);
        // Saved where it spins (after "ready").
        let mut vm = vm;
        read_until(&mut vm.rd, b"eady\n");
        let t = Instant::now();
        vm.snapshot.save(&file).unwrap();
        saves.push(t.elapsed());
        vm.finish();
    }
    for _ in 0..runs {
        let (t, vm) = first_output(
            |out| {
                let vm = Vm::restore(config(out), &file).unwrap();
                use vm_memory::Bytes;
                vm.memory()
                    .write_obj(1u8, vm_memory::GuestAddress(GO))
                    .unwrap();
                vm
            },
            b"d",
        );
        restored.push(t);
        vm.finish();
    }
    use std::os::unix::fs::MetadataExt;
    let meta = file.metadata().unwrap();
    let ms = |v: &[Duration]| median(v.to_vec()).as_secs_f64() * 1e3;
    println!(
        "built-in VMM: snapshot of a 1-vCPU 128 MiB payload guest: save median {:.2} ms; \
         Vm::restore -> first output median {:.2} ms against Vm::new -> first output {:.2} ms \
         (n={runs}); file {} MiB, {} KiB on disk",
        ms(&saves),
        ms(&restored),
        ms(&cold),
        meta.len() >> 20,
        meta.blocks() / 2
    );
}

fn cloud_kernel() -> Option<PathBuf> {
    let mut k: Vec<PathBuf> = std::fs::read_dir("/boot")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-") && n.ends_with("-cloud-amd64"))
        })
        .collect();
    k.sort();
    k.pop()
}

fn tiny_initramfs(path: &Path) {
    let mut w = CpioWriter::new(std::fs::File::create(path).unwrap());
    w.dir("bin", 0o755).unwrap();
    w.dir("dev", 0o755).unwrap();
    w.char_device("dev/console", 0o600, 5, 1).unwrap();
    w.file(
        "bin/busybox",
        0o755,
        &std::fs::read("/bin/busybox").unwrap(),
    )
    .unwrap();
    w.file(
        "init",
        0o755,
        b"#!/bin/busybox sh\necho moat-init: up\n/bin/busybox reboot -f\n",
    )
    .unwrap();
    w.finish().unwrap();
}

fn qemu(runs: usize) {
    let Some(kernel) = cloud_kernel() else {
        println!("QEMU backend: skipped (no /boot/vmlinuz-*-cloud-amd64)");
        return;
    };
    let accel = detect_accel();
    let dir = tempfile::tempdir().unwrap();
    let initrd = dir.path().join("initrd");
    tiny_initramfs(&initrd);
    let mut times = Vec::new();
    for _ in 0..runs {
        let (mut rd, wr) = std::io::pipe().unwrap();
        let mut config = VmConfig::new(Kernel::Linux(kernel.clone()), 1, 256);
        config.initrd = Some(initrd.clone());
        config.cmdline = "console=ttyS0 panic=-1 quiet".into();
        config.serial_out = Some(std::fs::File::from(std::os::fd::OwnedFd::from(wr)));
        let t = Instant::now();
        let vm = QemuVm::spawn(config, accel.accel, Path::new(QEMU_BINARY)).unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = rd.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if seen.windows(13).any(|w| w == b"moat-init: up") {
                times.push(t.elapsed());
                break;
            }
        }
        vm.wait().unwrap();
    }
    println!(
        "QEMU backend ({}): spawn -> /init output: median {:.0} ms (n={}, min {:.0}, max {:.0})",
        accel.reason,
        median(times.clone()).as_secs_f64() * 1e3,
        times.len(),
        times.iter().min().unwrap().as_secs_f64() * 1e3,
        times.iter().max().unwrap().as_secs_f64() * 1e3,
    );
}

fn main() {
    let arg = std::env::args().nth(1);
    if arg.as_deref() == Some("child") {
        return child();
    }
    let runs = arg.and_then(|a| a.parse().ok()).unwrap_or(20);
    builtin(runs);
    snapshots(runs);
    qemu(5);
    shared_restore(runs);
}

fn shared_restore(runs: usize) {
    use std::os::unix::fs::FileExt;
    const MIB: u64 = 1257;
    let file = tempfile::tempfile().unwrap();
    file.set_len(MIB << 20).unwrap();
    let run = vec![0x5au8; 4 << 20];
    let mut data = 0u64;
    let mut at = 0u64;
    while data < 160 << 20 {
        file.write_all_at(&run, at).unwrap();
        data += run.len() as u64;
        at += 8 << 20;
    }
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let (mut private, mut shared) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let vm = kvm.create_vm().unwrap();
        let t = Instant::now();
        let mem = moat_vmm::memory::restore(&vm, MIB, &file).unwrap();
        private.push(t.elapsed());
        drop(mem);
        let vm = kvm.create_vm().unwrap();
        let t = Instant::now();
        let mem = moat_vmm::memory::restore_shared(&vm, MIB, &file).unwrap();
        shared.push(t.elapsed());
        drop(mem);
    }
    let ms = |v: &[Duration]| median(v.to_vec()).as_secs_f64() * 1e3;
    println!(
        "built-in VMM: a restored {MIB} MiB guest's memory with {} MiB of data: copied into a memfd \
         (read-write volumes) median {:.2} ms, mapped copy-on-write {:.3} ms (n={runs})",
        data >> 20,
        ms(&shared),
        ms(&private)
    );
}
