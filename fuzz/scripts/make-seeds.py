#!/usr/bin/env python3
"""Writes fuzz/seeds/: small valid (and a few nearly valid) inputs for each
target, so the mutators start from the formats' real shapes. Run from the
repository root; the output is committed. Files already there (taken from
moat's own outputs and test fixtures) are kept."""
import gzip, io, json, os, shutil, struct, tarfile, hashlib

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
S = os.path.join(ROOT, "seeds")
FIX = os.path.join(ROOT, "..", "crates", "moat", "tests", "fixtures", "audit")


def put(target, name, data):
    d = os.path.join(S, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# --- config.json ------------------------------------------------------------
base = {
    "ociVersion": "1.0.2",
    "process": {
        "terminal": False, "user": {"uid": 1000, "gid": 1000, "additionalGids": [5]},
        "args": ["sh", "-c", "echo hi"], "env": ["PATH=/bin", "TERM=xterm"], "cwd": "/",
        "capabilities": {"bounding": ["CAP_CHOWN"], "effective": ["CAP_CHOWN"], "permitted": ["CAP_CHOWN"]},
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
        "noNewPrivileges": True, "oomScoreAdj": 100,
    },
    "root": {"path": "/", "readonly": True},
    "hostname": "fuzz",
    "mounts": [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "size=65536k", "mode=1777"]},
        {"destination": "/data", "type": "bind", "source": "/var/empty", "options": ["rbind", "ro", "idmap"]},
    ],
    "hooks": {"prestart": [{"path": "/bin/true", "args": ["true"], "timeout": 5}]},
    "annotations": {
        "dev.moat.isolation": "sandbox",
        "dev.moat.landlock": "{\"read\":[\"/\"],\"write\":[\"/tmp\"],\"execute\":[\"/usr\"]}",
    },
    "linux": {
        "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "ipc"}, {"type": "uts"},
                       {"type": "user"}, {"type": "network", "path": "/proc/1/ns/net"}, {"type": "cgroup"}],
        "uidMappings": [{"containerID": 0, "hostID": 100000, "size": 65536}],
        "gidMappings": [{"containerID": 0, "hostID": 100000, "size": 65536}],
        "resources": {
            "memory": {"limit": 67108864, "swap": 67108864, "reservation": 1048576},
            "cpu": {"quota": 50000, "period": 100000, "shares": 512, "cpus": "0-1", "mems": "0"},
            "pids": {"limit": 64},
            "blockIO": {"weight": 100, "throttleReadBpsDevice": [{"major": 8, "minor": 0, "rate": 1048576}]},
            "hugepageLimits": [{"pageSize": "2MB", "limit": 0}],
            "devices": [{"allow": False, "access": "rwm"}, {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rw"}],
            "unified": {"memory.high": "50000000"},
        },
        "cgroupsPath": "/fuzz/c1",
        "sysctl": {"net.ipv4.ip_forward": "0"},
        "seccomp": {"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 38, "architectures": ["SCMP_ARCH_X86_64"],
                    "syscalls": [{"names": ["read", "write", "exit_group"], "action": "SCMP_ACT_ALLOW"}]},
        "maskedPaths": ["/proc/kcore"], "readonlyPaths": ["/proc/sys"],
        "devices": [{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229, "fileMode": 438}],
        "timeOffsets": {"monotonic": {"secs": 10, "nanosecs": 0}},
        "personality": {"domain": "LINUX"},
        "rootfsPropagation": "private",
    },
}
put("config", "full.json", json.dumps(base, indent=1))
m = json.loads(json.dumps(base))
m["process"]["terminal"] = True
m["process"]["consoleSize"] = {"height": 24, "width": 80}
m["annotations"] = {"dev.moat.isolation": "microvm", "dev.moat.landlock": "auto"}
put("config", "microvm.json", json.dumps(m))
put("config", "minimal.json", json.dumps({"ociVersion": "1.0.0", "root": {"path": "/"}, "process": {"args": ["true"], "cwd": "/"}}))
put("config", "unknown-keys.json", json.dumps({"ociVersion": "1.0.0", "root": {"path": "/"}, "procss": {}, "linux": {"resourcez": 1}}))
put("config", "bad-mapping.json", json.dumps({"ociVersion": "1.0.0", "root": {"path": "/"}, "process": {"args": ["x"], "cwd": "/"},
                                              "linux": {"uidMappings": [{"containerID": 4294967295, "hostID": 1, "size": 4294967295}]}}))

# --- setup channel (moat-jail sync) ------------------------------------------
def err(msg, errno=None, cause=None, exec_status=None):
    return {"message": msg, "errno": errno, "exec_status": exec_status, "cause": cause}

put("setup_channel", "simple", b"G\xff\xfeM\xff\xfeH\xff\xfeC\xff\xfeR\xff\xfeS\xff\xfeFs\xff\xfeFt")
put("setup_channel", "pid", b"P" + struct.pack("<i", 4242) + b"\xff\xfeP\x01\x02")
chain = err("cannot set up the container", cause=err("cannot mount /proc", 1, err("permission denied", 13)))
put("setup_channel", "error-chain", b"E" + json.dumps(chain).encode())
put("setup_channel", "exec-error", b"E" + json.dumps(err("cannot execute /bin/x", 2, None, 127)).encode())

# --- microVM agent protocol --------------------------------------------------
def frame(kind, chan, payload):
    if not isinstance(payload, bytes):
        payload = json.dumps(payload).encode()
    return struct.pack("<IBI", len(payload), kind, chan) + payload

hello = frame(1, 0, {"version": 1, "kernel": "6.1.0-fuzz"})
started = frame(8, 0, {})
out = frame(4, 0, b"hello\n") + frame(5, 1, b"oops\n")
exitf = frame(9, 0, {"code": 137, "oom_kills": 1, "pids_limit_hits": 0})
errf = frame(10, 2, {"message": "cannot run", "exec_status": 127})
put("agent_proto", "session", b"\x07" + hello + started + out + exitf)
put("agent_proto", "error", b"\x01" + hello + errf)
run = frame(2, 0, {"config": {"ociVersion": "1.0.2", "process": {"args": ["sh"]}}, "disks": [{"uuid": "0" * 32, "mount": "/mnt/d0"}],
                   "files": [{"path": "/etc/hosts", "data": [49, 50], "mode": 420}], "overlay_root": None, "rows": 24, "cols": 80})
host = run + frame(3, 0, b"input") + frame(3, 0, b"") + frame(6, 0, {"signal": 15}) + frame(7, 0, {"rows": 50, "cols": 132}) + \
    frame(11, 1, {"process": {"args": ["id"], "cwd": "/"}, "rows": 0, "cols": 0}) + frame(12, 0, b"")
put("agent_proto", "host-side", b"\x40" + host)

# --- moat audit --------------------------------------------------------------
for f in ["risky-pod.yaml", "hardened-pod.yaml", "runc-spec.json", "hardened-spec.json"]:
    shutil.copy(os.path.join(FIX, f), os.path.join(S, "audit", f))
# docker inspect, trimmed to one container's essentials (the fixture is large)
with open(os.path.join(FIX, "docker-inspect.json")) as f:
    di = json.load(f)
put("audit", "docker-inspect.json", json.dumps(di[:1] if isinstance(di, list) else di))
put("audit", "multi.yaml", """apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  template:
    spec:
      hostPID: true
      containers:
      - name: a
        image: nginx:latest
        securityContext: {privileged: true, capabilities: {add: [SYS_ADMIN]}}
        volumeMounts: [{name: d, mountPath: /host}]
      volumes: [{name: d, hostPath: {path: /var/run/docker.sock}}]
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: job}
spec:
  jobTemplate:
    spec:
      template:
        spec:
          initContainers: [{name: i, image: "busybox@sha256:0000000000000000000000000000000000000000000000000000000000000000"}]
          containers: [{name: c, image: busybox, resources: {limits: {memory: 64Mi, cpu: 500m}}}]
""")
put("audit", "anchors.yaml", "a: &x [1, 2]\nb: *x\napiVersion: v1\nkind: Pod\nspec: {containers: [{name: x, image: y}]}\n")

# --- seccomp ---------------------------------------------------------------------
sc = {
    "defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 1,
    "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
    "flags": ["SECCOMP_FILTER_FLAG_SPEC_ALLOW", "SECCOMP_FILTER_FLAG_LOG"],
    "syscalls": [
        {"names": ["read", "write", "openat", "close", "exit_group", "futex", "not_a_syscall"], "action": "SCMP_ACT_ALLOW"},
        {"names": ["personality"], "action": "SCMP_ACT_ALLOW", "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"}]},
        {"names": ["clone"], "action": "SCMP_ACT_ALLOW", "args": [{"index": 0, "value": 2114060288, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]},
        {"names": ["socket"], "action": "SCMP_ACT_ERRNO", "errnoRet": 97, "args": [{"index": 0, "value": 40, "op": "SCMP_CMP_GE"}]},
        {"names": ["ptrace"], "action": "SCMP_ACT_KILL_PROCESS"},
        {"names": ["kill"], "action": "SCMP_ACT_TRAP"},
        {"names": ["uname"], "action": "SCMP_ACT_LOG"},
        {"names": ["mkdir"], "action": "SCMP_ACT_TRACE", "errnoRet": 5},
    ],
}
put("seccomp", "profile.json", json.dumps(sc))
put("seccomp", "notify.json", json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/run/x.sock",
                                          "syscalls": [{"names": ["mount", "openat"], "action": "SCMP_ACT_NOTIFY"}]}))
put("seccomp", "allow.json", json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
    {"names": ["keyctl"], "action": "SCMP_ACT_ERRNO", "args": [{"index": 5, "value": 18446744073709551615, "op": "SCMP_CMP_NE"},
                                                               {"index": 1, "value": 1, "op": "SCMP_CMP_LT"}]}]}))
put("seccomp", "kill-thread.json", json.dumps({"defaultAction": "SCMP_ACT_KILL_THREAD", "flags": ["SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV"],
                                               "syscalls": [{"names": ["exit"], "action": "SCMP_ACT_ALLOW"}]}))

# --- sandbox policies --------------------------------------------------------------
put("sandbox_policy", "learned.json", json.dumps({"version": 1, "paths": {
    "/": "hidden", "/usr": "rx", "/etc/passwd": "r", "/tmp": "rw", "/tmp/cache": "none", "/dev/null": "rw", "/proc/self": "r"},
    "socket_families": ["unix", "inet", "inet6"]}, indent=2))
put("sandbox_policy", "default", "default")
put("sandbox_policy", "bad.json", json.dumps({"version": 1, "paths": {"/a/../b": "rr", "/c/": "w"}, "socket_families": ["bluetooth"]}))

# --- sandbox supervisor: syscall arguments from the workload's memory ---------
# First byte: the decoder (0 string, 1 open_how, 2 timestamps, 3 sockaddr,
# 4 msghdr + iovec, 5 control messages, 6 directory records, 7 interpreter).
AF_UNIX, AF_INET, AF_INET6 = 1, 2, 10
def sa_in(ip4, port):
    return struct.pack("=H", AF_INET) + struct.pack("!H", port) + bytes(ip4) + b"\0" * 8
def sa_in6(ip6, port, scope=None):
    b = struct.pack("=H", AF_INET6) + struct.pack("!H", port) + struct.pack("=I", 0) + bytes(ip6)
    return b + (struct.pack("=I", scope) if scope is not None else b"")
def sa_un(name):
    return struct.pack("=H", AF_UNIX) + name
put("sandbox_args", "path", bytes([0]) + struct.pack("<H", 4090) + bytes([ord("a") & 0x3f]) + b"/usr/bin/env\0")
put("sandbox_args", "path-long", bytes([0]) + struct.pack("<H", 10) + bytes([0x41 | 0x40]) + b"/" + b"x" * 200)
put("sandbox_args", "open-how", bytes([1]) + struct.pack("=QQQ", 0o100 | 0o1 | 0o2000000, 0o644, 0))
put("sandbox_args", "open-how-v1", bytes([1]) + struct.pack("=QQQQ", 0o10000000, 0, 0, 0))
put("sandbox_args", "utimensat", bytes([2, 0]) + struct.pack("=qqqq", 1700000000, 5, 0, (1 << 30) - 1))
put("sandbox_args", "utime", bytes([2, 1]) + struct.pack("=qq", 1, 2))
put("sandbox_args", "utimes", bytes([2, 2]) + struct.pack("=qqqq", 1, 999999, 2, 0))
put("sandbox_args", "inet-connect", bytes([3, 0, 0]) + sa_in([10, 0, 0, 1], 80))
put("sandbox_args", "inet-unspec-send", bytes([3, 0, 2]) + struct.pack("=H", 0) + sa_in([8, 8, 8, 8], 53)[2:])
put("sandbox_args", "inet6-mapped", bytes([3, 1, 0]) + sa_in6([0] * 10 + [255, 255, 127, 0, 0, 1], 443, 0))
put("sandbox_args", "inet6-on-inet", bytes([3, 1, 2]) + sa_in([1, 1, 1, 1], 53))
put("sandbox_args", "unix-path", bytes([3, 2, 0]) + sa_un(b"/run/app.sock\0"))
put("sandbox_args", "unix-abstract", bytes([3, 2, 1]) + sa_un(b"\0@bus"))
put("sandbox_args", "unix-unnamed", bytes([3, 2, 1]) + sa_un(b""))
hdr = struct.pack("=QI4xQQQQi4x", 0x7000, 16, 0x8000, 2, 0x9000, 32, 0)
iov = struct.pack("=QqQq", 0x10000, 5, 0x20000, 4096)
put("sandbox_args", "msghdr-iovec", bytes([4]) + hdr + iov)
rights = struct.pack("=Qii", 16 + 12, 1, 1) + struct.pack("=iii", 3, 4, 5) + b"\0" * 4
creds = struct.pack("=Qii", 16 + 12, 1, 2) + struct.pack("=iII", 7, 0, 0) + b"\0" * 4
put("sandbox_args", "control-rights", bytes([5]) + creds + rights)
put("sandbox_args", "control-short-last", bytes([5]) + rights[:28])
def dirent(ino, name, kind):
    n = (19 + len(name) + 1 + 7) // 8 * 8
    return (struct.pack("=QqHB", ino, ino * 10, n, kind) + name).ljust(n, b"\0")
put("sandbox_args", "dents", bytes([6]) + dirent(1, b".", 4) + dirent(2, b"secret", 8) + dirent(3, b"passwd", 8))
put("sandbox_args", "shebang", bytes([7]) + b"#!/bin/sh -e\necho hi\n")
elf = bytearray(b"\x7fELF\x02\x01\x01" + b"\0" * 57)
struct.pack_into("<QHH", elf, 0x20, 64, 0, 0)
struct.pack_into("<H", elf, 0x36, 56)
struct.pack_into("<H", elf, 0x38, 1)
ph = struct.pack("<IIQQQQQQ", 3, 4, 120, 0, 0, 28, 28, 1)
put("sandbox_args", "elf-interp", bytes([7]) + bytes(elf) + ph + b"/lib64/ld-linux-x86-64.so.2\0")

# --- OCI layouts, image archives, layers ---------------------------------------
def tar_bytes(entries, fmt=tarfile.USTAR_FORMAT):
    b = io.BytesIO()
    with tarfile.open(fileobj=b, mode="w", format=fmt) as t:
        for e in entries:
            name, kind, data = e[0], e[1], e[2] if len(e) > 2 else b""
            ti = tarfile.TarInfo(name)
            ti.mtime = 0
            if kind == "dir":
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                t.addfile(ti)
            elif kind == "sym":
                ti.type, ti.linkname = tarfile.SYMTYPE, data
                t.addfile(ti)
            elif kind == "hard":
                ti.type, ti.linkname = tarfile.LNKTYPE, data
                t.addfile(ti)
            else:
                ti.size, ti.mode = len(data), 0o644
                t.addfile(ti, io.BytesIO(data))
    return b.getvalue()

layer = tar_bytes([("bin", "dir"), ("bin/sh", "file", b"#!fake\n"), ("etc", "dir"),
                   ("etc/passwd", "file", b"root:x:0:0::/:/bin/sh\n"), ("lib", "sym", "usr/lib"),
                   ("etc/.wh.old", "file"), ("etc/link", "hard", "etc/passwd")])
layer2 = tar_bytes([("etc", "dir"), ("etc/.wh..wh..opq", "file"), ("etc/hostname", "file", b"fuzz\n"),
                    ("evil", "sym", "../../../../etc/shadow"), ("evil/x", "file", b"no")])
put("tar_unpack", "layer.tar", b"\x00" + layer)
put("tar_unpack", "whiteouts.tar", b"\x01" + layer2)
put("tar_unpack", "layer.tar.gz", b"\x00" + gzip.compress(layer, mtime=0))
put("tar_unpack", "pax.tar", b"\x00" + tar_bytes([("a" * 120 + "/b", "file", b"long name"), ("x", "sym", "b" * 200)], tarfile.PAX_FORMAT))
put("tar_unpack", "gnu.tar", b"\x00" + tar_bytes([("c" * 150, "file", b"gnu long")], tarfile.GNU_FORMAT))

def sha(b):
    return hashlib.sha256(b).hexdigest()

def oci_layout_files(layers, ref="latest"):
    files = {"oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode()}
    descs = []
    diff_ids = []
    for l in layers:
        files["blobs/sha256/" + sha(l)] = l
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": "sha256:" + sha(l), "size": len(l)})
        diff_ids.append("sha256:" + sha(l))
    cfg = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Entrypoint": ["/bin/sh"], "Env": ["A=b"],
                      "User": "1000:1000", "WorkingDir": "/tmp"}, "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    files["blobs/sha256/" + sha(cfg)] = cfg
    man = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                      "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "sha256:" + sha(cfg), "size": len(cfg)},
                      "layers": descs}).encode()
    files["blobs/sha256/" + sha(man)] = man
    files["index.json"] = json.dumps({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": "sha256:" + sha(man), "size": len(man), "platform": {"architecture": "amd64", "os": "linux"},
        "annotations": {"org.opencontainers.image.ref.name": ref}}]}).encode()
    return files, cfg, man

# A second, benign layer for the images: a whiteout and a new file.
layer3 = tar_bytes([("etc", "dir"), ("etc/.wh.passwd", "file"), ("etc/hostname", "file", b"fuzz\n")])
files, cfg, man = oci_layout_files([layer, layer3])
put("oci_layout", "index.json", files["index.json"])
put("oci_layout", "manifest.json", man)
put("oci_layout", "config.json", cfg)
docker_manifest = json.dumps([{"Config": "cfg.json", "RepoTags": ["fuzz:latest"], "Layers": ["l1/layer.tar", "l2/layer.tar"]}]).encode()
put("oci_layout", "docker-manifest.json", docker_manifest)

def tar_of(files):
    dirs = set()
    ents = []
    for name in sorted(files):
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in dirs:
                dirs.add(d)
                ents.append((d, "dir"))
        ents.append((name, "file", files[name]))
    return tar_bytes(ents)

# image_archive: first byte % 3: 0 docker save, 1 rootfs tarball, 2 OCI layout tar (bit 2: with tag)
docker = {"manifest.json": docker_manifest, "cfg.json": cfg, "l1/layer.tar": layer, "l2/layer.tar": layer3}
put("image_archive", "docker-save.tar", b"\x00" + tar_of(docker))
# The hostile layer (a path through a symlink): refused.
put("image_archive", "docker-save-hostile.tar", b"\x00" + tar_of(dict(docker, **{"l2/layer.tar": layer2})))
put("image_archive", "rootfs.tar.gz", b"\x01" + gzip.compress(layer, mtime=0))
put("image_archive", "oci-layout.tar", b"\x02" + tar_of(files))
put("image_archive", "oci-layout-tag.tar", b"\x05" + tar_of(files))  # 5 % 3 == 2, bit 2: tag "latest"

# --- net frames: an ARP request, a DNS query over UDP, a TCP SYN (each after its u16 LE length)
def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return (~s) & 0xffff

mac_g, mac_h = bytes.fromhex("02000000000a"), bytes.fromhex("026d6f617402")  # workload, gateway (NetConfig::default)
src, dst = bytes([10, 0, 2, 100]), bytes([10, 0, 2, 2])
arp = b"\xff" * 6 + mac_g + b"\x08\x06" + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac_g + src + b"\0" * 6 + dst
def ip(proto, payload):
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0, 64, proto, 0, src, dst)
    h = h[:10] + struct.pack("!H", csum(h)) + h[12:]
    return h + payload
q = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + b"\x07example\x04test\x00" + struct.pack("!HH", 1, 1)
udp = struct.pack("!HHHH", 40000, 53, 8 + len(q), 0) + q
syn = struct.pack("!HHIIBBHHH", 40001, 80, 1, 0, 0x50, 0x02, 65535, 0, 0)
eth = lambda p: mac_h + mac_g + b"\x08\x00" + p
frames = [arp, eth(ip(17, udp)), eth(ip(6, syn))]
put("net_frames", "arp-dns-syn", b"".join(struct.pack("<H", len(f)) + f for f in frames))
put("net_frames", "dns-query", q)
put("net_frames", "egress-rule", b"10.0.0.0/8,::1/128,*.example.com:443,api.test")
put("net_frames", "publish", b"127.0.0.1:8080:80/tcp")

# --- virtio: device selector, op count, ops, guest memory image
ops = b"".join([bytes([0]) + struct.pack("<H", 0x50) + struct.pack("<I", 0)])
desc = struct.pack("<QIHH", 0x8000, 512, 2, 0)  # a write-only buffer
avail = struct.pack("<HHH", 0, 1, 0)
image = desc.ljust(0x100, b"\0") + avail.ljust(0x100, b"\0")
for which in (0, 1, 2):
    put("virtio_queue", "queue-%d" % which, bytes([which, 1]) + ops + image)
# The balloon (selector bit 4): a free page report of two pages on its
# reporting queue, 2 (rings at 0x1000 + 2 * 0x400).
ops = bytes([0]) + struct.pack("<H", 0x50) + struct.pack("<I", 2)
desc = struct.pack("<QIHH", 0x8000, 0x2000, 2, 0)
image = b"\0" * 0x800 + desc.ljust(0x100, b"\0") + avail.ljust(0x100, b"\0")
put("virtio_queue", "balloon-report", bytes([0x10, 1]) + ops + image)
print("seeds written under", S)
