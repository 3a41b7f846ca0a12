//! End-to-end: runtime-spec conformance where moat used to depart from it,
//! each case from the opencontainers/runtime-tools validation suite or a
//! real engine's config: a default-deny seccomp profile (no `close_range`,
//! `capset`, `setresuid`, `prctl` for the runtime's own use), failing
//! poststart/poststop hooks, `memory.kernelTCP`, a config without a mount
//! namespace, an unbindable rootfsPropagation, unknown properties, and a
//! bundle in a private directory with a user namespace.
#![forbid(unsafe_code)]

mod common;

use common::*;
use serde_json::{json, Value};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Bundle running `sh -c script`.
fn script(s: &str) -> Bundle {
    Bundle::new(&["sh", "-c", s])
}

/// A default-deny seccomp profile that allows what busybox `sh`, `grep`,
/// `cat` and `id` need and nothing a runtime uses for itself after loading
/// a filter: no `close_range`, `capset`, `setresuid`, `setgroups`,
/// `rt_sigprocmask` or `sendmsg`, and `prctl` only for `PR_GET_NAME`
/// (busybox asks its own name).
fn shell_only_profile() -> Value {
    let allow = [
        "execve",
        "arch_prctl",
        "brk",
        "mmap",
        "munmap",
        "mprotect",
        "madvise",
        "read",
        "write",
        "writev",
        "readv",
        "pread64",
        "lseek",
        "open",
        "openat",
        "close",
        "stat",
        "fstat",
        "lstat",
        "newfstatat",
        "statx",
        "access",
        "faccessat",
        "faccessat2",
        "readlink",
        "readlinkat",
        "getdents64",
        "getcwd",
        "chdir",
        "fcntl",
        "ioctl",
        "dup",
        "dup2",
        "dup3",
        "pipe",
        "pipe2",
        "clone",
        "clone3",
        "fork",
        "vfork",
        "wait4",
        "waitid",
        "exit",
        "exit_group",
        "getpid",
        "getppid",
        "gettid",
        "getuid",
        "geteuid",
        "getgid",
        "getegid",
        "getgroups",
        "getrandom",
        "uname",
        "prlimit64",
        "getrlimit",
        "rseq",
        "set_robust_list",
        "set_tid_address",
        "rt_sigaction",
        "rt_sigreturn",
        "sendfile",
        "futex",
        "sysinfo",
    ];
    json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": 1,
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [
            { "names": allow.to_vec(), "action": "SCMP_ACT_ALLOW" },
            { "names": ["prctl"], "action": "SCMP_ACT_ALLOW",
              "args": [{ "index": 0, "value": 16, "op": "SCMP_CMP_EQ" }] }
        ]
    })
}

fn status_hex(out: &str, key: &str) -> u64 {
    let v = out
        .lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(':')))
        .unwrap_or_else(|| panic!("{key} not in {out}"));
    u64::from_str_radix(v.trim(), 16).expect("hex")
}

const CAP_KILL: u64 = 1 << 5;
const CAP_SYS_ADMIN: u64 = 1 << 21;

/// Issue #14, 1: the runtime must not need anything from the user's filter
/// after loading it (close_range, capset, setresuid, prctl…), with
/// no_new_privs on or off, as root or not.
#[test]
fn default_deny_seccomp_profile_without_runtime_syscalls() {
    let Some(rt) = Rt::root_or_skip("default_deny_seccomp") else {
        return;
    };
    let check = "grep -E '^(Seccomp|NoNewPrivs|Cap(Prm|Eff|Amb|Bnd)):' /proc/self/status; \
                 id -u; mkdir /tmp/x 2>/dev/null && echo mkdir-allowed; echo done";
    for nnp in [true, false] {
        for uid in [0u32, 1000] {
            let mut b = script(check);
            b.push(
                "/mounts",
                tmpfs_mount("/tmp", &["nosuid", "nodev", "mode=1777"]),
            );
            b.set("/process/noNewPrivileges", json!(nnp));
            b.set("/process/user", json!({ "uid": uid, "gid": uid }));
            let kill = json!(["CAP_KILL"]);
            b.set(
                "/process/capabilities",
                json!({ "bounding": kill, "effective": kill, "permitted": kill,
                        "inheritable": kill, "ambient": kill }),
            );
            b.set("/linux/seccomp", shell_only_profile());
            let (_c, out) = rt.run_fg(&b);
            let what = format!("noNewPrivileges {nnp}, uid {uid}");
            assert!(out.ok(), "{what}: {out:?}");
            let o = &out.stdout;
            assert!(o.contains("Seccomp:\t2"), "{what}: {o}");
            assert!(
                o.contains(&format!("NoNewPrivs:\t{}", u8::from(nnp))),
                "{what}: {o}"
            );
            assert!(o.lines().any(|l| l == uid.to_string()), "{what}: {o}");
            // The filter holds: mkdir is not in the profile.
            assert!(!o.contains("mkdir-allowed"), "{what}: {o}");
            assert!(o.ends_with("done\n"), "{what}: {o}");
            // CAP_SYS_ADMIN, held for the load without no_new_privs, never
            // reaches the program.
            for k in ["CapPrm", "CapEff", "CapAmb", "CapBnd"] {
                assert_eq!(status_hex(o, k), CAP_KILL, "{what}: {k}: {o}");
                assert_eq!(status_hex(o, k) & CAP_SYS_ADMIN, 0, "{what}: {k}");
            }
        }
    }
}

/// Issue #14, 2: a failing poststart or poststop hook is a warning; the
/// hooks after it run, and the lifecycle goes on.
#[test]
fn failing_poststart_and_poststop_hooks_are_warnings() {
    let Some(rt) = Rt::root_or_skip("failing_post_hooks") else {
        return;
    };
    let out = tempfile::tempdir().expect("tempdir");
    let touch = |name: &str| {
        let p = out.path().join(name);
        json!({ "path": "/bin/sh", "args": ["sh", "-c", format!("cat > {}", p.display())] })
    };
    let fail = json!({ "path": "/bin/sh", "args": ["sh", "-c", "echo hook-broke >&2; exit 3"] });
    let mut b = script("echo workload-ran");
    b.set(
        "/hooks",
        json!({
            "poststart": [fail.clone(), touch("poststart-2")],
            "poststop": [fail, touch("poststop-2")]
        }),
    );
    // `run`: create, start (poststart), wait, delete (poststop).
    let (_c, o) = rt.run_fg(&b);
    assert!(o.ok(), "{o:?}");
    assert!(o.stdout.contains("workload-ran"), "{o:?}");
    for n in ["poststart-2", "poststop-2"] {
        let state = fs::read_to_string(out.path().join(n))
            .unwrap_or_else(|e| panic!("{n}: the hook after the failing one did not run: {e}"));
        assert!(state.contains("\"id\""), "{n}: {state}");
    }
    if rt.is_moat() {
        for stage in ["poststart", "poststop"] {
            assert!(
                o.stderr.lines().any(|l| l.starts_with("moat: warning: ")
                    && l.contains(stage)
                    && l.contains("hook-broke")),
                "{stage}: {}",
                o.stderr
            );
        }
    }
    // The same through create / start / delete.
    for f in ["poststart-2", "poststop-2"] {
        fs::remove_file(out.path().join(f)).expect("rm");
    }
    b.set("/process/args", json!(["sleep", "1000"]));
    let c = rt.create(&b, &[]).expect("create");
    c.start().expect_ok();
    assert!(out.path().join("poststart-2").exists());
    rt.cmd(&["delete", "--force", &c.id]).expect_ok();
    assert!(out.path().join("poststop-2").exists());
}

/// Issue #14, 3: memory.kernelTCP reaches cgroup v1's
/// memory.kmem.tcp.limit_in_bytes (this kernel has it).
#[test]
fn kernel_tcp_limit_on_cgroup_v1() {
    let Some(rt) = Rt::root_or_skip("kernel_tcp") else {
        return;
    };
    assert!(
        Path::new("/sys/fs/cgroup/memory/memory.kmem.tcp.limit_in_bytes").exists(),
        "this test needs cgroup v1 with memory.kmem.tcp (the CI host has it)"
    );
    let mut b = Bundle::new(&["sleep", "1000"]);
    let cg = format!("/{}", rt.new_id("kmem-tcp"));
    b.set("/linux/cgroupsPath", json!(cg));
    b.set(
        "/linux/resources/memory",
        json!({ "limit": 256u64 << 20, "kernelTCP": 2u64 << 20 }),
    );
    let c = rt.create(&b, &[]).expect("create");
    assert_eq!(
        read_trim(cgroup_v1_file(
            "memory",
            &cg,
            "memory.kmem.tcp.limit_in_bytes"
        )),
        (2u64 << 20).to_string()
    );
    // And update changes it (runc's flag for it).
    rt.cmd(&["update", "--kernel-memory-tcp", "4m", &c.id])
        .expect_ok();
    assert_eq!(
        read_trim(cgroup_v1_file(
            "memory",
            &cg,
            "memory.kmem.tcp.limit_in_bytes"
        )),
        "4194304"
    );
}

/// The optional fields (propagation) of the host's "/" mount.
fn host_root_propagation() -> String {
    let info = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    info.lines()
        .find(|l| l.split(' ').nth(4) == Some("/"))
        .map(|l| {
            l.split(' ')
                .skip(6)
                .take_while(|f| *f != "-")
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

fn host_mounts_mentioning(dir: &Path) -> Vec<String> {
    let d = dir.to_string_lossy().into_owned();
    fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .filter(|l| l.contains(&d))
        .map(str::to_string)
        .collect()
}

/// Issue #14, 4: no mount namespace in the config: the container shares
/// ours (the spec's "inherited"), nothing is mounted on the host, only the
/// root changes; exec lands in the same root; `moat audit` rates it high.
#[test]
fn no_mount_namespace_is_honoured_without_touching_host_mounts() {
    let Some(rt) = Rt::root_or_skip("no_mount_namespace") else {
        return;
    };
    if !rt.is_moat() {
        // runc bind-mounts the rootfs and more in the host's namespace.
        eprintln!("SKIP no_mount_namespace: moat only (runc mounts on the host)");
        return;
    }
    let mut b = script("ls /; cat /marker");
    fs::write(b.rootfs().join("marker"), "inside-the-rootfs\n").expect("marker");
    b.set(
        "/linux/namespaces",
        json!([{ "type": "pid" }, { "type": "network" }, { "type": "ipc" }, { "type": "uts" }]),
    );
    let prop_before = host_root_propagation();
    let (_c, o) = rt.run_fg(&b);
    assert!(o.ok(), "{o:?}");
    assert!(o.stdout.contains("inside-the-rootfs"), "{o:?}");
    assert!(o.stdout.lines().any(|l| l == "marker"), "{o:?}");
    assert!(o.stderr.contains("no mount namespace"), "{o:?}");
    assert!(
        host_mounts_mentioning(b.dir()).is_empty(),
        "mounts left on the host: {:?}",
        host_mounts_mentioning(b.dir())
    );
    assert_eq!(
        host_root_propagation(),
        prop_before,
        "host / propagation changed"
    );

    // A live one: same mount namespace as ours, root = the rootfs; exec too.
    b.set("/process/args", json!(["sleep", "1000"]));
    let c = rt.start_ok(&b);
    let theirs = fs::read_link(format!("/proc/{}/ns/mnt", c.pid())).expect("ns");
    assert_eq!(theirs, fs::read_link("/proc/self/ns/mnt").expect("ns"));
    assert_eq!(
        fs::read_link(format!("/proc/{}/root", c.pid())).expect("root"),
        fs::canonicalize(b.rootfs()).expect("canonical")
    );
    let e = c.exec(&["cat", "/marker"]).expect_ok();
    assert_eq!(e.stdout, "inside-the-rootfs\n");
    drop(c);
    assert!(host_mounts_mentioning(b.dir()).is_empty());

    // moat audit: high.
    b.write_config();
    let cfg = b.dir().join("config.json");
    let a = rt.cmd(&["audit", "--format", "json", cfg.to_str().unwrap()]);
    let doc: Value = serde_json::from_str(&a.stdout).expect("audit json");
    let f = doc["findings"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|f| f["id"] == "host-mount-ns")
        .unwrap_or_else(|| panic!("no host-mount-ns finding: {}", a.stdout));
    assert_eq!(f["severity"], "high", "{f}");
}

/// Issue #14, 5: rootfsPropagation "unbindable" (and "runbindable") works:
/// applied to the container's root once it is in place.
#[test]
fn unbindable_rootfs_propagation() {
    let Some(rt) = Rt::root_or_skip("unbindable_rootfs_propagation") else {
        return;
    };
    for p in ["unbindable", "runbindable"] {
        let mut b = script("awk '$5 == \"/\"' /proc/self/mountinfo");
        b.set("/linux/rootfsPropagation", json!(p));
        let (_c, o) = rt.run_fg(&b);
        assert!(o.ok(), "{p}: {o:?}");
        assert!(o.stdout.contains(" unbindable "), "{p}: {o:?}");
    }
}

/// Issue #14, 6: unknown properties are not an error (the runtime-spec's
/// MUST), but each is a warning naming its JSON path, on stderr and in the
/// `--log` file, and `moat audit` finds those under security objects.
#[test]
fn unknown_properties_are_warnings() {
    let Some(rt) = Rt::root_or_skip("unknown_properties") else {
        return;
    };
    let mut b = script("echo ran");
    b.set("/process/bogusField", json!(1));
    b.set(
        "/linux/seccompp",
        json!({ "defaultAction": "SCMP_ACT_ERRNO" }),
    );
    b.set("/root/readOnly", json!(true));
    b.config["mounts"][0]["optoins"] = json!(["ro"]);
    b.write_config();
    let log = rt.scratch_file("log");
    let id = rt.new_id("unknown");
    let bundle = b.dir().display().to_string();
    let o = rt.cmd(&[
        "--log",
        log.to_str().unwrap(),
        "run",
        "--bundle",
        &bundle,
        &id,
    ]);
    let _g = Ctr {
        rt: &rt,
        id: id.clone(),
        out: None,
    };
    assert!(o.ok(), "{o:?}");
    assert_eq!(o.stdout, "ran\n");
    if !rt.is_moat() {
        return;
    }
    let paths = [
        "process.bogusField",
        "linux.seccompp",
        "root.readOnly",
        "mounts[0].optoins",
    ];
    let warned: Vec<&str> = o
        .stderr
        .lines()
        .filter(|l| l.starts_with("moat: warning: ") && l.contains("unknown property"))
        .collect();
    assert_eq!(warned.len(), paths.len(), "{}", o.stderr);
    let logged = fs::read_to_string(&log).expect("log file");
    for p in paths {
        assert!(
            warned
                .iter()
                .any(|l| l.contains(&format!("unknown property {p} "))),
            "{p}: {}",
            o.stderr
        );
        assert!(
            logged
                .lines()
                .any(|l| l.contains("level=warning") && l.contains(p)),
            "{p} not in the log: {logged}"
        );
    }
    let cfg = b.dir().join("config.json");
    let a = rt.cmd(&["audit", "--format", "json", cfg.to_str().unwrap()]);
    let doc: Value = serde_json::from_str(&a.stdout).expect("audit json");
    let found: Vec<(String, String)> = doc["findings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["id"] == "unknown-property")
        .map(|f| {
            (
                f["location"].as_str().unwrap_or("").to_string(),
                f["severity"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    for loc in [
        "/process/bogusField",
        "/linux/seccompp",
        "/root/readOnly",
        "/mounts/0/optoins",
    ] {
        assert!(
            found.contains(&(loc.to_string(), "medium".to_string())),
            "{loc}: {found:?}"
        );
    }
}

/// Issue #14, 7: a bundle in a private (0700) directory, with a user
/// namespace and a bind mount from another private directory: the runtime
/// (root) opens them; the container's host IDs never traverse them.
#[test]
fn bundle_and_bind_sources_in_private_directories() {
    let Some(rt) = Rt::root_or_skip("private_bundle") else {
        return;
    };
    let private = tempfile::tempdir().expect("tempdir");
    fs::set_permissions(private.path(), fs::Permissions::from_mode(0o700)).expect("chmod");
    let data = tempfile::tempdir().expect("tempdir");
    fs::set_permissions(data.path(), fs::Permissions::from_mode(0o700)).expect("chmod");
    let shared = data.path().join("shared");
    fs::create_dir(&shared).expect("mkdir");
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o755)).expect("chmod");
    fs::write(shared.join("f"), "from-a-private-dir\n").expect("write");
    let mut b = script("cat /data/f /rel/g; id -u");
    let bundle = private.path().join("bundle");
    fs::write(b.dir().join("g"), "bundle-relative\n").expect("write");
    // Mount points: the container's root cannot create them in a root of
    // host root's files.
    fs::create_dir_all(b.rootfs().join("data")).expect("mkdir");
    fs::create_dir_all(b.rootfs().join("rel")).expect("mkdir");
    fs::write(b.rootfs().join("rel/g"), "").expect("write");
    b.push("/linux/namespaces", json!({ "type": "user" }));
    let map = json!([{ "containerID": 0, "hostID": 300000 + std::process::id() % 1000 * 65536, "size": 65536 }]);
    b.set("/linux/uidMappings", map.clone());
    b.set("/linux/gidMappings", map);
    // A cgroup mount needs a cgroup namespace in a user namespace.
    let mounts: Vec<Value> = b.config["mounts"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|m| m["type"] != "cgroup")
        .collect();
    b.set("/mounts", Value::Array(mounts));
    b.push(
        "/mounts",
        json!({ "destination": "/data", "type": "bind", "source": shared, "options": ["rbind", "ro"] }),
    );
    b.push(
        "/mounts",
        json!({ "destination": "/rel/g", "type": "bind", "source": "g", "options": ["bind", "ro"] }),
    );
    b.write_config();
    let cp = run_binary(
        Path::new("/bin/cp"),
        &[
            "-a".into(),
            b.dir().display().to_string(),
            bundle.display().to_string(),
        ],
        Opts::default(),
        &rt.scratch_file("out"),
        &rt.scratch_file("err"),
    );
    assert!(cp.ok(), "{cp:?}");
    let id = rt.new_id("private");
    let o = rt.cmd(&["run", "--bundle", bundle.to_str().unwrap(), &id]);
    let _g = Ctr {
        rt: &rt,
        id,
        out: None,
    };
    assert!(o.ok(), "{o:?}");
    assert_eq!(o.stdout, "from-a-private-dir\nbundle-relative\n0\n");
}
