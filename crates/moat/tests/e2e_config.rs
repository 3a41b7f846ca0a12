//! End-to-end: each config.json setting has its effect, observed from inside the
//! container (its output) and, where the kernel shows it, from outside.
#![forbid(unsafe_code)]

mod common;

use common::*;
use serde_json::{json, Value};
use std::fs;

/// Bundle running `sh -c script`.
fn script(s: &str) -> Bundle {
    Bundle::new(&["sh", "-c", s])
}

/// The value of a `Key:\tvalue` line of /proc/<pid>/status output.
fn status_field<'a>(status: &'a str, key: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(':')))
        .map(str::trim)
        .unwrap_or_else(|| panic!("{key} not in {status}"))
}

fn cap_number(name: &str) -> u32 {
    const CAPS: &[&str] = &[
        "CHOWN",
        "DAC_OVERRIDE",
        "DAC_READ_SEARCH",
        "FOWNER",
        "FSETID",
        "KILL",
        "SETGID",
        "SETUID",
        "SETPCAP",
        "LINUX_IMMUTABLE",
        "NET_BIND_SERVICE",
        "NET_BROADCAST",
        "NET_ADMIN",
        "NET_RAW",
        "IPC_LOCK",
        "IPC_OWNER",
        "SYS_MODULE",
        "SYS_RAWIO",
        "SYS_CHROOT",
        "SYS_PTRACE",
        "SYS_PACCT",
        "SYS_ADMIN",
        "SYS_BOOT",
        "SYS_NICE",
        "SYS_RESOURCE",
        "SYS_TIME",
        "SYS_TTY_CONFIG",
        "MKNOD",
        "LEASE",
        "AUDIT_WRITE",
        "AUDIT_CONTROL",
        "SETFCAP",
    ];
    let n = name.strip_prefix("CAP_").unwrap_or(name);
    CAPS.iter()
        .position(|c| *c == n)
        .unwrap_or_else(|| panic!("unknown cap {name}")) as u32
}

fn cap_mask(names: &[&str]) -> u64 {
    names.iter().fold(0, |m, n| m | (1u64 << cap_number(n)))
}

#[test]
fn capabilities_match_config() {
    let Some(rt) = Rt::root_or_skip("capabilities") else {
        return;
    };
    let mut b = script("grep -E '^Cap(Inh|Prm|Eff|Bnd|Amb):' /proc/self/status");
    let bnd = [
        "CAP_CHOWN",
        "CAP_KILL",
        "CAP_NET_BIND_SERVICE",
        "CAP_SETUID",
        "CAP_SYS_ADMIN",
    ];
    let prm = ["CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE"];
    b.set(
        "/process/capabilities",
        json!({
            "bounding": bnd, "effective": prm, "permitted": prm, "inheritable": [], "ambient": []
        }),
    );
    let out = rt.run_ok(&b);
    let hex = |out: &str, k: &str| u64::from_str_radix(status_field(out, k), 16).expect("hex caps");
    assert_eq!(hex(&out, "CapBnd"), cap_mask(&bnd), "{out}");
    assert_eq!(hex(&out, "CapPrm"), cap_mask(&prm), "{out}");
    // For uid 0 the kernel sets effective = permitted at execve, whatever the config says.
    assert_eq!(hex(&out, "CapEff"), cap_mask(&prm), "{out}");
    assert_eq!(hex(&out, "CapAmb"), 0, "{out}");

    // A non-root user keeps only what is ambient (which must be permitted and inheritable).
    let mut b = script("grep -E '^Cap(Inh|Prm|Eff|Bnd|Amb):' /proc/self/status");
    b.set("/process/user", json!({ "uid": 1000, "gid": 1000 }));
    b.set("/process/capabilities", json!({
        "bounding": bnd, "effective": prm, "permitted": prm, "inheritable": prm, "ambient": ["CAP_KILL"]
    }));
    let out = rt.run_ok(&b);
    for k in ["CapPrm", "CapEff", "CapAmb"] {
        assert_eq!(hex(&out, k), cap_mask(&["CAP_KILL"]), "{k}: {out}");
    }
    assert_eq!(hex(&out, "CapInh"), cap_mask(&prm), "{out}");
    assert_eq!(hex(&out, "CapBnd"), cap_mask(&bnd), "{out}");

    // The default spec. Its ambient set is not in the (absent) inheritable set, so the
    // kernel cannot raise it; runc silently skips it, so CapAmb is not asserted here.
    let b = script("grep -E '^Cap(Eff|Bnd|Amb):' /proc/self/status");
    let out = rt.run_ok(&b);
    let default = cap_mask(&["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]);
    for k in ["CapBnd", "CapEff"] {
        assert_eq!(
            u64::from_str_radix(status_field(&out, k), 16).ok(),
            Some(default),
            "{k}: {out}"
        );
    }
}

#[test]
fn seccomp_filter_blocks_mkdir() {
    let Some(rt) = Rt::root_or_skip("seccomp") else {
        return;
    };
    let mut b = script(
        "grep '^Seccomp:' /proc/self/status; touch /tmp/file && echo touch-ok; \
         mkdir /tmp/x 2>&1 && echo mkdir-ok; [ -d /tmp/x ] && echo dir-exists; exit 0",
    );
    b.push(
        "/mounts",
        tmpfs_mount("/tmp", &["nosuid", "nodev", "mode=1777"]),
    );
    b.set("/linux/seccomp", json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [ { "names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1 } ]
    }));
    let out = rt.run_ok(&b);
    assert!(
        out.lines()
            .next()
            .is_some_and(|l| status_field(l, "Seccomp") == "2"),
        "{out}"
    );
    assert!(out.contains("touch-ok"), "tmpfs /tmp is writable: {out}");
    assert!(
        out.contains("Operation not permitted"),
        "mkdir fails with EPERM: {out}"
    );
    assert!(
        !out.contains("mkdir-ok") && !out.contains("dir-exists"),
        "{out}"
    );

    // Without the filter, mkdir works (the failure above is the filter's).
    let mut b = script("grep '^Seccomp:' /proc/self/status; mkdir /tmp/x && echo mkdir-ok");
    b.push(
        "/mounts",
        tmpfs_mount("/tmp", &["nosuid", "nodev", "mode=1777"]),
    );
    let out = rt.run_ok(&b);
    assert!(out.contains("mkdir-ok"), "{out}");
}

#[test]
fn user_namespace_mappings() {
    let Some(rt) = Rt::root_or_skip("userns") else {
        return;
    };
    let mut b = script(
        "cat /proc/self/uid_map /proc/self/gid_map; id -u; touch /proc/x 2>/dev/null || echo ro-ok",
    );
    b.push("/linux/namespaces", json!({ "type": "user" }));
    b.set(
        "/linux/uidMappings",
        json!([{ "containerID": 0, "hostID": 200000, "size": 65536 }]),
    );
    b.set(
        "/linux/gidMappings",
        json!([{ "containerID": 0, "hostID": 200000, "size": 65536 }]),
    );
    // A cgroup mount needs a cgroup namespace in a user namespace; drop it here.
    let mounts = b.config["mounts"].as_array().cloned().unwrap_or_default();
    b.set(
        "/mounts",
        Value::Array(
            mounts
                .into_iter()
                .filter(|m| m["type"] != "cgroup")
                .collect(),
        ),
    );
    let out = rt.run_ok(&b);
    let rows: Vec<Vec<&str>> = out
        .lines()
        .take(2)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows, vec![vec!["0", "200000", "65536"]; 2], "{out}");
    assert_eq!(out.lines().nth(2), Some("0"), "{out}");

    // From outside: the init's credentials are the mapped host ids.
    let c = rt.start_ok(&{
        let mut b2 = Bundle::new(&["sleep", "1000"]);
        b2.config = b.config.clone();
        b2.set("/process/args", json!(["sleep", "1000"]));
        b2
    });
    let st = fs::read_to_string(format!("/proc/{}/status", c.pid())).expect("status");
    assert_eq!(
        status_field(&st, "Uid").split_whitespace().next(),
        Some("200000"),
        "{st}"
    );
    assert_eq!(
        status_field(&st, "Gid").split_whitespace().next(),
        Some("200000"),
        "{st}"
    );
}

#[test]
fn mounts_masked_and_readonly_paths() {
    let Some(rt) = Rt::root_or_skip("mounts") else {
        return;
    };
    let masked: Vec<String> = default_spec(&[])["linux"]["maskedPaths"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    let b = script(&format!(
        "cat /proc/mounts; echo ---; \
         for p in {}; do if [ -d $p ]; then echo \"$p dir $(ls -A $p | wc -l)\"; \
         elif [ -e $p ]; then echo \"$p file $(cat $p | wc -c)\"; else echo \"$p absent\"; fi; done; \
         echo 1 > /proc/sysrq-trigger 2>/dev/null && echo sysrq-written; \
         echo 1 > /proc/sys/kernel/domainname 2>/dev/null && echo sys-written; \
         touch /rootfile 2>/dev/null && echo root-written; exit 0",
        masked.join(" ")
    ));
    let out = rt.run_ok(&b);
    let (mounts, checks) = out.split_once("---").expect("separator");
    let mount_of = |dest: &str| {
        mounts
            .lines()
            .rev()
            .find(|l| l.split_whitespace().nth(1) == Some(dest))
            .map(str::to_string)
    };
    for (dest, fstype) in [
        ("/proc", "proc"),
        ("/dev", "tmpfs"),
        ("/dev/pts", "devpts"),
        ("/dev/shm", "tmpfs"),
        ("/dev/mqueue", "mqueue"),
        ("/sys", "sysfs"),
    ] {
        let l = mount_of(dest).unwrap_or_else(|| panic!("{dest} not mounted: {mounts}"));
        assert_eq!(l.split_whitespace().nth(2), Some(fstype), "{l}");
    }
    let opts =
        |dest: &str| mount_of(dest).and_then(|l| l.split_whitespace().nth(3).map(str::to_string));
    assert!(
        opts("/").is_some_and(|o| o.split(',').any(|x| x == "ro")),
        "readonly root: {mounts}"
    );
    assert!(
        opts("/sys").is_some_and(|o| o.split(',').any(|x| x == "ro")),
        "{mounts}"
    );
    assert!(
        opts("/proc/sys").is_some_and(|o| o.split(',').any(|x| x == "ro")),
        "readonly /proc/sys: {mounts}"
    );
    assert!(
        opts("/dev/shm").is_some_and(|o| o.contains("nosuid") && o.contains("noexec")),
        "{mounts}"
    );
    // Masked paths that exist on this host read empty inside (those the kernel lacks,
    // e.g. /proc/kcore here, cannot leak anything).
    let mut checked = 0;
    for p in &masked {
        if !std::path::Path::new(p).exists() {
            continue;
        }
        checked += 1;
        let line = checks
            .lines()
            .find(|l| l.split_whitespace().next() == Some(p))
            .unwrap_or_default();
        assert!(
            line.ends_with(" 0") || line.ends_with("absent"),
            "masked {p} readable: {line:?}"
        );
    }
    assert!(checked >= 2, "no masked path to check on this host");
    for bad in ["sysrq-written", "sys-written", "root-written"] {
        assert!(!checks.contains(bad), "{bad}: {checks}");
    }
}

#[test]
fn tmpfs_mount_with_size_and_bind_mount() {
    let Some(rt) = Rt::root_or_skip("tmpfs") else {
        return;
    };
    let host = tempfile::tempdir().expect("tempdir");
    fs::write(host.path().join("hello"), "from-host\n").expect("write");
    let mut b = script("grep ' /scratch ' /proc/mounts; cat /data/hello; touch /data/new 2>/dev/null || echo bind-ro");
    b.push(
        "/mounts",
        tmpfs_mount("/scratch", &["nosuid", "size=1m", "mode=755"]),
    );
    b.push("/mounts", json!({
        "destination": "/data", "type": "bind", "source": host.path(), "options": ["rbind", "ro"]
    }));
    let out = rt.run_ok(&b);
    let line = out.lines().next().unwrap_or_default();
    assert!(line.starts_with("tmpfs /scratch tmpfs"), "{out}");
    assert!(line.contains("size=1024k"), "{out}");
    assert!(out.contains("from-host"), "{out}");
    assert!(out.contains("bind-ro"), "{out}");
    assert!(!host.path().join("new").exists());
}

#[test]
fn hostname_env_cwd_rlimits() {
    let Some(rt) = Rt::root_or_skip("process_settings") else {
        return;
    };
    let mut b = script("hostname; echo \"$GREETING\"; pwd; ulimit -n; ulimit -Hn");
    b.set("/hostname", json!("e2e-host"));
    b.push("/process/env", json!("GREETING=hello there"));
    b.set("/process/cwd", json!("/etc"));
    b.set(
        "/process/rlimits",
        json!([{ "type": "RLIMIT_NOFILE", "soft": 321, "hard": 654 }]),
    );
    let out = rt.run_ok(&b);
    assert_eq!(out, "e2e-host\nhello there\n/etc\n321\n654\n");
    let uts_host = fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    assert_ne!(uts_host.trim(), "e2e-host", "host hostname untouched");
}

/// A process given no HOME gets its user's home from the container's
/// /etc/passwd (the bundle's: root's /root, 1000's /tmp), or `/`, as under
/// runc and crun; one it is given keeps it. The same for `exec`.
#[test]
fn home_defaults_to_the_users_passwd_entry() {
    let Some(rt) = Rt::root_or_skip("home_defaults_to_the_users_passwd_entry") else {
        return;
    };
    let home = |uid: u32, env: Option<&str>| {
        let mut b = script("echo \"HOME=$HOME\"");
        b.set("/process/user", json!({ "uid": uid, "gid": uid }));
        if let Some(e) = env {
            b.push("/process/env", json!(e));
        }
        rt.run_ok(&b)
    };
    assert_eq!(home(0, None), "HOME=/root\n");
    assert_eq!(home(1000, None), "HOME=/tmp\n");
    assert_eq!(home(4242, None), "HOME=/\n", "no passwd entry");
    assert_eq!(home(1000, Some("HOME=/given")), "HOME=/given\n");
    let b = script("sleep 30");
    let c = rt.start_ok(&b);
    let out = c
        .exec(&["sh", "-c", "echo \"HOME=$HOME\""])
        .expect_ok()
        .stdout;
    assert_eq!(out, "HOME=/root\n");
    let out = c
        .exec_opts(
            &["--user", "1000:1000"],
            &["sh", "-c", "echo \"HOME=$HOME\""],
        )
        .expect_ok()
        .stdout;
    assert_eq!(out, "HOME=/tmp\n");
}

#[test]
fn user_groups_and_no_new_privs() {
    let Some(rt) = Rt::root_or_skip("user") else {
        return;
    };
    let mut b = script("id -u; id -g; id -G; grep -E '^(NoNewPrivs|CapEff):' /proc/self/status");
    b.set(
        "/process/user",
        json!({ "uid": 1000, "gid": 1001, "additionalGids": [5, 6] }),
    );
    let out = rt.run_ok(&b);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.first(), Some(&"1000"), "{out}");
    assert_eq!(lines.get(1), Some(&"1001"), "{out}");
    let mut groups: Vec<&str> = lines
        .get(2)
        .map(|l| l.split_whitespace().collect())
        .unwrap_or_default();
    groups.sort();
    assert_eq!(groups, vec!["1001", "5", "6"], "{out}");
    assert_eq!(status_field(&out, "NoNewPrivs"), "1", "{out}");
    // And off when the config says so.
    let mut b = script("grep '^NoNewPrivs:' /proc/self/status");
    b.set("/process/noNewPrivileges", json!(false));
    assert_eq!(status_field(&rt.run_ok(&b), "NoNewPrivs"), "0");
}

#[test]
fn oom_score_adj_and_sysctl() {
    let Some(rt) = Rt::root_or_skip("oom_sysctl") else {
        return;
    };
    let host_fwd = read_trim("/proc/sys/net/ipv4/ip_forward");
    let want = if host_fwd == "1" { "0" } else { "1" };
    let mut b = script("cat /proc/self/oom_score_adj /proc/sys/net/ipv4/ip_forward");
    b.set("/process/oomScoreAdj", json!(123));
    b.set("/linux/sysctl", json!({ "net.ipv4.ip_forward": want }));
    let out = rt.run_ok(&b);
    assert_eq!(out, format!("123\n{want}\n"));
    assert_eq!(
        read_trim("/proc/sys/net/ipv4/ip_forward"),
        host_fwd,
        "host sysctl unchanged"
    );
}

/// Whether this process holds CAP_SYS_RESOURCE (bit 24 of CapEff).
fn have_cap_sys_resource() -> bool {
    let status = fs::read_to_string("/proc/self/status").expect("status");
    let eff = u64::from_str_radix(status_field(&status, "CapEff"), 16).expect("CapEff");
    eff & (1 << 24) != 0
}

/// A negative `oomScoreAdj` needs CAP_SYS_RESOURCE in the host's user
/// namespace, which a container in a user namespace of its own never has:
/// a root runtime that holds it sets the value from outside (containerd's
/// CRI plugin gives every pod sandbox -998, a Guaranteed pod's containers
/// and their execs -997). Where the runtime lacks it too (some VMs' root,
/// a rootless runtime), create fails with a one-line error naming the file,
/// and leaves nothing.
#[test]
fn negative_oom_score_adj_in_a_user_namespace() {
    let Some(rt) = Rt::root_or_skip("oom_userns") else {
        return;
    };
    let mut b = Bundle::new(&["sleep", "1000"]);
    b.push("/linux/namespaces", json!({ "type": "user" }));
    for m in ["/linux/uidMappings", "/linux/gidMappings"] {
        b.set(
            m,
            json!([{ "containerID": 0, "hostID": 200000, "size": 65536 }]),
        );
    }
    let mounts = b.config["mounts"].as_array().cloned().unwrap_or_default();
    let mounts = mounts.into_iter().filter(|m| m["type"] != "cgroup");
    b.set("/mounts", Value::Array(mounts.collect()));
    b.set("/process/oomScoreAdj", json!(-998));
    if !have_cap_sys_resource() {
        let out = rt
            .create(&b, &[])
            .err()
            .expect("create without CAP_SYS_RESOURCE");
        assert!(out.stderr.contains("oom_score_adj"), "{out:?}");
        assert_eq!(out.stderr.lines().count(), 1, "{out:?}");
        let ids = rt.cmd(&["list", "-q"]).expect_ok().stdout;
        assert_eq!(ids.trim(), "", "nothing left");
        return;
    }
    let c = rt.start_ok(&b);
    let adj = fs::read_to_string(format!("/proc/{}/oom_score_adj", c.pid())).expect("adj");
    assert_eq!(adj.trim(), "-998");
    let process = json!({
        "user": { "uid": 0, "gid": 0 },
        "args": ["cat", "/proc/self/oom_score_adj"],
        "env": ["PATH=/bin"],
        "cwd": "/",
        "oomScoreAdj": -997
    });
    let pf = rt.scratch_file("process.json");
    fs::write(&pf, process.to_string()).expect("write process.json");
    let o = c.exec_opts(&["--process", &pf.display().to_string()], &[]);
    assert_eq!(o.expect_ok().stdout, "-997\n");
}

#[test]
fn cgroup_limits_from_outside() {
    let Some(rt) = Rt::root_or_skip("cgroups") else {
        return;
    };
    let mut b = Bundle::new(&["sleep", "1000"]);
    let cg = format!("/{}", rt.new_id("cg-lim"));
    b.set("/linux/cgroupsPath", json!(cg));
    b.set("/linux/resources/memory", json!({ "limit": 100u64 << 20 }));
    b.set("/linux/resources/pids", json!({ "limit": 42 }));
    b.set("/linux/resources/cpu", json!({ "shares": 512 }));
    let c = rt.start_ok(&b);
    assert_eq!(
        read_trim(cgroup_v1_file("memory", &cg, "memory.limit_in_bytes")),
        (100u64 << 20).to_string()
    );
    assert_eq!(read_trim(cgroup_v1_file("pids", &cg, "pids.max")), "42");
    assert_eq!(read_trim(cgroup_v1_file("cpu", &cg, "cpu.shares")), "512");
    let pid = c.pid().to_string();
    for ctl in ["memory", "pids", "cpu", "freezer", "devices"] {
        let procs = read_trim(cgroup_v1_file(ctl, &cg, "cgroup.procs"));
        assert!(
            procs.lines().any(|l| l == pid),
            "{ctl}: init {pid} not in {procs:?}"
        );
    }
    // The pids limit holds inside: forks beyond 42 processes fail, and the cgroup counts them.
    c.exec(&[
        "sh",
        "-c",
        "for i in $(seq 60); do sleep 1 & done 2>/dev/null; wait",
    ]);
    let events = read_trim(cgroup_v1_file("pids", &cg, "pids.events"));
    let hits: u64 = events
        .strip_prefix("max ")
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(hits > 0, "pids.events: {events:?}");
    drop(c);
    assert!(
        !cgroup_v1_file("pids", &cg, "").exists(),
        "cgroup {cg} removed on delete"
    );
}

#[test]
fn hooks_run_with_state_on_stdin() {
    let Some(rt) = Rt::root_or_skip("hooks") else {
        return;
    };
    let out = tempfile::tempdir().expect("tempdir");
    let hook = |name: &str| {
        let p = out.path().join(name);
        json!({ "path": "/bin/sh", "args": ["sh", "-c", format!("cat > {}", p.display())] })
    };
    let mut b = Bundle::new(&["sleep", "1000"]);
    b.set(
        "/hooks",
        json!({
            "prestart": [hook("prestart")],
            "createRuntime": [hook("createRuntime")],
            "poststart": [hook("poststart")],
            "poststop": [hook("poststop")]
        }),
    );
    let c = rt.create(&b, &[]).expect("create");
    let read = |n: &str| -> Option<Value> {
        fs::read_to_string(out.path().join(n))
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
    };
    for n in ["prestart", "createRuntime"] {
        let v = read(n).unwrap_or_else(|| panic!("{n} hook did not run on create"));
        assert_eq!(v["id"], c.id.as_str(), "{n}: {v}");
        assert_eq!(v["pid"].as_i64(), Some(c.pid() as i64), "{n}: {v}");
    }
    // runc 1.1 runs poststart hooks already on `create` (fixed in runc 1.2); moat must not.
    if rt.is_moat() {
        assert!(read("poststart").is_none(), "poststart ran before start");
    }
    c.start().expect_ok();
    let v = read("poststart").expect("poststart hook ran");
    assert_eq!(v["id"], c.id.as_str());
    assert!(read("poststop").is_none(), "poststop ran before delete");
    rt.cmd(&["delete", "--force", &c.id]).expect_ok();
    let v = read("poststop").expect("poststop hook ran on delete");
    assert_eq!(v["id"], c.id.as_str());
}

#[test]
fn failing_prestart_hook_fails_create() {
    let Some(rt) = Rt::root_or_skip("hook_fail") else {
        return;
    };
    let mut b = Bundle::new(&["sleep", "1000"]);
    b.set("/hooks/prestart", json!([{ "path": "/bin/false" }]));
    let Err(o) = rt.create(&b, &[]) else {
        panic!("create succeeded despite failing hook")
    };
    o.expect_fail();
    assert!(processes_under(b.dir()).is_empty(), "leftover processes");
}

#[test]
fn devices_are_created_and_allowed() {
    let Some(rt) = Rt::root_or_skip("devices") else {
        return;
    };
    let mut b = script(
        "stat -c '%F %t %T %a' /dev/fuse; true < /dev/fuse && echo fuse-open; \
         true < /dev/null && echo null-open; ls /dev; exit 0",
    );
    b.push("/linux/devices", json!({
        "path": "/dev/fuse", "type": "c", "major": 10, "minor": 229, "fileMode": 438, "uid": 0, "gid": 0
    }));
    b.push(
        "/linux/resources/devices",
        json!({ "allow": true, "type": "c", "major": 10, "minor": 229, "access": "rwm" }),
    );
    let out = rt.run_ok(&b);
    assert!(
        out.starts_with("character special file a e5 666\n"),
        "{out}"
    );
    assert!(out.contains("fuse-open"), "{out}");
    // The default devices are there too.
    assert!(out.contains("null-open"), "{out}");
    for d in ["null", "zero", "full", "random", "urandom", "tty"] {
        assert!(out.lines().any(|l| l == d), "/dev/{d}: {out}");
    }

    // A node that the cgroup does not allow cannot be opened.
    let mut b = script("true < /dev/fuse 2>/dev/null && echo fuse-open; exit 0");
    b.push(
        "/linux/devices",
        json!({ "path": "/dev/fuse", "type": "c", "major": 10, "minor": 229, "fileMode": 438 }),
    );
    assert!(!rt.run_ok(&b).contains("fuse-open"));
}

#[test]
fn landlock_annotation_confines_init_and_exec() {
    let Some(rt) = Rt::root_or_skip("landlock_annotation_confines_init_and_exec") else {
        return;
    };
    if !rt.is_moat() {
        eprintln!("SKIP landlock_annotation_confines_init_and_exec: dev.moat.landlock is moat's");
        return;
    }
    // Root with runc's default capabilities (DAC override included): only
    // Landlock stands between it and the writable /data tmpfs.
    let mut b = script(
        "echo a > /tmp/a && echo tmp-ok; echo b > /data/b || echo data-denied; \
         cat /etc/passwd >/tmp/p && echo read-ok; sleep 60",
    );
    b.push(
        "/mounts",
        json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"}),
    )
    .push(
        "/mounts",
        json!({"destination": "/data", "type": "tmpfs", "source": "tmpfs"}),
    )
    .set(
        "/annotations/dev.moat.landlock",
        json!(r#"{"read":["/"],"write":["/tmp"]}"#),
    );
    b.write_config();
    let c = rt.start_ok(&b);
    let out = c.wait_output("read-ok");
    assert!(out.contains("tmp-ok"), "{out}");
    assert!(out.contains("data-denied"), "{out}");
    // A process added by exec gets the same policy.
    let e = c.exec(&[
        "sh",
        "-c",
        "echo x > /tmp/x && echo exec-tmp-ok; echo y > /data/y",
    ]);
    assert!(e.stdout.contains("exec-tmp-ok"), "{e:?}");
    assert!(!e.ok() && e.stderr.contains("Permission denied"), "{e:?}");
    drop(c);

    // Without the annotation the same root writes /data.
    let mut b = script("echo b > /data/b && echo data-ok");
    b.push(
        "/mounts",
        json!({"destination": "/data", "type": "tmpfs", "source": "tmpfs"}),
    );
    b.write_config();
    assert!(rt.run_ok(&b).contains("data-ok"));
}
