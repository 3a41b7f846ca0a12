#!/usr/bin/env python3
"""A Multus pod's start under the microvm tier: the pause container of a
pod whose network namespace has a second interface (`net1`, as Multus
adds) against one whose namespace has only `eth0`, both restored from the
snapshot (on QEMU the second interface's card is hot-added after the
restore), and the same two-interface pod with snapshots off
(`MOAT_MICROVM_SNAPSHOT=0`: a cold boot, as every such pod had before),
interleaved (docs/performance.md, *A pod in one VM*). Root; QEMU and the
cloud kernel as for the tier's tests; runc (for `runc spec`),
busybox-static and iproute2.

    python3 bench/pod/multus_start.py [ROUNDS]

Times `create` + `start` of the pause container (its VM takes over the
namespace's interfaces). The first round of each kind is a warm-up (it
may save the snapshot) and is not counted. MOAT (default
target/release/moat) and WORK (default /tmp/moat-bench-multus) may be set
in the environment."""
import os, subprocess, time, statistics, sys
from bundles import pause_bundle
M = os.environ.get("MOAT", os.path.join(os.path.dirname(__file__), "../../target/release/moat"))
WORK = os.environ.get("WORK", "/tmp/moat-bench-multus")
ROOT = WORK + "/root"


def sh(*a):
    subprocess.run(a, check=True)


def run(*a, env=None):
    # Not a pipe: the pod's VMM keeps create's stdio, so a pipe would not
    # close while it runs.
    return subprocess.run([M, "--root", ROOT, *a], check=True, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def netns(name, interfaces):
    """A namespace with `interfaces` veths (eth0, net1…), each up with an
    address, eth0 with the default route, their peers on the host."""
    subprocess.run(["ip", "netns", "del", name], stderr=subprocess.DEVNULL)
    sh("ip", "netns", "add", name)
    for k, dev in enumerate(["eth0", "net1", "net2"][:interfaces]):
        peer = f"{name}h{k}"
        subprocess.run(["ip", "link", "del", peer], stderr=subprocess.DEVNULL)
        sh("ip", "link", "add", dev, "netns", name, "type", "veth", "peer", "name", peer)
        net = f"10.{97 + k}.{len(name)}"
        sh("ip", "addr", "add", f"{net}.1/24", "dev", peer)
        sh("ip", "link", "set", peer, "up")
        sh("ip", "-n", name, "addr", "add", f"{net}.2/24", "dev", dev)
        sh("ip", "-n", name, "link", "set", dev, "up")
        if k == 0:
            sh("ip", "-n", name, "route", "add", "default", "via", f"{net}.1")
    sh("ip", "-n", name, "link", "set", "lo", "up")


def bundle(name):
    return pause_bundle(f"{WORK}/{name}", {
        "dev.moat.isolation": "microvm",
        "io.kubernetes.cri.container-type": "sandbox",
        "io.kubernetes.cri.sandbox-id": name}, f"/run/netns/{name}")


# name: (namespace, interfaces, environment)
kinds = {
    "one interface": ("mb1", 1, {}),
    "two interfaces (Multus)": ("mb2", 2, {}),
    "two interfaces, snapshots off": ("mb3", 2, {"MOAT_MICROVM_SNAPSHOT": "0"}),
}
os.makedirs(WORK, exist_ok=True)
for ns, n, _ in kinds.values():
    netns(ns, n)
res = {k: [] for k in kinds}
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 7
try:
    for i in range(rounds + 1):
        for kind, (ns, _, extra) in kinds.items():
            pod = f"{ns}-{i}"
            b = bundle(ns)
            env = dict(os.environ, **extra)
            t0 = time.monotonic()
            run("create", "-b", b, pod, env=env)
            run("start", pod, env=env)
            t = time.monotonic() - t0
            if i > 0:
                res[kind].append(t)
            run("delete", "-f", pod)
finally:
    for ns, n, _ in kinds.values():
        subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)
        for k in range(n):
            subprocess.run(["ip", "link", "del", f"{ns}h{k}"], stderr=subprocess.DEVNULL)
for k, v in res.items():
    s = sorted(v)
    print(f"{k}: median {statistics.median(s):.3f} s, min {s[0]:.3f}, max {s[-1]:.3f}",
          [round(x, 3) for x in v])
one = statistics.median(res["one interface"])
print("ratio two/one %.2f" % (statistics.median(res["two interfaces (Multus)"]) / one),
      "snapshots off/one %.2f" % (statistics.median(res["two interfaces, snapshots off"]) / one))
