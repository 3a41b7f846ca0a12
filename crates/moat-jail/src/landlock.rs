//! Landlock: moat's [`LandlockPolicy`] as a ruleset the workload runs under,
//! applied by the container process right before its exec (and by `exec`'d
//! processes, each in a domain of its own built from the same policy).
//!
//! The ruleset handles every filesystem access right of the kernel's ABI (up
//! to [`ABI_MAX`]) and grants, beneath each path of the policy:
//! - `read`: execute, read files, list directories;
//! - `write`: all of them except making character or block devices;
//! - `files`: read, write and truncate files, list directories, device ioctls.
//!
//! The standard streams (fds 0-2) get a rule of their own when they are
//! files, devices or named pipes, with the access their open mode already
//! gives: a workload may reopen them through `/dev/stdout` (a host file or
//! terminal outside the container's tree) but gains nothing it did not hold.
//! Signal and abstract-socket scoping are left out: a process added by
//! `exec` lives in another Landlock domain, and scoping would cut it off
//! from the container's own processes (the PID and network namespaces
//! already confine both).
//!
//! On a kernel without Landlock the ruleset is not enforced (best effort, as
//! the policy says "where the kernel has it"); on one with an older ABI the
//! rights it lacks are dropped. Any other failure is an error: the workload
//! never starts with less than the policy's restriction where it is enforced.
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use landlock::{
    make_bitflags, Access, AccessFs, BitFlags, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreated, RulesetCreatedAttr, RulesetStatus, ABI,
};
use moat_core::landlock::LandlockPolicy;
use rustix::fs::{FileType, OFlags};
use thiserror::Error;

/// The newest ABI moat was tested with.
pub const ABI_MAX: ABI = ABI::V7;

/// `statfs.f_type` of pipefs and sockfs: anonymous pipes and sockets, which
/// Landlock neither restricts nor accepts rules for.
const PIPEFS_MAGIC: i64 = 0x5049_5045;
const SOCKFS_MAGIC: i64 = 0x534f_434b;

#[derive(Debug, Error)]
pub enum LandlockError {
    #[error("landlock: cannot create the ruleset")]
    Create(#[source] landlock::RulesetError),
    #[error("landlock: cannot open {path} for a rule")]
    Path {
        path: PathBuf,
        #[source]
        source: landlock::PathFdError,
    },
    #[error("landlock: cannot add the rule for {what}")]
    Rule {
        what: String,
        #[source]
        source: landlock::RulesetError,
    },
    #[error("landlock: cannot duplicate the ruleset")]
    Clone(#[source] std::io::Error),
    #[error("landlock: cannot enforce the ruleset")]
    Restrict(#[source] landlock::RulesetError),
}

/// Rights granted beneath a `read` path.
pub fn read_access() -> BitFlags<AccessFs> {
    AccessFs::from_read(ABI_MAX)
}

/// Rights granted beneath a `write` path.
pub fn write_access() -> BitFlags<AccessFs> {
    AccessFs::from_all(ABI_MAX) & !(AccessFs::MakeChar | AccessFs::MakeBlock)
}

/// Rights granted beneath a `files` path.
pub fn files_access() -> BitFlags<AccessFs> {
    make_bitflags!(AccessFs::{ReadFile | ReadDir | WriteFile | Truncate | IoctlDev})
}

/// How much of the ruleset the kernel enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enforcement {
    Full,
    Partial,
    /// The kernel has no Landlock.
    None,
}

/// A ruleset built from a policy, its paths opened and its rules added,
/// ready to be enforced. Built where the container's paths and standard
/// streams are final (so a missing path fails `create`), enforced at exec.
#[derive(Debug)]
pub struct Prepared(RulesetCreated);

/// Builds the ruleset for `policy` plus the standard-stream rules.
pub fn prepare(policy: &LandlockPolicy) -> Result<Prepared, LandlockError> {
    let mut ruleset = Ruleset::default()
        .handle_access(AccessFs::from_all(ABI_MAX))
        .and_then(Ruleset::create)
        .map_err(LandlockError::Create)?;
    // With an execute list, execute is granted there and nowhere else.
    let no_exec = match policy.execute {
        Some(_) => !BitFlags::from(AccessFs::Execute),
        None => BitFlags::all(),
    };
    let present: Vec<PathBuf> = policy
        .execute
        .iter()
        .flatten()
        .filter(|p| std::fs::symlink_metadata(p).is_ok())
        .cloned()
        .collect();
    let classes = [
        (&policy.read, read_access() & no_exec),
        (&policy.write, write_access() & no_exec),
        (&policy.files, files_access()),
        (&present, make_bitflags!(AccessFs::{Execute})),
    ];
    for (paths, access) in classes {
        for path in paths {
            let fd = PathFd::new(path).map_err(|source| LandlockError::Path {
                path: path.clone(),
                source,
            })?;
            ruleset = ruleset
                .add_rule(PathBeneath::new(fd, access))
                .map_err(|source| LandlockError::Rule {
                    what: path.display().to_string(),
                    source,
                })?;
        }
    }
    let stdin = std::io::stdin();
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    let streams = [stdin.as_fd(), stdout.as_fd(), stderr.as_fd()];
    for (fd, stream) in streams.into_iter().enumerate() {
        let Some(access) = stdio_access(stream) else {
            continue;
        };
        let link = Path::new("/proc/self/fd").join(fd.to_string());
        // Without /proc there is nothing to reopen the stream through.
        let Ok(file) = PathFd::new(&link) else {
            continue;
        };
        ruleset = ruleset
            .add_rule(PathBeneath::new(file, access))
            .map_err(|source| LandlockError::Rule {
                what: format!("fd {fd}"),
                source,
            })?;
    }
    Ok(Prepared(ruleset.no_new_privs(false)))
}

impl Prepared {
    /// Restricts the calling process (and what it execs). The caller must
    /// hold CAP_SYS_ADMIN in its user namespace or have set no_new_privs;
    /// this does not set no_new_privs itself.
    pub fn restrict(&self) -> Result<Enforcement, LandlockError> {
        let ruleset = self.0.try_clone().map_err(LandlockError::Clone)?;
        let status = ruleset.restrict_self().map_err(LandlockError::Restrict)?;
        Ok(match status.ruleset {
            RulesetStatus::FullyEnforced => Enforcement::Full,
            RulesetStatus::PartiallyEnforced => Enforcement::Partial,
            RulesetStatus::NotEnforced => Enforcement::None,
        })
    }
}

/// The rights a rule for standard stream `fd` gets: those of its open mode,
/// plus ioctls for devices; `None` for a closed fd, an anonymous pipe or a
/// socket (Landlock does not govern reopening those).
fn stdio_access(fd: BorrowedFd<'_>) -> Option<BitFlags<AccessFs>> {
    let st = rustix::fs::fstat(fd).ok()?;
    let kind = FileType::from_raw_mode(st.st_mode);
    if matches!(
        kind,
        FileType::Directory | FileType::Socket | FileType::Symlink
    ) {
        return None;
    }
    let fs = rustix::fs::fstatfs(fd).ok()?;
    if matches!(fs.f_type as i64, PIPEFS_MAGIC | SOCKFS_MAGIC) {
        return None;
    }
    let flags = rustix::fs::fcntl_getfl(fd).ok()?;
    let mut access = BitFlags::<AccessFs>::empty();
    match flags & OFlags::RWMODE {
        OFlags::RDONLY => access |= AccessFs::ReadFile,
        OFlags::WRONLY => access |= AccessFs::WriteFile | AccessFs::Truncate,
        _ => access |= AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::Truncate,
    }
    if matches!(kind, FileType::CharacterDevice | FileType::BlockDevice) {
        access |= AccessFs::IoctlDev;
    }
    Some(access)
}
