#![no_main]
//! See `stampede_core::fuzzing::cavage_signature`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| stampede_core::fuzzing::cavage_signature(data));
