//! `cargo xtask fuzz pg_sql`: see `loopgate::fuzzing::pg_sql`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| loopgate::fuzzing::pg_sql(data));
