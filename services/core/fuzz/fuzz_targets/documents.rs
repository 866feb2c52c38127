#![no_main]
//! See `stampede_core::fuzzing::documents`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| stampede_core::fuzzing::documents(data));
