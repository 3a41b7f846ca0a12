//! Unpacks arbitrary bytes (maybe gzip/zstd) as a layer into a fresh
//! directory, whiteouts applied or (first byte odd) made overlayfs
//! whiteouts: must never panic, and never write outside it.
#![no_main]
use libfuzzer_sys::fuzz_target;
use moat_image::unpack::{self, Owners, Whiteouts};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    let whiteouts = if mode & 1 == 1 {
        Whiteouts::Overlay
    } else {
        Whiteouts::Apply
    };
    let Ok(dir) = tempfile::tempdir() else { return };
    let root = dir.path().join("rootfs");
    if std::fs::create_dir(&root).is_err() {
        return;
    }
    if let Ok(r) = moat_image::decompressed(data) {
        let _ = unpack::unpack_as(r, &root, Owners::Unpacker, whiteouts);
    }
    // Everything written is under `root`: its parent holds nothing else.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .map(|r| r.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert_eq!(names, vec![std::ffi::OsString::from("rootfs")]);
});
