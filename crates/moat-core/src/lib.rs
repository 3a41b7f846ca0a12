//! moat's core: the OCI spec as moat reads it, container state on disk, and
//! the isolation tiers. No OS calls beyond plain file I/O and `flock`.
#![forbid(unsafe_code)]

pub mod embedded;
pub mod landlock;
pub mod net;
pub mod runtime;
pub mod spec;
pub mod state;
pub mod stats;
pub mod steps;
pub mod testing;
pub mod tier;
pub mod time;

pub use runtime::{Lifecycle, RuntimeError};
pub use spec::{Spec, SpecError};
pub use state::{ContainerStatus, State, StateDir, StateError};
pub use tier::Tier;

/// An error and its causes as one line: "a: b: c".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !t.is_empty() && !s.ends_with(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}
