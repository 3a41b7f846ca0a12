//! Manager tests: v2 against a fake tree (this host has no v2 controllers to
//! limit with), and, as root, the host's real v1 hierarchies plus its hybrid
//! v2 mount for the BPF device filter and the v2 freezer.
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use oci_spec::runtime::LinuxResources;

use super::*;

fn res(json: &str) -> LinuxResources {
    serde_json::from_str(json).expect("test resources parse")
}

fn put(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn get(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_owned()
}

/// A fake cgroup2 tree in a tempdir: mount root plus a pre-made container
/// directory holding the files the kernel would create.
struct FakeV2 {
    _tmp: tempfile::TempDir,
    host: HostPaths,
    mount: PathBuf,
}

const CTRLS: &str = "cpuset cpu io memory hugetlb pids";

fn fake_v2() -> FakeV2 {
    let tmp = tempfile::tempdir().unwrap();
    let mount = tmp.path().join("cg");
    put(&mount.join("cgroup.controllers"), CTRLS);
    put(&mount.join("cgroup.subtree_control"), "");
    let ctr = mount.join("ctr");
    put(&ctr.join("cgroup.controllers"), CTRLS);
    for f in [
        "memory.max",
        "memory.swap.max",
        "memory.low",
        "memory.high",
        "cpu.weight",
        "cpu.max",
        "cpuset.cpus",
        "cpuset.mems",
        "pids.max",
        "io.weight",
        "io.max",
        "cgroup.procs",
        "cgroup.freeze",
        "cgroup.subtree_control",
    ] {
        put(&ctr.join(f), "");
    }
    put(&ctr.join("cgroup.events"), "populated 1\nfrozen 1\n");
    let mountinfo = tmp.path().join("mountinfo");
    put(
        &mountinfo,
        &format!("30 23 0:26 / {} rw - cgroup2 cgroup2 rw\n", mount.display()),
    );
    let proc_cgroup = tmp.path().join("cgroup");
    put(&proc_cgroup, "0::/\n");
    let host = HostPaths {
        mountinfo,
        proc_cgroup,
        systemd_marker: tmp.path().join("no-systemd"),
    };
    FakeV2 {
        _tmp: tmp,
        host,
        mount,
    }
}

#[test]
fn fake_v2_applies_translated_values() {
    // Fake tree: this host's only cgroup2 mount has no resource controllers.
    let f = fake_v2();
    let m = CgroupManager::new_with(&f.host, Some(Path::new("/ctr")), "id", false, false).unwrap();
    assert!(m.is_v2());
    let ctr = f.mount.join("ctr");
    assert_eq!(m.mount_sources(), [(String::new(), ctr.clone())]);
    m.create(Some(&res(
        r#"{"memory":{"limit":1048576,"swap":3145728,"reservation":524288},
            "cpu":{"shares":1024,"quota":50000,"period":100000,"cpus":"0-1","mems":"0"},
            "pids":{"limit":64},
            "blockIO":{"weight":500,"throttleWriteBpsDevice":[{"major":8,"minor":0,"rate":1000}]},
            "unified":{"memory.high":"900000"}}"#,
    )))
    .unwrap();
    assert_eq!(get(&ctr.join("memory.max")), "1048576");
    assert_eq!(get(&ctr.join("memory.swap.max")), "2097152");
    assert_eq!(get(&ctr.join("memory.low")), "524288");
    assert_eq!(get(&ctr.join("memory.high")), "900000");
    assert_eq!(get(&ctr.join("cpu.weight")), "39");
    assert_eq!(get(&ctr.join("cpu.max")), "50000 100000");
    assert_eq!(get(&ctr.join("cpuset.cpus")), "0-1");
    assert_eq!(get(&ctr.join("pids.max")), "64");
    // No io.bfq.weight in the tree: the io.weight scale is used.
    assert_eq!(
        get(&ctr.join("io.weight")),
        format!("default {}", translate::blkio_to_io_weight(500))
    );
    assert_eq!(get(&ctr.join("io.max")), "8:0 wbps=1000");
    // The parent was asked to enable controllers (the fake file keeps the last write).
    assert!(get(&f.mount.join("cgroup.subtree_control")).starts_with('+'));

    m.add_pid(4242).unwrap();
    assert_eq!(get(&ctr.join("cgroup.procs")), "4242");
    put(&ctr.join("sub/cgroup.procs"), "7\n");
    assert_eq!(m.pids().unwrap(), [7, 4242]);
    m.freeze().unwrap();
    assert_eq!(get(&ctr.join("cgroup.freeze")), "1");

    let saved = m.to_saved();
    assert_eq!(CgroupManager::from_saved(&saved).unwrap(), m);
    assert!(CgroupManager::from_saved(&serde_json::json!({"cgroup_version": "3"})).is_err());
}

#[test]
fn fake_v2_parent_memory_limit() {
    // Fake tree: a pod's cgroup with a limit, the container's under it.
    let f = fake_v2();
    let m =
        CgroupManager::new_with(&f.host, Some(Path::new("/pod/ctr")), "id", false, false).unwrap();
    assert_eq!(m.parent_memory_limit(), None, "no parent file yet");
    put(&f.mount.join("pod/memory.max"), "max\n");
    assert_eq!(m.parent_memory_limit(), None, "unlimited");
    put(&f.mount.join("pod/memory.max"), "268435456\n");
    assert_eq!(m.parent_memory_limit(), Some(268435456));
}

#[test]
fn fake_v2_missing_controller_and_refused_value_are_errors() {
    let f = fake_v2();
    let ctr = f.mount.join("ctr");
    put(&ctr.join("cgroup.controllers"), "cpu memory");
    let m = CgroupManager::new_with(&f.host, Some(Path::new("/ctr")), "id", false, false).unwrap();
    let e = m.create(Some(&res(r#"{"pids":{"limit":5}}"#))).unwrap_err();
    assert!(
        matches!(&e, CgroupError::ControllerMissing { controller, .. } if controller == "pids"),
        "{e:?}"
    );
    // A file the "kernel" does not have: the error names file and value.
    put(&ctr.join("cgroup.controllers"), CTRLS);
    let e = m
        .update(&res(
            r#"{"hugepageLimits":[{"pageSize":"2MB","limit":2097152}]}"#,
        ))
        .unwrap_err();
    match e {
        CgroupError::Write { path, value, .. } => {
            assert_eq!(path, ctr.join("hugetlb.2MB.max"));
            assert_eq!(value, "2097152");
        }
        e => panic!("{e:?}"),
    }
    // memory+swap alone counts from the current memory.max.
    put(&ctr.join("memory.max"), "1048576\n");
    m.update(&res(r#"{"memory":{"swap":3145728}}"#)).unwrap();
    assert_eq!(get(&ctr.join("memory.swap.max")), "2097152");
    put(&ctr.join("memory.max"), "max\n");
    assert!(matches!(
        m.update(&res(r#"{"memory":{"swap":3145728}}"#)),
        Err(CgroupError::InvalidValue { .. })
    ));
    assert!(matches!(
        m.update(&res(r#"{"network":{"classID":1}}"#)),
        Err(CgroupError::Unsupported { .. })
    ));
    assert!(matches!(
        m.update(&res(r#"{"unified":{"../x.y":"1"}}"#)),
        Err(CgroupError::BadUnifiedKey { .. })
    ));
}

#[test]
fn fake_v2_kernel_tcp_is_a_warning_not_a_write() {
    let f = fake_v2();
    let m = CgroupManager::new_with(&f.host, Some(Path::new("/ctr")), "id", false, false).unwrap();
    let r = res(r#"{"memory":{"limit":1048576,"kernelTCP":65536}}"#);
    let notes = m.ignored_settings(&r);
    assert!(
        notes
            .iter()
            .any(|n| n.contains("kernelTCP") && n.contains("cgroup v2 has no equivalent")),
        "{notes:?}"
    );
    m.create(Some(&r)).unwrap();
    let ctr = f.mount.join("ctr");
    assert_eq!(get(&ctr.join("memory.max")), "1048576");
    let written: Vec<String> = std::fs::read_dir(&ctr)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("kmem") || n.contains("tcp"))
        .collect();
    assert!(written.is_empty(), "{written:?}");
}

#[test]
fn systemd_without_systemd_is_a_clear_error() {
    let f = fake_v2();
    let e = CgroupManager::new_with(
        &f.host,
        Some(Path::new("system.slice:moat:x")),
        "x",
        true,
        false,
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "systemd cgroup driver requested but systemd is not running"
    );
}

#[test]
fn relative_path_is_under_own_cgroup() {
    let f = fake_v2();
    put(&f.host.proc_cgroup, "0::/runtime/sub\n");
    let m = CgroupManager::new_with(&f.host, Some(Path::new("ctr")), "id", false, false).unwrap();
    assert_eq!(m.mount_sources()[0].1, f.mount.join("runtime/sub/ctr"));
}

#[test]
fn fake_v2_rootless_goes_under_own_cgroup_and_respects_its_processes() {
    let f = fake_v2();
    let own = f.mount.join("own");
    put(&own.join("cgroup.controllers"), CTRLS);
    put(&own.join("cgroup.subtree_control"), "");
    // A non-root cgroup (it has cgroup.type) with a process in it.
    put(&own.join("cgroup.type"), "domain");
    put(&own.join("cgroup.procs"), "4242\n");
    put(&own.join(".moat/cgroup.procs"), "");
    put(&f.host.proc_cgroup, "0::/own\n");
    // Rootless without cgroupsPath: under the runtime's own cgroup.
    let m = CgroupManager::new_with(&f.host, None, "c", false, true).unwrap();
    assert_eq!(m.mount_sources()[0].1, own.join("c"));
    // No limit: created, and nothing enabled in the populated parent (a
    // threaded controller would make it a thread root refusing the child).
    m.create(None).unwrap();
    assert!(own.join("c").is_dir());
    assert_eq!(get(&own.join("cgroup.subtree_control")), "");
    // A limit: the runtime moves itself into its leaf; another process
    // stays (here the fake 4242), so the controller cannot be enabled.
    let e = m.create(Some(&res(r#"{"pids":{"limit":5}}"#))).unwrap_err();
    assert!(
        matches!(&e, CgroupError::Populated { controller, .. } if controller == "pids"),
        "{e:?}"
    );
    assert_eq!(get(&own.join(".moat/cgroup.procs")), "0");
    assert_eq!(get(&own.join("cgroup.subtree_control")), "");
}

#[test]
fn v1_memory_write_order() {
    let s = |file: &str, value: &str| translate::Setting {
        controller: "memory".into(),
        file: file.into(),
        value: value.into(),
        alt: None,
        optional: false,
    };
    let plan = [
        s("memory.limit_in_bytes", "300"),
        s("memory.memsw.limit_in_bytes", "600"),
    ];
    let files = |v: Vec<&translate::Setting>| v.iter().map(|s| s.file.clone()).collect::<Vec<_>>();
    // Raising above the current limit: memsw first.
    assert_eq!(
        files(v1::order_memory(&plan, Some(100)))[0],
        "memory.memsw.limit_in_bytes"
    );
    // Lowering: memory first.
    assert_eq!(
        files(v1::order_memory(&plan, Some(1000)))[0],
        "memory.limit_in_bytes"
    );
}

#[test]
fn rootless_without_delegation() {
    if moat_core::testing::needs_root("rootless_without_delegation") {
        return;
    }
    let f = fake_v2();
    let m = CgroupManager::new_with(&f.host, Some(Path::new("/a/b")), "id", false, true).unwrap();
    // The tempdir is root's and 0700: the unprivileged child cannot mkdir.
    let code = moat_sys::process::run_in_child(0, || {
        if nix::unistd::setresuid(65534.into(), 65534.into(), 65534.into()).is_err() {
            return 10;
        }
        let no_limits = matches!(m.create(None), Err(CgroupError::NoDelegation { .. }));
        let with_limits = m.create(Some(&res(r#"{"pids":{"limit":5}}"#)));
        let limits_fail_hard =
            matches!(with_limits, Err(ref e) if !matches!(e, CgroupError::NoDelegation { .. }));
        match (no_limits, limits_fail_hard) {
            (true, true) => 0,
            (false, _) => 11,
            (_, false) => 12,
        }
    })
    .unwrap();
    assert_eq!(code, 0);
}

// ---- real kernel, as root ----

fn skip_unless_root_v1(name: &str) -> bool {
    if moat_core::testing::needs_root(name) {
        return true;
    }
    !Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists()
        && moat_core::testing::skip(name, "host has no cgroup v1 memory hierarchy")
}

fn sleeper() -> Child {
    Command::new("sleep")
        .arg("100")
        .spawn()
        .expect("spawn sleep")
}

/// Opens `dev` for reading in a child placed in the cgroup first; returns
/// the child's exit code: 0 opened, 1 EPERM, 2 other error, 3 add_pid failed.
fn open_in_cgroup(m: &CgroupManager, dev: &str) -> i32 {
    moat_sys::process::run_in_child(0, || {
        if m.add_pid(std::process::id() as i32).is_err() {
            return 3;
        }
        match std::fs::File::open(dev) {
            Ok(_) => 0,
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => 1,
            Err(_) => 2,
        }
    })
    .unwrap()
}

#[test]
fn real_v1_lifecycle() {
    if skip_unless_root_v1("real_v1_lifecycle") {
        return;
    }
    let id = format!("moat-test-{}-v1", std::process::id());
    let m = CgroupManager::new(None, &id, false, false).unwrap();
    assert!(!m.is_v2());
    let CgroupManager::V1(v1m) = &m else {
        unreachable!()
    };
    let dir = |c: &str| v1m.dir(c).unwrap().to_path_buf();
    assert_eq!(dir("memory"), Path::new("/sys/fs/cgroup/memory").join(&id));

    let hugetlb = Path::new("/sys/fs/cgroup/unified/cgroup.controllers").exists()
        && get(Path::new("/sys/fs/cgroup/unified/cgroup.controllers")).contains("hugetlb")
        && Path::new("/sys/kernel/mm/hugepages/hugepages-2048kB").exists();
    let huge = if hugetlb {
        r#","hugepageLimits":[{"pageSize":"2MB","limit":4194304}]"#
    } else {
        ""
    };
    let r = res(&format!(
        r#"{{"memory":{{"limit":67108864,"swap":134217728}},"pids":{{"limit":20}},
            "cpu":{{"shares":512,"quota":20000,"period":100000,"cpus":"0"}},
            "devices":[{{"allow":false,"access":"rwm"}},{{"allow":true,"type":"c","major":1,"minor":3,"access":"rwm"}}]{huge}}}"#
    ));
    let result = std::panic::catch_unwind(|| {
        m.create(Some(&r)).unwrap();
        assert_eq!(
            get(&dir("memory").join("memory.limit_in_bytes")),
            "67108864"
        );
        assert_eq!(
            get(&dir("memory").join("memory.memsw.limit_in_bytes")),
            "134217728"
        );
        assert_eq!(get(&dir("pids").join("pids.max")), "20");
        assert_eq!(get(&dir("cpu").join("cpu.shares")), "512");
        assert_eq!(get(&dir("cpu").join("cpu.cfs_quota_us")), "20000");
        assert_eq!(get(&dir("cpuset").join("cpuset.cpus")), "0");
        assert!(
            !get(&dir("cpuset").join("cpuset.mems")).is_empty(),
            "mems copied from parent"
        );
        assert_eq!(get(&dir("devices").join("devices.list")), "c 1:3 rwm");
        if hugetlb {
            let u = Path::new("/sys/fs/cgroup/unified").join(&id);
            assert_eq!(get(&u.join("hugetlb.2MB.max")), "4194304");
        } else {
            eprintln!("note: hybrid hugetlb not exercised (no v2 hugetlb or 2MB pages)");
        }

        // The device rules hold for a process in the cgroup.
        assert_eq!(open_in_cgroup(&m, "/dev/null"), 0);
        assert_eq!(open_in_cgroup(&m, "/dev/zero"), 1);

        // A refused value names file and value.
        let e = m.update(&res(r#"{"cpu":{"cpus":"999"}}"#)).unwrap_err();
        assert!(
            e.to_string().contains("cpuset.cpus") && e.to_string().contains("999"),
            "{e}"
        );
        m.update(&res(
            r#"{"pids":{"limit":30},"memory":{"limit":134217728,"swap":268435456}}"#,
        ))
        .unwrap();
        assert_eq!(get(&dir("pids").join("pids.max")), "30");
        assert_eq!(
            get(&dir("memory").join("memory.limit_in_bytes")),
            "134217728"
        );

        let mut a = sleeper();
        let mut b = sleeper();
        m.add_pid(a.id() as i32).unwrap();
        // b goes into a sub-cgroup of the pids hierarchy: pids() and destroy() recurse.
        let sub = dir("pids").join("sub");
        std::fs::create_dir(&sub).unwrap();
        std::fs::write(sub.join("cgroup.procs"), b.id().to_string()).unwrap();
        let pids = m.pids().unwrap();
        assert!(
            pids.contains(&(a.id() as i32)) && pids.contains(&(b.id() as i32)),
            "{pids:?}"
        );

        m.freeze().unwrap();
        assert_eq!(get(&dir("freezer").join("freezer.state")), "FROZEN");
        m.thaw().unwrap();
        assert_eq!(get(&dir("freezer").join("freezer.state")), "THAWED");

        let s = m.stats().unwrap();
        assert_eq!(s.pids.current, 2);
        assert_eq!(s.pids.limit, 30);
        assert_eq!(s.memory.usage.limit, 134217728);
        assert!(s.memory.usage.usage > 0);
        let j = serde_json::to_value(&s).unwrap();
        assert!(j["memory"]["raw"].get("cache").is_some());

        // Destroy while frozen: tasks still die.
        m.freeze().unwrap();
        m.destroy().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(a.wait().unwrap().signal(), Some(libc::SIGKILL));
        assert_eq!(b.wait().unwrap().signal(), Some(libc::SIGKILL));
    });
    // Clean up even when an assertion failed, then check nothing is left.
    let cleanup = m.destroy();
    for (_, p) in m.mount_sources() {
        assert!(!p.exists(), "{} left behind", p.display());
    }
    assert!(!Path::new("/sys/fs/cgroup/unified").join(&id).exists());
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
    cleanup.unwrap();
    m.destroy().unwrap(); // idempotent
}

#[test]
fn real_v1_parent_memory_limit() {
    if skip_unless_root_v1("real_v1_parent_memory_limit") {
        return;
    }
    let pod = format!("moat-test-{}-pod", std::process::id());
    let dir = Path::new("/sys/fs/cgroup/memory").join(&pod);
    std::fs::create_dir(&dir).unwrap();
    let result = std::panic::catch_unwind(|| {
        std::fs::write(dir.join("memory.limit_in_bytes"), "268435456").unwrap();
        let child = format!("/{pod}/ctr");
        let m = CgroupManager::new(Some(Path::new(&child)), "ctr", false, false).unwrap();
        assert_eq!(m.parent_memory_limit(), Some(268435456));
        // The hierarchy's root has no limit.
        let top =
            CgroupManager::new(Some(Path::new(&format!("/{pod}"))), "x", false, false).unwrap();
        assert_eq!(top.parent_memory_limit(), None);
    });
    let _ = std::fs::remove_dir(&dir);
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}

#[test]
fn real_v1_missing_controller_is_an_error() {
    if skip_unless_root_v1("real_v1_missing_controller_is_an_error") {
        return;
    }
    if Path::new("/sys/fs/cgroup/net_cls").exists() {
        eprintln!("skipping real_v1_missing_controller_is_an_error: net_cls is mounted here");
        return;
    }
    let id = format!("moat-test-{}-nocls", std::process::id());
    let m = CgroupManager::new(None, &id, false, false).unwrap();
    let e = m
        .create(Some(&res(r#"{"network":{"classID":5}}"#)))
        .unwrap_err();
    assert!(
        matches!(&e, CgroupError::ControllerMissing { controller, .. } if controller == "net_cls"),
        "{e:?}"
    );
    // Refused before anything was created.
    assert!(m.mount_sources().iter().all(|(_, p)| !p.exists()));
}

/// The hybrid host's v2 mount seen as a unified host: exercises the BPF
/// device filter, the v2 freezer and cgroup.kill on a real kernel.
#[test]
fn real_v2_devices_freeze_kill() {
    if moat_core::testing::needs_root("real_v2_devices_freeze_kill") {
        return;
    }
    let unified = Path::new("/sys/fs/cgroup/unified");
    if !unified.join("cgroup.procs").exists()
        && moat_core::testing::skip(
            "real_v2_devices_freeze_kill",
            &format!("no cgroup2 mount at {}", unified.display()),
        )
    {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let host = HostPaths {
        mountinfo: tmp.path().join("mountinfo"),
        proc_cgroup: tmp.path().join("cgroup"),
        systemd_marker: tmp.path().join("none"),
    };
    put(
        &host.mountinfo,
        &format!(
            "41 31 0:38 / {} rw - cgroup2 cgroup2 rw\n",
            unified.display()
        ),
    );
    put(&host.proc_cgroup, "0::/\n");
    let id = format!("moat-test-{}-v2", std::process::id());
    let m = CgroupManager::new_with(&host, None, &id, false, false).unwrap();
    let path = unified.join(&id);
    let result = std::panic::catch_unwind(|| {
        m.create(Some(&res(
            r#"{"devices":[{"allow":false,"access":"rwm"},{"allow":true,"type":"c","major":1,"minor":3,"access":"rwm"}]}"#,
        )))
        .unwrap();
        assert_eq!(open_in_cgroup(&m, "/dev/null"), 0);
        assert_eq!(open_in_cgroup(&m, "/dev/zero"), 1);
        // Update replaces the program rather than stacking a second one.
        m.update(&res(
            r#"{"devices":[{"allow":true,"type":"c","major":1,"access":"r"}]}"#,
        ))
        .unwrap();
        assert_eq!(open_in_cgroup(&m, "/dev/zero"), 0);
        assert_eq!(open_in_cgroup(&m, "/dev/full"), 0);
        assert_eq!(open_in_cgroup(&m, "/dev/tty"), 1);

        let mut a = sleeper();
        m.add_pid(a.id() as i32).unwrap();
        assert_eq!(m.pids().unwrap(), [a.id() as i32]);
        m.freeze().unwrap();
        assert!(get(&path.join("cgroup.events")).contains("frozen 1"));
        m.thaw().unwrap();
        assert!(get(&path.join("cgroup.events")).contains("frozen 0"));
        m.freeze().unwrap();
        m.destroy().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(a.wait().unwrap().signal(), Some(libc::SIGKILL));
    });
    let cleanup = m.destroy();
    assert!(!path.exists(), "{} left behind", path.display());
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
    cleanup.unwrap();
}
