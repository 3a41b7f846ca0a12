//! `moat run --net egress=… -p …` and the `dev.moat.net.*` annotations:
//! the workload reaches what the rules allow through moat's user-space
//! stack and nothing else, publishes a port, and leaves no stack process.
//!
//! Every test makes its own world and removes it: a network namespace
//! "outer" where moat (and so its stack) runs, as if it were the host, and
//! an "internet" namespace with a web server and a DNS server, joined by a
//! veth pair. moat runs in a mount namespace of its own whose resolv.conf
//! names that DNS server, so names resolve as they would on a host. The
//! host's own network and files are never touched. The container tier and
//! the sandbox tier (whose only network is the stack) are both tested.
#![forbid(unsafe_code)]

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static NETS: AtomicU32 = AtomicU32::new(0);

/// Two network namespaces and servers; removed on drop.
struct World {
    outer: String,
    /// The outer namespace's address: 10.N.0.1.
    outer_addr: String,
    inet: String,
    /// The internet side's address: 10.N.0.2.
    server: String,
    /// Its IPv6 address: fd00:N::2.
    server6: String,
    /// The addresses the test DNS server gives [`NAME`]: the same server's
    /// 10.N.0.3 and fd00:N::3 (reachable only through a rule on the name).
    named: String,
    named6: String,
    www: PathBuf,
    /// Bytes the push server (port 9001) managed to send, updated as it goes.
    pushed: PathBuf,
    /// The resolv.conf moat sees: the test internet's DNS server.
    resolv: PathBuf,
    server_proc: Option<std::process::Child>,
    helper_proc: Option<std::process::Child>,
}

/// A name the test internet's DNS server answers (A and AAAA: the
/// server's [`World::named`] addresses), and another one it answers the
/// same way.
const NAME: &str = "www.moat-test.example";
const OTHER_NAME: &str = "other.moat-test.example";

/// The test internet's other servers, in Python: 9000 echoes lines on any
/// number of connections (held open until the client closes), 9001 pushes
/// bytes to whoever connects, as fast as they are taken, counting them in
/// the file given as argv[1]; UDP 53 answers A and AAAA queries for
/// [`NAME`] and [`OTHER_NAME`] with argv[2] and argv[3] (NXDOMAIN for any
/// other name).
const HELPER: &str = r#"
import socket, struct, sys, threading
NAMES = {b'www.moat-test.example', b'other.moat-test.example'}
def dns(v4, v6):
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(('::', 53))
    while True:
        q, peer = s.recvfrom(512)
        i, labels = 12, []
        while i < len(q) and q[i]:
            labels.append(q[i + 1:i + 1 + q[i]].lower())
            i += 1 + q[i]
        if len(q) < i + 5:
            continue
        qtype = struct.unpack('!H', q[i + 1:i + 3])[0]
        known = b'.'.join(labels) in NAMES
        ans = b''
        if known and qtype in (1, 28):
            fam, addr = (socket.AF_INET, v4) if qtype == 1 else (socket.AF_INET6, v6)
            data = socket.inet_pton(fam, addr)
            ans = b'\xc0\x0c' + struct.pack('!HHIH', qtype, 1, 30, len(data)) + data
        flags = 0x8180 if known else 0x8183
        head = q[:2] + struct.pack('!5H', flags, 1, 1 if ans else 0, 0, 0)
        s.sendto(head + q[12:i + 5] + ans, peer)
def echo(c):
    with c, c.makefile('rb') as f:
        for line in f:
            c.sendall(line)
def push(c, path):
    block, sent = b'x' * 65536, 0
    with c:
        try:
            while True:
                sent += c.send(block)
                with open(path + '.tmp', 'w') as f:
                    f.write(str(sent))
                import os; os.replace(path + '.tmp', path)
        except OSError:
            pass
def listen(port):
    s = socket.socket(socket.AF_INET6)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(('::', port))
    s.listen(1024)
    return s
def serve(s, fn, *args):
    while True:
        c, _ = s.accept()
        threading.Thread(target=fn, args=(c,) + args, daemon=True).start()
pusher = listen(9001)
threading.Thread(target=serve, args=(listen(9000), echo), daemon=True).start()
threading.Thread(target=dns, args=(sys.argv[2], sys.argv[3]), daemon=True).start()
serve(pusher, push, sys.argv[1])
"#;

/// A command run to completion through the harness (whose reaper must
/// not take its exit status).
fn sh(prog: &str, args: &[String]) -> Out {
    let dir = tempfile::tempdir().unwrap();
    run_binary(
        Path::new(prog),
        args,
        Opts::default(),
        &dir.path().join("o"),
        &dir.path().join("e"),
    )
}

/// `sha256sum FILE`'s digest.
fn sha256_of(file: &str) -> String {
    let o = sh("sha256sum", &[file.to_owned()]);
    assert!(o.ok(), "{o:?}");
    o.stdout[..64].to_owned()
}

fn ip(args: &[&str]) {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let o = sh("ip", &args);
    assert!(o.ok(), "ip {args:?}: {}", o.stderr);
}

impl World {
    fn new(rt: &Rt) -> World {
        let n = NETS.fetch_add(1, Ordering::Relaxed);
        let tag = format!("mt{}-{n}", std::process::id() % 100_000);
        let (outer, inet) = (format!("{tag}-o"), format!("{tag}-i"));
        let net = 100 + (std::process::id() as usize + n as usize) % 150;
        let mut w = World {
            outer_addr: format!("10.{net}.0.1"),
            outer: outer.clone(),
            inet: inet.clone(),
            server: format!("10.{net}.0.2"),
            server6: format!("fd00:{net}::2"),
            named: format!("10.{net}.0.3"),
            named6: format!("fd00:{net}::3"),
            www: rt.scratch_file("www"),
            pushed: rt.scratch_file("pushed"),
            resolv: rt.scratch_file("resolv.conf"),
            server_proc: None,
            helper_proc: None,
        };
        ip(&["netns", "add", &outer]);
        ip(&["netns", "add", &inet]);
        let (a, b) = (format!("{tag}a"), format!("{tag}b"));
        ip(&[
            "link", "add", &a, "netns", &outer, "type", "veth", "peer", "name", &b, "netns", &inet,
        ]);
        ip(&[
            "-n",
            &outer,
            "addr",
            "add",
            &format!("{}/24", w.outer_addr),
            "dev",
            &a,
        ]);
        for addr in [&w.server, &w.named] {
            ip(&["-n", &inet, "addr", "add", &format!("{addr}/24"), "dev", &b]);
        }
        ip(&[
            "-n",
            &outer,
            "addr",
            "add",
            &format!("fd00:{net}::1/64"),
            "dev",
            &a,
            "nodad",
        ]);
        for addr in [&w.server6, &w.named6] {
            ip(&[
                "-n",
                &inet,
                "addr",
                "add",
                &format!("{addr}/64"),
                "dev",
                &b,
                "nodad",
            ]);
        }
        for (ns, dev) in [(&outer, &a), (&inet, &b)] {
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        std::fs::write(&w.resolv, format!("nameserver {}\n", w.server)).unwrap();
        std::fs::create_dir_all(&w.www).unwrap();
        std::fs::write(w.www.join("index.html"), "hello-from-the-internet\n").unwrap();
        let mut server = Command::new("nsenter");
        server
            .arg(format!("--net=/run/netns/{inet}"))
            .args(["python3", "-m", "http.server", "8080", "--bind", "::", "-d"])
            .arg(&w.www)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        w.server_proc = Some(spawn_own(&mut server));
        let script = rt.scratch_file("helper.py");
        std::fs::write(&script, HELPER).unwrap();
        let mut helper = Command::new("nsenter");
        helper
            .arg(format!("--net=/run/netns/{inet}"))
            .arg("python3")
            .arg(&script)
            .arg(&w.pushed)
            .args([&w.named, &w.named6])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        w.helper_proc = Some(spawn_own(&mut helper));
        // Up when it answers (from the outer namespace, as moat's stack will).
        let start = Instant::now();
        while !w
            .curl_from_outer(&format!("http://{}:8080/index.html", w.server))
            .ok()
            || !w
                .in_outer("python3", &["-c", &connects(&w.server, 9000)])
                .ok()
            || !w.in_outer("python3", &["-c", &resolves(&w.server)]).ok()
        {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "server never came up"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        w
    }

    fn curl_from_outer(&self, url: &str) -> Out {
        let args = [
            format!("--net=/run/netns/{}", self.outer),
            "curl".into(),
            "-sS".into(),
            "--max-time".into(),
            "5".into(),
            url.into(),
        ];
        sh("nsenter", &args)
    }

    /// `http://OUTER_ADDR:PORT/PATH` fetched from the test internet.
    fn get_from_inet(&self, port: u16, path: &str) -> Out {
        sh(
            "nsenter",
            &[
                format!("--net=/run/netns/{}", self.inet),
                "curl".into(),
                "-sS".into(),
                "--max-time".into(),
                "5".into(),
                format!("http://{}:{port}/{path}", self.outer_addr),
            ],
        )
    }

    /// [`World::get_from_inet`] once it serves something (up to 120 s: a
    /// microVM booting cold on a loaded machine).
    fn wait_served(&self, port: u16, path: &str) -> String {
        let start = Instant::now();
        loop {
            let o = self.get_from_inet(port, path);
            if o.ok() && !o.stdout.is_empty() {
                return o.stdout;
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "nothing served on the outer address's port {port}: {o:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A program run in the outer namespace (where moat's stack runs).
    fn in_outer(&self, prog: &str, args: &[&str]) -> Out {
        let mut all = vec![format!("--net=/run/netns/{}", self.outer), prog.into()];
        all.extend(args.iter().map(|a| (*a).to_owned()));
        sh("nsenter", &all)
    }

    /// The runtime, run in the outer namespace and in a mount namespace of
    /// its own where /etc/resolv.conf names the test internet's DNS server
    /// (the workload's own resolv.conf is the stack's).
    fn moat(&self, rt: &Rt) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.outer))
            .args(["unshare", "--mount", "--propagation", "private"])
            .args([
                "sh",
                "-c",
                "mount --bind \"$0\" /etc/resolv.conf && exec \"$@\"",
            ])
            .arg(&self.resolv)
            .arg(runtime_bin())
            .arg("--root")
            .arg(rt.root())
            .envs(rt.env().iter().map(|(k, v)| (k, v)))
            // The microvm tier's image cache (unused by the others).
            .envs(microvm_env());
        c
    }

    /// `moat run ARGS…` in the outer namespace, to completion.
    fn run(&self, rt: &Rt, args: &[&str]) -> Out {
        let mut c = self.moat(rt);
        c.arg("run").args(args);
        output(rt, c)
    }

    /// `moat run ARGS…` in the outer namespace, in the background: the
    /// test writes its stdin and reads its stdout line by line.
    fn run_bg(&self, rt: &Rt, args: &[&str]) -> Bg {
        let mut c = self.moat(rt);
        c.arg("run").args(args);
        Bg::start(rt, c)
    }
}

/// Python that connects to `host:port` (and fails if it cannot).
fn connects(host: &str, port: u16) -> String {
    format!("import socket; socket.create_connection(('{host}', {port}), 2).close()")
}

/// Python that asks the DNS server at `host` for [`NAME`] (and fails
/// without an answer).
fn resolves(host: &str) -> String {
    let labels: String = NAME
        .split('.')
        .map(|l| format!("\\x{:02x}{l}", l.len()))
        .collect();
    format!(
        "import socket; u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(2); \
         u.sendto(b'\\x00\\x07\\x01\\x00\\x00\\x01\\x00\\x00\\x00\\x00\\x00\\x00{labels}\\x00\\x00\\x01\\x00\\x01', ('{host}', 53)); \
         assert u.recv(512)[3] & 15 == 0"
    )
}

impl Drop for World {
    fn drop(&mut self) {
        let servers = [self.server_proc.take(), self.helper_proc.take()];
        for mut p in servers.into_iter().flatten() {
            let _ = p.kill();
            let _ = wait_own(&mut p);
        }
        for ns in [&self.outer, &self.inet] {
            sh("ip", &["netns".into(), "del".into(), ns.clone()]);
        }
    }
}

/// A `moat run` in the background, SIGKILLed if the test ends early (the
/// workload dies with it, and its stack with the workload).
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = wait_own(&mut self.0);
        }
    }
}

fn output(rt: &Rt, mut c: Command) -> Out {
    let (out, err) = (rt.scratch_file("o"), rt.scratch_file("e"));
    c.stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap());
    let mut child = spawn_own(&mut c);
    let st = wait_own(&mut child);
    Out {
        code: st.code(),
        signal: None,
        stdout: std::fs::read_to_string(&out).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err).unwrap_or_default(),
        args: Vec::new(),
    }
}

/// Processes still running whose command line names `root` (moat's and its
/// stack's: the stack is a fork of the runtime).
fn ours(root: &Path) -> Vec<u32> {
    let needle = root.display().to_string();
    all_processes()
        .into_iter()
        .filter(|(p, _, state)| {
            *state != 'Z'
                && std::fs::read(format!("/proc/{p}/cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).contains(&needle))
                    .unwrap_or(false)
        })
        .map(|(p, _, _)| p)
        .collect()
}

fn wait_none_left(root: &Path) {
    let start = Instant::now();
    while !ours(root).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "processes left: {:?}",
            ours(root)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A runtime and a world of its own, or None when the test must skip.
fn world(test: &str) -> Option<(Rt, World)> {
    let rt = setup(test)?;
    let w = World::new(&rt);
    Some((rt, w))
}

/// [`world`] for a workload of `tier`: for the microvm tier, once the
/// tier is ready here and its images are built (None when it is not).
fn tier_world(test: &str, tier: &str) -> Option<(Rt, World)> {
    let rt = setup(test)?;
    if tier == "microvm" {
        if !microvm_ready_or_skip(&rt, test) {
            return None;
        }
        microvm_warm_up(&rt);
    }
    let w = World::new(&rt);
    Some((rt, w))
}

fn setup(test: &str) -> Option<Rt> {
    let rt = Rt::root_or_skip(test)?;
    if !rt.is_moat() {
        eprintln!("SKIP {test}: moat's network");
        return None;
    }
    for prog in ["ip", "curl", "python3", "nsenter"] {
        let found = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()));
        if !found {
            moat_core::testing::skip(test, &format!("{prog} is not installed"));
            return None;
        }
    }
    Some(rt)
}

/// What a workload of `tier` reaches with `--net egress=…`: allowed
/// addresses (IPv4 and IPv6) and an allowed name (both families) over
/// HTTP, nothing on another port (refused at once, and logged), not the
/// allowed name's address before the name was asked for, and no answer for
/// a name no rule covers. It sees its `eth0` in sysfs and through netlink.
/// Returns the runtime and the world for more.
fn egress_rules(test: &str, tier: &str) -> Option<(Rt, World)> {
    let (rt, w) = tier_world(test, tier)?;
    let ok = format!("http://{}:8080/index.html", w.server);
    let script = format!(
        "ip -o addr show eth0; cat /etc/resolv.conf; echo sysfs $(ls /sys/class/net); \
         python3 -c 'import socket; print(\"ifs\", *sorted(n for _, n in socket.if_nameindex()))'; \
         ip -o link show eth0 >/dev/null; echo link=$?; \
         echo mac $(cat /sys/class/net/eth0/address); python3 -c '{IOCTLS}'; \
         curl -sS --max-time 10 http://{named}:8080/ 2>/dev/null; echo before-name=$?; \
         curl -sS --max-time 10 {ok}; echo allowed=$?; \
         curl -sS --max-time 10 http://[{s6}]:8080/index.html; echo v6=$?; \
         curl -4 -sS --max-time 10 http://{NAME}:8080/index.html; echo name=$?; \
         curl -6 -sS --max-time 10 http://{NAME}:8080/index.html; echo name6=$?; \
         curl -sS --max-time 10 http://{s}:8081/ 2>/dev/null; echo port=$?; \
         getent hosts {OTHER_NAME}; echo dns=$?",
        named = w.named,
        s = w.server,
        IOCTLS = "import fcntl, socket, struct; s = socket.socket(); \
                  q = lambda r: fcntl.ioctl(s, r, struct.pack(\"256s\", b\"eth0\")); \
                  print(\"ioctl\", q(0x8927)[18:24].hex(\":\"), socket.inet_ntoa(q(0x8915)[20:24]), \
                  struct.unpack(\"i\", q(0x8942)[16:20])[0])",
        s6 = w.server6,
    );
    let rules = format!(
        "--net=egress={s}:8080,[{s6}]:8080,{NAME}:8080",
        s = w.server,
        s6 = w.server6
    );
    let o = w.run(
        &rt,
        &["--isolation", tier, &rules, "--", "sh", "-c", &script],
    );
    assert_eq!(o.code, Some(0), "{o:?}");
    assert!(o.stdout.contains("10.0.2.100/24"), "{}", o.stdout);
    assert!(o.stdout.contains("nameserver 10.0.2.2"), "{}", o.stdout);
    assert!(o.stdout.contains("sysfs eth0 lo\n"), "{}", o.stdout);
    assert!(o.stdout.contains("ifs eth0 lo\n"), "{}", o.stdout);
    assert!(o.stdout.contains("link=0"), "{}", o.stdout);
    // The device's hardware address, address and queue length through
    // the SIOCGIF* ioctls (what ifconfig and busybox's ip use).
    let mac = o
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("mac "))
        .unwrap_or("none");
    assert!(
        o.stdout.contains(&format!("ioctl {mac} 10.0.2.100 1000\n")),
        "{}",
        o.stdout
    );
    for fetched in ["allowed", "v6", "name", "name6"] {
        assert!(
            o.stdout
                .contains(&format!("hello-from-the-internet\n{fetched}=0")),
            "{fetched}: {}",
            o.stdout
        );
    }
    // Refused at once (curl 7: connection refused), not a time-out (28):
    // another port, and an allowed name's address asked for by address
    // before the name was resolved.
    assert!(o.stdout.contains("before-name=7"), "{}", o.stdout);
    assert!(o.stdout.contains("port=7"), "{}", o.stdout);
    assert!(o.stdout.contains("dns=2"), "{}", o.stdout);
    assert!(
        o.stderr.contains("egress refused") && o.stderr.contains(":8081"),
        "the refusal is logged with its destination: {}",
        o.stderr
    );
    assert!(
        o.stderr.contains(&format!(
            "no rule allows the name proto=\"dns\" name=\"{OTHER_NAME}\""
        )),
        "the DNS refusal is logged with its name: {}",
        o.stderr
    );
    Some((rt, w))
}

#[test]
fn egress_reaches_what_the_rules_allow_and_nothing_else() {
    let Some((rt, w)) = egress_rules("egress_rules", "container") else {
        return;
    };
    // Without --net, no device but lo: the server is out of reach.
    let ok = format!("http://{}:8080/index.html", w.server);
    let o = w.run(
        &rt,
        &[
            "--",
            "sh",
            "-c",
            &format!("curl -sS --max-time 5 {ok}; echo rc=$?"),
        ],
    );
    assert!(o.stdout.contains("rc=7"), "{o:?}");
    wait_none_left(rt.root());
}

/// The sandbox tier's only network is the stack: the same rules hold, the
/// supervisor passes the addresses through to it.
#[test]
fn sandbox_egress_reaches_what_the_rules_allow_and_nothing_else() {
    let Some((rt, _w)) = egress_rules("sandbox_egress_rules", "sandbox") else {
        return;
    };
    wait_none_left(rt.root());
}

/// `--net none` (the default) in the sandbox tier, which has no `--net
/// host`: the supervisor refuses
/// every address that is not loopback, whichever call carries it
/// (`connect`, `sendto`, `sendmsg`, IPv4 and IPv6, an IPv4 address on an IPv6
/// socket, an `AF_UNSPEC` send), with ENETUNREACH and
/// a log line, before the kernel sees it; loopback still works. The world's
/// server is there to be reached had the call gone through.
#[test]
fn sandbox_without_network_refuses_non_loopback_addresses() {
    let Some((rt, w)) = world("sandbox_net_none") else {
        return;
    };
    // Nor is the host's network on offer to the sandbox tier: refused in
    // one line, before anything is made.
    let o = w.run(&rt, &["--isolation", "sandbox", "--net=host", "--", "true"]);
    assert!(o.code.is_some_and(|c| c != 0), "{o:?}");
    assert_eq!(o.stderr.trim().lines().count(), 1, "{}", o.stderr);
    assert!(o.stderr.contains("--net host"), "{}", o.stderr);
    assert!(root_entries(&rt).is_empty(), "{:?}", root_entries(&rt));
    let script = format!(
        r#"
import errno, socket
def attempt(what, call):
    try:
        call()
        print(what, 'ok')
    except OSError as e:
        print(what, errno.errorcode.get(e.errno, e.errno))
t = socket.socket()
attempt('connect', lambda: t.connect(('{s}', 8080)))
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
attempt('sendto', lambda: u.sendto(b'x', ('{s}', 53)))
attempt('sendmsg', lambda: u.sendmsg([b'x'], [], 0, ('{s}', 53)))
t6 = socket.socket(socket.AF_INET6)
attempt('connect6', lambda: t6.connect(('{s6}', 8080)))
# Addresses the kernel reads by their own family: an AF_INET one on an
# IPv6 socket, and the address an AF_UNSPEC one holds (UDP sends there).
import ctypes, struct
libc = ctypes.CDLL(None, use_errno=True)
def raw_sendto(sock, addr):
    if libc.sendto(sock.fileno(), b'x', 1, 0, addr, len(addr)) < 0:
        raise OSError(ctypes.get_errno(), 'sendto')
sin = struct.pack('=H', socket.AF_INET) + struct.pack('!H', 53) + socket.inet_aton('{s}') + bytes(8)
u6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
attempt('v4-on-v6', lambda: raw_sendto(u6, sin))
attempt('unspec', lambda: raw_sendto(u, struct.pack('=H', 0) + sin[2:]))
l = socket.socket()
l.bind(('127.0.0.1', 0))
l.listen()
c = socket.create_connection(l.getsockname(), 10)
a, _ = l.accept()
c.sendall(b'lo\n')
print('loopback', a.recv(3).decode().strip())
"#,
        s = w.server,
        s6 = w.server6
    );
    let o = w.run(
        &rt,
        &["--isolation", "sandbox", "--", "python3", "-c", &script],
    );
    assert_eq!(o.code, Some(0), "{o:?}");
    for call in [
        "connect", "sendto", "sendmsg", "connect6", "v4-on-v6", "unspec",
    ] {
        assert!(
            o.stdout.contains(&format!("{call} ENETUNREACH\n")),
            "{call}: {o:?}"
        );
    }
    assert!(o.stdout.contains("loopback lo"), "{o:?}");
    // Each refusal is the supervisor's, and says why.
    for (call, dest) in [
        ("connect", format!("{}:8080", w.server)),
        ("sendto", format!("{}:53", w.server)),
        ("sendmsg", format!("{}:53", w.server)),
        ("connect", w.server6.to_string()),
    ] {
        assert!(
            o.stderr
                .lines()
                .any(|l| l.contains(&format!("sandbox: denied {call} to "))
                    && l.contains(&dest)
                    && l.contains("lo only")),
            "{call} {dest}: {}",
            o.stderr
        );
    }
    // The two sends whose address the kernel reads by its own family are
    // the supervisor's refusals too (the kernel would say ENETUNREACH
    // alike): sendto's line, and one for each of them.
    let udp53 = format!("sandbox: denied sendto to {}:53 ", w.server);
    assert_eq!(
        o.stderr.lines().filter(|l| l.contains(&udp53)).count(),
        3,
        "{}",
        o.stderr
    );
    wait_none_left(rt.root());
}

/// `-p HOSTPORT:8000` to a web server in a workload of `tier`: reached from
/// the host (the outer namespace), closed once `moat run` ends.
fn published_port(test: &str, tier: &str) {
    let Some((rt, w)) = tier_world(test, tier) else {
        return;
    };
    let port = 20000 + (std::process::id() % 20000) as u16;
    let mut bg = w.run_bg(
        &rt,
        &[
            "--isolation",
            tier,
            "--net=egress=",
            "-p",
            &format!("{port}:8000"),
            "--",
            "sh",
            "-c",
            "echo inside-$(hostname) > /tmp/f && cd /tmp && exec python3 -m http.server 8000",
        ],
    );
    let run = &mut bg.run.0;
    let url = format!("http://127.0.0.1:{port}/f");
    let start = Instant::now();
    let body = loop {
        let o = w.curl_from_outer(&url);
        if o.ok() {
            break o.stdout;
        }
        assert!(run.try_wait().unwrap().is_none(), "moat run ended early");
        assert!(start.elapsed() < Duration::from_secs(60), "never published");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(body.trim(), "inside-moat", "written by the workload");
    // Stopped as a user would: interrupts until moat run gives up the workload.
    while run.try_wait().unwrap().is_none() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(run.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_own(run);
    wait_none_left(rt.root());
    assert_no_state(rt.root());
    assert!(!w.curl_from_outer(&url).ok(), "the port is closed");
}

#[test]
fn a_published_port_reaches_the_workload() {
    published_port("published_port", "container");
}

#[test]
fn a_published_port_reaches_a_sandboxed_workload() {
    published_port("sandbox_published_port", "sandbox");
}

/// Nothing of a container is left in the state root (the caches and the
/// ID allocator aside).
fn assert_no_state(root: &Path) {
    let left: Vec<String> = std::fs::read_dir(root)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "left in the state root: {left:?}");
}

/// The microvm tier: the guest's eth0 is a virtio-net device whose frames
/// go over a stream socket to the same jailed stack; the same rules hold
/// (by address, by name, refusals at once and logged), the guest's
/// container sees eth0 in its own namespace and sysfs, and nothing is
/// left: no stack, no VMM, no state.
#[test]
fn microvm_egress_reaches_what_the_rules_allow_and_nothing_else() {
    let Some((rt, _w)) = egress_rules("microvm_egress_rules", "microvm") else {
        return;
    };
    wait_none_left(rt.root());
    assert_no_state(rt.root());
}

/// A networked guest has snapshots of its own (one device more than a
/// guest without network): a run with the network after another restores
/// from that snapshot, and its network works as on a cold boot; so it does
/// after a snapshot that does not load sent the run to a cold boot.
#[test]
fn a_networked_microvm_restores_its_own_snapshot() {
    let Some((rt, w)) = tier_world("microvm_net_snapshot", "microvm") else {
        return;
    };
    let log = rt.scratch_file("debug.log");
    let url = format!("http://{}:8080/index.html", w.server);
    let rule = format!("--net=egress={}:8080", w.server);
    let mut starts: Vec<String> = Vec::new();
    for round in 0..3 {
        if round == 2 {
            // A snapshot that does not load: the run falls back to a cold
            // boot in a second QEMU on the same frame stream, which must
            // still carry the guest's network.
            let snap = starts[1]
                .as_str()
                .split("restored from snapshot ")
                .nth(1)
                .expect("the snapshot's path")
                .trim()
                .trim_end_matches('"')
                .to_owned();
            let f = std::fs::OpenOptions::new().write(true).open(&snap).unwrap();
            f.set_len(f.metadata().unwrap().len() / 2).unwrap();
        }
        let _ = std::fs::remove_file(&log);
        let mut c = w.moat(&rt);
        c.args(["--debug", "--log"]).arg(&log).args([
            "run",
            "--isolation",
            "microvm",
            &rule,
            "--",
            "curl",
            "-sS",
            "--max-time",
            "10",
            &url,
        ]);
        let o = output(&rt, c);
        assert_eq!(o.code, Some(0), "{o:?}");
        assert_eq!(o.stdout, "hello-from-the-internet\n", "{o:?}");
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let start = text
            .lines()
            .find(|l| l.contains("microvm: restored") || l.contains("microvm: cold boot"))
            .unwrap_or("no start line")
            .to_owned();
        starts.push(start);
    }
    // The first run restored a snapshot an earlier test saved, or saved
    // one; the second restores; the third fell back to a cold boot.
    assert!(
        starts[1].contains("microvm: restored from snapshot"),
        "{starts:?}"
    );
    assert!(
        starts[2].contains("microvm: cold boot: the snapshot did not restore"),
        "{starts:?}"
    );
    wait_none_left(rt.root());
    assert_no_state(rt.root());
}

/// `-p` into a microVM: the stack listens on the host and connects to the
/// guest's eth0; the port closes when the VM ends.
#[test]
fn a_published_port_reaches_a_workload_in_a_microvm() {
    published_port("microvm_published_port", "microvm");
}

#[test]
fn the_annotation_gives_an_oci_bundle_the_same_network() {
    let Some((rt, w)) = world("net_annotation") else {
        return;
    };
    let mut b = Bundle::new(&[
        "sh",
        "-c",
        &format!("wget -qO- http://{}:8080/index.html; echo rc=$?", w.server),
    ]);
    let bundle = b.dir().to_string_lossy().into_owned();
    // In the container tier, then in the sandbox tier (chosen by its
    // annotation, as an engine would).
    for tier in ["container", "sandbox"] {
        b.set(
            "/annotations",
            serde_json::json!({
                "dev.moat.net.egress": format!("{}/32:8080", w.server),
                "dev.moat.isolation": tier,
            }),
        );
        b.write_config();
        let o = w.run(&rt, &["--bundle", &bundle, &rt.new_id("net")]);
        assert!(
            o.stdout.contains("hello-from-the-internet"),
            "{tier}: {o:?}"
        );
        assert!(o.stdout.contains("rc=0"), "{tier}: {o:?}");
    }
    // A bad rule is refused before anything runs.
    b.set(
        "/annotations",
        serde_json::json!({"dev.moat.net.egress": "10.0.0.0/33"}),
    );
    b.write_config();
    let o = w.run(&rt, &["--bundle", &bundle, &rt.new_id("bad")]);
    assert_ne!(o.code, Some(0));
    assert!(o.stderr.contains("prefix length"), "{}", o.stderr);
    // Nothing of either container or the refused one is left in the state
    // root (the sandbox tier's parent directory stays, empty; `.cache`
    // holds the compiled seccomp programs, which are not per run).
    let left: Vec<String> = root_entries(&rt)
        .into_iter()
        .filter(|e| e != ".sandbox" && e != ".cache")
        .chain(
            std::fs::read_dir(rt.root().join(".sandbox"))
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| format!(".sandbox/{}", e.file_name().to_string_lossy())),
        )
        .collect();
    assert!(left.is_empty(), "{left:?}");
    wait_none_left(rt.root());
}

/// The engines' path into a microVM: `create` (the runtime exits; the
/// stack process and the VMM stay), `start`, the workload's network by
/// the annotation, its refusal in `net.log` of the state directory, and
/// `delete` leaving no stack, VMM or state.
#[test]
fn the_annotation_gives_a_microvm_bundle_the_network_through_create_and_start() {
    let Some((rt, w)) = tier_world("microvm_net_annotation", "microvm") else {
        return;
    };
    let mut b = Bundle::new(&[
        "sh",
        "-c",
        &format!(
            "wget -qO- http://{s}:8080/index.html; echo rc=$?; \
             wget -qO- http://{s}:8081/ 2>/dev/null; echo refused=$?",
            s = w.server
        ),
    ]);
    b.set(
        "/annotations",
        serde_json::json!({
            "dev.moat.net.egress": format!("{}:8080", w.server),
            "dev.moat.isolation": "microvm",
        }),
    );
    b.write_config();
    let bundle = b.dir().to_string_lossy().into_owned();
    let id = rt.new_id("vmnet");
    let out = rt.scratch_file("vm-stdout");
    let mut create = w.moat(&rt);
    create
        .args(["create", "--bundle", &bundle, &id])
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::process::Stdio::null());
    let st = wait_own(&mut spawn_own(&mut create));
    assert!(st.success(), "create: {st:?}");
    let moat = |args: &[&str]| {
        let mut c = w.moat(&rt);
        c.args(args);
        output(&rt, c)
    };
    let o = moat(&["start", &id]);
    assert_eq!(o.code, Some(0), "{o:?}");
    let start = Instant::now();
    loop {
        let o = moat(&["state", &id]);
        if o.stdout.contains("\"stopped\"") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "{o:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.contains("hello-from-the-internet\nrc=0"), "{text}");
    assert!(
        text.contains("refused=") && !text.contains("refused=0"),
        "{text}"
    );
    let log = std::fs::read_to_string(rt.root().join(&id).join("net.log")).unwrap_or_default();
    assert!(
        log.contains("egress refused") && log.contains(":8081"),
        "the refusal is in net.log: {log}"
    );
    let o = moat(&["delete", &id]);
    assert_eq!(o.code, Some(0), "{o:?}");
    wait_none_left(rt.root());
    assert_no_state(rt.root());
}

/// A microVM whose config joins a network namespace (as a Kubernetes pod's
/// containers join the pod's): the guest cannot, so the stack serves from
/// it. The runtime runs in the host's namespace, from which the test
/// internet cannot be reached; the workload still fetches from its server
/// (its connections leave from the pod namespace), and a port published on
/// all of that namespace's addresses reaches the workload from the test
/// internet, through the pod namespace's own address.
#[test]
fn a_microvm_joining_a_network_namespace_is_served_from_it() {
    let Some((rt, w)) = tier_world("microvm_pod_netns", "microvm") else {
        return;
    };
    let port = 20000 + (std::process::id() % 20000) as u16;
    let mut b = Bundle::new(&[
        "sh",
        "-c",
        &format!(
            "wget -qO /tmp/got http://{s}:8080/index.html 2>/tmp/err; echo rc=$? >>/tmp/err; \
             echo inside > /tmp/f; cd /tmp && exec httpd -f -p 8000",
            s = w.server
        ),
    ]);
    b.set(
        "/annotations",
        serde_json::json!({
            "dev.moat.net.egress": format!("{}:8080", w.server),
            "dev.moat.net.publish": format!("0.0.0.0:{port}:8000"),
            "dev.moat.isolation": "microvm",
        }),
    );
    in_outer_ns(&mut b, &w);
    let bundle = b.dir().to_string_lossy().into_owned();
    let id = rt.new_id("podnet");
    // The runtime in the host's network namespace.
    let moat = |args: &[&str]| host_moat(&rt, args);
    let o = moat(&["create", "--bundle", &bundle, &id]);
    assert_eq!(o.code, Some(0), "{o:?}");
    // Deleted (forced) however the test ends: a VM left running would
    // hold on to what later tests need.
    let _gone = Ctr {
        rt: &rt,
        id: id.clone(),
        out: None,
    };
    let o = moat(&["start", &id]);
    assert_eq!(o.code, Some(0), "{o:?}");
    // From the test internet, to the pod namespace's address.
    let get = |path: &str| w.get_from_inet(port, path);
    let got = w.wait_served(port, "got");
    let log = std::fs::read_to_string(rt.root().join(&id).join("net.log")).unwrap_or_default();
    assert_eq!(
        got,
        "hello-from-the-internet\n",
        "fetched from the pod namespace: {:?}; net.log: {log}",
        get("err").stdout
    );
    assert_eq!(get("f").stdout, "inside\n");
    kill_and_delete(&rt, &id);
    assert!(!get("f").ok(), "the port is closed");
}

/// A microVM container that joins a network namespace and asks nothing of
/// moat's stack (a Kubernetes pod's container, Podman's) takes over that
/// namespace's interface: the guest has its hardware address, addresses
/// (v4 and v6) and routes, so the namespace's address (here the outer
/// one's, on the test internet's wire) reaches the guest's kernel, and the
/// guest reaches a subnet only a route of the namespace leads to. A second
/// microVM in the same namespace finds the interface taken and reaches out
/// through moat's stack from the namespace; `delete` gives the interface
/// (and the namespace's ports) back.
#[test]
fn a_microvm_takes_over_the_interface_of_a_joined_namespace() {
    let Some((rt, w)) = tier_world("microvm_pod_interface", "microvm") else {
        return;
    };
    // A subnet behind the internet side, reached through a route of the
    // outer namespace only.
    let far = w.server.replace(".0.2", ".7.2");
    let far_net = w.server.replace(".0.2", ".7.0");
    let veth = sh(
        "ip",
        &["-n".into(), w.inet.clone(), "-o".into(), "link".into()],
    );
    let inet_dev = veth
        .stdout
        .lines()
        .find_map(|l| l.split(": ").nth(1).filter(|d| *d != "lo"))
        .map(|d| d.split('@').next().unwrap().to_owned())
        .expect("the internet side's veth");
    ip(&[
        "-n",
        &w.inet,
        "addr",
        "add",
        &format!("{far}/24"),
        "dev",
        &inet_dev,
    ]);
    ip(&[
        "-n",
        &w.outer,
        "route",
        "add",
        &format!("{far_net}/24"),
        "via",
        &w.server,
    ]);
    let outer_dev = sh(
        "ip",
        &["-n".into(), w.outer.clone(), "-o".into(), "link".into()],
    )
    .stdout
    .lines()
    .find_map(|l| l.split(": ").nth(1).filter(|d| *d != "lo"))
    .map(|d| d.split('@').next().unwrap().to_owned())
    .expect("the outer side's veth");
    let mac = hardware_address(&w.outer, &outer_dev);
    // Bulk data both ways (QEMU's TAP carries a virtio-net header: the
    // guest hands over checksums and 64 KiB segments, and gets them):
    // 4 MiB of random bytes fetched by the guest, 4 MiB the guest makes
    // fetched from it, each compared by digest.
    let mut big = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(std::fs::File::open("/dev/urandom").unwrap(), 4 << 20),
        &mut big,
    )
    .unwrap();
    std::fs::write(w.www.join("big.bin"), &big).unwrap();
    let big_sum = sha256_of(&w.www.join("big.bin").to_string_lossy());
    let port_range = || {
        w.in_outer("cat", &["/proc/sys/net/ipv4/ip_local_port_range"])
            .stdout
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    let range_before = port_range();
    let mut b = Bundle::new(&[
        "sh",
        "-c",
        &format!(
            "wget -qO /tmp/got http://{far}:8080/index.html 2>/tmp/err; echo rc=$? >>/tmp/err; \
             wget -qO /tmp/got6 http://[{v6}]:8080/index.html 2>>/tmp/err; \
             wget -qO /tmp/big http://{far}:8080/big.bin 2>>/tmp/err; \
             sha256sum /tmp/big | cut -c1-64 > /tmp/bigsum; rm -f /tmp/big; \
             head -c 4194304 /dev/urandom > /tmp/up; sha256sum /tmp/up | cut -c1-64 > /tmp/upsum; \
             for d in /sys/bus/virtio/devices/*; do \
               [ \"$(cat $d/device)\" = 0x0001 ] && cat $d/features; done > /tmp/features; \
             uname -r > /tmp/kernel; cat /sys/class/net/eth0/address > /tmp/mac; \
             nc -l -p 9000 -e sha256sum & \
             cd /tmp && exec httpd -f -p 8000",
            v6 = w.server6,
        ),
    ]);
    b.set(
        "/annotations",
        serde_json::json!({"dev.moat.isolation": "microvm"}),
    );
    in_outer_ns(&mut b, &w);
    let bundle = b.dir().to_string_lossy().into_owned();
    let id = rt.new_id("podif");
    let moat = |args: &[&str]| host_moat(&rt, args);
    let o = moat(&["create", "--bundle", &bundle, &id]);
    assert_eq!(o.code, Some(0), "{o:?}");
    let _gone = Ctr {
        rt: &rt,
        id: id.clone(),
        out: None,
    };
    let o = moat(&["start", &id]);
    assert_eq!(o.code, Some(0), "{o:?}");
    // From the test internet, to the namespace's own address.
    let get = |path: &str| w.get_from_inet(8000, path);
    let kernel = w.wait_served(8000, "kernel");
    let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_ne!(kernel, host_kernel, "answered by the guest's kernel");
    assert_eq!(
        get("mac").stdout.trim(),
        mac.trim(),
        "the interface's address"
    );
    assert_eq!(
        get("got").stdout,
        "hello-from-the-internet\n",
        "fetched through the namespace's route: {:?}",
        get("err").stdout
    );
    assert_eq!(
        get("got6").stdout,
        "hello-from-the-internet\n",
        "fetched over the namespace's IPv6 address: {:?}",
        get("err").stdout
    );
    // The device's features as the guest's driver negotiated them (bit k
    // is the k-th character): checksums both ways (0, 1), TSO for IPv4 and
    // IPv6 both ways (7, 8, 11, 12).
    let features = get("features").stdout;
    for bit in [0, 1, 7, 8, 11, 12] {
        assert_eq!(
            features.as_bytes().get(bit),
            Some(&b'1'),
            "virtio-net feature {bit} in {features:?}"
        );
    }
    assert_eq!(
        get("bigsum").stdout.trim(),
        big_sum,
        "4 MiB fetched by the guest: {:?}",
        get("err").stdout
    );
    let up = sh(
        "sh",
        &[
            "-c".into(),
            format!(
                "nsenter --net=/run/netns/{} curl -sS --max-time 60 http://{}:8000/up | sha256sum",
                w.inet, w.outer_addr
            ),
        ],
    );
    assert!(up.ok(), "{up:?}");
    assert_eq!(
        up.stdout.get(..64),
        Some(get("upsum").stdout.trim()),
        "4 MiB fetched from the guest"
    );
    // Connections made inside the namespace to its own localhost — what
    // containerd makes for a port forward — or to its address reach the
    // guest's servers, at the port they were made to.
    for url in [
        "http://127.0.0.1:8000/kernel".to_owned(),
        "http://[::1]:8000/kernel".to_owned(),
        format!("http://{}:8000/kernel", w.outer_addr),
    ] {
        let o = w.curl_from_outer(&url);
        assert_eq!(o.stdout, kernel, "{url} from inside the namespace: {o:?}");
    }
    let local_up = sh(
        "sh",
        &[
            "-c".into(),
            format!(
                "nsenter --net=/run/netns/{} curl -sS --max-time 60 http://127.0.0.1:8000/up | sha256sum",
                w.outer
            ),
        ],
    );
    assert_eq!(
        local_up.stdout.get(..64),
        Some(get("upsum").stdout.trim()),
        "4 MiB through the namespace's localhost: {local_up:?}"
    );
    // 4 MiB the other way, the sender's end of file passed on (the guest's
    // `sha256sum` reads to it, then answers on the same connection).
    let sent = w.in_outer(
        "python3",
        &[
            "-c",
            "import hashlib, os, socket\n\
             data = os.urandom(4 << 20)\n\
             s = socket.create_connection(('127.0.0.1', 9000), timeout=60)\n\
             s.sendall(data); s.shutdown(socket.SHUT_WR)\n\
             got = b''\n\
             while True:\n    b = s.recv(65536)\n    if not b: break\n    got += b\n\
             print(hashlib.sha256(data).hexdigest(), got.decode().split()[0])",
        ],
    );
    let sums: Vec<&str> = sent.stdout.split_whitespace().collect();
    assert!(
        sums.len() == 2 && sums[0] == sums[1],
        "4 MiB sent through the namespace's localhost, its digest as the guest read it: {sent:?}"
    );
    // Nothing listens there in the guest: the connection ends at once.
    let none = w.curl_from_outer("http://127.0.0.1:8001/kernel");
    assert!(!none.ok() && none.stdout.is_empty(), "{none:?}");
    // A second microVM of the namespace (a pod's second container) finds
    // the interface taken and gets moat's stack instead, which serves from
    // the namespace: it reaches out from the namespace's address while the
    // first holds the interface, since the namespace kept its share (its
    // ephemeral ports moved where the guest's never are).
    assert_eq!(port_range(), "61440 65535");
    let mut b2 = Bundle::new(&[
        "sh",
        "-c",
        &format!(
            "wget -qO- http://{far}:8080/index.html; echo rc=$?; \
             wget -qO- http://{}:8000/kernel; echo rc2=$?",
            w.outer_addr
        ),
    ]);
    b2.set(
        "/annotations",
        serde_json::json!({"dev.moat.isolation": "microvm"}),
    );
    in_outer_ns(&mut b2, &w);
    let o = moat(&[
        "run",
        "--bundle",
        &b2.dir().to_string_lossy(),
        &rt.new_id("podif3"),
    ]);
    assert!(
        o.stdout.contains("hello-from-the-internet\nrc=0"),
        "the second microVM, through the stack: {o:?}"
    );
    // And the first guest's server on the pod's address, as a sidecar
    // reaches its pod's (the stack connects from inside the namespace).
    assert!(
        o.stdout.contains(&format!("{kernel}rc2=0")),
        "the second microVM reaches the first on the namespace's address: {o:?}"
    );
    assert!(
        o.stderr
            .contains("is another microVM's; this one reaches out from it through moat's stack"),
        "{o:?}"
    );
    assert_eq!(get("kernel").stdout, kernel, "the first still serves");
    kill_and_delete(&rt, &id);
    assert_eq!(
        port_range(),
        range_before,
        "the namespace's ports given back"
    );
    // The namespace's localhost is its own again.
    let gone = w.curl_from_outer("http://127.0.0.1:8000/kernel");
    assert_eq!(gone.code, Some(7), "refused: {gone:?}");
    // Given back: no redirection, no TAP, and the namespace's own stack
    // gets its replies again.
    let tc = sh(
        "tc",
        &[
            "-n".into(),
            w.outer.clone(),
            "qdisc".into(),
            "show".into(),
            "dev".into(),
            outer_dev.clone(),
        ],
    );
    assert!(tc.ok() && !tc.stdout.contains("ingress"), "{tc:?}");
    let links = sh(
        "ip",
        &["-n".into(), w.outer.clone(), "-o".into(), "link".into()],
    );
    assert!(!links.stdout.contains("mvm"), "{links:?}");
    let back = w.curl_from_outer(&format!("http://{}:8080/index.html", w.server));
    assert!(
        back.ok(),
        "the namespace's replies reach it again: {back:?}"
    );
}

/// A pod namespace with a second interface (`net1`, as a CNI
/// meta-plugin such as Multus adds): the guest takes over both, each on a
/// network device of its own, the second renamed as the pod's with its
/// hardware address, addresses and routes. A peer on `net1`'s link reaches
/// the guest's server there, and so does one behind a route only `net1`
/// has (the guest's reply follows that route); `delete` gives both back.
/// On QEMU such a guest (with a read-write volume too) is saved and
/// restored as one with a single interface is (the volume and the second
/// interface hot-added once the guest is up): the second of two runs
/// restores.
#[test]
fn a_microvm_takes_over_every_interface_of_a_joined_namespace() {
    let Some((rt, w)) = tier_world("microvm_pod_interfaces", "microvm") else {
        return;
    };
    // The side: a namespace on `net1`'s link, with an address behind it.
    struct Side(String);
    impl Drop for Side {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
    let side = Side(format!("{}-s", w.outer));
    ip(&["netns", "add", &side.0]);
    let base = w.outer_addr.trim_end_matches(".0.1").to_owned();
    let (near, peer, behind) = (
        format!("{base}.9.1"),
        format!("{base}.9.2"),
        format!("{base}.10.2"),
    );
    let peer_dev = format!("{}p", w.outer.replace('-', ""));
    ip(&[
        "link", "add", "net1", "netns", &w.outer, "type", "veth", "peer", "name", &peer_dev,
        "netns", &side.0,
    ]);
    ip(&[
        "-n",
        &w.outer,
        "addr",
        "add",
        &format!("{near}/24"),
        "dev",
        "net1",
    ]);
    ip(&["-n", &w.outer, "link", "set", "net1", "up"]);
    ip(&[
        "-n",
        &side.0,
        "addr",
        "add",
        &format!("{peer}/24"),
        "dev",
        &peer_dev,
    ]);
    ip(&[
        "-n",
        &side.0,
        "addr",
        "add",
        &format!("{behind}/32"),
        "dev",
        "lo",
    ]);
    ip(&["-n", &side.0, "link", "set", &peer_dev, "up"]);
    ip(&["-n", &side.0, "link", "set", "lo", "up"]);
    ip(&[
        "-n",
        &w.outer,
        "route",
        "add",
        &format!("{base}.10.0/24"),
        "via",
        &peer,
        "dev",
        "net1",
    ]);
    let mac = format!("{}\n", hardware_address(&w.outer, "net1"));
    let mut b = Bundle::new(&[
        "sh",
        "-c",
        "cat /sys/class/net/net1/address > /tmp/mac1; ip -o -4 addr show net1 > /tmp/addr1 2>&1; \
         cp /tmp/mac1 /data/mac1; cd /tmp && exec httpd -f -p 8000",
    ]);
    b.set(
        "/annotations",
        serde_json::json!({"dev.moat.isolation": "microvm"}),
    );
    // A read-write volume too: on QEMU it is hot-added on the first port,
    // net1's device on the next.
    let data = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        data.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    b.push(
        "/mounts",
        serde_json::json!({"destination": "/data", "type": "bind",
            "source": data.path().display().to_string(), "options": ["rbind", "rw"]}),
    );
    in_outer_ns(&mut b, &w);
    let bundle = b.dir().to_string_lossy().into_owned();
    let moat = |args: &[&str]| host_moat(&rt, args);
    let from_side = |source: &str| {
        sh(
            "nsenter",
            &[
                format!("--net=/run/netns/{}", side.0),
                "curl".into(),
                "-sS".into(),
                "--max-time".into(),
                "10".into(),
                "--interface".into(),
                source.into(),
                format!("http://{near}:8000/addr1"),
            ],
        )
    };
    // Twice: on QEMU the second guest is restored from the snapshot (the
    // first restored one an earlier test saved, or saved it), its second
    // interface hot-added on a PCIe port; moat's own VMM boots both cold.
    let qemu = on_qemu(&rt);
    for round in 0..2 {
        let log = rt.scratch_file(&format!("podifs{round}.log"));
        let log_s = log.display().to_string();
        let id = rt.new_id("podifs");
        let o = moat(&[
            "--debug", "--log", &log_s, "create", "--bundle", &bundle, &id,
        ]);
        assert_eq!(o.code, Some(0), "{o:?}");
        let _gone = Ctr {
            rt: &rt,
            id: id.clone(),
            out: None,
        };
        let said = std::fs::read_to_string(&log).unwrap_or_default();
        let how: Vec<&str> = said.lines().filter(|l| l.contains("microvm:")).collect();
        match (qemu, round) {
            (true, 1) => assert!(
                how.iter().any(|l| l.contains("restored from snapshot")),
                "{how:?}"
            ),
            (true, _) => assert!(
                how.iter()
                    .any(|l| l.contains("restored from snapshot") || l.contains("saved snapshot")),
                "{how:?}"
            ),
            (false, _) => assert!(how.iter().any(|l| l.contains("cold boot")), "{how:?}"),
        }
        let o = moat(&["start", &id]);
        assert_eq!(o.code, Some(0), "{o:?}");
        // Through the first interface, from the test internet.
        assert_eq!(
            w.wait_served(8000, "mac1"),
            mac,
            "net1's hardware address in the guest"
        );
        let copied = data.path().join("mac1");
        assert_eq!(
            std::fs::read_to_string(&copied).unwrap_or_default(),
            mac,
            "through the volume"
        );
        std::fs::remove_file(&copied).unwrap();
        // On net1's link, and from behind its route.
        for source in [&peer, &behind] {
            let o = from_side(source);
            assert!(
                o.ok() && o.stdout.contains(&format!("inet {near}/24")),
                "from {source} over net1: {o:?}"
            );
        }
        kill_and_delete(&rt, &id);
    }
    let tc = sh(
        "tc",
        &[
            "-n".into(),
            w.outer.clone(),
            "qdisc".into(),
            "show".into(),
            "dev".into(),
            "net1".into(),
        ],
    );
    assert!(tc.ok() && !tc.stdout.contains("ingress"), "{tc:?}");
    let links = sh(
        "ip",
        &["-n".into(), w.outer.clone(), "-o".into(), "link".into()],
    );
    assert!(!links.stdout.contains("mvm"), "{links:?}");
    // The namespace's own stack has net1 again: the peer refuses a
    // connection (curl's 7), where the guest's holding it timed out.
    let back = w.curl_from_outer(&format!("http://{peer}:1/"));
    assert_eq!(back.code, Some(7), "{back:?}");
}

/// The hardware address of interface `dev` of network namespace `ns`.
fn hardware_address(ns: &str, dev: &str) -> String {
    sh(
        "ip",
        &[
            "-n".into(),
            ns.into(),
            "-o".into(),
            "link".into(),
            "show".into(),
            dev.into(),
        ],
    )
    .stdout
    .split_whitespace()
    .skip_while(|w| *w != "link/ether")
    .nth(1)
    .unwrap_or_else(|| panic!("{dev}'s hardware address in {ns}"))
    .to_owned()
}

/// `moat run --net ns:PATH` joins a network namespace someone else set up:
/// the container tier's workload is in it, a microVM's guest takes over
/// its interface; both reach the test internet through it. Bad paths and
/// the sandbox tier, and the host's own namespace for a microVM, are
/// refused in one line.
#[test]
fn moat_run_joins_a_network_namespace_in_each_tier() {
    let Some((rt, w)) = tier_world("run_net_ns", "microvm") else {
        return;
    };
    let ns = format!("ns:/run/netns/{}", w.outer);
    let url = format!("http://{}:8080/index.html", w.server);
    for tier in ["container", "microvm"] {
        let o = host_moat(
            &rt,
            &[
                "run",
                "--isolation",
                tier,
                "--net",
                &ns,
                "--",
                "curl",
                "-sS",
                "--max-time",
                "20",
                &url,
            ],
        );
        assert_eq!(
            (o.code, o.stdout.as_str()),
            (Some(0), "hello-from-the-internet\n"),
            "{tier}: {o:?}"
        );
    }
    for (net, isolation, says) in [
        ("ns:run/netns/x", "container", "absolute path"),
        ("ns:/nonexistent/netns", "container", "No such file"),
        (ns.as_str(), "sandbox", "not in the sandbox tier"),
        // A rule that could allow nothing (the stack never reaches the
        // host's loopback): refused, not a network that silently fails.
        (
            "egress=127.0.0.1:8080",
            "container",
            "names a loopback address",
        ),
        ("egress=example.com,[::1]:80", "microvm", "never reaches"),
        // The host's own: a guest never takes over the host's interfaces.
        (
            "ns:/proc/self/ns/net",
            "microvm",
            "the host's network namespace",
        ),
    ] {
        let o = host_moat(
            &rt,
            &["run", "--isolation", isolation, "--net", net, "--", "true"],
        );
        assert!(
            o.code == Some(125) && o.stderr.contains(says) && o.stderr.trim().lines().count() == 1,
            "{net} {isolation}: {o:?}"
        );
    }
    wait_none_left(rt.root());
    assert_no_state(rt.root());
}

/// A bundle that joins the outer namespace (as a pod's containers join
/// the pod's), its /tmp a tmpfs (the root is read-only: runc's default
/// spec); its config written.
fn in_outer_ns(b: &mut Bundle, w: &World) {
    b.push(
        "/mounts",
        serde_json::json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
            "options": ["nosuid", "nodev"]}),
    );
    for ns in b.config["linux"]["namespaces"].as_array_mut().unwrap() {
        if ns["type"] == "network" {
            ns["path"] = serde_json::json!(format!("/run/netns/{}", w.outer));
        }
    }
    b.write_config();
}

/// The runtime in the test's (the host's) network namespace, with the
/// microVM cache.
fn host_moat(rt: &Rt, args: &[&str]) -> Out {
    let mut c = Command::new(runtime_bin());
    c.arg("--root")
        .arg(rt.root())
        .envs(rt.env().iter().map(|(k, v)| (k, v)))
        .envs(microvm_env())
        .args(args);
    output(rt, c)
}

/// Kills container `id`, waits until it stopped, deletes it, and checks
/// that nothing of it is left.
fn kill_and_delete(rt: &Rt, id: &str) {
    let o = host_moat(rt, &["kill", id, "KILL"]);
    assert_eq!(o.code, Some(0), "{o:?}");
    let start = Instant::now();
    while !host_moat(rt, &["state", id]).stdout.contains("\"stopped\"") {
        assert!(start.elapsed() < Duration::from_secs(60), "never stopped");
        std::thread::sleep(Duration::from_millis(100));
    }
    let o = host_moat(rt, &["delete", id]);
    assert_eq!(o.code, Some(0), "{o:?}");
    wait_none_left(rt.root());
    assert_no_state(rt.root());
}

/// Rootless: an unprivileged user's `moat run --net egress=…` gets the same
/// network (the init makes the device in its own namespaces, the stack runs
/// as that user).
#[test]
fn rootless_egress_works_too() {
    let Some(rt) = setup("rootless_egress") else {
        return;
    };
    if !Path::new("/usr/bin/setpriv").exists() {
        moat_core::testing::skip("rootless_egress", "needs setpriv");
        return;
    }
    let w = World::new(&rt);
    let uid = 40000 + (std::process::id() % 10000);
    let home = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        home.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{}", w.outer))
        .args([
            "setpriv",
            "--reuid",
            &uid.to_string(),
            "--regid",
            &uid.to_string(),
        ])
        .args(["--clear-groups", "env"])
        .arg(format!("XDG_RUNTIME_DIR={}", home.path().display()))
        .arg(runtime_bin())
        .arg("run")
        .arg(format!("--net=egress={}:8080", w.server))
        .args(["--", "sh", "-c"])
        .arg(format!(
            "curl -sS --max-time 10 http://{}:8080/index.html; echo rc=$?",
            w.server
        ))
        .current_dir(home.path());
    let o = output(&rt, c);
    assert!(o.stdout.contains("hello-from-the-internet"), "{o:?}");
    assert!(o.stdout.contains("rc=0"), "{o:?}");
    // Nothing of that user's runs on: not the workload, not its stack.
    let owned_by_uid = || {
        all_processes()
            .into_iter()
            .filter(|(p, _, st)| {
                // Status, not the /proc entry's owner: a non-dumpable
                // process's entry belongs to root.
                *st != 'Z'
                    && std::fs::read_to_string(format!("/proc/{p}/status")).is_ok_and(|t| {
                        t.lines()
                            .find_map(|l| l.strip_prefix("Uid:"))
                            .and_then(|v| v.split_whitespace().next())
                            == Some(uid.to_string().as_str())
                    })
            })
            .count()
    };
    let start = Instant::now();
    while owned_by_uid() > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "processes of {uid} left"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A field of /proc/PID/status (first word of its value).
fn status_field(pid: u32, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .map(str::to_owned)
}

/// The stack process of the one sandbox running under `root`: the fork of
/// the runtime that switched to an unprivileged host user.
fn stack_pid(root: &Path) -> u32 {
    let start = Instant::now();
    loop {
        let stacks: Vec<u32> = ours(root)
            .into_iter()
            .filter(|p| status_field(*p, "Uid").is_some_and(|u| u != "0"))
            .collect();
        if let [one] = stacks.as_slice() {
            return *one;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no single stack process: {stacks:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The process whose command line contains `marker`.
fn pid_of(marker: &str) -> u32 {
    let start = Instant::now();
    loop {
        let found = all_processes().into_iter().find(|(p, _, st)| {
            *st != 'Z'
                && std::fs::read(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(marker))
                && !std::fs::read(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains("moat"))
        });
        if let Some((p, _, _)) = found {
            return p;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no process {marker}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A `moat run` in the background whose stdin the test writes and whose
/// stdout it reads line by line; SIGKILLed if the test ends early.
struct Bg {
    run: Running,
    stdin: Option<std::process::ChildStdin>,
    lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
    err: PathBuf,
}

impl Bg {
    fn start(rt: &Rt, mut c: Command) -> Bg {
        let err = rt.scratch_file("bg.err");
        c.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(&err).unwrap());
        let mut child = spawn_own(&mut c);
        let stdin = child.stdin.take();
        let out = child.stdout.take().unwrap();
        Bg {
            run: Running(child),
            stdin,
            lines: std::io::BufRead::lines(std::io::BufReader::new(out)),
            err,
        }
    }

    /// The next line the workload printed (the test fails if it ended).
    fn line(&mut self) -> String {
        match self.lines.next() {
            Some(Ok(l)) => l,
            other => panic!(
                "the workload ended early ({other:?}): {}",
                std::fs::read_to_string(&self.err).unwrap_or_default()
            ),
        }
    }

    fn send(&mut self, line: &str) {
        use std::io::Write;
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(line.as_bytes()).unwrap();
        stdin.write_all(b"\n").unwrap();
        stdin.flush().unwrap();
    }

    /// Closes stdin, reads what is left and waits: (rest of stdout, status).
    fn finish(mut self) -> (String, std::process::ExitStatus) {
        self.stdin.take();
        let rest: Vec<String> = self.lines.by_ref().map_while(Result::ok).collect();
        let st = wait_own(&mut self.run.0);
        (rest.join("\n"), st)
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// Stops a workload that runs until told, as a user would: SIGTERM to
    /// `moat run` (which passes it on) until it returns, so that it
    /// removes its container; a SIGKILLed runtime would leave its cgroup
    /// to the next `moat run` in a root that the test then deletes.
    fn stop(mut self) {
        let pid = nix::unistd::Pid::from_raw(self.run.0.id() as i32);
        let start = Instant::now();
        while self.run.0.try_wait().unwrap().is_none() {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "moat run did not stop"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        wait_own(&mut self.run.0);
    }
}

/// HTTP through the stack with Python's urllib, a 64 MiB download checked
/// by hash, 200 flows open at once, IPv6 to an allowed destination and a
/// refused one, DNS answered for an allowed name only, all in one sandbox.
#[test]
fn python_http_large_transfer_many_flows_and_ipv6() {
    let Some((rt, w)) = world("python_http") else {
        return;
    };
    // 64 MiB that are not all one byte, and their hash as the host sees it.
    let mut big = vec![0u8; 64 << 20];
    let mut x = 0x2545_f491u32;
    for b in big.iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    std::fs::write(w.www.join("big"), &big).unwrap();
    drop(big);
    let want = sh(
        "sha256sum",
        &[w.www.join("big").to_string_lossy().into_owned()],
    );
    let want = want.stdout.split_whitespace().next().unwrap().to_owned();
    let script = format!(
        r#"
import hashlib, socket, urllib.request
get = lambda u: urllib.request.urlopen(u, timeout=60)
print('body', get('http://{s}:8080/index.html').read().decode().strip())
h, n, r = hashlib.sha256(), 0, get('http://{s}:8080/big')
while True:
    b = r.read(1 << 20)
    if not b: break
    h.update(b); n += len(b)
print('big', n, h.hexdigest())
socks = [socket.create_connection(('{s}', 9000), 30) for _ in range(200)]
for i, c in enumerate(socks): c.sendall(b'flow %d\n' % i)
ok = sum(c.makefile('rb').readline() == b'flow %d\n' % i for i, c in enumerate(socks))
for c in socks: c.close()
print('flows', ok)
print('v6', get('http://[{s6}]:8080/index.html').read().decode().strip())
try:
    socket.create_connection(('{s6}', 8081), 10)
    print('v6other open')
except ConnectionRefusedError:
    print('v6other refused')
import struct
def dns(name):
    q = struct.pack('!6H', 7, 0x0100, 1, 0, 0, 0)
    q += b''.join(bytes([len(l)]) + l.encode() for l in name.split('.'))
    q += b'\0' + struct.pack('!HH', 1, 1)
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(30)
    u.sendto(q, ('10.0.2.2', 53))
    a = u.recv(512)
    return '%d/%d' % (a[3] & 15, struct.unpack('!H', a[6:8])[0])
print('dns localhost', dns('localhost'))
print('dns example', dns('example.com'))
"#,
        s = w.server,
        s6 = w.server6
    );
    let o = w.run(
        &rt,
        &[
            &format!(
                "--net=egress={s}:8080,{s}:9000,[{s6}]:8080,localhost",
                s = w.server,
                s6 = w.server6
            ),
            "--",
            "python3",
            "-c",
            &script,
        ],
    );
    assert_eq!(o.code, Some(0), "{o:?}");
    assert!(
        o.stdout.contains("body hello-from-the-internet"),
        "{}",
        o.stdout
    );
    assert!(
        o.stdout.contains(&format!("big {} {want}", 64 << 20)),
        "{}",
        o.stdout
    );
    assert!(o.stdout.contains("flows 200"), "{}", o.stdout);
    assert!(
        o.stdout.contains("v6 hello-from-the-internet"),
        "{}",
        o.stdout
    );
    assert!(o.stdout.contains("v6other refused"), "{}", o.stdout);
    // An allowed name is resolved on the host by a resolver thread of the
    // confined stack (localhost: loopback, never passed on, so an empty
    // NOERROR); any other name is NXDOMAIN without asking the host.
    assert!(o.stdout.contains("dns localhost 0/0"), "{}", o.stdout);
    assert!(o.stdout.contains("dns example 3/0"), "{}", o.stdout);
    wait_none_left(rt.root());
}

/// A workload that opens flows as fast as it can is refused past the
/// stack's bound (256 TCP flows) while the stack stays up; a second
/// sandbox's flows work meanwhile, and the first gets flows again once it
/// closes its own. The stack process runs under its data and descriptor
/// limits.
#[test]
fn a_flow_flood_is_refused_at_the_bound_and_spares_other_sandboxes() {
    let Some((rt, w)) = world("flow_flood") else {
        return;
    };
    let script = format!(
        r#"
import socket, sys, time
held, refused = [], 0
for _ in range(400):
    try:
        held.append(socket.create_connection(('{s}', 9000), 30))
    except ConnectionRefusedError:
        refused += 1
print('held', len(held), 'refused', refused, flush=True)
sys.stdin.readline()
for c in held: c.close()
# The closed flows take a few round trips to leave the stack.
for _ in range(300):
    try:
        c = socket.create_connection(('{s}', 9000), 30)
        break
    except ConnectionRefusedError:
        time.sleep(0.1)
c.sendall(b'again\n')
print('after', c.makefile('rb').readline().decode().strip(), flush=True)
"#,
        s = w.server
    );
    let mut flood = w.run_bg(
        &rt,
        &[
            &format!("--net=egress={}:9000", w.server),
            "--",
            "python3",
            "-c",
            &script,
        ],
    );
    let line = flood.line();
    assert_eq!(line, "held 256 refused 144", "{}", flood.stderr());
    let stack = stack_pid(rt.root());
    let limits = std::fs::read_to_string(format!("/proc/{stack}/limits")).unwrap();
    let limit_of = |name: &str| {
        limits
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l[name.len()..].split_whitespace().next())
            .unwrap_or("")
            .to_owned()
    };
    assert_ne!(limit_of("Max data size"), "unlimited", "{limits}");
    assert_eq!(limit_of("Max open files"), "544", "{limits}");
    eprintln!(
        "flood: stack {stack} holds 256 flows: VmRSS {} kB, VmHWM {} kB, VmData {} kB, data limit {}",
        status_field(stack, "VmRSS").unwrap_or_default(),
        status_field(stack, "VmHWM").unwrap_or_default(),
        status_field(stack, "VmData").unwrap_or_default(),
        limit_of("Max data size"),
    );
    // Another sandbox, meanwhile.
    let rt2 = Rt::new();
    let o = w.run(
        &rt2,
        &[
            &format!("--net=egress={}:8080", w.server),
            "--",
            "curl",
            "-sS",
            "--max-time",
            "30",
            &format!("http://{}:8080/index.html", w.server),
        ],
    );
    assert_eq!(o.code, Some(0), "{o:?}");
    assert!(o.stdout.contains("hello-from-the-internet"), "{o:?}");
    wait_none_left(rt2.root());
    // The flooded stack is still up and serves again once flows close.
    flood.send("go");
    assert_eq!(flood.line(), "after again");
    let err = flood.stderr();
    let (_, st) = flood.finish();
    assert!(st.success(), "{st:?}: {err}");
    assert!(err.contains("flow limit reached"), "{err}");
    wait_none_left(rt.root());
}

/// Frames no workload's kernel would write, sent from the workload's side
/// of its device (a packet socket on eth0, as root in its namespace): random
/// bytes, truncated headers, wrong lengths and checksums, runt and giant
/// frames. Then ICMP echo from that side: the gateway answers, another
/// destination is refused with "administratively prohibited" (v4 and v6).
const GARBAGE: &str = r#"
import os, random, socket, struct, sys
gw_mac = bytes.fromhex('026d6f617402')
server = socket.inet_aton(sys.argv[1])
rnd = random.Random(7)
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(('eth0', 0))
me = s.getsockname()[4]
def csum(b):
    if len(b) % 2: b += b'\0'
    t = sum(struct.unpack('!%dH' % (len(b) // 2), b))
    while t >> 16: t = (t & 0xffff) + (t >> 16)
    return ~t & 0xffff
def syn(port, seq):
    ip = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 40, 1, 0, 64, 6, 0, socket.inet_aton('10.0.2.100'), server)
    ip = ip[:10] + struct.pack('!H', csum(ip)) + ip[12:]
    tcp = struct.pack('!HHIIBBHHH', port, 8080, seq, 0, 0x50, 0x02, 65535, 0, 0)
    pseudo = ip[12:20] + struct.pack('!BBH', 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack('!H', csum(pseudo + tcp)) + tcp[18:]
    return gw_mac + me + b'\x08\x00' + ip + tcp
sent = 0
def send(f):
    global sent
    try:
        s.send(f); sent += 1
    except OSError:
        pass
for i in range(20000):
    k = i % 8
    good = syn(20000 + i % 30000, i)
    if k == 0: f = bytes(rnd.getrandbits(8) for _ in range(rnd.randrange(0, 1600)))
    elif k == 1: f = good[:rnd.randrange(0, len(good))]
    elif k == 2: f = bytearray(good); f[rnd.randrange(14, len(f))] ^= 0xff; f = bytes(f)
    elif k == 3: f = good[:16] + struct.pack('!H', rnd.choice([0, 1, 19, 21, 0xffff])) + good[18:]
    elif k == 4: f = good[:14] + bytes([rnd.choice([0x40, 0x46, 0x4f, 0x60, 0x00])]) + good[15:]
    elif k == 5: f = good + os.urandom(rnd.randrange(1, 60000))
    elif k == 6: f = gw_mac + me + struct.pack('!H', rnd.choice([0x0806, 0x86dd, 0x8100, 0x88cc, 0])) + os.urandom(rnd.randrange(0, 100))
    else: f = good[:23] + bytes([rnd.choice([1, 17, 58, 255])]) + good[24:]
    send(f)
print('sent', sent)
def echo(family, dst):
    proto = socket.IPPROTO_ICMP if family == socket.AF_INET else socket.IPPROTO_ICMPV6
    req = 8 if family == socket.AF_INET else 128
    p = socket.socket(family, socket.SOCK_RAW, proto)
    p.settimeout(10)
    msg = struct.pack('!BBHHH', req, 0, 0, 77, 1) + b'moat'
    if family == socket.AF_INET:
        msg = msg[:2] + struct.pack('!H', csum(msg)) + msg[4:]
    p.sendto(msg, (dst, 0))
    v4 = family == socket.AF_INET
    while True:
        data, src = p.recvfrom(2000)
        if v4: data = data[(data[0] & 15) * 4:]
        # Only the answer to this request, or an error quoting it (not NDP,
        # MLD, or an error about an earlier garbage frame).
        if data[0] in (0, 129):
            inner = data
        elif data[0] in (3, 1):
            inner = data[8:]
            inner = inner[(inner[0] & 15) * 4:] if v4 else inner[40:]
        else:
            continue
        if inner[4:6] == struct.pack('!H', 77):
            return '%s %d %d' % (src[0], data[0], data[1])
print('gw4', echo(socket.AF_INET, '10.0.2.2'))
print('gw6', echo(socket.AF_INET6, 'fd00:6d6f:6174::2'))
print('far4', echo(socket.AF_INET, sys.argv[1]))
print('far6', echo(socket.AF_INET6, sys.argv[2]))
"#;

#[test]
fn garbage_frames_leave_the_stack_serving_and_icmp_is_answered_or_refused() {
    let Some((rt, w)) = world("garbage_frames") else {
        return;
    };
    let mut bg = w.run_bg(
        &rt,
        &[
        &format!("--net=egress={}:8080", w.server),
        "--",
        "sh",
        "-c",
        &format!(
            "echo ready; read x; curl -sS --max-time 30 --retry 10 --retry-connrefused --retry-delay 1 http://{}:8080/index.html; echo rc=$? # garbage-marker",
            w.server
        ),
        ],
    );
    assert_eq!(bg.line(), "ready");
    let stack = stack_pid(rt.root());
    let workload = pid_of("garbage-marker");
    let script = rt.scratch_file("garbage.py");
    std::fs::write(&script, GARBAGE).unwrap();
    let o = sh(
        "nsenter",
        &[
            format!("--net=/proc/{workload}/ns/net"),
            "python3".into(),
            script.to_string_lossy().into_owned(),
            w.server.clone(),
            w.server6.clone(),
        ],
    );
    assert!(o.ok(), "{o:?}");
    let sent: u32 = o
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("sent "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(sent > 15_000, "{}", o.stdout);
    // Echo: answered by the gateway, refused (destination unreachable,
    // administratively prohibited) elsewhere, never a forged reply.
    assert!(o.stdout.contains("gw4 10.0.2.2 0 0"), "{}", o.stdout);
    assert!(
        o.stdout.contains("gw6 fd00:6d6f:6174::2 129 0"),
        "{}",
        o.stdout
    );
    assert!(o.stdout.contains("far4 10.0.2.2 3 13"), "{}", o.stdout);
    assert!(
        o.stdout.contains("far6 fd00:6d6f:6174::2 1 1"),
        "{}",
        o.stdout
    );
    eprintln!(
        "garbage: {sent} frames; stack VmRSS {} kB, VmHWM {} kB",
        status_field(stack, "VmRSS").unwrap_or_default(),
        status_field(stack, "VmHWM").unwrap_or_default()
    );
    // The same stack still serves the workload.
    assert!(
        status_field(stack, "State").is_some_and(|s| s != "Z"),
        "the stack process ended"
    );
    bg.send("go");
    let (rest, st) = bg.finish();
    assert!(st.success(), "{st:?}");
    assert!(rest.contains("hello-from-the-internet"), "{rest}");
    assert!(rest.contains("rc=0"), "{rest}");
    wait_none_left(rt.root());
}

/// A server pushes to a workload that never reads: the stack takes from
/// the host only what the flow's buffer holds, so what the server manages
/// to send stays bounded (kernel socket buffers plus 128 KiB) and the
/// stack's memory does not grow with it.
#[test]
fn a_workload_that_never_reads_keeps_the_stack_bounded() {
    let Some((rt, w)) = world("never_reads") else {
        return;
    };
    let mut bg = w.run_bg(
        &rt,
        &[
        &format!("--net=egress={}:9001", w.server),
        "--",
        "python3",
        "-c",
        &format!(
            "import socket, sys\nc = socket.create_connection(('{}', 9001), 30)\nprint('connected', flush=True)\nsys.stdin.readline()",
            w.server
        ),
        ],
    );
    assert_eq!(bg.line(), "connected");
    let stack = stack_pid(rt.root());
    let rss = || {
        status_field(stack, "VmRSS")
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = rss();
    // Wait until the pusher stops making progress (3 s without a byte).
    let pushed = || {
        std::fs::read_to_string(&w.pushed)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let (mut last, mut since) = (pushed(), Instant::now());
    let start = Instant::now();
    while since.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(100));
        let now = pushed();
        if now != last {
            (last, since) = (now, Instant::now());
        }
        assert!(
            last < 256 << 20,
            "the server pushed {last} bytes into a workload that never reads"
        );
        assert!(start.elapsed() < Duration::from_secs(120), "never settled");
    }
    let after = rss();
    let hwm = status_field(stack, "VmHWM").unwrap_or_default();
    eprintln!(
        "never reads: server pushed {last} bytes; stack VmRSS {before} kB before, {after} kB after, VmHWM {hwm} kB"
    );
    assert!(last > 0, "nothing was pushed at all");
    assert!(last < 32 << 20, "pushed {last} bytes");
    assert!(
        after < before + 16 * 1024,
        "stack RSS grew from {before} to {after} kB"
    );
    bg.send("done");
    let (_, st) = bg.finish();
    assert!(st.success(), "{st:?}");
    wait_none_left(rt.root());
}

/// The workload is SIGKILLed in the middle of a download: its runtime
/// returns, and no process, no live socket of the stack and no network
/// namespace of it remain.
#[test]
fn a_workload_killed_mid_transfer_leaves_nothing_behind() {
    let Some((rt, w)) = world("killed_mid_transfer") else {
        return;
    };
    std::fs::write(w.www.join("big"), vec![7u8; 32 << 20]).unwrap();
    let mut bg = w.run_bg(
        &rt,
        &[
        &format!("--net=egress={}:8080", w.server),
        "--",
        "python3",
        "-c",
        &format!(
            "import sys, urllib.request # killed-marker\nr = urllib.request.urlopen('http://{}:8080/big', timeout=30)\nr.read(1 << 20)\nprint('started', flush=True)\nsys.stdin.readline()",
            w.server
        ),
        ],
    );
    assert_eq!(bg.line(), "started");
    let workload = pid_of("killed-marker");
    let netns = std::fs::read_link(format!("/proc/{workload}/ns/net")).unwrap();
    let established = || {
        w.in_outer("ss", &["-Htn", "state", "established"])
            .stdout
            .trim()
            .to_owned()
    };
    assert!(
        established().contains(&format!("{}:8080", w.server)),
        "{}",
        established()
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(workload as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let (_, st) = bg.finish();
    assert!(!st.success());
    wait_none_left(rt.root());
    // No process is left in the workload's network namespace, nothing
    // mounts it, and the stack's host socket is gone.
    let in_netns = || {
        all_processes()
            .into_iter()
            .filter(|(p, _, _)| {
                std::fs::read_link(format!("/proc/{p}/ns/net")).is_ok_and(|l| l == netns)
            })
            .count()
    };
    let start = Instant::now();
    while in_netns() > 0 || !established().is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "left: {} processes in {netns:?}; sockets {}",
            in_netns(),
            established()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&netns.to_string_lossy().to_string()),
        "{netns:?} is still mounted"
    );
}

/// `-p 127.0.0.1:HOSTPORT:PORT/udp`: datagrams to the host port reach the
/// workload's UDP port and its answers come back to each sender.
#[test]
fn a_published_udp_port_reaches_the_workload() {
    let Some((rt, w)) = world("published_udp") else {
        return;
    };
    let port = 20000 + (std::process::id() % 20000) as u16;
    let mut bg = w.run_bg(
        &rt,
        &[
        "--net=egress=",
        "-p",
        &format!("127.0.0.1:{port}:5353/udp"),
        "--",
        "python3",
        "-c",
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.bind(('0.0.0.0', 5353))\nprint('ready', flush=True)\nwhile True:\n    d, a = s.recvfrom(2000)\n    s.sendto(b'echo:' + d + b' from ' + a[0].encode(), a)",
        ],
    );
    assert_eq!(bg.line(), "ready");
    // Two senders, each retrying until it hears its own answer.
    let client = format!(
        r#"
import socket
for name in (b'one', b'two'):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(0.5)
    for _ in range(120):
        s.sendto(name, ('127.0.0.1', {port}))
        try:
            print(s.recv(2000).decode()); break
        except socket.timeout:
            pass
"#
    );
    let o = w.in_outer("python3", &["-c", &client]);
    assert!(o.ok(), "{o:?}");
    assert!(o.stdout.contains("echo:one from 10.0.2.2"), "{o:?}");
    assert!(o.stdout.contains("echo:two from 10.0.2.2"), "{o:?}");
    bg.stop();
    wait_none_left(rt.root());
    assert_no_state(rt.root());
}
