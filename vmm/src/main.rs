//! `blkswarm`: boots a Linux guest with KVM, directly from a bzImage, and exits when it stops.

mod acpi;
mod api;
mod boot;
mod budget;
mod config;
mod cpuid;
mod disks;
mod fault_dump;
mod layout;
mod path_events;
mod pci;
mod plots;
mod report;
mod stats;
mod vcpu;
mod vm;

use std::time::Instant;

use config::Command;

fn main() {
    let launched = Instant::now();
    // Report times count from here.
    devices::latency::start_clock();
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
        Command::Ctl { socket, request } => match api::request(&socket, &request) {
            Ok(answer) => {
                print!("{answer}");
                return;
            }
            Err(e) => {
                eprintln!("blkswarm: ctl {}: {e}", socket.display());
                std::process::exit(1);
            }
        },
        Command::Plot { report, out_dir } => std::process::exit(plot(&report, &out_dir)),
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

/// `blkswarm plot REPORT.json DIR`: exit status 0 when every plot was written.
fn plot(report: &std::path::Path, out_dir: &std::path::Path) -> i32 {
    let parsed = std::fs::read(report)
        .map_err(|e| e.to_string())
        .and_then(|bytes| {
            serde_json::from_slice::<stats::Report>(&bytes).map_err(|e| e.to_string())
        });
    let report_data = match parsed {
        Ok(report_data) => report_data,
        Err(e) => {
            eprintln!("blkswarm: plot {}: {e}", report.display());
            return 1;
        }
    };
    match plots::render(&report_data, out_dir) {
        Ok(files) => {
            for file in files {
                println!("{}", file.display());
            }
            0
        }
        Err(e) => {
            eprintln!("blkswarm: plot: {e}");
            1
        }
    }
}
