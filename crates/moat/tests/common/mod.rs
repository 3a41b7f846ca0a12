//! End-to-end harness: drives a runc-compatible runtime binary the way container
//! engines do, against busybox bundles built in temporary directories.
//!
//! The runtime under test is `$MOAT_TEST_RUNTIME` when set (e.g. `/usr/sbin/runc`),
//! else the `moat` binary of this package. Every test gets its own `--root`
//! directory and unique container ids, so tests run in parallel.
//!
//! The test process makes itself a child subreaper: a runtime's `create` leaves the
//! container init behind as an orphan, which is then reparented to us instead of to
//! PID 1 (which reaps slowly on this machine). A background thread reaps such
//! orphans, never touching the runtime invocations that this harness waits for.
#![allow(dead_code)] // each test binary uses a different subset of the helpers

use std::collections::HashSet;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;
use serde_json::{json, Value};

/// How long one runtime invocation may take before the harness kills it.
const CMD_TIMEOUT: Duration = Duration::from_secs(60);

/// Pids of the runtime invocations this harness is waiting for; the reaper leaves them alone.
static OWN_CHILDREN: Mutex<Option<HashSet<u32>>> = Mutex::new(None);
static INIT: Once = Once::new();
static ID_COUNTER: AtomicU32 = AtomicU32::new(0);

fn init_reaper() {
    INIT.call_once(|| {
        *OWN_CHILDREN.lock().unwrap_or_else(|e| e.into_inner()) = Some(HashSet::new());
        nix::sys::prctl::set_child_subreaper(true).expect("PR_SET_CHILD_SUBREAPER");
        std::thread::spawn(|| loop {
            reap_orphans();
            std::thread::sleep(Duration::from_millis(50));
        });
    });
}

/// Reaps zombie children that are not runtime invocations we are waiting for.
fn reap_orphans() {
    let me = std::process::id();
    let guard = OWN_CHILDREN.lock().unwrap_or_else(|e| e.into_inner());
    let own = guard.as_ref();
    for (pid, ppid, state) in all_processes() {
        if ppid == me && state == 'Z' && !own.is_some_and(|s| s.contains(&pid)) {
            let _ = waitpid(Pid::from_raw(pid as i32), Some(WaitPidFlag::WNOHANG));
        }
    }
}

/// (pid, ppid, state) of every process visible in /proc.
pub fn all_processes() -> Vec<(u32, u32, char)> {
    let mut out = Vec::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // comm may contain spaces and parentheses: parse after the last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let mut f = rest.split_whitespace();
        let state = f.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let ppid = f.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        out.push((pid, ppid, state));
    }
    out
}

/// Result of one runtime invocation.
#[derive(Debug)]
pub struct Out {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub args: Vec<String>,
}

impl Out {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }

    /// Panics with the invocation and its stderr unless it exited 0.
    #[track_caller]
    pub fn expect_ok(self) -> Self {
        assert!(
            self.ok(),
            "runtime failed: {:?}\nexit {:?} signal {:?}\nstdout: {}\nstderr: {}",
            self.args,
            self.code,
            self.signal,
            self.stdout,
            self.stderr
        );
        self
    }

    /// Panics unless it exited non-zero.
    #[track_caller]
    pub fn expect_fail(self) -> Self {
        assert!(!self.ok() && self.code.is_some(),
            "runtime should have failed with an exit status: {:?}\nexit {:?} signal {:?}\nstdout: {}\nstderr: {}",
            self.args, self.code, self.signal, self.stdout, self.stderr);
        self
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "{:?}: stdout is not JSON ({e}): {:?}",
                self.args, self.stdout
            )
        })
    }
}

/// Options for [`Rt::cmd_with`].
#[derive(Default)]
pub struct Opts {
    /// Where the runtime's (and so a detached container's) stdout goes; a scratch file when None.
    pub stdout: Option<PathBuf>,
    pub stdin: Option<Vec<u8>>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
}

/// The runtime under test, with its own state directory (`--root`).
pub struct Rt {
    pub bin: PathBuf,
    root: tempfile::TempDir,
    scratch: tempfile::TempDir,
    seq: AtomicU32,
    env: Vec<(String, String)>,
}

/// Rts made by this test binary, for their host ID pools.
static RT_COUNT: AtomicU32 = AtomicU32::new(0);

/// The runtime binary the suite drives.
pub fn runtime_bin() -> PathBuf {
    match std::env::var_os("MOAT_TEST_RUNTIME") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_moat")),
    }
}

/// True when the runtime under test is moat (its file name is `moat`): moat-only
/// assertions (one-line errors, strictness beyond runc's) are gated on this.
pub fn runtime_is_moat() -> bool {
    runtime_bin().file_name().is_some_and(|n| n == "moat")
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

impl Rt {
    /// A runtime handle for a test that needs root; None (after printing why) otherwise.
    pub fn root_or_skip(test: &str) -> Option<Rt> {
        if moat_core::testing::needs_root(test) {
            return None;
        }
        Some(Rt::new())
    }

    pub fn new() -> Rt {
        init_reaper();
        let root = tempfile::Builder::new()
            .prefix("moat-e2e-root-")
            .tempdir()
            .expect("root tempdir");
        let scratch = tempfile::Builder::new()
            .prefix("moat-e2e-io-")
            .tempdir()
            .expect("scratch tempdir");
        // `moat run`'s host ID allocator and pool, private to this Rt:
        // tests run in parallel, each sees only its own allocations, and no
        // two share host IDs (the allocator looks for live processes in a
        // block before it reclaims it).
        let k = (std::process::id() + RT_COUNT.fetch_add(1, Ordering::Relaxed)) % 400;
        let env = vec![
            (
                "MOAT_IDALLOC_DIR".to_string(),
                root.path().join(".idalloc").display().to_string(),
            ),
            (
                "MOAT_IDPOOL_BASE".to_string(),
                (2_000_000_000u64 + u64::from(k) * 64 * 65536).to_string(),
            ),
            ("MOAT_IDPOOL_SIZE".to_string(), "64".to_string()),
        ];
        Rt {
            bin: runtime_bin(),
            root,
            scratch,
            seq: AtomicU32::new(0),
            env,
        }
    }

    /// The environment every runtime invocation of this Rt gets.
    pub fn env(&self) -> &[(String, String)] {
        &self.env
    }

    /// The runtime with this Rt's environment and `--root`, to spawn
    /// directly (with [`spawn_own`]).
    pub fn command(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.envs(self.env.iter().map(|(k, v)| (k, v)))
            .arg("--root")
            .arg(self.root());
        c
    }

    /// The `--root` state directory.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    pub fn is_moat(&self) -> bool {
        self.bin.file_name().is_some_and(|n| n == "moat")
    }

    /// A container id unique across tests and test processes.
    pub fn new_id(&self, name: &str) -> String {
        let n = ID_COUNTER.fetch_add(1, Ordering::Relaxed);
        format!("e2e-{name}-{}-{n}", std::process::id())
    }

    /// A fresh file path in this runtime's scratch directory.
    pub fn scratch_file(&self, what: &str) -> PathBuf {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        self.scratch.path().join(format!("{n}-{what}"))
    }

    /// Runs `RT --root <root> args...`.
    pub fn cmd(&self, args: &[&str]) -> Out {
        self.cmd_with(args, Opts::default())
    }

    /// Runs the runtime with its stdout and stderr going to files (never pipes: a
    /// detached container inherits them and would keep a pipe open forever).
    pub fn cmd_with(&self, args: &[&str], mut opts: Opts) -> Out {
        opts.env.extend(self.env.iter().cloned());
        let mut full: Vec<String> = vec!["--root".into(), self.root().display().to_string()];
        full.extend(args.iter().map(|s| s.to_string()));
        run_binary(
            &self.bin,
            &full,
            opts,
            &self.scratch_file("stdout"),
            &self.scratch_file("stderr"),
        )
    }

    pub fn state(&self, id: &str) -> Out {
        self.cmd(&["state", id])
    }

    /// The container's status from `state`, or None when `state` fails.
    pub fn status(&self, id: &str) -> Option<String> {
        let o = self.state(id);
        if !o.ok() {
            return None;
        }
        o.json()
            .get("status")
            .and_then(Value::as_str)
            .map(str::to_string)
    }

    /// Polls `state` until the container reaches `want` (panics after 20 s).
    #[track_caller]
    pub fn wait_status(&self, id: &str, want: &str) {
        let start = Instant::now();
        loop {
            let s = self.status(id);
            if s.as_deref() == Some(want) {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{id}: status {s:?}, waited for {want}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `run --bundle B id` in the foreground; the container's output is in the result.
    pub fn run_fg(&self, bundle: &Bundle) -> (Ctr<'_>, Out) {
        bundle.write_config();
        let id = self.new_id("run");
        let ctr = Ctr {
            rt: self,
            id: id.clone(),
            out: None,
        };
        let b = bundle.dir().display().to_string();
        let out = self.cmd(&["run", "--bundle", &b, &id]);
        (ctr, out)
    }

    /// Shorthand: foreground run that must succeed; returns the container's stdout.
    #[track_caller]
    pub fn run_ok(&self, bundle: &Bundle) -> String {
        let (_c, out) = self.run_fg(bundle);
        out.expect_ok().stdout
    }

    /// `create --bundle B id`, with the container's stdout going to a file.
    pub fn create(&self, bundle: &Bundle, extra: &[&str]) -> Result<Ctr<'_>, Out> {
        bundle.write_config();
        let id = self.new_id("c");
        let outfile = self.scratch_file("ctr-stdout");
        let b = bundle.dir().display().to_string();
        let mut args = vec!["create", "--bundle", &b];
        args.extend_from_slice(extra);
        args.push(&id);
        let o = self.cmd_with(
            &args,
            Opts {
                stdout: Some(outfile.clone()),
                ..Opts::default()
            },
        );
        let ctr = Ctr {
            rt: self,
            id,
            out: Some(outfile),
        };
        if o.ok() {
            Ok(ctr)
        } else {
            Err(o)
        }
    }

    /// create + start, panicking on failure; returns the running container.
    #[track_caller]
    pub fn start_ok(&self, bundle: &Bundle) -> Ctr<'_> {
        let c = self
            .create(bundle, &[])
            .unwrap_or_else(|o| panic!("create failed: {o:?}"));
        c.start().expect_ok();
        c
    }
}

/// Runs a binary with a timeout, stdio to files; the pid is registered so the
/// reaper does not steal its exit status.
pub fn run_binary(bin: &Path, args: &[String], opts: Opts, out: &Path, err: &Path) -> Out {
    init_reaper();
    let stdout_path = opts.stdout.clone().unwrap_or_else(|| out.to_path_buf());
    let stdout = fs::File::create(&stdout_path).expect("stdout file");
    let stderr = fs::File::create(err).expect("stderr file");
    let mut cmd = Command::new(bin);
    cmd.args(args).stdout(stdout).stderr(stderr);
    cmd.envs(opts.env.iter().map(|(k, v)| (k, v)));
    cmd.stdin(if opts.stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = spawn_own(&mut cmd);
    if let (Some(data), Some(mut stdin)) = (opts.stdin, child.stdin.take()) {
        let _ = stdin.write_all(&data);
    }
    let status = wait_own(&mut child);
    use std::os::unix::process::ExitStatusExt;
    Out {
        code: status.code(),
        signal: status.signal(),
        stdout: fs::read_to_string(&stdout_path).unwrap_or_default(),
        stderr: fs::read_to_string(err).unwrap_or_default(),
        args: args.to_vec(),
    }
}

/// Spawns `cmd` registered as ours, so the reaper leaves its exit status
/// to [`wait_own`].
pub fn spawn_own(cmd: &mut Command) -> std::process::Child {
    init_reaper();
    let mut own = OWN_CHILDREN.lock().unwrap_or_else(|e| e.into_inner());
    let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    own.get_or_insert_with(HashSet::new).insert(child.id());
    child
}

/// Spawns `cmd` as [`spawn_own`] does, its stdout to the file `out`, and
/// returns once it has written "ready" there (a panic after `limit`).
pub fn spawn_ready(cmd: &mut Command, out: &Path, limit: Duration) -> std::process::Child {
    let child = spawn_own(
        cmd.stdout(fs::File::create(out).expect("create the output file"))
            .stderr(Stdio::null()),
    );
    wait_ready(out, limit);
    child
}

/// Returns once the file `out` holds "ready" (a panic after `limit`).
pub fn wait_ready(out: &Path, limit: Duration) {
    let start = Instant::now();
    while !fs::read_to_string(out)
        .unwrap_or_default()
        .contains("ready")
    {
        assert!(start.elapsed() < limit, "{}: never ready", out.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sends `sig` to a child of [`spawn_own`] and waits for it.
pub fn signal_own(
    child: &mut std::process::Child,
    sig: nix::sys::signal::Signal,
) -> std::process::ExitStatus {
    nix::sys::signal::kill(Pid::from_raw(child.id() as i32), sig).expect("signal the child");
    wait_own(child)
}

/// Waits for a child of [`spawn_own`] (killed after the command timeout).
pub fn wait_own(child: &mut std::process::Child) -> std::process::ExitStatus {
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if start.elapsed() > CMD_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                forget_child(child.id());
                panic!("child {} timed out", child.id());
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(2)),
            Err(e) => panic!("wait {}: {e}", child.id()),
        }
    };
    forget_child(child.id());
    status
}

fn forget_child(pid: u32) {
    if let Some(s) = OWN_CHILDREN
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_mut()
    {
        s.remove(&pid);
    }
}

/// A container; `delete --force`d when dropped.
pub struct Ctr<'a> {
    pub rt: &'a Rt,
    pub id: String,
    /// The file the container's stdout goes to (containers made by `create`).
    pub out: Option<PathBuf>,
}

impl Ctr<'_> {
    pub fn start(&self) -> Out {
        self.rt.cmd(&["start", &self.id])
    }

    pub fn state(&self) -> Value {
        self.rt.state(&self.id).expect_ok().json()
    }

    pub fn status(&self) -> String {
        self.state()["status"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    pub fn pid(&self) -> i32 {
        self.state()["pid"].as_i64().unwrap_or(0) as i32
    }

    pub fn kill(&self, sig: &str) -> Out {
        self.rt.cmd(&["kill", &self.id, sig])
    }

    /// `exec id cmd...`.
    pub fn exec(&self, cmd: &[&str]) -> Out {
        self.exec_opts(&[], cmd)
    }

    /// `exec [opts] id cmd...`.
    pub fn exec_opts(&self, opts: &[&str], cmd: &[&str]) -> Out {
        let mut a = vec!["exec"];
        a.extend_from_slice(opts);
        a.push(&self.id);
        a.extend_from_slice(cmd);
        self.rt.cmd(&a)
    }

    /// What the container wrote to its stdout so far.
    pub fn output(&self) -> String {
        self.out
            .as_ref()
            .and_then(|p| fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    #[track_caller]
    pub fn wait_status(&self, want: &str) {
        self.rt.wait_status(&self.id, want)
    }

    /// Waits until the container's stdout contains `needle` (panics after 20 s).
    #[track_caller]
    pub fn wait_output(&self, needle: &str) -> String {
        let start = Instant::now();
        loop {
            let o = self.output();
            if o.contains(needle) {
                return o;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{}: no {needle:?} in output {o:?}",
                self.id
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Ctr<'_> {
    fn drop(&mut self) {
        // Best-effort cleanup; the test itself asserts on delete where it matters.
        let _ = self.rt.cmd(&["delete", "--force", &self.id]);
    }
}

fn busybox_applets() -> &'static Vec<String> {
    static APPLETS: OnceLock<Vec<String>> = OnceLock::new();
    APPLETS.get_or_init(|| {
        // Through run_binary: a plain Command would race the reaper for its exit status.
        let tmp = tempfile::tempdir().expect("tempdir");
        let (o, e) = (tmp.path().join("out"), tmp.path().join("err"));
        let out = run_binary(
            Path::new("/bin/busybox"),
            &["--list".into()],
            Opts::default(),
            &o,
            &e,
        );
        assert!(out.ok(), "busybox --list: {out:?}");
        out.stdout
            .lines()
            .map(str::to_string)
            .filter(|s| !s.is_empty())
            .collect()
    })
}

/// A bundle: `config.json` plus a busybox rootfs, in a temporary directory.
pub struct Bundle {
    dir: tempfile::TempDir,
    pub config: Value,
}

impl Bundle {
    /// A bundle whose process runs `args`, with runc's default spec otherwise.
    pub fn new(args: &[&str]) -> Bundle {
        let dir = tempfile::Builder::new()
            .prefix("moat-e2e-bundle-")
            .tempdir()
            .expect("bundle tempdir");
        // World-traversable so a user-namespaced container root can reach its rootfs.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod bundle");
        let rootfs = dir.path().join("rootfs");
        for d in ["bin", "proc", "dev", "sys", "tmp", "etc", "root"] {
            fs::create_dir_all(rootfs.join(d)).expect("rootfs dir");
        }
        fs::set_permissions(rootfs.join("tmp"), fs::Permissions::from_mode(0o1777))
            .expect("chmod tmp");
        fs::copy("/bin/busybox", rootfs.join("bin/busybox"))
            .expect("copy /bin/busybox (busybox-static)");
        for applet in busybox_applets() {
            let _ = symlink("busybox", rootfs.join("bin").join(applet));
        }
        fs::write(
            rootfs.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/tmp:/bin/sh\n",
        )
        .expect("passwd");
        fs::write(rootfs.join("etc/group"), "root:x:0:\nuser:x:1000:\n").expect("group");
        Bundle {
            dir,
            config: default_spec(args),
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn rootfs(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }

    /// Sets the value at a JSON pointer (e.g. "/process/cwd"), creating objects on the way.
    pub fn set(&mut self, pointer: &str, v: Value) -> &mut Self {
        set_pointer(&mut self.config, pointer, v);
        self
    }

    /// Appends to the array at a JSON pointer, creating it if absent.
    pub fn push(&mut self, pointer: &str, v: Value) -> &mut Self {
        if self.config.pointer(pointer).is_none() {
            set_pointer(&mut self.config, pointer, json!([]));
        }
        match self.config.pointer_mut(pointer) {
            Some(Value::Array(a)) => a.push(v),
            other => panic!("{pointer} is not an array: {other:?}"),
        }
        self
    }

    pub fn write_config(&self) {
        let text = serde_json::to_string_pretty(&self.config).expect("serialise config");
        fs::write(self.dir().join("config.json"), text).expect("write config.json");
    }
}

fn set_pointer(root: &mut Value, pointer: &str, v: Value) {
    let mut cur = root;
    let parts: Vec<&str> = pointer.split('/').skip(1).collect();
    let Some((last, path)) = parts.split_last() else {
        *cur = v;
        return;
    };
    for p in path {
        if !cur.is_object() {
            *cur = json!({});
        }
        cur = cur
            .as_object_mut()
            .expect("object")
            .entry(p.to_string())
            .or_insert(json!({}));
    }
    if !cur.is_object() {
        *cur = json!({});
    }
    cur.as_object_mut()
        .expect("object")
        .insert(last.to_string(), v);
}

/// The spec `runc spec` writes, with `terminal: false` and the given args.
pub fn default_spec(args: &[&str]) -> Value {
    let caps = json!(["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]);
    json!({
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": false,
            "user": { "uid": 0, "gid": 0 },
            "args": args,
            "env": [
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "TERM=xterm"
            ],
            "cwd": "/",
            "capabilities": {
                "bounding": caps, "effective": caps, "permitted": caps, "ambient": caps
            },
            "rlimits": [ { "type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024 } ],
            "noNewPrivileges": true
        },
        "root": { "path": "rootfs", "readonly": true },
        "hostname": "runc",
        "mounts": [
            { "destination": "/proc", "type": "proc", "source": "proc" },
            { "destination": "/dev", "type": "tmpfs", "source": "tmpfs",
              "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] },
            { "destination": "/dev/pts", "type": "devpts", "source": "devpts",
              "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"] },
            { "destination": "/dev/shm", "type": "tmpfs", "source": "shm",
              "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"] },
            { "destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
              "options": ["nosuid", "noexec", "nodev"] },
            { "destination": "/sys", "type": "sysfs", "source": "sysfs",
              "options": ["nosuid", "noexec", "nodev", "ro"] },
            { "destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
              "options": ["nosuid", "noexec", "nodev", "relatime", "ro"] }
        ],
        "linux": {
            "resources": { "devices": [ { "allow": false, "access": "rwm" } ] },
            "namespaces": [
                { "type": "pid" }, { "type": "network" }, { "type": "ipc" },
                { "type": "uts" }, { "type": "mount" }
            ],
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
                "/proc/scsi"
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"
            ]
        }
    })
}

/// A tmpfs mount entry.
pub fn tmpfs_mount(dest: &str, opts: &[&str]) -> Value {
    json!({ "destination": dest, "type": "tmpfs", "source": "tmpfs", "options": opts })
}

/// `/sys/fs/cgroup/<controller>/<cgroups_path>/<file>` (cgroup v1).
pub fn cgroup_v1_file(controller: &str, cgroups_path: &str, file: &str) -> PathBuf {
    Path::new("/sys/fs/cgroup")
        .join(controller)
        .join(cgroups_path.trim_start_matches('/'))
        .join(file)
}

/// Reads a file, trimmed; empty when unreadable.
pub fn read_trim(p: impl AsRef<Path>) -> String {
    fs::read_to_string(p)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Pids of processes whose root or cwd lies under `dir` (a bundle): leftovers.
pub fn processes_under(dir: &Path) -> Vec<u32> {
    let mut found = Vec::new();
    for (pid, _, state) in all_processes() {
        if state == 'Z' {
            continue;
        }
        for link in ["root", "cwd"] {
            if let Ok(t) = fs::read_link(format!("/proc/{pid}/{link}")) {
                if t.starts_with(dir) {
                    found.push(pid);
                    break;
                }
            }
        }
    }
    found
}

/// Entries in the runtime's state directory.
pub fn root_entries(rt: &Rt) -> Vec<String> {
    fs::read_dir(rt.root())
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

// The microvm tier's image cache, shared by every test binary.

/// The image cache every test shares.
pub fn microvm_cache() -> &'static PathBuf {
    static CACHE: OnceLock<PathBuf> = OnceLock::new();
    CACHE.get_or_init(|| std::env::temp_dir().join("moat-e2e-microvm-cache"))
}

pub fn microvm_env() -> Vec<(String, String)> {
    vec![(
        "MOAT_MICROVM_CACHE".to_string(),
        microvm_cache().display().to_string(),
    )]
}

/// Whether the microvm tier runs on QEMU here (`moat info`).
pub fn on_qemu(rt: &Rt) -> bool {
    rt.cmd(&["info", "--json"]).expect_ok().json()["tiers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["tier"] == "microvm" && t["runs_on"].as_str().unwrap_or("").starts_with("QEMU"))
}

/// Whether `moat info` says the microvm tier can run here; says why not
/// (a skip, a failure under MOAT_TEST_STRICT) when it cannot.
pub fn microvm_ready_or_skip(rt: &Rt, test: &str) -> bool {
    let info = rt.cmd(&["info", "--json"]).expect_ok().json();
    let vm = info["tiers"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["tier"] == "microvm"))
        .cloned()
        .unwrap_or_default();
    if vm["ready"] != true {
        moat_core::testing::skip(
            test,
            &format!(
                "the microvm tier cannot run here: {}",
                vm["reason"].as_str().unwrap_or("?")
            ),
        );
        return false;
    }
    true
}

/// Builds the cached images once (minutes for the host's /usr), with a
/// deadline of its own; every test calls it, only the first one waits.
pub fn microvm_warm_up(rt: &Rt) {
    static DONE: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    if *done {
        return;
    }
    let mut cmd = rt.command();
    cmd.envs(microvm_env())
        .args(["run", "--isolation", "microvm", "--", "true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = spawn_own(&mut cmd);
    let start = Instant::now();
    let status = loop {
        if let Ok(Some(s)) = child.try_wait() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(1200) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the first microvm run (building the cached images) took over 20 minutes");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut err);
    }
    assert!(status.success(), "warm-up run failed: {status:?}: {err}");
    *done = true;
}

/// `setpriv` running `bin` as `uid`:`uid` with no supplementary groups.
pub fn as_user(uid: u32, bin: &Path) -> Command {
    as_user_group(uid, uid, bin)
}

/// `setpriv` running `bin` as `uid`:`gid` with no supplementary groups.
pub fn as_user_group(uid: u32, gid: u32, bin: &Path) -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        "--reuid",
        &uid.to_string(),
        "--regid",
        &gid.to_string(),
        "--clear-groups",
    ])
    .arg(bin);
    c
}

/// Runs `cmd` to completion as a child the harness's reaper leaves alone
/// (a plain `output()`/`status()` can lose its exit status to the reaper),
/// its stdout and stderr through files.
pub fn run_own(cmd: &mut Command) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let (o, e) = (dir.path().join("out"), dir.path().join("err"));
    cmd.stdout(fs::File::create(&o).unwrap())
        .stderr(fs::File::create(&e).unwrap())
        .stdin(Stdio::null());
    let mut child = spawn_own(cmd);
    let status = wait_own(&mut child);
    std::process::Output {
        status,
        stdout: fs::read(&o).unwrap_or_default(),
        stderr: fs::read(&e).unwrap_or_default(),
    }
}

/// `chown -R uid:gid path` (through [`run_own`]), asserted to succeed.
pub fn chown_tree(path: &Path, uid: u32, gid: u32) {
    let o = run_own(
        Command::new("chown")
            .args(["-R", &format!("{uid}:{gid}")])
            .arg(path),
    );
    assert!(o.status.success(), "chown {}: {o:?}", path.display());
}

/// Replaces `path` by its contents with `change` applied, through a rename
/// (readers never see half a file).
pub fn rewrite(path: &Path, change: impl FnOnce(String) -> String) {
    let old = fs::read_to_string(path).unwrap_or_default();
    let tmp = path.with_extension("moat-e2e-tmp");
    fs::write(&tmp, change(old)).unwrap();
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644)).unwrap();
    fs::rename(&tmp, path).unwrap();
}

/// A subordinate ID range for a user in /etc/subuid and /etc/subgid, for
/// the guard's life.
pub struct SubIds {
    line: String,
}

impl SubIds {
    pub fn add(user: &str, start: u64) -> SubIds {
        let line = format!("{user}:{start}:65536\n");
        for f in ["/etc/subuid", "/etc/subgid"] {
            rewrite(Path::new(f), |s| s + &line);
        }
        SubIds { line }
    }
}

impl Drop for SubIds {
    fn drop(&mut self) {
        for f in ["/etc/subuid", "/etc/subgid"] {
            rewrite(Path::new(f), |s| s.replacen(&self.line, "", 1));
        }
    }
}
