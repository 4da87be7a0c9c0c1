//! `blkswarm`: boots a Linux guest with KVM, directly from a bzImage, and exits when it stops.

mod acpi;
mod boot;
mod budget;
mod config;
mod cpuid;
mod disks;
mod layout;
mod pci;
mod report;
mod vcpu;
mod vm;

use std::time::Instant;

use config::Command;

fn main() {
    let launched = Instant::now();
    let command = match config::parse_args(std::env::args().skip(1)) {
        Ok(command) => command,
        Err(e) => {
            eprintln!("blkswarm: {e}");
            std::process::exit(1);
        }
    };
    let config = match command {
        Command::Help => {
            print!("{}", config::USAGE);
            return;
        }
        Command::Version => {
            println!("blkswarm {}", env!("CARGO_PKG_VERSION"));
            return;
        }
        Command::Run(config) => config,
    };
    eprintln!(
        "@@vmm start cpus_boot={} cpus_max={} memory_mib={}",
        config.cpus.boot,
        config.cpus.max,
        config.memory_bytes >> 20
    );
    let code = match vm::run(&config, launched) {
        Ok(exit) => {
            let reason = match &exit {
                vm::VmExit::PowerOff => "poweroff".to_string(),
                vm::VmExit::Reset => "reset".to_string(),
                vm::VmExit::DryRun => "dry-run".to_string(),
                vm::VmExit::Signal(signal) => format!("signal-{signal}"),
                vm::VmExit::Fault { vcpu, cause } => {
                    eprintln!("blkswarm: guest fault on vCPU {vcpu}: {cause}");
                    "fault".to_string()
                }
            };
            eprintln!(
                "@@vmm exit reason={reason} code={} runtime_ms={}",
                exit.exit_code(),
                launched.elapsed().as_millis()
            );
            exit.exit_code()
        }
        Err(e) => {
            eprintln!("blkswarm: {e}");
            eprintln!("@@vmm exit reason=error code=1");
            1
        }
    };
    // vCPU threads may still be inside KVM_RUN; the process exit ends them.
    std::process::exit(code);
}
