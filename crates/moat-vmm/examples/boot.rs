//! Boots a kernel on the built-in VMM, serial console on stdout, for trying
//! things by hand:
//!
//! ```text
//! cargo run -p moat-vmm --example boot -- KERNEL [INITRD] [CMDLINE] [SECONDS]
//! ```
//!
//! Stops the VM after SECONDS (default 30) if the guest has not ended it.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::Duration;

use moat_vmm::{Kernel, Vm, VmConfig};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(kernel) = args.first() else {
        eprintln!("usage: boot KERNEL [INITRD] [CMDLINE] [SECONDS]");
        std::process::exit(2);
    };
    let mut config = VmConfig::new(Kernel::Linux(PathBuf::from(kernel)), 1, 256);
    config.initrd = args.get(1).filter(|s| !s.is_empty()).map(PathBuf::from);
    config.cmdline = args
        .get(2)
        .cloned()
        .unwrap_or_else(|| "console=ttyS0 earlyprintk=serial".into());
    let seconds: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(30);
    let out = std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .expect("dup stdout");
    config.serial_out = Some(std::fs::File::from(out));
    let vm = match Vm::new(config) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("error: {}", moat_error_chain(&e));
            std::process::exit(1);
        }
    };
    eprintln!("cmdline: {}", vm.cmdline());
    let stop = vm.stop_handle();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(seconds));
        stop.stop();
    });
    match vm.run() {
        Ok(reason) => eprintln!("exit: {reason:?}"),
        Err(e) => {
            eprintln!("error: {}", moat_error_chain(&e));
            std::process::exit(1);
        }
    }
}

fn moat_error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
