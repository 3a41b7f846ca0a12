//! A moat helper process confining itself before it serves an untrusted
//! workload (the user-space network stack; the sandbox supervisor): every
//! descriptor but the ones it needs closed, an unprivileged host user, no
//! capabilities, no_new_privs, not dumpable, a Landlock ruleset that lets it
//! read only what it names, and a seccomp allow-list (every other syscall
//! fails with EPERM). The order is the one the kernel needs: the user switch
//! drops the capabilities, no_new_privs lets an unprivileged process load
//! Landlock and seccomp, and seccomp comes last so nothing before it needs
//! to be on its list.
use std::os::fd::RawFd;
use std::path::PathBuf;

use oci_spec::runtime::{
    LinuxSeccompAction, LinuxSeccompArgBuilder, LinuxSeccompBuilder, LinuxSeccompOperator,
    LinuxSyscallBuilder,
};

#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error("cannot close inherited descriptors")]
    Fds(#[source] std::io::Error),
    #[error("cannot switch to host user {uid}:{gid}")]
    User {
        uid: u32,
        gid: u32,
        #[source]
        source: nix::Error,
    },
    #[error("cannot limit {resource} to {value}")]
    Limit {
        resource: String,
        value: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("capabilities remain after the switch to an unprivileged user")]
    CapsRemain,
    #[error("process attributes")]
    Attr(#[from] crate::attrs::AttrError),
    #[error("cannot make the process non-dumpable")]
    Dumpable(#[source] nix::Error),
    #[error("landlock")]
    Landlock(#[from] crate::landlock::LandlockError),
    #[error("landlock is not enforced by this kernel")]
    LandlockNotEnforced,
    #[error("seccomp")]
    Seccomp(#[from] crate::seccomp::SeccompError),
    #[error("cannot build the seccomp profile")]
    Profile(#[source] oci_spec::OciSpecError),
}

/// What a helper keeps once confined.
#[derive(Debug, Clone)]
pub struct Confinement<'a> {
    /// The host user and group it becomes.
    pub uid: u32,
    pub gid: u32,
    /// Descriptors it keeps open (besides 0, 1 and 2).
    pub keep_fds: &'a [RawFd],
    /// Paths it may read (and execute); everything else on the filesystem
    /// is refused by Landlock.
    pub read: &'a [PathBuf],
    /// The syscalls it may make, by name; each with its reason in the
    /// caller's docs.
    pub syscalls: &'a [&'a str],
    /// Resource limits it takes (soft and hard alike), so that a bug the
    /// untrusted side triggers cannot grow it without bound.
    pub limits: &'a [(rustix::process::Resource, u64)],
}

impl Confinement<'_> {
    /// Confines the calling process, which must be single-threaded (the
    /// user switch and the filter apply to this thread; threads started
    /// afterwards inherit them). Fails closed: any step that fails is an
    /// error, and the caller must not serve then.
    pub fn apply(&self) -> Result<(), ConfineError> {
        self.close_other_fds()?;
        self.set_limits()?;
        self.switch_user()?;
        crate::attrs::set_no_new_privs()?;
        nix::sys::prctl::set_dumpable(false).map_err(ConfineError::Dumpable)?;
        let policy = moat_core::landlock::LandlockPolicy {
            read: self.read.to_vec(),
            write: Vec::new(),
            files: Vec::new(),
            // It never executes anything.
            execute: Some(Vec::new()),
        };
        match crate::landlock::prepare(&policy)?.restrict()? {
            crate::landlock::Enforcement::Full | crate::landlock::Enforcement::Partial => {}
            _ => return Err(ConfineError::LandlockNotEnforced),
        }
        self.load_seccomp()
    }

    fn close_other_fds(&self) -> Result<(), ConfineError> {
        moat_sys::fd::close_all_except(self.keep_fds).map_err(ConfineError::Fds)
    }

    fn set_limits(&self) -> Result<(), ConfineError> {
        for &(resource, value) in self.limits {
            let limit = rustix::process::Rlimit {
                current: Some(value),
                maximum: Some(value),
            };
            rustix::process::setrlimit(resource, limit).map_err(|e| ConfineError::Limit {
                resource: format!("{resource:?}"),
                value,
                source: e.into(),
            })?;
        }
        Ok(())
    }

    fn switch_user(&self) -> Result<(), ConfineError> {
        use nix::unistd::{setgroups, setresgid, setresuid, Gid, Uid};
        let err = |source| ConfineError::User {
            uid: self.uid,
            gid: self.gid,
            source,
        };
        if rustix::process::geteuid().is_root() {
            setgroups(&[]).map_err(err)?;
        }
        let g = Gid::from_raw(self.gid);
        setresgid(g, g, g).map_err(err)?;
        let u = Uid::from_raw(self.uid);
        setresuid(u, u, u).map_err(err)?;
        // Leaving root clears every capability set; make sure it did.
        let caps =
            caps::read(None, caps::CapSet::Permitted).map_err(|_| ConfineError::CapsRemain)?;
        if self.uid != 0 && !caps.is_empty() {
            return Err(ConfineError::CapsRemain);
        }
        Ok(())
    }

    /// The allow-list, except that `clone` may not create namespaces (its
    /// flags are checked) and `clone3`, whose flags the filter cannot read,
    /// fails with ENOSYS so the C library falls back to `clone` for threads.
    fn load_seccomp(&self) -> Result<(), ConfineError> {
        let listed = |n: &str| self.syscalls.contains(&n);
        let names: Vec<String> = self
            .syscalls
            .iter()
            .filter(|s| !matches!(**s, "clone" | "clone3"))
            .map(|s| (*s).to_owned())
            .collect();
        let mut rules = vec![LinuxSyscallBuilder::default()
            .names(names)
            .action(LinuxSeccompAction::ScmpActAllow)
            .build()
            .map_err(ConfineError::Profile)?];
        if listed("clone") {
            let no_namespaces = LinuxSeccompArgBuilder::default()
                .index(0usize)
                .value(CLONE_NAMESPACES)
                .value_two(0u64)
                .op(LinuxSeccompOperator::ScmpCmpMaskedEq)
                .build()
                .map_err(ConfineError::Profile)?;
            rules.push(
                LinuxSyscallBuilder::default()
                    .names(vec!["clone".to_owned()])
                    .action(LinuxSeccompAction::ScmpActAllow)
                    .args(vec![no_namespaces])
                    .build()
                    .map_err(ConfineError::Profile)?,
            );
        }
        if listed("clone3") {
            rules.push(
                LinuxSyscallBuilder::default()
                    .names(vec!["clone3".to_owned()])
                    .action(LinuxSeccompAction::ScmpActErrno)
                    .errno_ret(libc::ENOSYS as u32)
                    .build()
                    .map_err(ConfineError::Profile)?,
            );
        }
        let profile = LinuxSeccompBuilder::default()
            .default_action(LinuxSeccompAction::ScmpActErrno)
            .default_errno_ret(libc::EPERM as u32)
            .syscalls(rules)
            .build()
            .map_err(ConfineError::Profile)?;
        crate::seccomp::compile(&profile)?.load()?;
        Ok(())
    }
}

/// `clone` flags that make a namespace (CLONE_NEWNS, NEWCGROUP, NEWUTS,
/// NEWIPC, NEWUSER, NEWPID, NEWNET; 0x80 is CLONE_NEWTIME only for
/// `clone3` and `unshare`, part of the exit signal for `clone`).
const CLONE_NAMESPACES: u64 = 0x7e02_0000;

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// In a forked child: once confined it is the unprivileged user with no
    /// capability, reads what it was given, cannot open anything else or
    /// make a syscall off its list, has lost the descriptors it did not
    /// keep, and can still use the one it kept.
    #[test]
    fn a_confined_child_keeps_only_what_it_was_given() {
        if moat_core::testing::needs_root("a_confined_child_keeps_only_what_it_was_given") {
            return;
        }
        let (r, w) = rustix::pipe::pipe().unwrap();
        let stray = std::fs::File::open("/proc/self/status").unwrap();
        let code = moat_sys::process::run_in_child(0, || {
            // The proof of one thread, while /proc can still be read.
            let Ok(one) = moat_sys::process::OneThread::check() else {
                return 101;
            };
            let c = Confinement {
                uid: 65534,
                gid: 65534,
                keep_fds: &[w.as_raw_fd()],
                read: &[PathBuf::from("/etc")],
                syscalls: &[
                    "read",
                    "write",
                    "openat",
                    "close",
                    "exit",
                    "exit_group",
                    "getuid",
                    "fcntl",
                    "sigaltstack",
                    "munmap",
                    "rt_sigprocmask",
                    "capget",
                    "statx",
                    "newfstatat",
                    "fstat",
                    "clone",
                    "clone3",
                ],
                limits: &[(rustix::process::Resource::Nofile, 16)],
            };
            if let Err(e) = c.apply() {
                eprintln!("{}", moat_core::error_chain(&e));
                return 100;
            }
            let mut bits = 0;
            if nix::unistd::getuid().as_raw() == 65534 {
                bits |= 1;
            }
            if std::fs::read("/etc/hostname").is_ok() {
                bits |= 2;
            }
            if std::fs::File::open("/proc/self/status").is_err() {
                bits |= 4;
            }
            if nix::unistd::setsid() == Err(nix::Error::EPERM) {
                bits |= 8;
            }
            if nix::fcntl::fcntl(&stray, nix::fcntl::FcntlArg::F_GETFD).is_err() {
                bits |= 16;
            }
            if nix::unistd::write(&w, b"x").is_ok() {
                bits |= 32;
            }
            // The descriptor limit holds: no more than 16 open at once.
            let held: Vec<_> = (0..32)
                .map_while(|_| std::fs::File::open("/etc/hostname").ok())
                .collect();
            if held.len() < 16 {
                bits |= 64;
            }
            // clone: a plain fork is allowed, one that makes a namespace
            // is refused.
            // (`fork` adds SIGCHLD to the flags.)
            if one.fork(0, |_| 0).is_ok()
                && one
                    .fork(libc::CLONE_NEWUSER, |_| 0)
                    .is_err_and(|e| e.raw_os_error() == Some(libc::EPERM))
                && one
                    .fork(libc::CLONE_NEWNET, |_| 0)
                    .is_err_and(|e| e.raw_os_error() == Some(libc::EPERM))
            {
                bits |= 128;
            }
            bits
        })
        .unwrap();
        drop(w);
        let mut buf = [0u8; 1];
        let got = rustix::io::read(&r, &mut buf).unwrap_or(0);
        assert_eq!(code, 255, "confinement checks (bits): {code:#b}");
        assert_eq!(got, 1);
    }
}
