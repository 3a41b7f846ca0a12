//! Podman drives moat: `podman --runtime /path/to/moat` with private
//! --root/--runroot/--tmpdir, `--cgroup-manager cgroupfs --events-backend
//! file`, and a containers.conf with `default_ulimits = []` (Podman's default
//! nofile ulimit exceeds this machine's hard limit, which root cannot raise
//! here without CAP_SYS_RESOURCE).
mod engines;

use engines::{
    assert_built, assert_guest_serves, assert_reaches_gateway_from, base_dir, build_context,
    busybox_tar, can_run, moat_bin, moat_links, s, sh, wait_for, Daemon, Out, GUEST_SERVER,
};

struct Podman {
    d: Daemon,
    global: Vec<String>,
    conf: String,
}

impl Podman {
    fn new(runtime: &str) -> Podman {
        let base = base_dir("moat-pm");
        let p = |n: &str| s(&base.path().join(n));
        let conf = p("containers.conf");
        std::fs::write(
            &conf,
            format!(
                "[containers]\ndefault_ulimits = []\n[network]\nnetwork_config_dir = \"{}\"\n",
                p("net")
            ),
        )
        .unwrap();
        let global: Vec<String> = [
            "--root",
            &p("root"),
            "--runroot",
            &p("runroot"),
            "--tmpdir",
            &p("tmp"),
            "--storage-driver",
            "vfs",
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "file",
            "--runtime",
            runtime,
        ]
        .map(String::from)
        .to_vec();
        let mut d = Daemon::none(base);
        let mut rm = vec![
            "env".to_owned(),
            format!("CONTAINERS_CONF={conf}"),
            "podman".into(),
        ];
        rm.extend(global.iter().cloned());
        rm.extend(["rm".into(), "-af".into(), "-t".into(), "0".into()]);
        d.cleanup.push(rm);
        let pm = Podman { d, global, conf };
        // Podman's lock memory (/dev/shm/libpod_lock) is one for every
        // root: on a fresh machine two first commands at once may both
        // find none and both create it, and the second fails ("file
        // exists"). The first test's makes it alone.
        static LOCKS: std::sync::Once = std::sync::Once::new();
        LOCKS.call_once(|| {
            pm.cmd(&["info"]).expect_ok();
        });
        let tar = busybox_tar(pm.d.path());
        pm.cmd(&["import", &s(&tar), "moatbb"]).expect_ok();
        pm
    }

    fn cmd(&self, args: &[&str]) -> Out {
        let mut a: Vec<&str> = self.global.iter().map(String::as_str).collect();
        a.extend_from_slice(args);
        sh("podman", &a, &[("CONTAINERS_CONF", &self.conf)])
    }

    /// The podman command line as one shell string (for `script -c`).
    fn shell_line(&self, args: &[&str]) -> String {
        let mut line = format!("CONTAINERS_CONF={} podman", self.conf);
        for a in self
            .global
            .iter()
            .map(String::as_str)
            .chain(args.iter().copied())
        {
            line.push(' ');
            line.push_str(a);
        }
        line
    }

    /// `podman run --rm --network none OPTS moatbb CMD...`, must succeed; its stdout.
    #[track_caller]
    fn run(&self, opts: &[&str], cmd: &[&str]) -> String {
        let mut a = vec!["run", "--rm", "--network", "none"];
        a.extend_from_slice(opts);
        a.push("moatbb");
        a.extend_from_slice(cmd);
        self.cmd(&a).expect_ok().stdout
    }

    fn inspect(&self, id: &str, fmt: &str) -> String {
        self.cmd(&["inspect", "-f", fmt, id])
            .expect_ok()
            .stdout
            .trim()
            .to_owned()
    }
}

#[test]
fn podman_run_options_reach_the_container() {
    if !can_run("podman_run_options_reach_the_container", &["podman"]) {
        return;
    }
    let pm = Podman::new(&s(&moat_bin()));

    engines::check_common_run_options(pm.d.path(), &|o, c| pm.run(o, c));

    // --read-only alone adds tmpfs mounts on /tmp, /var/tmp and /run with
    // the `tmpcopyup` option: those stay writable, the root does not.
    let ro = pm.run(
        &["--read-only"],
        &[
            "sh",
            "-c",
            "touch /x 2>&1; echo rc=$?; touch /tmp/y && echo tmp-ok",
        ],
    );
    assert!(
        ro.contains("Read-only file system") && ro.contains("rc=1") && ro.contains("tmp-ok"),
        "{ro}"
    );
    let ro = pm.run(
        &["--read-only", "--read-only-tmpfs=false"],
        &["sh", "-c", "touch /x 2>&1; echo rc=$?"],
    );
    assert!(
        ro.contains("Read-only file system") && ro.contains("rc=1"),
        "{ro}"
    );

    // moat's Landlock policy through a Podman annotation: the container's
    // root (CAP_DAC_OVERRIDE) may write Podman's /tmp tmpfs but create
    // nothing in its /dev tmpfs; without the annotation, it can. (With a
    // writable root, `/` itself is a write path and covers /dev.)
    let ll = pm.run(
        &["--read-only", "--annotation", "dev.moat.landlock=auto"],
        &[
            "sh",
            "-c",
            "touch /dev/x 2>&1; echo rc=$?; touch /tmp/y && echo tmp-ok",
        ],
    );
    assert!(
        ll.contains("Permission denied") && ll.contains("rc=1") && ll.contains("tmp-ok"),
        "{ll}"
    );
    let plain = pm.run(
        &["--read-only"],
        &["sh", "-c", "touch /dev/x && echo dev-ok"],
    );
    assert!(plain.contains("dev-ok"), "{plain}");

    let st = pm.run(
        &["--cap-drop", "ALL", "--cap-add", "NET_RAW"],
        &["grep", "CapEff", "/proc/self/status"],
    );
    assert!(st.contains("0000000000002000"), "only CAP_NET_RAW: {st}");
    let nnp = pm.run(
        &["--security-opt", "no-new-privileges"],
        &["grep", "NoNewPrivs", "/proc/self/status"],
    );
    assert!(nnp.contains('1'), "{nnp}");
    let default = pm.run(&[], &["grep", "Seccomp:", "/proc/self/status"]);
    assert!(default.contains('2'), "{default}");
    let prof = pm.d.path().join("seccomp.json");
    std::fs::write(
        &prof,
        r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mkdir","mkdirat"],"action":"SCMP_ACT_ERRNO","errnoRet":1}]}"#,
    )
    .unwrap();
    let so = format!("seccomp={}", s(&prof));
    let denied = pm.run(
        &["--security-opt", &so],
        &["sh", "-c", "mkdir /tmp/d 2>&1; echo rc=$?"],
    );
    assert!(denied.contains("Operation not permitted"), "{denied}");

    let links = pm.run(&[], &["ip", "-o", "link"]);
    assert_eq!(links.lines().count(), 1, "--network none: only lo: {links}");
    // The default network: a CNI/netavark bridge that podman sets up.
    let addr = pm
        .cmd(&[
            "run", "--rm", "moatbb", "ip", "-o", "-4", "addr", "show", "eth0",
        ])
        .expect_ok();
    assert!(addr.stdout.contains("inet "), "{addr:?}");
}

#[test]
fn podman_manages_a_running_moat_container() {
    if !can_run(
        "podman_manages_a_running_moat_container",
        &["podman", "script"],
    ) {
        return;
    }
    let pm = Podman::new(&s(&moat_bin()));
    pm.cmd(&[
        "run",
        "-d",
        "--name",
        "c1",
        "--network",
        "none",
        "moatbb",
        "sleep",
        "1000",
    ])
    .expect_ok();

    assert_eq!(
        pm.cmd(&["exec", "c1", "echo", "in-exec"])
            .expect_ok()
            .stdout,
        "in-exec\n"
    );
    assert_eq!(pm.cmd(&["exec", "c1", "sh", "-c", "exit 7"]).code, Some(7));
    let e = pm
        .cmd(&[
            "exec",
            "-u",
            "65534",
            "-e",
            "X=1",
            "-w",
            "/tmp",
            "c1",
            "sh",
            "-c",
            "echo $X $(pwd) $(id -u)",
        ])
        .expect_ok();
    assert_eq!(e.stdout.trim(), "1 /tmp 65534");
    let it = sh(
        "script",
        &[
            "-qec",
            &pm.shell_line(&["exec", "-it", "c1", "tty"]),
            "/dev/null",
        ],
        &[],
    )
    .expect_ok();
    assert!(it.stdout.contains("/dev/pts/"), "{it:?}");

    let top = pm.cmd(&["top", "c1"]).expect_ok();
    assert!(top.stdout.contains("sleep 1000"), "{top:?}");
    let stats = pm
        .cmd(&["stats", "--no-stream", "--format", "{{.PIDs}}", "c1"])
        .expect_ok();
    assert_eq!(stats.stdout.trim(), "1", "{stats:?}");

    pm.cmd(&["pause", "c1"]).expect_ok();
    assert_eq!(pm.inspect("c1", "{{.State.Status}}"), "paused");
    pm.cmd(&["unpause", "c1"]).expect_ok();
    assert_eq!(pm.inspect("c1", "{{.State.Status}}"), "running");

    pm.cmd(&["update", "--memory", "128m", "--cpus", "0.25", "c1"])
        .expect_ok();
    let after = pm
        .cmd(&[
            "exec",
            "c1",
            "cat",
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/cpu/cpu.cfs_quota_us",
        ])
        .expect_ok();
    assert_eq!(
        after.stdout.split_whitespace().collect::<Vec<_>>(),
        ["134217728", "25000"]
    );

    pm.cmd(&["stop", "-t", "1", "c1"]).expect_ok();
    assert_eq!(
        pm.inspect("c1", "{{.State.Status}} {{.State.ExitCode}}"),
        "exited 137"
    );
    pm.cmd(&["start", "c1"]).expect_ok();
    assert_eq!(pm.inspect("c1", "{{.State.Status}}"), "running");
    pm.cmd(&["kill", "c1"]).expect_ok();
    wait_for("killed", || {
        pm.inspect("c1", "{{.State.Status}}") == "exited"
    });
    pm.cmd(&["rm", "c1"]).expect_ok();

    pm.cmd(&[
        "run",
        "-d",
        "--name",
        "r1",
        "--network",
        "none",
        "--restart",
        "on-failure:2",
        "moatbb",
        "sh",
        "-c",
        "exit 3",
    ])
    .expect_ok();
    wait_for("two restarts", || {
        pm.inspect("r1", "{{.RestartCount}} {{.State.Status}}") == "2 exited"
    });
    assert_eq!(pm.inspect("r1", "{{.State.ExitCode}}"), "3");
}

/// `podman build` (Buildah) with moat as its runtime and `--runtime-flag
/// isolation=microvm`: every `RUN` step ran in a microVM (on the guest's
/// kernel), and what each wrote, deleted and `setcap`ed is in the image
/// Buildah committed from the step's root, as under runc.
#[test]
fn podman_build_runs_its_steps_in_microvms() {
    if !can_run("podman_build_runs_its_steps_in_microvms", &["podman"]) {
        return;
    }
    let links = base_dir("moat-pm-links");
    let bin = moat_links(links.path());
    let pm = Podman::new(&s(&bin.join("moat")));
    let ctx = s(&build_context(links.path()));
    let vm = ["--runtime-flag", "isolation=microvm"];
    let mut build = vec!["build", "--network", "none", "-t", "built"];
    build.extend_from_slice(&vm);
    build.push(&ctx);
    pm.cmd(&build).expect_ok();
    assert_built(|cmd| {
        let mut a = vm.to_vec();
        a.extend_from_slice(&["run", "--rm", "--network", "none", "built"]);
        a.extend_from_slice(cmd);
        pm.cmd(&a).expect_ok().stdout
    });
}

#[test]
fn podman_selects_every_tier() {
    if !can_run("podman_selects_every_tier", &["podman"]) {
        return;
    }
    let links = base_dir("moat-pm-links");
    let bin = moat_links(links.path());
    let pm = Podman::new(&s(&bin.join("moat")));
    // By annotation in config.json: the sandbox tier runs it.
    let sb = pm
        .cmd(&[
            "run",
            "--rm",
            "--network",
            "none",
            "--annotation",
            "dev.moat.isolation=sandbox",
            "moatbb",
            "echo",
            "in-sandbox",
        ])
        .expect_ok();
    assert_eq!(sb.stdout, "in-sandbox\n");
    // An explicit `container` annotation runs.
    let ok = pm
        .cmd(&[
            "run",
            "--rm",
            "--network",
            "none",
            "--annotation",
            "dev.moat.isolation=container",
            "moatbb",
            "echo",
            "ok",
        ])
        .expect_ok();
    assert_eq!(ok.stdout, "ok\n");
    // A program that cannot run: Podman's status as with runc (127 not
    // there, 126 not executable), in each tier. (The container tier found
    // out at `start`, which Podman made 126 whatever the reason.)
    for tier in ["container", "sandbox", "microvm"] {
        for (cmd, status) in [
            ("no-such-command", 127),
            ("/nonexistent", 127),
            ("/etc", 126),
        ] {
            let o = pm.cmd(&[
                "run",
                "--rm",
                "--network",
                "none",
                "--annotation",
                &format!("dev.moat.isolation={tier}"),
                "moatbb",
                cmd,
            ]);
            assert_eq!(o.code, Some(status), "{tier} {cmd}: {o:?}");
        }
    }
    // By the global flag (podman --runtime-flag passes --isolation=microvm):
    // the workload runs on the guest's kernel, its exit status comes back.
    let vm = pm.cmd(&[
        "--runtime-flag",
        "isolation=microvm",
        "run",
        "--rm",
        "--network",
        "none",
        "moatbb",
        "sh",
        "-c",
        "echo in-vm; uname -r; exit 3",
    ]);
    assert_eq!(vm.code, Some(3), "{vm:?}");
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let lines: Vec<&str> = vm.stdout.lines().collect();
    assert_eq!(lines.first(), Some(&"in-vm"), "{vm:?}");
    assert_ne!(
        lines.get(1).copied(),
        Some(host.trim()),
        "the guest's own kernel: {vm:?}"
    );
    // A read-write volume: the guest's write is the host directory's.
    let vol = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        vol.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let spec = format!("{}:/data", vol.path().display());
    pm.cmd(&[
        "--runtime-flag",
        "isolation=microvm",
        "run",
        "--rm",
        "--network",
        "none",
        "-v",
        &spec,
        "moatbb",
        "sh",
        "-c",
        "echo from-the-vm > /data/out",
    ])
    .expect_ok();
    assert_eq!(
        std::fs::read_to_string(vol.path().join("out")).unwrap(),
        "from-the-vm\n"
    );
    // On Podman's default network (a netavark bridge): the guest takes over
    // the container's interface, so the address Podman reports reaches the
    // guest's kernel from the host.
    pm.cmd(&[
        "--runtime-flag",
        "isolation=microvm",
        "run",
        "-d",
        "--name",
        "vmnet",
        "moatbb",
        "sh",
        "-c",
        GUEST_SERVER,
    ])
    .expect_ok();
    let ip = pm.inspect("vmnet", "{{.NetworkSettings.IPAddress}}");
    assert!(!ip.is_empty(), "Podman gave the container an address");
    assert_guest_serves(&format!("http://{ip}:8000"));
    // Paused and unpaused, the guest goes on serving (the VMM once died
    // of its filter on `resume`).
    pm.cmd(&["pause", "vmnet"]).expect_ok();
    assert_eq!(pm.inspect("vmnet", "{{.State.Status}}"), "paused");
    pm.cmd(&["unpause", "vmnet"]).expect_ok();
    assert_eq!(pm.inspect("vmnet", "{{.State.Status}}"), "running");
    assert_guest_serves(&format!("http://{ip}:8000"));
    // A second microVM on that container's network (`--network
    // container:vmnet`, which names the namespace of vmnet's process, the
    // VMM's jail): it gets vmnet's network, through moat's stack since
    // vmnet's guest holds the interface, and reaches the host from
    // vmnet's address.
    let gateway = pm.inspect("vmnet", "{{.NetworkSettings.Gateway}}");
    assert_reaches_gateway_from(&gateway, &ip, |script| {
        pm.cmd(&[
            "--runtime-flag",
            "isolation=microvm",
            "run",
            "--rm",
            "--network",
            "container:vmnet",
            "moatbb",
            "sh",
            "-c",
            script,
        ])
        .expect_ok();
    });
    assert_guest_serves(&format!("http://{ip}:8000"));
    pm.cmd(&["rm", "-f", "-t", "0", "vmnet"]).expect_ok();
    // By program name.
    let sb = pm
        .cmd(&[
            "--runtime",
            &s(&bin.join("moat-sandbox")),
            "run",
            "--rm",
            "--network",
            "none",
            "moatbb",
            "echo",
            "by-name",
        ])
        .expect_ok();
    assert_eq!(sb.stdout, "by-name\n");
}
