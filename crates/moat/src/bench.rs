//! `moat bench`: the command line around `moat_bench`.
use std::path::PathBuf;

use anyhow::{bail, Context, Result};

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Fewer iterations and smaller batches: under a minute
    #[arg(long)]
    pub quick: bool,
    /// Start-up iterations per target (default 20, 5 with --quick)
    #[arg(short = 'n', long)]
    pub iterations: Option<usize>,
    /// Containers started at once in the concurrency test
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Target the ratios are computed against (default crun, else runc, else host)
    #[arg(long)]
    pub baseline: Option<String>,
    /// Another runtime to measure: NAME=PATH[ ARGS] (repeatable)
    #[arg(long = "runtime")]
    pub runtimes: Vec<String>,
    /// Only these targets (comma-separated names, e.g. host,moat-container,runc)
    #[arg(long, value_delimiter = ',')]
    pub targets: Vec<String>,
    /// Write the results as JSON to FILE ("-": stdout, instead of the table)
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write a chart of cost against isolation as SVG to FILE
    #[arg(long)]
    pub svg: Option<PathBuf>,
}

pub fn main(a: &BenchArgs) -> Result<i32> {
    if a.concurrency == 0 || a.concurrency > 64 {
        bail!("--concurrency must be 1 to 64");
    }
    if a.iterations == Some(0) {
        bail!("--iterations must be at least 1");
    }
    let moat = std::env::current_exe().context("cannot find the moat binary")?;
    let opts = moat_bench::Options {
        moat,
        tiers: crate::tiers::available()
            .iter()
            .map(ToString::to_string)
            .collect(),
        base_spec: crate::specgen::default_spec(false),
        quick: a.quick,
        iterations: a.iterations,
        concurrency: a.concurrency,
        baseline: a.baseline.clone(),
        runtimes: a.runtimes.clone(),
        only: a.targets.clone(),
    };
    let report = match moat_bench::run(&opts) {
        Ok(r) => r,
        Err(moat_bench::BenchError::Interrupted) => {
            eprintln!("moat bench: interrupted; every container it started is removed");
            return Ok(130);
        }
        Err(e) => return Err(e.into()),
    };
    let json = serde_json::to_string_pretty(&report)?;
    match &a.json {
        Some(p) if p.as_os_str() == "-" => out!("{json}"),
        Some(p) => {
            std::fs::write(p, &json).with_context(|| format!("cannot write {}", p.display()))?;
            out!("{}", moat_bench::report::table(&report).trim_end());
        }
        None => out!("{}", moat_bench::report::table(&report).trim_end()),
    }
    if let Some(p) = &a.svg {
        std::fs::write(p, moat_bench::report::svg(&report))
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    Ok(0)
}
