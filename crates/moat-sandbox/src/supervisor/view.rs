//! What the workload is shown of its machine: the sandbox, not the host.
//! [`SandboxView`] is what the runtime knows when it starts the supervisor
//! (the config's limits, hostname and network); the functions here turn it,
//! and a few host facts that are no identity (CPU flags, usage counters),
//! into the text of the /proc and /sys files the broker serves instead of
//! the host's, and into the `sysinfo`/`uname` structures it writes.
//! Pure functions over strings and numbers: unit-tested below.

/// The network the sandbox is on, as its config asks for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Network {
    /// Its own network namespace with only `lo`: only loopback addresses
    /// are reachable, and the supervisor refuses others up front.
    #[default]
    Loopback,
    /// moat's user-space stack (`--net egress=`, the egress annotation):
    /// the stack enforces the egress allow-list.
    Stack,
    /// A network given to it: the host's (`--net host`) or a namespace an
    /// engine prepared (a `path` in the config). That network decides.
    Given,
}

/// The sandbox's machine, as the config describes it.
#[derive(Debug, Clone, Default)]
pub struct SandboxView {
    pub hostname: String,
    pub network: Network,
    /// The CPU limit, in CPUs (quota / period), if any.
    pub cpus: Option<f64>,
    /// CPUs of the cpuset the config names, if any.
    pub cpuset: Option<usize>,
    /// The memory limit in bytes, if any.
    pub memory: Option<u64>,
    /// uname's release and version (the policy's `kernel`).
    pub release: String,
    pub version: String,
}

impl SandboxView {
    /// How many CPUs the workload is shown: its limit rounded up, at most
    /// `host` (the CPUs it may run on), at least one.
    pub fn ncpus(&self, host: usize) -> usize {
        let mut n = host.max(1);
        if let Some(c) = self.cpus.filter(|c| *c > 0.0) {
            n = n.min(c.ceil() as usize);
        }
        if let Some(s) = self.cpuset.filter(|s| *s > 0) {
            n = n.min(s);
        }
        n.max(1)
    }
}

/// The number of CPUs in a cpuset list (`0-3,8`), if it parses.
pub fn cpuset_count(list: &str) -> Option<usize> {
    let mut n = 0usize;
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse().ok()?, b.parse().ok()?);
                n += b.checked_sub(a)? + 1;
            }
            None => {
                part.parse::<usize>().ok()?;
                n += 1;
            }
        }
    }
    Some(n)
}

/// The value of `key` in a host cpuinfo's first processor block.
fn cpu_field<'a>(host: &'a str, key: &str) -> Option<&'a str> {
    host.lines()
        .take_while(|l| !l.trim().is_empty())
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == key).then(|| v.trim())
        })
}

/// `/proc/cpuinfo`: `n` processors with the host's vendor, family and
/// feature flags (programs pick code paths by them) but no model name,
/// model number, stepping, microcode, frequency or topology.
pub fn cpuinfo(host: &str, n: usize) -> String {
    let get = |k: &str, d: &'static str| cpu_field(host, k).unwrap_or(d).to_string();
    let vendor = get("vendor_id", "unknown");
    let family = get("cpu family", "0");
    let flags = get("flags", "");
    let bogomips = get("bogomips", "0");
    let clflush = get("clflush size", "64");
    let align = get("cache_alignment", "64");
    let sizes = get("address sizes", "");
    let mut out = String::new();
    for i in 0..n {
        out.push_str(&format!(
            "processor\t: {i}\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: 0\n\
             model name\t: moat virtual CPU\nstepping\t: 0\nphysical id\t: 0\nsiblings\t: {n}\n\
             core id\t\t: {i}\ncpu cores\t: {n}\napicid\t\t: {i}\nfpu\t\t: yes\n\
             fpu_exception\t: yes\ncpuid level\t: 13\nwp\t\t: yes\nflags\t\t: {flags}\n\
             bogomips\t: {bogomips}\nclflush size\t: {clflush}\ncache_alignment\t: {align}\n\
             address sizes\t: {sizes}\npower management:\n\n"
        ));
    }
    out
}

/// Memory the workload is shown: its total and what is free of it, bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    pub total: u64,
    pub used: u64,
}

impl Memory {
    pub fn free(&self) -> u64 {
        self.total.saturating_sub(self.used)
    }
}

/// `/proc/meminfo` of a machine with `m` and no swap.
pub fn meminfo(m: Memory) -> String {
    let kb = |b: u64| b / 1024;
    let rows: [(&str, u64); 20] = [
        ("MemTotal", kb(m.total)),
        ("MemFree", kb(m.free())),
        ("MemAvailable", kb(m.free())),
        ("Buffers", 0),
        ("Cached", 0),
        ("SwapCached", 0),
        ("Active", kb(m.used)),
        ("Inactive", 0),
        ("SwapTotal", 0),
        ("SwapFree", 0),
        ("Dirty", 0),
        ("Writeback", 0),
        ("AnonPages", kb(m.used)),
        ("Mapped", 0),
        ("Shmem", 0),
        ("Slab", 0),
        ("CommitLimit", kb(m.total)),
        ("Committed_AS", kb(m.used)),
        ("HugePages_Total", 0),
        ("Hugepagesize", 2048),
    ];
    let mut out = String::new();
    for (k, v) in rows {
        let unit = if k == "HugePages_Total" { "" } else { " kB" };
        out.push_str(&format!("{:<16}{v:>8}{unit}\n", format!("{k}:")));
    }
    out
}

/// Time and CPU use of the sandbox: seconds since it started, CPU seconds
/// its processes used, its process count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Usage {
    pub uptime: f64,
    pub cpu: f64,
    pub procs: u64,
    /// Wall-clock time it started (seconds since the epoch): `btime`.
    pub started: u64,
}

impl Usage {
    /// Idle CPU seconds of `n` CPUs.
    fn idle(&self, n: usize) -> f64 {
        (self.uptime * n as f64 - self.cpu).max(0.0)
    }
}

/// `/proc/uptime`.
pub fn uptime(u: Usage, n: usize) -> String {
    format!("{:.2} {:.2}\n", u.uptime, u.idle(n))
}

/// `/proc/loadavg`: no load history is kept; the running and total counts
/// are the sandbox's.
pub fn loadavg(u: Usage) -> String {
    format!("0.00 0.00 0.00 1/{} {}\n", u.procs.max(1), u.procs.max(1))
}

/// `/proc/stat` with `n` CPUs: the sandbox's CPU time as user time, the rest
/// idle, in clock ticks (USER_HZ, 100).
pub fn stat(u: Usage, n: usize) -> String {
    let ticks = |s: f64| (s * 100.0) as u64;
    let line =
        |name: String, user: u64, idle: u64| format!("{name} {user} 0 0 {idle} 0 0 0 0 0 0\n");
    let mut out = line("cpu ".into(), ticks(u.cpu), ticks(u.idle(n)));
    let per = |v: f64| v / n as f64;
    for i in 0..n {
        out.push_str(&line(
            format!("cpu{i}"),
            ticks(per(u.cpu)),
            ticks(per(u.idle(n))),
        ));
    }
    out.push_str(&format!(
        "intr 0\nctxt 0\nbtime {}\nprocesses {}\nprocs_running 1\nprocs_blocked 0\nsoftirq 0\n",
        u.started, u.procs
    ));
    out
}

/// `/proc/version`.
pub fn version(release: &str, version: &str) -> String {
    format!("Linux version {release} (moat@sandbox) {version}\n")
}

/// A CPU list of `n` CPUs (`0-3`), for /sys/devices/system/cpu/online.
pub fn cpu_list(n: usize) -> String {
    if n <= 1 {
        "0\n".into()
    } else {
        format!("0-{}\n", n - 1)
    }
}

/// Whether a mount source or option names a host path.
fn hostish(s: &str) -> bool {
    s.starts_with('/')
}

/// Superblock or mount options without the host paths some carry
/// (overlay's `lowerdir=`, `upperdir=`, `workdir=`; anything `=/…`).
fn clean_options(opts: &str) -> String {
    opts.split(',')
        .filter(|o| !o.split_once('=').is_some_and(|(_, v)| hostish(v)))
        .collect::<Vec<_>>()
        .join(",")
}

/// `/proc/PID/mountinfo` without host paths: the root of each mount within
/// its filesystem (where a bind mount came from on the host) becomes `/`,
/// a source that is a host path becomes the filesystem type, and options
/// naming host paths are dropped.
pub fn mountinfo(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        // ID PARENT MAJ:MIN ROOT POINT OPTS [TAGS…] - FSTYPE SOURCE SUPEROPTS
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mut l: Vec<&str> = left.split(' ').collect();
        if l.len() < 6 {
            continue;
        }
        l[3] = "/";
        l[2] = "0:0";
        let r: Vec<&str> = right.splitn(3, ' ').collect();
        let fstype = r.first().copied().unwrap_or("none");
        let source = r.get(1).copied().unwrap_or("none");
        let source = if hostish(source) { fstype } else { source };
        let superopts = clean_options(r.get(2).copied().unwrap_or(""));
        out.push_str(&format!(
            "{} - {fstype} {source} {superopts}\n",
            l.join(" ")
        ));
    }
    out
}

/// `/proc/PID/mounts` cleaned as [`mountinfo`] is.
pub fn mounts(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() < 4 {
            continue;
        }
        let source = if hostish(f[0]) { f[2] } else { f[0] };
        let rest = f.get(4..).map(|r| r.join(" ")).unwrap_or_default();
        out.push_str(&format!(
            "{source} {} {} {} {rest}\n",
            f[1],
            f[2],
            clean_options(f[3])
        ));
    }
    out
}

/// `struct sysinfo` (x86-64, 112 bytes) for the sandbox.
pub fn sysinfo_bytes(u: Usage, m: Memory) -> Vec<u8> {
    let mut b = vec![0u8; 112];
    let mut put = |off: usize, v: u64| b[off..off + 8].copy_from_slice(&v.to_ne_bytes());
    put(0, u.uptime as u64);
    put(32, m.total);
    put(40, m.free());
    let procs = u16::try_from(u.procs).unwrap_or(u16::MAX);
    b[80..82].copy_from_slice(&procs.to_ne_bytes());
    b[104..108].copy_from_slice(&1u32.to_ne_bytes());
    b
}

/// A boot ID in the kernel's form (a random UUID, version 4).
pub fn boot_id(random: [u8; 16]) -> String {
    let mut r = random;
    r[6] = (r[6] & 0x0f) | 0x40;
    r[8] = (r[8] & 0x3f) | 0x80;
    let h: Vec<String> = r.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}\n",
        h[0..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..16].concat()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: &str = "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n\
        model\t\t: 143\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\nstepping\t: 8\n\
        microcode\t: 0x2b000603\ncpu MHz\t\t: 2000.000\nflags\t\t: fpu vme sse avx2\n\
        bogomips\t: 4000.00\n\nprocessor\t: 1\n";

    #[test]
    fn cpuinfo_has_the_limit_and_no_model() {
        let v = SandboxView {
            cpus: Some(1.5),
            ..Default::default()
        };
        let n = v.ncpus(8);
        assert_eq!(n, 2);
        let t = cpuinfo(HOST, n);
        assert_eq!(t.matches("processor\t:").count(), 2);
        assert!(t.contains("flags\t\t: fpu vme sse avx2\n"));
        assert!(t.contains("GenuineIntel"));
        assert!(!t.contains("Xeon") && !t.contains("0x2b000603") && !t.contains("MHz"));
        assert_eq!(SandboxView::default().ncpus(8), 8);
        let set = SandboxView {
            cpuset: cpuset_count("0-2,5"),
            ..Default::default()
        };
        assert_eq!(set.ncpus(8), 4);
        assert_eq!(cpuset_count("3-1"), None);
    }

    #[test]
    fn memory_and_time() {
        let m = Memory {
            total: 1 << 30,
            used: 1 << 28,
        };
        let t = meminfo(m);
        assert!(t.starts_with("MemTotal:        1048576 kB\nMemFree:          786432 kB\n"));
        let u = Usage {
            uptime: 10.0,
            cpu: 4.0,
            procs: 3,
            started: 1_700_000_000,
        };
        assert_eq!(uptime(u, 2), "10.00 16.00\n");
        let s = stat(u, 2);
        assert!(s.starts_with("cpu  400 0 0 1600 "), "{s}");
        assert!(s.contains("\ncpu1 200 0 0 800 "));
        assert!(!s.contains("cpu2"));
        assert!(s.contains("btime 1700000000\n"));
        let b = sysinfo_bytes(u, m);
        assert_eq!(b.len(), std::mem::size_of::<libc::sysinfo>());
        assert_eq!(&b[32..40], &(1u64 << 30).to_ne_bytes());
        assert_eq!(&b[80..82], &3u16.to_ne_bytes());
        assert_eq!(cpu_list(1), "0\n");
        assert_eq!(cpu_list(4), "0-3\n");
        let id = boot_id([0xff; 16]);
        assert_eq!(id.len(), 37);
        assert_eq!(&id[14..15], "4");
    }

    #[test]
    fn mounts_lose_host_paths() {
        let mi = "22 1 0:21 / / ro,relatime - overlay overlay rw,lowerdir=/var/lib/moat/l1:/var/lib/moat/l2,upperdir=/srv/u,workdir=/srv/w\n\
                  23 22 253:1 /home/alice/data /data ro,nosuid - ext4 /dev/vda1 rw,errors=remount-ro\n\
                  24 22 0:5 / /proc rw - proc proc rw\n";
        let out = mountinfo(mi);
        assert!(!out.contains("/var/lib") && !out.contains("/home/alice") && !out.contains("/srv"));
        assert!(!out.contains("/dev/vda1") && !out.contains("253:1"));
        assert!(
            out.contains("23 22 0:0 / /data ro,nosuid - ext4 ext4 rw,errors=remount-ro\n"),
            "{out}"
        );
        assert!(out.contains("24 22 0:0 / /proc rw - proc proc rw\n"));
        let m =
            mounts("/dev/vda1 /data ext4 ro,nosuid 0 0\noverlay / overlay rw,lowerdir=/x 0 0\n");
        assert_eq!(
            m,
            "ext4 /data ext4 ro,nosuid 0 0\noverlay / overlay rw 0 0\n"
        );
    }
}
