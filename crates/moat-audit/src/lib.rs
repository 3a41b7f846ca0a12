//! `moat audit`: check an OCI config.json, `docker inspect` output or
//! Kubernetes YAML against moat's best practices, CIS Docker Benchmark
//! section 5 and the Kubernetes Pod Security Standards.
//!
//! Exit status: 0 no finding at or above `--fail-on`; 1 such findings;
//! 2 usage or input error.
#![forbid(unsafe_code)]
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;

mod input;
mod output;
mod rules;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Low,
    Medium,
    High,
}

impl std::str::FromStr for Severity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "low" => Ok(Severity::Low),
            "medium" => Ok(Severity::Medium),
            "high" => Ok(Severity::High),
            other => Err(format!("unknown severity {other:?} (low, medium or high)")),
        }
    }
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
        }
    }
}

/// Report formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
    Sarif,
}

/// One problem found.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub id: &'static str,
    pub severity: Severity,
    pub title: &'static str,
    /// Which container or object (config.json, a docker container name, Kind/name container).
    pub subject: String,
    /// JSON pointer (JSON input) or YAML path (YAML input).
    pub location: String,
    /// What was found.
    pub detail: String,
    pub why: &'static str,
    /// The exact field or flag that fixes it.
    pub fix: String,
    pub references: &'static str,
    /// The file, for SARIF.
    #[serde(skip)]
    pub artifact: String,
}

/// An input that cannot be audited.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}: not an OCI config.json, `docker inspect` output or Kubernetes manifest")]
    Unrecognised(String),
    #[error("{path}: invalid YAML")]
    Yaml {
        path: String,
        #[source]
        source: serde_yaml_ng::Error,
    },
    #[error("cannot list containers under {path}")]
    StateDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Audits one document's text; `name` is used in messages and as the SARIF artifact.
pub fn audit_text(text: &str, name: &str) -> Result<Vec<Finding>, AuditError> {
    let workloads = input::parse(text, name)?;
    Ok(workloads
        .iter()
        .flat_map(|w| rules::check(w, name))
        .collect())
}

pub fn read_input(file: Option<&Path>) -> Result<(String, String), AuditError> {
    match file {
        None => read_stdin(),
        Some(p) if p == Path::new("-") => read_stdin(),
        Some(p) => std::fs::read_to_string(p)
            .map(|t| (t, p.display().to_string()))
            .map_err(|source| AuditError::Read {
                path: p.display().to_string(),
                source,
            }),
    }
}

fn read_stdin() -> Result<(String, String), AuditError> {
    let mut s = String::new();
    std::io::stdin()
        .read_to_string(&mut s)
        .map_err(|source| AuditError::Read {
            path: "stdin".into(),
            source,
        })?;
    Ok((s, "stdin".into()))
}

/// The saved config.json of every container under the state root.
pub fn running(root: &Path) -> Result<Vec<Finding>, AuditError> {
    let rd = std::fs::read_dir(root).map_err(|source| AuditError::StateDir {
        path: root.display().to_string(),
        source,
    })?;
    let mut dirs: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("config.json").is_file())
        .collect();
    dirs.sort();
    let mut out = Vec::new();
    for d in dirs {
        let path = d.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| AuditError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let id = d
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut f = audit_text(&text, &path.display().to_string())?;
        for x in &mut f {
            x.subject = format!("container {id}");
        }
        out.extend(f);
    }
    Ok(out)
}

/// The findings in `format`, ready to print.
pub fn render(findings: &[Finding], format: Format) -> String {
    match format {
        Format::Text => output::text(findings),
        Format::Json => pretty(&output::json(findings)),
        Format::Sarif => pretty(&output::sarif(findings)),
    }
}

fn pretty(v: &serde_json::Value) -> String {
    // A `Value` always serializes.
    serde_json::to_string_pretty(v).unwrap_or_default()
}
