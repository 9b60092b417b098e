//! `cargo xtask fuzz pg_messages`: see `loopgate::fuzzing::pg_messages`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| loopgate::fuzzing::pg_messages(data));
