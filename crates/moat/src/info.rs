//! `moat info`: what this host can do, and for each tier whether it can run
//! here and, if not, why and how to fix it. The tier verdicts are the
//! dispatch point's own (`tiers::check`), so `moat info` and `moat run
//! --isolation T` always agree.
use anyhow::Result;
use moat_jail::host::HostFacts;
use serde_json::json;

pub fn main(as_json: bool) -> Result<i32> {
    let facts = HostFacts::read();
    let tiers = crate::tiers::readiness();
    if as_json {
        let tiers: Vec<serde_json::Value> = tiers
            .iter()
            .map(|(t, r)| match r {
                Ok(()) => {
                    let mut v =
                        json!({"tier": t, "ready": true, "runs_on": crate::tiers::note(*t)});
                    if *t == moat_core::tier::Tier::Microvm {
                        v["read_write_volumes"] = moat_microvm::volumes_note()
                            .unwrap_or_else(|why| format!("refused: {why}"))
                            .into();
                        v["memory"] = moat_microvm::memory_note().into();
                    }
                    v
                }
                Err(u) => json!({
                    "tier": t, "ready": false, "built": u.built,
                    "reason": u.reason, "fix": u.fix, "message": u.to_string(),
                }),
            })
            .collect();
        let doc = json!({
            "moat": env!("CARGO_PKG_VERSION"),
            "host": facts,
            "tiers": tiers,
        });
        out!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(0);
    }
    print_host(&facts);
    out!("");
    out!("tiers");
    for (t, r) in &tiers {
        match r {
            Ok(()) => {
                match crate::tiers::note(*t) {
                    Some(n) => out!("  {:<10} ready: {n}", t.to_string()),
                    None => out!("  {:<10} ready", t.to_string()),
                }
                if *t == moat_core::tier::Tier::Microvm {
                    match moat_microvm::volumes_note() {
                        Ok(n) => out!("  {:<10} read-write volumes: {n}", ""),
                        Err(why) => out!("  {:<10} read-write volumes: refused: {why}", ""),
                    }
                    out!("  {:<10} memory: {}", "", moat_microvm::memory_note());
                }
            }
            Err(u) => {
                out!("  {:<10} not available: {}", t.to_string(), u.reason);
                if let Some(fix) = &u.fix {
                    out!("  {:<10} fix: {fix}", "");
                }
            }
        }
    }
    Ok(0)
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn print_host(f: &HostFacts) {
    let who = if f.rootless { "unprivileged" } else { "root" };
    out!(
        "moat {} on Linux {} ({}), as {who}",
        env!("CARGO_PKG_VERSION"),
        f.kernel.release,
        f.kernel.machine
    );
    out!("");
    let (have, missing): (Vec<_>, Vec<_>) = f.namespaces.iter().partition(|n| n.available);
    let names =
        |v: &[&moat_jail::host::Namespace]| v.iter().map(|n| n.name).collect::<Vec<_>>().join(" ");
    let mut ns = names(&have);
    if !missing.is_empty() {
        ns.push_str(&format!(" (missing: {})", names(&missing)));
    }
    out!("{:<13}{ns}", "namespaces");
    let u = &f.user_namespaces;
    let mut userns = match u.max {
        Some(0) => "disabled (user.max_user_namespaces = 0)".to_string(),
        Some(n) => format!("up to {n}"),
        None => "unknown".to_string(),
    };
    if u.unprivileged_clone == Some(false) {
        userns.push_str(
            "; unprivileged users may not create them (kernel.unprivileged_userns_clone = 0)",
        );
    }
    if u.apparmor_restricted == Some(true) {
        userns.push_str("; restricted by AppArmor for unprivileged users");
    }
    out!("{:<13}{userns}", "user ns");
    let c = &f.cgroup;
    let mut cg = format!("{} ({})", c.layout, c.controllers.join(" "));
    if f.rootless {
        cg.push_str(if c.delegated {
            "; your cgroup is delegated: limits apply"
        } else {
            "; your cgroup is not delegated: runs without limits"
        });
    }
    if let Some(p) = &c.problem {
        cg = format!("cannot read the layout: {p}");
    }
    out!("{:<13}{cg}", "cgroups");
    let s = &f.seccomp;
    out!(
        "{:<13}actions: {}; user notification: {}; ADDFD: {}; sync wake-up: {}",
        "seccomp",
        s.actions.join(" "),
        yes(s.user_notification),
        yes(s.addfd),
        yes(s.sync_wake_up)
    );
    out!(
        "{:<13}{}",
        "landlock",
        f.landlock_abi
            .map_or("not available".to_string(), |v| format!("ABI {v}"))
    );
    let k = &f.kvm;
    let kvm = if !k.present {
        "/dev/kvm missing".to_string()
    } else {
        let access = if k.accessible {
            "accessible"
        } else {
            "not accessible to you"
        };
        let kind = match (&k.software_module, k.hardware) {
            (_, true) => "hardware virtualisation (vmx/svm)".to_string(),
            (Some(m), false) => {
                format!("no vmx/svm: software-assisted ({m}), tiny guests only")
            }
            (None, false) => "no vmx/svm in /proc/cpuinfo (nested?)".to_string(),
        };
        format!("/dev/kvm {access}; {kind}")
    };
    out!("{:<13}{kvm}", "kvm");
    out!(
        "{:<13}{}",
        "guest kernel",
        f.guest_kernel
            .as_ref()
            .map_or("none found (linux-image-cloud-amd64)".into(), |p| p
                .display()
                .to_string())
    );
    out!(
        "{:<13}{}",
        "qemu",
        f.qemu
            .as_ref()
            .map_or("not installed (qemu-system-x86)".into(), |p| p
                .display()
                .to_string())
    );
}
