//! The `moat` binary: the OCI runtime CLI (runc-compatible) and moat's own commands.
#![forbid(unsafe_code)]

/// `println!` that does not panic when stdout is a closed pipe (`moat state
/// ID | grep -q running`): output errors are the reader's business.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

mod audit;
mod bench;
mod cli;
mod info;
mod log;
mod oci;
mod probe;
mod run;
mod specgen;
mod tiers;

use std::process::ExitCode;

fn main() -> ExitCode {
    let t_main = std::time::Instant::now();
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let argv0 = args
        .first()
        .map(|a| a.to_string_lossy().into_owned())
        .unwrap_or_default();
    // The workload side of `moat bench`, inside containers: nothing else
    // runs first, so a no-op costs only the exec.
    match args.get(1).and_then(|a| a.to_str()) {
        Some("bench-true") => return ExitCode::SUCCESS,
        // The guest agent of the microvm tier, PID 1 of a moat guest (the
        // kernel runs `/moat microvm-agent`).
        Some(moat_microvm::agent::SUBCOMMAND) => {
            // `debug` on the guest's command line (MOAT_MICROVM_CONSOLE):
            // the container runtime's step records, which the agent's fork
            // writes to the workload's stderr.
            if args.iter().any(|a| a == "debug") {
                log::init(None, log::LogFormat::Text, true);
            }
            return ExitCode::from(u8::try_from(moat_microvm::agent::main()).unwrap_or(1));
        }
        Some("bench-helper") => {
            let rest: Vec<String> = args[2..]
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            return ExitCode::from(u8::try_from(moat_bench::helper::main(&rest)).unwrap_or(1));
        }
        _ => {}
    }
    if let Some(human) = human_run(&args, t_main) {
        return human;
    }
    if let Some(learn) = policy_learn(&args) {
        return learn;
    }
    let mut cli = match <cli::Cli as clap::Parser>::try_parse_from(&args) {
        Ok(c) => c,
        Err(e) => {
            // --help and --version print and exit 0; usage errors print one clear message.
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    cli.global.root = state_root(std::mem::take(&mut cli.global.root));
    log::init(
        cli.global.log.as_deref(),
        cli.global.log_format,
        cli.global.debug,
    );
    begin_steps(t_main);
    if cli.cmd.starts_container_process() {
        if let Err(e) = moat_jail::selfexe::ensure_protected(&args) {
            tracing::error!("{}", moat_core::error_chain(&e));
            return ExitCode::from(1);
        }
        protected();
    }
    match oci::dispatch(cli, &argv0) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(255)),
        Err(e) => {
            tracing::error!("{}", error_line(&e));
            ExitCode::from(1)
        }
    }
}

/// `moat run [OPTIONS] [--] CMD...` (human mode, see docs/run.md); `None`
/// for every other command line, runc's `run ID` included.
fn human_run(args: &[std::ffi::OsString], t_main: std::time::Instant) -> Option<ExitCode> {
    let text: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let argv = run::human_argv(&text, || std::path::Path::new("config.json").exists())?;
    let cli = match parse_run_cli(&argv) {
        Ok(c) => c,
        Err(code) => return Some(code),
    };
    // `--log FILE --debug` work as for the OCI commands.
    log::init(
        cli.global.log.as_deref(),
        cli.global.log_format,
        cli.global.debug,
    );
    begin_steps(t_main);
    Some(run_protected(args, cli))
}

/// `moat run`'s options from `argv`, with what clap cannot say (a leading
/// `--`, an unknown option before the command, the user's default state
/// root); a usage error is printed and becomes the exit status: 125, as
/// for docker run (2 would read as the workload's status).
fn parse_run_cli(argv: &[String]) -> Result<run::RunCli, ExitCode> {
    let mut cli = match <run::RunCli as clap::Parser>::try_parse_from(argv) {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 125 } else { 0 };
            let _ = e.print();
            return Err(ExitCode::from(code));
        }
    };
    cli.opts.default_root = run::leading_dashdash(argv);
    cli.opts.unknown_option = run::unknown_option(argv, &cli.opts.command);
    cli.global.root = state_root(std::mem::take(&mut cli.global.root));
    Ok(cli)
}

/// Runs `cli` from the protected copy of the binary (re-executing into it
/// first when needed): the workload's exit status, or moat's error's.
fn run_protected(args: &[std::ffi::OsString], cli: run::RunCli) -> ExitCode {
    if let Err(e) = moat_jail::selfexe::ensure_protected(args) {
        tracing::error!("{}", bounded(&moat_core::error_chain(&e)));
        return ExitCode::from(125);
    }
    protected();
    match run::main(cli) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(255)),
        Err(e) => {
            tracing::error!("{}", error_line(&e));
            // A program that cannot run exits as a shell would make it
            // (127 not found, 126 not executable); moat's own errors 125.
            ExitCode::from(run::exit_status(&e))
        }
    }
}

/// `moat policy learn [-o FILE] [RUN OPTIONS] [IMAGE] -- CMD` (see
/// `run::learn`): `moat run --isolation sandbox` in learning mode; `None`
/// for every other command line.
fn policy_learn(args: &[std::ffi::OsString]) -> Option<ExitCode> {
    let text: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let (argv, output) = match run::learn::argv(&text)? {
        Ok(v) => v,
        Err(None) => {
            out!("{}", run::learn::USAGE);
            return Some(ExitCode::SUCCESS);
        }
        Err(Some(msg)) => {
            eprintln!("moat policy learn: {msg}\n\n{}", run::learn::USAGE);
            return Some(ExitCode::from(125));
        }
    };
    let mut cli = match parse_run_cli(&argv) {
        Ok(c) => c,
        Err(code) => return Some(code),
    };
    cli.opts.learn = Some(run::learn::Learn { output });
    cli.global.isolation.get_or_insert_with(|| "sandbox".into());
    log::init(None, log::LogFormat::Text, false);
    Some(run_protected(args, cli))
}

/// The default state root, /run/moat, is root's; an unprivileged user's
/// default is `$XDG_RUNTIME_DIR/moat` (else /tmp/moat-UID), as runc does.
fn state_root(given: std::path::PathBuf) -> std::path::PathBuf {
    if given != std::path::Path::new(cli::DEFAULT_ROOT) || rustix::process::geteuid().is_root() {
        return given;
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(d) => std::path::PathBuf::from(d).join("moat"),
        None => {
            // /tmp is shared: refuse a path someone else made (or a symlink).
            let uid = rustix::process::geteuid().as_raw();
            let p = std::path::PathBuf::from(format!("/tmp/moat-{uid}"));
            if let Ok(m) = std::fs::symlink_metadata(&p) {
                use std::os::unix::fs::MetadataExt;
                if !m.is_dir() || m.uid() != uid {
                    eprintln!(
                        "moat: {} is not a directory of yours; set XDG_RUNTIME_DIR or --root",
                        p.display()
                    );
                    std::process::exit(1);
                }
            }
            p
        }
    }
}

/// The longest error line moat prints: values from the command line or a
/// config (an ID, a path) are echoed in errors, and may be huge.
const MAX_ERROR_LINE: usize = 4096;

/// `line` cut to [`MAX_ERROR_LINE`] bytes (at a character boundary), with
/// how much was left out.
fn bounded(line: &str) -> String {
    if line.len() <= MAX_ERROR_LINE {
        return line.to_owned();
    }
    let mut end = MAX_ERROR_LINE;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} more bytes)", &line[..end], line.len() - end)
}

/// The whole error chain on one line, bounded.
pub(crate) fn error_line(e: &anyhow::Error) -> String {
    let mut s = String::new();
    for (i, c) in e.chain().enumerate() {
        let t = c.to_string();
        if t.is_empty() || s.ends_with(&t) {
            continue;
        }
        if i > 0 {
            s.push_str(": ");
        }
        s.push_str(&t);
    }
    bounded(&s.replace('\n', " "))
}

/// Starts the `--debug` step records (moat_core::steps) at `t_main`. The
/// first process of a run that re-executes itself from a protected copy
/// (moat_jail::selfexe) leaves the time it parsed its arguments in the
/// environment: the
/// second logs the time from then to its own `main` as one step, `reexec`
/// (the check and the exec of the copy).
fn begin_steps(t_main: std::time::Instant) {
    use moat_core::steps;
    steps::begin_at(t_main);
    if !steps::active() {
        return;
    }
    match std::env::var(steps::T0_ENV) {
        Ok(t0) => {
            std::env::remove_var(steps::T0_ENV);
            if let Some(us) = steps::micros_since_wall(&t0) {
                let since_main = u64::try_from(t_main.elapsed().as_micros()).unwrap_or(0);
                steps::log("reexec", us.saturating_sub(since_main));
            }
            steps::mark("parse-arguments");
        }
        Err(_) => {
            steps::mark("parse-arguments");
            std::env::set_var(steps::T0_ENV, steps::wall_ns().to_string());
        }
    }
}

/// After `ensure_protected` returned (no re-exec, or the second process):
/// the start time is not needed in the environment any more.
fn protected() {
    if moat_core::steps::active() {
        std::env::remove_var(moat_core::steps::T0_ENV);
        moat_core::steps::mark("protect-binary");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 15, defect 10: an error echoing a 1 MB value was a 1 MB line.
    #[test]
    fn error_lines_are_bounded() {
        let e = anyhow::anyhow!("x{}", "é".repeat(1 << 20)).context("bad --name");
        let line = error_line(&e);
        assert!(line.len() < MAX_ERROR_LINE + 64, "{}", line.len());
        assert!(line.starts_with("bad --name: x"));
        assert!(
            line.ends_with("more bytes)"),
            "{}",
            &line[line.len() - 40..]
        );
        assert_eq!(error_line(&anyhow::anyhow!("short")), "short");
    }
}
