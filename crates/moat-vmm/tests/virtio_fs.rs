//! moat's own VMM's virtio-fs device (`moat_vmm::virtio::fs`) against a
//! real virtiofsd, with this test as the guest's driver: it negotiates
//! the device through the virtio-mmio transport's registers, which hands
//! the back-end the memory table and the queues, then puts FUSE requests
//! on the request queue in shared guest memory, notifies, waits for the
//! back-end's interrupt on the irqfd's eventfd and reads the answers out
//! of the used ring: the back-end served them straight from guest memory,
//! and a directory the "guest" makes is on the host.
//!
//! No KVM here: the guest is this test (a Linux guest's driver does the
//! same over MMIO exits; `e2e_microvm_builtin_tier.rs` runs that). Needs
//! root (virtiofsd's sandbox) and virtiofsd (`qemu-system-common`'s, or
//! the `virtiofsd` package's; `MOAT_VIRTIOFSD` names another).

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use std::time::{Duration, Instant};

#[path = "common/virtiofsd.rs"]
mod virtiofsd;

use moat_vmm::virtio::fs::{Fs, DEVICE_ID_FS, TAG_LEN};
use moat_vmm::virtio::mmio::{
    MmioTransport, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
    STATUS_NEEDS_RESET,
};
use moat_vmm::virtio::VIRTIO_F_VERSION_1;
use virtiofsd::backend;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const MEM: usize = 4 << 20;
const QSIZE: u16 = 16;
/// Queue `q`'s descriptor table, available and used rings.
fn rings(q: u64) -> (u64, u64, u64) {
    let base = 0x10_000 * (q + 1);
    (base, base + 0x1000, base + 0x2000)
}
const BUFFERS: u64 = 0x100_000;

/// Bounds a hung back-end: far above what an answer takes.
const ANSWER_LIMIT: Duration = Duration::from_secs(20);

const FUSE_LOOKUP: u32 = 1;
const FUSE_MKDIR: u32 = 9;
const FUSE_INIT: u32 = 26;
const IN_HEADER: usize = 40;
const OUT_HEADER: usize = 16;
const ENTRY_OUT: usize = 128;

/// Ignores the transport's own interrupts (the back-end raises the
/// device's line through the eventfd this test reads).
struct NoIrq;
impl vm_superio::Trigger for NoIrq {
    type E = ();
    fn trigger(&self) -> Result<(), ()> {
        Ok(())
    }
}

/// Guest memory as the VMM makes it for virtio-fs: a memfd mapped shared.
fn shared_memory() -> GuestMemoryMmap<()> {
    let fd = rustix::fs::memfd_create("test-guest-ram", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    let file = std::fs::File::from(fd);
    file.set_len(MEM as u64).unwrap();
    let region = MmapRegionBuilder::<()>::new(MEM)
        .with_file_offset(FileOffset::new(file, 0))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_SHARED)
        .build()
        .unwrap();
    GuestMemoryMmap::from_regions(vec![GuestRegionMmap::new(region, GuestAddress(0)).unwrap()])
        .unwrap()
}

struct Driver {
    t: MmioTransport<Fs, NoIrq>,
    mem: GuestMemoryMmap<()>,
    call: EventFd,
    unique: u64,
    avail_idx: u16,
    used_seen: u16,
}

impl Driver {
    /// A device tagged `tag` in shared guest memory, its vhost-user
    /// session open on `be`, driven from its reset state.
    fn open(be: &virtiofsd::Backend, tag: &str) -> Driver {
        let mem = shared_memory();
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        let fs = Fs::new(
            be.socket.try_clone().unwrap(),
            tag,
            &mem,
            call.try_clone().unwrap(),
        )
        .expect("the vhost-user session opens");
        Driver {
            t: MmioTransport::new(fs, NoIrq, mem.clone()),
            mem,
            call,
            unique: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    fn w(&mut self, reg: u64, v: u32) {
        self.t.write(reg, &v.to_le_bytes());
    }
    fn r(&mut self, reg: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(reg, &mut b);
        u32::from_le_bytes(b)
    }

    /// What a virtio-mmio driver does, up to DRIVER_OK.
    fn start(&mut self) {
        assert_eq!(self.r(0x008), DEVICE_ID_FS);
        self.w(0x070, STATUS_ACKNOWLEDGE);
        self.w(0x070, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        self.w(0x014, 1);
        let high = self.r(0x010);
        assert_ne!(high & 1, 0, "VIRTIO_F_VERSION_1 offered");
        self.w(0x024, 1);
        self.w(0x020, (VIRTIO_F_VERSION_1 >> 32) as u32);
        self.w(0x024, 0);
        self.w(0x020, 0);
        let ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        self.w(0x070, ok);
        assert_ne!(self.r(0x070) & STATUS_FEATURES_OK, 0);
        for q in 0..2u64 {
            let (desc, avail, used) = rings(q);
            self.w(0x030, q as u32);
            assert!(self.r(0x034) >= u32::from(QSIZE));
            self.w(0x038, u32::from(QSIZE));
            for (reg, addr) in [(0x080, desc), (0x090, avail), (0x0a0, used)] {
                self.w(reg, addr as u32);
                self.w(reg + 4, (addr >> 32) as u32);
            }
            self.w(0x044, 1);
        }
        self.w(0x070, ok | STATUS_DRIVER_OK);
        assert_eq!(
            self.r(0x070) & STATUS_NEEDS_RESET,
            0,
            "the device started (the back-end took the queues)"
        );
    }

    /// Sends one FUSE request on the request queue (1): `body` after the
    /// header, `out_len` bytes of answer room after the answer's header.
    /// Returns the answer's header error and body.
    fn request(&mut self, opcode: u32, nodeid: u64, body: &[u8], out_len: usize) -> (i32, Vec<u8>) {
        self.unique += 1;
        let mut req = Vec::with_capacity(IN_HEADER + body.len());
        req.extend_from_slice(&((IN_HEADER + body.len()) as u32).to_le_bytes());
        req.extend_from_slice(&opcode.to_le_bytes());
        req.extend_from_slice(&self.unique.to_le_bytes());
        req.extend_from_slice(&nodeid.to_le_bytes());
        req.extend_from_slice(&[0u8; 16]); // uid, gid, pid: root; no extensions
        req.extend_from_slice(body);
        let (desc, avail, used) = rings(1);
        let slot = u64::from(self.avail_idx % QSIZE);
        let inbuf = BUFFERS + slot * 0x2000;
        let outbuf = inbuf + 0x1000;
        self.mem.write_slice(&req, GuestAddress(inbuf)).unwrap();
        let d0 = (slot * 2) as u16;
        let d1 = d0 + 1;
        let put = |i: u16, addr: u64, len: u32, flags: u16, next: u16| {
            let at = desc + u64::from(i) * 16;
            self.mem.write_obj(addr, GuestAddress(at)).unwrap();
            self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            self.mem.write_obj(next, GuestAddress(at + 14)).unwrap();
        };
        put(d0, inbuf, req.len() as u32, 1, d1); // NEXT
        put(d1, outbuf, (OUT_HEADER + out_len) as u32, 2, 0); // WRITE
        self.mem
            .write_obj(d0, GuestAddress(avail + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(avail + 2))
            .unwrap();
        self.w(0x050, 1);
        self.wait_used(used);
        let entry = used + 4 + 8 * u64::from(self.used_seen % QSIZE);
        let id: u32 = self.mem.read_obj(GuestAddress(entry)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(entry + 4)).unwrap();
        self.used_seen = self.used_seen.wrapping_add(1);
        assert_eq!(id, u32::from(d0), "the answer is to this chain");
        let mut out = vec![0u8; len as usize];
        self.mem.read_slice(&mut out, GuestAddress(outbuf)).unwrap();
        assert!(
            out.len() >= OUT_HEADER,
            "an answer with its header: {len} bytes"
        );
        let olen = u32::from_le_bytes(out[0..4].try_into().unwrap());
        let error = i32::from_le_bytes(out[4..8].try_into().unwrap());
        let unique = u64::from_le_bytes(out[8..16].try_into().unwrap());
        assert_eq!(olen, len, "the header's length is what was written");
        assert_eq!(unique, self.unique);
        (error, out[OUT_HEADER..].to_vec())
    }

    /// Waits for the back-end's interrupt (the irqfd's eventfd), then for
    /// the used ring to move past what was seen.
    fn wait_used(&mut self, used: u64) {
        let deadline = Instant::now() + ANSWER_LIMIT;
        loop {
            let idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).unwrap();
            if idx != self.used_seen {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no answer from virtiofsd");
            let mut pfd = libc::pollfd {
                fd: self.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut pfd, 1, left.as_millis() as i32) };
            let _ = self.call.read();
        }
        // While the device runs, the transport reports a used buffer.
        assert_eq!(self.r(0x060) & 1, 1, "InterruptStatus says used buffer");
    }
}

#[test]
fn virtio_fs_requests_are_served_by_virtiofsd_from_guest_memory() {
    // Kept whole: its temporary directory goes with it.
    let served = virtiofsd::served();
    let (share, be) = (&served.share, &served.backend);
    std::fs::write(share.join("hello"), b"hello from the host\n").unwrap();
    let mut d = Driver::open(be, "moatfs0");
    // The configuration space: the tag, NUL-padded, and one request queue.
    let mut config = [0u8; TAG_LEN + 4];
    d.t.read(0x100, &mut config);
    assert_eq!(&config[..8], b"moatfs0\0");
    assert_eq!(u32::from_le_bytes(config[TAG_LEN..].try_into().unwrap()), 1);
    assert_eq!(d.r(0x060), 0, "no interrupt reported before DRIVER_OK");
    d.start();

    // FUSE_INIT 7.31.
    let mut init = Vec::new();
    for v in [7u32, 31, 0, 0] {
        init.extend_from_slice(&v.to_le_bytes());
    }
    let (error, out) = d.request(FUSE_INIT, 0, &init, 64);
    assert_eq!(error, 0, "FUSE_INIT answered");
    assert_eq!(
        u32::from_le_bytes(out[0..4].try_into().unwrap()),
        7,
        "FUSE major 7"
    );

    // A host file, looked up from the "guest": its size is the host's.
    let (error, out) = d.request(FUSE_LOOKUP, 1, b"hello\0", ENTRY_OUT);
    assert_eq!(error, 0, "the host's file is found");
    let size = u64::from_le_bytes(out[48..56].try_into().unwrap());
    assert_eq!(size, 20);
    let (error, _) = d.request(FUSE_LOOKUP, 1, b"absent\0", ENTRY_OUT);
    assert_eq!(error, -libc::ENOENT);

    // A directory made in the "guest" is on the host.
    let mut mkdir = Vec::new();
    mkdir.extend_from_slice(&0o755u32.to_le_bytes());
    mkdir.extend_from_slice(&0u32.to_le_bytes());
    mkdir.extend_from_slice(b"made-in-the-guest\0");
    let (error, _) = d.request(FUSE_MKDIR, 1, &mkdir, ENTRY_OUT);
    assert_eq!(error, 0, "FUSE_MKDIR answered");
    assert!(share.join("made-in-the-guest").is_dir());

    // A reset stops the back-end's queues; the transport stops reporting.
    d.w(0x070, 0);
    assert_eq!(d.r(0x060), 0);
}

#[test]
fn a_back_end_gone_before_the_driver_starts_leaves_the_device_needing_a_reset() {
    assert!(
        rustix::process::geteuid().is_root(),
        "needs root: virtiofsd sets up its sandbox"
    );
    let tmp = tempfile::tempdir().unwrap();
    let mut be = backend(tmp.path(), &tmp.path().join("fs.sock"));
    let mut d = Driver::open(&be, "gone");
    be.child.kill().unwrap();
    be.child.wait().unwrap();
    d.w(0x070, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    d.w(0x024, 1);
    d.w(0x020, (VIRTIO_F_VERSION_1 >> 32) as u32);
    d.w(
        0x070,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    );
    d.w(
        0x070,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
    );
    assert_ne!(
        d.r(0x070) & STATUS_NEEDS_RESET,
        0,
        "the device says it failed"
    );
}

#[test]
fn a_virtio_fs_device_needs_a_tag_that_fits_and_shared_memory() {
    let (a, _b) = UnixStream::pair().unwrap();
    let private = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let call = || EventFd::new(EFD_NONBLOCK).unwrap();
    let long = "t".repeat(TAG_LEN + 1);
    for tag in ["", long.as_str(), "a\0b"] {
        let e = Fs::new(a.try_clone().unwrap(), tag, &private, call())
            .err()
            .unwrap();
        assert!(e.to_string().contains("tag"), "{tag:?}: {e}");
    }
    let e = Fs::new(a, "ok", &private, call()).err().unwrap();
    assert!(e.to_string().contains("not shared"), "{e}");
}
