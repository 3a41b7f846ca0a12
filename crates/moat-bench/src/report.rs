//! The results: a table for the terminal, a JSON document (schema in
//! docs/bench.schema.json), and an SVG chart of cost against isolation.
use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::measure::{Cost, Isolation};
use crate::stats::Summary;
use crate::target::Reach;

/// One metric of one target.
#[derive(Debug, Clone, Serialize)]
pub struct Metric {
    pub unit: &'static str,
    #[serde(flatten)]
    pub summary: Summary,
    /// median / the baseline's median; absent when the baseline lacks it.
    pub ratio: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TargetReport {
    pub name: String,
    pub version: String,
    pub reach: Reach,
    pub metrics: BTreeMap<&'static str, Metric>,
    pub cost: Option<Cost>,
    pub isolation: Option<Isolation>,
    /// What failed for this target (it stays in the report with what did
    /// not fail).
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub moat_version: String,
    pub kernel: String,
    pub cpus: usize,
    pub quick: bool,
    pub iterations: usize,
    pub concurrency: usize,
    pub baseline: String,
    pub targets: Vec<TargetReport>,
}

/// The metrics in the order the table shows them: key, label, unit.
pub const METRICS: &[(&str, &str, &str)] = &[
    ("run_true", "run of a no-op", "ms"),
    ("create_start_delete", "create→start→wait→delete", "ms"),
    ("concurrent", "N runs at once, wall", "ms"),
    ("getpid", "getpid", "ns"),
    ("open_close", "open+close", "ns"),
    ("stat", "stat", "ns"),
    ("fork_exec_wait", "fork+exec+wait", "µs"),
    ("write_fsync", "4 KiB write+fsync", "µs"),
    ("pipe_rtt", "pipe round trip", "µs"),
    ("tcp_rtt", "loopback TCP round trip", "µs"),
    ("touch_page", "first touch of a page", "ns"),
];

pub fn unit_of(key: &str) -> &'static str {
    METRICS
        .iter()
        .find(|m| m.0 == key)
        .map(|m| m.2)
        .unwrap_or("")
}

fn fmt_num(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The terminal table: a row per metric, a column per target; each cell is
/// `median [p95] ratio`.
pub fn table(r: &Report) -> String {
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut head = vec!["metric".to_string()];
    head.extend(r.targets.iter().map(|t| t.name.clone()));
    rows.push(head);
    for (key, label, unit) in METRICS {
        let label = if *key == "concurrent" {
            format!("{} runs at once, wall", r.concurrency)
        } else {
            (*label).to_string()
        };
        let mut row = vec![format!("{label} ({unit})")];
        for t in &r.targets {
            row.push(match t.metrics.get(key) {
                Some(m) => {
                    let ratio = m.ratio.map_or(String::new(), |x| format!(" {x:.2}x"));
                    format!(
                        "{} [{}]{ratio}",
                        fmt_num(m.summary.median),
                        fmt_num(m.summary.p95)
                    )
                }
                None => "-".into(),
            });
        }
        rows.push(row);
    }
    let mut mem = vec!["runtime memory per container (KiB Pss)".to_string()];
    let mut iso = vec!["probe: blocked / allowed".to_string()];
    let mut reach = vec!["syscalls reach".to_string()];
    for t in &r.targets {
        mem.push(
            t.cost
                .as_ref()
                .map_or("-".into(), |c| c.runtime_pss_kib.to_string()),
        );
        iso.push(
            t.isolation
                .as_ref()
                .map_or("-".into(), |i| format!("{} / {}", i.blocked, i.allowed)),
        );
        reach.push(t.reach.describe().to_string());
    }
    rows.extend([mem, iso, reach]);
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "moat bench: {} iterations, interleaved; {} {}, {} CPUs; median [p95] ratio-to-{}",
        r.iterations,
        if r.quick { "quick," } else { "" },
        r.kernel,
        r.cpus,
        r.baseline
    );
    for (i, row) in rows.iter().enumerate() {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, v)| {
                if c == 0 {
                    format!("{v:<w$}", w = widths[c])
                } else {
                    format!("{v:>w$}", w = widths[c])
                }
            })
            .collect();
        let _ = writeln!(out, "{}", cells.join("  "));
        if i == 0 {
            let total: usize = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
            let _ = writeln!(out, "{}", "-".repeat(total));
        }
    }
    for t in &r.targets {
        for e in &t.errors {
            let _ = writeln!(out, "{}: {e}", t.name);
        }
    }
    out
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Cost (start-up, log scale) against isolation (share of probe checks
/// blocked): one point per target, the better corner top left.
pub fn svg(r: &Report) -> String {
    let (w, h) = (720.0_f64, 460.0_f64);
    let (left, right, top, bottom) = (70.0, 30.0, 50.0, 60.0);
    let pts: Vec<(&TargetReport, f64, f64)> = r
        .targets
        .iter()
        .filter_map(|t| {
            let x = t.metrics.get("run_true")?.summary.median;
            let y = t.isolation.as_ref()?.score();
            (x > 0.0).then_some((t, x, y))
        })
        .collect();
    let (lo, hi) = pts.iter().fold((f64::MAX, f64::MIN), |(lo, hi), p| {
        (lo.min(p.1), hi.max(p.1))
    });
    let (lo, hi) = if pts.is_empty() {
        (1.0, 100.0)
    } else {
        (
            10f64.powf(lo.log10().floor()),
            10f64.powf(hi.log10().ceil().max(lo.log10().floor() + 1.0)),
        )
    };
    let px =
        |x: f64| left + (x.log10() - lo.log10()) / (hi.log10() - lo.log10()) * (w - left - right);
    let py = |y: f64| top + (1.0 - y) * (h - top - bottom);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="28" font-size="16" text-anchor="middle">Isolation against start-up cost ({} on {})</text>"#,
        w / 2.0,
        esc(&r.moat_version),
        esc(&r.kernel)
    );
    // Axes and grid.
    let (x0, x1, y0, y1) = (left, w - right, top, h - bottom);
    let _ = writeln!(
        s,
        r##"<path d="M{x0} {y0} V{y1} H{x1}" stroke="#333" fill="none"/>"##
    );
    let mut decade = lo;
    while decade <= hi * 1.0001 {
        let x = px(decade);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{y0}" x2="{x:.1}" y2="{y1}" stroke="#ddd"/><text x="{x:.1}" y="{}" font-size="12" text-anchor="middle">{}</text>"##,
            y1 + 16.0,
            fmt_num(decade)
        );
        decade *= 10.0;
    }
    for q in 0..=4 {
        let y = f64::from(q) / 4.0;
        let _ = writeln!(
            s,
            r##"<line x1="{x0}" y1="{:.1}" x2="{x1}" y2="{:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" font-size="12" text-anchor="end">{}%</text>"##,
            py(y),
            py(y),
            x0 - 6.0,
            py(y) + 4.0,
            q * 25
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" font-size="13" text-anchor="middle">run of a no-op, median ms (log scale; left is cheaper)</text>"#,
        (x0 + x1) / 2.0,
        h - 18.0
    );
    let _ = writeln!(
        s,
        r#"<text x="18" y="{}" font-size="13" text-anchor="middle" transform="rotate(-90 18 {})">moat probe checks blocked (up is stronger)</text>"#,
        (y0 + y1) / 2.0,
        (y0 + y1) / 2.0
    );
    let colour = |reach: Reach| match reach {
        Reach::Host => "#999999",
        Reach::Direct => "#1f77b4",
        Reach::UserSpaceKernel => "#ff7f0e",
        Reach::Supervised => "#2ca02c",
        Reach::GuestKernel => "#9467bd",
        Reach::Unknown => "#8c564b",
    };
    // Labels right of their point, moved below, above or to the left when
    // they would cover one already placed.
    let mut placed: Vec<(f64, f64, f64, f64)> = pts
        .iter()
        .map(|(_, x, y)| (px(*x) - 8.0, py(*y) - 8.0, px(*x) + 8.0, py(*y) + 8.0))
        .collect();
    let overlaps = |a: &(f64, f64, f64, f64), b: &(f64, f64, f64, f64)| {
        a.0 < b.2 && b.0 < a.2 && a.1 < b.3 && b.1 < a.3
    };
    for (t, x, y) in &pts {
        let (cx, cy) = (px(*x), py(*y));
        let width = 7.5 * t.name.chars().count() as f64;
        let candidates = [
            (cx + 10.0, cy + 4.0, "start"),
            (cx + 10.0, cy + 20.0, "start"),
            (cx + 10.0, cy - 12.0, "start"),
            (cx - 10.0, cy + 4.0, "end"),
            (cx - 10.0, cy + 20.0, "end"),
            (cx - 10.0, cy - 12.0, "end"),
        ];
        let boxed = |(lx, ly, anchor): (f64, f64, &str)| {
            let x0 = if anchor == "end" { lx - width } else { lx };
            (x0, ly - 12.0, x0 + width, ly + 3.0)
        };
        let pick = candidates
            .iter()
            .copied()
            .find(|c| !placed.iter().any(|p| overlaps(&boxed(*c), p)))
            .unwrap_or(candidates[0]);
        placed.push(boxed(pick));
        let _ = writeln!(
            s,
            r#"<g><title>{}: {} ms, {:.0}% blocked, syscalls reach the {}</title><circle cx="{cx:.1}" cy="{cy:.1}" r="7" fill="{}"/><text x="{:.1}" y="{:.1}" font-size="13" text-anchor="{}">{}</text></g>"#,
            esc(&t.name),
            fmt_num(*x),
            y * 100.0,
            t.reach.describe(),
            colour(t.reach),
            pick.0,
            pick.1,
            pick.2,
            esc(&t.name)
        );
    }
    // Legend: what each colour means, for the kinds shown.
    let mut kinds: Vec<Reach> = Vec::new();
    for (t, _, _) in &pts {
        if !kinds.contains(&t.reach) {
            kinds.push(t.reach);
        }
    }
    for (i, k) in kinds.iter().enumerate() {
        let ly = y1 - 12.0 - 18.0 * (kinds.len() - 1 - i) as f64;
        let _ = writeln!(
            s,
            r#"<circle cx="{:.1}" cy="{ly:.1}" r="5" fill="{}"/><text x="{:.1}" y="{:.1}" font-size="12">syscalls reach: {}</text>"#,
            x1 - 230.0,
            colour(*k),
            x1 - 220.0,
            ly + 4.0,
            k.describe()
        );
    }
    s.push_str("</svg>\n");
    s
}
