#!/usr/bin/env python3
"""A pod's start under the microvm tier (its pause container booting the
pod's VM): with the share its containers' read-write volumes join it
through (the default: a virtio-fs device, hot-added on QEMU after the
snapshot's restore) against a pod annotated `dev.moat.pod.volumes: none`
(no share), interleaved (docs/performance.md, *A pod in one VM*).
Root; QEMU and the cloud kernel as for the tier's tests; runc (for `runc
spec`) and busybox-static.

    python3 bench/pod/pod_start.py [ROUNDS]

Times `create` + `start` of the pause container, and reads the memory its
VMM's cgroup holds (the VMM process, QEMU, the guest's RAM it touched and
with the share the volume server and its virtiofsd). The first round of each kind
is a warm-up (it may save the snapshot) and is not counted. MOAT (default
target/release/moat) and WORK (default /tmp/moat-bench-podstart) may be
set in the environment."""
import json, os, subprocess, time, statistics, sys
from bundles import pause_bundle
M = os.environ.get("MOAT", os.path.join(os.path.dirname(__file__), "../../target/release/moat"))
WORK = os.environ.get("WORK", "/tmp/moat-bench-podstart")
ROOT = WORK + "/root"


def run(*a, **k):
    return subprocess.run([M, "--root", ROOT, *a], check=True, **k)


def bundle(name, ann):
    return pause_bundle(f"{WORK}/{name}", ann)


def cgroup_memory(pid):
    """KiB the memory cgroup of `pid` holds (every page once: the guest's
    RAM, shared with virtiofsd, is not counted twice as RSS would)."""
    for line in open(f"/proc/{pid}/cgroup"):
        _, ctrl, path = line.rstrip("\n").split(":", 2)
        if "memory" in ctrl.split(","):
            return int(open(f"/sys/fs/cgroup/memory{path}/memory.usage_in_bytes").read()) // 1024
        if ctrl == "" and os.path.exists(f"/sys/fs/cgroup{path}/memory.current"):
            return int(open(f"/sys/fs/cgroup{path}/memory.current").read()) // 1024
    return 0


kinds = {"share": {}, "none": {"dev.moat.pod.volumes": "none"}}
res = {k: [] for k in kinds}
mem = {k: [] for k in kinds}
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 7
for i in range(rounds + 1):
    for kind, extra in kinds.items():
        pod = f"pod-{kind}-{i}"
        ann = {"dev.moat.isolation": "microvm",
               "io.kubernetes.cri.container-type": "sandbox",
               "io.kubernetes.cri.sandbox-id": pod, **extra}
        b = bundle(kind, ann)
        t0 = time.monotonic()
        run("create", "-b", b, pod, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        run("start", pod)
        t = time.monotonic() - t0
        pid = json.loads(subprocess.check_output([M, "--root", ROOT, "state", pod]))["pid"]
        if i > 0:
            res[kind].append(t)
            mem[kind].append(cgroup_memory(pid))
        run("delete", "-f", pod)
for k in res:
    v = sorted(res[k])
    print(k, "median %.3f s" % statistics.median(v), "min %.3f max %.3f" % (v[0], v[-1]),
          "cgroup memory median %d KiB" % statistics.median(mem[k]), [round(x, 3) for x in res[k]])
print("ratio share/none %.2f" % (statistics.median(res["share"]) / statistics.median(res["none"])))
