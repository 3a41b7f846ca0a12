//! Other process attributes: no_new_privs, oomScoreAdj, scheduler, I/O
//! priority, personality.
use oci_spec::runtime::{
    IOPriorityClass, LinuxIOPriority, LinuxPersonality, LinuxPersonalityDomain, LinuxSchedulerFlag,
    LinuxSchedulerPolicy, Scheduler,
};

#[derive(Debug, thiserror::Error)]
pub enum AttrError {
    #[error("cannot set no_new_privs")]
    NoNewPrivs(#[source] nix::Error),
    #[error("no_new_privs did not stick")]
    NoNewPrivsNotSet,
    #[error("oomScoreAdj {0} is outside -1000..=1000")]
    OomRange(i32),
    #[error("cannot write {path}")]
    Oom {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid scheduler: {0}")]
    SchedInvalid(String),
    #[error("cannot set scheduler policy {policy:?}")]
    Sched {
        policy: LinuxSchedulerPolicy,
        #[source]
        source: std::io::Error,
    },
    #[error("I/O priority {0} is outside 0..=7")]
    IoPrioRange(i64),
    #[error("cannot set I/O priority")]
    IoPrio(#[source] std::io::Error),
    #[error("unknown personality flag {0:?}")]
    PersonalityFlag(String),
    #[error("cannot set personality")]
    Personality(#[source] std::io::Error),
}

/// Sets no_new_privs and checks it took (fail closed).
pub fn set_no_new_privs() -> Result<(), AttrError> {
    nix::sys::prctl::set_no_new_privs().map_err(AttrError::NoNewPrivs)?;
    match nix::sys::prctl::get_no_new_privs() {
        Ok(true) => Ok(()),
        _ => Err(AttrError::NoNewPrivsNotSet),
    }
}

/// Writes `/proc/<pid or self>/oom_score_adj`.
pub fn set_oom_score_adj(pid: Option<i32>, adj: i32) -> Result<(), AttrError> {
    if !(-1000..=1000).contains(&adj) {
        return Err(AttrError::OomRange(adj));
    }
    let path = match pid {
        Some(p) => format!("/proc/{p}/oom_score_adj"),
        None => "/proc/self/oom_score_adj".to_owned(),
    };
    std::fs::write(&path, adj.to_string()).map_err(|source| AttrError::Oom { path, source })
}

fn policy_number(p: LinuxSchedulerPolicy) -> u32 {
    match p {
        LinuxSchedulerPolicy::SchedOther => 0,
        LinuxSchedulerPolicy::SchedFifo => 1,
        LinuxSchedulerPolicy::SchedRr => 2,
        LinuxSchedulerPolicy::SchedBatch => 3,
        LinuxSchedulerPolicy::SchedIso => 4,
        LinuxSchedulerPolicy::SchedIdle => 5,
        LinuxSchedulerPolicy::SchedDeadline => 6,
    }
}

fn flag_bit(f: &LinuxSchedulerFlag) -> u64 {
    match f {
        LinuxSchedulerFlag::SchedResetOnFork => 0x01,
        LinuxSchedulerFlag::SchedFlagReclaim => 0x02,
        LinuxSchedulerFlag::SchedFlagDLOverrun => 0x04,
        LinuxSchedulerFlag::SchedFlagKeepPolicy => 0x08,
        LinuxSchedulerFlag::SchedFlagKeepParams => 0x10,
        LinuxSchedulerFlag::SchedFlagUtilClampMin => 0x20,
        LinuxSchedulerFlag::SchedFlagUtilClampMax => 0x40,
    }
}

/// The `sched_attr` for an OCI scheduler object, checked as the kernel would.
pub fn sched_attr(s: &Scheduler) -> Result<moat_sys::process::SchedAttr, AttrError> {
    let policy = *s.policy();
    let nice = s.nice().unwrap_or(0);
    if !(-20..=19).contains(&nice) {
        return Err(AttrError::SchedInvalid(format!(
            "nice {nice} is outside -20..=19"
        )));
    }
    let prio = s.priority().unwrap_or(0);
    let realtime = matches!(
        policy,
        LinuxSchedulerPolicy::SchedFifo | LinuxSchedulerPolicy::SchedRr
    );
    if realtime && !(1..=99).contains(&prio) {
        return Err(AttrError::SchedInvalid(format!(
            "priority {prio} must be 1..=99 for {policy:?}"
        )));
    }
    if !realtime && prio != 0 {
        return Err(AttrError::SchedInvalid(format!(
            "priority must be 0 for {policy:?}"
        )));
    }
    if policy == LinuxSchedulerPolicy::SchedIso {
        return Err(AttrError::SchedInvalid(
            "SCHED_ISO is not implemented by Linux".into(),
        ));
    }
    let flags = s
        .flags()
        .as_deref()
        .unwrap_or(&[])
        .iter()
        .map(flag_bit)
        .fold(0, |a, b| a | b);
    Ok(moat_sys::process::SchedAttr {
        sched_policy: policy_number(policy),
        sched_flags: flags,
        sched_nice: nice,
        sched_priority: u32::try_from(prio).unwrap_or(0),
        sched_runtime: s.runtime().unwrap_or(0),
        sched_deadline: s.deadline().unwrap_or(0),
        sched_period: s.period().unwrap_or(0),
        ..Default::default()
    })
}

pub fn set_scheduler(s: &Scheduler) -> Result<(), AttrError> {
    let attr = sched_attr(s)?;
    moat_sys::process::sched_setattr(0, &attr).map_err(|source| AttrError::Sched {
        policy: *s.policy(),
        source,
    })
}

/// The `ioprio` value: class << 13 | level.
pub fn ioprio_value(p: &LinuxIOPriority) -> Result<i32, AttrError> {
    let level = p.priority();
    if !(0..=7).contains(&level) {
        return Err(AttrError::IoPrioRange(level));
    }
    let class = match p.class() {
        IOPriorityClass::IoprioClassRt => 1,
        IOPriorityClass::IoprioClassBe => 2,
        IOPriorityClass::IoprioClassIdle => 3,
    };
    Ok((class << 13) | level as i32)
}

pub fn set_io_priority(p: &LinuxIOPriority) -> Result<(), AttrError> {
    let v = ioprio_value(p)?;
    moat_sys::process::ioprio_set(moat_sys::process::IOPRIO_WHO_PROCESS, 0, v)
        .map_err(AttrError::IoPrio)
}

/// The persona value: PER_LINUX (0) or PER_LINUX32 (8); no flags are defined
/// by the runtime-spec, so any flag is refused rather than ignored.
pub fn persona(p: &LinuxPersonality) -> Result<u32, AttrError> {
    if let Some(f) = p.flags().as_deref().and_then(|f| f.first()) {
        return Err(AttrError::PersonalityFlag(f.clone()));
    }
    Ok(match p.domain() {
        LinuxPersonalityDomain::PerLinux => 0,
        LinuxPersonalityDomain::PerLinux32 => 8,
    })
}

pub fn set_personality(p: &LinuxPersonality) -> Result<(), AttrError> {
    let v = persona(p)?;
    moat_sys::process::personality(v)
        .map(|_| ())
        .map_err(AttrError::Personality)
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_sys::process::run_in_child;

    fn sched(json: &str) -> Scheduler {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn scheduler_translation_and_checks() {
        let a = sched_attr(&sched(
            r#"{"policy":"SCHED_BATCH","nice":5,"flags":["SCHED_RESET_ON_FORK"]}"#,
        ))
        .unwrap();
        assert_eq!((a.sched_policy, a.sched_nice, a.sched_flags), (3, 5, 1));
        assert!(sched_attr(&sched(r#"{"policy":"SCHED_FIFO","priority":0}"#)).is_err());
        assert!(sched_attr(&sched(r#"{"policy":"SCHED_OTHER","nice":40}"#)).is_err());
        assert!(sched_attr(&sched(r#"{"policy":"SCHED_OTHER","priority":3}"#)).is_err());
    }

    #[test]
    fn ioprio_and_persona_values() {
        let p: LinuxIOPriority =
            serde_json::from_str(r#"{"class":"IOPRIO_CLASS_IDLE","priority":0}"#).unwrap();
        assert_eq!(ioprio_value(&p).unwrap(), 3 << 13);
        let p: LinuxIOPriority =
            serde_json::from_str(r#"{"class":"IOPRIO_CLASS_BE","priority":9}"#).unwrap();
        assert!(ioprio_value(&p).is_err());
        let p: LinuxPersonality = serde_json::from_str(r#"{"domain":"LINUX32"}"#).unwrap();
        assert_eq!(persona(&p).unwrap(), 8);
        let p: LinuxPersonality =
            serde_json::from_str(r#"{"domain":"LINUX","flags":["x"]}"#).unwrap();
        assert!(persona(&p).is_err());
    }

    #[test]
    fn attributes_take_effect() {
        let code = run_in_child(0, || {
            if set_no_new_privs().is_err()
                || !std::fs::read_to_string("/proc/self/status")
                    .unwrap()
                    .contains("NoNewPrivs:\t1")
            {
                return 1;
            }
            if set_oom_score_adj(None, 500).is_err()
                || std::fs::read_to_string("/proc/self/oom_score_adj")
                    .unwrap()
                    .trim()
                    != "500"
            {
                return 2;
            }
            if set_scheduler(&sched(r#"{"policy":"SCHED_BATCH","nice":7}"#)).is_err() {
                return 3;
            }
            let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
            let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
            // Fields 19 (nice) and 41 (policy), counted from 1 over the whole line.
            if fields[16] != "7" || fields[38] != "3" {
                return 4;
            }
            let p: LinuxIOPriority =
                serde_json::from_str(r#"{"class":"IOPRIO_CLASS_IDLE","priority":0}"#).unwrap();
            if set_io_priority(&p).is_err()
                || moat_sys::process::ioprio_get(moat_sys::process::IOPRIO_WHO_PROCESS, 0).ok()
                    != Some(3 << 13)
            {
                return 5;
            }
            let p: LinuxPersonality = serde_json::from_str(r#"{"domain":"LINUX32"}"#).unwrap();
            if set_personality(&p).is_err()
                || moat_sys::process::personality(0xffff_ffff).ok() != Some(8)
            {
                return 6;
            }
            0
        })
        .unwrap();
        assert_eq!(code, 0);
    }
}
