//! `moat audit`: placeholder replaced below.
use std::path::{Path, PathBuf};

#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    pub file: Option<PathBuf>,
}

pub fn main(_a: &AuditArgs, _root: &Path) -> anyhow::Result<i32> {
    Ok(0)
}
