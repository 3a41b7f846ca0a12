//! End-to-end: `moat probe --json` copied into a busybox rootfs and run as
//! the container process, under moat (with `moat spec`'s default config) and
//! under runc (with `runc spec`'s), and on the bare host; plus a check that
//! running it on the host as root changes nothing.
#![forbid(unsafe_code)]

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The host test compares the host's mounts before and after; containers
/// started meanwhile by other tests of this file would add some.
static SERIAL: Mutex<()> = Mutex::new(());

const RUNC: &str = "/usr/sbin/runc";

fn moat_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_moat"))
}

/// A bundle whose process is `/bin/moat probe --json`.
fn probe_bundle() -> Bundle {
    let b = Bundle::new(&["/bin/moat", "probe", "--json"]);
    fs::copy(moat_bin(), b.rootfs().join("bin/moat"))
        .expect("copy the moat binary into the rootfs");
    b
}

/// Check id -> (result, detail).
fn results(doc: &Value) -> BTreeMap<String, (String, String)> {
    doc["checks"]
        .as_array()
        .expect("checks array")
        .iter()
        .map(|c| {
            (
                c["id"].as_str().unwrap().to_string(),
                (
                    c["result"].as_str().unwrap().to_string(),
                    c["detail"].as_str().unwrap_or("").to_string(),
                ),
            )
        })
        .collect()
}

#[track_caller]
fn expect(r: &BTreeMap<String, (String, String)>, id: &str, want: &str) {
    let (got, detail) = r.get(id).unwrap_or_else(|| panic!("no check {id}"));
    assert_eq!(got, want, "{id}: {detail}");
}

fn run_probe_in(rt: &Rt, bundle: &Bundle) -> Value {
    let (_c, out) = rt.run_fg(bundle);
    let out = out.expect_ok();
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("probe output is not JSON ({e}): {}", out.stdout))
}

fn check_summary(doc: &Value) {
    let s = &doc["summary"];
    let n = doc["checks"].as_array().unwrap().len() as u64;
    assert!(n >= 60, "only {n} checks");
    assert_eq!(s["total"], n);
    assert_eq!(
        s["blocked"].as_u64().unwrap()
            + s["allowed"].as_u64().unwrap()
            + s["n/a"].as_u64().unwrap(),
        n
    );
    for c in doc["checks"].as_array().unwrap() {
        assert!(c["practice"].as_str().is_some_and(|p| !p.is_empty()), "{c}");
    }
}

#[test]
fn probe_under_moat_default_spec() {
    let Some(mut rt) = Rt::root_or_skip("probe_under_moat_default_spec") else {
        return;
    };
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    rt.bin = moat_bin();
    let mut b = probe_bundle();
    // moat's own default config (`moat spec`), with the probe as the process.
    let spec_dir = tempfile::tempdir().unwrap();
    let o = rt
        .cmd(&["spec", "--bundle", &spec_dir.path().display().to_string()])
        .expect_ok();
    drop(o);
    b.config =
        serde_json::from_str(&fs::read_to_string(spec_dir.path().join("config.json")).unwrap())
            .unwrap();
    b.set("/process/args", json!(["/bin/moat", "probe", "--json"]));
    b.set("/process/terminal", json!(false));
    let doc = run_probe_in(&rt, &b);
    check_summary(&doc);
    let r = results(&doc);
    expect(&r, "security.no-new-privs", "blocked");
    for id in [
        "caps.sys-admin",
        "caps.sys-ptrace",
        "caps.sys-module",
        "caps.dac-read-search",
        "caps.net-admin",
        "caps.bounding-minimal",
    ] {
        expect(&r, id, "blocked");
    }
    for id in [
        "masked.proc-keys",
        "masked.proc-timer-list",
        "masked.sys-firmware",
        "readonly.proc-sys",
        "fs.root-readonly",
    ] {
        expect(&r, id, "blocked");
    }
    for id in [
        "ns.pid",
        "ns.ipc",
        "ns.uts",
        "ns.mnt",
        "ns.net",
        "net.interfaces",
        "escape.mount-syscall",
        "escape.mount-newns",
        "escape.write-core-pattern",
        "escape.release-agent",
        "escape.cgroup-mkdir",
        "escape.leaked-fds",
        "escape.open-by-handle",
        "escape.settime",
        "escape.reboot",
    ] {
        expect(&r, id, "blocked");
    }
}

#[test]
fn probe_under_runc_default_spec() {
    if !Path::new(RUNC).exists() {
        moat_core::testing::skip("probe_under_runc_default_spec", &format!("no {RUNC}"));
        return;
    }
    let Some(mut rt) = Rt::root_or_skip("probe_under_runc_default_spec") else {
        return;
    };
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    rt.bin = PathBuf::from(RUNC);
    // Bundle::new's config is what `runc spec` writes.
    let doc = run_probe_in(&rt, &probe_bundle());
    check_summary(&doc);
    let r = results(&doc);
    // runc spec: noNewPrivileges, 3 capabilities, masked and read-only paths, no seccomp.
    expect(&r, "security.no-new-privs", "blocked");
    expect(&r, "caps.effective-empty", "allowed");
    expect(&r, "caps.sys-admin", "blocked");
    expect(&r, "masked.proc-keys", "blocked");
    expect(&r, "readonly.proc-sys", "blocked");
    expect(&r, "ns.pid", "blocked");
    expect(&r, "ns.net", "blocked");
    // runc's example spec has no seccomp profile and no user namespace.
    expect(&r, "seccomp.mode", "allowed");
    expect(&r, "identity.userns", "allowed");
    expect(&r, "identity.uid", "allowed");
    // Docker masks /proc/interrupts; runc's example spec does not.
    expect(&r, "masked.proc-interrupts", "allowed");
}

/// Values the probe's attempts could change if one were not harmless.
fn host_sample() -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for p in [
        "/proc/sys/kernel/core_pattern",
        "/proc/sys/kernel/hostname",
        "/proc/sys/kernel/domainname",
        "/proc/sys/kernel/sysrq",
        "/proc/sys/kernel/modprobe",
        "/proc/sys/kernel/kexec_load_disabled",
        "/proc/sys/kernel/yama/ptrace_scope",
        "/proc/sys/vm/swappiness",
        "/proc/sys/vm/overcommit_memory",
        "/proc/swaps",
        "/proc/self/mountinfo",
    ] {
        m.insert(
            p.to_string(),
            fs::read_to_string(p).unwrap_or_else(|e| format!("<{e}>")),
        );
    }
    for dir in ["/tmp", "/dev/shm", "/run", "/var/tmp", "/"] {
        let names: Vec<String> = fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("moat-probe-"))
                    .collect()
            })
            .unwrap_or_default();
        m.insert(format!("{dir} moat-probe-*"), names.join(","));
    }
    // Child cgroups the probe may create (and must remove) next to ours.
    let cg = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    for line in cg.lines() {
        let mut f = line.splitn(3, ':');
        let (_, ctrl, path) = (f.next(), f.next().unwrap_or(""), f.next().unwrap_or(""));
        let base = if ctrl.is_empty() {
            PathBuf::from("/sys/fs/cgroup")
        } else {
            Path::new("/sys/fs/cgroup").join(ctrl)
        };
        for d in [base.join(path.trim_start_matches('/')), base] {
            let names: Vec<String> = fs::read_dir(&d)
                .map(|rd| {
                    rd.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .filter(|n| n.starts_with("moat-probe-"))
                        .collect()
                })
                .unwrap_or_default();
            m.insert(format!("{} moat-probe-*", d.display()), names.join(","));
        }
    }
    m
}

#[test]
fn probe_on_host_as_root_sees_everything_and_changes_nothing() {
    let Some(rt) = Rt::root_or_skip("probe_on_host_as_root") else {
        return;
    };
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let before = host_sample();
    let out = run_binary(
        &moat_bin(),
        &["probe".into(), "--json".into()],
        Opts::default(),
        &rt.scratch_file("out"),
        &rt.scratch_file("err"),
    )
    .expect_ok();
    let after = host_sample();
    for (k, v) in &before {
        assert_eq!(Some(v), after.get(k), "{k} changed while the probe ran");
    }
    assert_eq!(before.len(), after.len());
    let doc: Value = serde_json::from_str(&out.stdout).expect("probe JSON");
    check_summary(&doc);
    let r = results(&doc);
    // The test runs as root on the host: every capability is there.
    expect(&r, "identity.uid", "allowed");
    expect(&r, "caps.effective-empty", "allowed");
    expect(&r, "caps.sys-admin", "allowed");
    expect(&r, "ns.user", "allowed");
    expect(&r, "escape.unshare-user", "allowed");
    expect(&r, "escape.mount-newns", "allowed");
    expect(&r, "escape.mount-syscall", "allowed");
    expect(&r, "escape.mknod", "allowed");
    // The child the probe ptraces is its own sibling; root may attach.
    expect(&r, "escape.ptrace-sibling", "allowed");
}

#[test]
fn probe_text_table_lists_every_check() {
    let rt = Rt::new();
    // It runs on the host too: not while the host test compares.
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let out = run_binary(
        &moat_bin(),
        &["probe".into()],
        Opts::default(),
        &rt.scratch_file("out"),
        &rt.scratch_file("err"),
    )
    .expect_ok();
    let last = out.stdout.lines().last().unwrap_or("");
    assert!(
        last.contains(" checks: ") && last.contains("blocked"),
        "{last}"
    );
    assert!(
        out.stdout.lines().any(|l| l.starts_with("seccomp.mode ")),
        "{}",
        out.stdout
    );
}

/// `moat run` with no flags (the embedded default root) against runc's
/// default spec: the probe, bind-mounted into the container, shows what moat's
/// defaults add — own user namespace, no capabilities, an allow-list seccomp
/// filter, blocked escape classes, limits — and the difference is asserted.
#[test]
fn probe_under_moat_run_defaults_vs_runc() {
    let Some(rt) = Rt::root_or_skip("probe_under_moat_run_defaults_vs_runc") else {
        return;
    };
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let bin = fs::canonicalize(moat_bin()).expect("moat binary");
    let vol = format!("{}:/opt/moat/moat:ro", bin.display());
    let out = rt
        .cmd(&["run", "-v", &vol, "--", "/opt/moat/moat", "probe", "--json"])
        .expect_ok();
    let doc: Value = serde_json::from_str(&out.stdout).expect("probe JSON");
    check_summary(&doc);
    let moat = results(&doc);
    for (id, want) in [
        ("identity.userns", "blocked"),
        ("identity.uid", "blocked"),
        ("caps.effective-empty", "blocked"),
        ("security.no-new-privs", "blocked"),
        ("seccomp.mode", "blocked"),
        ("ns.net", "blocked"),
        ("ns.pid", "blocked"),
        ("escape.unshare-user", "blocked"),
        ("escape.io-uring", "blocked"),
        ("escape.userfaultfd", "blocked"),
        ("escape.keyctl", "blocked"),
        ("escape.add-key", "blocked"),
        ("escape.bpf-prog", "blocked"),
        ("escape.bpf-map", "blocked"),
        ("escape.perf-event-open", "blocked"),
        ("escape.ptrace-sibling", "blocked"),
        ("escape.mount-syscall", "blocked"),
        ("escape.init-module", "blocked"),
        ("net.raw-socket", "blocked"),
        ("cgroup.memory-limit", "blocked"),
        ("cgroup.pids-limit", "blocked"),
        ("fs.root-readonly", "blocked"),
    ] {
        expect(&moat, id, want);
    }
    let allowed = doc["summary"]["allowed"].as_u64().unwrap_or(u64::MAX);
    if Path::new(RUNC).exists() {
        let mut runc = Rt::new();
        runc.bin = PathBuf::from(RUNC);
        let runc_doc = run_probe_in(&runc, &probe_bundle());
        let runc_allowed = runc_doc["summary"]["allowed"].as_u64().unwrap_or(0);
        eprintln!(
            "probe 'allowed' checks: moat run defaults {allowed}, runc default spec {runc_allowed}"
        );
        assert!(
            allowed + 10 <= runc_allowed,
            "moat {allowed} vs runc {runc_allowed}"
        );
    }
}

/// Issue #14, 10: whatever the probe creates lives in one directory it
/// removes whatever happens; one left by a probe that was killed (its
/// process is gone) is removed by the next probe.
#[test]
fn probe_removes_what_a_killed_probe_left() {
    let Some(rt) = Rt::root_or_skip("probe_removes_what_a_killed_probe_left") else {
        return;
    };
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // A PID above pid_max belongs to no process, ever.
    let pid_max: u64 = read_trim("/proc/sys/kernel/pid_max")
        .parse()
        .expect("pid_max");
    let stale = PathBuf::from(format!("/tmp/moat-probe-{}", pid_max + 1));
    fs::create_dir(&stale).expect("stale dir");
    fs::write(stale.join("null"), "").expect("stale file");
    // And one of a live process (ours) is left alone.
    let live = PathBuf::from(format!("/tmp/moat-probe-{}", std::process::id()));
    fs::create_dir(&live).expect("live dir");
    let out = run_binary(
        &moat_bin(),
        &["probe".into(), "--json".into()],
        Opts::default(),
        &rt.scratch_file("out"),
        &rt.scratch_file("err"),
    );
    let live_kept = live.exists();
    let mine = format!("moat-probe-{}", std::process::id());
    let left: Vec<String> = fs::read_dir("/tmp")
        .expect("/tmp")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("moat-probe-") && *n != mine)
        .collect();
    let _ = fs::remove_dir(&live);
    let _ = fs::remove_dir_all(&stale);
    out.expect_ok();
    assert!(live_kept, "the probe removed a live process's directory");
    assert!(left.is_empty(), "left in /tmp: {left:?}");
}
