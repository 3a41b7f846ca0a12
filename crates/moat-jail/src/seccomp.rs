//! seccomp from the OCI `linux.seccomp` object, through libseccomp (linked statically).
//!
//! CONTRACT:
//! ```ignore
//! pub struct Filter { .. }              // compiled, ready to load
//! /// Translate and compile (default action, architectures, flags, syscalls with args, errnoRet,
//! /// SCMP_ACT_NOTIFY). Refuse unknown syscall names? No: runc/libseccomp ignore names unknown to
//! /// this kernel/arch; do the same but refuse unknown actions/operators/flags.
//! pub fn compile(seccomp: &LinuxSeccomp) -> Result<Filter, SeccompError>;
//! impl Filter { pub fn needs_notify(&self) -> bool;
//!   /// Load into the calling thread (with the spec's flags). Returns the notify fd if any.
//!   pub fn load(&self) -> Result<Option<OwnedFd>, SeccompError>; }
//! /// Send `fd` and the ContainerProcessState JSON (ociVersion, fds ["seccompFd"], pid,
//! /// metadata, state) to `listenerPath` over a unix socket with SCM_RIGHTS.
//! pub fn send_to_listener(path: &Path, metadata: &str, state: &oci_spec::runtime::State, pid: i32, fd: BorrowedFd) -> Result<(), SeccompError>;
//! ```
//!
//! Translation rules (what runc and crun do with libseccomp, and where moat differs):
//! - Unknown actions, operators, architectures and flags cannot reach this module: they are
//!   enums in `oci_spec`, so the spec fails to parse. Flags libseccomp cannot set (e.g.
//!   `SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV` with libseccomp 2.5) are an error here.
//! - Syscall names unknown to libseccomp for the native architecture are skipped (kept in
//!   [`Filter::skipped_syscalls`]), so one profile serves older and newer kernels.
//! - `errnoRet`/`defaultErrnoRet` default to `EPERM` for `SCMP_ACT_ERRNO` and `SCMP_ACT_TRACE`;
//!   giving one to any other action is an error, as the runtime spec requires.
//! - A rule whose action (errno included) equals the default action is skipped: it would
//!   change nothing, and libseccomp refuses it.
//! - `args` on distinct indexes are ANDed in one rule. When two or more conditions test the
//!   same index, libseccomp cannot AND them, so each condition becomes its own rule and they
//!   are ORed (runc's behaviour).
//! - `SCMP_CMP_MASKED_EQ` takes the mask from `value` and the expected value from `valueTwo`.
//! - libseccomp's own no_new_privs attribute is turned off: the caller sets no_new_privs from
//!   `process.noNewPrivileges`, so without it loading needs CAP_SYS_ADMIN.
//! - moat refuses `SCMP_ACT_NOTIFY` as the default action, on `write`/`sendmsg`/... (the
//!   runtime needs them to hand the notify fd over after the filter is loaded; a notify rule
//!   there would hang the container's start), and without `listenerPath`.
use std::io::{IoSlice, Write};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use libseccomp::{
    ScmpAction, ScmpArch, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall,
};
use oci_spec::runtime::{
    Arch, ContainerProcessStateBuilder, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg,
    LinuxSeccompFilterFlag, LinuxSeccompOperator, LinuxSyscall, State, SECCOMP_FD_NAME,
};
use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};

mod program;
pub use program::{prepare, seed, Program};

type LibError = libseccomp::error::SeccompError;

/// Highest errno the kernel passes through `SECCOMP_RET_ERRNO` (`MAX_ERRNO`).
const MAX_ERRNO: u32 = 4095;
/// Syscall arguments a seccomp condition can test.
const MAX_ARGS: usize = 6;
/// Syscalls the runtime itself makes after the filter is loaded (to pass the notify fd on and
/// report success), on which a notify rule would deadlock the start.
/// (`sendmsg` is not among them: the container process hands its listener fd
/// over from a thread the filter does not cover, see
/// `moat_container::process`.)
const RUNTIME_SYSCALLS: &[&str] = &["write", "writev", "sendto", "close", "exit", "exit_group"];

/// Why the seccomp filter could not be built, loaded or handed to its listener.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("creating the seccomp filter with default action {action}")]
    Init {
        action: LinuxSeccompAction,
        #[source]
        source: LibError,
    },
    #[error("SCMP_ACT_NOTIFY cannot be the default seccomp action")]
    DefaultNotify,
    #[error("seccomp action {action} takes no errnoRet (got {value})")]
    ErrnoNotAllowed {
        action: LinuxSeccompAction,
        value: u32,
    },
    #[error("seccomp errnoRet {value} for {action} is out of range (at most {max})")]
    ErrnoRange {
        action: LinuxSeccompAction,
        value: u32,
        max: u32,
    },
    #[error("adding architecture {arch} to the seccomp filter")]
    AddArch {
        arch: Arch,
        #[source]
        source: LibError,
    },
    #[error("setting seccomp flag {flag} (the linked libseccomp may not support it)")]
    Flag {
        flag: LinuxSeccompFilterFlag,
        #[source]
        source: LibError,
    },
    #[error("setting seccomp filter attribute {attr}")]
    Attr {
        attr: &'static str,
        #[source]
        source: LibError,
    },
    #[error("seccomp rule for {name}: argument index {index} is out of range (0..=5)")]
    ArgIndex { name: String, index: usize },
    #[error("SCMP_ACT_NOTIFY on {name} would block the runtime after the filter is loaded")]
    NotifyOnRuntimeSyscall { name: String },
    #[error("seccomp uses SCMP_ACT_NOTIFY but linux.seccomp.listenerPath is not set")]
    NotifyWithoutListener,
    #[error("adding the seccomp rule for syscall {name}")]
    AddRule {
        name: String,
        #[source]
        source: LibError,
    },
    #[error("loading the seccomp filter needs no_new_privs or CAP_SYS_ADMIN")]
    LoadNeedsPrivilege {
        #[source]
        source: LibError,
    },
    #[error("loading the seccomp filter")]
    Load {
        #[source]
        source: LibError,
    },
    #[error("exporting the seccomp program from libseccomp")]
    ExportBpf {
        #[source]
        source: LibError,
    },
    #[error("reading back the exported seccomp program")]
    Export {
        #[source]
        source: std::io::Error,
    },
    #[error("the seccomp program is malformed ({len} bytes, flags {flags:#x})")]
    BadProgram { len: usize, flags: libc::c_ulong },
    #[error("loading the compiled seccomp program")]
    LoadProgram {
        #[source]
        source: std::io::Error,
    },
    #[error("seccomp program cache")]
    Cache(#[from] crate::cache::CacheError),
    #[error("cannot {step} {path}")]
    CacheFile {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("getting the seccomp notify fd from libseccomp")]
    NotifyFd {
        #[source]
        source: LibError,
    },
    #[error("duplicating the seccomp notify fd")]
    DupNotifyFd {
        #[source]
        source: std::io::Error,
    },
    #[error("releasing libseccomp's copy of the notify fd")]
    Reset {
        #[source]
        source: LibError,
    },
    #[error("building the container process state for the seccomp listener")]
    ProcessState {
        #[source]
        source: oci_spec::OciSpecError,
    },
    #[error("serialising the container process state for the seccomp listener")]
    Serialize {
        #[source]
        source: serde_json::Error,
    },
    #[error("connecting to the seccomp listener {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("sending the seccomp notify fd to the listener {path}")]
    Send {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A compiled seccomp filter, ready to [`load`](Filter::load).
pub struct Filter {
    ctx: ScmpFilterContext,
    notify: bool,
    rules: usize,
    arches: Vec<ScmpArch>,
    skipped: Vec<String>,
    /// The `SECCOMP_FILTER_FLAG_*` bits libseccomp passes when loading.
    kernel_flags: libc::c_ulong,
    /// `SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV` was asked for.
    wait_killable: bool,
}

impl std::fmt::Debug for Filter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Filter")
            .field("notify", &self.notify)
            .field("rules", &self.rules)
            .field("arches", &self.arches)
            .field("skipped", &self.skipped)
            .finish_non_exhaustive()
    }
}

/// Translates and compiles `seccomp` (see the module docs for the rules).
pub fn compile(seccomp: &LinuxSeccomp) -> Result<Filter, SeccompError> {
    if seccomp.default_action() == LinuxSeccompAction::ScmpActNotify {
        return Err(SeccompError::DefaultNotify);
    }
    let default = action(seccomp.default_action(), seccomp.default_errno_ret())?;
    let ctx = ScmpFilterContext::new(default).map_err(|source| SeccompError::Init {
        action: seccomp.default_action(),
        source,
    })?;
    let mut filter = Filter {
        ctx,
        notify: false,
        rules: 0,
        arches: vec![ScmpArch::native()],
        skipped: Vec::new(),
        kernel_flags: 0,
        wait_killable: false,
    };
    filter.set_attributes(seccomp.flags().as_deref().unwrap_or_default())?;
    for &arch in seccomp.architectures().as_deref().unwrap_or_default() {
        filter.add_arch(arch)?;
    }
    for syscall in seccomp.syscalls().as_deref().unwrap_or_default() {
        filter.add_syscall(syscall, default)?;
    }
    if filter.notify && seccomp.listener_path().is_none() {
        return Err(SeccompError::NotifyWithoutListener);
    }
    Ok(filter)
}

/// The libseccomp action for an OCI action and its optional errno.
fn action(act: LinuxSeccompAction, errno_ret: Option<u32>) -> Result<ScmpAction, SeccompError> {
    use LinuxSeccompAction as A;
    let with_value = |max: u32| -> Result<u16, SeccompError> {
        let value = errno_ret.unwrap_or(libc::EPERM as u32);
        if value > max {
            return Err(SeccompError::ErrnoRange {
                action: act,
                value,
                max,
            });
        }
        u16::try_from(value).map_err(|_| SeccompError::ErrnoRange {
            action: act,
            value,
            max,
        })
    };
    let no_value = |scmp: ScmpAction| match errno_ret {
        Some(value) => Err(SeccompError::ErrnoNotAllowed { action: act, value }),
        None => Ok(scmp),
    };
    match act {
        A::ScmpActErrno => Ok(ScmpAction::Errno(i32::from(with_value(MAX_ERRNO)?))),
        A::ScmpActTrace => Ok(ScmpAction::Trace(with_value(u32::from(u16::MAX))?)),
        A::ScmpActKill | A::ScmpActKillThread => no_value(ScmpAction::KillThread),
        A::ScmpActKillProcess => no_value(ScmpAction::KillProcess),
        A::ScmpActTrap => no_value(ScmpAction::Trap),
        A::ScmpActNotify => no_value(ScmpAction::Notify),
        A::ScmpActLog => no_value(ScmpAction::Log),
        A::ScmpActAllow => no_value(ScmpAction::Allow),
    }
}

fn scmp_arch(arch: Arch) -> ScmpArch {
    match arch {
        Arch::ScmpArchNative => ScmpArch::Native,
        Arch::ScmpArchX86 => ScmpArch::X86,
        Arch::ScmpArchX86_64 => ScmpArch::X8664,
        Arch::ScmpArchX32 => ScmpArch::X32,
        Arch::ScmpArchArm => ScmpArch::Arm,
        Arch::ScmpArchAarch64 => ScmpArch::Aarch64,
        Arch::ScmpArchMips => ScmpArch::Mips,
        Arch::ScmpArchMips64 => ScmpArch::Mips64,
        Arch::ScmpArchMips64n32 => ScmpArch::Mips64N32,
        Arch::ScmpArchMipsel => ScmpArch::Mipsel,
        Arch::ScmpArchMipsel64 => ScmpArch::Mipsel64,
        Arch::ScmpArchMipsel64n32 => ScmpArch::Mipsel64N32,
        Arch::ScmpArchPpc => ScmpArch::Ppc,
        Arch::ScmpArchPpc64 => ScmpArch::Ppc64,
        Arch::ScmpArchPpc64le => ScmpArch::Ppc64Le,
        Arch::ScmpArchS390 => ScmpArch::S390,
        Arch::ScmpArchS390x => ScmpArch::S390X,
        Arch::ScmpArchParisc => ScmpArch::Parisc,
        Arch::ScmpArchParisc64 => ScmpArch::Parisc64,
        Arch::ScmpArchRiscv64 => ScmpArch::Riscv64,
        Arch::ScmpArchLoongarch64 => ScmpArch::Loongarch64,
        Arch::ScmpArchM68k => ScmpArch::M68k,
        Arch::ScmpArchSh => ScmpArch::Sh,
        Arch::ScmpArchSheb => ScmpArch::Sheb,
    }
}

fn condition(name: &str, arg: &LinuxSeccompArg) -> Result<ScmpArgCompare, SeccompError> {
    let index = arg.index();
    let Some(index32) = u32::try_from(index).ok().filter(|_| index < MAX_ARGS) else {
        return Err(SeccompError::ArgIndex {
            name: name.to_owned(),
            index,
        });
    };
    let cmp = |op| ScmpArgCompare::new(index32, op, arg.value());
    Ok(match arg.op() {
        LinuxSeccompOperator::ScmpCmpNe => cmp(ScmpCompareOp::NotEqual),
        LinuxSeccompOperator::ScmpCmpLt => cmp(ScmpCompareOp::Less),
        LinuxSeccompOperator::ScmpCmpLe => cmp(ScmpCompareOp::LessOrEqual),
        LinuxSeccompOperator::ScmpCmpEq => cmp(ScmpCompareOp::Equal),
        LinuxSeccompOperator::ScmpCmpGe => cmp(ScmpCompareOp::GreaterEqual),
        LinuxSeccompOperator::ScmpCmpGt => cmp(ScmpCompareOp::Greater),
        LinuxSeccompOperator::ScmpCmpMaskedEq => ScmpArgCompare::new(
            index32,
            ScmpCompareOp::MaskedEqual(arg.value()),
            arg.value_two().unwrap_or(0),
        ),
    })
}

/// The rules (each a list of ANDed conditions) for one syscall entry: one rule with every
/// condition, or one rule per condition when an argument index repeats.
fn condition_sets(
    name: &str,
    args: &[LinuxSeccompArg],
) -> Result<Vec<Vec<ScmpArgCompare>>, SeccompError> {
    let conds = args
        .iter()
        .map(|a| condition(name, a))
        .collect::<Result<Vec<_>, _>>()?;
    let mut seen = [false; MAX_ARGS];
    let repeats = args
        .iter()
        .any(|a| std::mem::replace(&mut seen[a.index()], true));
    if repeats {
        Ok(conds.into_iter().map(|c| vec![c]).collect())
    } else {
        Ok(vec![conds])
    }
}

impl Filter {
    fn set_attributes(&mut self, flags: &[LinuxSeccompFilterFlag]) -> Result<(), SeccompError> {
        let attr = |attr: &'static str| move |source| SeccompError::Attr { attr, source };
        self.ctx
            .set_ctl_nnp(false)
            .map_err(attr("no_new_privs off"))?;
        self.ctx
            .set_api_sysrawrc(true)
            .map_err(attr("raw kernel return codes"))?;
        for &flag in flags {
            let res = match flag {
                LinuxSeccompFilterFlag::SeccompFilterFlagTsync => self.ctx.set_ctl_tsync(true),
                LinuxSeccompFilterFlag::SeccompFilterFlagLog => self.ctx.set_ctl_log(true),
                LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => self.ctx.set_ctl_ssb(true),
                LinuxSeccompFilterFlag::SeccompFilterFlagWaitKillableRecv => {
                    self.ctx.set_ctl_waitkill(true)
                }
            };
            res.map_err(|source| SeccompError::Flag { flag, source })?;
            self.kernel_flags |= match flag {
                LinuxSeccompFilterFlag::SeccompFilterFlagTsync => libc::SECCOMP_FILTER_FLAG_TSYNC,
                LinuxSeccompFilterFlag::SeccompFilterFlagLog => libc::SECCOMP_FILTER_FLAG_LOG,
                LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => {
                    libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW
                }
                LinuxSeccompFilterFlag::SeccompFilterFlagWaitKillableRecv => {
                    self.wait_killable = true;
                    0
                }
            };
        }
        Ok(())
    }

    fn add_arch(&mut self, arch: Arch) -> Result<(), SeccompError> {
        let scmp = scmp_arch(arch);
        let present = self
            .ctx
            .is_arch_present(scmp)
            .map_err(|source| SeccompError::AddArch { arch, source })?;
        if !present {
            self.ctx
                .add_arch(scmp)
                .map_err(|source| SeccompError::AddArch { arch, source })?;
            self.arches.push(scmp);
        }
        Ok(())
    }

    fn add_syscall(
        &mut self,
        syscall: &LinuxSyscall,
        default: ScmpAction,
    ) -> Result<(), SeccompError> {
        let act = action(syscall.action(), syscall.errno_ret())?;
        // A conditional notify rule (the sandbox's `sendto` with an address)
        // leaves the runtime's own calls to the kernel; `sendmsg` from a
        // filter is handed over by a thread outside it (moat-container).
        let conditional = syscall.args().as_ref().is_some_and(|a| !a.is_empty());
        if act == ScmpAction::Notify && !conditional {
            if let Some(name) = syscall
                .names()
                .iter()
                .find(|n| RUNTIME_SYSCALLS.contains(&n.as_str()))
            {
                return Err(SeccompError::NotifyOnRuntimeSyscall { name: name.clone() });
            }
        }
        if act == default {
            return Ok(());
        }
        for name in syscall.names() {
            let Ok(nr) = ScmpSyscall::from_name(name) else {
                self.skipped.push(name.clone());
                continue;
            };
            for conds in condition_sets(name, syscall.args().as_deref().unwrap_or_default())? {
                self.ctx
                    .add_rule_conditional(act, nr, &conds)
                    .map_err(|source| SeccompError::AddRule {
                        name: name.clone(),
                        source,
                    })?;
                self.rules += 1;
                self.notify |= act == ScmpAction::Notify;
            }
        }
        Ok(())
    }

    /// Whether a rule with `SCMP_ACT_NOTIFY` was added: [`load`](Filter::load) then returns
    /// the notify fd, to be sent to the listener.
    pub fn needs_notify(&self) -> bool {
        self.notify
    }

    /// Rules added to libseccomp (one per syscall and condition set).
    pub fn rule_count(&self) -> usize {
        self.rules
    }

    /// Architectures in the filter: the native one first, then those the spec added.
    pub fn architectures(&self) -> &[ScmpArch] {
        &self.arches
    }

    /// Syscall names libseccomp does not know for the native architecture, left out.
    pub fn skipped_syscalls(&self) -> &[String] {
        &self.skipped
    }

    /// The classic BPF program libseccomp generates for this filter (what
    /// [`load`](Filter::load) installs), with the kernel flags its load
    /// passes: with notify rules, `SECCOMP_FILTER_FLAG_NEW_LISTENER` (and
    /// `WAIT_KILLABLE_RECV` when asked), so that loading it returns the
    /// listener.
    pub fn program(&self) -> Result<Option<Program>, SeccompError> {
        let mut flags = self.kernel_flags;
        if self.notify {
            flags |= libc::SECCOMP_FILTER_FLAG_NEW_LISTENER;
            if self.wait_killable {
                flags |= libc::SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV;
            }
        }
        let export = |source| SeccompError::Export { source };
        let fd = rustix::fs::memfd_create("moat-seccomp", rustix::fs::MemfdFlags::CLOEXEC)
            .map_err(|e| export(e.into()))?;
        self.ctx
            .export_bpf(&fd)
            .map_err(|source| SeccompError::ExportBpf { source })?;
        let mut f = std::fs::File::from(fd);
        let mut bytes = Vec::new();
        std::io::Seek::rewind(&mut f).map_err(export)?;
        std::io::Read::read_to_end(&mut f, &mut bytes).map_err(export)?;
        Program::from_parts(bytes, flags).map(Some)
    }

    /// Loads the filter into the calling thread (all threads with `SECCOMP_FILTER_FLAG_TSYNC`).
    /// Without no_new_privs this needs CAP_SYS_ADMIN; the caller orders the steps. Returns
    /// the notify fd (close-on-exec, owned by the caller) when the filter uses
    /// `SCMP_ACT_NOTIFY`.
    pub fn load(&self) -> Result<Option<OwnedFd>, SeccompError> {
        self.ctx.load().map_err(|source| {
            if source.sysrawrc() == Some(-libc::EACCES) {
                SeccompError::LoadNeedsPrivilege { source }
            } else {
                SeccompError::Load { source }
            }
        })?;
        if !self.notify {
            return Ok(None);
        }
        let raw = self
            .ctx
            .get_notify_fd()
            .map_err(|source| SeccompError::NotifyFd { source })?;
        let fd = moat_sys::process::dup_raw_fd(raw)
            .map_err(|source| SeccompError::DupNotifyFd { source })?;
        // libseccomp keeps its own copy in global state; resetting that state closes it, so
        // the caller's fd is the only one left.
        libseccomp::reset_global_state().map_err(|source| SeccompError::Reset { source })?;
        Ok(Some(fd))
    }
}

/// Sends `fd` and the `ContainerProcessState` JSON (ociVersion, fds `["seccompFd"]`, pid,
/// metadata, state) to the seccomp agent listening on `path`, over a `SOCK_STREAM` unix socket
/// with `SCM_RIGHTS`. The fd travels with the first bytes of the JSON.
///
/// Call it from a process outside the filter (runc's way: the container's init hands the fd
/// to the runtime over the setup socket, and the runtime sends it on), so that a notify rule
/// on `socket`/`connect` cannot block the hand-over.
pub fn send_to_listener(
    path: &Path,
    metadata: &str,
    state: &State,
    pid: i32,
    fd: BorrowedFd<'_>,
) -> Result<(), SeccompError> {
    let version = if state.version().is_empty() {
        oci_spec::runtime::VERSION
    } else {
        state.version()
    };
    let mut builder = ContainerProcessStateBuilder::default()
        .version(version)
        .fds(vec![SECCOMP_FD_NAME.to_owned()])
        .pid(pid)
        .state(state.clone());
    if !metadata.is_empty() {
        builder = builder.metadata(metadata);
    }
    let process_state = builder
        .build()
        .map_err(|source| SeccompError::ProcessState { source })?;
    let json =
        serde_json::to_vec(&process_state).map_err(|source| SeccompError::Serialize { source })?;

    let mut stream = UnixStream::connect(path).map_err(|source| SeccompError::Connect {
        path: path.to_owned(),
        source,
    })?;
    let send_err = |source| SeccompError::Send {
        path: path.to_owned(),
        source,
    };
    let fds = [fd];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(send_err(std::io::Error::from_raw_os_error(libc::ENOBUFS)));
    }
    let sent = loop {
        match rustix::net::sendmsg(
            &stream,
            &[IoSlice::new(&json)],
            &mut control,
            SendFlags::NOSIGNAL,
        ) {
            Ok(n) => break n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(send_err(e.into())),
        }
    };
    if sent == 0 {
        return Err(send_err(std::io::Error::from(
            std::io::ErrorKind::WriteZero,
        )));
    }
    stream.write_all(&json[sent..]).map_err(send_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_sys::process::run_in_child;
    use std::os::fd::{AsFd, AsRawFd};

    fn parse(json: &str) -> LinuxSeccomp {
        serde_json::from_str(json).expect("test seccomp JSON parses")
    }

    #[test]
    fn translates_rules_arches_and_skips() {
        let s = parse(
            r#"{
            "defaultAction": "SCMP_ACT_ERRNO",
            "defaultErrnoRet": 38,
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
            "flags": ["SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_SPEC_ALLOW"],
            "syscalls": [
                {"names": ["read", "write", "no_such_syscall_xyz"], "action": "SCMP_ACT_ALLOW"},
                {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"},
                          {"index": 0, "value": 8, "op": "SCMP_CMP_EQ"}]},
                {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 2114060288, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"},
                          {"index": 1, "value": 0, "op": "SCMP_CMP_NE"}]},
                {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}
            ]}"#,
        );
        let f = compile(&s).unwrap();
        // read, write; personality twice (same index: ORed); clone once (ANDed); mkdir is the default.
        assert_eq!(f.rule_count(), 5);
        assert_eq!(f.skipped_syscalls(), ["no_such_syscall_xyz"]);
        let arches = f.architectures();
        assert_eq!(arches[0], ScmpArch::native());
        assert!(arches.contains(&ScmpArch::X86) && arches.contains(&ScmpArch::X32));
        assert!(!f.needs_notify());
    }

    #[test]
    fn unknown_action_op_arch_flag_fail_to_parse() {
        for bad in [
            r#"{"defaultAction": "SCMP_ACT_BOGUS"}"#,
            r#"{"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_VAX"]}"#,
            r#"{"defaultAction": "SCMP_ACT_ALLOW", "flags": ["SECCOMP_FILTER_FLAG_BOGUS"]}"#,
            r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ERRNO",
                "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_ALMOST"}]}]}"#,
        ] {
            assert!(serde_json::from_str::<LinuxSeccomp>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn refuses_bad_values() {
        let cases = [
            (
                r#"{"defaultAction": "SCMP_ACT_ALLOW", "defaultErrnoRet": 1}"#,
                "ErrnoNotAllowed",
            ),
            (
                r#"{"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 70000}"#,
                "ErrnoRange",
            ),
            (r#"{"defaultAction": "SCMP_ACT_NOTIFY"}"#, "DefaultNotify"),
            (
                r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ERRNO",
                    "args": [{"index": 6, "value": 1, "op": "SCMP_CMP_EQ"}]}]}"#,
                "ArgIndex",
            ),
            (
                r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_KILL", "errnoRet": 3}]}"#,
                "ErrnoNotAllowed",
            ),
            (
                r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["getppid"], "action": "SCMP_ACT_NOTIFY"}]}"#,
                "NotifyWithoutListener",
            ),
            (
                r#"{"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/x",
                    "syscalls": [{"names": ["write"], "action": "SCMP_ACT_NOTIFY"}]}"#,
                "NotifyOnRuntimeSyscall",
            ),
            (
                r#"{"defaultAction": "SCMP_ACT_ALLOW", "flags": ["SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV"]}"#,
                "Flag",
            ),
        ];
        for (json, want) in cases {
            match compile(&parse(json)) {
                Ok(_)
                    if want == "Flag"
                        && libseccomp::check_version((2, 6, 0).into()).unwrap_or(false) => {}
                Ok(f) => panic!("{json} compiled: {f:?}"),
                Err(e) => assert!(format!("{e:?}").starts_with(want), "{json}: {e:?}"),
            }
        }
    }

    #[test]
    fn errno_and_arg_conditions_apply_in_a_child() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("d");
        let s = parse(
            r#"{
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [
                {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
                {"names": ["personality"], "action": "SCMP_ACT_ERRNO", "errnoRet": 42,
                 "args": [{"index": 0, "value": 4294967295, "op": "SCMP_CMP_NE"},
                          {"index": 1, "value": 0, "op": "SCMP_CMP_EQ"}]},
                {"names": ["getpriority"], "action": "SCMP_ACT_ERRNO", "errnoRet": 43,
                 "args": [{"index": 1, "value": 11111, "op": "SCMP_CMP_EQ"},
                          {"index": 1, "value": 22222, "op": "SCMP_CMP_EQ"}]}
            ]}"#,
        );
        let code = run_in_child(0, || {
            let Ok(filter) = compile(&s) else { return 2 };
            if rustix::thread::set_no_new_privs(true).is_err() {
                return 3;
            }
            if !matches!(filter.load(), Ok(None)) {
                return 4;
            }
            match std::fs::create_dir(&target) {
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
                _ => return 5,
            }
            // The query form (arg0 == 0xffffffff) is allowed; anything else gets errno 42.
            if moat_sys::process::personality(0xffff_ffff).is_err() {
                return 6;
            }
            match moat_sys::process::personality(0) {
                Err(e) if e.raw_os_error() == Some(42) => {}
                _ => return 7,
            }
            // Two conditions on the same index are ORed: both values are refused ...
            for who in [11111, 22222] {
                match rustix::process::getpriority_user(rustix::process::Uid::from_raw(who)) {
                    Err(e) if e.raw_os_error() == 43 => {}
                    _ => return 8,
                }
            }
            // ... and other values pass.
            if rustix::process::getpriority_user(rustix::process::Uid::from_raw(0)).is_err() {
                return 9;
            }
            0
        })
        .unwrap();
        assert_eq!(code, 0);
        assert!(!target.exists());
    }

    #[test]
    fn load_without_nnp_or_cap_sys_admin_is_explained() {
        let s = parse(
            r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO"}]}"#,
        );
        let code = run_in_child(0, || {
            let Ok(filter) = compile(&s) else { return 2 };
            // Drop CAP_SYS_ADMIN from the effective set; no_new_privs stays off.
            if ::caps::drop(
                None,
                ::caps::CapSet::Effective,
                ::caps::Capability::CAP_SYS_ADMIN,
            )
            .is_err()
            {
                return 3;
            }
            match filter.load() {
                Err(SeccompError::LoadNeedsPrivilege { .. }) => 0,
                Ok(_) => 4,
                Err(_) => 5,
            }
        })
        .unwrap();
        assert_eq!(code, 0);
    }

    #[test]
    fn notify_fd_reaches_the_listener_and_works() {
        use libseccomp::{ScmpNotifReq, ScmpNotifResp, ScmpNotifRespFlags};
        use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
        use std::io::IoSliceMut;
        use std::os::unix::net::UnixListener;

        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let s = parse(&format!(
            r#"{{"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "{}", "listenerMetadata": "hello",
                "syscalls": [{{"names": ["getppid"], "action": "SCMP_ACT_NOTIFY"}}]}}"#,
            sock.display()
        ));

        // The agent: receive the state and the fd, then answer one getppid with 4242.
        let agent = std::thread::spawn(move || -> Result<(serde_json::Value, u64), String> {
            let (conn, _) = listener.accept().map_err(|e| e.to_string())?;
            let mut buf = vec![0u8; 64 * 1024];
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let msg = rustix::net::recvmsg(
                &conn,
                &mut [IoSliceMut::new(&mut buf)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            )
            .map_err(|e| e.to_string())?;
            let mut fds: Vec<OwnedFd> = Vec::new();
            for m in control.drain() {
                if let RecvAncillaryMessage::ScmRights(rights) = m {
                    fds.extend(rights);
                }
            }
            let fd = fds.pop().ok_or("no fd received")?;
            let mut json = buf[..msg.bytes].to_vec();
            let mut rest = Vec::new();
            std::io::Read::read_to_end(&mut &conn, &mut rest).map_err(|e| e.to_string())?;
            json.extend(rest);
            let state: serde_json::Value =
                serde_json::from_slice(&json).map_err(|e| e.to_string())?;
            let req = ScmpNotifReq::receive(fd.as_fd().as_raw_fd()).map_err(|e| e.to_string())?;
            let name = req.data.syscall.get_name().map_err(|e| e.to_string())?;
            if name != "getppid" {
                return Err(format!("notified for {name}"));
            }
            ScmpNotifResp::new_val(req.id, 4242, ScmpNotifRespFlags::empty())
                .respond(fd.as_fd().as_raw_fd())
                .map_err(|e| e.to_string())?;
            Ok((state, u64::from(req.pid)))
        });

        let mut state = State::default();
        state.set_id("ctr".to_owned());
        let code = run_in_child(0, || {
            let Ok(filter) = compile(&s) else { return 2 };
            if !filter.needs_notify() || rustix::thread::set_no_new_privs(true).is_err() {
                return 3;
            }
            let Ok(Some(fd)) = filter.load() else {
                return 4;
            };
            // libseccomp's own copy was closed: exactly one seccomp notify fd is open.
            let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
                return 5;
            };
            let notify_fds = entries
                .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|l| l.to_string_lossy().contains("seccomp notify"))
                .count();
            if notify_fds != 1 {
                return 6;
            }
            let pid = rustix::process::getpid().as_raw_nonzero().get();
            if send_to_listener(&sock, "hello", &state, pid, fd.as_fd()).is_err() {
                return 7;
            }
            if rustix::process::getppid().map(|p| p.as_raw_nonzero().get()) != Some(4242) {
                return 8;
            }
            0
        })
        .unwrap();
        let (json, notified_pid) = agent.join().unwrap().unwrap();
        assert_eq!(code, 0);
        assert_eq!(json["fds"], serde_json::json!(["seccompFd"]));
        assert_eq!(json["metadata"], "hello");
        assert_eq!(json["state"]["id"], "ctr");
        assert_eq!(json["pid"].as_u64(), Some(notified_pid));
    }
}
