//! `cargo xtask fuzz dns_query`: see `loopgate::fuzzing::dns_query`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| loopgate::fuzzing::dns_query(data));
