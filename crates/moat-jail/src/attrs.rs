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
//! plus `set_umask(mask)`. Each acts on the calling thread (or process) except
//! `set_oom_score_adj(Some(pid), ..)`.
use std::io::Write;
use std::path::PathBuf;

use moat_sys::process::{SchedAttr, IOPRIO_WHO_PROCESS};
use oci_spec::runtime::{
    IOPriorityClass, LinuxIOPriority, LinuxPersonality, LinuxPersonalityDomain, LinuxSchedulerFlag,
    LinuxSchedulerPolicy, Scheduler,
};

/// Why a process attribute could not be set.
#[derive(Debug, thiserror::Error)]
pub enum AttrError {
    #[error("setting no_new_privs")]
    NoNewPrivs {
        #[source]
        source: std::io::Error,
    },
    #[error("no_new_privs is still off after setting it")]
    NoNewPrivsNotSet,
    #[error("oomScoreAdj {adj} is out of range (-1000..=1000)")]
    OomRange { adj: i32 },
    #[error("writing {path}")]
    Oom {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("scheduler nice {nice} is out of range (-20..=19)")]
    NiceRange { nice: i32 },
    #[error("scheduler {field} is only valid with {valid_for}, not {policy}")]
    SchedField {
        field: &'static str,
        valid_for: &'static str,
        policy: LinuxSchedulerPolicy,
    },
    #[error("scheduler priority {priority} is negative")]
    PriorityRange { priority: i32 },
    #[error("setting scheduler policy {policy} (sched_setattr)")]
    Sched {
        policy: LinuxSchedulerPolicy,
        #[source]
        source: std::io::Error,
    },
    #[error("I/O priority {priority} is out of range (0..=7)")]
    IoPriorityRange { priority: i64 },
    #[error("setting I/O priority class {class}")]
    IoPriority {
        class: IOPriorityClass,
        #[source]
        source: std::io::Error,
    },
    #[error("personality flag {flag} is not supported (the runtime spec defines none)")]
    PersonalityFlag { flag: String },
    #[error("setting personality {domain}")]
    Personality {
        domain: LinuxPersonalityDomain,
        #[source]
        source: std::io::Error,
    },
    #[error("personality is {got:#x} after setting {domain}")]
    PersonalityNotSet {
        domain: LinuxPersonalityDomain,
        got: u32,
    },
    #[error("umask {mask:#o} has bits outside 0o777")]
    UmaskRange { mask: u32 },
}

/// Sets no_new_privs on the calling thread, then reads it back: a kernel that ignored it fails
/// here rather than letting the workload gain privileges through setuid binaries.
pub fn set_no_new_privs() -> Result<(), AttrError> {
    rustix::thread::set_no_new_privs(true)
        .map_err(|e| AttrError::NoNewPrivs { source: e.into() })?;
    match rustix::thread::no_new_privs() {
        Ok(true) => Ok(()),
        Ok(false) => Err(AttrError::NoNewPrivsNotSet),
        Err(e) => Err(AttrError::NoNewPrivs { source: e.into() }),
    }
}

/// Writes `adj` to `/proc/<pid>/oom_score_adj` (`/proc/self/...` for `None`). Lowering it below
/// the current value needs CAP_SYS_RESOURCE.
pub fn set_oom_score_adj(pid: Option<i32>, adj: i32) -> Result<(), AttrError> {
    if !(-1000..=1000).contains(&adj) {
        return Err(AttrError::OomRange { adj });
    }
    let path = match pid {
        Some(pid) => PathBuf::from(format!("/proc/{pid}/oom_score_adj")),
        None => PathBuf::from("/proc/self/oom_score_adj"),
    };
    let write = || {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)?
            .write_all(adj.to_string().as_bytes())
    };
    write().map_err(|source| AttrError::Oom {
        path: path.clone(),
        source,
    })
}

fn policy_number(policy: LinuxSchedulerPolicy) -> u32 {
    match policy {
        LinuxSchedulerPolicy::SchedOther => 0,
        LinuxSchedulerPolicy::SchedFifo => 1,
        LinuxSchedulerPolicy::SchedRr => 2,
        LinuxSchedulerPolicy::SchedBatch => 3,
        // Not in mainline Linux: the kernel refuses it with EINVAL, as it does for runc.
        LinuxSchedulerPolicy::SchedIso => 4,
        LinuxSchedulerPolicy::SchedIdle => 5,
        LinuxSchedulerPolicy::SchedDeadline => 6,
    }
}

fn flag_bit(flag: LinuxSchedulerFlag) -> u64 {
    match flag {
        LinuxSchedulerFlag::SchedResetOnFork => 0x01,
        LinuxSchedulerFlag::SchedFlagReclaim => 0x02,
        LinuxSchedulerFlag::SchedFlagDLOverrun => 0x04,
        LinuxSchedulerFlag::SchedFlagKeepPolicy => 0x08,
        LinuxSchedulerFlag::SchedFlagKeepParams => 0x10,
        LinuxSchedulerFlag::SchedFlagUtilClampMin => 0x20,
        LinuxSchedulerFlag::SchedFlagUtilClampMax => 0x40,
    }
}

/// The `sched_attr` for an OCI `process.scheduler`, refusing fields the policy does not use.
fn sched_attr(s: &Scheduler) -> Result<SchedAttr, AttrError> {
    use LinuxSchedulerPolicy as P;
    let policy = *s.policy();
    let nice = s.nice().unwrap_or(0);
    if !(-20..=19).contains(&nice) {
        return Err(AttrError::NiceRange { nice });
    }
    let priority = s.priority().unwrap_or(0);
    if priority != 0 && !matches!(policy, P::SchedFifo | P::SchedRr) {
        return Err(AttrError::SchedField {
            field: "priority",
            valid_for: "SCHED_FIFO or SCHED_RR",
            policy,
        });
    }
    let priority = u32::try_from(priority).map_err(|_| AttrError::PriorityRange { priority })?;
    let deadline_fields = [s.runtime(), s.deadline(), s.period()];
    if policy != P::SchedDeadline && deadline_fields.iter().any(|f| f.is_some_and(|v| v != 0)) {
        return Err(AttrError::SchedField {
            field: "runtime/deadline/period",
            valid_for: "SCHED_DEADLINE",
            policy,
        });
    }
    Ok(SchedAttr {
        sched_policy: policy_number(policy),
        sched_flags: s
            .flags()
            .iter()
            .flatten()
            .fold(0, |bits, &f| bits | flag_bit(f)),
        sched_nice: nice,
        sched_priority: priority,
        sched_runtime: s.runtime().unwrap_or(0),
        sched_deadline: s.deadline().unwrap_or(0),
        sched_period: s.period().unwrap_or(0),
        ..SchedAttr::default()
    })
}

/// Sets the calling thread's scheduling policy and parameters with sched_setattr(2).
pub fn set_scheduler(s: &Scheduler) -> Result<(), AttrError> {
    let attr = sched_attr(s)?;
    moat_sys::process::sched_setattr(0, &attr).map_err(|source| AttrError::Sched {
        policy: *s.policy(),
        source,
    })
}

/// The `ioprio` value (`class << 13 | priority`) for an OCI `process.ioPriority`.
fn ioprio(p: &LinuxIOPriority) -> Result<i32, AttrError> {
    let priority = p.priority();
    let data = i32::try_from(priority).ok().filter(|d| (0..=7).contains(d));
    let data = data.ok_or(AttrError::IoPriorityRange { priority })?;
    let class = match p.class() {
        IOPriorityClass::IoprioClassRt => 1,
        IOPriorityClass::IoprioClassBe => 2,
        IOPriorityClass::IoprioClassIdle => 3,
    };
    Ok(class << 13 | data)
}

/// Sets the calling process's I/O scheduling class and priority with ioprio_set(2). The
/// real-time class needs CAP_SYS_ADMIN (or CAP_SYS_NICE on recent kernels).
pub fn set_io_priority(p: &LinuxIOPriority) -> Result<(), AttrError> {
    let value = ioprio(p)?;
    moat_sys::process::ioprio_set(IOPRIO_WHO_PROCESS, 0, value).map_err(|source| {
        AttrError::IoPriority {
            class: p.class(),
            source,
        }
    })
}

/// Sets the execution domain (`LINUX`, `LINUX32`) with personality(2) and checks it took.
/// The runtime spec defines no flags, so any flag is refused rather than ignored.
pub fn set_personality(p: &LinuxPersonality) -> Result<(), AttrError> {
    if let Some(flag) = p.flags().iter().flatten().next() {
        return Err(AttrError::PersonalityFlag { flag: flag.clone() });
    }
    let domain = p.domain();
    let value = match domain {
        LinuxPersonalityDomain::PerLinux => 0x0000,
        LinuxPersonalityDomain::PerLinux32 => 0x0008,
    };
    let err = |source| AttrError::Personality { domain, source };
    moat_sys::process::personality(value).map_err(err)?;
    let got = moat_sys::process::personality(0xffff_ffff).map_err(err)?;
    if got != value {
        return Err(AttrError::PersonalityNotSet { domain, got });
    }
    Ok(())
}

/// Sets the process umask (`process.user.umask`).
pub fn set_umask(mask: u32) -> Result<(), AttrError> {
    if mask & !0o777 != 0 {
        return Err(AttrError::UmaskRange { mask });
    }
    rustix::process::umask(rustix::fs::Mode::from_bits_retain(mask));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_sys::process::run_in_child;
    use oci_spec::runtime::{LinuxIOPriorityBuilder, LinuxPersonalityBuilder, SchedulerBuilder};

    fn sched(policy: LinuxSchedulerPolicy) -> SchedulerBuilder {
        SchedulerBuilder::default().policy(policy)
    }

    /// A field of /proc/self/status, as text.
    fn status(field: &str) -> Option<String> {
        let text = std::fs::read_to_string("/proc/self/status").ok()?;
        Some(
            text.lines()
                .find(|l| l.starts_with(field))?
                .split_whitespace()
                .nth(1)?
                .to_owned(),
        )
    }

    /// Field `n` (1-based, as in proc(5)) of /proc/self/stat.
    fn stat(n: usize) -> Option<i64> {
        let text = std::fs::read_to_string("/proc/self/stat").ok()?;
        let after_comm = &text[text.rfind(')')? + 2..];
        after_comm.split_whitespace().nth(n - 3)?.parse().ok()
    }

    #[test]
    fn sched_attr_translation_and_validation() {
        let a = sched_attr(
            &sched(LinuxSchedulerPolicy::SchedBatch)
                .nice(5)
                .flags(vec![
                    LinuxSchedulerFlag::SchedResetOnFork,
                    LinuxSchedulerFlag::SchedFlagKeepParams,
                ])
                .build()
                .unwrap(),
        )
        .unwrap();
        assert_eq!((a.sched_policy, a.sched_nice, a.sched_flags), (3, 5, 0x11));
        let a = sched_attr(
            &sched(LinuxSchedulerPolicy::SchedFifo)
                .priority(10)
                .build()
                .unwrap(),
        )
        .unwrap();
        assert_eq!((a.sched_policy, a.sched_priority), (1, 10));
        let a = sched_attr(
            &sched(LinuxSchedulerPolicy::SchedDeadline)
                .runtime(1u64)
                .deadline(2u64)
                .period(3u64)
                .build()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            (
                a.sched_policy,
                a.sched_runtime,
                a.sched_deadline,
                a.sched_period
            ),
            (6, 1, 2, 3)
        );

        let bad = [
            sched(LinuxSchedulerPolicy::SchedOther)
                .nice(20)
                .build()
                .unwrap(),
            sched(LinuxSchedulerPolicy::SchedOther)
                .priority(5)
                .build()
                .unwrap(),
            sched(LinuxSchedulerPolicy::SchedFifo)
                .priority(-1)
                .build()
                .unwrap(),
            sched(LinuxSchedulerPolicy::SchedBatch)
                .runtime(10u64)
                .build()
                .unwrap(),
        ];
        for s in bad {
            assert!(sched_attr(&s).is_err(), "{s:?}");
        }
    }

    #[test]
    fn ioprio_translation_and_validation() {
        let p = |class, priority: i64| {
            LinuxIOPriorityBuilder::default()
                .class(class)
                .priority(priority)
                .build()
                .unwrap()
        };
        assert_eq!(
            ioprio(&p(IOPriorityClass::IoprioClassBe, 7)).unwrap(),
            2 << 13 | 7
        );
        assert_eq!(
            ioprio(&p(IOPriorityClass::IoprioClassRt, 0)).unwrap(),
            1 << 13
        );
        assert_eq!(
            ioprio(&p(IOPriorityClass::IoprioClassIdle, 0)).unwrap(),
            3 << 13
        );
        assert!(ioprio(&p(IOPriorityClass::IoprioClassBe, 8)).is_err());
        assert!(ioprio(&p(IOPriorityClass::IoprioClassBe, -1)).is_err());
    }

    #[test]
    fn range_checks_fail_before_any_syscall() {
        assert!(matches!(
            set_oom_score_adj(None, 1001),
            Err(AttrError::OomRange { .. })
        ));
        assert!(matches!(
            set_oom_score_adj(None, -1001),
            Err(AttrError::OomRange { .. })
        ));
        assert!(matches!(
            set_umask(0o1777),
            Err(AttrError::UmaskRange { .. })
        ));
        let p = LinuxPersonalityBuilder::default()
            .flags(vec!["ADDR_NO_RANDOMIZE".to_owned()])
            .build()
            .unwrap();
        assert!(matches!(
            set_personality(&p),
            Err(AttrError::PersonalityFlag { .. })
        ));
    }

    #[test]
    fn no_new_privs_and_umask_in_a_child() {
        let code = run_in_child(0, || {
            if set_no_new_privs().is_err() || status("NoNewPrivs:").as_deref() != Some("1") {
                return 3;
            }
            if set_umask(0o027).is_err() || status("Umask:").as_deref() != Some("0027") {
                return 4;
            }
            0
        })
        .unwrap();
        assert_eq!(code, 0);
    }

    #[test]
    fn oom_score_adj_in_a_child() {
        let code = run_in_child(0, || {
            // Deterministic even where the tests run with CAP_SYS_RESOURCE.
            if ::caps::drop(
                None,
                ::caps::CapSet::Effective,
                ::caps::Capability::CAP_SYS_RESOURCE,
            )
            .is_err()
            {
                return 2;
            }
            let read = || {
                std::fs::read_to_string("/proc/self/oom_score_adj")
                    .ok()?
                    .trim()
                    .parse::<i32>()
                    .ok()
            };
            // Only raise it (from wherever the test runner left it), then try to lower it.
            let Some(base) = read().map(|b| b.max(0)) else {
                return 3;
            };
            let (first, second) = (base + (1000 - base) / 3, base + 2 * (1000 - base) / 3);
            if set_oom_score_adj(None, first).is_err() || read() != Some(first) {
                return 4;
            }
            let pid = rustix::process::getpid().as_raw_nonzero().get();
            if set_oom_score_adj(Some(pid), second).is_err() || read() != Some(second) {
                return 5;
            }
            // Going below the floor a privileged writer last set needs CAP_SYS_RESOURCE.
            match set_oom_score_adj(None, -1000) {
                Err(AttrError::Oom { .. }) if read() == Some(second) => 0,
                _ => 6,
            }
        })
        .unwrap();
        assert_eq!(code, 0);
    }

    #[test]
    fn scheduler_in_a_child() {
        let batch = sched(LinuxSchedulerPolicy::SchedBatch)
            .nice(10)
            .build()
            .unwrap();
        let idle = sched(LinuxSchedulerPolicy::SchedIdle).build().unwrap();
        let code = run_in_child(0, || {
            if set_scheduler(&batch).is_err() {
                return 2;
            }
            // proc(5): field 19 is nice, field 41 the policy.
            if stat(19) != Some(10) || stat(41) != Some(3) {
                return 3;
            }
            match moat_sys::process::sched_getattr(0) {
                Ok(a) if a.sched_policy == 3 && a.sched_nice == 10 => {}
                _ => return 4,
            }
            if set_scheduler(&idle).is_err() || stat(41) != Some(5) {
                return 5;
            }
            0
        })
        .unwrap();
        assert_eq!(code, 0);
    }

    #[test]
    fn io_priority_in_a_child() {
        let be = LinuxIOPriorityBuilder::default()
            .class(IOPriorityClass::IoprioClassBe)
            .priority(7)
            .build()
            .unwrap();
        let idle = LinuxIOPriorityBuilder::default()
            .class(IOPriorityClass::IoprioClassIdle)
            .build()
            .unwrap();
        let code = run_in_child(0, || {
            let get = || moat_sys::process::ioprio_get(IOPRIO_WHO_PROCESS, 0).ok();
            if set_io_priority(&be).is_err() || get() != Some(2 << 13 | 7) {
                return 2;
            }
            if set_io_priority(&idle).is_err() || get().map(|v| v >> 13) != Some(3) {
                return 3;
            }
            0
        })
        .unwrap();
        assert_eq!(code, 0);
    }

    #[test]
    fn personality_in_a_child() {
        let linux32 = LinuxPersonalityBuilder::default()
            .domain(LinuxPersonalityDomain::PerLinux32)
            .build()
            .unwrap();
        let linux = LinuxPersonalityBuilder::default()
            .domain(LinuxPersonalityDomain::PerLinux)
            .build()
            .unwrap();
        let code = run_in_child(0, || {
            if set_personality(&linux32).is_err() {
                return 2;
            }
            if moat_sys::process::personality(0xffff_ffff).ok() != Some(8) {
                return 3;
            }
            if cfg!(target_arch = "x86_64")
                && rustix::system::uname().machine().to_bytes() != b"i686"
            {
                return 4;
            }
            if set_personality(&linux).is_err()
                || moat_sys::process::personality(0xffff_ffff).ok() != Some(0)
            {
                return 5;
            }
            0
        })
        .unwrap();
        assert_eq!(code, 0);
    }
}
