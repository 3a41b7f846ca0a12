//! `moat run IMAGE`: the image side (preparing the root, its settings) and
//! `moat images` / `moat prune`. The image code itself is in
//! `moat_linux::image`.
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::SystemTime;

use anyhow::{bail, Result};
use moat_linux::container::Runtime;
use moat_linux::image::{Prepared, Source, Store};

/// Prepares `src` under the state root `root`, with a progress line on
/// stderr when it is a terminal.
pub fn prepare(root: &Path, src: &Source) -> Result<Prepared> {
    let store = Store::new(root);
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

/// `moat images`.
pub fn list(root: &Path) -> Result<i32> {
    let entries = Store::new(root).list()?;
    out!(
        "{:<19} {:>10}  {:<20}  SOURCE",
        "DIGEST",
        "SIZE",
        "LAST USED"
    );
    for e in entries {
        let short: String = e.digest.chars().take(19).collect();
        out!(
            "{short:<19} {:>10}  {:<20}  {}",
            size(e.meta.size),
            e.last_used.map(ago).unwrap_or_else(|| "-".into()),
            e.meta.source
        );
    }
    Ok(0)
}

/// `moat prune`: removes the whole cache when no container exists.
pub fn prune(rt: &Runtime, root: &Path) -> Result<i32> {
    let ids = rt.sd.list()?;
    if let Some(id) = ids.first() {
        bail!(
            "cannot remove the image cache while containers exist (first: {id}); delete them first"
        );
    }
    let n = Store::new(root).prune(&ids)?;
    out!("removed {n} cached image(s)");
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
