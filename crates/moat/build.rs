//! The workspace builds for an explicit target so that `crt-static` applies to
//! the binary but not to proc-macros (see .cargo/config.toml). Cargo then puts
//! the binary under `target/<triple>/<profile>/`; link it from the usual
//! `target/<profile>/moat` so `cargo build --release` leaves `target/release/moat`.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let (Ok(out), Ok(profile), Ok(target)) = (
        std::env::var("OUT_DIR"),
        std::env::var("PROFILE"),
        std::env::var("TARGET"),
    ) else {
        return;
    };
    // OUT_DIR = <target-dir>/<triple>/<profile>/build/moat-<hash>/out
    let out = PathBuf::from(out);
    let Some(triple_profile) = out.ancestors().nth(3) else {
        return;
    };
    let Some(target_dir) = triple_profile.ancestors().nth(2) else {
        return;
    };
    if triple_profile.parent().and_then(|p| p.file_name()) != Some(target.as_ref()) {
        return;
    }
    let link_dir = target_dir.join(&profile);
    let _ = std::fs::create_dir_all(&link_dir);
    let link = link_dir.join("moat");
    let dest = PathBuf::from("..")
        .join(&target)
        .join(&profile)
        .join("moat");
    if std::fs::read_link(&link).ok().as_deref() != Some(dest.as_path()) {
        let _ = std::fs::remove_file(&link);
        let _ = std::os::unix::fs::symlink(&dest, &link);
    }
}
