//! The kernel inside a bzImage: its compressed payload, decompressed to the
//! ELF `vmlinux` the kernel was built as, and whether that ELF has a PVH
//! entry point (`XEN_ELFNOTE_PHYS32_ENTRY`, `CONFIG_PVH`).
//!
//! QEMU boots such an ELF directly at its PVH entry, with neither the
//! bzImage's real-mode setup nor its decompressor. Under TCG the
//! decompressor and its relocation pass are the slow part of a boot: here
//! they took ~1.4 s of the 3.6 s that `qemu-system-x86_64 -M microvm` needs
//! to bring Debian's cloud kernel to a trivial `/init` (docs/performance.md).
//! What is lost is the kernel's own address randomisation (KASLR), which the
//! decompressor performs; SECURITY.md says so.
//!
//! The payload's place comes from the boot protocol's setup header
//! (`payload_offset` and `payload_length`, protocol 2.08 and later); LZ4
//! (the "legacy" framing the kernel's build uses), gzip and zstd payloads
//! are decompressed, others are reported as unsupported.

use std::io::Read;

use thiserror::Error;

/// The largest kernel image decompressed (a vmlinux is tens of MiB).
pub const MAX_VMLINUX: usize = 512 << 20;

/// `XEN_ELFNOTE_PHYS32_ENTRY`: the PVH entry point's note type.
const PVH_NOTE: u32 = 18;
/// The LZ4 legacy frame's magic (little-endian 0x184c2102).
const LZ4_LEGACY_MAGIC: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];
/// An LZ4 legacy block decompresses to at most 8 MiB.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;

/// Why a kernel image has no usable vmlinux inside.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum KernelImageError {
    /// No "HdrS" setup header: not a bzImage.
    #[error("not a bzImage (no setup header)")]
    NotBzImage,
    /// The header predates the payload fields.
    #[error("boot protocol {0:#x} has no payload fields (2.08 and later do)")]
    OldProtocol(u16),
    /// The payload lies outside the file.
    #[error("the payload lies outside the image")]
    Bounds,
    /// A compression moat does not decompress.
    #[error("the payload is compressed with {0}, which moat does not decompress")]
    Compression(&'static str),
    /// The payload does not decompress.
    #[error("the payload does not decompress: {0}")]
    Corrupt(String),
    /// The decompressed kernel is larger than [`MAX_VMLINUX`].
    #[error("the decompressed kernel is larger than {MAX_VMLINUX} bytes")]
    TooLarge,
    /// The decompressed kernel is not a 64-bit little-endian ELF.
    #[error("the decompressed kernel is not a 64-bit ELF")]
    NotElf,
    /// The ELF has no PVH entry point.
    #[error("the kernel has no PVH entry point (CONFIG_PVH)")]
    NoPvh,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Whether `image` is an ELF file (rather than a bzImage).
pub fn is_elf(image: &[u8]) -> bool {
    image.starts_with(b"\x7fELF")
}

/// The compressed payload of a bzImage.
pub fn payload(bzimage: &[u8]) -> Result<&[u8], KernelImageError> {
    if bzimage.get(0x202..0x206) != Some(b"HdrS") {
        return Err(KernelImageError::NotBzImage);
    }
    let version = u16_at(bzimage, 0x206).ok_or(KernelImageError::NotBzImage)?;
    if version < 0x208 {
        return Err(KernelImageError::OldProtocol(version));
    }
    let setup_sects = match bzimage[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let offset = u32_at(bzimage, 0x248).ok_or(KernelImageError::Bounds)? as usize;
    let length = u32_at(bzimage, 0x24c).ok_or(KernelImageError::Bounds)? as usize;
    let start = (setup_sects + 1) * 512 + offset;
    start
        .checked_add(length)
        .and_then(|end| bzimage.get(start..end))
        .ok_or(KernelImageError::Bounds)
}

/// Decompresses a bzImage payload.
pub fn decompress(payload: &[u8]) -> Result<Vec<u8>, KernelImageError> {
    if payload.starts_with(&LZ4_LEGACY_MAGIC) {
        return lz4_legacy(payload);
    }
    if payload.starts_with(&[0x1f, 0x8b]) {
        return bounded(flate2::read::GzDecoder::new(payload));
    }
    if payload.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        let d = ruzstd::decoding::StreamingDecoder::new(payload)
            .map_err(|e| KernelImageError::Corrupt(e.to_string()))?;
        return bounded(d);
    }
    Err(KernelImageError::Compression(
        if payload.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
            "xz"
        } else if payload.starts_with(b"BZh") {
            "bzip2"
        } else if payload.starts_with(&[0x89, b'L', b'Z', b'O']) {
            "lzo"
        } else if payload.starts_with(&[0x5d, 0]) {
            "lzma"
        } else {
            "an unknown method"
        },
    ))
}

fn bounded(r: impl Read) -> Result<Vec<u8>, KernelImageError> {
    let mut out = Vec::new();
    r.take(MAX_VMLINUX as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| KernelImageError::Corrupt(e.to_string()))?;
    if out.len() > MAX_VMLINUX {
        return Err(KernelImageError::TooLarge);
    }
    Ok(out)
}

/// LZ4's legacy framing, as the kernel's build writes it: the magic, then
/// blocks of (compressed length, data), each at most 8 MiB decompressed.
/// The build appends the decompressed size (4 bytes): the stream ends
/// when the output has that size.
fn lz4_legacy(payload: &[u8]) -> Result<Vec<u8>, KernelImageError> {
    let corrupt = |why: &str| KernelImageError::Corrupt(format!("LZ4: {why}"));
    let total = payload
        .len()
        .checked_sub(4)
        .ok_or_else(|| corrupt("short"))?;
    let size = u32_at(payload, total).ok_or_else(|| corrupt("short"))? as usize;
    if size > MAX_VMLINUX {
        return Err(KernelImageError::TooLarge);
    }
    let mut out = vec![0u8; size];
    let mut written = 0;
    let mut at = 4;
    while written < size {
        let Some(n) = u32_at(payload, at) else {
            return Err(corrupt("the blocks end before the stated size"));
        };
        at += 4;
        if n == u32::from_le_bytes(LZ4_LEGACY_MAGIC) {
            // A second legacy stream concatenated to the first.
            continue;
        }
        let block = at
            .checked_add(n as usize)
            .and_then(|end| payload.get(at..end))
            .ok_or_else(|| corrupt("a block runs past the payload"))?;
        at += n as usize;
        let room = (size - written).min(LZ4_LEGACY_BLOCK);
        let got = lz4_flex::block::decompress_into(block, &mut out[written..written + room])
            .map_err(|e| corrupt(&e.to_string()))?;
        if got == 0 {
            return Err(corrupt("an empty block"));
        }
        written += got;
    }
    Ok(out)
}

/// Whether `elf` is a 64-bit ELF with a PVH entry point note.
pub fn has_pvh_entry(elf: &[u8]) -> Result<bool, KernelImageError> {
    // ELFCLASS64, little-endian.
    if !is_elf(elf) || elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return Err(KernelImageError::NotElf);
    }
    let phoff = u64_at(elf, 0x20).ok_or(KernelImageError::NotElf)? as usize;
    let phentsize = usize::from(u16_at(elf, 0x36).ok_or(KernelImageError::NotElf)?);
    let phnum = usize::from(u16_at(elf, 0x38).ok_or(KernelImageError::NotElf)?);
    if phentsize < 0x38 {
        return Err(KernelImageError::NotElf);
    }
    for i in 0..phnum {
        let ph = phoff.saturating_add(i.saturating_mul(phentsize));
        // PT_NOTE.
        if u32_at(elf, ph) != Some(4) {
            continue;
        }
        let (Some(off), Some(len)) = (u64_at(elf, ph + 0x08), u64_at(elf, ph + 0x20)) else {
            return Err(KernelImageError::NotElf);
        };
        let notes = usize::try_from(off)
            .ok()
            .zip(usize::try_from(len).ok())
            .and_then(|(o, l)| elf.get(o..o.checked_add(l)?))
            .ok_or(KernelImageError::NotElf)?;
        if has_note(notes, b"Xen\0", PVH_NOTE) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Whether a note segment holds a note named `name` of type `kind`.
fn has_note(mut notes: &[u8], name: &[u8], kind: u32) -> bool {
    let align4 = |n: usize| n.checked_add(3).map(|x| x & !3);
    while notes.len() >= 12 {
        let namesz = u32_at(notes, 0).unwrap_or(0) as usize;
        let descsz = u32_at(notes, 4).unwrap_or(0) as usize;
        let ty = u32_at(notes, 8).unwrap_or(0);
        let Some(name_end) = align4(namesz).and_then(|n| n.checked_add(12)) else {
            return false;
        };
        let Some(end) = align4(descsz).and_then(|d| d.checked_add(name_end)) else {
            return false;
        };
        if notes.get(12..12 + namesz) == Some(name) && ty == kind {
            return true;
        }
        match notes.get(end..) {
            Some(rest) => notes = rest,
            None => return false,
        }
    }
    false
}

/// The vmlinux inside `bzimage`, if it decompresses and has a PVH entry.
pub fn pvh_vmlinux(bzimage: &[u8]) -> Result<Vec<u8>, KernelImageError> {
    let elf = decompress(payload(bzimage)?)?;
    if has_pvh_entry(&elf)? {
        Ok(elf)
    } else {
        Err(KernelImageError::NoPvh)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bzImage-shaped buffer around `payload` (setup header fields only).
    fn bzimage(payload: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 5 * 512];
        b[0x1f1] = 4;
        b[0x202..0x206].copy_from_slice(b"HdrS");
        b[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        b[0x248..0x24c].copy_from_slice(&16u32.to_le_bytes());
        b[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        b.extend_from_slice(&[0xaa; 16]);
        b.extend_from_slice(payload);
        b.extend_from_slice(&[0xbb; 64]);
        b
    }

    /// A minimal 64-bit ELF with one PT_NOTE segment holding `notes`.
    fn elf(notes: &[u8]) -> Vec<u8> {
        let mut e = vec![0u8; 0x40 + 0x38];
        e[..4].copy_from_slice(b"\x7fELF");
        e[4] = 2;
        e[5] = 1;
        e[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes());
        e[0x36..0x38].copy_from_slice(&0x38u16.to_le_bytes());
        e[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        let ph = 0x40;
        e[ph..ph + 4].copy_from_slice(&4u32.to_le_bytes());
        let off = e.len() as u64;
        e[ph + 8..ph + 16].copy_from_slice(&off.to_le_bytes());
        e[ph + 0x20..ph + 0x28].copy_from_slice(&(notes.len() as u64).to_le_bytes());
        e.extend_from_slice(notes);
        e
    }

    fn note(name: &[u8], ty: u32, desc: &[u8]) -> Vec<u8> {
        let mut n = Vec::new();
        n.extend_from_slice(&(name.len() as u32).to_le_bytes());
        n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        n.extend_from_slice(&ty.to_le_bytes());
        n.extend_from_slice(name);
        n.resize(n.len().next_multiple_of(4), 0);
        n.extend_from_slice(desc);
        n.resize(n.len().next_multiple_of(4), 0);
        n
    }

    fn lz4_legacy_of(data: &[u8]) -> Vec<u8> {
        let mut p = LZ4_LEGACY_MAGIC.to_vec();
        for chunk in data.chunks(LZ4_LEGACY_BLOCK) {
            let c = lz4_flex::block::compress(chunk);
            p.extend_from_slice(&(c.len() as u32).to_le_bytes());
            p.extend_from_slice(&c);
        }
        p.extend_from_slice(&(data.len() as u32).to_le_bytes());
        p
    }

    #[test]
    fn the_pvh_kernel_comes_out_of_an_lz4_bzimage() {
        let mut notes = note(b"Xen\0", 6, b"linux\0");
        notes.extend(note(b"GNU\0", 3, &[1; 20]));
        notes.extend(note(b"Xen\0", PVH_NOTE, &0x100_0000u32.to_le_bytes()));
        let mut kernel = elf(&notes);
        // More than one LZ4 block, and compressible.
        kernel.extend((0..(9 << 20)).map(|i| (i / 4096) as u8));
        let img = bzimage(&lz4_legacy_of(&kernel));
        assert_eq!(pvh_vmlinux(&img).unwrap(), kernel);
    }

    #[test]
    fn gzip_payloads_decompress() {
        use std::io::Write;
        let kernel = elf(&note(b"Xen\0", PVH_NOTE, &[0; 4]));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&kernel).unwrap();
        let img = bzimage(&gz.finish().unwrap());
        assert_eq!(pvh_vmlinux(&img).unwrap(), kernel);
    }

    #[test]
    fn what_cannot_be_used_says_why() {
        let plain = elf(&note(b"Xen\0", 6, b"linux\0"));
        assert_eq!(
            pvh_vmlinux(&bzimage(&lz4_legacy_of(&plain))),
            Err(KernelImageError::NoPvh)
        );
        assert_eq!(pvh_vmlinux(&plain), Err(KernelImageError::NotBzImage));
        assert_eq!(
            pvh_vmlinux(&bzimage(b"\xfd7zXZ\0rest")),
            Err(KernelImageError::Compression("xz"))
        );
        let mut old = bzimage(b"x");
        old[0x206..0x208].copy_from_slice(&0x206u16.to_le_bytes());
        assert_eq!(pvh_vmlinux(&old), Err(KernelImageError::OldProtocol(0x206)));
        let mut past = bzimage(b"x");
        past[0x24c..0x250].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(pvh_vmlinux(&past), Err(KernelImageError::Bounds));
        // A stated size beyond the blocks, a truncated block.
        let mut short = lz4_legacy_of(&plain);
        let n = short.len();
        short[n - 4..].copy_from_slice(&((plain.len() + 1) as u32).to_le_bytes());
        assert!(matches!(
            pvh_vmlinux(&bzimage(&short)),
            Err(KernelImageError::Corrupt(_))
        ));
        let cut = lz4_legacy_of(&plain);
        let mut cut2 = cut[..cut.len() / 2].to_vec();
        cut2.extend_from_slice(&(plain.len() as u32).to_le_bytes());
        assert!(matches!(
            pvh_vmlinux(&bzimage(&cut2)),
            Err(KernelImageError::Corrupt(_))
        ));
        assert_eq!(
            has_pvh_entry(b"\x7fELF\x01\x01"),
            Err(KernelImageError::NotElf)
        );
    }

    /// Debian's cloud kernel, where installed: LZ4, with a PVH entry.
    #[test]
    fn the_installed_cloud_kernel_has_a_pvh_vmlinux() {
        let Some(k) = std::fs::read_dir("/boot").ok().and_then(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("vmlinuz-") && n.ends_with("-cloud-amd64"))
                })
                .max()
        }) else {
            // scripts/deps installs linux-image-cloud-amd64; CI has it.
            panic!("no /boot/vmlinuz-*-cloud-amd64: install linux-image-cloud-amd64");
        };
        let img = std::fs::read(&k).unwrap();
        let elf = pvh_vmlinux(&img).unwrap();
        assert!(elf.len() > img.len(), "{} decompressed", k.display());
    }
}
