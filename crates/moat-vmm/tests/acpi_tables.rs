//! The ACPI tables a real [`Vm`] puts in its guest's memory, read back from
//! that memory and checked by ACPICA (Debian's acpica-tools): the same
//! interpreter Linux runs (drivers/acpi/acpica). `acpiexec` loads the DSDT
//! and evaluates each device's `_HID` and `_CRS` as a kernel would, `iasl
//! -d` decodes every static table and reports bad checksums or lengths. The
//! kernel's own reading of the tables is `kvm_linux_boot.rs`.

mod common;
#[path = "common/payload_vm.rs"]
#[allow(dead_code)]
mod payload_vm;

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;

use moat_vmm::layout::{
    ACPI_ADDR, MMIO_DEVICE_SIZE, MMIO_GAP_START, VIRTIO_IRQ_BASE, ZERO_PAGE_ADDR,
};
use moat_vmm::{BlockConfig, Discovery, Kernel, NetBackend, NetConfig, Vm, VmConfig};
use payload_vm::kvm_available;
use vm_memory::{Bytes, GuestAddress};

fn read(vm: &Vm, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    vm.memory()
        .read_slice(&mut buf, GuestAddress(addr))
        .unwrap();
    buf
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// The table at `addr`, as long as its header says.
fn table(vm: &Vm, addr: u64) -> Vec<u8> {
    let len = u32_at(&read(vm, addr, 8), 4) as usize;
    assert!((36..=64 << 10).contains(&len), "table length {len}");
    read(vm, addr, len)
}

fn tool(name: &str) -> bool {
    if common::which(name).is_some() {
        return true;
    }
    moat_core::testing::skip("acpi_tables", &format!("needs {name} (acpica-tools)"));
    false
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

/// A VM with every kind of virtio device: three disks, rng, the agent
/// console and the network card (six devices), two vCPUs. It is built,
/// never run: the tables are in its memory from the start.
fn vm(dir: &Path, discovery: Discovery) -> (Vm, Vec<UnixStream>) {
    let mut config = VmConfig::new(Kernel::Payload(vec![0xf4]), 2, 64);
    config.discovery = discovery;
    config.block = (0..3)
        .map(|i| {
            let p = dir.join(format!("disk{i}"));
            std::fs::write(&p, vec![0u8; 4096]).unwrap();
            BlockConfig {
                path: p,
                read_only: i == 0,
                file: None,
            }
        })
        .collect();
    config.rng = true;
    let (agent, agent_peer) = UnixStream::pair().unwrap();
    config.agent = Some(agent);
    let (net, net_peer) = UnixStream::pair().unwrap();
    config.net = Some(NetConfig {
        backend: NetBackend::Stream(net),
        mac: [0x02, 0, 0, 0, 0, 1],
        mtu: 1500,
    });
    (Vm::new(config).unwrap(), vec![agent_peer, net_peer])
}

const DEVICES: u32 = 6;

#[test]
fn acpica_reads_the_tables_in_guest_memory() {
    if !kvm_available() || !tool("acpiexec") || !tool("iasl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (vm, _peers) = vm(dir.path(), Discovery::Acpi);
    assert!(!vm.cmdline().contains("virtio_mmio"), "{}", vm.cmdline());

    // The zero page points at the RSDP, which points at the XSDT, ...
    let zero_page = read(&vm, ZERO_PAGE_ADDR, 0x78);
    assert_eq!(
        u64_at(&zero_page, 0x70),
        ACPI_ADDR,
        "boot_params.acpi_rsdp_addr"
    );
    let rsdp = read(&vm, ACPI_ADDR, 36);
    assert_eq!(&rsdp[..8], b"RSD PTR ");
    // iasl does not take an RSDP alone: its two checksums are checked here.
    let sum = |b: &[u8]| b.iter().fold(0u8, |a, x| a.wrapping_add(*x));
    assert_eq!((sum(&rsdp[..20]), sum(&rsdp)), (0, 0), "RSDP checksums");
    let xsdt = table(&vm, u64_at(&rsdp, 24));
    assert_eq!(&xsdt[..4], b"XSDT");
    let mut files = vec![("xsdt", xsdt.clone())];
    let mut dsdt = None;
    for off in (36..xsdt.len()).step_by(8) {
        let t = table(&vm, u64_at(&xsdt, off));
        let sig = String::from_utf8_lossy(&t[..4]).to_lowercase();
        if sig == "facp" {
            dsdt = Some(table(&vm, u64_at(&t, 140)));
        }
        files.push((Box::leak(sig.into_boxed_str()), t));
    }
    let dsdt = dsdt.expect("the XSDT lists a FADT");
    files.push(("dsdt", dsdt));
    let names: Vec<&str> = files.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, ["xsdt", "facp", "apic", "dsdt"]);
    for (name, bytes) in &files {
        std::fs::write(dir.path().join(format!("{name}.dat")), bytes).unwrap();
    }

    // iasl decodes each table; a wrong checksum or a length that ends a
    // structure early is reported in what it writes.
    for (name, _) in &files {
        run(Command::new("iasl")
            .current_dir(dir.path())
            .args(["-d", &format!("{name}.dat")]));
        let dsl = std::fs::read_to_string(dir.path().join(format!("{name}.dsl"))).unwrap();
        for bad in [
            "Incorrect checksum",
            "Invalid",
            "terminates in the middle",
            "**** ",
        ] {
            assert!(!dsl.contains(bad), "{name}: {bad:?} in\n{dsl}");
        }
        if *name == "apic" {
            assert_eq!(dsl.matches("[Processor Local APIC]").count(), 2, "{dsl}");
            assert!(dsl.contains("Subtable Type : 01 [I/O APIC]"), "{dsl}");
            assert!(dsl.contains("Address : FEC00000"), "{dsl}");
        }
        if *name == "facp" {
            assert!(dsl.contains("Hardware Reduced (V5) : 1"), "{dsl}");
            assert!(
                dsl.contains("8042 Present on ports 60/64 (V2) : 0"),
                "{dsl}"
            );
            assert!(dsl.contains("Value to cause reset : FE"), "{dsl}");
        }
    }

    // acpiexec loads the DSDT as a kernel would and evaluates each device.
    let mut batch = Vec::new();
    for i in 0..DEVICES {
        batch.push(format!("evaluate \\_SB.V{i:03X}._HID"));
        batch.push(format!("resources \\_SB.V{i:03X}"));
    }
    batch.push("resources \\_SB.COM1".into());
    let out = run(Command::new("acpiexec").current_dir(dir.path()).args([
        "-b",
        &batch.join("; "),
        "dsdt.dat",
    ]));
    assert!(out.contains("successfully acquired and loaded"), "{out}");
    // (Only `_SRS` may be missing: the resources are fixed.)
    for bad in ["AE_AML", "ACPI Error", "ACPI Warning", "Could not"] {
        assert!(!out.contains(bad), "{bad:?} in:\n{out}");
    }
    for i in 0..DEVICES {
        let device = format!("Device: \\_SB.V{i:03X}");
        let at = out
            .find(&device)
            .unwrap_or_else(|| panic!("{device} missing:\n{out}"));
        let section = &out[at..];
        let section = &section[..section.find("EndTag").unwrap_or(section.len())];
        let base = MMIO_GAP_START + u64::from(i) * MMIO_DEVICE_SIZE;
        let gsi = VIRTIO_IRQ_BASE + i;
        for want in [
            "32-Bit Fixed Memory Range Resource".to_string(),
            format!("Address : {base:08X}"),
            format!("Address Length : {MMIO_DEVICE_SIZE:08X}"),
            "Triggering : Edge".to_string(),
            "Polarity : ActiveHigh".to_string(),
            format!("Dword00 : {gsi:08X}"),
        ] {
            assert!(
                section.contains(&want),
                "{want:?} missing for V{i:03X}:\n{section}"
            );
        }
    }
    assert_eq!(
        out.matches("[String] Length 08 = \"LNRO0005\"").count(),
        DEVICES as usize,
        "{out}"
    );
    assert!(
        out.contains("Device: \\_SB.COM1") && out.contains("Address Minimum : 03F8"),
        "{out}"
    );
    assert!(!out.contains("PS2"), "no i8042 node: {out}");
}

#[test]
fn command_line_discovery_has_no_acpi_tables() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (vm, _peers) = vm(dir.path(), Discovery::Cmdline);
    let announced = vm.cmdline().matches("virtio_mmio.device=4K@").count();
    assert_eq!(announced, DEVICES as usize, "{}", vm.cmdline());
    assert!(vm.cmdline().contains(&format!(
        "virtio_mmio.device=4K@{MMIO_GAP_START:#x}:{VIRTIO_IRQ_BASE}"
    )));
    assert_eq!(u64_at(&read(&vm, ZERO_PAGE_ADDR, 0x78), 0x70), 0);
    assert_ne!(&read(&vm, ACPI_ADDR, 8)[..], b"RSD PTR ");
}

/// More network cards (a pod's other interfaces, `VmConfig::more_net`):
/// each a virtio-mmio device of its own, announced with the others.
#[test]
fn more_network_cards_are_devices_of_their_own() {
    if !kvm_available() {
        return;
    }
    let mut config = VmConfig::new(Kernel::Payload(vec![0xf4]), 1, 64);
    config.discovery = Discovery::Cmdline;
    let mut peers = Vec::new();
    let mut card = |last: u8| {
        let (net, peer) = UnixStream::pair().unwrap();
        peers.push(peer);
        NetConfig {
            backend: NetBackend::Stream(net),
            mac: [0x02, 0, 0, 0, 0, last],
            mtu: 1500,
        }
    };
    config.net = Some(card(1));
    config.more_net = vec![card(2), card(3)];
    assert_eq!(config.virtio_device_count(), 3);
    let three = Vm::new(config).unwrap();
    let words = |vm: &Vm| -> Vec<String> {
        vm.cmdline()
            .split_whitespace()
            .filter(|w| w.starts_with("virtio_mmio.device="))
            .map(str::to_owned)
            .collect()
    };
    let w = words(&three);
    assert_eq!(w.len(), 3, "{}", three.cmdline());
    let mut distinct = w.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "each at an address of its own: {w:?}");
}
