//! Other process attributes: no_new_privs, oomScoreAdj, scheduler, ioPriority, personality, umask.
//!
//! CONTRACT:
//! ```ignore
//! pub fn set_no_new_privs() -> Result<(), AttrError>;
//! pub fn set_oom_score_adj(pid: Option<i32>, adj: i32) -> Result<(), AttrError>;
//! pub fn set_scheduler(s: &Scheduler) -> Result<(), AttrError>;     // sched_setattr
//! pub fn set_io_priority(p: &LinuxIOPriority) -> Result<(), AttrError>;
//! pub fn set_personality(p: &LinuxPersonality) -> Result<(), AttrError>;
//! ```
