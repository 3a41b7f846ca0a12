//! moat's logging. Every crate reports through `tracing`; this subscriber
//! writes warnings and errors to stderr as one line each (`moat: …`,
//! `moat: warning: …`, `moat: note: …` for info) and, with `--log FILE`,
//! every record at those levels (and debug ones with `--debug`) to FILE in
//! the format runc writes, `--log-format text|json`: the containerd shim and
//! Docker read the last error from there. `--debug` without `--log` writes
//! the debug records to stderr (`moat: debug: …`), among them the start-up
//! step timings (`moat: debug: step NAME: 1.234 ms`, moat_core::steps).
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::sync::Mutex;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::prelude::*;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the subscriber for this process (first call wins).
pub fn init(path: Option<&Path>, format: LogFormat, debug: bool) {
    let file = path.and_then(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .ok()
    });
    // The guest agent's `moat exec` (moat_microvm::agent::LOG_ONLY_ENV).
    let stderr = file.is_none()
        || std::env::var_os(moat_microvm::agent::LOG_ONLY_ENV).is_none_or(|v| v != "1");
    let layer = MoatLayer {
        file: file.map(Mutex::new),
        format,
        debug,
        stderr,
    };
    let _ = tracing_subscriber::registry().with(layer).try_init();
}

struct MoatLayer {
    file: Option<Mutex<std::fs::File>>,
    format: LogFormat,
    debug: bool,
    /// Warnings and errors to stderr too (always, but for the guest
    /// agent's `moat exec`, whose stderr is its process's).
    stderr: bool,
}

/// The event's message and its other fields, `key=value` after it.
#[derive(Default)]
struct Message(String, String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.1, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        } else {
            let _ = write!(self.1, " {}={value:?}", field.name());
        }
    }
}

impl<S: Subscriber> Layer<S> for MoatLayer {
    /// Debug records are built only under `--debug` (the start-up step
    /// timings ask first: moat_core::steps::enabled).
    fn enabled(&self, metadata: &tracing::Metadata<'_>, _ctx: Context<'_, S>) -> bool {
        match *metadata.level() {
            Level::TRACE => false,
            Level::DEBUG => self.debug,
            _ => true,
        }
    }

    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let level = *event.metadata().level();
        let (prefix, name) = match level {
            Level::ERROR => ("moat: ", "error"),
            Level::WARN => ("moat: warning: ", "warning"),
            Level::INFO => ("moat: note: ", "info"),
            Level::DEBUG => ("", "debug"),
            Level::TRACE => return,
        };
        let mut m = Message::default();
        event.record(&mut m);
        let msg = format!("{}{}", m.0, m.1).replace('\n', " ");
        if level != Level::DEBUG && self.stderr {
            let _ = writeln!(std::io::stderr().lock(), "{prefix}{msg}");
        }
        if level == Level::DEBUG && !self.debug {
            return;
        }
        let Some(file) = &self.file else {
            // `--debug` without `--log`: debug records go to stderr, as runc's do.
            if level == Level::DEBUG {
                let _ = writeln!(std::io::stderr().lock(), "moat: debug: {msg}");
            }
            return;
        };
        let time = moat_core::time::rfc3339_now();
        let line = match self.format {
            LogFormat::Json => {
                serde_json::json!({"level": name, "msg": msg, "time": time}).to_string()
            }
            LogFormat::Text => format!("time=\"{time}\" level={name} msg={msg:?}"),
        };
        if let Ok(mut f) = file.lock() {
            let _ = writeln!(f, "{line}");
        }
    }
}
