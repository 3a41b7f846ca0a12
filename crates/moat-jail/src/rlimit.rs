//! POSIX rlimits from `process.rlimits`.
//!
//! CONTRACT: `pub fn apply(rlimits: &[PosixRlimit]) -> Result<(), RlimitError>;` (unknown type is an
//! error; EPERM names the limit and says the hard limit cannot be raised without CAP_SYS_RESOURCE).
//!
//! Unknown types cannot reach this module: `PosixRlimitType` is an enum in `oci_spec`, so a
//! spec with one fails to parse. `u64::MAX` means unlimited (`RLIM_INFINITY`).
use oci_spec::runtime::{PosixRlimit, PosixRlimitType};
use rustix::process::{Resource, Rlimit};

/// Why a resource limit could not be set.
#[derive(Debug, thiserror::Error)]
pub enum RlimitError {
    #[error("{typ}: soft limit {soft} is above hard limit {hard}")]
    SoftAboveHard {
        typ: PosixRlimitType,
        soft: u64,
        hard: u64,
    },
    #[error("{typ}: raising the hard limit to {hard} needs CAP_SYS_RESOURCE (current hard limit {current})")]
    RaiseHard {
        typ: PosixRlimitType,
        hard: u64,
        current: String,
    },
    #[error("setting {typ}")]
    Set {
        typ: PosixRlimitType,
        #[source]
        source: std::io::Error,
    },
}

fn resource(typ: PosixRlimitType) -> Resource {
    match typ {
        PosixRlimitType::RlimitCpu => Resource::Cpu,
        PosixRlimitType::RlimitFsize => Resource::Fsize,
        PosixRlimitType::RlimitData => Resource::Data,
        PosixRlimitType::RlimitStack => Resource::Stack,
        PosixRlimitType::RlimitCore => Resource::Core,
        PosixRlimitType::RlimitRss => Resource::Rss,
        PosixRlimitType::RlimitNproc => Resource::Nproc,
        PosixRlimitType::RlimitNofile => Resource::Nofile,
        PosixRlimitType::RlimitMemlock => Resource::Memlock,
        PosixRlimitType::RlimitAs => Resource::As,
        PosixRlimitType::RlimitLocks => Resource::Locks,
        PosixRlimitType::RlimitSigpending => Resource::Sigpending,
        PosixRlimitType::RlimitMsgqueue => Resource::Msgqueue,
        PosixRlimitType::RlimitNice => Resource::Nice,
        PosixRlimitType::RlimitRtprio => Resource::Rtprio,
        PosixRlimitType::RlimitRttime => Resource::Rttime,
    }
}

/// `u64::MAX` is `RLIM_INFINITY`, which rustix spells `None`.
fn value(v: u64) -> Option<u64> {
    (v != u64::MAX).then_some(v)
}

/// Sets each limit on the calling process, in order; stops at the first failure.
pub fn apply(rlimits: &[PosixRlimit]) -> Result<(), RlimitError> {
    for rl in rlimits {
        set_one(rl)?;
    }
    Ok(())
}

fn set_one(rl: &PosixRlimit) -> Result<(), RlimitError> {
    let (typ, soft, hard) = (rl.typ(), rl.soft(), rl.hard());
    if soft > hard {
        return Err(RlimitError::SoftAboveHard { typ, soft, hard });
    }
    let res = resource(typ);
    let new = Rlimit {
        current: value(soft),
        maximum: value(hard),
    };
    match rustix::process::setrlimit(res, new) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::PERM) => {
            let current = rustix::process::getrlimit(res)
                .maximum
                .map_or("unlimited".to_owned(), |m| m.to_string());
            Err(RlimitError::RaiseHard { typ, hard, current })
        }
        Err(e) => Err(RlimitError::Set {
            typ,
            source: e.into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_sys::process::run_in_child;
    use oci_spec::runtime::PosixRlimitBuilder;

    fn nofile(soft: u64, hard: u64) -> PosixRlimit {
        PosixRlimitBuilder::default()
            .typ(PosixRlimitType::RlimitNofile)
            .soft(soft)
            .hard(hard)
            .build()
            .unwrap()
    }

    #[test]
    fn every_type_parses_from_the_spec_names() {
        let names = [
            "RLIMIT_AS",
            "RLIMIT_CORE",
            "RLIMIT_CPU",
            "RLIMIT_DATA",
            "RLIMIT_FSIZE",
            "RLIMIT_LOCKS",
            "RLIMIT_MEMLOCK",
            "RLIMIT_MSGQUEUE",
            "RLIMIT_NICE",
            "RLIMIT_NOFILE",
            "RLIMIT_NPROC",
            "RLIMIT_RSS",
            "RLIMIT_RTPRIO",
            "RLIMIT_RTTIME",
            "RLIMIT_SIGPENDING",
            "RLIMIT_STACK",
        ];
        for name in names {
            let rl: PosixRlimit =
                serde_json::from_str(&format!(r#"{{"type": "{name}", "soft": 1, "hard": 2}}"#))
                    .unwrap();
            assert_eq!(rl.typ().to_string(), name);
        }
        assert!(serde_json::from_str::<PosixRlimit>(
            r#"{"type": "RLIMIT_BOGUS", "soft": 1, "hard": 2}"#
        )
        .is_err());
    }

    #[test]
    fn soft_above_hard_is_refused() {
        assert!(matches!(
            apply(&[nofile(10, 5)]),
            Err(RlimitError::SoftAboveHard { .. })
        ));
    }

    #[test]
    fn nofile_applies_and_raising_hard_is_explained() {
        let code = run_in_child(0, || {
            // Make the raise below fail even where the tests run with CAP_SYS_RESOURCE.
            if ::caps::drop(
                None,
                ::caps::CapSet::Effective,
                ::caps::Capability::CAP_SYS_RESOURCE,
            )
            .is_err()
            {
                return 2;
            }
            let Some(hard) = rustix::process::getrlimit(Resource::Nofile).maximum else {
                return 3;
            };
            if hard < 200 {
                return 4;
            }
            if apply(&[nofile(100, hard - 50)]).is_err() {
                return 5;
            }
            let now = rustix::process::getrlimit(Resource::Nofile);
            if now.current != Some(100) || now.maximum != Some(hard - 50) {
                return 6;
            }
            match apply(&[nofile(100, hard)]) {
                Err(e @ RlimitError::RaiseHard { .. })
                    if e.to_string().contains("CAP_SYS_RESOURCE") =>
                {
                    0
                }
                _ => 7,
            }
        })
        .unwrap();
        assert_eq!(code, 0);
    }
}
