//! The JSON readers of OCI layouts and docker archives over arbitrary
//! bytes: index selection, manifests, image configs, manifest.json.
#![no_main]
use libfuzzer_sys::fuzz_target;
use moat_image::layout;

fuzz_target!(|data: &[u8]| {
    if let Ok(i) = layout::parse_index(data) {
        let _ = layout::select(&i, None);
        let _ = layout::select(&i, Some("latest"));
        let _ = layout::select_platform(&i);
        for d in i.manifests() {
            let _ = layout::Sha256Digest::parse(d.digest().as_ref());
            let _ = layout::is_index(d);
        }
    }
    if let Ok(m) = layout::parse_manifest(data) {
        let _ = layout::Sha256Digest::parse(m.config().digest().as_ref());
    }
    let _ = layout::parse_config(data);
    let _ = layout::parse_docker_manifest(data);
});
