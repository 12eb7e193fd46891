#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| caremesh_fuzz::ingest_json(data));
