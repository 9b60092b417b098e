//! `cargo xtask fuzz pg_startup`: see `loopgate::fuzzing::pg_startup`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| loopgate::fuzzing::pg_startup(data));
