//! The audit rules: each maps to PRODUCT.md's best practices, the CIS Docker
//! Benchmark section 5, the Kubernetes Pod Security Standards, kubesec and
//! Trivy's KSV checks, and says how to fix it per input kind.
use super::input::{Loc, Source, Workload, SENSITIVE};
use super::{Finding, Severity};

/// One rule's fixed text.
#[derive(Debug)]
pub struct Rule {
    pub id: &'static str,
    pub severity: Severity,
    pub title: &'static str,
    pub why: &'static str,
    pub references: &'static str,
    /// The fix for an OCI config.json, a Docker container, a Kubernetes manifest.
    pub fix: [&'static str; 3],
}

macro_rules! rule {
    ($id:literal, $sev:ident, $title:literal, $why:literal, $refs:literal, $oci:literal, $docker:literal, $k8s:literal) => {
        Rule {
            id: $id,
            severity: Severity::$sev,
            title: $title,
            why: $why,
            references: $refs,
            fix: [$oci, $docker, $k8s],
        }
    };
}

pub static RULES: &[Rule] = &[
    rule!("privileged", High, "Privileged container",
        "A privileged container has every capability, all host devices, no seccomp, AppArmor or masking: root in it is root on the host.",
        "CIS 5.5; PSS baseline; kubesec Privileged; Trivy KSV-0017",
        "do not grant all capabilities and devices", "drop --privileged (HostConfig.Privileged=false)", "set securityContext.privileged: false"),
    rule!("cap-sys-admin", High, "CAP_SYS_ADMIN granted",
        "CAP_SYS_ADMIN allows mount, namespace and bpf operations: most container escapes need exactly this.",
        "CIS 5.4; kubesec CapSysAdmin; Trivy KSV-0005",
        "remove CAP_SYS_ADMIN from process.capabilities (every set)", "remove SYS_ADMIN from --cap-add (HostConfig.CapAdd)", "remove SYS_ADMIN from securityContext.capabilities.add"),
    rule!("cap-dangerous", High, "Dangerous capability granted",
        "This capability reaches the host kernel or other processes (module loading, ptrace, raw I/O, file handles, network or clock administration).",
        "CIS 5.4; Trivy KSV-0022, KSV-0120; deepce dangerous capabilities",
        "remove it from process.capabilities (every set)", "remove it from --cap-add (HostConfig.CapAdd)", "remove it from securityContext.capabilities.add"),
    rule!("cap-net-raw", Medium, "CAP_NET_RAW available",
        "Raw sockets allow packet spoofing and ARP/DNS poisoning of neighbours; Docker grants it by default.",
        "Trivy KSV-0119; PSS restricted (drop ALL)",
        "remove CAP_NET_RAW from process.capabilities", "--cap-drop NET_RAW or --cap-drop ALL (HostConfig.CapDrop)", "add NET_RAW (or ALL) to securityContext.capabilities.drop"),
    rule!("cap-added", Medium, "Capability added beyond the defaults",
        "Each capability beyond Docker's 14 defaults (Kubernetes restricted: beyond NET_BIND_SERVICE) widens what a compromised process can do.",
        "CIS 5.4; PSS restricted; Trivy KSV-0022, KSV-0106",
        "remove it from process.capabilities", "remove it from --cap-add (HostConfig.CapAdd)", "remove it from securityContext.capabilities.add"),
    rule!("cap-drop-all", Low, "Capabilities not dropped",
        "moat's default is no capabilities: a workload should drop ALL and add back only what it needs.",
        "PRODUCT least privilege; PSS restricted; kubesec CapDropAll; Trivy KSV-0003",
        "empty process.capabilities sets (keep only what the workload needs)", "--cap-drop ALL (HostConfig.CapDrop: [\"ALL\"])", "set securityContext.capabilities.drop: [\"ALL\"]"),
    rule!("host-network", High, "Host network namespace shared",
        "Sharing the host's network namespace exposes every host interface, local service and abstract UNIX socket (CVE-2020-15257).",
        "CIS 5.10; PSS baseline; kubesec HostNetwork; Trivy KSV-0009",
        "add {\"type\": \"network\"} to linux.namespaces", "remove --network host (HostConfig.NetworkMode)", "set spec.hostNetwork: false"),
    rule!("host-pid", High, "Host PID namespace shared",
        "Sharing the host's PID namespace shows and, with ptrace or signals, reaches every host process.",
        "CIS 5.16; PSS baseline; kubesec HostPID; Trivy KSV-0010",
        "add {\"type\": \"pid\"} to linux.namespaces", "remove --pid host (HostConfig.PidMode)", "set spec.hostPID: false"),
    rule!("host-ipc", High, "Host IPC namespace shared",
        "Sharing the host's IPC namespace exposes host shared memory and semaphores.",
        "CIS 5.17; PSS baseline; kubesec HostIPC; Trivy KSV-0008",
        "add {\"type\": \"ipc\"} to linux.namespaces", "remove --ipc host (HostConfig.IpcMode)", "set spec.hostIPC: false"),
    rule!("host-uts", Medium, "Host UTS namespace shared",
        "Sharing the host's UTS namespace lets the container change the host's hostname.",
        "CIS 5.21",
        "add {\"type\": \"uts\"} to linux.namespaces", "remove --uts host (HostConfig.UTSMode)", "(not settable in Kubernetes)"),
    rule!("host-mount-ns", High, "Host mount namespace shared",
        "Without its own mount namespace the container shares the host's mounts: it sees every one, and with CAP_SYS_ADMIN changes them for the whole host. A runtime then cannot mount /proc, /dev, masks or a read-only root for it without changing the host's mounts: moat sets up none of them and only chroots into the rootfs, which CAP_SYS_CHROOT escapes.",
        "runtime-spec (an absent namespace is the runtime's); PRODUCT defaults",
        "add {\"type\": \"mount\"} to linux.namespaces", "(always separate in Docker)", "(always separate in Kubernetes)"),
    rule!("host-cgroup-ns", Low, "Host cgroup namespace shared",
        "Without a cgroup namespace the container sees the host's cgroup layout.",
        "CIS 5.25; runc spec adds a cgroup namespace on cgroup v2",
        "add {\"type\": \"cgroup\"} to linux.namespaces", "--cgroupns private (HostConfig.CgroupnsMode)", "(set by the runtime)"),
    rule!("unknown-property", Medium, "Unknown config.json property",
        "Runtimes ignore properties they do not know (the runtime-spec requires it), so a misspelt security setting (seccomp, readonly, noNewPrivileges, maskedPaths…) silently does nothing. moat warns when it creates such a container; this catches it before deploy.",
        "runtime-spec (unknown properties are ignored); moat docs/audit.md",
        "correct the property's name (as the runtime-spec spells it) or remove it", "(not applicable)", "(not applicable)"),
    rule!("no-userns", Medium, "No user namespace",
        "Without a user namespace, root in the container is root on the host; moat's default maps each container to its own unprivileged host range.",
        "PRODUCT dedicated user per container; CIS 5.31; kubesec HostUsers",
        "add {\"type\": \"user\"} to linux.namespaces with linux.uidMappings/gidMappings to an unprivileged range", "run dockerd with --userns-remap (HostConfig.UsernsMode must not be host)", "set spec.hostUsers: false"),
    rule!("run-as-root", Medium, "Runs as root",
        "A process running as uid 0 owns the container's files and is one kernel bug from host root when no user namespace maps it away.",
        "PRODUCT non-root user inside; PSS restricted runAsNonRoot; kubesec RunAsNonRoot; Trivy KSV-0012, KSV-0105",
        "set process.user.uid (and gid) to a non-zero id", "--user UID:GID (Config.User)", "set securityContext.runAsNonRoot: true and runAsUser > 10000"),
    rule!("low-uid", Low, "UID at or below 10000",
        "Low UIDs collide with host users when no user namespace is used.",
        "kubesec RunAsUser; Trivy KSV-0020",
        "use a uid above 10000", "use a uid above 10000 (Config.User)", "set securityContext.runAsUser above 10000"),
    rule!("seccomp-unconfined", High, "Seccomp disabled",
        "Without a seccomp filter every syscall reaches the kernel, including io_uring, bpf, keyctl, userfaultfd and the other usual exploit entry points.",
        "CIS 5.22; PSS baseline; kubesec SeccompUnconfined; Trivy KSV-0104",
        "set linux.seccomp to an allow-list profile (defaultAction SCMP_ACT_ERRNO)", "remove --security-opt seccomp=unconfined", "set securityContext.seccompProfile.type: RuntimeDefault"),
    rule!("landlock-missing", Low, "No Landlock ruleset",
        "Landlock confines which files the workload may open, write or execute, as a layer under mount flags and DAC: a writable path the mounts forgot stays closed. moat applies the policy of the dev.moat.landlock annotation; without it, none.",
        "PRODUCT least privilege (Landlock as an extra layer); moat docs/run.md",
        "add the annotation \"dev.moat.landlock\": \"auto\" (read/exec on the root, write only on writable mounts)", "not settable through Docker 20.10 (no --annotation): run with `moat run`", "not settable from a pod: use `moat run` or a moat bundle"),
    rule!("seccomp-missing", Medium, "No seccomp profile",
        "No seccomp profile is set, so no syscall filter applies (Kubernetes: Unconfined unless the kubelet defaults to RuntimeDefault).",
        "PRODUCT seccomp allow-list; PSS restricted; kubesec SeccompAny; Trivy KSV-0030",
        "set linux.seccomp to an allow-list profile (defaultAction SCMP_ACT_ERRNO)", "keep Docker's default profile (no seccomp=unconfined)", "set securityContext.seccompProfile.type: RuntimeDefault"),
    rule!("apparmor-unconfined", Medium, "AppArmor unconfined",
        "An unconfined AppArmor profile removes the mandatory access control layer that blocks writes to /proc, mounts and raw devices.",
        "CIS 5.2; PSS baseline; kubesec ApparmorUnconfined; Trivy KSV-0002",
        "set process.apparmorProfile to a confining profile", "remove --security-opt apparmor=unconfined", "set securityContext.appArmorProfile.type: RuntimeDefault"),
    rule!("selinux-custom", Medium, "SELinux disabled or custom",
        "A disabled or custom SELinux label (spc_t, unconfined_t, custom user or role) removes SELinux confinement.",
        "CIS 5.3; PSS baseline; Trivy KSV-0025",
        "use a container_t process.selinuxLabel", "remove --security-opt label=disable", "remove seLinuxOptions or use type container_t"),
    rule!("no-new-privileges", Medium, "Privilege escalation not blocked",
        "Without no_new_privs a setuid or file-capability binary can raise the process's privileges.",
        "PRODUCT no_new_privs; CIS 5.26; PSS restricted; kubesec AllowPrivilegeEscalation; Trivy KSV-0001",
        "set process.noNewPrivileges: true", "--security-opt no-new-privileges (HostConfig.SecurityOpt)", "set securityContext.allowPrivilegeEscalation: false"),
    rule!("writable-rootfs", Medium, "Root filesystem writable",
        "A writable root filesystem lets an intruder replace binaries and persist; moat mounts root read-only by default.",
        "PRODUCT read-only root; CIS 5.13; kubesec ReadOnlyRootFilesystem; Trivy KSV-0014",
        "set root.readonly: true", "--read-only (HostConfig.ReadonlyRootfs)", "set securityContext.readOnlyRootFilesystem: true"),
    rule!("no-memory-limit", Medium, "No memory limit",
        "Without a memory limit one container can exhaust the host's memory.",
        "PRODUCT resource limits; CIS 5.11; kubesec LimitsMemory; Trivy KSV-0018",
        "set linux.resources.memory.limit", "--memory (HostConfig.Memory)", "set resources.limits.memory"),
    rule!("no-cpu-limit", Low, "No CPU limit",
        "Without a CPU quota or weight one container can starve the others.",
        "PRODUCT resource limits; CIS 5.12; kubesec LimitsCPU; Trivy KSV-0011",
        "set linux.resources.cpu.quota/period (or shares)", "--cpus (HostConfig.NanoCpus) or --cpu-shares", "set resources.limits.cpu"),
    rule!("no-pids-limit", Medium, "No PIDs limit",
        "Without a pids limit a fork bomb in the container exhausts the host's process table.",
        "PRODUCT resource limits; CIS 5.29",
        "set linux.resources.pids.limit", "--pids-limit (HostConfig.PidsLimit)", "(set podPidsLimit in the kubelet configuration)"),
    rule!("runtime-socket", High, "Container runtime socket mounted",
        "Whoever reaches the runtime's socket can start a privileged container: full host control.",
        "CIS 5.32; kubesec DockerSock; Trivy KSV-0006",
        "remove the bind mount of the runtime socket from mounts", "remove the -v of the socket (Mounts)", "remove the hostPath volume of the socket"),
    rule!("sensitive-mount", High, "Sensitive host directory mounted",
        "Mounting a host system directory (/, /etc, /proc, /sys, /dev, /boot, /usr, /lib, /var/lib/docker…) gives the container the host's configuration, kernel interfaces or other containers' data.",
        "CIS 5.6; kubesec ProcMount; PSS baseline hostPath; Trivy KSV-0023, KSV-0121",
        "remove the bind mount from mounts", "remove the -v/--mount of the host directory (Mounts)", "remove the hostPath volume"),
    rule!("host-path", Medium, "Host path mounted",
        "Any host path mounted into the container is shared state outside its isolation; prefer volumes.",
        "PSS baseline hostPath; Trivy KSV-0023",
        "replace the bind mount with a volume, or mount it read-only", "use a named volume instead of a bind mount (Mounts)", "replace the hostPath volume with emptyDir, a PVC or a projected volume"),
    rule!("mount-propagation-shared", Medium, "Shared mount propagation",
        "Shared propagation lets mounts made in the container appear on the host.",
        "CIS 5.20",
        "use private or slave propagation (mount options, linux.rootfsPropagation)", "remove :shared/:rshared from the volume (Mounts[].Propagation)", "remove mountPropagation: Bidirectional"),
    rule!("host-device", Medium, "Host device exposed",
        "A host device node in the container gives direct access to hardware or kernel interfaces.",
        "CIS 5.18",
        "remove the device from linux.devices", "remove --device (HostConfig.Devices)", "(avoid hostPath mounts of /dev)"),
    rule!("devices-allow-all", High, "Device cgroup allows every device",
        "A device cgroup rule that allows all devices lets the container open host disks and memory through mknod.",
        "runc/Docker default device rules; CIS 5.18",
        "remove the allow-all entry from linux.resources.devices (keep deny-all first)", "remove the 'a *:* rwm' --device-cgroup-rule", "(not settable in Kubernetes)"),
    rule!("unmasked-proc", High, "Kernel paths not masked or /proc/sys writable",
        "Unmasked /proc and writable /proc/sys expose kernel interfaces such as core_pattern that lead to host code execution.",
        "PRODUCT masked paths; PSS baseline procMount; Trivy KSV-0027",
        "keep runc's linux.maskedPaths and linux.readonlyPaths (include /proc/kcore and /proc/sys)", "remove --security-opt systempaths=unconfined", "remove securityContext.procMount: Unmasked"),
    rule!("host-port", Medium, "Host port bound on all interfaces",
        "A host port bound to every interface exposes the container beyond the intended network.",
        "CIS 5.14; PSS baseline hostPorts; Trivy KSV-0024",
        "(no ports in OCI)", "bind to one address: -p IP:HOSTPORT:PORT (HostConfig.PortBindings[].HostIp)", "remove hostPort (use a Service)"),
    rule!("privileged-port", Low, "Privileged host port",
        "Mapping a host port below 1024 claims a privileged port on the host.",
        "CIS 5.8; Trivy KSV-0117",
        "(no ports in OCI)", "map a host port of 1024 or more", "use a hostPort of 1024 or more, or none"),
    rule!("unsafe-sysctl", Medium, "Unsafe sysctl",
        "Sysctls outside the namespaced safe set change the kernel for every container on the node.",
        "PSS baseline; Trivy KSV-0026",
        "remove it from linux.sysctl", "remove --sysctl (HostConfig.Sysctls)", "remove it from spec.securityContext.sysctls"),
    rule!("sa-token", Low, "Service account token mounted",
        "An automatically mounted service account token gives the workload API server credentials it rarely needs.",
        "kubesec AutomountServiceAccountToken; Trivy KSV-0036",
        "(not applicable)", "(not applicable)", "set spec.automountServiceAccountToken: false"),
    rule!("image-latest", Low, "Image not pinned",
        "An image without a version tag or digest changes under you.",
        "CIS 5.28; Trivy KSV-0013",
        "(not applicable)", "use IMAGE:VERSION or IMAGE@sha256:DIGEST (Config.Image)", "use image: NAME:VERSION or NAME@sha256:DIGEST"),
    rule!("restart-policy", Low, "Restart policy unbounded",
        "Restarting forever hides crash loops and repeated exploitation attempts; CIS asks for on-failure:5.",
        "CIS 5.15",
        "(not applicable)", "--restart on-failure:5 (HostConfig.RestartPolicy)", "(not applicable)"),
    rule!("no-healthcheck", Low, "No health check",
        "Without a health check a hung or hijacked container keeps running unnoticed.",
        "CIS 5.27",
        "(not applicable)", "--health-cmd ... (Config.Healthcheck)", "(use livenessProbe)"),
    rule!("host-process", High, "Windows HostProcess container",
        "A HostProcess container runs directly on the Windows host.",
        "PSS baseline; Trivy KSV-0103",
        "(not applicable)", "(not applicable)", "remove securityContext.windowsOptions.hostProcess"),
    rule!("volume-type", Low, "Volume type outside the restricted set",
        "The Pod Security Standards restricted profile allows only configMap, csi, downwardAPI, emptyDir, ephemeral, persistentVolumeClaim, projected and secret volumes.",
        "PSS restricted; Trivy KSV-0028",
        "(not applicable)", "(not applicable)", "use one of the allowed volume types"),
];

/// The rule with this id (every id used below is in the table; a test checks it).
pub fn rule(id: &str) -> &'static Rule {
    RULES.iter().find(|r| r.id == id).unwrap_or(&RULES[0])
}

const DANGEROUS: [&str; 12] = [
    "SYS_MODULE",
    "SYS_PTRACE",
    "SYS_RAWIO",
    "DAC_READ_SEARCH",
    "NET_ADMIN",
    "BPF",
    "PERFMON",
    "SYS_BOOT",
    "SYSLOG",
    "SYS_TIME",
    "MAC_ADMIN",
    "MAC_OVERRIDE",
];

const SOCKETS: [&str; 6] = [
    "docker.sock",
    "containerd.sock",
    "crio.sock",
    "podman.sock",
    "cri-dockerd.sock",
    "dockershim.sock",
];

struct Out<'a> {
    w: &'a Workload,
    artifact: &'a str,
    v: Vec<Finding>,
}

impl Out<'_> {
    fn add(&mut self, id: &str, loc: &Loc, detail: impl Into<String>) {
        self.add_sev(id, None, loc, detail);
    }

    fn add_sev(&mut self, id: &str, sev: Option<Severity>, loc: &Loc, detail: impl Into<String>) {
        let r = rule(id);
        let fix = match self.w.source {
            Source::Oci => r.fix[0],
            Source::Docker => r.fix[1],
            Source::Kubernetes => r.fix[2],
        };
        self.v.push(Finding {
            id: r.id,
            severity: sev.unwrap_or(r.severity),
            title: r.title,
            subject: self.w.subject.clone(),
            location: loc.render(),
            detail: detail.into(),
            why: r.why,
            fix: fix.to_string(),
            references: r.references,
            artifact: self.artifact.to_string(),
        });
    }
}

/// Every finding for one workload.
pub fn check(w: &Workload, artifact: &str) -> Vec<Finding> {
    let mut o = Out {
        w,
        artifact,
        v: Vec::new(),
    };
    if let Some(l) = &w.privileged {
        o.add("privileged", l, "privileged: true");
    }
    if let Some(l) = &w.host_process {
        o.add("host-process", l, "hostProcess: true");
    }
    capabilities(&mut o, w);
    for (ns, l) in &w.host_ns {
        let id = match *ns {
            "network" => "host-network",
            "pid" => "host-pid",
            "ipc" => "host-ipc",
            "uts" => "host-uts",
            "mount" => "host-mount-ns",
            _ => "host-cgroup-ns",
        };
        o.add(id, l, format!("shares the host's {ns} namespace"));
    }
    if let Some(l) = &w.no_userns {
        o.add("no-userns", l, "no user namespace");
    }
    for (p, l, security) in &w.unknown {
        // Under process, linux, root, mounts or hooks a typo drops a
        // protection; elsewhere it is only noise.
        let sev = (!security).then_some(Severity::Low);
        o.add_sev("unknown-property", sev, l, format!("unknown property {p}"));
    }
    if let Some((d, l)) = &w.root_user {
        // Root inside a user namespace is not root on the host.
        let sev = w.no_userns.is_none().then_some(Severity::Low);
        o.add_sev("run-as-root", sev, l, d.clone());
    }
    if let Some((uid, l)) = &w.low_uid {
        o.add("low-uid", l, format!("runAsUser {uid}"));
    }
    security_profiles(&mut o, w);
    limits(&mut o, w);
    mounts(&mut o, w);
    for (d, l) in &w.devices {
        o.add("host-device", l, format!("device {d}"));
    }
    if let Some(l) = &w.device_allow_all {
        o.add("devices-allow-all", l, "allows every device");
    }
    for (d, l) in &w.unmasked {
        o.add("unmasked-proc", l, d.clone());
    }
    for p in &w.ports {
        if p.host_ip.is_empty() || p.host_ip == "0.0.0.0" || p.host_ip == "::" {
            o.add(
                "host-port",
                &p.loc,
                format!("host port {} on all interfaces", p.host_port),
            );
        }
        if p.host_port > 0 && p.host_port < 1024 {
            o.add(
                "privileged-port",
                &p.loc,
                format!("host port {}", p.host_port),
            );
        }
    }
    for (s, l) in &w.sysctls {
        o.add("unsafe-sysctl", l, format!("sysctl {s}"));
    }
    if let Some(l) = &w.sa_token {
        o.add("sa-token", l, "automountServiceAccountToken is not false");
    }
    if let Some((img, l)) = &w.image {
        if !image_pinned(img) {
            o.add("image-latest", l, format!("image {img}"));
        }
    }
    if let Some((r, l)) = &w.restart {
        o.add("restart-policy", l, format!("restart policy {r}"));
    }
    if let Some(l) = &w.healthcheck {
        o.add("no-healthcheck", l, "no health check");
    }
    for (t, l) in &w.volume_types {
        o.add("volume-type", l, format!("{t} volume"));
    }
    o.v
}

fn capabilities(o: &mut Out<'_>, w: &Workload) {
    if w.privileged.is_some() {
        return; // everything is granted; the privileged finding says so
    }
    let all = w.caps.iter().find(|(c, _)| c == "ALL");
    for (c, l) in &w.caps {
        if c == "SYS_ADMIN" {
            o.add("cap-sys-admin", l, "CAP_SYS_ADMIN");
        } else if DANGEROUS.contains(&c.as_str()) {
            o.add("cap-dangerous", l, format!("CAP_{c}"));
        } else if c == "NET_RAW" {
            o.add("cap-net-raw", l, "CAP_NET_RAW");
        } else if c == "ALL" {
            o.add(
                "cap-sys-admin",
                l,
                "capabilities add ALL (includes CAP_SYS_ADMIN)",
            );
        }
    }
    for (c, l) in &w.caps_added {
        let covered =
            c == "SYS_ADMIN" || c == "NET_RAW" || c == "ALL" || DANGEROUS.contains(&c.as_str());
        if !covered && all.is_none() {
            o.add("cap-added", l, format!("CAP_{c}"));
        }
    }
    if let Some(l) = &w.drop_all {
        o.add("cap-drop-all", l, "ALL is not dropped");
    } else if w.source == Source::Oci {
        let extra: Vec<&str> = w
            .caps
            .iter()
            .map(|(c, _)| c.as_str())
            .filter(|c| *c != "NET_BIND_SERVICE")
            .collect();
        if !extra.is_empty() {
            let l = w.base.k("process").k("capabilities");
            o.add("cap-drop-all", &l, format!("holds {}", extra.join(", ")));
        }
    }
}

fn security_profiles(o: &mut Out<'_>, w: &Workload) {
    if w.privileged.is_some() {
        return;
    }
    if let Some(l) = &w.seccomp_unconfined {
        o.add("seccomp-unconfined", l, "seccomp unconfined");
    }
    if let Some(l) = &w.landlock_missing {
        o.add("landlock-missing", l, "no dev.moat.landlock annotation");
    }
    if let Some(l) = &w.seccomp_missing {
        o.add("seccomp-missing", l, "no seccomp profile");
    }
    if let Some(l) = &w.apparmor_unconfined {
        o.add("apparmor-unconfined", l, "AppArmor unconfined");
    }
    if let Some((d, l)) = &w.selinux_custom {
        o.add("selinux-custom", l, d.clone());
    }
    if let Some(l) = &w.no_new_privs {
        o.add("no-new-privileges", l, "no_new_privs not set");
    }
}

fn limits(o: &mut Out<'_>, w: &Workload) {
    if let Some(l) = &w.readonly_root {
        o.add("writable-rootfs", l, "root filesystem is writable");
    }
    if let Some(l) = &w.memory_limit {
        o.add("no-memory-limit", l, "no memory limit");
    }
    if let Some(l) = &w.cpu_limit {
        o.add("no-cpu-limit", l, "no CPU limit");
    }
    if let Some(l) = &w.pids_limit {
        o.add("no-pids-limit", l, "no pids limit");
    }
}

/// Whether `src` is one of the sensitive host directories or under one of
/// them (`/` only when mounted itself).
pub fn is_sensitive(src: &str) -> bool {
    let src = if src.len() > 1 {
        src.trim_end_matches('/')
    } else {
        src
    };
    SENSITIVE
        .iter()
        .any(|p| src == *p || (*p != "/" && src.starts_with(&format!("{p}/"))))
}

/// A host directory of programs and libraries (`/usr`, `/bin`, `/lib*`,
/// `/sbin`) or one of the public /etc files programs need (the dynamic
/// linker's cache, name resolution, time zone, CA certificates), as the
/// embedded default of `moat run` mounts them.
pub fn is_public_system_file(src: &str) -> bool {
    let src = src.trim_end_matches('/');
    if let Some(name) = src.strip_prefix("/etc/") {
        return moat_core::embedded::shown_etc(name);
    }
    moat_core::embedded::HOST_DIRS
        .iter()
        .any(|d| src.strip_prefix('/') == Some(d))
}

fn mounts(o: &mut Out<'_>, w: &Workload) {
    for m in &w.mounts {
        let ro = if m.readonly { " read-only" } else { "" };
        if SOCKETS.iter().any(|s| m.source.ends_with(s)) {
            o.add(
                "runtime-socket",
                &m.loc,
                format!("{} mounted at {}", m.source, m.dest),
            );
        } else if m.readonly && is_public_system_file(&m.source) {
            // moat run's embedded default: the host's programs and the few
            // public /etc files they need, read-only. They reveal what is
            // installed, nothing else (no secrets, no kernel interfaces).
            o.add_sev(
                "host-path",
                Some(Severity::Low),
                &m.loc,
                format!(
                    "{} mounted read-only at {} (host system files)",
                    m.source, m.dest
                ),
            );
        } else if is_sensitive(&m.source) {
            o.add(
                "sensitive-mount",
                &m.loc,
                format!("{} mounted{ro} at {}", m.source, m.dest),
            );
        } else {
            let sev = m.readonly.then_some(Severity::Low);
            o.add_sev(
                "host-path",
                sev,
                &m.loc,
                format!("{} mounted{ro} at {}", m.source, m.dest),
            );
        }
        if let Some((p, l)) = &m.propagation {
            o.add(
                "mount-propagation-shared",
                l,
                format!("{p} propagation on {}", m.dest),
            );
        }
    }
    if let Some((p, l)) = &w.root_propagation {
        o.add(
            "mount-propagation-shared",
            l,
            format!("rootfs propagation {p}"),
        );
    }
}

/// An image reference with a digest or a tag other than `latest`.
pub fn image_pinned(img: &str) -> bool {
    if img.contains('@') {
        return true;
    }
    let last = img.rsplit('/').next().unwrap_or(img);
    match last.rsplit_once(':') {
        Some((_, tag)) => tag != "latest",
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::super::audit_text;
    use super::*;

    fn ids(text: &str) -> Vec<&'static str> {
        let mut v: Vec<&str> = audit_text(text, "t")
            .unwrap()
            .iter()
            .map(|f| f.id)
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// A hardened OCI config: nothing to report.
    const HARD_OCI: &str = r#"{"ociVersion":"1.2.0",
      "process":{"user":{"uid":100000,"gid":100000},"args":["sh"],"cwd":"/","noNewPrivileges":true,
        "capabilities":{"bounding":[],"effective":[],"permitted":[]}},
      "root":{"path":"rootfs","readonly":true},
      "annotations":{"dev.moat.landlock":"auto"},
      "linux":{"namespaces":[{"type":"pid"},{"type":"network"},{"type":"ipc"},{"type":"uts"},{"type":"mount"},{"type":"cgroup"},{"type":"user"}],
        "uidMappings":[{"containerID":0,"hostID":100000,"size":65536}],
        "resources":{"memory":{"limit":104857600},"cpu":{"quota":50000,"period":100000},"pids":{"limit":100}},
        "seccomp":{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[{"names":["read"],"action":"SCMP_ACT_ALLOW"}]},
        "maskedPaths":["/proc/kcore"],"readonlyPaths":["/proc/sys"]}}"#;

    fn oci_with(ptr: &str, v: serde_json::Value) -> String {
        let mut c: serde_json::Value = serde_json::from_str(HARD_OCI).unwrap();
        let (parent, key) = ptr.rsplit_once('/').unwrap();
        c.pointer_mut(parent)
            .unwrap()
            .as_object_mut()
            .unwrap()
            .insert(key.to_string(), v);
        c.to_string()
    }

    #[test]
    fn every_rule_id_is_unique_and_known() {
        for (i, r) in RULES.iter().enumerate() {
            assert!(RULES.iter().skip(i + 1).all(|o| o.id != r.id), "{}", r.id);
            assert_eq!(rule(r.id).id, r.id);
        }
    }

    #[test]
    fn read_only_system_files_are_low_anything_else_sensitive() {
        use serde_json::json;
        let with = |src: &str, opts: serde_json::Value| {
            let text = oci_with(
                "/mounts",
                json!([{"destination": "/x", "type": "bind", "source": src, "options": opts}]),
            );
            audit_text(&text, "t")
                .unwrap()
                .iter()
                .map(|f| (f.id, f.severity))
                .collect::<Vec<_>>()
        };
        for src in [
            "/usr",
            "/lib64",
            "/etc/ld.so.cache",
            "/etc/ssl/certs/",
            "/etc/services",
            "/etc/java-17-openjdk",
        ] {
            assert_eq!(
                with(src, json!(["rbind", "ro"])),
                vec![("host-path", Severity::Low)],
                "{src}"
            );
        }
        for (src, opts) in [
            ("/usr", json!(["rbind", "rw"])),
            ("/etc", json!(["rbind", "ro"])),
            ("/etc/shadow", json!(["rbind", "ro"])),
            ("/etc/ssl/private", json!(["rbind", "ro"])),
            ("/etc/ssl", json!(["rbind", "ro"])),
            ("/usr/../etc", json!(["rbind", "ro"])),
        ] {
            assert!(
                with(src, opts.clone())
                    .iter()
                    .any(|(id, _)| *id == "sensitive-mount"),
                "{src} {opts}"
            );
        }
    }

    #[test]
    fn hardened_oci_is_clean() {
        assert_eq!(ids(HARD_OCI), Vec::<&str>::new());
    }

    #[test]
    fn oci_rules_fire() {
        use serde_json::json;
        let cases: Vec<(&str, serde_json::Value, &str)> = vec![
            (
                "/process/capabilities/bounding",
                json!(["CAP_SYS_ADMIN"]),
                "cap-sys-admin",
            ),
            (
                "/process/capabilities/bounding",
                json!(["CAP_SYS_PTRACE"]),
                "cap-dangerous",
            ),
            (
                "/process/capabilities/bounding",
                json!(["CAP_NET_RAW"]),
                "cap-net-raw",
            ),
            (
                "/process/capabilities/bounding",
                json!(["CAP_IPC_LOCK"]),
                "cap-added",
            ),
            (
                "/process/capabilities/bounding",
                json!(["CAP_KILL"]),
                "cap-drop-all",
            ),
            (
                "/linux/namespaces",
                json!([{"type":"user"},{"type":"mount"},{"type":"pid"},{"type":"ipc"},{"type":"uts"},{"type":"cgroup"}]),
                "host-network",
            ),
            (
                "/linux/namespaces",
                json!([{"type":"user"},{"type":"mount"},{"type":"network"},{"type":"ipc"},{"type":"uts"},{"type":"cgroup"}]),
                "host-pid",
            ),
            (
                "/linux/namespaces",
                json!([{"type":"user"},{"type":"mount"},{"type":"network"},{"type":"pid"},{"type":"uts"},{"type":"cgroup"}]),
                "host-ipc",
            ),
            (
                "/linux/namespaces",
                json!([{"type":"user"},{"type":"mount"},{"type":"network"},{"type":"pid"},{"type":"ipc"},{"type":"cgroup"}]),
                "host-uts",
            ),
            (
                "/linux/namespaces",
                json!([{"type":"user"},{"type":"uts"},{"type":"network"},{"type":"pid"},{"type":"ipc"},{"type":"cgroup"}]),
                "host-mount-ns",
            ),
            (
                "/linux/namespaces",
                json!([{"type":"user"},{"type":"uts"},{"type":"network"},{"type":"pid"},{"type":"ipc"},{"type":"mount"}]),
                "host-cgroup-ns",
            ),
            (
                "/linux/namespaces",
                json!([{"type":"cgroup"},{"type":"uts"},{"type":"network"},{"type":"pid"},{"type":"ipc"},{"type":"mount"}]),
                "no-userns",
            ),
            ("/process/user", json!({"uid":0,"gid":0}), "run-as-root"),
            (
                "/linux/seccomp",
                json!({"defaultAction":"SCMP_ACT_ALLOW"}),
                "seccomp-unconfined",
            ),
            ("/linux/seccomp", json!(null), "seccomp-missing"),
            (
                "/process/apparmorProfile",
                json!("unconfined"),
                "apparmor-unconfined",
            ),
            (
                "/process/selinuxLabel",
                json!("system_u:system_r:spc_t:s0"),
                "selinux-custom",
            ),
            (
                "/process/noNewPrivileges",
                json!(false),
                "no-new-privileges",
            ),
            ("/root/readonly", json!(false), "writable-rootfs"),
            (
                "/linux/resources",
                json!({"cpu":{"quota":1},"pids":{"limit":1}}),
                "no-memory-limit",
            ),
            (
                "/linux/resources",
                json!({"memory":{"limit":1},"pids":{"limit":1}}),
                "no-cpu-limit",
            ),
            (
                "/linux/resources",
                json!({"memory":{"limit":1},"cpu":{"quota":1}}),
                "no-pids-limit",
            ),
            (
                "/mounts",
                json!([{"destination":"/run/docker.sock","source":"/var/run/docker.sock","type":"bind","options":["rbind"]}]),
                "runtime-socket",
            ),
            (
                "/mounts",
                json!([{"destination":"/host","source":"/etc","type":"bind","options":["rbind","ro"]}]),
                "sensitive-mount",
            ),
            (
                "/mounts",
                json!([{"destination":"/data","source":"/srv/data","options":["rbind","rw"]}]),
                "host-path",
            ),
            (
                "/mounts",
                json!([{"destination":"/data","source":"/srv/data","options":["rbind","rshared"]}]),
                "mount-propagation-shared",
            ),
            (
                "/linux/rootfsPropagation",
                json!("rshared"),
                "mount-propagation-shared",
            ),
            (
                "/linux/devices",
                json!([{"path":"/dev/sda","type":"b","major":8,"minor":0}]),
                "host-device",
            ),
            (
                "/linux/resources",
                json!({"memory":{"limit":1},"cpu":{"quota":1},"pids":{"limit":1},"devices":[{"allow":true,"access":"rwm"}]}),
                "devices-allow-all",
            ),
            ("/linux/maskedPaths", json!([]), "unmasked-proc"),
            ("/linux/readonlyPaths", json!([]), "unmasked-proc"),
            (
                "/linux/sysctl",
                json!({"kernel.core_pattern":"|/x"}),
                "unsafe-sysctl",
            ),
        ];
        for (ptr, v, want) in cases {
            let got = ids(&oci_with(ptr, v.clone()));
            assert!(got.contains(&want), "{ptr} = {v}: want {want}, got {got:?}");
        }
    }

    #[test]
    fn unknown_properties_are_found_where_they_matter() {
        let f = |ptr: &str| {
            audit_text(
                &oci_with(ptr, serde_json::json!({"defaultAction": "SCMP_ACT_ERRNO"})),
                "t",
            )
            .unwrap()
            .into_iter()
            .filter(|f| f.id == "unknown-property")
            .map(|f| (f.location, f.severity))
            .collect::<Vec<_>>()
        };
        assert_eq!(
            f("/linux/seccompp"),
            [("/linux/seccompp".to_string(), Severity::Medium)]
        );
        assert_eq!(
            f("/root/readOnly"),
            [("/root/readOnly".to_string(), Severity::Medium)]
        );
        assert_eq!(
            f("/process/user/nope"),
            [("/process/user/nope".to_string(), Severity::Medium)]
        );
        assert_eq!(f("/extra"), [("/extra".to_string(), Severity::Low)]);
        assert!(f("/annotations/anything").is_empty());
    }

    #[test]
    fn run_as_root_is_low_inside_a_user_namespace() {
        let f = audit_text(
            &oci_with("/process/user", serde_json::json!({"uid":0,"gid":0})),
            "t",
        )
        .unwrap();
        let r = f.iter().find(|f| f.id == "run-as-root").unwrap();
        assert_eq!(r.severity, Severity::Low);
        assert_eq!(r.location, "/process/user/uid");
    }

    const HARD_POD: &str = "apiVersion: v1
kind: Pod
metadata: {name: ok}
spec:
  hostUsers: false
  automountServiceAccountToken: false
  securityContext:
    runAsNonRoot: true
    runAsUser: 20000
    seccompProfile: {type: RuntimeDefault}
  containers:
  - name: app
    image: registry.example/app:1.2.3
    resources: {limits: {memory: 64Mi, cpu: 500m}}
    securityContext:
      allowPrivilegeEscalation: false
      readOnlyRootFilesystem: true
      capabilities: {drop: [ALL]}
  volumes:
  - name: scratch
    emptyDir: {}
";

    #[test]
    fn hardened_pod_is_clean() {
        assert_eq!(ids(HARD_POD), Vec::<&str>::new());
    }

    #[test]
    fn k8s_rules_fire() {
        let cases = [
            ("      capabilities: {drop: [ALL]}", "      capabilities: {drop: [ALL]}\n      privileged: true", "privileged"),
            ("      capabilities: {drop: [ALL]}", "      capabilities: {drop: [ALL], add: [SYS_ADMIN]}", "cap-sys-admin"),
            ("      capabilities: {drop: [ALL]}", "      capabilities: {drop: [ALL], add: [NET_ADMIN]}", "cap-dangerous"),
            ("      capabilities: {drop: [ALL]}", "      capabilities: {drop: [ALL], add: [CHOWN]}", "cap-added"),
            ("      capabilities: {drop: [ALL]}", "      capabilities: {drop: [MKNOD]}", "cap-drop-all"),
            ("      capabilities: {drop: [ALL]}", "      capabilities: {drop: [MKNOD]}", "cap-net-raw"),
            ("  hostUsers: false", "  hostUsers: false\n  hostNetwork: true", "host-network"),
            ("  hostUsers: false", "  hostUsers: false\n  hostPID: true", "host-pid"),
            ("  hostUsers: false", "  hostUsers: false\n  hostIPC: true", "host-ipc"),
            ("  hostUsers: false", "  hostUsers: true", "no-userns"),
            ("    runAsUser: 20000", "    runAsUser: 0", "run-as-root"),
            ("    runAsUser: 20000", "    runAsUser: 1000", "low-uid"),
            ("{type: RuntimeDefault}", "{type: Unconfined}", "seccomp-unconfined"),
            ("    seccompProfile: {type: RuntimeDefault}\n", "", "seccomp-missing"),
            ("      allowPrivilegeEscalation: false", "      allowPrivilegeEscalation: false\n      appArmorProfile: {type: Unconfined}", "apparmor-unconfined"),
            ("      allowPrivilegeEscalation: false", "      allowPrivilegeEscalation: false\n      seLinuxOptions: {type: spc_t}", "selinux-custom"),
            ("      allowPrivilegeEscalation: false", "      allowPrivilegeEscalation: true", "no-new-privileges"),
            ("      readOnlyRootFilesystem: true", "      readOnlyRootFilesystem: false", "writable-rootfs"),
            ("{memory: 64Mi, cpu: 500m}", "{cpu: 500m}", "no-memory-limit"),
            ("{memory: 64Mi, cpu: 500m}", "{memory: 64Mi}", "no-cpu-limit"),
            ("      allowPrivilegeEscalation: false", "      allowPrivilegeEscalation: false\n      procMount: Unmasked", "unmasked-proc"),
            ("    image: registry.example/app:1.2.3", "    image: registry.example/app:1.2.3\n    ports: [{containerPort: 80, hostPort: 80}]", "host-port"),
            ("    image: registry.example/app:1.2.3", "    image: registry.example/app:1.2.3\n    ports: [{containerPort: 80, hostPort: 80}]", "privileged-port"),
            ("    runAsNonRoot: true", "    runAsNonRoot: true\n    sysctls: [{name: kernel.msgmax, value: '1'}]", "unsafe-sysctl"),
            ("  automountServiceAccountToken: false", "", "sa-token"),
            ("app:1.2.3", "app:latest", "image-latest"),
            ("      allowPrivilegeEscalation: false", "      allowPrivilegeEscalation: false\n      windowsOptions: {hostProcess: true}", "host-process"),
            ("    emptyDir: {}", "    nfs: {server: s, path: /}", "volume-type"),
            (
                "    emptyDir: {}",
                "    hostPath: {path: /var/run/docker.sock}\n  - name: x\n    emptyDir: {}",
                "volume-type",
            ),
        ];
        for (from, to, want) in cases {
            assert!(HARD_POD.contains(from), "{from}");
            let got = ids(&HARD_POD.replacen(from, to, 1));
            assert!(got.contains(&want), "{to}: want {want}, got {got:?}");
        }
        let sock = HARD_POD.replacen("    emptyDir: {}", "    hostPath: {path: /var/run/docker.sock}", 1).replacen(
            "      capabilities: {drop: [ALL]}",
            "      capabilities: {drop: [ALL]}\n    volumeMounts: [{name: scratch, mountPath: /var/run/docker.sock}]",
            1,
        );
        let f = audit_text(&sock, "t").unwrap();
        let s = f
            .iter()
            .find(|f| f.id == "runtime-socket")
            .expect("runtime-socket");
        assert_eq!(s.location, "spec.volumes[0].hostPath.path");
        let etc = sock
            .replace(
                "mountPath: /var/run/docker.sock",
                "mountPath: /host, mountPropagation: Bidirectional",
            )
            .replace("{path: /var/run/docker.sock}", "{path: /etc}");
        let got = ids(&etc);
        assert!(
            got.contains(&"sensitive-mount") && got.contains(&"mount-propagation-shared"),
            "{got:?}"
        );
    }

    #[test]
    fn docker_rules_fire() {
        use serde_json::json;
        let base = json!({"Name":"/c","Config":{"User":"1000","Image":"busybox:1.36","Healthcheck":{"Test":["CMD","true"]}},
            "HostConfig":{"Privileged":false,"CapDrop":["ALL"],"SecurityOpt":["no-new-privileges"],"ReadonlyRootfs":true,
              "Memory":1,"NanoCpus":1,"PidsLimit":10,"UsernsMode":"private","RestartPolicy":{"Name":"on-failure","MaximumRetryCount":5}},
            "Mounts":[]});
        assert_eq!(ids(&json!([base.clone()]).to_string()), Vec::<&str>::new());
        let cases: Vec<(&str, serde_json::Value, &str)> = vec![
            ("/HostConfig/Privileged", json!(true), "privileged"),
            (
                "/HostConfig/CapAdd",
                json!(["CAP_SYS_ADMIN"]),
                "cap-sys-admin",
            ),
            ("/HostConfig/CapDrop", json!([]), "cap-net-raw"),
            ("/HostConfig/NetworkMode", json!("host"), "host-network"),
            ("/HostConfig/PidMode", json!("host"), "host-pid"),
            ("/HostConfig/IpcMode", json!("host"), "host-ipc"),
            ("/HostConfig/UTSMode", json!("host"), "host-uts"),
            ("/HostConfig/CgroupnsMode", json!("host"), "host-cgroup-ns"),
            ("/HostConfig/UsernsMode", json!("host"), "no-userns"),
            (
                "/HostConfig/SecurityOpt",
                json!(["no-new-privileges", "seccomp=unconfined"]),
                "seccomp-unconfined",
            ),
            (
                "/HostConfig/SecurityOpt",
                json!(["no-new-privileges", "apparmor=unconfined"]),
                "apparmor-unconfined",
            ),
            (
                "/HostConfig/SecurityOpt",
                json!(["no-new-privileges", "label=disable"]),
                "selinux-custom",
            ),
            (
                "/HostConfig/SecurityOpt",
                json!(["no-new-privileges", "systempaths=unconfined"]),
                "unmasked-proc",
            ),
            ("/HostConfig/SecurityOpt", json!([]), "no-new-privileges"),
            (
                "/HostConfig/ReadonlyRootfs",
                json!(false),
                "writable-rootfs",
            ),
            ("/HostConfig/Memory", json!(0), "no-memory-limit"),
            ("/HostConfig/NanoCpus", json!(0), "no-cpu-limit"),
            ("/HostConfig/PidsLimit", json!(null), "no-pids-limit"),
            (
                "/HostConfig/Devices",
                json!([{"PathOnHost":"/dev/fuse","PathInContainer":"/dev/fuse","CgroupPermissions":"rwm"}]),
                "host-device",
            ),
            (
                "/HostConfig/DeviceCgroupRules",
                json!(["a *:* rwm"]),
                "devices-allow-all",
            ),
            (
                "/HostConfig/PortBindings",
                json!({"80/tcp":[{"HostIp":"","HostPort":"80"}]}),
                "host-port",
            ),
            (
                "/HostConfig/PortBindings",
                json!({"80/tcp":[{"HostIp":"127.0.0.1","HostPort":"80"}]}),
                "privileged-port",
            ),
            (
                "/HostConfig/Sysctls",
                json!({"kernel.shmmax":"1"}),
                "unsafe-sysctl",
            ),
            (
                "/HostConfig/RestartPolicy",
                json!({"Name":"always","MaximumRetryCount":0}),
                "restart-policy",
            ),
            ("/Config/Healthcheck", json!(null), "no-healthcheck"),
            ("/Config/User", json!(""), "run-as-root"),
            ("/Config/Image", json!("busybox"), "image-latest"),
            (
                "/Mounts",
                json!([{"Type":"bind","Source":"/var/run/docker.sock","Destination":"/s","RW":true,"Propagation":"rprivate"}]),
                "runtime-socket",
            ),
            (
                "/Mounts",
                json!([{"Type":"bind","Source":"/proc","Destination":"/p","RW":true,"Propagation":"rprivate"}]),
                "sensitive-mount",
            ),
            (
                "/Mounts",
                json!([{"Type":"bind","Source":"/srv","Destination":"/p","RW":false,"Propagation":"rshared"}]),
                "mount-propagation-shared",
            ),
        ];
        for (ptr, v, want) in cases {
            let mut c = base.clone();
            let (parent, key) = ptr.rsplit_once('/').unwrap();
            c.pointer_mut(parent)
                .unwrap()
                .as_object_mut()
                .unwrap()
                .insert(key.to_string(), v.clone());
            let got = ids(&json!([c]).to_string());
            assert!(got.contains(&want), "{ptr} = {v}: want {want}, got {got:?}");
        }
    }

    #[test]
    fn sensitive_paths_and_images() {
        assert!(is_sensitive("/"));
        assert!(is_sensitive("/etc/"));
        assert!(is_sensitive("/proc/sys"));
        assert!(!is_sensitive("/srv/data"));
        assert!(!is_sensitive("/etcetera"));
        assert!(image_pinned("a/b:1.2"));
        assert!(image_pinned("a@sha256:00"));
        assert!(!image_pinned("a/b"));
        assert!(!image_pinned("localhost:5000/b"));
        assert!(!image_pinned("a:latest"));
    }
}
