#![no_main]
//! See `stampede_core::fuzzing::rfc9421_signature`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| stampede_core::fuzzing::rfc9421_signature(data));
