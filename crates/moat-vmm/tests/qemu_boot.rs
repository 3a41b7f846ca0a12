//! Full Linux boots through the QEMU backend: Debian's cloud kernel under
//! TCG (or KVM where QEMU can use it) with an initramfs written by moat's
//! cpio writer, busybox as /init. Skips, saying why, where QEMU, the kernel
//! or busybox is missing (scripts/deps installs them).
//!
//! The modules the initramfs loads are the ones a moat guest needs from the
//! cloud kernel (which builds all of virtio as modules), in dependency order:
//! virtio_ring, virtio, virtio_mmio (the transport), virtio_blk (root
//! filesystem), virtio_console (agent channel, /dev/hvc0), virtio-rng.

mod common;

use std::io::{Read, Seek};

use common::{cloud_kernel, initramfs, which};
use moat_vmm::qemu::{detect_accel, QemuVm, QEMU_BINARY};
use moat_vmm::{BlockConfig, ExitReason, Kernel, VmConfig};

const INIT: &str = r#"#!/bin/busybox sh
B=/bin/busybox
$B mount -t devtmpfs dev /dev
$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
echo "moat-init: up"
for m in virtio_ring virtio virtio_mmio virtio_blk virtio_console virtio-rng; do
    $B insmod /lib/modules/$m.ko || echo "moat-init: insmod $m failed"
done
i=0
while [ ! -e /dev/vda ] || [ ! -e /dev/hvc0 ]; do
    i=$((i + 1))
    [ $i -gt 100 ] && break
    $B sleep 0.1
done
echo "moat-init: vda=$($B head -c 16 /dev/vda)"
echo "moat-init: rng=$($B cat /sys/class/misc/hw_random/rng_current)"
# hvc0 is a tty that resets its modes on last close: keep it open, raw, or
# "\n" goes out as "\r\n" (the agent must do the same).
exec 3<>/dev/hvc0
$B stty raw -echo <&3
echo "agent says hi" >&3
exec 3>&-
echo "moat-init: done"
$B reboot -f
"#;

#[test]
fn cloud_kernel_boots_to_init_with_virtio_devices() {
    let (Some(qemu), Some(busybox), Some((kernel, release))) =
        (which(QEMU_BINARY), which("busybox"), cloud_kernel())
    else {
        moat_core::testing::skip(
            "cloud_kernel_boots_to_init_with_virtio_devices",
            &format!("needs {QEMU_BINARY}, busybox and /boot/vmlinuz-*-cloud-amd64"),
        );
        return;
    };
    let accel = detect_accel();
    eprintln!("QEMU backend: {}", accel.reason);
    let dir = tempfile::tempdir().unwrap();
    let initrd = dir.path().join("initrd.cpio");
    initramfs(&initrd, INIT, Some(&release), &busybox);
    let disk = dir.path().join("disk.img");
    let mut image = vec![0u8; 1 << 20];
    image[..16].copy_from_slice(b"MOAT-ROOT-MARKER");
    std::fs::write(&disk, image).unwrap();

    let serial = tempfile::tempfile().unwrap();
    let mut serial_reader = serial.try_clone().unwrap();
    let (mut host, guest_side) = std::os::unix::net::UnixStream::pair().unwrap();
    let mut config = VmConfig::new(Kernel::Linux(kernel), 1, 256);
    config.initrd = Some(initrd);
    config.cmdline = "console=ttyS0 panic=-1 quiet".into();
    config.serial_out = Some(serial);
    config.block.push(BlockConfig {
        path: disk,
        read_only: true,
        file: None,
    });
    config.rng = true;
    config.agent = Some(guest_side);

    let vm = QemuVm::spawn(config, accel.accel, &qemu).unwrap();
    // A guard against a hung guest, not a timing assertion: QemuVm kills
    // QEMU when dropped, and a QEMU killed by a signal fails `wait`.
    let pid = vm.pid().unwrap();
    let (done, wait) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        let waited = wait.recv_timeout(std::time::Duration::from_secs(120));
        if waited == Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
            // SIGKILL: QEMU exits 0 on SIGTERM, which would pass for a clean end.
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    });
    let mut agent = String::new();
    let reader = std::thread::spawn(move || {
        let _ = host.read_to_string(&mut agent);
        agent
    });
    let reason = vm.wait();
    drop(done);
    watchdog.join().unwrap();
    let agent = reader.join().unwrap();
    let mut out = String::new();
    serial_reader.rewind().unwrap();
    serial_reader.read_to_string(&mut out).unwrap();
    match reason {
        Ok(r) => assert_eq!(r, ExitReason::Reset, "serial:\n{out}"),
        Err(e) => panic!("{e}; serial:\n{out}"),
    }
    assert!(out.contains("moat-init: up"), "serial:\n{out}");
    assert!(!out.contains("failed"), "serial:\n{out}");
    assert!(
        out.contains("moat-init: vda=MOAT-ROOT-MARKER"),
        "serial:\n{out}"
    );
    assert!(out.contains("moat-init: rng=virtio_rng"), "serial:\n{out}");
    assert!(out.contains("moat-init: done"), "serial:\n{out}");
    assert_eq!(agent, "agent says hi\n");
}
