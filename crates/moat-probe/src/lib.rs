//! `moat probe`: run inside any container (or on a host, or in a VM) and
//! report the isolation that actually holds, by reading what the process can
//! see and by attempting, safely, what attackers attempt.
//!
//! Every attempt is non-destructive even on a bare host as root: files are
//! opened for writing and closed without a write; syscalls get arguments that
//! fail right after the kernel's permission check; namespace, mount and
//! ptrace attempts run in forked children bounded in time (and create
//! nothing); device nodes are made only in the probe's one scratch directory
//! ([`scratch`]), removed with its contents when the probe ends (or by the
//! next probe when this one was killed); a test cgroup is removed at once.
//!
//! Each check answers `blocked` (the isolation holds / the attempt was
//! refused), `allowed` (the exposure is there / the attempt succeeded) or
//! `n/a` (not applicable here, informational, or undecidable).
#![forbid(unsafe_code)]
use std::collections::BTreeMap;
use std::io;
use std::time::Duration;

use serde::Serialize;

mod caps;
mod cgroup;
mod devices;
mod escape;
mod host;
mod identity;
mod kernel;
mod net;
mod ns;
mod paths;
mod scratch;
mod security;

/// A check's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Outcome {
    #[serde(rename = "blocked")]
    Blocked,
    #[serde(rename = "allowed")]
    Allowed,
    #[serde(rename = "n/a")]
    NotApplicable,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Blocked => "blocked",
            Outcome::Allowed => "allowed",
            Outcome::NotApplicable => "n/a",
        }
    }
}

/// One probe result.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub id: &'static str,
    pub result: Outcome,
    pub detail: String,
    /// The best practice this check verifies.
    pub practice: &'static str,
}

fn check(
    id: &'static str,
    result: Outcome,
    detail: impl Into<String>,
    practice: &'static str,
) -> Check {
    Check {
        id,
        result,
        detail: detail.into(),
        practice,
    }
}

/// What `/proc/self/status` says, by key.
#[derive(Debug, Default)]
pub struct Status(BTreeMap<String, String>);

impl Status {
    fn read() -> Self {
        Self::parse(&std::fs::read_to_string("/proc/self/status").unwrap_or_default())
    }

    fn parse(text: &str) -> Self {
        Self(
            text.lines()
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .collect(),
        )
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn hex(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(|v| u64::from_str_radix(v, 16).ok())
    }

    fn no_new_privs(&self) -> bool {
        self.get("NoNewPrivs") == Some("1")
    }
}

/// Runs every check, in category order.
pub fn run_all() -> Vec<Check> {
    let st = Status::read();
    // Removed, with what the checks made in it, when this returns.
    let scratch = scratch::Scratch::create();
    let mut out = Vec::new();
    out.extend(identity::checks(&st));
    out.extend(caps::checks(&st));
    out.extend(security::checks(&st, scratch.path()));
    out.extend(ns::checks(&st));
    out.extend(cgroup::checks());
    out.extend(paths::checks());
    out.extend(devices::checks(scratch.path()));
    out.extend(net::checks());
    out.extend(kernel::checks());
    out.extend(host::checks());
    out.extend(escape::checks());
    out
}

/// Counts per outcome.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Summary {
    pub total: usize,
    pub blocked: usize,
    pub allowed: usize,
    #[serde(rename = "n/a")]
    pub not_applicable: usize,
}

pub fn summarize(checks: &[Check]) -> Summary {
    let n = |o| checks.iter().filter(|c| c.result == o).count();
    Summary {
        total: checks.len(),
        blocked: n(Outcome::Blocked),
        allowed: n(Outcome::Allowed),
        not_applicable: n(Outcome::NotApplicable),
    }
}

/// The errno of a failed attempt, or 0 for success.
fn errno_of(r: &io::Result<()>) -> i32 {
    match r {
        Ok(()) => 0,
        Err(e) => e.raw_os_error().unwrap_or(libc::EIO),
    }
}

fn errno_name(e: i32) -> String {
    let name = match e {
        libc::EPERM => "EPERM",
        libc::EACCES => "EACCES",
        libc::ENOSYS => "ENOSYS",
        libc::EINVAL => "EINVAL",
        libc::ENOENT => "ENOENT",
        libc::ENOEXEC => "ENOEXEC",
        libc::EBADF => "EBADF",
        libc::EROFS => "EROFS",
        libc::ETXTBSY => "ETXTBSY",
        libc::ENOKEY => "ENOKEY",
        libc::EAFNOSUPPORT => "EAFNOSUPPORT",
        libc::EPROTONOSUPPORT => "EPROTONOSUPPORT",
        libc::ENODEV => "ENODEV",
        libc::ENXIO => "ENXIO",
        libc::EBUSY => "EBUSY",
        libc::ENOTDIR => "ENOTDIR",
        libc::ENOSPC => "ENOSPC",
        libc::ENOMEM => "ENOMEM",
        libc::EMFILE => "EMFILE",
        libc::ESRCH => "ESRCH",
        libc::ESTALE => "ESTALE",
        _ => return format!("errno {e}"),
    };
    name.to_string()
}

/// Judges a syscall attempt: success, or an errno in `past_check` (what the
/// kernel answers after the permission check passed), means allowed;
/// EPERM/EACCES/ENOSYS mean blocked; anything else cannot be judged.
fn judge(r: &io::Result<()>, past_check: &[i32]) -> (Outcome, String) {
    judge_errno(errno_of(r), past_check)
}

fn judge_errno(e: i32, past_check: &[i32]) -> (Outcome, String) {
    match e {
        0 => (
            Outcome::Allowed,
            "succeeded (anything created was released at once)".into(),
        ),
        e if past_check.contains(&e) => (
            Outcome::Allowed,
            format!("permitted: {} past the permission check", errno_name(e)),
        ),
        libc::EPERM | libc::EACCES => (Outcome::Blocked, format!("refused: {}", errno_name(e))),
        libc::ENOSYS => (
            Outcome::Blocked,
            "refused: ENOSYS (seccomp, or not in this kernel)".into(),
        ),
        e => (
            Outcome::NotApplicable,
            format!("undecided: {}", errno_name(e)),
        ),
    }
}

/// Runs `f` in a forked child bounded to two seconds; `f` returns an errno
/// (0 for success). Returns the errno, or a description when the child did
/// not report one.
fn in_child<F: FnOnce() -> i32>(f: F) -> Result<i32, String> {
    match moat_sys::probe::fork_bounded(Duration::from_secs(2), f) {
        Ok(moat_sys::probe::ChildExit::Exited(code)) => Ok(code),
        Ok(moat_sys::probe::ChildExit::Signaled(sig)) => {
            Err(format!("child killed by signal {sig}"))
        }
        Ok(moat_sys::probe::ChildExit::TimedOut) => Err("child timed out".into()),
        Err(e) => Err(format!(
            "fork failed: {}",
            errno_name(e.raw_os_error().unwrap_or(libc::EIO))
        )),
    }
}

fn child_verdict(r: Result<i32, String>, past_check: &[i32]) -> (Outcome, String) {
    match r {
        Ok(e) => judge_errno(e, past_check),
        Err(why) => (Outcome::NotApplicable, why),
    }
}

fn nix_errno(r: nix::Result<impl Sized>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e as i32,
    }
}

/// Opens `path` for writing without creating or truncating it, and closes it
/// without writing.
fn open_write_close(path: &str) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map(drop)
}

fn open_read_close(path: &str) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map(drop)
}

fn read_trim(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_parses_keys() {
        let st = Status::parse("Name:\tmoat\nCapEff:\t0000000000000400\nNoNewPrivs:\t1\n");
        assert_eq!(st.get("Name"), Some("moat"));
        assert_eq!(st.hex("CapEff"), Some(0x400));
        assert!(st.no_new_privs());
    }

    #[test]
    fn judge_maps_errnos() {
        assert_eq!(judge_errno(0, &[]).0, Outcome::Allowed);
        assert_eq!(
            judge_errno(libc::EINVAL, &[libc::EINVAL]).0,
            Outcome::Allowed
        );
        assert_eq!(judge_errno(libc::EINVAL, &[]).0, Outcome::NotApplicable);
        assert_eq!(
            judge_errno(libc::EPERM, &[libc::EINVAL]).0,
            Outcome::Blocked
        );
        assert_eq!(judge_errno(libc::ENOSYS, &[]).0, Outcome::Blocked);
    }

    #[test]
    fn summary_counts() {
        let c = vec![
            check("a", Outcome::Blocked, "", ""),
            check("b", Outcome::Allowed, "", ""),
            check("c", Outcome::Blocked, "", ""),
        ];
        assert_eq!(
            summarize(&c),
            Summary {
                total: 3,
                blocked: 2,
                allowed: 1,
                not_applicable: 0
            }
        );
    }
}
