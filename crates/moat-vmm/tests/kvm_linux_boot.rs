//! Full Linux boots on the built-in VMM: Debian's cloud kernel (bzImage)
//! with two vCPUs, eleven virtio disks, virtio-rng (on interrupt line 16),
//! the balloon and two empty virtio-fs slots, to a busybox /init that loads
//! the virtio modules, reads the first and last disks and the rng, sees
//! the balloon's driver take free page reporting, fills 96 MiB of tmpfs
//! and removes it (the VMM's resident memory falls back: the balloon),
//! and reboots
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
#[path = "common/tap.rs"]
mod tap;

use std::io::{Read, Seek, Write};
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
for m in virtio_ring virtio virtio_mmio virtio_blk virtio-rng virtio_balloon; do
    $B insmod /lib/modules/$m.ko || echo "moat-init: insmod $m failed"
done
echo "moat-init: virtio devices: $($B ls /sys/bus/virtio/devices | $B tr '
' ' ')"
for d in /sys/bus/virtio/devices/*; do
    if [ "$($B cat $d/device)" = 0x0005 ]; then
        echo "moat-init: balloon driver=$($B basename $($B readlink $d/driver)) reporting=$($B cut -c6 $d/features)"
    fi
done
$B mkdir /t && $B mount -t tmpfs t /t
$B dd if=/dev/zero of=/t/fill bs=1M count=96 2>/dev/null
echo "moat-init: filled"
$B rm /t/fill
$B sleep 5
echo "moat-init: settled"
$B sleep 1
echo "moat-init: vda=$($B head -c 16 /dev/vda)"
echo "moat-init: vdk=$($B head -c 16 /dev/vdk)"
echo "moat-init: rng=$($B cat /sys/class/misc/hw_random/rng_current)"
echo "moat-init: rng bytes=$($B head -c 64 /dev/hwrng | $B od -An -v -tx1 | $B tr -d ' 
' | $B wc -c)"
$B reboot -f
"#;

/// This process's resident memory in KiB (the VM's RAM is its mapping).
fn resident_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4
}

/// Runs `vm` to its end as [`run_bounded`] does, reading this process's
/// resident memory every 20 ms meanwhile; returns also the most it read
/// and what it read once `marker` was on the console (the VM still
/// running: its RAM is unmapped when it ends).
fn run_sampled(
    vm: Vm,
    serial: std::fs::File,
    marker: &'static str,
) -> (ExitReason, String, u64, Option<u64>) {
    use std::os::unix::fs::FileExt;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = done.clone();
    let console = serial.try_clone().unwrap();
    let sampler = std::thread::spawn(move || {
        let (mut most, mut at_marker) = (0, None);
        let mut buf = vec![0u8; 1 << 16];
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            let now = resident_kib();
            most = most.max(now);
            if at_marker.is_none() {
                let n = console.read_at(&mut buf, 0).unwrap_or(0);
                if String::from_utf8_lossy(&buf[..n]).contains(marker) {
                    at_marker = Some(resident_kib());
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        (most, at_marker)
    });
    let (reason, out) = run_bounded(vm, serial);
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (most, at_marker) = sampler.join().unwrap();
    (reason, out, most, at_marker)
}

/// Runs `vm` to its end (stopped after 100 s: a bound against a hung
/// guest, not a timing assertion, and under the nested harness's session
/// limit); returns why it ended and its console, read back from `serial`
/// and printed.
fn run_bounded(vm: Vm, mut serial: std::fs::File) -> (ExitReason, String) {
    let stop = vm.stop_handle();
    let (done, wait) = mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if wait.recv_timeout(Duration::from_secs(100)) == Err(mpsc::RecvTimeoutError::Timeout) {
            stop.stop();
        }
    });
    let reason = vm.run().unwrap();
    drop(done);
    watchdog.join().unwrap();
    let mut out = String::new();
    serial.rewind().unwrap();
    serial.read_to_string(&mut out).unwrap();
    print!("{out}");
    (reason, out)
}

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
    // Eleven disks, so that the entropy device after them takes line 16,
    // the I/O APIC's first pin past the 8259s' (its reads wait for its
    // interrupt); two virtio-fs slots left empty after it (placeholders,
    // device ID 0: in the ACPI tables, skipped by the driver).
    let disks: Vec<std::path::PathBuf> = (0..11)
        .map(|i| {
            let disk = dir.path().join(format!("disk{i}.img"));
            let mut image = vec![0u8; 1 << 20];
            let marker = if i == 0 {
                b"MOAT-ROOT-MARKER"
            } else {
                b"MOAT-LAST-MARKER"
            };
            image[..16].copy_from_slice(marker);
            std::fs::write(&disk, image).unwrap();
            disk
        })
        .collect();
    let serial = tempfile::tempfile().unwrap();
    let reader = serial.try_clone().unwrap();
    let mut config = VmConfig::new(Kernel::Linux(kernel), 2, 256);
    config.initrd = Some(initrd);
    config.cmdline = "console=ttyS0 panic=-1 quiet".into();
    config.serial_out = Some(serial);
    config.rng = true;
    config.balloon = true;
    config.block = disks
        .into_iter()
        .map(|path| BlockConfig {
            path,
            read_only: true,
            file: None,
        })
        .collect();
    config.fs_slots = 2;
    let vm = Vm::new(config).unwrap();
    let (reason, out, most, settled) = run_sampled(vm, reader, "moat-init: settled");
    assert_eq!(reason, ExitReason::Reset, "serial:\n{out}");
    // The 96 MiB the guest filled and freed went back to the host: its
    // kernel reported the free blocks two seconds after the removal,
    // while it slept five (without the balloon, every page it touched
    // stays this process's until the VM ends).
    let settled = settled.expect("the guest settled");
    assert!(
        most > settled + 64 * 1024,
        "resident at most {most} KiB, once settled {settled} KiB; serial:\n{out}"
    );
    for want in [
        "moat-init: filled",
        "moat-init: up on 2 cpus",
        "moat-init: 15 virtio-mmio in ACPI",
        "moat-init: virtio devices: virtio0 virtio1 virtio10 virtio11 virtio12 virtio2 ",
        "moat-init: vda=MOAT-ROOT-MARKER",
        "moat-init: vdk=MOAT-LAST-MARKER",
        "moat-init: rng=virtio_rng.0",
        "moat-init: rng bytes=128",
        // The driver found its queues where this device has them (the
        // reporting queue third, no statistics queue) and took reporting.
        "moat-init: balloon driver=virtio_balloon reporting=1",
    ] {
        assert!(out.contains(want), "{want:?} missing; serial:\n{out}");
    }
    // The placeholders are no devices.
    assert!(!out.contains("virtio13"), "serial:\n{out}");
    assert!(!out.contains("failed"), "serial:\n{out}");
    // No i8042 declared, so no driver waiting on one that answers only its
    // reset command (half a second of the boot).
    assert!(!out.contains("i8042"), "serial:\n{out}");
}

const NET_INIT: &str = r#"#!/bin/busybox sh
B=/bin/busybox
$B mount -t devtmpfs dev /dev
$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
for m in virtio_ring virtio virtio_mmio failover net_failover virtio_net; do
    $B insmod /lib/modules/$m.ko || echo "moat-init: insmod $m failed"
done
echo "moat-init: features=$($B cat /sys/class/net/eth0/device/features)"
S=/sys/class/net/eth0/statistics
stats() {
    echo "moat-init: $1 tx $($B cat $S/tx_bytes) $($B cat $S/tx_packets) rx $($B cat $S/rx_bytes) $($B cat $S/rx_packets)"
}
$B ip link set eth0 up
$B ip addr add 10.0.2.15/24 dev eth0
$B seq 1 300000 >/data
stats start
$B nc 10.0.2.2 5000 -e $B cat /data
echo "moat-init: sent, nc $?"
stats sent
$B nc 10.0.2.2 5001 >/received
$B seq 1 300000 | $B cmp - /received && echo "moat-init: received intact"
stats received
$B reboot -f
"#;

/// eth0's counters the guest printed at `when`: bytes and packets sent,
/// then received.
fn counters(out: &str, when: &str) -> [u64; 4] {
    let prefix = format!("moat-init: {when} tx ");
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {when} counters; serial:\n{out}"));
    let n: Vec<u64> = line
        .split_whitespace()
        .filter(|w| *w != "rx")
        .map(|w| w.parse().unwrap())
        .collect();
    n.try_into().unwrap()
}

/// The `seq 1 300000` the guest sends and expects.
fn sequence() -> Vec<u8> {
    (1..=300_000)
        .map(|n| format!("{n}\n"))
        .collect::<String>()
        .into_bytes()
}

/// Linux's virtio-net driver on the built-in VMM's card on a TAP with a
/// virtio-net header (as the microvm tier gives a guest a pod's
/// interface): the driver takes checksum offload and TSO both ways, and
/// TCP carries ~2 MB each way between the guest and the host's stack
/// whole (64 KiB segments through the card, checksums left to the host).
#[test]
fn cloud_kernel_moves_tcp_both_ways_on_a_tap_with_offloads() {
    const NAME: &str = "cloud_kernel_moves_tcp_both_ways_on_a_tap_with_offloads";
    if nested::delegate(NAME, &[]) {
        return;
    }
    let (Some(busybox), Some((kernel, release))) = (which("busybox"), cloud_kernel()) else {
        moat_core::testing::skip(NAME, "needs busybox and /boot/vmlinuz-*-cloud-amd64");
        return;
    };
    if nested::is_child() {
        // The nested guest's kernel has TUN/TAP as a module.
        let tun = format!("/lib/modules/{release}/kernel/drivers/net/tun.ko");
        let ok = std::process::Command::new("/bin/busybox")
            .args(["insmod", &tun])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "insmod {tun}");
    }
    let dir = tempfile::tempdir().unwrap();
    let initrd = dir.path().join("initrd");
    initramfs(&initrd, NET_INIT, Some(&release), &busybox);
    let (tap, _udp, ns) = tap::quiet_tap_ns(std::net::Ipv4Addr::new(10, 0, 2, 2), 1500, true);
    // The host's ends, listening in the TAP's namespace before the boot:
    // the guest's data read whole (then closed: the guest's nc ends),
    // then the same sent to the guest.
    let data = sequence();
    let (listening, ready) = mpsc::channel();
    let host = {
        let data = data.clone();
        std::thread::spawn(move || {
            rustix::thread::move_into_link_name_space(
                std::os::fd::AsFd::as_fd(&ns),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .expect("enter the TAP's namespace");
            let from_guest = std::net::TcpListener::bind("10.0.2.2:5000").unwrap();
            let to_guest = std::net::TcpListener::bind("10.0.2.2:5001").unwrap();
            listening.send(()).unwrap();
            let (mut c, _) = from_guest.accept().unwrap();
            let mut got = vec![0u8; data.len()];
            c.read_exact(&mut got).unwrap();
            drop(c);
            let (mut c, _) = to_guest.accept().unwrap();
            c.write_all(&data).unwrap();
            got
        })
    };
    ready.recv().unwrap();
    let serial = tempfile::tempfile().unwrap();
    let reader = serial.try_clone().unwrap();
    // One vCPU: the card is under test, not SMP (two-vCPU boots are the
    // ones the nested harness has seen lock up; common/nested.rs).
    let mut config = VmConfig::new(Kernel::Linux(kernel), 1, 256);
    config.initrd = Some(initrd);
    config.cmdline = "console=ttyS0 panic=-1 quiet".into();
    config.serial_out = Some(serial);
    config.net = Some(moat_vmm::NetConfig {
        backend: moat_vmm::NetBackend::Tap {
            file: tap,
            vnet_hdr: true,
        },
        mac: [0x02, 0x6d, 0x6f, 0x61, 0x74, 0x64],
        mtu: 1500,
    });
    let (reason, out) = run_bounded(Vm::new(config).unwrap(), reader);
    assert_eq!(reason, ExitReason::Reset, "serial:\n{out}");
    assert!(!out.contains("failed"), "serial:\n{out}");
    // The features the driver accepted, as virtio's sysfs lists them (one
    // character per bit from bit 0): CSUM, GUEST_CSUM, GUEST_TSO4/6,
    // HOST_TSO4/6, MAC, MTU, MRG_RXBUF.
    let features = out
        .lines()
        .find_map(|l| l.strip_prefix("moat-init: features="))
        .unwrap_or_else(|| panic!("no features line; serial:\n{out}"))
        .as_bytes();
    for bit in [0, 1, 3, 5, 7, 8, 11, 12, 15] {
        assert_eq!(features.get(bit), Some(&b'1'), "bit {bit}; serial:\n{out}");
    }
    assert!(out.contains("moat-init: sent, nc 0"), "serial:\n{out}");
    assert!(out.contains("moat-init: received intact"), "serial:\n{out}");
    assert!(
        host.join().unwrap() == data,
        "the guest's data arrived whole"
    );
    // Segments, not frames: what the guest sent while sending, and what
    // it received while receiving, came in packets larger on average than
    // the largest frame its MTU allows (1514 bytes), which only segments
    // handed through the card whole make (the driver counts one per
    // buffer).
    let [start, sent, received] = ["start", "sent", "received"].map(|w| counters(&out, w));
    let per_packet = |bytes: u64, packets: u64| bytes / packets.max(1);
    let tx = per_packet(sent[0] - start[0], sent[1] - start[1]);
    let rx = per_packet(received[2] - sent[2], received[3] - sent[3]);
    assert!(tx > 1514, "{tx} bytes per packet sent; serial:\n{out}");
    assert!(rx > 1514, "{rx} bytes per packet received; serial:\n{out}");
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
