//! moat's jail primitives: one module per kernel facility, usable by every
//! tier (the container's init, the sandbox supervisor and the microVM jailer
//! confine themselves with them). No tier lives here.
#![forbid(unsafe_code)]

pub mod attrs;
pub mod cache;
pub mod caps;
pub mod cgroup;
pub mod confine;
pub mod console;
pub mod host;
pub mod idalloc;
pub mod idmap;
pub mod landlock;
pub mod mountinfo;
pub mod net;
pub mod ns;
pub mod procfs;
pub mod rlimit;
pub mod rootfs;
pub mod seccomp;
pub mod selfexe;
pub mod supervise;
pub mod sync;
