//! What `moat bench` measures: the bare host (the floor), every moat tier
//! this host can run, and every other OCI runtime it finds or is given.
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

use crate::BenchError;

/// How the workload's system calls reach the host kernel: the question the
/// isolation column answers next to the cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reach {
    /// No isolation: the floor.
    Host,
    /// Every allowed syscall goes straight to the host kernel (runc, crun,
    /// youki, moat's container tier), filtered by seccomp.
    Direct,
    /// The workload talks to a user-space kernel (gVisor's Sentry), which
    /// makes a smaller set of host syscalls.
    UserSpaceKernel,
    /// Sensitive syscalls are decided by a supervisor first (moat sandbox).
    Supervised,
    /// The workload talks to its own guest kernel (moat microvm).
    GuestKernel,
    /// A runtime given with --runtime: not known.
    Unknown,
}

impl Reach {
    pub fn describe(self) -> &'static str {
        match self {
            Reach::Host => "host itself",
            Reach::Direct => "host kernel, filtered",
            Reach::UserSpaceKernel => "user-space kernel",
            Reach::Supervised => "host kernel after a policy check",
            Reach::GuestKernel => "guest kernel",
            Reach::Unknown => "unknown",
        }
    }
}

#[derive(Debug, Clone)]
pub enum Kind {
    /// The helper run directly, without a container.
    Host { exe: PathBuf },
    /// An OCI runtime: `bin args… --root R <command>`.
    Runtime { bin: PathBuf, args: Vec<String> },
}

#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub version: String,
    pub kind: Kind,
    pub reach: Reach,
}

impl Target {
    /// `bin args… --root root sub…` for a runtime.
    pub fn command(&self, root: &Path, sub: &[&str]) -> Command {
        match &self.kind {
            Kind::Runtime { bin, args } => {
                let mut c = Command::new(bin);
                c.args(args).arg("--root").arg(root).args(sub);
                c
            }
            Kind::Host { exe } => {
                let mut c = Command::new(exe);
                c.args(sub);
                c
            }
        }
    }

    pub fn is_host(&self) -> bool {
        matches!(self.kind, Kind::Host { .. })
    }
}

fn version_of(bin: &Path) -> String {
    Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "?".into())
}

fn in_path(prog: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join(prog))
            .find(|p| p.is_file())
    })
}

/// Parses `NAME=PATH[ ARGS…]` (a runtime given with `--runtime`).
pub fn parse_runtime(s: &str) -> Result<Target, BenchError> {
    let bad = |why: &str| BenchError::Usage(format!("--runtime {s:?}: {why} (NAME=PATH[ ARGS])"));
    let (name, rest) = s.split_once('=').ok_or_else(|| bad("no '='"))?;
    let name = name.trim();
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(bad("the name must be letters, digits, '-', '_' or '.'"));
    }
    let mut words = rest.split_whitespace();
    let bin = PathBuf::from(words.next().ok_or_else(|| bad("no path"))?);
    if !bin.is_file() {
        return Err(bad(&format!("{} is not a file", bin.display())));
    }
    Ok(Target {
        name: name.to_owned(),
        version: version_of(&bin),
        kind: Kind::Runtime {
            bin,
            args: words.map(str::to_owned).collect(),
        },
        reach: Reach::Unknown,
    })
}

/// The targets: the host, each moat tier in `tiers` (by name:
/// "container", "sandbox", "microvm"), the runtimes found in PATH, and
/// `extra`.
pub fn discover(moat: &Path, tiers: &[&str], extra: Vec<Target>) -> Vec<Target> {
    let moat_version = version_of(moat);
    let mut v = vec![Target {
        name: "host".into(),
        version: "-".into(),
        kind: Kind::Host {
            exe: moat.to_owned(),
        },
        reach: Reach::Host,
    }];
    for t in tiers {
        v.push(Target {
            name: format!("moat-{t}"),
            version: moat_version.clone(),
            kind: Kind::Runtime {
                bin: moat.to_owned(),
                args: vec!["--isolation".into(), (*t).to_owned()],
            },
            reach: match *t {
                "sandbox" => Reach::Supervised,
                "microvm" => Reach::GuestKernel,
                _ => Reach::Direct,
            },
        });
    }
    for (name, args, reach) in [
        ("runc", &[][..], Reach::Direct),
        ("crun", &[], Reach::Direct),
        ("youki", &[], Reach::Direct),
        // gVisor needs its own network stack off to run in a plain netns.
        ("runsc", &["--network=none"], Reach::UserSpaceKernel),
    ] {
        if extra.iter().any(|e| e.name == name) {
            continue;
        }
        if let Some(bin) = in_path(name) {
            v.push(Target {
                name: name.into(),
                version: version_of(&bin),
                kind: Kind::Runtime {
                    bin,
                    args: args.iter().map(|s: &&str| (*s).to_owned()).collect(),
                },
                reach,
            });
        }
    }
    v.extend(extra);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_flags_parse() {
        let t = parse_runtime("mine=/bin/true --debug --x=1").unwrap();
        assert_eq!(t.name, "mine");
        match t.kind {
            Kind::Runtime { bin, args } => {
                assert_eq!(bin, Path::new("/bin/true"));
                assert_eq!(args, vec!["--debug", "--x=1"]);
            }
            Kind::Host { .. } => panic!("not a runtime"),
        }
        for bad in [
            "nothing",
            "=/bin/true",
            "a b=/bin/true",
            "x=",
            "x=/no/such/file",
        ] {
            let e = parse_runtime(bad).unwrap_err().to_string();
            assert!(e.starts_with("--runtime"), "{bad}: {e}");
        }
    }
}
