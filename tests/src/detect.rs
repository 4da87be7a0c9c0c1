//! Choosing between direct KVM and the lab, from facts about the host.

use std::fs::OpenOptions;
use std::path::Path;

use crate::Mode;

/// The state of `/dev/kvm` on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmState {
    /// Opens read-write, and a hardware vendor module (kvm_intel / kvm_amd) is loaded,
    /// or at least no software-only one is.
    Usable,
    /// Opens, but is served by a software-only module (kvm_pvm): it cannot boot Linux.
    SoftwareOnly(String),
    /// Does not exist.
    Missing,
    /// Exists but cannot be opened (the error).
    Unopenable(String),
}

/// What the mode decision looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    /// `vmx` or `svm` if /proc/cpuinfo lists it.
    pub hw_flag: Option<&'static str>,
    pub kvm: KvmState,
}

/// The hardware virtualization flag (`vmx` or `svm`) in a /proc/cpuinfo text, if any.
/// Only whole words of `flags` lines count (`vmx_` or `nsvm` would not).
pub fn hw_virt_flag(cpuinfo: &str) -> Option<&'static str> {
    for line in cpuinfo.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        if key.trim() != "flags" {
            continue;
        }
        for flag in value.split_whitespace() {
            match flag {
                "vmx" => return Some("vmx"),
                "svm" => return Some("svm"),
                _ => {}
            }
        }
    }
    None
}

impl HostFacts {
    /// Reads /proc/cpuinfo, tries to open /dev/kvm, and looks at /sys/module.
    pub fn probe() -> HostFacts {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let module = |m: &str| Path::new("/sys/module").join(m).exists();
        let kvm = match OpenOptions::new().read(true).write(true).open("/dev/kvm") {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => KvmState::Missing,
            Err(e) => KvmState::Unopenable(e.to_string()),
            Ok(_) => {
                let hardware = module("kvm_intel") || module("kvm_amd");
                if !hardware && module("kvm_pvm") {
                    KvmState::SoftwareOnly("kvm_pvm".to_string())
                } else {
                    KvmState::Usable
                }
            }
        };
        HostFacts {
            hw_flag: hw_virt_flag(&cpuinfo),
            kvm,
        }
    }
}

/// Why direct mode is impossible on this host, or None if it is possible.
pub fn direct_blocker(facts: &HostFacts) -> Option<String> {
    let mut why = Vec::new();
    if facts.hw_flag.is_none() {
        why.push("no vmx/svm in /proc/cpuinfo".to_string());
    }
    match &facts.kvm {
        KvmState::Usable => {}
        KvmState::SoftwareOnly(_) => why.push("/dev/kvm is software-only".to_string()),
        KvmState::Missing => why.push("/dev/kvm does not exist".to_string()),
        KvmState::Unopenable(e) => why.push(format!("/dev/kvm cannot be opened: {e}")),
    }
    if why.is_empty() {
        None
    } else {
        Some(why.join("; "))
    }
}

/// The mode to use and the sentence explaining it. `forced` comes from BLKSWARM_MODE.
pub fn choose(facts: &HostFacts, forced: Option<Mode>) -> (Mode, String) {
    let blocker = direct_blocker(facts);
    match (forced, blocker) {
        (Some(Mode::Direct), None) => (
            Mode::Direct,
            format!(
                "forced by BLKSWARM_MODE=direct; {}",
                facts.hw_flag.unwrap_or("?")
            ),
        ),
        (Some(Mode::Direct), Some(b)) => (
            Mode::Direct,
            format!("forced by BLKSWARM_MODE=direct, although {b}"),
        ),
        (Some(Mode::Lab), None) => (
            Mode::Lab,
            format!(
                "forced by BLKSWARM_MODE=lab; direct KVM ({}) was available",
                facts.hw_flag.unwrap_or("?")
            ),
        ),
        (Some(Mode::Lab), Some(b)) => (Mode::Lab, format!("forced by BLKSWARM_MODE=lab; {b}")),
        (None, None) => (Mode::Direct, facts.hw_flag.unwrap_or("?").to_string()),
        (None, Some(b)) => (Mode::Lab, b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AMD: &str = "processor\t: 0\nvendor_id\t: AuthenticAMD\n\
        flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep svm extapic npt\n\
        bugs\t\t: sysret_ss_attrs\n\nprocessor\t: 1\nflags\t\t: fpu svm\n";
    const INTEL: &str =
        "processor\t: 0\nflags\t\t: fpu vme vmx smx est tm2\nvmx flags\t: vnmi ept\n";
    // A VM without nested virtualization; "vmx" appears only in unrelated places.
    const NONE: &str = "processor\t: 0\nmodel name\t: vmx svm lookalike\n\
        flags\t\t: fpu vme hypervisor nsvm vmx_x svmx\nvmx flags\t: vnmi\n";

    fn facts(cpuinfo: &str, kvm: KvmState) -> HostFacts {
        HostFacts {
            hw_flag: hw_virt_flag(cpuinfo),
            kvm,
        }
    }

    #[test]
    fn flags() {
        assert_eq!(hw_virt_flag(AMD), Some("svm"));
        assert_eq!(hw_virt_flag(INTEL), Some("vmx"));
        assert_eq!(hw_virt_flag(NONE), None);
        assert_eq!(hw_virt_flag(""), None);
    }

    #[test]
    fn decisions() {
        assert_eq!(
            choose(&facts(AMD, KvmState::Usable), None),
            (Mode::Direct, "svm".to_string())
        );
        assert_eq!(
            choose(&facts(NONE, KvmState::SoftwareOnly("kvm_pvm".into())), None),
            (
                Mode::Lab,
                "no vmx/svm in /proc/cpuinfo; /dev/kvm is software-only".to_string()
            )
        );
        let (mode, why) = choose(&facts(INTEL, KvmState::Unopenable("EACCES".into())), None);
        assert_eq!(mode, Mode::Lab);
        assert_eq!(why, "/dev/kvm cannot be opened: EACCES");
        let (mode, why) = choose(&facts(NONE, KvmState::Missing), None);
        assert_eq!(mode, Mode::Lab);
        assert_eq!(why, "no vmx/svm in /proc/cpuinfo; /dev/kvm does not exist");
    }

    #[test]
    fn forced() {
        let (mode, why) = choose(&facts(AMD, KvmState::Usable), Some(Mode::Lab));
        assert_eq!(mode, Mode::Lab);
        assert!(why.contains("BLKSWARM_MODE=lab"), "{why}");
        let (mode, why) = choose(
            &facts(NONE, KvmState::SoftwareOnly("kvm_pvm".into())),
            Some(Mode::Direct),
        );
        assert_eq!(mode, Mode::Direct);
        assert!(why.contains("no vmx/svm"), "{why}");
    }
}
