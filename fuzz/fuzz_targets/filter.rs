//! Filter strings, bindings and the comparisons behind them must never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    walcast::fuzzing::filter(data);
});
