//! `moat info`: the host facts it reports are this host's, and its verdict
//! on each tier is what `moat run --isolation T` actually does.
#![forbid(unsafe_code)]

mod common;

use common::*;
use std::fs;

#[test]
fn info_matches_the_host_and_what_the_tiers_do() {
    let Some(rt) = Rt::root_or_skip("info_matches_the_host") else {
        return;
    };
    if !rt.is_moat() {
        eprintln!("SKIP info_matches_the_host: moat's own command");
        return;
    }
    let doc = rt.cmd(&["info", "--json"]).expect_ok().json();
    let host = &doc["host"];
    assert_eq!(
        host["kernel"]["release"],
        fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap()
            .trim(),
        "{doc}"
    );
    let actions = fs::read_to_string("/proc/sys/kernel/seccomp/actions_avail").unwrap();
    assert_eq!(
        host["seccomp"]["user_notification"],
        actions.split_whitespace().any(|a| a == "user_notif")
    );
    assert_eq!(
        host["kvm"]["present"],
        std::path::Path::new("/dev/kvm").exists()
    );
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap();
    let hw = cpuinfo.split_whitespace().any(|f| f == "vmx" || f == "svm");
    assert_eq!(host["kvm"]["hardware"], hw);
    let tiers = doc["tiers"].as_array().expect("tiers");
    assert_eq!(tiers.len(), 3, "{doc}");
    assert!(
        tiers
            .iter()
            .any(|t| t["tier"] == "container" && t["ready"] == true),
        "{doc}"
    );
    for t in tiers {
        let name = t["tier"].as_str().unwrap();
        if name == "microvm" && t["ready"] == true {
            // Read-write volumes through virtio-fs: QEMU 7.2's virtiofsd
            // (scripts/deps installs QEMU) under the QEMU backend.
            let rw = t["read_write_volumes"].as_str().unwrap_or_default();
            assert!(
                rw.starts_with("virtio-fs, served by /") || rw.contains("moat's own VMM"),
                "{t}"
            );
            // Debian's cloud kernel (scripts/deps) builds the multi-gen
            // LRU the page cache passes need.
            let mem = t["memory"].as_str().unwrap_or_default();
            assert!(
                mem.contains("free page reporting")
                    && mem.contains("page cache every 60 s")
                    && mem.contains("dev.moat.microvm.reclaim-interval"),
                "{t}"
            );
            // The first run images the host's /usr into the shared cache
            // (minutes on a fresh machine): with a deadline of its own.
            microvm_warm_up(&rt);
        }
        let out = rt.cmd_with(
            &["run", "--isolation", name, "--", "true"],
            Opts {
                env: microvm_env(),
                ..Opts::default()
            },
        );
        if t["ready"] == true {
            assert!(out.ok(), "{name} is ready but: {out:?}");
        } else {
            let msg = t["message"].as_str().unwrap();
            assert!(!out.ok(), "{name} is not ready but ran");
            assert_eq!(out.stderr.trim(), format!("moat: {msg}"), "{name}");
        }
    }
    let text = rt.cmd(&["info"]).expect_ok().stdout;
    for want in [
        "namespaces",
        "cgroups",
        "seccomp",
        "landlock",
        "kvm",
        "tiers",
    ] {
        assert!(text.contains(want), "{want} missing from:\n{text}");
    }
    assert!(text.contains("container  ready"), "{text}");
}
