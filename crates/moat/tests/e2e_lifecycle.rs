//! End-to-end: the container lifecycle and every CLI subcommand, checked from the
//! outside (state JSON, /proc, cgroup files) and from the inside (command output).
#![forbid(unsafe_code)]

mod common;

use common::*;
use serde_json::{json, Value};
use std::fs;
use std::path::Path;

fn sleeper() -> Bundle {
    Bundle::new(&["sleep", "1000"])
}

fn alive(pid: i32) -> bool {
    // A zombie is dead for our purposes (the reaper collects it shortly).
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

#[test]
fn lifecycle_create_start_kill_delete() {
    let Some(rt) = Rt::root_or_skip("lifecycle") else {
        return;
    };
    let b = sleeper();
    let c = rt.create(&b, &[]).expect("create");
    let st = c.state();
    assert_eq!(st["status"], "created", "{st}");
    assert_eq!(st["id"], c.id.as_str());
    assert!(st["ociVersion"].is_string(), "{st}");
    assert_eq!(
        Path::new(st["bundle"].as_str().unwrap_or_default()),
        b.dir()
    );
    let pid = c.pid();
    assert!(
        pid > 0 && alive(pid),
        "created container has a live init: {st}"
    );
    assert!(
        root_entries(&rt).contains(&c.id),
        "state dir entry for {}",
        c.id
    );

    c.start().expect_ok();
    assert_eq!(c.status(), "running");
    assert_eq!(c.pid(), pid, "start keeps the init pid");
    // The init is in its own pid namespace: a different one from ours.
    let ns = |p: &str| fs::read_link(format!("/proc/{p}/ns/pid")).expect("ns link");
    assert_ne!(ns(&pid.to_string()), ns("self"));

    c.kill("KILL").expect_ok();
    c.wait_status("stopped");
    rt.cmd(&["delete", &c.id]).expect_ok();
    rt.state(&c.id).expect_fail();
    assert!(
        !root_entries(&rt).contains(&c.id),
        "state dir entry left: {:?}",
        root_entries(&rt)
    );
    let t = std::time::Instant::now();
    while alive(pid) && t.elapsed().as_secs() < 10 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(!alive(pid), "init {pid} still alive after kill+delete");
}

#[test]
fn run_exit_status_is_the_containers() {
    let Some(rt) = Rt::root_or_skip("run_exit_status") else {
        return;
    };
    let b = Bundle::new(&["sh", "-c", "echo out-line; exit 3"]);
    let (c, out) = rt.run_fg(&b);
    assert_eq!(out.code, Some(3), "{out:?}");
    assert_eq!(out.stdout, "out-line\n");
    // `run` without --detach/--keep removes the container afterwards.
    rt.state(&c.id).expect_fail();
    assert!(root_entries(&rt).is_empty(), "{:?}", root_entries(&rt));

    let (_c, out) = rt.run_fg(&Bundle::new(&["true"]));
    assert_eq!(out.code, Some(0), "{out:?}");
}

#[test]
fn run_detach() {
    let Some(rt) = Rt::root_or_skip("run_detach") else {
        return;
    };
    let b = Bundle::new(&["sh", "-c", "echo detached-ok; exec sleep 1000"]);
    b.write_config();
    let id = rt.new_id("detach");
    let c = Ctr {
        rt: &rt,
        id: id.clone(),
        out: Some(rt.scratch_file("detached-out")),
    };
    let bd = b.dir().display().to_string();
    rt.cmd_with(
        &["run", "--detach", "--bundle", &bd, &id],
        Opts {
            stdout: c.out.clone(),
            ..Opts::default()
        },
    )
    .expect_ok();
    assert_eq!(c.status(), "running");
    c.wait_output("detached-ok");
    rt.cmd(&["delete", "--force", &id]).expect_ok();
    rt.state(&id).expect_fail();
}

#[test]
fn list_text_and_json() {
    let Some(rt) = Rt::root_or_skip("list") else {
        return;
    };
    let b1 = sleeper();
    let b2 = sleeper();
    let created = rt.create(&b1, &[]).expect("create");
    let running = rt.start_ok(&b2);

    let text = rt.cmd(&["list"]).expect_ok().stdout;
    let line_of = |id: &str| {
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .map(str::to_string)
    };
    assert!(
        text.lines().next().unwrap_or_default().contains("ID"),
        "header: {text}"
    );
    assert!(
        line_of(&created.id).is_some_and(|l| l.contains("created")),
        "{text}"
    );
    assert!(
        line_of(&running.id).is_some_and(|l| l.contains("running")),
        "{text}"
    );

    let v = rt.cmd(&["list", "--format", "json"]).expect_ok().json();
    let arr = v.as_array().expect("list --format json is an array");
    assert_eq!(arr.len(), 2, "{v}");
    let find = |id: &str| {
        arr.iter()
            .find(|e| e["id"] == id)
            .cloned()
            .unwrap_or(Value::Null)
    };
    assert_eq!(find(&created.id)["status"], "created");
    assert_eq!(find(&running.id)["status"], "running");
    assert_eq!(
        find(&running.id)["pid"].as_i64(),
        Some(running.pid() as i64)
    );
    assert_eq!(
        find(&running.id)["bundle"].as_str().map(Path::new),
        Some(b2.dir())
    );

    let quiet = rt.cmd(&["list", "-q"]).expect_ok().stdout;
    let mut ids: Vec<&str> = quiet.lines().collect();
    ids.sort();
    let mut want = vec![created.id.as_str(), running.id.as_str()];
    want.sort();
    assert_eq!(ids, want);
}

#[test]
fn ps_text_and_json() {
    let Some(rt) = Rt::root_or_skip("ps") else {
        return;
    };
    let b = Bundle::new(&["sh", "-c", "sleep 1000 & echo started; wait"]);
    let c = rt.start_ok(&b);
    c.wait_output("started");
    let init = c.pid();
    let v = rt
        .cmd(&["ps", "--format", "json", &c.id])
        .expect_ok()
        .json();
    let pids: Vec<i64> = v
        .as_array()
        .expect("ps json is an array")
        .iter()
        .filter_map(Value::as_i64)
        .collect();
    assert!(pids.contains(&(init as i64)), "init {init} in {pids:?}");
    assert_eq!(pids.len(), 2, "sh and sleep: {pids:?}");
    // The pids are host pids of processes in the container's pid namespace.
    let ns = |p: i64| fs::read_link(format!("/proc/{p}/ns/pid")).ok();
    for p in &pids {
        assert_eq!(ns(*p), ns(init as i64), "pid {p}");
    }
    let text = rt.cmd(&["ps", &c.id]).expect_ok().stdout;
    assert!(
        text.lines().next().unwrap_or_default().contains("PID"),
        "{text}"
    );
    assert!(text.contains("sleep 1000"), "{text}");
}

#[test]
fn pause_and_resume_freeze_the_cgroup() {
    let Some(rt) = Rt::root_or_skip("pause") else {
        return;
    };
    let mut b = sleeper();
    let cg = format!("/{}", rt.new_id("cg-pause"));
    b.set("/linux/cgroupsPath", json!(cg));
    let c = rt.start_ok(&b);
    let freezer = cgroup_v1_file("freezer", &cg, "freezer.state");
    assert_eq!(read_trim(&freezer), "THAWED");
    rt.cmd(&["pause", &c.id]).expect_ok();
    assert_eq!(c.status(), "paused");
    assert_eq!(read_trim(&freezer), "FROZEN");
    rt.cmd(&["resume", &c.id]).expect_ok();
    assert_eq!(c.status(), "running");
    assert_eq!(read_trim(&freezer), "THAWED");
    // A paused container can be killed and deleted.
    rt.cmd(&["pause", &c.id]).expect_ok();
    rt.cmd(&["delete", "--force", &c.id]).expect_ok();
    rt.state(&c.id).expect_fail();
    assert!(
        !freezer.parent().is_some_and(Path::exists),
        "cgroup {cg} left behind"
    );
}

#[test]
fn kill_all_kills_every_process() {
    let Some(rt) = Rt::root_or_skip("kill_all") else {
        return;
    };
    let b = Bundle::new(&["sh", "-c", "sleep 1000 & sleep 1000 & echo started; wait"]);
    let c = rt.start_ok(&b);
    c.wait_output("started");
    let v = rt
        .cmd(&["ps", "--format", "json", &c.id])
        .expect_ok()
        .json();
    let pids: Vec<i32> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_i64)
        .map(|p| p as i32)
        .collect();
    assert_eq!(pids.len(), 3, "{pids:?}");
    rt.cmd(&["kill", "--all", &c.id, "KILL"]).expect_ok();
    c.wait_status("stopped");
    let t = std::time::Instant::now();
    while pids.iter().any(|p| alive(*p)) && t.elapsed().as_secs() < 10 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(pids.iter().all(|p| !alive(*p)), "survivors among {pids:?}");
}

#[test]
fn kill_with_signal_reaches_the_init() {
    let Some(rt) = Rt::root_or_skip("kill_signal") else {
        return;
    };
    // sh as pid 1 ignores signals without a handler; the trap makes TERM visible.
    let b = Bundle::new(&[
        "sh",
        "-c",
        "trap 'echo got-term; exit 0' TERM; echo ready; while :; do sleep 0.1; done",
    ]);
    let c = rt.start_ok(&b);
    c.wait_output("ready");
    c.kill("TERM").expect_ok();
    c.wait_output("got-term");
    c.wait_status("stopped");
}

#[test]
fn delete_force_on_running_container() {
    let Some(rt) = Rt::root_or_skip("delete_force") else {
        return;
    };
    let b = sleeper();
    let c = rt.start_ok(&b);
    let pid = c.pid();
    rt.cmd(&["delete", &c.id]).expect_fail(); // running: plain delete refuses
    assert_eq!(c.status(), "running");
    rt.cmd(&["delete", "--force", &c.id]).expect_ok();
    rt.state(&c.id).expect_fail();
    assert!(root_entries(&rt).is_empty(), "{:?}", root_entries(&rt));
    let t = std::time::Instant::now();
    while alive(pid) && t.elapsed().as_secs() < 10 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(!alive(pid), "init {pid} survived delete --force");
}

#[test]
fn exec_args_env_cwd_user_and_status() {
    let Some(rt) = Rt::root_or_skip("exec") else {
        return;
    };
    let b = sleeper();
    let c = rt.start_ok(&b);
    assert_eq!(
        c.exec(&["echo", "hello", "world"]).expect_ok().stdout,
        "hello world\n"
    );
    let o = c
        .exec_opts(&["-e", "FOO=bar baz"], &["sh", "-c", "echo \"$FOO\""])
        .expect_ok();
    assert_eq!(o.stdout, "bar baz\n");
    assert_eq!(
        c.exec_opts(&["--cwd", "/etc"], &["pwd"]).expect_ok().stdout,
        "/etc\n"
    );
    let o = c
        .exec_opts(&["-u", "1000:1000"], &["sh", "-c", "id -u; id -g"])
        .expect_ok();
    assert_eq!(o.stdout, "1000\n1000\n");
    assert_eq!(c.exec(&["sh", "-c", "exit 7"]).code, Some(7));
    // The exec'd process is in the container's pid namespace: it sees the init as pid 1.
    let o = c.exec(&["cat", "/proc/1/cmdline"]).expect_ok();
    assert_eq!(o.stdout, "sleep\u{0}1000\u{0}");
    // exec into a missing binary fails.
    c.exec(&["/no/such/binary"]).expect_fail();
}

#[test]
fn exec_process_file() {
    let Some(rt) = Rt::root_or_skip("exec_process") else {
        return;
    };
    let b = sleeper();
    let c = rt.start_ok(&b);
    let process = json!({
        "terminal": false,
        "user": { "uid": 1000, "gid": 1000 },
        "args": ["sh", "-c", "echo \"$PF\"; pwd; id -u"],
        "env": ["PATH=/bin", "PF=from-process-file"],
        "cwd": "/tmp",
        "noNewPrivileges": true
    });
    let pf = rt.scratch_file("process.json");
    fs::write(&pf, process.to_string()).expect("write process.json");
    let pfs = pf.display().to_string();
    let o = c.exec_opts(&["--process", &pfs], &[]).expect_ok();
    assert_eq!(o.stdout, "from-process-file\n/tmp\n1000\n");
}

#[test]
fn pid_file_for_create_and_exec() {
    let Some(rt) = Rt::root_or_skip("pid_file") else {
        return;
    };
    let b = sleeper();
    let pf = rt.scratch_file("create.pid");
    let pfs = pf.display().to_string();
    let c = rt.create(&b, &["--pid-file", &pfs]).expect("create");
    let written: i32 = read_trim(&pf).parse().expect("pid file holds a number");
    assert_eq!(written, c.pid());
    c.start().expect_ok();

    let epf = rt.scratch_file("exec.pid");
    let epfs = epf.display().to_string();
    c.exec_opts(&["--detach", "--pid-file", &epfs], &["sleep", "999"])
        .expect_ok();
    let epid: i32 = read_trim(&epf)
        .parse()
        .expect("exec pid file holds a number");
    assert_ne!(epid, c.pid());
    let cmdline = fs::read_to_string(format!("/proc/{epid}/cmdline")).unwrap_or_default();
    assert_eq!(cmdline, "sleep\u{0}999\u{0}");
    let ns = |p: i32| fs::read_link(format!("/proc/{p}/ns/pid")).ok();
    assert_eq!(ns(epid), ns(c.pid()));
}

#[test]
fn events_stats_prints_one_stats_object() {
    let Some(rt) = Rt::root_or_skip("events_stats") else {
        return;
    };
    let mut b = sleeper();
    b.set(
        "/linux/cgroupsPath",
        json!(format!("/{}", rt.new_id("cg-ev"))),
    );
    let c = rt.start_ok(&b);
    let o = rt.cmd(&["events", "--stats", &c.id]).expect_ok();
    let lines: Vec<&str> = o.stdout.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{:?}", o.stdout);
    let v: Value = serde_json::from_str(lines[0]).expect("stats line is JSON");
    assert_eq!(v["type"], "stats", "{v}");
    assert_eq!(v["id"], c.id.as_str(), "{v}");
    assert!(v["data"].is_object(), "{v}");
    let pids = v["data"]["pids"]["current"].as_u64();
    assert_eq!(pids, Some(1), "{v}");
}

#[test]
fn update_memory_and_pids_limits() {
    let Some(rt) = Rt::root_or_skip("update") else {
        return;
    };
    let mut b = sleeper();
    let cg = format!("/{}", rt.new_id("cg-upd"));
    b.set("/linux/cgroupsPath", json!(cg));
    b.set("/linux/resources/memory", json!({ "limit": 256u64 << 20 }));
    b.set("/linux/resources/pids", json!({ "limit": 200 }));
    let c = rt.start_ok(&b);
    let mem = cgroup_v1_file("memory", &cg, "memory.limit_in_bytes");
    let pids = cgroup_v1_file("pids", &cg, "pids.max");
    assert_eq!(read_trim(&mem), (256u64 << 20).to_string());
    assert_eq!(read_trim(&pids), "200");
    rt.cmd(&["update", "--memory", "64M", "--pids-limit", "50", &c.id])
        .expect_ok();
    assert_eq!(read_trim(&mem), (64u64 << 20).to_string());
    assert_eq!(read_trim(&pids), "50");
    // The container still runs after the update.
    assert_eq!(c.exec(&["true"]).code, Some(0));
}

#[test]
fn features_prints_oci_versions() {
    let rt = Rt::new();
    let v = rt.cmd(&["features"]).expect_ok().json();
    for k in ["ociVersionMin", "ociVersionMax"] {
        let s = v[k].as_str().unwrap_or_else(|| panic!("{k} missing: {v}"));
        assert!(s.starts_with("1."), "{k} = {s}");
    }
    assert!(
        v["mountOptions"].is_array() || v["linux"].is_object(),
        "{v}"
    );
}

#[test]
fn spec_writes_config_json() {
    let rt = Rt::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().display().to_string();
    rt.cmd(&["spec", "--bundle", &d]).expect_ok();
    let v: Value = serde_json::from_str(
        &fs::read_to_string(dir.path().join("config.json")).expect("config.json"),
    )
    .expect("config.json is JSON");
    assert_eq!(v["root"]["path"], "rootfs");
    assert!(v["process"]["args"].is_array(), "{v}");
    let ns: Vec<&str> = v["linux"]["namespaces"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["type"].as_str())
        .collect();
    for want in ["pid", "network", "ipc", "uts", "mount"] {
        assert!(ns.contains(&want), "{want} in {ns:?}");
    }
    assert!(!ns.contains(&"user"), "{ns:?}");
    // It does not overwrite an existing config.json.
    rt.cmd(&["spec", "--bundle", &d]).expect_fail();

    let rl = tempfile::tempdir().expect("tempdir");
    let r = rl.path().display().to_string();
    rt.cmd(&["spec", "--rootless", "--bundle", &r]).expect_ok();
    let v: Value = serde_json::from_str(
        &fs::read_to_string(rl.path().join("config.json")).expect("config.json"),
    )
    .expect("rootless config.json is JSON");
    let ns: Vec<&str> = v["linux"]["namespaces"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["type"].as_str())
        .collect();
    assert!(ns.contains(&"user"), "{ns:?}");
    assert!(
        v["linux"]["uidMappings"]
            .as_array()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
    assert!(
        v["linux"]["gidMappings"]
            .as_array()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
}

/// A container created by the release before the tier seam (state format 1:
/// no `format` field, the container tier's cgroup among the common fields)
/// is still listed, stated, killed and deleted by this binary.
#[test]
fn state_written_by_the_previous_release_is_still_handled() {
    let Some(rt) = Rt::root_or_skip("state_written_by_the_previous_release") else {
        return;
    };
    if !rt.is_moat() {
        eprintln!("SKIP state_written_by_the_previous_release: moat's state format");
        return;
    }
    let b = sleeper();
    let c = rt.create(&b, &[]).expect("create");
    c.start().expect_ok();
    let pid = c.pid();
    let path = rt.root().join(&c.id).join("state.json");
    let now: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    assert_eq!(now["format"], 2, "{now}");
    assert_eq!(now["tier"], "container", "{now}");
    // Exactly the fields the previous release wrote, in its layout.
    let old = json!({
        "oci_version": now["oci_version"],
        "id": now["id"],
        "status": "running",
        "pid": now["pid"],
        "pid_start_time": now["pid_start_time"],
        "bundle": now["bundle"],
        "rootfs": now["rootfs"],
        "created": now["created"],
        "owner": "",
        "annotations": {},
        "tier": "container",
        "cgroup": now["tier_state"]["cgroup"],
        "poststop_hooks": [],
        "poststart_hooks": [],
        "own_pid_ns": true,
        "use_systemd_cgroup": false
    });
    fs::write(&path, old.to_string()).unwrap();

    let list = rt.cmd(&["list", "--format", "json"]).expect_ok().json();
    let listed = list
        .as_array()
        .and_then(|a| a.iter().find(|x| x["id"] == c.id.as_str()).cloned())
        .unwrap_or_else(|| panic!("{} not listed: {list}", c.id));
    assert_eq!(listed["status"], "running", "{listed}");
    assert_eq!(c.status(), "running");
    assert_eq!(c.pid(), pid);
    // The init's pids cgroup as the kernel sees it: the one the old state
    // names (a cgroup is named per state root: `<id>@<hash>` off the
    // default root).
    let own = read_trim(Path::new(&format!("/proc/{pid}/cgroup")));
    let in_pids = own
        .lines()
        .find_map(|l| l.split_once(":pids:").map(|(_, p)| p.to_owned()))
        .unwrap_or_else(|| panic!("no pids cgroup for {pid}: {own}"));
    assert!(in_pids.contains(c.id.as_str()), "{in_pids}");
    assert!(
        old["cgroup"]
            .to_string()
            .contains(in_pids.trim_start_matches('/')),
        "the old state names the init's cgroup {in_pids}: {}",
        old["cgroup"]
    );
    let cgroup = cgroup_v1_file("pids", &in_pids, "cgroup.procs");
    assert!(
        read_trim(&cgroup).lines().any(|p| p == pid.to_string()),
        "the init is in the cgroup the old state names"
    );
    rt.cmd(&["pause", &c.id]).expect_ok();
    assert_eq!(c.status(), "paused");
    rt.cmd(&["resume", &c.id]).expect_ok();
    c.kill("KILL").expect_ok();
    c.wait_status("stopped");
    rt.cmd(&["delete", &c.id]).expect_ok();
    assert!(!rt.root().join(&c.id).exists());
    assert!(!cgroup.exists(), "delete removed the old state's cgroup");
    assert!(!alive(pid));
}
