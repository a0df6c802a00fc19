//! The pgoutput decoder and the value conversions it feeds must never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    walcast::fuzzing::pgoutput(data);
});
