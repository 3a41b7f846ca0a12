//! Capabilities: bounding, effective, permitted, inheritable, ambient.
//!
//! CONTRACT:
//! ```ignore
//! /// Before switching user: drop from the bounding set everything not in `bounding`.
//! pub fn drop_bounding(caps: &LinuxCapabilities) -> Result<(), CapsError>;
//! /// After switching user (with PR_SET_KEEPCAPS set before setuid): set the other four sets.
//! pub fn apply_sets(caps: &LinuxCapabilities) -> Result<(), CapsError>;
//! /// Parse "CAP_SYS_ADMIN"/"sys_admin" etc.; unknown names are an error naming the name.
//! ```
