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
