//! The guest agent: moat itself, PID 1 of the initramfs moat builds
//! ([`crate::assets`]). It mounts the kernel filesystems, loads the virtio
//! modules, opens the agent channel (a virtio serial port), says hello, and serves
//! the host: the container's process runs under moat's own container tier
//! in the guest (what `moat run --keep -b BUNDLE w0` does, in a fork of the
//! agent, so every layer of the container tier holds inside the guest too),
//! `exec`s run through `moat exec`, stdio and terminals are relayed as
//! frames ([`crate::proto`]), signals delivered, and the exit status, OOM
//! kills and refused forks reported. The host kills the VM once the exit is
//! reported; `Shutdown` (or anything fatal) reboots the guest, which ends
//! the VM too.
use std::time::Duration;

pub mod boot;
pub mod net;
mod pod;
pub mod reclaim;
mod serve;

/// Argument the kernel passes to the agent (`rdinit=/moat -- microvm-agent`).
pub const SUBCOMMAND: &str = "microvm-agent";
/// The moat binary in the initramfs.
pub const GUEST_MOAT: &str = "/moat";
/// Set to `1` for the guest's moat run by the agent: with `--log FILE`,
/// its records go to FILE only, not to its stderr (an exec's stderr is
/// the exec's process's; the agent reports a failed start from the log).
pub const LOG_ONLY_ENV: &str = "MOAT_LOG_ONLY";
/// The container tier's state root in the guest.
pub const GUEST_STATE_ROOT: &str = "/run/moat";
/// The container's ID in the guest (one container per VM).
pub const GUEST_ID: &str = "w0";

/// Whether `id` can name a pod's container that joins the guest (its
/// directory there among them).
pub fn pod_id_ok(id: &str) -> bool {
    pod::valid_id(id)
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot {step}")]
    Io {
        step: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot {step}")]
    Sys {
        step: String,
        #[source]
        source: nix::Error,
    },
    #[error(
        "the agent channel (virtio port {}, or {}) did not appear",
        crate::proto::AGENT_PORT,
        boot::CHANNEL
    )]
    NoChannel,
    #[error("agent protocol")]
    Proto(#[from] crate::proto::ProtoError),
    #[error("{0}")]
    Request(String),
}

/// The agent's life, as PID 1: set up, serve, power off. Never returns
/// normally (PID 1 exiting panics the kernel); a fatal error is printed on
/// the console, then the guest reboots, which ends the VM.
pub fn main() -> i32 {
    if std::process::id() != 1 {
        eprintln!("moat: microvm-agent runs only as PID 1 of a moat guest");
        return 2;
    }
    if let Err(e) = run() {
        eprintln!("moat-agent: {}", moat_core::error_chain(&e));
    }
    power_off()
}

fn run() -> Result<(), AgentError> {
    trace("started");
    boot::leave_initramfs()?;
    trace("out of the initramfs");
    boot::mount_kernel_filesystems()?;
    trace("kernel filesystems");
    reclaim::enable_lru_gen();
    boot::raise_hard_limits()?;
    boot::seal_root()?;
    boot::load_modules(boot::EARLY_MODULES)?;
    trace("early modules");
    if boot::has_share_port(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default()) {
        boot::load_modules(boot::PCI_MODULES)?;
        boot::load_modules(boot::FS_MODULES)?;
        trace("share port's modules");
    }
    let chan = boot::open_channel()?;
    serve::Agent::new(chan)?.serve()
}

/// With `debug` on the kernel command line (MOAT_MICROVM_CONSOLE), prints
/// on the console when the agent reached `step`, in seconds since the
/// guest booted.
pub fn trace(step: &str) {
    if debug() {
        let up = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
        eprintln!(
            "moat-agent: {step} at uptime {}.{:06}",
            up.tv_sec,
            up.tv_nsec / 1000
        );
    }
}

/// With `debug` (as [`trace`]): where the guest's CPU time went, and each
/// disk's reads so far, as the kernel counts them (requests, sectors,
/// milliseconds busy).
pub fn trace_disks() {
    if !debug() {
        return;
    }
    if let Ok(stat) = std::fs::read_to_string("/proc/stat") {
        if let Some(cpu) = stat.lines().next() {
            eprintln!("moat-agent: {cpu} (user nice system idle iowait irq softirq, 10 ms)");
        }
    }
    for d in ["vda", "vdb", "vdc", "vdd", "vde", "vdf"] {
        if let Ok(s) = std::fs::read_to_string(format!("/sys/block/{d}/stat")) {
            let f: Vec<&str> = s.split_whitespace().collect();
            if f.len() > 3 {
                eprintln!(
                    "moat-agent: {d}: {} reads, {} sectors, {} ms",
                    f[0], f[2], f[3]
                );
            }
        }
    }
}

fn debug() -> bool {
    static DEBUG: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DEBUG.get_or_init(|| std::env::args().any(|a| a == "debug"))
}

/// Syncs and reboots the guest: with `reboot=t` and QEMU's `-no-reboot`
/// (or the built-in VMM's reset handling) the VM ends.
pub fn power_off() -> ! {
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    // Not reached; if it were, PID 1 must not exit.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
