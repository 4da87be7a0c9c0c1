//! Fuzz target: `devices::fuzzing::nvme_io_command` on each input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| devices::fuzzing::nvme_io_command(data));
