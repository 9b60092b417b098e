//! `cargo xtask fuzz config`: see `loopgate::fuzzing::config`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| loopgate::fuzzing::config(data));
