//! A Linux guest for tests that need a kernel set up differently from the
//! host's (a unified cgroup v2 hierarchy): Debian's cloud kernel under QEMU
//! (`moat_vmm::qemu`, TCG unless KVM is usable), an initramfs written with
//! `moat_vmm::cpio` holding busybox, this package's `moat` binary, the
//! guest modules and an init script, and a command channel over the
//! virtio console (`/dev/hvc0`).
//!
//! The protocol is one line each way. The host sends a shell script,
//! base64-encoded, on one line; the guest runs it with `sh` as root (stdin
//! /dev/null, killed after two minutes) and answers
//! `DONE <status> <stdout base64> <stderr base64>` (`-` for empty). The init
//! sends `READY <vda major:minor>` once it serves, and ends the guest
//! (`reboot -f`, which ends QEMU) on `POWEROFF`. The serial console (kernel
//! log, the init's own messages) goes to a file, shown when something fails.
//!
//! QEMU is killed when the [`Guest`] is dropped, and by a watchdog when the
//! whole session outlives its deadline (a hung guest, never a timing check).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use moat_vmm::cpio::CpioWriter;
use moat_vmm::qemu::{detect_accel, QemuVm, QEMU_BINARY};
use moat_vmm::{BlockConfig, Kernel, VmConfig};

/// Guest modules, relative to /lib/modules/<release>/kernel, in load order:
/// the virtio-mmio transport, the block device (/dev/vda) and the console
/// that carries the commands (/dev/hvc0).
const MODULES: [&str; 5] = [
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_mmio.ko",
    "drivers/block/virtio_blk.ko",
    "drivers/char/virtio_console.ko",
];

/// What the first 16 bytes of the guest's /dev/vda hold.
pub const DISK_MARKER: &[u8; 16] = b"MOAT-DISK-MARKER";

/// How long the guest may take to boot to its command loop: a bound on a
/// hung guest, far above what a boot takes (10-30 s here).
const BOOT_LIMIT: Duration = Duration::from_secs(90);
/// Boots tried before the test fails: a QEMU/TCG guest with two vCPUs
/// here once stopped for good early in its boot (the serial console's last
/// line at 1.4 s: "PCI: Fatal: No config space access function found"),
/// and booted in 29 s the next time. A guest that fails the same way twice
/// fails the test, with both consoles printed.
const BOOT_TRIES: u32 = 2;
/// How long one command may take to answer: a bound on a hung guest,
/// above the 200 s the guest gives each command (a cold networked boot
/// that saves its snapshot, nested under TCG on a loaded machine, took
/// over 120 s, the guest's old bound).
const COMMAND_LIMIT: Duration = Duration::from_secs(260);

/// Stage 1, PID 1 on the initramfs. Every container pivots its root, and
/// pivot_root(2) refuses to move the initramfs (rootfs has no parent
/// mount): so the root becomes a bind mount of it, as switch_root would do
/// with a copy.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount --rbind / /newroot
cd /newroot
mount --move . /
exec chroot . /bin/sh /stage2
"#;

/// Stage 2: the guest's setup, then the command loop on /dev/hvc0.
const STAGE2: &str = r#"export PATH=/bin HOME=/root
log() { echo "stage2: $*"; }
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=755 tmpfs /run
for m in virtio_ring virtio virtio_mmio virtio_blk virtio_console; do
    insmod /lib/modules/$m.ko || log "insmod $m failed"
done
mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup || log "cannot mount cgroup2"
for c in cpu cpuset io memory pids hugetlb; do
    if grep -qw $c /sys/fs/cgroup/cgroup.controllers; then
        echo +$c > /sys/fs/cgroup/cgroup.subtree_control || log "cannot enable $c"
    fi
done
echo 4 > /proc/sys/vm/nr_hugepages
# The bundles' root: busybox and its applets.
mkdir -p /bundle/rootfs/bin /bundle/rootfs/proc /bundle/rootfs/dev /bundle/rootfs/sys /bundle/rootfs/tmp /bundle/rootfs/hp
ln /bin/busybox /bundle/rootfs/bin/busybox
/bin/busybox --install -s /bundle/rootfs/bin
i=0
while [ ! -e /dev/hvc0 ] || [ ! -e /sys/block/vda/dev ]; do
    i=$((i + 1))
    [ $i -gt 100 ] && break
    sleep 0.1
done
mkdir -p /run/agent
# A request still running after 30-60 s: what every process is doing goes
# to the serial console, which the test prints when it fails.
(
    last=
    while sleep 30; do
        now=$(cat /run/agent/busy 2>/dev/null)
        if [ -n "$now" ] && [ "$now" != idle ] && [ "$now" = "$last" ]; then
            log "request $now still running:"
            ps -o pid,ppid,stat,args
            for p in /proc/[0-9]*; do
                k=$(head -6 $p/stack 2>/dev/null | tr '\n' ' ')
                [ -n "$k" ] && echo "${p#/proc/} $(cat $p/comm 2>/dev/null): $k"
            done
        fi
        last=$now
    done
) > /dev/console 2>&1 < /dev/null &
n=0
# hvc0 resets its modes on last close: keep it open, raw (else "\n"
# arrives as "\r\n"), without echo.
exec 3<>/dev/hvc0
stty raw -echo <&3
log "serving"
echo "READY $(cat /sys/block/vda/dev)" >&3
while IFS= read -r req <&3; do
    [ "$req" = POWEROFF ] && break
    n=$((n + 1))
    echo $n > /run/agent/busy
    echo "$req" | base64 -d > /run/agent/req
    timeout -s KILL 200 sh /run/agent/req > /run/agent/out 2> /run/agent/err < /dev/null
    rc=$?
    echo idle > /run/agent/busy
    o=$(base64 -w0 /run/agent/out)
    e=$(base64 -w0 /run/agent/err)
    echo "DONE $rc ${o:--} ${e:--}" >&3
done
log "powering off"
sync
reboot -f
"#;

/// What one guest command printed and how it ended.
#[derive(Debug, Clone)]
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl std::fmt::Display for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}; stdout: {:?}; stderr: {:?}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// What a guest needs from the host, or why it cannot boot here.
pub struct Needs {
    pub qemu: PathBuf,
    pub kernel: PathBuf,
    pub release: String,
    pub busybox: PathBuf,
}

impl Needs {
    /// QEMU, Debian's cloud kernel with its modules, and busybox-static
    /// (`scripts/deps --test` installs them); `Err` names what is missing.
    pub fn find() -> Result<Needs, String> {
        let qemu = which(QEMU_BINARY).ok_or(format!("no {QEMU_BINARY} (qemu-system-x86)"))?;
        let (kernel, release) =
            cloud_kernel().ok_or("no /boot/vmlinuz-*-cloud-amd64 (linux-image-cloud-amd64)")?;
        if !Path::new("/lib/modules").join(&release).is_dir() {
            return Err(format!("no /lib/modules/{release}"));
        }
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .ok_or("no busybox (busybox-static)")?;
        Ok(Needs {
            qemu,
            kernel,
            release,
            busybox,
        })
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// Debian's cloud kernel (the newest installed) and its release.
fn cloud_kernel() -> Option<(PathBuf, String)> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/boot")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            n.starts_with("vmlinuz-") && n.ends_with("-cloud-amd64")
        })
        .collect();
    found.sort();
    let k = found.pop()?;
    let release = k
        .file_name()?
        .to_str()?
        .strip_prefix("vmlinuz-")?
        .to_string();
    Some((k, release))
}

/// A running guest serving commands. Dropping it kills QEMU.
pub struct Guest {
    vm: Option<QemuVm>,
    chan: BufReader<UnixStream>,
    serial: PathBuf,
    /// `major:minor` of the guest's /dev/vda.
    pub vda: String,
    /// Dropped to stop the watchdog.
    watchdog: Option<mpsc::Sender<()>>,
    /// Why the channel is no longer usable (a command that never
    /// answered): later commands fail at once with it.
    broken: Option<String>,
    /// How long the serial log was when the last command was sent.
    command_mark: usize,
    _dir: tempfile::TempDir,
}

impl Guest {
    /// Boots a guest with `moat` as /bin/moat and `files` (path in the
    /// guest, mode, contents) added, 1 GiB of RAM and 2 vCPUs, and waits
    /// for its command loop. `deadline` bounds the whole session.
    pub fn boot(
        needs: &Needs,
        moat: &Path,
        files: &[(&str, u32, Vec<u8>)],
        deadline: Duration,
    ) -> Result<Guest, String> {
        Self::boot_sized(needs, moat, files, deadline, 1024)
    }

    /// [`Guest::boot`] with `mem_mib` of RAM. A file's parent directories
    /// are made as needed.
    pub fn boot_sized(
        needs: &Needs,
        moat: &Path,
        files: &[(&str, u32, Vec<u8>)],
        deadline: Duration,
        mem_mib: u64,
    ) -> Result<Guest, String> {
        let mut failed = Vec::new();
        for attempt in 1..=BOOT_TRIES {
            match Self::boot_once(needs, moat, files, deadline, mem_mib) {
                Ok(g) => return Ok(g),
                Err(e) => {
                    eprintln!("guest: boot {attempt} of {BOOT_TRIES} failed: {e}");
                    failed.push(e);
                }
            }
        }
        Err(failed.join("\n--- and again ---\n"))
    }

    fn boot_once(
        needs: &Needs,
        moat: &Path,
        files: &[(&str, u32, Vec<u8>)],
        deadline: Duration,
        mem_mib: u64,
    ) -> Result<Guest, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
        let initrd = dir.path().join("initrd.cpio");
        write_initramfs(&initrd, needs, moat, files)?;
        let disk = dir.path().join("disk.img");
        let mut image = vec![0u8; 1 << 20];
        image[..16].copy_from_slice(DISK_MARKER);
        std::fs::write(&disk, image).map_err(|e| format!("{}: {e}", disk.display()))?;
        let serial = dir.path().join("serial.log");
        let serial_file =
            std::fs::File::create(&serial).map_err(|e| format!("{}: {e}", serial.display()))?;
        let (host, guest_side) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;

        let accel = detect_accel();
        eprintln!("guest: QEMU backend, {}", accel.reason);
        let mut config = VmConfig::new(Kernel::Linux(needs.kernel.clone()), 2, mem_mib);
        config.initrd = Some(initrd);
        config.cmdline = "console=ttyS0 panic=-1 quiet loglevel=4".into();
        config.serial_out = Some(serial_file);
        config.block.push(BlockConfig {
            path: disk,
            read_only: false,
            file: None,
        });
        config.agent = Some(guest_side);
        let vm = QemuVm::spawn(config, accel.accel, &needs.qemu).map_err(|e| e.to_string())?;
        let pid = vm.pid().ok_or("QEMU has no pid")?;
        let (stop, stopped) = mpsc::channel::<()>();
        std::thread::spawn(move || {
            if stopped.recv_timeout(deadline) == Err(mpsc::RecvTimeoutError::Timeout) {
                eprintln!("guest: watchdog: killing QEMU after {deadline:?}");
                // SIGKILL: QEMU exits 0 on SIGTERM, which reads as a clean end.
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        });
        let mut g = Guest {
            vm: Some(vm),
            chan: BufReader::new(host),
            serial,
            vda: String::new(),
            watchdog: Some(stop),
            broken: None,
            command_mark: 0,
            _dir: dir,
        };
        let ready = g
            .read_line(BOOT_LIMIT)
            .map_err(|e| format!("{e}\n--- guest serial console ---\n{}", g.serial_log()))?;
        g.vda = ready
            .strip_prefix("READY ")
            .ok_or_else(|| format!("guest said {ready:?} instead of READY"))?
            .trim()
            .to_string();
        Ok(g)
    }

    fn read_line(&mut self, limit: Duration) -> Result<String, String> {
        self.chan
            .get_ref()
            .set_read_timeout(Some(limit))
            .map_err(|e| format!("set_read_timeout: {e}"))?;
        let mut line = String::new();
        match self.chan.read_line(&mut line) {
            Ok(0) => Err("the guest closed its console (QEMU ended)".into()),
            Ok(_) => Ok(line.trim_end_matches('\n').to_string()),
            Err(e) => Err(format!("reading the guest's console: {e}")),
        }
    }

    /// Runs `script` with `sh` in the guest, as root.
    pub fn sh(&mut self, script: &str) -> Result<Out, String> {
        if let Some(why) = &self.broken {
            return Err(format!("not sent: an earlier command failed: {why}"));
        }
        let r = self.exchange(script);
        if let Err(e) = &r {
            self.broken = Some(e.clone());
        }
        r
    }

    fn exchange(&mut self, script: &str) -> Result<Out, String> {
        self.command_mark = self.serial_log().len();
        let mut req = base64_encode(script.as_bytes());
        req.push('\n');
        self.chan
            .get_mut()
            .write_all(req.as_bytes())
            .map_err(|e| format!("writing to the guest's console: {e}"))?;
        let line = self.read_line(COMMAND_LIMIT)?;
        let f: Vec<&str> = line.split(' ').collect();
        let ["DONE", code, out, err] = f[..] else {
            return Err(format!("unexpected answer from the guest: {line:?}"));
        };
        let text = |s: &str| -> Result<String, String> {
            if s == "-" {
                return Ok(String::new());
            }
            let b = base64_decode(s).ok_or_else(|| format!("bad base64 from the guest: {s:?}"))?;
            Ok(String::from_utf8_lossy(&b).into_owned())
        };
        Ok(Out {
            code: code
                .parse()
                .map_err(|_| format!("bad status from the guest: {code:?}"))?,
            stdout: text(out)?,
            stderr: text(err)?,
        })
    }

    /// Writes `contents` to `path` in the guest (its directory created).
    pub fn write_file(&mut self, path: &str, contents: &[u8]) -> Result<(), String> {
        let out = self.sh(&format!(
            "mkdir -p \"$(dirname {path})\" && echo {} | base64 -d > {path}",
            base64_encode(contents)
        ))?;
        if out.code != 0 {
            return Err(format!("cannot write {path} in the guest: {out}"));
        }
        Ok(())
    }

    /// The serial console so far (kernel messages, the init's own lines).
    pub fn serial_log(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// What the serial console printed since the last command was sent
    /// (the guest's own watchdog reports a command still running there).
    pub fn serial_since_last_command(&self) -> String {
        let log = self.serial_log();
        log.get(self.command_mark..).unwrap_or_default().to_string()
    }

    /// Asks the guest to power off and waits for QEMU to end; a guest
    /// that stopped answering is killed instead.
    pub fn power_off(mut self) -> Result<(), String> {
        if let Some(why) = self.broken.take() {
            return Err(format!("killed: {why}"));
        }
        self.chan
            .get_mut()
            .write_all(b"POWEROFF\n")
            .map_err(|e| format!("writing to the guest's console: {e}"))?;
        let vm = self.vm.take().ok_or("QEMU already gone")?;
        let ended = vm.wait().map_err(|e| e.to_string());
        self.watchdog.take();
        ended.map(|_| ())
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        // QemuVm's own drop kills and reaps QEMU.
        self.vm.take();
        self.watchdog.take();
    }
}

fn write_initramfs(
    path: &Path,
    needs: &Needs,
    moat: &Path,
    files: &[(&str, u32, Vec<u8>)],
) -> Result<(), String> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let file = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut w = CpioWriter::new(std::io::BufWriter::new(file));
    let cpio = |e: moat_vmm::cpio::CpioError| e.to_string();
    let fixed = [
        "bin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "run",
        "etc",
        "root",
        "home",
        "newroot",
        "lib",
        "lib/modules",
    ];
    for d in fixed {
        w.dir(d, 0o755).map_err(cpio)?;
    }
    let mut made: std::collections::BTreeSet<String> =
        fixed.iter().map(|d| d.to_string()).collect();
    w.char_device("dev/console", 0o600, 5, 1).map_err(cpio)?;
    w.file("init", 0o755, INIT.as_bytes()).map_err(cpio)?;
    w.file("stage2", 0o755, STAGE2.as_bytes()).map_err(cpio)?;
    w.file("bin/busybox", 0o755, &read(&needs.busybox)?)
        .map_err(cpio)?;
    w.file("bin/moat", 0o755, &stripped(moat, path)?)
        .map_err(cpio)?;
    let modules = Path::new("/lib/modules")
        .join(&needs.release)
        .join("kernel");
    for m in MODULES {
        let name = Path::new(m)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or(m);
        w.file(
            &format!("lib/modules/{name}"),
            0o644,
            &read(&modules.join(m))?,
        )
        .map_err(cpio)?;
    }
    for (name, mode, data) in files {
        let mut parent = String::new();
        for part in Path::new(name).parent().into_iter().flat_map(|p| p.iter()) {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(&part.to_string_lossy());
            if made.insert(parent.clone()) {
                w.dir(&parent, 0o755).map_err(cpio)?;
            }
        }
        w.file(name, *mode, data).map_err(cpio)?;
    }
    let mut out = w.finish().map_err(cpio)?;
    out.flush().map_err(|e| format!("{}: {e}", path.display()))
}

/// `binary` without its debug information when binutils' `strip` is there
/// (a debug moat is ~120 MB, ~25 MB stripped: the guest unpacks it, and a
/// rootless moat copies itself into a memfd on every run), else as is.
fn stripped(binary: &Path, next_to: &Path) -> Result<Vec<u8>, String> {
    let out = next_to.with_extension("moat");
    let status = std::process::Command::new("strip")
        .arg("-o")
        .arg(&out)
        .arg(binary)
        .status();
    let from = match status {
        Ok(s) if s.success() => &out,
        other => {
            eprintln!("guest: strip failed ({other:?}): the guest gets the unstripped binary");
            binary
        }
    };
    std::fs::read(from).map_err(|e| format!("{}: {e}", from.display()))
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

pub fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes() {
        if c == b'=' {
            break;
        }
        let v = B64.iter().position(|&b| b == c)? as u32;
        acc = ((acc << 6) | v) & 0xff_ffff;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}
