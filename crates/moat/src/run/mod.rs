//! `moat run [OPTIONS] [--] CMD [ARGS...]`: the human front door. Runs a
//! command on the host's own files (the embedded default root) with every
//! isolation best practice on and no flags: its own user namespace and host
//! ID range, no capabilities, no_new_privs, an allow-list seccomp profile, a
//! read-only root, a network namespace with only `lo`, and cgroup limits.
//!
//! The same word is runc's `run ID` (used by engines and the benchmarks);
//! [`human_argv`] tells them apart, as docs/run.md describes.
pub mod defaults;
pub mod images;
pub mod learn;
pub mod rootfs;
pub mod seccomp_profile;

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use std::os::unix::fs::DirBuilderExt;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser};
use moat_core::runtime::{Config, CreateRequest, Launched, Lifecycle};
use moat_core::steps::mark;
use moat_core::Tier;
use moat_image::{self as image, Prepared, Source};
use moat_jail::idalloc::{self, IdAllocator, IdPool, Owner};
use nix::sys::signal::Signal;

use crate::cli::Global;
use crate::tiers::{Engine, Tiers};
use defaults::Settings;

/// The command line of human mode.
#[derive(Debug, Parser)]
#[command(
    name = "moat run",
    about = "Run a command isolated with best practices by default, on the host's own files or an image",
    override_usage = "moat run [OPTIONS] [--] CMD [ARGS...]\n       moat run [OPTIONS] IMAGE [--] [CMD [ARGS...]]   (IMAGE: DIR, TARBALL, oci:PATH[:TAG], docker-archive:PATH)\n       moat run [--bundle B] [--detach] [--pid-file F] ... ID   (OCI: runs bundle B or ./config.json)"
)]
pub struct RunCli {
    #[command(flatten)]
    pub global: Global,
    #[command(flatten)]
    pub opts: RunArgs,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Memory limit (e.g. 512m, 2g); swap is not added on top
    #[arg(short = 'm', long)]
    pub memory: Option<String>,
    /// CPU limit in CPUs (e.g. 0.5, 2)
    #[arg(long)]
    pub cpus: Option<f64>,
    /// Most processes at once
    #[arg(long = "pids-limit")]
    pub pids_limit: Option<i64>,
    /// Network: none (a namespace with only lo), egress=RULE[,RULE…] (moat's
    /// user-space stack; RULE is HOST[:PORT], CIDR[:PORT] or *.DOMAIN[:PORT]),
    /// ns:PATH (join that network namespace; a microVM takes over its
    /// interface), or host
    #[arg(long, visible_alias = "network", default_value = "none")]
    pub net: String,
    /// Publish a port through the user-space stack: [HOSTADDR:]HOSTPORT:PORT
    /// (host address 127.0.0.1 unless given)
    #[arg(short = 'p', long = "publish")]
    pub publish: Vec<String>,
    /// Bind mount SRC:DST[:ro]
    #[arg(short = 'v', long = "volume")]
    pub volumes: Vec<String>,
    /// KEY=VALUE
    #[arg(short = 'e', long = "env")]
    pub env: Vec<String>,
    /// Working directory inside the container (default /home/user)
    #[arg(short = 'w', long)]
    pub workdir: Option<String>,
    /// UID[:GID] inside the container (default 65534:65534, nobody)
    #[arg(short = 'u', long)]
    pub user: Option<String>,
    /// Container ID (default run-PID-N)
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long)]
    pub hostname: Option<String>,
    /// Make the root writable (it is read-only by default)
    #[arg(long = "read-write")]
    pub read_write: bool,
    /// Grant a capability (none by default)
    #[arg(long = "cap-add")]
    pub cap_add: Vec<String>,
    /// Kill the container after SECS seconds
    #[arg(long)]
    pub timeout: Option<u32>,
    /// Add an annotation to the container's config: KEY=VALUE (e.g.
    /// dev.moat.microvm.reclaim-interval=30); keys moat run sets from its own
    /// flags (--isolation, --net, -p, --policy) are refused
    #[arg(long = "annotation")]
    pub annotations: Vec<String>,
    /// The sandbox tier's policy (a JSON file, docs/sandbox.md); with
    /// --isolation sandbox only
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// Print a JSON result record to stderr, or to FILE with --json=FILE
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "-")]
    pub json: Option<String>,
    /// Allocate a terminal (moat holds it and copies it to its own stdio)
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Keep stdin open (always the case: stdin passes through)
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// Remove the container when it exits (always the case; accepted for
    /// Docker's command lines)
    #[arg(long)]
    pub rm: bool,
    /// [IMAGE] then the command and its arguments
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
    /// `moat policy learn`: the sandbox in learning mode ([`learn`]).
    #[arg(skip)]
    pub learn: Option<learn::Learn>,
    /// Set when `--` comes before the first positional argument: then that
    /// argument is the command (embedded default root), never an image.
    #[arg(skip)]
    pub default_root: bool,
    /// An option before the first positional argument or `--` that clap
    /// took as the start of the command ([`unknown_option`]).
    #[arg(skip)]
    pub unknown_option: Option<String>,
}

/// `moat run` options that take a value (human mode).
const RUN_VALUE_FLAGS: &[&str] = &[
    "-m",
    "--memory",
    "--cpus",
    "--pids-limit",
    "--net",
    "--network",
    "-p",
    "--publish",
    "-v",
    "--volume",
    "-e",
    "--env",
    "-w",
    "--workdir",
    "-u",
    "--user",
    "--name",
    "--hostname",
    "--cap-add",
    "--timeout",
    "--policy",
    "--annotation",
];

/// Whether `--` comes before the first positional argument of a human-mode
/// argv (as [`human_argv`] returns it).
pub fn leading_dashdash(argv: &[String]) -> bool {
    let mut i = 1;
    while i < argv.len() {
        let a = argv[i].as_str();
        if a == "--" {
            return true;
        }
        if RUN_VALUE_FLAGS.contains(&a) || GLOBAL_VALUE_FLAGS.contains(&a) {
            i += 2;
        } else if a.starts_with('-') {
            i += 1;
        } else {
            return false;
        }
    }
    false
}

/// The first of `command` when it is an option written before the `--`
/// of a human-mode argv (or with no `--`): clap passes options it does not
/// know into the trailing command.
pub fn unknown_option(argv: &[String], command: &[String]) -> Option<String> {
    let first = command
        .first()
        .filter(|a| a.starts_with('-') && *a != "-")?;
    let at = argv.iter().skip(1).position(|a| a == first)?;
    match argv.iter().skip(1).position(|a| a == "--") {
        Some(dd) if dd < at => None,
        _ => Some(first.clone()),
    }
}

/// The image the positional arguments start with (see docs/run.md), and
/// the command that follows it (a `--` between them dropped). A word
/// followed by `--` is an image (`IMAGE -- CMD`): one that is none is an
/// error, not a program to run with `--` as its first argument.
pub fn split_image(o: &RunArgs) -> Result<(Option<Source>, Vec<String>), String> {
    if o.default_root {
        return Ok((None, o.command.clone()));
    }
    let first = o.command.first();
    let Some(src) = first.and_then(|a| Source::detect(a)) else {
        if let (Some(word), Some("--")) = (first, o.command.get(1).map(String::as_str)) {
            return Err(not_an_image(word));
        }
        return Ok((None, o.command.clone()));
    };
    let mut rest = &o.command[1..];
    if rest.first().map(String::as_str) == Some("--") {
        rest = &rest[1..];
    }
    Ok((Some(src), rest.to_vec()))
}

/// Why `word`, written as `moat run WORD -- CMD`, is not an image.
fn not_an_image(word: &str) -> String {
    const FORMS: &str = "an image is a directory, a tarball, oci:PATH[:TAG] or docker-archive:PATH";
    let what = match std::fs::metadata(word) {
        Ok(m) if m.is_file() => "is not an image archive",
        Ok(_) => "is neither a directory nor an archive",
        Err(_) => "does not exist",
    };
    format!("image {word:?} {what} ({FORMS}; to run a program, put it after the `--`)")
}

/// Global options that take a value (runc's names).
const GLOBAL_VALUE_FLAGS: &[&str] = &[
    "--root",
    "--log",
    "--log-format",
    "--isolation",
    "--rootless",
    "--criu",
];
/// OCI `run` options that take a value.
const OCI_RUN_VALUE_FLAGS: &[&str] = &[
    "-b",
    "--bundle",
    "--console-socket",
    "--pid-file",
    "--preserve-fds",
];

/// When `args` (argv[0] included) is a human-mode `moat run`, the argv for
/// [`RunCli`]: the global options before `run` followed by those after.
/// OCI mode is `-b/--bundle`, or exactly one positional argument, no `--`,
/// and a `config.json` in the working directory (`config_exists`).
///
/// Why a pre-parser in front of clap, kept on purpose: `run` is two
/// commands with one name. Engines call runc's `run [-b B] ID` and must keep
/// working unchanged; people type `moat run [OPTIONS] [IMAGE] -- CMD`. Which
/// one is meant depends on things clap cannot see when it picks a
/// subcommand (a `--bundle`, whether the single positional names a bundle
/// in the working directory), and the two take different, conflicting
/// options (`-d`, `-t`, `-u`, `-v`…), so they cannot share one clap
/// definition either. This function only decides which parser gets the
/// command line; each parser then checks it completely.
pub fn human_argv(args: &[String], config_exists: impl Fn() -> bool) -> Option<Vec<String>> {
    let mut i = 1;
    while i < args.len() {
        let a = args[i].as_str();
        if GLOBAL_VALUE_FLAGS.contains(&a) {
            i += 2;
        } else if a.starts_with('-') {
            i += 1;
        } else {
            break;
        }
    }
    if args.get(i).map(String::as_str) != Some("run") {
        return None;
    }
    let rest = &args[i + 1..];
    let mut positionals = 0;
    let mut dashdash = false;
    let mut j = 0;
    while j < rest.len() {
        let a = rest[j].as_str();
        if a == "--" {
            dashdash = true;
            break;
        }
        if a == "-b" || a == "--bundle" || a.starts_with("--bundle=") {
            return None;
        }
        if OCI_RUN_VALUE_FLAGS.contains(&a) || GLOBAL_VALUE_FLAGS.contains(&a) {
            j += 2;
            continue;
        }
        if !a.starts_with('-') {
            positionals += 1;
        }
        j += 1;
    }
    if !dashdash && positionals == 1 && config_exists() {
        return None;
    }
    let mut argv = vec!["moat run".to_string()];
    argv.extend_from_slice(&args[1..i]);
    argv.extend_from_slice(rest);
    Some(argv)
}

/// Runs human mode; returns the exit status (128+N for a signal). With
/// `--json`, a record is written however the run ends: its destination is
/// opened first (an unwritable file fails before anything runs), and a run
/// that fails (125, or 126/127 for a program that cannot run) writes one with
/// the error.
pub fn main(cli: RunCli) -> Result<i32> {
    let sink = JsonSink::open(cli.opts.json.as_deref())?;
    let r = run(cli, &sink);
    if let Err(e) = &r {
        sink.write(&serde_json::json!({
            "exit_code": exit_status(e),
            "signal": null,
            "status": exit_status(e),
            "error": crate::error_line(e),
        }))?;
    }
    r
}

/// The exit status of a `moat run` that failed with `e`: what a shell
/// gives a program that cannot run (127 not found, 126 not executable),
/// else 125 (moat's own error, as docker's).
pub fn exit_status(e: &anyhow::Error) -> u8 {
    e.chain()
        .filter_map(|c| c.downcast_ref::<moat_core::RuntimeError>())
        .find(|r| matches!(r, moat_core::RuntimeError::ExecFailed { .. }))
        .map_or(moat_core::runtime::RUNTIME_FAILED_STATUS, |r| {
            r.exit_status()
        })
}

/// Where `--json` goes: stderr, or a file opened (created, truncated) before
/// the run.
struct JsonSink(Option<Option<std::fs::File>>);

impl JsonSink {
    fn open(dest: Option<&str>) -> Result<JsonSink> {
        Ok(JsonSink(match dest {
            None => None,
            Some("-") => Some(None),
            Some(path) => Some(Some(
                std::fs::File::create(path)
                    .with_context(|| format!("--json: cannot write {path}"))?,
            )),
        }))
    }

    fn wanted(&self) -> bool {
        self.0.is_some()
    }

    fn write(&self, rec: &serde_json::Value) -> Result<()> {
        use std::io::Write as _;
        match &self.0 {
            None => Ok(()),
            Some(None) => {
                eprintln!("{rec}");
                Ok(())
            }
            Some(Some(f)) => {
                let mut f: &std::fs::File = f;
                writeln!(f, "{rec}").context("--json: cannot write the record")
            }
        }
    }
}

fn run(cli: RunCli, sink: &JsonSink) -> Result<i32> {
    let o = &cli.opts;
    let tier = tier(cli.global.isolation.as_deref())?;
    // Absolute: the config names the root (a cache entry under it) by path.
    let root = &std::path::absolute(&cli.global.root)
        .with_context(|| format!("cannot resolve {}", cli.global.root.display()))?;
    let id = match &o.name {
        Some(n) => n.clone(),
        None => generated_id(),
    };
    moat_core::state::validate_id(&id).map_err(|e| anyhow::anyhow!("--name: {e}"))?;
    // The command is taken with its hyphens; an option moat does not know,
    // before any image or `--`, is an error, not a program name.
    if let Some(a) = &o.unknown_option {
        bail!("unknown option {a:?} (see `moat run --help`; put the command after `--`)");
    }
    let (image, command) = split_image(o).map_err(|e| anyhow::anyhow!(e))?;
    if image.is_none() && command.is_empty() {
        bail!("no command given: moat run [OPTIONS] [IMAGE] [--] CMD [ARGS...]");
    }
    let mut s = settings(o)?;
    s.args = command;
    if (s.net_host || s.net_ns.is_some()) && tier == Tier::Sandbox {
        // The sandbox's network is only ever moat's stack (or none).
        bail!(
            "--net {}: not in the sandbox tier (use --net egress=RULE[,RULE…])",
            o.net
        );
    }
    if tier == Tier::Microvm && s.net_ns.as_deref().is_some_and(moat_net::is_own_netns) {
        // A guest takes over a joined namespace's interface; the host's
        // are never taken (the OCI path leaves such a guest without a
        // network: here the user asked for one).
        bail!(
            "--net {}: that is the host's network namespace, whose interfaces a microVM \
             never takes over (use --net egress=RULE[,RULE…] for moat's stack)",
            o.net
        );
    }
    // From here on a SIGINT/SIGTERM must not kill moat before it waits for
    // the workload (it would leave the container behind): blocked signals
    // stay pending until `wait` forwards them. The container's process
    // unblocks everything before its exec.
    moat_jail::supervise::block_forwarded_signals()
        .context("cannot take over the signals moat forwards")?;
    // The container's init (an unmapped user on the host) walks down to its
    // root: the state root must be searchable (0711, as `create` makes it).
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(root)
        .with_context(|| format!("cannot create {}", root.display()))?;
    searchable(root)?;
    let tiers = Tiers::new(root, cli.global.systemd_cgroup);
    if o.learn.is_some() {
        if tier != Tier::Sandbox {
            bail!("moat policy learn runs the sandbox tier (--isolation sandbox)");
        }
        if o.policy.is_some() {
            bail!("--policy: moat policy learn writes a policy, it takes none");
        }
    }
    let engine = tiers.engine(tier)?;
    mark("settings-state-root");
    sweep_orphans(&tiers, root);
    mark("sweep-orphans");
    // This run's process: the owner of its ID block, its container and
    // its directory (`.run/<id>`, which says so for a later sweep).
    let owner = Owner::current();
    let run_dir = RunDir::create(root, &id, &owner)?;
    mark("run-dir");
    let learned = match &o.learn {
        Some(l) => Some(l.destination(&run_dir.path)?),
        None => None,
    };
    let engine = match &learned {
        Some(dest) => engine.learning(dest.file.clone())?,
        None => engine,
    };
    let alloc = if rustix::process::geteuid().is_root() {
        let pool = IdPool::from_env()?;
        let alloc = IdAllocator::new(idalloc::allocator_dir(), pool)
            .allocate(owner, &idalloc::host_reserved()?)
            .context("cannot allocate a host ID range")?;
        s.host_id = alloc.host_start;
        Some(alloc)
    } else {
        rootless_settings(&mut s, o)?;
        None
    };
    mark("host-id-allocation");
    let prepared = match &image {
        Some(src) => Some(images::prepare(root, src)?),
        None => None,
    };
    // The run's directory is the bundle when the run needs one: a root made
    // for it, an image's view. The config stays in memory.
    // Declared after the directory: dropped (unmounted) before it on any error.
    let view = match &prepared {
        Some(img) => image_view(img, &run_dir.path, &s, o)?,
        None => None,
    };
    let spec = match &prepared {
        Some(img) => image_spec(&mut s, o, img, view.as_ref())?,
        None => {
            let (mut mounts, links) = rootfs::host_mounts(Path::new("/"));
            let host_mounts = mounts.len();
            for v in &o.volumes {
                mounts.push(rootfs::Volume::parse(v)?.mount());
            }
            resolve_embedded_user(&mut s, o)?;
            // The microvm tier's guest makes its volumes' mount points
            // itself (its root is an overlay over the root's image, the
            // upper layer in guest memory): its root is the one without
            // volumes, shared, imaged once, and the snapshot primed with
            // it serves runs with volumes too.
            let microvm = tier == Tier::Microvm;
            let layout_mounts = if microvm {
                &mounts[..host_mounts]
            } else {
                &mounts[..]
            };
            let layout = rootfs::layout(layout_mounts, &links, s.uid, s.gid);
            // A read-only root without volumes is the same for every run of
            // this user on this host: share one, built once.
            let path = if !s.read_write && (o.volumes.is_empty() || microvm) {
                rootfs::cached(root, &layout)?
            } else {
                let path = run_dir.path.join("rootfs");
                rootfs::build(&path, &layout)?;
                if s.read_write {
                    // Its own copy: the container's root owns it, so that
                    // `--read-write -u 0` can write in `/`.
                    rootfs::give_to(&path, &layout, s.host_id)?;
                }
                path
            };
            let mut spec = defaults::spec(&s, mounts);
            spec["root"]["path"] = serde_json::json!(path);
            spec
        }
    };
    let mut spec = spec;
    if s.tty {
        // The pty starts at our terminal's size: the workload may ask
        // before the proxy could set it.
        if let Ok(ws) = rustix::termios::tcgetwinsize(std::io::stdin()) {
            spec["process"]["consoleSize"] =
                serde_json::json!({"height": ws.ws_row, "width": ws.ws_col});
        }
    }
    for (k, v) in &s.annotations {
        spec["annotations"][k] = serde_json::json!(v);
    }
    // Whose run this is: a later `moat run` removes the container if this
    // process is killed before it could (`sweep_orphans`).
    spec["annotations"][OWNER_ANNOTATION] = serde_json::json!(owner.record());
    if s.egress.is_some() || !s.publish.is_empty() {
        use moat_core::net::{EGRESS_ANNOTATION, PUBLISH_ANNOTATION};
        spec["annotations"][EGRESS_ANNOTATION] =
            serde_json::json!(s.egress.clone().unwrap_or_default());
        if !s.publish.is_empty() {
            spec["annotations"][PUBLISH_ANNOTATION] = serde_json::json!(s.publish.join(","));
        }
    }
    if let Some(file) = &o.policy {
        if tier != Tier::Sandbox {
            bail!("--policy applies to --isolation sandbox only");
        }
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read the policy {}", file.display()))?;
        // The sandbox tier checks it before anything runs.
        spec["annotations"][moat_core::tier::SANDBOX_POLICY_ANNOTATION] = serde_json::json!(text);
    }
    let config = serde_json::to_vec(&spec)?;
    if s.net_host {
        tracing::warn!("--net host: the container shares the host's network namespace");
    }
    let config = Config::from_memory(config)?;
    mark("root-and-spec");
    let req = CreateRequest {
        id: &id,
        config: &config,
        pid_file: None,
        console_socket: None,
        no_pivot: false,
        no_new_keyring: false,
        preserve_fds: 0,
        // moat supervises the run: if it is killed, so is the container.
        die_with_runtime: true,
    };
    let started = Instant::now();
    let launched = engine.launch(&req)?;
    // `--timeout 0`: none.
    let timeout = o.timeout.filter(|t| *t > 0);
    let result = supervise(&engine, &id, timeout, started, launched, sink.wanted());
    mark("workload");
    let deleted = engine.delete(&id, true);
    mark("delete");
    let unmounted = view.map_or(Ok(()), image::view::View::unmount);
    let result = result?;
    deleted?;
    unmounted.context("cannot unmount the image")?;
    if let Some(alloc) = alloc {
        alloc.release()?;
    }
    if let Some(dest) = &learned {
        dest.finish()?;
    }
    drop(run_dir);
    mark("release-ids-run-dir");
    report(&result, &s, sink)?;
    Ok(result.code)
}

/// For a cached image run by root, its view in the bundle (docs/run.md,
/// "Ownership"): idmapped and read-only, or under a throwaway upper layer
/// with `--read-write` or volumes (whose mount points moat then creates in
/// it; [`image_spec`] seals it read-only without `--read-write`). Rootless
/// runs use the cache entry itself, so they cannot make it writable.
fn image_view(
    img: &Prepared,
    bundle: &Path,
    s: &Settings,
    o: &RunArgs,
) -> Result<Option<image::view::View>> {
    let Some(digest) = &img.digest else {
        return Ok(None);
    };
    // `moat prune` keeps an image that a run uses.
    let marker = bundle.join(images::IN_USE);
    std::fs::write(&marker, digest.to_string())
        .with_context(|| format!("cannot write {}", marker.display()))?;
    if !rustix::process::geteuid().is_root() {
        if o.read_write {
            bail!("--read-write on an image needs root (rootless runs share the cached image read-only)");
        }
        return Ok(None);
    }
    let writes = if o.read_write || !o.volumes.is_empty() {
        image::view::Writes::Bundle
    } else {
        image::view::Writes::Refused
    };
    let v = image::view::View::mount(&img.layers, bundle, s.host_id, writes)
        .context("cannot mount the image")?;
    Ok(Some(v))
}

/// The config.json for an image: its Entrypoint + Cmd (CMD replaces Cmd),
/// Env, WorkingDir and User under the flags, its rootfs (or `view` of it)
/// as the root, the volumes' mount points created in it (in the view's
/// upper layer, so never in the cache, when run by root); no host binds
/// and no $HOME tmpfs.
fn image_spec(
    s: &mut Settings,
    o: &RunArgs,
    img: &Prepared,
    view: Option<&image::view::View>,
) -> Result<serde_json::Value> {
    let c = &img.config;
    let mut args = c.entrypoint.clone();
    if s.args.is_empty() {
        args.extend(c.cmd.iter().cloned());
    } else {
        args.extend(s.args.iter().cloned());
    }
    if args.is_empty() {
        bail!("the image has no command (Entrypoint or Cmd): give one after the image");
    }
    s.args = args;
    let root = match view {
        Some(v) => v.rootfs(),
        None => img
            .rootfs()
            .ok_or_else(|| anyhow::anyhow!("a layered image needs its view"))?,
    };
    resolve_named_user(s, o, root)?;
    if o.user.is_none() && one_mapped_id(s) {
        // Rootless without a subordinate ID range: ID 0 is the only one
        // there is (rootless_settings), whatever user the image names.
        if !c.user.is_empty() && c.user != "0" && c.user != "root" {
            tracing::info!(
                "the image's user {:?} is not mapped without a subordinate ID range: the process runs as ID 0",
                c.user
            );
        }
    } else if o.user.is_none() {
        // No `User` in the image: not root, but the embedded default's
        // user (nobody); `-u 0` asks for root (docs/run.md says why).
        let (uid, gid) = if c.user.is_empty() {
            defaults::DEFAULT_USER
        } else {
            image::resolve_user(root, &c.user).ok_or_else(|| {
                anyhow::anyhow!("the image's user {:?} is not in its /etc/passwd", c.user)
            })?
        };
        if uid >= defaults::MAP_SIZE || gid >= defaults::MAP_SIZE {
            bail!(
                "the image's user {:?} is outside the container's IDs (below {})",
                c.user,
                defaults::MAP_SIZE
            );
        }
        (s.uid, s.gid) = (uid, gid);
    }
    if o.workdir.is_none() {
        s.cwd = if c.working_dir.starts_with('/') {
            c.working_dir.clone()
        } else {
            "/".into()
        };
    }
    let mut mounts = Vec::new();
    for v in &o.volumes {
        let v = rootfs::Volume::parse(v)?;
        image::make_volume_point(root, &v.destination, !v.source.is_dir())?;
        mounts.push(v.mount());
    }
    if let (Some(v), false, false) = (view, o.read_write, o.volumes.is_empty()) {
        v.seal().context("cannot make the image read-only")?;
    }
    let mut spec = defaults::spec(s, mounts);
    spec["root"]["path"] = serde_json::json!(root);
    spec["process"]["env"] = serde_json::json!(image_env(&c.env, &s.env, s.uid));
    if let Some(m) = spec["mounts"].as_array_mut() {
        m.retain(|m| m["destination"] != defaults::HOME);
    }
    Ok(spec)
}

/// The image's Env, PATH and HOME added when it has none, then `-e`
/// entries (later ones win by key).
pub fn image_env(image: &[String], extra: &[String], uid: u32) -> Vec<String> {
    let mut env: Vec<String> = image.to_vec();
    let has = |env: &[String], k: &str| env.iter().any(|e| e.split('=').next() == Some(k));
    if !has(&env, "PATH") {
        env.insert(0, defaults::PATH.to_string());
    }
    if !has(&env, "HOME") {
        env.push(if uid == 0 { "HOME=/root" } else { "HOME=/" }.to_string());
    }
    for e in extra {
        let key = e.split('=').next().unwrap_or("");
        env.retain(|x| x.split('=').next() != Some(key));
        env.push(e.clone());
    }
    env
}

/// An unprivileged user's `moat run`: its subordinate ID range (/etc/subuid,
/// /etc/subgid, through newuidmap/newgidmap) when it has one of 65536 IDs,
/// else a single-ID mapping (root inside = the user; the process then runs
/// as that one mapped ID). Cgroup limits need a delegated cgroup: without
/// flags asking for them they are left out with a warning (rlimits stay);
/// with such flags the runtime refuses rather than drop them.
fn rootless_settings(s: &mut Settings, o: &RunArgs) -> Result<()> {
    let uid = rustix::process::geteuid().as_raw();
    let gid = rustix::process::getegid().as_raw();
    let name = user_name(uid);
    let sub = |file: &str, id: u32| -> Option<u32> {
        let text = std::fs::read_to_string(file).ok()?;
        text.lines().find_map(|l| {
            let mut f = l.split(':');
            let who = f.next()?;
            let start: u32 = f.next()?.parse().ok()?;
            let count: u32 = f.next()?.parse().ok()?;
            let mine = who == id.to_string() || name.as_deref() == Some(who);
            (mine && count >= defaults::MAP_SIZE).then_some(start)
        })
    };
    let helpers = ["/usr/bin/newuidmap", "/usr/bin/newgidmap"]
        .iter()
        .all(|p| Path::new(p).exists());
    match (sub("/etc/subuid", uid), sub("/etc/subgid", gid), helpers) {
        (Some(su), Some(sg), true) => {
            let m = |h: u32| serde_json::json!([{"containerID": 0, "hostID": h, "size": defaults::MAP_SIZE}]);
            s.id_maps = Some((m(su), m(sg)));
            s.host_id = su;
        }
        _ => {
            tracing::info!("rootless without a subordinate ID range: the process runs as the one mapped ID (root inside, you outside)");
            s.id_maps = Some((
                serde_json::json!([{"containerID": 0, "hostID": uid, "size": 1}]),
                serde_json::json!([{"containerID": 0, "hostID": gid, "size": 1}]),
            ));
            if o.user.is_some() {
                bail!("--user: only ID 0 is mapped without a subordinate ID range");
            }
            s.uid = 0;
            s.gid = 0;
            s.host_id = uid;
        }
    }
    // The container's cgroup goes under the user's own: the default blkio
    // weight only where the io controller was delegated there (systemd
    // delegates cpu, memory and pids to users, not io).
    if let Some(ctrls) = moat_jail::cgroup::own_v2_controllers() {
        s.blkio_weight &= ctrls.iter().any(|c| c == "io");
    }
    // The runtime then warns that there is no delegated cgroup.
    if o.memory.is_none() && o.cpus.is_none() && o.pids_limit.is_none() {
        s.no_cgroup_limits = true;
    }
    Ok(())
}

/// Whether the container maps one ID only (rootless without a subordinate
/// ID range: `rootless_settings`).
fn one_mapped_id(s: &Settings) -> bool {
    s.id_maps.as_ref().is_some_and(|(u, _)| {
        u.as_array()
            .is_some_and(|m| m.len() == 1 && m[0]["size"] == 1)
    })
}

fn user_name(uid: u32) -> Option<String> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let _ = f.next();
        (f.next()? == uid.to_string()).then(|| name.to_owned())
    })
}

/// Adds search permission (never read or write) for everyone to the state
/// root when it lacks it, as a root made by `create` has.
fn searchable(root: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let md = std::fs::metadata(root).with_context(|| format!("cannot stat {}", root.display()))?;
    let mode = md.permissions().mode();
    if mode & 0o011 != 0o011 {
        std::fs::set_permissions(
            root,
            std::fs::Permissions::from_mode((mode | 0o011) & 0o7777),
        )
        .with_context(|| format!("cannot make {} searchable", root.display()))?;
    }
    Ok(())
}

/// The tier of this run: `--isolation`, else the program name
/// (`moat-sandbox run …`), else the default.
fn tier(isolation: Option<&str>) -> Result<Tier> {
    let argv0 = std::env::args().next().unwrap_or_default();
    let chosen = moat_core::tier::chosen(isolation, &argv0).map_err(anyhow::Error::msg)?;
    Ok(chosen.unwrap_or_default())
}

fn generated_id() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "run-{}-{nanos:x}{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// `--annotation KEY=VALUE`s, checked: a key, and none of those moat run
/// sets itself from its flags (or for its own bookkeeping).
fn annotations(args: &[String]) -> Result<Vec<(String, String)>> {
    use moat_core::net::{EGRESS_ANNOTATION, PUBLISH_ANNOTATION};
    use moat_core::tier::{SANDBOX_POLICY_ANNOTATION, STATE_ID_ANNOTATION, TIER_ANNOTATION};
    let own = [
        (TIER_ANNOTATION, "--isolation"),
        (EGRESS_ANNOTATION, "--net"),
        (PUBLISH_ANNOTATION, "-p"),
        (SANDBOX_POLICY_ANNOTATION, "--policy"),
        (OWNER_ANNOTATION, ""),
        (STATE_ID_ANNOTATION, ""),
    ];
    let mut out = Vec::new();
    for a in args {
        let Some((k, v)) = a.split_once('=').filter(|(k, _)| !k.trim().is_empty()) else {
            bail!("--annotation {a:?}: expected KEY=VALUE");
        };
        if let Some((_, flag)) = own.iter().find(|(key, _)| *key == k) {
            if flag.is_empty() {
                bail!("--annotation {k}: moat run sets it itself");
            }
            bail!("--annotation {k}: moat run sets it from {flag}");
        }
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

/// The settings from the flags, over the defaults.
fn settings(o: &RunArgs) -> Result<Settings> {
    let mut s = Settings {
        args: o.command.clone(),
        hard_nofile: defaults::host_hard_limit(rustix::process::Resource::Nofile),
        hard_nproc: defaults::host_hard_limit(rustix::process::Resource::Nproc),
        blkio_weight: defaults::blkio_weight_supported(),
        ..Settings::default()
    };
    s.env = Vec::new();
    for e in &o.env {
        if e.is_empty() || e.starts_with('=') {
            bail!("--env {e:?}: expected KEY=VALUE or KEY");
        }
        if e.contains('=') {
            s.env.push(e.clone());
        } else if let Some(v) = std::env::var_os(e) {
            // Docker's `-e KEY`: the value of moat's own environment, and
            // nothing when it has none.
            s.env.push(format!("{e}={}", v.to_string_lossy()));
        }
    }
    s.annotations = annotations(&o.annotations)?;
    if let Some(w) = &o.workdir {
        if !w.starts_with('/') {
            bail!("--workdir {w:?} must be an absolute path");
        }
        s.cwd = w.clone();
    }
    if let Some(u) = &o.user {
        match numeric_user(u) {
            Some((uid, gid)) if uid < defaults::MAP_SIZE && gid < defaults::MAP_SIZE => {
                s.uid = uid;
                s.gid = gid;
            }
            // Names are looked up in the root's own /etc/passwd and
            // /etc/group once the root is known (`resolve_named_user`).
            None if is_user_name(u) => {}
            _ => bail!(
                "--user {u:?}: expected NAME[:GROUP] or UID[:GID], IDs below {}",
                defaults::MAP_SIZE
            ),
        }
    }
    if let Some(h) = o.hostname.as_ref().or(o.name.as_ref()) {
        s.hostname = h.clone();
    }
    s.read_write = o.read_write;
    s.tty = o.tty;
    if o.tty && o.interactive && !std::io::stdin().is_terminal() {
        bail!("-it: the input is not a terminal (drop -t, or give moat one)");
    }
    if o.tty && !s.env.iter().any(|e| e.split('=').next() == Some("TERM")) {
        // As docker does: programs on a terminal look for its type.
        s.env.insert(0, "TERM=xterm".into());
    }
    s.net_host = match o.net.as_str() {
        "none" => false,
        "host" => true,
        other => match other.strip_prefix("egress=") {
            Some(rules) => {
                // Checked here for a one-line error before anything runs.
                if !rules.trim().is_empty() {
                    moat_net::Policy::parse(rules).map_err(|e| anyhow::anyhow!("--net: {e}"))?;
                }
                s.egress = Some(rules.to_owned());
                false
            }
            None => match other.strip_prefix("ns:") {
                Some(path) => {
                    let path = std::path::PathBuf::from(path);
                    if !path.is_absolute() {
                        bail!(
                            "--net ns:{}: the namespace's absolute path (e.g. /run/netns/NAME)",
                            path.display()
                        );
                    }
                    std::fs::metadata(&path)
                        .with_context(|| format!("--net ns:{}", path.display()))?;
                    s.net_ns = Some(path);
                    false
                }
                None => bail!("--net {other:?}: use none, egress=RULE[,RULE…], ns:PATH or host"),
            },
        },
    };
    for p in &o.publish {
        p.parse::<moat_net::Publish>()
            .map_err(|e| anyhow::anyhow!("-p {p:?}: {e}"))?;
    }
    if !o.publish.is_empty() && s.net_host {
        bail!("-p: with --net host the container already uses the host's ports");
    }
    if !o.publish.is_empty() && s.net_ns.is_some() {
        bail!("-p: with --net ns:PATH the container serves on that namespace's addresses");
    }
    s.publish = o.publish.clone();
    if let Some(m) = &o.memory {
        s.memory = crate::oci::parse_bytes(m)?;
        if s.memory < (4 << 20) {
            bail!("--memory {m:?}: at least 4m");
        }
    }
    if let Some(c) = o.cpus {
        if !(c > 0.0 && c <= 1024.0) {
            bail!("--cpus {c}: must be above 0");
        }
        s.cpus = c;
    }
    if let Some(p) = o.pids_limit {
        if p < 1 {
            bail!("--pids-limit {p}: must be at least 1");
        }
        s.pids = p;
    }
    for c in &o.cap_add {
        // Docker's forms: NET_RAW, net_raw, CAP_NET_RAW (oci-spec parses
        // the name without its prefix).
        let up = c.to_ascii_uppercase();
        let name = up.strip_prefix("CAP_").unwrap_or(&up);
        name.parse::<oci_spec::runtime::Capability>()
            .map_err(|_| anyhow::anyhow!("--cap-add {c:?}: unknown capability"))?;
    }
    s.cap_add = o.cap_add.clone();
    Ok(s)
}

/// The annotation naming the `moat run` process (PID and start time) that
/// owns a container.
pub const OWNER_ANNOTATION: &str = "dev.moat.run.owner";

/// Cleans up after `moat run`s that were killed (their owner process,
/// recorded in `<root>/.run/<id>/owner`, is gone): the workload died with
/// its runtime (parent-death signal), but its container (state, cgroups),
/// the mounts of its image view and its directory stayed. Also removes the
/// state directories of `create`s killed before they recorded a container.
/// Only a container that the dead run recorded as its own is removed (the
/// owner annotation, checked against `.run/<id>/owner`, which only `moat
/// run` writes): a config cannot make a sweep delete its container. A
/// concurrent sweep may remove the same things first: that is silent.
/// Failures are warnings: they never stop this run.
pub(crate) fn sweep_orphans(tiers: &Tiers, root: &Path) {
    let sd = tiers.state_dir();
    sd.remove_unfinished();
    if let Ok(rd) = std::fs::read_dir(root.join(RUN_DIR)) {
        for e in rd.flatten() {
            let Some(id) = e.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if let Some(owner) = id.strip_prefix(RUN_NEW_PREFIX) {
                // A run killed while making its directory: nothing in it
                // but the owner record.
                if Owner::parse(&owner.replacen('-', " ", 1)).is_some_and(|o| !o.alive()) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
                continue;
            }
            if moat_core::state::validate_id(&id).is_err() {
                continue;
            }
            if let Some(owner) = dead_run_owner(&e.path()) {
                sweep_run(tiers, &id, &e.path(), owner);
            }
        }
    }
    let Ok(ids) = sd.list() else { return };
    for id in ids {
        if sd.abandoned(&id) {
            remove_container(tiers, &id, "left by a create that was killed");
        }
    }
}

/// The owner record of a run directory whose owner is dead; None while it
/// lives (or while a run still writes the record: a directory younger than a
/// minute without one).
fn dead_run_owner(dir: &Path) -> Option<String> {
    match std::fs::read_to_string(dir.join(RUN_OWNER)) {
        Ok(text) => match Owner::parse(&text) {
            Some(o) if o.alive() => None,
            _ => Some(text.trim().to_owned()),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let young = std::fs::metadata(dir)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_none_or(|age| age < std::time::Duration::from_secs(60));
            (!young).then(String::new)
        }
        Err(_) => None,
    }
}

/// Removes what the killed run `id` (owner record `owner`) left.
fn sweep_run(tiers: &Tiers, id: &str, dir: &Path, owner: String) {
    let sd = tiers.state_dir();
    let ours = sd
        .load(id)
        .is_ok_and(|st| st.annotations.get(OWNER_ANNOTATION) == Some(&owner));
    if ours || sd.abandoned(id) {
        remove_container(tiers, id, "left by a moat run that was killed");
    }
    if let Err(e) = moat_jail::mountinfo::detach_under(dir) {
        eprintln!(
            "moat: warning: cannot unmount what {} holds: {e}",
            dir.display()
        );
        return;
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => eprintln!("moat: warning: cannot remove {}: {e}", dir.display()),
    }
}

/// After `moat delete ID`: what a killed `moat run` of `ID` left beside
/// its container (its directory, the mounts of its image view, its host ID
/// block), which the next `moat run` sweeps otherwise. Nothing when `ID`
/// was no such run or its run still lives. Failures are warnings.
pub(crate) fn forget_killed_run(tiers: &Tiers, root: &Path, id: &str) {
    let dir = root.join(RUN_DIR).join(id);
    let Some(owner) = dead_run_owner(&dir) else {
        return;
    };
    sweep_run(tiers, id, &dir, owner);
    if rustix::process::geteuid().is_root() {
        // The dead run's block (and any other dead owner's).
        let reclaimed = IdPool::from_env()
            .map_err(|e| e.to_string())
            .and_then(|pool| {
                IdAllocator::new(idalloc::allocator_dir(), pool)
                    .reclaim()
                    .map_err(|e| e.to_string())
            });
        if let Err(e) = reclaimed {
            eprintln!("moat: warning: cannot release the host IDs of {id}: {e}");
        }
    }
}

/// `delete --force` of `id`, saying so on stderr.
fn remove_container(tiers: &Tiers, id: &str, why: &str) {
    if let Some(line) = removal_line(tiers.of(id).and_then(|e| e.delete(id, true)), id, why) {
        eprintln!("{line}");
    }
}

/// What to say of the removal of `id`: nothing when a concurrent sweep (or
/// the run itself, ending) removed it first.
fn removal_line(r: Result<(), moat_core::RuntimeError>, id: &str, why: &str) -> Option<String> {
    use moat_core::state::StateError;
    match r {
        Ok(()) => Some(format!("moat: removed {id}, {why}")),
        Err(moat_core::RuntimeError::State(StateError::NotFound(_))) => None,
        Err(e) => Some(format!(
            "moat: warning: cannot remove {id}, {why}: {}",
            moat_core::error_chain(&e)
        )),
    }
}

/// `UID[:GID]` as numbers (GID defaults to UID).
fn numeric_user(u: &str) -> Option<(u32, u32)> {
    match u.split_once(':') {
        Some((u, g)) => Some((u.parse().ok()?, g.parse().ok()?)),
        None => u.parse().ok().map(|n| (n, n)),
    }
}

/// `NAME[:GROUP]` (either part may be a number) with the characters of
/// user and group names.
fn is_user_name(u: &str) -> bool {
    let ok = |p: &str| {
        !p.is_empty()
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    };
    match u.split_once(':') {
        Some((a, b)) => ok(a) && ok(b),
        None => ok(u),
    }
}

/// A `--user` given by name, resolved in `root`'s /etc/passwd and
/// /etc/group (the image's, or the embedded default's synthesized ones).
fn resolve_named_user(s: &mut Settings, o: &RunArgs, root: &Path) -> Result<()> {
    let Some(u) = o.user.as_deref().filter(|u| numeric_user(u).is_none()) else {
        return Ok(());
    };
    let (uid, gid) = image::resolve_user(root, u)
        .ok_or_else(|| anyhow::anyhow!("--user {u:?}: no such user or group in the root"))?;
    if uid >= defaults::MAP_SIZE || gid >= defaults::MAP_SIZE {
        bail!(
            "--user {u:?}: IDs {uid}:{gid} are outside the container's (below {})",
            defaults::MAP_SIZE
        );
    }
    (s.uid, s.gid) = (uid, gid);
    Ok(())
}

/// A `--user` given by name on the embedded default, whose synthesized
/// accounts are `root` (0) and `nobody`/`nogroup` (65534).
fn resolve_embedded_user(s: &mut Settings, o: &RunArgs) -> Result<()> {
    let Some(u) = o.user.as_deref().filter(|u| numeric_user(u).is_none()) else {
        return Ok(());
    };
    let id = |name: &str, names: &[(&str, u32)]| -> Option<u32> {
        name.parse()
            .ok()
            .or_else(|| names.iter().find(|(n, _)| *n == name).map(|(_, i)| *i))
    };
    let users = [("root", 0), ("nobody", 65534)];
    let groups = [("root", 0), ("nogroup", 65534), ("nobody", 65534)];
    let (uid, gid) = match u.split_once(':') {
        Some((a, b)) => (id(a, &users), id(b, &groups)),
        None => {
            let uid = id(u, &users);
            (uid, uid)
        }
    };
    match (uid, gid) {
        (Some(uid), Some(gid)) if uid < defaults::MAP_SIZE && gid < defaults::MAP_SIZE => {
            (s.uid, s.gid) = (uid, gid);
            Ok(())
        }
        _ => bail!(
            "--user {u:?}: the embedded default's users are root and nobody (groups root, nogroup); give UID[:GID] for others"
        ),
    }
}

/// Where runs keep their directories, under the state root.
const RUN_DIR: &str = ".run";
/// The file in a run's directory naming its owner (PID and start time).
const RUN_OWNER: &str = "owner";
/// Prefix of a run's directory while it is made: `.new-<pid>-<start time>`.
const RUN_NEW_PREFIX: &str = ".new-";

/// This run's directory, `<root>/.run/<id>`: the owner record and, when the
/// run needs a bundle of its own, the bundle. Removed on drop.
struct RunDir {
    path: PathBuf,
}

impl RunDir {
    fn create(root: &Path, id: &str, owner: &Owner) -> Result<RunDir> {
        let parent = root.join(RUN_DIR);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(&parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
        let path = parent.join(id);
        // Made whole under a name of this process's, then renamed into
        // place: a sweep never finds `.run/<id>` without its owner record,
        // and a run killed before the rename leaves a `.new-*` directory
        // that names its (dead) owner.
        let tmp = parent.join(format!(
            "{RUN_NEW_PREFIX}{}-{}",
            owner.pid, owner.start_time
        ));
        let made = std::fs::DirBuilder::new()
            .mode(0o711)
            .create(&tmp)
            .and_then(|()| std::fs::write(tmp.join(RUN_OWNER), owner.record()));
        if let Err(e) = made {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e).with_context(|| format!("cannot create {}", tmp.display()));
        }
        let placed = rustix::fs::renameat_with(
            rustix::fs::CWD,
            &tmp,
            rustix::fs::CWD,
            &path,
            rustix::fs::RenameFlags::NOREPLACE,
        );
        if let Err(e) = placed {
            let _ = std::fs::remove_dir_all(&tmp);
            if e == rustix::io::Errno::EXIST {
                bail!("container {id} already exists (a moat run of that name is in progress)");
            }
            return Err(std::io::Error::from(e))
                .with_context(|| format!("cannot create {}", path.display()));
        }
        Ok(RunDir { path })
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        // The runtime's mounts live in the container's mount namespace; an
        // image view mounted here is unmounted before (see `main`).
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            eprintln!("moat: warning: cannot remove {}: {e}", self.path.display());
        }
    }
}

/// How the workload ended, and what it used.
#[derive(Debug, Default)]
pub struct RunResult {
    pub code: i32,
    pub signal: Option<i32>,
    pub wall_s: f64,
    pub cpu_ns: Option<u64>,
    pub peak_memory: Option<u64>,
    /// Processes of the container the kernel killed for memory.
    pub oom_kills: u64,
    /// The workload itself ended that way (SIGKILL with OOM kills counted).
    pub oom_killed: bool,
    /// Forks refused because the pids limit was reached.
    pub pids_limit_hits: u64,
    /// The deadline ended the workload (it did not end by itself first).
    pub timed_out: bool,
    /// The memory and process limits in effect at the end (an `update`
    /// may have changed those the run started with), from the saved config.
    pub limits: (Option<i64>, Option<i64>),
}

impl RunResult {
    /// The outcome of a workload that ended with `code` (128+N for a
    /// signal): `deadline` whether the `--timeout` deadline fired (moat then
    /// killed the container), `oom_kills` the OOM kills the cgroup counted.
    /// A workload that exited by itself was not killed by either, even when
    /// the deadline fired as it ended or a child of it was OOM-killed.
    fn ended(code: i32, deadline: bool, oom_kills: u64) -> RunResult {
        let killed = code == 128 + Signal::SIGKILL as i32;
        RunResult {
            code,
            signal: (code > 128).then_some(code - 128),
            oom_kills,
            oom_killed: killed && oom_kills > 0 && !deadline,
            timed_out: killed && deadline,
            ..RunResult::default()
        }
    }
}

/// Waits for the container process (forwarding signals; at the
/// `--timeout` deadline, or on a second SIGINT/SIGTERM, every process of
/// the container is killed), then reads what the container used and hit
/// before it is deleted.
fn supervise(
    engine: &Engine,
    id: &str,
    timeout: Option<u32>,
    started: Instant,
    launched: Launched,
    want_usage: bool,
) -> Result<RunResult> {
    let kill_all = || {
        if let Err(e) = engine.kill(id, Signal::SIGKILL as i32, true) {
            eprintln!("moat: cannot kill {id}: {}", moat_core::error_chain(&e));
        }
    };
    let (code, deadline) = match launched.terminal {
        // With a terminal, moat proxies it until the container exits.
        Some(m) => {
            let deadline = timeout.map(|t| started + std::time::Duration::from_secs(t.into()));
            moat_jail::console::proxy_until(m, launched.pid, deadline, &kill_all)
        }
        None => moat_jail::supervise::wait_supervised(launched.pid, timeout, &kill_all),
    };
    let ev = engine.events(id).unwrap_or_default();
    let mut r = RunResult::ended(code, deadline, ev.oom_kills);
    r.wall_s = started.elapsed().as_secs_f64();
    r.pids_limit_hits = ev.pids_limit_hits;
    // Read only where a line or the record names them.
    if want_usage || ev.oom_kills > 0 || ev.pids_limit_hits > 0 {
        r.limits = engine
            .config(id)
            .ok()
            .and_then(|spec| spec.linux().clone()?.resources().clone())
            .map_or((None, None), |res| {
                (
                    res.memory().as_ref().and_then(|m| m.limit()),
                    res.pids().as_ref().map(|p| p.limit()),
                )
            });
    }
    // The full statistics (a dozen files) only for the --json record.
    if want_usage {
        if let Ok(stats) = engine.stats(id) {
            r.cpu_ns = Some(stats.cpu.usage.total);
            r.peak_memory = Some(stats.memory.usage.max);
        }
    }
    Ok(r)
}

fn human_bytes(n: i64) -> String {
    if n % (1 << 30) == 0 {
        format!("{} GiB", n >> 30)
    } else if n % (1 << 20) == 0 {
        format!("{} MiB", n >> 20)
    } else {
        format!("{n} bytes")
    }
}

/// The OOM/timeout lines, and the `--json` record.
fn report(r: &RunResult, s: &Settings, sink: &JsonSink) -> Result<()> {
    let memory = human_bytes(r.limits.0.unwrap_or(s.memory));
    if r.oom_killed {
        eprintln!("moat: killed: out of memory (limit {memory})");
    } else if r.oom_kills > 0 {
        eprintln!(
            "moat: out of memory (limit {memory}): {} process(es) of the container killed",
            r.oom_kills
        );
    }
    if r.pids_limit_hits > 0 {
        eprintln!(
            "moat: process limit ({}) reached: {} fork(s) refused",
            r.limits.1.unwrap_or(s.pids),
            r.pids_limit_hits
        );
    }
    if r.timed_out {
        eprintln!("moat: killed: timeout");
    }
    // Limits that did not apply (rootless without a delegated cgroup) are
    // not reported as if they had.
    let limit = |v: i64| (!s.no_cgroup_limits).then_some(v);
    sink.write(&serde_json::json!({
        "exit_code": if r.signal.is_some() { None } else { Some(r.code) },
        "signal": r.signal,
        "status": r.code,
        "wall_time_s": r.wall_s,
        "cpu_time_s": r.cpu_ns.map(|n| n as f64 / 1e9),
        "peak_memory_bytes": r.peak_memory,
        "oom_killed": r.oom_killed,
        "oom_kills": r.oom_kills,
        "pids_limit_hits": r.pids_limit_hits,
        "timed_out": r.timed_out,
        "memory_limit_bytes": limit(r.limits.0.unwrap_or(s.memory)),
        "pids_limit": limit(r.limits.1.unwrap_or(s.pids)),
        "host_id_start": s.host_id,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    /// Issue 15, defect 10: a workload that ends by itself as the deadline
    /// fires, or whose child (not itself) was OOM-killed, was reported as
    /// killed.
    #[test]
    fn only_a_killed_workload_is_reported_killed() {
        let r = RunResult::ended(0, true, 0);
        assert!(!r.timed_out && !r.oom_killed);
        let r = RunResult::ended(137, true, 0);
        assert!(r.timed_out && !r.oom_killed);
        assert_eq!(r.signal, Some(9));
        let r = RunResult::ended(0, false, 1);
        assert!(!r.oom_killed);
        assert_eq!(r.oom_kills, 1);
        let r = RunResult::ended(137, false, 1);
        assert!(r.oom_killed && !r.timed_out);
        let r = RunResult::ended(1, false, 2);
        assert!(!r.oom_killed);
    }

    /// Issue 15, defect 10: concurrent runs sweeping the same orphan warned
    /// "cannot remove X" when another had removed it first.
    #[test]
    fn a_container_removed_by_another_sweep_is_not_a_warning() {
        let gone = Err(moat_core::RuntimeError::State(
            moat_core::state::StateError::NotFound("x".into()),
        ));
        assert_eq!(removal_line(gone, "x", "why"), None);
        assert!(removal_line(Ok(()), "x", "why").is_some());
    }

    #[test]
    fn oci_and_human_modes() {
        let yes = || true;
        let no = || false;
        // runc's form: a bundle, or one ID with ./config.json.
        assert!(human_argv(&argv("moat run -b /b c1"), no).is_none());
        assert!(human_argv(&argv("moat --root /r run --bundle=/b -d c1"), no).is_none());
        assert!(human_argv(&argv("moat run -d --pid-file /p c1"), yes).is_none());
        assert!(human_argv(&argv("moat --root /r run --console-socket /s c1"), yes).is_none());
        // Human mode.
        assert!(human_argv(&argv("moat run c1"), no).is_some());
        assert!(human_argv(&argv("moat run -- c1"), yes).is_some());
        assert!(human_argv(&argv("moat run sh -c id"), yes).is_some());
        assert!(human_argv(&argv("moat run -m 32m sh"), yes).is_some());
        // Other commands are not touched.
        assert!(human_argv(&argv("moat create -b /b c1"), no).is_none());
        assert!(human_argv(&argv("moat --root run state run"), no).is_none());
        let a = human_argv(&argv("moat --root /r run -m 1g -- sh -c id"), no).unwrap();
        let want: Vec<String> = [
            "moat run", "--root", "/r", "-m", "1g", "--", "sh", "-c", "id",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(a, want);
        let cli = RunCli::try_parse_from(&a).unwrap();
        assert_eq!(cli.global.root, PathBuf::from("/r"));
        assert_eq!(cli.opts.memory.as_deref(), Some("1g"));
        assert_eq!(cli.opts.command, argv("sh -c id"));
    }

    #[test]
    fn flags_parse() {
        let cli = RunCli::try_parse_from(argv(
            "moat-run --isolation microvm -v /tmp:/d:ro -e A=1 -u 1000:1000 --net host --json=/x --timeout 3 ls -l",
        ))
        .unwrap();
        assert_eq!(
            tier(cli.global.isolation.as_deref()).unwrap(),
            Tier::Microvm
        );
        assert_eq!(cli.opts.command, argv("ls -l"));
        assert_eq!(cli.opts.json.as_deref(), Some("/x"));
        let s = settings(&cli.opts).unwrap();
        assert!(s.net_host);
        assert_eq!((s.uid, s.gid), (1000, 1000));
        let cli = RunCli::try_parse_from(argv("moat-run --json true")).unwrap();
        assert_eq!(cli.opts.json.as_deref(), Some("-"));
        for bad in [
            "moat-run -u 70000 true",
            "moat-run -u x:y:z true",
            "moat-run -u x/y true",
            "moat-run --net bridge true",
            "moat-run -e =x true",
            "moat-run --cap-add NOPE true",
            "moat-run -w rel true",
            "moat-run --pids-limit 0 true",
        ] {
            let cli = RunCli::try_parse_from(argv(bad)).unwrap();
            assert!(settings(&cli.opts).is_err(), "{bad}");
        }
        // Names are resolved once the root is known; `-e KEY` alone is fine.
        let cli = RunCli::try_parse_from(argv("moat-run -u app:staff -e KEY true")).unwrap();
        assert!(settings(&cli.opts).is_ok());
        let unknown = |line: &str| {
            let a = argv(line);
            let cli = RunCli::try_parse_from(&a).unwrap();
            unknown_option(&a, &cli.opts.command)
        };
        assert_eq!(unknown("moat-run --bogus -- true"), Some("--bogus".into()));
        assert_eq!(unknown("moat-run --bogus true"), Some("--bogus".into()));
        assert_eq!(unknown("moat-run -- --version"), None);
        assert_eq!(unknown("moat-run img.tar --flag"), None);
        assert_eq!(unknown("moat-run --rm --network none -- true"), None);
        assert_eq!(tier(Some("container")).unwrap(), Tier::Container);
        assert!(tier(Some("nope")).is_err());
    }
}
