//! `moat policy learn`: the supervisor, in learning mode, lets every path
//! operation through and records what the workload reached and how; at
//! the end that record becomes the smallest policy (in the format of
//! docs/sandbox.md) that would have let it run.
//!
//! What each use becomes (checked when it happens, inside the container's
//! root):
//! - a directory used (listed, searched, written in): a rule on it;
//! - an existing file read, written or executed: a rule on the file;
//! - a name created (it did not exist yet): write on its directory, so
//!   the temporary names a program makes differ from run to run freely;
//! - a name looked up, read or executed that does not exist: nothing (a
//!   name no rule covers is hidden, ENOENT, as it was);
//! - a program executed: execute on it, and on the interpreter the kernel
//!   opens for it (`#!` line, ELF `PT_INTERP`), which Landlock also checks;
//! - `/proc/PID/…` (the supervisor names `/proc/self` by the caller's
//!   PID, which differs from run to run): a rule on `/proc`.
//!
//! Then, bottom up, four or more sibling rules of one access collapse
//! into a rule on their directory; a rule that its nearest covering rule
//! already grants is dropped; and the built-in policy's hidden paths
//! beneath what was granted are kept hidden.
use std::collections::BTreeMap;

use crate::policy::{clean_components, Access, Policy, Want};

/// Distinct paths recorded; past it, uses are recorded on their directory.
const MAX_PATHS: usize = 65_536;
/// Siblings of one access that collapse into their directory.
const COLLAPSE_AT: usize = 4;
/// Interpreters followed for one exec (`#!` lines, then the ELF loader).
pub const MAX_INTERPRETERS: usize = 4;

/// What a recorded path was when it was used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    /// A file, device, socket or symlink.
    Other,
    /// Not there.
    Missing,
}

/// The record of one learning run.
#[derive(Debug, Default)]
pub struct Learned {
    /// Rule path → access.
    rules: BTreeMap<String, Access>,
    /// Names the workload created (bounded like the rules).
    created: std::collections::BTreeSet<String>,
    pub families: Vec<i32>,
}

fn join(comps: &[&[u8]]) -> String {
    if comps.is_empty() {
        return "/".into();
    }
    let mut s = String::new();
    for c in comps {
        s.push('/');
        s.push_str(&String::from_utf8_lossy(c));
    }
    s
}

fn access_of(want: Want) -> Access {
    Access {
        read: want.read,
        write: want.write,
        exec: want.exec,
        hidden: false,
    }
}

/// Whether `comps` is `/proc/<number>…`.
fn is_proc_pid(comps: &[&[u8]]) -> bool {
    comps.len() >= 2 && comps[0] == b"proc" && comps[1].iter().all(u8::is_ascii_digit)
}

impl Learned {
    /// Records a use of `path` (absolute) for `want`; `kind` is what the
    /// path was then.
    pub fn record(&mut self, path: &[u8], want: Want, kind: Kind) {
        let comps = clean_components(path);
        if kind == Kind::Missing && want.write && self.created.len() < MAX_PATHS {
            self.created.insert(join(&comps));
        }
        // A program the workload made itself: execute where it made it.
        // Landlock, which holds execute in the kernel, takes its rules at
        // the start, when that file (and maybe its directory) is not there
        // yet: the rule goes on the directory that held the first name
        // the workload created on the way.
        if want.exec && kind == Kind::Other {
            if let Some(k) = (1..=comps.len()).find(|k| self.created.contains(&join(&comps[..*k])))
            {
                let key = join(&comps[..k - 1]);
                let e = self.rules.entry(key).or_default();
                *e = e.union(Access {
                    exec: true,
                    ..Access::default()
                });
                return;
            }
        }
        let (rule, access) = if is_proc_pid(&comps) {
            (vec![&b"proc"[..]], access_of(want))
        } else {
            match kind {
                Kind::Missing if !want.write => return,
                Kind::Missing => (
                    comps[..comps.len().saturating_sub(1)].to_vec(),
                    access_of(want),
                ),
                // Searching a directory is not executing it.
                Kind::Dir => (
                    comps.clone(),
                    Access {
                        exec: false,
                        ..access_of(want)
                    },
                ),
                Kind::Other => (comps.clone(), access_of(want)),
            }
        };
        let mut key = join(&rule);
        if self.rules.len() >= MAX_PATHS && !self.rules.contains_key(&key) {
            key = join(&rule[..rule.len().saturating_sub(1)]);
        }
        let e = self.rules.entry(key).or_default();
        *e = e.union(access);
    }

    /// Records a socket family created.
    pub fn family(&mut self, family: i32) {
        if !self.families.contains(&family) {
            self.families.push(family);
        }
    }

    /// The smallest policy that covers what was recorded (see the module
    /// documentation for how it is collapsed).
    pub fn policy(&self) -> Policy {
        let mut rules = self.rules.clone();
        collapse_siblings(&mut rules);
        drop_covered(&mut rules);
        keep_default_hidden(&mut rules);
        let mut families = self.families.clone();
        families.sort_unstable();
        Policy::from_learned(rules, families)
    }
}

/// The parent of a rule path (`None` for `/`).
fn parent_of(path: &str) -> Option<&str> {
    if path == "/" {
        return None;
    }
    match path.rfind('/') {
        Some(0) => Some("/"),
        Some(i) => Some(&path[..i]),
        None => None,
    }
}

fn depth(path: &str) -> usize {
    if path == "/" {
        0
    } else {
        path.matches('/').count()
    }
}

/// Deepest first: in each directory, [`COLLAPSE_AT`] or more children of
/// one access become that access on the directory.
fn collapse_siblings(rules: &mut BTreeMap<String, Access>) {
    let max = rules.keys().map(|p| depth(p)).max().unwrap_or(0);
    for d in (1..=max).rev() {
        // (directory, access) → children.
        let mut groups: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
        for (path, access) in rules.iter().filter(|(p, _)| depth(p) == d) {
            if let Some(parent) = parent_of(path) {
                groups
                    .entry((parent.to_string(), access.to_string()))
                    .or_default()
                    .push(path.clone());
            }
        }
        for ((dir, _), children) in groups {
            if children.len() < COLLAPSE_AT {
                continue;
            }
            let mut access = Access::default();
            for c in &children {
                if let Some(a) = rules.remove(c) {
                    access = access.union(a);
                }
            }
            let e = rules.entry(dir).or_default();
            *e = e.union(access);
        }
    }
}

/// The nearest rule above `path`, if any.
fn covering<'a>(rules: &'a BTreeMap<String, Access>, path: &str) -> Option<&'a Access> {
    let mut p = parent_of(path);
    while let Some(dir) = p {
        if let Some(a) = rules.get(dir) {
            return Some(a);
        }
        p = parent_of(dir);
    }
    None
}

/// Shallowest first: a rule that its nearest covering rule already grants
/// goes; any other takes that rule's access too. Rules are allow-only, but
/// the longest match decides, so a rule narrower than the one above it
/// would take away what the workload was seen to use beneath that one
/// (`/tmp` read-write for a file it created, `/tmp/out` write-execute for
/// the same file made executable: it needs all three).
fn drop_covered(rules: &mut BTreeMap<String, Access>) {
    // Lexical order visits a directory before anything beneath it.
    let paths: Vec<String> = rules.keys().cloned().collect();
    for path in paths {
        let Some(up) = covering(rules, &path).copied() else {
            continue;
        };
        let Some(access) = rules.get_mut(&path) else {
            continue;
        };
        if (!access.read || up.read) && (!access.write || up.write) && (!access.exec || up.exec) {
            rules.remove(&path);
        } else {
            *access = access.union(up);
        }
    }
}

/// The built-in policy's hidden paths that a learned rule would uncover.
fn keep_default_hidden(rules: &mut BTreeMap<String, Access>) {
    let default = Policy::default();
    for r in default.rules().iter().filter(|r| r.access.hidden) {
        if rules.contains_key(&r.path) {
            continue;
        }
        if covering(rules, &r.path).is_some() {
            rules.insert(r.path.clone(), Access::HIDDEN);
        }
    }
}

/// The interpreter the kernel opens to run the program that starts with
/// `head`: the `#!` line's program, or an ELF file's `PT_INTERP`.
pub fn interpreter(head: &[u8]) -> Option<Vec<u8>> {
    if let Some(rest) = head.strip_prefix(b"#!") {
        let line = rest.split(|b| *b == b'\n').next()?;
        // The kernel reads the name as a C string: a NUL ends it too.
        let prog = line
            .split(|b| *b == b' ' || *b == b'\t' || *b == 0)
            .find(|w| !w.is_empty())?;
        return prog.starts_with(b"/").then(|| prog.to_vec());
    }
    elf_interp(head)
}

/// `PT_INTERP` of a 64-bit little-endian ELF file, from its first bytes.
fn elf_interp(head: &[u8]) -> Option<Vec<u8>> {
    const PT_INTERP: u32 = 3;
    if head.len() < 64 || &head[..4] != b"\x7fELF" || head[4] != 2 || head[5] != 1 {
        return None;
    }
    // Offsets come from the file: none may overflow.
    let bytes_at = |o: usize, n: usize| head.get(o..o.checked_add(n)?);
    let u16_at = |o: usize| Some(u16::from_le_bytes(bytes_at(o, 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(bytes_at(o, 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(bytes_at(o, 8)?.try_into().ok()?));
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    if phentsize < 56 {
        return None;
    }
    for i in 0..phnum.min(64) {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        if u32_at(ph)? != PT_INTERP {
            continue;
        }
        let off = usize::try_from(u64_at(ph.checked_add(8)?)?).ok()?;
        let size = usize::try_from(u64_at(ph.checked_add(32)?)?).ok()?;
        let bytes = head.get(off..off.checked_add(size)?)?;
        let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
        let path = &bytes[..end];
        return path.starts_with(b"/").then(|| path.to_vec());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn learned(uses: &[(&str, Want, Kind)]) -> Policy {
        let mut l = Learned::default();
        for (p, w, k) in uses {
            l.record(p.as_bytes(), *w, *k);
        }
        l.policy()
    }

    fn rules(p: &Policy) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = p
            .rules()
            .iter()
            .map(|r| (r.path.clone(), r.access.to_string()))
            .collect();
        v.sort();
        v
    }

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn files_dirs_and_creations_become_rules() {
        let p = learned(&[
            ("/etc/passwd", Want::READ, Kind::Other),
            ("/tmp", Want::LOOKUP, Kind::Dir),
            ("/tmp/tmpab12", Want::WRITE, Kind::Missing),
            ("/tmp/tmpab12/f", Want::WRITE, Kind::Missing),
            ("/usr/bin/true", Want::EXEC, Kind::Other),
            ("/nowhere/x", Want::READ, Kind::Missing),
            ("/proc/42/status", Want::READ, Kind::Other),
        ]);
        // The built-in policy's hidden paths beneath a rule (here /proc's)
        // stay hidden.
        let mut want = pairs(&[
            ("/etc/passwd", "r"),
            ("/proc", "r"),
            ("/tmp", "w"),
            ("/usr/bin/true", "x"),
        ]);
        let default = Policy::default();
        let hidden_in_proc: Vec<(String, String)> = default
            .rules()
            .iter()
            .filter(|r| r.access.hidden && r.path.starts_with("/proc/"))
            .map(|r| (r.path.clone(), "hidden".to_string()))
            .collect();
        assert!(hidden_in_proc.contains(&("/proc/kcore".into(), "hidden".into())));
        want.extend(hidden_in_proc);
        want.sort();
        assert_eq!(rules(&p), want);
        use crate::policy::Verdict;
        assert_eq!(p.check(b"/etc/passwd", Want::READ).0, Verdict::Allow);
        assert_ne!(p.check(b"/etc/group", Want::READ).0, Verdict::Allow);
        assert_eq!(p.check(b"/tmp/tmpzz99/g", Want::WRITE).0, Verdict::Allow);
        assert_eq!(
            p.exec_paths(),
            vec![std::path::PathBuf::from("/usr/bin/true")]
        );
    }

    #[test]
    fn siblings_collapse_and_covered_rules_go() {
        let mut uses: Vec<(String, Want, Kind)> = (0..5)
            .map(|i| (format!("/usr/lib/py/m{i}.py"), Want::READ, Kind::Other))
            .collect();
        uses.push(("/usr/lib/py/sub".into(), Want::LOOKUP, Kind::Dir));
        uses.push(("/usr/lib/py/data".into(), Want::READ, Kind::Other));
        uses.push(("/usr/bin/a".into(), Want::EXEC, Kind::Other));
        let mut l = Learned::default();
        for (p, w, k) in &uses {
            l.record(p.as_bytes(), *w, *k);
        }
        assert_eq!(
            rules(&l.policy()),
            pairs(&[("/usr/bin/a", "x"), ("/usr/lib/py", "r")])
        );
    }

    #[test]
    fn a_rule_beneath_another_keeps_what_that_one_grants() {
        let p = learned(&[
            ("/srv", Want::READ, Kind::Dir),
            ("/srv/tool", Want::WRITE, Kind::Other),
            ("/srv/tool", Want::EXEC, Kind::Other),
        ]);
        assert_eq!(rules(&p), pairs(&[("/srv", "r"), ("/srv/tool", "rwx")]));
    }

    #[test]
    fn a_program_made_by_the_workload_is_executed_where_it_was_made() {
        let p = learned(&[
            ("/tmp/w", Want::WRITE, Kind::Missing),
            ("/tmp/w/m", Want::WRITE, Kind::Missing),
            ("/tmp/w/m", Want::EXEC, Kind::Other),
        ]);
        assert_eq!(rules(&p), pairs(&[("/tmp", "wx")]));
        assert_eq!(p.exec_paths(), vec![std::path::PathBuf::from("/tmp")]);
    }

    #[test]
    fn default_hidden_paths_stay_hidden() {
        let p = learned(&[
            ("/etc", Want::READ, Kind::Dir),
            ("/usr/bin/true", Want::EXEC, Kind::Other),
        ]);
        let r = rules(&p);
        assert!(r.contains(&("/etc".into(), "r".into())), "{r:?}");
        assert!(
            r.contains(&("/etc/shadow".into(), "hidden".into())),
            "{r:?}"
        );
        // Only beneath what was granted.
        assert!(!r.iter().any(|(p, _)| p == "/proc/kcore"), "{r:?}");
        let again = Policy::parse(p.to_json().as_bytes()).unwrap();
        assert_eq!(again, p);
    }

    #[test]
    fn interpreters_are_found() {
        assert_eq!(
            interpreter(b"#! /bin/sh -e\necho hi\n"),
            Some(b"/bin/sh".to_vec())
        );
        assert_eq!(interpreter(b"#!relative\n"), None);
        assert_eq!(interpreter(b"#!/bin/sh\0x\n"), Some(b"/bin/sh".to_vec()));
        assert_eq!(interpreter(b"plain text"), None);
        let me = std::fs::read("/proc/self/exe").unwrap();
        // The test binary is static or dynamic; either way no panic, and a
        // dynamic one names an absolute loader.
        if let Some(i) = interpreter(&me[..me.len().min(4096)]) {
            assert!(i.starts_with(b"/"));
        }
        let sh = std::fs::read("/bin/sh").unwrap();
        assert!(interpreter(&sh[..4096]).is_some_and(|i| i.starts_with(b"/lib")));
        // Truncated or lying headers are refused, not read past.
        let mut bad = sh[..64].to_vec();
        bad[0x38] = 0xff;
        assert_eq!(interpreter(&bad), None);
        // Offsets at the end of the address space overflow nothing.
        bad[0x20..0x28].copy_from_slice(&(u64::MAX - 3).to_le_bytes());
        bad[0x38] = 1;
        assert_eq!(interpreter(&bad), None);
    }
}
