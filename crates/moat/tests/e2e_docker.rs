//! Docker drives moat: a private dockerd (its own --data-root, --exec-root,
//! --pidfile and unix socket, `--iptables=false`) registers moat with
//! `--add-runtime` or daemon.json `runtimes`, and `docker run --runtime moat`
//! exercises the options Docker turns into config.json, exec (also with a
//! terminal), stats, top, pause, update, stop/kill/rm and restart policies.
mod engines;

use engines::{
    assert_built, assert_guest_serves, assert_reaches_gateway_from, base_dir, build_context,
    busybox_tar, can_run, copy_libcap_tools, moat_bin, moat_links, s, sh, wait_for, Daemon, Out,
    GUEST_SERVER,
};

struct Docker {
    d: Daemon,
    host: String,
}

impl Docker {
    /// Starts dockerd with `extra` flags and imports the busybox image as `moatbb`.
    fn start(extra: &[String]) -> Docker {
        let base = base_dir("moat-dk");
        let p = |n: &str| s(&base.path().join(n));
        let host = format!("unix://{}", p("docker.sock"));
        let mut args = vec![
            "--data-root".to_owned(),
            p("data"),
            "--exec-root".into(),
            p("exec"),
            "--pidfile".into(),
            p("docker.pid"),
            "-H".into(),
            host.clone(),
            "--iptables=false".into(),
            "--ip6tables=false".into(),
            "--ip-masq=false".into(),
            "--bridge=none".into(),
            "--storage-driver=vfs".into(),
        ];
        args.extend_from_slice(extra);
        let mut d = Daemon::start(base, "dockerd", &args);
        let h = host.clone();
        d.wait_ready(|| sh("docker", &["-H", &h, "version"], &[]).ok());
        // Containers first, while dockerd still answers.
        d.cleanup.push(
            [
                "sh",
                "-c",
                &format!("docker -H {host} rm -f $(docker -H {host} ps -aq)"),
            ]
            .map(String::from)
            .to_vec(),
        );
        let dk = Docker { d, host };
        let tar = busybox_tar(dk.d.path());
        dk.cmd(&["import", &s(&tar), "moatbb:latest"]).expect_ok();
        dk
    }

    fn cmd(&self, args: &[&str]) -> Out {
        let mut a = vec!["-H", self.host.as_str()];
        a.extend_from_slice(args);
        sh("docker", &a, &[])
    }

    /// `docker run --rm --runtime moat OPTS moatbb CMD...`, must succeed; its stdout.
    #[track_caller]
    fn run(&self, opts: &[&str], cmd: &[&str]) -> String {
        let mut a = vec!["run", "--rm", "--runtime", "moat"];
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

fn cap_eff(status: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap_or("")
        .trim()
        .to_owned()
}

#[test]
fn docker_run_options_reach_the_container() {
    if !can_run(
        "docker_run_options_reach_the_container",
        &["dockerd", "docker"],
    ) {
        return;
    }
    let dk = Docker::start(&[format!("--add-runtime=moat={}", s(&moat_bin()))]);

    engines::check_common_run_options(dk.d.path(), &|o, c| dk.run(o, c));

    let ro = dk.run(&["--read-only"], &["sh", "-c", "touch /x 2>&1; echo rc=$?"]);
    assert!(
        ro.contains("Read-only file system") && ro.contains("rc=1"),
        "{ro}"
    );

    let st = dk.run(
        &["--cap-drop", "ALL", "--cap-add", "NET_RAW"],
        &["cat", "/proc/self/status"],
    );
    assert_eq!(cap_eff(&st), "0000000000002000", "only CAP_NET_RAW: {st}");

    let nnp = dk.run(
        &["--security-opt", "no-new-privileges"],
        &["grep", "NoNewPrivs", "/proc/self/status"],
    );
    assert!(nnp.contains('1'), "{nnp}");

    let default = dk.run(&[], &["grep", "Seccomp:", "/proc/self/status"]);
    assert!(
        default.contains('2'),
        "Docker's default seccomp profile is loaded: {default}"
    );
    let prof = dk.d.path().join("seccomp.json");
    std::fs::write(
        &prof,
        r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mkdir","mkdirat"],"action":"SCMP_ACT_ERRNO","errnoRet":1}]}"#,
    )
    .unwrap();
    let so = format!("seccomp={}", s(&prof));
    let denied = dk.run(
        &["--security-opt", &so],
        &["sh", "-c", "mkdir /tmp/d 2>&1; echo rc=$?"],
    );
    assert!(denied.contains("Operation not permitted"), "{denied}");
    let unconfined = dk.run(
        &["--security-opt", "seccomp=unconfined"],
        &["grep", "Seccomp:", "/proc/self/status"],
    );
    assert!(unconfined.contains('0'), "{unconfined}");

    let links = dk.run(&["--network", "none"], &["ip", "-o", "link"]);
    assert_eq!(links.lines().count(), 1, "only lo: {links}");

    // A bridge network dockerd sets up (veth + address; no NAT: --iptables=false).
    dk.cmd(&["network", "create", "moatnet"]).expect_ok();
    dk.cmd(&[
        "run",
        "-d",
        "--name",
        "srv",
        "--runtime",
        "moat",
        "--network",
        "moatnet",
        "moatbb",
        "sleep",
        "1000",
    ])
    .expect_ok();
    let ip = dk.inspect(
        "srv",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
    );
    assert!(!ip.is_empty());
    let ping = dk.run(
        &["--network", "moatnet"],
        &["ping", "-c", "1", "-W", "5", &ip],
    );
    assert!(ping.contains("1 packets received"), "{ping}");
    dk.cmd(&["rm", "-f", "srv"]).expect_ok();
    dk.cmd(&["network", "rm", "moatnet"]).expect_ok();
}

#[test]
fn docker_manages_a_running_moat_container() {
    if !can_run(
        "docker_manages_a_running_moat_container",
        &["dockerd", "docker", "script"],
    ) {
        return;
    }
    let dk = Docker::start(&[format!("--add-runtime=moat={}", s(&moat_bin()))]);
    dk.cmd(&[
        "run",
        "-d",
        "--name",
        "c1",
        "--runtime",
        "moat",
        "moatbb",
        "sleep",
        "1000",
    ])
    .expect_ok();

    // exec: output, exit status, user/env/workdir.
    assert_eq!(
        dk.cmd(&["exec", "c1", "echo", "in-exec"])
            .expect_ok()
            .stdout,
        "in-exec\n"
    );
    assert_eq!(dk.cmd(&["exec", "c1", "sh", "-c", "exit 7"]).code, Some(7));
    let e = dk
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
    // exec -it: a pty from moat's console socket (script gives docker a terminal).
    let it = sh(
        "script",
        &[
            "-qec",
            &format!("docker -H {} exec -it c1 tty", dk.host),
            "/dev/null",
        ],
        &[],
    )
    .expect_ok();
    assert!(it.stdout.contains("/dev/pts/"), "{it:?}");

    // top (runtime `ps`), stats (runtime `events --stats` / cgroup files).
    let top = dk.cmd(&["top", "c1"]).expect_ok();
    assert!(top.stdout.contains("sleep 1000"), "{top:?}");
    let stats = dk
        .cmd(&[
            "stats",
            "--no-stream",
            "--format",
            "{{.PIDs}} {{.MemUsage}}",
            "c1",
        ])
        .expect_ok();
    assert!(stats.stdout.starts_with("1 "), "{stats:?}");
    assert!(
        !stats.stdout.contains(" 0B /"),
        "memory usage is read: {stats:?}"
    );

    // pause/unpause: the freezer.
    dk.cmd(&["pause", "c1"]).expect_ok();
    assert_eq!(dk.inspect("c1", "{{.State.Status}}"), "paused");
    dk.cmd(&["unpause", "c1"]).expect_ok();
    assert_eq!(dk.inspect("c1", "{{.State.Status}}"), "running");

    // update: runtime `update --resources -`.
    dk.cmd(&[
        "update",
        "--memory",
        "128m",
        "--memory-swap",
        "256m",
        "--pids-limit",
        "30",
        "--cpus",
        "0.25",
        "c1",
    ])
    .expect_ok();
    let after = dk
        .cmd(&[
            "exec",
            "c1",
            "cat",
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/pids/pids.max",
            "/sys/fs/cgroup/cpu/cpu.cfs_quota_us",
        ])
        .expect_ok();
    assert_eq!(
        after.stdout.split_whitespace().collect::<Vec<_>>(),
        ["134217728", "30", "25000"]
    );

    // stop (SIGTERM is ignored by a PID 1 without a handler, then SIGKILL), rm.
    dk.cmd(&["stop", "-t", "1", "c1"]).expect_ok();
    assert_eq!(
        dk.inspect("c1", "{{.State.Status}} {{.State.ExitCode}}"),
        "exited 137"
    );
    dk.cmd(&["start", "c1"]).expect_ok();
    assert_eq!(dk.inspect("c1", "{{.State.Status}}"), "running");
    dk.cmd(&["kill", "c1"]).expect_ok();
    wait_for("killed", || {
        dk.inspect("c1", "{{.State.Status}}") == "exited"
    });
    dk.cmd(&["rm", "c1"]).expect_ok();

    // Restart policies: the shim runs moat create/start again.
    dk.cmd(&[
        "run",
        "-d",
        "--name",
        "r1",
        "--runtime",
        "moat",
        "--restart",
        "on-failure:2",
        "moatbb",
        "sh",
        "-c",
        "exit 3",
    ])
    .expect_ok();
    wait_for("two restarts", || {
        dk.inspect("r1", "{{.RestartCount}} {{.State.Status}}") == "2 exited"
    });
    assert_eq!(dk.inspect("r1", "{{.State.ExitCode}}"), "3");
    dk.cmd(&["rm", "-f", "r1"]).expect_ok();
}

/// A classic `docker build` (`DOCKER_BUILDKIT=0`: each `RUN` step a
/// container of the daemon's default runtime, committed after it) with the
/// microVM runtime as the default: every step ran in a microVM (on the
/// guest's kernel), and what each wrote, deleted and `setcap`ed is in the
/// image, as under runc.
#[test]
fn docker_build_runs_its_steps_in_microvms() {
    if !can_run(
        "docker_build_runs_its_steps_in_microvms",
        &["dockerd", "docker"],
    ) {
        return;
    }
    let (dk, links) = with_daemon_json(|bin| {
        serde_json::json!({
            "runtimes": {"moat-vm": {"path": s(&bin.join("moat")), "runtimeArgs": ["--isolation", "microvm"]}},
            "default-runtime": "moat-vm"
        })
    });
    let ctx = s(&build_context(links.path()));
    let build = [
        "-H",
        &dk.host,
        "build",
        "--network",
        "none",
        "-t",
        "built",
        &ctx,
    ];
    sh("docker", &build, &[("DOCKER_BUILDKIT", "0")]).expect_ok();
    assert_built(|cmd| {
        let mut a = vec!["run", "--rm", "--network", "none", "built"];
        a.extend_from_slice(cmd);
        dk.cmd(&a).expect_ok().stdout
    });
}

/// A dockerd configured by the daemon.json `json` makes of the directory
/// of moat's links (`moat`, `moat-sandbox`, `moat-microvm`); and the
/// directory those are in, which the daemon's files are beside.
fn with_daemon_json(
    json: impl FnOnce(&std::path::Path) -> serde_json::Value,
) -> (Docker, tempfile::TempDir) {
    let links = base_dir("moat-dk-links");
    let bin = moat_links(links.path());
    let conf = links.path().join("daemon.json");
    std::fs::write(&conf, json(&bin).to_string()).unwrap();
    let dk = Docker::start(&[format!("--config-file={}", s(&conf))]);
    (dk, links)
}

#[test]
fn docker_daemon_json_runtimes_select_tiers() {
    if !can_run(
        "docker_daemon_json_runtimes_select_tiers",
        &["dockerd", "docker"],
    ) {
        return;
    }
    let (dk, _links) = with_daemon_json(|bin| {
        serde_json::json!({"runtimes": {
            "moat": {"path": s(&bin.join("moat"))},
            "moat-sandbox": {"path": s(&bin.join("moat-sandbox"))},
            "moat-vm-flag": {"path": s(&bin.join("moat")), "runtimeArgs": ["--isolation", "microvm"]}
        }})
    });

    let ok = dk
        .cmd(&[
            "run",
            "--rm",
            "--runtime",
            "moat",
            "moatbb",
            "echo",
            "daemon.json",
        ])
        .expect_ok();
    assert_eq!(ok.stdout, "daemon.json\n");
    // The sandbox tier by program name.
    let sb = dk
        .cmd(&[
            "run",
            "--rm",
            "--runtime",
            "moat-sandbox",
            "moatbb",
            "echo",
            "in-sandbox",
        ])
        .expect_ok();
    assert_eq!(sb.stdout, "in-sandbox\n");
    // The microvm tier by runtimeArgs: the workload's output and status.
    let vm = dk.cmd(&[
        "run",
        "--rm",
        "--network",
        "none",
        "--runtime",
        "moat-vm-flag",
        "moatbb",
        "sh",
        "-c",
        "echo in-vm; uname -r; exit 3",
    ]);
    assert_eq!(vm.code, Some(3), "{vm:?}");
    // It ran on the guest's own kernel, not the host's.
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let lines: Vec<&str> = vm.stdout.lines().collect();
    assert_eq!(lines.first(), Some(&"in-vm"), "{vm:?}");
    assert!(
        lines.get(1).is_some_and(|k| *k != host.trim()),
        "the guest's own kernel: {vm:?}"
    );
    // What the process inherits where Docker sets nothing is the same in
    // a guest as under the container tier (and runc): HOME from the
    // image's passwd, the resource limits of the runtime Docker ran (they
    // were the guest kernel's: no HOME, 1024 open files).
    let inherited = |rt: &str| {
        dk.cmd(&[
            "run",
            "--rm",
            "--network",
            "none",
            "--runtime",
            rt,
            "moatbb",
            "sh",
            "-c",
            "echo HOME=$HOME; ulimit -Sn; ulimit -Hn; ulimit -u; ulimit -Hi",
        ])
        .expect_ok()
        .stdout
    };
    let (container, vm) = (inherited("moat"), inherited("moat-vm-flag"));
    assert!(container.starts_with("HOME=/"), "{container}");
    assert_eq!(vm, container);
    // A program that cannot run: Docker's status as with runc (127 not
    // found, 126 not executable), which Docker reads from the runtime's
    // words (the container tier's said "executable \"x\" not found in
    // $PATH" at `start`: Docker made that 125).
    for rt in ["moat", "moat-vm-flag"] {
        for (cmd, status) in [("no-such-command", 127), ("/etc", 126)] {
            let o = dk.cmd(&[
                "run",
                "--rm",
                "--network",
                "none",
                "--runtime",
                rt,
                "moatbb",
                cmd,
            ]);
            assert_eq!(o.code, Some(status), "{rt} {cmd}: {o:?}");
        }
    }
    // Over its memory limit, the guest's kernel kills it, and Docker says
    // so as for a runc container (the VMM echoes the kill in the
    // container's cgroup, where Docker looks; before, `OOMKilled` was
    // false).
    let hog = dk.cmd(&[
        "run",
        "--name",
        "vmhog",
        "--network",
        "none",
        "--runtime",
        "moat-vm-flag",
        "--memory",
        "64m",
        "moatbb",
        "sh",
        "-c",
        "exec awk 'BEGIN { s = \"x\"; while (1) s = s s }'",
    ]);
    assert_eq!(hog.code, Some(137), "{hog:?}");
    let st = dk
        .cmd(&[
            "inspect",
            "vmhog",
            "--format",
            "{{.State.OOMKilled}} {{.State.ExitCode}}",
        ])
        .expect_ok();
    assert_eq!(st.stdout.trim(), "true 137");
    dk.cmd(&["rm", "vmhog"]).expect_ok();
    // What a container wrote to its root is there again after `docker
    // start` (a microVM's layer is kept while Docker keeps the container's
    // directory), deletions too, as under the container tier (and runc);
    // after `docker rm`, a container of the same name starts from the
    // image's root.
    let script = "cat /kept 2>/dev/null; echo again >> /kept; ls /bin/vi 2>/dev/null; rm -f /bin/vi; echo ran";
    let kept = |rt: &str| {
        let name = format!("kept-{rt}");
        let mut seen = String::new();
        for round in 0..3 {
            if round == 2 {
                dk.cmd(&["rm", &name]).expect_ok();
            }
            let o = if round == 1 {
                dk.cmd(&["start", "-a", &name])
            } else {
                dk.cmd(&[
                    "run",
                    "--name",
                    &name,
                    "--network",
                    "none",
                    "--runtime",
                    rt,
                    "moatbb",
                    "sh",
                    "-c",
                    script,
                ])
            };
            seen += &o.expect_ok().stdout;
            if round == 1 {
                // The engine sees what the stopped container wrote (the
                // microVM's mirror of its layer): `docker diff`, `cp` and
                // `commit` read the container's directory.
                let mut diff: Vec<String> = dk
                    .cmd(&["diff", &name])
                    .expect_ok()
                    .stdout
                    .lines()
                    .map(str::to_string)
                    .collect();
                diff.sort();
                seen += &format!("diff: {}\n", diff.join(", "));
                let copy = tempfile::tempdir().unwrap();
                let to = copy.path().join("kept");
                dk.cmd(&["cp", &format!("{name}:/kept"), &s(&to)])
                    .expect_ok();
                seen += &format!("cp: {}", std::fs::read_to_string(&to).unwrap());
                let image = format!("kept-{rt}-commit");
                dk.cmd(&["commit", &name, &image]).expect_ok();
                let c = dk
                    .cmd(&[
                        "run",
                        "--rm",
                        "--network",
                        "none",
                        "--runtime",
                        "moat",
                        &image,
                        "sh",
                        "-c",
                        "cat /kept; ls /bin/vi 2>&1 >/dev/null | wc -l",
                    ])
                    .expect_ok();
                seen += &format!("commit: {}", c.stdout);
                dk.cmd(&["rmi", &image]).expect_ok();
                // Changed by the engine while it is stopped (`docker cp`
                // into it): the next start sees the host's file.
                std::fs::write(&to, "host\n").unwrap();
                dk.cmd(&["cp", &s(&to), &format!("{name}:/kept")])
                    .expect_ok();
                seen += &format!(
                    "after cp: {}",
                    dk.cmd(&["start", "-a", &name]).expect_ok().stdout
                );
            }
        }
        dk.cmd(&["rm", &name]).expect_ok();
        seen
    };
    let (container, vm) = (kept("moat"), kept("moat-vm-flag"));
    assert_eq!(
        container,
        "/bin/vi\nran\nagain\nran\ndiff: A /kept, C /bin, D /bin/vi\ncp: again\nagain\ncommit: again\nagain\n1\nafter cp: host\nran\n/bin/vi\nran\n"
    );
    assert_eq!(vm, container);
    // `docker commit` of a running container (Docker pauses it first):
    // what it wrote so far is in the image, under the microVM runtime as
    // under the container tier (the pause mirrors its writes).
    let live = |rt: &str| {
        let name = format!("live-{rt}");
        dk.cmd(&[
            "run",
            "-d",
            "--name",
            &name,
            "--network",
            "none",
            "--runtime",
            rt,
            "moatbb",
            "sh",
            "-c",
            "echo live > /live; echo ready; exec sleep 1000",
        ])
        .expect_ok();
        wait_for("the live container's ready", || {
            dk.cmd(&["logs", &name]).stdout.contains("ready")
        });
        let image = format!("live-{rt}-commit");
        dk.cmd(&["commit", &name, &image]).expect_ok();
        let seen = dk
            .cmd(&[
                "run",
                "--rm",
                "--network",
                "none",
                "--runtime",
                "moat",
                &image,
                "cat",
                "/live",
            ])
            .expect_ok()
            .stdout;
        // Resumed: it still runs.
        let running = dk
            .cmd(&[
                "inspect",
                &name,
                "--format",
                "{{.State.Running}} {{.State.Paused}}",
            ])
            .expect_ok()
            .stdout;
        dk.cmd(&["rm", "-f", &name]).expect_ok();
        dk.cmd(&["rmi", &image]).expect_ok();
        seen + &running
    };
    assert_eq!(live("moat"), "live\ntrue false\n");
    assert_eq!(live("moat-vm-flag"), "live\ntrue false\n");
    // A `setcap` step committed (a classic builder's `RUN setcap ...`):
    // the image's file has the capability under the microVM runtime as
    // under the container tier (the mirror carries file capabilities into
    // Docker's store, which only root can reach). busybox has no setcap:
    // the host's, with its libraries, copied into an image first.
    let tools = tempfile::tempdir().unwrap();
    copy_libcap_tools(tools.path());
    dk.cmd(&["create", "--name", "capbase", "moatbb", "true"])
        .expect_ok();
    let src = format!("{}/.", tools.path().display());
    dk.cmd(&["cp", &src, "capbase:/"]).expect_ok();
    dk.cmd(&["commit", "capbase", "moatcap"]).expect_ok();
    dk.cmd(&["rm", "capbase"]).expect_ok();
    let cap = |rt: &str| {
        let name = format!("cap-{rt}");
        let set = "cp /bin/busybox /pingx && setcap cap_net_raw+ep /pingx && echo set";
        let o = dk.cmd(&[
            "run",
            "--name",
            &name,
            "--network",
            "none",
            "--runtime",
            rt,
            "moatcap",
            "sh",
            "-c",
            set,
        ]);
        let mut seen = o.expect_ok().stdout;
        let image = format!("cap-{rt}-commit");
        dk.cmd(&["commit", &name, &image]).expect_ok();
        let o = dk.cmd(&[
            "run",
            "--rm",
            "--network",
            "none",
            "--runtime",
            "moat",
            &image,
            "getcap",
            "/pingx",
        ]);
        seen += &o.expect_ok().stdout;
        dk.cmd(&["rm", &name]).expect_ok();
        dk.cmd(&["rmi", &image]).expect_ok();
        seen
    };
    let container = cap("moat");
    assert_eq!(container, "set\n/pingx cap_net_raw=ep\n");
    assert_eq!(cap("moat-vm-flag"), container);
    dk.cmd(&["rmi", "moatcap"]).expect_ok();
    // A read-write volume (`-v`) reaches the host directory through
    // virtio-fs both ways; Docker's root in the guest is not the host's.
    // Writable by others: the guest's IDs are a host ID block of the
    // container's own (as with Docker's userns-remap), not root.
    let vol = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        vol.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    std::fs::write(vol.path().join("in"), "from the host\n").unwrap();
    let spec = format!("{}:/data", vol.path().display());
    let v = dk
        .cmd(&[
            "run",
            "--rm",
            "--network",
            "none",
            "--runtime",
            "moat-vm-flag",
            "-v",
            &spec,
            "moatbb",
            "sh",
            "-c",
            "cat /data/in; echo from the guest > /data/out",
        ])
        .expect_ok();
    assert_eq!(v.stdout, "from the host\n", "{v:?}");
    assert_eq!(
        std::fs::read_to_string(vol.path().join("out")).unwrap(),
        "from the guest\n"
    );
    let owner =
        std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(vol.path().join("out")).unwrap());
    assert_ne!(owner, 0, "the guest's root is not the host's");
    // On a bridge network (veth + address; no NAT: --iptables=false):
    // Docker's prestart hook puts the container's interface in the VMM
    // process's namespace, and the guest takes it over, so the address
    // Docker reports answers from the guest's kernel.
    dk.cmd(&["network", "create", "moatvmnet"]).expect_ok();
    dk.cmd(&[
        "run",
        "-d",
        "--name",
        "vmnet",
        "--runtime",
        "moat-vm-flag",
        "--network",
        "moatvmnet",
        "moatbb",
        "sh",
        "-c",
        GUEST_SERVER,
    ])
    .expect_ok();
    let ip = dk.inspect(
        "vmnet",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
    );
    assert!(!ip.is_empty(), "Docker gave the container an address");
    assert_guest_serves(&format!("http://{ip}:8000"));
    // A second microVM on its network (`--network container:vmnet`: the
    // namespace of vmnet's process, the VMM's, where the interface is):
    // vmnet's guest holds the interface, so this one reaches out through
    // moat's stack from vmnet's address.
    let gateway = dk.inspect(
        "vmnet",
        "{{range .NetworkSettings.Networks}}{{.Gateway}}{{end}}",
    );
    assert_reaches_gateway_from(&gateway, &ip, |script| {
        dk.cmd(&[
            "run",
            "--rm",
            "--runtime",
            "moat-vm-flag",
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
    dk.cmd(&["rm", "-f", "vmnet"]).expect_ok();
    dk.cmd(&["network", "rm", "moatvmnet"]).expect_ok();
    drop(dk);
}
