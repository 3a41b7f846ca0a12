//! `moat run [OPTIONS] -- CMD`: the human front door on the embedded default
//! root. Each default is checked from inside the container.
mod common;

use std::fs;
use std::path::Path;

use common::{
    runtime_bin, signal_own, spawn_own, spawn_ready, wait_own, wait_ready, Opts, Out, Rt,
};

fn rt(test: &str) -> Option<Rt> {
    let rt = Rt::root_or_skip(test)?;
    if !rt.is_moat() {
        eprintln!("SKIP {test}: moat-only front door");
        return None;
    }
    Some(rt)
}

/// `moat run [flags] -- sh -c SCRIPT`.
fn sh(rt: &Rt, flags: &[&str], script: &str) -> Out {
    let mut args = vec!["run"];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["--", "sh", "-c", script]);
    rt.cmd(&args)
}

/// Nothing of the run is left in the state root: no container directory,
/// no bundle, no ID allocation (the allocator's lock file stays, and so do
/// the caches under `.cache`, which are not per run).
fn assert_clean(rt: &Rt) {
    let root = rt.root();
    let mut left: Vec<String> = Vec::new();
    for e in fs::read_dir(root).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        match name.as_str() {
            ".run" => left.extend(
                fs::read_dir(e.path())
                    .unwrap()
                    .flatten()
                    .map(|x| format!(".run/{}", x.file_name().to_string_lossy())),
            ),
            ".idalloc" => left.extend(
                fs::read_dir(e.path())
                    .unwrap()
                    .flatten()
                    .map(|x| x.file_name().to_string_lossy().into_owned())
                    .filter(|n| n != "lock")
                    .map(|n| format!(".idalloc/{n}")),
            ),
            ".cache" => {}
            _ => left.push(name),
        }
    }
    assert!(left.is_empty(), "left in the state root: {left:?}");
}

fn field<'a>(text: &'a str, key: &str) -> &'a str {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {key} in {text}"))
}

#[test]
fn defaults_hold_inside_the_container() {
    let Some(rt) = rt("defaults_hold_inside_the_container") else {
        return;
    };
    let out = sh(
        &rt,
        &[],
        "id -u; id -g; cat /proc/self/uid_map; cat /proc/self/gid_map; \
         grep -E 'Cap|NoNewPrivs|Seccomp:' /proc/self/status; ls /sys/class/net; \
         cat /sys/class/net/lo/flags; echo cwd=$(pwd) home=$HOME; \
         touch /usr/moat-x 2>/dev/null && echo usr-writable; \
         touch /moat-x 2>/dev/null && echo root-writable; \
         echo t > /tmp/t && echo tmp-ok; echo h > $HOME/h && echo home-ok; \
         for d in /root /var /run /home/moat /srv; do test -e $d && echo host-$d; done; \
         grep -E ' /(tmp|home/user|dev/shm) ' /proc/self/mounts; \
         ulimit -n; ulimit -c; ulimit -s; grep nobody /etc/passwd",
    )
    .expect_ok();
    let o = &out.stdout;
    let mut lines = o.lines();
    assert_eq!(lines.next(), Some("65534"), "{o}");
    assert_eq!(lines.next(), Some("65534"), "{o}");
    // Container 0..65536 maps to a block of the default pool.
    for _ in 0..2 {
        let map: Vec<u64> = lines
            .next()
            .unwrap()
            .split_whitespace()
            .map(|x| x.parse().unwrap())
            .collect();
        assert_eq!(map[0], 0, "{o}");
        assert!(map[1] >= 2_000_000_000, "{o}");
        assert_eq!((map[1] - 2_000_000_000) % 65536, 0, "{o}");
        assert_eq!(map[2], 65536, "{o}");
    }
    for set in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
        assert_eq!(field(o, set), "0000000000000000", "{o}");
    }
    assert_eq!(field(o, "NoNewPrivs:"), "1");
    assert_eq!(field(o, "Seccomp:"), "2");
    // Only lo, and it is up (IFF_UP|IFF_LOOPBACK|IFF_RUNNING = 0x49; UP bit set).
    let net: Vec<&str> = o
        .lines()
        .skip_while(|l| !l.starts_with("Seccomp"))
        .skip(1)
        .take(2)
        .collect();
    assert_eq!(net[0], "lo", "{o}");
    let flags = u32::from_str_radix(net[1].trim_start_matches("0x"), 16).unwrap();
    assert_eq!(flags & 1, 1, "lo is down: {o}");
    assert!(o.contains("cwd=/home/user home=/home/user"), "{o}");
    assert!(
        !o.contains("usr-writable") && !o.contains("root-writable"),
        "{o}"
    );
    assert!(o.contains("tmp-ok") && o.contains("home-ok"), "{o}");
    assert!(!o.contains("host-/"), "host directories visible: {o}");
    for m in ["/tmp", "/home/user", "/dev/shm"] {
        let line = o
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(m))
            .unwrap_or_else(|| panic!("no mount on {m}: {o}"));
        assert!(
            line.starts_with("tmpfs") || line.starts_with("shm"),
            "{line}"
        );
        assert!(
            line.contains("size=65536k") && line.contains("nosuid") && line.contains("nodev"),
            "{line}"
        );
    }
    assert!(o.contains("\n1024\n0\n8192\n"), "rlimits: {o}");
    assert!(o.contains("nobody:x:65534:65534:"), "{o}");
    assert_clean(&rt);
}

#[test]
fn cgroup_limits_are_set() {
    let Some(rt) = rt("cgroup_limits_are_set") else {
        return;
    };
    // Inside, the cgroup namespace shows the container's cgroups as "/".
    let out = sh(
        &rt,
        &[
            "-m",
            "64m",
            "--cpus",
            "0.5",
            "--pids-limit",
            "77",
            "--name",
            "lim",
        ],
        "cat /proc/self/cgroup | grep -c :/$",
    )
    .expect_ok();
    assert!(
        out.stdout.trim().parse::<u32>().unwrap() >= 1,
        "{}",
        out.stdout
    );
    // From the host: the running container's state gives its PID, whose
    // cgroups hold the limits.
    std::thread::scope(|sc| {
        let child = sc.spawn(|| {
            rt.cmd(&[
                "run",
                "-m",
                "64m",
                "--cpus",
                "0.5",
                "--pids-limit",
                "77",
                "--name",
                "lim2",
                "--",
                "sleep",
                "30",
            ])
        });
        let mut cg = None;
        for _ in 0..100 {
            let state = rt.cmd(&["state", "lim2"]);
            if state.ok() {
                let st = state.json();
                let pid = st["pid"].as_i64().unwrap_or(0);
                // Only once running is the process in its cgroups (the pid is
                // recorded as soon as it is forked).
                if pid > 0 && st["status"] == "running" {
                    cg = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok();
                    if cg.is_some() {
                        break;
                    }
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let cg = cg.expect("container lim2 never ran");
        let path = |ctl: &str| {
            cg.lines()
                .find_map(|l| {
                    let mut f = l.splitn(3, ':');
                    let _ = f.next();
                    let ctls = f.next()?;
                    let p = f.next()?;
                    ctls.split(',').any(|c| c == ctl).then(|| p.to_string())
                })
                .unwrap_or_else(|| panic!("no {ctl} in {cg}"))
        };
        let read = |ctl: &str, file: &str| {
            fs::read_to_string(
                Path::new("/sys/fs/cgroup")
                    .join(ctl)
                    .join(path(ctl).trim_start_matches('/'))
                    .join(file),
            )
            .unwrap_or_else(|e| panic!("{ctl}/{file}: {e}"))
            .trim()
            .to_string()
        };
        assert_eq!(
            read("memory", "memory.limit_in_bytes"),
            (64u64 << 20).to_string()
        );
        assert_eq!(
            read("memory", "memory.memsw.limit_in_bytes"),
            (64u64 << 20).to_string()
        );
        assert_eq!(read("cpu", "cpu.cfs_quota_us"), "50000");
        assert_eq!(read("cpu", "cpu.cfs_period_us"), "100000");
        assert_eq!(read("pids", "pids.max"), "77");
        rt.cmd(&["kill", "lim2", "KILL"]).expect_ok();
        assert_eq!(child.join().unwrap().code, Some(137));
    });
    assert_clean(&rt);
}

#[test]
fn dangerous_syscalls_are_refused() {
    let Some(rt) = rt("dangerous_syscalls_are_refused") else {
        return;
    };
    // Namespaces (unshare), mounts, ptrace-class and io_uring-class calls.
    let out = sh(
        &rt,
        &[],
        "unshare -U true 2>/dev/null; echo unshare=$?; \
         unshare -n true 2>/dev/null; echo unshare-net=$?; \
         mount -t tmpfs none /tmp 2>/dev/null; echo mount=$?; \
         python3 -c 'import ctypes,os; l=ctypes.CDLL(None,use_errno=True); \
r=l.syscall(425,8,ctypes.byref(ctypes.create_string_buffer(120))); print(\"io_uring\",r,ctypes.get_errno()); \
r=l.syscall(323,0); print(\"userfaultfd\",r,ctypes.get_errno()); \
r=l.syscall(321,0,0,0); print(\"bpf\",r,ctypes.get_errno()); \
r=l.syscall(435,0,0); print(\"clone3\",r,ctypes.get_errno()); \
r=l.syscall(56,0x10000000|17,0,0,0,0); print(\"clone-newuser\",r,ctypes.get_errno()); \
r=l.syscall(135,0x0040000); print(\"personality\",r,ctypes.get_errno()); \
r=l.syscall(101,16,1,0,0); print(\"ptrace\",r,ctypes.get_errno()); \
r=l.syscall(41,40,1,0); print(\"socket-vsock\",r,ctypes.get_errno()); \
r=l.syscall(41,38,5,0); print(\"socket-alg\",r,ctypes.get_errno()); \
r=l.syscall(41,4096,1,0); print(\"socket-beyond\",r,ctypes.get_errno()); \
r=l.syscall(41,1,1,0); print(\"socket-unix\",r>=0); \
r=l.syscall(41,2,2,0); print(\"socket-inet\",r>=0); \
r=l.syscall(41,16,2,0); print(\"socket-netlink\",r>=0)'",
    )
    .expect_ok();
    let o = &out.stdout;
    assert!(o.contains("unshare=1"), "{o}");
    assert!(o.contains("unshare-net=1"), "{o}");
    assert!(!o.contains("mount=0"), "{o}");
    for ok in [
        "socket-unix True",
        "socket-inet True",
        "socket-netlink True",
    ] {
        assert!(o.contains(ok), "{ok}: {o}");
    }
    for (name, errno) in [
        ("io_uring", 1),
        ("userfaultfd", 1),
        ("bpf", 1),
        ("clone3", 38),
        ("clone-newuser", 1),
        // Not in the allow-list's values: the default ENOSYS.
        ("personality", 38),
        ("ptrace", 1),
        // Socket families outside unix, inet, inet6, netlink, packet.
        ("socket-vsock", 97),
        ("socket-alg", 97),
        ("socket-beyond", 97),
    ] {
        assert!(
            o.contains(&format!("{name} -1 {errno}\n")),
            "{name} should fail with errno {errno}: {o}"
        );
    }
    // Ordinary threads and processes still work (clone without namespace flags).
    let out = sh(
        &rt,
        &[],
        "python3 -c 'import threading,subprocess; t=threading.Thread(target=print,args=(\"thread\",)); t.start(); t.join(); subprocess.run([\"echo\",\"child\"])'",
    )
    .expect_ok();
    assert!(
        out.stdout.contains("thread") && out.stdout.contains("child"),
        "{}",
        out.stdout
    );
    assert_clean(&rt);
}

#[test]
fn oom_kill_is_reported() {
    let Some(rt) = rt("oom_kill_is_reported") else {
        return;
    };
    let json = rt.scratch_file("result.json");
    let arg = format!("--json={}", json.display());
    let out = sh(
        &rt,
        &["-m", "32m", &arg],
        "x=$(head -c 100000000 /dev/zero | tr '\\0' a); echo survived",
    );
    assert_eq!(out.code, Some(137), "{out:?}");
    assert!(!out.stdout.contains("survived"));
    assert!(
        out.stderr.contains("killed: out of memory (limit 32 MiB)"),
        "{}",
        out.stderr
    );
    let rec: serde_json::Value = serde_json::from_str(&fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(rec["oom_killed"], true, "{rec}");
    assert_eq!(rec["signal"], 9, "{rec}");
    assert!(
        rec["peak_memory_bytes"].as_u64().unwrap() > 16 << 20,
        "{rec}"
    );
    assert_clean(&rt);
}

#[test]
fn an_oom_after_an_update_names_the_limit_in_effect() {
    let Some(rt) = rt("an_oom_after_an_update_names_the_limit_in_effect") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    let json = dir.path().join("result.json");
    // Started with 256 MiB: the 100 MB string fits; it is made only once
    // the limit is 32 MiB.
    let mut child = spawn_own(
        rt.command()
            .args(["run", "-m", "256m", "--name", "upd"])
            .arg(format!("--json={}", json.display()))
            .args(["--", "sh", "-c"])
            .arg(
                "echo ready; while [ ! -e /tmp/go ]; do sleep 0.1; done; \
                 x=$(head -c 100000000 /dev/zero | tr '\\0' a); echo survived",
            )
            .stdout(fs::File::create(&out).unwrap())
            .stderr(fs::File::create(&err).unwrap()),
    );
    wait_ready(&out, std::time::Duration::from_secs(30));
    rt.cmd(&["update", "--memory", "32m", "upd"]).expect_ok();
    rt.cmd(&["exec", "upd", "touch", "/tmp/go"]).expect_ok();
    let status = wait_own(&mut child);
    assert_eq!(status.code(), Some(137), "{status:?}");
    let err = fs::read_to_string(&err).unwrap();
    assert!(
        err.contains("killed: out of memory (limit 32 MiB)"),
        "{err}"
    );
    assert!(!fs::read_to_string(&out).unwrap().contains("survived"));
    let rec: serde_json::Value = serde_json::from_str(&fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(rec["memory_limit_bytes"], 32 << 20, "{rec}");
    assert_eq!(rec["oom_killed"], true, "{rec}");
    assert_clean(&rt);
}

#[test]
fn annotations_reach_the_config_and_moat_runs_own_are_refused() {
    let Some(rt) = rt("annotations_reach_the_config_and_moat_runs_own_are_refused") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut child = spawn_ready(
        rt.command()
            .args(["run", "--name", "ann"])
            .args(["--annotation", "org.example.team=storage"])
            .args(["--annotation", "org.example.empty="])
            .args(["--", "sh", "-c", "echo ready; read x; exit 0"])
            .stdin(std::process::Stdio::piped()),
        &out,
        std::time::Duration::from_secs(30),
    );
    let st: serde_json::Value =
        serde_json::from_str(&rt.cmd(&["state", "ann"]).expect_ok().stdout).unwrap();
    assert_eq!(st["annotations"]["org.example.team"], "storage", "{st}");
    assert_eq!(st["annotations"]["org.example.empty"], "", "{st}");
    // moat run's own keys stay its own.
    assert!(st["annotations"]["dev.moat.run.owner"].is_string(), "{st}");
    drop(child.stdin.take());
    assert!(wait_own(&mut child).success());
    for (a, want) in [
        ("dev.moat.isolation=sandbox", "from --isolation"),
        ("dev.moat.net.egress=*", "from --net"),
        ("dev.moat.run.owner=1", "sets it itself"),
        ("novalue", "expected KEY=VALUE"),
        ("=v", "expected KEY=VALUE"),
    ] {
        let o = rt
            .cmd(&["run", "--annotation", a, "--", "true"])
            .expect_fail();
        assert!(o.stderr.contains(want), "{a}: {o:?}");
        assert_eq!(o.stderr.trim().lines().count(), 1, "{a}: {o:?}");
    }
    assert_clean(&rt);
}

#[test]
fn exit_status_env_workdir_user_and_json() {
    let Some(rt) = rt("exit_status_env_workdir_user_and_json") else {
        return;
    };
    let out = sh(&rt, &[], "exit 42");
    assert_eq!(out.code, Some(42));
    let out = sh(
        &rt,
        &[
            "-e",
            "FOO=bar baz",
            "-w",
            "/tmp",
            "-u",
            "1000:1001",
            "--hostname",
            "box",
            "--json",
        ],
        "echo \"$FOO|$(pwd)|$(id -u):$(id -g)|$(hostname)\"",
    )
    .expect_ok();
    assert_eq!(out.stdout.trim(), "bar baz|/tmp|1000:1001|box");
    let rec: serde_json::Value =
        serde_json::from_str(out.stderr.trim().lines().last().unwrap()).unwrap();
    assert_eq!(rec["exit_code"], 0, "{rec}");
    assert_eq!(rec["oom_killed"], false);
    assert!(rec["cpu_time_s"].as_f64().is_some(), "{rec}");
    // stdin passes through.
    let out = rt
        .cmd_with(
            &["run", "--", "tr", "a-z", "A-Z"],
            Opts {
                stdin: Some(b"hello\n".to_vec()),
                ..Opts::default()
            },
        )
        .expect_ok();
    assert_eq!(out.stdout, "HELLO\n");
    // Timeout kills.
    let out = rt.cmd(&["run", "--timeout", "1", "--", "sleep", "30"]);
    assert_eq!(out.code, Some(137), "{out:?}");
    assert!(out.stderr.contains("killed: timeout"), "{}", out.stderr);
    // A tier moat does not have is refused clearly (the microvm tier's
    // runs are e2e_microvm's).
    let out = rt
        .cmd(&["run", "--isolation", "vm", "--", "true"])
        .expect_fail();
    assert!(
        out.stderr.contains("unknown isolation tier"),
        "{}",
        out.stderr
    );
    assert_clean(&rt);
}

#[test]
fn volumes_read_only_and_read_write() {
    let Some(rt) = rt("volumes_read_only_and_read_write") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
    fs::write(dir.path().join("in.txt"), "from host\n").unwrap();
    fs::set_permissions(dir.path().join("in.txt"), fs::Permissions::from_mode(0o644)).unwrap();
    let ro = format!("{}:/data:ro", dir.path().display());
    let out = sh(
        &rt,
        &["-v", &ro],
        "cat /data/in.txt; touch /data/new 2>/dev/null && echo wrote; true",
    )
    .expect_ok();
    assert_eq!(out.stdout, "from host\n");
    let rw = format!("{}:/tmp/data", dir.path().display());
    sh(&rt, &["-v", &rw], "echo back > /tmp/data/out.txt").expect_ok();
    assert_eq!(
        fs::read_to_string(dir.path().join("out.txt")).unwrap(),
        "back\n"
    );
    // Written by the container's user: a host ID of its own range.
    use std::os::unix::fs::MetadataExt;
    let uid = fs::metadata(dir.path().join("out.txt")).unwrap().uid();
    assert!(uid >= 2_000_000_000, "owner {uid}");
    assert_clean(&rt);
}

#[test]
fn net_host_shares_the_host_network() {
    let Some(rt) = rt("net_host_shares_the_host_network") else {
        return;
    };
    let out = sh(&rt, &["--net", "host"], "cat /proc/net/dev | wc -l").expect_ok();
    let host = fs::read_to_string("/proc/net/dev").unwrap().lines().count();
    assert_eq!(out.stdout.trim(), host.to_string());
    assert!(out.stderr.contains("warning: --net host"), "{}", out.stderr);
    assert_clean(&rt);
}

#[test]
fn concurrent_runs_get_distinct_id_ranges() {
    let Some(rt) = rt("concurrent_runs_get_distinct_id_ranges") else {
        return;
    };
    let outs: Vec<Out> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..20)
            .map(|_| sc.spawn(|| sh(&rt, &[], "cat /proc/self/uid_map; sleep 1")))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut starts = std::collections::BTreeSet::new();
    for out in outs {
        let out = out.expect_ok();
        let start: u64 = out
            .stdout
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        starts.insert(start);
    }
    assert_eq!(starts.len(), 20, "shared ranges: {starts:?}");
    assert_clean(&rt);
}

#[test]
fn oci_run_still_works_with_a_bundle() {
    let Some(rt) = rt("oci_run_still_works_with_a_bundle") else {
        return;
    };
    let mut bundle = common::Bundle::new(&["sh", "-c", "echo oci"]);
    bundle.set("/process/terminal", serde_json::json!(false));
    bundle.write_config();
    let id = rt.new_id("oci");
    let b = bundle.dir().display().to_string();
    let out = rt.cmd(&["run", "-b", &b, &id]).expect_ok();
    assert_eq!(out.stdout, "oci\n");
}

#[test]
fn spec_hardened_writes_the_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let b = dir.path().display().to_string();
    let out = common::run_binary(
        &common::runtime_bin(),
        &["spec".into(), "--hardened".into(), "-b".into(), b],
        Opts::default(),
        &dir.path().join("o"),
        &dir.path().join("e"),
    );
    if !common::runtime_is_moat() {
        return;
    }
    out.expect_ok();
    let v: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
    assert_eq!(v["root"]["path"], "rootfs");
    assert_eq!(v["process"]["user"]["uid"], 65534);
    assert_eq!(v["linux"]["seccomp"]["defaultAction"], "SCMP_ACT_ERRNO");
    assert_eq!(
        v["process"]["capabilities"]["bounding"],
        serde_json::json!([])
    );
    // And the bundle runs, as root, on a busybox rootfs with the mount
    // points: every default holds (user namespace, no caps, Landlock).
    let Some(rt) = rt("spec_hardened_writes_the_defaults") else {
        return;
    };
    let root = dir.path().join("rootfs");
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", root.join("bin/sh")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let mut v = v;
    v["process"]["args"] = serde_json::json!([
        "/bin/busybox",
        "sh",
        "-c",
        "/bin/busybox id -u; /bin/busybox grep CapEff /proc/self/status; \
         /bin/busybox touch /dev/x 2>/dev/null || echo dev-refused; \
         echo t > /tmp/t && echo tmp-ok; echo home=$HOME"
    ]);
    // Host IDs outside every test's pool (the spec maps the pool's first
    // block, which a parallel test's allocator may hand out).
    for m in ["uidMappings", "gidMappings"] {
        v["linux"][m][0]["hostID"] = serde_json::json!(3_950_000_000u32);
    }
    fs::write(dir.path().join("config.json"), v.to_string()).unwrap();
    let id = rt.new_id("hardened");
    let out = rt
        .cmd(&["run", "-b", dir.path().to_str().unwrap(), &id])
        .expect_ok();
    let o = &out.stdout;
    assert!(
        o.starts_with(
            "65534
"
        ),
        "{o}"
    );
    assert!(o.contains("CapEff:\t0000000000000000"), "{o}");
    assert!(o.contains("dev-refused") && o.contains("tmp-ok"), "{o}");
    assert!(o.contains("home=/tmp"), "{o}");
}

/// A fork bomb stays inside: the pids limit refuses forks, moat reports it,
/// and `--timeout` ends the container; the host's process count is unharmed.
#[test]
fn fork_bomb_is_contained_and_reported() {
    let Some(rt) = rt("fork_bomb_is_contained_and_reported") else {
        return;
    };
    let host_before = fs::read_dir("/proc")
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        })
        .count();
    let out = sh(
        &rt,
        &["--pids-limit", "32", "--timeout", "3", "--json"],
        // PID 1 must outlive the bomb without forking again (a refused
        // fork of `sleep` would end the shell, and the namespace with it).
        "bomb(){ bomb | bomb & }; bomb; exec sleep 30",
    );
    assert_eq!(out.code, Some(137), "{out:?}");
    assert!(
        out.stderr.contains("process limit (32) reached"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("killed: timeout"), "{}", out.stderr);
    let rec = out
        .stderr
        .lines()
        .find(|l| l.starts_with('{'))
        .expect("json record");
    let v: serde_json::Value = serde_json::from_str(rec).unwrap();
    assert!(v["pids_limit_hits"].as_u64().unwrap_or(0) > 0, "{rec}");
    let host_after = fs::read_dir("/proc")
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        })
        .count();
    assert!(
        host_after < host_before + 40,
        "{host_before} -> {host_after}"
    );
    assert_clean(&rt);
}

#[test]
fn landlock_confines_writes_to_the_writable_mounts() {
    let Some(rt) = rt("landlock_confines_writes_to_the_writable_mounts") else {
        return;
    };
    // As the container's root: DAC lets it create files in its own /dev
    // tmpfs, and mknod fails the capability check (EPERM) without a ruleset;
    // Landlock refuses both first (EACCES). /tmp and $HOME stay writable.
    let out = sh(
        &rt,
        &["-u", "0"],
        "stat -c 'dev-owner=%u' /dev; touch /dev/new; mknod /tmp/null c 1 3; \
         mkdir /tmp/d && echo x > /tmp/d/f && cp /bin/true /tmp/d/t && /tmp/d/t && echo tmp-ok; \
         echo h > $HOME/h && echo home-ok; true",
    )
    .expect_ok();
    assert!(out.stdout.contains("dev-owner=0"), "{out:?}");
    assert!(out.stdout.contains("tmp-ok"), "{out:?}");
    assert!(out.stdout.contains("home-ok"), "{out:?}");
    assert!(
        out.stderr.contains("touch: /dev/new: Permission denied")
            || out
                .stderr
                .contains("cannot touch '/dev/new': Permission denied"),
        "{out:?}"
    );
    assert!(
        out.stderr.contains("Permission denied") && !out.stderr.contains("not permitted"),
        "mknod must be refused by Landlock (EACCES), not the capability check: {out:?}"
    );
    // A read-write volume is writable; the host binds are read-only anyway.
    let dir = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
    let rw = format!("{}:/data", dir.path().display());
    sh(&rt, &["-v", &rw], "echo v > /data/v").expect_ok();
    assert_eq!(fs::read_to_string(dir.path().join("v")).unwrap(), "v\n");
    assert_clean(&rt);
}

#[test]
fn landlock_lets_the_workload_reopen_its_own_stdout() {
    let Some(rt) = rt("landlock_lets_the_workload_reopen_its_own_stdout") else {
        return;
    };
    // stdout is a host file outside the container's tree: `> /dev/stdout`
    // reopens it through /proc/self/fd/1, which the stdio rule allows.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out");
    let file = fs::File::create(&path).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).unwrap();
    let mut child = spawn_own(
        rt.command()
            .args(["run", "--", "sh", "-c", "echo reopened > /dev/stdout"])
            .stdout(file),
    );
    let status = wait_own(&mut child);
    assert!(status.success(), "{status:?}");
    assert_eq!(fs::read_to_string(&path).unwrap(), "reopened\n");
    assert_clean(&rt);
}

/// Starts `moat run -- sh -c SCRIPT` with stdout to a file; returns the
/// child once SCRIPT has printed "ready".
fn run_until_ready(rt: &Rt, script: &str, out: &Path) -> std::process::Child {
    spawn_run(rt, &[], script, out)
}

#[test]
fn sigint_and_sigterm_reach_the_workload() {
    let Some(rt) = rt("sigint_and_sigterm_reach_the_workload") else {
        return;
    };
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    // The workload is PID 1 of its namespace: it sees a signal only through
    // a handler, so it traps each one and exits with a status of its own.
    for (sig, code) in [(Signal::SIGTERM, 7), (Signal::SIGINT, 8)] {
        let name = format!("{sig:?}").trim_start_matches("SIG").to_string();
        let script = format!(
            "trap 'echo got-{name}; exit {code}' {name}; echo ready; while :; do sleep 0.05; done"
        );
        let mut child = run_until_ready(&rt, &script, &out);
        kill(Pid::from_raw(child.id() as i32), sig).unwrap();
        let status = wait_own(&mut child);
        assert_eq!(status.code(), Some(code), "{sig:?}: {status:?}");
        assert!(
            fs::read_to_string(&out)
                .unwrap()
                .contains(&format!("got-{name}")),
            "{sig:?}"
        );
    }
    // moat blocks what it forwards; the workload starts with nothing blocked.
    let blk = sh(&rt, &[], "grep SigBlk /proc/self/status").expect_ok();
    assert!(blk.stdout.contains("0000000000000000"), "{blk:?}");
    // A workload that ignores SIGTERM: the second one kills the container.
    let mut child = run_until_ready(&rt, "trap '' TERM; echo ready; sleep 600", &out);
    let pid = Pid::from_raw(child.id() as i32);
    kill(pid, Signal::SIGTERM).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(
        child.try_wait().unwrap().is_none(),
        "one SIGTERM was ignored"
    );
    kill(pid, Signal::SIGTERM).unwrap();
    let status = wait_own(&mut child);
    assert_eq!(status.code(), Some(137), "{status:?} {:?}", status.signal());
    assert_clean(&rt);
}

#[test]
fn tty_gets_the_window_size() {
    let Some(rt) = rt("tty_gets_the_window_size") else {
        return;
    };
    if !Path::new("/usr/bin/script").exists() {
        moat_core::testing::skip("tty_gets_the_window_size", "no script(1)");
        return;
    }
    // script(1) gives moat a terminal; its size is set on that terminal and
    // must be what the workload's own pty reports.
    let moat = format!("{} --root {}", runtime_bin().display(), rt.root().display());
    let inner = format!("stty rows 33 cols 77; {moat} run -t -- stty size");
    let out = rt_script(&rt, &inner);
    assert!(out.contains("33 77"), "{out}");
    // --timeout holds with a terminal too.
    let out = rt_script(
        &rt,
        &format!("{moat} run -t --timeout 1 -- sleep 30; echo rc=$?"),
    );
    assert!(
        out.contains("killed: timeout") && out.contains("rc=137"),
        "{out}"
    );
    assert_clean(&rt);
}

/// Runs `sh -c CMD` under script(1) (a pty); its output.
fn rt_script(rt: &Rt, cmd: &str) -> String {
    let mut child = spawn_own(
        std::process::Command::new("script")
            .envs(rt.env().iter().map(|(k, v)| (k, v)))
            .args(["-qec", cmd, "/dev/null"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped()),
    );
    let mut text = String::new();
    use std::io::Read;
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    let status = wait_own(&mut child);
    assert!(status.success(), "script: {status:?}: {text}");
    text
}

/// Starts `moat run FLAGS -- sh -c 'echo ready; sleep 600'` in state root
/// `root` with stdout to `out`; returns once the workload is up.
fn start_sleeper(rt: &Rt, flags: &[&str], out: &Path) -> std::process::Child {
    spawn_run(rt, flags, "echo ready; exec sleep 600", out)
}

/// Starts `moat run FLAGS -- sh -c SCRIPT` with stdout to `out`; returns
/// once SCRIPT has printed "ready".
fn spawn_run(rt: &Rt, flags: &[&str], script: &str, out: &Path) -> std::process::Child {
    spawn_ready(
        rt.command()
            .arg("run")
            .args(flags)
            .args(["--", "sh", "-c", script]),
        out,
        std::time::Duration::from_secs(30),
    )
}

/// Stops a sleeper: the workload (PID 1) ignores one SIGTERM, the second
/// makes moat kill the container.
fn stop_sleeper(mut child: std::process::Child) {
    use nix::sys::signal::{kill, Signal};
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    // Two SIGTERMs sent back to back may merge into one pending signal:
    // repeat until moat has ended the run.
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(start.elapsed().as_secs() < 30, "moat run did not stop");
        let _ = kill(pid, Signal::SIGTERM);
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    wait_own(&mut child);
}

#[test]
fn audit_sees_what_flags_loosen() {
    let Some(rt) = rt("audit_sees_what_flags_loosen") else {
        return;
    };
    let audit = || {
        rt.cmd(&[
            "audit",
            "--running",
            "--format",
            "json",
            "--fail-on",
            "medium",
        ])
    };
    let ids = |o: &Out| -> Vec<(String, String)> {
        let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
        v["findings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                (
                    f["id"].as_str().unwrap().to_string(),
                    f["severity"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let dir = tempfile::tempdir().unwrap();
    // The defaults: nothing above low (the read-only host system files of
    // the embedded default are reported as low).
    let c = start_sleeper(&rt, &[], &dir.path().join("o1"));
    let o = audit();
    stop_sleeper(c);
    let found = ids(&o);
    assert!(
        found.iter().all(|(_, sev)| sev == "low"),
        "defaults: {found:?}"
    );
    assert_eq!(o.code, Some(0), "{o:?}");
    // Each loosening flag shows up.
    let c = start_sleeper(
        &rt,
        &["--net", "host", "--cap-add", "NET_RAW", "--read-write"],
        &dir.path().join("o2"),
    );
    let o = audit();
    stop_sleeper(c);
    let found = ids(&o);
    for want in ["host-network", "cap-net-raw", "writable-rootfs"] {
        assert!(found.iter().any(|(id, _)| id == want), "{want}: {found:?}");
    }
    assert_eq!(o.code, Some(1), "{o:?}");
    assert_clean(&rt);
}

#[test]
fn cap_add_takes_dockers_names() {
    let Some(rt) = rt("cap_add_takes_dockers_names") else {
        return;
    };
    // NET_RAW is bit 13, CHOWN bit 0: in every set of the workload.
    for (flag, mask) in [
        ("NET_RAW", 1u64 << 13),
        ("cap_chown", 1),
        ("CAP_NET_RAW", 1 << 13),
    ] {
        let out = sh(&rt, &["--cap-add", flag], "grep CapEff /proc/self/status").expect_ok();
        let hex = out.stdout.split_whitespace().last().unwrap();
        assert_eq!(
            u64::from_str_radix(hex, 16).unwrap(),
            mask,
            "{flag}: {out:?}"
        );
    }
    let o = sh(&rt, &["--cap-add", "NOT_A_CAP"], "true");
    assert_eq!(o.code, Some(125), "{o:?}");
    assert!(o.stderr.contains("unknown capability"), "{o:?}");
    assert_clean(&rt);
}

#[test]
fn unrunnable_programs_exit_like_a_shell() {
    let Some(rt) = rt("unrunnable_programs_exit_like_a_shell") else {
        return;
    };
    // 127: not found; 126: found but not executable; 125: moat's own error.
    // Worded as runc words them (Go's), which engines read the status from.
    for (cmd, status, says) in [
        ("/nonexistent", 127, "no such file or directory"),
        (
            "no-such-command",
            127,
            "\"no-such-command\": executable file not found in $PATH",
        ),
        ("/etc/hosts", 126, "exec format error"),
        ("/tmp", 126, "permission denied"),
    ] {
        let o = rt.cmd(&["run", "--", cmd]);
        assert_eq!(o.code, Some(status), "{cmd}: {o:?}");
        assert_eq!(o.stderr.lines().count(), 1, "{cmd}: one line: {o:?}");
        assert!(o.stderr.contains(says), "{cmd}: {o:?}");
    }
    let o = rt.cmd(&["run", "-v", "/no/such/dir:/x", "--", "true"]);
    assert_eq!(o.code, Some(125), "{o:?}");
    // A word before `--` is an image (`IMAGE -- CMD`): one that is none is
    // moat's error, not a program run with `--` (it was "executable
    // \"nosuchimage\" not found in $PATH", exit 127).
    for (word, says) in [
        ("nosuchimage", "does not exist"),
        ("/etc/hosts", "is not an image archive"),
        ("/dev/null", "is neither a directory nor an archive"),
    ] {
        let o = rt.cmd(&["run", word, "--", "true"]);
        assert_eq!(o.code, Some(125), "{word}: {o:?}");
        assert_eq!(o.stderr.lines().count(), 1, "{word}: one line: {o:?}");
        assert!(
            o.stderr.contains(&format!("image {word:?} {says}")),
            "{word}: {o:?}"
        );
    }
    assert_clean(&rt);
}

#[test]
fn env_from_moats_environment_and_user_names() {
    let Some(rt) = rt("env_from_moats_environment_and_user_names") else {
        return;
    };
    // `-e KEY` takes moat's own value (common::Rt passes its environment
    // through), and is dropped when moat has none.
    let path = std::env::var("PATH").unwrap();
    let out = sh(
        &rt,
        &["-e", "PATH", "-e", "MOAT_SURELY_UNSET_VAR"],
        "echo \"P=$PATH\"; echo \"U=${MOAT_SURELY_UNSET_VAR-unset}\"",
    )
    .expect_ok();
    assert!(out.stdout.contains(&format!("P={path}")), "{out:?}");
    assert!(out.stdout.contains("U=unset"), "{out:?}");
    // Names of the embedded default's accounts.
    for (user, want) in [
        ("nobody", "uid=65534 gid=65534"),
        ("root", "uid=0 gid=0"),
        ("root:nogroup", "uid=0 gid=65534"),
        ("1000:nogroup", "uid=1000 gid=65534"),
    ] {
        let out = sh(&rt, &["-u", user], "echo uid=$(id -u) gid=$(id -g)").expect_ok();
        assert_eq!(out.stdout.trim(), want, "{user}");
    }
    let o = sh(&rt, &["-u", "alice"], "true");
    assert_eq!(o.code, Some(125), "{o:?}");
    assert!(o.stderr.contains("root and nobody"), "{o:?}");
    assert_clean(&rt);
}

#[test]
fn a_killed_moat_run_leaves_no_container() {
    let Some(rt) = rt("a_killed_moat_run_leaves_no_container") else {
        return;
    };
    use nix::sys::signal::{kill, Signal};
    let dir = tempfile::tempdir().unwrap();
    let mut child = start_sleeper(&rt, &[], &dir.path().join("o"));
    let list = rt.cmd(&["list", "--format", "json"]).expect_ok().json();
    let pid = list[0]["pid"].as_i64().unwrap() as i32;
    assert!(pid > 0, "{list}");
    kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        Signal::SIGKILL,
    )
    .unwrap();
    wait_own(&mut child);
    // The workload dies with its runtime (parent-death signal).
    let start = std::time::Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(
            start.elapsed().as_secs() < 10,
            "workload {pid} outlived moat"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // The next run removes what the killed one left (state, cgroups).
    let o = sh(&rt, &[], "true").expect_ok();
    assert!(
        o.stderr.contains("left by a moat run that was killed"),
        "{o:?}"
    );
    assert_clean(&rt);
    // So does `moat delete` of it: its run directory and its host ID block
    // too (they used to wait for the next `moat run`).
    let mut child = spawn_run(
        &rt,
        &["--name", "killed"],
        "echo ready; exec sleep 600",
        &dir.path().join("o2"),
    );
    signal_own(&mut child, Signal::SIGKILL);
    rt.cmd(&["delete", "--force", "killed"]).expect_ok();
    assert_clean(&rt);
}

#[test]
fn kernel_paths_are_masked_or_read_only() {
    let Some(rt) = rt("kernel_paths_are_masked_or_read_only") else {
        return;
    };
    let out = sh(
        &rt,
        &["-u", "0"],
        "for f in /proc/kcore /proc/keys /proc/timer_list /proc/interrupts; do \
           echo $f=$(cat $f 2>/dev/null | wc -c); done; \
         echo firmware=$(ls /sys/firmware 2>/dev/null | wc -l); \
         echo 1 > /proc/sys/kernel/domainname 2>/dev/null && echo sys-writable; \
         echo 1 > /proc/sysrq-trigger 2>/dev/null && echo sysrq-writable; true",
    )
    .expect_ok();
    let o = &out.stdout;
    for f in [
        "/proc/kcore",
        "/proc/keys",
        "/proc/timer_list",
        "/proc/interrupts",
    ] {
        assert!(o.contains(&format!("{f}=0\n")), "{f} is masked: {o}");
    }
    assert!(o.contains("firmware=0"), "{o}");
    assert!(!o.contains("writable"), "{o}");
    assert_clean(&rt);
}

/// Issue #14, 7: a volume from a private (0700) directory of root, as `-v
/// /root/data:/data`: moat (root) opens it; the container's host IDs never
/// traverse the directory above it.
#[test]
fn volumes_from_private_directories() {
    let Some(rt) = rt("volumes_from_private_directories") else {
        return;
    };
    use std::os::unix::fs::PermissionsExt;
    let private = tempfile::tempdir().unwrap();
    fs::set_permissions(private.path(), fs::Permissions::from_mode(0o700)).unwrap();
    let data = private.path().join("data");
    fs::create_dir(&data).unwrap();
    fs::set_permissions(&data, fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(data.join("in.txt"), "private volume\n").unwrap();
    fs::set_permissions(data.join("in.txt"), fs::Permissions::from_mode(0o644)).unwrap();
    let file = private.path().join("one.txt");
    fs::write(&file, "a single file\n").unwrap();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
    let v1 = format!("{}:/data:ro", data.display());
    let v2 = format!("{}:/etc/one.txt:ro", file.display());
    let out = sh(
        &rt,
        &["-v", &v1, "-v", &v2],
        "cat /data/in.txt /etc/one.txt",
    );
    assert!(out.ok(), "{out:?}");
    assert_eq!(out.stdout, "private volume\na single file\n");
    assert_clean(&rt);
}

/// Issue #14, 8: the /etc files ordinary programs read are there (services
/// for getservbyname, protocols, os-release, …) and the secret ones are
/// not (shadow, gshadow, sudoers, ssh host keys, TLS private keys,
/// machine-id).
#[test]
fn etc_has_what_programs_read_and_no_secrets() {
    let Some(rt) = rt("etc_has_what_programs_read_and_no_secrets") else {
        return;
    };
    let out = sh(
        &rt,
        &[],
        "getent services http; getent protocols tcp; grep -c . /etc/os-release; \
         for f in /etc/shadow /etc/gshadow /etc/sudoers /etc/sudoers.d /etc/ssh \
                  /etc/ssl/private /etc/machine-id /etc/subuid /etc/fstab; do \
           test -e $f && echo LEAK $f; done; true",
    )
    .expect_ok();
    let o = &out.stdout;
    assert!(
        o.lines()
            .any(|l| l.starts_with("http") && l.contains("80/tcp")),
        "getservbyname(http): {o}"
    );
    assert!(
        o.lines().any(|l| l.starts_with("tcp") && l.contains('6')),
        "getprotobyname(tcp): {o}"
    );
    assert!(!o.contains("LEAK"), "{o}");
    // Every file the list names and the host has, the container shows.
    let names: Vec<&str> = moat_core::embedded::HOST_ETC
        .iter()
        .copied()
        .filter(|n| !n.contains('*') && fs::metadata(Path::new("/etc").join(n)).is_ok())
        .collect();
    assert!(names.contains(&"services"), "{names:?}");
    let check = format!(
        "for f in {}; do test -e /etc/$f || echo MISSING $f; done; true",
        names.join(" ")
    );
    let got = sh(&rt, &[], &check).expect_ok();
    assert_eq!(got.stdout, "", "{names:?}");
}

/// Issue 15, defect 9: `--read-write` on the embedded default made a root
/// of host root's that even `-u 0` could not write; the run's own root now
/// belongs to the container's root. Without the flag the root stays
/// read-only, and the shared cache is never written.
#[test]
fn read_write_on_the_embedded_default_is_writable() {
    let Some(rt) = rt("read_write_on_the_embedded_default_is_writable") else {
        return;
    };
    let o = sh(
        &rt,
        &["--read-write", "-u", "0"],
        "touch /x && mkdir /etc/new && echo wrote",
    )
    .expect_ok();
    assert!(o.stdout.contains("wrote"), "{o:?}");
    let o = sh(&rt, &["-u", "0"], "touch /x");
    assert_eq!(o.code, Some(1), "{o:?}");
    assert!(o.stderr.contains("Read-only file system"), "{o:?}");
    // Nobody (the default user) still cannot write in root's `/`.
    let o = sh(&rt, &["--read-write"], "touch /x");
    assert_eq!(o.code, Some(1), "{o:?}");
    let cache = rt.root().join(".cache/rootfs");
    for e in fs::read_dir(&cache).unwrap().flatten() {
        assert!(!e.path().join("x").exists(), "{}", e.path().display());
    }
    assert_clean(&rt);
}

/// Issue 15, defect 5: with `-t`, SIGINT/SIGTERM were only forwarded, so a
/// PID 1 without handlers never stopped; the second one now kills the
/// container, as without a terminal.
#[test]
fn a_second_sigterm_stops_a_run_with_a_terminal() {
    let Some(rt) = rt("a_second_sigterm_stops_a_run_with_a_terminal") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let child = spawn_run(
        &rt,
        &["-t"],
        "trap '' TERM INT; echo ready; sleep 600",
        &dir.path().join("o"),
    );
    // Before the fix this loop never ended (its 30 s bound failed).
    stop_sleeper(child);
    assert_clean(&rt);
}

/// Issue 15, defect 10, the smaller ones of `moat run`: `--timeout 0` means
/// none; usage errors exit 125 (moat's own errors), not 2; `-t` sets TERM;
/// `-it` without a terminal is refused; `--json` writes a record when the
/// program cannot run, and an unwritable `--json=FILE` fails before the
/// workload runs; error lines are bounded.
#[test]
fn small_promises_of_moat_run() {
    let Some(rt) = rt("small_promises_of_moat_run") else {
        return;
    };
    let o = sh(&rt, &["--timeout", "0"], "sleep 1.5; echo done").expect_ok();
    assert!(o.stdout.contains("done"), "{o:?}");
    for bad in [&["run", "-m"][..], &["run", "--timeout", "x", "--", "true"]] {
        let o = rt.cmd(bad);
        assert_eq!(o.code, Some(125), "{bad:?}: {o:?}");
    }
    let o = sh(&rt, &["-t"], "echo \"term=$TERM\"").expect_ok();
    assert!(o.stdout.contains("term=xterm"), "{o:?}");
    let o = sh(&rt, &["-t", "-e", "TERM=vt100"], "echo \"term=$TERM\"").expect_ok();
    assert!(o.stdout.contains("term=vt100"), "{o:?}");
    let o = sh(&rt, &["-it"], "true");
    assert_eq!(o.code, Some(125), "{o:?}");
    assert!(o.stderr.contains("not a terminal"), "{o:?}");
    // A record for a program that cannot run.
    let json = rt.scratch_file("rec.json");
    let arg = format!("--json={}", json.display());
    let o = rt.cmd(&["run", &arg, "--", "/nonexistent"]);
    assert_eq!(o.code, Some(127), "{o:?}");
    let rec: serde_json::Value = serde_json::from_str(&fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(rec["status"], 127, "{rec}");
    assert!(
        rec["error"]
            .as_str()
            .unwrap()
            .contains("no such file or directory"),
        "{rec}"
    );
    // An unwritable record file: refused before anything runs.
    let marker = rt.scratch_file("ran");
    let o = sh(
        &rt,
        &[
            "--json=/nonexistent-dir/rec.json",
            "-v",
            &format!("{}:/m", marker.parent().unwrap().display()),
        ],
        &format!("touch /m/{}", marker.file_name().unwrap().to_string_lossy()),
    );
    assert_eq!(o.code, Some(125), "{o:?}");
    assert!(o.stderr.contains("--json"), "{o:?}");
    assert!(!marker.exists(), "the workload ran");
    // A 100 KB value echoed in an error: one bounded line.
    let name = "n".repeat(100_000) + "/";
    let o = rt.cmd(&["run", "--name", &name, "--", "true"]);
    assert_eq!(o.code, Some(125), "{o:?}");
    assert_eq!(o.stderr.lines().count(), 1, "{}", o.stderr.len());
    assert!(o.stderr.len() < 5000, "{} bytes", o.stderr.len());
    assert_clean(&rt);
}

/// Issue 15, defect 10: the workload inherited SIG_IGN for SIGINT from
/// moat's caller (a shell's background job), so its `trap … INT` never
/// fired (and moat itself discarded the SIGINT it should forward).
#[test]
fn signals_ignored_by_moats_caller_reach_the_workload() {
    let Some(rt) = rt("signals_ignored_by_moats_caller_reach_the_workload") else {
        return;
    };
    use nix::sys::signal::{kill, Signal};
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let moat = format!("{} --root {}", runtime_bin().display(), rt.root().display());
    let mut child = spawn_own(
        std::process::Command::new("sh")
            .args([
                "-c",
                &format!(
                    "trap '' INT QUIT; exec {moat} run -- sh -c 'trap \"echo got-int; exit 3\" INT; echo ready; while :; do sleep 0.05; done'"
                ),
            ])
            .envs(rt.env().iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::null())
            .stdout(fs::File::create(&out).unwrap()),
    );
    wait_ready(&out, std::time::Duration::from_secs(30));
    kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        Signal::SIGINT,
    )
    .unwrap();
    // Repeated: an interrupt lost for good would hang here, not pass.
    let status = wait_own(&mut child);
    assert_eq!(status.code(), Some(3), "{status:?}");
    assert!(fs::read_to_string(&out).unwrap().contains("got-int"));
    assert_clean(&rt);
}

/// Issue 15, defects 7 and 10: what a killed run leaves (`.run/<id>`, with
/// volumes a root of its own) is removed by the next run; a container whose
/// config merely carries the run-owner annotation is not; a directory named
/// like an ID slot does not stop runs.
#[test]
fn leftovers_of_killed_runs_and_lookalikes() {
    let Some(rt) = rt("leftovers_of_killed_runs_and_lookalikes") else {
        return;
    };
    use nix::sys::signal::{kill, Signal};
    // A directory where an ID slot file would be.
    let ids = rt
        .env()
        .iter()
        .find(|(k, _)| k == "MOAT_IDALLOC_DIR")
        .map(|(_, v)| std::path::PathBuf::from(v))
        .unwrap();
    fs::create_dir_all(ids.join("slot-0")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut child = start_sleeper(&rt, &["-v", "/tmp:/d"], &dir.path().join("o"));
    kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        Signal::SIGKILL,
    )
    .unwrap();
    wait_own(&mut child);
    assert_eq!(fs::read_dir(rt.root().join(".run")).unwrap().count(), 1);
    // An OCI container that names a dead "owner" in its annotations.
    let mut b = common::Bundle::new(&["sleep", "60"]);
    b.set(
        "/annotations",
        serde_json::json!({"dev.moat.run.owner": "1 0"}),
    );
    b.write_config();
    let id = rt.new_id("lookalike");
    let d = b.dir().display().to_string();
    rt.cmd(&["create", "--bundle", &d, &id]).expect_ok();
    let o = sh(&rt, &[], "true").expect_ok();
    assert!(
        o.stderr.contains("left by a moat run that was killed"),
        "{o:?}"
    );
    assert!(!o.stderr.contains(&id), "{o:?}");
    assert_eq!(rt.status(&id).as_deref(), Some("created"));
    rt.cmd(&["delete", "--force", &id]).expect_ok();
    fs::remove_dir(ids.join("slot-0")).unwrap();
    assert_clean(&rt);
}

/// The `step NAME: MS ms` records of `--debug` output, in order.
fn step_records(stderr: &str) -> Vec<(String, f64)> {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix("moat: debug: step "))
        .map(|r| {
            let (name, ms) = r.rsplit_once(": ").unwrap_or_else(|| panic!("{r}"));
            let ms = ms.strip_suffix(" ms").unwrap_or_else(|| panic!("{r}"));
            (
                name.to_string(),
                ms.parse().unwrap_or_else(|_| panic!("{r}")),
            )
        })
        .collect()
}

/// `--debug` says where start-up time goes: one record per step of the
/// runtime and, sent back over the setup channel, of the container's init
/// (`init.*`), for `run` and for `create` + `start`; without `--debug`,
/// none.
#[test]
fn debug_breaks_start_up_into_steps() {
    let Some(rt) = rt("debug_breaks_start_up_into_steps") else {
        return;
    };
    let o = rt.cmd(&["--debug", "run", "--", "true"]).expect_ok();
    let steps = step_records(&o.stderr);
    let names: Vec<&str> = steps.iter().map(|(n, _)| n.as_str()).collect();
    for want in [
        "cgroup-create",
        "clone",
        "init.mounts",
        "init.pivot-root",
        "start",
    ] {
        assert!(names.contains(&want), "no step {want}: {names:?}");
    }
    // The init's steps come back in the order the init took them.
    let pos = |n: &str| names.iter().position(|x| *x == n).unwrap();
    assert!(pos("init.mounts") < pos("init.pivot-root"), "{names:?}");
    assert!(
        steps.iter().all(|(_, ms)| ms.is_finite() && *ms >= 0.0),
        "{steps:?}"
    );
    assert_clean(&rt);

    let o = rt.cmd(&["run", "--", "true"]).expect_ok();
    assert!(step_records(&o.stderr).is_empty(), "{}", o.stderr);

    // The OCI path: create times the init's set-up, start its exec.
    let mut bundle = common::Bundle::new(&["true"]);
    bundle.set("/process/terminal", serde_json::json!(false));
    bundle.write_config();
    let id = rt.new_id("dbg");
    let b = bundle.dir().display().to_string();
    let c = rt
        .cmd(&["--debug", "create", "--bundle", &b, &id])
        .expect_ok();
    let created = step_records(&c.stderr);
    assert!(
        created.iter().any(|(n, _)| n == "init.mounts"),
        "{created:?}"
    );
    let s = rt.cmd(&["--debug", "start", &id]).expect_ok();
    assert!(!step_records(&s.stderr).is_empty(), "{}", s.stderr);
    rt.wait_status(&id, "stopped");
    rt.cmd(&["delete", &id]).expect_ok();
}
