//! The `microvm` tier on moat's own VMM (`moat-vmm`), end to end: `moat
//! run --isolation microvm` picks it where KVM has vmx or svm, and the
//! workload runs in a guest that VMM booted (its ACPI tables, not QEMU's,
//! in the guest kernel's log), with its output and exit status relayed,
//! stdin passed through, a terminal, `moat probe` finding no escape, a published port
//! through its network card, a read-write volume through its virtio-fs
//! device, the OCI lifecycle, and nothing left behind.
//!
//! This project's machines have no vmx/svm (their KVM is PVM), so there
//! the test skips for missing hardware unless `MOAT_TEST_NESTED=1`: then
//! the cases run in a QEMU/TCG guest (`guest/mod.rs`) whose emulated CPU has
//! SVM: the guest loads `kvm_amd`, gets a /dev/kvm that boots stock kernels,
//! and this package's `moat` runs there with the guest kernel, its modules
//! and e2fsprogs' `mke2fs` (which builds the guest's disks) copied in; its
//! cgroups are v2 (the guest mounts a unified hierarchy). On a host with
//! vmx/svm the same cases run on the host directly.
#[path = "../../moat-vmm/tests/common/mod.rs"]
mod common;
#[allow(dead_code)]
mod guest;

use std::path::{Path, PathBuf};
use std::time::Duration;

use guest::{Guest, Needs, Out};

const TEST: &str = "moat_run_boots_the_workload_on_moats_own_vmm";

/// Set to `1`, runs the cases nested where the host has no vmx/svm.
const NESTED_ENV: &str = "MOAT_TEST_NESTED";

/// Bounds the whole guest session (watchdog), far above what it takes.
const SESSION_LIMIT: Duration = Duration::from_secs(900);

/// Where the cases run.
enum Runner {
    Guest(Guest),
    /// The host (it has vmx/svm), with `moat`'s directory first in PATH.
    Host(PathBuf),
}

impl Runner {
    fn sh(&mut self, script: &str) -> Result<Out, String> {
        match self {
            Runner::Guest(g) => g.sh(script),
            Runner::Host(dir) => {
                let path = format!(
                    "{}:{}",
                    dir.display(),
                    std::env::var("PATH").unwrap_or_default()
                );
                let o = std::process::Command::new("sh")
                    .args(["-c", script])
                    .env("PATH", path)
                    .stdin(std::process::Stdio::null())
                    .output()
                    .map_err(|e| format!("sh: {e}"))?;
                Ok(Out {
                    code: o.status.code().unwrap_or(-1),
                    stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
                    stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
                })
            }
        }
    }
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The shared libraries `ldd` names for `binary` (the dynamic loader among
/// them).
fn libraries(binary: &Path) -> Vec<PathBuf> {
    let out = std::process::Command::new("ldd")
        .arg(binary)
        .output()
        .expect("ldd runs");
    moat_microvm::vmm::qemu::ldd_paths(&String::from_utf8_lossy(&out.stdout))
}

/// What the nested guest needs besides moat and busybox: the guest
/// kernel, the tier's modules and KVM's, `mke2fs` and its libraries.
fn guest_files(release: &str, kernel: &Path) -> Vec<(String, u32, Vec<u8>)> {
    let mut files = vec![(format!("boot/vmlinuz-{release}"), 0o644, read(kernel))];
    let modules = Path::new("/lib/modules").join(release).join("kernel");
    let tier = moat_microvm::assets::MODULE_PATHS.iter().map(|(_, p)| *p);
    for m in tier
        .chain(common::nested::KVM_MODULES)
        .chain(POD_MODULES.iter().copied())
    {
        files.push((
            format!("lib/modules/{release}/kernel/{m}"),
            0o644,
            read(&modules.join(m)),
        ));
    }
    // mke2fs builds the guest's disks and debugfs takes mke2fs's
    // lost+found out of them; util-linux's setpriv (busybox's has no
    // --reuid, and its link takes /bin/setpriv) makes the rootless case's
    // unprivileged user.
    for (tool, package, at) in [
        ("mke2fs", "e2fsprogs", "bin/mke2fs"),
        ("debugfs", "e2fsprogs", "bin/debugfs"),
        ("setpriv", "util-linux", "bin/util-setpriv"),
    ] {
        let bin = common::which(tool).unwrap_or_else(|| panic!("{tool} ({package}) is installed"));
        files.push((at.into(), 0o755, read(&bin)));
        for lib in libraries(&bin) {
            let at = lib.to_string_lossy().trim_start_matches('/').to_string();
            if files.iter().any(|(p, _, _)| *p == at) {
                continue;
            }
            // /lib64/ld-linux-x86-64.so.2 is a link into /lib; a copy serves.
            files.push((at, 0o755, read(&std::fs::canonicalize(&lib).unwrap())));
        }
    }
    // The read-write volumes' server, where moat looks for it.
    let virtiofsd = ["/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd"]
        .iter()
        .map(Path::new)
        .find(|p| p.is_file())
        .expect("virtiofsd (qemu-system-common or virtiofsd) is installed");
    files.push(("usr/lib/qemu/virtiofsd".into(), 0o755, read(virtiofsd)));
    for lib in libraries(virtiofsd) {
        let at = lib.to_string_lossy().trim_start_matches('/').to_string();
        if !files.iter().any(|(p, _, _)| *p == at) {
            files.push((at, 0o755, read(&std::fs::canonicalize(&lib).unwrap())));
        }
    }
    files
}

/// The outer guest's modules for a pod's interface: a veth pair, a TAP,
/// and the ingress qdisc, u32 filters and mirred redirection that hand the
/// one to the other.
const POD_MODULES: [&str; 5] = [
    "drivers/net/veth.ko",
    "drivers/net/tun.ko",
    "net/sched/sch_ingress.ko",
    "net/sched/cls_u32.ko",
    "net/sched/act_mirred.ko",
];

/// In the guest: KVM's modules, loopback up, devpts.
fn kvm_setup(release: &str) -> String {
    let mut s = String::from("set -e\n");
    for m in common::nested::KVM_MODULES.iter().chain(&POD_MODULES) {
        s.push_str(&format!("insmod /lib/modules/{release}/kernel/{m}\n"));
    }
    s.push_str("grep -qw svm /proc/cpuinfo\n");
    // Loopback, for the published port, and devpts, for `-t` (the guest's
    // init leaves the one down and the other unmounted).
    s.push_str("ip link set lo up\nmkdir -p /dev/pts\nmount -t devpts devpts /dev/pts\n");
    s
}

/// The guest's /dev/kvm as the module leaves it without udev (0600, root
/// only): the tier says the VMM's host user could not open it; then for
/// the group `kvm` (36), mode 0660, as udev leaves it on a distribution's
/// host (the VMM's jail keeps only that group).
fn kvm_access(r: &mut Runner) -> Result<(), String> {
    let info = r.sh("chmod 600 /dev/kvm && moat info")?;
    check(
        info.stdout.lines().any(|l| {
            l.contains("microvm") && l.contains("/dev/kvm is mode 0600: the VMM's host user")
        }),
        || format!("a /dev/kvm only root opens is not named: {info}"),
    )?;
    let o = r.sh("chown 0:36 /dev/kvm && chmod 660 /dev/kvm")?;
    check(o.code == 0, || format!("chmod /dev/kvm: {o}"))
}

fn check(ok: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(what())
    }
}

fn cases(r: &mut Runner) -> Result<(), String> {
    let info = r.sh("moat info")?;
    check(
        info.code == 0
            && info
                .stdout
                .lines()
                .any(|l| l.contains("microvm") && l.contains("ready: moat's own VMM on KVM")),
        || format!("moat info does not pick moat's own VMM: {info}"),
    )?;
    // The console copied to stderr: the guest kernel lists the ACPI
    // tables it found, and moat's VMM names its own.
    let run = r.sh(
        "MOAT_MICROVM_CONSOLE=1 moat run --isolation microvm -- sh -c 'echo hello from the guest; echo to stderr >&2; exit 7'",
    )?;
    check(
        run.code == 7 && run.stdout.contains("hello from the guest"),
        || format!("the workload's output or status was not relayed: {run}"),
    )?;
    for l in run
        .stderr
        .lines()
        .filter(|l| l.starts_with("moat: microvm:"))
    {
        eprintln!("{TEST}: {l}");
    }
    check(
        run.stderr.contains("to stderr") && run.stderr.contains("MOATDSDT"),
        || format!("not booted on moat's VMM (no MOATDSDT in the guest's log): {run}"),
    )?;
    let stdin = r.sh("echo piped through | moat run -i --isolation microvm -- cat")?;
    check(
        stdin.code == 0 && stdin.stdout.trim() == "piped through",
        || format!("stdin did not reach the workload: {stdin}"),
    )?;
    // A terminal: moat holds the pty, the VMM process relays it (the VM's
    // child has none of it).
    let tty = r.sh("moat run -t --isolation microvm -- sh -c 'tty >/dev/null && echo on a tty'")?;
    check(tty.code == 0 && tty.stdout.contains("on a tty"), || {
        format!("no terminal in the workload: {tty}")
    })?;
    snapshots(r)?;
    probe(r)?;
    published_port(r)?;
    pod_interface(r)?;
    volumes(r)?;
    oci_lifecycle(r)?;
    rootless(r)?;
    // Nothing left: no container state, no VMM process, no cgroup.
    let left = r.sh(
        "ls -A /run/moat | grep -v '^\\.' || true; ps -o args | grep -v grep | grep 'moat.*microvm' || true",
    )?;
    check(left.stdout.trim().is_empty(), || {
        format!("left behind: {left}")
    })
}

/// With no snapshot cached, a run that saves the configuration's, then
/// runs restored from it: the workload's output and status as for a cold
/// boot, random bytes and boot IDs of their own, the host's clock; then
/// ([`SNAPSHOTS_MORE`]) the same with two vCPUs, and a damaged snapshot,
/// which a run removes, booting cold instead. Prints the runs' times. Two
/// requests: the guest's agent gives each 200 s, and under TCG inside TCG
/// a debug build's saves take 30–65 s each.
const SNAPSHOTS: &str = r#"F='echo start; od -An -N16 -tx1 /dev/urandom | tr -d " \n"; echo; cat /proc/sys/kernel/random/boot_id; date +%s; exit 7'
cs() { cut -d' ' -f1 /proc/uptime | tr -d .; }
# Where the snapshots are (a run names the one it restored or saved).
moat --debug --log /tmp/snap0.log run --isolation microvm -- true
dir=$(grep -o '/[^ "]*/snapshot-[^ "/]*\.vmstate' /tmp/snap0.log | head -n 1)
dir=${dir%/*}
echo "cache=$dir"
# A cold boot for comparison, then from no snapshot (the runs before
# saved theirs).
b=$(cs)
MOAT_MICROVM_SNAPSHOT=0 moat run --isolation microvm -- true
echo "code0=$?"
echo "ms0=$(( ($(cs) - b) * 10 ))"
rm -f "$dir"/snapshot-*
for i in 1 2 3; do
    before=$(date +%s)
    b=$(cs)
    moat --debug --log /tmp/snap$i.log run --isolation microvm -- sh -c "$F" >/tmp/snap$i.out 2>&1
    code=$?
    echo "code$i=$code"
    echo "ms$i=$(( ($(cs) - b) * 10 ))"
    echo "before$i=$before"
    echo "fresh$i=$(sed -n 2,4p /tmp/snap$i.out | tr '\n' ,)"
    grep -q 'saved snapshot' /tmp/snap$i.log && echo "start$i=saved"
    grep -q 'restored from snapshot' /tmp/snap$i.log && echo "start$i=restored"
done"#;

/// The rest of [`SNAPSHOTS`], in a request of its own.
const SNAPSHOTS_MORE: &str = r#"F='echo start; od -An -N16 -tx1 /dev/urandom | tr -d " \n"; echo; cat /proc/sys/kernel/random/boot_id; date +%s; exit 7'
dir=$(grep -o '/[^ "]*/snapshot-[^ "/]*\.vmstate' /tmp/snap0.log | head -n 1)
dir=${dir%/*}
# Two vCPUs: saved, then restored (each vCPU's state its own).
for i in 5 6; do
    moat --debug --log /tmp/snap$i.log run --cpus 2 --isolation microvm -- sh -c 'grep -c ^processor /proc/cpuinfo; cat /sys/devices/system/clocksource/clocksource0/current_clocksource' >/tmp/snap$i.out 2>&1
    echo "code$i=$?"
    echo "out$i=$(tr '\n' , </tmp/snap$i.out)"
    grep -q 'saved snapshot' /tmp/snap$i.log && echo "start$i=saved"
    grep -q 'restored from snapshot' /tmp/snap$i.log && echo "start$i=restored"
done
# A damaged snapshot: the run boots cold, and the file is removed.
for f in "$dir"/snapshot-*.vmstate; do
    printf 'X' | dd of="$f" bs=1 seek=$(( $(stat -c %s "$f") - 1 )) conv=notrunc 2>/dev/null
done
moat --debug --log /tmp/snap4.log run --isolation microvm -- sh -c "$F" >/tmp/snap4.out 2>&1
echo "code4=$?"
grep -q 'removed snapshot' /tmp/snap4.log && echo "start4=removed"
grep -h 'microvm:' /tmp/snap*.log | grep -i 'snapshot\|cold' >&2
cat /tmp/snap*.out >&2"#;

fn snapshots(r: &mut Runner) -> Result<(), String> {
    let first = r.sh(SNAPSHOTS)?;
    let more = r.sh(SNAPSHOTS_MORE)?;
    let o = Out {
        code: first.code.max(more.code),
        stdout: first.stdout + &more.stdout,
        stderr: first.stderr + &more.stderr,
    };
    let kv = key_values(&o.stdout);
    let get = |k: &str| kv.get(k).map(String::as_str).unwrap_or("");
    check(get("cache").starts_with('/'), || {
        format!("no snapshot named in a run's log: {o}")
    })?;
    check(get("code0") == "0", || format!("the cold run: {o}"))?;
    for i in 1..=3 {
        check(get(&format!("code{i}")) == "7", || {
            format!("run {i}'s status: {o}")
        })?;
    }
    check(
        get("start1") == "saved" && get("start2") == "restored" && get("start3") == "restored",
        || format!("not saved then restored: {o}"),
    )?;
    check(
        get("code5") == "0"
            && get("code6") == "0"
            && get("start5") == "saved"
            && get("start6") == "restored"
            && get("out5").starts_with("2,")
            && get("out6") == get("out5"),
        || format!("two vCPUs, saved then restored: {o}"),
    )?;
    check(get("code4") == "7" && get("start4") == "removed", || {
        format!("a damaged snapshot did not fall back to a cold boot: {o}")
    })?;
    let fresh: Vec<Vec<&str>> = (1..=3)
        .map(|i| get(&format!("fresh{i}")).split(',').collect())
        .collect();
    for (i, f) in fresh.iter().enumerate() {
        let before: u64 = get(&format!("before{}", i + 1)).parse().unwrap_or(u64::MAX);
        check(
            f.len() >= 3 && f[0].len() == 32 && f[2].parse::<u64>().is_ok_and(|t| t >= before),
            || format!("run {}: random bytes, boot ID, clock: {o}", i + 1),
        )?;
    }
    check(
        fresh[1][0] != fresh[2][0] && fresh[1][1] != fresh[2][1],
        || format!("restored guests repeat random bytes or a boot ID: {o}"),
    )?;
    eprintln!(
        "{TEST}: snapshot: cold run (snapshots off) {} ms, saving run {} ms, restored runs {} and {} ms",
        get("ms0"),
        get("ms1"),
        get("ms2"),
        get("ms3")
    );
    Ok(())
}

/// `moat probe` in a workload on moat's VMM (the binary on a volume, a
/// disk of its own): the guest's kernel answers, and every escape it tries
/// fails there.
fn probe(r: &mut Runner) -> Result<(), String> {
    let out = r.sh(
        "rm -rf /tmp/moat-probe && mkdir /tmp/moat-probe && cp \"$(command -v moat)\" /tmp/moat-probe/\n\
         moat run --isolation microvm -v /tmp/moat-probe:/opt/moat:ro -- /opt/moat/moat probe --json",
    )?;
    let doc: serde_json::Value = serde_json::from_str(&out.stdout)
        .map_err(|e| format!("probe output is not JSON ({e}): {out}"))?;
    let checks = doc["checks"].as_array().cloned().unwrap_or_default();
    let find = |id: &str| {
        checks
            .iter()
            .find(|c| c["id"] == id)
            .cloned()
            .unwrap_or_default()
    };
    check(
        find("kernel.version")["detail"]
            .as_str()
            .is_some_and(|v| v.contains("cloud-amd64"))
            && find("kernel.hypervisor")["detail"]
                .as_str()
                .is_some_and(|d| d.contains("has the hypervisor flag"))
            && find("kernel.separate")["result"] != "allowed",
        || format!("not the guest's kernel: {doc}"),
    )?;
    let escaped: Vec<&serde_json::Value> = checks
        .iter()
        .filter(|c| {
            c["id"].as_str().is_some_and(|i| i.starts_with("escape.")) && c["result"] == "allowed"
        })
        .collect();
    check(!checks.is_empty() && escaped.is_empty(), || {
        format!("escapes allowed: {escaped:?}")
    })?;
    for id in ["identity.userns", "caps.effective-empty", "seccomp.mode"] {
        check(find(id)["result"] == "blocked", || format!("{id}: {doc}"))?;
    }
    Ok(())
}

/// A web server in the workload behind `-p 18080:8000`: the guest's
/// virtio-net card (moat's VMM's) carries it to moat's user-space stack.
/// (busybox's `nc`: Debian's static busybox `wget` crashes.)
const WEB: &str = r#"get() { printf 'GET /f HTTP/1.0\r\n\r\n' | nc 127.0.0.1 18080 2>/dev/null | tail -n 1; }
moat --debug --log /tmp/web@N@.log run --isolation microvm --net=egress= -p 18080:8000 -- sh -c 'echo inside > /tmp/f && cd /tmp && exec httpd -f -p 8000' >/tmp/web.out 2>&1 &
M=$!
i=0
body=
while [ $i -lt 600 ]; do
    body=$(get)
    [ -n "$body" ] && break
    kill -0 $M 2>/dev/null || break
    i=$((i+1))
    sleep 0.1
done
echo "body=$body"
while kill -0 $M 2>/dev/null; do kill -TERM $M; sleep 0.2; done
wait $M
if [ -n "$(get)" ]; then echo open=yes; else echo open=no; fi
grep -q 'restored from snapshot' /tmp/web@N@.log && echo start=restored
cat /tmp/web.out >&2
"#;

/// Twice: the second run restores the networked guest's snapshot that
/// the first saved (or an earlier session's), its card then as good.
fn published_port(r: &mut Runner) -> Result<(), String> {
    for n in 1..=2 {
        let o = r.sh(&WEB.replace("@N@", &n.to_string()))?;
        let kv = key_values(&o.stdout);
        check(
            kv.get("body").map(String::as_str) == Some("inside")
                && kv.get("open").map(String::as_str) == Some("no")
                && (n == 1 || kv.get("start").map(String::as_str) == Some("restored")),
            || format!("the published port, run {n}: {o}"),
        )?;
    }
    Ok(())
}

/// A pod's interface on moat's own VMM: a namespace holding one end of a
/// veth pair with an address and a default route (as a CNI plugin leaves
/// a pod's), joined with `--net ns:`; the guest takes the interface over
/// through a TAP with a virtio-net header (checksum and segmentation
/// offloads, mergeable buffers) and serves ~1 MB on the namespace's
/// address, which the other end fetches whole. Twice: the second run
/// restores the snapshot the first saved, its card started again on a new
/// TAP. Afterwards the namespace has its veth back, alone, and its ports.
const POD: &str = r#"unshare -n sleep 900 &
P=$!
while [ "$(readlink /proc/$P/ns/net)" = "$(readlink /proc/self/ns/net)" ]; do sleep 0.05; done
# busybox's ip names the peer itself (veth0).
ip link add hpod type veth
ip link set veth0 netns $P
ip addr add 10.77.0.1/24 dev hpod
ip link set hpod up
nsenter -t $P -n sh -c 'ip link set lo up && ip addr add 10.77.0.2/24 dev veth0 && ip link set veth0 up && ip route add default via 10.77.0.1'
want=$(seq 1 150000 | md5sum | cut -d' ' -f1)
size=$(seq 1 150000 | wc -c)
for n in 1 2; do
    moat --debug --log /tmp/pod$n.log run --isolation microvm --net ns:/proc/$P/ns/net -- sh -c 'seq 1 150000 >/tmp/f && cd /tmp && exec httpd -f -p 8000' >/tmp/pod$n.out 2>&1 &
    M=$!
    i=0
    while [ $i -lt 900 ]; do
        rm -f /tmp/pod.resp
        printf 'GET /f HTTP/1.0\r\n\r\n' | nc 10.77.0.2 8000 >/tmp/pod.resp 2>/dev/null
        [ "$(wc -c </tmp/pod.resp)" -gt "$size" ] && break
        kill -0 $M 2>/dev/null || break
        i=$((i+1))
        sleep 0.1
    done
    echo "got$n=$(tail -c $size /tmp/pod.resp | md5sum | cut -d' ' -f1)"
    while kill -0 $M 2>/dev/null; do kill -TERM $M; sleep 0.2; done
    wait $M
    grep -q 'saved snapshot' /tmp/pod$n.log && echo "start$n=saved"
    grep -q 'restored from snapshot' /tmp/pod$n.log && echo "start$n=restored"
    echo "links$n=$(nsenter -t $P -n ip -o link | cut -d: -f2 | cut -d@ -f1 | tr -d ' ' | tr '\n' ,)"
    echo "ports$n=$(nsenter -t $P -n cat /proc/sys/net/ipv4/ip_local_port_range | tr -s ' \t' -)"
    grep 'microvm:' /tmp/pod$n.log | tail -n 20 >&2
    cat /tmp/pod$n.out >&2
done
echo "want=$want"
kill $P
ip link del hpod 2>/dev/null
true"#;

fn pod_interface(r: &mut Runner) -> Result<(), String> {
    let o = r.sh(POD)?;
    let kv = key_values(&o.stdout);
    let get = |k: &str| kv.get(k).map(String::as_str).unwrap_or("");
    check(!get("want").is_empty(), || {
        format!("the pod case did not run: {o}")
    })?;
    for n in ["1", "2"] {
        check(get(&format!("got{n}")) == get("want"), || {
            format!("run {n}: the file did not come whole from the pod's address: {o}")
        })?;
        // The veth alone again (no TAP), and the namespace's own ports
        // (the kernel's default range) given back.
        check(get(&format!("links{n}")) == "lo,veth0,", || {
            format!("run {n}: the namespace's links afterwards: {o}")
        })?;
        check(get(&format!("ports{n}")) == "32768-60999", || {
            format!("run {n}: the namespace's port range afterwards: {o}")
        })?;
    }
    check(get("start2") == "restored", || {
        format!("the second run did not restore the first's snapshot: {o}")
    })
}

/// A read-write volume (`-v DIR:/data`) on moat's own VMM: its virtio-fs
/// device, served by virtiofsd, makes the guest's writes the host
/// directory's; the same script under the container tier leaves the same
/// files with the same owners (the container's host IDs, never root).
/// `moat info` names the server. Then, with no snapshot, a run with a
/// volume saves one and the next restores it (its container the held
/// one), each volume filling a slot the saved guest had as a placeholder;
/// a run with four restores it too (the fourth slot on interrupt line 16).
const VOLUMES: &str = r#"S='cat /data/from-host; echo from-guest > /data/new; mkdir /data/d; mv /data/new /data/moved; echo more >> /data/moved; rm /data/from-host; ls /data'
moat info | grep 'read-write volumes' | sed 's/^/info=/'
for tier in container microvm; do
    d=/tmp/vol-$tier
    rm -rf $d && mkdir $d && chmod 777 $d
    echo 'host says hi' > $d/from-host
    MOAT_MICROVM_CONSOLE=1 moat run --isolation $tier -v $d:/data -- sh -c "$S" >/tmp/vol-$tier.out 2>/tmp/vol-$tier.err
    echo "code_$tier=$?"
    echo "out_$tier=$(tr '\n' , </tmp/vol-$tier.out)"
    echo "moved_$tier=$(tr '\n' , <$d/moved)"
    [ -e $d/from-host ] || echo "removed_$tier=yes"
    echo "owners_$tier=$(stat -c %u:%g $d/moved $d/d | tr '\n' ,)"
    grep -i 'virtio\|fuse\|moat:' /tmp/vol-$tier.err | tail -n 40 >&2
done
# With no snapshot, a run with a volume saves one (the volume's slot a
# placeholder then, the held container bound to where the volume goes),
# then has the VMM show the device; the next restores it, the device
# filling the slot at the restore.
dir=$(grep -o '/[^ "]*/snapshot-[^ "/]*\.vmstate' /tmp/snap0.log | head -n 1)
dir=${dir%/*}
rm -f "$dir"/snapshot-*
for i in 1 2; do
    d=/tmp/vol-late$i
    rm -rf $d && mkdir $d && chmod 777 $d
    echo "from the host $i" > $d/in
    moat --debug --log /tmp/vol-late$i.log run --isolation microvm -v $d:/data -- sh -c "cat /data/in; echo from the guest $i > /data/out" >/tmp/vol-late$i.out 2>&1
    echo "late_code$i=$?"
    echo "late_out$i=$(tr '\n' , </tmp/vol-late$i.out)"
    echo "late_file$i=$(cat $d/out)"
    grep -q 'saved snapshot' /tmp/vol-late$i.log && echo "late_start$i=saved"
    grep -q 'restored from snapshot' /tmp/vol-late$i.log && echo "late_start$i=restored"
    grep -q 'created before the snapshot' /tmp/vol-late$i.log && echo "late_held$i=yes"
    grep -h 'microvm:' /tmp/vol-late$i.log | grep -i 'snapshot\|cold' >&2
    cat /tmp/vol-late$i.out >&2
done
# Four volumes, restored: the fourth slot's interrupt is line 16, an I/O
# APIC pin the 8259s do not have.
args=""
for k in 1 2 3 4; do
    d=/tmp/vol-four$k
    rm -rf $d && mkdir $d && chmod 777 $d
    args="$args -v $d:/v$k"
done
moat --debug --log /tmp/vol-four.log run --isolation microvm $args -- sh -c 'for k in 1 2 3 4; do echo in $k > /v$k/f; done' >/tmp/vol-four.out 2>&1
echo "four_code=$?"
echo "four_files=$(cat /tmp/vol-four1/f /tmp/vol-four2/f /tmp/vol-four3/f /tmp/vol-four4/f | tr '\n' ,)"
grep -q 'restored from snapshot' /tmp/vol-four.log && echo "four_start=restored"
cat /tmp/vol-four.out >&2"#;

fn volumes(r: &mut Runner) -> Result<(), String> {
    let o = r.sh(VOLUMES)?;
    let kv = key_values(&o.stdout);
    let get = |k: &str| kv.get(k).map(String::as_str).unwrap_or("");
    check(get("info").contains("virtio-fs, served by"), || {
        format!("moat info does not name the volumes' server: {o}")
    })?;
    for tier in ["container", "microvm"] {
        check(
            get(&format!("code_{tier}")) == "0"
                && get(&format!("out_{tier}")) == "host says hi,d,moved,"
                && get(&format!("moved_{tier}")) == "from-guest,more,"
                && get(&format!("removed_{tier}")) == "yes",
            || format!("a read-write volume under the {tier} tier: {o}"),
        )?;
    }
    let owners = get("owners_microvm");
    check(
        owners == get("owners_container") && !owners.starts_with("0:") && owners.len() > 4,
        || format!("the volume's files are not the container's host IDs': {o}"),
    )?;
    for i in 1..=2 {
        check(
            get(&format!("late_code{i}")) == "0"
                && get(&format!("late_out{i}")) == format!("from the host {i},")
                && get(&format!("late_file{i}")) == format!("from the guest {i}"),
            || format!("run {i} with a volume in a snapshot's slot: {o}"),
        )?;
    }
    check(
        get("late_start1") == "saved"
            && get("late_start2") == "restored"
            && get("late_held2") == "yes",
        || format!("runs with a volume not saved, then restored with the held container: {o}"),
    )?;
    check(
        get("four_code") == "0"
            && get("four_files") == "in 1,in 2,in 3,in 4,"
            && get("four_start") == "restored",
        || format!("four volumes in a restored guest's slots: {o}"),
    )
}

/// An unprivileged user (no capability, no group but /dev/kvm's, as its
/// primary one) runs a directory image on moat's own VMM: `moat info`
/// picks that VMM for it, the VMM process is the user itself in a user
/// namespace of its own (the jail's rootless path, /dev/kvm bound into a
/// mount namespace that namespace owns), the image is built by `mke2fs -d`
/// there; the workload's output and status come back, and nothing of the
/// user's is left running.
const ROOTLESS: &str = r#"set -e
g=$(stat -c %g /dev/kvm)
u=2000
rm -rf /tmp/rl-xdg /tmp/rl-cache /tmp/rl-root
for d in /tmp/rl-xdg /tmp/rl-cache /tmp/rl-root; do mkdir -p $d; chown $u:$g $d; chmod 700 $d; done
mkdir -p /tmp/rl-root/bin /tmp/rl-root/proc /tmp/rl-root/dev /tmp/rl-root/sys /tmp/rl-root/tmp
for bb in /bin/busybox /usr/bin/busybox; do [ -x $bb ] && break; done
cp $bb /tmp/rl-root/bin/busybox
for a in sh id echo; do ln -s busybox /tmp/rl-root/bin/$a; done
chown -R $u:$g /tmp/rl-root
chmod 755 /tmp/rl-root
setpriv=$(command -v util-setpriv || command -v setpriv)
as_user() { "$setpriv" --reuid=$u --regid=$g --clear-groups env XDG_RUNTIME_DIR=/tmp/rl-xdg MOAT_MICROVM_CACHE=/tmp/rl-cache MOAT_MICROVM_SNAPSHOT=0 "$@"; }
as_user moat info | grep microvm
set +e
MOAT_MICROVM_CONSOLE=1 as_user moat --debug --log /tmp/rl.log run --isolation microvm /tmp/rl-root -- sh -c 'echo rootless on moat-vmm; id -u; exit 5' >/tmp/rl.out 2>/tmp/rl.err
echo "code=$?"
echo "out=$(tr '
' , </tmp/rl.out)"
grep -q MOATDSDT /tmp/rl.err && echo "acpi=moat"
echo "left=$(ps -o user,args | grep -v grep | grep -c '^ *2000 ')"
tail -n 60 /tmp/rl.err >&2
tail -n 40 /tmp/rl.log >&2
true"#;

fn rootless(r: &mut Runner) -> Result<(), String> {
    let o = r.sh(ROOTLESS)?;
    let kv = key_values(&o.stdout);
    check(
        o.stdout.contains("ready: moat's own VMM on KVM")
            && kv.get("code").map(String::as_str) == Some("5")
            && kv.get("out").map(String::as_str) == Some("rootless on moat-vmm,0,")
            && kv.get("acpi").map(String::as_str) == Some("moat")
            && kv.get("left").map(String::as_str) == Some("0"),
        || format!("a rootless run on moat's own VMM: {o}"),
    )
}

/// A busybox bundle at [`BUNDLE`] whose process waits to be killed.
const BUNDLE: &str = "/tmp/moat-builtin-bundle";

fn bundle_config() -> serde_json::Value {
    serde_json::json!({
        "ociVersion": "1.2.0",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": ["sh", "-c", "echo started; exec sleep 1000"],
            "env": ["PATH=/bin"],
            "cwd": "/",
            "noNewPrivileges": true
        },
        "root": {"path": format!("{BUNDLE}/rootfs"), "readonly": false},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]
        },
        "annotations": {"dev.moat.isolation": "microvm"}
    })
}

/// Who the VMM process (`@PID@`) and its one child (the VM) are, and how
/// many seccomp filters each thread of the child has.
const WHO: &str = r#"P=@PID@
s() { grep "^$2:" /proc/$1/status | tr -s ' \t' ' ' | cut -d' ' -f2-; }
echo "vmm_uid=$(s $P Uid)"
echo "vmm_caps=$(s $P CapEff)"
echo "vmm_nnp=$(s $P NoNewPrivs)"
echo "vmm_filters=$(s $P Seccomp_filters)"
set -- $(cat /proc/$P/task/$P/children)
C=$1
echo "children=$*"
echo "vm_comm=$(cat /proc/$C/comm)"
echo "vm_filters=$(for t in /proc/$C/task/*; do s ${t#/proc/} Seccomp_filters; done | sort -n | tr '\n' ' ')"
echo "vmm_rss_kb=$(s $P VmRSS | cut -d' ' -f1)"
echo "vmm_pss_kb=$(grep '^Pss:' /proc/$P/smaps_rollup | tr -s ' ' | cut -d' ' -f2)"
awk '/^[0-9a-f]+-[0-9a-f]+ / { big = 0 } /^Size:/ { big = ($2 >= 131072) } /^Rss:/ { if (big) g += $2; else o += $2 } /^Pss:/ { if (!big) p += $2 } /^Anonymous:/ { if (!big) a += $2 } END { print "vm_rss_guest_kb=" g; print "vm_rss_rest_kb=" o; print "vm_pss_rest_kb=" p; print "vm_anon_rest_kb=" a }' /proc/$C/smaps
"#;

/// `key=value` lines.
fn key_values(s: &str) -> std::collections::BTreeMap<String, String> {
    s.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// The OCI CLI on moat's own VMM: `create` (the container's process is the
/// jailed VMM process, with the VM in a child of its own under a narrower
/// filter), `start`, `state`, `exec` through the agent, `kill`, `delete`.
fn oci_lifecycle(r: &mut Runner) -> Result<(), String> {
    let config = serde_json::to_string(&bundle_config()).unwrap();
    let setup = format!(
        r#"set -e
rm -rf {BUNDLE}
mkdir -p {BUNDLE}/rootfs/bin {BUNDLE}/rootfs/proc {BUNDLE}/rootfs/tmp
cp /bin/busybox {BUNDLE}/rootfs/bin/busybox
/bin/busybox --install -s {BUNDLE}/rootfs/bin
cat > {BUNDLE}/config.json <<'EOF'
{config}
EOF
"#
    );
    let o = r.sh(&setup)?;
    check(o.code == 0, || format!("the bundle: {o}"))?;
    let created = r.sh(&format!(
        "moat --debug --log /tmp/vm1.log create --bundle {BUNDLE} vm1 </dev/null >/tmp/vm1.out 2>&1 || {{ cat /tmp/vm1.out; exit 1; }}\nmoat state vm1\ngrep -h 'microvm: \\(restored\\|cold\\)' /tmp/vm1.log | sed 's/.*msg=/start: /' >&2"
    ))?;
    let state: serde_json::Value = serde_json::from_str(&created.stdout)
        .map_err(|e| format!("create/state: {e}: {created}"))?;
    check(state["status"] == "created", || {
        format!("after create: {created}")
    })?;
    let pid = state["pid"].as_i64().unwrap_or(0);
    // The VMM process (the container's) and its child running the VM: who
    // they are, and how many filters each thread has.
    let who = r.sh(&WHO.replace("@PID@", &pid.to_string()))?;
    let kv = key_values(&who.stdout);
    let get = |k: &str| kv.get(k).cloned().unwrap_or_default();
    // Memory, reported (not asserted): the relay's, and the VM's child
    // apart from guest RAM (mappings of 128 MiB and more) and within it;
    // RSS counts the pages the two share since the fork in both, PSS
    // splits them.
    eprintln!(
        "{TEST}: memory: VMM process RSS {} KiB (PSS {}); VM child besides guest RAM RSS {} KiB (PSS {}; anonymous {}, the rest file pages: code); guest RAM touched {} KiB",
        get("vmm_rss_kb"),
        get("vmm_pss_kb"),
        get("vm_rss_rest_kb"),
        get("vm_pss_rest_kb"),
        get("vm_anon_rest_kb"),
        get("vm_rss_guest_kb")
    );
    for l in created.stderr.lines().filter(|l| l.starts_with("start: ")) {
        eprintln!("{TEST}: memory: that VM's {l}");
    }
    let vmm_uid = get("vmm_uid");
    let ids: Vec<&str> = vmm_uid.split_whitespace().collect();
    check(ids.len() == 4 && ids.iter().all(|u| *u != "0"), || {
        format!("the VMM process runs as {vmm_uid:?}: {who}")
    })?;
    check(
        get("vmm_caps") == "0000000000000000" && get("vmm_nnp") == "1",
        || format!("the VMM process keeps privileges: {who}"),
    )?;
    let vmm_filters: u32 = get("vmm_filters").parse().unwrap_or(0);
    let vm_filters: Vec<u32> = get("vm_filters")
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    // One child (the VM, no QEMU: moat's VMM executes nothing), every
    // thread of it under the VMM process's filter, the child's narrower
    // one and its role's.
    check(
        get("children").split_whitespace().count() == 1
            && get("vm_comm") != "qemu-system-x86"
            && vmm_filters >= 1
            && vm_filters.len() >= 3
            && vm_filters.iter().all(|n| *n >= vmm_filters + 2),
        || format!("the VM's child and its filters: {who}"),
    )?;
    let o = r.sh("moat start vm1 && moat state vm1")?;
    check(o.code == 0 && o.stdout.contains("\"running\""), || {
        format!("start: {o}")
    })?;
    let exec = r.sh("moat exec vm1 sh -c 'echo exec ran; exit 3'")?;
    check(exec.code == 3 && exec.stdout.trim() == "exec ran", || {
        format!("exec through the agent: {exec}")
    })?;
    // Its root is writable and its own: the writes go to a disk of the
    // container's (a sparse 32 GiB file kept beside the cache while the
    // bundle's rootfs is there; create's log names it), which moat's VMM
    // writes; not to guest memory.
    let wrote = r.sh(
        "L=$(grep -o 'writable layer kept at [^ ]*' /tmp/vm1.log | cut -d' ' -f5); echo \"$L\" > /tmp/vm1.layer; moat exec vm1 sh -c 'yes abcdefg | head -c 8388608 > /big; sync; df -k / | tail -1' && du -k \"$L\"",
    )?;
    let field = |line: Option<&str>, i: usize| -> u64 {
        line.and_then(|l| l.split_whitespace().nth(i))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let mut lines = wrote.stdout.lines();
    let (df_kib, du_kib) = (field(lines.next(), 1), field(lines.next(), 0));
    check(
        wrote.code == 0 && df_kib > 30 << 20 && du_kib >= 8 << 10,
        || format!("the writable layer on its disk: {wrote}"),
    )?;
    // What the guest frees, moat's VMM punches out of the file (discard:
    // the guest's ext4 issues it after the journal's commit, from a worker
    // of its own, so after `sync` returns: polled, at most 60 s).
    let freed = r.sh(&format!(
        r#"L=$(cat /tmp/vm1.layer); moat exec vm1 sh -c 'rm /big && sync' || exit 1
i=0
while [ $i -lt 600 ] && [ $(du -k "$L" | cut -f1) -gt {} ]; do i=$((i+1)); sleep 0.1; done
du -k "$L""#,
        du_kib.saturating_sub(6 << 10)
    ))?;
    let left_kib = field(freed.stdout.lines().next(), 0);
    check(freed.code == 0 && left_kib + (6 << 10) <= du_kib, || {
        format!("the writable layer after rm ({du_kib} KiB before): {freed}")
    })?;
    let killed = r.sh(r#"moat kill vm1 KILL
i=0
while [ $i -lt 600 ] && ! moat state vm1 | grep -q '"stopped"'; do i=$((i+1)); sleep 0.1; done
moat state vm1 | grep -q '"stopped"' && moat delete vm1 && cat /tmp/vm1.out"#)?;
    check(
        killed.code == 0 && killed.stdout.contains("started"),
        || format!("kill, delete, the process's output: {killed}"),
    )
}

/// Whether a session failed because the nested virtualisation under it
/// did (see the test): the outer guest's kernel panicked, or it answered
/// nothing for a whole command limit while its own watchdog printed
/// nothing about that command either (`since`: the serial log since it
/// was sent; an earlier long command's "still running" is no sign of
/// life); or a microVM's cold boot never reached its agent (the inner
/// kernel stopped early in its boot, on the emulated SVM); or a request
/// ran past its whole limit (the watchdog saw it still running, then it
/// was killed: `Killed`, 137) — once, in a fourth full run of a day whose
/// three others passed, a `-t` run's inner guest spun (its VMM's vCPU
/// thread running, the relay waiting) for the whole 200 s after a normal
/// boot: the emulated SVM's, as the other cases. Or a running microVM
/// ended under its workload (`cannot reach the guest: the VM ended`):
/// once, 2026-12-07 00:55 UTC, in a restored run taking over the nested
/// pod's interface, in a full run whose three before passed on code that
/// differed by a behaviour-neutral review. A moat bug that ends the VM
/// would end it in every session, and fail the third.
fn nested_virtualisation_failed(error: &str, serial: &str, since: &str) -> bool {
    serial.contains("Kernel panic - not syncing")
        || (error.starts_with("reading the guest's console") && !since.contains("still running"))
        || error.contains("the guest did not answer within")
        || (since.contains("still running") && error.contains("exit 137"))
        || error.contains("cannot reach the guest: the VM ended")
}

#[test]
fn moat_run_boots_the_workload_on_moats_own_vmm() {
    let moat = Path::new(env!("CARGO_BIN_EXE_moat"));
    if common::nested::hardware_virt() {
        let dir = moat.parent().unwrap().to_path_buf();
        if let Err(e) = cases(&mut Runner::Host(dir)) {
            panic!("{TEST}: {e}");
        }
        return;
    }
    // Without vmx/svm the cases can run only nested, on QEMU's emulated
    // SVM: 10 min a session at best, and that scaffolding fails in one
    // session in three on a loaded machine (see below), which no retry
    // fits into CI's 45 minutes (2026-12-07: a session's inner guest
    // locked up, and so did the next). So there the test is missing
    // hardware, as the issue asks, unless asked for by name.
    if std::env::var_os(NESTED_ENV).is_none_or(|v| v != "1") {
        moat_core::testing::skip_hardware(
            TEST,
            &format!(
                "no vmx or svm in /proc/cpuinfo ({NESTED_ENV}=1 runs it nested in a QEMU/TCG guest with an emulated SVM, 10-30 min: docs/testing.md)"
            ),
        );
        return;
    }
    let needs = match Needs::find() {
        Ok(n) => n,
        Err(why) => {
            moat_core::testing::skip(TEST, &why);
            return;
        }
    };
    eprintln!("{TEST}: no vmx or svm here: running it in a QEMU/TCG guest with an emulated SVM");
    let files = guest_files(&needs.release, &needs.kernel);
    let files: Vec<(&str, u32, Vec<u8>)> = files
        .into_iter()
        .map(|(p, m, d)| (&*p.leak(), m, d))
        .collect();
    // The outer guest (the cloud kernel with kvm_amd on QEMU's emulated
    // SVM: the test's scaffolding, not what it tests) failed about once in
    // fifteen sessions here: its kernel panicked in its entry code ("Fatal
    // exception in interrupt"), or it stopped altogether (no answer for the
    // command limit, and not one line from its own 30-s watchdog, which
    // reports a request still running whenever the guest itself runs).
    // Once in eight sessions on the afternoon of 2026-12-05 (and in none
    // of the ~20 before) a microVM's cold boot inside it stopped after its
    // first second of guest time, quiet, one vCPU: the agent never said
    // hello (cause not found; QEMU's emulated SVM is the suspect here too).
    // On the evening of 2026-12-05 the outer guest stopped answering in
    // about one session in three (each time in a different case, once
    // twice in a row). A session that failed so is run again, its console
    // printed, up to three sessions in all; any other failure fails the
    // test. (On a host with vmx/svm, above, nothing is retried.)
    let mut attempt = 1;
    let g = loop {
        // 3 GiB: the initramfs unpacked, the guest's disk images (in
        // memory there), and the microVM's RAM.
        let g = Guest::boot_sized(&needs, moat, &files, SESSION_LIMIT, 3072)
            .unwrap_or_else(|e| panic!("{TEST}: the guest did not boot: {e}"));
        let mut r = Runner::Guest(g);
        let result = r
            .sh(&kvm_setup(&needs.release))
            .and_then(|o| check(o.code == 0, || format!("KVM in the guest: {o}")))
            .and_then(|()| kvm_access(&mut r))
            .and_then(|()| cases(&mut r));
        let Runner::Guest(g) = r else { unreachable!() };
        match result {
            Ok(()) => break g,
            Err(e)
                if attempt < 3
                    && nested_virtualisation_failed(
                        &e,
                        &g.serial_log(),
                        &g.serial_since_last_command(),
                    ) =>
            {
                eprintln!(
                    "{TEST}: the nested virtualisation failed ({e}); once more\n--- the outer guest's console ---\n{}",
                    g.serial_log()
                );
                attempt += 1;
            }
            Err(e) => panic!(
                "{TEST}: {e}\n--- guest serial console ---\n{}",
                g.serial_log()
            ),
        }
    };
    g.power_off().unwrap();
}
