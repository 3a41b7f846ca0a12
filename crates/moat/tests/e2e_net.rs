//! `moat run --net egress=… -p …` and the `dev.moat.net.*` annotations:
//! the workload reaches what the rules allow through moat's user-space
//! stack and nothing else, publishes a port, and leaves no stack process.
//!
//! Every test makes its own world and removes it: a network namespace
//! "outer" where moat (and so its stack) runs, as if it were the host, and
//! an "internet" namespace with a web server, joined by a veth pair. The
//! host's own network is never touched.
#![forbid(unsafe_code)]

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static NETS: AtomicU32 = AtomicU32::new(0);

/// Two network namespaces and a server; removed on drop.
struct World {
    outer: String,
    inet: String,
    /// The internet side's address: 10.N.0.2.
    server: String,
    www: PathBuf,
    server_proc: Option<std::process::Child>,
}

/// A command run to completion through the harness (whose reaper must
/// not take its exit status).
fn sh(prog: &str, args: &[String]) -> Out {
    let dir = tempfile::tempdir().unwrap();
    run_binary(
        Path::new(prog),
        args,
        Opts::default(),
        &dir.path().join("o"),
        &dir.path().join("e"),
    )
}

fn ip(args: &[&str]) {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let o = sh("ip", &args);
    assert!(o.ok(), "ip {args:?}: {}", o.stderr);
}

impl World {
    fn new(rt: &Rt) -> World {
        let n = NETS.fetch_add(1, Ordering::Relaxed);
        let tag = format!("mt{}-{n}", std::process::id() % 100_000);
        let (outer, inet) = (format!("{tag}-o"), format!("{tag}-i"));
        let net = 100 + (std::process::id() as usize + n as usize) % 150;
        let mut w = World {
            outer: outer.clone(),
            inet: inet.clone(),
            server: format!("10.{net}.0.2"),
            www: rt.scratch_file("www"),
            server_proc: None,
        };
        ip(&["netns", "add", &outer]);
        ip(&["netns", "add", &inet]);
        let (a, b) = (format!("{tag}a"), format!("{tag}b"));
        ip(&[
            "link", "add", &a, "netns", &outer, "type", "veth", "peer", "name", &b, "netns", &inet,
        ]);
        ip(&[
            "-n",
            &outer,
            "addr",
            "add",
            &format!("10.{net}.0.1/24"),
            "dev",
            &a,
        ]);
        ip(&[
            "-n",
            &inet,
            "addr",
            "add",
            &format!("{}/24", w.server),
            "dev",
            &b,
        ]);
        for (ns, dev) in [(&outer, &a), (&inet, &b)] {
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        std::fs::create_dir_all(&w.www).unwrap();
        std::fs::write(w.www.join("index.html"), "hello-from-the-internet\n").unwrap();
        let mut server = Command::new("nsenter");
        server
            .arg(format!("--net=/run/netns/{inet}"))
            .args([
                "python3",
                "-m",
                "http.server",
                "8080",
                "--bind",
                &w.server,
                "-d",
            ])
            .arg(&w.www)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        w.server_proc = Some(spawn_own(&mut server));
        // Up when it answers (from the outer namespace, as moat's stack will).
        let start = Instant::now();
        while !w
            .curl_from_outer(&format!("http://{}:8080/index.html", w.server))
            .ok()
        {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "server never came up"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        w
    }

    fn curl_from_outer(&self, url: &str) -> Out {
        let args = [
            format!("--net=/run/netns/{}", self.outer),
            "curl".into(),
            "-sS".into(),
            "--max-time".into(),
            "5".into(),
            url.into(),
        ];
        sh("nsenter", &args)
    }

    /// The runtime, run in the outer namespace.
    fn moat(&self, rt: &Rt) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.outer))
            .arg(runtime_bin())
            .arg("--root")
            .arg(rt.root())
            .envs(rt.env().iter().map(|(k, v)| (k, v)));
        c
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(mut p) = self.server_proc.take() {
            let _ = p.kill();
            let _ = wait_own(&mut p);
        }
        for ns in [&self.outer, &self.inet] {
            sh("ip", &["netns".into(), "del".into(), ns.clone()]);
        }
    }
}

/// A `moat run` in the background, SIGKILLed if the test ends early (the
/// workload dies with it, and its stack with the workload).
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = wait_own(&mut self.0);
        }
    }
}

fn output(rt: &Rt, mut c: Command) -> Out {
    let (out, err) = (rt.scratch_file("o"), rt.scratch_file("e"));
    c.stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap());
    let mut child = spawn_own(&mut c);
    let st = wait_own(&mut child);
    Out {
        code: st.code(),
        signal: None,
        stdout: std::fs::read_to_string(&out).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err).unwrap_or_default(),
        args: Vec::new(),
    }
}

/// Processes still running whose command line names `root` (moat's and its
/// stack's: the stack is a fork of the runtime).
fn ours(root: &Path) -> Vec<u32> {
    let needle = root.display().to_string();
    all_processes()
        .into_iter()
        .filter(|(p, _, state)| {
            *state != 'Z'
                && std::fs::read(format!("/proc/{p}/cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).contains(&needle))
                    .unwrap_or(false)
        })
        .map(|(p, _, _)| p)
        .collect()
}

fn wait_none_left(root: &Path) {
    let start = Instant::now();
    while !ours(root).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "processes left: {:?}",
            ours(root)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn setup(test: &str) -> Option<Rt> {
    let rt = Rt::root_or_skip(test)?;
    if !rt.is_moat() {
        eprintln!("SKIP {test}: moat's network");
        return None;
    }
    for prog in ["ip", "curl", "python3", "nsenter"] {
        let found = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()));
        if !found {
            moat_core::testing::skip(test, &format!("{prog} is not installed"));
            return None;
        }
    }
    Some(rt)
}

#[test]
fn egress_reaches_what_the_rules_allow_and_nothing_else() {
    let Some(rt) = setup("egress_rules") else {
        return;
    };
    let w = World::new(&rt);
    let ok = format!("http://{}:8080/index.html", w.server);
    let other_port = format!("http://{}:8081/", w.server);
    let script = format!(
        "ip -o addr show eth0; cat /etc/resolv.conf; \
         curl -sS --max-time 10 {ok}; echo allowed=$?; \
         curl -sS --max-time 10 {other_port} 2>/dev/null; echo port=$?; \
         getent hosts example.com; echo dns=$?"
    );
    let mut c = w.moat(&rt);
    c.args([
        "run",
        &format!("--net=egress={}:8080", w.server),
        "--",
        "sh",
        "-c",
        &script,
    ]);
    let o = output(&rt, c);
    assert_eq!(o.code, Some(0), "{o:?}");
    assert!(o.stdout.contains("10.0.2.100/24"), "{}", o.stdout);
    assert!(o.stdout.contains("nameserver 10.0.2.2"), "{}", o.stdout);
    assert!(o.stdout.contains("hello-from-the-internet"), "{}", o.stdout);
    assert!(o.stdout.contains("allowed=0"), "{}", o.stdout);
    // Refused at once (curl 7: connection refused), not a time-out (28).
    assert!(o.stdout.contains("port=7"), "{}", o.stdout);
    assert!(o.stdout.contains("dns=2"), "{}", o.stdout);
    assert!(
        o.stderr.contains("egress refused") && o.stderr.contains(":8081"),
        "the refusal is logged with its destination: {}",
        o.stderr
    );
    // Without --net, no device but lo: the server is out of reach.
    let mut c = w.moat(&rt);
    c.args([
        "run",
        "--",
        "sh",
        "-c",
        &format!("curl -sS --max-time 5 {ok}; echo rc=$?"),
    ]);
    let o = output(&rt, c);
    assert!(o.stdout.contains("rc=7"), "{o:?}");
    wait_none_left(rt.root());
}

#[test]
fn a_published_port_reaches_the_workload() {
    let Some(rt) = setup("published_port") else {
        return;
    };
    let w = World::new(&rt);
    let port = 20000 + (std::process::id() % 20000) as u16;
    let mut c = w.moat(&rt);
    c.args([
        "run",
        "--net=egress=",
        "-p",
        &format!("{port}:8000"),
        "--",
        "sh",
        "-c",
        "echo inside-$(hostname) > /tmp/f && cd /tmp && exec python3 -m http.server 8000",
    ])
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::null())
    .stderr(std::fs::File::create(rt.scratch_file("srv.err")).unwrap());
    let mut run = Running(spawn_own(&mut c));
    let run = &mut run.0;
    let url = format!("http://127.0.0.1:{port}/f");
    let start = Instant::now();
    let body = loop {
        let o = w.curl_from_outer(&url);
        if o.ok() {
            break o.stdout;
        }
        assert!(run.try_wait().unwrap().is_none(), "moat run ended early");
        assert!(start.elapsed() < Duration::from_secs(60), "never published");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(body.trim(), "inside-moat", "written by the workload");
    // Stopped as a user would: interrupts until moat run gives up the workload.
    while run.try_wait().unwrap().is_none() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(run.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_own(run);
    wait_none_left(rt.root());
    assert!(!w.curl_from_outer(&url).ok(), "the port is closed");
}

#[test]
fn the_annotation_gives_an_oci_bundle_the_same_network() {
    let Some(rt) = setup("net_annotation") else {
        return;
    };
    let w = World::new(&rt);
    let mut b = Bundle::new(&[
        "sh",
        "-c",
        &format!("wget -qO- http://{}:8080/index.html; echo rc=$?", w.server),
    ]);
    b.set(
        "/annotations",
        serde_json::json!({"dev.moat.net.egress": format!("{}/32:8080", w.server)}),
    );
    b.write_config();
    let id = rt.new_id("net");
    let mut c = w.moat(&rt);
    c.args(["run", "--bundle"]).arg(b.dir()).arg(&id);
    let o = output(&rt, c);
    assert!(o.stdout.contains("hello-from-the-internet"), "{o:?}");
    assert!(o.stdout.contains("rc=0"), "{o:?}");
    // A bad rule is refused before anything runs.
    b.set(
        "/annotations",
        serde_json::json!({"dev.moat.net.egress": "10.0.0.0/33"}),
    );
    b.write_config();
    let mut c = w.moat(&rt);
    c.args(["run", "--bundle"])
        .arg(b.dir())
        .arg(rt.new_id("bad"));
    let o = output(&rt, c);
    assert_ne!(o.code, Some(0));
    assert!(o.stderr.contains("prefix length"), "{}", o.stderr);
    assert!(root_entries(&rt).is_empty(), "{:?}", root_entries(&rt));
    wait_none_left(rt.root());
}

/// Rootless: an unprivileged user's `moat run --net egress=…` gets the same
/// network (the init makes the device in its own namespaces, the stack runs
/// as that user).
#[test]
fn rootless_egress_works_too() {
    let Some(rt) = setup("rootless_egress") else {
        return;
    };
    if !Path::new("/usr/bin/setpriv").exists() {
        moat_core::testing::skip("rootless_egress", "needs setpriv");
        return;
    }
    let w = World::new(&rt);
    let uid = 40000 + (std::process::id() % 10000);
    let home = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        home.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{}", w.outer))
        .args([
            "setpriv",
            "--reuid",
            &uid.to_string(),
            "--regid",
            &uid.to_string(),
        ])
        .args(["--clear-groups", "env"])
        .arg(format!("XDG_RUNTIME_DIR={}", home.path().display()))
        .arg(runtime_bin())
        .arg("run")
        .arg(format!("--net=egress={}:8080", w.server))
        .args(["--", "sh", "-c"])
        .arg(format!(
            "curl -sS --max-time 10 http://{}:8080/index.html; echo rc=$?",
            w.server
        ))
        .current_dir(home.path());
    let o = output(&rt, c);
    assert!(o.stdout.contains("hello-from-the-internet"), "{o:?}");
    assert!(o.stdout.contains("rc=0"), "{o:?}");
    // Nothing of that user's runs on: not the workload, not its stack.
    let owned_by_uid = || {
        all_processes()
            .into_iter()
            .filter(|(p, _, st)| {
                // Status, not the /proc entry's owner: a non-dumpable
                // process's entry belongs to root.
                *st != 'Z'
                    && std::fs::read_to_string(format!("/proc/{p}/status")).is_ok_and(|t| {
                        t.lines()
                            .find_map(|l| l.strip_prefix("Uid:"))
                            .and_then(|v| v.split_whitespace().next())
                            == Some(uid.to_string().as_str())
                    })
            })
            .count()
    };
    let start = Instant::now();
    while owned_by_uid() > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "processes of {uid} left"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
