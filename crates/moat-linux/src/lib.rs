//! moat's Linux primitives and the `container` tier built from them. One
//! module per kernel facility; `container` is the checklist that drives them.
#![forbid(unsafe_code)]

pub mod caps;
pub mod cgroup;
pub mod rlimit;
pub mod rootfs;
pub mod seccomp;
pub mod attrs;
