//! moat's VMM: KVM microVMs with a Firecracker-sized device model, built on
//! the rust-vmm crates, and a QEMU `microvm` backend driven by the same
//! [`VmConfig`]. See `README.md` beside this crate for the device model, the
//! threads, and what the guest can reach.
//!
//! The three `unsafe` calls outside `moat-sys` live here: registering guest
//! memory with KVM (`kvm_memory.rs`; its invariant, the mapping outlives
//! every VM and vCPU fd that can touch it, is about this crate's own
//! objects and their drop order, which only this crate can uphold; moving
//! it into `moat-sys` would state a contract `moat-sys` cannot check), and
//! restoring a vCPU's XSAVE area from a snapshot (`kvm_xsave.rs`), and
//! giving pages of guest RAM the guest reported free back to the host
//! (`ram_discard.rs`: a `madvise` on the same mappings, whose invariant is
//! theirs).
#![deny(unsafe_code)]

pub mod bus;
pub mod config;
pub mod cpio;
pub mod devices;
mod error;
pub mod kernel_image;
mod kvm_memory;
mod kvm_xsave;
pub mod layout;
pub mod memory;
pub mod qemu;
mod ram_discard;
pub mod snapshot;
pub mod vcpu;
pub mod virtio;
pub mod vm;
pub mod x86_64;

pub use config::{
    BlockConfig, Discovery, FsConfig, Kernel, NetBackend, NetConfig, ThreadHook, ThreadRole,
    VmConfig,
};
pub use error::VmmError;
pub use vm::{ExitReason, FsHandle, SnapshotHandle, StopHandle, Vm};
