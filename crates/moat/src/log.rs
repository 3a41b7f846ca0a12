//! `--log FILE --log-format text|json`: the record the containerd shim reads
//! when a runtime command fails.
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

pub struct Logger {
    path: Option<PathBuf>,
    format: LogFormat,
    debug: bool,
}

impl Logger {
    pub fn new(path: Option<&Path>, format: LogFormat, debug: bool) -> Logger {
        Logger {
            path: path.map(Path::to_owned),
            format,
            debug,
        }
    }

    fn write(&self, level: &str, msg: &str) {
        let Some(path) = &self.path else { return };
        let time = moat_core::time::rfc3339_now();
        let line = match self.format {
            LogFormat::Json => {
                serde_json::json!({"level": level, "msg": msg, "time": time}).to_string()
            }
            LogFormat::Text => format!("time=\"{time}\" level={level} msg={msg:?}"),
        };
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{line}");
        }
    }

    pub fn error(&self, msg: &str) {
        self.write("error", msg);
    }

    pub fn debug(&self, msg: &str) {
        if self.debug {
            self.write("debug", msg);
        }
    }
}
