//! libFuzzer driver of [`moat_fuzz::targets::net_frames`].
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| moat_fuzz::targets::net_frames(data));
