//! libFuzzer driver of [`moat_fuzz::targets::oci_layout`].
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| moat_fuzz::targets::oci_layout(data));
