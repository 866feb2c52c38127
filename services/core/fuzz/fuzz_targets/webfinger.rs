#![no_main]
//! See `stampede_core::fuzzing::webfinger`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| stampede_core::fuzzing::webfinger(data));
