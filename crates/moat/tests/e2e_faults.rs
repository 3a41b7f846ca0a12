//! Faults and what they leave (issue 15): a runtime killed at a step the
//! test controls (a hook of the config kills it: never "at N ms"), state that
//! cannot be read, the same ID under two state roots, directories left by
//! killed creates. After each, nothing may be left alive or on disk.
mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

fn rt(test: &str) -> Option<Rt> {
    let rt = Rt::root_or_skip(test)?;
    if !rt.is_moat() {
        eprintln!("SKIP {test}: moat's own guarantees");
        return None;
    }
    Some(rt)
}

/// Whether `pid` runs (a zombie does not).
fn alive(pid: i64) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
        })
        .unwrap_or(false)
}

/// Waits (up to 20 s) for `pid` to end; whether it did.
fn ends(pid: i64) -> bool {
    let start = Instant::now();
    while alive(pid) {
        if start.elapsed() > Duration::from_secs(20) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// cgroup directories (v1 pids and memory hierarchies, one level down) named
/// `name` or `name@…` (the name under a non-default state root).
fn cgroups_named(name: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for ctl in ["pids", "memory"] {
        let Ok(rd) = fs::read_dir(Path::new("/sys/fs/cgroup").join(ctl)) else {
            continue;
        };
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n == name || n.starts_with(&format!("{name}@")) {
                out.push(e.path());
            }
        }
    }
    out
}

/// `create` of `b` as `id`, its output.
fn create(rt: &Rt, b: &Bundle, id: &str) -> Out {
    b.write_config();
    let d = b.dir().display().to_string();
    rt.cmd(&["create", "--bundle", &d, id])
}

/// A bundle whose `createRuntime` hook records the OCI state (with the
/// container process's PID) in `seen` and SIGKILLs the runtime (its parent):
/// the runtime dies while its container process waits for it.
fn killed_at_create_runtime(seen: &Path, slow_path: bool) -> Bundle {
    let mut b = Bundle::new(&["sleep", "60"]);
    b.push(
        "/hooks/createRuntime",
        json!({"path": "/bin/sh", "args": ["sh", "-c", format!("cat > {}; kill -9 $PPID", seen.display())]}),
    );
    if slow_path {
        // A namespace joined by path: an intermediate process forks the init.
        b.set(
            "/linux/namespaces",
            json!([
                {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                {"type": "network", "path": format!("/proc/{}/ns/net", std::process::id())}
            ]),
        );
    }
    b
}

/// Issue 15, defect 1: a `create` SIGKILLed mid-setup used to leave its
/// container process alive for ever (host root in fresh namespaces, blocked
/// on a setup channel whose both ends it held). Now it dies with its
/// runtime; the state says stopped; `delete --force` removes the rest; the
/// ID can be created again.
#[test]
fn a_create_killed_mid_setup_takes_its_container_process_along() {
    let Some(rt) = rt("a_create_killed_mid_setup_takes_its_container_process_along") else {
        return;
    };
    for slow_path in [false, true] {
        let seen = rt.scratch_file("hook-state");
        let b = killed_at_create_runtime(&seen, slow_path);
        let id = rt.new_id("killed");
        let o = create(&rt, &b, &id);
        assert_eq!(o.signal, Some(9), "slow path {slow_path}: {o:?}");
        let st: serde_json::Value = serde_json::from_str(&fs::read_to_string(&seen).unwrap())
            .unwrap_or_else(|e| panic!("hook state: {e}"));
        let pid = st["pid"].as_i64().unwrap();
        assert!(pid > 0, "{st}");
        assert!(
            ends(pid),
            "slow path {slow_path}: container process {pid} outlived its runtime"
        );
        assert_eq!(rt.status(&id).as_deref(), Some("stopped"), "{id}");
        rt.cmd(&["delete", "--force", &id]).expect_ok();
        assert!(!rt.root().join(&id).exists());
        assert!(cgroups_named(&id).is_empty(), "{:?}", cgroups_named(&id));
    }
}

/// The state a killed `create` leaves blocks nothing: creating the same ID
/// again works (the abandoned directory is removed first), and so does a
/// directory left right after `create` made it (no state yet).
#[test]
fn an_id_left_by_a_killed_create_can_be_created_again() {
    let Some(rt) = rt("an_id_left_by_a_killed_create_can_be_created_again") else {
        return;
    };
    let seen = rt.scratch_file("hook-state");
    let id = rt.new_id("again");
    let o = create(&rt, &killed_at_create_runtime(&seen, false), &id);
    assert_eq!(o.signal, Some(9), "{o:?}");
    let b = Bundle::new(&["true"]);
    let o = create(&rt, &b, &id).expect_ok();
    assert!(
        o.stderr.contains("left by a create that was killed"),
        "{o:?}"
    );
    rt.cmd(&["delete", "--force", &id]).expect_ok();
    // Killed before its first save: a directory with only the lock file.
    fs::create_dir(rt.root().join(&id)).unwrap();
    fs::write(rt.root().join(&id).join("lock"), "").unwrap();
    create(&rt, &b, &id).expect_ok();
    // Never a created container.
    assert!(!create(&rt, &b, &id).ok());
    rt.cmd(&["delete", "--force", &id]).expect_ok();
    assert!(root_entries(&rt).is_empty(), "{:?}", root_entries(&rt));
}

/// Issue 15, defect 4: the same container ID under two state roots used to
/// share its cgroup (`/<id>`), so deleting one SIGKILLed the other.
#[test]
fn one_id_under_two_roots_has_two_cgroups() {
    let (Some(a), Some(b)) = (
        rt("one_id_under_two_roots_has_two_cgroups"),
        rt("one_id_under_two_roots_has_two_cgroups"),
    ) else {
        return;
    };
    let bundle = Bundle::new(&["sleep", "60"]);
    let id = a.new_id("twice");
    for rt in [&a, &b] {
        create(rt, &bundle, &id).expect_ok();
        rt.cmd(&["start", &id]).expect_ok();
    }
    assert_eq!(cgroups_named(&id).len(), 4, "{:?}", cgroups_named(&id));
    a.cmd(&["delete", "--force", &id]).expect_ok();
    assert_eq!(b.status(&id).as_deref(), Some("running"));
    b.cmd(&["delete", "--force", &id]).expect_ok();
    assert!(cgroups_named(&id).is_empty(), "{:?}", cgroups_named(&id));
    // `moat run --name` under two roots: the first ending leaves the other
    // running to its end.
    let dir = tempfile::tempdir().unwrap();
    let name = a.new_id("run-twice");
    let long = dir.path().join("long");
    let mut first = spawn_own(
        b.command()
            .args([
                "run",
                "--name",
                &name,
                "--",
                "sh",
                "-c",
                "echo ready; sleep 2; echo done",
            ])
            .stdout(fs::File::create(&long).unwrap()),
    );
    let start = Instant::now();
    while !fs::read_to_string(&long).unwrap().contains("ready") {
        assert!(start.elapsed() < Duration::from_secs(30), "never ready");
        std::thread::sleep(Duration::from_millis(10));
    }
    a.cmd(&["run", "--name", &name, "--", "true"]).expect_ok();
    let status = wait_own(&mut first);
    assert!(status.success(), "{status:?}");
    assert!(fs::read_to_string(&long).unwrap().contains("done"));
}

/// Issue 15, defect 8: `delete --force` of a container whose state file is
/// empty, garbage or a directory kills its process and removes its cgroups
/// (found from the saved config's cgroupsPath, or the ID and root).
#[test]
fn delete_force_of_an_unreadable_state_kills_and_removes() {
    let Some(rt) = rt("delete_force_of_an_unreadable_state_kills_and_removes") else {
        return;
    };
    let cg_path = format!("/moat-e2e-corrupt-{}", std::process::id());
    for (how, cgroups_path) in [
        ("empty", None),
        ("garbage", Some(cg_path.as_str())),
        ("directory", None),
    ] {
        let mut b = Bundle::new(&["sleep", "60"]);
        if let Some(p) = cgroups_path {
            b.set("/linux/cgroupsPath", json!(p));
        }
        let id = rt.new_id("corrupt");
        create(&rt, &b, &id).expect_ok();
        rt.cmd(&["start", &id]).expect_ok();
        let pid = rt.state(&id).json()["pid"].as_i64().unwrap();
        let state = rt.root().join(&id).join("state.json");
        match how {
            "empty" => fs::write(&state, "").unwrap(),
            "garbage" => fs::write(&state, "{\"format\": 2, \"id\": [").unwrap(),
            _ => {
                fs::remove_file(&state).unwrap();
                fs::create_dir(&state).unwrap();
            }
        }
        let o = rt.cmd(&["delete", "--force", &id]);
        assert!(o.ok(), "{how}: {o:?}");
        assert!(ends(pid), "{how}: container process {pid} survived");
        assert!(!rt.root().join(&id).exists(), "{how}: state left");
        let name = cgroups_path.map_or(id.clone(), |p| p.trim_start_matches('/').to_string());
        assert!(
            cgroups_named(&name).is_empty(),
            "{how}: {:?}",
            cgroups_named(&name)
        );
    }
}
