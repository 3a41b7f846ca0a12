//! End-to-end: hostile rootfs and config contents must not reach the host.
//! Each test stages a known escape (symlinked mount targets, /proc/self/exe
//! overwrite, leaked host fds, cgroup release_agent) and checks the host after.
#![forbid(unsafe_code)]

mod common;

use common::*;
use serde_json::json;
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

fn host_mountinfo_mentions(p: &Path) -> Vec<String> {
    let needle = p.display().to_string();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&needle))
        .map(str::to_string)
        .collect()
}

fn dir_listing(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(p)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Mount destinations that traverse rootfs symlinks pointing at "/" and "../../..":
/// the runtime must resolve them inside the rootfs (or refuse), never on the host.
#[test]
fn symlinked_mount_destination_stays_in_rootfs() {
    let Some(rt) = Rt::root_or_skip("symlink_mount_dest") else {
        return;
    };
    let host = tempfile::Builder::new()
        .prefix("moat-e2e-victim-")
        .tempdir()
        .expect("tempdir");
    fs::write(host.path().join("marker"), "host data\n").expect("marker");
    let before = dir_listing(host.path());
    let h = host.path().display().to_string();

    for (link, target) in [("evil", "/"), ("up", "../../../../../../../../..")] {
        let mut b = Bundle::new(&[
            "sh",
            "-c",
            &format!("grep -c ' {h}/made-by-{link} ' /proc/mounts"),
        ]);
        symlink(target, b.rootfs().join(link)).expect("symlink");
        b.push(
            "/mounts",
            tmpfs_mount(&format!("/{link}{h}/made-by-{link}"), &["size=1m"]),
        );
        let (_c, o) = rt.run_fg(&b);
        if o.ok() {
            // Resolved inside the rootfs: the container sees its tmpfs at the in-rootfs path.
            assert_eq!(o.stdout.trim(), "1", "{link}: {o:?}");
        } else {
            eprintln!("note: {link} -> {target} refused: {}", o.stderr.trim());
        }
        assert_eq!(
            dir_listing(host.path()),
            before,
            "{link} -> {target}: host dir {h} changed"
        );
        assert!(
            host_mountinfo_mentions(host.path()).is_empty(),
            "host mount under {h}"
        );
        assert!(!Path::new("/made-by-evil").exists() && !Path::new("/made-by-up").exists());
    }
}

/// A bind mount whose destination is a rootfs symlink to a host file must not
/// replace that host file.
#[test]
fn symlinked_bind_destination_does_not_touch_host_file() {
    let Some(rt) = Rt::root_or_skip("symlink_bind_dest") else {
        return;
    };
    let host = tempfile::Builder::new()
        .prefix("moat-e2e-victim-")
        .tempdir()
        .expect("tempdir");
    let victim = host.path().join("victim");
    fs::write(&victim, "original\n").expect("victim");
    let src = host.path().join("payload");
    fs::write(&src, "payload\n").expect("payload");

    let mut b = Bundle::new(&["cat", "/etc/target"]);
    symlink(&victim, b.rootfs().join("etc/target")).expect("symlink");
    b.push("/mounts", json!({ "destination": "/etc/target", "type": "bind", "source": src, "options": ["bind", "ro"] }));
    let (_c, o) = rt.run_fg(&b);
    if !o.ok() {
        eprintln!("note: refused: {}", o.stderr.trim());
    }
    assert_eq!(
        fs::read_to_string(&victim).unwrap_or_default(),
        "original\n"
    );
    assert!(host_mountinfo_mentions(&victim).is_empty());
}

/// CVE-2019-5736: a container process must not be able to open the runtime binary
/// for writing, through its own /proc/self/exe or through /proc/<pid>/exe of a
/// runtime process that enters the container (exec of a `#!/proc/self/exe` script
/// makes the runtime run itself inside the container).
#[test]
fn runtime_binary_not_writable_from_container() {
    let Some(rt) = Rt::root_or_skip("proc_self_exe") else {
        return;
    };
    let bin_before = fs::read(&rt.bin).expect("read runtime binary");
    // The breach is a successful write of one byte to a runtime binary seen
    // through /proc/N/exe. A runtime that runs from a sealed memfd copy lets the
    // open succeed but refuses the write; a vulnerable one gets a byte appended
    // to its binary, which the hash comparison below also catches.
    let scanner = r#"
( printf x >> /proc/self/exe ) 2>/dev/null && echo SELF-EXE-WRITABLE
echo ready
end=$(( $(date +%s) + 4 ))
while [ $(date +%s) -lt $end ]; do
  for p in /proc/[0-9]*; do
    [ "$p" = /proc/$$ ] && continue
    (
      exec 3< $p/exe || exit 0
      [ /proc/self/fd/3 -ef /bin/busybox ] && exit 0
      echo "OPENED $p"
      i=0
      while [ $i -lt 200 ]; do
        if ( printf x >> /proc/self/fd/3 ); then echo "WROTE $p"; exit 0; fi
        i=$((i+1)); sleep 0.01
      done
    ) 2>/dev/null
  done
done
echo scan-done
"#;
    let b = Bundle::new(&["sh", "-c", scanner]);
    let evil = b.rootfs().join("bin/evil");
    fs::write(&evil, "#!/proc/self/exe\n").expect("evil script");
    fs::set_permissions(&evil, fs::Permissions::from_mode(0o755)).expect("chmod");
    let c = rt.start_ok(&b);
    c.wait_output("ready");
    for _ in 0..10 {
        let _ = c.exec(&["/bin/evil"]); // the runtime runs itself in the container; its status is irrelevant
        let _ = c.exec(&["true"]);
    }
    let out = c.wait_output("scan-done");
    eprintln!(
        "scanner: {}",
        out.lines().filter(|l| l.starts_with("OPENED")).count()
    );
    assert!(!out.contains("SELF-EXE-WRITABLE"), "{out}");
    assert!(
        !out.contains("WROTE"),
        "runtime binary opened for write from the container: {out}"
    );
    assert!(
        fs::read(&rt.bin).expect("read runtime binary") == bin_before,
        "runtime binary changed!"
    );
}

/// The fd numbers in `ls -l /proc/N/fd` output ("... 0 -> /dev/null").
fn fd_numbers(ls: &str) -> Vec<String> {
    ls.lines()
        .filter_map(|l| l.split_once(" -> "))
        .filter_map(|(left, _)| left.split_whitespace().last().map(str::to_string))
        .collect()
}

/// CVE-2024-21626: no host fd reaches the container process, and its cwd is inside
/// the container, including when cwd is set to /proc/self/fd/N (a leaked fd).
#[test]
fn no_host_fds_and_cwd_inside() {
    let Some(rt) = Rt::root_or_skip("fd_leak") else {
        return;
    };
    // `ls -l` in a child lists the shell's fds (a glob or $(...) would add the shell's own).
    let probe = "ls -l /proc/$$/fd; echo \"cwd $(readlink /proc/$$/cwd)\"";
    let mut b = Bundle::new(&["sh", "-c", probe]);
    b.set("/process/cwd", json!("/etc"));
    let out = rt.run_ok(&b);
    assert_eq!(fd_numbers(&out), vec!["0", "1", "2"], "{out}");
    assert!(out.lines().any(|l| l == "cwd /etc"), "{out}");

    // From outside: the running init holds only 0, 1, 2.
    let b = Bundle::new(&["sleep", "1000"]);
    let c = rt.start_ok(&b);
    let fds = dir_listing(Path::new(&format!("/proc/{}/fd", c.pid())));
    assert_eq!(fds, vec!["0", "1", "2"]);
    // Same for an exec'd process.
    let o = c.exec(&["sh", "-c", probe]).expect_ok();
    assert_eq!(fd_numbers(&o.stdout), vec!["0", "1", "2"], "{}", o.stdout);
    assert!(o.stdout.lines().any(|l| l == "cwd /"), "{}", o.stdout);

    // The attack: cwd through a leaked fd, then walk up to the host's /.
    let escape = "cd ../../../../../../.. 2>/dev/null; [ -e etc/os-release ] && echo HOST-ROOT; readlink /proc/$$/cwd";
    assert!(
        Path::new("/etc/os-release").exists(),
        "host marker /etc/os-release"
    );
    for n in 3..=9 {
        let fdpath = format!("/proc/self/fd/{n}");
        let mut b = Bundle::new(&["sh", "-c", escape]);
        b.set("/process/cwd", json!(fdpath));
        let (_c, o) = rt.run_fg(&b);
        assert!(
            !o.stdout.contains("HOST-ROOT"),
            "cwd {fdpath} escaped: {o:?}"
        );
        let o = c.exec_opts(&["--cwd", &fdpath], &["sh", "-c", escape]);
        assert!(
            !o.stdout.contains("HOST-ROOT"),
            "exec --cwd {fdpath} escaped: {o:?}"
        );
    }
}

/// CVE-2022-0492: the container cannot set a cgroup v1 release_agent, neither
/// through the mounted /sys/fs/cgroup nor by mounting a hierarchy itself (also
/// from a fresh user namespace).
#[test]
fn release_agent_not_writable() {
    let Some(rt) = Rt::root_or_skip("release_agent") else {
        return;
    };
    let agents: Vec<_> = fs::read_dir("/sys/fs/cgroup")
        .map(|d| {
            d.flatten()
                .map(|e| e.path().join("release_agent"))
                .filter(|p| p.exists())
                .collect()
        })
        .unwrap_or_default();
    let before: Vec<String> = agents.iter().map(read_trim).collect();
    let script = r#"
mkdir -p /tmp/cg
mount -t cgroup -o memory cgroup /tmp/cg 2>/dev/null && echo MOUNTED
mount -t cgroup -o none,name=e2e cgroup /tmp/cg 2>/dev/null && echo MOUNTED-NAMED
for f in /sys/fs/cgroup/*/release_agent /sys/fs/cgroup/release_agent /tmp/cg/release_agent; do
  [ -e "$f" ] && (echo /evil > "$f") 2>/dev/null && echo "WROTE $f"
done
unshare -Urm sh -c 'mount -t cgroup -o memory cgroup /tmp/cg && echo /evil > /tmp/cg/release_agent && echo WROTE-USERNS' 2>/dev/null
unshare -Urm sh -c 'mount -t cgroup -o none,name=e2e2 cgroup /tmp/cg && echo /evil > /tmp/cg/release_agent && echo WROTE-USERNS-NAMED' 2>/dev/null
echo done
"#;
    let mut b = Bundle::new(&["sh", "-c", script]);
    b.push(
        "/mounts",
        tmpfs_mount("/tmp", &["nosuid", "nodev", "mode=1777"]),
    );
    let out = rt.run_ok(&b);
    assert!(out.contains("done"), "{out}");
    for bad in ["MOUNTED", "WROTE"] {
        assert!(!out.contains(bad), "{bad}: {out}");
    }
    let after: Vec<String> = agents.iter().map(read_trim).collect();
    assert_eq!(before, after, "host release_agent changed");
}
