//! Running a payload guest in a test: shared by moat-vmm's
//! `kvm_payloads.rs` and moat-microvm's `builtin_filters.rs` (which
//! includes this file by path).
use std::io::Read;
use std::sync::mpsc;
use std::time::Duration;

use moat_vmm::{ExitReason, Vm, VmConfig};

/// A generous bound against a hung guest; not a timing assertion.
const WATCHDOG: Duration = Duration::from_secs(60);

/// Whether /dev/kvm opens; says why not (a hardware skip) otherwise.
pub fn kvm_available() -> bool {
    match std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            moat_core::testing::skip_hardware("kvm payloads", &format!("/dev/kvm: {e}"));
            false
        }
    }
}

/// Runs `config` with its serial output captured; returns the exit and the output.
/// The VM runs on a thread of its own: with a thread hook, the thread that
/// runs it ends up under the hook's `ThreadRole::Main` filter.
pub fn run(mut config: VmConfig) -> (ExitReason, String) {
    let out = tempfile::tempfile().unwrap();
    let mut reader = out.try_clone().unwrap();
    config.serial_out = Some(out);
    let reason = run_vm(Vm::new(config).unwrap());
    let mut s = String::new();
    use std::io::Seek;
    reader.rewind().unwrap();
    reader.read_to_string(&mut s).unwrap();
    (reason, s)
}

/// Runs a built VM on a thread of its own, stopped by a watchdog if it
/// hangs; returns its exit.
pub fn run_vm(vm: Vm) -> ExitReason {
    let stop = vm.stop_handle();
    let (done, wait) = mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if wait.recv_timeout(WATCHDOG) == Err(mpsc::RecvTimeoutError::Timeout) {
            stop.stop();
        }
    });
    let reason = std::thread::spawn(move || vm.run().unwrap())
        .join()
        .unwrap();
    drop(done);
    watchdog.join().unwrap();
    reason
}

/// Reads `reader` a byte at a time until what it gave ends with `end`;
/// returns all of it (panics if it closes first). Not every test that
/// includes this file reads a stream.
#[allow(dead_code)]
pub fn read_until(reader: &mut impl Read, end: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut byte = [0u8; 1];
    while !out.ends_with(end) {
        assert_eq!(reader.read(&mut byte).unwrap(), 1, "closed after {out:?}");
        out.push(byte[0]);
    }
    out
}

/// moat's user-space stack on a thread of its own, serving one link as the
/// microvm tier runs it for a guest (deny-all egress, no host addresses):
/// the VM's end of the frame socket, and the stack's thread, which ends
/// when that end closes.
#[allow(clippy::type_complexity)]
pub fn stack_link() -> (
    std::os::unix::net::UnixStream,
    std::thread::JoinHandle<Result<moat_net::Ended, moat_net::ServeError>>,
) {
    let (stack_side, vm_side) = std::os::unix::net::UnixStream::pair().unwrap();
    let (control, stop) = moat_net::control().unwrap();
    let mut cfg = moat_net::ServeConfig::new(moat_net::Policy::deny_all());
    cfg.host_addrs = Some(Vec::new());
    let stack = std::thread::spawn(move || {
        let _stop = stop;
        moat_net::serve_link(
            moat_net::Link::Stream(std::os::fd::OwnedFd::from(stack_side)),
            cfg,
            std::sync::Arc::new(moat_net::SystemResolver),
            control,
        )
    });
    (vm_side, stack)
}
