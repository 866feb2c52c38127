#![no_main]
//! See `stampede_core::fuzzing::activity`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| stampede_core::fuzzing::activity(data));
