//! `moat bench`: the trade-off the user is choosing, measured on their own
//! machine. Every target — the bare host as the floor, every moat tier this
//! host can run, every other OCI runtime found (runc, crun, youki, runsc) or
//! given (`--runtime NAME=PATH[ ARGS]`) — is measured in one run, the
//! targets interleaved and their order rotated each iteration, so that
//! drift in the machine's load hits all of them alike and the ratios hold.
//!
//! The workload is moat's own static binary, copied into one shared rootfs
//! as `/usr/bin/moat-bench` and run as `bench-true` (a no-op), `bench-helper micro` (the
//! in-workload micro-benchmarks), `bench-helper sleep` (a container kept
//! running to measure what the runtime keeps beside it) and `probe --json`.
//!
//! It runs as root in a private mount namespace in which a hybrid host's
//! cgroup2 mount is detached (crun refuses the hybrid layout otherwise; all
//! runtimes then see the same v1 hierarchy), as the subreaper of every
//! container it starts, and removes every container and file it made when
//! it ends, also on SIGINT, SIGTERM or SIGHUP.
#![forbid(unsafe_code)]

pub mod helper;
pub mod measure;
pub mod report;
pub mod stats;
pub mod target;
pub mod work;

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use measure::Bundles;
use report::{Metric, Report, TargetReport};
use target::Target;
use work::Work;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Usage(String),
    #[error("moat bench needs root: it runs other runtimes, whose containers need it")]
    NotRoot,
    #[error("cannot {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up the bench's mount namespace: {0}")]
    Setup(String),
    #[error("{0} took too long")]
    Timeout(String),
    #[error("{what} failed: {stderr}")]
    Failed { what: String, stderr: String },
    #[error("interrupted")]
    Interrupted,
}

/// What to measure and how.
#[derive(Debug, Clone)]
pub struct Options {
    /// The moat binary (static): the runtime of the moat targets and the
    /// workload of every target.
    pub moat: PathBuf,
    /// The moat tiers this host can run ("container", "sandbox", …).
    pub tiers: Vec<String>,
    /// The config every bundle starts from (`moat spec`).
    pub base_spec: serde_json::Value,
    pub quick: bool,
    pub iterations: Option<usize>,
    pub concurrency: usize,
    /// The target ratios are computed against.
    pub baseline: Option<String>,
    /// `NAME=PATH[ ARGS]` runtimes to add.
    pub runtimes: Vec<String>,
    /// Only these targets (by name), when given.
    pub only: Vec<String>,
}

/// Progress on a terminal: one line, rewritten.
struct Progress {
    on: bool,
    done: usize,
    total: usize,
}

impl Progress {
    fn step(&mut self, what: &str) {
        self.done += 1;
        if self.on {
            let mut e = std::io::stderr().lock();
            let _ = write!(
                e,
                "\r\x1b[Kmoat bench: [{}/{}] {what}",
                self.done, self.total
            );
            let _ = e.flush();
        }
    }

    fn finish(&self) {
        if self.on {
            let _ = write!(std::io::stderr().lock(), "\r\x1b[K");
        }
    }
}

/// Runs the benchmark; the report, or why it could not run.
pub fn run(opts: &Options) -> Result<Report, BenchError> {
    if !rustix::process::geteuid().is_root() {
        return Err(BenchError::NotRoot);
    }
    private_mounts()?;
    nix::sys::prctl::set_child_subreaper(true)
        .map_err(|e| BenchError::Setup(format!("subreaper: {e}")))?;
    let interrupted = Arc::new(AtomicBool::new(false));
    for sig in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        signal_hook::flag::register(sig, Arc::clone(&interrupted)).map_err(|source| {
            BenchError::Io {
                what: "handle SIGINT".into(),
                source,
            }
        })?;
    }
    let extra = opts
        .runtimes
        .iter()
        .map(|r| target::parse_runtime(r))
        .collect::<Result<Vec<_>, _>>()?;
    let tiers: Vec<&str> = opts.tiers.iter().map(String::as_str).collect();
    let mut targets = target::discover(&opts.moat, &tiers, extra);
    if !opts.only.is_empty() {
        for o in &opts.only {
            if !targets.iter().any(|t| &t.name == o) {
                let names: Vec<&str> = targets.iter().map(|t| t.name.as_str()).collect();
                return Err(BenchError::Usage(format!(
                    "--targets: no target {o:?} here (there are: {})",
                    names.join(", ")
                )));
            }
        }
        targets.retain(|t| opts.only.contains(&t.name));
    }
    if let Some(b) = &opts.baseline {
        if !targets.iter().any(|t| &t.name == b) {
            return Err(BenchError::Usage(format!(
                "--baseline {b:?} is not among the targets"
            )));
        }
    }
    let work = Work::new(&opts.moat, opts.base_spec.clone(), Arc::clone(&interrupted))?;
    let result = measure_all(opts, &work, &targets);
    work.cleanup(&targets);
    result
}

/// A private mount namespace in which a hybrid host's cgroup2 mount is
/// detached: crun refuses the hybrid layout, and every runtime should see
/// the same hierarchy. Must run before any thread exists.
fn private_mounts() -> Result<(), BenchError> {
    use nix::mount::{mount, umount2, MntFlags, MsFlags};
    let setup = |e: nix::Error, what: &str| BenchError::Setup(format!("{what}: {e}"));
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).map_err(|e| setup(e, "unshare"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| setup(e, "make / private"))?;
    let unified = std::path::Path::new("/sys/fs/cgroup/unified");
    let hybrid = std::path::Path::new("/sys/fs/cgroup/memory").is_dir()
        && unified.join("cgroup.procs").exists();
    if hybrid {
        umount2(unified, MntFlags::MNT_DETACH).map_err(|e| setup(e, "detach cgroup2"))?;
    }
    Ok(())
}

#[derive(Default)]
struct Samples {
    metrics: BTreeMap<&'static str, Vec<f64>>,
    cost: Option<measure::Cost>,
    isolation: Option<measure::Isolation>,
    errors: Vec<String>,
    failed: bool,
}

impl Samples {
    fn push(&mut self, key: &'static str, v: f64) {
        self.metrics.entry(key).or_default().push(v);
    }

    /// Records a failure of `what`; the target is dropped from later
    /// phases after a failure of its start-up (nothing else could work).
    fn fail(&mut self, what: &str, e: &BenchError) {
        self.errors
            .push(format!("{what}: {}", moat_core::error_chain(e)));
    }
}

fn measure_all(opts: &Options, w: &Work, targets: &[Target]) -> Result<Report, BenchError> {
    let sizes = helper::Sizes::new(opts.quick);
    let bundles = Bundles::new(w, sizes)?;
    let iterations = opts.iterations.unwrap_or(if opts.quick { 5 } else { 20 });
    let rounds = if opts.quick { 2 } else { 5 };
    let micro_rounds = if opts.quick { 1 } else { 2 };
    let k = targets.len();
    let mut progress = Progress {
        on: std::io::stderr().is_terminal(),
        done: 0,
        total: k * (1 + iterations + rounds + micro_rounds + 2),
    };
    let mut samples: Vec<Samples> = targets.iter().map(|_| Samples::default()).collect();
    // Warm-up and smoke test: a target that cannot run its no-op once is
    // reported with the reason and measured no further.
    for (t, s) in targets.iter().zip(&mut samples) {
        progress.step(&format!("{}: warm-up", t.name));
        if let Err(e) = measure::run_true(w, t, &bundles) {
            w.check()?;
            s.fail("warm-up run", &e);
            s.failed = true;
        }
    }
    // Start-up, interleaved, the order rotated each iteration.
    for i in 0..iterations {
        for j in 0..k {
            let n = (i + j) % k;
            let (t, s) = (&targets[n], &mut samples[n]);
            progress.step(&format!("{}: start-up {}/{iterations}", t.name, i + 1));
            if s.failed {
                continue;
            }
            match measure::run_true(w, t, &bundles) {
                Ok(ms) => s.push("run_true", ms),
                Err(e) => {
                    w.check()?;
                    s.fail("run", &e)
                }
            }
            match measure::cycle(w, t, &bundles) {
                Ok(ms) => s.push("create_start_delete", ms),
                Err(e) => {
                    w.check()?;
                    s.fail("create→delete", &e)
                }
            }
        }
    }
    for round in 0..rounds {
        for j in 0..k {
            let n = (round + j) % k;
            let (t, s) = (&targets[n], &mut samples[n]);
            progress.step(&format!("{}: {} at once", t.name, opts.concurrency));
            if s.failed {
                continue;
            }
            match measure::concurrent(w, t, &bundles, opts.concurrency) {
                Ok(ms) => s.push("concurrent", ms),
                Err(e) => {
                    w.check()?;
                    s.fail("concurrent runs", &e)
                }
            }
        }
    }
    for round in 0..micro_rounds {
        for j in 0..k {
            let n = (round + j) % k;
            let (t, s) = (&targets[n], &mut samples[n]);
            progress.step(&format!("{}: in the workload", t.name));
            if s.failed {
                continue;
            }
            match measure::micro(w, t, &bundles, sizes) {
                Ok(m) => {
                    for (key, v) in [
                        ("getpid", &m.getpid_ns),
                        ("open_close", &m.open_close_ns),
                        ("stat", &m.stat_ns),
                        ("fork_exec_wait", &m.fork_exec_wait_us),
                        ("write_fsync", &m.write_fsync_us),
                        ("pipe_rtt", &m.pipe_rtt_us),
                        ("tcp_rtt", &m.tcp_rtt_us),
                        ("touch_page", &m.touch_ns_per_page),
                    ] {
                        for x in v {
                            s.push(key, *x);
                        }
                    }
                    for e in m.errors {
                        if !s.errors.contains(&e) {
                            s.errors.push(e);
                        }
                    }
                }
                Err(e) => {
                    w.check()?;
                    s.fail("micro-benchmarks", &e)
                }
            }
        }
    }
    for (t, s) in targets.iter().zip(&mut samples) {
        progress.step(&format!("{}: memory", t.name));
        if s.failed {
            continue;
        }
        match measure::cost(w, t, &bundles) {
            Ok(c) => s.cost = Some(c),
            Err(e) => {
                w.check()?;
                s.fail("memory", &e)
            }
        }
    }
    for (t, s) in targets.iter().zip(&mut samples) {
        progress.step(&format!("{}: moat probe", t.name));
        if s.failed {
            continue;
        }
        match measure::probe(w, t, &bundles) {
            Ok(i) => s.isolation = Some(i),
            Err(e) => {
                w.check()?;
                s.fail("probe", &e)
            }
        }
    }
    progress.finish();
    // The user's baseline, else the first of these that could be measured.
    let measured = |n: &str| {
        targets
            .iter()
            .zip(&samples)
            .any(|(t, s)| t.name == n && !s.failed)
    };
    let baseline = opts.baseline.clone().unwrap_or_else(|| {
        ["crun", "runc", "moat-container", "host"]
            .into_iter()
            .find(|n| measured(n))
            .unwrap_or("host")
            .to_owned()
    });
    Ok(build_report(opts, targets, samples, &baseline, iterations))
}

fn build_report(
    opts: &Options,
    targets: &[Target],
    samples: Vec<Samples>,
    baseline: &str,
    iterations: usize,
) -> Report {
    let summaries: Vec<BTreeMap<&'static str, stats::Summary>> = samples
        .iter()
        .map(|s| {
            s.metrics
                .iter()
                .filter_map(|(k, v)| stats::summarise(v).map(|x| (*k, x)))
                .collect()
        })
        .collect();
    let base = targets
        .iter()
        .position(|t| t.name == baseline)
        .map(|i| summaries[i].clone())
        .unwrap_or_default();
    let reports = targets
        .iter()
        .zip(samples)
        .zip(&summaries)
        .map(|((t, s), sum)| TargetReport {
            name: t.name.clone(),
            version: t.version.clone(),
            reach: t.reach,
            metrics: sum
                .iter()
                .map(|(k, v)| {
                    let ratio = base
                        .get(k)
                        .filter(|b| b.median > 0.0)
                        .map(|b| v.median / b.median);
                    (
                        *k,
                        Metric {
                            unit: report::unit_of(k),
                            summary: *v,
                            ratio,
                        },
                    )
                })
                .collect(),
            cost: s.cost,
            isolation: s.isolation,
            errors: s.errors,
        })
        .collect();
    let u = rustix::system::uname();
    Report {
        moat_version: format!("moat {}", env!("CARGO_PKG_VERSION")),
        kernel: u.release().to_string_lossy().into_owned(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        quick: opts.quick,
        iterations,
        concurrency: opts.concurrency,
        baseline: baseline.to_owned(),
        targets: reports,
    }
}
