//! What /proc says about a process: its start time (to tell a live process
//! from a reused PID) and its scheduler state.

/// Field 22 of /proc/PID/stat, and whether the process is a zombie.
pub fn proc_stat(pid: i32) -> Option<(u64, char)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let mut f = rest.split(' ');
    let state = f.next()?.chars().next()?;
    let start = f.nth(18)?.parse().ok()?;
    Some((start, state))
}

/// Start time of `pid` (clock ticks after boot), `None` when it is gone.
pub fn pid_start_time(pid: i32) -> Option<u64> {
    proc_stat(pid).map(|(s, _)| s)
}
