//! bpf(2), the handful of commands moat needs: for the cgroup v2 device
//! filter, load a `BPF_PROG_TYPE_CGROUP_DEVICE` program, attach it to a
//! cgroup directory, and list/detach the programs already attached there;
//! for the microVM tier's localhost forwarder, a socket map, a program of
//! any type and a link attaching it (to a network namespace).
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// `BPF_PROG_TYPE_CGROUP_DEVICE` from `<linux/bpf.h>`.
pub const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
/// `BPF_CGROUP_DEVICE` attach type.
pub const BPF_CGROUP_DEVICE: u32 = 6;
/// `BPF_F_ALLOW_MULTI`: several programs may be attached to one cgroup.
pub const BPF_F_ALLOW_MULTI: u32 = 2;

/// `BPF_PROG_TYPE_SK_LOOKUP`: picks the listening socket for a new
/// connection in a network namespace.
pub const BPF_PROG_TYPE_SK_LOOKUP: u32 = 30;
/// `BPF_SK_LOOKUP` attach type (to a network namespace, by link).
pub const BPF_SK_LOOKUP: u32 = 36;
/// `BPF_MAP_TYPE_SOCKMAP`: an array of sockets.
pub const BPF_MAP_TYPE_SOCKMAP: u32 = 15;
/// `src_reg` of a 64-bit immediate load that names a map by descriptor.
pub const BPF_PSEUDO_MAP_FD: u8 = 1;

const BPF_MAP_CREATE: libc::c_int = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_int = 2;
const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_LINK_CREATE: libc::c_int = 28;
const BPF_PROG_ATTACH: libc::c_int = 8;
const BPF_PROG_DETACH: libc::c_int = 9;
const BPF_PROG_GET_FD_BY_ID: libc::c_int = 13;
const BPF_PROG_QUERY: libc::c_int = 16;

/// Most programs `prog_query` reports (the kernel caps a cgroup's
/// BPF_F_ALLOW_MULTI list at 64 programs per attach type).
const MAX_QUERY: usize = 64;

/// One eBPF instruction, laid out as `struct bpf_insn`: `regs` holds the
/// destination register in its low nibble and the source in its high nibble.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BpfInsn {
    /// Opcode (class | size/op | mode/source).
    pub code: u8,
    /// `dst_reg | src_reg << 4`.
    pub regs: u8,
    /// Signed jump or memory offset.
    pub off: i16,
    /// Signed immediate.
    pub imm: i32,
}

impl BpfInsn {
    /// Builds an instruction from its fields; registers are 0..=10.
    pub const fn new(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Self {
        Self {
            code,
            regs: (dst & 0x0f) | ((src & 0x0f) << 4),
            off,
            imm,
        }
    }

    /// The two instructions of `dst = map` (a 64-bit immediate load of the
    /// map's descriptor, which the kernel replaces with the map).
    pub fn ld_map_fd(dst: u8, map: BorrowedFd<'_>) -> [BpfInsn; 2] {
        [
            BpfInsn::new(0x18, dst, BPF_PSEUDO_MAP_FD, 0, map.as_raw_fd()),
            BpfInsn::new(0, 0, 0, 0, 0),
        ]
    }
}

/// A failed `BPF_PROG_LOAD`, with the verifier's log when it gave one.
#[derive(Debug)]
pub struct LoadError {
    /// What the syscall returned.
    pub error: io::Error,
    /// The verifier log (empty when none was produced).
    pub log: String,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.log.is_empty() {
            write!(f, "BPF_PROG_LOAD failed")
        } else {
            write!(
                f,
                "BPF_PROG_LOAD failed; verifier log: {}",
                self.log.trim_end()
            )
        }
    }
}

impl std::error::Error for LoadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct AttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
}

#[repr(C)]
#[derive(Default)]
struct QueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    // Explicit so the padding the kernel reads is zero, not uninitialised.
    pad: u32,
}

#[repr(C)]
#[derive(Default)]
struct GetFdByIdAttr {
    prog_id: u32,
    next_id: u32,
    open_flags: u32,
}

/// Calls bpf(2) with `attr` as the command's attribute block.
///
/// # Safety
/// `attr` must be the attribute layout `cmd` expects, and every pointer stored
/// in it (as a u64) must be valid for the access the kernel makes during the
/// call (reads of instructions/license, writes to log or id buffers of the
/// sizes given alongside them).
unsafe fn bpf<T>(cmd: libc::c_int, attr: &mut T) -> io::Result<libc::c_long> {
    let size = u32::try_from(std::mem::size_of::<T>())
        .map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
    // SAFETY: `attr` is a live, exclusively borrowed attribute block of `size`
    // bytes; the caller guarantees that the pointers inside it are valid.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, size) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn fd_from_ret(r: libc::c_long) -> io::Result<OwnedFd> {
    let fd = libc::c_int::try_from(r).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just returned `fd` as a new descriptor that nothing
    // else in this process owns yet.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Loads a `BPF_PROG_TYPE_CGROUP_DEVICE` program (see [`prog_load`]).
pub fn prog_load_cgroup_device(insns: &[BpfInsn]) -> Result<OwnedFd, LoadError> {
    prog_load(BPF_PROG_TYPE_CGROUP_DEVICE, 0, insns)
}

/// Loads a program of `prog_type`, for `expected_attach_type` (0 where
/// the type needs none). The license string only matters for GPL-only
/// helpers, which moat's programs do not call. On failure, retries once
/// with the verifier log enabled so the error says why.
pub fn prog_load(
    prog_type: u32,
    expected_attach_type: u32,
    insns: &[BpfInsn],
) -> Result<OwnedFd, LoadError> {
    let insn_cnt = u32::try_from(insns.len()).map_err(|_| LoadError {
        error: io::Error::from_raw_os_error(libc::E2BIG),
        log: String::new(),
    })?;
    let license = c"Apache-2.0";
    let mut attr = ProgLoadAttr {
        prog_type,
        expected_attach_type,
        insn_cnt,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: `insns` (insn_cnt instructions) and `license` (NUL-terminated)
    // outlive the call; no log buffer is passed.
    match unsafe { bpf(BPF_PROG_LOAD, &mut attr) } {
        Ok(r) => fd_from_ret(r).map_err(|error| LoadError {
            error,
            log: String::new(),
        }),
        Err(_) => {
            let mut log = vec![0u8; 64 * 1024];
            attr.log_level = 1;
            attr.log_size = log.len() as u32;
            attr.log_buf = log.as_mut_ptr() as u64;
            // SAFETY: as above, plus `log` is a writable buffer of exactly
            // `log_size` bytes that lives until after the call.
            let r = unsafe { bpf(BPF_PROG_LOAD, &mut attr) };
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]).into_owned();
            match r {
                Ok(r) => fd_from_ret(r).map_err(|error| LoadError { error, log: text }),
                Err(error) => Err(LoadError { error, log: text }),
            }
        }
    }
}

/// `BPF_MAP_CREATE` of a map of `map_type` with `max_entries` entries of
/// the given key and value sizes.
pub fn map_create(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
) -> io::Result<OwnedFd> {
    let mut attr = MapCreateAttr {
        map_type,
        key_size,
        value_size,
        max_entries,
        map_flags: 0,
    };
    // SAFETY: the attribute block holds only integers.
    let r = unsafe { bpf(BPF_MAP_CREATE, &mut attr) }?;
    fd_from_ret(r)
}

/// `BPF_MAP_UPDATE_ELEM`: sets `map[key] = value` (`BPF_ANY`). Their
/// lengths must be the map's key and value sizes.
pub fn map_update(map: BorrowedFd<'_>, key: &[u8], value: &[u8]) -> io::Result<()> {
    let mut attr = MapElemAttr {
        map_fd: fd_u32(map)?,
        key: key.as_ptr() as u64,
        value: value.as_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: `key` and `value` outlive the call; the kernel reads the
    // map's key and value sizes from them, which the caller matches.
    unsafe { bpf(BPF_MAP_UPDATE_ELEM, &mut attr) }.map(|_| ())
}

/// `BPF_LINK_CREATE`: attaches `prog` to `target` (a descriptor of what
/// `attach_type` attaches to: a network namespace for `BPF_SK_LOOKUP`).
/// The program stays attached while the returned link is open.
pub fn link_create(
    prog: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: fd_u32(prog)?,
        target_fd: fd_u32(target)?,
        attach_type,
        flags: 0,
    };
    // SAFETY: the attribute block holds only descriptors and integers.
    let r = unsafe { bpf(BPF_LINK_CREATE, &mut attr) }?;
    fd_from_ret(r)
}

/// `BPF_PROG_ATTACH` of `prog` to the cgroup directory `cgroup` as
/// `attach_type` with `flags` (e.g. `BPF_F_ALLOW_MULTI`).
pub fn prog_attach(
    cgroup: BorrowedFd<'_>,
    prog: BorrowedFd<'_>,
    attach_type: u32,
    flags: u32,
) -> io::Result<()> {
    let mut attr = AttachAttr {
        target_fd: fd_u32(cgroup)?,
        attach_bpf_fd: fd_u32(prog)?,
        attach_type,
        attach_flags: flags,
        replace_bpf_fd: 0,
    };
    // SAFETY: the attribute block holds only descriptors and integers.
    unsafe { bpf(BPF_PROG_ATTACH, &mut attr) }.map(|_| ())
}

/// `BPF_PROG_DETACH` of `prog` from the cgroup directory `cgroup`.
pub fn prog_detach(
    cgroup: BorrowedFd<'_>,
    prog: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<()> {
    let mut attr = AttachAttr {
        target_fd: fd_u32(cgroup)?,
        attach_bpf_fd: fd_u32(prog)?,
        attach_type,
        ..Default::default()
    };
    // SAFETY: the attribute block holds only descriptors and integers.
    unsafe { bpf(BPF_PROG_DETACH, &mut attr) }.map(|_| ())
}

/// IDs of the programs attached directly to `cgroup` for `attach_type`.
pub fn prog_query(cgroup: BorrowedFd<'_>, attach_type: u32) -> io::Result<Vec<u32>> {
    let mut ids = vec![0u32; MAX_QUERY];
    let mut attr = QueryAttr {
        target_fd: fd_u32(cgroup)?,
        attach_type,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: MAX_QUERY as u32,
        ..Default::default()
    };
    // SAFETY: `ids` is a writable array of `prog_cnt` u32s that outlives the
    // call; the kernel writes at most that many ids.
    unsafe { bpf(BPF_PROG_QUERY, &mut attr) }?;
    let n = (attr.prog_cnt as usize).min(MAX_QUERY);
    ids.truncate(n);
    Ok(ids)
}

/// `BPF_PROG_GET_FD_BY_ID`: a descriptor for an already loaded program.
pub fn prog_get_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut attr = GetFdByIdAttr {
        prog_id: id,
        ..Default::default()
    };
    // SAFETY: the attribute block holds only integers.
    let r = unsafe { bpf(BPF_PROG_GET_FD_BY_ID, &mut attr) }?;
    fd_from_ret(r)
}

fn fd_u32(fd: BorrowedFd<'_>) -> io::Result<u32> {
    u32::try_from(fd.as_raw_fd()).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insn_layout_matches_struct_bpf_insn() {
        assert_eq!(std::mem::size_of::<BpfInsn>(), 8);
        let i = BpfInsn::new(0x61, 2, 1, -3, 0x1234);
        assert_eq!(i.regs, 0x12);
        assert_eq!(i.off, -3);
    }

    #[test]
    fn attr_sizes_match_kernel_prefixes() {
        // Offsets of the last field used, from <linux/bpf.h>.
        assert_eq!(std::mem::size_of::<ProgLoadAttr>(), 72);
        assert_eq!(std::mem::size_of::<AttachAttr>(), 20);
        assert_eq!(std::mem::size_of::<QueryAttr>(), 32);
        assert_eq!(std::mem::size_of::<MapCreateAttr>(), 20);
        assert_eq!(std::mem::size_of::<MapElemAttr>(), 32);
        assert_eq!(std::mem::size_of::<LinkCreateAttr>(), 16);
    }

    #[test]
    fn load_rejects_invalid_program_with_log() {
        if moat_core::testing::needs_root("load_rejects_invalid_program_with_log") {
            return;
        }
        // A program without exit is refused by the verifier.
        let insns = [BpfInsn::new(0xb7, 0, 0, 0, 1)];
        let err = prog_load_cgroup_device(&insns).unwrap_err();
        assert!(err.error.raw_os_error().is_some());
    }

    #[test]
    fn load_accepts_trivial_program() {
        if moat_core::testing::needs_root("load_accepts_trivial_program") {
            return;
        }
        let insns = [
            BpfInsn::new(0xb7, 0, 0, 0, 1),
            BpfInsn::new(0x95, 0, 0, 0, 0),
        ];
        let fd = prog_load_cgroup_device(&insns).expect("load");
        assert!(fd.as_raw_fd() >= 0);
    }
}
