//! cgroup v2 on a real kernel. The host this suite runs on mounts cgroup v1
//! (hybrid, with only hugetlb in its v2 tree), so this test boots a guest
//! (`guest/mod.rs`: Debian's cloud kernel under QEMU) whose init mounts a
//! unified hierarchy at /sys/fs/cgroup with `nsdelegate` and enables every
//! controller, and drives this package's `moat` binary there the way users
//! and engines do: `moat run`, and `create`/`start`/`exec`/`ps`/`events`/
//! `pause`/`resume`/`update`/`delete` on busybox bundles. Each case checks
//! the effect in the kernel's own files (from outside the container) or
//! from inside it.
//!
//! One boot serves every case, in order (later cases use the container the
//! earlier ones created); each case's result is printed, and the test fails
//! listing every failed case with the guest's serial console.

#[allow(dead_code)]
mod guest;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use guest::{Guest, Needs, Out, DISK_MARKER};
use serde_json::{json, Value};

const TEST: &str = "cgroup_v2_in_a_guest";

/// Bounds the whole guest session (watchdog), far above what it takes.
const SESSION_LIMIT: Duration = Duration::from_secs(600);

/// The delegated subtree of the rootless cases, where systemd puts it.
const DELEGATED: &str = "/sys/fs/cgroup/user.slice/user-1000.slice/user@1000.service";

type Case = fn(&mut Guest) -> Result<(), String>;

const CASES: &[(&str, Case)] = &[
    ("run_defaults_apply_and_show_inside", run_defaults),
    ("limits_written_and_read_back", limits_written),
    ("start_exec_ps_use_the_cgroup", start_exec_ps),
    ("events_stats_report_usage_and_limits", events_stats),
    ("pause_and_resume_freeze_the_cgroup", pause_resume),
    ("update_changes_every_limit", update),
    ("delete_force_of_a_paused_container", delete_paused),
    ("device_filter_allows_and_denies", device_filter),
    ("oom_kill_is_reported", oom),
    ("pids_limit_is_reported", pids_limit),
    ("rootless_in_a_delegated_subtree", rootless_delegated),
    ("rootless_without_delegation", rootless_undelegated),
    ("nothing_left_behind", nothing_left),
];

#[test]
fn cgroup_v2_in_a_guest() {
    let needs = match Needs::find() {
        Ok(n) => n,
        Err(why) => {
            moat_core::testing::skip(TEST, &why);
            return;
        }
    };
    let started = Instant::now();
    let mut g = Guest::boot(
        &needs,
        Path::new(env!("CARGO_BIN_EXE_moat")),
        &guest_files(),
        SESSION_LIMIT,
    )
    .unwrap_or_else(|e| panic!("the guest did not boot: {e}"));
    eprintln!(
        "guest: serving after {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let mut failures = Vec::new();
    for (name, case) in CASES {
        let t = Instant::now();
        let result = case(&mut g);
        let took = t.elapsed().as_secs_f64();
        match result {
            Ok(()) => eprintln!("guest: {name}: ok ({took:.1}s)"),
            Err(e) => {
                eprintln!("guest: {name}: FAILED ({took:.1}s): {e}");
                failures.push(format!("{name}: {e}"));
            }
        }
    }
    let serial = g.serial_log();
    let off = g.power_off();
    eprintln!(
        "guest: whole session {:.1}s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}\n--- guest serial console ---\n{serial}",
        failures.len(),
        CASES.len(),
        failures.join("\n")
    );
    if let Err(e) = off {
        panic!("the guest did not power off: {e}\n--- guest serial console ---\n{serial}");
    }
}

/// /etc/passwd and /etc/group with root and the rootless cases' user.
fn guest_files() -> Vec<(&'static str, u32, Vec<u8>)> {
    vec![
        (
            "etc/passwd",
            0o644,
            b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n".to_vec(),
        ),
        ("etc/group", 0o644, b"root:x:0:\nuser:x:1000:\n".to_vec()),
    ]
}

// ---- helpers ----

/// Runs `script`; its exit status must be 0.
fn ok(g: &mut Guest, script: &str) -> Result<Out, String> {
    let out = g.sh(script)?;
    if out.code != 0 {
        return Err(format!("`{script}`: {out}"));
    }
    Ok(out)
}

fn check(cond: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(what())
    }
}

/// Each file of `dir`, trimmed, with its lines joined by ';' (or the error).
fn files_in(g: &mut Guest, dir: &str, names: &[&str]) -> Result<BTreeMap<String, String>, String> {
    let mut script = String::new();
    for n in names {
        script.push_str(&format!(
            "printf '%s\\t' {n}; tr '\\n' ';' < {dir}/{n} 2>&1; echo\n"
        ));
    }
    let out = g.sh(&script)?;
    Ok(out
        .stdout
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(k, v)| (k.to_string(), v.trim_end_matches(';').trim().to_string()))
        .collect())
}

/// Every (file, value) in `want` as found in `dir`.
fn expect_files(g: &mut Guest, dir: &str, want: &[(&str, String)]) -> Result<(), String> {
    let names: Vec<&str> = want.iter().map(|(n, _)| *n).collect();
    let got = files_in(g, dir, &names)?;
    let wrong: Vec<String> = want
        .iter()
        .filter(|(n, v)| got.get(*n) != Some(v))
        .map(|(n, v)| format!("{n}: {:?}, expected {v:?}", got.get(*n)))
        .collect();
    check(wrong.is_empty(), || {
        format!("in {dir}: {}", wrong.join("; "))
    })
}

/// "KEY=VALUE" lines printed by a workload.
fn key_values(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

fn vda(g: &Guest) -> Result<(u64, u64), String> {
    let (a, b) = g
        .vda
        .split_once(':')
        .ok_or_else(|| format!("vda is {:?}", g.vda))?;
    Ok((
        a.parse().map_err(|_| format!("vda is {:?}", g.vda))?,
        b.parse().map_err(|_| format!("vda is {:?}", g.vda))?,
    ))
}

/// The init's PID from `moat state`.
fn init_pid(g: &mut Guest, id: &str) -> Result<u64, String> {
    let out = ok(g, &format!("moat state {id}"))?;
    let v: Value = serde_json::from_str(&out.stdout).map_err(|e| format!("state: {e}: {out}"))?;
    v["pid"]
        .as_u64()
        .filter(|&p| p > 0)
        .ok_or_else(|| format!("state has no pid: {out}"))
}

fn status(g: &mut Guest, id: &str) -> Result<String, String> {
    let out = ok(g, &format!("moat state {id}"))?;
    let v: Value = serde_json::from_str(&out.stdout).map_err(|e| format!("state: {e}: {out}"))?;
    Ok(v["status"].as_str().unwrap_or_default().to_string())
}

/// A busybox bundle's config.json (the shape `moat spec` writes, root
/// read-only over the guest's /bundle/rootfs, no user namespace).
fn config(args: &[&str], resources: Value, devices: Value, extra_mounts: &[Value]) -> Value {
    let caps = json!(["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]);
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc"}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}),
        json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}),
        json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]}),
    ];
    mounts.extend(extra_mounts.iter().cloned());
    let c = json!({
        "ociVersion": "1.2.0",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/bin"],
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "noNewPrivileges": true
        },
        "root": {"path": "/bundle/rootfs", "readonly": true},
        "hostname": "guest",
        "mounts": mounts,
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "cgroup"}],
            "resources": resources,
            "devices": devices
        }
    });
    c
}

fn bytes(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

// ---- cases ----

/// `moat run`'s defaults land in the container's cgroup, and the container
/// sees them through its own cgroup mount (a cgroup namespace rooted there).
fn run_defaults(g: &mut Guest) -> Result<(), String> {
    let out = ok(
        g,
        "moat run -- sh -c 'cd /sys/fs/cgroup && for f in memory.max memory.swap.max cpu.max pids.max io.weight; do echo \"$f=$(cat $f)\"; done; echo \"self=$(cat /proc/self/cgroup)\"'",
    )?;
    let kv = key_values(&out.stdout);
    let want = [
        ("memory.max", "1073741824"),
        // memory+swap = memory: no swap on top.
        ("memory.swap.max", "0"),
        ("cpu.max", "100000 100000"),
        ("pids.max", "1024"),
        // blkio weight 500 on io.weight's scale: 1 + (500 - 10) * 9999 / 990.
        ("io.weight", "default 4950"),
        ("self", "0::/"),
    ];
    let wrong: Vec<String> = want
        .iter()
        .filter(|(k, v)| kv.get(*k).map(String::as_str) != Some(*v))
        .map(|(k, v)| format!("{k}: {:?}, expected {v:?}", kv.get(*k)))
        .collect();
    check(wrong.is_empty(), || format!("{}; {out}", wrong.join("; ")))
}

/// Every resource of a bundle is written where cgroup v2 wants it, with
/// the value the translation promises.
fn limits_written(g: &mut Guest) -> Result<(), String> {
    let (maj, min) = vda(g)?;
    let resources = json!({
        "devices": [{"allow": false, "access": "rwm"}, {"allow": true, "type": "b", "major": maj, "minor": min, "access": "rw"}],
        "memory": {"limit": 64 << 20, "swap": 96 << 20, "reservation": 32 << 20},
        "cpu": {"shares": 2048, "quota": 50000, "period": 100000, "burst": 10000, "cpus": "0", "mems": "0"},
        "pids": {"limit": 32},
        "blockIO": {
            "weight": 300,
            "throttleReadBpsDevice": [{"major": maj, "minor": min, "rate": 1 << 20}],
            "throttleWriteIOPSDevice": [{"major": maj, "minor": min, "rate": 100}]
        },
        "hugepageLimits": [{"pageSize": "2MB", "limit": 4 << 20}],
        "unified": {"memory.high": (60 << 20).to_string()}
    });
    let devices =
        json!([{"path": "/dev/vda", "type": "b", "major": maj, "minor": min, "fileMode": 0o666}]);
    let hugetlbfs = json!({"destination": "/hp", "type": "hugetlbfs", "source": "none", "options": ["pagesize=2M"]});
    // Renamed into place, so a reader never sees it empty.
    let counter =
        "i=0; while :; do i=$((i+1)); echo $i > /tmp/c && mv /tmp/c /tmp/cnt; sleep 0.05; done";
    g.write_file(
        "/run/t/lim/config.json",
        &bytes(&config(
            &["sh", "-c", counter],
            resources,
            devices,
            &[hugetlbfs],
        )),
    )?;
    ok(g, "moat create --bundle /run/t/lim lim")?;
    expect_files(
        g,
        "/sys/fs/cgroup/lim",
        &[
            ("memory.max", (64 << 20).to_string()),
            // OCI's swap is memory+swap: v2 takes the swap alone.
            ("memory.swap.max", (32 << 20).to_string()),
            ("memory.low", (32 << 20).to_string()),
            ("memory.high", (60 << 20).to_string()),
            // shares 2048 on cpu.weight's scale: 1 + (2048 - 2) * 9999 / 262142.
            ("cpu.weight", "79".into()),
            ("cpu.max", "50000 100000".into()),
            ("cpu.max.burst", "10000".into()),
            ("cpuset.cpus", "0".into()),
            ("cpuset.mems", "0".into()),
            ("pids.max", "32".into()),
            // No BFQ here: the weight goes to io.weight, 1 + (300 - 10) * 9999 / 990.
            ("io.weight", "default 2930".into()),
            (
                "io.max",
                format!("{maj}:{min} rbps=1048576 wbps=max riops=max wiops=100"),
            ),
            ("hugetlb.2MB.max", (4 << 20).to_string()),
        ],
    )
}

/// The init, `exec`'d processes and `ps` all live in the container's cgroup.
fn start_exec_ps(g: &mut Guest) -> Result<(), String> {
    ok(g, "moat start lim")?;
    let pid = init_pid(g, "lim")?;
    let procs = ok(g, "cat /sys/fs/cgroup/lim/cgroup.procs")?.stdout;
    check(procs.lines().any(|l| l.trim() == pid.to_string()), || {
        format!("init {pid} not in cgroup.procs: {procs:?}")
    })?;
    let ps = ok(g, "moat ps lim")?.stdout;
    check(
        ps.lines()
            .any(|l| l.split_whitespace().next() == Some(&pid.to_string())),
        || format!("moat ps does not list init {pid}: {ps:?}"),
    )?;
    // The exec'd shell sees itself among its cgroup's processes, at its root.
    let out = ok(
        g,
        "moat exec lim sh -c 'echo \"me=$$\"; echo \"self=$(cat /proc/self/cgroup)\"; echo \"procs=$(cat /sys/fs/cgroup/cgroup.procs | tr \"\\n\" \" \")\"'",
    )?;
    let kv = key_values(&out.stdout);
    let me = kv.get("me").cloned().unwrap_or_default();
    check(kv.get("self").map(String::as_str) == Some("0::/"), || {
        format!("exec: {out}")
    })?;
    check(
        kv.get("procs")
            .is_some_and(|p| p.split_whitespace().any(|x| x == me)),
        || format!("exec'd process {me} not in its cgroup: {out}"),
    )
}

/// `events --stats` reads the v2 files into runc's JSON: limits, usage,
/// block I/O from io.stat, hugetlb usage and refusals.
fn events_stats(g: &mut Guest) -> Result<(), String> {
    let (maj, _) = vda(g)?;
    // 64 KiB read past the page cache; one 2 MiB huge page, then two more:
    // the limit (two pages) lets the first of those through and refuses
    // the second (fallocate keeps what it got).
    ok(
        g,
        "moat exec lim sh -c 'dd if=/dev/vda of=/dev/null bs=4096 count=16 iflag=direct 2>/dev/null && fallocate -l 2097152 /hp/a && ! fallocate -l 4194304 /hp/b'",
    )?;
    let out = ok(g, "moat events --stats lim")?;
    let v: Value =
        serde_json::from_str(out.stdout.trim()).map_err(|e| format!("events: {e}: {out}"))?;
    let d = &v["data"];
    let n = |p: &str| d.pointer(p).and_then(Value::as_u64);
    let mut wrong = Vec::new();
    let mut want = |what: &str, good: bool| {
        if !good {
            wrong.push(what.to_string());
        }
    };
    want("type stats", v["type"] == "stats" && v["id"] == "lim");
    want(
        "memory limit 64 MiB",
        n("/memory/usage/limit") == Some(64 << 20),
    );
    want(
        "memory usage > 0",
        n("/memory/usage/usage").is_some_and(|u| u > 0),
    );
    want(
        "memory+swap limit 96 MiB",
        n("/memory/swap/limit") == Some(96 << 20),
    );
    want(
        "pids current >= 1",
        n("/pids/current").is_some_and(|c| c >= 1),
    );
    want("pids limit 32", n("/pids/limit") == Some(32));
    want(
        "cpu usage > 0",
        n("/cpu/usage/total").is_some_and(|t| t > 0),
    );
    let read_vda = d["blkio"]["ioServiceBytesRecursive"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|e| {
            e["major"].as_u64() == Some(maj)
                && e["op"] == "Read"
                && e["value"].as_u64().is_some_and(|b| b >= 65536)
        });
    want("64 KiB read from vda in blkio", read_vda);
    want(
        "hugetlb 2MB usage at its 4 MiB limit",
        n("/hugetlb/2MB/usage") == Some(4 << 20),
    );
    want(
        "hugetlb 2MB failcnt >= 1",
        n("/hugetlb/2MB/failcnt").is_some_and(|f| f >= 1),
    );
    // "max" is the peak usage (v1's max_usage_in_bytes); cgroup v2 keeps no
    // hugetlb peak, so it is 0 as in runc, never the limit.
    want(
        "hugetlb 2MB max 0 (no peak on v2)",
        n("/hugetlb/2MB/max").unwrap_or(0) == 0,
    );
    check(wrong.is_empty(), || {
        format!("wrong: {}; {}", wrong.join(", "), out.stdout)
    })
}

/// `pause` freezes the cgroup (cgroup.freeze; the workload stops), `resume`
/// thaws it (the workload goes on).
fn pause_resume(g: &mut Guest) -> Result<(), String> {
    // The value the container's counter loop last wrote.
    let counter = format!("cat /proc/{}/root/tmp/cnt", init_pid(g, "lim")?);
    ok(g, "moat pause lim")?;
    let st = status(g, "lim")?;
    check(st == "paused", || format!("status {st:?} after pause"))?;
    expect_files(g, "/sys/fs/cgroup/lim", &[("cgroup.freeze", "1".into())])?;
    let events = ok(g, "cat /sys/fs/cgroup/lim/cgroup.events")?.stdout;
    check(events.contains("frozen 1"), || {
        format!("cgroup.events after pause: {events:?}")
    })?;
    let frozen = ok(
        g,
        &format!("a=$({counter}); sleep 1; b=$({counter}); echo \"$a $b\""),
    )?
    .stdout;
    let w: Vec<&str> = frozen.split_whitespace().collect();
    check(w.len() == 2 && w[0] == w[1], || {
        format!("the counter moved while paused: {frozen:?}")
    })?;
    ok(g, "moat resume lim")?;
    let st = status(g, "lim")?;
    check(st == "running", || format!("status {st:?} after resume"))?;
    let events = ok(g, "cat /sys/fs/cgroup/lim/cgroup.events")?.stdout;
    check(events.contains("frozen 0"), || {
        format!("cgroup.events after resume: {events:?}")
    })?;
    // Polled (not timed): the counter must move again.
    let thawed = ok(
        g,
        &format!(
            "a=$({counter}); for i in $(seq 100); do sleep 0.1; b=$({counter}); [ \"$b\" != \"$a\" ] && break; done; echo \"$a $b\""
        ),
    )?
    .stdout;
    let w: Vec<&str> = thawed.split_whitespace().collect();
    check(w.len() == 2 && w[0] != w[1], || {
        format!("the counter did not move after resume: {thawed:?}")
    })
}

/// `update`'s flags and `-r` file reach the v2 files.
fn update(g: &mut Guest) -> Result<(), String> {
    ok(
        g,
        "moat update --memory 128m --memory-swap 256m --pids-limit 64 --cpu-quota 20000 --cpu-period 100000 --cpu-share 512 --cpuset-cpus 0-1 --blkio-weight 700 lim",
    )?;
    let res = json!({
        "hugepageLimits": [{"pageSize": "2MB", "limit": 8 << 20}],
        "unified": {"memory.high": (120 << 20).to_string()}
    });
    g.write_file("/run/t/res.json", res.to_string().as_bytes())?;
    ok(g, "moat update -r /run/t/res.json lim")?;
    expect_files(
        g,
        "/sys/fs/cgroup/lim",
        &[("memory.swap.max", (128 << 20).to_string())],
    )?;
    // memory+swap alone counts from the current memory limit, as on v1
    // (where the kernel keeps the total itself).
    ok(g, "moat update --memory-swap 192m lim")?;
    expect_files(
        g,
        "/sys/fs/cgroup/lim",
        &[
            ("memory.max", (128 << 20).to_string()),
            ("memory.swap.max", (64 << 20).to_string()),
            ("memory.high", (120 << 20).to_string()),
            // 1 + (512 - 2) * 9999 / 262142
            ("cpu.weight", "20".into()),
            ("cpu.max", "20000 100000".into()),
            ("cpuset.cpus", "0-1".into()),
            ("pids.max", "64".into()),
            // 1 + (700 - 10) * 9999 / 990
            ("io.weight", "default 6970".into()),
            ("hugetlb.2MB.max", (8 << 20).to_string()),
        ],
    )
}

/// A paused container's processes still die on `delete --force`
/// (cgroup.kill), and its cgroup goes.
fn delete_paused(g: &mut Guest) -> Result<(), String> {
    let pid = init_pid(g, "lim")?;
    ok(g, "moat pause lim")?;
    ok(g, "moat delete --force lim")?;
    let left = g.sh(&format!(
        "[ -d /sys/fs/cgroup/lim ] && echo cgroup; s=$(cut -d' ' -f3 /proc/{pid}/stat 2>/dev/null); [ -n \"$s\" ] && [ \"$s\" != Z ] && echo init; moat state lim >/dev/null 2>&1 && echo state; true"
    ))?;
    check(left.stdout.trim().is_empty(), || {
        format!("left after delete --force: {left}")
    })
}

/// The eBPF device filter: an allowed device opens for what it allows, a
/// device node without a rule does not open at all. The container's cgroup
/// is two levels down (`cgroupsPath`): controllers are enabled on the way.
fn device_filter(g: &mut Guest) -> Result<(), String> {
    let (maj, min) = vda(g)?;
    let resources = json!({
        "devices": [{"allow": false, "access": "rwm"}, {"allow": true, "type": "b", "major": maj, "minor": min, "access": "r"}],
        "pids": {"limit": 8}
    });
    let devices = json!([
        {"path": "/dev/vda", "type": "b", "major": maj, "minor": min, "fileMode": 0o666},
        {"path": "/dev/kmsg", "type": "c", "major": 1, "minor": 11, "fileMode": 0o666}
    ]);
    let script = "head -c 16 /dev/vda; echo; \
        if cat /dev/kmsg >/dev/null; then echo kmsg-opened; else echo kmsg-refused; fi; \
        if printf x > /dev/vda; then echo vda-written; else echo vda-write-refused; fi; \
        cat /sys/fs/cgroup/pids.max";
    let mut c = config(&["sh", "-c", script], resources, devices, &[]);
    c["linux"]["cgroupsPath"] = json!("/moat.slice/dev");
    g.write_file("/run/t/dev/config.json", &bytes(&c))?;
    // moat removes the container's cgroup, not its parent (as runc).
    let out = g.sh(
        "moat run --bundle /run/t/dev dev; rc=$?; [ -d /sys/fs/cgroup/moat.slice/dev ] && echo left; rmdir /sys/fs/cgroup/moat.slice || echo no-parent; exit $rc",
    )?;
    let want = format!(
        "{}\nkmsg-refused\nvda-write-refused\n8\n",
        String::from_utf8_lossy(DISK_MARKER)
    );
    check(out.code == 0 && out.stdout == want, || {
        format!("expected stdout {want:?}; {out}")
    })?;
    check(
        out.stderr.matches("Operation not permitted").count() == 2,
        || format!("expected two EPERM refusals; {out}"),
    )
}

/// The record line of `moat run --json` (stderr).
fn json_record(out: &Out) -> Result<Value, String> {
    let line = out
        .stderr
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .ok_or_else(|| format!("no --json record; {out}"))?;
    serde_json::from_str(line).map_err(|e| format!("--json record: {e}; {out}"))
}

/// Touches 64 MiB at once: dd's buffer, filled by reading /dev/zero.
const HOG: &str = "dd if=/dev/zero of=/dev/null bs=64M count=1";

/// A workload over its memory limit is OOM-killed, and `moat run` says so
/// (memory.events).
fn oom(g: &mut Guest) -> Result<(), String> {
    let out = g.sh(&format!("moat run --memory 16m --json -- {HOG}"))?;
    check(out.code == 137, || {
        format!("expected a SIGKILLed workload; {out}")
    })?;
    check(
        out.stderr
            .contains("moat: killed: out of memory (limit 16 MiB)"),
        || format!("no OOM line; {out}"),
    )?;
    let rec = json_record(&out)?;
    check(
        rec["oom_killed"] == true && rec["memory_limit_bytes"] == 16 << 20,
        || format!("record {rec}"),
    )
}

/// Forks refused at the pids limit are counted (pids.events) and reported.
fn pids_limit(g: &mut Guest) -> Result<(), String> {
    let out = g.sh(
        "moat run --pids-limit 5 --json -- sh -c 'for i in 1 2 3 4 5 6 7 8; do sleep 10 & done; wait'",
    )?;
    check(
        out.stderr.contains("moat: process limit (5) reached: ")
            && out.stderr.contains("fork(s) refused"),
        || format!("no pids-limit line; {out}"),
    )?;
    let rec = json_record(&out)?;
    check(
        rec["pids_limit_hits"].as_u64().is_some_and(|n| n >= 1),
        || format!("record {rec}"),
    )
}

/// The subtree systemd delegates to user 1000 (`user@1000.service`),
/// with the controllers systemd's `user@.service` delegates (cpu, memory,
/// pids: not io), and the user's runtime directory. `delegate DIR` does
/// what systemd does for a `Delegate=yes` unit: chown the directory and
/// the files /sys/kernel/cgroup/delegate lists to the user.
const DELEGATE: &str = r#"set -e
delegate() {
    chown 1000:1000 $1
    for f in $(cat /sys/kernel/cgroup/delegate); do
        if [ -e $1/$f ]; then chown 1000:1000 $1/$f; fi
    done
}
S=/sys/fs/cgroup/user.slice
mkdir -p $S/user-1000.slice/user@1000.service
for p in /sys/fs/cgroup $S $S/user-1000.slice; do
    for c in cpu memory pids; do echo +$c > $p/cgroup.subtree_control; done
done
delegate $S/user-1000.slice/user@1000.service
mkdir -p /run/user/1000 /home/user
chown 1000:1000 /run/user/1000 /home/user
chmod 700 /run/user/1000
"#;

/// Runs `moat run ARGS` as user 1000, alone in a fresh delegated scope of
/// its subtree, as `systemd-run --user --scope -p Delegate=yes moat run …`
/// does; then checks that only moat's own leaf is left in the scope, and
/// removes the scope as systemd would when it ends.
fn as_delegated_user(g: &mut Guest, scope: &str, args: &str) -> Result<Out, String> {
    g.write_file(
        "/run/t/rootless.sh",
        format!("export XDG_RUNTIME_DIR=/run/user/1000\nexec moat run {args}\n").as_bytes(),
    )?;
    let s = format!("{DELEGATED}/{scope}");
    ok(
        g,
        &format!(
            "{DELEGATE}\nmkdir {s}\ndelegate {s}\nfor c in cpu memory pids; do echo +$c > {DELEGATED}/cgroup.subtree_control; done"
        ),
    )?;
    let out = g.sh(&format!(
        "sh -c 'echo $$ > {s}/cgroup.procs && exec su user -s /bin/sh -c \"exec sh /run/t/rootless.sh\"'"
    ))?;
    let left = g
        .sh(&format!(
            "find {s} -mindepth 1 -type d | sed 's|^{s}/||'; rmdir {s}/.moat 2>/dev/null; rmdir {s}"
        ))?
        .stdout;
    check(left.trim() == ".moat", || {
        format!("left in the delegated scope (only moat's leaf .moat expected): {left:?}; the run: {out}")
    })?;
    Ok(out)
}

/// A user with a delegated subtree: `moat run` puts the container's cgroup
/// in it, applies the limits, enforces them, and removes it afterwards.
fn rootless_delegated(g: &mut Guest) -> Result<(), String> {
    let out = as_delegated_user(
        g,
        "run-1.scope",
        "--memory 32m --pids-limit 10 --cpus 0.5 -- sh -c 'cd /sys/fs/cgroup && for f in memory.max pids.max cpu.max; do echo \"$f=$(cat $f)\"; done'",
    )?;
    let kv = key_values(&out.stdout);
    let want = [
        ("memory.max", "33554432"),
        ("pids.max", "10"),
        ("cpu.max", "50000 100000"),
    ];
    let wrong: Vec<String> = want
        .iter()
        .filter(|(k, v)| kv.get(*k).map(String::as_str) != Some(*v))
        .map(|(k, v)| format!("{k}: {:?}, expected {v:?}", kv.get(*k)))
        .collect();
    check(out.code == 0 && wrong.is_empty(), || {
        format!("{}; {out}", wrong.join("; "))
    })?;
    let hog = as_delegated_user(g, "run-2.scope", &format!("--memory 16m -- {HOG}"))?;
    check(
        hog.code == 137 && hog.stderr.contains("moat: killed: out of memory"),
        || format!("rootless OOM: {hog}"),
    )
}

/// A user whose cgroup is not delegated runs without cgroup limits (and
/// says so), and is refused when it asks for a limit.
fn rootless_undelegated(g: &mut Guest) -> Result<(), String> {
    let plain = g.sh(
        "su user -s /bin/sh -c 'XDG_RUNTIME_DIR=/run/user/1000 moat run -- cat /proc/self/cgroup'",
    )?;
    check(
        plain.code == 0 && plain.stderr.contains("no delegated cgroup"),
        || format!("without limits: {plain}"),
    )?;
    let limited = g.sh(
        "su user -s /bin/sh -c 'XDG_RUNTIME_DIR=/run/user/1000 moat run --memory 32m -- true'",
    )?;
    check(
        limited.code == 125 && limited.stderr.contains("Permission denied"),
        || format!("with --memory: {limited}"),
    )
}

/// No container, state or cgroup is left by the cases above.
fn nothing_left(g: &mut Guest) -> Result<(), String> {
    let out = ok(
        g,
        "moat list -q; su user -s /bin/sh -c 'XDG_RUNTIME_DIR=/run/user/1000 moat list -q'; find /sys/fs/cgroup -mindepth 1 -type d | grep -v '^/sys/fs/cgroup/user.slice'; true",
    )?;
    check(out.stdout.trim().is_empty(), || {
        format!("left behind: {out}")
    })
}
