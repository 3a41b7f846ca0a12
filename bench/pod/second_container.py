#!/usr/bin/env python3
"""A pod's second container under the microvm tier: joining the pod's VM
against a VM of its own, interleaved (docs/performance.md, *A pod in one
VM*). Root; QEMU and the cloud kernel as for the tier's tests; runc (for
`runc spec`) and busybox-static.

    python3 bench/pod/second_container.py [ROUNDS]

Times `create` + `start` until the container's first line is out, and
the host RSS of the container's process tree (the stand-in, or the VMM
process with QEMU). MOAT (default target/release/moat) and WORK (default
/tmp/moat-bench-pod) may be set in the environment; VOLUME=1 gives both
containers a read-write host directory at /data, which each writes (a
hostPath or persistent volume: joined through the pod VM's share, or a
VM of its own with a virtiofsd, as such a container had before)."""
import json, os, subprocess, time, shutil, statistics, sys
M = os.environ.get("MOAT", os.path.join(os.path.dirname(__file__), "../../target/release/moat"))
WORK = os.environ.get("WORK", "/tmp/moat-bench-pod")
ROOT = WORK + "/root"
def run(*a, **k):
    return subprocess.run([M,"--root",ROOT,*a], check=True, **k)
VOLUME = os.environ.get("VOLUME") == "1"
VOLDIR = WORK + "/volume"
def bundle(name, ann, args, ns=None, volume=False):
    d=f"{WORK}/{name}"
    if not os.path.exists(d):
        os.makedirs(d+"/rootfs/bin")
        shutil.copy("/bin/busybox", d+"/rootfs/bin/busybox")
        for c in ["sh","sleep","echo","cat"]:
            os.symlink("busybox", d+f"/rootfs/bin/{c}")
        subprocess.run(["runc","spec"],cwd=d,check=True)
    c=json.load(open(d+"/config.json"))
    c["process"]["terminal"]=False; c["process"]["args"]=args; c["annotations"]=ann
    if volume:
        os.makedirs(VOLDIR, exist_ok=True); os.chmod(VOLDIR, 0o777)
        c["mounts"].append({"destination":"/data","type":"bind","source":VOLDIR,"options":["rbind","rw"]})
    if ns:
        for n in c["linux"]["namespaces"]:
            if n["type"] in ns: n["path"]=ns[n["type"]]
    json.dump(c,open(d+"/config.json","w"))
    return d
pod="podb"
run("create","-b",bundle("pause",{"dev.moat.isolation":"microvm","io.kubernetes.cri.container-type":"sandbox","io.kubernetes.cri.sandbox-id":pod},["sleep","100000"]),pod)
run("start",pod)
pid=json.loads(subprocess.check_output([M,"--root",ROOT,"state",pod]))["pid"]
ns={"network":f"/proc/{pid}/ns/net","ipc":f"/proc/{pid}/ns/ipc","uts":f"/proc/{pid}/ns/uts"}
work = "echo $$ > /data/w; echo up; exec sleep 100000" if VOLUME else "echo up; exec sleep 100000"
jb=bundle("joiner",{"dev.moat.isolation":"microvm","io.kubernetes.cri.container-type":"container","io.kubernetes.cri.sandbox-id":pod},["sh","-c",work],ns,VOLUME)
ob=bundle("own",{"dev.moat.isolation":"microvm"},["sh","-c",work],None,VOLUME)
def rss(p):
    tot=0
    for line in open(f"/proc/{p}/status"):
        if line.startswith("VmRSS:"): tot+=int(line.split()[1])
    return tot
def tree_rss(p):
    tot=rss(p)
    for c in os.listdir("/proc"):
        if c.isdigit():
            try:
                st=open(f"/proc/{c}/stat").read().rsplit(")",1)[1].split()
                if int(st[1])==p: tot+=tree_rss(int(c))
            except Exception: pass
    return tot
res={"joined":[],"own":[]}; mem={"joined":[],"own":[]}
for i in range(int(sys.argv[1]) if len(sys.argv)>1 else 7):
    for kind,b in (("joined",jb),("own",ob)):
        cid=f"{kind}{i}"; out=f"{WORK}/{cid}.out"
        t0=time.monotonic()
        with open(out,"w") as f:
            run("create","-b",b,cid,stdout=f,stderr=subprocess.DEVNULL)
        run("start",cid)
        while "up" not in open(out).read():
            time.sleep(0.005)
        res[kind].append(time.monotonic()-t0)
        p=json.loads(subprocess.check_output([M,"--root",ROOT,"state",cid]))["pid"]
        mem[kind].append(tree_rss(p))
        run("delete","-f",cid)
run("delete","-f",pod)
for k in res:
    v=sorted(res[k]); print(k, "median %.3f s"%statistics.median(v), "min %.3f max %.3f"%(v[0],v[-1]), "host RSS median %d KiB"%statistics.median(mem[k]), [round(x,3) for x in res[k]])
print("ratio joined/own %.2f"%(statistics.median(res["joined"])/statistics.median(res["own"])))
