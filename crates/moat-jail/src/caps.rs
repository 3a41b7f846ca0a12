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
//!
//! A set missing from `process.capabilities` is empty (the process gets none of it), as in runc.
//! Names are parsed by `oci_spec` when the spec is loaded, so an unknown name already fails
//! there; [`parse_cap`] refuses unknown names too (runc only warns and ignores them: moat fails
//! closed instead). Capabilities the running kernel does not know (above
//! `/proc/sys/kernel/cap_last_cap`) cannot be held by anyone; they are left out of the sets,
//! like runc does. Capabilities the kernel knows but this crate does not are still dropped from
//! the bounding set, since the loop runs over the kernel's numbers.
use std::io;

use oci_spec::runtime::{Capabilities, LinuxCapabilities};
use rustix::thread::{CapabilitySet, CapabilitySets};

/// Why a capability set could not be parsed or applied.
#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    #[error("unknown capability {name}")]
    Unknown { name: String },
    #[error("reading {name} in the bounding set")]
    ReadBounding {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("dropping {name} from the bounding set")]
    DropBounding {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("setting the effective, permitted and inheritable capability sets")]
    SetSets {
        #[source]
        source: io::Error,
    },
    #[error("clearing the ambient capability set")]
    ClearAmbient {
        #[source]
        source: io::Error,
    },
    #[error("raising {name} in the ambient set (it must be both permitted and inheritable)")]
    RaiseAmbient {
        name: String,
        #[source]
        source: io::Error,
    },
}

/// Parses a capability name: `CAP_SYS_ADMIN`, `SYS_ADMIN`, `sys_admin`, `cap_sys_admin`.
pub fn parse_cap(name: &str) -> Result<::caps::Capability, CapsError> {
    ::caps::to_canonical(name.trim())
        .parse()
        .map_err(|_| CapsError::Unknown {
            name: name.to_owned(),
        })
}

/// The kernel's name for capability number `index`.
fn cap_name(index: u32) -> String {
    ::caps::all()
        .into_iter()
        .find(|c| u32::from(c.index()) == index)
        .map_or_else(|| format!("capability {index}"), |c| c.to_string())
}

fn bit(index: u32) -> CapabilitySet {
    CapabilitySet::from_bits_retain(1u64 << index)
}

/// The highest capability number the running kernel knows (`cap_last_cap`), found by probing
/// the bounding set so that it works without /proc.
fn last_cap() -> Result<u32, CapsError> {
    for index in 0..64 {
        match rustix::thread::capability_is_in_bounding_set(bit(index)) {
            Ok(_) => {}
            Err(rustix::io::Errno::INVAL) if index > 0 => return Ok(index - 1),
            Err(e) => {
                return Err(CapsError::ReadBounding {
                    name: cap_name(index),
                    source: e.into(),
                })
            }
        }
    }
    Ok(63)
}

/// The bit mask of an OCI set (absent: empty), limited to capabilities up to `last`.
fn mask(set: Option<&Capabilities>, last: u32) -> Result<u64, CapsError> {
    let mut bits = 0u64;
    for cap in set.into_iter().flatten() {
        let index = u32::from(parse_cap(&cap.to_string())?.index());
        if index <= last {
            bits |= 1u64 << index;
        }
    }
    Ok(bits)
}

/// Drops from the bounding set every capability the kernel knows that `caps.bounding` does
/// not list. Needs CAP_SETPCAP; run it before switching user.
pub fn drop_bounding(caps: &LinuxCapabilities) -> Result<(), CapsError> {
    let last = last_cap()?;
    let keep = mask(caps.bounding().as_ref(), last)?;
    for index in (0..=last).filter(|i| keep & (1u64 << i) == 0) {
        let held = rustix::thread::capability_is_in_bounding_set(bit(index)).map_err(|e| {
            CapsError::ReadBounding {
                name: cap_name(index),
                source: e.into(),
            }
        })?;
        if held {
            rustix::thread::remove_capability_from_bounding_set(bit(index)).map_err(|e| {
                CapsError::DropBounding {
                    name: cap_name(index),
                    source: e.into(),
                }
            })?;
        }
    }
    Ok(())
}

/// Sets effective, permitted and inheritable in one `capset(2)`, then the ambient set (cleared,
/// then each listed capability raised). Run it after switching user, with `PR_SET_KEEPCAPS`
/// set before the switch so that the permitted set survives it.
pub fn apply_sets(caps: &LinuxCapabilities) -> Result<(), CapsError> {
    apply_sets_holding(caps, None)
}

/// [`apply_sets`], but `hold` (when this process still has it permitted)
/// stays in the permitted and effective sets, never in the inheritable or
/// ambient ones. For a step that needs it between this call and `execve`
/// (loading a seccomp filter without no_new_privs needs CAP_SYS_ADMIN):
/// `execve` computes the new permitted and effective sets from the
/// inheritable, ambient and bounding sets and the file's capabilities,
/// never from the old permitted set, so the held capability does not reach
/// the program unless the spec grants it.
pub fn apply_sets_holding(
    caps: &LinuxCapabilities,
    hold: Option<::caps::Capability>,
) -> Result<(), CapsError> {
    let last = last_cap()?;
    let mut sets = CapabilitySets {
        effective: CapabilitySet::from_bits_retain(mask(caps.effective().as_ref(), last)?),
        permitted: CapabilitySet::from_bits_retain(mask(caps.permitted().as_ref(), last)?),
        inheritable: CapabilitySet::from_bits_retain(mask(caps.inheritable().as_ref(), last)?),
    };
    let ambient = mask(caps.ambient().as_ref(), last)?;
    if let Some(cap) = hold {
        let held = rustix::thread::capabilities(None)
            .map_err(|e| CapsError::SetSets { source: e.into() })?
            .permitted;
        let b = CapabilitySet::from_bits_retain(cap.bitmask());
        if held.contains(b) {
            sets.permitted |= b;
            sets.effective |= b;
        }
    }
    rustix::thread::set_capabilities(None, sets)
        .map_err(|e| CapsError::SetSets { source: e.into() })?;
    rustix::thread::clear_ambient_capability_set()
        .map_err(|e| CapsError::ClearAmbient { source: e.into() })?;
    // The kernel allows an ambient capability only if it is both permitted
    // and inheritable. Like runc, skip the others (the default OCI spec lists
    // ambient capabilities without making them inheritable); the process
    // simply does not get them, which errs on the side of less privilege.
    let requested = mask(caps.permitted().as_ref(), last)?;
    let raisable = ambient & requested & sets.inheritable.bits();
    for index in (0..=last).filter(|i| raisable & (1u64 << i) != 0) {
        rustix::thread::configure_capability_in_ambient_set(bit(index), true).map_err(|e| {
            CapsError::RaiseAmbient {
                name: cap_name(index),
                source: e.into(),
            }
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::caps::Capability as C;
    use moat_sys::process::run_in_child;
    use oci_spec::runtime::Capability as Oci;

    fn set(caps: &[Oci]) -> Option<Capabilities> {
        Some(caps.iter().copied().collect())
    }

    fn bits(caps: &[C]) -> u64 {
        caps.iter().fold(0, |m, c| m | c.bitmask())
    }

    /// A `Cap*:` line of /proc/self/status, as a number.
    fn status(field: &str) -> Option<u64> {
        let text = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = text.lines().find(|l| l.starts_with(field))?;
        u64::from_str_radix(line.split_whitespace().nth(1)?, 16).ok()
    }

    #[test]
    fn parses_names() {
        assert_eq!(parse_cap("CAP_SYS_ADMIN").unwrap(), C::CAP_SYS_ADMIN);
        assert_eq!(parse_cap("sys_admin").unwrap(), C::CAP_SYS_ADMIN);
        assert_eq!(parse_cap("cap_chown").unwrap(), C::CAP_CHOWN);
        assert_eq!(
            parse_cap("NET_BIND_SERVICE").unwrap(),
            C::CAP_NET_BIND_SERVICE
        );
        let err = parse_cap("CAP_FLY").unwrap_err();
        assert!(err.to_string().contains("CAP_FLY"), "{err}");
        assert!(parse_cap("").is_err());
    }

    #[test]
    fn every_oci_capability_maps() {
        for cap in ::caps::all() {
            let oci: Oci = serde_json::from_str(&format!("\"{cap}\"")).unwrap();
            assert_eq!(parse_cap(&oci.to_string()).unwrap(), cap);
        }
    }

    #[test]
    fn mask_leaves_out_unknown_to_kernel() {
        let s = set(&[Oci::Chown, Oci::CheckpointRestore]);
        assert_eq!(
            mask(s.as_ref(), 40).unwrap(),
            bits(&[C::CAP_CHOWN, C::CAP_CHECKPOINT_RESTORE])
        );
        assert_eq!(mask(s.as_ref(), 39).unwrap(), bits(&[C::CAP_CHOWN]));
        assert_eq!(mask(None, 40).unwrap(), 0);
    }

    #[test]
    fn bounding_and_base_sets_apply_in_a_child() {
        let mut caps = LinuxCapabilities::default();
        caps.set_bounding(set(&[
            Oci::Chown,
            Oci::Kill,
            Oci::Setuid,
            Oci::Setgid,
            Oci::Setpcap,
            Oci::NetBindService,
        ]));
        caps.set_effective(set(&[Oci::Chown, Oci::Kill]));
        caps.set_permitted(set(&[Oci::Chown, Oci::Kill, Oci::Setpcap]));
        caps.set_inheritable(set(&[Oci::Kill]));
        caps.set_ambient(None);
        let code = run_in_child(0, || {
            if drop_bounding(&caps).is_err() {
                return 2;
            }
            let want = bits(&[
                C::CAP_CHOWN,
                C::CAP_KILL,
                C::CAP_SETUID,
                C::CAP_SETGID,
                C::CAP_SETPCAP,
                C::CAP_NET_BIND_SERVICE,
            ]);
            if status("CapBnd:") != Some(want) {
                return 3;
            }
            if apply_sets(&caps).is_err() {
                return 4;
            }
            if status("CapEff:") != Some(bits(&[C::CAP_CHOWN, C::CAP_KILL])) {
                return 5;
            }
            if status("CapPrm:") != Some(bits(&[C::CAP_CHOWN, C::CAP_KILL, C::CAP_SETPCAP])) {
                return 6;
            }
            if status("CapInh:") != Some(bits(&[C::CAP_KILL])) || status("CapAmb:") != Some(0) {
                return 7;
            }
            0
        })
        .unwrap();
        assert_eq!(code, 0);
    }

    #[test]
    fn ambient_survives_setuid_with_keepcaps() {
        let two = set(&[Oci::Kill, Oci::NetBindService]);
        let mut caps = LinuxCapabilities::default();
        caps.set_bounding(set(&[Oci::Kill, Oci::NetBindService, Oci::Setpcap]));
        caps.set_effective(two.clone());
        caps.set_permitted(two.clone());
        caps.set_inheritable(set(&[Oci::Kill]));
        caps.set_ambient(two.clone());
        let code = run_in_child(0, || {
            if drop_bounding(&caps).is_err() {
                return 2;
            }
            if rustix::thread::set_keep_capabilities(true).is_err() {
                return 3;
            }
            let uid = rustix::process::Uid::from_raw(1000);
            if rustix::thread::set_thread_res_uid(uid, uid, uid).is_err() {
                return 4;
            }
            // NET_BIND_SERVICE is not inheritable: it is skipped, KILL is raised.
            if apply_sets(&caps).is_err() || status("CapAmb:") != Some(bits(&[C::CAP_KILL])) {
                return 5;
            }
            let mut caps = caps.clone();
            caps.set_inheritable(two.clone());
            if apply_sets(&caps).is_err() {
                return 6;
            }
            let want = bits(&[C::CAP_KILL, C::CAP_NET_BIND_SERVICE]);
            if status("CapAmb:") != Some(want)
                || status("CapEff:") != Some(want)
                || status("CapPrm:") != Some(want)
            {
                return 7;
            }
            // Without privilege, a capability outside the permitted set cannot come back.
            caps.set_permitted(set(&[Oci::Kill, Oci::NetBindService, Oci::SysAdmin]));
            match apply_sets(&caps) {
                Err(CapsError::SetSets { .. }) => 0,
                _ => 8,
            }
        })
        .unwrap();
        assert_eq!(code, 0);
    }

    #[test]
    fn a_held_capability_stays_permitted_and_effective_only() {
        if moat_core::testing::needs_root("a_held_capability_stays_permitted_and_effective_only") {
            return;
        }
        let mut caps = LinuxCapabilities::default();
        caps.set_bounding(set(&[Oci::Kill]));
        caps.set_effective(set(&[Oci::Kill]));
        caps.set_permitted(set(&[Oci::Kill]));
        caps.set_inheritable(set(&[Oci::Kill]));
        caps.set_ambient(set(&[Oci::Kill]));
        let code = run_in_child(0, || {
            if drop_bounding(&caps).is_err() {
                return 2;
            }
            if apply_sets_holding(&caps, Some(C::CAP_SYS_ADMIN)).is_err() {
                return 3;
            }
            let both = bits(&[C::CAP_KILL, C::CAP_SYS_ADMIN]);
            if status("CapEff:") != Some(both) || status("CapPrm:") != Some(both) {
                return 4;
            }
            let kill = Some(bits(&[C::CAP_KILL]));
            if status("CapInh:") != kill || status("CapAmb:") != kill {
                return 5;
            }
            // Without it permitted there is nothing to hold.
            if apply_sets(&caps).is_err()
                || apply_sets_holding(&caps, Some(C::CAP_SYS_ADMIN)).is_err()
                || status("CapPrm:") != kill
            {
                return 6;
            }
            0
        })
        .unwrap();
        assert_eq!(code, 0);
    }
}
