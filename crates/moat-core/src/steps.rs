//! Per-step start-up timings for `--debug` (docs/performance.md).
//!
//! The runtime logs each step as it ends ([`mark`]), as a debug record of
//! target [`TARGET`]: `step NAME: 0.123 ms`. The container's init cannot log (its
//! stderr is the workload's): it records its steps in a [`Recorder`] and
//! sends them to the runtime over the setup channel, which logs them as
//! `init.NAME`. Off (`--debug` not given), a mark costs an uncontended lock
//! and a branch; the init records nothing and sends nothing.
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// The tracing target of step records.
pub const TARGET: &str = "moat::step";

/// The environment variable that carries the wall-clock time (ns since the
/// epoch) at which the first `moat` process started, across the re-exec
/// that protects the binary; set only under `--debug`.
pub const T0_ENV: &str = "MOAT_DEBUG_T0";

/// At most this many steps come back from the init (the message is bounded).
pub const MAX_REMOTE_STEPS: usize = 48;
/// Longest step name accepted from the init.
pub const MAX_NAME: usize = 48;

/// Whether step records are wanted (`--debug`).
pub fn enabled() -> bool {
    tracing::enabled!(target: TARGET, tracing::Level::DEBUG)
}

/// Logs one step's duration.
pub fn log(name: &str, micros: u64) {
    tracing::debug!(target: TARGET, "step {name}: {}.{:03} ms", micros / 1000, micros % 1000);
}

fn micros(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// When the previous step of this process ended (None: not timing).
static LAST: Mutex<Option<Instant>> = Mutex::new(None);

/// Starts timing this process's steps at `t0`, if step records are wanted.
pub fn begin_at(t0: Instant) {
    if enabled() {
        if let Ok(mut last) = LAST.lock() {
            *last = Some(t0);
        }
    }
}

/// Whether this process times its steps.
pub fn active() -> bool {
    LAST.lock().is_ok_and(|l| l.is_some())
}

/// Ends step `name`: logs the time since the previous step ended (or
/// [`begin_at`]). Off, a lock and a branch.
pub fn mark(name: &str) {
    let Ok(mut last) = LAST.lock() else { return };
    if let Some(prev) = *last {
        let now = Instant::now();
        log(name, micros(now - prev));
        *last = Some(now);
    }
}

/// The wall-clock time to carry across the re-exec in [`T0_ENV`].
pub fn wall_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Microseconds from a [`T0_ENV`] value to now (None if it does not parse
/// or lies in the future).
pub fn micros_since_wall(t0: &str) -> Option<u64> {
    let t0: u128 = t0.parse().ok()?;
    let d = wall_ns().checked_sub(t0)?;
    u64::try_from(d / 1000).ok()
}

/// Steps recorded in a process that cannot log them itself.
#[derive(Debug, Default)]
pub struct Recorder {
    last: Option<Instant>,
    steps: Vec<(&'static str, u64)>,
}

impl Recorder {
    /// A recorder that records only if `on`.
    pub fn new(on: bool) -> Recorder {
        Recorder {
            last: on.then(Instant::now),
            steps: Vec::new(),
        }
    }

    pub fn active(&self) -> bool {
        self.last.is_some()
    }

    pub fn step(&mut self, name: &'static str) {
        if let Some(last) = self.last {
            let now = Instant::now();
            if self.steps.len() < MAX_REMOTE_STEPS {
                self.steps.push((name, micros(now - last)));
            }
            self.last = Some(now);
        }
    }

    /// The steps so far, emptied (each batch is sent once).
    pub fn take(&mut self) -> Vec<(String, u64)> {
        self.steps
            .drain(..)
            .map(|(n, us)| (n.to_owned(), us))
            .collect()
    }
}

/// Logs steps that came back from the init, as `init.NAME`.
pub fn log_remote(steps: &[(String, u64)]) {
    for (name, us) in steps.iter().take(MAX_REMOTE_STEPS) {
        let name: String = name
            .chars()
            .take(MAX_NAME)
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            .collect();
        log(&format!("init.{name}"), *us);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorder_off_records_nothing() {
        let mut r = Recorder::new(false);
        r.step("a");
        assert!(r.take().is_empty());
        assert!(!r.active());
    }

    #[test]
    fn recorder_on_records_in_order_and_empties() {
        let mut r = Recorder::new(true);
        r.step("a");
        r.step("b");
        let got = r.take();
        assert_eq!(
            got.iter().map(|s| s.0.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert!(r.take().is_empty());
    }

    #[test]
    fn recorder_is_bounded() {
        let mut r = Recorder::new(true);
        for _ in 0..MAX_REMOTE_STEPS + 10 {
            r.step("x");
        }
        assert_eq!(r.take().len(), MAX_REMOTE_STEPS);
    }

    #[test]
    fn wall_times_parse() {
        let t0 = wall_ns().to_string();
        assert!(micros_since_wall(&t0).is_some());
        assert_eq!(micros_since_wall("not a number"), None);
        assert_eq!(
            micros_since_wall(&(wall_ns() + 10_000_000_000).to_string()),
            None
        );
    }
}
