//! `moat audit`: the command line around `moat_audit`.
use std::path::{Path, PathBuf};

use moat_audit::{Format, Severity};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FormatArg {
    Text,
    Json,
    Sarif,
}

#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    /// config.json, `docker inspect` output or Kubernetes YAML; "-" or nothing for stdin
    pub file: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "text")]
    pub format: FormatArg,
    /// Exit 1 when a finding at or above this severity exists
    #[arg(long = "fail-on", default_value = "low", value_parser = ["low", "medium", "high"])]
    pub fail_on: String,
    /// Audit the live moat containers under --root (their saved config.json)
    #[arg(long, conflicts_with = "file")]
    pub running: bool,
}

/// Prints the report; returns the exit status: 0 no finding at or above
/// `--fail-on`, 1 such findings, 2 usage or input error.
pub fn main(a: &AuditArgs, root: &Path) -> anyhow::Result<i32> {
    let fail_on: Severity = a.fail_on.parse().map_err(anyhow::Error::msg)?;
    let result = if a.running {
        moat_audit::running(root)
    } else {
        moat_audit::read_input(a.file.as_deref())
            .and_then(|(text, name)| moat_audit::audit_text(&text, &name))
    };
    let findings = match result {
        Ok(f) => f,
        Err(e) => {
            eprintln!("moat audit: {}", crate::error_line(&anyhow::Error::new(e)));
            return Ok(2);
        }
    };
    let format = match a.format {
        FormatArg::Text => Format::Text,
        FormatArg::Json => Format::Json,
        FormatArg::Sarif => Format::Sarif,
    };
    let rendered = moat_audit::render(&findings, format);
    out!("{}", rendered.trim_end());
    Ok(i32::from(findings.iter().any(|f| f.severity >= fail_on)))
}
