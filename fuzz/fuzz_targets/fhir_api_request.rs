#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| caremesh_fuzz::fhir_api_request(data));
