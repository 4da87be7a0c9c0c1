//! Per-vCPU CPUID: KVM's supported set, adjusted so each vCPU reports its own APIC id and the
//! topology of `max` possible CPUs, and identifies the hypervisor (so Linux uses kvm-clock and
//! the paravirtual features KVM offers).

use kvm_bindings::{kvm_cpuid_entry2, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

const LEAF_VENDOR: u32 = 0x0;
const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_TOPOLOGY: u32 = 0x4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_HYPERVISOR: u32 = 0x4000_0000;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_EXT_APIC_ID: u32 = 0x8000_001e;

/// Leaf 1 ECX bit 31: "running on a hypervisor".
const ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX bit 28: the logical processor count in EBX[23:16] is valid.
const EDX_HTT: u32 = 1 << 28;
/// Leaf 0xB/0x1F level types (ECX[15:8]).
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;
/// "KVMKVMKVM\0\0\0": the signature Linux's kvm guest support looks for.
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];

/// Who a vCPU is within the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuIdentity {
    pub apic_id: u32,
    /// Possible CPUs in the (single) package.
    pub max_cpus: u32,
}

/// Bits needed to number `count` cores.
fn id_bits(count: u32) -> u32 {
    count.next_power_of_two().trailing_zeros()
}

fn find(
    entries: &mut [kvm_cpuid_entry2],
    function: u32,
    index: u32,
) -> Option<&mut kvm_cpuid_entry2> {
    entries
        .iter_mut()
        .find(|e| e.function == function && e.index == index)
}

fn max_basic_leaf(entries: &[kvm_cpuid_entry2]) -> u32 {
    entries
        .iter()
        .find(|e| e.function == LEAF_VENDOR)
        .map_or(0, |e| e.eax)
}

/// One package of `max_cpus` single-threaded cores, described through leaf 0xB (and 0x1F when
/// the CPU has it): SMT level of one thread, core level of all possible CPUs.
fn topology_leaf(function: u32, id: VcpuIdentity) -> Vec<kvm_cpuid_entry2> {
    let entry = |index: u32, eax: u32, ebx: u32, level_type: u32| kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx: (level_type << 8) | index,
        edx: id.apic_id,
        ..Default::default()
    };
    vec![
        entry(0, 0, 1, LEVEL_TYPE_SMT),
        entry(1, id_bits(id.max_cpus), id.max_cpus, LEVEL_TYPE_CORE),
        // Level type 0 ends the enumeration.
        entry(2, 0, 0, 0),
    ]
}

/// Adjusts KVM's supported CPUID for one vCPU.
pub fn adjust_for_vcpu(entries: &mut Vec<kvm_cpuid_entry2>, id: VcpuIdentity) {
    let logical_count = id.max_cpus.min(0xff);
    if let Some(leaf) = find(entries, LEAF_FEATURES, 0) {
        leaf.ebx = (leaf.ebx & 0x0000_ffff) | (id.apic_id << 24) | (logical_count << 16);
        leaf.ecx |= ECX_HYPERVISOR;
        leaf.edx |= EDX_HTT;
    }

    // Deterministic cache parameters (Intel): EAX[31:26] is "cores per package - 1".
    for leaf in entries
        .iter_mut()
        .filter(|e| e.function == LEAF_CACHE_TOPOLOGY && e.eax & 0x1f != 0)
    {
        leaf.eax = (leaf.eax & 0x03ff_ffff) | ((id.max_cpus - 1).min(0x3f) << 26);
    }

    let has_v2_topology = max_basic_leaf(entries) >= LEAF_V2_EXT_TOPOLOGY
        && entries.iter().any(|e| e.function == LEAF_V2_EXT_TOPOLOGY);
    entries.retain(|e| e.function != LEAF_EXT_TOPOLOGY && e.function != LEAF_V2_EXT_TOPOLOGY);
    entries.extend(topology_leaf(LEAF_EXT_TOPOLOGY, id));
    if has_v2_topology {
        entries.extend(topology_leaf(LEAF_V2_EXT_TOPOLOGY, id));
    }
    if let Some(leaf) = find(entries, LEAF_VENDOR, 0) {
        leaf.eax = leaf.eax.max(LEAF_EXT_TOPOLOGY);
    }

    // AMD: number of cores (NC) and the APIC id bits that number them.
    if let Some(leaf) = find(entries, LEAF_AMD_SIZES, 0) {
        leaf.ecx = (leaf.ecx & !0xf0ff) | (id_bits(id.max_cpus) << 12) | (id.max_cpus - 1);
    }
    // AMD: extended APIC id and core id; one thread per core, node 0.
    if let Some(leaf) = find(entries, LEAF_AMD_EXT_APIC_ID, 0) {
        leaf.eax = id.apic_id;
        leaf.ebx = id.apic_id & 0xff;
        leaf.ecx = 0;
    }

    match find(entries, LEAF_HYPERVISOR, 0) {
        Some(leaf) => {
            leaf.ebx = KVM_SIGNATURE[0];
            leaf.ecx = KVM_SIGNATURE[1];
            leaf.edx = KVM_SIGNATURE[2];
        }
        None => entries.push(kvm_cpuid_entry2 {
            function: LEAF_HYPERVISOR,
            eax: LEAF_HYPERVISOR + 1,
            ebx: KVM_SIGNATURE[0],
            ecx: KVM_SIGNATURE[1],
            edx: KVM_SIGNATURE[2],
            ..Default::default()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    /// A small AMD-like supported set, as KVM would report it.
    fn supported() -> Vec<kvm_cpuid_entry2> {
        vec![
            leaf(0, 0, [0xd, 0x6874_7541, 0x444d_4163, 0x6974_6e65]),
            leaf(1, 0, [0x00a2_0f10, 0x0000_0800, 0x7ed8_320b, 0x178b_fbff]),
            leaf(0xb, 0, [9, 9, 9, 9]),
            leaf(0x4000_0000, 0, [0x4000_0001, 0, 0, 0]),
            leaf(0x8000_0008, 0, [0x3030, 0, 0xffff, 0]),
            leaf(0x8000_001e, 0, [7, 7, 7, 0]),
        ]
    }

    fn get(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *entries
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap_or_else(|| panic!("leaf {function:#x}.{index} missing"))
    }

    #[test]
    fn each_vcpu_reports_its_apic_id() {
        for apic_id in [0, 1, 7] {
            let mut entries = supported();
            adjust_for_vcpu(
                &mut entries,
                VcpuIdentity {
                    apic_id,
                    max_cpus: 8,
                },
            );
            assert_eq!(get(&entries, 1, 0).ebx >> 24, apic_id);
            assert_eq!((get(&entries, 1, 0).ebx >> 16) & 0xff, 8);
            assert_eq!(get(&entries, 0xb, 0).edx, apic_id);
            assert_eq!(get(&entries, 0xb, 1).edx, apic_id);
            assert_eq!(get(&entries, 0x8000_001e, 0).eax, apic_id);
        }
    }

    #[test]
    fn hypervisor_is_announced_as_kvm() {
        let mut entries = supported();
        adjust_for_vcpu(
            &mut entries,
            VcpuIdentity {
                apic_id: 0,
                max_cpus: 1,
            },
        );
        assert_ne!(get(&entries, 1, 0).ecx & ECX_HYPERVISOR, 0);
        let hv = get(&entries, 0x4000_0000, 0);
        let mut signature = Vec::new();
        for reg in [hv.ebx, hv.ecx, hv.edx] {
            signature.extend_from_slice(&reg.to_le_bytes());
        }
        assert_eq!(&signature, b"KVMKVMKVM\0\0\0");
        assert_eq!(hv.eax, 0x4000_0001);
    }

    #[test]
    fn hypervisor_leaf_is_added_when_missing() {
        let mut entries: Vec<_> = supported()
            .into_iter()
            .filter(|e| e.function != LEAF_HYPERVISOR)
            .collect();
        adjust_for_vcpu(
            &mut entries,
            VcpuIdentity {
                apic_id: 0,
                max_cpus: 2,
            },
        );
        assert_eq!(get(&entries, 0x4000_0000, 0).ebx, KVM_SIGNATURE[0]);
    }

    #[test]
    fn topology_describes_all_possible_cpus() {
        let mut entries = supported();
        adjust_for_vcpu(
            &mut entries,
            VcpuIdentity {
                apic_id: 1,
                max_cpus: 8,
            },
        );
        let smt = get(&entries, 0xb, 0);
        let core = get(&entries, 0xb, 1);
        let end = get(&entries, 0xb, 2);
        assert_eq!((smt.eax, smt.ebx, smt.ecx), (0, 1, 0x100));
        assert_eq!((core.eax, core.ebx, core.ecx), (3, 8, 0x201));
        assert_eq!((end.ecx >> 8) & 0xff, 0);
        assert_eq!(entries.iter().filter(|e| e.function == 0xb).count(), 3);
        assert!(entries
            .iter()
            .filter(|e| e.function == 0xb)
            .all(|e| e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX != 0));
        let sizes = get(&entries, 0x8000_0008, 0);
        assert_eq!(sizes.ecx & 0xff, 7);
        assert_eq!((sizes.ecx >> 12) & 0xf, 3);
        // Leaf 0x1F is only described where the CPU has it.
        assert!(entries.iter().all(|e| e.function != 0x1f));
    }

    #[test]
    fn odd_cpu_counts_round_up_the_id_width() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(254), 8);
    }

    #[test]
    fn max_basic_leaf_covers_the_topology_leaf() {
        let mut entries = supported();
        entries[0].eax = 7;
        adjust_for_vcpu(
            &mut entries,
            VcpuIdentity {
                apic_id: 0,
                max_cpus: 2,
            },
        );
        assert_eq!(get(&entries, 0, 0).eax, 0xb);
    }
}
