//! Running a test where KVM can boot a stock Linux kernel, on a machine
//! whose own KVM cannot (this project's: PVM, no vmx or svm).
//!
//! QEMU's TCG emulates AMD's SVM (its `max` CPU has it), and Debian's cloud
//! kernel carries `kvm_amd`: inside a TCG guest, /dev/kvm then runs guests
//! with nested paging done by QEMU, and stock kernels boot on it. So the
//! test's own binary (stripped) is put in a TCG guest's initramfs with
//! busybox, KVM's modules, the cloud kernel and its virtio modules, and run
//! again there for that one test with [`CHILD_ENV`] set; the guest's
//! console comes back, with the child's exit status. Where the host has
//! vmx or svm itself, tests run on its KVM directly instead.
use std::io::{Read, Seek};
use std::path::Path;
use std::time::Duration;

use moat_vmm::cpio::CpioWriter;
use moat_vmm::qemu::{Accel, QemuVm, QEMU_BINARY};
use moat_vmm::{Kernel, VmConfig};

use super::{cloud_kernel, which, MODULES};

/// Set in the nested guest: the test runs its body there.
pub const CHILD_ENV: &str = "MOAT_NESTED_CHILD";

/// KVM's modules, in load order (under /lib/modules/<release>/kernel).
pub const KVM_MODULES: [&str; 3] = [
    "virt/lib/irqbypass.ko",
    "arch/x86/kvm/kvm.ko",
    "arch/x86/kvm/kvm-amd.ko",
];

/// Whether this process is the copy running in the nested guest.
pub fn is_child() -> bool {
    std::env::var_os(CHILD_ENV).is_some()
}

/// Whether the host's CPU shows vmx or svm (KVM boots stock kernels here).
pub fn hardware_virt() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// What the nested guest printed, and the child's exit status.
pub struct Outcome {
    pub console: String,
    pub status: Option<i32>,
}

/// The test binary without its debug information (a tenth of its size),
/// or as it is where binutils' strip is missing.
fn stripped_self(dir: &Path) -> Vec<u8> {
    let exe = std::env::current_exe().unwrap();
    let out = dir.join("test-binary");
    let ok = std::process::Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&out)
        .arg(&exe)
        .status()
        .is_ok_and(|s| s.success());
    std::fs::read(if ok { &out } else { &exe }).unwrap()
}

/// Writes `path`'s parent directories (once each) and then the file.
fn file_at(
    w: &mut CpioWriter<std::fs::File>,
    made: &mut Vec<String>,
    path: &str,
    perm: u32,
    data: &[u8],
) {
    let mut parent = String::new();
    for part in Path::new(path).parent().unwrap().components() {
        if !parent.is_empty() {
            parent.push('/');
        }
        parent.push_str(part.as_os_str().to_str().unwrap());
        if !made.contains(&parent) {
            w.dir(&parent, 0o755).unwrap();
            made.push(parent.clone());
        }
    }
    w.file(path, perm, data).unwrap();
}

/// Runs test `name` of this binary again inside a TCG guest with an
/// emulated SVM, with `extra` host files at the given paths of the guest
/// (relative to its root). `None` (after saying why) where QEMU, busybox
/// or the cloud kernel is missing.
pub fn run_self(name: &str, timeout: Duration, extra: &[(&Path, &str)]) -> Option<Outcome> {
    let (Some(qemu), Some(busybox), Some((kernel, release))) =
        (which(QEMU_BINARY), which("busybox"), cloud_kernel())
    else {
        moat_core::testing::skip(
            name,
            &format!("needs {QEMU_BINARY}, busybox and /boot/vmlinuz-*-cloud-amd64"),
        );
        return None;
    };
    let dir = tempfile::tempdir().unwrap();
    let initrd = dir.path().join("nested.cpio");
    let mut w = CpioWriter::new(std::fs::File::create(&initrd).unwrap());
    let mut made = Vec::new();
    for d in ["dev", "proc", "sys", "tmp"] {
        w.dir(d, 0o755).unwrap();
        made.push(d.to_string());
    }
    w.char_device("dev/console", 0o600, 5, 1).unwrap();
    file_at(
        &mut w,
        &mut made,
        "bin/busybox",
        0o755,
        &std::fs::read(&busybox).unwrap(),
    );
    file_at(
        &mut w,
        &mut made,
        "bin/test",
        0o755,
        &stripped_self(dir.path()),
    );
    let kernel_name = kernel.file_name().unwrap().to_str().unwrap().to_string();
    file_at(
        &mut w,
        &mut made,
        &format!("boot/{kernel_name}"),
        0o644,
        &std::fs::read(&kernel).unwrap(),
    );
    let modules = Path::new("/lib/modules").join(&release).join("kernel");
    for m in KVM_MODULES.iter().chain(MODULES.iter()) {
        file_at(
            &mut w,
            &mut made,
            &format!("lib/modules/{release}/kernel/{m}"),
            0o644,
            &std::fs::read(modules.join(m)).unwrap(),
        );
    }
    for (host, guest) in extra {
        file_at(
            &mut w,
            &mut made,
            guest,
            0o644,
            &std::fs::read(host).unwrap(),
        );
    }
    let insmods: Vec<String> = KVM_MODULES
        .iter()
        .map(|m| format!("$B insmod /lib/modules/{release}/kernel/{m} || echo 'moat-nested: insmod {m} failed'"))
        .collect();
    let init = format!(
        "#!/bin/busybox sh\n\
         B=/bin/busybox\n\
         $B mount -t devtmpfs dev /dev\n\
         $B mount -t proc proc /proc\n\
         $B mount -t sysfs sys /sys\n\
         $B mount -t tmpfs tmp /tmp\n\
         {}\n\
         export PATH=/bin TMPDIR=/tmp {CHILD_ENV}=1\n\
         /bin/test --exact {name} --nocapture --test-threads=1\n\
         echo \"moat-nested: exit $?\"\n\
         $B reboot -f\n",
        insmods.join("\n")
    );
    w.file("init", 0o755, init.as_bytes()).unwrap();
    w.finish().unwrap();

    let serial = tempfile::tempfile().unwrap();
    let mut reader = serial.try_clone().unwrap();
    // Two vCPUs: the guests under test get two; 2 GiB: the initramfs
    // (the test binary among it) unpacked, and their memory.
    let mut config = VmConfig::new(Kernel::Linux(kernel), 2, 2048);
    config.initrd = Some(initrd);
    config.cmdline = "console=ttyS0 panic=-1 quiet rdinit=/init".into();
    config.serial_out = Some(serial);
    let vm = QemuVm::spawn(config, Accel::Tcg, &qemu).unwrap();
    // A bound against a hung guest, not a timing assertion (SIGKILL:
    // QEMU exits 0 on SIGTERM, which would pass for a clean end).
    let pid = vm.pid().unwrap();
    let (done, wait) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if wait.recv_timeout(timeout) == Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    });
    let ended = vm.wait();
    drop(done);
    watchdog.join().unwrap();
    let mut console = String::new();
    reader.rewind().unwrap();
    reader.read_to_string(&mut console).unwrap();
    if let Err(e) = ended {
        console.push_str(&format!("\n(QEMU: {e})"));
    }
    let status = console
        .lines()
        .find_map(|l| l.trim().strip_prefix("moat-nested: exit "))
        .and_then(|s| s.trim().parse().ok());
    Some(Outcome { console, status })
}

/// How long one nested session may take: a nested boot and its test take
/// ~10–20 s here; the tests' own bounds on their inner guests are 100 s,
/// so that a test whose guest hangs still reports (and fails) in time.
pub const SESSION_LIMIT: Duration = Duration::from_secs(150);

/// Sessions tried before a test fails because the nested virtualisation
/// under it did.
pub const SESSIONS: u32 = 3;

/// Where the host's own KVM cannot run `name`, runs it nested and asserts
/// it passed there; returns whether it did so (the caller returns then).
///
/// The outer guest (the cloud kernel with kvm_amd on QEMU's emulated SVM:
/// the test's scaffolding, not what it tests) sometimes stops: its boot
/// hangs before the test starts, or the vCPU threads of the VM under test
/// lock up inside KVM_RUN ("soft lockup" on its console), where no stop
/// reaches them (2 of 15 runs of the network test here on 2026-12-06, one
/// of each; moat's `e2e_microvm_builtin_tier.rs` met the same). A session
/// that ends with no exit status from the test (killed at
/// [`SESSION_LIMIT`], or its kernel panicked) is run again, its console
/// printed, up to [`SESSIONS`] in all; a test that ran and failed fails at
/// once. The tests bound their own guests well under the limit, so a
/// guest of theirs that hangs is a failure of theirs, not a retry.
pub fn delegate(name: &str, extra: &[(&Path, &str)]) -> bool {
    if is_child() || hardware_virt() {
        return false;
    }
    eprintln!("{name}: no vmx or svm here: running it in a QEMU/TCG guest with an emulated SVM");
    for session in 1..=SESSIONS {
        let Some(out) = run_self(name, SESSION_LIMIT, extra) else {
            return true;
        };
        match out.status {
            Some(0) => return true,
            Some(code) => panic!("nested run of {name} exited {code}:\n{}", out.console),
            None if session < SESSIONS => eprintln!(
                "{name}: nested session {session} of {SESSIONS} ended without the test's exit \
                 status (the nested virtualisation stopped); running it again. Its console:\n{}",
                out.console
            ),
            None => panic!(
                "nested run of {name}: {SESSIONS} sessions ended without the test's exit \
                 status; the last console:\n{}",
                out.console
            ),
        }
    }
    true
}
