//! A microVM on the built-in VMM: [`Vm::new`] builds it step by step,
//! [`Vm::run`] runs its vCPUs until the guest resets, powers off or faults,
//! or the host stops it.

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuFd, VmFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::bus::{lock, Bus, MmioDevice, MmioSlot};
use crate::config::{Discovery, FsConfig, Kernel, NetBackend, ThreadHook, ThreadRole, VmConfig};
use crate::devices::i8042::I8042;
use crate::devices::serial::{SerialDevice, SerialOut};
use crate::devices::IrqLine;
use crate::layout::{
    KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR, MMIO_DEVICE_SIZE, MMIO_GAP_START, SERIAL_IRQ,
    VIRTIO_IRQ_BASE,
};
use crate::memory::{self, GuestMem};
use crate::virtio::balloon::Balloon;
use crate::virtio::block::Block;
use crate::virtio::console::{self, Console};
use crate::virtio::fs::{Fs, FsSlot, DEVICE_ID_FS};
use crate::virtio::mmio::MmioTransport;
use crate::virtio::net::{self, Net};
use crate::virtio::rng::Rng;
use crate::virtio::VirtioDevice;
use crate::x86_64::{acpi, boot, mptable, regs};
use crate::{snapshot, vcpu, VmmError};

/// Why a VM stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset the CPU through the i8042 (Linux `reboot` with
    /// `reboot=k`): moat's guests end this way.
    Reset,
    /// The guest triple-faulted (`KVM_EXIT_SHUTDOWN`).
    TripleFault,
    /// The guest powered off (`KVM_EXIT_SYSTEM_EVENT`).
    PowerOff,
    /// A vCPU halted with no interrupt controller to wake it.
    Halted,
    /// The host asked, through a [`StopHandle`].
    Stopped,
}

/// Shared by the vCPUs, the devices and the host: the first reason to stop wins.
#[derive(Debug, Default)]
pub struct ExitState {
    reason: Mutex<Option<ExitReason>>,
    failed: AtomicBool,
    stopping: AtomicBool,
    changed: Condvar,
    /// A snapshot asked for ([`SnapshotHandle::save`]), for the main thread.
    save: Mutex<Option<SaveRequest>>,
}

/// A snapshot to write, and where its outcome goes.
#[derive(Debug)]
struct SaveRequest {
    out: std::fs::File,
    reply: mpsc::Sender<Result<(), VmmError>>,
}

/// What woke the VM's main thread.
enum Wake {
    Ended(Option<ExitReason>),
    Save(SaveRequest),
}

impl ExitState {
    /// Records `reason` unless one is already recorded.
    pub fn set(&self, reason: ExitReason) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            *r = Some(reason);
        }
        self.stopping.store(true, Ordering::SeqCst);
        self.changed.notify_all();
    }

    fn fail(&self) {
        self.failed.store(true, Ordering::SeqCst);
        self.stopping.store(true, Ordering::SeqCst);
        let _r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        self.changed.notify_all();
    }

    /// Whether the VM is stopping.
    pub fn is_set(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    fn wait(&self) -> Wake {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if r.is_some() || self.failed.load(Ordering::SeqCst) {
                return Wake::Ended(*r);
            }
            if let Some(req) = self.save.lock().unwrap_or_else(|e| e.into_inner()).take() {
                return Wake::Save(req);
            }
            r = self.changed.wait(r).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Saves a running VM ([`crate::snapshot`]) from another thread.
#[derive(Debug, Clone)]
pub struct SnapshotHandle(Arc<ExitState>);

impl SnapshotHandle {
    /// Pauses the VM, writes its snapshot to `out` (from the start: the
    /// file is truncated), and lets it run on; returns once written. Fails
    /// if the VM is not running or stops meanwhile.
    pub fn save(&self, out: &std::fs::File) -> Result<(), VmmError> {
        let out = out
            .try_clone()
            .map_err(|e| VmmError::snapshot("duplicate the snapshot file", e))?;
        let (reply, answer) = mpsc::channel();
        {
            let _r = self.0.reason.lock().unwrap_or_else(|e| e.into_inner());
            if self.0.is_set() {
                return Err(VmmError::snapshot(
                    "save",
                    std::io::Error::other("the VM has stopped"),
                ));
            }
            *self.0.save.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(SaveRequest { out, reply });
            self.0.changed.notify_all();
        }
        answer.recv().unwrap_or_else(|_| {
            Err(VmmError::snapshot(
                "save",
                std::io::Error::other("the VM stopped before saving"),
            ))
        })
    }
}

/// Stops a running VM from another thread.
#[derive(Debug, Clone)]
pub struct StopHandle(Arc<ExitState>);

impl StopHandle {
    /// Asks the VM to stop; [`Vm::run`] then returns [`ExitReason::Stopped`]
    /// unless the guest stopped first.
    pub fn stop(&self) {
        self.0.set(ExitReason::Stopped);
    }
}

/// A device's host side, run on an I/O thread of its own by [`Vm::run`]
/// (the agent console's, the network card's): what the thread runs, and
/// how to stop it.
struct IoSide {
    name: &'static str,
    role: ThreadRole,
    body: Box<dyn FnOnce() + Send>,
    stop: Box<dyn Fn() + Send>,
}

/// A running [`IoSide`].
struct IoRunning {
    thread: JoinHandle<Result<(), VmmError>>,
    stop: Box<dyn Fn() + Send>,
}

/// A built microVM, ready to run. Field order is drop order: vCPUs and the
/// VM fd go before guest memory.
pub struct Vm {
    vcpus: Vec<VcpuFd>,
    bus: Arc<Bus>,
    io: Vec<IoSide>,
    hook: Option<ThreadHook>,
    exit: Arc<ExitState>,
    cmdline: String,
    gate: Arc<vcpu::PauseGate>,
    msrs: Arc<[u32]>,
    mem_mib: u64,
    fs: FsHandle,
    vm: VmFd,
    _kvm: Kvm,
    mem: GuestMem,
}

fn open_kvm() -> Result<Kvm, VmmError> {
    let kvm = Kvm::new().map_err(VmmError::OpenKvm)?;
    for (cap, name) in [
        (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (Cap::Irqfd, "KVM_CAP_IRQFD"),
        (Cap::Pit2, "KVM_CAP_PIT2"),
        (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmmError::KvmCapability(name));
        }
    }
    Ok(kvm)
}

fn create_vm(kvm: &Kvm) -> Result<VmFd, VmmError> {
    let vm = kvm.create_vm().map_err(VmmError::CreateVm)?;
    vm.set_tss_address(KVM_TSS_ADDR)
        .map_err(|e| VmmError::VmSetup("set TSS address", e))?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
        .map_err(|e| VmmError::VmSetup("set identity map address", e))?;
    vm.create_irq_chip()
        .map_err(|e| VmmError::VmSetup("create irqchip", e))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(|e| VmmError::VmSetup("create PIT", e))?;
    Ok(vm)
}

fn irq_line(vm: &VmFd, gsi: u32) -> Result<IrqLine, VmmError> {
    let err = |source| VmmError::Irq { gsi, source };
    let fd = EventFd::new(EFD_NONBLOCK).map_err(err)?;
    vm.register_irqfd(&fd, gsi)
        .map_err(|e| err(std::io::Error::from_raw_os_error(e.errno())))?;
    Ok(IrqLine::new(fd))
}

/// The virtio devices of a VM, their MMIO windows and interrupt lines.
struct VirtioSet {
    slots: Vec<MmioSlot>,
    described: Vec<acpi::MmioDevice>,
    io: Vec<IoSide>,
    /// The virtio-fs slots, in order.
    fs: Vec<FsTransport>,
}

/// A virtio-fs slot behind its transport.
type FsTransport = Arc<Mutex<MmioTransport<FsSlot, IrqLine>>>;

/// Shows a VM's hidden virtio-fs devices ([`crate::VmConfig::fs_later`])
/// from another thread, the VM running or not.
#[derive(Clone)]
pub struct FsHandle(Arc<[FsTransport]>);

impl FsHandle {
    /// Shows every hidden device: each slot reads as its virtio-fs device
    /// from now on (the guest binds it when it probes the slot again).
    /// Refused for a slot the guest has driven as a placeholder (its
    /// status register written: nothing a guest that skipped it does).
    /// Returns how many were shown.
    pub fn show(&self) -> Result<usize, VmmError> {
        let mut shown = 0;
        for (index, t) in self.0.iter().enumerate() {
            let mut t = lock(t);
            if !t.device().is_hidden() {
                continue;
            }
            if t.status() != 0 {
                return Err(VmmError::Config(format!(
                    "virtio-fs slot {index}: the guest drove the placeholder (status {:#x})",
                    t.status()
                )));
            }
            t.device_mut().show();
            shown += 1;
        }
        Ok(shown)
    }
}

impl VirtioSet {
    /// The next device's MMIO window and interrupt line.
    fn next_slot(&self) -> (u64, u32) {
        let n = self.slots.len() as u64;
        (
            MMIO_GAP_START + n * MMIO_DEVICE_SIZE,
            VIRTIO_IRQ_BASE + n as u32,
        )
    }

    fn add<D: VirtioDevice + 'static>(
        &mut self,
        vm: &VmFd,
        mem: &GuestMem,
        device: D,
    ) -> Result<Arc<Mutex<MmioTransport<D, IrqLine>>>, VmmError> {
        let (_, gsi) = self.next_slot();
        let irq = irq_line(vm, gsi)?;
        Ok(self.insert(mem, device, irq))
    }

    /// Adds `device` in the next slot ([`VirtioSet::next_slot`]), raising `irq`.
    fn insert<D: VirtioDevice + 'static>(
        &mut self,
        mem: &GuestMem,
        device: D,
        irq: IrqLine,
    ) -> Arc<Mutex<MmioTransport<D, IrqLine>>> {
        let (base, gsi) = self.next_slot();
        let transport = Arc::new(Mutex::new(MmioTransport::new(device, irq, mem.clone())));
        let dyn_device: Arc<Mutex<dyn MmioDevice>> = transport.clone();
        self.slots.push(MmioSlot {
            base,
            device: dyn_device,
        });
        self.described.push(acpi::MmioDevice { base, gsi });
        transport
    }

    /// Adds a virtio-fs slot holding the device served by the vhost-user
    /// back-end on `config.socket`, hidden ([`FsHandle::show`]): the
    /// back-end signals the device's irqfd itself, and the driver's
    /// notifications reach it as KVM ioeventfds (registered now: the
    /// guest writes no placeholder's registers).
    fn add_fs(&mut self, vm: &VmFd, mem: &GuestMem, config: FsConfig) -> Result<(), VmmError> {
        let name = format!("virtio-fs {:?}", config.tag);
        let device_err = |source| VmmError::Device {
            name: name.clone(),
            source,
        };
        let (base, gsi) = self.next_slot();
        let irq = irq_line(vm, gsi)?;
        let call = irq
            .eventfd()
            .try_clone()
            .map_err(|e| device_err(crate::virtio::DeviceError::Eventfd(e)))?;
        let device = Fs::new(config.socket, &config.tag, mem, call).map_err(device_err)?;
        let notify = IoEventAddress::Mmio(base + crate::virtio::mmio::REG_QUEUE_NOTIFY);
        for index in 0..crate::virtio::fs::QUEUES {
            let kick = device.kick(index).ok_or_else(|| {
                device_err(crate::virtio::DeviceError::Fs(format!("no queue {index}")))
            })?;
            vm.register_ioevent(kick, &notify, index as u32)
                .map_err(|e| {
                    device_err(crate::virtio::DeviceError::Eventfd(
                        std::io::Error::from_raw_os_error(e.errno()),
                    ))
                })?;
        }
        let slot = self.insert(mem, FsSlot::hidden(device), irq);
        self.fs.push(slot);
        Ok(())
    }
}

fn create_virtio(vm: &VmFd, mem: &GuestMem, config: &mut VmConfig) -> Result<VirtioSet, VmmError> {
    let mut set = VirtioSet {
        slots: Vec::new(),
        described: Vec::new(),
        io: Vec::new(),
        fs: Vec::new(),
    };
    for (i, b) in config.block.iter().enumerate() {
        let id = format!("moat-vd{}", (b'a' + i as u8) as char);
        let dev = match &b.file {
            Some(f) => f
                .try_clone()
                .map_err(|source| crate::virtio::DeviceError::OpenImage {
                    path: b.path.clone(),
                    source,
                })
                .and_then(|f| Block::from_file(f, &b.path, b.read_only, &id)),
            None => Block::open(&b.path, b.read_only, &id),
        }
        .map_err(|source| VmmError::Device {
            name: id.clone(),
            source,
        })?;
        set.add(vm, mem, dev)?;
    }
    if config.rng {
        set.add(vm, mem, Rng::default())?;
    }
    if config.balloon {
        set.add(vm, mem, Balloon::default())?;
    }
    if let Some(socket) = config.agent.take() {
        let (dev, rx, reader) = Console::new(socket).map_err(|source| VmmError::Device {
            name: "agent console".into(),
            source,
        })?;
        let transport = set.add(vm, mem, dev)?;
        let wake = shut_on_stop("agent-io", &reader)?;
        set.io.push(io_side(
            ("agent-io", ThreadRole::AgentIo),
            transport,
            (reader, rx, wake),
            |s, rx, deliver| console::pump(s, rx, deliver),
            console::RxBuffer::close,
        ));
    }
    let nets: Vec<crate::config::NetConfig> = config
        .net
        .take()
        .into_iter()
        .chain(std::mem::take(&mut config.more_net))
        .collect();
    for n in nets {
        let device_err = |source| VmmError::Device {
            name: "network".into(),
            source,
        };
        let role = ("net-io", ThreadRole::NetIo);
        match n.backend {
            NetBackend::Stream(socket) => {
                let (dev, rx, reader) = Net::new(socket, n.mac, n.mtu).map_err(device_err)?;
                let transport = set.add(vm, mem, dev)?;
                let wake = shut_on_stop("net-io", &reader)?;
                set.io.push(io_side(
                    role,
                    transport,
                    (reader, rx, wake),
                    |s, rx, deliver| net::pump(s, rx, deliver),
                    net::FrameQueue::close,
                ));
            }
            NetBackend::Tap { file, vnet_hdr } => {
                let (dev, rx, reader) =
                    Net::with_tap(file, n.mac, n.mtu, vnet_hdr).map_err(device_err)?;
                let transport = set.add(vm, mem, dev)?;
                let stop = reader.stopper();
                set.io.push(io_side(
                    role,
                    transport,
                    (reader, rx, Box::new(move || stop.stop())),
                    |t, rx, deliver| net::pump_tap(t, rx, deliver),
                    net::FrameQueue::close,
                ));
            }
        }
    }
    let placeholders = config.fs_slots.saturating_sub(config.fs.len());
    for fs in std::mem::take(&mut config.fs) {
        set.add_fs(vm, mem, fs)?;
    }
    for _ in 0..placeholders {
        let slot = set.add(vm, mem, FsSlot::empty())?;
        set.fs.push(slot);
    }
    Ok(set)
}

/// The I/O side of a device whose host end is `reader`: a thread that
/// runs `pump` (reading the host end into `rx`, then running the device's
/// receive queue, 0), stopped by `close` on `rx` and by `wake`, which
/// wakes it out of its read or wait.
fn io_side<R: Send + 'static, Q: Send + Sync + 'static, D: VirtioDevice + 'static>(
    (name, role): (&'static str, ThreadRole),
    transport: Arc<Mutex<MmioTransport<D, IrqLine>>>,
    (reader, rx, wake): (R, Arc<Q>, Box<dyn Fn() + Send>),
    pump: fn(R, &Q, &mut dyn FnMut()),
    close: fn(&Q),
) -> IoSide {
    let rx_stop = rx.clone();
    IoSide {
        name,
        role,
        body: Box::new(move || {
            pump(reader, &rx, &mut || {
                transport
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .process_queue(0)
            })
        }),
        stop: Box::new(move || {
            close(&rx_stop);
            wake();
        }),
    }
}

/// The stop of an I/O side that reads `socket`: shutting the socket
/// (which wakes the thread out of its read; the VM is gone, so is the
/// channel).
fn shut_on_stop(name: &'static str, socket: &UnixStream) -> Result<Box<dyn Fn() + Send>, VmmError> {
    let closer = socket.try_clone().map_err(|source| VmmError::Device {
        name: name.into(),
        source: crate::virtio::DeviceError::CloneSocket(source),
    })?;
    Ok(Box::new(move || {
        let _ = closer.shutdown(std::net::Shutdown::Both);
    }))
}

/// Loads the kernel or payload and writes every boot structure; returns the entry.
fn load_guest(
    mem: &GuestMem,
    config: &VmConfig,
    devices: &[acpi::MmioDevice],
) -> Result<(u64, String), VmmError> {
    regs::write_boot_tables(mem)?;
    mptable::write(mem, config.vcpus)?;
    let mut additions = Vec::new();
    let rsdp = match config.discovery {
        Discovery::Acpi => Some(acpi::write(mem, config.vcpus, devices)?),
        Discovery::Cmdline => {
            additions.extend(
                devices
                    .iter()
                    .map(|d| format!("virtio_mmio.device=4K@{:#x}:{}", d.base, d.gsi)),
            );
            None
        }
    };
    if matches!(config.kernel, Kernel::Linux(_)) {
        additions.extend(boot::linux_additions(&config.cmdline));
    }
    let cmdline = boot::cmdline(&config.cmdline, &additions)?;
    let cmdline_len = cmdline
        .as_cstring()
        .map_err(VmmError::Cmdline)?
        .as_bytes()
        .len();
    let (entry, hdr, initrd) = match &config.kernel {
        Kernel::Payload(code) => (boot::load_payload(mem, code)?, Default::default(), None),
        Kernel::Linux(path) => {
            let (entry, hdr, kernel_end) = boot::load_kernel(mem, path)?;
            let initrd = match &config.initrd {
                Some(p) => Some(boot::load_initrd(
                    mem,
                    p,
                    kernel_end,
                    boot::initrd_addr_max(&hdr),
                )?),
                None => None,
            };
            (entry, hdr, initrd)
        }
    };
    boot::write_zero_page(
        mem,
        &cmdline,
        boot::ZeroPage {
            hdr,
            cmdline_len,
            initrd,
            rsdp,
        },
    )?;
    let text = cmdline
        .as_cstring()
        .map_err(VmmError::Cmdline)?
        .to_string_lossy()
        .into_owned();
    Ok((entry.0, text))
}

fn create_vcpus(
    kvm: &Kvm,
    vm: &VmFd,
    config: &VmConfig,
    entry: u64,
) -> Result<Vec<VcpuFd>, VmmError> {
    let host_cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| VmmError::VmSetup("get supported CPUID", e))?;
    let all_start = matches!(config.kernel, Kernel::Payload(_));
    let mut vcpus = Vec::with_capacity(config.vcpus.into());
    for index in 0..config.vcpus {
        let fd = vcpu::create(vm, index, config.vcpus, &host_cpuid)?;
        if index == 0 || all_start {
            vcpu::set_entry(&fd, index, entry)?;
        }
        vcpus.push(fd);
    }
    Ok(vcpus)
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The signal that pulls a vCPU thread out of `KVM_RUN`.
fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Where COM1's output goes (taken from `config`).
fn serial_out(config: &mut VmConfig) -> SerialOut {
    match config.serial_out.take() {
        Some(f) => SerialOut::File(f),
        None => SerialOut::Sink,
    }
}

/// What both ways of building a VM start from: KVM, the VM with its
/// in-kernel devices, the exit state.
struct Base {
    kvm: Kvm,
    vm: VmFd,
    exit: Arc<ExitState>,
}

impl Base {
    fn new(config: &VmConfig) -> Result<Base, VmmError> {
        config.validate()?;
        let kvm = open_kvm()?;
        let vm = create_vm(&kvm)?;
        Ok(Base {
            kvm,
            vm,
            exit: Arc::new(ExitState::default()),
        })
    }

    /// The VM, from its parts. Its virtio-fs devices, built hidden (a
    /// restore checks and takes the saved state of slots saved empty with
    /// them still placeholders), are shown now unless
    /// [`VmConfig::fs_later`].
    fn assemble(
        self,
        config: &mut VmConfig,
        (mem, serial, virtio): (GuestMem, SerialDevice<IrqLine>, VirtioSet),
        vcpus: Vec<VcpuFd>,
        cmdline: String,
    ) -> Result<Vm, VmmError> {
        let bus = Arc::new(Bus::new(
            serial,
            I8042::new(self.exit.clone()),
            virtio.slots,
        ));
        let fs = FsHandle(virtio.fs.into());
        if !config.fs_later {
            fs.show()?;
        }
        Ok(Vm {
            vcpus,
            bus,
            io: virtio.io,
            hook: config.thread_hook.take(),
            exit: self.exit,
            cmdline,
            gate: Arc::default(),
            msrs: snapshot::saveable_msrs(&self.kvm)?.into(),
            mem_mib: config.mem_mib,
            fs,
            vm: self.vm,
            _kvm: self.kvm,
            mem,
        })
    }
}

impl Vm {
    /// Builds a VM from `config`: KVM, memory, devices, guest image, vCPUs.
    pub fn new(mut config: VmConfig) -> Result<Vm, VmmError> {
        let base = Base::new(&config)?;
        let mem = if config.fs.is_empty() {
            memory::create(&base.vm, config.mem_mib)?
        } else {
            memory::create_shared(&base.vm, config.mem_mib)?
        };
        let serial = SerialDevice::new(irq_line(&base.vm, SERIAL_IRQ)?, serial_out(&mut config));
        let virtio = create_virtio(&base.vm, &mem, &mut config)?;
        let (entry, cmdline) = load_guest(&mem, &config, &virtio.described)?;
        let vcpus = create_vcpus(&base.kvm, &base.vm, &config, entry)?;
        base.assemble(&mut config, (mem, serial, virtio), vcpus, cmdline)
    }

    /// Builds a VM from `config` that carries on from the snapshot in
    /// `file` ([`crate::snapshot`]) instead of booting: the configuration
    /// must be the one the snapshot was saved with (vCPUs, memory, devices
    /// by kind and order; the kernel and initramfs are not loaded, the
    /// snapshot's memory holds them), with this run's sockets, disks and
    /// console. The file must stay unchanged while the VM runs (its pages
    /// are read as the guest touches them). virtio-fs devices fill slots
    /// saved empty (placeholders the guest skipped), shown unless
    /// [`VmConfig::fs_later`]; their VM's memory is a copy of the
    /// snapshot's in a shared memfd (the back-ends map it), not a mapping
    /// of the file.
    pub fn restore(mut config: VmConfig, file: &std::fs::File) -> Result<Vm, VmmError> {
        let base = Base::new(&config)?;
        let state = snapshot::read_state(file, config.mem_mib)?;
        let mem = if config.fs.is_empty() {
            memory::restore(&base.vm, config.mem_mib, file)?
        } else {
            memory::restore_shared(&base.vm, config.mem_mib, file)?
        };
        let out = serial_out(&mut config);
        let serial = SerialDevice::restore(irq_line(&base.vm, SERIAL_IRQ)?, out, &state.serial)
            .map_err(|e| VmmError::snapshot("restore COM1", std::io::Error::other(e)))?;
        let virtio = create_virtio(&base.vm, &mem, &mut config)?;
        let ids: Vec<u32> = virtio
            .slots
            .iter()
            .map(|s| lock(&s.device).state().device_id)
            .collect();
        snapshot::check_fits(&state, config.vcpus, &ids)?;
        for (slot, saved) in virtio.slots.iter().zip(&state.transports) {
            lock(&slot.device).set_state(saved).map_err(|e| {
                VmmError::snapshot("restore a virtio device", std::io::Error::other(e))
            })?;
        }
        snapshot::restore_kvm_vm(&base.vm, &state.kvm)?;
        let host_cpuid = base
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmmError::VmSetup("get supported CPUID", e))?;
        let mut vcpus = Vec::with_capacity(config.vcpus.into());
        for (index, saved) in (0..config.vcpus).zip(&state.vcpus) {
            let fd = vcpu::create(&base.vm, index, config.vcpus, &host_cpuid)?;
            snapshot::restore_vcpu(&fd, saved)?;
            vcpus.push(fd);
        }
        base.assemble(&mut config, (mem, serial, virtio), vcpus, state.cmdline)
    }

    /// A handle that shows this VM's hidden virtio-fs devices.
    pub fn fs_handle(&self) -> FsHandle {
        self.fs.clone()
    }

    /// A handle that saves this VM, once running, from another thread.
    pub fn snapshot_handle(&self) -> SnapshotHandle {
        SnapshotHandle(self.exit.clone())
    }

    /// A handle that stops this VM from another thread.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.exit.clone())
    }

    /// The kernel command line as the guest gets it (with the VMM's additions).
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// Guest memory (for tests).
    pub fn memory(&self) -> &GuestMem {
        &self.mem
    }

    /// Runs the VM until it stops; returns why.
    pub fn run(self) -> Result<ExitReason, VmmError> {
        let exit = self.exit.clone();
        let r = self.run_to_end();
        // A snapshot asked for too late gets an error, not a wait forever.
        exit.save.lock().unwrap_or_else(|e| e.into_inner()).take();
        r
    }

    fn run_to_end(mut self) -> Result<ExitReason, VmmError> {
        register_signal_handler(kick_signal(), kick_handler).map_err(VmmError::KickSignal)?;
        let io = match self.start_io() {
            Ok(io) => io,
            Err((e, started)) => {
                let _ = stop_io(started);
                return Err(e);
            }
        };
        let threads = self.start_vcpus();
        let threads = match threads {
            Ok(t) => t,
            Err(e) => {
                self.exit.set(ExitReason::Stopped);
                let _ = stop_io(io);
                return Err(e);
            }
        };
        // This thread's own confinement, now that it starts nothing more.
        let main_error = match self.hook.as_ref().map(|h| h.enter(ThreadRole::Main)) {
            Some(Err(e)) => {
                self.exit.fail();
                Some(e)
            }
            _ => None,
        };
        let reason = loop {
            match self.exit.wait() {
                Wake::Ended(reason) => break reason,
                Wake::Save(req) => {
                    let r = self.save(&threads, &req.out);
                    let _ = req.reply.send(r);
                }
            }
        };
        kick_until_finished(&threads);
        let mut first_error = None;
        for (index, t) in threads.into_iter().enumerate() {
            let r = t.join().unwrap_or(Err(VmmError::VcpuPanicked(index as u8)));
            if let (Err(e), None) = (r, &first_error) {
                first_error = Some(e);
            }
        }
        // Stopped whatever the vCPUs said; an I/O thread's error counts
        // after theirs.
        let io_error = stop_io(io);
        let first_error = main_error.or(first_error).or(io_error);
        match (first_error, reason) {
            (Some(e), _) => Err(e),
            (None, Some(reason)) => Ok(reason),
            (None, None) => Ok(ExitReason::Stopped),
        }
    }

    /// Pauses the vCPUs (kicking them out of `KVM_RUN` until each has
    /// parked with its state), writes the snapshot, lets them run on.
    fn save(
        &self,
        threads: &[JoinHandle<Result<(), VmmError>>],
        out: &std::fs::File,
    ) -> Result<(), VmmError> {
        self.gate.request(threads.len());
        let saved = loop {
            if let Some(s) = self.gate.take_if_parked() {
                break s;
            }
            if self.exit.is_set() || threads.iter().any(|t| t.is_finished()) {
                self.gate.release();
                return Err(VmmError::snapshot(
                    "pause the vCPUs",
                    std::io::Error::other("the VM stopped"),
                ));
            }
            for t in threads {
                let _ = t.kill(kick_signal());
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let r = self.write_snapshot(saved, out);
        self.gate.release();
        r
    }

    fn write_snapshot(
        &self,
        saved: Vec<Result<snapshot::VcpuState, VmmError>>,
        out: &std::fs::File,
    ) -> Result<(), VmmError> {
        let vcpus = saved.into_iter().collect::<Result<Vec<_>, _>>()?;
        let kvm = snapshot::save_kvm_vm(&self.vm)?;
        self.bus.with_state(|serial, transports| {
            // A back-end's state (virtiofsd's: its open files, the
            // guest's FUSE session) is not the VMM's to save.
            if transports.iter().any(|t| t.device_id == DEVICE_ID_FS) {
                return Err(VmmError::snapshot(
                    "save",
                    std::io::Error::other("a VM with a virtio-fs device is not saved"),
                ));
            }
            let state = snapshot::VmState {
                mem_mib: self.mem_mib,
                cmdline: self.cmdline.clone(),
                vcpus,
                kvm,
                serial,
                transports,
            };
            snapshot::write(out, &self.mem, &state)
        })
    }

    fn start_vcpus(&mut self) -> Result<Vec<JoinHandle<Result<(), VmmError>>>, VmmError> {
        let mut threads = Vec::with_capacity(self.vcpus.len());
        for (index, fd) in self.vcpus.drain(..).enumerate() {
            let index = index as u8;
            let shared = vcpu::Shared {
                bus: self.bus.clone(),
                exit: self.exit.clone(),
                gate: self.gate.clone(),
                msrs: self.msrs.clone(),
            };
            let exit = self.exit.clone();
            let hook = self.hook.clone();
            let name = format!("vcpu{index}");
            let t = std::thread::Builder::new()
                .name(name.clone())
                .spawn(move || {
                    let r = match hook.map(|h| h.enter(ThreadRole::Vcpu)) {
                        Some(Err(e)) => Err(e),
                        _ => vcpu::run(index, fd, shared),
                    };
                    if r.is_err() {
                        exit.fail();
                    }
                    r
                })
                .map_err(|source| VmmError::Spawn { name, source });
            match t {
                Ok(t) => threads.push(t),
                Err(e) => {
                    self.exit.set(ExitReason::Stopped);
                    kick_until_finished(&threads);
                    for t in threads {
                        let _ = t.join();
                    }
                    return Err(e);
                }
            }
        }
        Ok(threads)
    }

    /// Starts every device's I/O thread; on a failure, the error and the
    /// threads already started (to stop).
    fn start_io(&mut self) -> Result<Vec<IoRunning>, (VmmError, Vec<IoRunning>)> {
        let mut running = Vec::new();
        for side in self.io.drain(..) {
            let stop = side.stop;
            let (hook, exit, role, body) =
                (self.hook.clone(), self.exit.clone(), side.role, side.body);
            let run = move || match hook.map(|h| h.enter(role)) {
                // The thread cannot be confined: the VM stops (fail closed).
                Some(Err(e)) => {
                    exit.fail();
                    Err(e)
                }
                _ => {
                    body();
                    Ok(())
                }
            };
            match std::thread::Builder::new()
                .name(side.name.into())
                .spawn(run)
            {
                Ok(thread) => running.push(IoRunning { thread, stop }),
                Err(source) => {
                    let name = side.name.into();
                    return Err((VmmError::Spawn { name, source }, running));
                }
            }
        }
        Ok(running)
    }
}

/// Stops and joins the I/O threads; the first error one of them had.
fn stop_io(io: Vec<IoRunning>) -> Option<VmmError> {
    let mut first = None;
    for r in io {
        (r.stop)();
        if let Ok(Err(e)) = r.thread.join() {
            first.get_or_insert(e);
        }
    }
    first
}

/// Signals every vCPU thread until it has left its run loop. A kick can land
/// just before `KVM_RUN` and be lost, hence the repetition.
fn kick_until_finished<T>(threads: &[JoinHandle<T>]) {
    loop {
        let mut running = false;
        for t in threads.iter().filter(|t| !t.is_finished()) {
            running = true;
            let _ = t.kill(kick_signal());
        }
        if !running {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}
