//! The lifecycle seam: what every isolation tier implements, and the only
//! thing the CLI (the OCI commands, `moat run`, the engines' paths) knows of
//! a tier. The CLI resolves the tier once ([`crate::tier::select`]), asks
//! one place whether this host can run it, and from then on talks to the
//! tier through [`Lifecycle`]; commands on an existing container go to the
//! tier its state records.
//!
//! The "container process" of the OCI runtime-spec is whatever process the
//! tier starts as the container's PID: the workload's init for `container`.
//! A tier that runs a supervisor or a VMM says which process that is in
//! docs/design.md.
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxResources, Process, Spec};

use crate::spec::SpecError;
use crate::state::{ContainerStatus, State, StateError};
use crate::stats::{LimitEvents, Stats};
use crate::tier::Tier;

/// A container's config.json, parsed and validated once, with the paths it
/// names resolved.
#[derive(Debug, Clone)]
pub struct Config {
    pub spec: Spec,
    /// The root filesystem, absolute.
    pub rootfs: PathBuf,
    pub source: ConfigSource,
}

/// Where the config came from.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    /// `<bundle>/config.json`; the bundle directory, canonical.
    Bundle(PathBuf),
    /// Given in memory (`moat run` generates it): the tier keeps these bytes
    /// as its copy, and the container's state directory stands for the
    /// bundle.
    Memory(Vec<u8>),
    /// A bundle's config as a stronger tier rewrote it (the sandbox tier
    /// adds its seccomp listener): the bundle stays the container's bundle,
    /// and these bytes are kept as its config copy.
    Rewritten { bundle: PathBuf, bytes: Vec<u8> },
}

impl Config {
    /// Reads and validates `<bundle>/config.json`.
    pub fn from_bundle(bundle: &Path) -> Result<Config, SpecError> {
        let bundle = std::fs::canonicalize(bundle).map_err(|source| SpecError::Bundle {
            path: bundle.to_owned(),
            source,
        })?;
        let (spec, rootfs) = crate::spec::load_bundle(&bundle)?;
        Ok(Config {
            spec,
            rootfs,
            source: ConfigSource::Bundle(bundle),
        })
    }

    /// Parses and validates a config given in memory; its `root.path` must
    /// be absolute (there is no bundle to be relative to).
    pub fn from_memory(bytes: Vec<u8>) -> Result<Config, SpecError> {
        let spec = crate::spec::parse_for_create(bytes.as_slice(), Path::new("config.json"))?;
        crate::spec::validate(&spec)?;
        let root = spec
            .root()
            .as_ref()
            .ok_or_else(|| SpecError::Invalid("root is missing".into()))?;
        if !root.path().is_absolute() {
            return Err(SpecError::Invalid(format!(
                "root.path {} must be absolute in a config given without a bundle",
                root.path().display()
            )));
        }
        let rootfs = root.path().clone();
        crate::spec::check_rootfs(&rootfs)?;
        Ok(Config {
            spec,
            rootfs,
            source: ConfigSource::Memory(bytes),
        })
    }

    /// The same container with `spec` in place of its config: the bytes a
    /// tier keeps are `spec`'s, the bundle (if any) stays.
    pub fn rewritten(&self, spec: Spec) -> Result<Config, serde_json::Error> {
        let bytes = serde_json::to_vec(&spec)?;
        let source = match &self.source {
            ConfigSource::Bundle(bundle) | ConfigSource::Rewritten { bundle, .. } => {
                ConfigSource::Rewritten {
                    bundle: bundle.clone(),
                    bytes,
                }
            }
            ConfigSource::Memory(_) => ConfigSource::Memory(bytes),
        };
        Ok(Config {
            spec,
            rootfs: self.rootfs.clone(),
            source,
        })
    }

    /// The tier the config's annotation asks for, if any.
    pub fn tier_annotation(&self) -> Result<Option<Tier>, RuntimeError> {
        self.spec
            .annotations()
            .as_ref()
            .and_then(|a| a.get(crate::tier::TIER_ANNOTATION))
            .map(|v| v.parse::<Tier>().map_err(RuntimeError::Invalid))
            .transpose()
    }
}

/// What `create` (and `launch`) get, runc's options included.
#[derive(Debug)]
pub struct CreateRequest<'a> {
    pub id: &'a str,
    pub config: &'a Config,
    pub pid_file: Option<&'a Path>,
    pub console_socket: Option<&'a Path>,
    pub no_pivot: bool,
    pub no_new_keyring: bool,
    pub preserve_fds: u32,
    /// The container dies when the process that launched it does (`moat
    /// run` supervises it; killed, it leaves no orphan).
    pub die_with_runtime: bool,
}

/// A container started by [`Lifecycle::launch`]: its container process is
/// a child of the caller, who waits for it.
#[derive(Debug)]
pub struct Launched {
    pub pid: i32,
    /// The pty master, when the process has a terminal and no console
    /// socket was given: the caller relays it.
    pub terminal: Option<OwnedFd>,
}

/// Options of `exec`, as runc names them.
#[derive(Debug, Default, Clone)]
pub struct ExecOptions {
    pub detach: bool,
    pub pid_file: Option<PathBuf>,
    pub console_socket: Option<PathBuf>,
    pub preserve_fds: u32,
}

/// A container as it is now: its saved state and its derived status.
#[derive(Debug, Clone)]
pub struct Current {
    pub state: State,
    pub status: ContainerStatus,
}

/// The lifecycle every tier implements. Each method is one OCI command;
/// `launch` is `create` + `start` with the caller as the container
/// process's parent (runc's `run`, `moat run`).
pub trait Lifecycle {
    fn tier(&self) -> Tier;
    /// `create`: the container process waits for `start`.
    fn create(&self, req: &CreateRequest) -> Result<(), RuntimeError>;
    fn launch(&self, req: &CreateRequest) -> Result<Launched, RuntimeError>;
    fn start(&self, id: &str) -> Result<(), RuntimeError>;
    fn state(&self, id: &str) -> Result<Current, RuntimeError>;
    /// Sends `signal` to the container process, or with `all` to every
    /// process of the container.
    fn kill(&self, id: &str, signal: i32, all: bool) -> Result<(), RuntimeError>;
    fn delete(&self, id: &str, force: bool) -> Result<(), RuntimeError>;
    /// Runs `process` in the container; its exit status (0 at once when
    /// detached).
    fn exec(&self, id: &str, process: &Process, opts: &ExecOptions) -> Result<i32, RuntimeError>;
    /// PIDs of the container's processes, as the runtime sees them.
    fn ps(&self, id: &str) -> Result<Vec<i32>, RuntimeError>;
    fn pause(&self, id: &str) -> Result<(), RuntimeError>;
    fn resume(&self, id: &str) -> Result<(), RuntimeError>;
    fn update(&self, id: &str, resources: &LinuxResources) -> Result<(), RuntimeError>;
    fn stats(&self, id: &str) -> Result<Stats, RuntimeError>;
    /// Limits hit so far (readable after the container process exited,
    /// until `delete`).
    fn events(&self, id: &str) -> Result<LimitEvents, RuntimeError>;
    /// The config.json the container was created with.
    fn config(&self, id: &str) -> Result<Spec, RuntimeError>;
    /// The runtime-spec features document of this tier.
    fn features(&self) -> serde_json::Value;
}

/// Why a tier cannot run here: what the host (or this build) lacks, and
/// what would fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("isolation tier {tier} is not available {}: {reason}", if *.built { "on this host" } else { "yet" })]
pub struct Unavailable {
    pub tier: Tier,
    /// Whether this moat has the tier at all.
    pub built: bool,
    /// What is missing, e.g. "/dev/kvm missing".
    pub reason: String,
    /// How to fix it, when something can.
    pub fix: Option<String>,
}

/// What the seam's methods fail with. Tiers keep their own error types and
/// convert at the seam; the variants here are the ones the CLI acts on.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Unavailable(#[from] Unavailable),
    #[error("{0}")]
    Invalid(String),
    #[error("container {id} is {status}, {why}")]
    WrongStatus {
        id: String,
        status: &'static str,
        why: &'static str,
    },
    /// The workload's program could not be executed: `status` is what a
    /// shell would exit with (127 not found, 126 not executable).
    #[error("{message}")]
    ExecFailed { status: u8, message: String },
    /// Anything else the tier reports, with its cause chain.
    #[error(transparent)]
    Tier(Box<dyn std::error::Error + Send + Sync>),
}

/// The status `moat run` exits with when the runtime itself failed (as
/// docker's), rather than the workload.
pub const RUNTIME_FAILED_STATUS: u8 = 125;

impl RuntimeError {
    /// The status a failed run exits with: what a shell gives a program
    /// that cannot run (127 not found, 126 not executable), else
    /// [`RUNTIME_FAILED_STATUS`].
    pub fn exit_status(&self) -> u8 {
        match self {
            RuntimeError::ExecFailed { status, .. } => *status,
            _ => RUNTIME_FAILED_STATUS,
        }
    }

    /// Whether the error says the container does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, RuntimeError::State(StateError::NotFound(_)))
    }
}
