//! The built-in VMM on this host's KVM, with tiny hand-assembled guests
//! (`payloads/*.S`, assembled to the committed `*.bin` by `payloads/build.sh`).
//! Each test skips, saying why, where /dev/kvm cannot be opened.

use std::fs::File;
use std::io::Read;
use std::sync::mpsc;
use std::time::Duration;

use moat_vmm::{ExitReason, Kernel, Vm, VmConfig};

/// A generous bound against a hung guest; not a timing assertion.
const WATCHDOG: Duration = Duration::from_secs(60);

fn kvm_available() -> bool {
    match File::options().read(true).write(true).open("/dev/kvm") {
        Ok(_) => true,
        Err(e) => {
            eprintln!("skipped: /dev/kvm: {e}");
            false
        }
    }
}

/// Runs `config` with its serial output captured; returns the exit and the output.
fn run(mut config: VmConfig) -> (ExitReason, String) {
    let out = tempfile::tempfile().unwrap();
    let mut reader = out.try_clone().unwrap();
    config.serial_out = Some(out);
    let vm = Vm::new(config).unwrap();
    let stop = vm.stop_handle();
    let (done, wait) = mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if wait.recv_timeout(WATCHDOG) == Err(mpsc::RecvTimeoutError::Timeout) {
            stop.stop();
        }
    });
    let reason = vm.run().unwrap();
    drop(done);
    watchdog.join().unwrap();
    let mut s = String::new();
    use std::io::Seek;
    reader.rewind().unwrap();
    reader.read_to_string(&mut s).unwrap();
    (reason, s)
}

fn payload(bytes: &[u8]) -> Kernel {
    Kernel::Payload(bytes.to_vec())
}

#[test]
fn hello_on_serial_then_i8042_reset() {
    if !kvm_available() {
        return;
    }
    let (reason, out) = run(VmConfig::new(
        payload(include_bytes!("payloads/hello.bin")),
        1,
        16,
    ));
    assert_eq!(out, "hello from the guest\n");
    assert_eq!(reason, ExitReason::Reset);
}
