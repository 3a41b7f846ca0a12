//! libFuzzer driver of [`moat_fuzz::targets::virtio_queue`].
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| moat_fuzz::targets::virtio_queue(data));
