//! Full Linux boots on the built-in VMM: Debian's cloud kernel (bzImage)
//! with two vCPUs, a virtio disk and virtio-rng, to a busybox /init that
//! loads the virtio modules, reads the disk and the rng, and reboots
//! (i8042 reset). Where the CPU shows vmx or svm it runs on the host's KVM;
//! elsewhere (this project's machines, whose KVM is the software-assisted
//! PVM that boots a stock kernel only by slow emulation and dies partway)
//! the same test runs inside a QEMU/TCG guest whose emulated CPU has SVM,
//! on that guest's KVM (`common/nested.rs`).
//!
//! The cloud kernel is built without CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES and
//! without CONFIG_X86_MPPARSE: it learns its vCPUs and virtio-mmio devices
//! from the VMM's ACPI tables only, so the boot checks both (two CPUs, the
//! devices as ACPI `LNRO0005` nodes, then bound and working).
//! `the_cloud_kernel_reads_the_acpi_tables` runs the same kernel on this
//! machine's own KVM as far as its early set-up, where it parses the tables.

mod common;

use std::io::{Read, Seek};
use std::sync::mpsc;
use std::time::Duration;

use common::{cloud_kernel, initramfs, nested, which};
use moat_vmm::{BlockConfig, ExitReason, Kernel, Vm, VmConfig};

const INIT: &str = r#"#!/bin/busybox sh
B=/bin/busybox
$B mount -t devtmpfs dev /dev
$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
echo "moat-init: up on $($B nproc) cpus"
echo "moat-init: $($B ls /sys/bus/acpi/devices | $B grep -c LNRO0005) virtio-mmio in ACPI"
for m in virtio_ring virtio virtio_mmio virtio_blk virtio-rng; do
    $B insmod /lib/modules/$m.ko || echo "moat-init: insmod $m failed"
done
echo "moat-init: virtio devices: $($B ls /sys/bus/virtio/devices | $B tr '
' ' ')"
echo "moat-init: vda=$($B head -c 16 /dev/vda)"
echo "moat-init: rng=$($B cat /sys/class/misc/hw_random/rng_current)"
echo "moat-init: rng bytes=$($B head -c 64 /dev/hwrng | $B od -An -v -tx1 | $B tr -d ' 
' | $B wc -c)"
$B reboot -f
"#;

#[test]
fn cloud_kernel_boots_on_the_builtin_vmm() {
    if nested::delegate("cloud_kernel_boots_on_the_builtin_vmm", &[]) {
        return;
    }
    let (Some(busybox), Some((kernel, release))) = (which("busybox"), cloud_kernel()) else {
        moat_core::testing::skip(
            "cloud_kernel_boots_on_the_builtin_vmm",
            "needs busybox and /boot/vmlinuz-*-cloud-amd64",
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let initrd = dir.path().join("initrd");
    initramfs(&initrd, INIT, Some(&release), &busybox);
    let disk = dir.path().join("disk.img");
    let mut image = vec![0u8; 1 << 20];
    image[..16].copy_from_slice(b"MOAT-ROOT-MARKER");
    std::fs::write(&disk, image).unwrap();
    let serial = tempfile::tempfile().unwrap();
    let mut reader = serial.try_clone().unwrap();
    let mut config = VmConfig::new(Kernel::Linux(kernel), 2, 256);
    config.initrd = Some(initrd);
    config.cmdline = "console=ttyS0 panic=-1 quiet".into();
    config.serial_out = Some(serial);
    config.rng = true;
    config.block = vec![BlockConfig {
        path: disk,
        read_only: true,
        file: None,
    }];
    let vm = Vm::new(config).unwrap();
    let stop = vm.stop_handle();
    let (done, wait) = mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if wait.recv_timeout(Duration::from_secs(240)) == Err(mpsc::RecvTimeoutError::Timeout) {
            stop.stop();
        }
    });
    let reason = vm.run().unwrap();
    drop(done);
    watchdog.join().unwrap();
    let mut out = String::new();
    reader.rewind().unwrap();
    reader.read_to_string(&mut out).unwrap();
    print!("{out}");
    assert_eq!(reason, ExitReason::Reset, "serial:\n{out}");
    for want in [
        "moat-init: up on 2 cpus",
        "moat-init: 2 virtio-mmio in ACPI",
        "moat-init: virtio devices: virtio0 virtio1 ",
        "moat-init: vda=MOAT-ROOT-MARKER",
        "moat-init: rng=virtio_rng.0",
        "moat-init: rng bytes=128",
    ] {
        assert!(out.contains(want), "{want:?} missing; serial:\n{out}");
    }
    assert!(!out.contains("failed"), "serial:\n{out}");
    // No i8042 declared, so no driver waiting on one that answers only its
    // reset command (half a second of the boot).
    assert!(!out.contains("i8042"), "serial:\n{out}");
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
