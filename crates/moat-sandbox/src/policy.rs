//! The sandbox policy: what the workload may do with each path of its
//! container, and which sockets it may create. A JSON document
//! (docs/sandbox.md has the format); [`Policy::default`] is built in.
//!
//! ```json
//! {"version": 1,
//!  "paths": {"/": "r", "/usr": "rx", "/tmp": "rwx", "/etc/shadow": "hidden"},
//!  "socket_families": ["unix", "inet", "inet6", "netlink"]}
//! ```
//!
//! Each path rule grants its access beneath it; the longest matching rule
//! (by whole components) decides. Access is a combination of `r` (read,
//! list), `w` (create, write, remove, change metadata) and `x` (execute),
//! or `none` (EACCES) or `hidden` (ENOENT: the path seems not to exist).
//! A path no rule covers is hidden.
use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// The annotation that carries a policy on the OCI path: a JSON policy, or
/// `default`.
pub use moat_core::tier::SANDBOX_POLICY_ANNOTATION as POLICY_ANNOTATION;

/// Largest policy document accepted (it arrives in an annotation).
pub const MAX_POLICY_BYTES: usize = 256 * 1024;
/// Most path rules in one policy.
pub const MAX_RULES: usize = 4096;
/// Longest rule path.
pub const MAX_RULE_PATH: usize = 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("sandbox policy is not valid JSON: {0}")]
    Json(String),
    #[error("sandbox policy is larger than {MAX_POLICY_BYTES} bytes")]
    TooLarge,
    #[error("sandbox policy version {0} is not supported (this moat reads version 1)")]
    Version(u32),
    #[error("sandbox policy has more than {MAX_RULES} path rules")]
    TooManyRules,
    #[error("sandbox policy path {0:?} must be absolute, without `.` or `..`, at most {MAX_RULE_PATH} bytes")]
    BadPath(String),
    #[error("sandbox policy access {0:?} for {1:?} is not `hidden`, `none` or letters of `rwx`")]
    BadAccess(String, String),
    #[error("sandbox policy socket family {0:?} is unknown (unix, inet, inet6, netlink, packet)")]
    BadFamily(String),
    #[error("sandbox policy kernel {0} must be 1 to {MAX_UNAME} printable ASCII characters")]
    BadKernel(&'static str),
}

/// Longest `kernel.release` or `kernel.version` (a `utsname` field).
pub const MAX_UNAME: usize = 64;

/// The kernel release and version the workload is shown (`uname`,
/// /proc/version, /proc/sys/kernel/{osrelease,version}): the policy's
/// `kernel`, else these neutral ones, never the host's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kernel {
    #[serde(default = "default_release")]
    pub release: String,
    #[serde(default = "default_version")]
    pub version: String,
}

pub const DEFAULT_RELEASE: &str = "6.1.0-moat";
pub const DEFAULT_VERSION: &str = "#1 SMP PREEMPT_DYNAMIC";

fn default_release() -> String {
    DEFAULT_RELEASE.into()
}

fn default_version() -> String {
    DEFAULT_VERSION.into()
}

impl Default for Kernel {
    fn default() -> Kernel {
        Kernel {
            release: default_release(),
            version: default_version(),
        }
    }
}

impl Kernel {
    fn check(&self) -> Result<(), PolicyError> {
        let ok = |s: &str| {
            !s.is_empty() && s.len() <= MAX_UNAME && s.bytes().all(|b| (0x20..0x7f).contains(&b))
        };
        if !ok(&self.release) {
            return Err(PolicyError::BadKernel("release"));
        }
        if !ok(&self.version) {
            return Err(PolicyError::BadKernel("version"));
        }
        Ok(())
    }
}

/// What a path rule grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Access {
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    /// ENOENT rather than EACCES when refused.
    pub hidden: bool,
}

impl Access {
    pub const HIDDEN: Access = Access {
        read: false,
        write: false,
        exec: false,
        hidden: true,
    };

    pub fn parse(s: &str) -> Option<Access> {
        match s {
            "hidden" => return Some(Access::HIDDEN),
            "none" => return Some(Access::default()),
            "" => return None,
            _ => {}
        }
        let mut a = Access::default();
        for c in s.chars() {
            let slot = match c {
                'r' => &mut a.read,
                'w' => &mut a.write,
                'x' => &mut a.exec,
                _ => return None,
            };
            if std::mem::replace(slot, true) {
                return None;
            }
        }
        Some(a)
    }

    /// Whether this grants everything `want` asks for.
    pub fn covers(&self, want: Want) -> bool {
        (!want.read || self.read) && (!want.write || self.write) && (!want.exec || self.exec)
    }

    pub fn union(self, other: Access) -> Access {
        Access {
            read: self.read || other.read,
            write: self.write || other.write,
            exec: self.exec || other.exec,
            hidden: false,
        }
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.hidden {
            return f.write_str("hidden");
        }
        if !(self.read || self.write || self.exec) {
            return f.write_str("none");
        }
        for (on, c) in [(self.read, "r"), (self.write, "w"), (self.exec, "x")] {
            if on {
                f.write_str(c)?;
            }
        }
        Ok(())
    }
}

/// What an operation needs. `Want::default()` (nothing) is a lookup: stat,
/// `O_PATH`, chdir, which only a hidden path refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Want {
    pub read: bool,
    pub write: bool,
    pub exec: bool,
}

impl Want {
    pub const LOOKUP: Want = Want {
        read: false,
        write: false,
        exec: false,
    };
    pub const READ: Want = Want {
        read: true,
        write: false,
        exec: false,
    };
    pub const WRITE: Want = Want {
        read: false,
        write: true,
        exec: false,
    };
    pub const EXEC: Want = Want {
        read: false,
        write: false,
        exec: true,
    };
}

/// The verdict on one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Refused: `errno` is ENOENT for a hidden path, else EACCES.
    Deny {
        errno: i32,
    },
}

/// The document, as written.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct Document {
    version: u32,
    #[serde(default)]
    paths: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    socket_families: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kernel: Option<Kernel>,
}

/// A checked policy, ready to decide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Path rules, deepest first (so the first match is the longest).
    rules: Vec<Rule>,
    /// Address families `socket(2)` may create.
    pub socket_families: Vec<i32>,
    /// What `uname` and /proc say the kernel is.
    pub kernel: Kernel,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub path: String,
    components: Vec<Vec<u8>>,
    pub access: Access,
}

const FAMILIES: &[(&str, i32)] = &[
    ("unix", libc::AF_UNIX),
    ("inet", libc::AF_INET),
    ("inet6", libc::AF_INET6),
    ("netlink", libc::AF_NETLINK),
    ("packet", libc::AF_PACKET),
];

fn family_name(f: i32) -> &'static str {
    FAMILIES
        .iter()
        .find(|(_, v)| *v == f)
        .map(|(n, _)| *n)
        .unwrap_or("?")
}

/// The built-in policy: the system directories readable and executable,
/// the rest of the root readable, the writable mounts of `moat run`
/// (/tmp, $HOME, /dev/shm) writable and executable (programs build and run
/// code there), devices and /proc readable and writable (the container
/// tier's masks and read-only mounts still apply), secrets of the host's
/// /etc hidden, and what /proc and /sys say of the host's hardware, kernel
/// and devices hidden (the supervisor serves the sandbox's own cpuinfo,
/// meminfo, stat, uptime, CPU lists…; /sys keeps the sandbox's network
/// devices and cgroup).
pub const DEFAULT_POLICY: &str = r#"{
  "version": 1,
  "paths": {
    "/": "r",
    "/bin": "rx", "/sbin": "rx", "/usr": "rx", "/opt": "rx",
    "/lib": "rx", "/lib32": "rx", "/lib64": "rx", "/libx32": "rx",
    "/tmp": "rwx", "/var/tmp": "rwx", "/home": "rwx", "/root": "rwx", "/run": "rwx",
    "/var/run": "rwx",
    "/dev": "rw", "/dev/shm": "rwx", "/proc": "rw", "/sys": "r",
    "/etc/shadow": "hidden", "/etc/shadow-": "hidden", "/etc/gshadow": "hidden",
    "/etc/gshadow-": "hidden", "/etc/sudoers": "hidden", "/etc/sudoers.d": "hidden",
    "/etc/ssh": "hidden", "/etc/ssl/private": "hidden",
    "/sys/kernel": "hidden", "/sys/firmware": "hidden", "/sys/hypervisor": "hidden",
    "/sys/power": "hidden", "/sys/module": "hidden", "/sys/bus": "hidden",
    "/sys/block": "hidden", "/sys/dev": "hidden", "/sys/class": "hidden",
    "/sys/class/net": "r", "/sys/devices": "hidden", "/sys/devices/virtual/net": "r",
    "/sys/devices/system/cpu/online": "r", "/sys/devices/system/cpu/possible": "r",
    "/sys/devices/system/cpu/present": "r", "/sys/fs/ext4": "hidden", "/sys/fs/btrfs": "hidden",
    "/sys/fs/xfs": "hidden", "/sys/fs/f2fs": "hidden", "/sys/fs/bpf": "hidden",
    "/sys/fs/pstore": "hidden", "/sys/fs/fuse": "hidden",
    "/proc/kcore": "hidden", "/proc/kallsyms": "hidden", "/proc/sysrq-trigger": "hidden",
    "/proc/cmdline": "hidden", "/proc/config.gz": "hidden", "/proc/iomem": "hidden",
    "/proc/ioports": "hidden", "/proc/interrupts": "hidden", "/proc/softirqs": "hidden",
    "/proc/irq": "hidden", "/proc/partitions": "hidden", "/proc/diskstats": "hidden",
    "/proc/devices": "hidden", "/proc/misc": "hidden", "/proc/modules": "hidden",
    "/proc/zoneinfo": "hidden", "/proc/buddyinfo": "hidden", "/proc/pagetypeinfo": "hidden",
    "/proc/vmallocinfo": "hidden", "/proc/slabinfo": "hidden", "/proc/vmstat": "hidden",
    "/proc/swaps": "hidden", "/proc/mtrr": "hidden", "/proc/schedstat": "hidden",
    "/proc/sched_debug": "hidden", "/proc/timer_list": "hidden", "/proc/crypto": "hidden",
    "/proc/dma": "hidden", "/proc/fb": "hidden", "/proc/consoles": "hidden",
    "/proc/driver": "hidden", "/proc/bus": "hidden", "/proc/acpi": "hidden",
    "/proc/scsi": "hidden", "/proc/keys": "hidden", "/proc/key-users": "hidden",
    "/proc/kpagecount": "hidden", "/proc/kpageflags": "hidden", "/proc/kpagecgroup": "hidden",
    "/proc/latency_stats": "hidden", "/proc/lock_stat": "hidden", "/proc/pressure": "hidden",
    "/proc/sys/dev": "hidden"
  },
  "socket_families": ["unix", "inet", "inet6", "netlink"]
}"#;

impl Default for Policy {
    fn default() -> Policy {
        // The built-in text is checked by a unit test.
        Policy::parse(DEFAULT_POLICY.as_bytes()).unwrap_or_else(|_| Policy {
            rules: Vec::new(),
            socket_families: Vec::new(),
            kernel: Kernel::default(),
        })
    }
}

/// The components of an absolute path, or `None` when it is not one
/// (relative, or with `.`/`..`/empty components past the leading `/`).
fn components(path: &[u8]) -> Option<Vec<Vec<u8>>> {
    let rest = path.strip_prefix(b"/")?;
    let mut out = Vec::new();
    for c in rest.split(|b| *b == b'/') {
        match c {
            b"" | b"." | b".." => return None,
            c => out.push(c.to_vec()),
        }
    }
    Some(out)
}

/// The components of an absolute path, cleaned lexically (`.`, empty and
/// `..` at the top dropped, `..` popping). What the kernel resolved is
/// checked again on the canonical path; this only names it.
pub fn clean_components(path: &[u8]) -> Vec<&[u8]> {
    let mut out: Vec<&[u8]> = Vec::new();
    for c in path.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

impl Policy {
    /// Parses and checks a policy document.
    pub fn parse(text: &[u8]) -> Result<Policy, PolicyError> {
        if text.len() > MAX_POLICY_BYTES {
            return Err(PolicyError::TooLarge);
        }
        let doc: Document =
            serde_json::from_slice(text).map_err(|e| PolicyError::Json(e.to_string()))?;
        if doc.version != 1 {
            return Err(PolicyError::Version(doc.version));
        }
        if doc.paths.len() > MAX_RULES {
            return Err(PolicyError::TooManyRules);
        }
        let mut rules = Vec::with_capacity(doc.paths.len());
        for (path, access) in &doc.paths {
            let comps = if path == "/" {
                Some(Vec::new())
            } else if path.len() > MAX_RULE_PATH || path.ends_with('/') {
                None
            } else {
                components(path.as_bytes())
            };
            let components = comps.ok_or_else(|| PolicyError::BadPath(path.clone()))?;
            let access = Access::parse(access)
                .ok_or_else(|| PolicyError::BadAccess(access.clone(), path.clone()))?;
            rules.push(Rule {
                path: path.clone(),
                components,
                access,
            });
        }
        rules.sort_by_key(|r| std::cmp::Reverse(r.components.len()));
        let socket_families = match &doc.socket_families {
            None => vec![
                libc::AF_UNIX,
                libc::AF_INET,
                libc::AF_INET6,
                libc::AF_NETLINK,
            ],
            Some(names) => names
                .iter()
                .map(|n| {
                    FAMILIES
                        .iter()
                        .find(|(name, _)| name == n)
                        .map(|(_, v)| *v)
                        .ok_or_else(|| PolicyError::BadFamily(n.clone()))
                })
                .collect::<Result<_, _>>()?,
        };
        let kernel = doc.kernel.unwrap_or_default();
        kernel.check()?;
        Ok(Policy {
            rules,
            socket_families,
            kernel,
        })
    }

    /// The policy an annotation value names: `default` or a document.
    pub fn from_annotation(value: &str) -> Result<Policy, PolicyError> {
        if value.trim() == "default" {
            return Ok(Policy::default());
        }
        Policy::parse(value.as_bytes())
    }

    /// The document form (what `moat policy learn` writes).
    pub fn to_json(&self) -> String {
        let mut rules: Vec<&Rule> = self.rules.iter().collect();
        rules.sort_by(|a, b| a.path.cmp(&b.path));
        let paths: Vec<String> = rules
            .iter()
            .map(|r| {
                format!(
                    "    {}: \"{}\"",
                    serde_json::Value::from(r.path.as_str()),
                    r.access
                )
            })
            .collect();
        let fams: Vec<String> = self
            .socket_families
            .iter()
            .map(|f| format!("\"{}\"", family_name(*f)))
            .collect();
        let kernel = if self.kernel == Kernel::default() {
            String::new()
        } else {
            format!(
                ",\n  \"kernel\": {}",
                serde_json::to_string(&self.kernel).unwrap_or_default()
            )
        };
        format!(
            "{{\n  \"version\": 1,\n  \"paths\": {{\n{}\n  }},\n  \"socket_families\": [{}]{kernel}\n}}\n",
            paths.join(",\n"),
            fams.join(", ")
        )
    }

    /// The rule deciding `components` (cleaned, absolute), if any.
    pub fn rule_for(&self, comps: &[&[u8]]) -> Option<&Rule> {
        self.rules.iter().find(|r| {
            r.components.len() <= comps.len()
                && r.components
                    .iter()
                    .zip(comps)
                    .all(|(a, b)| a.as_slice() == *b)
        })
    }

    /// The verdict on `path` (absolute; cleaned here) for `want`, and the
    /// rule that gave it.
    pub fn check(&self, path: &[u8], want: Want) -> (Verdict, Option<&Rule>) {
        let comps = clean_components(path);
        let rule = self.rule_for(&comps);
        let access = rule.map(|r| r.access).unwrap_or(Access::HIDDEN);
        let verdict = if access.hidden {
            Verdict::Deny {
                errno: libc::ENOENT,
            }
        } else if access.covers(want) {
            Verdict::Allow
        } else {
            Verdict::Deny {
                errno: libc::EACCES,
            }
        };
        (verdict, rule)
    }

    /// Paths beneath which execution is allowed, for the workload's
    /// Landlock ruleset: what the supervisor decides about an exec then
    /// holds in the kernel when a racing thread changes the path.
    pub fn exec_paths(&self) -> Vec<std::path::PathBuf> {
        let mut v: Vec<std::path::PathBuf> = self
            .rules
            .iter()
            .filter(|r| r.access.exec)
            .map(|r| std::path::PathBuf::from(&r.path))
            .collect();
        v.sort();
        v
    }

    /// A policy from learned rules (path → access), with the socket
    /// families seen.
    pub fn from_learned(paths: BTreeMap<String, Access>, families: Vec<i32>) -> Policy {
        let mut rules: Vec<Rule> = paths
            .into_iter()
            .filter_map(|(path, access)| {
                let components = if path == "/" {
                    Vec::new()
                } else {
                    components(path.as_bytes())?
                };
                Some(Rule {
                    path,
                    components,
                    access,
                })
            })
            .collect();
        rules.sort_by_key(|r| std::cmp::Reverse(r.components.len()));
        Policy {
            rules,
            socket_families: families,
            kernel: Kernel::default(),
        }
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policy_parses_and_decides() {
        let p = Policy::parse(DEFAULT_POLICY.as_bytes()).unwrap();
        assert_eq!(p, Policy::default());
        let ok = |path: &str, want| p.check(path.as_bytes(), want).0;
        assert_eq!(ok("/usr/bin/gcc", Want::EXEC), Verdict::Allow);
        assert_eq!(ok("/etc/passwd", Want::READ), Verdict::Allow);
        assert_eq!(
            ok("/etc/passwd", Want::WRITE),
            Verdict::Deny {
                errno: libc::EACCES
            }
        );
        assert_eq!(
            ok("/etc/shadow", Want::LOOKUP),
            Verdict::Deny {
                errno: libc::ENOENT
            }
        );
        // Prefixes match whole components only.
        assert_eq!(ok("/etc/shadowy", Want::READ), Verdict::Allow);
        // `..` is cleaned before matching.
        assert_eq!(
            ok("/tmp/../etc/shadow", Want::READ),
            Verdict::Deny {
                errno: libc::ENOENT
            }
        );
        assert_eq!(ok("/tmp/x/../y", Want::WRITE), Verdict::Allow);
        assert_eq!(ok("/", Want::READ), Verdict::Allow);
        assert!(p.exec_paths().contains(&std::path::PathBuf::from("/usr")));
        assert!(!p.exec_paths().contains(&std::path::PathBuf::from("/")));
    }

    #[test]
    fn uncovered_paths_are_hidden() {
        let p = Policy::parse(br#"{"version":1,"paths":{"/usr":"r"}}"#).unwrap();
        assert_eq!(
            p.check(b"/etc/passwd", Want::READ).0,
            Verdict::Deny {
                errno: libc::ENOENT
            }
        );
    }

    #[test]
    fn bad_documents_are_refused() {
        let cases: &[(&[u8], &str)] = &[
            (b"{", "Json"),
            (br#"{"version":2}"#, "Version"),
            (br#"{"version":1,"paths":{"usr":"r"}}"#, "BadPath"),
            (br#"{"version":1,"paths":{"/a/../b":"r"}}"#, "BadPath"),
            (br#"{"version":1,"paths":{"/a/":"r"}}"#, "BadPath"),
            (br#"{"version":1,"paths":{"/a":"rr"}}"#, "BadAccess"),
            (br#"{"version":1,"paths":{"/a":"q"}}"#, "BadAccess"),
            (br#"{"version":1,"socket_families":["vsock"]}"#, "BadFamily"),
            (br#"{"version":1,"extra":1}"#, "Json"),
            (br#"{"version":1,"kernel":{"release":""}}"#, "BadKernel"),
            (br#"{"version":1,"kernel":{"version":"a\nb"}}"#, "BadKernel"),
            (br#"{"version":1,"kernel":{"machine":"x"}}"#, "Json"),
        ];
        for (text, want) in cases {
            let e = Policy::parse(text).unwrap_err();
            assert!(format!("{e:?}").starts_with(want), "{e:?}");
        }
        assert_eq!(
            Policy::parse(&vec![b' '; MAX_POLICY_BYTES + 1]).unwrap_err(),
            PolicyError::TooLarge
        );
    }

    #[test]
    fn json_round_trips() {
        let p = Policy::default();
        assert_eq!(Policy::parse(p.to_json().as_bytes()).unwrap(), p);
        let k = Policy::parse(br#"{"version":1,"kernel":{"release":"5.15.0"}}"#).unwrap();
        assert_eq!(k.kernel.release, "5.15.0");
        assert_eq!(k.kernel.version, DEFAULT_VERSION);
        assert_eq!(Policy::parse(k.to_json().as_bytes()).unwrap(), k);
    }
}
