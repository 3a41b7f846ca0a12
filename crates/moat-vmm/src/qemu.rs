//! The QEMU backend: the same [`VmConfig`] run by `qemu-system-x86_64 -M
//! microvm`, for hosts whose KVM cannot boot Linux (nested PVM) or that have
//! no KVM at all. The guest sees the same devices as under the built-in VMM:
//! virtio-mmio block devices, an entropy device, and the agent channel as a
//! virtio console port (`/dev/hvc0`), plus COM1 for its console. QEMU's
//! microvm announces the virtio-mmio devices in ACPI (the Debian cloud
//! kernel lacks `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`).

use std::ffi::OsString;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

use thiserror::Error;

use crate::config::{Kernel, VmConfig};
use crate::ExitReason;

/// The QEMU binary looked up on `PATH` by default.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";

/// How QEMU executes guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation through /dev/kvm.
    Kvm,
    /// QEMU's software emulator: slow, but needs nothing from the host.
    Tcg,
}

/// The accelerator chosen for this host, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelChoice {
    /// The accelerator.
    pub accel: Accel,
    /// Why, in words for `moat info` and error messages.
    pub reason: String,
}

/// Why the QEMU backend failed.
#[derive(Debug, Error)]
pub enum QemuError {
    /// The configuration cannot be expressed for QEMU.
    #[error("QEMU backend: {0}")]
    Unsupported(&'static str),
    /// QEMU could not be started.
    #[error("start {}", binary.display())]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Waiting for QEMU failed.
    #[error("wait for QEMU")]
    Wait(#[source] std::io::Error),
    /// QEMU exited with an error of its own.
    #[error("QEMU failed ({status}): {stderr}")]
    Failed {
        /// Its exit status.
        status: ExitStatus,
        /// The end of what it printed.
        stderr: String,
    },
}

fn cpuinfo_has_hardware_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// Chooses KVM where QEMU can use it, TCG otherwise, from what this host shows:
/// /dev/kvm must open read-write, the CPU must show vmx or svm, and KVM must
/// not be the software-assisted PVM (`kvm_pvm`), under which QEMU hangs.
pub fn detect_accel() -> AccelChoice {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm");
    choose_accel(kvm.err(), cpuinfo_has_hardware_virt(&cpuinfo), pvm)
}

fn choose_accel(kvm_error: Option<std::io::Error>, hardware_virt: bool, pvm: bool) -> AccelChoice {
    let tcg = |reason: String| AccelChoice {
        accel: Accel::Tcg,
        reason,
    };
    if let Some(e) = kvm_error {
        return tcg(format!("TCG: /dev/kvm: {e}"));
    }
    if pvm {
        return tcg("TCG: KVM here is PVM (kvm_pvm), under which QEMU hangs".into());
    }
    if !hardware_virt {
        return tcg("TCG: no vmx or svm in /proc/cpuinfo".into());
    }
    AccelChoice {
        accel: Accel::Kvm,
        reason: "KVM: /dev/kvm usable and the CPU has hardware virtualisation".into(),
    }
}

/// The host TSC rate in kHz from /proc/cpuinfo (TCG guests may hang calibrating it).
pub fn host_khz() -> Option<u64> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0) as u64)
}

/// The guest's CPU under TCG: every feature TCG emulates (SMEP, SMAP, UMIP
/// and PKU among them, which the guest kernel's hardening uses) except
/// ERMS and FSRM. With those, the kernel copies and clears memory, and
/// glibc copies large buffers, with `rep movsb`/`stosb`, which QEMU 7.2's
/// TCG runs one byte per translated-block iteration; without them it uses
/// `rep movsq`/`stosq` or vector loops. Unpacking the initramfs and
/// zeroing every page the guest touches dominated a cold start: its median
/// went from 3.4 s to 2.0 s here (docs/performance.md). Performance-only
/// features: nothing the guest's isolation relies on.
pub const TCG_CPU: &str = "max,-erms,-fsrm";

/// The QEMU arguments for `config`. The serial console is written to QEMU's
/// stdout and the agent socket is QEMU's stdin (fd 0), as [`QemuVm::spawn`]
/// arranges.
pub fn arguments(config: &VmConfig, accel: Accel) -> Result<Vec<OsString>, QemuError> {
    let Kernel::Linux(kernel) = &config.kernel else {
        return Err(QemuError::Unsupported(
            "raw payloads run only on the built-in VMM",
        ));
    };
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |s: &str| a.push(s.into());
    push("-M");
    push("microvm,x-option-roms=off,rtc=off,isa-serial=on");
    push("-accel");
    push(match accel {
        Accel::Kvm => "kvm",
        Accel::Tcg => "tcg",
    });
    push("-cpu");
    push(match accel {
        Accel::Kvm => "host",
        Accel::Tcg => TCG_CPU,
    });
    push("-m");
    push(&format!("{}M", config.mem_mib));
    push("-smp");
    push(&config.vcpus.to_string());
    for s in [
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ] {
        push(s);
    }
    // QEMU's stdout, appended to (a plain `file:` would truncate it).
    push("-chardev");
    push("file,id=serial0,path=/dev/stdout,append=on");
    push("-serial");
    push("chardev:serial0");
    let mut cmdline = config.cmdline.trim().to_string();
    // A guest reboot ends QEMU (-no-reboot). Through a triple fault: microvm
    // has no i8042, and Linux's default order (ACPI, then the keyboard
    // controller) left QEMU 7.2 hung after "reboot: Restarting system" in
    // 2 of 10 TCG boots here, the triple fault in none of 20.
    if !cmdline.split_whitespace().any(|w| w.starts_with("reboot=")) {
        cmdline.push_str(" reboot=t");
    }
    if accel == Accel::Tcg && !cmdline.contains("tsc_early_khz=") {
        if let Some(khz) = host_khz() {
            cmdline.push_str(&format!(" tsc_early_khz={khz}"));
        }
    }
    // TCG's TSC is QEMU's own monotonic counter; when the host stalls the
    // guest, the clocksource watchdog marks it unstable and the guest falls
    // back to a coarse clock (a TCG test guest then reported timer wake-ups
    // that never came and RCU stalls).
    if accel == Accel::Tcg && !cmdline.split_whitespace().any(|w| w.starts_with("tsc=")) {
        cmdline.push_str(" tsc=reliable");
    }
    push("-append");
    push(cmdline.trim());
    a.push("-kernel".into());
    a.push(kernel.into());
    if let Some(initrd) = &config.initrd {
        a.push("-initrd".into());
        a.push(initrd.into());
    }
    for (i, b) in config.block.iter().enumerate() {
        let id = format!("vd{}", (b'a' + i as u8) as char);
        let mut drive = OsString::from(format!(
            "id={id},if=none,format=raw,readonly={},file=",
            if b.read_only { "on" } else { "off" }
        ));
        // QEMU option syntax: a comma in the path is written twice.
        drive.push(b.path.as_os_str().to_string_lossy().replace(',', ",,"));
        a.push("-drive".into());
        a.push(drive);
        a.push("-device".into());
        a.push(format!("virtio-blk-device,drive={id}").into());
    }
    if config.rng {
        for s in [
            "-object",
            "rng-builtin,id=rng0",
            "-device",
            "virtio-rng-device,rng=rng0",
        ] {
            a.push(s.into());
        }
    }
    if config.balloon {
        a.push("-device".into());
        a.push("virtio-balloon-device,free-page-reporting=on".into());
    }
    if config.block.iter().any(|b| b.file.is_some()) {
        return Err(QemuError::Unsupported(
            "a disk opened by the caller (QEMU takes its images by path here)",
        ));
    }
    if config.net.is_some() {
        // The tier hands QEMU its frame stream itself (moat-microvm's
        // `-netdev stream,addr.type=fd`); this driver has no descriptor
        // slot for it.
        return Err(QemuError::Unsupported(
            "a network card (moat-microvm passes QEMU its own -netdev)",
        ));
    }
    if config.agent.is_some() {
        for s in [
            "-chardev",
            "socket,id=agent,fd=0",
            "-device",
            "virtio-serial-device,max_ports=1",
            "-device",
            "virtconsole,chardev=agent",
        ] {
            a.push(s.into());
        }
    }
    Ok(a)
}

/// A running QEMU. Dropping it kills QEMU (so no test or error path leaves one behind).
pub struct QemuVm {
    child: Option<Child>,
}

impl QemuVm {
    /// Starts `binary` (normally [`QEMU_BINARY`]) for `config` with `accel`.
    pub fn spawn(mut config: VmConfig, accel: Accel, binary: &Path) -> Result<QemuVm, QemuError> {
        config
            .validate()
            .map_err(|_| QemuError::Unsupported("invalid VM configuration"))?;
        let args = arguments(&config, accel)?;
        let mut cmd = Command::new(binary);
        cmd.args(args).stderr(Stdio::piped());
        cmd.stdout(match config.serial_out.take() {
            Some(f) => Stdio::from(f),
            None => Stdio::null(),
        });
        cmd.stdin(match config.agent.take() {
            Some(s) => Stdio::from(OwnedFd::from(s)),
            None => Stdio::null(),
        });
        let child = cmd.spawn().map_err(|source| QemuError::Spawn {
            binary: binary.to_owned(),
            source,
        })?;
        Ok(QemuVm { child: Some(child) })
    }

    /// QEMU's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits for QEMU to exit. With `-no-reboot`, a guest reset or power-off
    /// both end QEMU with status 0: that is [`ExitReason::Reset`].
    pub fn wait(mut self) -> Result<ExitReason, QemuError> {
        let Some(mut child) = self.child.take() else {
            return Err(QemuError::Wait(std::io::ErrorKind::NotFound.into()));
        };
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            // Bounded: QEMU prints a few lines at most; keep the last 4 KiB.
            let mut buf = Vec::new();
            let _ = e.read_to_end(&mut buf);
            let start = buf.len().saturating_sub(4096);
            stderr = String::from_utf8_lossy(&buf[start..]).trim().to_string();
        }
        let status = child.wait().map_err(QemuError::Wait)?;
        if status.success() {
            Ok(ExitReason::Reset)
        } else {
            Err(QemuError::Failed { status, stderr })
        }
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BlockConfig;

    #[test]
    fn accel_choice() {
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        assert_eq!(choose_accel(Some(denied), true, false).accel, Accel::Tcg);
        assert_eq!(choose_accel(None, true, true).accel, Accel::Tcg);
        assert!(choose_accel(None, true, true).reason.contains("PVM"));
        assert_eq!(choose_accel(None, false, false).accel, Accel::Tcg);
        assert_eq!(choose_accel(None, true, false).accel, Accel::Kvm);
        assert!(cpuinfo_has_hardware_virt("flags\t\t: fpu vmx sse\n"));
        assert!(!cpuinfo_has_hardware_virt("flags\t\t: fpu sse\nvmx\n"));
    }

    #[test]
    fn arguments_carry_the_devices() {
        let mut c = VmConfig::new(Kernel::Linux("/k".into()), 2, 128);
        c.initrd = Some("/i".into());
        c.cmdline = "console=ttyS0 tsc_early_khz=1".into();
        c.block.push(BlockConfig {
            path: "/img,with,commas".into(),
            read_only: true,
            file: None,
        });
        c.rng = true;
        c.balloon = true;
        let a: Vec<String> = arguments(&c, Accel::Tcg)
            .unwrap()
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        let after = |flag: &str| a[a.iter().position(|x| x == flag).unwrap() + 1].clone();
        assert_eq!(after("-accel"), "tcg");
        assert_eq!(after("-m"), "128M");
        assert_eq!(after("-smp"), "2");
        assert_eq!(
            after("-append"),
            "console=ttyS0 tsc_early_khz=1 reboot=t tsc=reliable"
        );
        assert_eq!(
            after("-drive"),
            "id=vda,if=none,format=raw,readonly=on,file=/img,,with,,commas"
        );
        assert!(a.contains(&"virtio-rng-device,rng=rng0".to_string()));
        assert!(a.contains(&"virtio-balloon-device,free-page-reporting=on".to_string()));
        assert!(!a.iter().any(|x| x.contains("virtconsole")));
        let p = VmConfig::new(Kernel::Payload(vec![0xf4]), 1, 16);
        assert!(matches!(
            arguments(&p, Accel::Tcg),
            Err(QemuError::Unsupported(_))
        ));
    }
}
