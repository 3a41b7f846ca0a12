//! More of the runtime-spec, end to end: joined namespaces (the runtime's slow
//! path), time namespace offsets, a terminal through --console-socket, a
//! rootless run, and `delete --force` after the runtime was killed mid-create.
mod common;

use std::fs;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::json;

fn script(s: &str) -> Bundle {
    Bundle::new(&["sh", "-c", s])
}

/// A container that joins another one's network and UTS namespaces by path
/// sees the same namespaces (inode numbers) and hostname.
#[test]
fn joins_namespaces_by_path() {
    let Some(rt) = Rt::root_or_skip("joins_namespaces_by_path") else {
        return;
    };
    let mut first = Bundle::new(&["sleep", "30"]);
    first.set("/hostname", json!("first-host"));
    let c1 = rt.start_ok(&first);
    let pid = c1.pid();
    let net = fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    let mut second = script("readlink /proc/self/ns/net; hostname");
    let nss = second
        .config
        .pointer_mut("/linux/namespaces")
        .unwrap()
        .as_array_mut()
        .unwrap();
    nss.retain(|n| n["type"] != "network" && n["type"] != "uts");
    nss.push(json!({"type": "network", "path": format!("/proc/{pid}/ns/net")}));
    nss.push(json!({"type": "uts", "path": format!("/proc/{pid}/ns/uts")}));
    second.config.as_object_mut().unwrap().remove("hostname");
    let out = rt.run_ok(&second);
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some(net.to_str().unwrap()), "{out}");
    assert_eq!(lines.next(), Some("first-host"), "{out}");
}

/// timeOffsets shift CLOCK_BOOTTIME inside a new time namespace.
#[test]
fn time_namespace_offsets() {
    let Some(rt) = Rt::root_or_skip("time_namespace_offsets") else {
        return;
    };
    let mut b = script("cut -d. -f1 /proc/uptime");
    b.push("/linux/namespaces", json!({"type": "time"}));
    b.set(
        "/linux/timeOffsets",
        json!({"boottime": {"secs": 864000, "nanosecs": 0}}),
    );
    let inside: u64 = rt.run_ok(&b).trim().parse().unwrap();
    let host: u64 = read_trim("/proc/uptime")
        .split('.')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(inside >= host + 864000 - 5, "inside {inside}, host {host}");
}

/// process.terminal with --console-socket: the runtime sends a pty master over
/// the socket, and the container's stdio is that pty.
#[test]
fn terminal_through_console_socket() {
    let Some(rt) = Rt::root_or_skip("terminal_through_console_socket") else {
        return;
    };
    let mut b = script("tty; echo on-the-pty");
    b.set("/process/terminal", json!(true));
    let sock = rt.scratch_file("console.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let accept = std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        let mut buf = [0u8; 256];
        let (_, fd) = moat_sys::fd::recv_with_fd(conn.as_fd(), &mut buf).unwrap();
        fd.expect("a pty master fd")
    });
    let sock_s = sock.display().to_string();
    let c = rt
        .create(&b, &["--console-socket", &sock_s])
        .unwrap_or_else(|o| panic!("create: {o:?}"));
    let master = accept.join().unwrap();
    c.start().expect_ok();
    let mut f = fs::File::from(master);
    let mut out = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 512];
    while !out.contains("on-the-pty") && std::time::Instant::now() < deadline {
        match f.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.push_str(&String::from_utf8_lossy(&buf[..n])),
        }
    }
    assert!(out.contains("/dev/pts/0"), "{out:?}");
    assert!(out.contains("on-the-pty"), "{out:?}");
}

/// Whether `prog` is in `$PATH`.
fn on_path(prog: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
}

/// An unprivileged user runs a `spec --rootless` bundle: root inside maps to
/// that user outside, and the missing cgroup delegation is a warning.
#[test]
fn rootless_run() {
    let Some(rt) = Rt::root_or_skip("rootless_run") else {
        return;
    };
    if !rt.is_moat() {
        eprintln!("SKIP rootless_run: moat only");
        return;
    }
    if !on_path("setpriv") {
        moat_core::testing::skip("rootless_run", "needs setpriv");
        return;
    }
    let uid = 1500 + (std::process::id() % 1000);
    let b = Bundle::new(&["sh", "-c", "id -u; cat /proc/self/uid_map"]);
    let dir = b.dir().to_owned();
    let state = tempfile::tempdir().unwrap();
    for p in [state.path(), dir.as_path()] {
        chown_tree(p, uid, uid);
        fs::set_permissions(p, fs::Permissions::from_mode(0o755)).unwrap();
    }
    // The user writes its own `spec --rootless` (maps itself to root).
    fs::remove_file(dir.join("config.json")).unwrap_or(());
    let gen = run_own(
        as_user(uid, &rt.bin)
            .args(["spec", "--rootless", "--bundle"])
            .arg(&dir),
    );
    assert!(gen.status.success(), "{gen:?}");
    let text = fs::read_to_string(dir.join("config.json")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
    cfg["process"]["terminal"] = json!(false);
    cfg["process"]["args"] = json!(["sh", "-c", "id -u; cat /proc/self/uid_map"]);
    fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let out = run_own(
        as_user(uid, &rt.bin)
            .arg("--root")
            .arg(state.path().join("root"))
            .args(["run", "--bundle"])
            .arg(&dir)
            .arg("rootless-test"),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout {stdout} stderr {stderr}");
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some("0"), "{stdout}");
    let map: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(map, ["0", &uid.to_string(), "1"], "{stdout}");
    assert!(stderr.contains("no delegated cgroup"), "{stderr}");
    assert!(!state.path().join("root/rootless-test").exists());
}

/// The runtime is SIGKILLed while a prestart hook runs (mid-create): the
/// container process, its cgroup and state exist; `delete --force` removes all.
#[test]
fn delete_force_after_runtime_killed_mid_create() {
    let Some(rt) = Rt::root_or_skip("delete_force_after_runtime_killed") else {
        return;
    };
    let mut b = Bundle::new(&["true"]);
    let marker = rt.scratch_file("hook-started");
    b.push(
        "/hooks/prestart",
        json!({"path": "/bin/sh", "args": ["sh", "-c", format!("touch {}; sleep 30", marker.display())]}),
    );
    b.set(
        "/linux/cgroupsPath",
        json!(format!("/moat-e2e-kill-{}", std::process::id())),
    );
    b.write_config();
    let id = rt.new_id("killed");
    let mut child = Command::new(&rt.bin)
        .arg("--root")
        .arg(rt.root())
        .args(["create", "--bundle"])
        .arg(b.dir())
        .arg(&id)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !marker.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(marker.exists(), "the prestart hook never ran");
    let st: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(rt.root().join(&id).join("state.json")).unwrap())
            .unwrap();
    let init = st["pid"].as_i64().unwrap();
    assert!(init > 0);
    child.kill().unwrap();
    let _ = child.wait();
    let cg = format!("/sys/fs/cgroup/pids/moat-e2e-kill-{}", std::process::id());
    assert!(Path::new(&cg).exists());
    rt.cmd(&["delete", "--force", &id]).expect_ok();
    assert!(!rt.root().join(&id).exists());
    assert!(!Path::new(&cg).exists(), "cgroup {cg} left behind");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{init}")).exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let alive = fs::read_to_string(format!("/proc/{init}/stat"))
        .map(|s| !s.contains(") Z"))
        .unwrap_or(false);
    assert!(!alive, "container process {init} survived");
    let _ = Command::new("pkill")
        .args(["-f", &marker.display().to_string()])
        .status();
}

/// tmpcopyup (Podman's --read-only tmpfs): the tmpfs starts with what it
/// hides, is writable, and writes never reach the image.
#[test]
fn tmpfs_copy_up() {
    let Some(rt) = Rt::root_or_skip("tmpfs_copy_up") else {
        return;
    };
    if !rt.is_moat() {
        eprintln!("SKIP tmpfs_copy_up: runc 1.1 handles tmpcopyup differently");
        return;
    }
    let mut b = script("grep -c root /etc/passwd; ls -l /etc/link | grep -o -- '-> passwd'; echo new > /etc/added && cat /etc/added");
    fs::create_dir_all(b.rootfs().join("etc")).unwrap();
    std::os::unix::fs::symlink("passwd", b.rootfs().join("etc/link")).unwrap();
    b.push("/mounts", json!({"destination": "/etc", "type": "tmpfs", "source": "tmpfs", "options": ["tmpcopyup", "mode=755"]}));
    let out = rt.run_ok(&b);
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["1", "-> passwd", "new"],
        "{out}"
    );
    assert!(!b.rootfs().join("etc/added").exists());
}

/// All six hooks run, in order, each with the state on stdin; createRuntime
/// runs in the runtime's namespaces, createContainer in the container's mount
/// namespace before pivot_root, startContainer inside the container.
#[test]
fn all_six_hooks_in_order() {
    let Some(rt) = Rt::root_or_skip("all_six_hooks_in_order") else {
        return;
    };
    let log = rt.scratch_file("hooks.log");
    fs::write(&log, "").unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let mut b = Bundle::new(&["sh", "-c", "echo workload >> /out/hooks.log"]);
    b.push("/mounts", json!({"destination": "/out", "type": "bind", "source": out_dir.path(), "options": ["rbind", "rw"]}));
    let host_hook = |name: &str| {
        json!({"path": "/bin/sh", "args": ["sh", "-c", format!(
            "st=$(cat); case \"$st\" in *'\"id\"'*) ;; *) echo nostate;; esac; echo {name} $(readlink /proc/self/ns/mnt) >> {}", log.display())]})
    };
    for (stage, name) in [
        ("prestart", "prestart"),
        ("createRuntime", "createRuntime"),
        ("createContainer", "createContainer"),
        ("poststart", "poststart"),
        ("poststop", "poststop"),
    ] {
        b.push(&format!("/hooks/{stage}"), host_hook(name));
    }
    b.push("/hooks/startContainer", json!({"path": "/bin/sh", "args": ["sh", "-c", "cat >/dev/null; echo startContainer >> /out/hooks.log"]}));
    let c = rt
        .create(&b, &[])
        .unwrap_or_else(|o| panic!("create: {o:?}"));
    c.start().expect_ok();
    c.wait_status("stopped");
    rt.cmd(&["delete", &c.id]).expect_ok();
    let host_mnt = fs::read_link("/proc/self/ns/mnt")
        .unwrap()
        .display()
        .to_string();
    let text = fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let names: Vec<&str> = lines.iter().map(|l| l.split(' ').next().unwrap()).collect();
    assert_eq!(
        names,
        [
            "prestart",
            "createRuntime",
            "createContainer",
            "poststart",
            "poststop"
        ],
        "{text}"
    );
    assert!(!text.contains("nostate"), "{text}");
    let ns_of = |i: usize| lines[i].split(' ').nth(1).unwrap_or("").to_string();
    assert_eq!(ns_of(0), host_mnt, "prestart runs in the runtime namespace");
    assert_eq!(
        ns_of(1),
        host_mnt,
        "createRuntime runs in the runtime namespace"
    );
    assert_ne!(
        ns_of(2),
        host_mnt,
        "createContainer runs in the container's mount namespace"
    );
    let inside = fs::read_to_string(out_dir.path().join("hooks.log")).unwrap();
    assert_eq!(inside, "startContainer\nworkload\n");
}

/// AppArmor and SELinux requests on a host without them are refused clearly.
#[test]
fn lsm_request_without_lsm_is_refused() {
    let Some(rt) = Rt::root_or_skip("lsm_request_without_lsm") else {
        return;
    };
    if !rt.is_moat() || Path::new("/sys/kernel/security/apparmor").exists() {
        eprintln!("SKIP lsm_request_without_lsm: host has AppArmor, or runtime is not moat");
        return;
    }
    let mut b = Bundle::new(&["true"]);
    b.set("/process/apparmorProfile", json!("docker-default"));
    let (_c, out) = rt.run_fg(&b);
    assert!(!out.ok());
    assert!(
        out.stderr.contains("AppArmor is not enabled"),
        "{}",
        out.stderr
    );
    assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.stderr);
    assert!(root_entries(&rt).is_empty());
}

/// SIGTERM reaches a created (not yet started) container, as with runc.
#[test]
fn sigterm_stops_a_created_container() {
    let Some(rt) = Rt::root_or_skip("sigterm_stops_a_created_container") else {
        return;
    };
    let b = Bundle::new(&["true"]);
    let c = rt
        .create(&b, &[])
        .unwrap_or_else(|o| panic!("create: {o:?}"));
    assert_eq!(c.status(), "created");
    c.kill("TERM").expect_ok();
    c.wait_status("stopped");
}

/// SCMP_ACT_NOTIFY: the runtime hands the notify fd and the container process
/// state (with listenerMetadata) to listenerPath. The listener here closes the
/// fd without answering, so the notified syscall fails in the container.
#[test]
fn seccomp_notify_fd_reaches_the_listener() {
    let Some(rt) = Rt::root_or_skip("seccomp_notify_fd_reaches_the_listener") else {
        return;
    };
    let sock = rt.scratch_file("seccomp.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let agent = std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let (n, fd) = moat_sys::fd::recv_with_fd(conn.as_fd(), &mut buf).unwrap();
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        let is_notify = fd
            .as_ref()
            .and_then(|f| fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd())).ok())
            .map(|l| l.display().to_string())
            .unwrap_or_default();
        drop(fd); // closing the listener's fd fails the pending syscall
        (text, is_notify)
    });
    let mut b = script("mkdir /tmp/notified 2>/dev/null; echo rc=$?");
    b.set("/root/readonly", json!(false));
    b.set(
        "/linux/seccomp",
        json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "listenerPath": sock,
            "listenerMetadata": "hello-agent",
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_NOTIFY"}]
        }),
    );
    let out = rt.run_ok(&b);
    let (state, fd_kind) = agent.join().unwrap();
    assert!(out.contains("rc=1"), "{out}");
    let v: serde_json::Value =
        serde_json::from_str(&state).unwrap_or_else(|e| panic!("{e}: {state}"));
    assert_eq!(v["metadata"], "hello-agent", "{state}");
    assert_eq!(v["fds"], json!(["seccompFd"]), "{state}");
    assert!(v["pid"].as_i64().unwrap_or(0) > 0, "{state}");
    assert!(
        v["state"]["id"]
            .as_str()
            .is_some_and(|s| s.starts_with("e2e-run")),
        "{state}"
    );
    assert!(fd_kind.contains("seccomp"), "{fd_kind}");
}

/// `run` with process.terminal and no --console-socket: moat holds the pty
/// itself and copies it to its stdout; the exit status is the container's.
#[test]
fn run_with_terminal_and_no_console_socket() {
    let Some(rt) = Rt::root_or_skip("run_with_terminal_and_no_console_socket") else {
        return;
    };
    if !rt.is_moat() {
        eprintln!("SKIP run_with_terminal_and_no_console_socket: moat-only output path");
        return;
    }
    let mut b = script("tty; echo from-the-pty; exit 5");
    b.set("/process/terminal", json!(true));
    let (_c, out) = rt.run_fg(&b);
    assert_eq!(out.code, Some(5), "{out:?}");
    assert!(
        out.stdout.contains("/dev/pts/0") && out.stdout.contains("from-the-pty"),
        "{out:?}"
    );
    assert!(root_entries(&rt).is_empty());
}

/// `exec -t` with no --console-socket: moat proxies the pty.
#[test]
fn exec_tty_without_console_socket() {
    let Some(rt) = Rt::root_or_skip("exec_tty_without_console_socket") else {
        return;
    };
    if !rt.is_moat() {
        eprintln!("SKIP exec_tty_without_console_socket: moat-only output path");
        return;
    }
    let b = Bundle::new(&["sleep", "30"]);
    let c = rt.start_ok(&b);
    let out = c.exec_opts(&["-t"], &["sh", "-c", "tty; exit 7"]);
    assert_eq!(out.code, Some(7), "{out:?}");
    assert!(out.stdout.contains("/dev/pts/"), "{out:?}");
}

/// `moat run -t` on the embedded default: the workload gets a pty.
#[test]
fn human_run_with_tty() {
    let Some(rt) = Rt::root_or_skip("human_run_with_tty") else {
        return;
    };
    if !rt.is_moat() {
        eprintln!("SKIP human_run_with_tty: moat only");
        return;
    }
    let out = rt.cmd(&["run", "-t", "--", "sh", "-c", "tty; exit 4"]);
    assert_eq!(out.code, Some(4), "{out:?}");
    assert!(out.stdout.contains("/dev/pts/0"), "{out:?}");
}

/// An unprivileged user's `moat run` with no subordinate IDs: a single-ID
/// user namespace (root inside is the user), the default state root under
/// /tmp, and a warning instead of cgroup limits.
#[test]
fn rootless_human_run() {
    let Some(rt) = Rt::root_or_skip("rootless_human_run") else {
        return;
    };
    if !rt.is_moat() {
        eprintln!("SKIP rootless_human_run: moat only");
        return;
    }
    if !on_path("setpriv") {
        moat_core::testing::skip("rootless_human_run", "needs setpriv");
        return;
    }
    let uid = 30000 + (std::process::id() % 10000);
    let home = tempfile::tempdir().unwrap();
    fs::set_permissions(home.path(), fs::Permissions::from_mode(0o777)).unwrap();
    let out = run_own(
        as_user(uid, &rt.bin)
            .args([
                "run",
                "--",
                "sh",
                "-c",
                "id -u; cat /proc/self/uid_map; grep NoNewPrivs /proc/self/status",
            ])
            .env("XDG_RUNTIME_DIR", home.path())
            .current_dir(home.path()),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout {stdout} stderr {stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "0", "{stdout}");
    assert_eq!(
        lines[1].split_whitespace().collect::<Vec<_>>(),
        ["0", &uid.to_string(), "1"],
        "{stdout}"
    );
    assert!(lines[2].ends_with('1'), "{stdout}");
    assert!(stderr.contains("no delegated cgroup"), "{stderr}");
    let leftovers: Vec<_> = fs::read_dir(home.path().join("moat/.run"))
        .map(|d| d.flatten().collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Issue #14, 7: a rootless `moat run` in its standard setting: a 0700
/// `$XDG_RUNTIME_DIR` (as pam_systemd makes it) and a subordinate ID range,
/// so the container's IDs are not the user's and cannot traverse that
/// directory: moat opens the cached root and a private volume itself.
#[test]
fn rootless_run_with_private_runtime_dir_and_subordinate_ids() {
    let Some(rt) = Rt::root_or_skip("rootless_private_runtime_dir") else {
        return;
    };
    if !rt.is_moat() {
        eprintln!("SKIP rootless_private_runtime_dir: moat only");
        return;
    }
    for tool in ["setpriv", "newuidmap", "newgidmap"] {
        assert!(on_path(tool), "{tool} is needed (util-linux, uidmap)");
    }
    // `nobody`: newuidmap needs the user in /etc/passwd.
    let uid = 65534;
    let start = 1_400_000_000 + u64::from(std::process::id() % 100) * 65536;
    let _sub = SubIds::add("nobody", start);
    let xdg = tempfile::tempdir().unwrap();
    let data = xdg.path().join("data");
    fs::create_dir(&data).unwrap();
    fs::write(data.join("f"), "user's private file\n").unwrap();
    fs::set_permissions(data.join("f"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::set_permissions(&data, fs::Permissions::from_mode(0o755)).unwrap();
    chown_tree(xdg.path(), uid, uid);
    fs::set_permissions(xdg.path(), fs::Permissions::from_mode(0o700)).unwrap();
    let vol = format!("{}:/data:ro", data.display());
    let out = run_own(
        as_user(uid, &rt.bin)
            .args([
                "run",
                "-v",
                &vol,
                "--",
                "sh",
                "-c",
                "id -u; cat /proc/self/uid_map; cat /data/f",
            ])
            .env("XDG_RUNTIME_DIR", xdg.path())
            .current_dir(xdg.path()),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout {stdout} stderr {stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "65534", "{stdout}");
    assert_eq!(
        lines[1].split_whitespace().collect::<Vec<_>>(),
        ["0", &start.to_string(), "65536"],
        "{stdout}"
    );
    assert_eq!(lines[2], "user's private file", "{stdout}");
    // The same with the cached root reused.
    let again = run_own(
        as_user(uid, &rt.bin)
            .args(["run", "--", "sh", "-c", "echo again"])
            .env("XDG_RUNTIME_DIR", xdg.path())
            .current_dir(xdg.path()),
    );
    assert!(again.status.success(), "{again:?}");
    assert_eq!(String::from_utf8_lossy(&again.stdout), "again\n");
}

/// A directory image run by a user without a subordinate ID range: only ID
/// 0 is mapped, so the process runs as 0, not as the image's default user
/// (until 2026-12-05: "cannot set gid 65534", status 125).
#[test]
fn rootless_image_run_without_subordinate_ids_runs_as_the_one_mapped_id() {
    let test = "rootless_image_run_without_subordinate_ids";
    let Some(rt) = Rt::root_or_skip(test) else {
        return;
    };
    if !rt.is_moat() {
        eprintln!("SKIP {test}: moat only");
        return;
    }
    assert!(on_path("setpriv"), "setpriv is needed (util-linux)");
    let uid = 3600 + (std::process::id() % 1000);
    let b = Bundle::new(&["true"]);
    let xdg = tempfile::tempdir().unwrap();
    for p in [xdg.path(), b.dir()] {
        chown_tree(p, uid, uid);
    }
    fs::set_permissions(xdg.path(), fs::Permissions::from_mode(0o700)).unwrap();
    let out = run_own(
        as_user(uid, &rt.bin)
            .arg("run")
            .arg(b.rootfs())
            .args(["--", "sh", "-c", "id -u; id -g; cat /proc/self/uid_map"])
            .env("XDG_RUNTIME_DIR", xdg.path()),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout {stdout} stderr {stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[..2], ["0", "0"], "{stdout}");
    assert_eq!(
        lines[2].split_whitespace().collect::<Vec<_>>(),
        ["0", &uid.to_string(), "1"],
        "{stdout}"
    );
}

/// The sandbox tier refuses an unprivileged user in one line, and `moat
/// info` says so, rather than failing midway (its supervisor's jail needs
/// root for now).
#[test]
fn rootless_sandbox_is_refused_in_one_line() {
    let test = "rootless_sandbox_is_refused_in_one_line";
    let Some(rt) = Rt::root_or_skip(test) else {
        return;
    };
    if !rt.is_moat() {
        eprintln!("SKIP {test}: moat only");
        return;
    }
    assert!(on_path("setpriv"), "setpriv is needed (util-linux)");
    let uid = 4600 + (std::process::id() % 1000);
    let xdg = tempfile::tempdir().unwrap();
    chown_tree(xdg.path(), uid, uid);
    let out = run_own(
        as_user(uid, &rt.bin)
            .args(["run", "--isolation", "sandbox", "--", "true"])
            .env("XDG_RUNTIME_DIR", xdg.path()),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("needs root"), "{stderr}");
    let info = run_own(as_user(uid, &rt.bin).arg("info"));
    let text = String::from_utf8_lossy(&info.stdout);
    assert!(
        text.lines()
            .any(|l| l.contains("sandbox") && l.contains("needs root")),
        "{text}"
    );
    let left: Vec<_> = fs::read_dir(xdg.path().join("moat"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name())
                .filter(|n| !n.to_string_lossy().starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
}

/// Issue 15, defect 2: rootless without a delegated cgroup, `--timeout`
/// killed nothing (moat said "killed: timeout", the workload ran to its end
/// and the status was 0), and `--json` reported a host ID and a memory limit
/// that did not apply. The container's own PID namespace lets moat kill all
/// of it without a cgroup.
#[test]
fn rootless_timeout_without_a_cgroup_kills() {
    let Some(rt) = Rt::root_or_skip("rootless_timeout_without_a_cgroup_kills") else {
        return;
    };
    if !rt.is_moat() {
        eprintln!("SKIP rootless_timeout_without_a_cgroup_kills: moat only");
        return;
    }
    if !on_path("setpriv") {
        moat_core::testing::skip("rootless_timeout_without_a_cgroup_kills", "needs setpriv");
        return;
    }
    let uid = 40000 + (std::process::id() % 10000);
    let home = tempfile::tempdir().unwrap();
    fs::set_permissions(home.path(), fs::Permissions::from_mode(0o777)).unwrap();
    let out = run_own(
        as_user(uid, &rt.bin)
            .args([
                "run",
                "--timeout",
                "1",
                "--json",
                "--",
                "sh",
                "-c",
                "sleep 4; echo finished",
            ])
            .env("XDG_RUNTIME_DIR", home.path())
            .current_dir(home.path()),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(137),
        "stdout {stdout} stderr {stderr}"
    );
    assert!(!stdout.contains("finished"), "{stdout}");
    assert!(stderr.contains("killed: timeout"), "{stderr}");
    let rec: serde_json::Value = serde_json::from_str(
        stderr
            .lines()
            .find(|l| l.starts_with('{'))
            .expect("a record"),
    )
    .unwrap();
    assert_eq!(rec["timed_out"], true, "{rec}");
    assert_eq!(rec["status"], 137, "{rec}");
    assert_eq!(rec["memory_limit_bytes"], serde_json::Value::Null, "{rec}");
    assert_eq!(rec["host_id_start"], uid, "{rec}");
}
