//! QEMU as the L2 VMM, beside blkswarm: the same guest kernel and initramfs booted by QEMU
//! with KVM (qboot, direct kernel boot), in the lab or directly. Used by the benchmark
//! (blkswarm-bench) and the stress suite (blkswarm-stress) to compare the two VMMs in the
//! same run.

use std::path::{Path, PathBuf};

use crate::{paths, GuestSpec, Mode, Runner};

/// Devices per PCI bridge: slots 1..=31 (slot 0 left free, as on a real bridge with SHPC).
pub const DISKS_PER_BRIDGE: u32 = 31;
/// First slot on pci.0 for bridges (pc machine: 0 host bridge, 1 PIIX3).
pub const FIRST_BRIDGE_SLOT: u32 = 2;
/// Bridges that fit on pci.0 (slots 2..=31).
pub const MAX_BRIDGES: u32 = 32 - FIRST_BRIDGE_SLOT;
/// Largest QEMU layout built here.
pub const MAX_QEMU_DISKS: u32 = MAX_BRIDGES * DISKS_PER_BRIDGE;

/// Where QEMU and its firmware go inside L1.
pub const LAB_QEMU: &str = "/lab/bench/qemu-system-x86_64";
pub const LAB_QEMU_FIRMWARE: &str = "/lab/bench/qemu-firmware";
/// Firmware files QEMU needs for qboot + direct kernel boot (no VGA, no NIC ROMs).
pub const QEMU_FIRMWARE_FILES: [&str; 3] = ["qboot.rom", "linuxboot_dma.bin", "kvmvapic.bin"];

/// Where the QEMU that is measured, its firmware and the guest files are, as the
/// command sees them (host paths in direct mode, L1 paths in the lab).
#[derive(Debug, Clone)]
pub struct QemuPaths {
    pub qemu: String,
    pub firmware: String,
    pub kernel: String,
    pub initramfs: String,
}

/// QEMU as the L2 VMM: KVM, qboot, direct kernel boot of `guest`'s command line.
pub fn qemu_argv(
    p: &QemuPaths,
    cpus: u32,
    memory_mib: u64,
    guest: &GuestSpec,
    disks: &[String],
) -> Vec<String> {
    let mut argv: Vec<String> = [
        p.qemu.as_str(),
        "-L",
        &p.firmware,
        "-bios",
        "qboot.rom",
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-smp",
        &cpus.to_string(),
        "-m",
        &memory_mib.to_string(),
        "-nographic",
        "-no-reboot",
        "-nic",
        "none",
        "-vga",
        "none",
        "-kernel",
        &p.kernel,
        "-initrd",
        &p.initramfs,
        "-append",
        &guest.kernel_cmdline(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    argv.extend(disks.iter().cloned());
    argv
}

/// QEMU's firmware directory: BLKSWARM_QEMU_FIRMWARE, else `<prefix>/share/qemu` of the binary.
pub fn firmware_dir(qemu: &Path) -> PathBuf {
    if let Some(d) = std::env::var_os("BLKSWARM_QEMU_FIRMWARE").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let real = qemu.canonicalize().unwrap_or_else(|_| qemu.to_path_buf());
    real.parent()
        .and_then(Path::parent)
        .map(|prefix| prefix.join("share/qemu"))
        .unwrap_or_else(|| PathBuf::from("/usr/share/qemu"))
}

/// In the lab, ships QEMU, its firmware (and the guest files when no blkswarm guest
/// runs) into L1; says where the measured QEMU and the guest files are.
pub fn ship_qemu(
    mut runner: Runner,
    skip_qemu: bool,
    skip_blkswarm: bool,
) -> Result<(Runner, Option<QemuPaths>), String> {
    let p = runner.paths().clone();
    let lab = runner.mode() == Mode::Lab;
    let mut qemu_paths = None;
    if !skip_qemu {
        let qemu = paths::find_qemu()?;
        let fw = firmware_dir(&qemu);
        for f in QEMU_FIRMWARE_FILES {
            if !fw.join(f).is_file() {
                return Err(format!(
                    "QEMU firmware {} missing (set BLKSWARM_QEMU_FIRMWARE)",
                    fw.join(f).display()
                ));
            }
        }
        qemu_paths = Some(if lab {
            runner = runner
                .lab_binary(LAB_QEMU, &qemu)
                .map_err(|e| e.to_string())?;
            for f in QEMU_FIRMWARE_FILES {
                runner = runner.lab_file(format!("{LAB_QEMU_FIRMWARE}/{f}"), fw.join(f));
            }
            if skip_blkswarm {
                // Without a blkswarm guest the harness ships no guest files: add them.
                runner = runner
                    .lab_file(crate::lab::LAB_KERNEL, p.guest_kernel())
                    .lab_file(crate::lab::LAB_INITRAMFS, p.guest_initramfs());
            }
            QemuPaths {
                qemu: LAB_QEMU.into(),
                firmware: LAB_QEMU_FIRMWARE.into(),
                kernel: crate::lab::LAB_KERNEL.into(),
                initramfs: crate::lab::LAB_INITRAMFS.into(),
            }
        } else {
            let s = |p: PathBuf| p.to_string_lossy().into_owned();
            QemuPaths {
                qemu: s(qemu),
                firmware: s(fw),
                kernel: s(p.guest_kernel()),
                initramfs: s(p.guest_initramfs()),
            }
        });
    }

    Ok((runner, qemu_paths))
}

/// QEMU's disks: `pci-bridge`s on pci.0, 31 `virtio-blk-pci` on each, `null-co` drives.
pub fn qemu_disk_args(n: u32, queues: u32, size: &str) -> Result<Vec<String>, String> {
    qemu_virtio_disks(n, queues, |_| format!("driver=null-co,size={size}"))
}

/// `n` `virtio-blk-pci` disks with `queues` queues behind `pci-bridge`s on pci.0 (31 a
/// bridge); `drive(i)` gives disk i's `-drive` options (without `if` and `id`).
pub fn qemu_virtio_disks(
    n: u32,
    queues: u32,
    drive: impl Fn(u32) -> String,
) -> Result<Vec<String>, String> {
    if n > MAX_QEMU_DISKS {
        return Err(format!(
            "{n} disks: this QEMU layout holds at most {MAX_QEMU_DISKS} ({MAX_BRIDGES} bridges x {DISKS_PER_BRIDGE})"
        ));
    }
    let mut v = Vec::new();
    for i in 0..n {
        let (br, slot) = (i / DISKS_PER_BRIDGE, i % DISKS_PER_BRIDGE + 1);
        if slot == 1 {
            v.push("-device".into());
            v.push(format!(
                "pci-bridge,id=br{br},chassis_nr={},bus=pci.0,addr={:#x}",
                br + 1,
                br + FIRST_BRIDGE_SLOT
            ));
        }
        v.push("-drive".into());
        v.push(format!("{},if=none,id=d{i}", drive(i)));
        v.push("-device".into());
        v.push(format!(
            "virtio-blk-pci,drive=d{i},num-queues={queues},bus=br{br},addr={slot:#x}"
        ));
    }
    Ok(v)
}
