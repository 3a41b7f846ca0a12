//! libFuzzer driver of [`moat_fuzz::targets::vm_snapshot`].
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| moat_fuzz::targets::vm_snapshot(data));
