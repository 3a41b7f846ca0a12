//! `moat probe`: prints what `moat_probe` finds, as a table or JSON.
use moat_probe::{Check, Summary};

/// `moat probe [--json]`. Always exits 0: the report is the result.
pub fn main(json: bool) -> anyhow::Result<i32> {
    let checks = moat_probe::run_all();
    let summary = moat_probe::summarize(&checks);
    if json {
        let doc = serde_json::json!({ "checks": checks, "summary": summary });
        out!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print_table(&checks, &summary);
    }
    Ok(0)
}

fn print_table(checks: &[Check], s: &Summary) {
    let w = checks.iter().map(|c| c.id.len()).max().unwrap_or(2);
    out!("{:<w$}  {:<7}  DETAIL  [PRACTICE]", "ID", "RESULT");
    for c in checks {
        out!(
            "{:<w$}  {:<7}  {}  [{}]",
            c.id,
            c.result.as_str(),
            c.detail,
            c.practice
        );
    }
    out!(
        "{} checks: {} blocked, {} allowed, {} n/a",
        s.total,
        s.blocked,
        s.allowed,
        s.not_applicable
    );
}
