//! Harness for the engine tests (Docker, Podman, containerd): each test starts
//! the real daemon itself with private state directories under one temporary
//! base directory, drives it with its own client, and a guard stops the daemon
//! and removes everything when the test ends, even when it fails.
//!
//! Images come from local files only (no registry is reachable): a rootfs of
//! busybox-static packed as a tarball (`docker import`, `podman import`) or as
//! an OCI image layout archive (`ctr image import`).
#![allow(dead_code)] // each test binary uses a different subset of the helpers

#[path = "../common/libcap.rs"]
mod libcap;
#[allow(unused_imports)] // each test binary uses a different subset
pub use libcap::copy_libcap_tools;

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long one client command may take before the harness kills it.
const CMD_TIMEOUT: Duration = Duration::from_secs(120);

/// The image reference every engine test uses.
pub const IMAGE: &str = "docker.io/library/moatbb:latest";

/// The moat binary under test.
pub fn moat_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_moat"))
}

/// Whether `prog` is on PATH.
pub fn have(prog: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
        .unwrap_or(false)
}

/// Prints why and returns false unless we are root and every program exists.
pub fn can_run(test: &str, progs: &[&str]) -> bool {
    if moat_core::testing::needs_root(test) {
        return false;
    }
    for p in progs {
        if !have(p) {
            moat_core::testing::skip(
                test,
                &format!("{p} is not installed (scripts/test installs it)"),
            );
            return false;
        }
    }
    true
}

#[derive(Debug)]
pub struct Out {
    pub cmd: String,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }

    #[track_caller]
    pub fn expect_ok(self) -> Out {
        assert!(self.ok(), "command failed: {self:#?}");
        self
    }

    #[track_caller]
    pub fn expect_fail(self) -> Out {
        assert!(!self.ok(), "command should have failed: {self:#?}");
        self
    }

    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Runs a command to completion with stdio in files (a detached container
/// must not hold a pipe of ours open), stdin from /dev/null.
pub fn sh(prog: &str, args: &[&str], env: &[(&str, &str)]) -> Out {
    let dir = tempfile::tempdir().expect("tempdir");
    let (o, e) = (dir.path().join("out"), dir.path().join("err"));
    let mut cmd = Command::new(prog);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&o).expect("out file"))
        .stderr(fs::File::create(&e).expect("err file"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|err| panic!("spawn {prog}: {err}"));
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if start.elapsed() > CMD_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{prog} {args:?} timed out");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Out {
        cmd: format!("{prog} {}", args.join(" ")),
        code: status.code(),
        stdout: fs::read_to_string(&o).unwrap_or_default(),
        stderr: fs::read_to_string(&e).unwrap_or_default(),
    }
}

/// Polls `f` for up to 30 s.
#[track_caller]
pub fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out: {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What `BASE/f` serves once it answers (curl from the host, up to 120 s:
/// a microVM that boots cold on a loaded machine): a microVM container's
/// `inside-$(uname -r)` ([`GUEST_SERVER`]), checked to come from a kernel
/// other than the host's.
#[track_caller]
pub fn assert_guest_serves(base: &str) {
    let start = Instant::now();
    let body = loop {
        let o = sh(
            "curl",
            &["-sSf", "--max-time", "5", &format!("{base}/f")],
            &[],
        );
        if o.code == Some(0) {
            break o.stdout;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{base} never answered: {o:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    assert!(
        body.starts_with("inside-") && body.trim() != format!("inside-{}", host.trim()),
        "served by the guest: {body}"
    );
}

/// A TCP listener on `addr` (a bridge's address on the host) that takes
/// one connection and reads it to its end: what a container on that
/// network sends, and from which address.
pub struct OneConnection {
    pub port: u16,
    got: std::sync::mpsc::Receiver<std::io::Result<(String, String)>>,
}

impl OneConnection {
    pub fn listen(addr: &str) -> OneConnection {
        let listener = std::net::TcpListener::bind((addr, 0)).expect("a port on the bridge");
        let port = listener.local_addr().unwrap().port();
        let (tx, got) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let conn = listener.accept().map(|(mut s, peer)| {
                let mut text = String::new();
                let _ = std::io::Read::read_to_string(&mut s, &mut text);
                (peer.ip().to_string(), text)
            });
            let _ = tx.send(conn);
        });
        OneConnection { port, got }
    }

    /// The peer's address and what it sent (up to 180 s: a microVM
    /// booting cold on a loaded machine).
    pub fn wait(&self) -> (String, String) {
        self.got
            .recv_timeout(Duration::from_secs(180))
            .expect("a connection")
            .expect("accept")
    }
}

/// A second container on a microVM container's network (`--network
/// container:NAME`) reaches the host's `gateway` from that container's
/// address `ip`: `run` runs the shell script it is given in that second
/// container, to its end.
pub fn assert_reaches_gateway_from(gateway: &str, ip: &str, run: impl FnOnce(&str)) {
    let host = OneConnection::listen(gateway);
    run(&format!(
        "echo from-the-second | nc -w 10 {gateway} {}",
        host.port
    ));
    let (peer, line) = host.wait();
    assert_eq!((peer.as_str(), line.as_str()), (ip, "from-the-second\n"));
}

/// A microVM container's command for [`assert_guest_serves`] (port 8000).
pub const GUEST_SERVER: &str = "echo inside-$(uname -r) > /tmp/f; cd /tmp && exec httpd -f -p 8000";

/// A build context in `dir` over the `moatbb` image: its steps write a
/// file, delete one, record the kernel they ran on (`/kernel`) and set a
/// file capability (the host's libcap tools copied in). Its image's
/// command prints [`BUILT`].
pub fn build_context(dir: &Path) -> PathBuf {
    let ctx = dir.join("context");
    libcap::copy_libcap_tools(&ctx.join("tools"));
    fs::write(
        ctx.join("Dockerfile"),
        "FROM moatbb\n\
         RUN cat /proc/sys/kernel/osrelease > /kernel && echo built > /built && rm /bin/vi\n\
         COPY tools/ /\n\
         RUN cp /bin/busybox /pingx && setcap cap_net_raw+ep /pingx\n\
         CMD [\"sh\", \"-c\", \"cat /built; ls /bin/vi 2>&1; getcap /pingx; cmp /pingx /bin/busybox && echo same\"]\n",
    )
    .expect("Dockerfile");
    ctx
}

/// Checks the image [`build_context`] built, run by `run` (a `run --rm`
/// of it with the command given, empty for its own): it prints [`BUILT`],
/// and its steps ran on the guest's kernel, not the host's.
pub fn assert_built(run: impl Fn(&[&str]) -> String) {
    assert_eq!(run(&[]), BUILT);
    let host = fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    let kernel = run(&["cat", "/kernel"]);
    assert!(
        !kernel.trim().is_empty() && kernel != host,
        "the step ran on the guest's kernel: {kernel:?}"
    );
}

/// What the image [`build_context`] builds prints, as under runc.
pub const BUILT: &str =
    "built\nls: /bin/vi: No such file or directory\n/pingx cap_net_raw=ep\nsame\n";

/// A busybox-static root filesystem (an applet symlink for each command,
/// /etc/passwd with root and nobody) packed as `DIR/busybox.tar`.
pub fn busybox_tar(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    for d in ["bin", "etc", "tmp", "proc", "sys", "dev", "root"] {
        fs::create_dir_all(root.join(d)).expect("mkdir rootfs");
    }
    fs::copy("/bin/busybox", root.join("bin/busybox")).expect("copy /bin/busybox");
    let list = sh("/bin/busybox", &["--list"], &[]).expect_ok().stdout;
    for applet in list.lines().filter(|a| !a.is_empty() && *a != "busybox") {
        let _ = symlink("busybox", root.join("bin").join(applet));
    }
    fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n",
    )
    .expect("passwd");
    fs::write(root.join("etc/group"), "root:x:0:\nnobody:x:65534:\n").expect("group");
    let tar = dir.join("busybox.tar");
    sh("tar", &["-C", &s(&root), "-cf", &s(&tar), "."], &[]).expect_ok();
    fs::remove_dir_all(&root).expect("remove rootfs");
    tar
}

fn sha256_file(p: &Path) -> String {
    let out = sh("sha256sum", &[&s(p)], &[]).expect_ok().stdout;
    out.split_whitespace().next().expect("digest").to_owned()
}

/// Writes `data` as a blob of an OCI layout; returns (digest, size).
fn blob(layout: &Path, data: &[u8]) -> (String, usize) {
    let tmp = layout.join("blob.tmp");
    fs::write(&tmp, data).expect("write blob");
    let d = sha256_file(&tmp);
    fs::rename(&tmp, layout.join("blobs/sha256").join(&d)).expect("rename blob");
    (d, data.len())
}

/// An OCI image layout archive holding one image, [`IMAGE`], whose single
/// layer is the busybox tarball (for `ctr image import`).
pub fn oci_archive(dir: &Path) -> PathBuf {
    oci_archive_of(dir, &[(IMAGE, serde_json::json!({"Cmd": ["sh"]}))])
}

/// An OCI image layout archive holding one image per `(reference, config)`
/// (the image config's `config` object: Entrypoint, Cmd, ...), all sharing
/// the busybox tarball as their single layer.
pub fn oci_archive_of(dir: &Path, images: &[(&str, serde_json::Value)]) -> PathBuf {
    let layer_tar = busybox_tar(dir);
    let layout = dir.join("oci");
    fs::create_dir_all(layout.join("blobs/sha256")).expect("mkdir layout");
    let layer = fs::read(&layer_tar).expect("read layer");
    let (ld, ls) = blob(&layout, &layer);
    let mut manifests = Vec::new();
    for (reference, cfg) in images {
        let config = serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "config": cfg,
            "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{ld}")]}
        });
        let (cd, cs) = blob(&layout, config.to_string().as_bytes());
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": format!("sha256:{cd}"), "size": cs},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": format!("sha256:{ld}"), "size": ls}]
        });
        let (md, ms) = blob(&layout, manifest.to_string().as_bytes());
        manifests.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{md}"), "size": ms,
            "annotations": {"org.opencontainers.image.ref.name": reference}
        }));
    }
    let index = serde_json::json!({"schemaVersion": 2, "manifests": manifests});
    fs::write(layout.join("index.json"), index.to_string()).expect("index.json");
    fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .expect("oci-layout");
    let tar = dir.join("image-oci.tar");
    sh("tar", &["-C", &s(&layout), "-cf", &s(&tar), "."], &[]).expect_ok();
    tar
}

/// `moat`, `moat-sandbox` and `moat-microvm` symlinks to the binary under
/// test in `dir/bin` (the tier follows the program name).
pub fn moat_links(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    fs::create_dir_all(&bin).expect("mkdir bin");
    for name in ["moat", "moat-sandbox", "moat-microvm"] {
        symlink(moat_bin(), bin.join(name)).expect("symlink moat");
    }
    bin
}

pub fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// A daemon started by a test, with every file it writes under `base`.
/// Dropping it runs the `cleanup` commands (remove containers while the
/// daemon still answers), stops the daemon (SIGTERM, then SIGKILL), kills any
/// process still running from `base` (shims, conmon), unmounts what is
/// mounted under `base`, and removes `base` and `extra_dirs`.
pub struct Daemon {
    pub base: tempfile::TempDir,
    child: Option<Child>,
    pub cleanup: Vec<Vec<String>>,
    pub extra_dirs: Vec<PathBuf>,
}

/// A base directory with a short path: daemons put unix sockets in it.
pub fn base_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .expect("tempdir")
}

impl Daemon {
    /// A guard for `base` with no process (podman has no daemon).
    pub fn none(base: tempfile::TempDir) -> Daemon {
        Daemon {
            base,
            child: None,
            cleanup: Vec::new(),
            extra_dirs: Vec::new(),
        }
    }

    /// Starts `prog args`, output to `base/daemon.log`.
    pub fn start(base: tempfile::TempDir, prog: &str, args: &[String]) -> Daemon {
        let log = fs::File::create(base.path().join("daemon.log")).expect("log");
        let child = Command::new(prog)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {prog}: {e}"));
        Daemon {
            base,
            child: Some(child),
            cleanup: Vec::new(),
            extra_dirs: Vec::new(),
        }
    }

    pub fn path(&self) -> &Path {
        self.base.path()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.path().join("daemon.log")).unwrap_or_default()
    }

    /// Waits until `ready` holds, failing with the daemon's log if it exits first.
    #[track_caller]
    pub fn wait_ready(&mut self, mut ready: impl FnMut() -> bool) {
        let start = Instant::now();
        while !ready() {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("daemon exited ({st}):\n{}", self.log());
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "daemon not ready:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        for c in &self.cleanup {
            if let Some((prog, args)) = c.split_first() {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let _ = std::panic::catch_unwind(|| sh(prog, &args, &[]));
            }
        }
        if let Some(mut c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let start = Instant::now();
            while matches!(c.try_wait(), Ok(None)) && start.elapsed() < Duration::from_secs(15) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        kill_processes_mentioning(self.path());
        unmount_under(self.path());
        for d in &self.extra_dirs {
            unmount_under(d);
            let _ = fs::remove_dir_all(d);
        }
    }
}

/// SIGKILLs every process whose command line names `dir` (the shims and
/// conmon processes the daemon started with paths under our base).
fn kill_processes_mentioning(dir: &Path) {
    let needle = s(dir);
    let me = std::process::id();
    let Ok(entries) = fs::read_dir("/proc") else {
        return;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let cmdline = fs::read(e.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&needle) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Lazily unmounts every mount at or below `dir`, deepest first.
fn unmount_under(dir: &Path) {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<&str> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| Path::new(m).starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// The run options Docker and Podman share, checked from inside the
/// container: `-e`, `-v`, `--memory`/`--cpus`/`--pids-limit` (cgroup v1 files)
/// and `--user`. `run(opts, cmd)` runs one container and returns its stdout.
pub fn check_common_run_options(dir: &Path, run: &dyn Fn(&[&str], &[&str]) -> String) {
    assert_eq!(
        run(&["-e", "FOO=bar"], &["sh", "-c", "echo $FOO"]).trim(),
        "bar"
    );
    let vol = dir.join("vol");
    std::fs::create_dir_all(&vol).unwrap();
    std::fs::write(vol.join("f"), "from the host").unwrap();
    let v = format!("{}:/data", s(&vol));
    assert_eq!(run(&["-v", &v], &["cat", "/data/f"]), "from the host");
    let limits = run(
        &["--memory", "64m", "--cpus", "0.5", "--pids-limit", "20"],
        &[
            "cat",
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/cpu/cpu.cfs_quota_us",
            "/sys/fs/cgroup/pids/pids.max",
        ],
    );
    assert_eq!(
        limits.split_whitespace().collect::<Vec<_>>(),
        ["67108864", "50000", "20"]
    );
    assert_eq!(
        run(&["--user", "65534:65534"], &["id", "-u"]).trim(),
        "65534"
    );
}
