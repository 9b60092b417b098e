//! `cargo xtask fuzz policy`: see `loopgate::fuzzing::policy`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| loopgate::fuzzing::policy(data));
