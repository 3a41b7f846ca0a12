//! Snapshots of a booted guest, the fast start: the first cold boot of a
//! kernel and configuration saves its guest right after the agent's hello
//! (QEMU's migration stream, `stop` + `migrate` to a file the runtime
//! made), and every later run restores it (`-incoming fd:`) instead of
//! booting. The guest in the snapshot has loaded only the modules every
//! guest needs (not `virtio_blk`), so the restored guest probes this run's
//! disks when its agent gets `Run`; the agent then reseeds the guest's
//! random generator with the host's bytes and sets its clock
//! ([`crate::proto::RunRequest`]).
//!
//! Both backends: QEMU's migration stream, or moat's own VMM's snapshot
//! (`moat_vmm::snapshot`, asked for over the VMM child's control socket
//! and restored by `moat_vmm::Vm::restore`, guest memory mapped
//! copy-on-write from the file).
//!
//! A snapshot is valid for exactly what it was saved with, all of which is
//! in its name: a digest of QEMU (path, size, mtime, inode: the migration
//! format is QEMU's; moat's own VMM's format is the moat binary's, which
//! the initramfs's name digests), the guest kernel, the initramfs (whose name is a
//! digest of the moat binary, the kernel and its modules), the kernel's
//! command line, the guest's memory, vCPUs, disk slots, accelerator, and
//! whether the VM has a network device and which (a networked guest's
//! snapshot is a configuration of its own; one whose device's back end
//! takes offloads is another: its guest negotiated them).
//! Anything else finds no snapshot and boots cold (and saves one). A
//! snapshot that fails to restore (corrupt, truncated, or a guest that
//! does not answer) is removed, and that run boots cold.
//!
//! `MOAT_MICROVM_SNAPSHOT=0` turns snapshots off (cold boots, nothing
//! saved).
use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::assets::stat_key;
use crate::disk::hex;

use crate::control::StartKind;
use crate::MicrovmError;

/// What a snapshot must match.
#[derive(Debug, Clone)]
pub struct Identity<'a> {
    /// QEMU, whose migration stream the snapshot is; `None` for moat's own
    /// VMM, whose format is this moat binary's (which `initrd`'s name
    /// digests).
    pub vmm: Option<&'a Path>,
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub cmdline: &'a str,
    pub mem_mib: u64,
    pub vcpus: u8,
    pub disk_slots: usize,
    pub accel: &'a str,
    /// The VM's virtio-net device, if any (a different device set).
    pub net: Option<NetDevice>,
    /// The VM has the PCIe ports its read-write volumes are hot-added on
    /// after the restore (QEMU: `VmmPlan::share_port`), and its RAM is the
    /// file such devices share.
    pub share_port: bool,
    /// A primed snapshot: the guest has these disks mounted, backed by
    /// these images (every slot, spares included). Only runs with the same
    /// disks and images restore it.
    pub disks: Option<(&'a [crate::proto::GuestDisk], &'a [PathBuf])>,
}

/// Which virtio-net device a VM has, as far as its snapshot can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetDevice {
    /// Its back end passes bare frames (moat's stack over a stream): the
    /// device offers no offloads.
    Frames,
    /// Its back end takes a virtio-net header with each frame (a TAP
    /// opened with `IFF_VNET_HDR`, under either backend): the device
    /// offers checksum and segmentation offloads, and the guest negotiated
    /// them. Neither backend restores those features onto a back end
    /// without the header (QEMU refuses; moat's own VMM does not offer
    /// them there), so such a guest is saved and restored apart.
    Offloads,
}

/// How many primed snapshots the cache keeps (one per set of images:
/// the embedded default's, each image's); the least recently used go,
/// unless used within [`PRIMED_GRACE`].
pub const PRIMED_KEPT: usize = 4;
/// A snapshot used (restored or saved) this recently is kept whatever
/// the count: another run may be about to restore it.
pub const PRIMED_GRACE: std::time::Duration = std::time::Duration::from_secs(600);
/// How many plain snapshots the cache keeps (one per configuration: a
/// guest's memory, vCPUs, devices); the least recently used go, unless
/// used within [`PRIMED_GRACE`]. Each configuration's older ones go as
/// soon as it saves anew, but a configuration no run asks for any more
/// (another memory size, a moat or kernel since replaced) kept its
/// snapshot, 100–150 MB on disk, for ever.
pub const PLAIN_KEPT: usize = 8;

impl Identity<'_> {
    /// The configuration part of the name (one snapshot is kept per
    /// configuration: saving a new one removes the others of it).
    fn config_key(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"moat-snapshot-config-1\0");
        h.update(self.cmdline.as_bytes());
        h.update([0]);
        h.update(self.mem_mib.to_le_bytes());
        h.update([self.vcpus]);
        h.update((self.disk_slots as u64).to_le_bytes());
        h.update(self.accel.as_bytes());
        match self.net {
            None => {}
            Some(NetDevice::Frames) => h.update(b"\0net"),
            Some(NetDevice::Offloads) => h.update(b"\0net-offloads"),
        }
        if self.share_port {
            h.update(b"\0share-ports");
            h.update((crate::vmm::qemu::SHARE_PORTS as u64).to_le_bytes());
        }
        if let Some((disks, _)) = self.disks {
            h.update(b"\0primed");
            for d in disks {
                h.update(d.uuid.as_bytes());
                h.update([0]);
                h.update(d.mount.as_bytes());
                h.update([0]);
            }
        }
        let key = hex(&h.finalize()[..8]);
        if self.disks.is_some() {
            format!("p{key}")
        } else {
            key
        }
    }

    /// The files part: QEMU, the kernel, the initramfs.
    fn files_key(&self) -> Result<String, MicrovmError> {
        let mut h = Sha256::new();
        h.update(b"moat-snapshot-files-1\0");
        if let Some(qemu) = self.vmm {
            stat_key(&mut h, qemu)?;
        }
        stat_key(&mut h, self.kernel)?;
        stat_key(&mut h, self.initrd)?;
        for image in self.disks.map_or(&[][..], |(_, images)| images) {
            stat_key(&mut h, image)?;
        }
        Ok(hex(&h.finalize()[..12]))
    }

    /// The snapshot's path in `cache`.
    pub fn path(&self, cache: &Path) -> Result<PathBuf, MicrovmError> {
        Ok(cache.join(format!(
            "snapshot-{}-{}.vmstate",
            self.config_key(),
            self.files_key()?
        )))
    }
}

/// What the runtime offers the VMM process.
#[derive(Debug)]
pub enum Offer {
    /// Snapshots are off, or the cache cannot hold one: boot cold.
    None { why: String },
    /// Restore this snapshot (opened read-only).
    Restore { file: File, path: PathBuf },
    /// Boot cold and save the guest into `file` (a temporary file next to
    /// `path`, renamed to it once the VMM process says it saved).
    Save {
        file: File,
        tmp: PathBuf,
        path: PathBuf,
    },
}

/// Whether snapshots are on (`MOAT_MICROVM_SNAPSHOT=0` turns them off).
pub fn enabled() -> bool {
    !matches!(
        std::env::var("MOAT_MICROVM_SNAPSHOT").as_deref(),
        Ok("0" | "off" | "no" | "false")
    )
}

/// The snapshot to restore, or a file to save one into.
pub fn offer(cache: &Path, id: &Identity<'_>) -> Offer {
    if !enabled() {
        return Offer::None {
            why: "snapshots are off (MOAT_MICROVM_SNAPSHOT=0)".into(),
        };
    }
    let path = match id.path(cache) {
        Ok(p) => p,
        Err(e) => {
            return Offer::None {
                why: moat_core::error_chain(&e),
            }
        }
    };
    if let Ok(file) = File::open(&path) {
        return Offer::Restore { file, path };
    }
    let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
    {
        Ok(file) => Offer::Save { file, tmp, path },
        Err(e) => Offer::None {
            why: format!("cannot create {}: {e}", tmp.display()),
        },
    }
}

/// Keeps the cache right after the VMM process said how the guest
/// started: a saved snapshot is put in place (and the configuration's
/// older ones removed), a snapshot that failed to restore is removed, a
/// failed save leaves nothing. Logs how the guest started.
pub fn settle(offer: Offer, start: Option<&StartKind>) {
    match (offer, start) {
        (Offer::Restore { file, path }, Some(StartKind::Restored)) => {
            // Its time of last use, for pruning the primed ones.
            let _ = file.set_modified(std::time::SystemTime::now());
            tracing::debug!("microvm: restored from snapshot {}", path.display());
        }
        (
            Offer::Restore { path, .. },
            Some(StartKind::Cold {
                why,
                restore_failed,
            }),
        ) => {
            tracing::debug!("microvm: cold boot: {why}");
            if *restore_failed {
                let _ = std::fs::remove_file(&path);
                tracing::debug!("microvm: removed snapshot {}", path.display());
            }
        }
        (Offer::Save { tmp, path, .. }, Some(StartKind::Saved)) => {
            prune_config(&path);
            prune_lru(&path, true, PRIMED_KEPT);
            prune_lru(&path, false, PLAIN_KEPT);
            match std::fs::rename(&tmp, &path) {
                Ok(()) => tracing::debug!(
                    "microvm: cold boot (no snapshot yet); saved snapshot {}",
                    path.display()
                ),
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    tracing::debug!("microvm: cannot keep snapshot {}: {e}", path.display());
                }
            }
        }
        (Offer::Save { tmp, .. }, other) => {
            let _ = std::fs::remove_file(&tmp);
            if let Some(StartKind::Cold { why, .. }) = other {
                tracing::debug!("microvm: cold boot (no snapshot yet); not saved: {why}");
            }
        }
        (Offer::None { why }, _) => tracing::debug!("microvm: cold boot: {why}"),
        (Offer::Restore { .. }, _) => {}
    }
}

/// The end of a snapshot that carries the guest's RAM itself (a guest
/// with a share port: QEMU saves its devices only, `x-ignore-shared`):
/// this magic, the RAM image's offset and its length, little-endian.
const RAM_MAGIC: &[u8; 8] = b"MOATRAM1";
const RAM_TRAILER: u64 = 24;
/// The RAM image starts at a multiple of this after QEMU's stream.
const RAM_ALIGN: u64 = 1 << 20;
/// Copied this much at a time; a piece of [`RAM_PIECE`] bytes of zeros is
/// left a hole.
const RAM_CHUNK: usize = 1 << 20;
const RAM_PIECE: usize = 64 << 10;

fn ram_error(m: impl Into<String>) -> std::io::Error {
    std::io::Error::other(m.into())
}

/// The data ranges of `f` within `[from, to)` (`SEEK_DATA`/`SEEK_HOLE`),
/// calling `each(start, end)`; leaves `f`'s offset at 0.
fn data_ranges(
    f: &File,
    from: u64,
    to: u64,
    mut each: impl FnMut(u64, u64) -> std::io::Result<()>,
) -> std::io::Result<()> {
    use nix::unistd::{lseek, Whence};
    let off = |v: u64| i64::try_from(v).map_err(|_| ram_error("offset out of range"));
    let mut pos = from;
    let r = (|| {
        while pos < to {
            let data = match lseek(f, off(pos)?, Whence::SeekData) {
                Ok(d) => d as u64,
                Err(nix::Error::ENXIO) => break,
                Err(e) => return Err(e.into()),
            };
            if data >= to {
                break;
            }
            let hole = (lseek(f, off(data)?, Whence::SeekHole)? as u64).min(to);
            each(data, hole)?;
            pos = hole;
        }
        Ok(())
    })();
    // QEMU reads its stream from the descriptor's offset.
    lseek(f, 0, Whence::SeekSet)?;
    r
}

/// Copies `[from, to)` of `src` to `dst` at `from - shift`, leaving
/// pieces of zeros out (holes in `dst`).
fn copy_sparse(src: &File, dst: &File, from: u64, to: u64, shift: i64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; RAM_CHUNK];
    data_ranges(src, from, to, |start, end| {
        let mut p = start;
        while p < end {
            let n = usize::try_from((end - p).min(RAM_CHUNK as u64)).unwrap_or(RAM_CHUNK);
            src.read_exact_at(&mut buf[..n], p)?;
            for (i, piece) in buf[..n].chunks(RAM_PIECE).enumerate() {
                if piece.iter().any(|b| *b != 0) {
                    let at = (p + (i * RAM_PIECE) as u64).checked_add_signed(shift);
                    dst.write_all_at(piece, at.ok_or_else(|| ram_error("offset out of range"))?)?;
                }
            }
            p += n as u64;
        }
        Ok(())
    })
}

/// Appends the guest's RAM (`ram`, `len` bytes) to the snapshot `out`
/// once QEMU wrote its stream there (the guest stopped), sparse, with
/// the trailer [`load_ram`] reads.
pub fn append_ram(out: &File, ram: &File, len: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let stream = out.metadata()?.len();
    let at = stream.div_ceil(RAM_ALIGN) * RAM_ALIGN;
    copy_sparse(ram, out, 0, len, at as i64)?;
    out.set_len(at + len)?;
    let mut t = Vec::with_capacity(RAM_TRAILER as usize);
    t.extend_from_slice(RAM_MAGIC);
    t.extend_from_slice(&at.to_le_bytes());
    t.extend_from_slice(&len.to_le_bytes());
    out.write_all_at(&t, at + len)
}

/// Fills the guest's RAM (`ram`, `len` bytes, empty) from a snapshot
/// [`append_ram`] wrote; leaves `snap`'s offset at 0, where QEMU's stream
/// starts. A snapshot without that trailer, or with another RAM size, is
/// refused (the run boots cold).
pub fn load_ram(snap: &File, ram: &File, len: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let size = snap.metadata()?.len();
    if size < RAM_TRAILER {
        return Err(ram_error("the snapshot has no RAM image"));
    }
    let mut t = [0u8; RAM_TRAILER as usize];
    snap.read_exact_at(&mut t, size - RAM_TRAILER)?;
    let word = |i: usize| u64::from_le_bytes(t[i..i + 8].try_into().unwrap_or([0; 8]));
    let (at, saved) = (word(8), word(16));
    if &t[..8] != RAM_MAGIC || saved != len || at.checked_add(len) != Some(size - RAM_TRAILER) {
        return Err(ram_error(
            "the snapshot's RAM image does not fit this guest",
        ));
    }
    ram.set_len(len)?;
    copy_sparse(snap, ram, at, at + len, -(at as i64))
}

/// Removes the other snapshots of `path`'s configuration (made with an
/// older kernel, initramfs or QEMU: they can never be restored again).
fn prune_config(path: &Path) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return;
    };
    // snapshot-<config>-<files>.vmstate
    let Some(prefix) = name.rsplit_once('-').map(|(p, _)| format!("{p}-")) else {
        return;
    };
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let n = e.file_name();
        let Some(n) = n.to_str() else { continue };
        if n != name && n.starts_with(&prefix) && n.ends_with(".vmstate") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Whether the snapshot file `name` is a primed one (`snapshot-p…`; a
/// plain one's configuration key is hexadecimal).
fn is_primed(name: &str) -> bool {
    name.starts_with("snapshot-p")
}

/// Keeps, of the primed snapshots beside `path` (`primed`) or of the
/// plain ones, the `kept` most recently used — `path`, just saved, one of
/// them when it is of that kind — and those used within
/// [`PRIMED_GRACE`], removing the others.
fn prune_lru(path: &Path, primed: bool, kept: usize) {
    let since = std::time::SystemTime::now() - PRIMED_GRACE;
    let Some(dir) = path.parent() else { return };
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let own = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| is_primed(n) == primed);
    let keep = kept.saturating_sub(usize::from(own));
    let mut kind: Vec<(std::time::SystemTime, PathBuf)> = rd
        .flatten()
        .filter(|e| {
            e.file_name().to_str().is_some_and(|n| {
                n.starts_with("snapshot-") && n.ends_with(".vmstate") && is_primed(n) == primed
            })
        })
        .filter(|e| e.path() != path)
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    kind.sort_by_key(|p| std::cmp::Reverse(p.0));
    for (_, p) in kind.into_iter().skip(keep).filter(|(t, _)| *t < since) {
        let _ = std::fs::remove_file(&p);
        tracing::debug!(
            "microvm: removed the least recently used snapshot {}",
            p.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ident<'a>(dir: &'a Path, cmdline: &'a str, mem: u64) -> Identity<'a> {
        Identity {
            vmm: Some(dir),
            kernel: dir,
            initrd: dir,
            cmdline,
            mem_mib: mem,
            vcpus: 1,
            disk_slots: 6,
            accel: "tcg",
            net: None,
            share_port: false,
            disks: None,
        }
    }

    #[test]
    fn a_guests_ram_goes_after_qemus_stream_and_comes_back_sparse() {
        use std::os::unix::fs::{FileExt, MetadataExt};
        let d = tempfile::tempdir().unwrap();
        let open = |n: &str| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(d.path().join(n))
                .unwrap()
        };
        let len = 8u64 << 20;
        // The guest's RAM: a few pages written, a written page of zeros,
        // the rest never touched.
        let ram = open("ram");
        ram.set_len(len).unwrap();
        ram.write_all_at(b"first", 0).unwrap();
        ram.write_all_at(&[0u8; 4096], 1 << 20).unwrap();
        ram.write_all_at(b"last", len - 4).unwrap();
        ram.write_all_at(&[7u8; 100_000], 3 << 20).unwrap();
        // QEMU's stream, then the RAM.
        let snap = open("snap");
        snap.write_all_at(b"QEVM stream", 0).unwrap();
        append_ram(&snap, &ram, len).unwrap();
        let m = snap.metadata().unwrap();
        assert_eq!(m.len(), RAM_ALIGN + len + RAM_TRAILER);
        assert!(m.blocks() * 512 < 2 << 20, "sparse: {} blocks", m.blocks());
        let back = open("back");
        // Its offset moved, as a restore's descriptor's may have.
        nix::unistd::lseek(&snap, 5, nix::unistd::Whence::SeekSet).unwrap();
        load_ram(&snap, &back, len).unwrap();
        assert_eq!(
            nix::unistd::lseek(&snap, 0, nix::unistd::Whence::SeekCur).unwrap(),
            0,
            "QEMU reads its stream from the start"
        );
        assert_eq!(
            std::fs::read(d.path().join("back")).unwrap(),
            std::fs::read(d.path().join("ram")).unwrap()
        );
        assert!(back.metadata().unwrap().blocks() * 512 < 2 << 20);
        // Another guest size, or no RAM image at all: refused.
        assert!(load_ram(&snap, &open("other"), len * 2).is_err());
        let plain = open("plain");
        plain.write_all_at(&[1u8; 4096], 0).unwrap();
        assert!(load_ram(&plain, &open("other2"), len).is_err());
    }

    #[test]
    fn the_name_follows_what_the_snapshot_holds() {
        let d = tempfile::tempdir().unwrap();
        let a = ident(d.path(), "x", 100).path(d.path()).unwrap();
        assert_eq!(a, ident(d.path(), "x", 100).path(d.path()).unwrap());
        assert_ne!(a, ident(d.path(), "y", 100).path(d.path()).unwrap());
        assert_ne!(a, ident(d.path(), "x", 200).path(d.path()).unwrap());
        // A VM with the network device is a configuration of its own: its
        // snapshot neither replaces nor is replaced by the other's.
        let net = |dev| {
            Identity {
                net: Some(dev),
                ..ident(d.path(), "x", 100)
            }
            .path(d.path())
            .unwrap()
        };
        let n = net(NetDevice::Frames);
        assert_ne!(a, n);
        let config = |p: &Path| p.file_name().unwrap().to_str().unwrap()[..25].to_owned();
        assert_ne!(config(&a), config(&n));
        // Nor does one whose guest negotiated offloads.
        let o = net(NetDevice::Offloads);
        assert_ne!(config(&o), config(&n));
        assert_ne!(config(&o), config(&a));
        // And one with a share port (its devices and memory differ).
        let s = Identity {
            share_port: true,
            ..ident(d.path(), "x", 100)
        }
        .path(d.path())
        .unwrap();
        assert_ne!(config(&s), config(&a));
        // A changed file (here: the directory standing in for all three)
        // changes the name.
        std::fs::write(d.path().join("f"), b"x").unwrap();
        assert_ne!(a, ident(d.path(), "x", 100).path(d.path()).unwrap());
    }

    #[test]
    fn a_primed_snapshot_is_named_by_its_disks_and_images() {
        let d = tempfile::tempdir().unwrap();
        let disk = |uuid: &str| crate::proto::GuestDisk {
            uuid: uuid.into(),
            mount: "/run/vm/disk/0".into(),
        };
        let (img1, img2) = (d.path().join("1.ext4"), d.path().join("2.ext4"));
        std::fs::write(&img1, b"1").unwrap();
        std::fs::write(&img2, b"2").unwrap();
        let (a, b) = ([disk("aa")], [disk("bb")]);
        let (i1, i2) = ([img1.clone()], [img2.clone()]);
        let name = |disks: Option<(&[crate::proto::GuestDisk], &[PathBuf])>| {
            Identity {
                disks,
                ..ident(d.path(), "x", 100)
            }
            .path(d.path())
            .unwrap()
        };
        let plain = name(None);
        let primed = name(Some((&a, &i1)));
        assert_ne!(plain, primed);
        assert!(primed
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("snapshot-p"));
        assert_eq!(primed, name(Some((&a, &i1))));
        assert_ne!(primed, name(Some((&b, &i1))), "other disks");
        assert_ne!(primed, name(Some((&a, &i2))), "other images");
        // A rebuilt image (new contents) is another snapshot.
        std::fs::write(&img1, b"rebuilt").unwrap();
        assert_ne!(primed, name(Some((&a, &i1))));
    }

    #[test]
    fn the_least_recently_used_snapshots_go_primed_and_plain_apart() {
        let d = tempfile::tempdir().unwrap();
        let t0 = std::time::SystemTime::now() - std::time::Duration::from_secs(86_400);
        let mut all = Vec::new();
        for i in 0..6u64 {
            let p = d.path().join(format!("snapshot-p{i:016x}-f.vmstate"));
            let f = File::create(&p).unwrap();
            f.set_modified(t0 + std::time::Duration::from_secs(i))
                .unwrap();
            all.push(p);
        }
        let unprimed = d.path().join("snapshot-0000000000000000-f.vmstate");
        std::fs::write(&unprimed, b"").unwrap();
        // The oldest but one was just used.
        File::open(&all[1])
            .unwrap()
            .set_modified(std::time::SystemTime::now())
            .unwrap();
        let new = d.path().join("snapshot-pnew-f.vmstate");
        std::fs::write(&new, b"").unwrap();
        prune_lru(&new, true, PRIMED_KEPT);
        let left: Vec<bool> = all.iter().map(|p| p.exists()).collect();
        assert_eq!(left, [false, true, false, false, true, true]);
        assert!(new.exists() && unprimed.exists());
        // Beyond the count, one used within the grace period stays.
        let recent = d.path().join("snapshot-precent-f.vmstate");
        std::fs::write(&recent, b"").unwrap();
        File::open(&all[4])
            .unwrap()
            .set_modified(std::time::SystemTime::now())
            .unwrap();
        prune_lru(&new, true, 2);
        let left: Vec<bool> = all.iter().map(|p| p.exists()).collect();
        assert_eq!(left, [false, true, false, false, true, false]);
        assert!(recent.exists());
        // The plain ones are counted apart: the primed ones never make
        // one go, and a plain one's saving makes only plain ones go. Ten
        // old plain ones, `unprimed` (used now) and the one just saved:
        // eight stay, the saved one, `unprimed` and the six newest.
        let plain: Vec<PathBuf> = (1..=10u64)
            .map(|i| {
                let p = d.path().join(format!("snapshot-{i:016x}-f.vmstate"));
                let f = File::create(&p).unwrap();
                f.set_modified(t0 + std::time::Duration::from_secs(i))
                    .unwrap();
                p
            })
            .collect();
        let saved = d.path().join("snapshot-00000000000000ff-f.vmstate");
        std::fs::write(&saved, b"").unwrap();
        let primed_left = || all.iter().filter(|p| p.exists()).count();
        let before = primed_left();
        prune_lru(&saved, false, PLAIN_KEPT);
        let left: Vec<bool> = plain.iter().map(|p| p.exists()).collect();
        assert_eq!(
            left,
            [false, false, false, false, true, true, true, true, true, true]
        );
        assert!(saved.exists() && unprimed.exists());
        assert_eq!(primed_left(), before);
    }

    #[test]
    fn saving_replaces_the_configurations_older_snapshot_only() {
        let d = tempfile::tempdir().unwrap();
        let cache = d.path().join("c");
        std::fs::create_dir(&cache).unwrap();
        let k = d.path().join("k");
        std::fs::write(&k, b"1").unwrap();
        let id = ident(&k, "x", 100);
        let Offer::Save { file, tmp, path } = offer(&cache, &id) else {
            panic!("no snapshot yet: offer to save one")
        };
        drop(file);
        settle(
            Offer::Save {
                file: File::open(&tmp).unwrap(),
                tmp: tmp.clone(),
                path: path.clone(),
            },
            Some(&StartKind::Saved),
        );
        assert!(path.is_file() && !tmp.exists());
        let other = ident(&k, "x", 200).path(&cache).unwrap();
        std::fs::write(&other, b"other configuration").unwrap();
        // The kernel changes: the same configuration gets a new name.
        std::fs::write(&k, b"22").unwrap();
        let Offer::Save {
            tmp, path: path2, ..
        } = offer(&cache, &id)
        else {
            panic!("the old snapshot is stale")
        };
        assert_ne!(path, path2);
        settle(
            Offer::Save {
                file: File::open(&tmp).unwrap(),
                tmp: tmp.clone(),
                path: path2.clone(),
            },
            Some(&StartKind::Saved),
        );
        assert!(path2.is_file());
        assert!(
            !path.exists(),
            "the stale snapshot of this configuration is gone"
        );
        assert!(other.is_file(), "another configuration's snapshot stays");
        // A snapshot that fails to restore is removed.
        let Offer::Restore { file, path } = offer(&cache, &id) else {
            panic!("restore the saved one")
        };
        settle(
            Offer::Restore {
                file,
                path: path.clone(),
            },
            Some(&StartKind::Cold {
                why: "bad".into(),
                restore_failed: true,
            }),
        );
        assert!(!path.exists());
        // A failed save leaves nothing.
        let Offer::Save { file, tmp, path } = offer(&cache, &id) else {
            panic!()
        };
        settle(
            Offer::Save {
                file,
                tmp: tmp.clone(),
                path: path.clone(),
            },
            None,
        );
        assert!(!tmp.exists() && !path.exists());
    }
}
