//! The bench's private world: a work directory holding the shared rootfs
//! (the static moat binary as `/usr/bin/moat-bench`, the helper every runtime runs), one
//! bundle per workload, a state root per runtime, and output files; every
//! command with a deadline; orphaned container inits reaped at once (this
//! process is their subreaper); and a cleanup that removes every container
//! of every runtime, then everything else, also after an interrupt.
use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::target::Target;
use crate::BenchError;

/// What a command printed and how it ended.
#[derive(Debug)]
pub struct Done {
    /// From just before the spawn to the exit.
    pub elapsed: Duration,
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

pub struct Work {
    pub dir: PathBuf,
    pub rootfs: PathBuf,
    base_spec: Value,
    seq: AtomicU32,
    pub interrupted: Arc<AtomicBool>,
    created: std::sync::Mutex<BTreeSet<(String, String)>>,
}

/// How long one runtime command may take.
const DEADLINE: Duration = Duration::from_secs(120);

/// The file name the helper has in every rootfs: a system directory, where
/// every tier's default lets a program run (the sandbox's policy executes
/// only from such directories).
pub const HELPER: &str = "/usr/bin/moat-bench";
/// A writable directory on a real filesystem (the rootfs's own disk) in
/// every rootfs, and writable under every tier's default.
pub const DATA: &str = "/var/tmp";

/// The sandbox tier's policy for the bench's workload: the built-in
/// default's shape, with the helper executable and its data writable.
pub const SANDBOX_POLICY: &str = r#"{"version": 1, "paths": {"/": "r", "/usr": "rx",
  "/var/tmp": "rwx", "/tmp": "rwx", "/dev": "rw", "/proc": "rw", "/sys": "r"}}"#;

impl Work {
    /// Makes the work directory and the shared rootfs, with `moat` (a
    /// static binary) copied in as the helper.
    pub fn new(
        moat: &Path,
        base_spec: Value,
        interrupted: Arc<AtomicBool>,
    ) -> Result<Work, BenchError> {
        let dir = std::env::temp_dir().join(format!("moat-bench-{}", std::process::id()));
        let io = |what: &str| {
            let what = what.to_owned();
            move |source| BenchError::Io { what, source }
        };
        fs::create_dir_all(&dir).map_err(io("create the work directory"))?;
        let rootfs = dir.join("rootfs");
        for d in ["proc", "dev", "sys", "tmp", "var/tmp", "etc", "usr/bin"] {
            fs::create_dir_all(rootfs.join(d)).map_err(io("make the rootfs"))?;
        }
        fs::copy(moat, rootfs.join(HELPER.trim_start_matches('/')))
            .map_err(io("copy moat into the rootfs"))?;
        fs::write(rootfs.join("etc/hostname"), "bench\n").map_err(io("make the rootfs"))?;
        Ok(Work {
            dir,
            rootfs,
            base_spec,
            seq: AtomicU32::new(0),
            interrupted,
            created: std::sync::Mutex::new(BTreeSet::new()),
        })
    }

    pub fn interrupted(&self) -> bool {
        self.interrupted.load(Ordering::Relaxed)
    }

    pub fn check(&self) -> Result<(), BenchError> {
        if self.interrupted() {
            Err(BenchError::Interrupted)
        } else {
            Ok(())
        }
    }

    /// A bundle whose process runs the helper with `args`.
    pub fn bundle(&self, name: &str, args: &[String]) -> Result<PathBuf, BenchError> {
        let b = self.dir.join(format!("bundle-{name}"));
        let mut spec = self.base_spec.clone();
        let mut argv = vec![Value::from(HELPER)];
        argv.extend(args.iter().map(|a| Value::from(a.as_str())));
        spec["process"]["args"] = Value::Array(argv);
        spec["process"]["terminal"] = Value::Bool(false);
        // The oldest version every runtime here accepts (crun 1.8 refuses 1.2).
        spec["ociVersion"] = Value::from("1.0.2");
        spec["root"] = serde_json::json!({"path": self.rootfs, "readonly": false});
        // moat's sandbox tier: the helper executable, its data writable
        // (other runtimes ignore the annotation).
        spec["annotations"][moat_core::tier::SANDBOX_POLICY_ANNOTATION] =
            Value::from(SANDBOX_POLICY);
        fs::create_dir_all(&b).map_err(|source| BenchError::Io {
            what: format!("create {}", b.display()),
            source,
        })?;
        fs::write(b.join("config.json"), spec.to_string()).map_err(|source| BenchError::Io {
            what: format!("write {}/config.json", b.display()),
            source,
        })?;
        Ok(b)
    }

    /// The state root `target` keeps its containers under.
    pub fn root(&self, t: &Target) -> PathBuf {
        self.dir.join(format!("root-{}", t.name))
    }

    /// A container id no other in this run has.
    pub fn id(&self, t: &Target, what: &str) -> String {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let id = format!("moat-bench-{}-{}-{what}-{n}", std::process::id(), t.name);
        if let Ok(mut c) = self.created.lock() {
            c.insert((t.name.clone(), id.clone()));
        }
        id
    }

    /// Runs `cmd` to completion (deadline [`DEADLINE`]), output to files.
    pub fn run(&self, mut cmd: Command) -> Result<Done, BenchError> {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let (out, err) = (
            self.dir.join(format!("out-{n}")),
            self.dir.join(format!("err-{n}")),
        );
        let file = |p: &Path| {
            fs::File::create(p).map_err(|source| BenchError::Io {
                what: format!("create {}", p.display()),
                source,
            })
        };
        cmd.stdin(Stdio::null())
            .stdout(file(&out)?)
            .stderr(file(&err)?);
        let what = format!("{cmd:?}");
        let mut child = cmd.spawn().map_err(|source| BenchError::Io {
            what: format!("run {what}"),
            source,
        })?;
        let start = Instant::now();
        let status = wait_deadline(&mut child, DEADLINE).map_err(|source| BenchError::Io {
            what: what.clone(),
            source,
        })?;
        let elapsed = start.elapsed();
        let Some(status) = status else {
            return Err(BenchError::Timeout(what));
        };
        reap_orphans();
        let read = |p: &Path| fs::read_to_string(p).unwrap_or_default();
        let done = Done {
            elapsed,
            ok: status.success(),
            stdout: read(&out),
            stderr: read(&err),
        };
        let _ = fs::remove_file(&out);
        let _ = fs::remove_file(&err);
        Ok(done)
    }

    /// [`Work::run`], failing unless the command succeeded.
    pub fn run_ok(&self, cmd: Command) -> Result<Done, BenchError> {
        let what = format!("{cmd:?}");
        let d = self.run(cmd)?;
        self.check()?;
        if !d.ok {
            return Err(BenchError::Failed {
                what,
                stderr: d.stderr.trim().to_owned(),
            });
        }
        Ok(d)
    }

    /// Polls `state` until the container is stopped (reaping its init).
    pub fn wait_stopped(&self, t: &Target, id: &str) -> Result<(), BenchError> {
        let start = Instant::now();
        while start.elapsed() < DEADLINE {
            self.check()?;
            let d = self.run(t.command(&self.root(t), &["state", id]))?;
            let status = serde_json::from_str::<Value>(&d.stdout)
                .ok()
                .and_then(|v| v["status"].as_str().map(str::to_owned));
            if status.as_deref() == Some("stopped") {
                return Ok(());
            }
        }
        Err(BenchError::Timeout(format!("{} {id} to stop", t.name)))
    }

    /// Removes every container each target may have left, then the work
    /// directory (after detaching any mount a runtime left in it).
    pub fn cleanup(&self, targets: &[Target]) {
        let created = self.created.lock().map(|c| c.clone()).unwrap_or_default();
        for t in targets.iter().filter(|t| !t.is_host()) {
            let root = self.root(t);
            let mut ids: BTreeSet<String> = created
                .iter()
                .filter(|(n, _)| *n == t.name)
                .map(|(_, id)| id.clone())
                .collect();
            if let Ok(d) = self.run(t.command(&root, &["list", "-q"])) {
                ids.extend(d.stdout.lines().map(str::to_owned));
            }
            for id in ids.iter().filter(|i| !i.is_empty()) {
                let _ = self.run(t.command(&root, &["delete", "--force", id]));
            }
        }
        // runsc's delete (Debian's 2022 release) leaves the empty cgroup of
        // a container it ran in some v1 hierarchies, named after its ID.
        for (_, id) in &created {
            remove_empty_cgroups(id);
        }
        kill_processes_in(&self.rootfs);
        reap_orphans();
        detach_mounts_under(&self.dir);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Removes the cgroup directory `name` at the top of every hierarchy
/// under /sys/fs/cgroup where it is left empty (rmdir refuses one that is
/// not).
fn remove_empty_cgroups(name: &str) {
    let Ok(hierarchies) = fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    let mut dirs: Vec<PathBuf> = vec![Path::new("/sys/fs/cgroup").join(name)];
    dirs.extend(hierarchies.flatten().map(|h| h.path().join(name)));
    for d in dirs.iter().filter(|d| d.is_dir()) {
        // One still in use (not empty) stays: rmdir refuses it.
        let _ = fs::remove_dir(d);
    }
}

/// Waits for `child` to exit, at most `limit` (then kills it and returns
/// `None`). Woken by the child's pidfd, so the exit is seen at once.
pub fn wait_deadline(
    child: &mut std::process::Child,
    limit: Duration,
) -> std::io::Result<Option<std::process::ExitStatus>> {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let pid = rustix::process::Pid::from_child(child);
    let fd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())?;
    let end = Instant::now() + limit;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        let ts = Timespec {
            tv_sec: left.as_secs() as i64,
            tv_nsec: i64::from(left.subsec_nanos()),
        };
        let mut fds = [PollFd::new(&fd, PollFlags::IN)];
        match poll(&mut fds, Some(&ts)) {
            Ok(0) if left.is_zero() => {
                let _ = child.kill();
                let _ = child.wait();
                return Ok(None);
            }
            Ok(0) | Err(rustix::io::Errno::INTR) => continue,
            Ok(_) => return child.wait().map(Some),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Reaps every exited child that is not being waited for: the container
/// inits `create` orphans become our children (we are their subreaper),
/// and crun reports a zombie init as still running. Called only when none
/// of our own spawned commands is running.
pub fn reap_orphans() {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    while let Ok(s) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
        if s == WaitStatus::StillAlive {
            break;
        }
    }
}

/// PIDs of every process now.
pub fn all_pids() -> BTreeSet<i32> {
    fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
                .collect()
        })
        .unwrap_or_default()
}

/// SIGKILLs every process whose root directory is `rootfs` (a workload a
/// runtime failed to delete).
fn kill_processes_in(rootfs: &Path) {
    for pid in all_pids() {
        let root = fs::read_link(format!("/proc/{pid}/root")).ok();
        if root.as_deref() == Some(rootfs) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

fn detach_mounts_under(dir: &Path) {
    let Ok(text) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    // Deepest first.
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
    }
}
