//! The sandbox tier, end to end: `moat run --isolation sandbox` on the
//! embedded default root. Each test checks from inside the sandbox what
//! the supervisor decided: brokered opens, hidden paths, escapes, races
//! against the check, refused syscalls, and real programs.
mod common;
mod sandbox;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use common::Rt;
use sandbox::{rt, sh};

/// /data for these tests (see [`sandbox::Data`]).
struct Data(sandbox::Data);

impl std::ops::Deref for Data {
    type Target = sandbox::Data;
    fn deref(&self) -> &sandbox::Data {
        &self.0
    }
}

impl Data {
    fn new() -> Data {
        Data(sandbox::Data::new("moat-e2e-sandbox-"))
    }

    /// The default rules, `/data` readable, `/data/secret` hidden.
    fn policy(&self) -> PathBuf {
        self.0.policy_with(&[])
    }
}

#[test]
fn brokered_opens_work_and_hidden_paths_do_not_exist() {
    let Some(rt) = rt("brokered_opens_work_and_hidden_paths_do_not_exist") else {
        return;
    };
    let out = sh(
        &rt,
        &[],
        "head -1 /etc/passwd; cat /etc/shadow; echo shadow=$?; \
         echo data > /tmp/f && cat /tmp/f; touch /etc/moat-x; echo etc=$?; \
         mkdir /tmp/d && mv /tmp/f /tmp/d/g && ls /tmp/d && rm -r /tmp/d && echo removed; \
         test -e /etc/shadow || echo no-shadow; echo out > /dev/stdout",
    )
    .expect_ok();
    let o = &out.stdout;
    assert!(o.starts_with("root:"), "{o}");
    assert!(o.contains("shadow=1\n"), "{o}");
    assert!(o.contains("data\n"), "{o}");
    assert!(o.contains("etc=1\n"), "{o}");
    assert!(o.contains("g\nremoved\n"), "{o}");
    assert!(o.contains("no-shadow\n"), "{o}");
    assert!(o.contains("out\n"), "{o}");
    assert!(
        out.stderr
            .contains("/etc/shadow: No such file or directory"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("'/etc/moat-x': Permission denied"),
        "{}",
        out.stderr
    );
    // Denials are logged with the syscall, the path and the rule.
    assert!(
        out.stderr
            .contains("sandbox: denied openat /etc/shadow (r)"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains(r#"rule "/etc/shadow" = hidden"#),
        "{}",
        out.stderr
    );
}

#[test]
fn escapes_through_dotdot_symlinks_and_magic_links_fail() {
    let Some(rt) = rt("escapes_through_dotdot_symlinks_and_magic_links_fail") else {
        return;
    };
    let data = Data::new();
    let policy = data.policy();
    let out = sh(
        &rt,
        &["-v", &data.volume(), "--policy", policy.to_str().unwrap()],
        "cat /data/ok; \
         cat /data/secret && echo LEAK-direct; \
         cat /tmp/../data/secret && echo LEAK-dotdot; \
         cd /data && cat ./../data/./secret && echo LEAK-relative; \
         ln -s /data/secret /tmp/l && cat /tmp/l && echo LEAK-symlink; \
         ln -s ../../../../data /tmp/up && cat /tmp/up/secret && echo LEAK-symlink-dir; \
         cat /proc/self/root/data/secret && echo LEAK-magic-root; \
         cat /proc/self/cwd/secret && echo LEAK-magic-cwd; \
         exec 3</data/ok; cat /proc/self/fd/3/../secret && echo LEAK-fd; \
         stat /data/secret >/dev/null 2>&1 && echo LEAK-stat; \
         ls -l /tmp/l >/dev/null && echo link-itself-ok; \
         echo done",
    )
    .expect_ok();
    let o = &out.stdout;
    assert!(o.starts_with("fine\n"), "{o}\n{}", out.stderr);
    assert!(
        !o.contains("LEAK") && !o.contains("SECRET"),
        "{o}\n{}",
        out.stderr
    );
    assert!(
        o.contains("link-itself-ok\n") && o.ends_with("done\n"),
        "{o}\n{}",
        out.stderr
    );
}

const OPEN_RACE: &str = r#"
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
static char path[64] = "/data/ok";
static volatile int stop;
static void *flip(void *arg) {
    (void)arg;
    while (!stop) {
        memcpy(path, "/data/secret", 13);
        memcpy(path, "/data/ok\0\0\0\0\0", 13);
    }
    return NULL;
}
int main(void) {
    pthread_t t;
    pthread_create(&t, NULL, flip, NULL);
    int opened = 0, leaked = 0;
    for (int i = 0; i < 20000; i++) {
        int fd = open(path, O_RDONLY);
        if (fd < 0) continue;
        opened++;
        char buf[16] = {0};
        if (read(fd, buf, sizeof buf - 1) > 0 && strstr(buf, "SECRET")) leaked++;
        close(fd);
    }
    stop = 1;
    pthread_join(t, NULL);
    printf("opened=%d leaked=%d\n", opened > 0, leaked);
    return 0;
}
"#;

#[test]
fn a_thread_rewriting_the_path_cannot_open_what_was_refused() {
    let Some(rt) = rt("a_thread_rewriting_the_path_cannot_open_what_was_refused") else {
        return;
    };
    let data = Data::new();
    data.compile("openrace", OPEN_RACE);
    let policy = data.policy();
    // The helper runs from /tmp: /data is not executable under the policy.
    let out = sh(
        &rt,
        &["-v", &data.volume(), "--policy", policy.to_str().unwrap()],
        "cp /data/openrace /tmp/r && /tmp/r",
    )
    .expect_ok();
    assert!(
        out.stdout.contains("opened=1 leaked=0"),
        "{}\n{}",
        out.stdout,
        out.stderr
    );
}

const EXEC_RACE: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
static char path[64] = "/usr/bin/true";
static volatile int stop;
static void *flip(void *arg) {
    (void)arg;
    while (!stop) {
        memcpy(path, "/data/evil\0\0\0", 14);
        memcpy(path, "/usr/bin/true", 14);
    }
    return NULL;
}
int main(void) {
    pthread_t t;
    pthread_create(&t, NULL, flip, NULL);
    int ran = 0;
    for (int i = 0; i < 300; i++) {
        pid_t p = fork();
        if (p == 0) {
            char *argv[] = {path, NULL};
            execv(path, argv);
            _exit(127);
        }
        int st;
        waitpid(p, &st, 0);
        if (WIFEXITED(st) && WEXITSTATUS(st) == 0) ran++;
    }
    stop = 1;
    pthread_join(t, NULL);
    printf("ran=%d\n", ran > 0);
    return 0;
}
"#;

#[test]
fn a_thread_rewriting_the_path_cannot_exec_what_was_refused() {
    let Some(rt) = rt("a_thread_rewriting_the_path_cannot_exec_what_was_refused") else {
        return;
    };
    let data = Data::new();
    data.compile("execrace", EXEC_RACE);
    fs::write(data.path().join("evil"), "#!/bin/sh\necho PWNED\n").unwrap();
    fs::set_permissions(data.path().join("evil"), fs::Permissions::from_mode(0o755)).unwrap();
    let policy = data.policy();
    let out = sh(
        &rt,
        &["-v", &data.volume(), "--policy", policy.to_str().unwrap()],
        "/data/evil; echo direct=$?; cp /data/execrace /tmp/r && /tmp/r",
    )
    .expect_ok();
    assert!(
        out.stdout.contains("direct=126\n"),
        "{}\n{}",
        out.stdout,
        out.stderr
    );
    assert!(
        out.stdout.contains("ran=1\n"),
        "{}\n{}",
        out.stdout,
        out.stderr
    );
    assert!(
        !out.stdout.contains("PWNED"),
        "{}\n{}",
        out.stdout,
        out.stderr
    );
}

const PTRACE: &str = r#"
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(void) {
    errno = 0;
    long r = ptrace(PTRACE_TRACEME, 0, 0, 0);
    printf("ptrace=%ld %s\n", r, strerror(errno));
    errno = 0;
    r = syscall(SYS_unshare, 0x10000000);
    printf("unshare=%ld %s\n", r, strerror(errno));
    return 0;
}
"#;

#[test]
fn refused_syscalls_fail_with_a_clear_errno() {
    let Some(rt) = rt("refused_syscalls_fail_with_a_clear_errno") else {
        return;
    };
    let data = Data::new();
    data.compile("ptrace", PTRACE);
    let out = sh(
        &rt,
        &["-v", &data.volume()],
        "cp /data/ptrace /tmp/p && /tmp/p",
    )
    .expect_ok();
    assert!(
        out.stdout.contains("ptrace=-1 Operation not permitted\n"),
        "{}\n{}",
        out.stdout,
        out.stderr
    );
    assert!(
        out.stdout.contains("unshare=-1 Operation not permitted\n"),
        "{}",
        out.stdout
    );
}

const THREADS: &str = r#"
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>
static void *work(void *arg) {
    long n = 0;
    for (int i = 0; i < 200; i++) {
        int fd = open("/etc/passwd", O_RDONLY);
        struct stat st;
        if (fd >= 0 && fstat(fd, &st) == 0 && st.st_size > 0) n++;
        if (fd >= 0) close(fd);
    }
    *(long *)arg = n;
    return NULL;
}
int main(void) {
    pthread_t t[8];
    long n[8];
    for (int i = 0; i < 8; i++) pthread_create(&t[i], NULL, work, &n[i]);
    long total = 0;
    for (int i = 0; i < 8; i++) { pthread_join(t[i], NULL); total += n[i]; }
    printf("total=%ld\n", total);
    return 0;
}
"#;

#[test]
fn threads_pipelines_a_compiler_and_git_work() {
    let Some(rt) = rt("threads_pipelines_a_compiler_and_git_work") else {
        return;
    };
    let data = Data::new();
    data.compile("threads", THREADS);
    let out = sh(
        &rt,
        &["-v", &data.volume()],
        "cp /data/threads /tmp/t && /tmp/t; \
         cat /etc/passwd | grep -c root | tr -d ' '; \
         cd /tmp && printf 'int main(void){return 42;}\\n' > a.c && gcc -o a a.c && ./a; echo cc=$?; \
         git init -q /tmp/repo && cd /tmp/repo && git config user.email t@e && git config user.name t && \
         echo hi > f && git add f && git commit -qm first && echo more >> f && git commit -qam second && \
         git log --oneline | wc -l",
    )
    .expect_ok();
    let o = &out.stdout;
    assert!(o.contains("total=1600\n"), "{o}\n{}", out.stderr);
    assert!(o.contains("cc=42\n"), "{o}\n{}", out.stderr);
    assert!(o.ends_with("2\n"), "{o}\n{}", out.stderr);
}

/// The supervisor creates names for the workload with its umask, which it
/// caches with the caller's credentials: a process that changes its umask,
/// or shares it with another process (CLONE_FS), still gets exactly the
/// modes the kernel would give it.
#[test]
fn files_are_created_with_the_umask_in_force() {
    let Some(rt) = rt("files_are_created_with_the_umask_in_force") else {
        return;
    };
    let data = Data::new();
    data.compile("umask", UMASK);
    let out = sh(
        &rt,
        &["-v", &data.volume()],
        "cp /data/umask /tmp/umask && cd /tmp && umask 022 && ./umask",
    )
    .expect_ok();
    assert_eq!(
        out.stdout, "a 644\nb 600\nc 700\nd 666\ne 644\nf 640\ng 750\n",
        "{}",
        out.stderr
    );
}

const UMASK: &str = r#"
#define _GNU_SOURCE
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
static void show(const char *p) {
    struct stat st;
    if (stat(p, &st) != 0) { perror(p); _exit(1); }
    printf("%s %o\n", p, st.st_mode & 0777);
}
static void make(const char *p) {
    int fd = open(p, O_CREAT | O_WRONLY | O_EXCL, 0666);
    if (fd < 0) { perror(p); _exit(1); }
    close(fd);
}
int main(void) {
    /* A process that changes its own umask between creates. */
    pid_t c1 = fork();
    if (c1 < 0) { perror("fork"); return 1; }
    if (c1 == 0) {
        make("a");
        umask(077); make("b");
        if (mkdir("c", 0777) != 0) { perror("c"); _exit(1); }
        umask(0); make("d");
        _exit(0);
    }
    int st;
    if (waitpid(c1, &st, 0) != c1 || st != 0) return 1;
    /* Its parent keeps its own (022, from the shell). */
    make("e");
    /* A child that shares this process's umask (CLONE_FS) changes it. */
    long pid = syscall(SYS_clone, CLONE_FS | SIGCHLD, 0, 0, 0, 0);
    if (pid < 0) { perror("clone"); return 1; }
    if (pid == 0) { umask(027); _exit(0); }
    if (waitpid(pid, &st, 0) != pid || st != 0) return 1;
    make("f");
    if (mkdir("g", 0777) != 0) { perror("g"); return 1; }
    const char *names[] = {"a", "b", "c", "d", "e", "f", "g"};
    for (int i = 0; i < 7; i++) show(names[i]);
    return 0;
}
"#;

#[test]
fn the_sandbox_leaves_nothing_behind() {
    let Some(rt) = rt("the_sandbox_leaves_nothing_behind") else {
        return;
    };
    sh(&rt, &[], "true").expect_ok();
    let left: Vec<String> = fs::read_dir(rt.root().join(".sandbox"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
    // No supervisor outlives its sandbox: none has the state root open.
    let root = rt.root().display().to_string();
    for (pid, _, _) in common::all_processes() {
        let cmd = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        assert!(
            !(cmd.contains(&root) && cmd.contains("sandbox")),
            "left running: {pid} {cmd}"
        );
    }
}

/// The supervisor's PID as the sandbox's state records it (a launch
/// records it once the workload runs: waited for).
fn supervisor_pid(rt: &Rt, id: &str) -> i32 {
    let path = rt.root().join(id).join("state.json");
    for _ in 0..3000 {
        let st: serde_json::Value = fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        if let Some(p) = st["tier_state"]["supervisor"]["pid"].as_i64() {
            return i32::try_from(p).unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("no supervisor recorded in {}", path.display());
}

/// The container process, the supervisor and its guard, as the sandbox's
/// state records them (waited for, as [`supervisor_pid`]).
fn sandbox_processes(rt: &Rt, id: &str) -> [i32; 3] {
    let sup = supervisor_pid(rt, id);
    let path = rt.root().join(id).join("state.json");
    let st: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    let pid = |v: &serde_json::Value| i32::try_from(v.as_i64().unwrap()).unwrap();
    [
        pid(&st["pid"]),
        sup,
        pid(&st["tier_state"]["supervisor"]["guard"][0]),
    ]
}

/// The lines of /proc/PID/cgroup: one per hierarchy.
fn cgroups_of(pid: i32) -> Vec<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    text.lines().map(str::to_string).collect()
}

/// The supervisor and its guard are in the container's cgroup, in every
/// hierarchy the container process is in (so the supervisor's memory and
/// CPU count against the sandbox's limits), and in a cgroup of the
/// container's own, not the runtime's.
fn assert_joined(rt: &Rt, id: &str) {
    let [init, sup, guard] = sandbox_processes(rt, id);
    let theirs = cgroups_of(init);
    let ours = cgroups_of(std::process::id() as i32);
    assert!(
        theirs.iter().any(|l| !ours.contains(l)),
        "the container has no cgroup of its own: {theirs:?}"
    );
    for (who, pid) in [("supervisor", sup), ("guard", guard)] {
        let got = cgroups_of(pid);
        for line in &theirs {
            assert!(
                got.contains(line),
                "the {who} ({pid}) is not in {line}: {got:?}"
            );
        }
    }
}

/// A sandbox container created (not started) by the OCI `create` from a
/// bundle that sleeps, and the bundle (kept until the test ends).
fn created_sleeper<'a>(rt: &'a Rt, name: &str) -> (common::Bundle, common::Ctr<'a>) {
    let b = common::Bundle::new(&["sleep", "1000"]);
    b.write_config();
    let id = rt.new_id(name);
    let dir = b.dir().display().to_string();
    rt.cmd(&["--isolation", "sandbox", "create", "--bundle", &dir, &id])
        .expect_ok();
    (b, common::Ctr { rt, id, out: None })
}

/// The supervisor and its guard start before the container's cgroup
/// exists; once it does, each moves itself into it (writing "0" to cgroup
/// files the runtime opened and sent it): after `create`, before the
/// container starts, and in a `moat run`, where the supervisor is already
/// jailed and serving the workload when it is asked.
#[test]
fn the_supervisor_and_its_guard_join_the_containers_cgroup() {
    use std::io::BufRead;
    let Some(rt) = rt("the_supervisor_and_its_guard_join_the_containers_cgroup") else {
        return;
    };
    let (_b, c) = created_sleeper(&rt, "sandbox-cgroup");
    assert_joined(&rt, &c.id);
    c.start().expect_ok();
    // Still serving: the join did not disturb the supervisor.
    let o = c.exec(&["cat", "/proc/self/status"]).expect_ok();
    assert!(o.stdout.contains("Seccomp:\t2"), "{o:?}");
    assert_joined(&rt, &c.id);
    drop(c);

    let id = rt.new_id("sandbox-cgroup-run");
    let mut cmd = rt.command();
    cmd.args(["run", "--isolation", "sandbox", "--name", &id, "--"])
        .args(["sh", "-c", "echo started; exec sleep 1000"])
        .stdout(std::process::Stdio::piped());
    let mut child = common::spawn_own(&mut cmd);
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "started\n");
    assert_joined(&rt, &id);
    rt.cmd(&["kill", &id, "KILL"]).expect_ok();
    let status = common::wait_own(&mut child);
    assert_eq!(status.code(), Some(128 + 9));
    assert!(!rt.root().join(&id).exists(), "state left behind");
}

#[test]
fn the_workload_dies_with_its_supervisor() {
    use std::io::{BufRead, Read};
    let Some(rt) = rt("the_workload_dies_with_its_supervisor") else {
        return;
    };
    let id = rt.new_id("supervisor-death");
    let mut cmd = rt.command();
    cmd.args(["run", "--isolation", "sandbox", "--name", &id, "--"])
        // It never ends by itself: only the guard's kill ends it (without
        // one, the harness's timeout fails the test).
        .args(["sh", "-c", "echo started; while :; do sleep 1; done"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = common::spawn_own(&mut cmd);
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "started\n");
    // Killed from outside (as an OOM kill would): its guard ends the
    // container rather than leave the workload running with ENOSYS for
    // every brokered call.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(supervisor_pid(&rt, &id)),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let status = common::wait_own(&mut child);
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(128 + 9), "{rest}\n{err}");
    assert!(!rt.root().join(&id).exists(), "state left behind");
}

/// `moat exec` into a running sandbox (what `kubectl exec`, `docker exec`
/// and CRI's ExecSync do): the new process's notify fd joins the supervisor,
/// which decides its calls as it does the workload's. The supervisor used
/// to drop every fd that came after it was jailed (it checked the fd through
/// the container's /proc), so each brokered call of an exec, its execve
/// first, failed with ENOSYS.
#[test]
fn exec_joins_a_running_sandbox() {
    let Some(rt) = rt("exec_joins_a_running_sandbox") else {
        return;
    };
    let (_b, c) = created_sleeper(&rt, "sandbox-exec");
    c.start().expect_ok();
    let o = c.exec(&["sh", "-c", "echo in-exec; ls /bin/sh; exit 3"]);
    assert_eq!(
        (o.code, o.stdout.as_str()),
        (Some(3), "in-exec\n/bin/sh\n"),
        "{o:?}"
    );
    // A second exec, while the first's fd is gone: the supervisor still serves.
    let o = c.exec(&["cat", "/proc/self/status"]).expect_ok();
    assert!(o.stdout.contains("Seccomp:\t2"), "{o:?}");
    assert_eq!(c.status(), "running");
}
