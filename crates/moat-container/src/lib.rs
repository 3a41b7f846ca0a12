//! The `container` tier: an OCI runtime built from the jail primitives of
//! `moat-jail`. `lifecycle` is the checklist of each command; `init` is the
//! container process's setup; `process` the last steps shared with `exec`.
#![forbid(unsafe_code)]

pub mod exec;
pub mod features;
pub mod hooks;
pub mod init;
pub mod lifecycle;
pub mod network;
pub mod process;

pub use lifecycle::ContainerTier;
