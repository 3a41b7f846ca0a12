//! libFuzzer driver of [`moat_fuzz::targets::tar_unpack`].
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| moat_fuzz::targets::tar_unpack(data));
