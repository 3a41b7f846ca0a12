//! One measurement of one target: start-up, the in-workload micro
//! benchmarks, the memory a running container costs the runtime, and what
//! `moat probe` finds inside.
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;

use crate::helper::{self, Micro, Sizes};
use crate::target::Target;
use crate::work::{self, Work, DATA, HELPER};
use crate::BenchError;

/// The bundles every runtime target uses (one rootfs, one config each).
pub struct Bundles {
    pub true_: PathBuf,
    pub sleep: PathBuf,
    pub micro: PathBuf,
    pub probe: PathBuf,
}

impl Bundles {
    pub fn new(w: &Work, sizes: Sizes) -> Result<Bundles, BenchError> {
        let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
        Ok(Bundles {
            true_: w.bundle("true", &s(&["bench-true"]))?,
            sleep: w.bundle("sleep", &s(&["bench-helper", "sleep"]))?,
            micro: w.bundle(
                "micro",
                &helper::micro_args(HELPER.as_ref(), DATA.as_ref(), sizes),
            )?,
            probe: w.bundle("probe", &s(&["probe", "--json"]))?,
        })
    }
}

fn bundle_arg(b: &std::path::Path) -> String {
    b.display().to_string()
}

/// `run` of the helper's no-op, to exit (ms); the host: spawn and wait.
pub fn run_true(w: &Work, t: &Target, b: &Bundles) -> Result<f64, BenchError> {
    if t.is_host() {
        let d = w.run_ok(t.command(&w.dir, &["bench-true"]))?;
        return Ok(d.elapsed.as_secs_f64() * 1e3);
    }
    let root = w.root(t);
    let id = w.id(t, "run");
    let d = w.run_ok(t.command(&root, &["run", "--bundle", &bundle_arg(&b.true_), &id]))?;
    // runc and moat delete after `run`; a runtime that keeps it is cleaned
    // up outside the measurement.
    let _ = w.run(t.command(&root, &["delete", "--force", &id]));
    Ok(d.elapsed.as_secs_f64() * 1e3)
}

/// create → start → (poll `state` until stopped) → delete (ms).
pub fn cycle(w: &Work, t: &Target, b: &Bundles) -> Result<f64, BenchError> {
    if t.is_host() {
        return run_true(w, t, b);
    }
    let root = w.root(t);
    let id = w.id(t, "cycle");
    let start = Instant::now();
    w.run_ok(t.command(&root, &["create", "--bundle", &bundle_arg(&b.true_), &id]))?;
    w.run_ok(t.command(&root, &["start", &id]))?;
    w.wait_stopped(t, &id)?;
    w.run_ok(t.command(&root, &["delete", &id]))?;
    Ok(start.elapsed().as_secs_f64() * 1e3)
}

/// `n` `run`s started at once, until the last exits (ms).
pub fn concurrent(w: &Work, t: &Target, b: &Bundles, n: usize) -> Result<f64, BenchError> {
    let root = w.root(t);
    let mut ids = Vec::new();
    let start = Instant::now();
    let mut children = Vec::new();
    for _ in 0..n {
        let mut c = if t.is_host() {
            t.command(&root, &["bench-true"])
        } else {
            let id = w.id(t, "conc");
            let c = t.command(&root, &["run", "--bundle", &bundle_arg(&b.true_), &id]);
            ids.push(id);
            c
        };
        c.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        children.push(c.spawn().map_err(|source| BenchError::Io {
            what: format!("run {}", t.name),
            source,
        })?);
    }
    let mut failed = 0;
    for mut c in children {
        match work::wait_deadline(&mut c, std::time::Duration::from_secs(120)) {
            Ok(Some(s)) if s.success() => {}
            _ => failed += 1,
        }
    }
    let ms = start.elapsed().as_secs_f64() * 1e3;
    work::reap_orphans();
    for id in &ids {
        let _ = w.run(t.command(&root, &["delete", "--force", id]));
    }
    w.check()?;
    if failed > 0 {
        return Err(BenchError::Failed {
            what: format!("{} concurrent runs of {}", n, t.name),
            stderr: format!("{failed} failed"),
        });
    }
    Ok(ms)
}

/// The micro-benchmarks, in a container of `t` (or on the host).
pub fn micro(w: &Work, t: &Target, b: &Bundles, sizes: Sizes) -> Result<Micro, BenchError> {
    let d = if t.is_host() {
        let data = w.dir.join("host-data");
        std::fs::create_dir_all(&data).map_err(|source| BenchError::Io {
            what: "create the host data directory".into(),
            source,
        })?;
        let exe = match &t.kind {
            crate::target::Kind::Host { exe } => exe.clone(),
            crate::target::Kind::Runtime { .. } => unreachable!("checked is_host"),
        };
        let args = helper::micro_args(&exe, &data, sizes);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        w.run_ok(t.command(&w.dir, &args))?
    } else {
        let root = w.root(t);
        let id = w.id(t, "micro");
        let d = w.run_ok(t.command(&root, &["run", "--bundle", &bundle_arg(&b.micro), &id]))?;
        let _ = w.run(t.command(&root, &["delete", "--force", &id]));
        d
    };
    let line = d.stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).map_err(|e| BenchError::Failed {
        what: format!("the micro-benchmarks in {}", t.name),
        stderr: format!("unreadable output ({e}): {}", d.stderr.trim()),
    })
}

/// What one running container costs beside its workload.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Cost {
    /// Proportional set size of the processes the runtime keeps for one
    /// running container (shim, supervisor, sandbox, VMM), the workload's
    /// own processes not counted.
    pub runtime_pss_kib: u64,
    pub runtime_processes: Vec<String>,
    /// Size of the runtime's state directory while it runs.
    pub state_bytes: u64,
}

/// Starts a container that sleeps, and adds up what appeared beside it.
pub fn cost(w: &Work, t: &Target, b: &Bundles) -> Result<Cost, BenchError> {
    if t.is_host() {
        return Ok(Cost::default());
    }
    let root = w.root(t);
    let id = w.id(t, "cost");
    let before = work::all_pids();
    w.run_ok(t.command(&root, &["create", "--bundle", &bundle_arg(&b.sleep), &id]))?;
    let measured = (|| {
        w.run_ok(t.command(&root, &["start", &id]))?;
        let after = work::all_pids();
        let mut c = Cost {
            state_bytes: dir_size(&root),
            ..Cost::default()
        };
        let me = std::process::id() as i32;
        // Ours only: every process a runtime we started forks stays in our
        // subtree (we are the subreaper), whatever else the host runs.
        for pid in after.difference(&before).filter(|p| descends_from(**p, me)) {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline: Vec<String> = cmdline
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            if cmdline.is_empty() || cmdline.iter().any(|a| a == "sleep") && cmdline[0] == HELPER {
                continue;
            }
            if let Some(kib) = pss_kib(*pid) {
                c.runtime_pss_kib += kib;
                c.runtime_processes.push(cmdline.join(" "));
            }
        }
        Ok(c)
    })();
    let _ = w.run(t.command(&root, &["delete", "--force", &id]));
    measured
}

fn descends_from(mut pid: i32, ancestor: i32) -> bool {
    for _ in 0..64 {
        let Some(ppid) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                let rest = s.rsplit_once(')')?.1.to_owned();
                rest.split_whitespace().nth(1)?.parse::<i32>().ok()
            })
        else {
            return false;
        };
        if ppid == ancestor {
            return true;
        }
        if ppid <= 1 {
            return false;
        }
        pid = ppid;
    }
    false
}

fn pss_kib(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn dir_size(p: &std::path::Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![p.to_owned()];
    let mut seen = BTreeSet::new();
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            use std::os::unix::fs::MetadataExt;
            if !seen.insert((m.dev(), m.ino())) {
                continue;
            }
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total += m.len();
            }
        }
    }
    total
}

/// What `moat probe` found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Isolation {
    pub blocked: u64,
    pub allowed: u64,
    pub not_applicable: u64,
    /// The checks that found an exposure.
    pub allowed_checks: Vec<String>,
}

impl Isolation {
    /// Share of the decidable checks that found the isolation holding.
    pub fn score(&self) -> f64 {
        let n = self.blocked + self.allowed;
        if n == 0 {
            0.0
        } else {
            self.blocked as f64 / n as f64
        }
    }
}

/// `moat probe --json` inside a container of `t` (on the host for `host`).
pub fn probe(w: &Work, t: &Target, b: &Bundles) -> Result<Isolation, BenchError> {
    let d = if t.is_host() {
        w.run_ok(t.command(&w.dir, &["probe", "--json"]))?
    } else {
        let root = w.root(t);
        let id = w.id(t, "probe");
        let d = w.run_ok(t.command(&root, &["run", "--bundle", &bundle_arg(&b.probe), &id]))?;
        let _ = w.run(t.command(&root, &["delete", "--force", &id]));
        d
    };
    parse_probe(&d.stdout).ok_or_else(|| BenchError::Failed {
        what: format!("moat probe in {}", t.name),
        stderr: format!("unreadable report: {}", d.stderr.trim()),
    })
}

fn parse_probe(text: &str) -> Option<Isolation> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    let s = &v["summary"];
    Some(Isolation {
        blocked: s["blocked"].as_u64()?,
        allowed: s["allowed"].as_u64()?,
        not_applicable: s["n/a"].as_u64()?,
        allowed_checks: v["checks"]
            .as_array()?
            .iter()
            .filter(|c| c["result"] == "allowed")
            .filter_map(|c| c["id"].as_str().map(str::to_owned))
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_reports_parse() {
        let i = parse_probe(
            r#"{"checks":[{"id":"a","result":"blocked"},{"id":"b","result":"allowed"}],
                "summary":{"total":3,"blocked":1,"allowed":1,"n/a":1}}"#,
        )
        .unwrap();
        assert_eq!((i.blocked, i.allowed, i.not_applicable), (1, 1, 1));
        assert_eq!(i.allowed_checks, vec!["b"]);
        assert_eq!(i.score(), 0.5);
        assert!(parse_probe("{}").is_none());
    }
}
