//! Command-line definition, runc's names and flags.
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::log::LogFormat;

/// The state root for root (see `state_root` in main.rs for other users).
pub const DEFAULT_ROOT: &str = moat_core::state::DEFAULT_ROOT;

#[derive(Debug, Parser)]
#[command(
    name = "moat",
    version,
    about = "moat: a container runtime that makes strong isolation the default",
    disable_help_subcommand = true
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Debug, Args)]
pub struct Global {
    /// State directory
    #[arg(long, global = true, default_value = DEFAULT_ROOT)]
    pub root: PathBuf,
    /// Log file for errors (the containerd shim reads it)
    #[arg(long, global = true)]
    pub log: Option<PathBuf>,
    #[arg(long = "log-format", global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    #[arg(long, global = true)]
    pub debug: bool,
    /// Use systemd to manage cgroups
    #[arg(long = "systemd-cgroup", global = true)]
    pub systemd_cgroup: bool,
    /// Isolation tier: container, sandbox or microvm
    #[arg(long, global = true)]
    pub isolation: Option<String>,
    /// Accepted for runc compatibility; rootless mode is detected from the effective UID.
    #[arg(long = "rootless", hide = true)]
    pub global_rootless: Option<String>,
    /// Accepted for runc compatibility (checkpointing is not supported).
    #[arg(long, global = true, hide = true)]
    pub criu: Option<String>,
}

#[derive(Debug, Args, Clone)]
pub struct CreateArgs {
    /// Path to the bundle (directory with config.json)
    #[arg(short, long, default_value = ".")]
    pub bundle: PathBuf,
    #[arg(long = "console-socket")]
    pub console_socket: Option<PathBuf>,
    #[arg(long = "pid-file")]
    pub pid_file: Option<PathBuf>,
    #[arg(long = "no-pivot")]
    pub no_pivot: bool,
    #[arg(long = "no-new-keyring")]
    pub no_new_keyring: bool,
    #[arg(long = "preserve-fds", default_value_t = 0)]
    pub preserve_fds: u32,
    pub id: String,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Create a container
    Create(CreateArgs),
    /// Start a created container
    Start { id: String },
    /// Output the state of a container
    State { id: String },
    /// Send a signal to a container's init (or all its processes)
    Kill {
        id: String,
        #[arg(default_value = "SIGTERM")]
        signal: String,
        #[arg(short, long)]
        all: bool,
    },
    /// Delete a container
    Delete {
        id: String,
        #[arg(short, long)]
        force: bool,
    },
    /// Create and start a container
    Run {
        #[command(flatten)]
        create: CreateArgs,
        #[arg(short, long)]
        detach: bool,
        #[arg(long = "keep")]
        keep: bool,
    },
    /// Run a new process in a running container
    Exec(ExecArgs),
    /// List the processes of a container
    Ps {
        id: String,
        #[arg(short, long, default_value = "table")]
        format: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        ps_args: Vec<String>,
    },
    /// List containers
    List {
        #[arg(short, long, default_value = "table")]
        format: String,
        #[arg(short, long)]
        quiet: bool,
    },
    /// Freeze all processes of a container
    Pause { id: String },
    /// Thaw a paused container
    Resume { id: String },
    /// Change a container's resource limits
    Update(UpdateArgs),
    /// Stream container events and statistics
    Events {
        id: String,
        #[arg(long)]
        stats: bool,
        #[arg(long, default_value = "5s")]
        interval: String,
    },
    /// Print the features this runtime supports (runtime-spec features document)
    Features,
    /// Write a default config.json
    Spec {
        #[arg(short, long, default_value = ".")]
        bundle: PathBuf,
        #[arg(long)]
        rootless: bool,
        /// moat run's defaults: user namespace, no capabilities, allow-list
        /// seccomp, cgroup limits, read-only root
        #[arg(long)]
        hardened: bool,
    },
    /// Measure start-up, syscalls, I/O, memory and isolation of every moat tier and OCI runtime here
    Bench(crate::bench::BenchArgs),
    /// What this host can run: kernel features, and each tier ready or why not
    Info {
        #[arg(long)]
        json: bool,
    },
    /// Report the isolation that actually holds here (run it inside any container)
    Probe {
        /// One JSON document: every check and a summary
        #[arg(long)]
        json: bool,
    },
    /// Check a config.json, `docker inspect` output or Kubernetes YAML against best practices
    Audit(crate::audit::AuditArgs),
    /// Sandbox policies: `moat policy learn [-o FILE] [RUN OPTIONS] [IMAGE] -- CMD` runs CMD in the sandbox and writes the smallest policy it needed
    Policy {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        rest: Vec<String>,
    },
    /// List the images cached by `moat run IMAGE`
    Images,
    /// Remove cached images: all (refused while any container exists), or those named or unused for a while
    Prune(crate::run::images::PruneArgs),
    /// Not supported
    #[command(hide = true)]
    Checkpoint {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        rest: Vec<String>,
    },
    /// Not supported
    #[command(hide = true)]
    Restore {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        rest: Vec<String>,
    },
}

impl Cmd {
    /// Commands that fork a process into a container: they run from a sealed
    /// copy of the binary (see `moat_jail::selfexe`).
    pub fn starts_container_process(&self) -> bool {
        matches!(self, Cmd::Create(_) | Cmd::Run { .. } | Cmd::Exec(_))
    }
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    pub id: String,
    /// JSON file with the OCI process object
    #[arg(short, long)]
    pub process: Option<PathBuf>,
    #[arg(short, long)]
    pub tty: bool,
    #[arg(short, long)]
    pub detach: bool,
    #[arg(long = "pid-file")]
    pub pid_file: Option<PathBuf>,
    #[arg(long = "console-socket")]
    pub console_socket: Option<PathBuf>,
    #[arg(short, long = "env")]
    pub env: Vec<String>,
    #[arg(long)]
    pub cwd: Option<PathBuf>,
    /// UID[:GID]
    #[arg(short, long)]
    pub user: Option<String>,
    #[arg(short = 'g', long = "additional-gids")]
    pub additional_gids: Vec<u32>,
    #[arg(short, long = "cap")]
    pub cap: Vec<String>,
    #[arg(long = "no-new-privs")]
    pub no_new_privs: bool,
    #[arg(long = "preserve-fds", default_value_t = 0)]
    pub preserve_fds: u32,
    #[arg(long)]
    pub apparmor: Option<String>,
    #[arg(long = "process-label")]
    pub process_label: Option<String>,
    #[arg(long = "ignore-paused")]
    pub ignore_paused: bool,
    #[arg(long)]
    pub cgroup: Option<String>,
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct UpdateArgs {
    pub id: String,
    /// JSON file with an OCI linux.resources object ("-" for stdin)
    #[arg(short = 'r', long = "resources")]
    pub r: Option<PathBuf>,
    #[arg(long = "blkio-weight")]
    pub blkio_weight: Option<u16>,
    #[arg(long = "cpu-period")]
    pub cpu_period: Option<u64>,
    #[arg(long = "cpu-quota")]
    pub cpu_quota: Option<i64>,
    #[arg(long = "cpu-rt-period")]
    pub cpu_rt_period: Option<u64>,
    #[arg(long = "cpu-rt-runtime")]
    pub cpu_rt_runtime: Option<i64>,
    #[arg(long = "cpu-share")]
    pub cpu_share: Option<u64>,
    #[arg(long = "cpuset-cpus")]
    pub cpuset_cpus: Option<String>,
    #[arg(long = "cpuset-mems")]
    pub cpuset_mems: Option<String>,
    #[arg(long = "kernel-memory")]
    pub kernel_memory: Option<String>,
    #[arg(long = "kernel-memory-tcp")]
    pub kernel_memory_tcp: Option<String>,
    #[arg(short, long)]
    pub memory: Option<String>,
    #[arg(long = "memory-reservation")]
    pub memory_reservation: Option<String>,
    #[arg(long = "memory-swap")]
    pub memory_swap: Option<String>,
    #[arg(long = "pids-limit")]
    pub pids_limit: Option<i64>,
    #[arg(long = "l3-cache-schema")]
    pub l3_cache_schema: Option<String>,
    #[arg(long = "mem-bw-schema")]
    pub mem_bw_schema: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn update_takes_resources_from_stdin_as_runc_does() {
        let cli = Cli::try_parse_from(["moat", "update", "--resources", "-", "c1"]).unwrap();
        let Cmd::Update(u) = cli.cmd else {
            panic!("not update")
        };
        assert_eq!(u.r.as_deref(), Some(std::path::Path::new("-")));
        assert!(Cli::try_parse_from(["moat", "update", "-r", "f.json", "c1"]).is_ok());
    }
}
