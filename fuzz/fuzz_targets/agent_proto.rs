//! libFuzzer driver of [`moat_fuzz::targets::agent_proto`].
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| moat_fuzz::targets::agent_proto(data));
