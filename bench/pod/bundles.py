"""The pause container's bundle the pod benches start: busybox's `sleep`
in a `runc spec` bundle (made once under `d`), its annotations `ann` and,
when given, the network namespace at `netns`."""
import json, os, shutil, subprocess


def pause_bundle(d, ann, netns=None):
    if not os.path.exists(d):
        os.makedirs(d + "/rootfs/bin")
        shutil.copy("/bin/busybox", d + "/rootfs/bin/busybox")
        os.symlink("busybox", d + "/rootfs/bin/sleep")
        subprocess.run(["runc", "spec"], cwd=d, check=True)
    c = json.load(open(d + "/config.json"))
    c["process"]["terminal"] = False
    c["process"]["args"] = ["sleep", "100000"]
    c["annotations"] = ann
    if netns:
        for n in c["linux"]["namespaces"]:
            if n["type"] == "network":
                n["path"] = netns
    json.dump(c, open(d + "/config.json", "w"))
    return d
