//! Unpacks arbitrary bytes (maybe gzip/zstd) as a layer into a fresh
//! directory: must never panic, and never write outside it.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(dir) = tempfile::tempdir() else { return };
    let root = dir.path().join("rootfs");
    if std::fs::create_dir(&root).is_err() {
        return;
    }
    if let Ok(r) = moat_linux::image::decompressed(data) {
        let _ = moat_linux::image::unpack::unpack(r, &root);
    }
    // Everything written is under `root`: its parent holds nothing else.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .map(|r| r.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert_eq!(names, vec![std::ffi::OsString::from("rootfs")]);
});
