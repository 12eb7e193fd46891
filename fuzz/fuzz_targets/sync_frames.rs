#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| drop(caremesh_fuzz::sync_frames(data)));
