//! OCI hooks: each runs with the container state as JSON on stdin, and is
//! killed when its timeout passes.
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use oci_spec::runtime::Hook;

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("{stage} hook {path}: cannot start")]
    Spawn {
        stage: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{stage} hook {path} failed: {status}{stderr}")]
    Failed {
        stage: &'static str,
        path: PathBuf,
        status: String,
        stderr: String,
    },
    #[error("{stage} hook {path} timed out after {secs}s and was killed")]
    Timeout {
        stage: &'static str,
        path: PathBuf,
        secs: i64,
    },
}

/// Runs `hooks` in order; the first failure stops the list (prestart,
/// createRuntime, createContainer, startContainer: the runtime-spec makes
/// their failure an error of the lifecycle step).
pub fn run(stage: &'static str, hooks: &[Hook], state_json: &[u8]) -> Result<(), HookError> {
    for hook in hooks {
        run_one(stage, hook, state_json)?;
    }
    Ok(())
}

/// Runs every hook of `hooks` in order, whatever each one does: a failure is
/// a warning, and the next hook and the lifecycle go on as if it had
/// succeeded (what the runtime-spec asks for poststart and poststop).
/// Returns the failures, for the caller's tests; they are already logged.
pub fn run_warning(stage: &'static str, hooks: &[Hook], state_json: &[u8]) -> Vec<HookError> {
    let mut failed = Vec::new();
    for hook in hooks {
        if let Err(e) = run_one(stage, hook, state_json) {
            tracing::warn!("{}", moat_core::error_chain(&e));
            failed.push(e);
        }
    }
    failed
}

fn run_one(stage: &'static str, hook: &Hook, state_json: &[u8]) -> Result<(), HookError> {
    let path = hook.path().clone();
    let mut cmd = Command::new(&path);
    if let Some(args) = hook.args() {
        if let Some((argv0, rest)) = args.split_first() {
            std::os::unix::process::CommandExt::arg0(&mut cmd, argv0);
            cmd.args(rest);
        }
    }
    cmd.env_clear();
    for kv in hook.env().as_deref().unwrap_or(&[]) {
        if let Some((k, v)) = kv.split_once('=') {
            cmd.env(k, v);
        }
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| HookError::Spawn {
        stage,
        path: path.clone(),
        source,
    })?;
    if let Some(mut stdin) = child.stdin.take() {
        // A hook that does not read its stdin is fine (EPIPE).
        let _ = stdin.write_all(state_json);
    }
    let deadline = hook
        .timeout()
        .filter(|t| *t > 0)
        .map(|t| (t, Instant::now() + Duration::from_secs(t as u64)));
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) => {}
            Err(source) => {
                return Err(HookError::Spawn {
                    stage,
                    path,
                    source,
                })
            }
        }
        if let Some((secs, at)) = deadline {
            if Instant::now() >= at {
                let _ = child.kill();
                let _ = child.wait();
                return Err(HookError::Timeout { stage, path, secs });
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    if status.success() {
        return Ok(());
    }
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
    }
    let stderr = stderr.trim();
    let stderr = if stderr.is_empty() {
        String::new()
    } else {
        format!(": {}", stderr.lines().last().unwrap_or(""))
    };
    Err(HookError::Failed {
        stage,
        path,
        status: status.to_string(),
        stderr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::HookBuilder;

    #[test]
    fn hook_gets_state_on_stdin() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let hook = HookBuilder::default()
            .path("/bin/sh")
            .args(vec![
                "sh".into(),
                "-c".into(),
                format!("cat > {}", out.display()),
            ])
            .build()
            .unwrap();
        run("prestart", &[hook], br#"{"id":"x"}"#).unwrap();
        assert_eq!(std::fs::read_to_string(out).unwrap(), r#"{"id":"x"}"#);
    }

    #[test]
    fn failing_and_slow_hooks_are_errors() {
        let fail = HookBuilder::default()
            .path("/bin/sh")
            .args(vec![
                "sh".into(),
                "-c".into(),
                "echo nope >&2; exit 3".into(),
            ])
            .build()
            .unwrap();
        let e = run("poststart", &[fail], b"{}").unwrap_err().to_string();
        assert!(e.contains("exit status: 3") && e.contains("nope"), "{e}");
        let slow = HookBuilder::default()
            .path("/bin/sleep")
            .args(vec!["sleep".into(), "5".into()])
            .timeout(1i64)
            .build()
            .unwrap();
        assert!(matches!(
            run("prestart", &[slow], b"{}").unwrap_err(),
            HookError::Timeout { .. }
        ));
        let missing = HookBuilder::default()
            .path("/nonexistent/hook")
            .build()
            .unwrap();
        assert!(matches!(
            run("prestart", &[missing], b"{}").unwrap_err(),
            HookError::Spawn { .. }
        ));
    }

    #[test]
    fn a_failing_poststart_hook_does_not_stop_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("second");
        let fail = HookBuilder::default().path("/bin/false").build().unwrap();
        let second = HookBuilder::default()
            .path("/bin/sh")
            .args(vec![
                "sh".into(),
                "-c".into(),
                format!("touch {}", out.display()),
            ])
            .build()
            .unwrap();
        let failed = run_warning("poststart", &[fail, second], b"{}");
        assert_eq!(failed.len(), 1);
        assert!(out.exists(), "the second hook did not run");
    }
}
