//! The VMM's error type: one variant per failing step, carrying the resource.

use std::path::PathBuf;

use thiserror::Error;

/// Why building or running a microVM failed.
#[derive(Debug, Error)]
pub enum VmmError {
    /// The configuration was refused before anything was created.
    #[error("invalid VM configuration: {0}")]
    Config(String),
    /// A thread's set-up hook (its seccomp filter) failed: the VM stops.
    #[error("set up the {role:?} thread: {message}")]
    ThreadSetup {
        /// The thread's role.
        role: crate::config::ThreadRole,
        /// What failed.
        message: String,
    },
    /// `/dev/kvm` could not be opened.
    #[error("open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// KVM lacks a capability the VMM needs.
    #[error("KVM lacks capability {0}")]
    KvmCapability(&'static str),
    /// `KVM_CREATE_VM` failed.
    #[error("create VM")]
    CreateVm(#[source] kvm_ioctls::Error),
    /// A VM-wide setup ioctl failed (TSS, irqchip, PIT, ...).
    #[error("VM setup: {0}")]
    VmSetup(&'static str, #[source] kvm_ioctls::Error),
    /// Guest memory could not be allocated.
    #[error("allocate {mib} MiB of guest memory")]
    GuestMemory {
        /// Size asked for.
        mib: u64,
        /// Cause.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// Guest memory shared with a vhost-user back-end could not be made.
    #[error("allocate {mib} MiB of shared guest memory")]
    SharedMemory {
        /// Size asked for.
        mib: u64,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A guest memory region could not be registered with KVM.
    #[error("register guest memory slot {slot}")]
    RegisterMemory {
        /// KVM memory slot.
        slot: u32,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A file the VM needs could not be opened.
    #[error("open {}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The kernel image could not be loaded.
    #[error("load kernel {}", path.display())]
    LoadKernel {
        /// The kernel image.
        path: PathBuf,
        /// Cause.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The initramfs does not fit in guest memory below the kernel's limit.
    #[error("initramfs {} ({size} bytes) does not fit in guest memory", path.display())]
    InitrdTooLarge {
        /// The initramfs.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// The initramfs could not be copied into guest memory.
    #[error("load initramfs {}", path.display())]
    LoadInitrd {
        /// The initramfs.
        path: PathBuf,
        /// Cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The kernel command line was refused.
    #[error("kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// The command line could not be written to guest memory.
    #[error("write kernel command line")]
    LoadCmdline(#[source] linux_loader::loader::Error),
    /// The raw payload does not fit in guest memory.
    #[error("payload of {size} bytes does not fit in guest memory")]
    PayloadTooLarge {
        /// Its size.
        size: usize,
    },
    /// Boot-time structures (GDT, page tables, zero page, payload) could not be written.
    #[error("write {0} to guest memory")]
    WriteBootData(&'static str, #[source] vm_memory::GuestMemoryError),
    /// The ACPI tables could not be built (a device outside what they can describe).
    #[error("ACPI tables: {0}")]
    Acpi(String),
    /// The zero page could not be written.
    #[error("write zero page")]
    ZeroPage(#[source] linux_loader::configurator::Error),
    /// Creating a vCPU failed.
    #[error("create vCPU {index}")]
    CreateVcpu {
        /// vCPU index.
        index: u8,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A vCPU setup ioctl failed.
    #[error("vCPU {index}: {step}")]
    VcpuSetup {
        /// vCPU index.
        index: u8,
        /// The step (cpuid, msrs, sregs, ...).
        step: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// `KVM_RUN` failed.
    #[error("vCPU {index}: run")]
    VcpuRun {
        /// vCPU index.
        index: u8,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The guest did something the VMM cannot go on from.
    #[error("vCPU {index}: {what}")]
    GuestFault {
        /// vCPU index.
        index: u8,
        /// What happened (KVM exit reason).
        what: String,
    },
    /// An eventfd (for an interrupt line) could not be made or registered.
    #[error("interrupt line {gsi}")]
    Irq {
        /// The GSI.
        gsi: u32,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A thread could not be started.
    #[error("spawn thread {name}")]
    Spawn {
        /// Thread name.
        name: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A vCPU thread panicked (a VMM bug).
    #[error("vCPU thread {0} panicked")]
    VcpuPanicked(u8),
    /// A device could not be set up.
    #[error("device {name}")]
    Device {
        /// Device name.
        name: String,
        /// Cause.
        #[source]
        source: crate::virtio::DeviceError,
    },
    /// The signal used to kick vCPUs out of `KVM_RUN` could not be installed.
    #[error("install vCPU kick signal handler")]
    KickSignal(#[source] vmm_sys_util::errno::Error),
    /// Saving or restoring a snapshot failed at `step`.
    #[error("snapshot: {step}")]
    Snapshot {
        /// What was being done.
        step: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

impl VmmError {
    /// A snapshot error at `step` caused by `source`.
    pub fn snapshot(step: impl Into<String>, source: impl Into<std::io::Error>) -> Self {
        VmmError::Snapshot {
            step: step.into(),
            source: source.into(),
        }
    }
}
