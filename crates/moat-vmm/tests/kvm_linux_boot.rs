//! A full Linux boot on the built-in VMM: Debian's cloud kernel (bzImage) to
//! a busybox /init that prints on COM1 and reboots (i8042 reset). Runs only
//! where the CPU shows vmx or svm; elsewhere (this project's development
//! machines, whose KVM is the software-assisted PVM that boots a stock kernel
//! only by slow emulation and dies partway) it skips and says so.
//!
//! The cloud kernel is built without CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES and
//! without CONFIG_X86_MPPARSE: it learns its vCPUs and virtio-mmio devices
//! from the VMM's ACPI tables only. The full boot checks both (two vCPUs,
//! and the devices as ACPI `LNRO0005` nodes). Where the full boot cannot
//! run, `the_cloud_kernel_reads_the_acpi_tables` still runs the same kernel
//! on this KVM as far as its early set-up, where it parses the tables.

mod common;

use std::io::{Read, Seek};
use std::sync::mpsc;
use std::time::Duration;

use common::{cloud_kernel, initramfs, which};
use moat_vmm::{BlockConfig, ExitReason, Kernel, Vm, VmConfig};

const INIT: &str = "#!/bin/busybox sh\n\
    /bin/busybox mount -t sysfs sysfs /sys\n\
    echo moat-init: up on $(/bin/busybox nproc) cpus\n\
    echo moat-init: $(/bin/busybox ls /sys/bus/acpi/devices | /bin/busybox grep -c LNRO0005) virtio-mmio in ACPI\n\
    /bin/busybox reboot -f\n";

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
    let mut config = VmConfig::new(Kernel::Linux(kernel), 2, 256);
    config.initrd = Some(initrd);
    config.cmdline = "console=ttyS0 panic=-1 quiet".into();
    config.serial_out = Some(serial);
    config.rng = true;
    config.block = vec![BlockConfig {
        path: "/dev/null".into(),
        read_only: true,
        file: None,
    }];
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
    assert!(out.contains("moat-init: up on 2 cpus"), "serial:\n{out}");
    assert!(
        out.contains("moat-init: 2 virtio-mmio in ACPI"),
        "serial:\n{out}"
    );
    assert_eq!(reason, ExitReason::Reset, "serial:\n{out}");
}

/// The early boot of the same kernel, which this machine's KVM runs (it
/// dies later, in the memory set-up): the kernel finds the RSDP, reads
/// every table, takes both vCPUs and the I/O APIC from the MADT, and its
/// command line carries no `virtio_mmio.device=` (the devices are in the
/// DSDT, which `acpi_tables.rs` checks with ACPICA).
#[test]
fn the_cloud_kernel_reads_the_acpi_tables() {
    if std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        moat_core::testing::skip_hardware("the_cloud_kernel_reads_the_acpi_tables", "no /dev/kvm");
        return;
    }
    let Some((kernel, _)) = cloud_kernel() else {
        moat_core::testing::skip(
            "the_cloud_kernel_reads_the_acpi_tables",
            "needs /boot/vmlinuz-*-cloud-amd64",
        );
        return;
    };
    // The vmlinux inside the bzImage: this KVM runs the bzImage's
    // decompressor only by slow emulation (~50 s here).
    let dir = tempfile::tempdir().unwrap();
    let vmlinux = dir.path().join("vmlinux");
    let elf = moat_vmm::kernel_image::decompress(
        moat_vmm::kernel_image::payload(&std::fs::read(&kernel).unwrap()).unwrap(),
    )
    .unwrap();
    std::fs::write(&vmlinux, elf).unwrap();
    let (rx, tx) = rustix::pipe::pipe().unwrap();
    let mut config = VmConfig::new(Kernel::Linux(vmlinux), 2, 128);
    config.cmdline = "console=ttyS0 earlyprintk=serial,ttyS0 ignore_loglevel panic=-1".into();
    config.serial_out = Some(std::fs::File::from(tx));
    config.rng = true;
    config.block = vec![BlockConfig {
        path: "/dev/null".into(),
        read_only: true,
        file: None,
    }];
    let vm = Vm::new(config).unwrap();
    assert!(!vm.cmdline().contains("virtio_mmio"), "{}", vm.cmdline());
    let stop = vm.stop_handle();
    let wanted = [
        "ACPI: RSDP 0x00000000000E0000",
        "ACPI: XSDT 0x",
        "ACPI: FACP 0x",
        "ACPI: DSDT 0x",
        "ACPI: APIC 0x",
        "ACPI: Using ACPI (MADT) for SMP configuration information",
        "IOAPIC[0]: apic_id 2, version 17, address 0xfec00000, GSI 0-23",
        "smpboot: Allowing 2 CPUs, 0 hotplug CPUs",
    ];
    // Reads the console to its end (the VM's end), stopping the VM once
    // every line is there; returns what it read.
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut f = std::fs::File::from(rx);
        let mut buf = [0u8; 4096];
        let mut stopped = false;
        while let Ok(n @ 1..) = f.read(&mut buf) {
            out.extend_from_slice(&buf[..n]);
            if !stopped
                && wanted
                    .iter()
                    .all(|w| String::from_utf8_lossy(&out).contains(w))
            {
                stop.stop();
                stopped = true;
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    });
    // A bound against a kernel that hangs without printing; not a timing
    // assertion (the lines come after ~2 s of guest time, ~5 s here).
    let stop = vm.stop_handle();
    let (done, wait) = mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if wait.recv_timeout(Duration::from_secs(300)) == Err(mpsc::RecvTimeoutError::Timeout) {
            stop.stop();
        }
    });
    // The VM ends by the stop (or by the kernel dying later on this KVM);
    // either way what matters is what it printed before.
    let _ = vm.run();
    drop(done);
    watchdog.join().unwrap();
    let out = reader.join().unwrap();
    for w in wanted {
        assert!(out.contains(w), "{w:?} missing from the console:\n{out}");
    }
    assert!(!out.contains("ACPI BIOS Error"), "console:\n{out}");
    assert!(!out.contains("not listed by BIOS"), "console:\n{out}");
}
