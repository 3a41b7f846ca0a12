//! moat's user-space network: the workload's only link is a TAP device
//! whose other end is this stack, running outside the workload's network
//! namespace. It terminates the workload's TCP and UDP and re-originates
//! what the egress policy allows from the host's own sockets; the host's
//! network code never sees a packet the workload wrote.
//!
//! - [`stack`]: the sans-IO core (smoltcp), frames in, requests out.
//! - [`policy`]: the egress allow-list and its decisions.
//! - [`dns`]: the responder's wire format.
//! - [`config`]: addresses and limits.
//!
//! See README.md beside this crate for the design and what is not done.
#![forbid(unsafe_code)]

pub mod config;
pub mod dns;
mod frame;
pub mod netlink;
pub mod policy;
pub mod publish;
pub mod ratelimit;
pub mod shell;
pub mod stack;
pub mod stream;
pub mod tap;

pub use config::{Limits, NetConfig};
pub use policy::{Decision, Egress, Policy, Rule, RuleError};
pub use publish::Publish;
pub use shell::{
    control, host_addresses, serve, serve_link, Ended, Link, Resolver, ServeConfig, ServeError,
    StopHandle, SystemResolver,
};
pub use stack::{FlowId, Request, ResolveError, Stack, StackError, Stats};
pub use tap::{
    create_tap, create_tap_on, in_netns, is_own_netns, open_tun, InNetnsError, Tap, TapError,
};
