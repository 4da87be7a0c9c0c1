//! Fuzz target: `devices::fuzzing::virtio_request` on each input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| devices::fuzzing::virtio_request(data));
