//! libFuzzer driver of [`moat_fuzz::targets::mirror_stream`].
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| moat_fuzz::targets::mirror_stream(data));
