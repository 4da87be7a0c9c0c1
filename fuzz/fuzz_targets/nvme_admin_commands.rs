//! Fuzz target: `devices::fuzzing::nvme_admin_commands` on each input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| devices::fuzzing::nvme_admin_commands(data));
