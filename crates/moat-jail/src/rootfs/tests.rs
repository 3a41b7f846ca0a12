//! Real-kernel tests, as root: each builds a busybox rootfs in a temporary
//! directory and sets it up in a forked child with its own mount namespace,
//! checking the result from inside; the namespace dies with the child.
use std::io::{Read, Write};
use std::os::unix::fs::{symlink, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::*;

/// A bundle dir holding `rootfs/` with busybox and a few directories.
fn bundle() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("rootfs");
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    symlink("busybox", root.join("bin/sh")).unwrap();
    dir
}

fn spec(json: &str) -> Spec {
    moat_core::spec::parse_reader(json.as_bytes(), Path::new("config.json")).unwrap()
}

/// Runs `f` in a child with its own mount namespace (plus `extra` flags);
/// an Err is printed and becomes exit code 1.
fn in_child(extra: libc::c_int, f: impl FnOnce() -> Result<(), String>) -> i32 {
    moat_sys::process::run_in_child(libc::CLONE_NEWNS | extra, || match f() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("child check failed: {e}");
            1
        }
    })
    .unwrap()
}

/// Opens the host paths and prepares the root, in the calling process
/// (already in its own mount namespace), as the container's init does.
fn prepare_here(cfg: &RootfsConfig) -> Result<Root, String> {
    let host = HostPaths::open(cfg.spec, cfg.rootfs, cfg.bundle).map_err(|e| chain(&e))?;
    prepare(cfg, &host).map_err(|e| chain(&e))
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn expect_erofs(r: std::io::Result<std::fs::File>, what: &str) -> Result<(), String> {
    match r {
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => Ok(()),
        Err(e) => Err(format!("{what}: expected EROFS, got {e}")),
        Ok(_) => Err(format!("{what}: writable, expected read-only")),
    }
}

fn check(cond: bool, what: &str) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(what.to_owned())
    }
}

const FULL_SPEC: &str = r#"{
  "ociVersion": "1.2.0",
  "root": {"path": "rootfs", "readonly": true},
  "mounts": [
    {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
    {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
    {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
    {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
    {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
    {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
    {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "size=1m"]},
    {"destination": "/data", "type": "bind", "source": "hostdata", "options": ["rbind", "ro", "nosuid"]},
    {"destination": "/rec", "source": "hostdata", "options": ["rbind", "rro"]},
    {"destination": "/plain", "source": "hostdata", "options": ["rbind"]},
    {"destination": "/etc/hostname.bind", "source": "hostdata/file", "options": ["bind", "ro"]}
  ],
  "linux": {
    "namespaces": [{"type": "mount"}],
    "devices": [{"path": "/dev/mynull", "type": "c", "major": 1, "minor": 3, "fileMode": 384, "uid": 1000, "gid": 1001}],
    "maskedPaths": ["/proc/timer_list", "/proc/acpi", "/proc/does-not-exist", "/sys/firmware"],
    "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger", "/proc/no-such"]
  }
}"#;

#[test]
fn full_setup_from_inside() {
    if moat_core::testing::needs_root("full_setup_from_inside") {
        return;
    }
    let b = bundle();
    let hostdata = b.path().join("hostdata");
    std::fs::create_dir_all(hostdata.join("sub")).unwrap();
    std::fs::write(hostdata.join("file"), "hello").unwrap();
    let spec = spec(FULL_SPEC);
    let rootfs = b.path().join("rootfs");
    let cfg = RootfsConfig {
        spec: &spec,
        rootfs: &rootfs,
        bundle: b.path(),
        cgroup_mounts: &[],
        no_pivot: false,
        in_user_ns: false,
        own_mount_ns: true,
    };
    let code = in_child(libc::CLONE_NEWUTS, || {
        // A submount in the bind source: "rro" must reach it, "ro" must not.
        nix::mount::mount(
            Some("tmpfs"),
            &hostdata.join("sub"),
            Some("tmpfs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| format!("submount: {e}"))?;
        let root = prepare_here(&cfg)?;
        pivot(&cfg, &root).map_err(|e| chain(&e))?;
        write_sysctl("kernel.hostname", "moat-rootfs").map_err(|e| chain(&e))?;
        finish(&cfg).map_err(|e| chain(&e))?;
        inside_checks()
    });
    assert_eq!(code, 0);
    // Nothing leaked onto the host's view of the bundle.
    assert!(!hostdata.join("sub/x").exists());
    assert_eq!(std::fs::read_dir(hostdata.join("sub")).unwrap().count(), 0);
}

fn inside_checks() -> Result<(), String> {
    let w = |p: &str| {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(p)
    };
    // We are in the new root: busybox is at /bin/busybox, the old root is gone.
    check(
        Path::new("/bin/busybox").is_file(),
        "busybox not at /bin/busybox",
    )?;
    let info = std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| e.to_string())?;
    let roots = info
        .lines()
        .filter(|l| l.split(' ').nth(4) == Some("/"))
        .count();
    check(roots == 1, "old root still mounted")?;
    // Read-only root, writable tmpfs below it.
    expect_erofs(w("/newfile"), "/newfile")?;
    w("/tmp/ok").map_err(|e| format!("/tmp: {e}"))?;
    // Devices and /dev links.
    let null = std::fs::metadata("/dev/null").map_err(|e| e.to_string())?;
    check(
        null.file_type().is_char_device() && null.rdev() == rustix::fs::makedev(1, 3),
        "/dev/null",
    )?;
    check(null.permissions().mode() & 0o777 == 0o666, "/dev/null mode")?;
    w("/dev/null")
        .and_then(|mut f| f.write_all(b"x"))
        .map_err(|e| format!("write /dev/null: {e}"))?;
    let mine = std::fs::metadata("/dev/mynull").map_err(|e| e.to_string())?;
    check(
        mine.permissions().mode() & 0o7777 == 0o600 && mine.uid() == 1000 && mine.gid() == 1001,
        "/dev/mynull mode/owner",
    )?;
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stderr", "/proc/self/fd/2"),
        ("/dev/ptmx", "pts/ptmx"),
    ] {
        let t = std::fs::read_link(link).map_err(|e| format!("{link}: {e}"))?;
        check(
            t == Path::new(target),
            &format!("{link} -> {}", t.display()),
        )?;
    }
    check(
        !Path::new("/dev/core").exists(),
        "/dev/core without /proc/kcore",
    )?;
    check(Path::new("/dev/pts/ptmx").exists(), "devpts not mounted")?;
    // Binds: ro on the top mount only with "ro", on the submount too with "rro".
    let mut s = String::new();
    std::fs::File::open("/data/file")
        .and_then(|mut f| f.read_to_string(&mut s))
        .map_err(|e| e.to_string())?;
    check(s == "hello", "/data/file content")?;
    expect_erofs(w("/data/x"), "/data/x")?;
    w("/data/sub/x").map_err(|e| format!("/data/sub (only the top is ro): {e}"))?;
    expect_erofs(w("/rec/sub/y"), "/rec/sub/y")?;
    expect_erofs(w("/rec/y"), "/rec/y")?;
    w("/plain/sub/z").map_err(|e| format!("/plain/sub: {e}"))?;
    expect_erofs(w("/etc/hostname.bind"), "/etc/hostname.bind")?;
    let flags = rustix::fs::statvfs("/data")
        .map_err(|e| e.to_string())?
        .f_flag;
    check(
        flags.contains(rustix::fs::StatVfsMountFlags::NOSUID),
        "/data lost nosuid",
    )?;
    // Masked: a file reads empty, a directory is empty.
    let mut t = Vec::new();
    std::fs::File::open("/proc/timer_list")
        .and_then(|mut f| f.read_to_end(&mut t))
        .map_err(|e| e.to_string())?;
    check(t.is_empty(), "/proc/timer_list not masked")?;
    check(
        std::fs::read_dir("/sys/firmware")
            .map_err(|e| e.to_string())?
            .count()
            == 0,
        "/sys/firmware not masked",
    )?;
    // Read-only paths and sysfs.
    expect_erofs(w("/proc/sys/kernel/hostname"), "/proc/sys/kernel/hostname")?;
    expect_erofs(w("/sys/kernel/uevent_helper"), "/sys (ro)")?;
    let uts = rustix::system::uname();
    check(
        uts.nodename().to_bytes() == b"moat-rootfs",
        "sysctl kernel.hostname not written",
    )?;
    Ok(())
}

#[test]
fn hostile_symlinks_stay_inside_the_rootfs() {
    if moat_core::testing::needs_root("hostile_symlinks_stay_inside_the_rootfs") {
        return;
    }
    let b = bundle();
    let rootfs = b.path().join("rootfs");
    let unique = format!("moat-hostile-{}", std::process::id());
    let host_victim = PathBuf::from("/tmp").join(&unique);
    assert!(!host_victim.exists());
    symlink("/", rootfs.join("toslash")).unwrap();
    symlink(format!("../../../../../../tmp/{unique}"), rootfs.join("up")).unwrap();
    symlink("/etc", rootfs.join("etc-link")).unwrap();
    std::fs::write(b.path().join("payload"), "p").unwrap();
    let json = r#"{
      "ociVersion": "1.2.0", "root": {"path": "rootfs"},
      "mounts": [
        {"destination": "/up", "type": "tmpfs", "source": "tmpfs", "options": ["size=1m"]},
        {"destination": "/toslash/etc/evil", "type": "tmpfs", "source": "tmpfs"},
        {"destination": "../../../../evil2", "type": "bind", "source": "payload", "options": ["bind"]},
        {"destination": "/etc-link/passwd-over", "type": "bind", "source": "payload", "options": ["bind"]}
      ],
      "linux": {"namespaces": [{"type": "mount"}]}
    }"#;
    let spec = spec(json);
    let cfg = RootfsConfig {
        spec: &spec,
        rootfs: &rootfs,
        bundle: b.path(),
        cgroup_mounts: &[],
        no_pivot: false,
        in_user_ns: false,
        own_mount_ns: true,
    };
    let root_str = rootfs.to_string_lossy().into_owned();
    let unique2 = unique.clone();
    let code = in_child(0, move || {
        prepare_here(&cfg)?;
        // Before the pivot: every mount point is under the rootfs.
        let info = std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| e.to_string())?;
        let points: Vec<&str> = info.lines().filter_map(|l| l.split(' ').nth(4)).collect();
        for want in [
            format!("{root_str}/tmp/{unique2}"),
            format!("{root_str}/etc/evil"),
            format!("{root_str}/evil2"),
        ] {
            check(
                points.contains(&want.as_str()),
                &format!("no mount at {want}"),
            )?;
        }
        check(
            !points
                .iter()
                .any(|p| p.contains(&unique2) && !p.starts_with(&root_str)),
            "mount outside the rootfs",
        )?;
        check(
            !points.contains(&"/etc/evil") && !points.contains(&"/evil2"),
            "mount on the host root",
        )?;
        Ok(())
    });
    assert_eq!(code, 0);
    assert!(!host_victim.exists(), "host /tmp was touched");
    assert!(
        !Path::new("/evil2").exists()
            && !Path::new("/etc/evil").exists()
            && !Path::new("/etc/passwd-over").exists()
    );
    // The directories were created inside the rootfs instead.
    assert!(rootfs.join("tmp").join(&unique).is_dir());
    assert!(rootfs.join("etc/evil").is_dir());
    assert!(rootfs.join("etc/passwd-over").is_file());
}

#[test]
fn proc_on_a_symlink_or_inside_proc_is_refused() {
    if moat_core::testing::needs_root("proc_on_a_symlink_or_inside_proc_is_refused") {
        return;
    }
    let b = bundle();
    let rootfs = b.path().join("rootfs");
    std::fs::remove_dir(rootfs.join("proc")).unwrap();
    symlink("/", rootfs.join("proc")).unwrap();
    let on_symlink = spec(
        r#"{"ociVersion": "1.2.0", "root": {"path": "rootfs"},
            "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}]}"#,
    );
    let inside = spec(
        r#"{"ociVersion": "1.2.0", "root": {"path": "rootfs"},
            "mounts": [{"destination": "/proc/self/exe", "type": "bind", "source": "/bin/busybox", "options": ["bind"]}]}"#,
    );
    for (spec, want) in [(&on_symlink, "NotADirectory"), (&inside, "ProcDestination")] {
        let cfg = RootfsConfig {
            spec,
            rootfs: &rootfs,
            bundle: b.path(),
            cgroup_mounts: &[],
            no_pivot: false,
            in_user_ns: false,
            own_mount_ns: true,
        };
        let code = in_child(0, || {
            match HostPaths::open(cfg.spec, cfg.rootfs, cfg.bundle).and_then(|h| prepare(&cfg, &h))
            {
                Err(e) if format!("{e:?}").starts_with(want) => Ok(()),
                other => Err(format!("expected {want}, got {other:?}")),
            }
        });
        assert_eq!(code, 0, "{want}");
    }
}

#[test]
fn no_pivot_and_propagation() {
    if moat_core::testing::needs_root("no_pivot_and_propagation") {
        return;
    }
    let b = bundle();
    let rootfs = b.path().join("rootfs");
    let spec = spec(
        r#"{"ociVersion": "1.2.0", "root": {"path": "rootfs"},
            "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
                       {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["rshared"]}],
            "linux": {"rootfsPropagation": "private"}}"#,
    );
    let cfg = RootfsConfig {
        spec: &spec,
        rootfs: &rootfs,
        bundle: b.path(),
        cgroup_mounts: &[],
        no_pivot: true,
        in_user_ns: false,
        own_mount_ns: true,
    };
    let code = in_child(0, || {
        let root = prepare_here(&cfg)?;
        pivot(&cfg, &root).map_err(|e| chain(&e))?;
        finish(&cfg).map_err(|e| chain(&e))?;
        check(Path::new("/bin/busybox").is_file(), "not in the rootfs")?;
        let info = std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| e.to_string())?;
        let tmp = info
            .lines()
            .find(|l| l.split(' ').nth(4) == Some("/tmp"))
            .ok_or("no /tmp mount")?;
        check(tmp.contains(" shared:"), "/tmp not shared")?;
        // With no_pivot the rootfs is moved onto "/" and "/" is made private.
        let root = info
            .lines()
            .rev()
            .find(|l| l.split(' ').nth(4) == Some("/"))
            .ok_or("no / mount")?;
        check(
            !root.contains("shared:") && !root.contains("master:"),
            &format!("/ not private: {root}"),
        )?;
        // Devices were set up without a /dev tmpfs too.
        check(
            std::fs::metadata("/dev/zero")
                .map(|m| m.file_type().is_char_device())
                .unwrap_or(false),
            "/dev/zero",
        )
    });
    assert_eq!(code, 0);
}

#[test]
fn idmapped_bind_mount() {
    if moat_core::testing::needs_root("idmapped_bind_mount") {
        return;
    }
    let b = bundle();
    let rootfs = b.path().join("rootfs");
    std::fs::create_dir(b.path().join("hostdata")).unwrap();
    std::fs::write(b.path().join("hostdata/file"), "x").unwrap();
    let spec = spec(
        r#"{"ociVersion": "1.2.0", "root": {"path": "rootfs"},
            "mounts": [{"destination": "/idm", "type": "bind", "source": "hostdata", "options": ["rbind", "idmap"],
                        "uidMappings": [{"containerID": 0, "hostID": 1000, "size": 1}],
                        "gidMappings": [{"containerID": 0, "hostID": 2000, "size": 1}]}]}"#,
    );
    let cfg = RootfsConfig {
        spec: &spec,
        rootfs: &rootfs,
        bundle: b.path(),
        cgroup_mounts: &[],
        no_pivot: false,
        in_user_ns: false,
        own_mount_ns: true,
    };
    let code = in_child(0, || {
        prepare_here(&cfg)?;
        let m = std::fs::metadata(rootfs.join("idm/file")).map_err(|e| e.to_string())?;
        check(
            (m.uid(), m.gid()) == (1000, 2000),
            &format!("owner through the idmapped mount: {}:{}", m.uid(), m.gid()),
        )
    });
    assert_eq!(code, 0);
    let m = std::fs::metadata(b.path().join("hostdata/file")).unwrap();
    assert_eq!((m.uid(), m.gid()), (0, 0), "the host view is unchanged");
}

const CGROUP_SPEC: &str = r#"{"ociVersion": "1.2.0", "root": {"path": "rootfs"},
  "mounts": [{"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev"]},
             {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}],
  "linux": {"namespaces": [{"type": "mount"} NS]}}"#;

#[test]
fn cgroup_v1_binds_without_cgroupns() {
    if moat_core::testing::needs_root("cgroup_v1_binds_without_cgroupns")
        || (!Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists()
            && moat_core::testing::skip(
                "cgroup_v1_binds_without_cgroupns",
                "no cgroup v1 memory controller",
            ))
    {
        return;
    }
    let b = bundle();
    let rootfs = b.path().join("rootfs");
    let spec = spec(&CGROUP_SPEC.replace(" NS", ""));
    let mounts = [
        ("memory".to_owned(), PathBuf::from("/sys/fs/cgroup/memory")),
        (
            "cpu,cpuacct".to_owned(),
            PathBuf::from("/sys/fs/cgroup/cpu"),
        ),
    ];
    let cfg = RootfsConfig {
        spec: &spec,
        rootfs: &rootfs,
        bundle: b.path(),
        cgroup_mounts: &mounts,
        no_pivot: false,
        in_user_ns: false,
        own_mount_ns: true,
    };
    let code = in_child(0, || {
        prepare_here(&cfg)?;
        let cg = rootfs.join("sys/fs/cgroup");
        check(
            cg.join("memory/memory.limit_in_bytes").exists(),
            "memory hierarchy not bound",
        )?;
        check(
            std::fs::read_link(cg.join("cpuacct"))
                .map(|t| t == Path::new("cpu,cpuacct"))
                .unwrap_or(false),
            "cpuacct link",
        )?;
        let w = std::fs::OpenOptions::new()
            .write(true)
            .open(cg.join("memory/memory.limit_in_bytes"));
        expect_erofs(w, "memory.limit_in_bytes")?;
        match std::fs::create_dir(cg.join("x")) {
            Err(e) if e.raw_os_error() == Some(libc::EROFS) => Ok(()),
            other => Err(format!("cgroup tmpfs not read-only: {other:?}")),
        }
    });
    assert_eq!(code, 0);
}

#[test]
fn cgroup_v1_with_cgroupns() {
    if moat_core::testing::needs_root("cgroup_v1_with_cgroupns")
        || (!Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists()
            && moat_core::testing::skip(
                "cgroup_v1_with_cgroupns",
                "no cgroup v1 memory controller",
            ))
    {
        return;
    }
    let b = bundle();
    let rootfs = b.path().join("rootfs");
    let spec = spec(&CGROUP_SPEC.replace(" NS", r#", {"type": "cgroup"}"#));
    let mounts = [
        ("memory".to_owned(), PathBuf::new()),
        ("systemd".to_owned(), PathBuf::new()),
        ("unified".to_owned(), PathBuf::new()),
    ];
    let cfg = RootfsConfig {
        spec: &spec,
        rootfs: &rootfs,
        bundle: b.path(),
        cgroup_mounts: &mounts,
        no_pivot: false,
        in_user_ns: false,
        own_mount_ns: true,
    };
    let code = in_child(libc::CLONE_NEWCGROUP, || {
        prepare_here(&cfg)?;
        let cg = rootfs.join("sys/fs/cgroup");
        check(
            cg.join("memory/memory.limit_in_bytes").exists(),
            "memory cgroupfs",
        )?;
        check(
            cg.join("systemd/cgroup.procs").exists(),
            "named systemd hierarchy",
        )?;
        check(
            cg.join("unified/cgroup.controllers").exists(),
            "unified cgroup2",
        )?;
        let info = std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| e.to_string())?;
        let want = cg.join("memory");
        let mem = info
            .lines()
            .find(|l| l.split(' ').nth(4) == want.to_str())
            .ok_or("no memory mount")?;
        check(
            mem.split(' ').nth(5).is_some_and(|o| o.starts_with("ro")),
            "memory cgroupfs not ro",
        )
    });
    assert_eq!(code, 0);
}

#[test]
fn in_a_user_namespace() {
    if moat_core::testing::needs_root("in_a_user_namespace") {
        return;
    }
    let b = bundle();
    let rootfs = b.path().join("rootfs");
    let spec = spec(
        r#"{"ociVersion": "1.2.0", "root": {"path": "rootfs", "readonly": true},
            "mounts": [{"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
                       {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}],
            "linux": {"namespaces": [{"type": "mount"}, {"type": "user"}]}}"#,
    );
    let cfg = RootfsConfig {
        spec: &spec,
        rootfs: &rootfs,
        bundle: b.path(),
        cgroup_mounts: &[],
        no_pivot: false,
        in_user_ns: true,
        own_mount_ns: true,
    };
    let code = moat_sys::process::run_in_child(0, || {
        let r = (|| -> Result<(), String> {
            use nix::sched::{unshare, CloneFlags};
            unshare(CloneFlags::CLONE_NEWUSER).map_err(|e| e.to_string())?;
            std::fs::write("/proc/self/setgroups", "deny").map_err(|e| e.to_string())?;
            std::fs::write("/proc/self/uid_map", "0 0 1").map_err(|e| e.to_string())?;
            std::fs::write("/proc/self/gid_map", "0 0 1").map_err(|e| e.to_string())?;
            unshare(CloneFlags::CLONE_NEWNS).map_err(|e| e.to_string())?;
            let root = prepare_here(&cfg)?;
            pivot(&cfg, &root).map_err(|e| chain(&e))?;
            finish(&cfg).map_err(|e| chain(&e))?;
            // The host's node, bind-mounted; sysfs fell back to a read-only bind.
            let null = std::fs::metadata("/dev/null").map_err(|e| e.to_string())?;
            check(
                null.file_type().is_char_device() && null.rdev() == rustix::fs::makedev(1, 3),
                "/dev/null",
            )?;
            std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/null")
                .map_err(|e| format!("open /dev/null: {e}"))?;
            check(Path::new("/sys/kernel").is_dir(), "/sys not bound")?;
            expect_erofs(
                std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open("/sys/kernel/x"),
                "/sys",
            )?;
            expect_erofs(std::fs::File::create("/x"), "read-only root")
        })();
        match r {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("child check failed: {e}");
                1
            }
        }
    })
    .unwrap();
    assert_eq!(code, 0);
}
