//! Helpers shared by the boot tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use moat_vmm::cpio::CpioWriter;

pub mod nested;

/// Guest modules, relative to /lib/modules/<release>/kernel, in load order
/// (and TUN/TAP, for the nested guest's TAP devices).
pub const MODULES: [&str; 11] = [
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_mmio.ko",
    "drivers/block/virtio_blk.ko",
    "drivers/char/virtio_console.ko",
    "drivers/char/hw_random/virtio-rng.ko",
    "drivers/virtio/virtio_balloon.ko",
    "net/core/failover.ko",
    "drivers/net/net_failover.ko",
    "drivers/net/virtio_net.ko",
    "drivers/net/tun.ko",
];

pub fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// Debian's cloud kernel and its release, if installed.
pub fn cloud_kernel() -> Option<(PathBuf, String)> {
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

/// An initramfs with busybox, `init` as /init and, given a kernel release,
/// the guest modules in /lib/modules.
pub fn initramfs(path: &Path, init: &str, release: Option<&str>, busybox: &Path) {
    let mut w = CpioWriter::new(std::fs::File::create(path).unwrap());
    for d in ["bin", "dev", "proc", "sys", "lib", "lib/modules"] {
        w.dir(d, 0o755).unwrap();
    }
    w.char_device("dev/console", 0o600, 5, 1).unwrap();
    w.file("bin/busybox", 0o755, &std::fs::read(busybox).unwrap())
        .unwrap();
    w.file("init", 0o755, init.as_bytes()).unwrap();
    for m in release.map_or(&[][..], |_| &MODULES[..]) {
        let release = release.unwrap_or_default();
        let src = Path::new("/lib/modules")
            .join(release)
            .join("kernel")
            .join(m);
        let name = Path::new(m).file_name().unwrap().to_str().unwrap();
        w.file(
            &format!("lib/modules/{name}"),
            0o644,
            &std::fs::read(&src).unwrap(),
        )
        .unwrap();
    }
    w.finish().unwrap();
}
