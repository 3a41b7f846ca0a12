//! The microvm tier's guest agent on moat's own VMM (`moat-vmm`) rather
//! than QEMU: the initramfs the tier builds around the moat binary under
//! test (`assets::write_agent_initramfs`), booted by the built-in VMM with
//! the tier's kernel command line and the agent channel as its virtio
//! console. The kernel finds the devices through the VMM's ACPI tables, the
//! agent (PID 1) loads the virtio modules, takes `/dev/hvc0` (there is no
//! named port here) and says hello in the tier's protocol; a ping gets a
//! second hello. The VMM runs under its seccomp filters (the process
//! filter of its jail and each thread's), so these are checked against a
//! real guest kernel too, not only the payload guests. The whole tier on
//! this VMM is `e2e_microvm_builtin_tier.rs`.
//!
//! On the host's KVM where it has vmx or svm; elsewhere (this project's
//! machines) nested, inside a QEMU/TCG guest with an emulated SVM
//! (moat-vmm's `tests/common/nested.rs`).
#[path = "../../moat-vmm/tests/common/mod.rs"]
mod common;

use std::io::{Read, Seek, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use common::nested;
use moat_microvm::proto::{self, Kind};
use moat_vmm::{ExitReason, Kernel, Vm, VmConfig};

const NAME: &str = "the_agent_says_hello_on_the_builtin_vmm";
/// Where the nested guest finds the agent's initramfs.
const NESTED_INITRD: &str = "nested/agent.cpio";

/// The next frame from the agent (a bounded wait: the socket's timeout).
fn next_frame(sock: &mut UnixStream, dec: &mut proto::Decoder) -> proto::Frame {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(f) = dec.next_frame().unwrap() {
            return f;
        }
        let n = sock.read(&mut buf).expect("the agent answers");
        assert!(n > 0, "the agent channel closed");
        dec.push(&buf[..n]);
    }
}

/// Boots `kernel` with the agent's `initrd` on the built-in VMM and talks
/// to the agent, under the filters the VMM has in its jail: the process
/// filter (`builtin_setup_profile`) on this thread, which builds the VM and
/// whose threads inherit it, and each thread's role filter (the run
/// thread's included). Run it on a thread of its own: the filter stays.
fn body(kernel: &Path, initrd: &Path) {
    let (mut host, guest) = UnixStream::pair().unwrap();
    // A bound against a guest that never answers, not a timing assertion
    // (under the nested harness's session limit).
    host.set_read_timeout(Some(Duration::from_secs(100)))
        .unwrap();
    let serial = tempfile::tempfile().unwrap();
    let mut console = serial.try_clone().unwrap();
    let mut config = VmConfig::new(Kernel::Linux(kernel.to_path_buf()), 1, 256);
    config.initrd = Some(initrd.to_path_buf());
    // The tier's command line on this VMM (which adds its own `reboot=k`).
    config.cmdline = moat_microvm::Backend::Builtin.cmdline();
    config.serial_out = Some(serial);
    config.agent = Some(guest);
    config.rng = true;
    config.balloon = true;
    config.thread_hook = Some(moat_microvm::seccomp::builtin_thread_hook());
    // From here on as in the jail: the sockets and files exist already.
    moat_microvm::seccomp::load(&moat_microvm::seccomp::builtin_setup_profile().unwrap()).unwrap();
    let vm = Vm::new(config).unwrap();
    let stop = vm.stop_handle();
    let running = std::thread::spawn(move || vm.run());
    let mut dec = proto::Decoder::new();
    let talk = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let hello = next_frame(&mut host, &mut dec);
        assert_eq!(hello.kind, Kind::Hello);
        let h: proto::Hello = hello.json().unwrap();
        assert_eq!(h.version, proto::VERSION);
        assert!(h.kernel.ends_with("-cloud-amd64"), "{h:?}");
        host.write_all(&proto::encode(Kind::Ping, 0, &[])).unwrap();
        let again = next_frame(&mut host, &mut dec);
        assert_eq!(again.kind, Kind::Hello);
    }));
    stop.stop();
    let ended = running.join().unwrap();
    let mut out = String::new();
    console.rewind().unwrap();
    console.read_to_string(&mut out).unwrap();
    if let Err(e) = talk {
        eprintln!("guest console:\n{out}");
        std::panic::resume_unwind(e);
    }
    assert_eq!(ended.unwrap(), ExitReason::Stopped, "console:\n{out}");
}

#[test]
fn the_agent_says_hello_on_the_builtin_vmm() {
    if nested::is_child() {
        let (kernel, _) = common::cloud_kernel().expect("the nested guest has the kernel");
        return confined(kernel, Path::new("/").join(NESTED_INITRD));
    }
    let kernel = match moat_microvm::assets::GuestKernel::find() {
        Ok(k) => k,
        Err(why) => {
            moat_core::testing::skip(NAME, &why);
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    // The moat under test, without its debug information (as the tier
    // strips its own).
    let moat = dir.path().join("moat");
    let stripped = std::process::Command::new("strip")
        .args(["--strip-debug", "-o"])
        .arg(&moat)
        .arg(env!("CARGO_BIN_EXE_moat"))
        .status()
        .is_ok_and(|s| s.success());
    let bytes = std::fs::read(if stripped {
        moat.as_path()
    } else {
        Path::new(env!("CARGO_BIN_EXE_moat"))
    })
    .unwrap();
    let initrd = dir.path().join("agent.cpio");
    moat_microvm::assets::write_agent_initramfs(&initrd, &kernel, &bytes).unwrap();
    if nested::delegate(NAME, &[(&initrd, NESTED_INITRD)]) {
        return;
    }
    confined(kernel.image.clone(), initrd);
}

/// [`body`] on a thread of its own (its filters stay with that thread).
fn confined(kernel: std::path::PathBuf, initrd: std::path::PathBuf) {
    if let Err(e) = std::thread::spawn(move || body(&kernel, &initrd)).join() {
        std::panic::resume_unwind(e);
    }
}
