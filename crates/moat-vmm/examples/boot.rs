//! Boots a kernel on the built-in VMM, serial console on stdout, for trying
//! things by hand:
//!
//! ```text
//! cargo run -p moat-vmm --example boot -- KERNEL [INITRD] [CMDLINE] [SECONDS]
//! ```
//!
//! Stops the VM after SECONDS (default 30) if the guest has not ended it.
//! `MOAT_BOOT_VCPUS` sets the vCPUs (default 1), `MOAT_BOOT_MEM` the MiB
//! (default 256), `MOAT_BOOT_DISK` adds a read-only virtio disk over that
//! image, `MOAT_BOOT_RNG=1` a virtio-rng, `MOAT_BOOT_AGENT=1` the agent
//! console, whose bytes from the guest are printed as hex on stderr.

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
    let env = |k: &str| std::env::var(k).ok();
    let vcpus = env("MOAT_BOOT_VCPUS")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let mem = env("MOAT_BOOT_MEM")
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let mut config = VmConfig::new(Kernel::Linux(PathBuf::from(kernel)), vcpus, mem);
    if let Some(disk) = env("MOAT_BOOT_DISK") {
        config.block.push(moat_vmm::BlockConfig {
            path: disk.into(),
            read_only: true,
            file: None,
        });
    }
    config.rng = env("MOAT_BOOT_RNG").is_some_and(|v| v == "1");
    if env("MOAT_BOOT_AGENT").is_some_and(|v| v == "1") {
        let (mut host, guest) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        config.agent = Some(guest);
        std::thread::spawn(move || {
            use std::io::Read;
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = host.read(&mut buf) {
                let hex: String = buf[..n.min(64)]
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                eprintln!("agent channel: {n} bytes: {hex}");
            }
        });
    }
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
