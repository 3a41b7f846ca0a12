//! The OCI runtime commands: each resolves its tier once (a new container:
//! flag or program name, and the config's annotation; an existing one: the
//! tier its state records) and goes through the [`Lifecycle`] seam.
use std::io::Read;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use moat_core::runtime::{Config, CreateRequest, Current, ExecOptions, Lifecycle};
use moat_core::state::ContainerStatus;
use moat_core::{tier, Tier};
use nix::sys::signal::Signal;
use oci_spec::runtime::{LinuxResources, Process};

use crate::cli::{Cli, Cmd, CreateArgs, ExecArgs, UpdateArgs};
use crate::tiers::{Engine, Tiers};

/// Parses the bundle, picks the tier (the stronger of `chosen` and the
/// config's annotation) and its engine.
fn prepare(tiers: &Tiers, a: &CreateArgs, chosen: Option<Tier>) -> Result<(Engine, Config)> {
    let config = Config::from_bundle(&a.bundle)?;
    let annotation = config.tier_annotation()?;
    let tier = tier::select(chosen, annotation);
    let engine = tiers.engine(tier)?;
    moat_core::steps::mark("read-config");
    Ok((engine, config))
}

fn request<'a>(a: &'a CreateArgs, config: &'a Config) -> CreateRequest<'a> {
    CreateRequest {
        id: &a.id,
        config,
        pid_file: a.pid_file.as_deref(),
        console_socket: a.console_socket.as_deref(),
        no_pivot: a.no_pivot,
        no_new_keyring: a.no_new_keyring,
        preserve_fds: a.preserve_fds,
        die_with_runtime: false,
    }
}

pub fn dispatch(cli: Cli, argv0: &str) -> Result<i32> {
    let chosen =
        tier::chosen(cli.global.isolation.as_deref(), argv0).map_err(anyhow::Error::msg)?;
    if cli.global.systemd_cgroup && !Path::new("/run/systemd/system").is_dir() {
        bail!("--systemd-cgroup: systemd is not running on this host");
    }
    let tiers = Tiers::new(&cli.global.root, cli.global.systemd_cgroup);
    tracing::debug!("{:?}", cli.cmd);
    match cli.cmd {
        Cmd::Create(a) => {
            let (engine, config) = prepare(&tiers, &a, chosen)?;
            engine.create(&request(&a, &config))?;
            Ok(0)
        }
        Cmd::Start { id } => {
            tiers.of(&id)?.start(&id)?;
            Ok(0)
        }
        Cmd::Run {
            create,
            detach,
            keep,
        } => run(&tiers, &create, chosen, detach, keep),
        Cmd::State { id } => {
            let c = tiers.of(&id)?.state(&id)?;
            out!("{}", serde_json::to_string_pretty(&runc_state(&c))?);
            Ok(0)
        }
        Cmd::Kill { id, signal, all } => {
            tiers
                .of(&id)?
                .kill(&id, parse_signal(&signal)? as i32, all)?;
            Ok(0)
        }
        Cmd::Delete { id, force } => {
            match tiers.of(&id)?.delete(&id, force) {
                Err(e) if force && e.is_not_found() => {}
                r => r?,
            }
            crate::run::forget_killed_run(&tiers, &cli.global.root, &id);
            Ok(0)
        }
        Cmd::Pause { id } => {
            tiers.of(&id)?.pause(&id)?;
            Ok(0)
        }
        Cmd::Resume { id } => {
            tiers.of(&id)?.resume(&id)?;
            Ok(0)
        }
        Cmd::List { format, quiet } => list(&tiers, &format, quiet),
        Cmd::Ps {
            id,
            format,
            ps_args,
        } => ps(&tiers.of(&id)?, &id, &format, &ps_args),
        Cmd::Exec(a) => exec(&tiers.of(&a.id)?, a),
        Cmd::Update(a) => {
            let res = update_resources(&a)?;
            tiers.of(&a.id)?.update(&a.id, &res)?;
            Ok(0)
        }
        Cmd::Events {
            id,
            stats,
            interval,
        } => events(&tiers.of(&id)?, &id, stats, &interval),
        Cmd::Features => {
            let mut doc = tiers.engine(chosen.unwrap_or_default())?.features();
            let names: Vec<String> = crate::tiers::available()
                .iter()
                .map(Tier::to_string)
                .collect();
            doc["annotations"]["dev.moat.tiers"] = serde_json::json!(names.join(","));
            out!("{}", serde_json::to_string_pretty(&doc)?);
            Ok(0)
        }
        Cmd::Spec {
            bundle,
            rootless,
            hardened,
        } => {
            let path = bundle.join("config.json");
            if path.exists() {
                bail!("{} already exists; remove it first", path.display());
            }
            if hardened && rootless {
                bail!("--hardened and --rootless cannot be combined yet");
            }
            let spec = if hardened {
                crate::run::defaults::hardened_spec()
            } else {
                crate::specgen::default_spec(rootless)
            };
            std::fs::write(&path, serde_json::to_string_pretty(&spec)?)
                .with_context(|| format!("cannot write {}", path.display()))?;
            Ok(0)
        }
        Cmd::Probe { json } => crate::probe::main(json),
        Cmd::Info { json } => crate::info::main(json),
        Cmd::Bench(a) => crate::bench::main(&a),
        Cmd::Images => crate::run::images::list(&cli.global.root),
        Cmd::Prune(a) => crate::run::images::prune(&tiers, &cli.global.root, &a),
        Cmd::Audit(a) => crate::audit::main(&a, &cli.global.root),
        // `moat policy learn …` is parsed before clap (main.rs).
        Cmd::Policy { .. } => {
            bail!("usage: moat policy learn [-o FILE] [RUN OPTIONS] [IMAGE] -- CMD (see moat policy learn --help)")
        }
        Cmd::Checkpoint { .. } | Cmd::Restore { .. } => {
            bail!("checkpoint/restore is not supported by moat")
        }
    }
}

/// runc's `run`: create and start with this process as the container
/// process's parent; unless detached, wait for it (forwarding signals,
/// relaying the terminal), then delete it unless `keep`. Returns the exit
/// status (128+N for a signal).
fn run(
    tiers: &Tiers,
    a: &CreateArgs,
    chosen: Option<Tier>,
    detach: bool,
    keep: bool,
) -> Result<i32> {
    let (engine, config) = prepare(tiers, a, chosen)?;
    let terminal = config
        .spec
        .process()
        .as_ref()
        .and_then(|p| p.terminal())
        .unwrap_or(false);
    if detach && terminal && a.console_socket.is_none() {
        bail!("a detached container with a terminal needs --console-socket");
    }
    let launched = engine.launch(&request(a, &config))?;
    if detach {
        return Ok(0);
    }
    let kill_all = || {
        let _ = engine.kill(&a.id, Signal::SIGKILL as i32, true);
    };
    let code = match launched.terminal {
        Some(m) => moat_jail::console::proxy(m, launched.pid),
        None => moat_jail::supervise::wait_supervised(launched.pid, None, &kill_all).0,
    };
    moat_core::steps::mark("workload");
    if !keep {
        engine.delete(&a.id, true)?;
        moat_core::steps::mark("delete");
    }
    Ok(code)
}

/// runc's `state`/`list --format json` object.
fn runc_state(c: &Current) -> serde_json::Value {
    let st = &c.state;
    let pid = if c.status == ContainerStatus::Stopped {
        0
    } else {
        st.pid
    };
    let mut v = serde_json::json!({
        "ociVersion": st.oci_version,
        "id": st.id,
        "pid": pid,
        "status": c.status.as_str(),
        "bundle": st.bundle,
        "rootfs": st.rootfs,
        "created": st.created,
        "owner": st.owner,
    });
    if !st.annotations.is_empty() {
        v["annotations"] = serde_json::to_value(&st.annotations).unwrap_or_default();
    }
    v
}

pub fn parse_signal(s: &str) -> Result<Signal> {
    if let Ok(n) = s.parse::<i32>() {
        return Signal::try_from(n).map_err(|_| anyhow::anyhow!("unknown signal {s:?}"));
    }
    let up = s.to_ascii_uppercase();
    let name = if up.starts_with("SIG") {
        up
    } else {
        format!("SIG{up}")
    };
    name.parse::<Signal>()
        .map_err(|_| anyhow::anyhow!("unknown signal {s:?}"))
}

fn list(tiers: &Tiers, format: &str, quiet: bool) -> Result<i32> {
    let all: Vec<serde_json::Value> = tiers.list()?.iter().map(runc_state).collect();
    if quiet {
        for c in &all {
            out!("{}", c["id"].as_str().unwrap_or(""));
        }
        return Ok(0);
    }
    match format {
        "json" => out!("{}", serde_json::to_string(&all)?),
        "table" => {
            out!(
                "{:<12} {:<10} {:<10} {:<40} {:<30} {}",
                "ID",
                "PID",
                "STATUS",
                "BUNDLE",
                "CREATED",
                "OWNER"
            );
            for c in &all {
                out!(
                    "{:<12} {:<10} {:<10} {:<40} {:<30} {}",
                    c["id"].as_str().unwrap_or(""),
                    c["pid"],
                    c["status"].as_str().unwrap_or(""),
                    c["bundle"].as_str().unwrap_or(""),
                    c["created"].as_str().unwrap_or(""),
                    c["owner"].as_str().unwrap_or("")
                );
            }
        }
        other => bail!("invalid format {other:?} (table or json)"),
    }
    Ok(0)
}

fn ps(engine: &Engine, id: &str, format: &str, ps_args: &[String]) -> Result<i32> {
    let pids = engine.ps(id)?;
    match format {
        "json" => {
            out!("{}", serde_json::to_string(&pids)?);
            Ok(0)
        }
        "table" => {
            let args: Vec<String> = if ps_args.is_empty() {
                vec!["-ef".into()]
            } else {
                ps_args.to_vec()
            };
            let out = std::process::Command::new("ps")
                .args(&args)
                .output()
                .context("cannot run ps")?;
            if !out.status.success() {
                bail!(
                    "ps {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            let text = String::from_utf8_lossy(&out.stdout);
            let mut lines = text.lines();
            let header = lines.next().unwrap_or("");
            let col = header
                .split_whitespace()
                .position(|h| h == "PID")
                .context("ps output has no PID column")?;
            out!("{header}");
            for l in lines {
                if let Some(p) = l
                    .split_whitespace()
                    .nth(col)
                    .and_then(|p| p.parse::<i32>().ok())
                {
                    if pids.contains(&p) {
                        out!("{l}");
                    }
                }
            }
            Ok(0)
        }
        other => bail!("invalid format {other:?} (table or json)"),
    }
}

fn exec(engine: &Engine, a: ExecArgs) -> Result<i32> {
    engine.state(&a.id)?;
    let process = exec_process(engine, &a)?;
    let opts = ExecOptions {
        detach: a.detach,
        pid_file: a.pid_file.clone(),
        console_socket: a.console_socket.clone(),
        preserve_fds: a.preserve_fds,
    };
    Ok(engine.exec(&a.id, &process, &opts)?)
}

/// The process to exec: `--process FILE`, or the container's own process
/// with the command line and flags applied (as runc does).
fn exec_process(engine: &Engine, a: &ExecArgs) -> Result<Process> {
    if a.apparmor.is_some() || a.process_label.is_some() {
        bail!("--apparmor/--process-label: AppArmor and SELinux are not enabled on this host");
    }
    if let Some(path) = &a.process {
        let data =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let p: Process = serde_json::from_slice(&data)
            .with_context(|| format!("invalid process file {}", path.display()))?;
        return Ok(p);
    }
    if a.command.is_empty() {
        bail!("exec needs a command (or --process FILE)");
    }
    let spec = engine.config(&a.id)?;
    let mut p = spec
        .process()
        .clone()
        .context("container config has no process")?;
    p.set_args(Some(a.command.clone()));
    p.set_terminal(Some(a.tty));
    let mut env = p.env().clone().unwrap_or_default();
    for e in &a.env {
        if !e.contains('=') {
            bail!("--env {e:?} is not KEY=VALUE");
        }
        let key = e.split('=').next().unwrap_or("");
        env.retain(|x| x.split('=').next() != Some(key));
        env.push(e.clone());
    }
    p.set_env(Some(env));
    if let Some(c) = &a.cwd {
        p.set_cwd(c.clone());
    }
    if let Some(u) = &a.user {
        let (uid, gid) = match u.split_once(':') {
            Some((u, g)) => (
                u.parse::<u32>().context("--user: UID must be numeric")?,
                Some(g.parse::<u32>().context("--user: GID must be numeric")?),
            ),
            None => (
                u.parse::<u32>().context("--user: UID must be numeric")?,
                None,
            ),
        };
        let mut user = p.user().clone();
        user.set_uid(uid);
        if let Some(g) = gid {
            user.set_gid(g);
        }
        p.set_user(user);
    }
    if !a.additional_gids.is_empty() {
        let mut user = p.user().clone();
        user.set_additional_gids(Some(a.additional_gids.clone()));
        p.set_user(user);
    }
    if !a.cap.is_empty() {
        let mut caps = p.capabilities().clone().unwrap_or_default();
        for c in &a.cap {
            let cap: oci_spec::runtime::Capability = c
                .parse()
                .map_err(|_| anyhow::anyhow!("unknown capability {c:?}"))?;
            let add = |s: &Option<oci_spec::runtime::Capabilities>| {
                let mut s = s.clone().unwrap_or_default();
                s.insert(cap);
                Some(s)
            };
            let (b, e, pm) = (
                add(caps.bounding()),
                add(caps.effective()),
                add(caps.permitted()),
            );
            caps.set_bounding(b).set_effective(e).set_permitted(pm);
        }
        p.set_capabilities(Some(caps));
    }
    if a.no_new_privs {
        p.set_no_new_privileges(Some(true));
    }
    Ok(p)
}

pub(crate) fn parse_bytes(s: &str) -> Result<i64> {
    let t = s.trim();
    if t == "-1" {
        return Ok(-1);
    }
    let (num, mul) = match t.chars().last().map(|c| c.to_ascii_lowercase()) {
        Some('k') => (&t[..t.len() - 1], 1i64 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        Some('b') => (&t[..t.len() - 1], 1),
        _ => (t, 1),
    };
    let n: i64 = num.parse().with_context(|| format!("invalid size {s:?}"))?;
    n.checked_mul(mul)
        .with_context(|| format!("size {s:?} overflows"))
}

fn update_resources(a: &UpdateArgs) -> Result<LinuxResources> {
    use oci_spec::runtime::LinuxPids;
    let mut res: LinuxResources = match &a.r {
        Some(p) => {
            let mut data = Vec::new();
            if p.as_os_str() == "-" {
                std::io::stdin()
                    .read_to_end(&mut data)
                    .context("cannot read resources from stdin")?;
            } else {
                data = std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
            }
            serde_json::from_slice(&data).context("invalid resources JSON")?
        }
        None => LinuxResources::default(),
    };
    if a.memory.is_some()
        || a.memory_swap.is_some()
        || a.memory_reservation.is_some()
        || a.kernel_memory_tcp.is_some()
    {
        let mut m = res.memory().unwrap_or_default();
        if let Some(v) = &a.kernel_memory_tcp {
            m.set_kernel_tcp(Some(parse_bytes(v)?));
        }
        if let Some(v) = &a.memory {
            m.set_limit(Some(parse_bytes(v)?));
        }
        if let Some(v) = &a.memory_swap {
            m.set_swap(Some(parse_bytes(v)?));
        }
        if let Some(v) = &a.memory_reservation {
            m.set_reservation(Some(parse_bytes(v)?));
        }
        res.set_memory(Some(m));
    }
    if a.cpu_period.is_some()
        || a.cpu_quota.is_some()
        || a.cpu_share.is_some()
        || a.cpuset_cpus.is_some()
        || a.cpuset_mems.is_some()
        || a.cpu_rt_period.is_some()
        || a.cpu_rt_runtime.is_some()
    {
        let mut c = res.cpu().clone().unwrap_or_default();
        if a.cpu_period.is_some() {
            c.set_period(a.cpu_period);
        }
        if a.cpu_quota.is_some() {
            c.set_quota(a.cpu_quota);
        }
        if a.cpu_share.is_some() {
            c.set_shares(a.cpu_share);
        }
        if a.cpu_rt_period.is_some() {
            c.set_realtime_period(a.cpu_rt_period);
        }
        if a.cpu_rt_runtime.is_some() {
            c.set_realtime_runtime(a.cpu_rt_runtime);
        }
        if a.cpuset_cpus.is_some() {
            c.set_cpus(a.cpuset_cpus.clone());
        }
        if a.cpuset_mems.is_some() {
            c.set_mems(a.cpuset_mems.clone());
        }
        res.set_cpu(Some(c));
    }
    if let Some(p) = a.pids_limit {
        let mut pids = LinuxPids::default();
        pids.set_limit(p);
        res.set_pids(Some(pids));
    }
    if let Some(w) = a.blkio_weight {
        let mut b = res.block_io().clone().unwrap_or_default();
        b.set_weight(Some(w));
        res.set_block_io(Some(b));
    }
    if a.l3_cache_schema.is_some() || a.mem_bw_schema.is_some() {
        bail!("Intel RDT is not supported on this host");
    }
    Ok(res)
}

fn parse_interval(s: &str) -> Result<Duration> {
    let t = s.trim();
    let (n, unit) = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map(|i| t.split_at(i))
        .unwrap_or((t, "s"));
    let v: f64 = n
        .parse()
        .with_context(|| format!("invalid interval {s:?}"))?;
    let secs = match unit {
        "ms" => v / 1000.0,
        "s" | "" => v,
        "m" => v * 60.0,
        _ => bail!("invalid interval {s:?}"),
    };
    if secs <= 0.0 {
        bail!("interval must be positive");
    }
    Ok(Duration::from_secs_f64(secs))
}

fn events(engine: &Engine, id: &str, once: bool, interval: &str) -> Result<i32> {
    let interval = parse_interval(interval)?;
    loop {
        let status = engine.state(id)?.status;
        if status == ContainerStatus::Stopped {
            bail!("container {id} is stopped, no stats");
        }
        let data = engine.stats(id)?;
        out!(
            "{}",
            serde_json::json!({"type": "stats", "id": id, "data": data})
        );
        if once {
            return Ok(0);
        }
        std::thread::sleep(interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_by_name_and_number() {
        assert_eq!(parse_signal("9").unwrap(), Signal::SIGKILL);
        assert_eq!(parse_signal("KILL").unwrap(), Signal::SIGKILL);
        assert_eq!(parse_signal("sigterm").unwrap(), Signal::SIGTERM);
        assert!(parse_signal("NOPE").is_err());
    }

    #[test]
    fn sizes_and_intervals() {
        assert_eq!(parse_bytes("64m").unwrap(), 64 << 20);
        assert_eq!(parse_bytes("-1").unwrap(), -1);
        assert!(parse_bytes("x").is_err());
        assert_eq!(parse_interval("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_interval("100ms").unwrap(), Duration::from_millis(100));
        assert!(parse_interval("0s").is_err());
    }
}
