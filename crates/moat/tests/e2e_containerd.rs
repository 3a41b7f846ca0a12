//! containerd drives moat through its runc shim (io.containerd.runc.v2):
//! `ctr run --runc-binary moat`, `ctr task exec/pause/resume/metrics/ps/kill`,
//! and a containerd started with deploy/containerd/moat.toml, the CRI runtime
//! configuration Kubernetes uses.
mod engines;

use engines::{base_dir, can_run, moat_links, oci_archive, s, sh, wait_for, Daemon, Out, IMAGE};

const NS: &str = "moat-e2e";

struct Containerd {
    d: Daemon,
    sock: String,
}

impl Containerd {
    /// Starts containerd with its root, state and sockets under a private
    /// base, `extra` appended to the config, and imports the busybox image.
    fn start(base: tempfile::TempDir, extra: &str) -> Containerd {
        let p = |n: &str| s(&base.path().join(n));
        let sock = p("c.sock");
        let config = format!(
            "version = 2\nroot = \"{}\"\nstate = \"{}\"\n[grpc]\n  address = \"{sock}\"\n\
             [ttrpc]\n  address = \"{}\"\n{extra}",
            p("root"),
            p("state"),
            p("c.sock.ttrpc"),
        );
        let conf = p("config.toml");
        std::fs::write(&conf, config).unwrap();
        let mut d = Daemon::start(base, "containerd", &["--config".into(), conf]);
        let s2 = sock.clone();
        d.wait_ready(|| sh("ctr", &["-a", &s2, "version"], &[]).ok());
        // Tasks and containers first, so their shims exit.
        d.cleanup.push(
            [
                "sh",
                "-c",
                &format!(
                    "for c in $(ctr -a {sock} -n {NS} c ls -q); do \
                     ctr -a {sock} -n {NS} task kill -s KILL $c; sleep 0.2; \
                     ctr -a {sock} -n {NS} task rm -f $c; ctr -a {sock} -n {NS} c rm $c; done"
                ),
            ]
            .map(String::from)
            .to_vec(),
        );
        let c = Containerd { d, sock };
        let tar = oci_archive(c.d.path());
        c.ctr(&["image", "import", &s(&tar)]).expect_ok();
        c
    }

    fn ctr(&self, args: &[&str]) -> Out {
        let mut a = vec!["-a", self.sock.as_str(), "-n", NS];
        a.extend_from_slice(args);
        sh("ctr", &a, &[])
    }

    /// `ctr run --snapshotter native --runc-binary BIN --runc-root ROOT OPTS IMAGE ID CMD...`
    fn run(&self, bin: &str, opts: &[&str], id: &str, cmd: &[&str]) -> Out {
        let root = s(&self.d.path().join("runc"));
        let mut a = vec![
            "run",
            "--snapshotter",
            "native",
            "--runc-binary",
            bin,
            "--runc-root",
            &root,
        ];
        a.extend_from_slice(opts);
        a.push(IMAGE);
        a.push(id);
        a.extend_from_slice(cmd);
        self.ctr(&a)
    }

    fn task_status(&self, id: &str) -> String {
        let ls = self.ctr(&["task", "ls"]).expect_ok().stdout;
        ls.lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .and_then(|l| l.split_whitespace().nth(2))
            .unwrap_or("")
            .to_owned()
    }
}

#[test]
fn ctr_runs_moat_through_the_runc_shim() {
    if !can_run(
        "ctr_runs_moat_through_the_runc_shim",
        &["containerd", "ctr", "script"],
    ) {
        return;
    }
    let base = base_dir("moat-cd");
    let bin = moat_links(base.path());
    let moat = s(&bin.join("moat"));
    let c = Containerd::start(base, "");

    let out = c
        .run(&moat, &["--rm"], "t1", &["sh", "-c", "echo hello; id -u"])
        .expect_ok();
    assert_eq!(out.stdout, "hello\n0\n");
    assert_eq!(
        c.run(&moat, &["--rm"], "t2", &["sh", "-c", "exit 3"]).code,
        Some(3)
    );
    let tty = sh(
        "script",
        &["-qec", &format!("ctr -a {} -n {NS} run --rm -t --snapshotter native --runc-binary {moat} --runc-root {} {IMAGE} t3 tty", c.sock, s(&c.d.path().join("runc"))), "/dev/null"],
        &[],
    )
    .expect_ok();
    assert!(tty.stdout.contains("/dev/pts/"), "{tty:?}");

    c.run(&moat, &["-d"], "t4", &["sleep", "1000"]).expect_ok();
    wait_for("t4 running", || c.task_status("t4") == "RUNNING");
    let e = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        "t4",
        "sh",
        "-c",
        "echo in-exec; exit 5",
    ]);
    assert_eq!((e.code, e.stdout.as_str()), (Some(5), "in-exec\n"), "{e:?}");
    let eit = sh(
        "script",
        &[
            "-qec",
            &format!("ctr -a {} -n {NS} task exec -t --exec-id e2 t4 tty", c.sock),
            "/dev/null",
        ],
        &[],
    )
    .expect_ok();
    assert!(eit.stdout.contains("/dev/pts/"), "{eit:?}");

    c.ctr(&["task", "pause", "t4"]).expect_ok();
    assert_eq!(c.task_status("t4"), "PAUSED");
    c.ctr(&["task", "resume", "t4"]).expect_ok();
    assert_eq!(c.task_status("t4"), "RUNNING");

    let m = c.ctr(&["task", "metrics", "t4"]).expect_ok();
    assert!(m.stdout.contains("pids.current"), "{m:?}");
    let ps = c.ctr(&["task", "ps", "t4"]).expect_ok();
    assert_eq!(ps.stdout.lines().count(), 2, "one process: {ps:?}");

    c.ctr(&["task", "kill", "-s", "KILL", "t4"]).expect_ok();
    wait_for("t4 stopped", || c.task_status("t4") == "STOPPED");
    c.ctr(&["task", "rm", "t4"]).expect_ok();
    c.ctr(&["container", "rm", "t4"]).expect_ok();

    // The sandbox tier by program name.
    let sb = c
        .run(
            &s(&bin.join("moat-sandbox")),
            &["--rm"],
            "t5",
            &["echo", "in-sandbox"],
        )
        .expect_ok();
    assert_eq!(sb.stdout.trim(), "in-sandbox", "{sb:?}");
    // The microvm tier by program name.
    let vm = c
        .run(
            &s(&bin.join("moat-microvm")),
            &["--rm"],
            "t6",
            &["sh", "-c", "echo in-vm; uname -r"],
        )
        .expect_ok();
    // It ran on the guest's own kernel, not the host's.
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let lines: Vec<&str> = vm.stdout.lines().collect();
    assert_eq!(lines.first().map(|l| l.trim()), Some("in-vm"), "{vm:?}");
    assert!(
        lines.get(1).is_some_and(|k| k.trim() != host.trim()),
        "the guest's own kernel: {vm:?}"
    );
    let _ = c.ctr(&["container", "rm", "t6"]);
}

#[test]
fn containerd_loads_the_cri_runtimes_from_deploy() {
    if !can_run(
        "containerd_loads_the_cri_runtimes_from_deploy",
        &["containerd", "ctr"],
    ) {
        return;
    }
    let base = base_dir("moat-cri");
    let bin = moat_links(base.path());
    let deploy = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/containerd/moat.toml"
    ))
    .expect("deploy/containerd/moat.toml");
    let cri = deploy.replace("/usr/local/bin/", &format!("{}/", s(&bin)));
    let extra = format!(
        "[plugins.\"io.containerd.grpc.v1.cri\"]\n  disable_tcp_service = true\n\
         [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"native\"\n\
         [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n  \
         runtime_type = \"io.containerd.runc.v2\"\n{cri}"
    );
    let c = Containerd::start(base, &extra);
    let plugins = c.ctr(&["plugins", "ls"]).expect_ok().stdout;
    let cri = plugins.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.first() == Some(&"io.containerd.grpc.v1") && f.get(1) == Some(&"cri"))
            .then(|| f.last().copied().unwrap_or(""))
    });
    assert_eq!(cri, Some("ok"), "CRI plugin: {plugins}\n{}", c.d.log());
    let log = c.d.log();
    for (name, binary, annotations) in [
        ("moat", "moat", "dev.moat.isolation"),
        ("moat-sandbox", "moat-sandbox", "dev.moat.isolation"),
        (
            "moat-microvm",
            "moat-microvm",
            "dev.moat.isolation dev.moat.net.egress dev.moat.net.publish dev.moat.pod.volumes \
             dev.moat.microvm.reclaim-interval",
        ),
    ] {
        let want = format!(
            "{name}:{{Type:io.containerd.runc.v2 Path: Engine: PodAnnotations:[{annotations}]"
        );
        assert!(
            log.contains(&want),
            "runtime {name} in the CRI config: {log}"
        );
        let bn = format!("BinaryName:{}", s(&bin.join(binary)));
        assert!(log.contains(&bn), "{bn} in the CRI config: {log}");
    }
}
