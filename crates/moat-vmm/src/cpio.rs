//! A writer for the newc cpio format, the format Linux unpacks as an
//! initramfs. moat builds its guests' initramfs with it (the guest agent as
//! `/init`, the modules it loads). Names are checked: relative, no `..`, no
//! NUL; sizes must fit the format's 32-bit fields.

use std::io::{self, Write};

use thiserror::Error;

const MAGIC: &str = "070701";
const TRAILER: &str = "TRAILER!!!";
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;
/// Longest name accepted (Linux's PATH_MAX).
pub const MAX_NAME: usize = 4096;

/// Why an entry could not be written.
#[derive(Debug, Error)]
pub enum CpioError {
    /// The name is empty, absolute, has a `..` or NUL, or is too long.
    #[error("bad archive name {0:?}")]
    BadName(String),
    /// The file is larger than the format's 32-bit size field.
    #[error("{name}: {size} bytes is too large for cpio")]
    TooLarge {
        /// Entry name.
        name: String,
        /// Its size.
        size: u64,
    },
    /// Writing to the underlying stream failed.
    #[error("write cpio entry {name}")]
    Write {
        /// Entry name.
        name: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// Writes a newc archive to `W`; call [`CpioWriter::finish`] at the end.
pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
}

fn check_name(name: &str) -> Result<(), CpioError> {
    let bad = name.is_empty()
        || name.len() > MAX_NAME
        || name.starts_with('/')
        || name.contains('\0')
        || name.split('/').any(|c| c == ".." || c.is_empty());
    if bad && name != "." {
        return Err(CpioError::BadName(name.to_string()));
    }
    Ok(())
}

fn pad(n: u64) -> usize {
    ((4 - (n % 4)) % 4) as usize
}

impl<W: Write> CpioWriter<W> {
    /// A writer appending to `out`.
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            written: 0,
            next_ino: 1,
        }
    }

    fn put(&mut self, name: &str, bytes: &[u8]) -> Result<(), CpioError> {
        self.out
            .write_all(bytes)
            .map_err(|source| CpioError::Write {
                name: name.to_string(),
                source,
            })?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> Result<(), CpioError> {
        if name != TRAILER {
            check_name(name)?;
        }
        let size = u32::try_from(data.len()).map_err(|_| CpioError::TooLarge {
            name: name.to_string(),
            size: data.len() as u64,
        })?;
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
        let fields = [
            ino,
            mode,
            0,
            0,
            nlink,
            0,
            size,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        let mut header = String::with_capacity(110);
        header.push_str(MAGIC);
        for f in fields {
            header.push_str(&format!("{f:08x}"));
        }
        self.put(name, header.as_bytes())?;
        self.put(name, name.as_bytes())?;
        self.put(name, &[0])?;
        let p = pad(self.written);
        self.put(name, &[0; 3][..p])?;
        self.put(name, data)?;
        let p = pad(self.written);
        self.put(name, &[0; 3][..p])
    }

    /// A directory.
    pub fn dir(&mut self, name: &str, perm: u32) -> Result<(), CpioError> {
        self.entry(name, S_IFDIR | (perm & 0o7777), (0, 0), &[])
    }

    /// A regular file holding `data`.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> Result<(), CpioError> {
        self.entry(name, S_IFREG | (perm & 0o7777), (0, 0), data)
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, name: &str, target: &str) -> Result<(), CpioError> {
        self.entry(name, S_IFLNK | 0o777, (0, 0), target.as_bytes())
    }

    /// A character device node.
    pub fn char_device(
        &mut self,
        name: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), CpioError> {
        self.entry(name, S_IFCHR | (perm & 0o7777), (major, minor), &[])
    }

    /// Writes the trailer and returns the stream.
    pub fn finish(mut self) -> Result<W, CpioError> {
        self.entry(TRAILER, 0, (0, 0), &[])?;
        self.out.flush().map_err(|source| CpioError::Write {
            name: TRAILER.into(),
            source,
        })?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(h: &[u8], i: usize) -> u32 {
        u32::from_str_radix(std::str::from_utf8(&h[6 + 8 * i..14 + 8 * i]).unwrap(), 16).unwrap()
    }

    #[test]
    fn layout_is_newc() {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("bin", 0o755).unwrap();
        w.file("init", 0o755, b"#!/bin/sh\n").unwrap();
        w.symlink("sh", "busybox").unwrap();
        w.char_device("dev/console", 0o600, 5, 1).unwrap();
        let out = w.finish().unwrap();
        assert_eq!(&out[..6], b"070701");
        assert_eq!(field(&out, 1), 0o040755);
        assert_eq!(field(&out, 11), 4); // "bin\0"
        assert_eq!(out.len() % 4, 0);
        // The second header starts 4-aligned after "bin\0" (110 + 4 = 114 -> 116).
        assert_eq!(&out[116..122], b"070701");
        assert_eq!(field(&out[116..], 6), 10);
        assert!(out.windows(10).any(|w| w == b"TRAILER!!!"));
    }

    #[test]
    fn gnu_cpio_lists_what_was_written() {
        // GNU cpio, where installed, must list exactly what was written.
        let Ok(_) = std::process::Command::new("cpio").arg("--version").output() else {
            moat_core::testing::skip("gnu_cpio_lists_what_was_written", "no cpio binary");
            return;
        };
        let mut w = CpioWriter::new(Vec::new());
        w.dir("etc", 0o755).unwrap();
        w.file("etc/hostname", 0o644, b"moat\n").unwrap();
        w.symlink("link", "etc/hostname").unwrap();
        let archive = w.finish().unwrap();
        let mut child = std::process::Command::new("cpio")
            .args(["-it", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&archive).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "etc\netc/hostname\nlink\n"
        );
    }

    #[test]
    fn bad_names_are_refused() {
        let mut w = CpioWriter::new(Vec::new());
        for name in ["", "/abs", "a/../b", "..", "a//b", "nul\0", "trailing/"] {
            assert!(
                matches!(w.file(name, 0o644, b""), Err(CpioError::BadName(_))),
                "{name:?}"
            );
        }
        assert!(w.file(&"a".repeat(MAX_NAME + 1), 0o644, b"").is_err());
    }
}
