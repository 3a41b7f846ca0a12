//! Loop devices: a file attached as a block device, so that the kernel's
//! own file system code can fill an image file.
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use linux_raw_sys::loop_device::{
    loop_config, LOOP_CONFIGURE, LOOP_CTL_GET_FREE, LO_FLAGS_AUTOCLEAR, LO_FLAGS_DIRECT_IO,
    LO_FLAGS_READ_ONLY,
};

fn open_rw(p: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).write(true).open(p)
}

/// Attaches `image` (read-write) to a free loop device set to detach itself
/// once its last user is gone (`LO_FLAGS_AUTOCLEAR`): keep the returned
/// file open until something else (a mount) holds the device. Returns the
/// open device and its path. Another process may take the free device
/// between asking for it and configuring it: then this asks again, a few
/// times.
pub fn attach_autoclear(image: &Path) -> io::Result<(File, PathBuf)> {
    attach(&open_rw(image)?, 0, 0, LO_FLAGS_AUTOCLEAR as u32)
}

/// Attaches `size` bytes of `backing` from `offset` on, read-only, to a
/// free loop device that detaches itself once unused, as
/// [`attach_autoclear`] does, reading the backing file directly
/// (`LO_FLAGS_DIRECT_IO`, where the backing file allows it): the loop
/// device then keeps no copy of the backing file's pages in its page
/// cache, so bytes written there by someone else later (a pod's disk,
/// to which the host appends images) are read as they are.
pub fn attach_region(backing: &File, offset: u64, size: u64) -> io::Result<(File, PathBuf)> {
    attach(
        backing,
        offset,
        size,
        LO_FLAGS_AUTOCLEAR as u32 | LO_FLAGS_READ_ONLY as u32 | LO_FLAGS_DIRECT_IO as u32,
    )
}

fn attach(backing: &File, offset: u64, size: u64, flags: u32) -> io::Result<(File, PathBuf)> {
    let ctl = open_rw(Path::new("/dev/loop-control"))?;
    for _ in 0..16 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device
        // number or -1.
        let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE as _) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let path = PathBuf::from(format!("/dev/loop{n}"));
        let dev = open_rw(&path)?;
        // SAFETY: loop_config is plain old data (integers and byte arrays);
        // all zeroes is its empty value.
        let mut cfg: loop_config = unsafe { std::mem::zeroed() };
        cfg.fd = u32::try_from(backing.as_raw_fd()).map_err(|_| io::ErrorKind::InvalidInput)?;
        cfg.info.lo_flags = flags;
        cfg.info.lo_offset = offset;
        cfg.info.lo_sizelimit = size;
        // SAFETY: LOOP_CONFIGURE reads one loop_config through the pointer,
        // which points at `cfg` for the call; the kernel takes its own
        // reference on the backing file, so `backing` may close after.
        let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE as _, &cfg) };
        if r == 0 {
            return Ok((dev, path));
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(e);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::ResourceBusy,
        "every free loop device was taken before it could be set up",
    ))
}

/// Drops the page cache of block device `dev` (`BLKFLSBUF`: dirty pages
/// are written back first): what is read next comes from the device.
pub fn flush_buffers(dev: &File) -> io::Result<()> {
    // SAFETY: BLKFLSBUF (_IO(0x12, 97)) takes no argument.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), linux_raw_sys::ioctl::BLKFLSBUF as _, 0) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
