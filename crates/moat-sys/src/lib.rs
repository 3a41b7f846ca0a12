//! The only crate of moat allowed `unsafe` code: raw syscalls that neither
//! rustix nor nix wraps. Every function here is a thin, documented wrapper
//! whose safe signature upholds the syscall's contract.
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod bpf;
pub mod fd;
pub mod loopdev;
pub mod mount;
pub mod notify;
pub mod probe;
pub mod process;
pub mod random;
pub mod seccomp;
pub mod sock;
pub mod tun;
