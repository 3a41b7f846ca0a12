//! TUN/TAP devices: `TUNSETIFF`, `TUNSETOFFLOAD` and `TUNSETVNETHDRSZ`,
//! which neither rustix nor nix wraps.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `struct ifreq` as TUNSETIFF reads it: the name, then the union whose
/// first member is the `short` flags; 40 bytes in all on Linux.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: i16,
    _pad: [u8; 22],
}

/// Attaches the `/dev/net/tun` descriptor `fd` to a new TUN/TAP interface
/// `name` with `flags` (IFF_TAP, IFF_NO_PI, …); returns the name the kernel
/// gave it.
pub fn tun_set_iff(fd: BorrowedFd<'_>, name: &str, flags: i16) -> io::Result<String> {
    let bytes = name.as_bytes();
    if bytes.len() >= 16 || bytes.contains(&0) {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let mut req = IfReq {
        name: [0; 16],
        flags,
        _pad: [0; 22],
    };
    req.name[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: `fd` is a descriptor borrowed for the whole call. TUNSETIFF
    // reads and writes exactly one `struct ifreq`; `req` is a repr(C)
    // struct of that layout and size (16-byte NUL-terminated name, the
    // flags, padding to 40 bytes), exclusively borrowed for the call, and
    // nothing keeps the pointer after it returns.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req as *mut IfReq) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let end = req.name.iter().position(|&b| b == 0).unwrap_or(16);
    Ok(String::from_utf8_lossy(&req.name[..end]).into_owned())
}

/// Sets the offloads (`TUN_F_*` flags) of the TAP `fd` is attached to:
/// what it may hand its reader (segments, frames whose checksum is left to
/// do), each described by the virtio-net header before it (`TUNSETOFFLOAD`).
pub fn set_offload(fd: BorrowedFd<'_>, flags: u32) -> io::Result<()> {
    // SAFETY: `fd` is a descriptor borrowed for the whole call.
    // TUNSETOFFLOAD takes its argument by value (an unsigned int of
    // flags): it reads no memory of this process and keeps nothing.
    let r = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TUNSETOFFLOAD,
            libc::c_ulong::from(flags),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the length of the virtio-net header before each frame of the TAP
/// `fd` is attached to, when it was made with `IFF_VNET_HDR` (10 bytes by
/// default, the legacy header; 12 with `num_buffers`) (`TUNSETVNETHDRSZ`).
pub fn set_vnet_hdr_size(fd: BorrowedFd<'_>, size: usize) -> io::Result<()> {
    let size =
        libc::c_int::try_from(size).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `fd` is a descriptor borrowed for the whole call.
    // TUNSETVNETHDRSZ reads one int through the pointer, which points at
    // `size`, alive and unchanged for the call; nothing keeps the pointer.
    let r = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TUNSETVNETHDRSZ,
            &size as *const libc::c_int,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
