//! POSIX rlimits from `process.rlimits`.
//!
//! CONTRACT: `pub fn apply(rlimits: &[PosixRlimit]) -> Result<(), RlimitError>;` (unknown type is an
//! error; EPERM names the limit and says the hard limit cannot be raised without CAP_SYS_RESOURCE).
