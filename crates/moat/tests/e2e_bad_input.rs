//! End-to-end: bad input is refused with a non-zero exit, a short error, and
//! nothing left behind (no state entry, no cgroup, no process).
#![forbid(unsafe_code)]

mod common;

use common::*;
use serde_json::json;
use std::fs;
use std::path::Path;

/// Asserts the runtime refused cleanly. runc prints several log lines per error;
/// moat must print exactly one line on stderr.
#[track_caller]
fn assert_refused(rt: &Rt, o: &Out) {
    assert!(!o.ok() && o.code.is_some(), "should fail: {o:?}");
    assert!(!o.stderr.trim().is_empty(), "no error message: {o:?}");
    if rt.is_moat() {
        assert_eq!(
            o.stderr.trim_end().lines().count(),
            1,
            "one-line error expected: {:?}",
            o.stderr
        );
    }
}

/// Asserts nothing of container `id` (bundle `bundle`) survives.
#[track_caller]
fn assert_nothing_left(rt: &Rt, id: &str, bundle: &Path) {
    assert!(
        root_entries(rt).is_empty(),
        "state dir not empty: {:?}",
        root_entries(rt)
    );
    if !matches!(id, "" | "." | "..") && !id.contains('/') {
        for ctl in ["pids", "memory", "freezer", "devices", "cpu"] {
            let p = Path::new("/sys/fs/cgroup").join(ctl).join(id);
            assert!(!p.exists(), "cgroup {} left behind", p.display());
        }
    }
    assert!(
        processes_under(bundle).is_empty(),
        "processes left in {}",
        bundle.display()
    );
}

/// Runs `create` with a raw config.json text.
fn create_raw(rt: &Rt, b: &Bundle, text: &str) -> (String, Out) {
    fs::write(b.dir().join("config.json"), text).expect("write config.json");
    let id = rt.new_id("bad");
    let d = b.dir().display().to_string();
    let o = rt.cmd(&["create", "--bundle", &d, &id]);
    let _guard = Ctr {
        rt,
        id: id.clone(),
        out: None,
    };
    (id, o)
}

#[test]
fn malformed_config_json() {
    let Some(rt) = Rt::root_or_skip("malformed_config") else {
        return;
    };
    let b = Bundle::new(&["true"]);
    for text in [
        "{",
        "",
        "[]",
        "{\"ociVersion\": 5}",
        "{\"process\": {\"args\": \"notalist\"}, \"root\": {\"path\": \"rootfs\"}}",
    ] {
        let (id, o) = create_raw(&rt, &b, text);
        assert_refused(&rt, &o);
        rt.state(&id).expect_fail();
        assert_nothing_left(&rt, &id, b.dir());
    }
}

#[test]
fn missing_config_json() {
    let Some(rt) = Rt::root_or_skip("missing_config") else {
        return;
    };
    let b = Bundle::new(&["true"]);
    let id = rt.new_id("nocfg");
    let d = b.dir().display().to_string();
    let o = rt.cmd(&["create", "--bundle", &d, &id]);
    let _g = Ctr {
        rt: &rt,
        id: id.clone(),
        out: None,
    };
    assert_refused(&rt, &o);
    assert_nothing_left(&rt, &id, b.dir());
}

/// Unknown properties are not bad input: the runtime-spec says a runtime
/// MUST NOT fail on them. moat creates the container and warns once per
/// property, naming its JSON path (e2e_conformance checks the warnings and
/// `moat audit`'s findings); delete leaves nothing.
#[test]
fn unknown_fields_are_accepted() {
    let Some(rt) = Rt::root_or_skip("unknown_field") else {
        return;
    };
    let mut b = Bundle::new(&["true"]);
    b.set("/process/bogusField", json!(1));
    b.set("/linux/notAThing", json!({"x": 1}));
    let text = serde_json::to_string(&b.config).expect("json");
    let (id, o) = create_raw(&rt, &b, &text);
    assert!(o.ok(), "{o:?}");
    if rt.is_moat() {
        let warnings: Vec<&str> = o.stderr.lines().collect();
        assert_eq!(warnings.len(), 2, "{}", o.stderr);
        for p in ["process.bogusField", "linux.notAThing"] {
            assert!(warnings.iter().any(|w| w.contains(p)), "{p}: {}", o.stderr);
        }
    }
    // create_raw deleted it again.
    assert_nothing_left(&rt, &id, b.dir());
}

#[test]
fn invalid_ids() {
    let Some(rt) = Rt::root_or_skip("invalid_ids") else {
        return;
    };
    let b = Bundle::new(&["sleep", "100"]);
    b.write_config();
    let d = b.dir().display().to_string();
    let outside = rt
        .root()
        .parent()
        .map(|p| p.join("x"))
        .expect("root has a parent");
    let outside_before = outside.exists();
    for id in ["../x", "", "a/b", "..", ".", "/abs"] {
        let o = rt.cmd(&["create", "--bundle", &d, id]);
        if o.ok() {
            let _ = rt.cmd(&["delete", "--force", id]);
        }
        assert_refused(&rt, &o);
        assert_nothing_left(&rt, id, b.dir());
    }
    assert_eq!(
        outside.exists(),
        outside_before,
        "{} created outside --root",
        outside.display()
    );
    for ctl in ["pids", "memory"] {
        let p = Path::new("/sys/fs/cgroup").join(ctl).join("x");
        assert!(!p.exists(), "{} created by id ../x", p.display());
    }
}

#[test]
fn missing_rootfs() {
    let Some(rt) = Rt::root_or_skip("missing_rootfs") else {
        return;
    };
    let b = Bundle::new(&["true"]);
    fs::remove_dir_all(b.rootfs()).expect("remove rootfs");
    let text = serde_json::to_string(&b.config).expect("json");
    let (id, o) = create_raw(&rt, &b, &text);
    assert_refused(&rt, &o);
    assert_nothing_left(&rt, &id, b.dir());

    // Same through `run`.
    let (c, o) = rt.run_fg(&b);
    assert_refused(&rt, &o);
    assert_nothing_left(&rt, &c.id, b.dir());
}

#[test]
fn missing_executable() {
    let Some(rt) = Rt::root_or_skip("missing_executable") else {
        return;
    };
    let b = Bundle::new(&["/no/such/binary"]);
    let (c, o) = rt.run_fg(&b);
    assert_refused(&rt, &o);
    drop(c);
    assert_nothing_left(&rt, "", b.dir());
    // `create` refuses it, as runc and crun do, in the words engines read
    // the exit status from (Go's), and leaves nothing.
    for (prog, says) in [
        ("/no/such/binary", "no such file or directory"),
        ("no-such-command", "executable file not found in $PATH"),
    ] {
        let b = Bundle::new(&[prog]);
        b.write_config();
        let id = rt.new_id("noexe");
        let o = rt.cmd(&["create", "--bundle", &b.dir().display().to_string(), &id]);
        let _guard = Ctr {
            rt: &rt,
            id: id.clone(),
            out: None,
        };
        assert_refused(&rt, &o);
        assert!(o.stderr.contains(says), "{prog}: {o:?}");
        assert_nothing_left(&rt, &id, b.dir());
    }
}

#[test]
fn nonexistent_container() {
    let Some(rt) = Rt::root_or_skip("nonexistent") else {
        return;
    };
    let id = rt.new_id("ghost");
    for args in [
        vec!["state", id.as_str()],
        vec!["start", id.as_str()],
        vec!["kill", id.as_str(), "KILL"],
        vec!["delete", id.as_str()],
        vec!["exec", id.as_str(), "true"],
        vec!["pause", id.as_str()],
        vec!["ps", id.as_str()],
    ] {
        let o = rt.cmd(&args);
        assert_refused(&rt, &o);
    }
    assert!(root_entries(&rt).is_empty(), "{:?}", root_entries(&rt));
}

#[test]
fn duplicate_id_and_double_start() {
    let Some(rt) = Rt::root_or_skip("duplicate") else {
        return;
    };
    let b = Bundle::new(&["sleep", "1000"]);
    let c = rt.create(&b, &[]).expect("create");
    let pid = c.pid();
    let d = b.dir().display().to_string();
    let o = rt.cmd(&["create", "--bundle", &d, &c.id]);
    assert_refused(&rt, &o);
    // The existing container is untouched.
    assert_eq!(c.status(), "created");
    assert_eq!(c.pid(), pid);
    c.start().expect_ok();
    assert_refused(&rt, &c.start());
    assert_eq!(c.status(), "running");
    // Unknown signal.
    assert_refused(&rt, &c.kill("NOTASIGNAL"));
    assert_eq!(c.status(), "running");
}

#[test]
fn bad_bundle_path() {
    let Some(rt) = Rt::root_or_skip("bad_bundle") else {
        return;
    };
    let id = rt.new_id("nobundle");
    let o = rt.cmd(&["create", "--bundle", "/nonexistent/bundle/dir", &id]);
    assert_refused(&rt, &o);
    assert!(root_entries(&rt).is_empty(), "{:?}", root_entries(&rt));
}

#[test]
fn bad_landlock_annotation() {
    let Some(rt) = Rt::root_or_skip("bad_landlock_annotation") else {
        return;
    };
    if !rt.is_moat() {
        eprintln!("SKIP bad_landlock_annotation: dev.moat.landlock is moat's");
        return;
    }
    let b = Bundle::new(&["true"]);
    for bad in [
        "yes",
        r#"{"read":["relative"]}"#,
        r#"{"write":["/tmp/../etc"]}"#,
        r#"{"read":["/no/such/dir"]}"#,
    ] {
        let mut cfg = b.config.clone();
        cfg["annotations"] = json!({"dev.moat.landlock": bad});
        let text = serde_json::to_string(&cfg).expect("json");
        let (id, o) = create_raw(&rt, &b, &text);
        assert_refused(&rt, &o);
        assert!(
            o.stderr.contains("landlock"),
            "{bad}: the error names landlock: {o:?}"
        );
        assert_nothing_left(&rt, &id, b.dir());
    }
}

/// `--log FILE --log-format json|text` gets the same error the user sees on
/// stderr, as the record runc writes (containerd's shim reads the last
/// error there); `--debug` adds debug records to the file, not to stderr.
#[test]
fn errors_reach_the_log_file_in_runc_format() {
    let Some(rt) = Rt::root_or_skip("errors_reach_the_log_file") else {
        return;
    };
    if !rt.is_moat() {
        eprintln!("SKIP errors_reach_the_log_file: moat's records");
        return;
    }
    let missing = rt.scratch_file("no-such-bundle");
    let missing = missing.to_str().unwrap();
    let id = rt.new_id("log");
    for format in ["json", "text"] {
        let log = rt.scratch_file(&format!("log.{format}"));
        let log_s = log.to_str().unwrap();
        let o = rt.cmd(&[
            "--log",
            log_s,
            "--log-format",
            format,
            "--debug",
            "create",
            "--bundle",
            missing,
            &id,
        ]);
        assert_refused(&rt, &o);
        let shown = o
            .stderr
            .trim()
            .strip_prefix("moat: ")
            .expect("moat: prefix");
        assert!(shown.contains("no-such-bundle"), "{shown}");
        let text = fs::read_to_string(&log).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines.len() >= 2, "a debug record and the error: {text}");
        let last = lines.last().unwrap();
        match format {
            "json" => {
                let rec: serde_json::Value = serde_json::from_str(last).unwrap();
                assert_eq!(rec["level"], "error", "{rec}");
                assert_eq!(rec["msg"], shown, "{rec}");
                assert!(rec["time"].as_str().is_some_and(|t| t.ends_with('Z')));
                let first: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
                assert_eq!(first["level"], "debug", "{first}");
            }
            _ => {
                assert!(last.starts_with("time=\""), "{last}");
                assert!(last.contains(" level=error msg="), "{last}");
                assert!(last.contains("no-such-bundle"), "{last}");
            }
        }
        assert_nothing_left(&rt, &id, Path::new(missing));
    }
}
