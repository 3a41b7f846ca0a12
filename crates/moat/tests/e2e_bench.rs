//! `moat bench`: its JSON validates against docs/bench.schema.json, its SVG
//! parses, the numbers are real measurements, and an interrupted run
//! leaves no container, process, cgroup or file behind.
#![forbid(unsafe_code)]

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn python(rt: &Rt, script: &str, args: &[String]) -> Out {
    let mut a = vec!["-c".to_string(), script.to_string()];
    a.extend_from_slice(args);
    let (out, err) = (rt.scratch_file("py.out"), rt.scratch_file("py.err"));
    run_binary(Path::new("python3"), &a, Opts::default(), &out, &err)
}

fn schema() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../docs/bench.schema.json")
        .display()
        .to_string()
}

/// What a bench run with work directory `dir` (the bench's PID) may leave:
/// nothing.
#[track_caller]
fn assert_nothing_left(pid: u32) {
    let dir = std::env::temp_dir().join(format!("moat-bench-{pid}"));
    assert!(!dir.exists(), "{} left behind", dir.display());
    let prefix = format!("moat-bench-{pid}-");
    for ctl in ["pids", "memory", "cpu", "devices", "freezer"] {
        if let Ok(rd) = std::fs::read_dir(Path::new("/sys/fs/cgroup").join(ctl)) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                assert!(!n.starts_with(&prefix), "cgroup {ctl}/{n} left behind");
            }
        }
    }
    for (p, _, _) in all_processes() {
        if let Ok(root) = std::fs::read_link(format!("/proc/{p}/root")) {
            assert!(
                !root.starts_with(&dir),
                "process {p} still runs in the bench's rootfs"
            );
        }
    }
}

#[test]
fn bench_json_follows_the_schema_and_the_svg_parses() {
    let Some(rt) = Rt::root_or_skip("bench_json") else {
        return;
    };
    if !rt.is_moat() {
        eprintln!("SKIP bench_json: moat's own command");
        return;
    }
    let json = rt.scratch_file("bench.json");
    let svg = rt.scratch_file("bench.svg");
    let (out, err) = (rt.scratch_file("bench.out"), rt.scratch_file("bench.err"));
    let mut cmd = rt.command();
    cmd.args(["bench", "--quick", "-n", "2", "--concurrency", "2"])
        .args([
            "--targets",
            "host,moat-container,runc",
            "--baseline",
            "runc",
        ])
        .arg("--json")
        .arg(&json)
        .arg("--svg")
        .arg(&svg)
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap());
    let mut child = spawn_own(&mut cmd);
    let pid = child.id();
    let st = wait_own(&mut child);
    let err = std::fs::read_to_string(&err).unwrap_or_default();
    assert!(st.success(), "moat bench failed: {err}");
    let table = std::fs::read_to_string(&out).unwrap();
    assert!(table.contains("ratio-to-runc"), "{table}");
    let v = python(
        &rt,
        "import json,sys,jsonschema\n\
         s=json.load(open(sys.argv[1]))\n\
         jsonschema.Draft202012Validator.check_schema(s)\n\
         errs=list(jsonschema.Draft202012Validator(s).iter_errors(json.load(open(sys.argv[2]))))\n\
         [print(e.message, list(e.path)) for e in errs]\n\
         sys.exit(1 if errs else 0)\n",
        &[schema(), json.display().to_string()],
    );
    assert!(v.ok(), "schema: {} {}", v.stdout, v.stderr);
    let svg_ok = python(
        &rt,
        "import sys,xml.etree.ElementTree as E\n\
         r=E.parse(sys.argv[1]).getroot()\n\
         ns='{http://www.w3.org/2000/svg}'\n\
         assert r.tag==ns+'svg', r.tag\n\
         labels=[t.text for t in r.iter(ns+'text')]\n\
         print('\\n'.join(l for l in labels if l))\n\
         assert len(list(r.iter(ns+'circle')))>=3\n",
        &[svg.display().to_string()],
    );
    assert!(svg_ok.ok(), "svg: {} {}", svg_ok.stdout, svg_ok.stderr);
    for name in ["host", "moat-container", "runc"] {
        assert!(
            svg_ok.stdout.lines().any(|l| l == name),
            "{name} not on the chart"
        );
    }
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(doc["baseline"], "runc");
    let targets = doc["targets"].as_array().unwrap();
    let get = |n: &str| {
        targets
            .iter()
            .find(|t| t["name"] == n)
            .unwrap_or_else(|| panic!("{n} missing"))
    };
    let (host, moat, runc) = (get("host"), get("moat-container"), get("runc"));
    for t in [host, moat, runc] {
        assert_eq!(t["errors"], serde_json::json!([]), "{t}");
        for m in [
            "run_true",
            "getpid",
            "open_close",
            "fork_exec_wait",
            "pipe_rtt",
        ] {
            assert!(
                t["metrics"][m]["median"].as_f64().unwrap() > 0.0,
                "{m} of {t}"
            );
        }
    }
    // The baseline's ratio to itself is 1; a container costs more to start
    // than a bare exec; a container blocks more of what probe tries.
    assert_eq!(runc["metrics"]["run_true"]["ratio"], 1.0);
    assert!(
        moat["metrics"]["run_true"]["median"].as_f64()
            > host["metrics"]["run_true"]["median"].as_f64()
    );
    let blocked = |t: &serde_json::Value| t["isolation"]["blocked"].as_u64().unwrap();
    assert!(blocked(moat) > blocked(host), "{moat}\n{host}");
    assert_eq!(moat["reach"], "direct");
    assert_eq!(host["reach"], "host");
    assert_eq!(
        moat["cost"]["runtime_pss_kib"], 0,
        "moat keeps no process beside a container"
    );
    assert_nothing_left(pid);
}

#[test]
fn an_interrupted_bench_leaves_nothing_behind() {
    let Some(rt) = Rt::root_or_skip("an_interrupted_bench") else {
        return;
    };
    if !rt.is_moat() {
        eprintln!("SKIP an_interrupted_bench: moat's own command");
        return;
    }
    let errf = rt.scratch_file("int.err");
    let mut cmd: Command = rt.command();
    cmd.args(["bench", "--quick", "--targets", "host,moat-container,runc"])
        .stdout(std::fs::File::create(rt.scratch_file("int.out")).unwrap())
        .stderr(std::fs::File::create(&errf).unwrap());
    let mut child = spawn_own(&mut cmd);
    let pid = child.id();
    // Interrupt once a container of each runtime has existed: their state
    // roots are made by the first `create`/`run` in them.
    let dir = std::env::temp_dir().join(format!("moat-bench-{pid}"));
    let roots: Vec<PathBuf> = ["moat-container", "runc"]
        .iter()
        .map(|n| dir.join(format!("root-{n}")))
        .collect();
    let start = Instant::now();
    while !roots.iter().all(|r| r.exists()) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "bench ended before it was interrupted"
        );
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "bench never started containers"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let st = wait_own(&mut child);
    let err = std::fs::read_to_string(&errf).unwrap_or_default();
    assert_eq!(st.code(), Some(130), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    assert_nothing_left(pid);
}
