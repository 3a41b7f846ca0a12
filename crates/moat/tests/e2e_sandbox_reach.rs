//! The sandbox tier, end to end: what the workload can reach and see.
//! Socket addresses decided by the supervisor (unix paths under the policy,
//! inet destinations by the sandbox's network, a racing thread that
//! rewrites the address), the machine it is shown (/proc and /sys views,
//! uname, sysinfo, CPU affinity; `moat probe` reporting no host identity),
//! and directory listings without hidden names.
mod common;
mod sandbox;

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use sandbox::{rt, sh};

/// /data for these tests (see [`sandbox::Data`]), with the sockets of
/// [`Servers`] in its policy.
struct Data(sandbox::Data);

impl std::ops::Deref for Data {
    type Target = sandbox::Data;
    fn deref(&self) -> &sandbox::Data {
        &self.0
    }
}

impl Data {
    fn new() -> Data {
        Data(sandbox::Data::new("moat-e2e-reach-"))
    }

    /// The default policy, `/data` readable, `/data/secret` and the hidden
    /// sockets hidden, `/data/open.sock` writable (connect asks `w`), and
    /// `extra` rules.
    fn policy(&self, extra: &[(&str, &str)]) -> PathBuf {
        let mut rules = vec![
            ("/data/hidden.sock", "hidden"),
            ("/data/hidden.dgram", "hidden"),
            ("/data/open.sock", "rw"),
        ];
        rules.extend_from_slice(extra);
        self.0.policy_with(&rules)
    }
}

/// Unix listeners on the host in the data directory: `open.sock` answers
/// "OPEN", `hidden.sock` "HIDDEN"; `hidden.dgram` takes datagrams. They
/// serve until dropped.
struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    _dgram: UnixDatagram,
}

impl Servers {
    fn start(dir: &Path) -> Servers {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (name, reply) in [("open.sock", "OPEN\n"), ("hidden.sock", "HIDDEN\n")] {
            let path = dir.join(name);
            let l = UnixListener::bind(&path).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o777)).unwrap();
            l.set_nonblocking(true).unwrap();
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match l.accept() {
                        Ok((mut c, _)) => {
                            let _ = c.set_nonblocking(false);
                            let _ = c.write_all(reply.as_bytes());
                        }
                        Err(_) => std::thread::sleep(std::time::Duration::from_millis(1)),
                    }
                }
            }));
        }
        let path = dir.join("hidden.dgram");
        let d = UnixDatagram::bind(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o777)).unwrap();
        Servers {
            stop,
            threads,
            _dgram: d,
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

const SOCKETS: &str = r#"
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static int unix_addr(struct sockaddr_un *a, const char *p) {
    memset(a, 0, sizeof *a);
    a->sun_family = AF_UNIX;
    strcpy(a->sun_path, p);
    return offsetof(struct sockaddr_un, sun_path) + strlen(p) + 1;
}

/* Connects to unix path P and reads its greeting into OUT ("" on error). */
static int talk(const char *p, char *out) {
    struct sockaddr_un a;
    int len = unix_addr(&a, p);
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    out[0] = 0;
    if (connect(s, (struct sockaddr *)&a, len) < 0) { int e = errno; close(s); return -e; }
    int n = read(s, out, 15);
    out[n > 0 ? n : 0] = 0;
    close(s);
    return 0;
}

static const char *err(int r) { return r < 0 ? strerror(-r) : "ok"; }

static void unix_checks(void) {
    char buf[16];
    int r = talk("/data/open.sock", buf);
    printf("open=%s %s", err(r), buf);
    r = talk("/data/none.sock", buf);
    printf("missing=%s\n", err(r));
    r = talk("/data/hidden.sock", buf);
    printf("hidden=%s%s\n", err(r), buf[0] ? " LEAK" : "");
    symlink("/data/hidden.sock", "/tmp/l");
    r = talk("/tmp/l", buf);
    printf("symlink=%s%s\n", err(r), buf[0] ? " LEAK" : "");
    /* Datagrams to a hidden socket, by sendto and by sendmsg. */
    struct sockaddr_un a;
    int len = unix_addr(&a, "/data/hidden.dgram");
    int d = socket(AF_UNIX, SOCK_DGRAM, 0);
    r = sendto(d, "x", 1, 0, (struct sockaddr *)&a, len);
    printf("dgram=%s\n", r < 0 ? strerror(errno) : "sent");
    struct iovec iov = {"y", 1};
    struct msghdr m = {.msg_name = &a, .msg_namelen = len, .msg_iov = &iov, .msg_iovlen = 1};
    r = sendmsg(d, &m, 0);
    printf("dgrammsg=%s\n", r < 0 ? strerror(errno) : "sent");
    /* bind: not where the policy refuses writes; a relative name keeps its
       name; the peer sees the caller's credentials. */
    int b = socket(AF_UNIX, SOCK_STREAM, 0);
    len = unix_addr(&a, "/data/new.sock");
    r = bind(b, (struct sockaddr *)&a, len);
    printf("bind-ro=%s\n", r < 0 ? strerror(errno) : "bound");
    chdir("/tmp");
    len = unix_addr(&a, "./rel.sock");
    r = bind(b, (struct sockaddr *)&a, len);
    struct sockaddr_un got;
    socklen_t gl = sizeof got;
    getsockname(b, (struct sockaddr *)&got, &gl);
    printf("bind=%s name=%s\n", r < 0 ? strerror(errno) : "ok", got.sun_path);
    listen(b, 4);
    int c = socket(AF_UNIX, SOCK_STREAM, 0);
    len = unix_addr(&a, "/tmp/rel.sock");
    r = connect(c, (struct sockaddr *)&a, len);
    int acc = accept(b, NULL, NULL);
    struct ucred cred;
    socklen_t cl = sizeof cred;
    getsockopt(acc, SOL_SOCKET, SO_PEERCRED, &cred, &cl);
    printf("connect=%s peer-uid=%s\n", err(r < 0 ? -errno : 0),
           cred.uid == getuid() && cred.gid == getgid() ? "caller" : "OTHER");
    /* Abstract names in the sandbox's own network namespace. */
    int ab = socket(AF_UNIX, SOCK_STREAM, 0);
    memset(&a, 0, sizeof a);
    a.sun_family = AF_UNIX;
    memcpy(a.sun_path, "\0moat-abstract", 14);
    len = offsetof(struct sockaddr_un, sun_path) + 14;
    bind(ab, (struct sockaddr *)&a, len);
    listen(ab, 1);
    int ac = socket(AF_UNIX, SOCK_STREAM, 0);
    r = connect(ac, (struct sockaddr *)&a, len);
    printf("abstract=%s\n", err(r < 0 ? -errno : 0));
    /* A descriptor passed with SCM_RIGHTS through a brokered sendmsg. */
    int sp[2];
    socketpair(AF_UNIX, SOCK_STREAM, 0, sp);
    int f = open("/data/ok", O_RDONLY);
    char cbuf[CMSG_SPACE(sizeof(int))];
    memset(cbuf, 0, sizeof cbuf);
    struct iovec one = {"z", 1};
    struct msghdr mm = {.msg_iov = &one, .msg_iovlen = 1, .msg_control = cbuf,
                        .msg_controllen = sizeof cbuf};
    struct cmsghdr *cm = CMSG_FIRSTHDR(&mm);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cm), &f, sizeof f);
    r = sendmsg(sp[0], &mm, 0);
    char z;
    struct iovec in = {&z, 1};
    char rbuf[CMSG_SPACE(sizeof(int))];
    struct msghdr rm = {.msg_iov = &in, .msg_iovlen = 1, .msg_control = rbuf,
                        .msg_controllen = sizeof rbuf};
    recvmsg(sp[1], &rm, 0);
    int g = -1;
    if (CMSG_FIRSTHDR(&rm)) memcpy(&g, CMSG_DATA(CMSG_FIRSTHDR(&rm)), sizeof g);
    char fbuf[8] = {0};
    read(g, fbuf, 4);
    printf("passfd=%s %s\n", r == 1 ? "sent" : strerror(errno), fbuf);
}

static void inet_checks(void) {
    int l = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    int r = bind(l, (struct sockaddr *)&a, sizeof a);
    socklen_t al = sizeof a;
    getsockname(l, (struct sockaddr *)&a, &al);
    listen(l, 8);
    int c = socket(AF_INET, SOCK_STREAM, 0);
    r = connect(c, (struct sockaddr *)&a, sizeof a);
    int s = accept(l, NULL, NULL);
    struct iovec iov = {"ping", 4};
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1};
    sendmsg(c, &m, 0);
    char buf[8] = {0};
    read(s, buf, 4);
    printf("tcp=%s %s\n", r < 0 ? strerror(errno) : "ok", buf);
    /* Blocking sends larger than the socket's buffers finish once the
       reader drains them. */
    if (fork() == 0) {
        static char big[4 << 20];
        size_t left = sizeof big;
        while (left) {
            struct iovec bi = {big, left};
            struct msghdr bm = {.msg_iov = &bi, .msg_iovlen = 1};
            ssize_t n = sendmsg(c, &bm, 0);
            if (n <= 0) _exit(1);
            left -= n;
        }
        _exit(0);
    }
    size_t total = 0;
    static char sink[65536];
    while (total < (4u << 20)) {
        ssize_t n = read(s, sink, sizeof sink);
        if (n <= 0) break;
        total += n;
    }
    printf("bulk=%zu\n", total);
    struct sockaddr_in far = {.sin_family = AF_INET, .sin_port = htons(9)};
    inet_pton(AF_INET, "10.1.2.3", &far.sin_addr);
    int f = socket(AF_INET, SOCK_STREAM, 0);
    r = connect(f, (struct sockaddr *)&far, sizeof far);
    printf("far=%s\n", r < 0 ? strerror(errno) : "CONNECTED");
    /* UDP on loopback with sendmmsg. */
    int u = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in ua = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    bind(u, (struct sockaddr *)&ua, sizeof ua);
    al = sizeof ua;
    getsockname(u, (struct sockaddr *)&ua, &al);
    int v = socket(AF_INET, SOCK_DGRAM, 0);
    struct iovec i1 = {"a", 1}, i2 = {"b", 1};
    struct mmsghdr mv[2] = {
        {.msg_hdr = {.msg_name = &ua, .msg_namelen = sizeof ua, .msg_iov = &i1, .msg_iovlen = 1}},
        {.msg_hdr = {.msg_name = &ua, .msg_namelen = sizeof ua, .msg_iov = &i2, .msg_iovlen = 1}},
    };
    r = sendmmsg(v, mv, 2, 0);
    char ub[4] = {0};
    recv(u, ub, 1, 0);
    recv(u, ub + 1, 1, 0);
    printf("udp=%d %s lens=%u,%u\n", r, ub, mv[0].msg_len, mv[1].msg_len);
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IONBF, 0);
    if (argc > 1 && !strcmp(argv[1], "unix")) unix_checks();
    if (argc > 1 && !strcmp(argv[1], "inet")) inet_checks();
    return 0;
}
"#;

#[test]
fn unix_socket_paths_are_decided_by_the_policy() {
    let Some(rt) = rt("unix_socket_paths_are_decided_by_the_policy") else {
        return;
    };
    let data = Data::new();
    data.compile("sockets", SOCKETS);
    let _servers = Servers::start(data.path());
    let policy = data.policy(&[]);
    let out = sh(
        &rt,
        &["-v", &data.volume(), "--policy", policy.to_str().unwrap()],
        "cp /data/sockets /tmp/s && /tmp/s unix",
    )
    .expect_ok();
    let o = &out.stdout;
    let e = &out.stderr;
    assert!(o.contains("open=ok OPEN\n"), "{o}\n{e}");
    assert!(o.contains("hidden=No such file or directory\n"), "{o}\n{e}");
    assert!(
        o.contains("symlink=No such file or directory\n"),
        "{o}\n{e}"
    );
    assert!(o.contains("dgram=No such file or directory\n"), "{o}\n{e}");
    assert!(
        o.contains("dgrammsg=No such file or directory\n"),
        "{o}\n{e}"
    );
    // The policy refuses it (the kernel would say read-only file system).
    assert!(o.contains("bind-ro=Permission denied\n"), "{o}\n{e}");
    assert!(o.contains("bind=ok name=./rel.sock\n"), "{o}\n{e}");
    assert!(o.contains("connect=ok peer-uid=caller\n"), "{o}\n{e}");
    assert!(o.contains("abstract=ok\n"), "{o}\n{e}");
    assert!(o.contains("passfd=sent fine\n"), "{o}\n{e}");
    assert!(!o.contains("LEAK"), "{o}\n{e}");
    assert!(
        e.contains("sandbox: denied connect /data/hidden.sock"),
        "{e}"
    );
    // A socket that is not there is not there, without a denial.
    assert!(
        o.contains("missing=No such file or directory\n"),
        "{o}\n{e}"
    );
    assert!(!e.contains("none.sock"), "{e}");
}

#[test]
fn a_thread_rewriting_the_address_cannot_connect_where_refused() {
    let Some(rt) = rt("a_thread_rewriting_the_address_cannot_connect_where_refused") else {
        return;
    };
    let data = Data::new();
    data.compile("sockets", RACE);
    let _servers = Servers::start(data.path());
    let policy = data.policy(&[]);
    let out = sh(
        &rt,
        &["-v", &data.volume(), "--policy", policy.to_str().unwrap()],
        "cp /data/sockets /tmp/s && /tmp/s",
    )
    .expect_ok();
    assert!(
        out.stdout.contains("connected=1 leaked=0\n"),
        "{}\n{}",
        out.stdout,
        out.stderr
    );
}

/// The race helper: the address the workload passes to connect lives in
/// memory a second thread rewrites between an allowed and a hidden path.
const RACE: &str = r#"
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
static struct sockaddr_un addr = {AF_UNIX, "/data/open.sock"};
static volatile int stop;
static void *flip(void *arg) {
    (void)arg;
    while (!stop) {
        memcpy(addr.sun_path, "/data/hidden.sock", 18);
        __asm__ __volatile__("" ::: "memory");
        memcpy(addr.sun_path, "/data/open.sock\0\0", 18);
        __asm__ __volatile__("" ::: "memory");
    }
    return NULL;
}
int main(void) {
    pthread_t t;
    pthread_create(&t, NULL, flip, NULL);
    int ok = 0, leaked = 0;
    for (int i = 0; i < 3000; i++) {
        int s = socket(AF_UNIX, SOCK_STREAM, 0);
        if (connect(s, (struct sockaddr *)&addr, sizeof addr) == 0) {
            char buf[16] = {0};
            if (read(s, buf, 15) > 0) {
                if (strstr(buf, "HIDDEN")) leaked++; else ok++;
            }
        }
        close(s);
    }
    stop = 1;
    pthread_join(t, NULL);
    printf("connected=%d leaked=%d\n", ok > 0, leaked);
    return 0;
}
"#;

#[test]
fn inet_destinations_follow_the_sandboxs_network() {
    let Some(rt) = rt("inet_destinations_follow_the_sandboxs_network") else {
        return;
    };
    let data = Data::new();
    data.compile("sockets", SOCKETS);
    let out = sh(
        &rt,
        &["-v", &data.volume()],
        "cp /data/sockets /tmp/s && /tmp/s inet",
    )
    .expect_ok();
    let (o, e) = (&out.stdout, &out.stderr);
    assert!(o.contains("tcp=ok ping\n"), "{o}\n{e}");
    assert!(o.contains("bulk=4194304\n"), "{o}\n{e}");
    assert!(o.contains("far=Network is unreachable\n"), "{o}\n{e}");
    assert!(o.contains("udp=2 ab lens=1,1\n"), "{o}\n{e}");
    // Refused by the supervisor, which says why.
    assert!(
        e.contains("sandbox: denied connect to 10.1.2.3:9") && e.contains("lo only"),
        "{e}"
    );
}

fn host(path: &str) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

fn host_uname() -> (String, String) {
    let u = rustix::system::uname();
    (
        u.release().to_string_lossy().into_owned(),
        u.version().to_string_lossy().into_owned(),
    )
}

#[test]
fn proc_and_sys_describe_the_sandbox_not_the_host() {
    let Some(rt) = rt("proc_and_sys_describe_the_sandbox_not_the_host") else {
        return;
    };
    let data = Data::new();
    let out = sh(
        &rt,
        &["-v", &data.volume(), "--cpus", "1", "--memory", "256m"],
        "echo cpus=$(grep -c ^processor /proc/cpuinfo) nproc=$(nproc) \
         online=$(cat /sys/devices/system/cpu/online) stat=$(grep -c '^cpu[0-9]' /proc/stat); \
         grep -m1 'model name' /proc/cpuinfo; head -1 /proc/meminfo; \
         echo release=$(uname -r); cat /proc/version; \
         echo boot=$(cat /proc/sys/kernel/random/boot_id); \
         echo osrelease=$(cat /proc/sys/kernel/osrelease); \
         echo uptime=$(cut -d' ' -f1 /proc/uptime); cat /proc/loadavg; \
         echo mounts:; cat /proc/self/mountinfo /proc/mounts; echo end-mounts; \
         ls /sys/kernel >/dev/null 2>&1 || echo no-sys-kernel; \
         ls /sys/devices/system/cpu/cpu0 >/dev/null 2>&1 || echo no-cpu-topology; \
         cat /proc/cmdline >/dev/null 2>&1 || echo no-cmdline; \
         echo x > /proc/meminfo 2>/dev/null || echo views-read-only; \
         ln -s /proc/cpuinfo /tmp/c && echo via-link=$(grep -c ^processor /tmp/c)",
    )
    .expect_ok();
    let (o, e) = (&out.stdout, &out.stderr);
    assert!(o.contains("cpus=1 nproc=1 online=0 stat=1\n"), "{o}\n{e}");
    assert!(o.contains("model name\t: moat virtual CPU\n"), "{o}");
    assert!(o.contains("MemTotal:         262144 kB\n"), "{o}");
    assert!(o.contains("release=6.1.0-moat\n"), "{o}");
    assert!(o.contains("Linux version 6.1.0-moat"), "{o}");
    assert!(o.contains("osrelease=6.1.0-moat\n"), "{o}");
    for line in [
        "no-sys-kernel",
        "no-cpu-topology",
        "no-cmdline",
        "views-read-only",
        "via-link=1",
    ] {
        assert!(o.contains(&format!("{line}\n")), "{line}: {o}\n{e}");
    }
    // Nothing of the host's identity.
    let (release, version) = host_uname();
    assert!(!o.contains(&release) && !o.contains(&version), "{o}");
    let boot = host("/proc/sys/kernel/random/boot_id");
    assert!(!boot.trim().is_empty() && !o.contains(boot.trim()), "{o}");
    let model = host("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name\t: ").map(str::to_owned))
        .unwrap_or_default();
    assert!(model.is_empty() || !o.contains(&model), "{o}");
    let host_up: f64 = host("/proc/uptime")
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap();
    let up: f64 = o
        .lines()
        .find_map(|l| l.strip_prefix("uptime="))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(up < host_up, "sandbox uptime {up} vs host {host_up}");
    let mounts = o
        .split("mounts:\n")
        .nth(1)
        .and_then(|m| m.split("end-mounts").next())
        .unwrap();
    assert!(mounts.contains(" /data "), "{mounts}");
    let tmp = data.path().display().to_string();
    let name = data
        .path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(
        !mounts.contains(&tmp) && !mounts.contains(&name),
        "host path in the mount table: {mounts}"
    );
    for line in mounts.lines().filter(|l| l.contains(" - ")) {
        assert_eq!(line.split(' ').nth(3), Some("/"), "{line}");
    }
}

#[test]
fn the_policy_sets_the_kernel_identity() {
    let Some(rt) = rt("the_policy_sets_the_kernel_identity") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut v: serde_json::Value =
        serde_json::from_str(moat_sandbox::policy::DEFAULT_POLICY).unwrap();
    v["kernel"] = serde_json::json!({"release": "5.15.0-lts", "version": "#7 SMP"});
    let p = dir.path().join("p.json");
    fs::write(&p, v.to_string()).unwrap();
    let out = sh(
        &rt,
        &["--policy", p.to_str().unwrap()],
        "uname -r; uname -v; cat /proc/sys/kernel/osrelease",
    )
    .expect_ok();
    assert_eq!(out.stdout, "5.15.0-lts\n#7 SMP\n5.15.0-lts\n");
    // A bad one is refused before anything runs.
    v["kernel"] = serde_json::json!({"release": ""});
    fs::write(&p, v.to_string()).unwrap();
    let bad = sh(&rt, &["--policy", p.to_str().unwrap()], "true").expect_fail();
    assert!(bad.stderr.contains("kernel release"), "{}", bad.stderr);
}

#[test]
fn hidden_names_are_not_listed() {
    let Some(rt) = rt("hidden_names_are_not_listed") else {
        return;
    };
    let data = Data::new();
    let policy = data.policy(&[]);
    let out = sh(
        &rt,
        &["-v", &data.volume(), "--policy", policy.to_str().unwrap()],
        "echo data: $(ls -a /data | tr '\\n' ' '); \
         echo etc-shadow=$(ls -a /etc | grep -c shadow); \
         echo proc-kcore=$(ls /proc | grep -c kcore); \
         echo find=$(find /data -name secret | wc -l); \
         echo passwd=$(ls /etc | grep -c '^passwd$')",
    )
    .expect_ok();
    let o = &out.stdout;
    assert!(o.contains("data: . .. ok "), "{o}\n{}", out.stderr);
    assert!(!o.contains("secret") && !o.contains("hidden.sock"), "{o}");
    assert!(o.contains("etc-shadow=0\n"), "{o}");
    assert!(o.contains("proc-kcore=0\n"), "{o}");
    assert!(o.contains("find=0\n"), "{o}");
    assert!(o.contains("passwd=1\n"), "{o}");
}

/// Check id → detail, from `moat probe --json`.
fn probe_details(stdout: &str) -> std::collections::BTreeMap<String, String> {
    let doc: serde_json::Value = serde_json::from_str(stdout)
        .unwrap_or_else(|e| panic!("probe output is not JSON ({e}): {stdout}"));
    doc["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["id"].as_str().unwrap().to_string(),
                c["detail"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[test]
fn probe_finds_no_host_identity_in_the_sandbox() {
    let Some(rt) = rt("probe_finds_no_host_identity_in_the_sandbox") else {
        return;
    };
    let bin = tempfile::Builder::new()
        .prefix("moat-e2e-probe-")
        .tempdir()
        .unwrap();
    fs::set_permissions(bin.path(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::copy(env!("CARGO_BIN_EXE_moat"), bin.path().join("moat")).unwrap();
    let vol = format!("{}:/opt/moat:ro", bin.path().display());
    let out = rt
        .cmd(&[
            "run",
            "--isolation",
            "sandbox",
            "-v",
            &vol,
            "--",
            "/opt/moat/moat",
            "probe",
            "--json",
        ])
        .expect_ok();
    let d = probe_details(&out.stdout);
    let get = |id: &str| d.get(id).unwrap_or_else(|| panic!("no check {id}")).clone();
    let all: String = d.values().cloned().collect::<Vec<_>>().join("\n");
    let (release, version) = host_uname();
    assert!(!all.contains(&release), "host kernel release: {all}");
    assert!(!all.contains(&version), "host kernel version: {all}");
    let model = host("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name\t: ").map(str::to_owned))
        .unwrap_or_default();
    assert!(
        model.is_empty() || !all.contains(&model),
        "host CPU model: {all}"
    );
    let boot = host("/proc/sys/kernel/random/boot_id");
    assert!(!all.contains(boot.trim()), "host boot id: {all}");
    let mem_kb = host("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .map(|v| v.trim().trim_end_matches("kB").trim().to_string())
        .unwrap();
    assert!(!all.contains(&mem_kb), "host memory size: {all}");
    // What each identity check saw: the sandbox's.
    assert!(
        get("host.kernel").contains("6.1.0-moat"),
        "{}",
        get("host.kernel")
    );
    assert!(
        get("host.cpu").contains("moat virtual CPU"),
        "{}",
        get("host.cpu")
    );
    assert!(
        get("host.memory").contains("1048576 kB"),
        "{}",
        get("host.memory")
    );
    assert!(
        get("host.paths").starts_with("no host path"),
        "{}",
        get("host.paths")
    );
    assert!(!all.contains(&bin.path().display().to_string()), "{all}");
}

#[test]
fn moat_exec_joins_the_sandbox_and_its_decisions() {
    use std::io::BufRead;
    let Some(rt) = rt("moat_exec_joins_the_sandbox_and_its_decisions") else {
        return;
    };
    let id = rt.new_id("sandbox-exec");
    let mut cmd = rt.command();
    cmd.args(["run", "--isolation", "sandbox", "--name", &id, "--"])
        .args(["sh", "-c", "echo started; sleep 30"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let mut child = common::spawn_own(&mut cmd);
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "started\n");
    // The joining process's syscalls go to the same supervisor, from its
    // exec on (before it, they are the runtime's).
    let got = rt.cmd(&[
        "exec",
        &id,
        "sh",
        "-c",
        "uname -r; cat /etc/shadow 2>&1; ls /etc | grep -c shadow; \
             python3 -c 'import socket; s=socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); \
             s.bind(\"/tmp/d\"); s.sendto(b\"dgram\", \"/tmp/d\"); print(s.recv(8).decode())'",
    ]);
    let missing = rt.cmd(&["exec", &id, "/nonexistent"]);
    rt.cmd(&["kill", &id, "KILL"]);
    common::wait_own(&mut child);
    assert!(got.stdout.starts_with("6.1.0-moat\n"), "{got:?}");
    assert!(
        got.stdout.contains("No such file or directory\n0\n"),
        "{got:?}"
    );
    assert!(got.stdout.ends_with("dgram\n"), "{got:?}");
    assert!(!missing.ok(), "{missing:?}");
    assert!(
        missing.stderr.contains("cannot exec /nonexistent"),
        "{missing:?}"
    );
}
