//! A full Linux boot on the built-in VMM: Debian's cloud kernel (bzImage) to
//! a busybox /init that prints on COM1 and reboots (i8042 reset). Runs only
//! where the CPU shows vmx or svm; elsewhere (this project's development
//! machines, whose KVM is the software-assisted PVM that boots a stock kernel
//! only by slow emulation and dies partway) it skips and says so.
//!
//! The cloud kernel finds no virtio-mmio devices on the built-in VMM: it is
//! built without CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES and the VMM has no ACPI
//! tables, so this boot checks the boot path, serial and reset only. One
//! vCPU: the kernel is also built without CONFIG_X86_MPPARSE, so it ignores
//! the MP table and would need ACPI's MADT to see a second one.

mod common;

use std::io::{Read, Seek};
use std::sync::mpsc;
use std::time::Duration;

use common::{cloud_kernel, initramfs, which};
use moat_vmm::{ExitReason, Kernel, Vm, VmConfig};

const INIT: &str =
    "#!/bin/busybox sh\necho moat-init: up on $(/bin/busybox nproc) cpus\n/bin/busybox reboot -f\n";

fn hardware_virt() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

#[test]
fn cloud_kernel_boots_on_the_builtin_vmm() {
    if !hardware_virt() {
        moat_core::testing::skip_hardware(
            "cloud_kernel_boots_on_the_builtin_vmm",
            "no vmx or svm in /proc/cpuinfo; this KVM cannot boot a stock Linux kernel",
        );
        return;
    }
    let (Some(busybox), Some((kernel, _))) = (which("busybox"), cloud_kernel()) else {
        moat_core::testing::skip(
            "cloud_kernel_boots_on_the_builtin_vmm",
            "needs busybox and /boot/vmlinuz-*-cloud-amd64",
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let initrd = dir.path().join("initrd");
    initramfs(&initrd, INIT, None, &busybox);
    let serial = tempfile::tempfile().unwrap();
    let mut reader = serial.try_clone().unwrap();
    let mut config = VmConfig::new(Kernel::Linux(kernel), 1, 256);
    config.initrd = Some(initrd);
    config.cmdline = "console=ttyS0 panic=-1 quiet".into();
    config.serial_out = Some(serial);
    let vm = Vm::new(config).unwrap();
    let stop = vm.stop_handle();
    let (done, wait) = mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if wait.recv_timeout(Duration::from_secs(120)) == Err(mpsc::RecvTimeoutError::Timeout) {
            stop.stop();
        }
    });
    let reason = vm.run().unwrap();
    drop(done);
    watchdog.join().unwrap();
    let mut out = String::new();
    reader.rewind().unwrap();
    reader.read_to_string(&mut out).unwrap();
    assert!(out.contains("moat-init: up on 1 cpus"), "serial:\n{out}");
    assert_eq!(reason, ExitReason::Reset, "serial:\n{out}");
}
