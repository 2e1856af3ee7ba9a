//! Per-vCPU CPUID: KVM's supported list patched with this vCPU's APIC id and a flat topology
//! in which every vCPU is one single-threaded core of one socket.

use kvm_bindings::{kvm_cpuid_entry2, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// Where a vCPU sits in the guest's topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTopology {
    /// This vCPU's (x2)APIC id; equal to its vCPU id.
    pub apic_id: u32,
    /// vCPUs (cores) in the one socket.
    pub vcpu_count: u32,
}

const LEAF_BASIC: u32 = 0;
const LEAF_FEATURES: u32 = 1;
const LEAF_CACHE_PARAMS: u32 = 4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;

const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;

/// Topology level types in leaf 0xB / 0x1F ECX[15:8].
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Bits of the APIC id that number the cores: ceil(log2(vcpu_count)).
fn core_id_bits(vcpu_count: u32) -> u32 {
    vcpu_count.max(1).saturating_sub(1).checked_ilog2().map_or(0, |bit| bit + 1)
}

/// Patches `entries` (KVM_GET_SUPPORTED_CPUID's list) for one vCPU. The hypervisor bit and
/// KVM's paravirtual leaves (0x4000_0000..) are kept so the guest finds kvmclock.
pub fn patch_cpuid(entries: &mut Vec<kvm_cpuid_entry2>, topology: CpuTopology) {
    let count = topology.vcpu_count.max(1);
    let apic_id = topology.apic_id;
    let max_basic_leaf = entries.iter().find(|e| e.function == LEAF_BASIC).map_or(0, |e| e.eax);
    let has_leaf_1f = entries.iter().any(|e| e.function == LEAF_TOPOLOGY_V2);

    for entry in entries.iter_mut() {
        match entry.function {
            LEAF_FEATURES => {
                // EBX[31:24] initial APIC id, EBX[23:16] logical processors per package.
                entry.ebx =
                    (entry.ebx & 0x0000_ffff) | ((apic_id & 0xff) << 24) | (count.min(0xff) << 16);
                entry.ecx |= LEAF1_ECX_HYPERVISOR;
                entry.edx |= LEAF1_EDX_HTT;
            }
            LEAF_CACHE_PARAMS => {
                let cache_level = (entry.eax >> 5) & 0x7;
                // EAX[31:26] cores per package - 1; EAX[25:14] threads sharing the cache - 1:
                // one per core for L1/L2, the whole socket for L3.
                let sharing = if cache_level >= 3 { count - 1 } else { 0 };
                entry.eax = (entry.eax & 0x3fff)
                    | ((count - 1).min(0x3f) << 26)
                    | (sharing.min(0xfff) << 14);
            }
            _ => {}
        }
    }

    entries.retain(|e| e.function != LEAF_TOPOLOGY && e.function != LEAF_TOPOLOGY_V2);
    if max_basic_leaf >= LEAF_TOPOLOGY {
        entries.extend(topology_leaf(LEAF_TOPOLOGY, apic_id, count));
    }
    if has_leaf_1f && max_basic_leaf >= LEAF_TOPOLOGY_V2 {
        entries.extend(topology_leaf(LEAF_TOPOLOGY_V2, apic_id, count));
    }
}

/// Leaf 0xB / 0x1F: subleaf 0 = SMT level (1 thread), subleaf 1 = core level (all vCPUs),
/// subleaf 2 = the invalid level that ends the list. EDX is the x2APIC id on every subleaf.
fn topology_leaf(function: u32, apic_id: u32, count: u32) -> [kvm_cpuid_entry2; 3] {
    let subleaf = |index: u32, shift: u32, processors: u32, level_type: u32| kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax: shift,
        ebx: processors,
        ecx: (level_type << 8) | index,
        edx: apic_id,
        padding: [0; 3],
    };
    [
        subleaf(0, 0, 1, LEVEL_SMT),
        subleaf(1, core_id_bits(count), count, LEVEL_CORE),
        subleaf(2, 0, 0, 0),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        function: u32,
        index: u32,
        eax: u32,
        ebx: u32,
        ecx: u32,
        edx: u32,
    ) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, flags: 0, eax, ebx, ecx, edx, padding: [0; 3] }
    }

    fn host_list() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(0, 0, 0x1f, 0x756e_6547, 0x6c65_746e, 0x4965_6e69),
            // CLFLUSH size 8 in EBX[15:8], a host APIC id in EBX[31:24] that must be replaced.
            entry(1, 0, 0x906ea, 0x0e10_0800, 0x7ffa_3203, 0x0f8b_fbff),
            entry(4, 0, 0x1c00_4121, 0x01c0_003f, 0x3f, 0), // L1d
            entry(4, 3, 0x1c03_c163, 0x03c0_003f, 0x2fff, 6), // L3
            entry(0xb, 0, 1, 2, 0x100, 0xe),
            entry(0xb, 1, 4, 12, 0x201, 0xe),
            entry(0x1f, 0, 1, 2, 0x100, 0xe),
            entry(0x4000_0000, 0, 0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d),
            entry(0x4000_0001, 0, 0x0100_7afb, 0, 0, 0),
        ]
    }

    fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *entries
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap_or_else(|| panic!("leaf {function:#x}.{index} missing"))
    }

    #[test]
    fn leaf_1_carries_apic_id_logical_count_htt_and_hypervisor_bit() {
        let mut entries = host_list();
        patch_cpuid(&mut entries, CpuTopology { apic_id: 3, vcpu_count: 4 });
        let leaf = find(&entries, 1, 0);
        assert_eq!(leaf.ebx >> 24, 3);
        assert_eq!((leaf.ebx >> 16) & 0xff, 4);
        assert_eq!(leaf.ebx & 0xffff, 0x0800, "CLFLUSH line size must be kept");
        assert_ne!(leaf.edx & LEAF1_EDX_HTT, 0);
        assert_ne!(leaf.ecx & LEAF1_ECX_HYPERVISOR, 0);
    }

    #[test]
    fn topology_leaves_describe_one_socket_of_single_thread_cores() {
        let mut entries = host_list();
        patch_cpuid(&mut entries, CpuTopology { apic_id: 5, vcpu_count: 6 });
        for function in [0xb, 0x1f] {
            let smt = find(&entries, function, 0);
            let core = find(&entries, function, 1);
            let end = find(&entries, function, 2);
            assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 5));
            assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (3, 6, 0x201, 5));
            assert_eq!((end.ebx, end.ecx >> 8, end.edx), (0, 0, 5));
            assert_ne!(core.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX, 0);
            assert_eq!(entries.iter().filter(|e| e.function == function).count(), 3);
        }
    }

    #[test]
    fn topology_leaves_are_not_invented_beyond_the_max_basic_leaf() {
        let mut entries = host_list();
        entries[0].eax = 0xd;
        patch_cpuid(&mut entries, CpuTopology { apic_id: 0, vcpu_count: 2 });
        assert_eq!(entries.iter().filter(|e| e.function == 0xb).count(), 3);
        assert!(entries.iter().all(|e| e.function != 0x1f));
    }

    #[test]
    fn leaf_4_reports_cores_per_package_and_l3_sharing() {
        let mut entries = host_list();
        patch_cpuid(&mut entries, CpuTopology { apic_id: 1, vcpu_count: 4 });
        let l1 = find(&entries, 4, 0);
        let l3 = find(&entries, 4, 3);
        assert_eq!(l1.eax >> 26, 3);
        assert_eq!((l1.eax >> 14) & 0xfff, 0);
        assert_eq!(l1.eax & 0x3fff, 0x0121, "cache type and level must be kept");
        assert_eq!(l3.eax >> 26, 3);
        assert_eq!((l3.eax >> 14) & 0xfff, 3);
    }

    #[test]
    fn paravirt_leaves_are_kept() {
        let mut entries = host_list();
        let before: Vec<_> =
            entries.iter().filter(|e| e.function >= 0x4000_0000).copied().collect();
        patch_cpuid(&mut entries, CpuTopology { apic_id: 0, vcpu_count: 1 });
        let after: Vec<_> = entries.iter().filter(|e| e.function >= 0x4000_0000).copied().collect();
        assert_eq!(before, after);
    }

    #[test]
    fn core_id_bits_round_up_to_a_power_of_two() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(core_id_bits), [0, 1, 2, 2, 3, 3, 4]);
        assert_eq!(core_id_bits(0), 0);
    }
}
