//! `moat run IMAGE`: the image side (preparing the root, its settings) and
//! `moat images` / `moat prune`. The image code itself is in
//! `moat_image`.
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::tiers::Tiers;
use anyhow::{bail, Context, Result};
use moat_image::{Prepared, Source, Store};

/// Prepares `src` under the state root `root`, with a progress line on
/// stderr when it is a terminal.
pub fn prepare(root: &Path, src: &Source) -> Result<Prepared> {
    let store = Store::from_env(root)?;
    let tty = std::io::stderr().is_terminal();
    let what = src.describe();
    let mut last_pct = u64::MAX;
    let mut shown = false;
    let mut progress = |done: u64, total: u64| {
        if !tty || total == 0 {
            return;
        }
        let pct = (done.min(total) * 100) / total;
        if pct != last_pct {
            last_pct = pct;
            shown = true;
            let mut e = std::io::stderr().lock();
            let _ = write!(
                e,
                "\rmoat: unpacking {what}: {:.1}/{:.1} MiB ({pct}%)",
                done.min(total) as f64 / 1048576.0,
                total as f64 / 1048576.0
            );
        }
    };
    let r = store.prepare(src, &mut progress);
    if shown {
        eprintln!();
    }
    Ok(r?)
}

/// `moat images`: each image with its size (all its layers) and how much
/// of that it shares with other cached images (layers they list too).
pub fn list(root: &Path) -> Result<i32> {
    let entries = Store::new(root).list()?;
    out!(
        "{:<19} {:>10} {:>10}  {:<20}  SOURCE",
        "DIGEST",
        "SIZE",
        "SHARED",
        "LAST USED"
    );
    for (i, e) in entries.iter().enumerate() {
        let short: String = e.digest.chars().take(19).collect();
        let shared: u64 = e
            .meta
            .layers
            .iter()
            .filter(|l| {
                entries
                    .iter()
                    .enumerate()
                    .any(|(j, o)| j != i && o.meta.layers.iter().any(|x| x.digest == l.digest))
            })
            .map(|l| l.size)
            .sum();
        out!(
            "{short:<19} {:>10} {:>10}  {:<20}  {}",
            size(e.meta.size),
            size(shared),
            e.last_used.map(ago).unwrap_or_else(|| "-".into()),
            e.meta.source
        );
    }
    Ok(0)
}

/// The file in a run's bundle (`<root>/.run/<id>/image`) naming the
/// cached image it runs on, so `moat prune` can tell it is in use.
pub const IN_USE: &str = "image";

/// `moat prune [IMAGE...] [--unused-for DURATION]`.
#[derive(Debug, Clone, clap::Args)]
pub struct PruneArgs {
    /// Images to remove: digests or unique prefixes, as `moat images` shows them (all when none)
    pub images: Vec<String>,
    /// Only images not used for this long: a number and s, m, h, d or w (e.g. 90m, 7d)
    #[arg(long = "unused-for", value_parser = parse_duration)]
    pub unused_for: Option<Duration>,
}

/// `5s`, `90m`, `12h`, `7d`, `2w`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?}: expected a number and s, m, h, d or w (e.g. 90m, 7d)");
    let (num, unit) = s.split_at(s.len().saturating_sub(1));
    let n: u64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        "w" => 7 * 86400,
        _ => return Err(bad()),
    };
    n.checked_mul(secs).map(Duration::from_secs).ok_or_else(bad)
}

/// Digests of the cached images that runs in progress use, with the run's
/// ID (from the [`IN_USE`] files of `<root>/.run/*`).
fn in_use(root: &Path) -> Vec<(String, String)> {
    let Ok(rd) = std::fs::read_dir(root.join(".run")) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let d = std::fs::read_to_string(e.path().join(IN_USE)).ok()?;
            Some((
                d.trim().to_string(),
                e.file_name().to_string_lossy().into_owned(),
            ))
        })
        .collect()
}

/// `moat prune`: without arguments removes the whole cache when no
/// container exists; else the images named and/or unused for a while,
/// never one that a run in progress uses, and then every layer that no
/// remaining image lists.
pub fn prune(tiers: &Tiers, root: &Path, a: &PruneArgs) -> Result<i32> {
    // What killed runs left (their directories keep images "in use", their
    // half-made containers block removing the whole cache).
    crate::run::sweep_orphans(tiers, root);
    let store = Store::new(root);
    if a.images.is_empty() && a.unused_for.is_none() {
        let ids = tiers.state_dir().list()?;
        if let Some(id) = ids.first() {
            bail!(
                "cannot remove the image cache while containers exist (first: {id}); delete them first"
            );
        }
        let n = store.prune(&ids)?;
        // The runtime's own caches (prebuilt roots, compiled seccomp
        // programs) are rebuilt on demand: cleared with the images.
        let cache = root.join(".cache");
        match std::fs::remove_dir_all(&cache) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot remove {}", cache.display())),
        }
        out!("removed {n} cached image(s) and the runtime caches (.cache/)");
        return Ok(0);
    }
    let used = in_use(root);
    let user = |d: &str| used.iter().find(|(u, _)| u == d).map(|(_, id)| id.clone());
    let named: Vec<String> = a
        .images
        .iter()
        .map(|p| store.resolve(p))
        .collect::<Result<_, _>>()?;
    for d in &named {
        if let Some(id) = user(d) {
            bail!("cannot remove {d}: the run {id} uses it");
        }
    }
    let now = SystemTime::now();
    let mut n = 0;
    for e in store.list()? {
        if !a.images.is_empty() && !named.contains(&e.digest) {
            continue;
        }
        if let Some(d) = a.unused_for {
            let idle = e
                .last_used
                .and_then(|t| now.duration_since(t).ok())
                .unwrap_or(Duration::MAX);
            if idle < d {
                continue;
            }
        }
        if let Some(id) = user(&e.digest) {
            eprintln!("moat: keeping {}: the run {id} uses it", e.digest);
            continue;
        }
        store.remove(&e.digest)?;
        n += 1;
    }
    let layers = store.remove_unused_layers()?;
    out!("removed {n} cached image(s), {layers} unused layer(s)");
    Ok(0)
}

fn size(n: u64) -> String {
    if n >= 1 << 30 {
        format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64)
    } else if n >= 1 << 20 {
        format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB", n as f64 / 1024.0)
    }
}

fn ago(t: SystemTime) -> String {
    let s = SystemTime::now()
        .duration_since(t)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    match s {
        0..60 => format!("{s} seconds ago"),
        60..3600 => format!("{} minutes ago", s / 60),
        3600..86400 => format!("{} hours ago", s / 3600),
        _ => format!("{} days ago", s / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(604800)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("2w"), Ok(Duration::from_secs(1209600)));
        for bad in ["", "d", "7", "7y", "-1d", "1.5h", "99999999999999999999w"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
