//! What a microVM is made of. The same [`VmConfig`] drives the built-in VMM
//! ([`crate::Vm`]) and the QEMU backend ([`crate::qemu`]).

use std::fs::File;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use crate::layout::{MAX_MEM_MIB, MAX_VCPUS, MIN_MEM_MIB, VIRTIO_IRQ_BASE, VIRTIO_IRQ_LAST};
use crate::VmmError;

/// What the vCPUs start running.
#[derive(Debug, Clone)]
pub enum Kernel {
    /// A Linux kernel: an uncompressed `vmlinux` (ELF, entered at its 64-bit
    /// entry point) or a `bzImage` (entered at `startup_64`); the format is
    /// told from the file's magic.
    Linux(PathBuf),
    /// Raw 64-bit machine code, loaded at [`crate::layout::PAYLOAD_ADDR`] and
    /// entered there by every vCPU at once, in long mode with the low 4 GiB
    /// identity-mapped and RSI pointing at the zero page. For tests and
    /// measurements with tiny guests; the QEMU backend does not take it.
    Payload(Vec<u8>),
}

/// A virtio block device backed by a raw image file.
#[derive(Debug, Clone)]
pub struct BlockConfig {
    /// The raw image (with `file`, only its name in messages).
    pub path: PathBuf,
    /// Refuse guest writes (advertised to the guest as `VIRTIO_BLK_F_RO`).
    pub read_only: bool,
    /// The image, opened by the caller (readable, and writable unless
    /// `read_only`): the VMM then opens nothing by path, as in a jail
    /// whose root does not hold the image. The built-in VMM only.
    pub file: Option<std::sync::Arc<File>>,
}

/// Configuration of one microVM.
#[derive(Debug)]
pub struct VmConfig {
    /// Number of vCPUs, 1..=64.
    pub vcpus: u8,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// Kernel or payload.
    pub kernel: Kernel,
    /// Initramfs (Linux kernels only).
    pub initrd: Option<PathBuf>,
    /// Kernel command line; the VMM appends its additions (and, with
    /// [`Discovery::Cmdline`], its device announcements).
    pub cmdline: String,
    /// How the guest learns of its vCPUs and devices.
    pub discovery: Discovery,
    /// Where the guest's serial console (COM1) output goes; `None` drops it.
    pub serial_out: Option<File>,
    /// Block devices, in order (`/dev/vda`, `/dev/vdb`, ...).
    pub block: Vec<BlockConfig>,
    /// Offer a virtio entropy device.
    pub rng: bool,
    /// Offer a virtio balloon that takes the guest's free page reports
    /// and gives those pages back to the host (nothing else of a balloon).
    pub balloon: bool,
    /// The guest agent channel: a virtio console port (`/dev/hvc0` in the
    /// guest) whose bytes travel over this connected host socket.
    pub agent: Option<UnixStream>,
    /// The guest's network card (virtio-net), its frames over a connected
    /// host stream socket (length-prefixed as QEMU's `-netdev stream`) or
    /// a TAP device ([`NetBackend`]).
    pub net: Option<NetConfig>,
    /// More network cards after that one (a pod's other interfaces), each
    /// on a TAP device of its own.
    pub more_net: Vec<NetConfig>,
    /// virtio-fs shares, each served by a vhost-user back-end (virtiofsd)
    /// on a connected socket, in the first of the [`VmConfig::fs_slots`].
    /// With any, guest RAM is a shared memfd the back-ends map (a restored
    /// VM's copied into one from the snapshot), and the VM is not saved.
    pub fs: Vec<FsConfig>,
    /// virtio-mmio slots for virtio-fs devices, the [`VmConfig::fs`]
    /// first and placeholders after them (device ID 0, which the guest
    /// skips), so that a VM saved without shares and one restored with
    /// some have the same devices. 0: exactly one per share.
    pub fs_slots: usize,
    /// Whether the shares' devices stay hidden (their slots placeholders)
    /// until [`crate::FsHandle::show`]: a VM saved after its boot, then
    /// given its shares.
    pub fs_later: bool,
    /// See [`ThreadHook`]; `None` runs the threads as they are.
    pub thread_hook: Option<ThreadHook>,
}

/// How a Linux guest learns of the vCPUs, the I/O APIC and the virtio-mmio
/// devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Discovery {
    /// ACPI tables (a MADT; a DSDT with each device): for kernels built with
    /// ACPI, as distributions' are (Debian's cloud kernel has neither of the
    /// other ways). The MP table is there too.
    #[default]
    Acpi,
    /// No ACPI tables: the MP table, and a `virtio_mmio.device=` word per
    /// device on the command line, for kernels built without ACPI but with
    /// `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES` (a kernel with both would find
    /// every device twice if it were given both).
    Cmdline,
}

/// What a thread the VMM starts does: the role its seccomp filter is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadRole {
    /// `KVM_RUN` and every exit, including the devices' work on a queue
    /// notification (block I/O, console and network transmits).
    Vcpu,
    /// Reads the agent socket into the console's receive buffer.
    AgentIo,
    /// Reads the network socket into the card's receive queue.
    NetIo,
    /// The thread that called [`crate::Vm::run`], once every other thread
    /// has started: it waits for the VM's end, kicks the vCPUs out of
    /// `KVM_RUN`, joins the threads and stops the I/O; and writes the
    /// snapshots asked for ([`crate::SnapshotHandle`]).
    Main,
    /// A thread of the caller's that asks for snapshots
    /// ([`crate::SnapshotHandle::save`]) when its controller says so (the
    /// VMM itself starts none; the hook is the caller's to run on it).
    Control,
}

/// Run first thing on every thread the VMM starts (to load that role's
/// seccomp filter), and on the thread that runs the VM once the others
/// have started ([`ThreadRole::Main`]); an error stops the VM before the
/// thread does anything else (fail closed).
#[derive(Clone)]
#[allow(clippy::type_complexity)]
pub struct ThreadHook(pub std::sync::Arc<dyn Fn(ThreadRole) -> Result<(), String> + Send + Sync>);

impl ThreadHook {
    /// Runs the hook for `role` on the calling thread.
    pub fn enter(&self, role: ThreadRole) -> Result<(), crate::VmmError> {
        (self.0)(role).map_err(|message| crate::VmmError::ThreadSetup { role, message })
    }
}

impl std::fmt::Debug for ThreadHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ThreadHook")
    }
}

/// A virtio-fs device: its tag (what the guest mounts) and the socket
/// connected to its vhost-user back-end.
#[derive(Debug)]
pub struct FsConfig {
    /// The tag, 1 to 36 bytes.
    pub tag: String,
    /// Connected to the back-end (virtiofsd), which serves no other.
    pub socket: UnixStream,
}

/// A virtio-net device: where its frames go, the guest's MAC and MTU.
#[derive(Debug)]
pub struct NetConfig {
    /// The host side of the link.
    pub backend: NetBackend,
    pub mac: [u8; 6],
    pub mtu: u16,
}

/// Where a virtio-net device's frames go on the host.
#[derive(Debug)]
pub enum NetBackend {
    /// A connected stream socket: each frame after its 4-byte big-endian
    /// length, both ways (QEMU's `-netdev stream`; moat's user-space
    /// stack).
    Stream(UnixStream),
    /// A TAP device's descriptor (`IFF_TAP | IFF_NO_PI`): one frame per
    /// `read` and per `write`. The device makes it non-blocking (a flag of
    /// the open file, so any copy of the descriptor sees it too): a frame
    /// the TAP cannot take at once is dropped, and the I/O thread waits in
    /// `ppoll`.
    Tap {
        /// The descriptor.
        file: File,
        /// Whether the TAP was made with `IFF_VNET_HDR`: each frame then
        /// comes and goes after a virtio-net header, and the guest gets
        /// checksum and segmentation offloads
        /// ([`crate::virtio::net::OFFLOADS`]). Without it, bare frames.
        vnet_hdr: bool,
    },
}

impl From<UnixStream> for NetBackend {
    fn from(socket: UnixStream) -> Self {
        NetBackend::Stream(socket)
    }
}

impl VmConfig {
    /// A configuration with no devices beyond the serial console.
    pub fn new(kernel: Kernel, vcpus: u8, mem_mib: u64) -> Self {
        VmConfig {
            vcpus,
            mem_mib,
            kernel,
            initrd: None,
            cmdline: String::new(),
            discovery: Discovery::default(),
            serial_out: None,
            block: Vec::new(),
            rng: false,
            balloon: false,
            agent: None,
            net: None,
            more_net: Vec::new(),
            fs: Vec::new(),
            fs_slots: 0,
            fs_later: false,
            thread_hook: None,
        }
    }

    /// How many virtio-mmio devices this configuration asks for.
    pub fn virtio_device_count(&self) -> usize {
        self.block.len()
            + usize::from(self.rng)
            + usize::from(self.balloon)
            + usize::from(self.agent.is_some())
            + usize::from(self.net.is_some())
            + self.more_net.len()
            + self.fs.len().max(self.fs_slots)
    }

    /// Checks the limits that do not need KVM.
    pub fn validate(&self) -> Result<(), VmmError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(VmmError::Config(format!(
                "vcpus must be 1..={MAX_VCPUS}, not {}",
                self.vcpus
            )));
        }
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&self.mem_mib) {
            return Err(VmmError::Config(format!(
                "memory must be {MIN_MEM_MIB}..={MAX_MEM_MIB} MiB, not {}",
                self.mem_mib
            )));
        }
        let irqs = (VIRTIO_IRQ_LAST - VIRTIO_IRQ_BASE + 1) as usize;
        if self.virtio_device_count() > irqs {
            return Err(VmmError::Config(format!(
                "at most {irqs} virtio devices, not {}",
                self.virtio_device_count()
            )));
        }
        if self.fs_slots > 0 && self.fs.len() > self.fs_slots {
            return Err(VmmError::Config(format!(
                "{} virtio-fs devices for {} slots",
                self.fs.len(),
                self.fs_slots
            )));
        }
        if matches!(self.kernel, Kernel::Payload(_)) && self.initrd.is_some() {
            return Err(VmmError::Config("a raw payload takes no initramfs".into()));
        }
        if self.cmdline.bytes().any(|b| b == 0 || b == b'\n') {
            return Err(VmmError::Config(
                "kernel command line holds a NUL or newline".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload() -> Kernel {
        Kernel::Payload(vec![0xf4])
    }

    #[test]
    fn limits_are_refused() {
        assert!(VmConfig::new(payload(), 1, 16).validate().is_ok());
        assert!(VmConfig::new(payload(), 0, 16).validate().is_err());
        assert!(VmConfig::new(payload(), 65, 16).validate().is_err());
        assert!(VmConfig::new(payload(), 1, 1).validate().is_err());
        assert!(VmConfig::new(payload(), 1, MAX_MEM_MIB + 1)
            .validate()
            .is_err());
        let mut c = VmConfig::new(payload(), 1, 16);
        c.cmdline = "console=ttyS0\0evil".into();
        assert!(c.validate().is_err());
        // Nineteen interrupt lines (5-23): nineteen devices, not twenty;
        // empty virtio-fs slots count.
        let mut c = VmConfig::new(payload(), 1, 16);
        c.block = (0..17)
            .map(|_| BlockConfig {
                path: "/dev/null".into(),
                read_only: true,
                file: None,
            })
            .collect();
        c.fs_slots = 2;
        assert!(c.validate().is_ok());
        c.fs_slots = 3;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("at most 19 virtio devices, not 20"), "{e}");
        // More shares than slots.
        c.block.clear();
        c.fs_slots = 1;
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        for tag in ["one", "two"] {
            c.fs.push(FsConfig {
                tag: tag.into(),
                socket: a.try_clone().unwrap(),
            });
        }
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("2 virtio-fs devices for 1 slots"), "{e}");
    }
}
