//! The `microvm` tier on moat's own VMM (`moat-vmm`), end to end: `moat
//! run --isolation microvm` picks it where KVM has vmx or svm, and the
//! workload runs in a guest that VMM booted (its ACPI tables, not QEMU's,
//! in the guest kernel's log), with its output and exit status relayed,
//! stdin passed through, and nothing left behind.
//!
//! This project's machines have no vmx/svm (their KVM is PVM), so the
//! cases run in a QEMU/TCG guest (`guest/mod.rs`) whose emulated CPU has
//! SVM: the guest loads `kvm_amd`, gets a /dev/kvm that boots stock kernels,
//! and this package's `moat` runs there with the guest kernel, its modules
//! and e2fsprogs' `mke2fs` (which builds the guest's disks) copied in; its
//! cgroups are v2 (the guest mounts a unified hierarchy). On a host with
//! vmx/svm the same cases run on the host directly.
#[path = "../../moat-vmm/tests/common/mod.rs"]
mod common;
#[allow(dead_code)]
mod guest;

use std::path::{Path, PathBuf};
use std::time::Duration;

use guest::{Guest, Needs, Out};

const TEST: &str = "moat_run_boots_the_workload_on_moats_own_vmm";

/// Bounds the whole guest session (watchdog), far above what it takes.
const SESSION_LIMIT: Duration = Duration::from_secs(900);

/// Where the cases run.
enum Runner {
    Guest(Guest),
    /// The host (it has vmx/svm), with `moat`'s directory first in PATH.
    Host(PathBuf),
}

impl Runner {
    fn sh(&mut self, script: &str) -> Result<Out, String> {
        match self {
            Runner::Guest(g) => g.sh(script),
            Runner::Host(dir) => {
                let path = format!(
                    "{}:{}",
                    dir.display(),
                    std::env::var("PATH").unwrap_or_default()
                );
                let o = std::process::Command::new("sh")
                    .args(["-c", script])
                    .env("PATH", path)
                    .stdin(std::process::Stdio::null())
                    .output()
                    .map_err(|e| format!("sh: {e}"))?;
                Ok(Out {
                    code: o.status.code().unwrap_or(-1),
                    stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
                    stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
                })
            }
        }
    }
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The shared libraries `ldd` names for `binary` (the dynamic loader among
/// them), as (host path, path in the guest).
fn libraries(binary: &Path) -> Vec<PathBuf> {
    let out = std::process::Command::new("ldd")
        .arg(binary)
        .output()
        .expect("ldd runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .find(|w| w.starts_with('/'))
                .map(PathBuf::from)
        })
        .collect()
}

/// What the nested guest needs besides moat and busybox: the guest
/// kernel, the tier's modules and KVM's, `mke2fs` and its libraries.
fn guest_files(release: &str, kernel: &Path) -> Vec<(String, u32, Vec<u8>)> {
    let mut files = vec![(format!("boot/vmlinuz-{release}"), 0o644, read(kernel))];
    let modules = Path::new("/lib/modules").join(release).join("kernel");
    let tier = moat_microvm::assets::MODULE_PATHS.iter().map(|(_, p)| *p);
    for m in tier.chain(common::nested::KVM_MODULES) {
        files.push((
            format!("lib/modules/{release}/kernel/{m}"),
            0o644,
            read(&modules.join(m)),
        ));
    }
    let mke2fs = common::which("mke2fs").expect("mke2fs (e2fsprogs) is installed");
    files.push(("bin/mke2fs".into(), 0o755, read(&mke2fs)));
    for lib in libraries(&mke2fs) {
        let at = lib.to_string_lossy().trim_start_matches('/').to_string();
        // /lib64/ld-linux-x86-64.so.2 is a link into /lib; a copy serves.
        files.push((at, 0o755, read(&std::fs::canonicalize(&lib).unwrap())));
    }
    files
}

/// In the guest: KVM's modules, and /dev/kvm for the group `kvm` (36), as
/// udev leaves it on a distribution's host (the VMM's jail then holds that
/// group only).
fn kvm_setup(release: &str) -> String {
    let mut s = String::from("set -e\n");
    for m in common::nested::KVM_MODULES {
        s.push_str(&format!("insmod /lib/modules/{release}/kernel/{m}\n"));
    }
    s.push_str("chown 0:36 /dev/kvm\nchmod 660 /dev/kvm\ngrep -qw svm /proc/cpuinfo\n");
    s
}

fn check(ok: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(what())
    }
}

fn cases(r: &mut Runner) -> Result<(), String> {
    let info = r.sh("moat info")?;
    check(
        info.code == 0
            && info
                .stdout
                .lines()
                .any(|l| l.contains("microvm") && l.contains("ready: moat's own VMM on KVM")),
        || format!("moat info does not pick moat's own VMM: {info}"),
    )?;
    // The console copied to stderr: the guest kernel lists the ACPI
    // tables it found, and moat's VMM names its own.
    let run = r.sh(
        "MOAT_MICROVM_CONSOLE=1 moat run --isolation microvm -- sh -c 'echo hello from the guest; echo to stderr >&2; exit 7'",
    )?;
    check(
        run.code == 7 && run.stdout.contains("hello from the guest"),
        || format!("the workload's output or status was not relayed: {run}"),
    )?;
    for l in run
        .stderr
        .lines()
        .filter(|l| l.starts_with("moat: microvm:"))
    {
        eprintln!("{TEST}: {l}");
    }
    check(
        run.stderr.contains("to stderr") && run.stderr.contains("MOATDSDT"),
        || format!("not booted on moat's VMM (no MOATDSDT in the guest's log): {run}"),
    )?;
    let stdin = r.sh("echo piped through | moat run -i --isolation microvm -- cat")?;
    check(
        stdin.code == 0 && stdin.stdout.trim() == "piped through",
        || format!("stdin did not reach the workload: {stdin}"),
    )?;
    // Nothing left: no container state, no VMM process, no cgroup.
    let left = r.sh(
        "ls -A /run/moat | grep -v '^\\.' || true; ps -o args | grep -v grep | grep 'moat.*microvm' || true",
    )?;
    check(left.stdout.trim().is_empty(), || {
        format!("left behind: {left}")
    })
}

#[test]
fn moat_run_boots_the_workload_on_moats_own_vmm() {
    let moat = Path::new(env!("CARGO_BIN_EXE_moat"));
    if common::nested::hardware_virt() {
        let dir = moat.parent().unwrap().to_path_buf();
        if let Err(e) = cases(&mut Runner::Host(dir)) {
            panic!("{TEST}: {e}");
        }
        return;
    }
    let needs = match Needs::find() {
        Ok(n) => n,
        Err(why) => {
            moat_core::testing::skip(TEST, &why);
            return;
        }
    };
    eprintln!("{TEST}: no vmx or svm here: running it in a QEMU/TCG guest with an emulated SVM");
    let files = guest_files(&needs.release, &needs.kernel);
    let files: Vec<(&str, u32, Vec<u8>)> = files
        .into_iter()
        .map(|(p, m, d)| (&*p.leak(), m, d))
        .collect();
    // 3 GiB: the initramfs unpacked, the guest's disk images (in memory
    // there), and the microVM's RAM.
    let g = Guest::boot_sized(&needs, moat, &files, SESSION_LIMIT, 3072)
        .unwrap_or_else(|e| panic!("{TEST}: the guest did not boot: {e}"));
    let mut r = Runner::Guest(g);
    let result = r
        .sh(&kvm_setup(&needs.release))
        .and_then(|o| check(o.code == 0, || format!("KVM in the guest: {o}")))
        .and_then(|()| cases(&mut r));
    let Runner::Guest(g) = r else { unreachable!() };
    if let Err(e) = result {
        panic!(
            "{TEST}: {e}\n--- guest serial console ---\n{}",
            g.serial_log()
        );
    }
    g.power_off().unwrap();
}
