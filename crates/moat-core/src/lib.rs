//! moat's core: the OCI spec as moat reads it, container state on disk, and
//! the isolation tiers. No OS calls beyond plain file I/O and `flock`.
#![forbid(unsafe_code)]

pub mod landlock;
pub mod spec;
pub mod state;
pub mod tier;

pub use spec::{Spec, SpecError};
pub use state::{ContainerStatus, State, StateDir, StateError};
pub use tier::Tier;
