//! End-to-end: `moat audit` on the fixtures (runc's default spec, captured
//! `docker inspect` output, a risky and a hardened manifest, a hardened
//! spec), its exit status, stdin input, `--running`, and SARIF validated
//! against the official 2.1.0 schema.
#![forbid(unsafe_code)]

mod common;

use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/audit")
        .join(name)
        .display()
        .to_string()
}

fn audit(args: &[&str], stdin: Option<Vec<u8>>) -> Out {
    let rt = Rt::new();
    let mut full = vec!["audit".to_string()];
    full.extend(args.iter().map(|s| s.to_string()));
    run_binary(
        Path::new(env!("CARGO_BIN_EXE_moat")),
        &full,
        Opts {
            stdin,
            ..Opts::default()
        },
        &rt.scratch_file("out"),
        &rt.scratch_file("err"),
    )
}

fn findings(out: &Out) -> Vec<Value> {
    let doc: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", out.stdout));
    doc["findings"].as_array().expect("findings").clone()
}

fn has(f: &[Value], id: &str, location: &str) -> bool {
    f.iter().any(|x| x["id"] == id && x["location"] == location)
}

#[test]
fn runc_default_spec_findings_and_exit_codes() {
    let o = audit(&["--format", "json", &fixture("runc-spec.json")], None);
    assert_eq!(o.code, Some(1), "{o:?}");
    let f = findings(&o);
    assert!(has(&f, "no-userns", "/linux/namespaces"), "{f:?}");
    assert!(has(&f, "seccomp-missing", "/linux/seccomp"));
    assert!(has(&f, "no-memory-limit", "/linux/resources/memory/limit"));
    assert!(has(&f, "run-as-root", "/process/user/uid"));
    // runc's spec sets noNewPrivileges, a read-only root and masks /proc.
    for id in [
        "no-new-privileges",
        "writable-rootfs",
        "unmasked-proc",
        "host-network",
        "host-pid",
    ] {
        assert!(
            !f.iter().any(|x| x["id"] == id),
            "{id} should not fire: {f:?}"
        );
    }
    for x in &f {
        for k in ["id", "severity", "location", "why", "fix", "subject"] {
            assert!(x[k].as_str().is_some_and(|s| !s.is_empty()), "{k} in {x}");
        }
    }
    // Nothing at high: --fail-on high passes, --fail-on medium fails.
    assert_eq!(
        audit(&["--fail-on", "high", &fixture("runc-spec.json")], None).code,
        Some(0)
    );
    assert_eq!(
        audit(&["--fail-on", "medium", &fixture("runc-spec.json")], None).code,
        Some(1)
    );
}

#[test]
fn hardened_inputs_are_clean() {
    for f in ["hardened-spec.json", "hardened-pod.yaml"] {
        let o = audit(&["--format", "json", &fixture(f)], None);
        assert_eq!(o.code, Some(0), "{f}: {}", o.stdout);
        assert_eq!(findings(&o).len(), 0, "{f}");
    }
}

#[test]
fn risky_pod_yaml_paths() {
    let o = audit(
        &[
            "--format",
            "json",
            "--fail-on",
            "high",
            &fixture("risky-pod.yaml"),
        ],
        None,
    );
    assert_eq!(o.code, Some(1));
    let f = findings(&o);
    assert!(
        has(
            &f,
            "privileged",
            "doc 0: spec.containers[0].securityContext.privileged"
        ),
        "{f:?}"
    );
    assert!(has(&f, "host-network", "doc 0: spec.hostNetwork"));
    assert!(has(
        &f,
        "runtime-socket",
        "doc 0: spec.volumes[0].hostPath.path"
    ));
    assert!(has(
        &f,
        "sensitive-mount",
        "doc 0: spec.volumes[1].hostPath.path"
    ));
    assert!(has(
        &f,
        "cap-sys-admin",
        "doc 1: spec.template.spec.containers[0].securityContext.capabilities.add[0]"
    ));
    assert!(has(
        &f,
        "seccomp-unconfined",
        "doc 1: spec.template.spec.containers[0].securityContext.seccompProfile.type"
    ));
    assert!(has(
        &f,
        "no-new-privileges",
        "doc 1: spec.template.spec.containers[0].securityContext.allowPrivilegeEscalation"
    ));
    assert!(has(
        &f,
        "image-latest",
        "doc 1: spec.template.spec.containers[0].image"
    ));
}

#[test]
fn docker_inspect_per_container() {
    let o = audit(&["--format", "json", &fixture("docker-inspect.json")], None);
    assert_eq!(o.code, Some(1));
    let f = findings(&o);
    let of = |name: &str| {
        f.iter()
            .filter(|x| x["subject"] == name)
            .map(|x| x["id"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    let risky = of("risky");
    for id in [
        "privileged",
        "host-network",
        "host-pid",
        "runtime-socket",
        "sensitive-mount",
    ] {
        assert!(
            risky.contains(&id.to_string()),
            "risky lacks {id}: {risky:?}"
        );
    }
    let risky2 = of("risky2");
    for id in [
        "cap-sys-admin",
        "cap-dangerous",
        "seccomp-unconfined",
        "apparmor-unconfined",
        "host-device",
        "restart-policy",
        "no-new-privileges",
    ] {
        assert!(
            risky2.contains(&id.to_string()),
            "risky2 lacks {id}: {risky2:?}"
        );
    }
    let plain = of("plain");
    for id in [
        "cap-net-raw",
        "cap-drop-all",
        "writable-rootfs",
        "no-memory-limit",
        "no-pids-limit",
        "run-as-root",
    ] {
        assert!(
            plain.contains(&id.to_string()),
            "plain lacks {id}: {plain:?}"
        );
    }
    let hardened = of("hardened");
    for id in [
        "cap-net-raw",
        "writable-rootfs",
        "no-memory-limit",
        "no-pids-limit",
        "run-as-root",
        "no-new-privileges",
    ] {
        assert!(!hardened.contains(&id.to_string()), "hardened has {id}");
    }
    assert!(has(&f, "privileged", "/1/HostConfig/Privileged"));
}

#[test]
fn stdin_and_bad_input() {
    let text = std::fs::read(fixture("risky-pod.yaml")).unwrap();
    let o = audit(&["-", "--format", "json"], Some(text));
    assert_eq!(o.code, Some(1));
    assert!(!findings(&o).is_empty());
    let o = audit(&["-"], Some(b"{\"hello\": 1}".to_vec()));
    assert_eq!(o.code, Some(2), "{o:?}");
    assert!(o.stderr.contains("not an OCI config.json"), "{}", o.stderr);
    let o = audit(&["-"], Some(b"key: [unclosed".to_vec()));
    assert_eq!(o.code, Some(2), "{o:?}");
    assert_eq!(audit(&["/nonexistent/config.json"], None).code, Some(2));
    assert_eq!(
        audit(&["--fail-on", "bogus", &fixture("runc-spec.json")], None).code,
        Some(2)
    );
}

#[test]
fn running_reads_saved_configs() {
    let root = tempfile::tempdir().unwrap();
    let d = root.path().join("ctr1");
    std::fs::create_dir(&d).unwrap();
    std::fs::copy(fixture("runc-spec.json"), d.join("config.json")).unwrap();
    std::fs::create_dir(root.path().join("not-a-container")).unwrap();
    let rt = Rt::new();
    let args: Vec<String> = [
        "--root",
        &root.path().display().to_string(),
        "audit",
        "--running",
        "--format",
        "json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let o = run_binary(
        Path::new(env!("CARGO_BIN_EXE_moat")),
        &args,
        Opts::default(),
        &rt.scratch_file("o"),
        &rt.scratch_file("e"),
    );
    assert_eq!(o.code, Some(1), "{o:?}");
    let f = findings(&o);
    assert!(
        !f.is_empty() && f.iter().all(|x| x["subject"] == "container ctr1"),
        "{f:?}"
    );
    let empty = tempfile::tempdir().unwrap();
    let args: Vec<String> = [
        "--root",
        &empty.path().display().to_string(),
        "audit",
        "--running",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let o = run_binary(
        Path::new(env!("CARGO_BIN_EXE_moat")),
        &args,
        Opts::default(),
        &rt.scratch_file("o"),
        &rt.scratch_file("e"),
    );
    assert_eq!(o.code, Some(0), "{o:?}");
}

/// Validates SARIF output against the vendored OASIS schema with Python's
/// jsonschema (Draft 4, as the schema declares).
#[test]
fn sarif_validates_against_the_schema() {
    let probe = run_binary(
        Path::new("python3"),
        &["-c".into(), "import jsonschema".into()],
        Opts::default(),
        &tmp("p1"),
        &tmp("p2"),
    );
    if !probe.ok() {
        moat_core::testing::skip(
            "sarif_validates_against_the_schema",
            "python3 with jsonschema not available",
        );
        return;
    }
    for f in [
        "risky-pod.yaml",
        "docker-inspect.json",
        "runc-spec.json",
        "hardened-spec.json",
    ] {
        let o = audit(&["--format", "sarif", &fixture(f)], None);
        let sarif = tmp(&format!("{f}.sarif"));
        std::fs::write(&sarif, &o.stdout).unwrap();
        let script = "import json,sys,jsonschema\n\
            s=json.load(open(sys.argv[1]))\n\
            d=json.load(open(sys.argv[2]))\n\
            jsonschema.Draft4Validator.check_schema(s)\n\
            errs=list(jsonschema.Draft4Validator(s).iter_errors(d))\n\
            [print(e.message, list(e.path)) for e in errs]\n\
            sys.exit(1 if errs else 0)\n";
        let v = run_binary(
            Path::new("python3"),
            &[
                "-c".into(),
                script.into(),
                fixture("sarif-schema-2.1.0.json"),
                sarif.display().to_string(),
            ],
            Opts::default(),
            &tmp("v1"),
            &tmp("v2"),
        );
        assert!(
            v.ok(),
            "{f}: SARIF does not validate: {} {}",
            v.stdout,
            v.stderr
        );
        let doc: Value = serde_json::from_str(&o.stdout).unwrap();
        assert_eq!(doc["version"], "2.1.0");
        let results = doc["runs"][0]["results"].as_array().unwrap();
        assert_eq!(results.is_empty(), f.starts_with("hardened"), "{f}");
    }
    // A document that breaks the schema is caught (the check can fail).
    let bad = tmp("bad.sarif");
    std::fs::write(
        &bad,
        r#"{"version":"2.1.0","runs":[{"tool":{"driver":{}}}]}"#,
    )
    .unwrap();
    let v = run_binary(
        Path::new("python3"),
        &["-c".into(), "import json,sys,jsonschema\njsonschema.validate(json.load(open(sys.argv[2])), json.load(open(sys.argv[1])), cls=jsonschema.Draft4Validator)".into(), fixture("sarif-schema-2.1.0.json"), bad.display().to_string()],
        Opts::default(),
        &tmp("b1"),
        &tmp("b2"),
    );
    assert!(!v.ok(), "an invalid SARIF document validated");
}

fn tmp(name: &str) -> PathBuf {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().unwrap())
        .path()
        .join(name)
}
