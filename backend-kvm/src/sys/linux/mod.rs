//! KVM on Linux: the hypervisor (/dev/kvm) and VM objects; vCPUs live in `vcpu`.

mod convert;
mod cpuid;
mod kick;
mod notifier;
mod probe;
mod state;
mod vcpu;

use std::collections::BTreeMap;
use std::sync::Arc;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_irqchip, kvm_msi, kvm_pit_config, kvm_userspace_memory_region,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES,
    KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vmm::hypervisor::{
    ArchVcpu, GuestNotifier, GuestRamMapping, Hypervisor, HypervisorError, InterruptSink, Result,
    Vm, VmSetup, VmState,
};

pub use kick::KvmKicker;
pub use probe::{kvm_acceleration, KvmAcceleration};
use state::{check_backend, decode_key, encode, invalid, BACKEND};

/// Where KVM puts the three pages of the real-mode TSS (VMX needs them below 4 GiB, outside
/// RAM and the PCI hole's devices). QEMU's addresses, right below the 16 MiB a firmware image
/// may fill under 4 GiB: KVM refuses a memory slot over its own pages.
const TSS_ADDRESS: usize = 0xfeff_d000;
/// The identity-map page table page KVM needs on VMX without unrestricted guest.
const IDENTITY_MAP_ADDRESS: u64 = 0xfeff_c000;

/// Maps a kvm-ioctls error to [`HypervisorError::Os`] for `op`.
fn os(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> HypervisorError {
    move |e| HypervisorError::Os { op, source: std::io::Error::from_raw_os_error(e.errno()) }
}

/// What KVM supports on this host, read once.
#[derive(Debug)]
struct HostCaps {
    /// KVM_GET_SUPPORTED_CPUID, before per-vCPU patching.
    supported_cpuid: Vec<kvm_cpuid_entry2>,
    /// KVM_GET_MSR_INDEX_LIST: the MSRs a vCPU snapshot tries to save.
    msr_indices: Vec<u32>,
}

/// The KVM hypervisor: an open /dev/kvm.
pub struct KvmHypervisor {
    kvm: Kvm,
    caps: Arc<HostCaps>,
}

impl std::fmt::Debug for KvmHypervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmHypervisor").finish_non_exhaustive()
    }
}

impl KvmHypervisor {
    /// Opens /dev/kvm and reads what it supports. A missing or forbidden /dev/kvm (or an
    /// unusable KVM) is [`HypervisorError::Unavailable`] with the reason.
    pub fn new() -> std::result::Result<KvmHypervisor, HypervisorError> {
        let unavailable =
            |reason: String| HypervisorError::Unavailable { backend: BACKEND, reason };
        let kvm = Kvm::new().map_err(|e| {
            unavailable(match e.errno() {
                libc::ENOENT => "/dev/kvm does not exist (is the kvm module loaded?)".to_string(),
                libc::EACCES | libc::EPERM => {
                    "permission denied opening /dev/kvm (is the user in the kvm group?)".to_string()
                }
                _ => format!(
                    "cannot open /dev/kvm: {}",
                    std::io::Error::from_raw_os_error(e.errno())
                ),
            })
        })?;
        let version = kvm.get_api_version();
        if version != kvm_bindings::KVM_API_VERSION as i32 {
            return Err(unavailable(format!("unsupported KVM API version {version}")));
        }
        for (cap, name) in [
            (Cap::Irqchip, "in-kernel irqchip"),
            (Cap::Pit2, "PIT2"),
            (Cap::UserMemory, "user memory"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(unavailable(format!("KVM lacks the {name} capability")));
            }
        }
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| unavailable(format!("KVM_GET_SUPPORTED_CPUID failed: {e}")))?
            .as_slice()
            .to_vec();
        let msr_indices = kvm
            .get_msr_index_list()
            .map_err(|e| unavailable(format!("KVM_GET_MSR_INDEX_LIST failed: {e}")))?
            .as_slice()
            .to_vec();
        Ok(KvmHypervisor { kvm, caps: Arc::new(HostCaps { supported_cpuid, msr_indices }) })
    }
}

impl Hypervisor for KvmHypervisor {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn create_vm(&self, setup: &VmSetup) -> Result<Arc<dyn Vm>> {
        let max_vcpus = self.kvm.get_max_vcpus();
        if setup.vcpu_count == 0 || setup.vcpu_count as usize > max_vcpus {
            return Err(HypervisorError::Os {
                op: "KVM_CREATE_VM",
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("{} vCPUs requested, KVM allows 1..={max_vcpus}", setup.vcpu_count),
                ),
            });
        }
        let vm = self.kvm.create_vm().map_err(os("KVM_CREATE_VM"))?;
        vm.set_tss_address(TSS_ADDRESS).map_err(os("KVM_SET_TSS_ADDR"))?;
        vm.set_identity_map_address(IDENTITY_MAP_ADDRESS)
            .map_err(os("KVM_SET_IDENTITY_MAP_ADDR"))?;
        vm.create_irq_chip().map_err(os("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        vm.create_pit2(pit).map_err(os("KVM_CREATE_PIT2"))?;
        // KVM_CAP_XSAVE2 answers the size of the XSAVE buffer KVM_GET_XSAVE2 fills (0 if absent).
        let xsave2_size = usize::try_from(vm.check_extension_int(Cap::Xsave2)).unwrap_or(0);
        Ok(Arc::new(KvmVm {
            fd: Arc::new(vm),
            caps: self.caps.clone(),
            vcpu_count: setup.vcpu_count,
            xsave2_size,
            has_xsave: self.kvm.check_extension(Cap::Xsave),
            has_xcrs: self.kvm.check_extension(Cap::Xcrs),
        }))
    }
}

/// One KVM VM with the in-kernel PIC, IOAPIC, LAPICs and PIT.
pub struct KvmVm {
    /// Shared with the notifiers, which unregister themselves through it.
    fd: Arc<VmFd>,
    caps: Arc<HostCaps>,
    vcpu_count: u32,
    xsave2_size: usize,
    has_xsave: bool,
    has_xcrs: bool,
}

/// VM state blob keys, with the irqchip id each stands for.
const IRQCHIPS: [(&str, u32); 3] = [
    ("pic_master", KVM_IRQCHIP_PIC_MASTER),
    ("pic_slave", KVM_IRQCHIP_PIC_SLAVE),
    ("ioapic", KVM_IRQCHIP_IOAPIC),
];
const PIT_KEY: &str = "pit2";
const CLOCK_KEY: &str = "clock";

impl InterruptSink for KvmVm {
    fn set_irq_line(&self, gsi: u32, active: bool) -> Result<()> {
        self.fd.set_irq_line(gsi, active).map_err(os("KVM_IRQ_LINE"))
    }

    fn signal_msi(&self, address: u64, data: u32) -> Result<()> {
        let msi = kvm_msi {
            address_lo: address as u32,
            address_hi: (address >> 32) as u32,
            data,
            ..Default::default()
        };
        // Ok(0) means the guest had the interrupt masked: not an error for the device.
        self.fd.signal_msi(msi).map(drop).map_err(os("KVM_SIGNAL_MSI"))
    }
}

impl Vm for KvmVm {
    unsafe fn map_memory(&self, mapping: GuestRamMapping) -> Result<()> {
        let region = kvm_userspace_memory_region {
            slot: mapping.slot,
            flags: if mapping.readonly { KVM_MEM_READONLY } else { 0 }
                | if mapping.track_dirty { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            guest_phys_addr: mapping.guest_addr,
            memory_size: mapping.size,
            userspace_addr: mapping.host_addr as u64,
        };
        // SAFETY: the caller guarantees the host range is a valid mapping that outlives the VM.
        unsafe { self.fd.set_user_memory_region(region) }.map_err(os("KVM_SET_USER_MEMORY_REGION"))
    }

    fn unmap_memory(&self, slot: u32, guest_addr: u64, _size: u64) -> Result<()> {
        // KVM deletes a slot given a size of 0; it only checks the addresses' alignment.
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: guest_addr,
            memory_size: 0,
            userspace_addr: 0,
        };
        // SAFETY: deleting a slot gives the guest no access to host memory; KVM stops using
        // the old host range before the ioctl returns.
        unsafe { self.fd.set_user_memory_region(region) }.map_err(os("KVM_SET_USER_MEMORY_REGION"))
    }

    fn create_vcpu(&self, id: u32) -> Result<Box<dyn ArchVcpu>> {
        if id >= self.vcpu_count {
            return Err(HypervisorError::Os {
                op: "KVM_CREATE_VCPU",
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("vCPU id {id} out of range for {} vCPUs", self.vcpu_count),
                ),
            });
        }
        let vcpu = vcpu::KvmVcpu::new(self, id)?;
        Ok(Box::new(vcpu))
    }

    fn register_notifier(&self, addr: u64, len: u32) -> Result<Box<dyn GuestNotifier>> {
        Ok(Box::new(notifier::KvmNotifier::new(self.fd.clone(), addr, len)?))
    }

    fn take_dirty_pages(&self, slot: u32, size: u64) -> Result<Vec<u64>> {
        let size = usize::try_from(size).map_err(|_| {
            HypervisorError::InvalidState(format!("memory slot {slot} of {size} bytes"))
        })?;
        self.fd.get_dirty_log(slot, size).map_err(os("KVM_GET_DIRTY_LOG"))
    }

    fn save_state(&self) -> Result<VmState> {
        let mut blobs = BTreeMap::new();
        for (key, chip_id) in IRQCHIPS {
            let mut chip = kvm_irqchip { chip_id, ..Default::default() };
            self.fd.get_irqchip(&mut chip).map_err(os("KVM_GET_IRQCHIP"))?;
            blobs.insert(key.to_string(), encode(&chip));
        }
        let pit = self.fd.get_pit2().map_err(os("KVM_GET_PIT2"))?;
        blobs.insert(PIT_KEY.to_string(), encode(&pit));
        let clock = self.fd.get_clock().map_err(os("KVM_GET_CLOCK"))?;
        blobs.insert(CLOCK_KEY.to_string(), encode(&clock));
        Ok(VmState { backend: BACKEND.to_string(), blobs })
    }

    fn restore_state(&self, state: &VmState) -> Result<()> {
        check_backend(&state.backend)?;
        // Decode everything before touching the VM so a bad state changes nothing.
        let mut chips = Vec::with_capacity(IRQCHIPS.len());
        for (key, chip_id) in IRQCHIPS {
            let chip: kvm_irqchip = decode_key(&state.blobs, key)?;
            if chip.chip_id != chip_id {
                return Err(invalid(format!("{key} blob holds irqchip {}", chip.chip_id)));
            }
            chips.push(chip);
        }
        let pit: kvm_bindings::kvm_pit_state2 = decode_key(&state.blobs, PIT_KEY)?;
        let mut clock: kvm_bindings::kvm_clock_data = decode_key(&state.blobs, CLOCK_KEY)?;
        for chip in &chips {
            self.fd.set_irqchip(chip).map_err(os("KVM_SET_IRQCHIP"))?;
        }
        self.fd.set_pit2(&pit).map_err(os("KVM_SET_PIT2"))?;
        // The guest clock resumes where it was saved; no flags, so KVM does not try to
        // advance it by host wall time or TSC (the state may come from another boot).
        clock.flags = 0;
        clock.realtime = 0;
        clock.host_tsc = 0;
        self.fd.set_clock(&clock).map_err(os("KVM_SET_CLOCK"))
    }
}
