//! How moat's tests skip, in one place. On a developer's machine a test that
//! lacks root, a package or a daemon prints why and passes. Under
//! `scripts/test` (and so in CI), which installs every package the tests
//! need and runs as root, `MOAT_TEST_STRICT=1`: there such a skip would
//! hide a missing install step, so it fails the test instead. Only missing
//! hardware ([`skip_hardware`]) may skip everywhere; each such skip is
//! appended to `$MOAT_TEST_SKIPS` (a file) so the run's closing line can
//! count and name them.
use std::io::Write;

/// Whether this run forbids skips for anything but hardware.
pub fn strict() -> bool {
    std::env::var_os("MOAT_TEST_STRICT").is_some_and(|v| v == "1")
}

/// Skips `test` because `why` (a missing package, daemon or privilege):
/// prints it, or panics in a strict run. Returns `true` so a test can say
/// `if !have_x() && skip(..) { return; }`.
pub fn skip(test: &str, why: &str) -> bool {
    assert!(
        !strict(),
        "{test} cannot run: {why} (scripts/test installs every dependency and runs as root, so this is a bug in the setup)"
    );
    eprintln!("SKIP {test}: {why}");
    true
}

/// Skips `test` for root: the same rule as [`skip`]. `true` when not root.
pub fn needs_root(test: &str) -> bool {
    !rustix::process::geteuid().is_root() && skip(test, "needs root")
}

/// Skips `test` because this machine lacks hardware it needs (e.g. vmx/svm
/// for a full KVM boot): allowed in every run, and recorded.
pub fn skip_hardware(test: &str, why: &str) -> bool {
    eprintln!("SKIP {test}: {why}");
    if let Some(path) = std::env::var_os("MOAT_TEST_SKIPS") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{test}: {why}");
        }
    }
    true
}
