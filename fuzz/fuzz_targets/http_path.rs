//! `cargo xtask fuzz http_path`: see `loopgate::fuzzing::http_head`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    loopgate::fuzzing::http_head(data);
});
