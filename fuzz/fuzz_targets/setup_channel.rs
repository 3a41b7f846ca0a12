//! libFuzzer driver of [`moat_fuzz::targets::setup_channel`].
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| moat_fuzz::targets::setup_channel(data));
