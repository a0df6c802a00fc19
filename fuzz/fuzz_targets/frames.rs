//! V1/V2 text frames, V2 binary frames and join payloads must never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    walcast::fuzzing::frames(data);
});
