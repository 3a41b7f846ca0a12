//! Report formats: text for people, JSON, and SARIF 2.1.0 for code scanning.
use serde_json::{json, Value};

use super::rules::RULES;
use super::{Finding, Severity};

fn counts(f: &[Finding]) -> Value {
    let n = |s| f.iter().filter(|x| x.severity == s).count();
    json!({"total": f.len(), "high": n(Severity::High), "medium": n(Severity::Medium), "low": n(Severity::Low)})
}

pub fn text(f: &[Finding]) -> String {
    let mut s = String::new();
    for x in f {
        s.push_str(&format!(
            "{:<6}  {}  {}  at {}\n",
            x.severity.as_str().to_uppercase(),
            x.id,
            x.subject,
            x.location
        ));
        s.push_str(&format!("        {}: {}\n", x.title, x.detail));
        s.push_str(&format!("        why: {}\n", x.why));
        s.push_str(&format!("        fix: {}\n", x.fix));
        s.push_str(&format!("        refs: {}\n", x.references));
    }
    let c = counts(f);
    s.push_str(&format!(
        "{} findings: {} high, {} medium, {} low\n",
        c["total"], c["high"], c["medium"], c["low"]
    ));
    s
}

pub fn json(f: &[Finding]) -> Value {
    json!({"findings": f, "summary": counts(f)})
}

fn level(s: Severity) -> &'static str {
    match s {
        Severity::High => "error",
        Severity::Medium => "warning",
        Severity::Low => "note",
    }
}

/// GitHub code scanning reads `security-severity` (0.0–10.0).
fn score(s: Severity) -> &'static str {
    match s {
        Severity::High => "8.0",
        Severity::Medium => "5.5",
        Severity::Low => "3.0",
    }
}

pub fn sarif(f: &[Finding]) -> Value {
    let rules: Vec<Value> = RULES
        .iter()
        .map(|r| {
            json!({
                "id": r.id,
                "name": r.title,
                "shortDescription": {"text": r.title},
                "fullDescription": {"text": r.why},
                "help": {"text": format!("Fix: OCI config.json: {}; Docker: {}; Kubernetes: {}. References: {}", r.fix[0], r.fix[1], r.fix[2], r.references)},
                "defaultConfiguration": {"level": level(r.severity)},
                "properties": {"tags": ["security", "container"], "security-severity": score(r.severity)}
            })
        })
        .collect();
    let results: Vec<Value> = f
        .iter()
        .map(|x| {
            let index = RULES.iter().position(|r| r.id == x.id).unwrap_or(0);
            json!({
                "ruleId": x.id,
                "ruleIndex": index,
                "level": level(x.severity),
                "message": {"text": format!("{}: {} ({}). Fix: {}", x.title, x.detail, x.subject, x.fix)},
                "locations": [{
                    "physicalLocation": {"artifactLocation": {"uri": artifact_uri(&x.artifact)}},
                    "logicalLocations": [{"fullyQualifiedName": x.location, "kind": "member"}]
                }],
                "properties": {"subject": x.subject, "severity": x.severity.as_str()}
            })
        })
        .collect();
    json!({
        "$schema": "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json",
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {
                "name": "moat audit",
                "version": env!("CARGO_PKG_VERSION"),
                "rules": rules
            }},
            "results": results
        }]
    })
}

/// A relative URI reference for a file path (percent-encoding what a URI
/// may not hold).
fn artifact_uri(path: &str) -> String {
    let mut s = String::new();
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            s.push(char::from(b));
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    if s.is_empty() {
        "stdin".into()
    } else {
        s
    }
}
