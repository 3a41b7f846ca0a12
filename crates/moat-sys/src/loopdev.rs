//! Loop devices: a file attached as a block device, so that the kernel's
//! own file system code can fill an image file.
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use linux_raw_sys::loop_device::{
    loop_config, LOOP_CONFIGURE, LOOP_CTL_GET_FREE, LO_FLAGS_AUTOCLEAR,
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
    let ctl = open_rw(Path::new("/dev/loop-control"))?;
    let backing = open_rw(image)?;
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
        cfg.info.lo_flags = LO_FLAGS_AUTOCLEAR as u32;
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
