#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| caremesh_fuzz::trust_registry(data));
