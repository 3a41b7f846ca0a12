//! What the sandbox tier's end-to-end tests share: the runtime (moat only),
//! `sh` in a sandbox, and a read-only /data directory with C helpers and a
//! policy. Each test binary that uses it also has `mod common;`.
#![allow(dead_code)] // each test binary uses a different subset

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::common::{run_binary, Opts, Out, Rt};

/// The runtime under test, or None (after saying why) when it is not moat
/// or the test cannot run as root.
pub fn rt(test: &str) -> Option<Rt> {
    let rt = Rt::root_or_skip(test)?;
    if !rt.is_moat() {
        eprintln!("SKIP {test}: moat-only tier");
        return None;
    }
    Some(rt)
}

/// `moat run --isolation sandbox [flags] -- sh -c SCRIPT`.
pub fn sh(rt: &Rt, flags: &[&str], script: &str) -> Out {
    let mut args = vec!["run", "--isolation", "sandbox"];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["--", "sh", "-c", script]);
    rt.cmd(&args)
}

/// A directory the container's user can read, mounted read-only as /data:
/// `ok` ("fine"), `secret` ("SECRET"), the C helpers compiled into it, and
/// the policy that goes with it.
pub struct Data {
    dir: tempfile::TempDir,
}

impl Data {
    pub fn new(prefix: &str) -> Data {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .expect("tempdir");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        for (f, text) in [("ok", "fine\n"), ("secret", "SECRET\n")] {
            fs::write(dir.path().join(f), text).unwrap();
            fs::set_permissions(dir.path().join(f), fs::Permissions::from_mode(0o644)).unwrap();
        }
        Data { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn volume(&self) -> String {
        format!("{}:/data:ro", self.path().display())
    }

    /// Compiles `src` (C, with pthreads) to /data/NAME.
    pub fn compile(&self, name: &str, src: &str) {
        let c = self.path().join(format!("{name}.c"));
        fs::write(&c, src).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let r = run_binary(
            Path::new("/usr/bin/gcc"),
            &[
                "-O1".into(),
                "-pthread".into(),
                "-o".into(),
                self.path().join(name).display().to_string(),
                c.display().to_string(),
            ],
            Opts::default(),
            &tmp.path().join("o"),
            &tmp.path().join("e"),
        );
        assert!(r.ok(), "gcc {name}: {r:?}");
    }

    /// A policy file: the default rules, `/data` readable (not executable),
    /// `/data/secret` hidden, then `extra` rules.
    pub fn policy_with(&self, extra: &[(&str, &str)]) -> PathBuf {
        let mut v: serde_json::Value =
            serde_json::from_str(moat_sandbox::policy::DEFAULT_POLICY).unwrap();
        v["paths"]["/data"] = "r".into();
        v["paths"]["/data/secret"] = "hidden".into();
        for (k, a) in extra {
            v["paths"][*k] = (*a).into();
        }
        let p = self.path().join("policy.json");
        fs::write(&p, v.to_string()).unwrap();
        p
    }
}
