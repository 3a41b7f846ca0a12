//! What a guest boots: the kernel (Debian's cloud kernel, or
//! `MOAT_GUEST_KERNEL`), and the initramfs moat builds from its own binary
//! (the agent, `/moat`) and the kernel's virtio modules, cached under the
//! state root's `.cache/microvm/` keyed by the moat binary, the kernel and
//! the modules.
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use moat_vmm::cpio::CpioWriter;
use sha2::{Digest, Sha256};

use crate::agent::boot::initramfs_modules;
use crate::MicrovmError;

/// Where each module lives under `/lib/modules/<release>/kernel`.
pub const MODULE_PATHS: &[(&str, &str)] = &[
    ("virtio_ring", "drivers/virtio/virtio_ring.ko"),
    ("virtio", "drivers/virtio/virtio.ko"),
    ("virtio_mmio", "drivers/virtio/virtio_mmio.ko"),
    ("virtio_console", "drivers/char/virtio_console.ko"),
    ("virtio-rng", "drivers/char/hw_random/virtio-rng.ko"),
    ("virtio_balloon", "drivers/virtio/virtio_balloon.ko"),
    ("virtio_blk", "drivers/block/virtio_blk.ko"),
    ("overlay", "fs/overlayfs/overlay.ko"),
    (
        "virtio_pci_modern_dev",
        "drivers/virtio/virtio_pci_modern_dev.ko",
    ),
    (
        "virtio_pci_legacy_dev",
        "drivers/virtio/virtio_pci_legacy_dev.ko",
    ),
    ("virtio_pci", "drivers/virtio/virtio_pci.ko"),
    ("fuse", "fs/fuse/fuse.ko"),
    ("virtiofs", "fs/fuse/virtiofs.ko"),
    ("failover", "net/core/failover.ko"),
    ("net_failover", "drivers/net/net_failover.ko"),
    ("virtio_net", "drivers/net/virtio_net.ko"),
    ("loop", "drivers/block/loop.ko"),
];

/// A guest kernel and its modules.
#[derive(Debug, Clone)]
pub struct GuestKernel {
    pub image: PathBuf,
    pub release: String,
    /// `/lib/modules/<release>` (or `MOAT_GUEST_MODULES`).
    pub modules: PathBuf,
}

impl GuestKernel {
    /// The kernel the tier boots: `MOAT_GUEST_KERNEL` (with
    /// `MOAT_GUEST_MODULES`), else the newest `/boot/vmlinuz-*-cloud-amd64`.
    /// The error says what is missing.
    pub fn find() -> Result<GuestKernel, String> {
        let image = match std::env::var_os("MOAT_GUEST_KERNEL") {
            Some(p) => PathBuf::from(p),
            None => moat_jail::host::newest_cloud_kernel().ok_or_else(|| {
                "no guest kernel (/boot/vmlinuz-*-cloud-amd64; install linux-image-cloud-amd64 or set MOAT_GUEST_KERNEL)".to_string()
            })?,
        };
        if !image.is_file() {
            return Err(format!("guest kernel {} is missing", image.display()));
        }
        let release = image
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("vmlinuz-"))
            .unwrap_or_default()
            .to_string();
        let modules = match std::env::var_os("MOAT_GUEST_MODULES") {
            Some(p) => PathBuf::from(p),
            None => Path::new("/lib/modules").join(&release),
        };
        for (name, rel) in MODULE_PATHS {
            let p = modules.join("kernel").join(rel);
            if !p.is_file() {
                return Err(format!(
                    "the guest kernel's module {name} is missing ({})",
                    p.display()
                ));
            }
        }
        Ok(GuestKernel {
            image,
            release,
            modules,
        })
    }

    fn module_path(&self, name: &str) -> PathBuf {
        let rel = MODULE_PATHS
            .iter()
            .find(|(n, _)| *n == name)
            .map_or("", |(_, r)| r);
        self.modules.join("kernel").join(rel)
    }

    /// Whether the kernel's config (`/boot/config-<release>`) enables
    /// `option`: the built-in VMM needs virtio-mmio devices on the command
    /// line and an MP table parser, having no ACPI.
    pub fn has_config(&self, option: &str) -> bool {
        let cfg = self
            .image
            .with_file_name(format!("config-{}", self.release));
        std::fs::read_to_string(cfg)
            .map(|t| t.lines().any(|l| l == format!("{option}=y")))
            .unwrap_or(false)
    }
}

/// The name part of a cache entry: the first 12 bytes of `h`, in hex.
pub(crate) fn short_key(h: Sha256) -> String {
    crate::disk::hex(&h.finalize()[..12])
}

/// Hashes what identifies file `p`: its path, size, mtime and inode.
pub(crate) fn stat_key(h: &mut Sha256, p: &Path) -> Result<(), MicrovmError> {
    let m = std::fs::metadata(p).map_err(MicrovmError::io(format!("stat {}", p.display())))?;
    h.update(p.as_os_str().as_encoded_bytes());
    h.update([0]);
    h.update(m.size().to_le_bytes());
    h.update(m.mtime().to_le_bytes());
    h.update(m.mtime_nsec().to_le_bytes());
    h.update(m.ino().to_le_bytes());
    Ok(())
}

/// What identifies this moat binary: the protected copy's name (which
/// encodes the original's device, inode, size and mtime), else its bytes.
fn moat_key(h: &mut Sha256) -> Result<(), MicrovmError> {
    let link = std::fs::read_link("/proc/self/exe").unwrap_or_default();
    if link.starts_with(moat_jail::selfexe::EXE_CACHE) {
        h.update(link.as_os_str().as_encoded_bytes());
        return Ok(());
    }
    let bytes =
        std::fs::read("/proc/self/exe").map_err(MicrovmError::io("read the moat binary"))?;
    h.update(&bytes);
    Ok(())
}

/// The cached initramfs for `kernel` (built now if missing): `/moat` (this
/// binary, the agent), the modules the agent loads, `/dev/console`.
pub fn initramfs(cache: &Path, kernel: &GuestKernel) -> Result<PathBuf, MicrovmError> {
    let mut h = Sha256::new();
    h.update(b"moat-initramfs-2");
    moat_key(&mut h)?;
    stat_key(&mut h, &kernel.image)?;
    for name in initramfs_modules() {
        stat_key(&mut h, &kernel.module_path(name))?;
    }
    let key = short_key(h);
    let path = cache.join(format!("initramfs-{key}.cpio"));
    if path.is_file() {
        return Ok(path);
    }
    crate::disk::ensure_dir(cache)?;
    let tmp = cache.join(format!(".initramfs-{key}.{}.tmp", std::process::id()));
    let r = write_initramfs(&tmp, kernel).and_then(|()| {
        std::fs::rename(&tmp, &path).map_err(MicrovmError::io(format!("rename {}", path.display())))
    });
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r?;
    remove_others(cache, &path, "initramfs-", ".cpio");
    Ok(path)
}

/// What QEMU boots for `kernel`: the ELF vmlinux inside its bzImage,
/// decompressed once into `cache` (`vmlinux-<key>`, keyed by the bzImage's
/// path, size, mtime and inode), where it has a PVH entry point; else the
/// bzImage itself, with the reason in the debug log. Booting the vmlinux
/// skips the bzImage's decompressor, the slow part of a boot under TCG
/// (`moat_vmm::kernel_image`).
pub fn boot_image(cache: &Path, kernel: &GuestKernel) -> Result<PathBuf, MicrovmError> {
    let mut h = Sha256::new();
    h.update(b"moat-vmlinux-1");
    stat_key(&mut h, &kernel.image)?;
    let key = short_key(h);
    let path = cache.join(format!("vmlinux-{key}"));
    if path.is_file() {
        return Ok(path);
    }
    let image = std::fs::read(&kernel.image)
        .map_err(MicrovmError::io(format!("read {}", kernel.image.display())))?;
    if moat_vmm::kernel_image::is_elf(&image) {
        return Ok(kernel.image.clone());
    }
    let elf = match moat_vmm::kernel_image::pvh_vmlinux(&image) {
        Ok(elf) => elf,
        Err(e) => {
            tracing::debug!(
                "microvm: booting the bzImage {}: {e}",
                kernel.image.display()
            );
            return Ok(kernel.image.clone());
        }
    };
    crate::disk::ensure_dir(cache)?;
    let tmp = cache.join(format!(".vmlinux-{key}.{}.tmp", std::process::id()));
    let r = std::fs::write(&tmp, &elf)
        .map_err(MicrovmError::io(format!("write {}", tmp.display())))
        .and_then(|()| {
            std::fs::rename(&tmp, &path)
                .map_err(MicrovmError::io(format!("rename {}", path.display())))
        });
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r?;
    remove_others(cache, &path, "vmlinux-", "");
    Ok(path)
}

/// Removes the files named `<prefix>…<suffix>` other than `keep` from
/// `cache`: initramfs images built for another moat binary or kernel, and
/// vmlinux files of another kernel (a new one is made only when the key
/// changed), which nothing asks for again unless that binary or kernel
/// runs again (then it is rebuilt, in about a second). A guest still
/// running on one keeps it open until it ends.
fn remove_others(cache: &Path, keep: &Path, prefix: &str, suffix: &str) {
    let Ok(rd) = std::fs::read_dir(cache) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        let name = e.file_name();
        let name = name.to_string_lossy();
        if p != keep && name.starts_with(prefix) && name.ends_with(suffix) {
            match std::fs::remove_file(&p) {
                Ok(()) => tracing::debug!("microvm: removed the stale {}", p.display()),
                Err(e) => tracing::debug!("microvm: cannot remove {}: {e}", p.display()),
            }
        }
    }
}

/// This moat binary's bytes, without debug information when binutils'
/// `strip` is there (a debug build is ten times the size of a release one,
/// and the guest unpacks it into its memory).
fn moat_bytes(tmp: &Path) -> Result<Vec<u8>, MicrovmError> {
    let bytes =
        std::fs::read("/proc/self/exe").map_err(MicrovmError::io("read the moat binary"))?;
    // A copy of our own binary (`/proc/self/exe` would name strip's).
    let copy = tmp.with_extension("moat");
    let stripped = std::fs::write(&copy, &bytes).is_ok()
        && std::process::Command::new("strip")
            .arg("--strip-debug")
            .arg(&copy)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    let out = if stripped {
        std::fs::read(&copy).unwrap_or(bytes)
    } else {
        bytes
    };
    let _ = std::fs::remove_file(&copy);
    Ok(out)
}

fn write_initramfs(path: &Path, kernel: &GuestKernel) -> Result<(), MicrovmError> {
    write_agent_initramfs(path, kernel, &moat_bytes(path)?)
}

/// Writes at `path` the initramfs whose `/moat` (the agent) is `moat`, a
/// moat binary's bytes, with `kernel`'s modules the agent loads. The tier
/// uses its own binary ([`initramfs`]); tests use the binary they test.
pub fn write_agent_initramfs(
    path: &Path,
    kernel: &GuestKernel,
    moat: &[u8],
) -> Result<(), MicrovmError> {
    let file = std::fs::File::create(path)
        .map_err(MicrovmError::io(format!("create {}", path.display())))?;
    let mut w = CpioWriter::new(std::io::BufWriter::new(file));
    for d in ["dev", "proc", "sys", "run", "tmp", "lib", "lib/modules"] {
        w.dir(d, 0o755)?;
    }
    w.char_device("dev/console", 0o600, 5, 1)?;
    w.file("moat", 0o755, moat)?;
    for name in initramfs_modules() {
        let src = kernel.module_path(name);
        let data =
            std::fs::read(&src).map_err(MicrovmError::io(format!("read {}", src.display())))?;
        w.file(&format!("lib/modules/{name}.ko"), 0o644, &data)?;
    }
    let mut out = w.finish()?;
    out.flush()
        .map_err(MicrovmError::io(format!("write {}", path.display())))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_initramfs_replaces_the_others_only() {
        let dir = tempfile::tempdir().unwrap();
        let keep = dir.path().join("initramfs-new.cpio");
        for name in [
            "initramfs-new.cpio",
            "initramfs-old.cpio",
            "initramfs-older.cpio",
            "disk-x.ext4",
            "spare.img",
        ] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        remove_others(dir.path(), &keep, "initramfs-", ".cpio");
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["disk-x.ext4", "initramfs-new.cpio", "spare.img"]);
    }
}
