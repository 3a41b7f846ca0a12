//! The kernel's random number generator: `RNDRESEEDCRNG`, which neither
//! rustix nor nix wraps. A microVM guest restored from a snapshot starts
//! with the generator state the snapshot holds; its agent mixes fresh
//! bytes from the host into the input pool (a plain write to
//! `/dev/urandom`) and then forces the generator to reseed from it, so no
//! two restored guests produce the same bytes.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `_IO('R', 0x07)` from `<linux/random.h>`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Reseeds the kernel's CRNG from its input pool now. `fd` is an open
/// `/dev/urandom` (or `/dev/random`); needs CAP_SYS_ADMIN.
pub fn reseed_crng(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: `fd` is a descriptor borrowed for the whole call.
    // RNDRESEEDCRNG takes no argument and reads or writes no user memory.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), RNDRESEEDCRNG as _) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reseeding_needs_the_right_file() {
        // Not a random device: the ioctl is refused, never ignored.
        let f = std::fs::File::open("/proc/self/status").unwrap();
        use std::os::fd::AsFd;
        assert!(reseed_crng(f.as_fd()).is_err());
    }
}
