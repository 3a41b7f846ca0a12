//! libFuzzer driver of [`moat_fuzz::targets::sandbox_args`].
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| moat_fuzz::targets::sandbox_args(data));
