//! PC legacy devices a firmware-less Linux guest needs: the 16550 console and the ACPI power
//! registers that turn the guest's `poweroff` and `reboot` into VMM exits.

pub mod power;
pub mod serial;

pub use power::{AcpiPowerDevice, PowerEvent};
pub use serial::SerialConsole;
